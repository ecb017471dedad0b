"""edgegraph.stats: parameter counts, sizes, MACs per op family, quantization counts, latency, accuracy.

MAC expectations are derived independently of the implementation: from the output shapes
onnxruntime actually produces and the textbook cost of each op (products per output element).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import MODELS, require_shared
from onnx import TensorProto, helper, numpy_helper

from edgegraph import modelio, runtime, stats
from edgegraph.context import CalibrationData

FLOAT = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), *, opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    return model


def weight(name, shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) if np.dtype(dtype).kind == "f" else rng.integers(-8, 8, shape)
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def value(name, shape, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def run_shapes(model, feeds):
    sess = runtime.session(model)
    return {o.name: v.shape for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}


def macs_by_op(facts):
    return {c.name: c.macs for c in facts.node_macs}


# ---------------------------------------------------------------------------------------------
# MACs


@pytest.mark.parametrize("group, stride, pads, dilation", [
    (1, 1, [0, 0, 0, 0], 1),
    (1, 2, [1, 1, 1, 1], 1),
    (2, 1, [1, 0, 1, 0], 1),
    (8, 1, [1, 1, 1, 1], 2),  # depthwise, dilated
])
def test_conv_macs_match_the_products_per_output_element(group, stride, pads, dilation):
    cin, cout, k = 8, 16, 3
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, strides=[stride, stride],
                          pads=pads, dilations=[dilation, dilation])],
        [value("x", [2, cin, 11, 13])], [value("y", None)],
        [weight("w", [cout, cin // group, k, k]), weight("b", [cout])])
    out = run_shapes(model, {"x": np.zeros([2, cin, 11, 13], np.float32)})["y"]
    expected = math.prod(out) * (cin // group) * k * k
    facts = stats.model_stats(model)
    assert macs_by_op(facts) == {"conv": expected}
    assert facts.macs == expected
    assert facts.params == cout * cin // group * k * k + cout


def test_conv_transpose_macs_count_each_input_element_scattered_over_the_kernel():
    cin, cout, group, k = 4, 6, 2, 3
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", group=group, strides=[2, 2])],
        [value("x", [1, cin, 5, 7])], [value("y", None)], [weight("w", [cin, cout // group, k, k])])
    assert stats.model_stats(model).macs == 1 * cin * 5 * 7 * (cout // group) * k * k


@pytest.mark.parametrize("a_shape, b_shape", [
    ([4, 5], [5, 6]),
    ([2, 1, 4, 5], [3, 5, 6]),  # broadcast batch dims
    ([5], [3, 5, 6]),  # 1-D left operand
    ([3, 4, 5], [5]),  # 1-D right operand
])
def test_matmul_macs_are_output_elements_times_the_inner_dim(a_shape, b_shape):
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                       [value("a", a_shape), value("b", b_shape)], [value("y", None)])
    feeds = {"a": np.zeros(a_shape, np.float32), "b": np.zeros(b_shape, np.float32)}
    out = run_shapes(model, feeds)["y"]
    assert stats.model_stats(model).macs == math.prod(out) * a_shape[-1]


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_macs_follow_the_transposes(trans_a, trans_b):
    m, k, n = 3, 7, 5
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = [n, k] if trans_b else [k, n]
    model = make_model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)],
                       [value("a", a_shape)], [value("y", None)], [weight("b", b_shape), weight("c", [n])])
    assert stats.model_stats(model).macs == m * k * n


def test_integer_qlinear_and_qdq_fed_ops_cost_the_same_as_float():
    x = value("x", [1, 4, 9, 9], TensorProto.UINT8)
    common = [weight("w8", [8, 4, 3, 3], np.int8), numpy_helper.from_array(np.float32(0.1), "s"),
              numpy_helper.from_array(np.uint8(128), "zp"), numpy_helper.from_array(np.int8(0), "wzp"),
              numpy_helper.from_array(np.full(8, 0.05, np.float32), "ws")]
    float_cost = 1 * 8 * 7 * 7 * 4 * 3 * 3
    qlinear = make_model(
        [helper.make_node("QLinearConv", ["x", "s", "zp", "w8", "s", "wzp", "s", "zp"], ["y"], name="qconv")],
        [x], [value("y", None, TensorProto.UINT8)], common)
    integer = make_model([helper.make_node("ConvInteger", ["x", "w8", "zp", "wzp"], ["y"], name="iconv")],
                         [x], [value("y", None, TensorProto.INT32)], common)
    qdq = make_model(
        [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["xf"]),
         helper.make_node("DequantizeLinear", ["w8", "ws", "wzp"], ["wf"], axis=0),
         helper.make_node("Conv", ["xf", "wf"], ["y"], name="conv")],
        [x], [value("y", None)], common)
    for model in (qlinear, integer, qdq):
        facts = stats.model_stats(model)
        assert facts.macs == float_cost
        assert facts.quantized_nodes == 1
        assert facts.params == 8 * 4 * 3 * 3  # int8 weights; scales and zero points are not weights
    assert stats.model_stats(qdq).qdq_nodes == 2


def test_matmul_nbits_counts_its_logical_weights_and_macs():
    k, n, block = 64, 32, 32
    packed = numpy_helper.from_array(np.zeros((n, k // block, block // 2), np.uint8), "packed")
    scales = numpy_helper.from_array(np.ones(n * k // block, np.float32), "scales")
    model = make_model(
        [helper.make_node("MatMulNBits", ["a", "packed", "scales"], ["y"], domain="com.microsoft", name="mm4",
                          K=k, N=n, bits=4, block_size=block)],
        [value("a", [1, 5, k])], [value("y", [1, 5, n])], [packed, scales],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    facts = stats.model_stats(model)
    assert facts.macs == 5 * k * n
    assert facts.quantized_nodes == 1
    assert facts.params == k * n + n * k // block
    assert facts.ops == {"com.microsoft.MatMulNBits": 1}


def test_einsum_and_lstm_macs():
    einsum = make_model([helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")],
                        [value("a", [2, 3, 4]), value("b", [2, 4, 5])], [value("y", None)], opset=12)
    assert stats.model_stats(einsum).macs == 2 * 3 * 4 * 5
    seq, batch, features, hidden = 7, 2, 10, 16
    lstm = make_model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)],
                      [value("x", [seq, batch, features])], [value("y", None)],
                      [weight("W", [1, 4 * hidden, features]), weight("R", [1, 4 * hidden, hidden])])
    assert stats.model_stats(lstm).macs == seq * batch * 4 * hidden * (features + hidden)


def test_onnx_attention_macs():
    b, heads, s, length, head = 2, 4, 6, 9, 8
    model = make_model([helper.make_node("Attention", ["q", "k", "v"], ["y"])],
                       [value("q", [b, heads, s, head]), value("k", [b, heads, length, head]),
                        value("v", [b, heads, length, head])], [value("y", None)], opset=23)
    assert stats.model_stats(model).macs == b * heads * s * length * head * 2


def dynamic_cnn():
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)],
        [value("x", ["batch", 3, "height", "width"])], [value("y", ["batch", 10])],
        [weight("w", [8, 3, 3, 3]), weight("fc", [10, 8])])


def test_dynamic_shapes_give_unknown_macs_until_fixed():
    facts = stats.model_stats(dynamic_cnn())
    assert facts.macs is None
    assert facts.unknown_mac_nodes == ["conv", "fc"] and facts.macs_known == 0
    fixed = stats.model_stats(dynamic_cnn(), fix_shapes={"x": [1, 3, 16, 20]})
    assert fixed.macs == 8 * 16 * 20 * 3 * 9 + 8 * 10
    assert "x=1x3x16x20" in fixed.shapes


def test_a_dynamic_batch_alone_is_counted_per_sample():
    model = dynamic_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 20
    facts = stats.model_stats(model)
    assert facts.macs == 8 * 16 * 20 * 3 * 9 + 8 * 10
    assert "batch axis of x taken as 1" in facts.shapes
    assert facts.inputs[0].shape == ["batch", 3, 16, 20]  # the reported model is unchanged


def test_shapes_inference_cannot_see_are_observed_in_a_run():
    # onnx shape inference knows no com.microsoft schemas, so the MatMul after Gelu has no shape.
    model = make_model(
        [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
         helper.make_node("MatMul", ["g", "w"], ["y"], name="mm")],
        [value("x", [1, 5, 6])], [value("y", None)], [weight("w", [6, 4])],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    facts = stats.model_stats(model)
    assert facts.macs == 5 * 6 * 4
    assert "observed" in facts.shapes
    sample = {"x": np.zeros([1, 5, 6], np.float32)}
    assert stats.model_stats(model, feeds=sample).macs == 5 * 6 * 4


def gelu_matmul(batch="batch"):
    """x [batch, 5, 6] -> com.microsoft Gelu -> MatMul(w [6, 64]): the MatMul's shapes need a run."""
    return make_model(
        [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),
         helper.make_node("MatMul", ["g", "w"], ["y"], name="mm")],
        [value("x", [batch, 5, 6])], [value("y", None)], [weight("w", [6, 64])],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def test_stats_of_an_ir_model_work_without_copying_its_weights(full_exports):
    proto = gelu_matmul()
    model = modelio.load(proto)
    outputs = list(model.graph.outputs)
    facts = stats.model_stats(model)  # a static copy (batch 1) for shapes, one run for the MatMul's
    assert facts.macs == 5 * 6 * 64 and "observed" in facts.shapes
    assert len(full_exports) == 1  # the run's session; the static copy and the rest have no weights
    assert model.graph.outputs == outputs  # the run's extra outputs are gone again
    # The serialized size is computed, not serialized: exact but for a few bytes per weight.
    assert 0 <= stats.serialized_size(model) - model.to_proto().ByteSize() < 64
    full_exports.clear()
    fixed = stats.model_stats(model, fix_shapes={"x": [2, 5, 6]}, feeds={"x": np.ones((2, 5, 6), np.float32)})
    assert fixed.macs == 2 * 5 * 6 * 64 and len(full_exports) == 1


