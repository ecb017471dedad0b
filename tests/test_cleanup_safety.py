"""What an exact pass must never do, whatever it rewrites: rename the graph's inputs or outputs,
store a weight twice (make the file bigger), or be judged with a tolerance the output's dtype
cannot meet (float16) or that hides real errors.

Each model is run in onnxruntime before and after; sizes are measured on the serialized model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import MODELS, model_id, require_shared, shared_model_paths
from onnx import helper, numpy_helper

import edgegraph
from edgegraph import ir, modelio, runtime, verify
from edgegraph.cli import main
from edgegraph.context import PassContext, VerifyConfig
from edgegraph.errors import PassFailure, VerificationError
from edgegraph.pipeline import Pass, PassResult, run_pipeline
from fixtures import cleanup as fx
from fixtures.recurrent import vad_model, vad_stream


def outputs(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(model, threads=1), feeds)


def assert_same(original: onnx.ModelProto, new: onnx.ModelProto, feeds: dict, rtol=1e-5, atol=1e-6):
    want, got = outputs(original, feeds), outputs(new, feeds)
    assert list(got) == list(want)
    for name, expected in want.items():
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=atol + rtol * scale, err_msg=name)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the file stores (initializers and Constant values, subgraphs included)."""
    total = 0

    def walk(graph: onnx.GraphProto):
        nonlocal total
        total += sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += numpy_helper.to_array(attr.t).nbytes
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    walk(sub)

    walk(model.graph)
    return total


