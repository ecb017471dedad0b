"""Benchmark: edgegraph `quant` vs onnxruntime.quantization.quantize_static on real models and data.

    /work/.venv/bin/python tools/bench_quant.py [--models cifar10,mnist,...] [--eval N] [--tool-runs N] [--json out.json]

For each model: 64 calibration inputs and a disjoint evaluation set built from ../shared/data
(preprocessing per ../shared/models/MANIFEST.md). Every tool quantizes the same fp32 model with
the same calibration inputs; then, in one process and one run:

  tool s     wall time of the quantization call (ORT: incl. quant_pre_process and, for models
             below opset 13, the opset-13 upgrade its per-channel QDQ needs to be valid); the
             median of --tool-runs runs (single runs vary by +-30% on a loaded 2-core machine)
  size       file size / fp32 file size (for the float16 SqueezeNet: / the size of its float32
             version, so 0.5 would mean "as big as the float16 input")
  lat1/latN  median latency / the input model's median latency (float16 for SqueezeNet), ORT full
             optimizations, 1 thread / all threads; rounds interleave the tools
  agree      agreement with the fp32 model on the evaluation set, computed from outputs of
             sessions with full ORT optimizations (the integer kernels users run):
               classifiers    top-1 agreement
               deeplab        per-pixel argmax agreement
               yolox          detection F1 vs fp32: decoded boxes (score >= 0.3, NMS 0.45),
                              matched one-to-one by class and IoU >= 0.5; 2*matches/(n_fp32+n_q).
                              (YOLOX-nano loses most of its score precision in 8 bits with either
                              tool, so this number swings with small changes; see the report.)
               ppocr cls      top-1 agreement (0 vs 180 degrees) on text-line crops

ORT settings: QuantFormat.QDQ, per_channel=True, activations QUInt8, weights QInt8 (its
defaults), CalibrationMethod.MinMax and .Entropy, on the quant_pre_process output.
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

from edgegraph import modelio, runtime  # noqa: E402
from edgegraph.context import CalibrationData, PassContext, VerifyConfig  # noqa: E402
from edgegraph.passes.quant.prepare import upgrade_opset  # noqa: E402
from edgegraph.pipeline import run_pipeline  # noqa: E402
from edgegraph.registry import list_passes  # noqa: E402
from edgegraph.spec import parse  # noqa: E402
from fixtures import quant as data_fixtures  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS, DATA = SHARED / "models", SHARED / "data"
CALIB = 64


@dataclass
class Case:
    name: str
    path: Path
    input: str
    calib: np.ndarray
    eval: np.ndarray
    metric: Callable[[np.ndarray, np.ndarray], float]  # (fp32 outputs, candidate outputs) -> agreement


def top1(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    return float(np.mean(ref.argmax(1) == cand.argmax(1)))


def pixel_argmax(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.mean(ref.argmax(-1) == cand.argmax(-1)))


def detection_f1(ref: np.ndarray, cand: np.ndarray) -> float:
    matches = total = 0
    for r, c in zip(ref, cand):
        m, nr, nc = data_fixtures.detection_agreement(data_fixtures.yolox_detections(r),
                                                      data_fixtures.yolox_detections(c))
        matches += 2 * m
        total += nr + nc
    return matches / total if total else 1.0


def cases(names: list[str], n_eval: int) -> list[Case]:
    built = []
    for name in names:
        if name == "cifar10":
            x, _ = data_fixtures.cifar10(DATA)
            built.append(Case(name, MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx", "modelInput",
                              x[:CALIB], x[CALIB:CALIB + n_eval * 2], top1))
        elif name == "mnist":
            x, _ = data_fixtures.mnist(DATA, CALIB + n_eval * 4)
            built.append(Case(name, MODELS / "mnist_cntk/mnist.onnx", "Input3", x[:CALIB], x[CALIB:], top1))
        elif name == "squeezenet_fp16":
            x = data_fixtures.squeezenet_inputs(DATA, 0, CALIB + n_eval)
            built.append(Case(name, MODELS / "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", "data_0",
                              x[:CALIB], x[CALIB:], top1))
        elif name == "ppocr_cls":
            x, _ = data_fixtures.text_line_inputs(DATA, CALIB + n_eval)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x",
                              x[:CALIB], x[CALIB:], top1))
        elif name == "yolox_nano":
            x = data_fixtures.yolox_inputs(DATA, 0, CALIB + n_eval // 2)
            built.append(Case(name, MODELS / "yolox_nano_coco/yolox_nano.onnx", "images", x[:CALIB], x[CALIB:],
                              detection_f1))
        elif name == "deeplab":
            x = data_fixtures.deeplab_inputs(DATA, 0, CALIB + n_eval // 2)
            built.append(Case(name, MODELS / "deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", "sub_7",
                              x[:CALIB], x[CALIB:], pixel_argmax))
        else:
            raise SystemExit(f"unknown model {name}")
    return built


# ---------------------------------------------------------------------------------------------
# Tools


def edgegraph_tool(spec: str):
    def quantize(case: Case, out: Path) -> None:
        calib = CalibrationData.from_arrays({case.input: case.calib})
        ctx = PassContext(calibration=calib, verify=VerifyConfig(enabled=False), progress=False)
        model, report = run_pipeline(modelio.load(case.path), parse(spec), ctx)
        modelio.save(model, out)
        quantize.report = report
    return quantize


def ort_tool(method: str):
    def quantize(case: Case, out: Path) -> None:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter({case.input: x[None]} for x in case.calib)

            def get_next(self):
                return next(self.items, None)

        with tempfile.TemporaryDirectory() as tmp:
            # ORT writes per-channel DequantizeLinear (opset 13) into older models, which makes them
            # invalid, so it gets an opset-13 model: converted by onnx, with edgegraph's fix for
            # onnx's Upsample -> Resize conversion (without it DeepLab loses ~3% agreement).
            source = modelio.load(case.path)
            upgraded = Path(tmp) / "in.onnx"
            modelio.save(upgrade_opset(source, 13) or source, upgraded)
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(upgraded), str(pre))
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=getattr(CalibrationMethod, method))
    return quantize


def tools() -> dict[str, Callable]:
    found = {
        "edgegraph quant": edgegraph_tool("quant"),
        "ORT MinMax": ort_tool("MinMax"),
        "ORT Entropy": ort_tool("Entropy"),
    }
    if any(p.name == "equalize" for p in list_passes()):
        found["edgegraph equalize+quant"] = edgegraph_tool("equalize,quant")
    return found


# ---------------------------------------------------------------------------------------------
# Measurements


def outputs(path: Path, case: Case) -> np.ndarray:
    proto = onnx.load(str(path))
    sess = runtime.session(proto, threads=0, optimize=True)
    spec = runtime.input_specs(proto)[0]
    batch = runtime.batch_size_for([spec], 16)
    results = []
    for start in range(0, len(case.eval), batch):
        x = case.eval[start:start + batch].astype(spec.dtype)
        results.append(sess.run(None, {case.input: x})[0].astype(np.float32))
    return np.concatenate(results)


def latency(path: Path, case: Case, threads: int, runs: int) -> float:
    proto = onnx.load(str(path))
    spec = runtime.input_specs(proto)[0]
    feeds = {case.input: case.eval[:1].astype(spec.dtype)}
    return runtime.latency_ms(proto, feeds, runs=runs, warmup=3, threads=threads)


def fp32_size(path: Path) -> int:
    """Bytes of the model with float32 weights (a float16 input model is measured as if float32)."""
    from edgegraph.passes.quant.prepare import compute_in_float32

    model = modelio.load(path)
    if not compute_in_float32(model):
        return path.stat().st_size
    return len(model.to_proto().SerializeToString())


def bench(case: Case, tool_set: dict[str, Callable], folder: Path, rounds: int, tool_runs: int = 1) -> list[dict]:
    reference = outputs(case.path, case)
    base_size = fp32_size(case.path)
    rows = {"fp32": {"model": case.name, "tool": "fp32 (input)", "seconds": 0.0, "path": case.path}}
    for label, quantize in tool_set.items():
        out = folder / f"{case.name}_{label.replace(' ', '_').replace('+', '_')}.onnx"
        seconds = []
        try:
            for _ in range(tool_runs):
                start = time.perf_counter()
                quantize(case, out)
                seconds.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash
            rows[label] = {"model": case.name, "tool": label, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            continue
        rows[label] = {"model": case.name, "tool": label, "seconds": statistics.median(seconds), "path": out}
        try:
            rows[label]["agree"] = case.metric(reference, outputs(out, case))
        except Exception as exc:  # noqa: BLE001
            rows[label]["error"] = f"does not run: {str(exc).splitlines()[0][:120]}"
        report = getattr(quantize, "report", None)
        if report is not None:
            stats = report.passes[-1].stats
            rows[label]["float_nodes"] = stats.get("float_nodes")
    runs = 40 if base_size < 1e6 else 20
    timed = [r for r in rows.values() if "path" in r and "error" not in r]
    for threads, key in ((1, "lat1"), (0, "latN")):
        samples = {r["tool"]: [] for r in timed}
        for _ in range(rounds):  # interleaved rounds: background load hits every tool alike
            for r in timed:
                samples[r["tool"]].append(latency(r["path"], case, threads, runs))
        for r in timed:
            r[key + "_ms"] = statistics.median(samples[r["tool"]])
    base = rows["fp32"]
    for r in timed:
        r["size"] = Path(r["path"]).stat().st_size / base_size
        r["lat1"] = r["lat1_ms"] / base["lat1_ms"]
        r["latN"] = r["latN_ms"] / base["latN_ms"]
    return [{k: v for k, v in r.items() if k != "path"} for r in rows.values()]


def print_table(rows: list[dict]) -> None:
    header = f"{'model':16} {'tool':40} {'tool s':>7} {'size':>6} {'lat1':>6} {'latN':>6} {'agree':>7}  (fp32 ms 1t/Nt)"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:16} {r['tool']:40} ERROR {r['error']}")
            continue
        extra = f"  ({r['lat1_ms']:.2f}/{r['latN_ms']:.2f})" if r["tool"].startswith("fp32") else ""
        agree = f"{r['agree']:.4f}" if "agree" in r else "-"
        print(f"{r['model']:16} {r['tool']:40} {r['seconds']:7.2f} {r['size']:6.3f} {r['lat1']:6.3f} "
              f"{r['latN']:6.3f} {agree:>7}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="squeezenet_fp16,cifar10,mnist,ppocr_cls,yolox_nano,deeplab")
    parser.add_argument("--tools", default="", help="semicolon-separated subset of tool labels")
    parser.add_argument("--eval", type=int, default=200, help="evaluation samples (detectors/segmenters: half)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--tool-runs", type=int, default=1, help="runs of each tool (its time is their median)")
    parser.add_argument("--spec", action="append", default=[], help="extra edgegraph pipeline to compare (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not MODELS.is_dir():
        raise SystemExit(f"{MODELS} not found: the benchmark needs ../shared next to the repo")
    tool_set = tools()
    if args.tools:
        wanted = [t.strip() for t in args.tools.split(";")]
        tool_set = {k: v for k, v in tool_set.items() if k in wanted}
    for spec in args.spec:
        tool_set[f"edgegraph {spec}"] = edgegraph_tool(spec)
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.models.split(","), args.eval):
            rows = bench(case, tool_set, Path(tmp), args.rounds, args.tool_runs)
            print_table(rows)
            print(flush=True)
            all_rows.extend(rows)
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2, default=str))


if __name__ == "__main__":
    main()
