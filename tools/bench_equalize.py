"""What `equalize` buys before per-tensor quantization, on DeepLabV3-MobileNetV2 and the CIFAR-10 CNN.

    /work/.venv/bin/python tools/bench_equalize.py [--images 24] [--calib 32] [--no-static]

Rows: the model as given, then equalized variants, each quantized three ways and compared with the
float model on real images (pixel argmax agreement and logit SQNR for DeepLab on ImageNet-sample
photos; top-1 agreement for CIFAR on the 500 test images):
  - weight-only int8 (int4 for CIFAR), per tensor, symmetric: isolates what equalization targets;
  - the same per channel, the usual alternative to equalization;
  - the static `quant` pass with per-tensor weights (calibrated on other images), when available.
Float latency (median, 1 thread) shows the price of `clip=rescale`'s extra Min ops.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, modelio, runtime
from edgegraph.context import CalibrationData, ImagePreprocess, PassContext, VerifyConfig
from edgegraph.passes.quant import numerics as nq
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEEPLAB = SHARED / "models/deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx"
CIFAR = SHARED / "models/cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx"
VARIANTS = ["cleanup", "cleanup,equalize", "cleanup,equalize(clip=rescale)",
            "cleanup,equalize(clip=rescale, bound_growth=1000)",
            "cleanup,equalize(clip=rescale, absorb_bias=calibration)"]


def fake_quantize_weights(model: ir.Model, qt: str, per_channel: bool) -> ir.Model:
    model = model.copy()
    for node in model.graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul") and isinstance(node.inputs[1], gs.Constant):
            w = np.asarray(node.inputs[1].values)
            axis = 0 if per_channel and node.op == "Conv" else None
            scale, zero = nq.weight_scale_zero_point(w, qt, axis, symmetric=True)
            node.inputs[1] = ir.const(f"{node.inputs[1].name}_fq", nq.fake_quantize(w, scale, zero, qt, axis))
    return model


def run_all(model, samples: list[dict]) -> list[dict]:
    sess = runtime.session(model, optimize=True)
    return [runtime.run(sess, s) for s in samples]


def compare(ref, got, output, axis) -> tuple[float, float]:
    agree = float(np.mean([np.mean(r[output].argmax(axis) == g[output].argmax(axis)) for r, g in zip(ref, got)]))
    sqnr = nq.sqnr_db(np.concatenate([r[output] for r in ref]), np.concatenate([g[output] for g in got]))
    return agree, sqnr


def table(name, original, calib, samples, output, axis, weight_qt, static: bool):
    ctx = PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False))
    ref = run_all(original, samples)
    feeds = samples[0]
    print(f"\n{name}: agreement with float (SQNR dB)\n")
    print(f"| variant | float ms | {weight_qt} weights per tensor | {weight_qt} per channel | "
          f"{'static quant per tensor | ' if static else ''}weight range ratio |")
    print(f"|---|---:|---:|---:|{'---:|' if static else ''}---|")
    for spec in VARIANTS:
        model, report = run_pipeline(original, parse(spec), ctx)
        cells = [f"{runtime.latency_ms(model, feeds, runs=15):.1f}"]
        for per_channel in (False, True):
            agree, sqnr = compare(ref, run_all(fake_quantize_weights(model, weight_qt, per_channel), samples), output, axis)
            cells.append(f"{agree:.4f} ({sqnr:.1f})")
        if static:
            quantized, _ = run_pipeline(model, parse("quant(per_channel=false)"), ctx)
            agree, sqnr = compare(ref, run_all(quantized, samples), output, axis)
            cells.append(f"{agree:.4f} ({sqnr:.1f})")
        stats = next((r.stats for r in report.passes if r.name == "equalize"), {})
        ratio = (f"{stats['range_ratio_before']:.1f} -> {stats['range_ratio_after']:.1f}"
                 if "range_ratio_before" in stats else "-")
        print(f"| {spec} | {' | '.join(cells)} | {ratio} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="DeepLab evaluation images")
    parser.add_argument("--calib", type=int, default=32, help="calibration images (other than the evaluated ones)")
    parser.add_argument("--no-static", action="store_true", help="skip the static quant pass column")
    args = parser.parse_args()
    if not DEEPLAB.exists():
        print(f"{DEEPLAB} not found (the shared models live in ../shared)", file=sys.stderr)
        return 1
    logging.disable(logging.WARNING)
    from edgegraph.registry import list_passes

    static = not args.no_static and "quant" in {p.name for p in list_passes()}
    preprocess = ImagePreprocess(size=(257, 257), resize=None, mean=(1.0,) * 3, std=(1.0,) * 3, scale=1 / 127.5,
                                 layout="NHWC")
    images = CalibrationData.from_images(SHARED / "data/imagenet_sample_256", "sub_7", preprocess)
    calib, evaluation = images.take(args.calib), images.take(args.images, start=200)
    samples = [{"sub_7": evaluation.sample(i)["sub_7"][None]} for i in range(len(evaluation))]
    table("DeepLabV3-MobileNetV2 (ImageNet-sample photos, per-pixel argmax)", modelio.load(DEEPLAB), calib, samples,
          "ResizeBilinear_3", -1, "int8", static)

    data = np.load(SHARED / "data/cifar10_test_subset/cifar10_test_500.npz")["images"]
    x = (data.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2)
    cifar_calib = CalibrationData.from_arrays({"modelInput": x[:100]})
    table("CIFAR-10 CNN (500 test images, top-1)", modelio.load(CIFAR), cifar_calib, [{"modelInput": x}],
          "modelOutput", 1, "int4", static)
    return 0


if __name__ == "__main__":
    sys.exit(main())
