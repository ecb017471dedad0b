"""prune's allocation bound (`max_step_cost`: no group is cut past what its consumers can
compensate, unless the budget needs it) and the optional refit of every layer downstream of a
cut (`refit_downstream`)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import DATA, MODELS, require_shared
from edgegraph import ir, modelio, runtime, verify
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.errors import EdgegraphError
from edgegraph.passes.prune import Prune
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from fixtures import quant as qfix
from test_prune_recovery import _chain_model


def _ctx(calib: CalibrationData) -> PassContext:
    return PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False))


def _fit_batches(model: ir.Model, calib: CalibrationData) -> list:
    return [runtime.adapt_feeds(runtime.input_specs(model), b) for b in calib.take(20).batches(10)]  # (holdout=4)


def test_refit_downstream_keeps_an_exact_cut_exact():
    """conv1's channels 0-3 output exact zeros: removing them changes nothing, and refitting
    conv2 and the downstream conv3 (which reads no cut channel) must leave the outputs as they were."""
    proto = _chain_model()
    for tensor in proto.graph.initializer:
        if tensor.name in ("w1", "b1"):
            value = numpy_helper.to_array(tensor).copy()
            value[:4] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    model = ir.from_proto(proto)
    calib = CalibrationData.random(runtime.input_specs(model), 24, seed=2)
    fit = _fit_batches(model, calib)
    want = runtime.outputs(model.to_proto(), fit, threads=1)
    pruned = model.copy()
    result = Prune(ratio=0.5, align=1, holdout=4, refit_downstream=True, importance="l2").run(pruned, _ctx(calib))
    assert result.stats["channels_removed"] == 4
    got = runtime.outputs(pruned.to_proto(), fit, threads=1)
    for w, g in zip(want, got):
        for name in ("y2", "y3"):
            np.testing.assert_allclose(g[name], w[name], rtol=1e-4, atol=1e-4)


def test_refit_downstream_fits_the_layer_after_the_recovered_one():
    """A lossy cut of conv1: conv2 is recovered either way; conv3 reads no cut channel, and only
    with refit_downstream is it fitted to the original's y3 on the pruned inputs (its error on the
    fitting samples drops)."""
    model = ir.from_proto(_chain_model())
    calib = CalibrationData.random(runtime.input_specs(model), 24, seed=2)
    fit = _fit_batches(model, calib)
    want = runtime.outputs(model.to_proto(), fit, threads=1)
    errors = {}
    for flag in (True, False):
        pruned = model.copy()
        Prune(ratio=0.5, align=1, holdout=4, refit_downstream=flag).run(pruned, _ctx(calib))
        got = runtime.outputs(pruned.to_proto(), fit, threads=1)
        errors[flag] = sum(float(((g["y3"] - w["y3"]) ** 2).sum()) for g, w in zip(got, want))
    assert errors[True] < 0.99 * errors[False], errors  # (measured 0.979: r2's error is mostly not linear in it)


def test_max_step_cost_is_checked():
    with pytest.raises(EdgegraphError, match="max_step_cost"):
        Prune(max_step_cost=-1.0)


def test_step_cost_bound_keeps_the_ppocr_classifier_bottleneck():
    """PP-OCR cls at a 30% MAC cut shared by reconstruction cost (sensitivity=false, one
    allocation kind), agreement with fp32 on 2 x 400 held-out crops: unbounded, the allocation
    halves a 32-channel bottleneck whose consumers keep 7% of their output energy after the
    compensation (measured 0.72/0.71); bounded at 0.5, the MACs come from the wider groups
    (0.77/0.77)."""
    path = require_shared(MODELS / "ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    x, _ = qfix.text_line_inputs(require_shared(DATA), 256 + 800)
    held = [{"x": x[i:i + 100]} for i in range(256, 1056, 100)]
    reference = runtime.outputs(modelio.load(path).to_proto(), held, threads=1)
    calib = CalibrationData.from_arrays({"x": x[:256]})
    agreement = {}
    for bound in (0.5, 0.0):
        model, report = run_pipeline(modelio.load(path), parse(f"prune(macs=0.7, sensitivity=false, "
                                                               f"max_step_cost={bound})"), _ctx(calib))
        got = runtime.outputs(model.to_proto(), held, threads=1)
        top1 = [verify.compare("out", next(iter(r.values())), next(iter(g.values())), scores=True).top1
                for r, g in zip(reference, got)]
        agreement[bound] = [float(np.mean(top1[:4])), float(np.mean(top1[4:]))]
        assert report.passes[-1].stats["macs_removed"] >= 0.295
    assert min(agreement[0.5]) >= 0.75, agreement
    assert all(a >= b + 0.03 for a, b in zip(agreement[0.5], agreement[0.0])), agreement