def stored_bytes(model: onnx.ModelProto) -> int:
    """Serialized size without value_info: the inferred types every edgegraph output carries
    (~60 bytes a tensor) are not part of what a pass rewrote."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def strip(graph: onnx.GraphProto):
        del graph.value_info[:]
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    strip(sub)

    strip(copy.graph)
    return copy.ByteSize()


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


# --- graph inputs and outputs keep their names -------------------------------------------------


@pytest.mark.parametrize("depth", [3, 5])
def test_nested_constant_ifs_keep_io_names_without_verification(depth, tmp_path):
    model = fx.nested_constant_ifs(depth)
    source, written = tmp_path / "nested.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    assert main(["opt", str(source), "-p", "cleanup", "--no-verify", "--runs", "0", "--quiet", "-o", str(written)]) == 0
    cleaned = onnx.load(written)
    assert io_names(cleaned) == (["X"], ["Y"])
    assert sorted(n.op_type for n in cleaned.graph.node) == ["Mul", "Relu"]  # every If inlined
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], np.float32)
    assert_same(model, cleaned, {"X": x})
    np.testing.assert_array_equal(outputs(cleaned, {"X": x})["Y"], np.maximum(2 * x, 0))


def test_outputs_that_are_one_value_keep_both_names():
    # An input passed straight to an output, and two outputs that are the same tensor.
    nodes = [helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Identity", ["r"], ["r1"]), helper.make_node("Identity", ["r"], ["r2"]),
             helper.make_node("Relu", ["x"], ["r3"])]
    model = fx.make(nodes, [("x", fx.F, [2])], [("same", fx.F, [2]), ("r1", fx.F, [2]), ("r2", fx.F, [2]),
                                                 ("r3", fx.F, [2])])
    cleaned = edgegraph.optimize(model, "cleanup", verify=False)
    assert io_names(cleaned) == (["x"], ["same", "r1", "r2", "r3"])
    assert_same(model, cleaned, {"x": np.array([1.0, -2.0], np.float32)})


@dataclass(frozen=True)
class RenameInput(Pass):
    name = "test-rename-input"

    def run(self, model, ctx):
        model.graph.inputs[0].name += "_1"
        return PassResult(modified=True)


@dataclass(frozen=True)
class SwapOutputs(Pass):
    name = "test-swap-outputs"

    def run(self, model, ctx):
        model.graph.outputs = model.graph.outputs[::-1]
        return PassResult(modified=False)  # the guard does not rely on what a pass says


def test_manager_refuses_a_pass_that_touches_graph_io():
    off = PassContext(progress=False, verify=VerifyConfig(enabled=False))
    with pytest.raises(PassFailure, match=r"^pass 'test-rename-input' removed graph input\(s\) X \(now X_1\)$"):
        run_pipeline(modelio.load(fx.nested_constant_ifs()), [RenameInput()], off)
    two = fx.make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
                  [("x", fx.F, [2])], [("a", fx.F, [2]), ("b", fx.F, [2])])
    with pytest.raises(PassFailure, match=r"^pass 'test-swap-outputs' reordered the graph outputs$"):
        run_pipeline(modelio.load(two), [SwapOutputs()], off)


# --- exact passes do not grow the file ---------------------------------------------------------


def test_a_weight_several_graphs_read_is_stored_once():
    model = vad_model()
    written = modelio.load(model).to_proto()  # no pass: only what loading and writing do
    assert weight_bytes(written) == weight_bytes(model)  # was 1.7x: the LSTM weights once per branch
    assert {"W2d", "R2d", "B1d", "Wout"} <= {t.name for t in written.graph.initializer}
    branches = [a.g for n in written.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert all(not {"W2d", "R2d", "B1d", "Wout"} & {t.name for t in g.initializer} for g in branches)
    for feeds in vad_stream(batch=1, frames=2):
        assert_same(model, written, feeds, rtol=0, atol=0)


def test_cleanup_does_not_grow_the_recurrent_model():
    model = vad_model()
    cleaned = edgegraph.optimize(model, "cleanup", verify=False)
    # The LSTM weights both If branches read are stored once, folded or not (was 18.2 KB from 10.6 KB).
    assert weight_bytes(cleaned) <= weight_bytes(model)
    assert stored_bytes(cleaned) <= stored_bytes(model)
    assert len(cleaned.SerializeToString()) < 1.1 * len(model.SerializeToString())
    assert sum(len(n.attribute[0].g.node) for n in cleaned.graph.node if n.op_type == "If") < 28  # folds still done
    for feeds in vad_stream(batch=2, frames=4):  # both branches (sr alternates)
        assert_same(model, cleaned, feeds)


def test_a_weight_shared_with_the_main_graph_is_not_copied_into_a_branch():
    model = fx.shared_weight_in_branch()
    cleaned = edgegraph.optimize(model, "cleanup", verify=False)
    assert weight_bytes(cleaned) <= weight_bytes(model)
    x = np.random.default_rng(0).standard_normal((2, 136)).astype(np.float32)
    for flag in (True, False):
        assert_same(model, cleaned, {"x": x, "flag": np.array(flag)})


def test_batchnorms_after_convs_sharing_a_weight_do_not_copy_it():
    model = fx.shared_weight_batchnorms()
    cleaned = edgegraph.optimize(model, "cleanup", verify=False)
    assert weight_bytes(cleaned) <= weight_bytes(model)
    x = np.random.default_rng(0).standard_normal((1, 64, 6, 6)).astype(np.float32)
    assert_same(model, cleaned, {"x": x})
    # Weights read by one Conv each still fold as before.
    folded = edgegraph.optimize(fx.conv_batchnorm(), "cleanup", verify=False)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}


def sparse_weights_model() -> tuple[onnx.ModelProto, dict]:
    """Convs with sparse-initializer weights: W1 a tenth non-zero (sparse is the smaller form),
    W1b a copy of it, W2 half non-zero (dense is smaller: 4 bytes a value against 4 + 8)."""
    rng = np.random.default_rng(0)

    def weight(shape, density):
        return rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < density)

    def sparse(name, array):
        flat = array.reshape(-1)
        indices = np.flatnonzero(flat).astype(np.int64)
        return helper.make_sparse_tensor(numpy_helper.from_array(flat[indices], name),
                                         numpy_helper.from_array(indices, ""), list(array.shape))

    w1 = weight((32, 16, 3, 3), 0.1)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "b1"], ["a1"]),  # fuse-linear reads W1 and keeps it
        helper.make_node("Conv", ["x", "W1b"], ["c2"], pads=[1, 1, 1, 1]),  # dedup: W1b is W1
        helper.make_node("Add", ["a1", "c2"], ["s"]),
        helper.make_node("Conv", ["s", "W2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "sparse_weights", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((1, 32, 1, 1)).astype(np.float32), "b1")],
        sparse_initializer=[sparse("W1", w1), sparse("W1b", w1.copy()), sparse("W2", weight((16, 32, 3, 3), 0.5))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}


def test_sparse_weights_go_through_cleanup_in_their_smaller_form(tmp_path):
    model, feeds = sparse_weights_model()
    onnx.save(model, tmp_path / "sparse.onnx")
    # Was exit 1: "pass 1 'cleanup' failed: AttributeError: data_location" (dedup read the
    # sparse proto as a dense one).
    assert main(["opt", str(tmp_path / "sparse.onnx"), "-p", "cleanup", "-o", str(tmp_path / "out.onnx"),
                 "--runs", "0", "--quiet"]) == 0
    cleaned = onnx.load(tmp_path / "out.onnx")
    assert_same(model, cleaned, feeds)
    # W1 stays sparse although fuse-linear read it; its copy W1b is gone; W2 is written dense.
    assert [s.values.name for s in cleaned.graph.sparse_initializer] == ["W1"]
    assert cleaned.graph.sparse_initializer[0] == model.graph.sparse_initializer[0]  # (field by field)
    assert {"W2"} <= {t.name for t in cleaned.graph.initializer} and "W1b" not in str(cleaned.graph)
    saved = stored_bytes(model) - stored_bytes(cleaned)
    assert 14_000 < saved < 16_000, saved  # W1b (~7.3 KB) and W2 as dense (~6.9 KB less)
    assert (tmp_path / "out.onnx").stat().st_size < (tmp_path / "sparse.onnx").stat().st_size


SHARED = shared_model_paths()


@pytest.mark.skipif(not SHARED, reason=f"{MODELS} not found: the real models live in ../shared next to the repo")
@pytest.mark.parametrize("path", SHARED, ids=model_id)
def test_cleanup_does_not_grow_real_models(path):
    model = onnx.load(str(path))
    logging.disable(logging.WARNING)
    try:
        cleaned = edgegraph.optimize(model, "cleanup", verify=False)
    finally:
        logging.disable(logging.NOTSET)
    # Small new constants (merged Slice parameters, a bias) replace whole nodes: the file shrinks.
    assert weight_bytes(cleaned) <= weight_bytes(model) + 1024
    assert stored_bytes(cleaned) <= stored_bytes(model)


# --- tolerance follows the output dtype --------------------------------------------------------


def test_tolerance_scales_with_the_dtype_precision():
    assert verify.tolerance(np.float32, 1e-4, 1e-5) == (1e-4, 1e-5)  # float32's own, unchanged
    eps16 = float(np.finfo(np.float16).eps)
    assert verify.tolerance(np.float16, 1e-4, 1e-5) == (verify.ROUNDING_UNITS * eps16, 1e-5)
    assert verify.tolerance("bfloat16", 1e-4, 1e-5) == (verify.ROUNDING_UNITS * 2.0**-7, 1e-5)
    rtol, atol = verify.tolerance(np.float64, 1e-4, 1e-5)
    ratio = np.finfo(np.float64).eps / np.finfo(np.float32).eps
    assert rtol == pytest.approx(1e-4 * ratio) and atol == pytest.approx(1e-5 * ratio)
    assert verify.tolerance(np.int64, 1e-4, 1e-5) == (1e-4, 1e-5)


def fp16_scale_model() -> onnx.ModelProto:
    """y = x * s in float16, s = 1."""
    return fx.make([helper.make_node("Mul", ["x", "s"], ["y"])], [("x", onnx.TensorProto.FLOAT16, [4, 64])],
                   [("y", onnx.TensorProto.FLOAT16, [4, 64])], {"s": np.array([1.0], np.float16)})


@dataclass(frozen=True)
class NudgeScale(Pass):
    """Claims to be exact but multiplies the output by 1 + units * eps(float16)."""

    name = "test-nudge-scale"
    units: int = 1

    def run(self, model, ctx):
        node = model.graph.nodes[0]
        node.inputs[1] = ir.const("s_nudged", np.array([1 + self.units * 2.0**-10], np.float16))
        return PassResult(modified=True)


def test_float16_outputs_get_float16_tolerance():
    ctx = PassContext(progress=False, verify=VerifyConfig(samples=4))
    # One unit of float16 rounding (relative to the max) is what float16 can hold: accepted.
    _, report = run_pipeline(modelio.load(fp16_scale_model()), [NudgeScale(units=1)], ctx)
    metrics = report.passes[0].metrics["y"]
    assert metrics.dtype == "float16" and 0 < metrics.max_abs < 2 * 2.0**-10 * metrics.ref_max_abs
    # Ten units is a real error: caught, against float16's threshold.
    with pytest.raises(VerificationError) as caught:
        run_pipeline(modelio.load(fp16_scale_model()), [NudgeScale(units=10)], ctx)
    error = caught.value
    assert error.value > 5 * 2.0**-10 * metrics.ref_max_abs
    assert error.threshold == pytest.approx(1e-5 + verify.ROUNDING_UNITS * 2.0**-10 * metrics.ref_max_abs)


def test_squeezenet_fp16_cleanup_passes_verification():
    path = require_shared(MODELS / "squeezenet1.0_imagenet_fp16" / "SqueezeNet_fp16.onnx")
    cleaned = edgegraph.optimize(path, "cleanup")  # verified on random inputs (raised before)
    original = onnx.load(str(path))
    assert runtime.input_specs(cleaned) == runtime.input_specs(original)
    assert io_names(cleaned)[1] == io_names(original)[1]



def test_written_file_carries_value_info_only_if_the_input_did(tmp_path):
    """Inferred intermediate types (~60 bytes a tensor) are written only for models that had
    them: an exact pass must not grow the file with types any runtime infers again."""
    def graphs(model):
        return [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]

    bare, annotated = tmp_path / "bare.onnx", tmp_path / "annotated.onnx"
    onnx.save(vad_model(), bare)
    onnx.save(onnx.shape_inference.infer_shapes(vad_model()), annotated)
    for source in (bare, annotated):
        out = tmp_path / f"{source.stem}_cleaned.onnx"
        assert main(["opt", str(source), "-p", "cleanup", "-o", str(out), "--runs", "0", "--quiet"]) == 0
        written = onnx.load(out)
        assert any(g.value_info for g in graphs(written)) == (source == annotated)
        if source == bare:
            assert out.stat().st_size <= bare.stat().st_size  # 10.6 KB -> 10.5 KB (was 11.1 KB)
