"""Reading a model safely: hostile external data, invalid models and corrupt fields are refused
in one line (exit 2) by `opt`, `info` and `bench`; unusual but valid models keep working.

Every refused run is checked the same way (`assert_refused`): exit code 2, exactly one stderr
line starting `edgegraph: error:`, no file created or changed anywhere under the test folder
(model folder, the secret beside it, the output's folder), and the secret planted outside the
model folder never opened by Python and never in any output.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
import pytest

import edgegraph
from conftest import MODELS, require_shared
from edgegraph import cli, ir, modelio, validate
from edgegraph.errors import ModelLoadError
from fixtures import hostile

COMMANDS = {
    "opt": lambda model, root: ["opt", str(model), "-p", "cleanup", "-o", str(root / "out.onnx"),
                                "--report", str(root / "report.json")],
    "info": lambda model, root: ["info", str(model)],
    "bench": lambda model, root: ["bench", str(model), "--runs", "1", "--warmup", "0"],
}

# Paths Python opened during the current CLI run (the audit hook cannot be removed, so it
# records only while `_recording` is set).
_opened: list[str] = []
_recording = False


def _audit(event, args):
    if _recording and event == "open" and isinstance(args[0], str | bytes | Path):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


def _state(root: Path) -> dict[str, str]:
    """Every entry under `root`: sha256 of regular files, the kind of anything else."""
    state = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            state[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(path.relative_to(root))] = stat.filemode(mode)
    return state


def run_cli(argv, capfd):
    global _recording
    _opened.clear()
    _recording = True
    try:
        code = cli.main(argv)
    finally:
        _recording = False
    out, err = capfd.readouterr()
    return code, out, err


def assert_refused(argv, root: Path, capfd, *, words=()):
    """Run the CLI on hostile input and check the promise for bad input."""
    before = _state(root)
    code, out, err = run_cli(argv, capfd)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("edgegraph: error:"), err
    assert len(lines[0]) < 400
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _state(root) == before  # nothing written, nothing changed, no temporary left behind
    secret = (root / hostile.SECRET_NAME).resolve()
    assert not any(Path(p).resolve() == secret for p in _opened), "the secret outside the model folder was opened"
    assert hostile.SECRET.hex() not in out and "1234.5" not in out
    return lines[0]


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A folder holding the secret, made the working directory (where graphsurgeon used to
    look for the external data of Constant nodes); models go in `root/model`."""
    hostile.plant_secret(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 1. External data must be a regular file inside the model's folder


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", hostile.ESCAPES)
def test_external_data_outside_the_rule_is_refused(root, capfd, case, command):
    build, tensor = hostile.ESCAPES[case]
    model = build(root / "model")
    assert_refused(COMMANDS[command](model, root), root, capfd, words=[f"tensor '{tensor}'"])


def test_external_data_inside_the_folder_is_read_through_the_rule(root, capfd):
    """Initializers (at an offset, in a subfolder), a Constant node's value and a branch's
    initializer, all in the folder: loaded, run, optimized, with the working directory elsewhere."""
    model = hostile.external_inside(root / "model")
    loaded = modelio.load(model)
    branch = next(n for n in loaded.graph.nodes if n.op == "If").attrs["then_branch"]
    constant = next(n for n in branch.nodes if n.op == "Constant").attrs["value"]
    np.testing.assert_array_equal(constant.values, hostile.CONSTANT)
    np.testing.assert_array_equal(branch.tensors()["w"].values, hostile.WEIGHT)
    x = np.ones(16, np.float32)
    for cond, expected in ((True, x + hostile.WEIGHT + hostile.CONSTANT), (False, x - hostile.WEIGHT)):
        feeds = {"cond": np.array(cond), "x": x}
        got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, expected)
    code, _, err = run_cli(["opt", str(model), "-p", "cleanup", "-o", str(root / "out.onnx")], capfd)
    assert code == 0, err
    out = ort.InferenceSession(str(root / "out.onnx"), providers=["CPUExecutionProvider"])
    for cond, expected in ((True, x + hostile.WEIGHT + hostile.CONSTANT), (False, x - hostile.WEIGHT)):
        np.testing.assert_allclose(out.run(None, {"cond": np.array(cond), "x": x})[0], expected)
    assert not any(Path(p).resolve() == (root / hostile.SECRET_NAME).resolve() for p in _opened)
    # Nothing is left for graphsurgeon to read later (it would look relative to the working directory).
    left = [t.name for t in ir.all_constants(loaded, attributes=True)
            if hasattr(t._values, "tensor") and validate.uses_external_data(t._values.tensor)]
    assert left == []


