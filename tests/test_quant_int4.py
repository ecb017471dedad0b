"""quant-int4: packing matches the math, both encodings agree, accuracy and size on a fixture and MiniLM."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import MODELS, require_shared
from onnx import TensorProto, helper, numpy_helper
from test_quant_dynamic import MINILM, minilm, op_counts, outputs, quantize, sentence_metrics  # noqa: F401

from edgegraph import runtime, verify
from edgegraph.errors import PassOptionError
from edgegraph.passes.quant import numerics as nq
from edgegraph.passes.quant.weight_only import search_block_ranges
from edgegraph.spec import parse
from fixtures import linear as fl


def single_matmul(k: int, n: int = 24, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (k, n)).astype(np.float32)
    w[rng.integers(0, k), :] *= 8  # an outlier row: its blocks get coarser scales than the rest
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


@pytest.mark.parametrize("k, symmetric", [(64, False), (40, False), (40, True)])
def test_matmulnbits_computes_x_times_the_dequantized_blocks(k, symmetric):
    """K=40 leaves a partial last block: the padding path of the packing."""
    proto, w = single_matmul(k)
    out, record = quantize(proto, f"quant-int4(symmetric={str(symmetric).lower()}, accuracy_level=0)")
    node = next(n for n in out.graph.nodes if n.op == "MatMulNBits")
    assert node.attrs["K"] == k and node.attrs["N"] == 24 and node.attrs["block_size"] == 32
    qt = nq.qtype("int4" if symmetric else "uint4")
    scale, zero = search_block_ranges(w, qt, 32, symmetric)
    expected_w = nq.fake_quantize(w, scale, zero, qt, axis=0, block_size=32)
    x = np.random.default_rng(1).normal(0, 1, (5, k)).astype(np.float32)
    got = runtime.run(runtime.session(out), {"x": x})["y"]
    np.testing.assert_allclose(got, x @ expected_w, rtol=1e-4, atol=1e-4)
    assert record.stats["worst_weight_sqnr_db"] == pytest.approx(nq.sqnr_db(w, expected_w), abs=0.01)


def test_qdq_and_matmulnbits_encode_the_same_numbers():
    batches = fl.token_batches()
    nbits, _ = quantize(fl.mlp(), "quant-int4(accuracy_level=0)")  # float compute: the plain math
    qdq, record = quantize(fl.mlp(), "quant-int4(format=qdq)")
    assert record.stats["opset_converted"] == "17 -> 21" and qdq.opset == 21
    dequant = [n for n in qdq.graph.nodes if n.op == "DequantizeLinear" and n.attrs.get("block_size")]
    assert len(dequant) == 3 and all(n.inputs[0].dtype.name == "uint4" for n in dequant)
    assert op_counts(nbits)["MatMulNBits"] == 3 and "MatMul" not in op_counts(nbits)
    # Without onnxruntime's rewrites: when it loads a QDQ model it fuses DequantizeLinear + MatMul
    # into MatMulNBits with int8 activations (accuracy_level 4), which is no longer the same math.
    a, b = (np.concatenate([runtime.run(runtime.session(m), feeds)["y"] for feeds in batches]) for m in (nbits, qdq))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())
    # As deployed, the default (accuracy_level 4) computes exactly what onnxruntime makes of the QDQ form.
    default, _ = quantize(fl.mlp(), "quant-int4")
    np.testing.assert_allclose(outputs(default, batches, "y"), outputs(qdq, batches, "y"), rtol=0,
                               atol=1e-5 * np.abs(a).max())


def test_fixture_accuracy_and_size():
    batches = fl.token_batches()
    reference = outputs(fl.mlp(), batches, "y")
    model, record = quantize(fl.mlp(), "quant-int4")
    metrics = verify.compare("y", reference, outputs(model, batches, "y"))
    # Measured: cosine 0.985, SQNR 15.1 dB (the Gemm's alpha/beta and the Cast*scale weight included).
    assert metrics.cosine > 0.98 and metrics.sqnr_db > 13.5
    assert record.stats["layers"] == 3
    assert record.stats["weight_mb_after"] < 0.17 * record.stats["weight_mb_before"]


def test_range_search_never_loses_to_min_max():
    _, w = single_matmul(256, 64, seed=4)
    for symmetric in (False, True):
        qt = nq.qtype("int4" if symmetric else "uint4")
        plain = nq.weight_scale_zero_point(w, qt, axis=0, symmetric=symmetric, block_size=32)
        searched = search_block_ranges(w, qt, 32, symmetric)
        sqnr_plain = nq.sqnr_db(w, nq.fake_quantize(w, *plain, qt, axis=0, block_size=32))
        sqnr_searched = nq.sqnr_db(w, nq.fake_quantize(w, *searched, qt, axis=0, block_size=32))
        assert sqnr_searched > sqnr_plain + 0.1, (symmetric, sqnr_plain, sqnr_searched)  # measured +0.24 dB


def test_layers_smaller_than_a_block_stay_float():
    proto, _ = single_matmul(16)
    out, record = quantize(proto, "quant-int4")
    assert not record.modified and op_counts(out) == {"MatMul": 1}


def test_options_are_validated():
    for spec in ("quant-int4(block_size=24)", "quant-int4(block_size=8)", "quant-int4(format=gptq)",
                 "quant-int4(accuracy_level=5)", "quant-int4(ops=[Conv])"):
        with pytest.raises(PassOptionError):
            parse(spec)


def test_minilm_accuracy_size_and_onnxruntime_comparison(minilm):  # noqa: F811 - the shared fixture
    fp32, feeds = minilm
    out, record = quantize(require_shared(MINILM), "quant-int4")
    assert record.stats["layers"] == 36
    # 42.5 MB of float weights -> 6.8 MB (4 bits + a scale and zero point per 32 values).
    assert record.stats["weight_mb_after"] < 0.17 * record.stats["weight_mb_before"]
    metrics, pooled = sentence_metrics(fp32, out.to_proto(), feeds)
    # Measured: token cosine 0.977, min pooled cosine 0.944, SQNR 13.0 dB.
    assert metrics.cosine > 0.97 and pooled > 0.93 and metrics.sqnr_db > 12.5
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # it needs the onnx_ir package
        pytest.skip(f"onnxruntime's MatMulNBitsQuantizer is unavailable: {exc}")
    logging.disable(logging.WARNING)
    try:
        source = onnx.ModelProto()
        source.CopyFrom(fp32)  # the quantizer edits the model it is given
        quantizer = MatMulNBitsQuantizer(source, block_size=32, is_symmetric=False)
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    ort_metrics, ort_pooled = sentence_metrics(fp32, quantizer.model.model, feeds)
    # Same block size and encoding; the range search is what puts edgegraph ahead (12.5 dB there).
    assert metrics.sqnr_db > ort_metrics.sqnr_db and pooled > ort_pooled