def test_feeds_that_contradict_fixed_shapes_are_not_used_to_observe_shapes():
    wrong = {"x": np.zeros([1, 5, 6], np.float32)}
    facts = stats.model_stats(gelu_matmul(), fix_shapes={"x": [3, 5, 6]}, feeds=wrong)
    assert facts.macs == 3 * 5 * 6 * 64  # observed on inputs shaped as fixed, not on `wrong`


def test_loops_with_mac_ops_inside_are_unknown():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "w"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("acc_in", [1, 4])],
        [value("cond_out", [], TensorProto.BOOL), value("acc_out", [1, 4])])
    model = make_model(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop")],
        [value("x", [1, 4]), value("trips", [], TensorProto.INT64)], [value("y", [1, 4])], [weight("w", [4, 4])])
    facts = stats.model_stats(model)
    assert facts.macs is None and facts.unknown_mac_nodes == ["loop"]
    assert facts.params == 16  # the loop body's outer-scope weight


# ---------------------------------------------------------------------------------------------
# Parameters, sizes, histograms


def test_params_skip_shapes_and_count_constant_nodes_and_shared_weights_once():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    const_bias = helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(np.ones(4, np.float32)))
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = make_model(
        [const_bias,
         helper.make_node("MatMul", ["x", "w"], ["a"]),
         helper.make_node("MatMul", ["a", "w"], ["b"]),  # the same weight again
         helper.make_node("Add", ["b", "bias"], ["c"]),
         helper.make_node("Reshape", ["c", "shape"], ["d"]),
         helper.make_node("Reshape", ["d", "shape4"], ["e"]),
         helper.make_node("Resize", ["e", "", "scales"], ["y"], mode="nearest")],
        [value("x", [1, 4])], [value("y", None)],
        [w, shape, scales, numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "shape4")])
    facts = stats.model_stats(model)
    assert facts.params == 16 + 4
    assert facts.param_bytes == (16 + 4) * 4
    assert facts.ops == {"MatMul": 2, "Reshape": 2, "Add": 1, "Constant": 1, "Resize": 1}
    assert facts.nodes == 7
    assert facts.macs == 2 * 4 * 4