def test_bytes_and_protos_with_external_data_need_a_folder(root):
    model = hostile.external_inside(root / "model")
    proto = onnx.load(model, load_external_data=False)
    for source in (proto, model.read_bytes()):
        with pytest.raises(ModelLoadError, match="tensor 'w' keeps its data in an external file .* load the model "
                                                 "from its file"):
            modelio.load(source)
    loaded = modelio.load(proto, base_dir=model.parent)
    branch = next(n for n in loaded.graph.nodes if n.op == "If").attrs["then_branch"]
    np.testing.assert_array_equal(branch.tensors()["w"].values, hostile.WEIGHT)
    escaping = onnx.load(hostile.dotdot(root / "other"), load_external_data=False)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        modelio.load(escaping, base_dir=root / "other")


def test_one_walk_finds_every_tensor(root):
    """`validate.tensors` covers what onnx's own walk misses: sparse tensors."""
    found = {}
    for case in ("constant_sparse_attribute", "sparse_initializer", "sparse_initializer_indices", "function_body",
                 "loop_body", "custom_op_tensors_attribute"):
        build, tensor = hostile.ESCAPES[case]
        proto = onnx.load(build(root / case), load_external_data=False)
        found[case] = tensor in {t.name for t in validate.tensors(proto) if validate.uses_external_data(t)}
        found[f"{case} (onnx)"] = tensor in {t.name for t in onnx.external_data_helper._get_all_tensors(proto)
                                             if validate.uses_external_data(t)}
    assert all(found[case] for case in found if "(onnx)" not in case), found
    missed = {case.removesuffix(" (onnx)") for case, hit in found.items() if "(onnx)" in case and not hit}
    assert missed == {"constant_sparse_attribute", "sparse_initializer", "sparse_initializer_indices"}


# ---------------------------------------------------------------------------------------------
# 2. Invalid models are refused, not "optimized"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", hostile.INVALID)
def test_invalid_model_is_refused(root, capfd, case, command):
    build, words = hostile.INVALID[case]
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(build().SerializeToString())
    assert_refused(COMMANDS[command](model, root), root, capfd, words=[words])


