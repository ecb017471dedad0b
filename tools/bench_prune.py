"""Benchmark: edgegraph `prune` vs onnxsim 0.8's `onnxsim.pruning` on real models and data.

    python tools/bench_prune.py [--models cifar10,mnist,...] [--cuts 0.1,0.2,0.3,0.5] [--eval N] [--json out.json]
                                [--tools "edgegraph,prune(macs={keep}, align=8)"] [--calib N]

Models and data come from tools/bench_quant.py (same preprocessing), in a seeded random order
(the ImageNet sample is sorted by class: its first 256 images are animals, the rest objects, so
calibrating on the first ones and evaluating on the others measured a distribution shift):
256 samples calibrate every tool (`--calib`; the prune pass fits on up to 256, holding 16 of them
out to measure its budgets), and the evaluation set after them is split in two halves A / B, by
default as large as the data allows (up to 400 a split: SqueezeNet and the CIFAR-10 CNN 122,
DeepLab and YOLOX 122, MNIST and PP-OCR cls 400), since at 100 images a split ±0.05 is noise. SqueezeNet's float16 file is compared in
float32: every tool gets its float32 version (edgegraph's compute_in_float32), and agreement is
against that model. For each model and MAC cut, in one run:

  edgegraph           prune(macs=1-cut): reconstruction selection + least-squares recovery, widths
                      aligned to the cpu target (16)
  eg no-recovery      the same selection, recover=false
  eg iterative        steps=3 (three MAC steps, the pruned model's inputs re-captured and the
                      next channels chosen on them after each; the default chooses in one shot)
  eg no-align         align=1
  eg align-8          align=8 (half the cpu target's block: YOLOX keeps more of its accuracy, runs a
                      little slower)
  eg no-refit         refit=false (least squares on the original's activations only)
  eg sensitivity      sensitivity=true (each group's cost = the output error it causes alone)
  eg reconstruction   sensitivity=false (each group's cost = its consumers' reconstruction error)
  onnxsim L1 / Wanda  apply_structured_pruning(importance_norm=l1) / apply_structured_wanda_pruning
                      (calibrated on the first 8 of the same inputs); onnxsim's knob is a channel fraction, so
                      it is bisected (global_sparsity=True) until its MAC cut is the same

A `--tools` entry that is a pass spec (`prune(macs={keep}, ...)`) runs that spec as one more
edgegraph row. By default the samples are all a model's data holds; a smaller `--eval` draws both the
calibration and the evaluation samples from fewer.

Columns: MACs removed, params ratio, latency ratio (pruned / fp32, onnxruntime CPU, 1 thread,
full optimisations, interleaved rounds, median), agreement with fp32 on eval halves A and B:
top-1 for classifiers, pixels fp32 calls foreground (argmax != background) for DeepLab, the
detection F1 of tools/bench_quant.py for YOLOX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_quant as bq  # noqa: E402  (models, data, metrics)
from edgegraph import modelio, runtime, stats  # noqa: E402
from edgegraph.context import CalibrationData, PassContext, VerifyConfig  # noqa: E402
from edgegraph.convert import compute_in_float32  # noqa: E402
from edgegraph.pipeline import run_pipeline  # noqa: E402
from edgegraph.spec import parse  # noqa: E402

DEFAULT_MODELS = "mnist,cifar10,ppocr_cls,squeezenet,deeplab,yolox_nano"
CALIB = 256  # calibration samples every tool gets: the prune pass's calib_samples default


def macs(path: Path, case=None) -> int:
    """MACs at one evaluation input's shape (PP-OCR cls has dynamic height and width)."""
    model = modelio.load(path)
    found = stats.model_stats(model).macs_known
    if found or case is None:
        return found
    return stats.model_stats(model, fix_shapes={case.input: [1, *case.calib.shape[1:]]}).macs_known


