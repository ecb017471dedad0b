"""Weights stored encoded (codebook Gather, Q/DQ int8 per channel, INT4 initializers, uint8 holding
two 4-bit codes with an unpack subgraph, Cast(int8) * scale) stay encoded through `cleanup` and
`quant`: the file does not grow, the payload keeps its dtype and decode nodes, outputs match in
onnxruntime, and `info` counts each weight's elements once with its stored bytes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clihelp import run_cli
from conftest import MODELS, REPO, require_shared

from edgegraph import ir, modelio, stats
from edgegraph.analysis import encoding
from fixtures import encoded as fx

PIPELINES = ("cleanup", "quant", "cleanup,quant", "quant,cleanup")
DENSE = int(np.prod(fx.DENSE_SHAPE))
BIAS = fx.CONV_SHAPE[0]
CHANNELS = fx.CONV_SHAPE[0] + fx.MATMUL_SHAPE[1]  # per-channel parameters of the two encoded weights
# Stored bytes of the two encoded weights, worked out from the fixture's layout (shapes excluded).
ENCODED_BYTES = {
    "codebook": fx.ENCODED_ELEMENTS + 2 * 16 * 4,  # uint8 indices + two float codebooks of 16
    "qdq": fx.ENCODED_ELEMENTS + CHANNELS * 4 + CHANNELS,  # int8 + float scales + int8 zero points
    "int4": fx.ENCODED_ELEMENTS // 2 + CHANNELS * 4,  # two codes a byte + float scales
    "packed-int4": fx.ENCODED_ELEMENTS // 2 + 2 * 16 * 4 + 2 * 2,  # + codebooks + uint8 mask, shift
    "scaled": fx.ENCODED_ELEMENTS + CHANNELS * 4,
}
# SQNR quant reaches on these models (measured 34.9 dB for "scaled" to 41.5 dB): int8 activations and W3.
MIN_QUANT_SQNR_DB = 33.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoded")
    np.savez(folder / "calib.npz", x=fx.calibration()[:, 0])
    for kind in fx.ENCODINGS:
        onnx.save_model(fx.encoded_model(kind), folder / f"{kind}.onnx")
    return folder


def _outputs(path, inputs) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x})[0] for x in inputs])


def _weights(path) -> list[tuple[str, str, tuple, tuple]]:
    """(reader op, encoding kind, decode ops, payload (name, dtype, bytes)) of every encoded weight."""
    graph = modelio.load(path).graph
    found = []
    for tensor, code in encoding.decoded_weights(graph):
        payload = tuple((c.name, np.dtype(c._values.dtype).name, ir.stored_nbytes(c)) for c in code.payload)
        found.append((tensor.outputs[0].op, code.kind, tuple(n.op for n in code.nodes), payload))
    return sorted(found)


def _dense_floats(path) -> list[str]:
    """Float initializers as large as a decoded fixture weight (W2 has 160 elements)."""
    return [t.name for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 160 and t.name != "w3"]


def _sqnr(ref, out) -> float:
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("kind", fx.ENCODINGS)
def test_encoded_weights_stay_encoded(capsys, workdir, kind, pipeline):
    source = workdir / f"{kind}.onnx"
    target = workdir / f"{kind}-{pipeline.replace(',', '-')}.onnx"
    # (--runs 0: no speed check, which on these tiny models would write the float model instead.)
    code, _, err = run_cli(capsys, "opt", source, "-p", pipeline, "--calib", workdir / "calib.npz", "-o", target,
                           "--runs", "0")
    assert code == 0, err
    before, after = _weights(source), _weights(target)
    assert len(before) == 2 and {w[1] for w in before} == {kind}
    # The encoded weights keep their readers, kinds, decode nodes, payload names, dtypes and bytes;
    # quant adds one: the dense W3, now int8 per column.
    added = [w for w in after if w not in before]
    assert [w for w in before if w not in after] == []
    if "quant" in pipeline:
        assert [(op, k, ops, [p[1:] for p in payload]) for op, k, ops, payload in added] == [
            ("MatMul", "qdq", ("DequantizeLinear",), [("int8", DENSE)])]
    else:
        assert added == []
    assert _dense_floats(target) == []
    assert target.stat().st_size <= source.stat().st_size
    inputs = fx.calibration()
    ref, out = _outputs(source, inputs), _outputs(target, inputs)
    if "quant" in pipeline:
        assert MIN_QUANT_SQNR_DB <= _sqnr(ref, out) < 60  # W3 and the activations did get quantized
        assert target.stat().st_size < source.stat().st_size - DENSE * 2  # W3 went from 4 bytes to 1
    else:
        np.testing.assert_array_equal(out, ref)  # (packed-int4: dedup shares the two masks and shifts)


@pytest.mark.parametrize("kind", fx.ENCODINGS)
def test_info_counts_encoded_weights_once_with_stored_bytes(capsys, workdir, kind):
    facts = stats.model_stats(workdir / f"{kind}.onnx")
    assert facts.params == fx.ENCODED_ELEMENTS + DENSE + BIAS
    assert facts.param_bytes == ENCODED_BYTES[kind] + (DENSE + BIAS) * 4
    code, out, err = run_cli(capsys, "info", workdir / f"{kind}.onnx", "--json")
    data = json.loads(out)
    assert (code, err) == (0, "")
    assert (data["params"], data["param_bytes"]) == (facts.params, facts.param_bytes)


def test_quant_counts_what_it_quantized_and_what_it_left_encoded(capsys, workdir):
    source, target = workdir / "qdq.onnx", workdir / "qdq-counted.onnx"
    code, _, err = run_cli(capsys, "opt", source, "-p", "quant", "--calib", workdir / "calib.npz", "-o", target,
                           "--runs", "0")
    assert code == 0, err
    facts = stats.model_stats(target)
    # W3 is now int8 behind a per-column DequantizeLinear: its elements once, its bytes as stored.
    assert facts.params == fx.ENCODED_ELEMENTS + DENSE + BIAS
    columns = fx.DENSE_SHAPE[1]
    assert facts.param_bytes == ENCODED_BYTES["qdq"] + DENSE + columns * 4 + columns + BIAS * 4


def test_predicate_sees_encodings_and_nothing_else():
    graph = ir.from_proto(fx.encoded_model("scaled")).graph
    conv = next(n for n in graph.nodes if n.op == "Conv")
    weight = encoding.encoded(conv.inputs[1])
    assert weight.kind == "scaled" and [n.op for n in weight.nodes] == ["Cast", "Mul"]
    assert [c.name for c in weight.payload] == ["w1_q"]
    assert encoding.encoded(conv.inputs[0]) is None  # the graph input
    assert encoding.encoded(conv.outputs[0]) is None  # computed from an activation
    cast = next(n for n in graph.nodes if n.op == "Cast")
    assert encoding.decodes(cast)
    # A float constant's arithmetic and int64 shape arithmetic are no decoding: fold may fold them.
    plain = ir.from_proto(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["a", "b"], ["c"]), onnx.helper.make_node("Cast", ["s"], ["f"], to=1)], "g", [],
        [onnx.helper.make_tensor_value_info("c", 1, None), onnx.helper.make_tensor_value_info("f", 1, None)],
        [onnx.numpy_helper.from_array(np.ones(300, np.float32), "a"),
         onnx.numpy_helper.from_array(np.float32(2), "b"),
         onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "s")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])).graph
    assert not any(encoding.decodes(n) for n in plain.nodes)


def _minilm_weights(path) -> list[tuple[str, str, tuple]]:
    return sorted((code.kind, tensor.outputs[0].op, tuple((c.name, np.dtype(c._values.dtype).name) for c in code.payload))
                  for tensor, code in encoding.decoded_weights(modelio.load(path).graph) if code.kind == "scaled")


@pytest.mark.parametrize("pipeline", ["cleanup", "quant,cleanup"])
def test_minilm_keeps_its_int8_weights(capsys, tmp_path, pipeline):
    # Weight-only int8 (Cast(int8) * scale): 36 MatMul weights and 2 embedding tables.
    source = require_shared(MODELS / "minilm_l6_v2_int8" / "model.onnx")
    reference = np.load(source.with_name("model.reference_io.npz"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k.removeprefix("input__"): v for k, v in reference.items() if k.startswith("input__")})
    target = tmp_path / "minilm.onnx"
    code, _, err = run_cli(capsys, "opt", source, "-p", pipeline, "--calib", calib, "-o", target, "--runs", "0")
    assert code == 0, err
    assert target.stat().st_size <= source.stat().st_size  # 22928619 -> 22921148 (cleanup), 22925703 (quant)
    weights = _minilm_weights(source)
    assert len(weights) == 38 and _minilm_weights(target) == weights
    graph = modelio.load(target).graph
    assert not any(encoding.encoded(n.inputs[0]) for n in graph.nodes if n.op == "QuantizeLinear")
    before, after = stats.model_stats(source), stats.model_stats(target)
    assert before.params == 22565382 and after.params == before.params  # (22617152 counting the scales as weights)
    if pipeline == "cleanup":
        assert after.param_bytes == before.param_bytes == 22866944


def test_cleanup_growth_allowance_does_not_cover_copies_of_a_payload():
    # A rewrite that replaces a constant still read elsewhere adds a copy: a small float copy is
    # within cleanup's allowance, a copy of an int8 payload is not (it is a second stored weight).
    from edgegraph.passes.cleanup.common import affordable

    def case(dtype):
        model = onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("Transpose", ["w"], ["a"], perm=[1, 0]),
             onnx.helper.make_node("Identity", ["w"], ["b"])], "g", [],
            [onnx.helper.make_tensor_value_info("a", 1, None), onnx.helper.make_tensor_value_info("b", 1, None)],
            [onnx.numpy_helper.from_array(np.ones((8, 8), dtype), "w")]), opset_imports=[onnx.helper.make_opsetid("", 17)])
        graph = ir.from_proto(model).graph
        weight, reader = graph.nodes[0].inputs[0], graph.nodes[0]
        return affordable(graph, [weight], [reader], [np.ones((8, 8), dtype)])

    assert case(np.float32) and not case(np.int8)


def test_quant_on_a_quantized_model_changes_no_weight(capsys, tmp_path):
    # quant's own output (Q/DQ on activations and weights) through quant,cleanup again.
    digits = REPO / "fixtures" / "default"
    calib = digits / "digits_calib.npz"
    once, twice = tmp_path / "int8.onnx", tmp_path / "int8-again.onnx"
    # (--runs 0: no speed check, which on the digits CNN would write the float model instead.)
    assert run_cli(capsys, "opt", digits / "digits_cnn.onnx", "-p", "cleanup,quant", "--calib", calib, "-o", once,
                   "--runs", "0")[0] == 0
    code, _, err = run_cli(capsys, "opt", once, "-p", "quant,cleanup", "--calib", calib, "-o", twice, "--runs", "0")
    assert code == 0, err
    assert twice.stat().st_size <= once.stat().st_size
    weights = _weights(once)
    assert len(weights) >= 4 and {w[1] for w in weights} == {"qdq"} and _weights(twice) == weights
    inputs = np.load(calib)["input"][:8, None]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = [[ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                for x in inputs] for p in (once, twice)]
    np.testing.assert_array_equal(np.concatenate(outputs[1]), np.concatenate(outputs[0]))