def test_size_counts_external_data(tmp_path):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [value("x", [1, 256])],
                       [value("y", [1, 256])], [weight("w", [256, 256])])
    path = tmp_path / "m.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # save_model turns the tensors it is given into external references
    onnx.save_model(saved, path, save_as_external_data=True, location="m.data", size_threshold=0)
    expected = path.stat().st_size + (tmp_path / "m.data").stat().st_size
    assert stats.disk_size(path) == expected
    facts = stats.model_stats(path)
    assert facts.size_bytes == expected > 256 * 256 * 4
    assert facts.params == 256 * 256
    # In memory the size is the serialized size with the weights inline.
    assert stats.model_stats(model).size_bytes == model.ByteSize()


def test_inputs_outputs_opsets_and_producer():
    model = dynamic_cnn()
    model.producer_name, model.producer_version = "pytorch", "2.1"
    facts = stats.model_stats(model)
    assert [(t.name, t.dtype, t.shape) for t in facts.inputs] == [("x", "float32", ["batch", 3, "height", "width"])]
    assert facts.outputs[0].describe() == "y: float32[batch, 10]"
    assert facts.opsets == {"ai.onnx": 17} and facts.producer == "pytorch 2.1"
    data = stats.jsonable(facts.as_dict())
    assert data["macs"] is None and data["unknown_mac_nodes"] == ["conv", "fc"]


# ---------------------------------------------------------------------------------------------
# Latency and accuracy


def test_latency_is_measured_and_failures_are_reported_not_raised():
    model = dynamic_cnn()
    good = stats.sample_feeds(modelio.load(model))
    assert good["x"].shape == (1, 3, 32, 32)  # dynamic dims of random inputs
    bad = {"x": np.zeros([1, 5, 8, 8], np.float32)}  # wrong channel count
    (ms, note), (none, reason) = stats.measure_latency([model, model], [good, bad], runs=4, warmup=1, threads=1)
    assert ms > 0 and "x=1x3x32x32" in note and "threads=1" in note
    assert none is None and "onnxruntime could not run it" in reason
    assert stats.measure_latency([model], [good], runs=0) == [(None, "not measured (--runs 0)")]


