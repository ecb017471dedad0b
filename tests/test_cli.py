"""The `edgegraph` command: end-to-end runs, reports, and how it fails on bad input.

Every failure must exit 2 (user error) or 1 (internal error) with exactly one line on stderr,
no traceback, no output file, and the input file byte for byte unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from clihelp import digest, run_cli
from conftest import MODELS, REPO, require_shared
from onnx import TensorProto, helper, numpy_helper

from edgegraph import ir, registry, runtime
from edgegraph.cli import main
from edgegraph.pipeline import Pass, PassResult, option

DEFAULT = REPO / "fixtures" / "default"
FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# A small model and passes registered only for these tests


def tiny_cnn() -> onnx.ModelProto:
    """x [batch, 3, 8, 8] -> Conv -> Identity -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y [batch, 4]."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["i"], name="identity"),
        helper.make_node("Relu", ["i"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("w", [6, 3, 3, 3]), ("b", [6]), ("fc", [4, 6]), ("fc_b", [4])]]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@dataclasses.dataclass(frozen=True)
class DropIdentity(Pass):
    name = "test-drop-identity"
    summary = "Remove Identity nodes (test pass)"
    exact = True
    keep_outputs: bool = option(True, "leave Identity nodes that write graph outputs")

    def run(self, model, ctx):
        removed = 0
        for node in list(model.graph.nodes):
            if node.op == "Identity" and not any(ir.is_graph_output(model.graph, t) for t in node.outputs):
                ir.bypass(model.graph, node)
                removed += 1
        return PassResult(removed > 0, {"removed": removed}, {"per_node": ["identity"] * removed})


@dataclasses.dataclass(frozen=True)
class Crash(Pass):
    name = "test-crash"
    summary = "Raise an unexpected exception (test pass)"

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


@dataclasses.dataclass(frozen=True)
class Liar(Pass):
    name = "test-liar"
    summary = "Scale the Gemm bias while claiming to be exact (test pass)"
    exact = True

    def run(self, model, ctx):
        bias = next(t for t in model.graph.tensors().values() if t.name == "fc_b")
        bias.values = bias.values * 3 + 1
        return PassResult(True)


@dataclasses.dataclass(frozen=True)
class NeedsData(Pass):
    name = "test-needs-data"
    summary = "Needs calibration data (test pass)"
    exact = False
    needs = frozenset({"calibration"})
    bits: int = option(8, "bit width")

    def __post_init__(self):
        self.check(self.bits in (4, 8), f"test-needs-data: bits must be 4 or 8, got {self.bits}")

    def run(self, model, ctx):
        samples = sum(len(next(iter(b.values()))) for b in ctx.calibration.batches(4))
        return PassResult(False, {"samples": samples})


@dataclasses.dataclass(frozen=True)
class Interrupt(Pass):
    name = "test-interrupt"
    summary = "Behave as if Ctrl-C was pressed (test pass)"

    def run(self, model, ctx):
        raise KeyboardInterrupt


TEST_PASSES = [DropIdentity, Crash, Liar, NeedsData, Interrupt]


@pytest.fixture(autouse=True)
def test_passes():
    registry._load_builtins()
    for cls in TEST_PASSES:
        registry.register_pass(cls)
    yield
    for cls in TEST_PASSES:
        registry._PASSES.pop(cls.name, None)


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_cnn(), path)
    return path


@pytest.fixture
def calib_path(tmp_path) -> Path:
    path = tmp_path / "calib.npz"
    x = np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=x, labels=np.arange(10) % 4)
    return path


def has_pass(name: str) -> bool:
    return name in {p.name for p in registry.list_passes()}


# ---------------------------------------------------------------------------------------------
# opt


