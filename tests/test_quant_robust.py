"""Quantization passes on unusual but valid models, deterministic output, and honest reports:
values that are not float tensors, output bytes that do not depend on machine load, warnings
for degraded results and for options that match nothing, one count of quantized nodes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import DATA, DEFAULT_DIR, MODELS, require_shared, run_spec
from edgegraph import runtime, stats, verify
from edgegraph.cli import main
from edgegraph.errors import EdgegraphError
from edgegraph.passes.quant import static
from fixtures import quant as qfix



def _ort(proto, x):
    sess = runtime.session(proto, threads=1)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


# ---------------------------------------------------------------------------------------------
# Graph input as output, sequence / optional values, 4-bit initializers: quantized where the
# MatMuls are, the rest left as it was.

PASSES = {  # spec, the stat that counts quantized layers, worst output SQNR (dB) measured on the chain
    "quant": ("quant(check_speed=false)", "quantized_nodes", 30.0),
    "quant-dynamic": ("quant-dynamic", "matmul", 30.0),
    "quant-int4": ("quant-int4", "layers", 15.0),
}


@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("name", list(qfix.unusual_value_models()))
def test_unusual_values_are_left_alone_and_the_rest_quantized(name, pass_name):
    model = qfix.unusual_value_models()[name]
    spec, counter, floor = PASSES[pass_name]
    proto, record = run_spec(model, {"x": qfix.chain_inputs(32)}, spec)
    onnx.checker.check_model(proto, full_check=True)
    assert record.modified and record.stats[counter] == 2  # both MatMuls
    # The interface is unchanged: names and kinds of value (tensor, sequence, optional) alike.
    assert [(o.name, o.type.WhichOneof("value")) for o in proto.graph.output] == \
           [(o.name, o.type.WhichOneof("value")) for o in model.graph.output]
    original = {t.name: t.data_type for t in model.graph.initializer}
    kept = {t.name: t.data_type for t in proto.graph.initializer if t.name in original}
    assert all(kept[n] == original[n] for n in kept if original[n] in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4))
    x = qfix.chain_inputs(16, seed=1)
    reference, candidate = _ort(model, x), _ort(proto, x)
    for out in reference:
        if out == "x":  # the input passed through stays the input
            np.testing.assert_array_equal(candidate[out], reference[out])
            continue
        pairs = zip(reference[out], candidate[out]) if out == "seq" else [(reference[out], candidate[out])]
        for ref, cand in pairs:  # (a sequence: each element; its element x is x as quant's MatMul reads it)
            assert isinstance(cand, np.ndarray) and cand.shape == ref.shape
            noise = float(np.sum((cand.astype(np.float64) - ref) ** 2))
            sqnr = verify.sqnr_db(float(np.sum(ref.astype(np.float64) ** 2)), noise)
            assert floor < sqnr, (out, sqnr)
        if out != "seq":
            assert sqnr < 80  # quantized, not a float copy


# ---------------------------------------------------------------------------------------------
# Determinism: the same model, options and seed give the same bytes however busy the machine is.


def _digits():
    calib = np.load(DEFAULT_DIR / "digits_calib.npz")
    return onnx.load(DEFAULT_DIR / "digits_cnn.onnx"), {k: calib[k] for k in calib.files}


def test_analysis_sample_count_does_not_follow_the_clock(monkeypatch):
    model, data = _digits()
    normal, record = run_spec(model, data, "cleanup,quant(check_speed=false)")
    clock = iter(range(0, 10**9, 30))  # a machine so loaded that every step takes 30 s
    monkeypatch.setattr(static.time, "perf_counter", lambda: float(next(clock)))
    slow, slow_record = run_spec(model, data, "cleanup,quant(check_speed=false)")
    assert record.stats["analysis_samples"] == slow_record.stats["analysis_samples"] == 8
    assert slow.SerializeToString() == normal.SerializeToString()


def test_analysis_sample_count_follows_the_model_size(monkeypatch):
    model = qfix.small_convnet()
    data = {"x": qfix.convnet_inputs(32)}
    macs = stats.model_stats(model, fix_shapes={"x": [1, 3, 16, 16]}).macs_known
    for budget, expected in ((macs * 100, 8), (macs * 5.5, 5), (macs, 2)):
        monkeypatch.setattr(static, "ANALYSIS_MACS", budget)
        _, record = run_spec(model, data, "quant(check_speed=false, method=minmax, bias_correction=false)")
        assert record.stats["analysis_samples"] == expected


def test_same_bytes_with_the_machine_loaded(tmp_path):
    model, data = _digits()
    first, _ = run_spec(model, data, "cleanup,quant(check_speed=false)")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        second, _ = run_spec(model, data, "cleanup,quant(check_speed=false)")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert second.SerializeToString() == first.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Honest results


def outlier_chain_inputs(count: int, seed: int = 0) -> np.ndarray:
    """Chain inputs whose channel 0 sits near 1000 (the other 63 near 0), a value the model
    ignores: one 8-bit step then drowns every other channel."""
    x = qfix.chain_inputs(count, seed)
    x[:, 0] = 1000 + x[:, 0]
    return x


def _outlier_model():
    model = qfix.passthrough_model()
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    value = onnx.numpy_helper.to_array(w1).copy()
    value[0] = 0  # the outlier channel does not reach the output
    w1.CopyFrom(onnx.numpy_helper.from_array(value, "W1"))
    del model.graph.output[1]
    return model


def test_degraded_result_warns_and_names_the_costliest_layers(caplog):
    with caplog.at_level(logging.WARNING):
        _, record = run_spec(_outlier_model(), {"x": outlier_chain_inputs(32)}, "quant(check_speed=false)")
    warning = record.details["warning"]
    assert warning["held_out_sqnr_db"] < 5 and record.stats["warning"].startswith("worst output SQNR")
    assert warning["costliest_layers"][0]["node"] == "mm1"  # its input is the one with the outlier
    assert "min_sqnr=20" in warning["suggestion"] and "exclude_nodes=[mm1" in warning["suggestion"]
    messages = [r.getMessage() for r in caplog.records if "badly degraded" in r.getMessage()]
    assert len(messages) == 1 and "mm1" in messages[0] and len(messages[0]) < 600
    # Following the advice helps: with mm1 in float the chain is fine.
    proto, fixed = run_spec(_outlier_model(), {"x": outlier_chain_inputs(32)}, "quant(check_speed=false, exclude_nodes=[mm1])")
    assert "warning" not in fixed.details and fixed.stats["quantized_nodes"] == 1


def test_good_result_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        _, record = run_spec(qfix.small_convnet(), {"x": qfix.convnet_inputs(32)}, "quant(check_speed=false)")
    assert "warning" not in record.details and "warning" not in record.stats
    assert not [r for r in caplog.records if "degraded" in r.getMessage()]


def test_degraded_text_detector_warns():
    """PP-OCRv4's detector at 320x320 on real text: static int8 is far below float (~7 dB) with
    8 bits everywhere (mixed=off; mixed precision lifts it: test_quant_mixed)."""
    path = require_shared(MODELS / "ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.onnx")
    require_shared(DATA / "misc_images/skimage_page.png")
    x = qfix.text_detector_inputs(DATA, 16)
    _, record = run_spec(onnx.load(path), {"x": x}, "quant(check_speed=false, mixed=off)")
    warning = record.details["warning"]
    assert warning["held_out_sqnr_db"] < 12 and len(warning["costliest_layers"]) == 3
    nodes = {n.name for n in onnx.load(path).graph.node}
    assert all(layer["node"] in nodes for layer in warning["costliest_layers"])


def test_budget_met_only_by_a_float_copy_is_refused(tmp_path, capsys):
    model, data = _digits()
    with pytest.raises(EdgegraphError, match="nothing was quantized: min_sqnr=200 dB") as caught:
        run_spec(model, data, "cleanup,quant(check_speed=false, min_sqnr=200)")
    assert caught.value.exit_code == 2
    out = tmp_path / "out.onnx"
    code = main(["opt", str(DEFAULT_DIR / "digits_cnn.onnx"), "-p", "cleanup,quant(max_drop=0.0, min_sqnr=200)",
                 "--calib", str(DEFAULT_DIR / "digits_calib.npz"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("edgegraph: error: quant: nothing was quantized: min_sqnr=200 dB and max_drop=0")


# ---------------------------------------------------------------------------------------------
# `--runs 0` (PassContext.timing=False): no speed check


def test_no_speed_check_without_timing(monkeypatch):
    calls = []
    real = runtime.latency_ms
    monkeypatch.setattr(runtime, "latency_ms", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = {"x": qfix.convnet_inputs(16)}
    _, record = run_spec(qfix.small_convnet(), data, "quant", timing=False)
    assert not calls and "latency" not in record.details and "speed_check" not in record.details["timings_s"]
    _, record = run_spec(qfix.small_convnet(), data, "quant")
    assert calls and record.details["latency"]["float_ms"] > 0


# ---------------------------------------------------------------------------------------------
# Options that match nothing


@pytest.mark.parametrize("spec, model, expected", [
    ("quant(exclude_ops=[Sofmax])", "convnet", "quant: exclude_ops: 'Sofmax' is not an ONNX op (did you mean 'Softmax'"),
    ("quant(exclude_ops=[Softmax])", "convnet", "quant: exclude_ops: 'Softmax' matches no op type of the model"),
    ("quant(exclude_nodes=[conv9])", "convnet", "quant: exclude_nodes: 'conv9' matches no node name of the model "
                                                "(did you mean 'conv3', 'conv2', 'conv1'?)"),
    ("quant-dynamic(exclude=[mm3])", "chain", "quant-dynamic: exclude: 'mm3' matches no op type or node name of "
                                              "the model (did you mean 'mm2', 'mm1'?)"),
    ("quant-int4(exclude=[MatMull])", "chain", "quant-int4: exclude: 'MatMull' matches no op type or node name of "
                                               "the model (did you mean 'MatMul'"),
    ("quant(exclude_nodes=[" + "n" * 5000 + "])", "convnet", "quant: exclude_nodes: '" + "n" * 60 + "...'"),
])
def test_option_matching_nothing_warns(spec, model, expected, caplog):
    proto, data = ((qfix.small_convnet(), {"x": qfix.convnet_inputs(16)}) if model == "convnet"
                   else (qfix.passthrough_model(), {"x": qfix.chain_inputs(16)}))
    with caplog.at_level(logging.WARNING):
        run_spec(proto, data, spec)
    messages = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith(expected) and len(messages[0]) < 300


def test_options_that_match_warn_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        run_spec(qfix.small_convnet(), {"x": qfix.convnet_inputs(16)},
             "quant(check_speed=false, exclude_ops=[Gemm], exclude_nodes=[conv3])")
        run_spec(qfix.passthrough_model(), {"x": qfix.chain_inputs(16)}, "quant-dynamic(exclude=[mm1]),quant-int4(exclude=[MatMul])")
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# One count of quantized nodes


def test_pass_count_is_the_summary_count(tmp_path, capsys):
    # digits: a residual Add -> Relu -> Q (Relu folded into the Add), a Concat and a Flatten
    # (data movement, not counted): 11 compute nodes, all quantized.
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["opt", str(DEFAULT_DIR / "digits_cnn.onnx"), "-p", "cleanup,quant(check_speed=false)", "--calib",
                 str(DEFAULT_DIR / "digits_calib.npz"), "-o", str(out), "--report", str(report)]) == 0
    summary = capsys.readouterr().out
    data = json.loads(report.read_text())
    counted = data["passes"][-1]["stats"]["quantized_nodes"]
    assert counted == data["after"]["quantized_nodes"] == stats.model_stats(str(out)).quantized_nodes == 11
    assert any(line.split()[:4] == ["quantized", "nodes", "0", "11"] for line in summary.splitlines())
    # The nodes row leaves out the Q/DQ pairs (onnxruntime fuses them): cleanup's 27 -> 20 stays visible.
    assert any(line.split()[:3] == ["nodes", "27", "20"] for line in summary.splitlines()), summary


def test_pass_count_is_the_summary_count_on_a_real_cnn():
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx")
    require_shared(DATA / "cifar10_test_subset")
    x, _ = qfix.cifar10(DATA)
    proto, record = run_spec(onnx.load(path), {"modelInput": x[:32]}, "cleanup,quant(check_speed=false)")
    assert record.stats["quantized_nodes"] == stats.model_stats(proto).quantized_nodes == 6  # 3 Conv, 2 pools, Gemm