def test_latency_of_files_and_of_models_too_big_to_hold_together(tmp_path):
    model = dynamic_cnn()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    feeds = stats.sample_feeds(model)
    timed = stats.measure_latency([path, modelio.load(model)], [feeds, feeds], runs=3, warmup=1, threads=1,
                                     in_turns=False)
    for ms, note in timed:
        assert ms > 0 and "models timed one after the other" in note and "3 rounds x 1 runs" in note


def test_compare_models_and_label_accuracy():
    model = dynamic_cnn()
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    fc = numpy_helper.to_array(changed.graph.initializer[1])
    changed.graph.initializer[1].CopyFrom(numpy_helper.from_array(fc * 1.01, "fc"))
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    data = CalibrationData.from_arrays({"x": x})
    logits = runtime.run(runtime.session(model), {"x": x})["y"]
    labels = np.argmax(logits, axis=1)
    labels[:3] = (labels[:3] + 1) % 10  # 3 of 12 wrong
    same = stats.compare_models(model, model, data, labels=labels)
    assert same["samples"] == 12 and same["outputs"]["y"].exact_match
    assert same["label_accuracy"] == {"reference": 0.75, "candidate": 0.75}
    scaled = stats.compare_models(model, changed, data)["outputs"]["y"]
    assert scaled.cosine == pytest.approx(1.0, abs=1e-6) and scaled.top1 == 1.0
    assert 35 < scaled.sqnr_db < 45  # a 1% scale error is 40 dB
    # The same from outputs computed once (what `edgegraph bench` does for its reference model).
    reference = stats.model_outputs(model, data)
    again = stats.compare_outputs(reference, stats.model_outputs(changed, data))
    assert again["outputs"]["y"].sqnr_db == scaled.sqnr_db and "samples" not in again


def test_jsonable_makes_strict_json():
    import json

    data = stats.jsonable({"a": np.float32(1.5), "b": float("inf"), "c": np.arange(3), "d": {1, 2}, "e": None})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"a": 1.5, "b": "inf", "c": [0, 1, 2], "d": [1, 2],
                                                            "e": None}


def test_human_units():
    assert stats.human(None) == "unknown"
    assert stats.human(999) == "999"
    assert stats.human(6_133_200) == "6.13M"
    assert stats.human(40495, "B", binary=True) == "39.55 KiB"


# ---------------------------------------------------------------------------------------------
# Real models


def test_real_cnn_macs_and_params():
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial" / "ImageClassifier.onnx")
    facts = stats.model_stats(path)
    # conv 3->12 k5 (30x30), 12->12 k5 (28x28), pool, 12->24 k5 (12x12), 24->24 k5 (10x10), fc 2400->10
    assert facts.macs == 12 * 900 * 75 + 12 * 784 * 300 + 24 * 144 * 300 + 24 * 100 * 600 + 2400 * 10
    assert facts.params == 50182  # the manifest's count
    assert facts.size_bytes == path.stat().st_size


def test_real_transformer_macs_with_fixed_sequence_length():
    path = require_shared(MODELS / "minilm_l6_v2_int8" / "model.onnx")
    assert stats.model_stats(path).macs is None  # [batch, sequence] inputs: unknown, not guessed
    seq = 128
    facts = stats.model_stats(path, fix_shapes={n: [1, seq] for n in ("input_ids", "attention_mask",
                                                                         "token_type_ids")})
    layers, hidden, ffn = 6, 384, 1536
    projections = layers * seq * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * seq * seq * 2 * hidden  # Q @ K^T and P @ V over all heads
    assert facts.macs == projections + attention


def test_real_model_whose_shapes_need_a_run():
    path = require_shared(MODELS / "style_transfer_candy" / "candy.onnx")  # experimental Crop/ImageScaler ops
    facts = stats.model_stats(path)
    assert facts.macs is not None and facts.macs > 10**10
    assert not facts.unknown_mac_nodes and "observed" in facts.shapes


def test_sample_feeds_respect_a_fixed_batch_and_the_data():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [4, 3])], [value("y", [4, 3])])
    assert stats.sample_feeds(model)["x"].shape == (4, 3)
    data = CalibrationData.from_arrays({"x": np.arange(30, dtype=np.float64).reshape(10, 3)})
    feeds = stats.sample_feeds(model, data)
    assert feeds["x"].dtype == np.float32 and feeds["x"].tolist() == np.arange(12).reshape(4, 3).tolist()
