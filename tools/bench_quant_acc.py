"""Accuracy benchmark for `quant`'s accuracy methods (issue #14) on real models, held-out data.

    python tools/bench_quant_acc.py [--models cifar10,ppocr_cls,...] [--spec "quant(...)"]... [--ort]

For each model: calibration inputs and two disjoint held-out evaluation splits (A, B) built from
../shared/data (fixtures/quant.py; preprocessing per ../shared/models/MANIFEST.md). Each
edgegraph pipeline (default: `quant`, repeatable --spec) and, with --ort, onnxruntime's
quantize_static (MinMax, QUInt8 activations, per-channel int8 weights on the quant_pre_process
output of the opset-13 model) quantize the same fp32 model from the same calibration inputs.
Columns:

  agree A/B  agreement with fp32 on each split: top-1 (classifiers), per-pixel argmax (DeepLab),
             detection F1 (YOLOX), binarised text map at 0.3 (PP-OCRv4 det), CTC-decoded strings
             unchanged (PP-OCRv4 rec)
  sqnr       worst-output SQNR (dB) on A+B
  lat1       median 1-thread latency / fp32's, full ORT optimisations, interleaved rounds
  tool s     wall time of the quantization call

Latency on a loaded machine is noisy: re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgegraph import modelio, runtime, verify  # noqa: E402
from edgegraph.context import CalibrationData, PassContext, VerifyConfig  # noqa: E402
from edgegraph.passes.quant.prepare import upgrade_opset  # noqa: E402
from edgegraph.pipeline import run_pipeline  # noqa: E402
from edgegraph.spec import parse  # noqa: E402
from fixtures import quant as F  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS, DATA = SHARED / "models", SHARED / "data"


@dataclass
class Case:
    name: str
    path: Path
    input: str
    calib: np.ndarray
    eval: np.ndarray  # splits A and B are its two halves
    metric: Callable[[np.ndarray, np.ndarray], float]


def top1(ref, cand):
    return float(np.mean(ref.reshape(len(ref), -1).argmax(1) == cand.reshape(len(cand), -1).argmax(1)))


def pixel_argmax(ref, cand):
    return float(np.mean(ref.argmax(-1) == cand.argmax(-1)))


def detection_f1(ref, cand):
    matches = total = 0
    for r, c in zip(ref, cand):
        m, nr, nc = F.detection_agreement(F.yolox_detections(r), F.yolox_detections(c))
        matches += 2 * m
        total += nr + nc
    return matches / total if total else 1.0


def text_map(ref, cand):
    return float(np.mean((ref > 0.3) == (cand > 0.3)))


def ctc_strings(ref, cand):
    def decode(probs):
        best = probs.argmax(-1)
        return [tuple(int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])) for row in best]
    return float(np.mean([a == b for a, b in zip(decode(ref), decode(cand))]))


def cases(names: list[str]) -> list[Case]:
    built = []
    for name in names:
        if name == "cifar10":
            x, _ = F.cifar10(DATA)
            built.append(Case(name, MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx", "modelInput",
                              x[:64], x[64:464], top1))
        elif name == "squeezenet":
            x = F.squeezenet_inputs(DATA, 0, 64 + 400)
            built.append(Case(name, MODELS / "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", "data_0",
                              x[:64], x[64:], top1))
        elif name == "ppocr_cls":
            x, _ = F.text_line_inputs(DATA, 64 + 400)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x",
                              x[:64], x[64:], top1))
        elif name == "yolox":
            x = F.yolox_inputs(DATA, 0, 64 + 200)
            built.append(Case(name, MODELS / "yolox_nano_coco/yolox_nano.onnx", "images", x[:64], x[64:],
                              detection_f1))
        elif name == "deeplab":
            x = F.deeplab_inputs(DATA, 0, 64 + 200)
            built.append(Case(name, MODELS / "deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", "sub_7",
                              x[:64], x[64:], pixel_argmax))
        elif name == "ppocr_det":
            x = F.text_detector_inputs(DATA, 48 + 64, 320)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.onnx", "x",
                              x[:48], x[48:], text_map))
        elif name == "ppocr_rec":
            x, _ = F.text_line_inputs(DATA, 64 + 128, seed=1, width=320)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_PP-OCRv4_rec_infer.onnx", "x",
                              x[:64], x[64:], ctc_strings))
        else:
            raise SystemExit(f"unknown model {name}")
    return built


def edgegraph_tool(spec: str):
    def quantize(case: Case, out: Path) -> dict:
        calib = CalibrationData.from_arrays({case.input: case.calib})
        ctx = PassContext(calibration=calib, verify=VerifyConfig(enabled=False), progress=False)
        model, report = run_pipeline(modelio.load(case.path), parse(spec), ctx)
        modelio.save(model, out)
        return report.passes[-1].stats
    return quantize


def ort_minmax(case: Case, out: Path) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({case.input: x[None]} for x in case.calib)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        source = modelio.load(case.path)
        upgraded = Path(tmp) / "in.onnx"
        modelio.save(upgrade_opset(source, 13) or source, upgraded)
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(upgraded), str(pre))
        except Exception:  # noqa: BLE001 - its symbolic shape inference fails on some paddle graphs
            pre = upgraded
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {}


def run_outputs(path: Path, case: Case) -> np.ndarray:
    proto = onnx.load(str(path))
    sess = runtime.session(proto, threads=0, optimize=True)
    spec = runtime.input_specs(proto)[0]
    batch = runtime.batch_size_for([spec], 16)
    return np.concatenate([sess.run(None, {case.input: case.eval[i:i + batch].astype(spec.dtype)})[0]
                           .astype(np.float32) for i in range(0, len(case.eval), batch)])


def bench(case: Case, tools: dict[str, Callable], folder: Path, rounds: int) -> list[dict]:
    reference = run_outputs(case.path, case)
    half = len(case.eval) // 2
    rows = [{"model": case.name, "tool": "fp32", "path": case.path, "seconds": 0.0}]
    for label, quantize in tools.items():
        out = folder / f"{case.name}_{len(rows)}.onnx"
        start = time.perf_counter()
        try:
            stats = quantize(case, out)
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result
            rows.append({"model": case.name, "tool": label, "error": (str(exc) or type(exc).__name__)[:160]})
            continue
        seconds = time.perf_counter() - start
        cand = run_outputs(out, case)
        rows.append({"model": case.name, "tool": label, "path": out, "seconds": seconds,
                     "A": case.metric(reference[:half], cand[:half]), "B": case.metric(reference[half:], cand[half:]),
                     "sqnr": verify.worst_sqnr_db([{"y": reference}], [{"y": cand}]),
                     "stats": {k: v for k, v in stats.items() if k != "warning"}})
    timed = [r for r in rows if "path" in r]
    feeds = {case.input: case.eval[:1]}
    sessions = {}
    for r in timed:
        proto = onnx.load(str(r["path"]))
        spec = runtime.input_specs(proto)[0]
        sessions[r["tool"]] = (runtime.session(proto, threads=1, optimize=True),
                               {case.input: feeds[case.input].astype(spec.dtype)})
    samples = {r["tool"]: [] for r in timed}
    runs = 20
    for _ in range(rounds):
        for r in timed:
            sess, f = sessions[r["tool"]]
            samples[r["tool"]].append(runtime.latency_ms(sess, f, runs=runs, warmup=2))
    base = statistics.median(samples["fp32"])
    for r in timed:
        r["lat_ms"] = statistics.median(samples[r["tool"]])
        r["lat1"] = r["lat_ms"] / base
    return [{k: v for k, v in r.items() if k != "path"} for r in rows]


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10} {r['tool']:50} ERROR {r['error']}")
        elif r["tool"] == "fp32":
            print(f"{r['model']:10} {'fp32':50} {'':>7} {'':>7} {'':>6} lat {r['lat_ms']:.2f} ms")
        else:
            print(f"{r['model']:10} {r['tool'][:50]:50} A {r['A']:.4f} B {r['B']:.4f} sqnr {r['sqnr']:5.1f} "
                  f"lat1 {r['lat1']:.2f} tool {r['seconds']:6.1f}s  {r['stats'].get('float_nodes', '')}"
                  f"/{r['stats'].get('quantized_nodes', '')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cifar10,squeezenet,ppocr_cls,yolox,deeplab,ppocr_det,ppocr_rec")
    parser.add_argument("--spec", action="append", default=[], help="edgegraph pipeline (repeatable; default quant)")
    parser.add_argument("--ort", action="store_true", help="also onnxruntime quantize_static MinMax")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tools = {spec: edgegraph_tool(spec) for spec in (args.spec or ["quant"])}
    if args.ort:
        tools["ORT MinMax (QUInt8, per channel)"] = ort_minmax
    everything = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.models.split(",")):
            rows = bench(case, tools, Path(tmp), args.rounds)
            print_rows(rows)
            everything += rows
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