def test_opt_writes_the_model_and_a_complete_report(capsys, tmp_path, model_path, calib_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, stderr = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity", "-o", out,
                                   "--calib", calib_path, "--eval", calib_path, "--report", report, "--runs", "3")
    assert (code, stderr) == (0, "")
    # The summary table: before -> after with the node count going down by one.
    assert re.search(r"^nodes\s+6\s+5\s+-16\.7%$", stdout, re.M), stdout
    assert re.search(r"^latency ms\s+\d+\.\d+\s+\d+\.\d+", stdout, re.M)
    assert "1. test-drop-identity: changed" in stdout and "removed=1" in stdout
    assert re.search(r"^\s+y\s+1\.000000\s+inf\s+100\.0%\s+0$", stdout, re.M), stdout  # exact pass
    assert "label accuracy:" in stdout

    text = report.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: SQNR of identical outputs is "inf"
    data = json.loads(text)
    assert data["pipeline"] == "test-drop-identity" and data["output"] == str(out)
    assert data["passes"][0]["metrics"]["y"]["sqnr_db"] == "inf"
    assert data["calibration"] == {"source": str(calib_path), "samples": 10}
    assert data["before"]["nodes"] == 6 and data["after"]["nodes"] == 5
    assert data["before"]["ops"]["Identity"] == 1 and "Identity" not in data["after"]["ops"]
    assert data["before"]["params"] == data["after"]["params"] == 6 * 27 + 6 + 24 + 4
    assert data["before"]["macs"] == 6 * 64 * 27 + 24 and data["after"]["macs"] == data["before"]["macs"]
    assert data["before"]["latency_ms"] > 0 and data["after"]["latency_ms"] > 0
    (record,) = data["passes"]
    assert record["name"] == "test-drop-identity" and record["modified"] is True
    assert record["stats"] == {"removed": 1} and record["details"] == {"per_node": ["identity"]}
    assert record["metrics"]["y"]["exact_match"] is True
    accuracy = data["accuracy"]
    assert accuracy["samples"] == 10 and accuracy["outputs"]["y"]["cosine"] == pytest.approx(1.0)
    assert accuracy["label_accuracy"]["reference"] == accuracy["label_accuracy"]["candidate"]

    # The written model is the optimized one, and computes the same thing.
    written = onnx.load(out)
    assert [n.op_type for n in written.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    x = np.load(calib_path)["x"]
    expected = runtime.run(runtime.session(tiny_cnn()), {"x": x})["y"]
    np.testing.assert_allclose(runtime.run(runtime.session(written), {"x": x})["y"], expected, rtol=1e-6)


def test_opt_recipe_and_quiet(capsys, tmp_path, model_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - test-drop-identity: {keep_outputs: false}\n")
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(capsys, "opt", model_path, "--recipe", recipe, "-o", out, "--quiet", "--runs", "0")
    assert (code, stdout, stderr) == (0, "", "")
    assert len(onnx.load(out).graph.node) == 5


def test_opt_in_place_replaces_the_input_atomically(capsys, model_path):
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity", "-o", model_path, "--runs", "0")
    assert (code, err) == (0, "")
    assert len(onnx.load(model_path).graph.node) == 5
    assert [p.name for p in model_path.parent.iterdir()] == ["tiny.onnx"]  # no staging left behind


def test_no_verify_skips_checks_and_accuracy(capsys, tmp_path, model_path):
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "opt", model_path, "-p", "test-liar", "-o", out, "--no-verify", "--runs", "0")
    assert (code, err) == (0, "")
    assert out.exists() and "not measured (--no-verify)" in stdout


def test_opt_on_a_model_past_the_proto_limit_copies_no_weights(capsys, tmp_path, monkeypatch, full_exports):
    """A multi-GB model in miniature: external data, and a limit shrunk so the result is saved with
    external data too. Verification, statistics, latency and accuracy all run without one copy
    of the weights in protobuf (onnxruntime loads files), and the in-place output replaces both files."""
    from fixtures import core

    source = core.write_large_model(tmp_path / "model", 2**20)  # a 1 MiB table, a 4 MiB projection
    feeds = core.large_model_feeds(source, batch=6)
    np.savez(tmp_path / "ids.npz", **feeds)
    expected = runtime.run(runtime.session(source), feeds)
    monkeypatch.setattr(ir, "PROTO_LIMIT", 100_000)
    report = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "opt", source, "-p", "test-drop-identity", "-o", source, "--calib",
                             tmp_path / "ids.npz", "--eval", tmp_path / "ids.npz", "--runs", "2", "--report", report)
    assert (code, err) == (0, "")
    assert full_exports == []
    assert sorted(p.name for p in source.parent.iterdir()) == ["large.onnx", "large.onnx.data"]
    written = onnx.load(source, load_external_data=False)
    assert "Identity" not in {n.op_type for n in written.graph.node}
    assert {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"table0", "proj"}
    got = runtime.run(runtime.session(source), feeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert re.search(r"^latency ms\s+\d+\.\d+\s+\d+\.\d+", out, re.M), out
    assert re.search(r"^\s+h\s+1\.000000\s+inf", out, re.M), out
    data = json.loads(report.read_text())
    assert data["after"]["size_bytes"] == sum(p.stat().st_size for p in source.parent.iterdir())
    assert data["before"]["macs"] == data["after"]["macs"] > 0  # dynamic shapes observed in a run
    assert data["accuracy"]["samples"] == 6


@pytest.mark.parametrize("value", ["2x3x8x8", "2,3,8,8"])
def test_fix_shape_makes_inputs_static_in_the_output(capsys, tmp_path, model_path, value):
    out = tmp_path / "out.onnx"
    code, stdout, _ = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity", "-o", out,
                              "--fix-shape", f"x={value}", "--runs", "0")
    assert code == 0
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]
    assert re.search(r"^MACs\s+20\.78K\s+20\.78K", stdout, re.M)  # 2 * (6*64*27 + 24)


