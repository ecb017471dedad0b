"""`quant` follows the target's quantization scheme (edgegraph/targets/*.toml [quant], read through
the pass context by passes/quant/scheme.py): the types written, still verified in onnxruntime,
and for tflite the lowered int8 model matching in LiteRT."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import edgegraph
from clihelp import run_cli
from conftest import DEFAULT_DIR
from edgegraph import modelio, runtime
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import PassOptionError
from edgegraph.lowering import tflite
from edgegraph.passes.quant import numerics
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from edgegraph.targets import load_target
from fixtures import quant as qfix

SPEC = "quant(check_speed=false)"


def _quantize(target: str, spec: str = SPEC):
    """The small convnet quantized for `target` (verified by the manager against the float model)."""
    x = qfix.convnet_inputs(48)
    context = PassContext(calibration=CalibrationData.from_arrays({"x": x[:32]}), progress=False,
                          target=load_target(target))
    result, report = run_pipeline(modelio.load(qfix.small_convnet()), parse(spec), context)
    return result.to_proto(), report, x[32:]


def _zero_point_types(proto) -> tuple[set[int], set[int]]:
    """(dtypes of the activation QuantizeLinear zero points, dtypes of the constant weights that a
    DequantizeLinear reads)."""
    inits = {t.name: t for t in proto.graph.initializer}
    activations = {inits[n.input[2]].data_type for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    weights = {inits[n.input[0]].data_type for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type != TensorProto.INT32}
    return activations, weights


@pytest.mark.parametrize(("target", "activations", "symmetric"), [
    ("cpu", TensorProto.UINT8, False),     # ORT's MLAS: u8 activations, s8 weights (the default target)
    ("tflite", TensorProto.INT8, False),   # the TFLite int8 spec: s8 asymmetric activations
    ("tensorrt", TensorProto.INT8, True),  # TensorRT: s8 symmetric activations (zero point 0)
])
def test_the_targets_scheme_sets_the_types_written(target, activations, symmetric):
    proto, report, held_out = _quantize(target)
    onnx.checker.check_model(proto, full_check=True)
    acts, weights = _zero_point_types(proto)
    assert acts == {activations} and weights == {TensorProto.INT8}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                    and inits[n.input[0]].ndim == 4]
    assert conv_weights and all(inits[n.input[1]].size == inits[n.input[0]].shape[0] for n in conv_weights)  # per channel
    zeros = {int(inits[n.input[2]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    if symmetric:  # zero point 0, or -128 for a never-negative tensor (it uses the full range)
        assert zeros <= {0, -128}
    else:
        assert zeros - {0, -128, 128}
    record = report.passes[-1]
    assert record.name == "quant" and record.metrics  # verified by the manager
    assert any(f"scheme of the {target} profile" in note for note in record.details["notes"])
    reference = runtime.run(runtime.session(qfix.small_convnet(), threads=1), {"x": held_out})
    got = runtime.run(runtime.session(proto, threads=1), {"x": held_out})
    # measured: cpu 34.3, tflite 34.2, tensorrt 34.2 dB on these held-out inputs
    assert min(numerics.sqnr_db(reference[k], got[k]) for k in reference) > 32


def test_an_option_given_wins_over_the_target():
    proto, report, _ = _quantize("tflite", "quant(check_speed=false, activation_type=uint8)")
    assert _zero_point_types(proto)[0] == {TensorProto.UINT8}
    assert any("activation_type" not in n for n in report.passes[-1].details["notes"] if "scheme of" in n)


def test_a_16_bit_request_on_a_target_without_a16w8_is_noted():
    _, qnn, _ = _quantize("qnn", "quant(check_speed=false, activation_type=int16)")
    _, nnapi, _ = _quantize("nnapi", "quant(check_speed=false, activation_type=int16)")
    assert not any("16-bit" in n for n in qnn.passes[-1].details["notes"])  # QNN HTP: a16w8
    assert any("nnapi runs no 16-bit activations" in n for n in nnapi.passes[-1].details["notes"])


def test_a_target_without_qdq_is_refused_in_one_line(capsys, tmp_path):
    x = qfix.convnet_inputs(8)
    context = PassContext(calibration=CalibrationData.from_arrays({"x": x}), progress=False, target=load_target("coreml"))
    with pytest.raises(PassOptionError, match="coreml runs no QuantizeLinear/DequantizeLinear"):
        run_pipeline(modelio.load(qfix.small_convnet()), parse(SPEC), context)
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    onnx.save(qfix.small_convnet(), model)
    np.savez(calib, x=x)
    code, _, err = run_cli(capsys, "opt", model, "-p", "quant", "--calib", calib, "--target", "coreml", "-o", out,
                           "--runs", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weight-only" in err and not out.exists()


def test_tflite_scheme_int8_model_lowers_and_matches_in_litert(tmp_path):
    if tflite.available() is not None:
        pytest.skip(tflite.available())
    model, calib = DEFAULT_DIR / "digits_cnn.onnx", DEFAULT_DIR / "digits_calib.npz"
    shutil.copy(calib, tmp_path / calib.name)
    proto = edgegraph.optimize(str(model), "cleanup,quant", calib=str(calib), target="tflite", timing=False)
    assert _zero_point_types(proto)[0] == {TensorProto.INT8}
    path = tmp_path / "digits_tflite_int8.onnx"
    onnx.save(proto, str(path))
    result = edgegraph.lower(str(path), "tflite", tmp_path / "m.tflite", calib=str(tmp_path / calib.name))
    # measured in LiteRT against onnxruntime on the int8 ONNX model: 136 dB, TFLite's int8 kernels
    # rounding as onnxruntime's do on the scheme made for them (symmetric int8 activations)
    assert min(m.sqnr_db for m in result.metrics.values()) > 120
    assert "int8 TFLite: 7 of 8 compute ops run on int8 tensors (activation scales from the model's Q/DQ)" in result.notes
