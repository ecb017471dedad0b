"""Tests of quant's accuracy machinery: the floor measured on calibration samples held out of
fitting, and the accuracy methods chosen by measurement."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from conftest import DEFAULT_DIR, run_spec
from edgegraph import ir
from edgegraph.context import CalibrationData
from edgegraph.passes.quant import state



def _digits(count=64):
    calib = np.load(DEFAULT_DIR / "digits_calib.npz")
    return onnx.load(DEFAULT_DIR / "digits_cnn.onnx"), {"input": calib["input"][:count]}


# ---------------------------------------------------------------------------------------------
# The floor's samples


def test_split_holds_out_every_fourth_sample_and_fits_on_the_rest():
    data = CalibrationData.from_arrays({"x": np.arange(40, dtype=np.float32).reshape(40, 1)})
    fitting, held, split = state.split_for_floor(data)
    held_values = [float(held.sample(i)["x"][0]) for i in range(len(held))]
    fit_values = [float(fitting.sample(i)["x"][0]) for i in range(len(fitting))]
    assert held_values == [3.0, 7.0, 11.0, 15.0, 19.0, 23.0, 27.0, 31.0, 35.0, 39.0]
    assert not set(held_values) & set(fit_values) and len(fit_values) == 30
    assert split["held_out"] == 10 and split["fitting"] == 30
    big = CalibrationData.from_arrays({"x": np.zeros((400, 1), np.float32)})
    assert len(state.split_for_floor(big)[1]) == state.HOLD_OUT_MAX


def test_floor_is_measured_on_held_out_samples_and_reported():
    model, data = _digits()
    _, record = run_spec(model, data, "cleanup,quant(check_speed=false, min_sqnr=36)")
    samples = record.details["fallback"]["samples"]
    assert samples["held_out"] == record.stats["floor_samples"] == 16 and samples["fitting"] == 48
    assert record.stats["calibration_samples"] == 64


def test_without_a_floor_every_sample_fits(caplog):
    model, data = _digits()
    _, record = run_spec(model, data, "cleanup,quant(check_speed=false)")
    assert "floor_samples" not in record.stats and record.stats["calibration_samples"] == 64


def test_small_calibration_set_measures_the_floor_on_the_fitting_samples_and_says_so(caplog):
    model, data = _digits(state.MIN_SPLIT_SAMPLES - 1)
    with caplog.at_level(logging.WARNING):
        _, record = run_spec(model, data, "cleanup,quant(check_speed=false, min_sqnr=30)")
    assert record.details["fallback"]["samples"]["held_out"] == 0
    assert "floor_samples" not in record.stats
    assert any("the floor is measured on the samples the ranges were fitted on" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Never slower than float by default (the speed check's decision; latencies faked so the test
# does not depend on this machine's load)


def _fake_latency(monkeypatch, quantized_ms):
    """speed_check reporting `quantized_ms(model)` against a float model at 1 ms."""
    from edgegraph.passes.quant import speed

    def fake(run, model, built=None, warn=True):
        ms = quantized_ms(model)
        return {"float_ms": 1.0, "quantized_ms": ms, "speedup": 1.0 / ms}
    monkeypatch.setattr(speed, "speed_check", fake)


def _float_nodes(model) -> int:
    return sum(n.op in ("HardSigmoid", "MaxPool", "GlobalAveragePool") or
               (n.op == "Conv" and int(n.attrs.get("group", 1)) > 1) for n in model.graph.nodes)


def test_slower_int8_writes_the_float_model_with_a_warning(monkeypatch):
    model, data = _digits()
    _fake_latency(monkeypatch, lambda m: 1.5)
    out, record = run_spec(model, data, "cleanup,quant")
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    assert record.stats["quantized_nodes"] == 0 and "wrote the float model" in record.stats["warning"]
    assert record.details["latency"]["wrote"] == "float"
    assert record.details["latency"]["slow_ops_in_float"]["nodes"] > 0  # the float-for-slow-ops try came first
    float_only, _ = run_spec(model, data, "cleanup")
    assert out.SerializeToString() == float_only.SerializeToString()


def test_slower_int8_is_found_before_tuning_and_each_structure_is_timed_once(monkeypatch):
    from edgegraph.passes.quant import static

    model, data = _digits()
    timed = []
    _fake_latency(monkeypatch, lambda m: timed.append(sum(n.op == "QuantizeLinear" for n in m.graph.nodes)) or 1.5)
    tuned = []
    monkeypatch.setattr(static, "tuned_build", lambda *a: tuned.append(1))
    out, record = run_spec(model, data, "cleanup,quant")
    # The first build and the slow-ops-in-float model are timed, once each; nothing is tuned.
    assert record.details["latency"]["wrote"] == "float" and not tuned
    assert len(timed) == 2 and timed[1] < timed[0]


def test_structure_ignores_ranges_and_biases_not_types():
    from edgegraph.passes.quant import speed
    from edgegraph.passes.quant.build import Built
    from edgegraph.passes.quant.numerics import qtype
    from edgegraph.passes.quant.qdq import QParams

    def built(scale, kind="uint8", guarded=()):
        params = {"t": QParams(np.float32(scale), np.uint8(0), qtype(kind))}
        return Built(params, None, quantized=["conv"], guarded=list(guarded))

    assert speed.structure(built(0.1)) == speed.structure(built(0.2))
    assert speed.structure(built(0.1)) != speed.structure(built(0.1, "int16"))
    assert speed.structure(built(0.1)) != speed.structure(built(0.1, guarded=["conv"]))


def test_mixed_precision_is_not_tried_when_int8_is_already_over_its_latency_budget(monkeypatch):
    from edgegraph.passes.quant import mixed

    model, data = _digits()
    _fake_latency(monkeypatch, lambda m: 1.5)
    measured = []
    monkeypatch.setattr(mixed, "contributions", lambda *a: measured.append(1))
    _, record = run_spec(model, data, "cleanup,quant(if_slower=int8, mixed_sqnr=90)")
    assert not measured and "mixed_precision" not in record.details
    assert any("mixed precision: not tried" in note for note in record.details["notes"])


def test_slower_int8_is_kept_when_forced(monkeypatch):
    model, data = _digits()
    _fake_latency(monkeypatch, lambda m: 1.5)
    out, record = run_spec(model, data, "cleanup,quant(if_slower=int8)")
    assert record.stats["quantized_nodes"] > 0 and "warning" not in record.stats
    assert record.details["latency"]["speedup"] < 1.0


def test_slow_ops_go_float_when_that_makes_int8_faster(monkeypatch):
    model, data = _digits()
    # Faster only with fewer Q/DQ pairs than the first (all-int8) model: the slow ops in float.
    first = []
    pairs = lambda m: sum(n.op == "QuantizeLinear" for n in m.graph.nodes)  # noqa: E731
    _fake_latency(monkeypatch, lambda m: 1.2 if first.append(pairs(m)) or pairs(m) >= first[0] else 0.8)
    out, record = run_spec(model, data, "cleanup,quant")
    assert record.stats["quantized_nodes"] > 0 and record.details["latency"]["quantized_ms"] == 0.8
    assert any("int8 makes slower in float" in note for note in record.details["notes"])
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) < first[0]


# ---------------------------------------------------------------------------------------------
# Rounding optimisation on captured activations (weight_rounding=gram)


def test_gram_rounding_lowers_the_layer_output_error_it_optimises():
    from edgegraph.analysis import capture
    from edgegraph.passes.quant import numerics, rounding
    from edgegraph.passes.quant.qdq import QParams, quantize_weight
    from fixtures import quant as qfix

    proto = qfix.small_convnet()
    x = qfix.convnet_inputs(8)
    model = ir.from_proto(proto)
    layers = [n for n in model.graph.nodes if n.op == "Conv"]
    grams = capture.grams(proto, [n.name for n in layers], [{"x": x[i:i + 1]} for i in range(8)])
    qt = numerics.qtype("int8")
    checked = 0
    for node in layers:
        w = ir.constant_value(node.inputs[1]).astype(np.float32)
        rows, _ = capture.layer_matrix(node, w)
        scale = (np.abs(rows).max(1) / 127).astype(np.float32)
        params = QParams(scale, np.zeros(len(scale), np.int8), qt, 0, 127)
        codes = rounding.round_weight(node, w, params, grams[node.name])
        if codes is None:
            continue
        h = grams[node.name].xtx if grams[node.name].xtx.ndim == 2 else None
        if h is None:
            continue

        def error(c):
            d = c.reshape(len(scale), -1).astype(np.float64) * scale[:, None] - rows
            return float(np.einsum("of,fg,og->", d, h, d))
        nearest = error(quantize_weight(w, params))
        assert error(codes) < 0.7 * nearest  # measured 0.1-0.5x on these layers
        assert np.abs(codes.astype(np.int64) - quantize_weight(w, params).astype(np.int64)).max() <= 2
        checked += 1
    assert checked >= 2


def test_gram_rounding_on_the_cifar10_cnn():
    """Real CIFAR-10 images: 64 calibration, 400 held out. Measured: nearest 0.9875 top-1
    agreement / 38.9 dB, gram 0.9975 / 43.4 dB; weight_rounding=auto picks gram by its held-out score."""
    from conftest import DATA, MODELS, require_shared
    from edgegraph import runtime, verify
    from fixtures import quant as qfix

    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx")
    x, _ = qfix.cifar10(require_shared(DATA))
    out, record = run_spec(onnx.load(path), {"modelInput": x[:64]}, "quant(check_speed=false, weight_rounding=auto)")
    assert record.stats["weight_rounding"] == "gram"
    assert record.details["tuning_output_sqnr_db"]["weight_rounding=gram"] > record.details["tuning_output_sqnr_db"][
        record.stats["method"]] + 1.5  # measured 43.87 vs 41.99 dB on the 8 tuning samples
    held = [{"modelInput": x[64:464]}]
    ref, got = runtime.outputs(onnx.load(path), held), runtime.outputs(out, held)
    agreement = float(np.mean(ref[0]["modelOutput"].argmax(1) == got[0]["modelOutput"].argmax(1)))
    assert agreement >= 0.995 and verify.worst_sqnr_db(ref, got) >= 42.0
    assert record.details["timings_s"]["rounding"] > 0