def test_image_folder_calibration(capsys, tmp_path, model_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / f"{i}.png")
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-needs-data", "-o", tmp_path / "o.onnx",
                           "--calib", images, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                           "--report", report, "--runs", "0")
    assert (code, err) == (0, "")
    data = json.loads(report.read_text())
    assert data["calibration"]["samples"] == 3 and data["passes"][0]["stats"] == {"samples": 3}


def test_library_optimize_shares_the_cli_path(model_path, calib_path):
    import edgegraph

    proto = edgegraph.optimize(model_path, "test-drop-identity", calib=calib_path, fix_shapes={"x": [2, 3, 8, 8]})
    assert [n.op_type for n in proto.graph.node][:2] == ["Conv", "Relu"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    with pytest.raises(edgegraph.EdgegraphError, match="needs calibration data"):
        edgegraph.optimize(model_path, "test-needs-data")


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written, input unchanged


def bad_inputs(tmp_path: Path, model_path: Path, calib_path: Path) -> dict[str, tuple[list, str]]:
    """{case: (argv with OUT for the output path, a phrase the message must contain)}."""
    data = model_path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    (tmp_path / "notes.txt").write_text("this is not a model\n")
    (tmp_path / "folder.onnx").mkdir()
    np.savez(tmp_path / "wrong_keys.npz", images=np.zeros((4, 3, 8, 8), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((4, 3, 9, 9), np.float32))
    (tmp_path / "bad.json").write_text('{"passes": [')
    m, c = str(model_path), str(calib_path)
    opt = ["opt", "-o", "OUT"]
    return {
        "truncated": ([*opt, tmp_path / "truncated.onnx", "-p", "test-drop-identity"], "not a valid ONNX model"),
        "garbage": ([*opt, tmp_path / "garbage.onnx", "-p", "test-drop-identity"], "ONNX model"),
        "jpeg": ([*opt, tmp_path / "photo.jpg", "-p", "test-drop-identity"], "ONNX model"),
        "text": ([*opt, tmp_path / "notes.txt", "-p", "test-drop-identity"], "ONNX model"),
        "missing file": ([*opt, tmp_path / "nope.onnx", "-p", "test-drop-identity"], "no such file"),
        "directory": ([*opt, tmp_path / "folder.onnx", "-p", "test-drop-identity"], "is a directory"),
        "unknown pass": ([*opt, m, "-p", "test-drop-identty"], "did you mean 'test-drop-identity'"),
        "bad option name": ([*opt, m, "-p", "test-drop-identity(keep=true)"], "has no option 'keep'"),
        "bad option value": ([*opt, m, "-p", "test-drop-identity(keep_outputs=maybe)"], "true or false"),
        "option check": ([*opt, m, "-p", "test-needs-data(bits=3)", "--calib", c], "bits must be 4 or 8"),
        "bad spec syntax": ([*opt, m, "-p", "test-drop-identity(keep_outputs=true"], "unbalanced"),
        "missing calib": ([*opt, m, "-p", "test-needs-data"], "needs calibration data"),
        "calib wrong keys": ([*opt, m, "-p", "test-needs-data", "--calib", tmp_path / "wrong_keys.npz"],
                             "no array for model input(s) x"),
        "calib wrong shape": ([*opt, m, "-p", "test-needs-data", "--calib", tmp_path / "wrong_shape.npz"],
                              "the model wants 3x8x8"),
        "calib missing": ([*opt, m, "-p", "test-needs-data", "--calib", tmp_path / "none.npz"], "not found"),
        "calib not npz": ([*opt, m, "-p", "test-needs-data", "--calib", tmp_path / "notes.txt"], "is not an .npz file"),
        "empty image dir": ([*opt, m, "-p", "test-needs-data", "--calib", tmp_path / "folder.onnx"], "no images"),
        "fix-shape syntax": ([*opt, m, "-p", "test-drop-identity", "--fix-shape", "x:1x3x8x8"], "NAME=DIMS"),
        "fix-shape dims": ([*opt, m, "-p", "test-drop-identity", "--fix-shape", "x=1xAx8"], "positive sizes"),
        "fix-shape name": ([*opt, m, "-p", "test-drop-identity", "--fix-shape", "image=1x3x8x8"], "no input 'image'"),
        "fix-shape conflict": ([*opt, m, "-p", "test-drop-identity", "--fix-shape", "x=1x4x8x8"], "axis 1"),
        "unknown target": ([*opt, m, "-p", "test-drop-identity", "--target", "toaster"], "unknown target 'toaster'"),
        "bad recipe": ([*opt, m, "--recipe", tmp_path / "bad.json"], "not valid JSON"),
        "passes and recipe": ([*opt, m, "-p", "x", "--recipe", tmp_path / "bad.json"], "not allowed with"),
        "no passes": ([*opt, m], "one of the arguments -p/--passes --recipe is required"),
        "unknown flag": ([*opt, m, "-p", "test-drop-identity", "--turbo"], "unrecognized arguments: --turbo"),
        "bad threads": ([*opt, m, "-p", "test-drop-identity", "--threads", "-1"], "--threads"),
        "output is a dir": (["opt", m, "-p", "test-drop-identity", "-o", tmp_path], "is a directory"),
        "output folder missing": (["opt", m, "-p", "test-drop-identity", "-o", tmp_path / "no" / "o.onnx"],
                                  "does not exist"),
        "report is the input": ([*opt, m, "-p", "test-drop-identity", "--report", m], "--report must not name"),
        "no command": ([], "required: COMMAND"),
        "info on text": (["info", tmp_path / "notes.txt"], "ONNX model"),
        "bench missing": (["bench", m, tmp_path / "nope.onnx"], "no such file"),
    }


BAD_INPUT_CASES = [
    "truncated", "garbage", "jpeg", "text", "missing file", "directory", "unknown pass", "bad option name",
    "bad option value", "option check", "bad spec syntax", "missing calib", "calib wrong keys", "calib wrong shape",
    "calib missing", "calib not npz", "empty image dir", "fix-shape syntax", "fix-shape dims", "fix-shape name",
    "fix-shape conflict", "unknown target", "bad recipe", "passes and recipe", "no passes", "unknown flag",
    "bad threads", "output is a dir", "output folder missing", "report is the input", "no command", "info on text",
    "bench missing",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, model_path, calib_path, case):
    cases = bad_inputs(tmp_path, model_path, calib_path)
    assert list(cases) == BAD_INPUT_CASES
    argv, phrase = cases[case]
    out = tmp_path / "out.onnx"
    argv = [out if a == "OUT" else a for a in argv]
    inputs = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("edgegraph: error: "), stderr
    assert phrase in stderr, stderr
    assert "Traceback" not in stderr and "--debug" not in stderr
    assert not out.exists()
    assert {p: digest(p) for p in inputs} == inputs
    assert {p for p in tmp_path.iterdir() if p.is_file()} == set(inputs)  # no stray temporary files


def test_unknown_pass_lists_every_available_pass(capsys, model_path, tmp_path):
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "no-such-pass", "-o", tmp_path / "o.onnx")
    assert code == 2
    for cls in registry.list_passes():
        assert cls.name in err


# ---------------------------------------------------------------------------------------------
# Internal errors: exit 1, one line naming the pass, nothing written


def test_crashing_pass_exits_1_with_a_hint_and_writes_nothing(capsys, tmp_path, model_path):
    before, out = digest(model_path), tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity,test-crash", "-o", out)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pass 2 'test-crash' failed: ZeroDivisionError: boom" in err and "--debug" in err
    assert not out.exists() and digest(model_path) == before
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-crash", "-o", out, "--debug")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err and not out.exists()
    out.write_bytes(b"an earlier result")  # an existing output file stays as it was
    assert main(["opt", str(model_path), "-p", "test-crash", "-o", str(out)]) == 1
    assert out.read_bytes() == b"an earlier result"
    capsys.readouterr()


def test_exact_pass_that_changes_outputs_fails_verification(capsys, tmp_path, model_path):
    before, out = digest(model_path), tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-liar", "-o", out, "--report", tmp_path / "r.json")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "pass 'test-liar' changed output 'y'" in err and "--no-verify" in err
    assert not out.exists() and not (tmp_path / "r.json").exists() and digest(model_path) == before


def test_in_place_run_that_fails_keeps_the_input(capsys, model_path):
    before = digest(model_path)
    code, _, _ = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity,test-liar", "-o", model_path)
    assert code == 1 and digest(model_path) == before


def test_ctrl_c_exits_130_and_writes_nothing(capsys, tmp_path, model_path):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "opt", model_path, "-p", "test-drop-identity,test-interrupt", "-o", out)
    assert code == 130 and err == "edgegraph: error: interrupted; nothing was written\n"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# info, bench, passes


