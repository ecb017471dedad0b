"""Tests of static QDQ quantization (`quant`): numerics against onnxruntime, calibration,
placement for ORT's integer kernels, options, and accuracy on real models with real data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DATA, MODELS, require_shared
from edgegraph import modelio, runtime
from edgegraph.analysis import capture
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.errors import MissingRequirementError, PassOptionError
from edgegraph.passes.quant import calibrate, numerics
from edgegraph.passes.quant.analysis import optimized_op_counts
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from fixtures import core as core_fixtures
from fixtures import quant as qfix

# ---------------------------------------------------------------------------------------------
# Numerics: bit-exact against ORT's QuantizeLinear / DequantizeLinear


def _ort_qdq(x, scale, zero, qt, axis=None, block_size=None, opset=21):
    attrs = {"axis": axis} if axis is not None else {}
    if block_size:
        attrs["block_size"] = block_size
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if qt.bits > 4:  # ORT cannot hand 4-bit tensors to numpy
        outputs.insert(0, helper.make_tensor_value_info("q", qt.onnx_type, None))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)], outputs,
                              [numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
                               numpy_helper.from_array(np.asarray(zero).astype(qt.dtype), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = sess.run(None, {"x": x})
    return (result[0], result[1]) if qt.bits > 4 else (None, result[0])


@pytest.mark.parametrize("name", list(numerics.QTYPES))
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_match_onnxruntime(name, granularity, symmetric):
    qt = numerics.qtype(name)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 8, 5)) * 4).astype(np.float32)
    axis = None if granularity == "tensor" else 1
    block = 3 if granularity == "block" else None
    if axis is None:
        scale, zero = numerics.scale_zero_point(x.min(), x.max(), qt, symmetric)
    else:
        scale, zero = numerics.weight_scale_zero_point(x, qt, axis, symmetric, block_size=block)
    # Exact half-way points exercise round-half-to-even.
    step = np.float32(np.asarray(scale).reshape(-1)[0])
    x[0, 0, :4] = np.float32([0.5, 1.5, 2.5, -2.5]) * step
    q_ort, y_ort = _ort_qdq(x, scale, zero, qt, axis, block)
    q = numerics.quantize(x, scale, zero, qt, axis, block)
    if q_ort is not None:
        np.testing.assert_array_equal(q.astype(np.int64), q_ort.astype(np.int64))
    np.testing.assert_array_equal(numerics.dequantize(q, scale, zero, qt, axis, block), y_ort)


def test_scale_zero_point_keeps_zero_exact_and_guards_empty_ranges():
    for qt in (numerics.qtype("uint8"), numerics.qtype("int8")):
        scale, zero = numerics.scale_zero_point(0.3, 7.0, qt, symmetric=False)  # range widened to include 0
        assert numerics.quantize(np.float32([0.0]), scale, zero, qt)[0] == zero
        assert numerics.dequantize(numerics.quantize(np.float32([0.0]), scale, zero, qt), scale, zero, qt)[0] == 0.0
        scale, zero = numerics.scale_zero_point(0.0, 0.0, qt, symmetric=False)
        assert scale == 1.0 and np.isfinite(scale)
    scale, zero = numerics.scale_zero_point(-2.0, 1.0, "int8", symmetric=True)
    assert zero == 0 and scale == np.float32(2.0 / 127)
    scale, zero = numerics.weight_scale_zero_point(np.array([[1.0, -4.0], [0.5, 0.25]]), "int8", axis=0)
    np.testing.assert_allclose(scale, [4 / 127, 0.5 / 127], rtol=1e-6)


def test_unknown_qtype_is_an_option_error():
    with pytest.raises(PassOptionError):
        numerics.qtype("int7")


def test_bias_quantization_uses_product_of_scales():
    codes, scale = numerics.quantize_bias(np.float32([1.0, -2.0]), np.float32(0.1), np.float32([0.01, 0.02]))
    np.testing.assert_allclose(scale, [0.001, 0.002], rtol=1e-6)
    np.testing.assert_array_equal(codes, [1000, -1000])
    assert codes.dtype == np.int32


# ---------------------------------------------------------------------------------------------
# Calibration statistics and ranges


def test_streaming_histogram_equals_direct_histogram():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(5000) * s for s in (0.5, 2.0, 9.0)]  # the range grows twice
    stats = capture.RangeStats()
    for b in batches:
        stats.update(b)
    everything = np.concatenate(batches).astype(np.float32)
    direct, _ = np.histogram(everything, bins=stats.edges())
    assert stats.min == everything.min() and stats.max == everything.max()
    # Edges line up after every doubling, so only float rounding at bin edges may differ.
    assert np.abs(stats.hist - direct).sum() <= 4
    assert stats.hist.sum() == everything.size


def test_range_methods_clip_outliers_but_minmax_does_not():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)
    stats = capture.RangeStats()
    stats.update(values)
    qt = numerics.qtype("uint8")
    assert calibrate.activation_range(stats, "minmax", qt, False) == (-35.0, 40.0)
    for method in ("percentile", "entropy"):
        lo, hi = calibrate.activation_range(stats, method, qt, False, percentile=99.99)
        assert -8 < lo < -2 and 2 < hi < 8, (method, lo, hi)
    # MSE weighs the two outliers' squared clipping error against rounding noise everywhere else.
    lo, hi = calibrate.activation_range(stats, "mse", qt, False)
    assert -35 < lo < -2 and 2 < hi < 40
    centers = (stats.edges()[:-1] + stats.edges()[1:]) / 2
    error = lambda a, b: calibrate.quantization_mse(centers, stats.hist.astype(float), a, b, qt, False)[0]  # noqa: E731
    assert error(lo, hi) < 0.8 * error(-35.0, 40.0)


def test_mse_range_through_silu_clips_the_flat_negative_side():
    rng = np.random.default_rng(2)
    stats = capture.RangeStats()
    stats.update(np.concatenate([rng.standard_normal(100_000) * 3, rng.uniform(-60, -20, 2000)]).astype(np.float32))
    qt = numerics.qtype("uint8")
    plain = calibrate.activation_range(stats, "mse", qt, False)
    silu = calibrate.activation_range(stats, "mse", qt, False, transfer=calibrate.transfer("silu"))
    assert silu[0] > plain[0] + 5  # SiLU maps -60 and -10 to ~0: no range is spent on them


def _naive_kl_threshold(hist, levels):
    """TensorRT's search written out bin by bin (the reference for the prefix-sum version)."""
    hist = hist.astype(np.float64)
    hist[0] = 0.0
    last = int(np.nonzero(hist)[0][-1]) + 1
    best, best_kl = last, np.inf
    for t in np.unique(np.linspace(levels, last, 128).astype(np.int64)):
        p = hist[:t].copy()
        p[-1] += hist[t:].sum()
        groups = np.minimum((np.arange(t) * levels) // t, levels - 1)
        sums = np.bincount(groups, weights=hist[:t], minlength=levels)
        nonzero = np.bincount(groups, weights=(hist[:t] > 0).astype(float), minlength=levels)
        q = np.where(hist[:t] > 0, sums[groups] / np.maximum(nonzero[groups], 1), 0.0)
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = float((p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))).sum())
        if kl < best_kl:
            best, best_kl = int(t), kl
    return float(best)


