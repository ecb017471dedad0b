"""Benchmark (the lowering half of #13's bench_targets): every lowering on the shared models.

    python tools/bench_lower.py [--targets ort-mobile,openvino,tflite] [--models mnist,...] [--json out.json]
    python tools/bench_lower.py --legalize --targets nnapi,coreml [--interface]

For each of the 15 models in ../shared/models, plus edgegraph's int8 (`cleanup,quant`, 64
calibration inputs) versions of three of them (cifar10, mnist, ppocr_cls), and each target:
`edgegraph.lower` on 4 real inputs (preprocessed per ../shared/models/MANIFEST.md; the reference
input where the manifest stores one), and where it stops:

  converts   the converter made the artifact
  runs       it runs in the target's runtime (onnxruntime / OpenVINO CPU / LiteRT interpreter)
  matches    its outputs match onnxruntime's on the ONNX model: worst-output SQNR >= 40 dB for
             float models, >= 20 dB for Q/DQ models (`edgegraph lower`'s defaults)

With `--legalize`, each float model is first rewritten by `legalize` for the target's profile
(`edgegraph opt M.onnx -p legalize --target <profile>`, dynamic inputs fixed to the reference
input's shapes, verified in onnxruntime), which is what `lower` asks for when the profile refuses
a node ("rewrite them first"); the lowering then gets the legalized model. The int8 models are
then made for the target's profile too (`legalize,cleanup,quant --target <profile>`). The targets
that take legalized ONNX (nnapi, coreml, qnn, ...) legalize as they lower: they get the same fixed
shapes, and with `--interface` legalize's `interface=target,finite=true`.

  converts   (for those: one partition over >= 99% of the nodes after legalize)

Columns: the result per target (`ok` with the worst SQNR and the size of the files written, or the
stage that failed and why) and the seconds the lowering took. Models whose failure needs a
`legalize` rewrite are named in the summary (see the report). Nothing here is timed for speed, so a loaded machine only slows it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgegraph  # noqa: E402
from edgegraph.errors import EdgegraphError, one_line  # noqa: E402
from edgegraph.lowering import LoweringError, SAMPLES  # noqa: E402
from fixtures import quant as data_fixtures  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS, DATA = SHARED / "models", SHARED / "data"
IMAGES = DATA / "misc_images"
TARGETS = ("ort-mobile", "openvino", "tflite")
QUANTIZED = ("cifar10", "mnist", "ppocr_cls")  # edgegraph's int8 versions of these are benchmarked too
CALIB = 64


def _reference(path: str) -> dict:
    with np.load(MODELS / path) as archive:
        return {k.removeprefix("input__"): archive[k] for k in archive.files if k.startswith("input__")}


# name -> (model path, how to get its inputs: () -> {input: N x ... array} | (image folder, preprocess))
CASES = {
    "squeezenet_fp16": ("squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx",
                        lambda n: {"data_0": data_fixtures.squeezenet_inputs(DATA, 0, n)}),
    "mnist": ("mnist_cntk/mnist.onnx", lambda n: {"Input3": data_fixtures.mnist(DATA, n)[0]}),
    "cifar10": ("cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx",
                lambda n: {"modelInput": data_fixtures.cifar10(DATA)[0][:n]}),
    "candy": ("style_transfer_candy/candy.onnx",
              (IMAGES, {"size": (720, 720), "resize": None, "scale": 1.0, "mean": (0.0,) * 3, "std": (1.0,) * 3})),
    "yolox_nano": ("yolox_nano_coco/yolox_nano.onnx", lambda n: {"images": data_fixtures.yolox_inputs(DATA, 0, n)}),
    "person_detector": ("lightweight_person_detector/model.onnx",
                        lambda n: _reference("lightweight_person_detector/model.reference_io.npz")),
    "yunet": ("yunet_face_detection/face_detection_yunet_120x160.onnx",
              lambda n: _reference("yunet_face_detection/face_detection_yunet_120x160.reference_io.npz")),
    "deeplab": ("deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx",
                lambda n: {"sub_7": data_fixtures.deeplab_inputs(DATA, 0, n)}),
    "road_segmentation": ("road_segmentation_adas_0001_tf2onnx/model_float32.onnx",
                          (IMAGES, {"size": (512, 896), "resize": None, "layout": "NHWC", "channels": "BGR",
                                    "scale": 1.0, "mean": (0.0,) * 3, "std": (1.0,) * 3})),
    "agllnet_256": ("agllnet_lowlight_tf2onnx/model_float32_256x256.onnx",
                    (IMAGES, {"resize": None, "scale": 1 / 255, "mean": (0.0,) * 3, "std": (1.0,) * 3})),
    "agllnet_384x512": ("agllnet_lowlight_tf2onnx/model_float32_384x512.onnx",
                        (IMAGES, {"resize": None, "scale": 1 / 255, "mean": (0.0,) * 3, "std": (1.0,) * 3})),
    "ppocr_det": ("ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.onnx",
                  lambda n: _reference("ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.reference_io.npz")),
    "ppocr_rec": ("ppocr_v4_paddle2onnx/ch_PP-OCRv4_rec_infer.onnx",
                  lambda n: _reference("ppocr_v4_paddle2onnx/ch_PP-OCRv4_rec_infer.reference_io.npz")),
    "ppocr_cls": ("ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  lambda n: {"x": data_fixtures.text_line_inputs(DATA, n)[0]}),
    "minilm": ("minilm_l6_v2_int8/model.onnx",
               lambda n: _reference("minilm_l6_v2_int8/model.reference_io.npz")),
}


def inputs(name: str, folder: Path, count: int) -> tuple[str, dict | None]:
    """(what `lower`'s calib is: an .npz path or an image folder, the image preprocessing)."""
    source = CASES[name][1]
    if isinstance(source, tuple):
        return str(source[0]), source[1]
    path = folder / f"{name}_inputs.npz"
    np.savez(path, **source(count))
    return str(path), None


def quantized(name: str, folder: Path, profile: str = "cpu") -> Path:
    """edgegraph's int8 model (`cleanup,quant` on CALIB real inputs) for the target profile
    `profile` (other than cpu: `legalize,cleanup,quant --target profile`, quant's scheme
    from that profile: tflite int8 activations)."""
    path = folder / f"{name}_int8{'' if profile == 'cpu' else '.' + profile}.onnx"
    calib = CASES[name][1](CALIB + SAMPLES)
    train = {k: v[:CALIB] for k, v in calib.items()}
    spec = "cleanup,quant" if profile == "cpu" else "legalize,cleanup,quant"
    proto = edgegraph.optimize(str(MODELS / CASES[name][0]), spec, calib=train, target=profile, timing=False)
    import onnx

    onnx.save(proto, str(path))
    np.savez(folder / f"{name}_int8_inputs.npz", **{k: v[CALIB:] for k, v in calib.items()})
    return path


def legalized(model: Path, target: str, folder: Path) -> Path:
    """`model` rewritten by legalize for the lowering's profile, dynamic inputs fixed to the
    reference input's shapes (tools/bench_legalize.model_inputs) with batch 1 (the lowering runs
    its samples one by one where the batch is fixed); the model itself when legalize changes
    nothing."""
    import onnx

    from edgegraph.lowering import targets

    profile = targets()[target].profile
    result = edgegraph.optimize(str(model), "legalize", target=profile, fix_shapes=fixed_shapes(model), timing=False)
    if result.SerializeToString() == onnx.load(str(model)).SerializeToString():
        return model
    path = folder / f"{model.stem}.legal-{profile}.onnx"
    onnx.save(result, str(path))
    return path


def fixed_shapes(model: Path) -> dict | None:
    """The model's dynamic inputs fixed to the reference input's shapes (tools/bench_legalize.
    model_inputs) with batch 1; None when its inputs are static."""
    import onnx

    from tools.bench_legalize import model_inputs

    proto = onnx.load(str(model), load_external_data=False)
    shapes = {name: [1, *array.shape[1:]] for name, array in model_inputs(model, proto).items()
              if any(not d.dim_value for i in proto.graph.input if i.name == name for d in i.type.tensor_type.shape.dim)}
    return shapes or None


def lower_one(model: Path, target: str, calib: str, preprocess, folder: Path, *, legalize: bool = False,
              interface: bool = False) -> dict:
    from edgegraph.lowering import targets

    suffix = targets()[target].suffix or {"ort-mobile": ".ort", "tflite": ".tflite"}[target]
    out = folder / f"{model.stem}.{target}{suffix}"
    start = time.perf_counter()
    try:
        options, shapes = {}, None
        if legalize and targets()[target].legalizes:  # these legalize as they lower
            shapes = fixed_shapes(model)
            options = {"legalize": "interface=target,finite=true"} if interface else {}
        elif legalize:
            model = legalized(model, target, folder)
        result = edgegraph.lower(str(model), target, out, calib=calib, preprocess=preprocess, fix_shapes=shapes,
                                 options=options)
    except LoweringError as exc:
        return {"stage": exc.stage, "why": one_line(exc), "seconds": time.perf_counter() - start}
    except EdgegraphError as exc:
        return {"stage": "refused", "why": one_line(exc), "seconds": time.perf_counter() - start}
    worst = min(m.sqnr_db for m in result.metrics.values())
    return {"stage": "ok", "sqnr_db": worst, "seconds": time.perf_counter() - start, "notes": result.notes,
            "kb": sum(p.stat().st_size for p in result.outputs) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--models", default=",".join([*CASES, *(f"{q}_int8" for q in QUANTIZED)]))
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--legalize", action="store_true",
                        help="legalize each float model for the target's profile first (see above)")
    parser.add_argument("--interface", action="store_true",
                        help="targets that take legalized ONNX: legalize(interface=target,finite=true)")
    args = parser.parse_args()
    if not MODELS.is_dir():
        raise SystemExit(f"{MODELS} not found: the real models live in ../shared next to the repo")
    targets = args.targets.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lower-") as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            base = name.removesuffix("_int8")
            if name.endswith("_int8"):
                model = quantized(base, folder)
                calib, preprocess = str(folder / f"{base}_int8_inputs.npz"), None
            else:
                model = MODELS / CASES[name][0]
                calib, preprocess = inputs(name, folder, SAMPLES)
            row = {"model": name}
            for target in targets:
                if name.endswith("_int8") and args.legalize:  # quantized for the target's profile
                    from edgegraph.lowering import targets as lowerings

                    try:
                        model = quantized(base, folder, lowerings()[target].profile)
                    except EdgegraphError as exc:  # coreml: no Q/DQ at all (quant refuses, saying why)
                        row[target] = {"stage": "refused", "why": "quant: " + one_line(exc), "seconds": 0.0}
                        print(f"{name:18} {target:10} refused  {row[target]['why'][:200]}", flush=True)
                        continue
                row[target] = lower_one(model, target, calib, preprocess, folder,
                                        legalize=args.legalize and not name.endswith("_int8"), interface=args.interface)
                cell = row[target]
                print(f"{name:18} {target:10} {cell['stage']:8} {cell.get('sqnr_db', float('nan')):7.1f} dB "
                      f"{cell.get('kb', float('nan')):8.0f} KB {cell['seconds']:6.1f}s {cell.get('why', '')[:400]}",
                      flush=True)
            rows.append(row)
    print()
    summary(rows, targets)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")


def summary(rows: list[dict], targets: list[str]) -> None:
    for group, label in ((lambda r: not r["model"].endswith("_int8"), "float"),
                         (lambda r: r["model"].endswith("_int8"), "edgegraph int8")):
        chosen = [r for r in rows if group(r)]
        if not chosen:
            continue
        for target in targets:
            cells = [r[target] for r in chosen]
            converts = sum(c["stage"] in ("run", "match", "ok") for c in cells)
            runs = sum(c["stage"] in ("match", "ok") for c in cells)
            matches = sum(c["stage"] == "ok" for c in cells)
            failed = [f"{r['model']} ({r[target]['stage']})" for r in chosen if r[target]["stage"] != "ok"]
            print(f"{label:15} {target:10} converts {converts}/{len(cells)}  runs {runs}/{len(cells)}  "
                  f"matches {matches}/{len(cells)}" + (f"   not: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