def test_info_text_and_json(capsys, model_path):
    code, out, err = run_cli(capsys, "info", model_path)
    assert (code, err) == (0, "")
    assert re.search(r"^params\s+196 \(784 B\)$", out, re.M) and re.search(r"^nodes\s+6 ", out, re.M)
    assert re.search(r"^MACs\s+10.39K \(x=1x3x8x8; batch axis of x taken as 1\)", out, re.M), out
    assert "x: float32[batch, 3, 8, 8]" in out and "y: float32[batch, 4]" in out
    assert "opsets ai.onnx 17" in out and "tests" in out
    assert re.search(r"^\s+10.37K\s+99.8%\s+Conv\s+conv$", out, re.M)
    code, out, _ = run_cli(capsys, "info", model_path, "--json", "--fix-shape", "x=2x3x8x8")
    data = json.loads(out)
    assert data["macs"] == 2 * (6 * 64 * 27 + 24) and data["ops"]["Identity"] == 1
    assert data["size_bytes"] == model_path.stat().st_size and data["inputs"][0]["shape"] == ["batch", 3, 8, 8]


def test_library_warnings_stay_off_stdout(capsys, tmp_path):
    # graphsurgeon prints "[W] Model does not contain ONNX domain opset information!" for this model.
    graph = helper.make_graph([helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")], "ml",
                              [helper.make_tensor_value_info("x", FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    path = tmp_path / "ml.onnx"
    onnx.save_model(model, path)
    code, out, err = run_cli(capsys, "info", path, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["opsets"] == {"ai.onnx.ml": 3}


def test_bench_times_and_compares_models(capsys, tmp_path, model_path, calib_path):
    other = tmp_path / "other.onnx"
    assert main(["opt", str(model_path), "-p", "test-drop-identity", "-o", str(other), "--quiet"]) == 0
    code, out, err = run_cli(capsys, "bench", model_path, other, "--calib", calib_path, "--runs", "3",
                             "--threads", "1")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["model", "size", "latency", "ms", "speedup", "cosine", "SQNR", "dB", "top-1",
                                "agree", "accuracy"]
    assert re.search(r"other\.onnx .* \d\.\d\dx\s+1\.000000\s+inf\s+100\.0%", lines[2]), out
    assert "threads=1" in out and "over 10 samples" in out
    code, out, _ = run_cli(capsys, "bench", model_path, other, "--runs", "2", "--json")
    rows = json.loads(out)["models"]
    assert [Path(r["model"]).name for r in rows] == ["tiny.onnx", "other.onnx"]
    assert all(r["latency_ms"] > 0 for r in rows)


def test_passes_lists_every_pass_with_typed_options(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    for cls in registry.list_passes():
        assert re.search(rf"^{re.escape(cls.name)}  \((exact|lossy)", out, re.M)
    assert "test-needs-data  (lossy; needs calibration)" in out
    assert "    bits: int = 8\n        bit width" in out
    assert "    keep_outputs: bool = true" in out
    code, out, _ = run_cli(capsys, "passes", "--json")
    described = {p["name"]: p for p in json.loads(out)}
    assert described["test-needs-data"]["options"] == [{"name": "bits", "type": "int", "default": "8",
                                                         "doc": "bit width"}]


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert "edgegraph 0.1.0" in capsys.readouterr().out
    assert main(["opt", "--help"]) == 0
    assert "--fix-shape NAME=DIMS" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The bundled default model with the real passes, the README, the installed script


def require_passes(*names):
    # Built-in passes and the committed default model are part of the product: missing is a failure.
    missing = [n for n in names if not has_pass(n)]
    assert not missing, f"built-in pass(es) {', '.join(missing)} not registered"


def require_default():
    assert (DEFAULT / "digits_cnn.onnx").exists(), "fixtures/default/digits_cnn.onnx is missing (it is committed)"


def test_default_model_cleanup_quant(capsys, tmp_path):
    require_default()
    require_passes("cleanup", "quant")
    out, report = tmp_path / "digits_int8.onnx", tmp_path / "r.json"
    # (The digits CNN runs slower in int8 than in float, so by default quant writes the float
    # model: if_slower=int8 asks for the int8 one.)
    code, stdout, err = run_cli(capsys, "opt", DEFAULT / "digits_cnn.onnx", "-p", "cleanup,quant(if_slower=int8)",
                                "-o", out, "--calib", DEFAULT / "digits_calib.npz", "--eval",
                                DEFAULT / "digits_eval.npz", "--report", report, "--runs", "5")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["cleanup", "quant"]
    assert data["after"]["quantized_nodes"] > 0 and data["after"]["size_bytes"] < data["before"]["size_bytes"]
    labels = data["accuracy"]["label_accuracy"]
    assert labels["candidate"] >= labels["reference"] - 0.02
    assert data["accuracy"]["outputs"]["logits"]["top1"] >= 0.97
    assert "label accuracy:" in stdout


def readme_blocks(*languages: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```(?:{'|'.join(languages)})\n(.*?)```", text, re.S)


def readme_commands() -> list[str]:
    """The `edgegraph ...` commands in README.md's shell blocks (`pip install ... &&` prefixes dropped)."""
    commands = []
    for block in readme_blocks("bash", "sh", "shell"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if part.startswith("edgegraph "):
                    commands.append(part)
    return commands


@pytest.fixture
def in_checkout_copy(tmp_path, monkeypatch) -> Path:
    """A working folder where README paths (relative to the checkout) resolve and outputs land."""
    require_default()
    (tmp_path / "fixtures").symlink_to(REPO / "fixtures")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_commands_work(capsys, in_checkout_copy):
    commands = readme_commands()
    assert commands[0].startswith("edgegraph opt fixtures/default/digits_cnn.onnx -p cleanup,quant")
    for command in commands:
        argv = shlex.split(command)[1:]
        if "-p" in argv:
            without_options = re.sub(r"\([^)]*\)", "", argv[argv.index("-p") + 1])
            require_passes(*(name.strip() for name in without_options.split(",")))
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, f"{command}: {err}"
    assert (in_checkout_copy / "digits_int8.onnx").exists() and (in_checkout_copy / "report.json").exists()


def test_readme_library_example_works(in_checkout_copy):
    require_passes("cleanup", "quant")
    (block,) = readme_blocks("python")
    exec(compile(block, "README.md", "exec"), {})
    assert onnx.load(in_checkout_copy / "digits_int8.onnx").graph.node


def installed_script() -> str:
    script = Path(sys.executable).parent / "edgegraph"
    return str(script) if script.exists() else shutil.which("edgegraph") or pytest.skip("edgegraph not installed")


def test_installed_console_script(tmp_path, model_path):
    script = installed_script()
    done = subprocess.run([script, "info", str(model_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and "MACs" in done.stdout
    done = subprocess.run([script, "info", str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"edgegraph: error: no such file: {tmp_path / 'missing.onnx'}\n"
    done = subprocess.run([sys.executable, "-m", "edgegraph", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "edgegraph 0.1.0"


def test_real_model_opt_and_info(capsys, tmp_path):
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial" / "ImageClassifier.onnx")
    reference = require_shared(path.with_suffix(".reference_io.npz"))
    code, out, err = run_cli(capsys, "info", path)
    assert code == 0 and re.search(r"^MACs\s+6\.13M", out, re.M)
    out_path = tmp_path / "cifar.onnx"
    code, out, err = run_cli(capsys, "opt", path, "-p", "test-drop-identity", "-o", out_path, "--calib", reference,
                             "--runs", "3")
    assert code == 0, err
    assert re.search(r"^params\s+50\.18K\s+50\.18K", out, re.M)