def edgegraph_prune(spec: str):
    def run(case, source: Path, out: Path, cut: float) -> dict:
        calib = CalibrationData.from_arrays({case.input: case.calib})
        ctx = PassContext(calibration=calib, verify=VerifyConfig(enabled=False), progress=False)
        model, report = run_pipeline(modelio.load(source), parse(spec.format(keep=round(1 - cut, 4))), ctx)
        modelio.save(model, out)
        return {}
    return run


def onnxsim_prune(kind: str):
    def run(case, source: Path, out: Path, cut: float) -> dict:
        from onnxsim import pruning

        base = onnx.load(str(source))
        before = macs(source, case)
        dtype = runtime.input_specs(base)[0].dtype
        feeds = [{case.input: x[None].astype(dtype)} for x in case.calib[:8]]
        low, high, best = 0.0, 0.95, None
        for _ in range(6):  # bisect onnxsim's channel fraction for the MAC cut
            s = (low + high) / 2
            try:
                if kind == "l1":
                    pruned = pruning.apply_structured_pruning(base, sparsity=s, importance_norm="l1",
                                                              global_sparsity=True)
                else:
                    pruned = pruning.apply_structured_wanda_pruning(base, calibration_data=feeds, sparsity=s,
                                                                     global_sparsity=True)
            except Exception as exc:  # noqa: BLE001 - report what onnxsim says
                return {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
            onnx.save(pruned, str(out))
            reached = 1 - macs(out, case) / before
            if best is None or abs(reached - cut) < abs(best[1] - cut):
                best = (s, reached)
                onnx.save(pruned, str(out) + ".best")
            if reached < cut:
                low = s
            else:
                high = s
        Path(str(out) + ".best").replace(out)
        return {"sparsity": round(best[0], 3)}
    return run


TOOLS = {
    "edgegraph": edgegraph_prune("prune(macs={keep})"),
    "eg no-recovery": edgegraph_prune("prune(macs={keep}, recover=false)"),
    "eg iterative": edgegraph_prune("prune(macs={keep}, steps=3)"),
    "eg no-align": edgegraph_prune("prune(macs={keep}, align=1)"),
    "eg align-8": edgegraph_prune("prune(macs={keep}, align=8)"),
    "eg no-refit": edgegraph_prune("prune(macs={keep}, refit=false)"),
    "eg sensitivity": edgegraph_prune("prune(macs={keep}, sensitivity=true)"),
    "eg reconstruction": edgegraph_prune("prune(macs={keep}, sensitivity=false)"),
    "onnxsim L1": onnxsim_prune("l1"),
    "onnxsim Wanda": onnxsim_prune("wanda"),
}


# Images each model's data has (ImageNet sample and CIFAR-10 subset: 500; MNIST: 10k; PP-OCR cls
# crops are drawn without end), and the most evaluated per split (±0.05 agreement is noise at 100).
AVAILABLE = {"squeezenet": 500, "cifar10": 500, "deeplab": 500, "yolox_nano": 500, "mnist": 10000}
MAX_PER_SPLIT = 400


def eval_count(name: str, calib: int, asked: int | None) -> int:
    """bench_quant.cases' n_eval for `name`: `asked`, else the most its data holds after `calib`
    calibration samples (up to MAX_PER_SPLIT per split; the dense models get n_eval / 2 per split)."""
    if asked is not None:
        return asked // 2
    dense = name in ("deeplab", "yolox_nano")
    per_split = min(MAX_PER_SPLIT, (AVAILABLE.get(name, 10 ** 6) - calib) // 2)
    return 2 * per_split if dense else per_split


def shuffled(case, seed: int = 0):
    """`case` with its calibration and evaluation samples drawn from all of them in a seeded random
    order (the same sizes): no split holds a range of classes of its own."""
    a, b = case.splits
    every = np.concatenate([case.calib, a, b])
    order = np.random.default_rng(seed).permutation(len(every))
    calib, rest = every[order[:len(case.calib)]], every[order[len(case.calib):]]
    return dataclasses.replace(case, calib=calib, splits=(rest[:len(a)], rest[len(a):]))


def bench(case, cuts, folder: Path, tools: dict, rounds: int) -> list[dict]:
    source = case.source
    model = modelio.load(source)
    if compute_in_float32(model):  # a float16 model (SqueezeNet) is compared in float32 (see the docstring)
        source = folder / f"{case.name}_fp32.onnx"
        modelio.save(model, source)
    dtype = runtime.input_specs(onnx.load(str(source)))[0].dtype  # (SqueezeNet keeps its float16 interface)
    split_a, split_b = (x.astype(dtype) for x in case.splits)
    evaluation = np.concatenate([split_a, split_b])
    reference = bq.first_output(source, case.input, evaluation)
    half = len(split_a)
    base_macs, base_params = macs(source, case), stats.model_stats(modelio.load(source)).params
    rows, paths = [], []
    for cut in cuts:
        for name, tool in tools.items():
            out = folder / f"{case.name}_{cut}_{name.replace(' ', '_')}.onnx"
            start = time.perf_counter()
            try:
                extra = tool(case, source, out, cut)
            except Exception as exc:  # noqa: BLE001 - a tool failing is a result
                extra = {"error": f"{type(exc).__name__}: {str(exc)[:100]}"}
            row = {"model": case.name, "cut": cut, "tool": name, "seconds": round(time.perf_counter() - start, 1),
                   **extra}
            if "error" not in row and out.exists():
                got = bq.first_output(out, case.input, evaluation)
                row.update(macs_removed=round(1 - macs(out, case) / base_macs, 3),
                           params=round(stats.model_stats(modelio.load(out)).params / base_params, 3),
                           agree_a=round(case.metric(reference[:half], got[:half]), 3),
                           agree_b=round(case.metric(reference[half:], got[half:]), 3))
                paths.append((row, out))
            rows.append(row)
            print(json.dumps(row), flush=True)
    # Latency: every model of this case timed in turns, 1 thread (interleaved round medians).
    feeds = {case.input: evaluation[:1]}
    protos = [onnx.load(str(p)) for p in [source] + [p for _, p in paths]]
    timed = stats.measure_latency(protos, [feeds] * len(protos), runs=20, threads=1, rounds=rounds)
    base = timed[0][0]
    for (row, _), (ms, _note) in zip(paths, timed[1:]):
        row["latency"] = round(ms / base, 3) if ms and base else None
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':16} {'cut':>4} {'tool':15} {'MACs-':>6} {'params':>6} {'lat':>6} {'agreeA':>6} {'agreeB':>6}"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:16} {r['cut']:>4} {r['tool']:15} error: {r['error']}")
            continue
        print(f"{r['model']:16} {r['cut']:>4} {r['tool']:15} {r['macs_removed']:>6} {r['params']:>6} "
              f"{str(r.get('latency')):>6} {r['agree_a']:>6} {r['agree_b']:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--cuts", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--eval", type=int, help="evaluation inputs (two halves); default: the most each "
                                                 "model's data holds after the calibration samples, up to "
                                                 f"{MAX_PER_SPLIT} a split")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--calib", type=int, default=CALIB, help="calibration samples (drawn in a seeded random "
                                                                "order; the evaluation splits from the rest)")
    parser.add_argument("--json")
    args = parser.parse_args()
    names = [t.strip() for t in re.split(r",(?![^()]*\))", args.tools) if t.strip()]  # (not commas inside a spec)
    tools = {name: TOOLS[name] if name in TOOLS else edgegraph_prune(name) for name in names}
    bq.CALIB = args.calib  # (bench_quant.cases: the first CALIB samples calibrate, the splits follow)
    cuts = [float(c) for c in args.cuts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for case in bq.cases([name], eval_count(name, args.calib, args.eval)):
                rows += bench(shuffled(case), cuts, Path(tmp), tools, args.rounds)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