@pytest.mark.parametrize("seed", range(4))
def test_kl_threshold_matches_the_bin_by_bin_search(seed):
    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_t(3 + seed, 100_000)) * (1 + seed)
    if seed % 2:
        values = np.concatenate([values, np.zeros(20_000)])  # a ReLU-like spike at 0
    hist = np.histogram(values, bins=2048, range=(0, values.max() * (1 + 0.3 * seed)))[0]
    for levels in (128, 256):
        assert calibrate._kl_threshold(hist, levels) == _naive_kl_threshold(hist, levels)


@pytest.mark.parametrize("activation", [None, "silu", "sigmoid", "relu"])
def test_quantization_mse_matches_the_bin_by_bin_sum(activation):
    rng = np.random.default_rng(3)
    centers = np.sort(rng.standard_normal(300) * 4)
    counts = rng.integers(1, 50, centers.size).astype(np.float64)
    qt = numerics.qtype("uint8")
    transfer = calibrate.transfer(activation) if activation else None
    f = transfer.f if transfer else (lambda v: v)
    slope2 = transfer.df(centers) ** 2 if transfer else 1.0
    lows, highs = np.array([-12.0, -5.0, -1.0, 0.0]), np.array([12.0, 3.0, 6.0, 2.0])
    fast = calibrate.quantization_mse(centers, counts, lows, highs, qt, False, transfer)
    for lo, hi, got in zip(lows, highs, fast):
        scale, zero = numerics.scale_zero_point(lo, hi, qt, False)
        low, high = (qt.qmin - float(zero)) * float(scale), (qt.qmax - float(zero)) * float(scale)
        clipped = np.clip(centers, low, high)
        inside = (centers >= low) & (centers <= high)
        expected = ((f(centers) - f(clipped)) ** 2 + inside * slope2 * float(scale) ** 2 / 12) @ counts
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The pass on synthetic models