@pytest.mark.parametrize("case", ["unsorted", "experimental_op", "custom_domain_op", "untyped_branch_output"])
def test_unusual_valid_models_still_load(tmp_path, case):
    proto = getattr(hostile, case)()
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    for source in (path, proto, proto.SerializeToString()):
        model = modelio.load(source)
        assert len(model.graph.nodes) == len(proto.graph.node)
    if case == "experimental_op":  # the onnx checker warns about these on stdout (C++, flushed at exit)
        done = subprocess.run([sys.executable, "-m", "edgegraph", "info", "--json", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["ops"] == {"ImageScaler": 1}
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    saved = modelio.save(modelio.load(path), tmp_path / "out.onnx")
    if case == "unsorted":
        got = ort.InferenceSession(saved.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, -np.maximum(x, 0))
    if case == "untyped_branch_output":
        sess = ort.InferenceSession(saved.read_bytes(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {"cond": np.array(True), "x": x})[0], np.maximum(x, 0))
        np.testing.assert_array_equal(sess.run(None, {"cond": np.array(False), "x": x})[0], -x)


def test_every_shared_model_loads_and_checking_is_cheap():
    paths = sorted(MODELS.glob("*/*.onnx")) if MODELS.is_dir() else []
    if not paths:
        pytest.skip("no shared models")
    for path in paths:
        modelio.load(path, infer=False)
    minilm = require_shared(MODELS / "minilm_l6_v2_int8" / "model.onnx")
    raw = minilm.read_bytes()
    checks, loads = [], []
    for _ in range(3):
        proto = onnx.ModelProto()
        proto.ParseFromString(raw)
        start = time.perf_counter()
        validate.check(proto, str(minilm), minilm.parent, raw)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        modelio.load(minilm)
        loads.append(time.perf_counter() - start)
    # Measured: ~9 ms of a ~31 ms load on an idle machine (the check never copies the 22 MB of weights).
    assert min(checks) < 0.5 * min(loads), (checks, loads)


def test_declared_output_shapes_that_agree_with_inference_load(tmp_path):
    """Only sizes that contradict count (see hostile's *_contradicts): symbolic, unknown and -1
    dims, outputs without a shape and outputs of custom ops are fine, and keep what they said."""
    relu = onnx.helper.make_node("Relu", ["x"], ["y"])
    custom = onnx.helper.make_node("Frob", ["x"], ["z"], domain="com.example")
    for declared in (["n"], [None], [-1], None, [16]):
        graph = onnx.helper.make_graph(
            [relu, custom], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, declared),
             onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [3, 5])])
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                             onnx.helper.make_opsetid("com.example", 1)])
        outputs = {t.name: t.shape for t in modelio.load(proto).graph.outputs}
        # As onnx merges them: a computed size fills a symbolic or unknown dim, not a -1.
        assert outputs == {"y": [-1] if declared == [-1] else [16], "z": [3, 5]}, declared


def test_every_shared_model_loads_with_shape_inference():
    """The declared-shape check runs in the one inference at load; no real model contradicts."""
    paths = sorted(MODELS.glob("*/*.onnx")) if MODELS.is_dir() else []
    if not paths:
        pytest.skip("no shared models")
    for path in paths:
        model = modelio.load(path)
        declared = onnx.load(path, load_external_data=False).graph.output
        assert [t.name for t in model.graph.outputs] == [o.name for o in declared], path


# ---------------------------------------------------------------------------------------------
# 3. Fields that used to crash


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["node", "tensor", "dim", "attribute"])
def test_names_that_are_not_utf8_are_refused(root, capfd, where, command):
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(hostile.bad_utf8_bytes(where))
    assert_refused(COMMANDS[command](model, root), root, capfd, words=["not valid UTF-8"])


def test_sparse_initializer_works_in_opt_info_and_bench(tmp_path, capfd):
    model = tmp_path / "sparse.onnx"
    model.write_bytes(hostile.sparse_model().SerializeToString())
    dense = np.zeros(12, np.float32)
    dense[[0, 5, 11]] = [1.5, -2.0, 3.0]
    # graphsurgeon alone reads values kept in raw_data as zeros (and as float64).
    values = modelio.load(model).graph.tensors()["w"].values
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, dense.reshape(3, 4))

    code, out, err = run_cli(["info", str(model)], capfd)
    assert code == 0, err
    assert "params    12 (36 B)" in out  # 12 dense elements; 3 float32 values + 3 int64 indices stored
    code, out, err = run_cli(["bench", str(model), "--runs", "1", "--warmup", "0"], capfd)
    assert code == 0 and "sparse.onnx" in out, err
    code, out, err = run_cli(["opt", str(model), "-p", "cleanup", "-o", str(tmp_path / "out.onnx")], capfd)
    assert code == 0, err
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    expected = np.maximum(x + dense.reshape(3, 4), 0)
    for path in (model, tmp_path / "out.onnx"):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_optional_types_are_kept(tmp_path):
    """Graph inputs/outputs of optional type (graphsurgeon's exporter failed on them, so such
    models did not load) keep their types through load, cleanup and save."""
    proto = hostile.optional_io()
    model = modelio.load(proto)
    out = modelio.save(edgegraph.optimize(model, "cleanup", verify=False), tmp_path / "out.onnx")
    saved = onnx.load(out)
    assert saved.graph.input[0].type == proto.graph.input[0].type
    assert saved.graph.output[0].type == proto.graph.output[0].type
    x = np.arange(4, dtype=np.float32)
    for path in (proto.SerializeToString(), str(out)):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y, has = sess.run(None, {"x": x})
        np.testing.assert_array_equal(y, x)
        assert has


