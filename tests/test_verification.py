"""Verification of the input model, of --fix-shape and of the inputs it runs on, and what `opt`
tells the user while and after it works.

- The input model must run on the verification data: exit 2 with onnxruntime's whole message and
  advice that fits what was given (--calib, --fix-shape), unless --no-verify.
- Shape specialisation is checked like an exact pass (the vad fixture: state [2, B, 16], scalar
  sr, LSTM in If branches).
- Random integer inputs are valid sizes, divisors and indices where the graph says so, and a
  native crash of onnxruntime never kills edgegraph without a word.
- Stage lines and the header first when stderr is not a terminal; latency at the data's shape;
  top-1 only for class scores.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clihelp import run_cli
from conftest import REPO
from onnx import TensorProto, helper, numpy_helper

from edgegraph import ir, modelio, runtime, verify
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import EdgegraphError, PassFailure, VerificationDataError
from edgegraph.pipeline import check_specialisation, integer_input_ranges, random_inputs
from fixtures.recurrent import CHUNK, HIDDEN, vad_model, vad_stream

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def run_subprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`edgegraph ...` as a user runs it, with stdout and stderr piped (not terminals)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edgegraph", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, path)
    return path


def reshape_model(node_name: str = "") -> onnx.ModelProto:
    """x [batch, 6] -> Reshape to [2, 3] -> Relu: runs only when batch is 1."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name=node_name),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "reshape", [helper.make_tensor_value_info("x", FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("y", FLOAT, None)],
                              [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------------------------
# The input model must run


def test_input_model_that_does_not_run_is_exit_2_with_the_whole_onnxruntime_message(capsys, tmp_path):
    model = save(reshape_model(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", out, "--runs", "0")
    assert code == 2 and err.count("\n") == 1 and err.startswith("edgegraph: error: "), err
    assert "the input model does not run in onnxruntime on random(seed=0) (x=4x6)" in err
    # The whole message (its last words too), not its first line.
    assert "Non-zero status code returned while running Reshape node" in err
    assert "Input shape:{4,6}, requested shape:{2,3}" in err
    assert "--calib DATA.npz" in err and "--fix-shape NAME=DIMS" in err and "--no-verify" in err
    assert not out.exists() and stdout.startswith(f"{model} -> {out}")  # the header came first
    code, _, err = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", out, "--runs", "0", "--no-verify")
    assert (code, err) == (0, "") and out.exists()


def test_advice_fits_what_the_user_gave(capsys, tmp_path):
    model = save(reshape_model(), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((5, 6), np.float32))
    out = tmp_path / "out.onnx"
    code, _, with_calib = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", out, "--calib", calib)
    assert code == 2 and f"on {calib} (x=4x6)" in with_calib
    assert f"check that {calib} holds inputs this model accepts" in with_calib
    assert "--calib DATA" not in with_calib and "--fix-shape" not in with_calib
    code, _, with_shape = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", out, "--fix-shape", "x=2x6")
    assert code == 2 and "(x=2x6)" in with_shape
    assert "check the --fix-shape sizes (x=2x6) against the model" in with_shape
    assert "--fix-shape NAME=DIMS" not in with_shape and "--calib DATA.npz" in with_shape
    assert not out.exists()
    # With sizes that fit, verification runs and passes.
    code, _, err = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", out, "--fix-shape", "x=1x6", "--runs", "0")
    assert (code, err) == (0, "")


def test_the_message_stays_short_whatever_onnxruntime_echoes(capsys, tmp_path):
    model = save(reshape_model(node_name="n" * 20000), tmp_path / "m.onnx")  # ORT quotes the node name
    code, _, err = run_cli(capsys, "opt", model, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--runs", "0")
    assert code == 2 and err.count("\n") == 1 and len(err) < 1200, len(err)


def test_library_raises_the_same_error():
    import edgegraph

    with pytest.raises(VerificationDataError, match=r"requested shape:\{2,3\}.*--no-verify"):
        edgegraph.optimize(reshape_model(), "cleanup")
    assert edgegraph.optimize(reshape_model(), "cleanup", fix_shapes={"x": [1, 6]}) is not None


# ---------------------------------------------------------------------------------------------
# --fix-shape is verified


VAD_SHAPES = {
    "input and state": ["input=1x32", "state=2x1x16"],
    "input only": ["input=3x32"],
    "state only": ["state=2x2x16"],
}


@pytest.mark.parametrize("case", list(VAD_SHAPES))
def test_fix_shape_on_a_stateful_recurrent_model_runs_and_matches(capsys, tmp_path, case):
    source = save(vad_model(), tmp_path / "vad.onnx")
    out = tmp_path / "out.onnx"
    args = [a for shape in VAD_SHAPES[case] for a in ("--fix-shape", shape)]
    code, stdout, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", out, "--runs", "0", *args)
    assert (code, err) == (0, ""), err
    written = onnx.load(out)
    batch = {"input and state": 1, "input only": 3, "state only": 2}[case]
    # A symbol names one size: fixing one input fixes the other one's batch dim too.
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in written.graph.input}
    assert dims == {"input": [batch, CHUNK], "state": [2, batch, HIDDEN], "sr": []}
    fixed = ort.InferenceSession(out.as_posix(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(source.as_posix(), providers=["CPUExecutionProvider"])
    for feeds in vad_stream(batch, frames=4):  # both sample rates, i.e. both If branches
        for got, want in zip(fixed.run(None, feeds), reference.run(None, feeds)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert "accuracy vs the input model" in stdout and "1.000000" in stdout


def test_fix_shape_sizes_that_contradict_the_model_are_exit_2(capsys, tmp_path):
    source = save(vad_model(), tmp_path / "vad.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", out,
                           "--fix-shape", "input=1x32", "--fix-shape", "state=2x3x16")
    assert code == 2 and err.count("\n") == 1
    assert "dim 'batch' of inputs 'input' and 'state' must be the same size, got 1 and 3" in err
    code, _, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", out, "--fix-shape", "sr=1")
    assert code == 2 and "input 'sr' has rank 0" in err
    assert not out.exists()


BREAKAGES = {
    "cannot run": ("--fix-shape produced a model onnxruntime cannot run",
                   lambda model: setattr(next(n for n in model.graph.nodes if n.op == "If"), "op", "NoSuchOp")),
    "computes something else": ("'--fix-shape' changed output 'output'",
                                lambda model: setattr(next(t for g in ir.iter_graphs(model.graph)
                                                           for t in g.tensors().values() if t.name == "Wout"),
                                                      "values", np.ones((16, 1), np.float32))),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_specialised_model_that_breaks_is_an_internal_error_and_nothing_is_written(capsys, tmp_path,
                                                                                       monkeypatch, breakage):
    """What the check is for: had fix_input_shapes written a model onnxruntime refuses, or one
    that computes something else, the run stops (exit 1, our bug) and writes nothing."""
    phrase, corrupt = BREAKAGES[breakage]
    real = ir.fix_input_shapes

    def broken(model, shapes):
        real(model, shapes)
        corrupt(model)

    monkeypatch.setattr(ir, "fix_input_shapes", broken)
    source = save(vad_model(), tmp_path / "vad.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", out, "--fix-shape", "input=3x32")
    assert code == 1 and err.count("\n") == 1, err
    assert phrase in err and not out.exists()


def test_fix_input_shapes_forgets_stale_shapes_inside_subgraphs():
    """An exporter that traced at batch 1 leaves [1, 1, 16] on a branch's tensor; fixed at batch 3,
    the branch must not keep claiming 1 (onnxruntime checks branch outputs against it)."""
    proto = modelio.load(vad_model()).to_proto()  # with value_info inside the branches
    branch = next(n for n in proto.graph.node if n.op_type == "If").attribute[0].g
    stale = next(v for v in branch.value_info if v.name.endswith("_Y_h"))
    for dim in stale.type.tensor_type.shape.dim:
        if dim.dim_param == "batch":
            dim.Clear()
            dim.dim_value = 1
    model = modelio.load(proto)
    ir.fix_input_shapes(model, {"input": [3, CHUNK]})
    branch = next(n for n in model.to_proto().graph.node if n.op_type == "If").attribute[0].g
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in branch.value_info}
    assert shapes[stale.name] == [1, 3, HIDDEN]


def test_info_and_bench_check_the_specialisation(capsys, tmp_path):
    source = save(reshape_model(), tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "info", source, "--fix-shape", "x=2x6")
    assert code == 2 and "check the --fix-shape sizes (x=2x6)" in err
    assert "--calib" not in err and "--no-verify" in err  # info takes no data, and can skip the check
    code, out, err = run_cli(capsys, "info", source, "--fix-shape", "x=2x6", "--no-verify")
    assert (code, err) == (0, "") and "x=2x6" in out  # MACs at the shapes asked for
    code, _, err = run_cli(capsys, "bench", source, "--fix-shape", "x=2x6", "--runs", "1")
    assert code == 2 and "check the --fix-shape sizes (x=2x6)" in err and "--calib DATA.npz" in err
    code, out, err = run_cli(capsys, "bench", source, "--fix-shape", "x=1x6", "--runs", "1")
    assert (code, err) == (0, "") and "latency at x=1x6" in out


def test_check_specialisation_is_exact():
    original = modelio.load(vad_model())
    fixed = original.copy()
    ir.fix_input_shapes(fixed, {"state": [2, 1, HIDDEN]})
    checker = check_specialisation(original, fixed, PassContext(progress=False, fixed_shapes={"state": [2, 1, 16]}))
    assert checker.source == "random(seed=0)" and len(checker.batches) == 4
    assert all(b["state"].shape == (2, 1, HIDDEN) and b["input"].shape == (1, CHUNK) for b in checker.batches)
    # A "specialised" model that computes something else is caught.
    other = modelio.load(vad_model(seed=1))
    ir.fix_input_shapes(other, {"state": [2, 1, HIDDEN]})
    with pytest.raises(EdgegraphError, match="'--fix-shape' changed output"):
        check_specialisation(original, other, PassContext(progress=False))
    broken = fixed.copy()
    broken.graph.nodes[-1].op = "NoSuchOp"
    with pytest.raises(PassFailure, match="--fix-shape produced a model onnxruntime cannot run"):
        check_specialisation(original, broken, PassContext(progress=False))


# ---------------------------------------------------------------------------------------------
# Verification inputs


def test_random_inputs_feed_a_model_whose_batch_is_not_on_axis_0():
    data = random_inputs(modelio.load(vad_model()), 4, seed=0)
    feeds = list(data.batches(4))
    assert len(feeds) == 4 and len(data) == 4
    for f in feeds:  # whole feeds: the batch symbol is 1 wherever it appears; sr is a scalar
        assert f["input"].shape == (1, CHUNK) and f["state"].shape == (2, 1, HIDDEN) and f["sr"].shape == ()
    # sr is only compared with 16000: it takes that and another value in turn, so both If branches run.
    assert [int(f["sr"]) for f in feeds] == [16000, 15999, 16000, 15999]
    sess = runtime.session(vad_model())
    assert runtime.run(sess, feeds[0])["stateN"].shape == (2, 1, HIDDEN)
    # A model that stacks on axis 0 keeps one batch of all samples (what catches batch-size bugs).
    tiny = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "t", [helper.make_tensor_value_info("x", FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", FLOAT, ["n", 3])]))
    assert [b["x"].shape for b in random_inputs(tiny, 4).batches(4)] == [(4, 3)]


def test_a_fixed_axis_0_that_the_count_does_not_divide_gets_whole_feeds():
    """[3, 4] fixed: 4 samples stacked 3 at a time would leave a batch of 1 the model refuses."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "t", [helper.make_tensor_value_info("x", FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [3, 4])]))
    assert [b["x"].shape for b in random_inputs(model, 4).batches(3)] == [(3, 4)] * 4


def int_model(op: str, inputs: list[tuple[str, int, list]], extra_inits=(), out_type=INT64, **attrs):
    order = {"Gather": ["data", "idx"], "Div": ["a", "d"], "Range": ["start", "limit", "delta"],
             "TopK": ["data", "k"]}[op]
    outputs = ["y", "i"] if op == "TopK" else ["y"]
    graph = helper.make_graph([helper.make_node(op, order, outputs, **attrs)], op,
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", out_type, None)]
                              + ([helper.make_tensor_value_info("i", INT64, None)] if op == "TopK" else []),
                              list(extra_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_integer_inputs_get_valid_sizes_divisors_and_indices():
    data = numpy_helper.from_array(np.zeros((5, 3), np.float32), "data")
    gather = int_model("Gather", [("idx", INT64, [8])], [data], out_type=FLOAT, axis=0)
    ranges = integer_input_ranges(gather)
    assert ranges == {"idx": (0, 5)}  # in range of the axis indexed
    ranges = integer_input_ranges(int_model("Div", [("a", INT64, [4]), ("d", INT64, [4])]))
    assert ranges == {"d": (1, 4)}  # a divisor is never 0; a plain operand keeps 0/1
    ranges = integer_input_ranges(int_model("Range", [("start", INT64, []), ("limit", INT64, []),
                                                      ("delta", INT64, [])]))
    assert ranges == {"limit": (1, 4), "delta": (1, 4)}
    topk = int_model("TopK", [("data", FLOAT, [2, 6]), ("k", INT64, [1])], out_type=FLOAT)
    assert integer_input_ranges(topk) == {"k": (1, 2)}
    for name, model in {"Gather": gather,
                        "Div": int_model("Div", [("a", INT64, [4]), ("d", INT64, [4])]), "TopK": topk}.items():
        feeds = list(random_inputs(model, 4, seed=1).batches(4))
        sess = runtime.session(model)
        for f in feeds:
            runtime.run(sess, f)  # runs: no division by zero, no index out of range
        if name == "Gather":
            values = np.concatenate([f["idx"].ravel() for f in feeds])
            assert values.min() >= 0 and values.max() <= 4 and len(set(values)) > 2


@pytest.fixture
def quiet_graphsurgeon():
    import onnx_graphsurgeon as gs

    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.CRITICAL + 1
    yield
    gs.logger.G_LOGGER.severity = severity


@pytest.fixture(scope="module")
def integer_cases(backend_node_cases):
    wanted = []
    for case in backend_node_cases:
        try:
            specs = runtime.input_specs(case.model)
        except Exception:  # noqa: BLE001 - types input_specs does not know
            continue
        if any(s.dtype.kind in "iu" for s in specs):
            wanted.append(case)
    return wanted


def _run_cases_in_a_child(cases) -> tuple[dict[str, str], str | None]:
    """Run each case on its random verification inputs in one forked child, which reports each
    result as a line on a pipe: ({case: "ok" or the error}, the case it died on, if it did)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        import faulthandler

        faulthandler.disable()
        os.close(read)
        with os.fdopen(write, "w", buffering=1) as pipe:
            for case in cases:
                pipe.write(f"start {case.name}\n")
                try:
                    model = modelio.load(case.model)
                    specs = runtime.input_specs(model)
                    data = random_inputs(model, 2, seed=0)
                    sess = runtime.session(case.model, threads=1)
                    for batch in data.batches(runtime.batch_size_for(specs, 2)):
                        runtime.run(sess, runtime.adapt_feeds(specs, batch))
                    pipe.write(f"ok {case.name}\n")
                except Exception as exc:  # noqa: BLE001 - recorded
                    pipe.write(f"error {case.name} {' '.join(str(exc).split())[:200]}\n")
        os._exit(0)
    os.close(write)
    results, started = {}, None
    with os.fdopen(read) as pipe:
        for line in pipe:
            kind, name, *rest = line.rstrip("\n").split(" ", 2)
            if kind == "start":
                started = name
            else:
                results[name], started = ("ok" if kind == "ok" else rest[0] if rest else "error"), None
    _, status = os.waitpid(pid, 0)
    return results, (started if os.WIFSIGNALED(status) else None)


def test_backend_cases_with_integer_inputs_never_crash_onnxruntime(integer_cases, quiet_graphsurgeon):
    """Every backend node case with an integer input, run on the random verification inputs: none
    may crash onnxruntime (test_stft died of SIGFPE on a frame length of 0), and the cases whose
    integer input is a size, count, divisor or index must run."""
    must_run = {"test_stft", "test_range_int32_type_negative_delta", "test_tile", "test_expand_dim_changed",
                "test_constantofshape_int_zeros", "test_mod_uint8", "test_div_uint8", "test_top_k", "test_gather_0",
                "test_gather_elements_1", "test_resize_upsample_sizes_nearest", "test_nllloss_NC",
                "test_constant_pad", "test_reduce_sum_keepdims_random"}
    assert must_run <= {c.name for c in integer_cases}
    results, crashed = _run_cases_in_a_child(integer_cases)
    assert crashed is None, f"onnxruntime crashed on {crashed}"
    failed = {name: results.get(name) for name in must_run if results.get(name) != "ok"}
    assert not failed, failed
    ran = sum(r == "ok" for r in results.values())
    assert ran >= 540, ran  # measured: 546 of the 700 cases run on random inputs (65 with 0/1 integers)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="integer division by zero traps on x86")
def test_a_native_crash_is_one_line_not_a_silent_death(tmp_path, integer_cases):
    """STFT with a frame length computed as l - l = 0: onnxruntime divides by it (SIGFPE) whatever
    the inputs. Verification runs the input model in a child: exit 2, one line, nothing written."""
    case = next(c for c in integer_cases if c.name == "test_stft")
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    stft = model.graph.node[0]
    length = stft.input[3]
    stft.input[3] = "zero_length"
    model.graph.node.insert(0, helper.make_node("Sub", [length, length], ["zero_length"]))
    source = save(model, tmp_path / "stft.onnx")
    out = tmp_path / "out.onnx"
    result = run_subprocess("opt", source, "-p", "cleanup", "-o", out, "--runs", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "onnxruntime crashed (SIGFPE)" in result.stderr, result.stderr
    assert not out.exists()
    # Without verification nothing runs it in a child: the crash still says so on stderr.
    result = run_subprocess("opt", source, "-p", "cleanup", "-o", out, "--no-verify", cwd=tmp_path)
    assert result.returncode != 0 and "Floating point exception" in result.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# What opt says while and after it works


def small_classifier_path(tmp_path: Path, batch="batch", h="h", w="w") -> Path:
    """x [batch, 3, h, w] -> Conv -> GlobalAveragePool -> Flatten -> Gemm -> y [batch, 10]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["c"], ["i"]),
             helper.make_node("GlobalAveragePool", ["i"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", FLOAT, [batch, 3, h, w])],
                              [helper.make_tensor_value_info("y", FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return save(model, tmp_path / "cls.onnx")


def test_non_tty_run_prints_the_header_first_then_one_line_per_stage(tmp_path):
    source = small_classifier_path(tmp_path)
    result = run_subprocess("opt", source.name, "-p", "cleanup", "-o", "out.onnx", "--runs", "2", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cls.onnx -> out.onnx"
    assert lines[1].startswith("pipeline: cleanup   target: cpu   calibration: none")
    stages = [line.strip() for line in lines[2:lines.index("passes") - 1]]
    expected = ["loaded cls.onnx in ", "verification: the input model ran on 4 sample(s) of random(seed=0) in ",
                "pass 1 cleanup: changed in ", "saved the result in ", "statistics in ",
                "timing (2 runs per model) in ", "accuracy on 4 sample(s) of random(seed=0) in "]
    assert len(stages) == len(expected), stages
    for line, start in zip(stages, expected):
        assert line.startswith(start) and line.endswith("s"), line
    assert "pass 1 cleanup: changed in" in stages[2] and ", verified in " in stages[2]
    assert sum(line.startswith("cls.onnx -> ") for line in lines) == 1  # the header is not repeated
    quiet = run_subprocess("opt", source.name, "-p", "cleanup", "-o", "q.onnx", "--quiet", cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_pass_progress_without_a_terminal_is_one_line_when_it_ends(caplog):
    import logging

    ctx = PassContext(progress=True)
    with caplog.at_level(logging.INFO, logger="edgegraph.stages"):
        from edgegraph.context import STAGES

        STAGES.addHandler(caplog.handler)
        try:
            assert list(ctx.progress_bar(range(3), total=3, desc="quant: calibration")) == [0, 1, 2]
            assert list(PassContext(progress=False).progress_bar(range(2), desc="silent")) == [0, 1]
        finally:
            STAGES.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records if r.name == "edgegraph.stages"]
    assert len(messages) == 1 and messages[0].startswith("quant: calibration: 3 step(s) in ")


def test_latency_is_measured_at_the_shape_of_the_data(capsys, tmp_path):
    source = small_classifier_path(tmp_path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).random((6, 3, 48, 64), dtype=np.float32))
    code, out, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--calib", calib,
                             "--runs", "2")
    assert (code, err) == (0, "")
    assert "(latency at x=1x3x48x64, median of" in out, out
    # --eval alone gives the shape too.
    code, out, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--eval", calib,
                             "--runs", "2")
    assert (code, err) == (0, "") and "(latency at x=1x3x48x64, median of" in out
    code, out, _ = run_cli(capsys, "bench", source, "--calib", calib, "--runs", "2")
    assert code == 0 and "(latency at x=1x3x48x64, median of" in out


def detector(tmp_path: Path) -> Path:
    """x [1, 8] -> boxes [1, 4] (Gemm), scores [1, 10] (Gemm -> Softmax), priors [6, 2] (Softmax per prior)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "wb"], ["boxes"]),
             helper.make_node("Gemm", ["x", "ws"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
             helper.make_node("Gemm", ["x", "wp"], ["flat"]),
             helper.make_node("Reshape", ["flat", "prior_shape"], ["prior_logits"]),
             helper.make_node("Softmax", ["prior_logits"], ["priors"], axis=-1)]
    inits = [numpy_helper.from_array(rng.standard_normal((8, n)).astype(np.float32), name)
             for name, n in [("wb", 4), ("ws", 10), ("wp", 12)]]
    inits.append(numpy_helper.from_array(np.array([6, 2], np.int64), "prior_shape"))
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("boxes", FLOAT, [1, 4]),
                               helper.make_tensor_value_info("scores", FLOAT, [1, 10]),
                               helper.make_tensor_value_info("priors", FLOAT, [6, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return save(model, tmp_path / "det.onnx")


def test_top1_is_shown_only_for_class_scores(capsys, tmp_path):
    source = detector(tmp_path)
    assert verify.score_outputs(modelio.load(source)) == {"scores"}
    code, out, err = run_cli(capsys, "opt", source, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--runs", "0")
    assert (code, err) == (0, "")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
    assert rows["boxes"][3] == "-" and rows["priors"][3] == "-"  # a box, one row per prior: no top-1
    assert rows["scores"][3] == "100.0%"
    # A classifier with a single linear head keeps its top-1.
    assert verify.score_outputs(modelio.load(small_classifier_path(tmp_path))) == {"y"}
    # So does any (batch, classes) array compared without a model (the array rule).
    assert verify.compare("y", np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)).top1 == 1.0
    assert verify.compare("y", np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), scores=False).top1 is None


def test_verification_data_of_a_calibrated_run_is_its_first_samples(tmp_path):
    from edgegraph.pipeline import verification_data

    calib = CalibrationData.from_arrays({"x": np.arange(6, dtype=np.float32)[:, None, None, None]
                                         * np.ones((6, 3, 8, 8), np.float32)}, "arrays")
    data = verification_data(modelio.load(small_classifier_path(tmp_path)), PassContext(calibration=calib, progress=False))
    assert len(data) == 4 and data.source == "arrays"
    assert [float(b["x"][0, 0, 0]) for b in [data.sample(i) for i in range(4)]] == [0.0, 1.0, 2.0, 3.0]


def test_a_dim_name_repeated_within_one_input_ties_no_sizes():
    """paddle2onnx writes `x [-1, 3, ?, ?]` (PP-OCR cls): fixing it to 1x3x48x192 must not read
    as '?' being both 48 and 192; across inputs a real symbol still ties sizes (see above)."""
    model = modelio.load(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "t", [helper.make_tensor_value_info("x", FLOAT, [-1, 3, "?", "?"])],
        [helper.make_tensor_value_info("y", FLOAT, [-1, 3, "?", "?"])]), opset_imports=[helper.make_opsetid("", 17)]))
    ir.fix_input_shapes(model, {"x": [1, 3, 48, 192]})
    assert model.graph.inputs[0].shape == [1, 3, 48, 192]