def _quantize(model, data, spec="quant(check_speed=false)", **ctx):
    calib = CalibrationData.from_arrays(data)
    context = PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False), **ctx)
    result, report = run_pipeline(modelio.load(model), parse(spec), context)
    return result.to_proto(), report.passes[-1]


def _outputs(proto, feeds, optimize=True):
    sess = runtime.session(proto, threads=1, optimize=optimize)
    return sess.run(None, feeds)[0].astype(np.float32)


def _sqnr(reference, candidate):
    return numerics.sqnr_db(reference, candidate)


@pytest.fixture(scope="module")
def convnet_result():
    model = qfix.small_convnet()
    x = qfix.convnet_inputs(96)
    proto, record = _quantize(model, {"x": x[:64]})
    return model, proto, record, x[64:]


def test_convnet_is_valid_and_accurate(convnet_result):
    model, proto, record, x = convnet_result
    onnx.checker.check_model(proto, full_check=True)
    reference = _outputs(model, {"x": x})
    quantized = _outputs(proto, {"x": x})
    assert _sqnr(reference, quantized) > 25
    assert np.mean(reference.argmax(1) == quantized.argmax(1)) >= 0.9
    # Every compute node: 5 Conv, Add, MaxPool, GlobalAveragePool, Gemm (the Concat and Flatten
    # between them move int8 data and are not counted, as in the summary: analysis.is_quantized).
    assert record.stats["quantized_nodes"] == 9
    assert record.stats["calibration_samples"] == 64
    # ORT's fused integer kernels agree with the Q/DQ arithmetic: no int16 saturation (the signed
    # input's layer is guarded), no unfused surprises.
    assert "conv1" in record.details["saturation_guarded"]
    assert _sqnr(_outputs(proto, {"x": x}, optimize=False), quantized) > 40


def test_convnet_placement_fuses_into_integer_kernels(convnet_result):
    _, proto, _, _ = convnet_result
    ops = optimized_op_counts(proto)
    assert ops.get("QLinearConv") == 5 and "Conv" not in ops
    assert "Relu" not in ops and "Clip" not in ops  # folded into the Q ranges, removed by ORT
    assert ops.get("QGemm") == 1  # float logits out of QGemm, no output Q
    assert ops.get("QLinearAdd") == 1 and ops.get("QLinearGlobalAveragePool") == 1
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear", 0) == 0


def test_convnet_has_per_channel_weights_int32_bias_and_no_dq_q_chains(convnet_result):
    _, proto, _, _ = convnet_result
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for conv in convs:
        weight_dq, bias_dq = producers[conv.input[1]], producers[conv.input[2]]
        assert inits[weight_dq.input[0]].dtype == np.int8
        assert inits[weight_dq.input[1]].shape == (inits[weight_dq.input[0]].shape[0],)  # per channel
        assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0
        assert inits[bias_dq.input[0]].dtype == np.int32
        input_scale = inits[producers[conv.input[0]].input[1]]
        np.testing.assert_allclose(inits[bias_dq.input[1]], input_scale * inits[weight_dq.input[1]], rtol=1e-6)
        # Every DQ names its zero point, all zeros here (ORT-format conversion needs it there)...
        assert len(weight_dq.input) == len(bias_dq.input) == 3
        assert not inits[weight_dq.input[2]].any() and not inits[bias_dq.input[2]].any()
        assert inits[bias_dq.input[2]].dtype == np.int32
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert len(producers[gemm.input[1]].input) == 3  # ... QGemm's weight too
    # ... and shapes onnx can infer again are not stored.
    assert not graph.value_info
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            source = producers.get(node.input[0])
            assert source is None or source.op_type != "DequantizeLinear", node.name


