"""What `edgegraph opt` writes: never an input file, sidecars that never replace someone else's
file, the model, its sidecar and the report as one outcome, the report with the model's permissions."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import clihelp
from clihelp import assert_refused, run_cli
from conftest import DEFAULT_DIR

from edgegraph import files, ir, modelio
from edgegraph.cli import main
from edgegraph.errors import EdgegraphError

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"


def snapshot(root: Path) -> dict[str, str]:
    return clihelp.snapshot(root, inodes=True)  # a replaced file keeps neither its bytes nor its inode


def external_model(path: Path, data_name: str | None = None) -> Path:
    """The digits CNN at `path` with its weights in an external-data file (`data_name`)."""
    modelio.save(modelio.load(DIGITS), path, external_data=True)
    if data_name:
        proto = onnx.load(path, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        modelio.sidecar_path(path).rename(path.with_name(data_name))
        onnx.save(proto, path)
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Every kind of input file of a run, in tmp/in; tmp/out is an empty folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"{i}.png")
    (folder / "recipe.json").write_text(json.dumps({"passes": ["cleanup"]}))
    for name in ("digits_calib.npz", "digits_eval.npz"):
        (folder / name).write_bytes((DEFAULT_DIR / name).read_bytes())
    return {
        # the model's weights are in b.onnx.data: the sidecar `-o b.onnx` would write
        "model": external_model(folder / "model.onnx", "b.onnx.data"),
        "external data": folder / "b.onnx.data",
        "calibration": folder / "digits_calib.npz",
        "calibration image": images / "1.png",
        "eval": folder / "digits_eval.npz",
        "recipe": folder / "recipe.json",
    }


def opt_argv(inputs: dict[str, Path], kind: str) -> list:
    calib = inputs["calibration image"].parent if kind == "calibration image" else inputs["calibration"]
    return ["opt", inputs["model"], "--recipe", inputs["recipe"], "--calib", calib, "--eval", inputs["eval"],
            "--runs", "0", "--no-verify"]


INPUT_KINDS = ["model", "external data", "calibration", "calibration image", "eval", "recipe"]
PHRASES = {"model": "the input model", "external data": "the input's external data",
           "calibration": "the --calib data", "calibration image": "the --calib data", "eval": "the --eval data",
           "recipe": "the --recipe"}


# (input kind, output, how the output names it). `-o` may name the input model (test_in_place_*);
# by its path, only the external data file is named like a sidecar.
COLLISIONS = [(kind, output, via) for kind in INPUT_KINDS for output in ("-o", "--report", "sidecar")
              for via in ("path", "symlink", "hard link")
              if not (kind == "model" and output == "-o")
              and not (via == "path" and output == "sidecar" and kind != "external data")]


@pytest.mark.parametrize(("kind", "output", "via"), COLLISIONS)
def test_no_output_may_be_an_input_file(capsys, tmp_path, inputs, kind, output, via):
    target = inputs[kind]
    if via == "path":
        named = target.parent / "." / target.name  # another spelling of the same path
    else:
        named = tmp_path / "out" / ("alias.onnx.data" if output == "sidecar" else f"alias{target.suffix}")
        if via == "symlink":
            named.symlink_to(target)
        else:
            os.link(target, named)
    if output == "sidecar":  # -o X whose external data would be written to X.data, the input file
        argv = [*opt_argv(inputs, kind), "-o", Path(str(named).removesuffix(".data"))]
        phrase = "the external data file of -o"
    else:
        out = named if output == "-o" else tmp_path / "out" / "o.onnx"
        argv = [*opt_argv(inputs, kind), "-o", out, *(["--report", named] if output == "--report" else [])]
        phrase = f"{output} must not name"
    err = assert_refused(capsys, tmp_path, argv, phrase)
    assert PHRASES[kind] in err, err


def test_refusal_names_the_input(capsys, tmp_path, inputs):
    code, _, err = run_cli(capsys, *opt_argv(inputs, "eval"), "-o", tmp_path / "out" / "o.onnx", "--report", inputs["eval"])
    assert code == 2
    assert err == (f"edgegraph: error: --report must not name the --eval data ({inputs['eval']}): "
                   "it would be overwritten; choose another path\n")


def test_outputs_must_be_different_files(capsys, tmp_path, inputs):
    out = tmp_path / "out" / "o.onnx"
    assert_refused(capsys, tmp_path, [*opt_argv(inputs, "model"), "-o", out, "--report", out],
                   "--report must not name the same file as -o")
    assert_refused(capsys, tmp_path, [*opt_argv(inputs, "model"), "-o", out, "--report", modelio.sidecar_path(out)],
                   "--report must not name the same file as the external data file of -o")


def test_in_place_replaces_the_input_model_and_its_own_external_data(capsys, tmp_path, monkeypatch):
    """`-o IN` works with external data: the new sidecar replaces the input's (which the new model
    does not need: its weights are in the new file); a report may not replace the old data."""
    source = external_model(tmp_path / "m.onnx")
    assert_refused(capsys, tmp_path, ["opt", source, "-p", "cleanup", "-o", source, "--runs", "0",
                                      "--report", modelio.sidecar_path(source)], "--report must not name the input")
    expected = onnx.load(DIGITS)
    monkeypatch.setattr(ir, "PROTO_LIMIT", 20_000)  # the output needs external data too
    code, _, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", source, "--runs", "0")
    assert (code, err) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    written = onnx.load(source, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    from edgegraph import runtime

    feeds = {"input": np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)}
    got = runtime.run(runtime.session(source), feeds)
    want = runtime.run(runtime.session(expected), feeds)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sidecars


def test_save_refuses_a_sidecar_that_belongs_to_someone_else(tmp_path):
    model = modelio.load(DIGITS)
    out = tmp_path / "out.onnx"
    foreign = modelio.sidecar_path(out)
    foreign.write_bytes(b"someone else's file")
    with pytest.raises(EdgegraphError, match="out.onnx.data exists and is not the external data of"):
        modelio.save(model, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx.data"]
    modelio.save(model, out)  # without external data the file is no one's concern
    out_bytes = out.read_bytes()
    with pytest.raises(EdgegraphError, match="is not the external data of"):  # out.onnx does not use it
        modelio.save(model, out, external_data=True)
    assert foreign.read_bytes() == b"someone else's file" and out.read_bytes() == out_bytes
    # A model that keeps its data elsewhere does not own out.onnx.data either.
    external_model(tmp_path / "other.onnx", "elsewhere.data").replace(out)
    with pytest.raises(EdgegraphError, match="is not the external data of"):
        modelio.save(model, out, external_data=True)
    assert foreign.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.data", "out.onnx", "out.onnx.data"]


def test_save_replaces_the_sidecar_of_the_model_it_replaces(tmp_path):
    out = tmp_path / "out.onnx"
    modelio.save(modelio.load(DIGITS), out, external_data=True)
    modelio.save(modelio.load(DIGITS), out, external_data=True)  # a re-run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(onnx.load(out).graph.initializer[0]),
        onnx.numpy_helper.to_array(onnx.load(DIGITS).graph.initializer[0]))


def test_opt_refuses_a_foreign_sidecar_when_it_needs_one(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    modelio.sidecar_path(out).write_bytes(b"not ours")
    code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--runs", "0")
    assert (code, err) == (0, "")  # no external data needed: the file is left alone
    assert modelio.sidecar_path(out).read_bytes() == b"not ours"
    out.unlink()
    monkeypatch.setattr(ir, "PROTO_LIMIT", 20_000)
    assert_refused(capsys, tmp_path, ["opt", DIGITS, "-p", "cleanup", "-o", out, "--runs", "0"],
                   "o.onnx.data exists and is not the external data of")
    # A re-run over its own output replaces its own sidecar.
    modelio.sidecar_path(out).unlink()
    for _ in range(2):
        code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--runs", "0")
        assert (code, err) == (0, "")
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]


# ---------------------------------------------------------------------------------------------
# One outcome


@pytest.fixture
def earlier_run(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """out/o.onnx, its sidecar and out/r.json from an earlier run; outputs need external data."""
    monkeypatch.setattr(ir, "PROTO_LIMIT", 20_000)
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    out.parent.mkdir()
    assert main(["opt", str(DIGITS), "-p", "cleanup", "-o", str(out), "--report", str(report), "--runs", "0",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data", "r.json"]
    return out, report


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over an earlier run"])
def test_a_report_that_cannot_be_written_leaves_nothing(capsys, tmp_path, monkeypatch, request, earlier):
    if earlier:
        request.getfixturevalue("earlier_run")
    else:
        monkeypatch.setattr(ir, "PROTO_LIMIT", 20_000)
        (tmp_path / "out").mkdir()
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    before = snapshot(tmp_path)
    replace = os.replace

    def failing(src, dst, **kwargs):
        if Path(dst) == report:
            raise OSError(28, "No space left on device")
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--report", report, "--runs", "0")
    assert code == 2
    assert err == f"edgegraph: error: cannot write {report}: No space left on device; nothing was written\n"
    assert snapshot(tmp_path) == before  # the sidecar and model moved first were put back


def test_a_signal_while_files_move_into_place_undoes_the_moves(capsys, tmp_path, monkeypatch, earlier_run):
    """SIGTERM between two renames: the renames finish, are undone, then the signal ends the run."""
    out, report = earlier_run
    before = snapshot(tmp_path)
    replace, moves = os.replace, []

    def signalled(src, dst, **kwargs):
        if Path(dst).parent == out.parent:  # (not the copies for onnxruntime in the temporary folder)
            moves.append(Path(dst))
            if len(moves) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", signalled)
    code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--report", report, "--runs", "0")
    assert (code, err) == (143, "edgegraph: error: interrupted (SIGTERM); nothing was written\n")
    assert moves[:3] == [modelio.sidecar_path(out), out, report]  # all three moved, then put back
    assert snapshot(tmp_path) == before


def test_publish_puts_back_what_it_replaced(tmp_path, monkeypatch):
    staging = tmp_path / ".staging"
    staging.mkdir()
    for name in ("a", "b", "c"):
        (staging / name).write_text(f"new {name}")
    (tmp_path / "a").write_text("old a")
    replace = os.replace

    def failing(src, dst, **kwargs):
        if Path(dst).name == "c":
            raise PermissionError(13, "Permission denied")
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError) as raised:
        files.publish([(staging / n, tmp_path / n) for n in ("a", "b", "c")])
    assert raised.value.filename == str(tmp_path / "c")
    assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "b").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_report_gets_the_permissions_of_the_model(capsys, tmp_path, umask):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--report", report, "--runs", "0")
    finally:
        os.umask(old)
    assert (code, err) == (0, "")
    assert oct(out.stat().st_mode & 0o777) == oct(report.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_a_signal_after_the_files_are_in_place_says_so(capsys, tmp_path, monkeypatch):
    """A signal while the (emptied) staging folder is removed: the outputs are complete and
    stay; the line says they were written rather than "nothing was written"."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    rmtree = files.shutil.rmtree

    def signalled(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            os.kill(os.getpid(), signal.SIGHUP)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", signalled)
    code, _, err = run_cli(capsys, "opt", DIGITS, "-p", "cleanup", "-o", out, "--report", report, "--runs", "0")
    assert (code, err) == (129, f"edgegraph: error: interrupted (SIGHUP); after writing {out}, {report}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "r.json"]
    onnx.checker.check_model(onnx.load(out))


def test_in_place_on_a_self_contained_model_does_not_read_it_again(capsys, tmp_path, monkeypatch):
    """The input is read again (for its external-data files) only when an output is another file
    of its folder: never for a model with its weights inside, however big."""
    source = tmp_path / "m.onnx"
    source.write_bytes(DIGITS.read_bytes())
    (tmp_path / "notes.txt").write_text("unrelated")

    def unexpected(path):
        raise AssertionError("read the input again")

    monkeypatch.setattr(modelio, "external_data_files", unexpected)
    code, _, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", source, "--runs", "0", "--report",
                    tmp_path / "r.json")
    assert (code, err) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "notes.txt", "r.json"]


