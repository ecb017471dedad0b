"""One peer quantizer on one model: the child process `tools/bench_quant.py` starts in the peer's
own virtualenv (their pins clash with edgegraph's, so they cannot share one):

    python tools/bench_quant_peer.py TOOL VARIANT fp32.onnx calib.npz out.onnx

TOOL is nncf | inc | aimet; VARIANT one of PEERS[TOOL]. The calibration .npz holds one array per
model input, samples along axis 0 (fed one at a time, batch 1). Writes the quantized model (Q/DQ
or QOperator ONNX that onnxruntime runs) and prints one JSON line {"seconds": quantization time}
on stdout: the tool's call only, not this interpreter's start-up or the imports.

This file imports neither edgegraph nor anything the peer venv lacks. Create the venvs with:

    python3 -m venv /work/venvs/quant-peer-nncf  && /work/venvs/quant-peer-nncf/bin/pip install nncf onnx onnxruntime
    python3 -m venv /work/venvs/quant-peer-inc   && /work/venvs/quant-peer-inc/bin/pip install onnx-neural-compressor scipy pydantic prettytable
    python3 -m venv /work/venvs/quant-peer-aimet && /work/venvs/quant-peer-aimet/bin/pip install torch==2.13.0 aimet-onnx

(onnx-neural-compressor 1.0 imports scipy, pydantic and prettytable without declaring all of
them; aimet-onnx pulls torch 2.14.1 with CUDA libraries, several GB, though it runs on the CPU.)
(`--peer-venvs DIR` of the bench says where they are; a tool whose venv or import is missing is
reported as absent.)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

PEERS = {
    # NNCF's documented variants: its default preset (symmetric activations), MIXED (asymmetric
    # activations; the recommended one for models with non-ReLU activations), and the slower,
    # more accurate bias correction (fast_bias_correction=False).
    "nncf": ("default", "mixed", "bias_correction"),
    # Intel Neural Compressor for ONNX: static, per-channel weights, uint8 activations, QOperator
    # (its default format), MinMax calibration on all calibration samples.
    "inc": ("default",),
    # AIMET-ONNX: QuantizationSimModel with its defaults (min-max encodings, its default config),
    # the same after cross-layer equalization, and after AdaRound (its default 10k iterations per
    # layer) on the calibration samples; exported as Q/DQ (`to_onnx_qdq`).
    "aimet": ("default", "cle", "adaround"),
}


def feeds(npz: Path) -> list[dict[str, np.ndarray]]:
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    count = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(count)]


def nncf_quantize(variant: str, model: onnx.ModelProto, samples: list[dict]) -> onnx.ModelProto:
    import nncf

    options = {"subset_size": len(samples)}
    if variant == "mixed":
        options["preset"] = nncf.QuantizationPreset.MIXED
    if variant == "bias_correction":
        options["fast_bias_correction"] = False
    return nncf.quantize(model, nncf.Dataset(samples), **options)


def inc_quantize(variant: str, model_path: Path, samples: list[dict], out: Path) -> None:
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import config, quantize
    from onnxruntime.quantization import QuantType

    class Reader(data_reader.CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.items, None)

        def rewind(self):
            self.items = iter(samples)

    qconfig = config.StaticQuantConfig(calibration_data_reader=Reader(), per_channel=True,
                                       activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                       calibration_sampling_size=len(samples))
    quantize(str(model_path), str(out), qconfig)


def aimet_quantize(variant: str, model: onnx.ModelProto, samples: list[dict], out: Path) -> None:
    from aimet_onnx.quantsim import QuantizationSimModel

    if variant == "cle":
        from aimet_onnx.cross_layer_equalization import equalize_model

        equalize_model(model)
    sim = QuantizationSimModel(model)
    if variant == "adaround":
        from aimet_onnx import apply_adaround

        apply_adaround(sim, samples)
    sim.compute_encodings(samples)
    qdq = sim.to_onnx_qdq()
    onnx.save(qdq, str(out))


def main() -> None:
    tool, variant, model_path, calib, out = sys.argv[1:6]
    if variant not in PEERS.get(tool, ()):
        raise SystemExit(f"unknown peer {tool} {variant}")
    model_path, out = Path(model_path), Path(out)
    samples = feeds(Path(calib))
    model = onnx.load(str(model_path))
    start = time.perf_counter()
    if tool == "nncf":
        onnx.save(nncf_quantize(variant, model, samples), str(out))
    elif tool == "inc":
        inc_quantize(variant, model_path, samples, out)
    else:
        with tempfile.TemporaryDirectory():
            aimet_quantize(variant, model, samples, out)
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