def test_concat_inputs_share_the_output_scale(convnet_result):
    _, proto, _, _ = convnet_result
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    concat = next(n for n in graph.node if n.op_type == "Concat")
    scales = {producers[i].input[1] for i in concat.input}  # DQ scale initializers
    assert len(scales) == 1


def test_report_has_a_per_layer_table(convnet_result):
    _, _, record, _ = convnet_result
    rows = record.details["layers"]
    conv = next(r for r in rows if r["node"] == "conv1")
    assert conv["op"] == "Conv" and conv["weight_scale"][0] <= conv["weight_scale"][1]
    assert conv["activation_zero_point"] == 0  # the folded Relu makes the range [0, max]
    assert conv["sqnr_db"] > 20
    assert "logits" in record.details["output_sqnr_db"]


def test_tail_and_float_consumers_stay_float():
    model = qfix.silu_head_model()
    x = np.random.default_rng(3).standard_normal((40, 4, 8, 8)).astype(np.float32)
    proto, record = _quantize(model, {"x": x[:32]}, "quant(check_speed=false, method=minmax, elementwise=integer)")
    skipped = record.details["float_nodes"]
    assert {"head_concat", "head_reshape", "cls_sigmoid"} <= set(skipped)
    ops = optimized_op_counts(proto)
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearSigmoid") == 1 and ops.get("QLinearMul") == 1
    reference = _outputs(model, {"x": x[32:33]})
    assert _sqnr(reference, _outputs(proto, {"x": x[32:33]})) > 20


def test_float16_model_keeps_its_interface_and_runs_fast_int8():
    model = qfix.small_convnet(float16=True)
    x = qfix.convnet_inputs(48, dtype=np.float16)
    proto, record = _quantize(model, {"x": x[:32]})
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    out = runtime.session(proto, optimize=True).run(None, {"x": x[32:]})[0]
    assert out.dtype == np.float16
    assert _sqnr(_outputs(model, {"x": x[32:]}), out.astype(np.float32)) > 20
    assert optimized_op_counts(proto).get("QLinearConv") == 5
    assert any("float16" in note for note in record.details["notes"])


def test_old_opset_is_upgraded_for_per_channel_weights():
    model = qfix.small_convnet(opset=10)
    x = qfix.convnet_inputs(40)
    proto, record = _quantize(model, {"x": x[:32]})
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 13
    assert any("opset upgraded from 10 to 13" in note for note in record.details["notes"])
    assert _sqnr(_outputs(model, {"x": x[32:]}), _outputs(proto, {"x": x[32:]})) > 25


def test_per_tensor_weights_keep_an_old_opset():
    model = qfix.small_convnet(opset=10)
    x = qfix.convnet_inputs(40)
    proto, record = _quantize(model, {"x": x[:32]}, "quant(check_speed=false, per_channel=false)")
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 10 and record.stats["bias_corrected"] == 6
    assert _sqnr(_outputs(model, {"x": x[32:]}), _outputs(proto, {"x": x[32:]})) > 20


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_opset9_upsample_keeps_its_coordinates_when_upgraded(mode):
    model = qfix.upsample_model(mode)
    x = np.random.default_rng(6).standard_normal((24, 3, 8, 8)).astype(np.float32)
    proto, record = _quantize(model, {"x": x[:16]}, "quant(check_speed=false, method=minmax)")
    resize = next(n for n in proto.graph.node if n.op_type == "Resize")
    assert {a.name: a.s for a in resize.attribute}["coordinate_transformation_mode"] == b"asymmetric"
    reference = np.concatenate([_outputs(model, {"x": x[i:i + 1]}) for i in range(16, 24)])
    quantized = np.concatenate([_outputs(proto, {"x": x[i:i + 1]}) for i in range(16, 24)])
    assert _sqnr(reference, quantized) > 30  # a half-pixel shift would leave ~10 dB


