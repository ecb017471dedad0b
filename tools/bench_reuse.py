"""Benchmark: `edgegraph merge` and the `frame-cache` pass on a real trained detector.

    /work/venvs/<you>/bin/python tools/bench_reuse.py [--runs 30] [--frames 150] [--json out.json]

Merge: three tasks on the trained lightweight person detector (YOLOX architecture, 192x192,
../shared/models/lightweight_person_detector): `det` the detector itself, `cls` its backbone up to
the last stage (input.359, 256x6x6) with a new linear head, `seg` up to stage 3 (input.175,
64x24x24) with a new 1x1-conv head; each exported with its own node/tensor names and initializer
order. Measured (onnxruntime CPU, full optimizations, 1 thread; `stats.measure_latency`: the
models timed in turns over 5 rounds, the median of the round medians):

  merged latency   vs the sum of the three separate models, and vs backbone + heads (the detector
                   plus the two new heads timed alone on their features: the least one graph
                   computing all three can cost). Goals: <= 0.5 x sum, <= 1.1 x (backbone + heads)
  size             merged file vs the sum of the files, and vs the bytes of the distinct weights
                   (goal <= 1.02 x)
  tool time        wall time of `edgegraph.merge.merge` (join, collapse, the bitwise check of every
                   task on 4 inputs), and without the check. Goal < 2 s

Frame-cache: the detector made stateful (`frame-cache(at=auto, threshold=T)`), run as an
application runs it (state fed back) on a synthetic video: ImageNet sample images from
../shared/data, a 192x192 window drifting by up to 1 px a frame (camera shake), Gaussian sensor noise
(sigma 2 of 255), a scene cut (another image) every ~30 frames. Per threshold: per-frame latency
(median, mean) vs the original model on the same frames (interleaved frame by frame), the reuse
rate, and agreement with recomputing every frame: detection F1 (boxes score >= 0.3, NMS, matched by
IoU >= 0.5) and the worst output SQNR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import utils as onnx_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgegraph  # noqa: E402
from edgegraph import ir, modelio, runtime, stats, verify  # noqa: E402
from edgegraph.analysis.hashing import constant_key  # noqa: E402
from edgegraph.merge import merge  # noqa: E402
from fixtures import quant as data_fixtures  # noqa: E402
from fixtures.reuse import cut, rename  # noqa: E402

SHARED = REPO.parent / "shared"
DETECTOR = SHARED / "models" / "lightweight_person_detector" / "model.onnx"
DATA = SHARED / "data"
SIZE = 192


# Where the cls and seg tasks leave the detector: "mixed" cuts the backbone at its last stage and at
# stage 3 (the tasks share part of the detector's work), "neck" after the neck (P5 out, and the
# 24x24 head stem): each task then holds nearly the whole detector, the case merging is for.
CUTS = {"mixed": {"cls": "input.359", "seg": "input.175"}, "neck": {"cls": "input.591", "seg": "input.599"}}
PREFIX = {"det": "export1_", "cls": "export2_", "seg": "export3_"}


def build_tasks(folder: Path, cuts: dict[str, str]) -> dict[str, Path]:
    detector = onnx.load(DETECTOR)
    models = {
        "det": rename(detector, PREFIX["det"]),
        "cls": cut(detector, cuts["cls"], head="linear", classes=80, seed=1, renamed=PREFIX["cls"], shuffle=2),
        "seg": cut(detector, cuts["seg"], head="conv", classes=4, seed=3, renamed=PREFIX["seg"], shuffle=4),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(model, paths[name])
    return paths


def head_alone(path: Path, at: str, folder: Path) -> onnx.ModelProto:
    """The new head of a task, from its features on: what the task adds to the detector."""
    onnx_utils.extract_model(str(path), str(folder / f"head_{at}.onnx"), [at], ["scores"])
    return onnx.load(folder / f"head_{at}.onnx")


def bench_merge(runs: int, folder: Path, cuts: dict[str, str]) -> dict:
    paths = build_tasks(folder, cuts)
    heads = {f"{task} head": (task, at) for task, at in cuts.items()}
    start = time.perf_counter()
    result = merge(list(paths.values()))
    tool_s = time.perf_counter() - start
    start = time.perf_counter()
    merge(list(paths.values()), check_samples=0)
    tool_unchecked_s = time.perf_counter() - start
    merged_path = folder / "merged.onnx"
    modelio.save(result.model, merged_path)
    assert all(d["bitwise"] for d in result.report["deviation"].values())

    distinct = {}
    for path in paths.values():
        for tensor in modelio.load(path).graph.tensors().values():
            if isinstance(tensor, ir.gs.Constant):
                key = constant_key(tensor)
                distinct[key] = tensor.values.nbytes
    image = data_fixtures.yolox_inputs(DATA, 0, 1, size=SIZE)
    x = {"images": image}
    features = runtime.run(runtime.session(runtime.with_outputs(
        onnx.load(paths["det"]), [PREFIX["det"] + at for _, at in heads.values()])), x)
    models = {**paths, "merged": merged_path}
    feeds = {name: x for name in models}
    for name, (task, at) in heads.items():
        models[name] = head_alone(paths[task], PREFIX[task] + at, folder)
        feeds[name] = {PREFIX[task] + at: features[PREFIX["det"] + at]}
    # Timed in turns over rounds (the median of the round medians), as `edgegraph bench` does.
    timed = stats.measure_latency(list(models.values()), [feeds[n] for n in models], runs=runs, threads=1,
                                  rounds=5, budget_s=30.0)
    ms = {name: t for name, (t, _) in zip(models, timed)}
    separate = ms["det"] + ms["cls"] + ms["seg"]
    ideal = ms["det"] + ms["cls head"] + ms["seg head"]
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    merged_size = merged_path.stat().st_size
    unique = sum(distinct.values())
    return {
        "tasks": {name: {"size_bytes": sizes[name], "latency_ms": ms[name],
                         "nodes_shared": result.report["tasks"][name]["nodes_shared"],
                         "nodes_own": result.report["tasks"][name]["nodes_own"]} for name in paths},
        "latency_ms": {"merged": ms["merged"], "sum_separate": separate, "backbone_plus_heads": ideal,
                       "heads_alone": {k: ms[k] for k in heads}},
        "merged_vs_sum": ms["merged"] / separate, "merged_vs_backbone_plus_heads": ms["merged"] / ideal,
        "size_bytes": {"merged": merged_size, "sum": sum(sizes.values()), "distinct_weights": unique},
        "size_vs_distinct_weights": merged_size / unique,
        "tool_s": tool_s, "tool_unchecked_s": tool_unchecked_s,
    }


def video(frames: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Frames (1x3x192x192 BGR 0-255) and the index of the scene each shows."""
    rng = np.random.default_rng(seed)
    scenes = data_fixtures.yolox_inputs(DATA, 0, 8, size=SIZE + 16)
    out, which = [], []
    scene, dy, dx = 0, 8.0, 8.0
    for i in range(frames):
        if i and rng.random() < 1 / 30:
            scene = (scene + 1) % len(scenes)
            dy, dx = 8.0, 8.0
        dy = float(np.clip(dy + rng.uniform(-1, 1), 0, 16))
        dx = float(np.clip(dx + rng.uniform(-1, 1), 0, 16))
        y, x = round(dy), round(dx)
        frame = scenes[scene][:, y:y + SIZE, x:x + SIZE] + rng.normal(0, 2, (3, SIZE, SIZE))
        out.append(np.clip(frame, 0, 255).astype(np.float32)[None])
        which.append(scene)
    return out, which


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def f1(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    m, nr, nc = data_fixtures.detection_agreement(data_fixtures.yolox_detections(ref[0], size=SIZE),
                                                  data_fixtures.yolox_detections(cand[0], size=SIZE))
    return 2 * m, nr + nc


def bench_framecache(frame_count: int, thresholds: list[float], repeat: int = 3) -> dict:
    frames, scenes = video(frame_count)
    original = runtime.session(DETECTOR, threads=1, optimize=True)
    reference = [original.run(None, {"images": f})[0] for f in frames]
    results = {"frames": frame_count, "scene_cuts": sum(a != b for a, b in zip(scenes, scenes[1:])), "thresholds": {}}
    for threshold in thresholds:
        proto = edgegraph.optimize(DETECTOR, f"frame-cache(threshold={threshold})")
        cached = runtime.session(proto, threads=1, optimize=True)
        state_dims = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim[1:]] for i in proto.graph.input}
        state = {n: np.zeros([0, *state_dims[n]], np.float32) for n in ("cached_features", "cached_summary")}
        t_orig, t_cached, reused, matches, total, outs, flags = [], [], 0, 0, 0, [], []
        for i, frame in enumerate(frames):
            # Interleaved frame by frame, the order alternating, so a slow spell hits both; each
            # frame's time is the median of `repeat` runs on the same feeds (the same branch).
            times = {0: [], 1: []}
            for _ in range(repeat):
                for which in ((0, 1) if i % 2 else (1, 0)):
                    start = time.perf_counter()
                    if which == 0:
                        original.run(None, {"images": frame})
                    else:
                        out, features, summary, flag = cached.run(None, {"images": frame, **state})
                    times[which].append((time.perf_counter() - start) * 1e3)
            t_orig.append(statistics.median(times[0]))
            t_cached.append(statistics.median(times[1]))
            state = {"cached_features": features, "cached_summary": summary}
            reused += bool(flag)
            flags.append(bool(flag))
            m, n = f1(reference[i], out)
            matches, total = matches + m, total + n
            outs.append({"output": out})
        sqnr = verify.worst_sqnr_db([{"output": r} for r in reference], outs)
        results["thresholds"][str(threshold)] = {
            "reuse_rate": reused / frame_count,
            "latency_ms": {"original_median": statistics.median(t_orig), "cached_median": statistics.median(t_cached),
                           "original_mean": statistics.mean(t_orig), "cached_mean": statistics.mean(t_cached),
                           # the cached model's frames by branch: what a reuse costs, what a recompute costs
                           "cached_reused_median": _median([t for t, f in zip(t_cached, flags) if f]),
                           "cached_recomputed_median": _median([t for t, f in zip(t_cached, flags) if not f])},
            "detection_f1_vs_recompute": matches / total if total else 1.0,
            "worst_sqnr_db_vs_recompute": sqnr,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (merge)")
    parser.add_argument("--frames", type=int, default=150, help="video length (frame-cache)")
    parser.add_argument("--thresholds", default="1,3,8", help="frame-cache thresholds, input units (0-255)")
    parser.add_argument("--tasks", default="mixed,neck", help="task sets to merge: mixed, neck (see CUTS)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    if not DETECTOR.is_file():
        raise SystemExit(f"{DETECTOR} not found: the real models live in ../shared next to the repo")
    report = {}
    for kind in args.tasks.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            report[kind] = merged = bench_merge(args.runs, Path(tmp), CUTS[kind])
        print_merge(kind, merged)
    cache = bench_framecache(args.frames, [float(t) for t in args.thresholds.split(",")])
    report["frame_cache"] = cache
    print(f"frame-cache(at=auto) on the person detector: {cache['frames']} frames, {cache['scene_cuts']} scene cuts; "
          "per-frame ms = median of 3 runs of that frame")
    print("  threshold  reuse  orig ms (median/mean)  cached ms (median/mean)  reused/recomputed frame ms  "
          "det F1 vs recompute  worst SQNR dB")
    for threshold, row in cache["thresholds"].items():
        t = row["latency_ms"]
        split = " / ".join("-" if v is None else f"{v:.2f}" for v in (t["cached_reused_median"],
                                                                       t["cached_recomputed_median"]))
        print(f"  {threshold:>9s}  {row['reuse_rate']:5.1%}  {t['original_median']:8.2f} / {t['original_mean']:6.2f}"
              f"        {t['cached_median']:8.2f} / {t['cached_mean']:6.2f}   {split:>24s}"
              f"         {row['detection_f1_vs_recompute']:.3f}          {row['worst_sqnr_db_vs_recompute']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def print_merge(kind: str, merged: dict) -> None:
    lat = merged["latency_ms"]
    print(f"merge, {kind} cuts: three tasks on the person detector (ORT CPU, 1 thread, medians interleaved)")
    for name, task in merged["tasks"].items():
        print(f"  {name:4s} {task['size_bytes'] / 1e6:6.2f} MB  {task['latency_ms']:7.2f} ms  "
              f"nodes shared {task['nodes_shared']:4d}  own {task['nodes_own']:3d}")
    print(f"  merged {lat['merged']:.2f} ms; sum of separate {lat['sum_separate']:.2f} ms "
          f"(x{merged['merged_vs_sum']:.3f}, goal <= 0.5); backbone+heads {lat['backbone_plus_heads']:.2f} ms "
          f"(x{merged['merged_vs_backbone_plus_heads']:.3f}, goal <= 1.1)")
    size = merged["size_bytes"]
    print(f"  size merged {size['merged'] / 1e6:.3f} MB; sum {size['sum'] / 1e6:.3f} MB; distinct weights "
          f"{size['distinct_weights'] / 1e6:.3f} MB (x{merged['size_vs_distinct_weights']:.4f}, goal <= 1.02)")
    print(f"  merge tool {merged['tool_s']:.2f} s with the bitwise check of every task, "
          f"{merged['tool_unchecked_s']:.2f} s without (goal < 2 s)")


if __name__ == "__main__":
    main()