# ---------------------------------------------------------------------------------------------
# A model saved over itself never reads the data it replaced


def constant_reading_external_data(folder: Path) -> onnx.ModelProto:
    """y = (x + c) * w: `c` a Constant node's tensor kept in `m.onnx.data` (offset 0), `w` a 32 KB
    initializer inside the model. Written to folder/m.onnx."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal(1024).astype(np.float32), "c")
    (folder / "m.onnx.data").write_bytes(c.raw_data)
    c.ClearField("raw_data")
    c.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "m.onnx.data"), ("offset", "0"), ("length", "4096")):
        c.external_data.add(key=key, value=value)
    w = numpy_helper.from_array(rng.standard_normal((8, 1024)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=c), helper.make_node("Add", ["x", "c"], ["s"]),
         helper.make_node("Mul", ["s", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1024])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, folder / "m.onnx")
    return proto


def test_save_refuses_a_model_that_refers_to_data_it_does_not_write(tmp_path):
    proto = constant_reading_external_data(tmp_path)
    model = ir.from_proto(proto, infer=False)  # from a proto: nothing reads m.onnx.data
    before = snapshot(tmp_path)
    for external_data in (False, True):
        for target in (tmp_path / "elsewhere.onnx", tmp_path / "m.onnx"):
            with pytest.raises(EdgegraphError, match="tensor 'c' refers to external data in 'm.onnx.data'"):
                modelio.save(model, target, external_data=external_data)
    assert snapshot(tmp_path) == before


@pytest.fixture
def noop_pass():
    import dataclasses

    from edgegraph import registry
    from edgegraph.pipeline import Pass, PassResult

    @dataclasses.dataclass(frozen=True)
    class Noop(Pass):
        name = "test-noop"
        summary = "Change nothing (test pass)"
        exact = True

        def run(self, model, ctx):
            return PassResult(False)

    registry._load_builtins()
    registry.register_pass(Noop)
    yield
    registry._PASSES.pop(Noop.name, None)


def test_in_place_output_never_reads_the_external_data_it_replaced(capsys, tmp_path, monkeypatch, noop_pass):
    """`-o IN` with an output past the (shrunk) proto limit: its new sidecar is named like the
    input's `m.onnx.data`, which a Constant of the input reads. The output must compute what
    the input computed from its own files, or nothing is written."""
    proto = constant_reading_external_data(tmp_path)
    source = tmp_path / "m.onnx"
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 1024)).astype(np.float32)}
    from edgegraph import runtime

    expected = runtime.run(runtime.session(source), feeds)["y"]
    before = snapshot(tmp_path)
    monkeypatch.setattr(ir, "PROTO_LIMIT", 20_000)
    code, _, err = run_cli(capsys, "opt", source, "-p", "test-noop", "-o", source, "--runs", "0", "--no-verify")
    if code == 2:
        assert err.count("\n") == 1 and "refers to external data" in err, err
        assert snapshot(tmp_path) == before
    else:
        assert (code, err) == (0, "")
        np.testing.assert_array_equal(runtime.run(runtime.session(source), feeds)["y"], expected)
    assert proto.graph.node[0].attribute[0].t.external_data[0].value == "m.onnx.data"


def test_an_unwritable_report_folder_is_refused_before_the_run(capsys, tmp_path, monkeypatch, noop_pass):
    (tmp_path / "locked").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "locked" and access(path, mode))
    monkeypatch.setattr(modelio, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_refused(capsys, tmp_path, ["opt", DIGITS, "-p", "test-noop", "-o", tmp_path / "o.onnx",
                                      "--report", tmp_path / "locked" / "r.json"], "--report folder")