@pytest.mark.parametrize("spec, opset", [("quant(check_speed=false, activation_type=int8)", 13),
                                         ("quant(check_speed=false, activation_type=int8, symmetric_activations=true)", 13),
                                         ("quant(check_speed=false, activation_type=int16)", 21),
                                         ("quant(check_speed=false, method=entropy, weight_method=mse)", 13),
                                         ("quant(check_speed=false, method=percentile, per_channel=false)", 13),
                                         ("quant(check_speed=false, weight_type=uint8, saturation_guard=off)", 13),
                                         ("quant(check_speed=false, saturation_guard=uint8-weights)", 13)])
def test_option_variants_run_in_onnxruntime(spec, opset):
    model = qfix.small_convnet()
    x = qfix.convnet_inputs(48)
    proto, _ = _quantize(model, {"x": x[:32]}, spec)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == opset
    sqnr = _sqnr(_outputs(model, {"x": x[32:]}), _outputs(proto, {"x": x[32:]}))
    assert sqnr > 20, sqnr
    if "int16" in spec:  # activations in 16 bits; the int8 weights then bound the error
        inits = {t.name: t for t in proto.graph.initializer}
        quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert quantizers and all(inits[n.input[2]].data_type == TensorProto.INT16 for n in quantizers)


def test_bias_correction_does_not_hurt():
    model = qfix.small_convnet(seed=4)
    x = qfix.convnet_inputs(96, seed=4)
    reference = _outputs(model, {"x": x[64:]})
    corrected, record = _quantize(model, {"x": x[:64]}, "quant(check_speed=false, method=minmax, bias_correction=true)")
    plain, _ = _quantize(model, {"x": x[:64]}, "quant(check_speed=false, method=minmax, bias_correction=false)")
    assert record.stats["bias_corrected"] == 6  # 5 Conv + the Gemm
    assert _sqnr(reference, _outputs(corrected, {"x": x[64:]})) >= _sqnr(reference, _outputs(plain, {"x": x[64:]})) - 0.5


def test_auto_settings_are_the_best_measured_and_reproducible():
    model = qfix.small_convnet(seed=6)
    x = qfix.convnet_inputs(48, seed=6)
    proto, record = _quantize(model, {"x": x})
    assert record.stats["analysis_samples"] == 8  # a fast model affords the full count
    tuning = record.details["tuning_output_sqnr_db"]
    methods = {m: tuning[m] for m in calibrate.AUTO_METHODS}
    chosen = record.stats["method"]
    assert methods[chosen] == max(methods.values())
    corrected = record.stats["bias_corrected"] > 0
    assert corrected == (tuning["bias_correction"] > methods[chosen])
    # The winner is exactly what asking for its settings gives (a rejected correction is undone).
    fixed, fixed_record = _quantize(model, {"x": x}, f"quant(check_speed=false, method={chosen}, "
                                                     f"bias_correction={str(corrected).lower()}, "
                                                     f"elementwise={record.stats['elementwise']})")
    assert set(fixed_record.details.get("tuning_output_sqnr_db", {})) <= {"keep_coarse"}
    weights = lambda p: {t.name: numpy_helper.to_array(t).tobytes() for t in p.graph.initializer}  # noqa: E731
    assert weights(proto) == weights(fixed)


def test_channel_moments_measure_how_much_variation_a_step_drowns():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(1000) * 10, 3 + rng.standard_normal(1000) * 0.01,
                             np.full(1000, 7.0)])  # a wide channel, a nearly constant one, a dead one
    moments = capture.ChannelMoments(3)
    moments.update(values, np.repeat(np.arange(3), 1000))
    assert moments.coarse_fraction(0.001) < 0.01  # fine steps: nothing drowns
    assert moments.coarse_fraction(1.0) == pytest.approx(0.5, abs=0.01)  # the narrow channel drowns, the dead one is ignored
    shape = (2, 3, 4, 5)
    assert np.array_equal(capture.ChannelMoments.channel_ids(shape, np.arange(120)),
                          np.broadcast_to(np.arange(3)[None, :, None], (2, 3, 20)).ravel())
    assert np.array_equal(capture.ChannelMoments.channel_ids((7, 5), np.arange(10)), np.arange(10) % 5)


