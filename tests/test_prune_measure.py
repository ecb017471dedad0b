"""How prune judges and shapes a cut: the output error per field (so that one output field's
scale cannot decide between two cuts), kept widths aligned to the kernels' channel block, and
the batch-flatten Reshape before a classifier's Gemm, whose channels can now be cut."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import DATA, MODELS, require_shared
from edgegraph import ir, modelio, runtime
from edgegraph.analysis import channels
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.passes.prune import Prune, _fields, _Plan, _relative_noise
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from fixtures import quant as qfix


def _ctx(calib: CalibrationData | None = None) -> PassContext:
    return PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False))


def test_output_error_is_judged_per_field():
    """A detector-like output (anchors x [2 box fields of scale 100, 4 scores in [0, 1]]): an error
    of 1 on the boxes (1%) is smaller than scores off by 0.2, though its energy is 12x larger."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(50, 150, (2, 100, 2)), rng.uniform(0, 1, (2, 100, 4))], axis=-1)
    boxes_off, scores_off = ref.copy(), ref.copy()
    boxes_off[..., :2] += 1.0
    scores_off[..., 2:] += rng.choice([-0.2, 0.2], (2, 100, 4))
    reference = [{"out": ref}]
    boxes, scores = (_relative_noise(reference, [{"out": c}], frozenset()) for c in (boxes_off, scores_off))
    assert boxes < scores / 10
    summed = [_relative_noise(reference, [{"out": c}], frozenset(), per_field=False) for c in (boxes_off, scores_off)]
    assert summed[0] > summed[1]  # (summed over the output, what sensitivity curves use: the boxes' error is larger)
    assert np.isclose(summed[0], float(((ref - boxes_off) ** 2).sum() / (ref ** 2).sum()))
    # Fields are the shortest axis after the batch; class scores and rank-2 outputs are one field.
    assert _fields(np.zeros((1, 3549, 85)), False).shape == (3549, 85)
    assert _fields(np.zeros((1, 65, 65, 21)), False).shape == (65 * 65, 21)
    assert _fields(np.zeros((2, 21, 64, 64)), False).shape == (2 * 64 * 64, 21)
    assert _fields(np.zeros((4, 10)), True).shape == (40, 1)


def test_kept_widths_at_or_above_the_alignment_are_multiples_of_it():
    def kept(channels_, multiple, align):
        plan = _Plan(SimpleNamespace(channels=channels_), multiple, 1.0, align=align)
        return [channels_ - k for k in plan.allowed(0.75)]

    assert kept(24, 4, 16) == [16, 12, 8]  # (not 20: NCHWc pads it to 32, as it does 24)
    assert kept(12, 2, 16) == [10, 8, 6, 4]  # narrower than one block: every multiple
    assert kept(64, 16, 16) == [48, 32, 16]
    assert kept(48, 8, 16) == [32, 16]
    assert kept(24, 4, 1) == [20, 16, 12, 8]  # align=1: no block
    # A width that is a multiple of the block stays one (YOLOX's 16-channel stem cut to 12 made the
    # 1x1 Conv reading it twice as slow): one block is not cut, two only to one.
    assert kept(16, 4, 16) == []
    assert kept(32, 8, 16) == [16]


def _flatten_gemm() -> ir.Model:
    """Conv (3 -> 8) -> Relu -> Reshape(-1, 8*6*6) -> Gemm, with a symbolic batch: shape inference
    names the Reshape's batch size apart from the input's."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(0, 0.1, (4, 8 * 36)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("w", w), ("b", rng.normal(0, 0.1, 8).astype(np.float32)), ("shape", np.array([-1, 8 * 36], np.int64)),
        ("fc", fc), ("fb", np.zeros(4, np.float32)))]
    graph = helper.make_graph(nodes, "flatten", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ir.from_proto(model)


def test_batch_flatten_reshape_keeps_its_channels_prunable():
    model = _flatten_gemm()
    conv = next(g for g in channels.groups(model.graph) if any(s.constant == "w" for s in g.slices))
    assert conv.prunable, conv.reasons
    zeroed = model.copy()
    channels.zero_channels(zeroed.graph, [(conv, [1, 4, 6])])
    x = np.random.default_rng(2).normal(0, 1, (5, 3, 6, 6)).astype(np.float32)
    want = runtime.outputs(zeroed.to_proto(), [{"x": x}], threads=1)[0]["y"]
    pruned = zeroed.copy()
    result = Prune(ratio=0.375, importance="l1", align=1).run(pruned, _ctx())
    assert result.modified
    np.testing.assert_allclose(runtime.outputs(pruned.to_proto(), [{"x": x}], threads=1)[0]["y"], want,
                               rtol=1e-4, atol=1e-5)


def test_cifar10_default_30_percent_cut_keeps_aligned_widths_and_agreement():
    """The default settings at 30% fewer MACs on the CIFAR-10 CNN (its Conv -> flatten -> Gemm
    group now cuttable): no kept width between two channel blocks, agreement on held-out images."""
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx")
    x, _ = qfix.cifar10(require_shared(DATA))
    calib = CalibrationData.from_arrays({"modelInput": x[:64]})
    model, report = run_pipeline(modelio.load(path), parse("prune(macs=0.7)"), _ctx(calib))
    record = next(r for r in report.passes if r.name == "prune")
    assert record.stats["macs_removed"] >= 0.3
    rows = [r for r in record.details["groups"] if r.get("decision") in ("cut", "kept")]
    assert len(rows) == 4  # (the flatten group is prunable, not fixed)
    assert all(r["kept"] < 16 or r["kept"] % 16 == 0 for r in rows if r["decision"] == "cut")
    held = x[64:320]
    ref, got = (np.concatenate([o["modelOutput"] for o in runtime.outputs(m.to_proto(), [{"modelInput": held}],
                                                                             threads=1)]) for m in (modelio.load(path), model))
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.79  # measured 0.812 on these 256 images