def test_an_optional_tensor_input_is_fed_a_tensor(tmp_path, capfd):
    """optional(tensor) inputs take random tensors for verification and timing (was exit 1:
    IndexError, from a spec without dtype or shape)."""
    model = tmp_path / "optional.onnx"
    model.write_bytes(hostile.optional_io().SerializeToString())
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["opt", str(model), "-p", "cleanup", "-o", str(out), "--runs", "1", "--warmup", "0"], capfd)
    assert code == 0, err
    assert runtime_specs(out) == [("x", np.dtype(np.float32), (4,))]
    code, stdout, err = run_cli(["bench", str(model), str(out), "--runs", "1", "--warmup", "0"], capfd)
    assert code == 0 and "latency at x=4" in stdout, err


def runtime_specs(path: Path) -> list[tuple]:
    from edgegraph import runtime

    model = onnx.load(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert runtime.input_specs(session) == runtime.input_specs(model)  # from the session and from the proto
    return [(s.name, s.dtype, s.shape) for s in runtime.input_specs(model)]


@pytest.mark.parametrize("command", ["opt", "bench"])
@pytest.mark.parametrize("case, words", [
    ("sequence_input", "input 's' is of type sequence(tensor(float)): only tensor inputs (plain or optional)"),
    ("unranked_input", "cannot make random inputs for input 'x': it is declared without a shape"),
])
def test_inputs_that_random_data_cannot_feed_are_refused(root, capfd, case, words, command):
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(getattr(hostile, case)().SerializeToString())
    assert_refused(COMMANDS[command](model, root), root, capfd, words=[words])


def test_weights_that_cannot_be_left_out_do_not_recurse(monkeypatch, caplog):
    """Shape inference of a model past the proto limit leaves the weights out; weights stored
    in typed fields cannot be, which recursed without end (what dims of 10^12 elements did)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4096])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [4096], np.ones(4096, np.float32))  # float_data
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    monkeypatch.setattr(ir, "PROTO_LIMIT", 8000)
    model = modelio.load(proto)
    assert "shape inference skipped" in caplog.text
    np.testing.assert_array_equal(model.graph.tensors()["w"].values, np.ones(4096, np.float32))


def test_declared_intermediate_types_give_way_to_computed_ones(tmp_path):
    """A stale (or hostile) value_info on a tensor a default-domain op computes would win over
    the computed type and make the written model fail the onnx checker: inference recomputes it."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1000, 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    assert cli.main(["opt", str(source), "-p", "cleanup", "-o", str(out), "--runs", "0", "--quiet"]) == 0
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in written.graph.value_info}
    assert shapes.get("h", [1, 16]) == [1, 16]


def test_an_unsorted_graph_is_sorted_before_inference(capfd, tmp_path):
    """Shape inference walks nodes in order: on an unsorted graph it found no shape for `y`, so a
    declared [1, 2] that contradicts the computed [1, 1] went unnoticed until cleanup sorted it."""
    nodes = [helper.make_node("Add", ["s", "x"], ["y"], name="late"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1, name="early")]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / "m.onnx"
    onnx.save(model, source)
    code, _, err = run_cli(["info", str(source)], capfd)
    assert code == 2 and err.count("\n") == 1
    assert "'y' is declared with shape [1, 2], but its computed shape is [1, 1]" in err
