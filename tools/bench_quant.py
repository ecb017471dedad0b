"""Benchmark: edgegraph `cleanup,quant` beside every ONNX post-training quantizer, on real models.

    python tools/bench_quant.py [--models squeezenet,deeplab,...] [--eval N] [--rounds R] [--json out.json]
                                [--peer-venvs /work/venvs] [--tools "edgegraph;ORT MinMax;..."]

Fairness, for every model:
  * one fp32 model at opset 13 for every tool, edgegraph included: the shared model with float16
    weights and I/O turned into float32 (SqueezeNet), unnamed nodes named (INC and NNCF's bias
    correction fail without), the opset raised by onnx's converter with
    edgegraph's Upsample fix (`edgegraph.convert.upgrade_opset`: Resize keeps Upsample's
    asymmetric coordinates), text models fixed to one input shape; the bench checks that this
    model's outputs equal the shared file's (float32: within 1e-4 of the largest output value;
    float16: same top-1 on every sample) and stops if not;
  * the same 64 calibration samples for every tool, and two disjoint held-out splits (A, B) that
    no tool saw, both reported: a margin that flips between splits is no margin;
  * every quantized model evaluated by the same code, in onnxruntime with full optimizations (the
    integer kernels users run).

Tools:
  edgegraph              `cleanup,quant` with defaults, as `edgegraph opt` runs it (verification on)
  edgegraph floor        the same with `--min-agreement` (classifiers only: a top-1 floor)
  edgegraph PASSES       each `--spec PASSES` (e.g. `cleanup,quant(weight_rounding=gram)`): variants of quant
  ORT MinMax/Percentile  quantize_static on quant_pre_process's output: QDQ, per-channel int8
                         weights, QUInt8 activations (onnxruntime fuses those into integer kernels;
                         its signed-int8 default leaves most convs unfused)
  ORT Entropy            the same with Entropy calibration over 2048 histogram bins (its default 128
                         bins leave one candidate threshold: MinMax again); dropped as a duplicate
                         when its activation scales equal MinMax's anyway
  NNCF, INC, AIMET       optional peers in their own venvs (`tools/bench_quant_peer.py` has the
                         commands), run as child processes that write their quantized model; a
                         peer whose venv or package is missing is listed as absent

Columns (per tool; ratios are to the fp32 model above):
  tool s      wall time of the quantization (peers: their call, without interpreter start-up)
  size        file size (with external data) / fp32 file size; AIMET's Q/DQ export keeps float
              weights behind QuantizeLinear (onnxruntime folds them to int8 when it loads the model)
  lat1, latN  median latency / fp32's, 1 thread and all threads; rounds interleave the models
  int/flt     nodes onnxruntime runs as integer kernels (QLinear*, QGemm, ConvInteger,
              MatMulInteger, ...) / Conv, MatMul and Gemm nodes it still runs in float, counted in
              the graph it optimizes (`SessionOptions.optimized_model_filepath`)
  A, B        the task metric vs fp32 on each held-out split:
                classifiers   top-1 agreement
                deeplab       argmax agreement on the pixels fp32 labels foreground (not class 0)
                yolox         detection F1 vs fp32 (score >= 0.3, NMS 0.45, IoU >= 0.5 same class)
                ppocr_det     output cosine (text-probability map, 1x3x320x320 crops of real text)
                ppocr_rec     share of recognised strings unchanged (CTC greedy decode with the
                              model's own dictionary, on text lines rendered with Pillow)
  dB A, dB B  worst-output SQNR on each split
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgegraph import api, ir, modelio, runtime, stats, verify  # noqa: E402
from edgegraph.context import CalibrationData  # noqa: E402
from edgegraph.convert import compute_in_float32, upgrade_opset  # noqa: E402
from fixtures import quant as data_fixtures  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS, DATA = SHARED / "models", SHARED / "data"
CALIB = 64
PEER_SCRIPT = REPO / "tools" / "bench_quant_peer.py"
# Tool labels of the peers -> (venv folder name, tool, variant) for bench_quant_peer.py.
PEERS = {
    "NNCF default": ("quant-peer-nncf", "nncf", "default"),
    "NNCF MIXED": ("quant-peer-nncf", "nncf", "mixed"),
    "NNCF no fast BC": ("quant-peer-nncf", "nncf", "bias_correction"),
    "INC": ("quant-peer-inc", "inc", "default"),
    "AIMET default": ("quant-peer-aimet", "aimet", "default"),
    "AIMET CLE": ("quant-peer-aimet", "aimet", "cle"),
    "AIMET AdaRound": ("quant-peer-aimet", "aimet", "adaround"),
}
INTEGER_OPS = {"QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QAttention", "DynamicQuantizeLSTM"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


@dataclass
class Case:
    name: str
    source: Path
    input: str
    calib: np.ndarray
    splits: tuple[np.ndarray, np.ndarray]
    metric: Callable[[np.ndarray, np.ndarray], float]  # (fp32 first output, candidate's) -> agreement
    metric_name: str
    shape: tuple[int, ...] | None = None  # fixed input shape for the fp32 model (dynamic text models)
    classifier: bool = False
    model: Path = field(default=None)  # the prepared fp32 opset-13 model every tool gets


# ---------------------------------------------------------------------------------------------
# Task metrics


def top1(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    return float(np.mean(ref.argmax(1) == cand.argmax(1)))


def foreground_pixels(ref: np.ndarray, cand: np.ndarray) -> float:
    """Argmax agreement on the pixels the fp32 model does not call background (class 0): on
    ImageNet photos most pixels are background, which would hide errors on the objects."""
    labels = ref.argmax(-1)
    mask = labels != 0
    return float(np.mean(labels[mask] == cand.argmax(-1)[mask])) if mask.any() else 1.0


def detection_f1(ref: np.ndarray, cand: np.ndarray) -> float:
    matches = total = 0
    for r, c in zip(ref, cand):
        m, nr, nc = data_fixtures.detection_agreement(data_fixtures.yolox_detections(r),
                                                      data_fixtures.yolox_detections(c))
        matches += 2 * m
        total += nr + nc
    return matches / total if total else 1.0


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    return verify.compare("out", ref, cand, scores=False).cosine


class CtcStrings:
    """Strings unchanged under CTC greedy decoding with the recogniser's own dictionary
    (metadata_props["character"]; index 0 is CTC's blank, the last one a space)."""

    def __init__(self, model_path: Path):
        props = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
        self.chars = [""] + props["character"].splitlines() + [" "]

    def decode(self, probs: np.ndarray) -> list[str]:
        texts = []
        for seq in probs.argmax(-1):
            keep = np.concatenate([[True], seq[1:] != seq[:-1]]) & (seq != 0)
            texts.append("".join(self.chars[i] if i < len(self.chars) else "?" for i in seq[keep]))
        return texts

    def __call__(self, ref: np.ndarray, cand: np.ndarray) -> float:
        return float(np.mean([a == b for a, b in zip(self.decode(ref), self.decode(cand))]))


# ---------------------------------------------------------------------------------------------
# Data


WORDS = ("the quick brown fox jumps over lazy dog model graph edge int8 float quant onnx runtime "
         "kernel latency speed 2026 12 01 0.9375 tensor scale zero point calibration held out split "
         "Total Price No. Date Name Road Street Invoice PAID 100% $42.50 Tel +49 Berlin Paris OCR").split()


def rendered_text_lines(count: int, seed: int, height: int = 48, width: int = 320) -> np.ndarray:
    """Text lines drawn with Pillow's bundled font, as PP-OCR's recogniser expects them: 2-5 words
    of mixed case, digits and signs, random size, grey levels and a little noise, resized to
    `height` keeping the aspect ratio (at most `width`), x/127.5 - 1, right-padded with 0."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    lines = np.zeros((count, 3, height, width), np.float32)
    for i in range(count):
        text = " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))
        font = ImageFont.load_default(size=int(rng.integers(24, 40)))
        left, top, right, bottom = font.getbbox(text)
        bg, fg = (int(v) for v in (rng.integers(170, 256), rng.integers(0, 90)))
        if rng.random() < 0.3:
            bg, fg = fg, bg  # light text on dark
        img = Image.new("RGB", (right - left + 16, bottom - top + 12), (bg,) * 3)
        ImageDraw.Draw(img).text((8 - left, 6 - top), text, font=font, fill=(fg,) * 3)
        w = min(width, max(8, round(img.width * height / img.height)))
        pixels = np.asarray(img.resize((w, height), Image.BILINEAR), np.float32)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255)
        lines[i, :, :, :w] = pixels.transpose(2, 0, 1) / 127.5 - 1.0
    return lines


def split(x: np.ndarray, n: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    if len(x) < CALIB + 2 * n:
        raise SystemExit(f"only {len(x)} samples for {CALIB} calibration + 2 x {n} held out")
    return x[:CALIB], (x[CALIB:CALIB + n], x[CALIB + n:CALIB + 2 * n])


ALL_MODELS = ("squeezenet", "deeplab", "cifar10", "ppocr_cls", "yolox_nano", "ppocr_det", "ppocr_rec")


def cases(names: list[str], n_eval: int) -> list[Case]:
    """n_eval held-out samples per split for classifiers; half for the dense models."""
    dense = max(8, n_eval // 2)
    built = []
    for name in names:
        if name == "squeezenet":
            x = data_fixtures.squeezenet_inputs(DATA, 0, CALIB + 2 * n_eval).astype(np.float32)
            built.append(Case(name, MODELS / "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", "data_0",
                              *split(x, n_eval), top1, "top-1 agreement", classifier=True))
        elif name == "cifar10":
            x, _ = data_fixtures.cifar10(DATA)
            built.append(Case(name, MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx", "modelInput",
                              *split(x, n_eval), top1, "top-1 agreement", classifier=True))
        elif name == "mnist":  # (pruning's bench only: no quantizer is compared on it)
            x, _ = data_fixtures.mnist(DATA, CALIB + 2 * n_eval)
            built.append(Case(name, MODELS / "mnist_cntk/mnist.onnx", "Input3", *split(x, n_eval), top1,
                              "top-1 agreement", classifier=True))
        elif name == "ppocr_cls":
            x, _ = data_fixtures.text_line_inputs(DATA, CALIB + 2 * n_eval)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x",
                              *split(x, n_eval), top1, "top-1 agreement", shape=(1, 3, 48, 192), classifier=True))
        elif name == "yolox_nano":
            x = data_fixtures.yolox_inputs(DATA, 0, CALIB + 2 * dense)
            built.append(Case(name, MODELS / "yolox_nano_coco/yolox_nano.onnx", "images", *split(x, dense),
                              detection_f1, "detection F1"))
        elif name == "deeplab":
            x = data_fixtures.deeplab_inputs(DATA, 0, CALIB + 2 * dense).astype(np.float32)
            built.append(Case(name, MODELS / "deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", "sub_7",
                              *split(x, dense), foreground_pixels, "foreground pixel agreement"))
        elif name == "ppocr_det":
            n = max(8, n_eval // 6)
            x = data_fixtures.text_detector_inputs(DATA, CALIB + 2 * n, size=320)
            built.append(Case(name, MODELS / "ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.onnx", "x", *split(x, n),
                              cosine, "output cosine", shape=(1, 3, 320, 320)))
        elif name == "ppocr_rec":
            path = MODELS / "ppocr_v4_paddle2onnx/ch_PP-OCRv4_rec_infer.onnx"
            x = rendered_text_lines(CALIB + 2 * dense, seed=0)
            built.append(Case(name, path, "x", *split(x, dense), CtcStrings(path), "strings unchanged",
                              shape=(1, 3, 48, 320)))
        else:
            raise SystemExit(f"unknown model {name} (models: {', '.join(ALL_MODELS)})")
    return built


# ---------------------------------------------------------------------------------------------
# The one fp32 opset-13 model every tool gets


def float32_interface(model: ir.Model) -> None:
    """After `compute_in_float32` (float32 inside, float16 I/O behind Casts): drop the boundary
    Casts so that the inputs and outputs are float32 too, under their original names."""
    graph = model.graph
    for node in [n for n in graph.nodes if n.op == "Cast"]:
        source, result = node.inputs[0], node.outputs[0]
        inputs = [i for i, t in enumerate(graph.inputs) if t is source]
        outputs = [i for i, t in enumerate(graph.outputs) if t is result]
        if inputs:
            node.inputs.clear(), node.outputs.clear()
            result.name = source.name
            graph.inputs[inputs[0]] = result
        elif outputs:
            node.inputs.clear(), node.outputs.clear()
            source.name = result.name
            graph.outputs[outputs[0]] = source
    graph.cleanup().toposort()


def prepare(case: Case, folder: Path) -> str:
    """Write the fp32 opset-13 model for `case` and check it against the shared file."""
    model = modelio.load(case.source)
    was_fp16 = compute_in_float32(model)
    if was_fp16:
        float32_interface(model)
    if case.shape:
        ir.fix_input_shapes(model, {case.input: case.shape})
    # Unique node names (onnx-caffe2's SqueezeNet has none): INC and NNCF's bias correction fail
    # on unnamed nodes, and names change no output.
    namer, seen = ir.Namer(model.graph), set()
    for node in model.graph.nodes:
        if not node.name or node.name in seen:
            node.name = namer(node.op)
        seen.add(node.name)
    opset = model.opset
    model = upgrade_opset(model, 13)
    if model is None:
        raise SystemExit(f"{case.name}: onnx cannot convert the model to opset 13")
    case.model = folder / f"{case.name}_fp32.onnx"
    modelio.save(model, case.model)
    sample = case.splits[0][:8]
    source_dtype = runtime.input_specs(onnx.load(str(case.source), load_external_data=False))[0].dtype
    ref = first_output(case.source, case.input, sample.astype(source_dtype), optimize=False)
    got = first_output(case.model, case.input, sample, optimize=False)
    if was_fp16:
        same = top1(ref, got) == 1.0
        detail = f"float16 -> float32 weights and I/O, top-1 identical on {len(sample)} samples"
    else:
        diff = float(np.abs(ref - got).max())
        same = diff <= 1e-4 * float(np.abs(ref).max())
        detail = f"max |diff| {diff:.2e} on {len(sample)} samples"
    if not same:
        raise SystemExit(f"{case.name}: the prepared fp32 model's outputs differ from the original ({detail})")
    return f"opset {opset} -> 13{', shape ' + 'x'.join(map(str, case.shape)) if case.shape else ''}; {detail}"


def first_output(path: Path, name: str, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    sess = runtime.session(path, threads=0, optimize=optimize)
    batch = runtime.batch_size_for(runtime.input_specs(sess), 16)
    first = sess.get_outputs()[0].name
    return np.concatenate([sess.run([first], {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------------------------
# Tools: each quantizes case.model into `out` and returns its own time in seconds


def edgegraph_tool(passes: str = "cleanup,quant", min_agreement: float | None = None):
    def quantize(case: Case, out: Path, folder: Path) -> float:
        if min_agreement is not None and not case.classifier:
            raise NotApplicable("a top-1 floor needs class scores")
        start = time.perf_counter()
        proto = api.optimize(case.model, passes, calib={case.input: case.calib}, min_agreement=min_agreement)
        seconds = time.perf_counter() - start
        modelio.save(proto, out)
        return seconds
    return quantize


class NotApplicable(Exception):
    pass


class Absent(Exception):
    pass


def ort_tool(method: str):
    def quantize(case: Case, out: Path, folder: Path) -> float:
        import importlib

        # (the package's `quantize` function shadows its `quantize` module as an attribute)
        ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter({case.input: x[None]} for x in case.calib)

            def get_next(self):
                return next(self.items, None)

        start = time.perf_counter()
        pre = folder / f"{case.name}_ort_pre.onnx"
        # Where its symbolic shape inference stops short, ORT saves what it got as
        # sym_shape_infer_temp.onnx in the working directory: let that be the scratch folder.
        with contextlib.chdir(folder):
            try:
                quant_pre_process(str(case.model), str(pre))
            except AssertionError:  # its symbolic shape inference fails on some graphs (PP-OCR cls:
                # a Concat of shapes); ORT's own advice is to skip that step then
                quant_pre_process(str(case.model), str(pre), skip_symbolic_shape=True)
        original = ort_quantize.create_calibrator
        if method == "Entropy":
            # quantize_static passes no bin count through to the calibrator, and with its default
            # (128 bins, 128 quantized bins) the entropy search has one candidate: the full range,
            # i.e. MinMax. 2048 bins is what TensorRT's entropy calibration (which this follows) uses.
            def with_bins(*args, extra_options=None, **kwargs):
                options = {**(extra_options or {}), "num_bins": 2048, "num_quantized_bins": 128}
                return original(*args, extra_options=options, **kwargs)
            ort_quantize.create_calibrator = with_bins
        try:
            with contextlib.redirect_stdout(sys.stderr):  # (its calibrators print progress to stdout)
                ort_quantize.quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                             activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                             calibrate_method=getattr(CalibrationMethod, method))
        finally:
            ort_quantize.create_calibrator = original
        return time.perf_counter() - start
    return quantize


def peer_tool(label: str, venvs: Path, timeout: float):
    venv, tool, variant = PEERS[label]

    def quantize(case: Case, out: Path, folder: Path) -> float:
        python = venvs / venv / "bin" / "python"
        if not python.exists():
            raise Absent(f"no venv {venvs / venv} (see tools/bench_quant_peer.py)")
        calib = folder / f"{case.name}_calib.npz"
        if not calib.exists():
            np.savez(calib, **{case.input: case.calib})
        try:
            done = subprocess.run([str(python), str(PEER_SCRIPT), tool, variant, str(case.model), str(calib), str(out)],
                                  capture_output=True, text=True, timeout=timeout, cwd=folder)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"no result after {timeout:.0f} s") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no message)"]
            if "ModuleNotFoundError" in last[0] or "ImportError" in last[0]:
                raise Absent(last[0][:160])
            raise RuntimeError(f"exit {done.returncode}: {last[0][:200]}")
        return json.loads(lines[-1])["seconds"]
    return quantize


def tools(args) -> dict[str, Callable]:
    found = {
        "edgegraph": edgegraph_tool(),
        f"edgegraph --min-agreement {args.min_agreement:g}": edgegraph_tool(min_agreement=args.min_agreement),
        **{f"edgegraph {spec}": edgegraph_tool(spec) for spec in args.spec},
        "ORT MinMax": ort_tool("MinMax"),
        "ORT Percentile": ort_tool("Percentile"),
        "ORT Entropy 2048": ort_tool("Entropy"),
    }
    found.update({label: peer_tool(label, args.peer_venvs, args.peer_timeout) for label in PEERS})
    if args.tools:
        wanted = [t.strip() for t in args.tools.split(";")]
        found = {k: v for k, v in found.items() if any(k == w or k.startswith(w + " ") for w in wanted)}
    return found


# ---------------------------------------------------------------------------------------------
# Measurements


def kernel_counts(path: Path, folder: Path) -> tuple[int, int]:
    """(integer-kernel nodes, float Conv/MatMul/Gemm nodes) in the graph onnxruntime runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 4
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    integer = sum(1 for op in ops if "QLinear" in op or op in INTEGER_OPS)
    return integer, sum(1 for op in ops if op in FLOAT_COMPUTE_OPS)


def scale_values(path: Path) -> np.ndarray:
    """Every activation scale of a Q/DQ model (QuantizeLinear scales), in node order."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return np.array([float(inits[n.input[1]].ravel()[0]) for n in model.graph.node
                     if n.op_type == "QuantizeLinear" and n.input[1] in inits])


def evaluate(case: Case, path: Path, reference: list[list[dict]]) -> dict:
    """Task metric and worst-output SQNR on each split, vs the fp32 outputs `reference`."""
    result = {}
    for key, x, ref in zip("AB", case.splits, reference):
        got = stats.model_outputs(path, CalibrationData.from_arrays({case.input: x}))
        first = next(iter(ref[0]))
        result[f"agree_{key}"] = case.metric(np.concatenate([r[first] for r in ref]),
                                             np.concatenate([g[first] for g in got]))
        result[f"sqnr_{key}"] = verify.worst_sqnr_db(ref, got)
    return result


def bench(case: Case, tool_set: dict[str, Callable], folder: Path, rounds: int) -> list[dict]:
    reference = [stats.model_outputs(case.model, CalibrationData.from_arrays({case.input: x})) for x in case.splits]
    rows = [{"model": case.name, "tool": "fp32", "path": case.model, "seconds": 0.0}]
    for label, quantize in tool_set.items():
        out = folder / f"{case.name}_{''.join(c if c.isalnum() else '_' for c in label)}.onnx"
        row = {"model": case.name, "tool": label}
        rows.append(row)
        try:
            row["seconds"] = quantize(case, out, folder)
        except NotApplicable as exc:
            row["skipped"] = str(exc)
            continue
        except Absent as exc:
            row["absent"] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            continue
        row["path"] = out
        print(f"  {case.name}: {label} done in {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    entropy = next((r for r in rows if r["tool"].startswith("ORT Entropy") and "path" in r), None)
    minmax = next((r for r in rows if r["tool"] == "ORT MinMax" and "path" in r), None)
    if entropy and minmax:
        a, b = scale_values(entropy["path"]), scale_values(minmax["path"])
        if a.shape == b.shape and np.allclose(a, b, rtol=1e-6):
            entropy["skipped"] = "activation scales identical to ORT MinMax's: a duplicate baseline"
            del entropy["path"]
        else:
            entropy["scales_differ"] = float(np.mean(~np.isclose(a, b, rtol=1e-6))) if a.shape == b.shape else 1.0
    for row in rows:
        if "path" not in row:
            continue
        try:
            row.update(evaluate(case, row["path"], reference))
            row["int_nodes"], row["float_nodes"] = kernel_counts(row["path"], folder)
            row["size"] = stats.disk_size(row["path"])  # with external data (INC writes some)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"does not run: {str(exc).splitlines()[0][:160]}"
            del row["path"]
    timed = [r for r in rows if "path" in r]
    feeds = [{case.input: case.splits[0][:1]}] * len(timed)
    for threads, key in ((1, "lat1_ms"), (0, "latN_ms")):
        results = stats.measure_latency([r["path"] for r in timed], feeds, threads=threads, rounds=rounds, runs=30)
        for r, (ms, _) in zip(timed, results):
            r[key] = ms
    return [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]


def print_table(case: Case, rows: list[dict], note: str) -> None:
    base = rows[0]
    print(f"{case.name}: {case.metric_name} (A, B: held-out splits of {len(case.splits[0])} each; "
          f"{CALIB} calibration samples); fp32 {base['lat1_ms']:.2f} ms 1 thread, {base['latN_ms']:.2f} ms all; "
          f"{base['size'] / 1e6:.2f} MB; {note}")
    width = max(32, *(len(r["tool"]) for r in rows))
    header = (f"  {'tool':{width}} {'tool s':>7} {'size':>6} {'lat1':>6} {'latN':>6} {'int/flt':>8} "
              f"{'A':>7} {'B':>7} {'dB A':>6} {'dB B':>6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in rows:
        if "path" not in r:
            why = r.get("absent") and f"absent: {r['absent']}" or r.get("skipped") or f"ERROR {r.get('error')}"
            print(f"  {r['tool']:{width}} {why}")
            continue
        print(f"  {r['tool']:{width}} {r['seconds']:7.1f} {r['size'] / base['size']:6.3f} "
              f"{r['lat1_ms'] / base['lat1_ms']:6.2f} {r['latN_ms'] / base['latN_ms']:6.2f} "
              f"{r['int_nodes']:>4}/{r['float_nodes']:<3} {r['agree_A']:7.4f} {r['agree_B']:7.4f} "
              f"{r['sqnr_A']:6.1f} {r['sqnr_B']:6.1f}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    parser.add_argument("--tools", default="", help="semicolon-separated tool labels (or their first words: 'NNCF')")
    parser.add_argument("--eval", type=int, default=200,
                        help="held-out samples per split for classifiers (dense models: half, ppocr_det: a sixth)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--min-agreement", type=float, default=0.99, help="floor of the second edgegraph row")
    parser.add_argument("--spec", action="append", default=[], metavar="PASSES",
                        help="one more edgegraph row running these passes, e.g. 'cleanup,quant(weight_rounding=gram)' "
                             "(repeatable)")
    parser.add_argument("--peer-venvs", type=Path, default=Path("/work/venvs"),
                        help="folder holding quant-peer-nncf, quant-peer-inc, quant-peer-aimet")
    parser.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer run")
    parser.add_argument("--json", type=Path, help="write every row (raw numbers) to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not MODELS.is_dir():
        raise SystemExit(f"{MODELS} not found: the benchmark needs ../shared next to the repo")
    tool_set = tools(args)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start", flush=True)
    all_rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        for case in cases(args.models.split(","), args.eval):
            folder = Path(tmp) / case.name
            folder.mkdir()
            note = prepare(case, folder)
            rows = bench(case, tool_set, folder, args.rounds)
            print_table(case, rows, note)
            for r in rows:
                r["metric"] = case.metric_name
            all_rows.extend(rows)
            if args.json:  # after every model: a long run that dies keeps what it measured
                args.json.write_text(json.dumps(all_rows, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f} at end", flush=True)


if __name__ == "__main__":
    main()
