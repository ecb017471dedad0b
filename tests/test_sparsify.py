"""`sparsify`: magnitude sparsity (per layer, global, N:M), and `sparsify,codebook` keeping zeros zero."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgegraph import ir, modelio, runtime
from edgegraph.analysis import encoding
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.passes.sparsify import Sparsify
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from fixtures import quant as qfx

LAYERS = ("conv2_w", "branch_b_w", "conv3_w")  # the weights of >= 500 elements in small_convnet


def _run(spec: str, calib=None, **floors):
    proto = qfx.small_convnet(17)
    ctx = PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False, **floors))
    model, report = run_pipeline(modelio.load(proto), parse(spec), ctx)
    return proto, model, {r.name: r for r in report.passes if r.wanted_by is None}


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Dense float weights of the Conv nodes by node name (decoded chains evaluated)."""
    return {n.name: ir.folded_value(n.inputs[1], model.opset, max_nodes=64) for n in model.graph.nodes if n.op == "Conv"}


def test_per_layer_sparsity_zeroes_the_smallest_weights():
    proto, model, records = _run("sparsify(sparsity=0.6, min_elements=500)")
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = _weights(model)
    for name in ("conv2", "branch_b", "conv3"):
        w, s = before[f"{name}_w"], after[name]
        assert abs((s == 0).mean() - 0.6) < 1.0 / w.size
        kept = s != 0
        np.testing.assert_array_equal(s[kept], w[kept])  # the rest is untouched
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    assert records["sparsify"].stats["layers"] == 3


def test_global_scope_uses_one_threshold_in_units_of_std():
    proto, model, records = _run("sparsify(sparsity=0.5, scope=global, min_elements=500)")
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = _weights(model)
    zeros = sum(int((after[n] == 0).sum()) for n in ("conv2", "branch_b", "conv3"))
    total = sum(before[f"{n}_w"].size for n in ("conv2", "branch_b", "conv3"))
    assert abs(zeros / total - 0.5) < 0.01
    thresholds = [np.abs(before[f"{n}_w"][after[n] == 0]).max() / before[f"{n}_w"].std() for n in ("conv2", "conv3")]
    assert abs(thresholds[0] - thresholds[1]) < 0.05


def test_two_of_four_along_input_channels():
    _, model, _ = _run("sparsify(pattern='2:4', min_elements=500)")
    w = _weights(model)["conv3"]  # (16, 16, 3, 3): groups of 4 input channels
    groups = np.moveaxis(w, 1, -1).reshape(16, 3, 3, 4, 4)
    assert ((groups != 0).sum(axis=-1) <= 2).all() and (w == 0).mean() == 0.5


def test_sparsify_then_codebook_keeps_zeros_exactly_zero():
    _, sparse, _ = _run("sparsify(sparsity=0.7, min_elements=500)")
    zeros = {k: v == 0 for k, v in _weights(sparse).items()}
    _, model, records = _run("sparsify(sparsity=0.7, min_elements=500),codebook(bits=3, min_elements=500)")
    assert records["codebook"].stats["layers"] == 3
    assert len(encoding.decoded_weights(model.graph)) == 3
    for name, value in _weights(model).items():
        if name in ("conv2", "branch_b", "conv3"):
            assert (value[zeros[name]] == 0).all()
    rows = {r["weight"]: r for r in records["codebook"].details["layers"]}
    assert all(r["index_entropy_bits"] < 2.2 for r in rows.values())  # 70% of the indices are the zero's


def test_floor_search_takes_the_highest_sparsity_that_holds():
    calib = CalibrationData.from_arrays({"x": qfx.convnet_inputs(32)})
    proto, model, records = _run("sparsify(min_elements=500)", calib, min_agreement=0.9)
    record = records["sparsify"]
    steps = record.details["floor_search"]["steps"]
    # (the setting the search chose: the model's sparsity is that rounded to whole weights)
    chosen = next(s["setting"] for s in steps if s["index"] == record.details["floor_search"]["best"])
    assert abs(record.stats["sparsity"] - chosen) < 0.01
    assert all(s["held"] == (s["agreement"] >= 0.9) for s in steps)
    assert any(s["held"] for s in steps) and all(not s["held"] for s in steps if s["setting"] > chosen + 1e-9)
    out = runtime.outputs(model.to_proto(), [{"x": qfx.convnet_inputs(32)}])[0]["logits"]
    ref = runtime.outputs(proto, [{"x": qfx.convnet_inputs(32)}])[0]["logits"]
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.9


def test_bad_options_are_refused():
    for bad in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"scope": "net"}, {"pattern": "4:2"}, {"pattern": "dense"}):
        with pytest.raises(Exception, match="sparsify"):
            Sparsify(**bad)