def test_coarse_tensors_stay_float_when_that_pays():
    model = qfix.coarse_tensor_model()
    x = np.random.default_rng(0).standard_normal((48, 2, 8, 8)).astype(np.float32)
    reference = _outputs(model, {"x": x[32:]})
    proto, record = _quantize(model, {"x": x[:32]})
    plain, _ = _quantize(model, {"x": x[:32]}, "quant(check_speed=false, keep_coarse=false, mixed=off)")
    wide, wide_record = _quantize(model, {"x": x[:32]}, "quant(check_speed=false, sensitive_type=int16)")
    assert record.details["coarse_tensors_kept"] == {"as": "float", "tensors": {"r1": pytest.approx(0.75, abs=0.05)}}
    assert record.stats["coarse_tensors_kept"] == 1
    assert {"conv1", "conv2"} <= set(record.details["float_nodes"])
    assert {"conv0", "conv3"} <= {row["node"] for row in record.details["layers"]}
    # sensitive_type=int16: every layer stays quantized, r1 gets 16-bit activations.
    assert wide_record.details["coarse_tensors_kept"]["as"] == "int16"
    assert {"conv0", "conv1", "conv2", "conv3"} <= {row["node"] for row in wide_record.details["layers"]}
    inits = {t.name: t for t in wide.graph.initializer}
    wide_q = [n for n in wide.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1"]
    assert len(wide_q) == 1 and inits[wide_q[0].input[2]].data_type == TensorProto.INT16
    onnx.checker.check_model(wide, full_check=True)
    sqnrs = [_sqnr(reference, _outputs(p, {"x": x[32:]})) for p in (proto, wide, plain)]
    assert min(sqnrs[:2]) > sqnrs[2] + 10, sqnrs


def test_sensitivity_fallback_keeps_layers_float_for_a_budget():
    model = qfix.small_convnet(seed=5)
    x = qfix.convnet_inputs(64, seed=5)
    # 8 bits everywhere gives 42.5 dB here; 44 dB needs most layers float, but not all (min_sqnr=50
    # was met only by a float copy, which the pass now refuses: test_quant_robust).
    proto, record = _quantize(model, {"x": x}, "quant(check_speed=false, min_sqnr=44)")
    fallback = record.details["fallback"]
    assert fallback["met"] and fallback["output_sqnr_db"] >= 44 and record.stats["quantized_nodes"] >= 1
    assert record.stats["fallback_layers"] == len(fallback["kept"]) >= 1 and fallback["as"] == "float"
    assert set(fallback["kept"]) <= set(record.details["float_nodes"])
    onnx.checker.check_model(proto, full_check=True)


def test_sensitivity_fallback_to_int16_keeps_every_layer_quantized():
    model = qfix.small_convnet(seed=5)
    x = qfix.convnet_inputs(64, seed=5)
    plain, plain_record = _quantize(model, {"x": x}, "quant(check_speed=false, keep_coarse=false)")
    proto, record = _quantize(model, {"x": x}, "quant(check_speed=false, keep_coarse=false, min_sqnr=45, "
                                               "sensitive_type=int16)")
    fallback = record.details["fallback"]
    assert fallback["met"] and fallback["as"] == "int16" and len(fallback["kept"]) >= 1
    assert record.details["float_nodes"] == plain_record.details["float_nodes"]
    inits = {t.name: t for t in proto.graph.initializer}
    wide = {n.input[0] for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and inits[n.input[2]].data_type == TensorProto.INT16}
    assert set(fallback["kept"]) <= wide
    onnx.checker.check_model(proto, full_check=True)


def test_excluded_nodes_and_ops_stay_float():
    model = qfix.small_convnet()
    x = qfix.convnet_inputs(32)
    proto, record = _quantize(model, {"x": x}, "quant(check_speed=false, keep_coarse=false, exclude_nodes=[conv3], "
                                               "exclude_ops=[Gemm])")
    assert {"conv3", "fc"} <= set(record.details["float_nodes"])
    ops = optimized_op_counts(proto)
    assert ops.get("QLinearConv") == 4 and ops.get("Gemm") == 1


@pytest.mark.parametrize("name", list(core_fixtures.all_models()))
def test_exporter_shapes_survive(name):
    """If/Loop subgraphs (left float), local functions, custom domains, symbolic dims, opsets 11-21."""
    model = core_fixtures.all_models()[name]
    calib = CalibrationData.random(runtime.input_specs(model), 8, seed=0)
    result, report = run_pipeline(modelio.load(model), parse("quant(check_speed=false)"),
                                  PassContext(calibration=calib, progress=False))
    proto = result.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    if report.passes[-1].stats["quantized_nodes"] == 0:  # nothing quantizable: the model comes back as it was
        assert not report.passes[-1].modified
        assert [n.op_type for n in proto.graph.node] == [n.op_type for n in model.graph.node]


def test_speed_check_reports_latencies():
    model = qfix.small_convnet()
    _, record = _quantize(model, {"x": qfix.convnet_inputs(16)}, "quant")
    latency = record.details["latency"]
    assert latency["float_ms"] > 0 and latency["quantized_ms"] > 0


@pytest.mark.parametrize("spec", ["quant(method=kl)", "quant(percentile=100)", "quant(max_drop=1.5)",
                                  "quant(activation_type=int4)", "quant(calib_samples=-1)", "quant(per_channel=1)",
                                  "quant(exclude_ops=[''])", "quant(nonsense=1)"])
def test_bad_options_are_option_errors(spec):
    with pytest.raises(PassOptionError):
        parse(spec)


def test_missing_calibration_is_a_requirement_error():
    with pytest.raises(MissingRequirementError):
        run_pipeline(modelio.load(qfix.small_convnet()), parse("quant"), PassContext(progress=False))


# ---------------------------------------------------------------------------------------------
# Real models, real data: calibrate on some samples, judge agreement with fp32 on disjoint ones


def _agreement(model_path, proto, x, input_name, batch=None):
    def run(m):
        sess = runtime.session(m, threads=0, optimize=True)
        size = batch or len(x)
        return np.concatenate([sess.run(None, {input_name: x[i:i + size]})[0] for i in range(0, len(x), size)])
    reference = run(onnx.load(str(model_path))).astype(np.float32)
    candidate = run(proto).astype(np.float32)
    ref2, cand2 = reference.reshape(len(x), -1), candidate.reshape(len(x), -1)
    return float(np.mean(ref2.argmax(1) == cand2.argmax(1))), _sqnr(reference, candidate)


def test_cifar10_cnn_keeps_top1_on_real_images():
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx")
    x, _ = qfix.cifar10(require_shared(DATA))
    proto, record = _quantize(path, {"modelInput": x[:64]})
    onnx.checker.check_model(proto, full_check=True)
    agreement, sqnr = _agreement(path, proto, x[100:400], "modelInput")
    # onnxruntime's own quantize_static gets ~0.90 here: u8s8 int16 saturation on AVX2 CPUs.
    assert agreement >= 0.97 and sqnr > 25, (agreement, sqnr)
    assert record.stats["saturation_guarded"] >= 1


def test_mnist_opset7_keeps_top1_on_real_digits():
    path = require_shared(MODELS / "mnist_cntk/mnist.onnx")
    x, _ = qfix.mnist(require_shared(DATA), 564)
    proto, _ = _quantize(path, {"Input3": x[:64]})
    onnx.checker.check_model(proto, full_check=True)
    agreement, sqnr = _agreement(path, proto, x[64:], "Input3", batch=1)
    assert agreement >= 0.99 and sqnr > 25, (agreement, sqnr)


def test_squeezenet_fp16_on_real_imagenet_images():
    path = require_shared(MODELS / "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx")
    x = qfix.squeezenet_inputs(require_shared(DATA), 0, 96)
    proto, _ = _quantize(path, {"data_0": x[:32]})
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    agreement, _ = _agreement(path, proto, x[32:], "data_0", batch=1)
    assert agreement >= 0.85, agreement
    ops = optimized_op_counts(proto)
    assert ops.get("QLinearConv") == 26 and "Conv" not in ops
