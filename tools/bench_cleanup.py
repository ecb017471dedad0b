"""Benchmark: edgegraph `cleanup` vs onnxslim vs onnxsim on every model in ../shared/models.

    /work/.venv/bin/python tools/bench_cleanup.py [--models agllnet,yolox] [--repeat 3] [--json out.json]

Every tool gets the same in-memory ModelProto, in one process and one run:

  time s     median wall time of the tool's Python call over --repeat runs (interleaved):
               edgegraph.optimize(proto, "cleanup", verify=False)   (load, shape inference,
                                                                     passes, export)
               onnxslim.slim(proto)
               onnxsim.simplify(proto)
  nodes      node count (subgraphs and functions included)
  size MB    serialized model size
  lat ms     median ORT latency, 1 thread, ORT_ENABLE_ALL (what users deploy with); runs of
             the original and the three results are interleaved
  diff       max |output - original output| over all outputs, ORT with optimizations off

Inputs: the model's reference_io.npz input where there is one, else seeded random data.
Goals per model: nodes <= the best of onnxslim/onnxsim, time <= onnxslim, diff within the
exactness tolerance (atol 1e-5 + rtol 1e-4 * max|output|), not bigger than the smaller
competitor file. The last row counts the goals met.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgegraph  # noqa: E402
from edgegraph import runtime  # noqa: E402
from edgegraph.context import CalibrationData, VerifyConfig  # noqa: E402

MODELS = REPO.parent / "shared" / "models"
TOOLS = ("edgegraph", "onnxslim", "onnxsim")


def run_edgegraph(proto: onnx.ModelProto) -> onnx.ModelProto:
    return edgegraph.optimize(proto, "cleanup", verify=False)


def run_onnxslim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(proto)


def run_onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    model, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim check failed")
    return model


# cleanup without its default guard against folds that grow the model.
UNBOUNDED = "cleanup(growth_limit=1000000000000)"

RUNNERS = {"edgegraph": run_edgegraph, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


def count_nodes(graph: onnx.GraphProto) -> int:
    total = len(graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g) for g in attr.graphs)
    return total


def all_nodes(model: onnx.ModelProto) -> int:
    return count_nodes(model.graph) + sum(len(f.node) for f in model.functions)


def inputs_for(path: Path, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    specs = runtime.input_specs(proto)
    reference = path.with_name(path.stem + ".reference_io.npz")
    if reference.exists():
        data = CalibrationData.from_npz(reference, [s.name for s in specs])
        batch = next(data.batches(len(data)))
    else:
        batch = next(CalibrationData.random(specs, 1, seed=0).batches(1))
    return runtime.adapt_feeds(specs, batch)


@contextmanager
def silenced():
    """Silence Python and native (C++ writes to fd 1/2) chatter of the tools."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_quietly(runner, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    """(result, seconds) of one call on a private copy of `proto`, tool chatter silenced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with silenced():
        start = time.perf_counter()
        result = runner(copy)
        seconds = time.perf_counter() - start
    return result, seconds


def latencies(models: dict[str, onnx.ModelProto], feeds) -> dict[str, float]:
    """Median ms per model, 1 thread, full ORT optimizations. Runs are interleaved across the
    models so load from other processes hits all of them alike; fewer runs for slow models."""
    sessions = {name: runtime.session(model, threads=1, optimize=True) for name, model in models.items()}
    start = time.perf_counter()
    for sess in sessions.values():
        sess.run(None, feeds)  # warm-up
    per_round = (time.perf_counter() - start) / len(sessions)
    rounds = int(min(20, max(3, 2.0 / max(per_round, 1e-4))))
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def max_diff(reference: dict, outputs: dict) -> tuple[float, float]:
    """(max abs difference, max |reference|) over the outputs the reference has."""
    diff, scale = 0.0, 0.0
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None or out.shape != ref.shape:
            return float("inf"), 0.0
        if ref.size:
            diff = max(diff, float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))))
            scale = max(scale, float(np.max(np.abs(ref.astype(np.float64)))))
    return diff, scale


def bench(path: Path, repeat: int) -> dict:
    proto = onnx.load(str(path))
    feeds = inputs_for(path, proto)
    reference = runtime.run(runtime.session(proto), feeds)
    row = {"model": f"{path.parent.name}/{path.name}", "orig_nodes": all_nodes(proto), "orig_mb": proto.ByteSize() / 1e6}
    results, times, errors = {}, {tool: [] for tool in TOOLS}, {}
    for _ in range(repeat):  # tools interleaved, so machine load affects them alike
        for tool in TOOLS:
            if tool in errors:
                continue
            try:
                results[tool], seconds = run_quietly(RUNNERS[tool], proto)
                times[tool].append(seconds)
            except Exception as exc:  # noqa: BLE001 - a competitor failing on a model is a result
                errors[tool] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    for tool in TOOLS:
        if tool in errors:
            row[tool] = {"error": errors[tool]}
            continue
        try:
            outputs = runtime.run(runtime.session(results[tool]), feeds)
        except Exception as exc:  # noqa: BLE001
            row[tool] = {"error": f"result does not run: {str(exc).splitlines()[0][:80]}"}
            continue
        diff, scale = max_diff(reference, outputs)
        row[tool] = {"time": statistics.median(times[tool]), "nodes": all_nodes(results[tool]),
                     "mb": results[tool].ByteSize() / 1e6, "diff": diff, "scale": scale}
    runnable = {tool: results[tool] for tool in TOOLS if "error" not in row[tool]}
    with silenced():
        lat = latencies({"original": proto, **runnable}, feeds)
    row["orig_lat"] = lat["original"]
    for tool in runnable:
        row[tool]["lat"] = lat[tool]
    row["goals"] = goals(row)
    mine = row["edgegraph"]
    if "error" not in mine and not row["goals"]["nodes"]:
        # Competitors may have reached their count by materialising compressed weights (e.g.
        # Cast(int8) * scale of weight-only quantization); show what that costs here.
        unbounded, _ = run_quietly(lambda m: edgegraph.optimize(m, UNBOUNDED, verify=False), proto)
        row["unbounded"] = {"nodes": all_nodes(unbounded), "mb": unbounded.ByteSize() / 1e6}
    return row


def goals(row: dict) -> dict[str, bool]:
    mine = row["edgegraph"]
    if "error" in mine:
        return {"nodes": False, "time": False, "exact": False, "size": False}
    others = [row[t] for t in ("onnxslim", "onnxsim") if "error" not in row[t]]
    tol = VerifyConfig()
    return {
        "nodes": all(mine["nodes"] <= o["nodes"] for o in others),
        "time": "error" in row["onnxslim"] or mine["time"] <= row["onnxslim"]["time"],
        "exact": mine["diff"] <= tol.atol + tol.rtol * mine["scale"],
        "size": all(mine["mb"] <= o["mb"] * 1.001 for o in others),
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':44s} {'nodes orig eg/slim/sim':>24s} {'time s eg/slim/sim':>20s} {'size MB eg/slim/sim':>21s}"
              f" {'lat ms orig eg/slim/sim':>27s} {'max diff eg/slim/sim':>28s}  goals")
    print(header)
    print("-" * len(header))

    def cell(row, tool, key, fmt):
        data = row[tool]
        return "err" if "error" in data else format(data[key], fmt)

    met = {"nodes": 0, "time": 0, "exact": 0, "size": 0}
    for row in rows:
        nodes = "/".join(cell(row, t, "nodes", "d") for t in TOOLS)
        times = "/".join(cell(row, t, "time", ".2f") for t in TOOLS)
        sizes = "/".join(cell(row, t, "mb", ".2f") for t in TOOLS)
        lats = "/".join(cell(row, t, "lat", ".1f") for t in TOOLS)
        diffs = "/".join(cell(row, t, "diff", ".1e") for t in TOOLS)
        flags = " ".join(k if ok else f"!{k}" for k, ok in row["goals"].items())
        for key, ok in row["goals"].items():
            met[key] += ok
        print(f"{row['model'][:44]:44s} {row['orig_nodes']:>5d} {nodes:>18s} {times:>20s} {sizes:>21s}"
              f" {row['orig_lat']:>8.1f} {lats:>18s} {diffs:>28s}  {flags}")
        for tool in TOOLS:
            if "error" in row[tool]:
                print(f"{'':44s} {tool}: {row[tool]['error']}")
    print("-" * len(header))
    for row in rows:
        if "unbounded" in row:
            u = row["unbounded"]
            print(f"note {row['model']}: edgegraph keeps constant subgraphs that would grow the model; "
                  f"{UNBOUNDED} gives {u['nodes']} nodes at {u['mb']:.2f} MB")
    total = len(rows)
    print("goals met: " + ", ".join(f"{k} {v}/{total}" for k, v in met.items()) +
          f"  (nodes <= best competitor, time <= onnxslim, diff within exact tolerance, size <= smaller competitor)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated substrings of model paths to run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    if not MODELS.is_dir():
        print(f"{MODELS} not found: the shared models live in ../shared next to the repo")
        return 1
    wanted = [w for w in args.models.split(",") if w]
    paths = [p for p in sorted(MODELS.glob("*/*.onnx")) if not wanted or any(w in str(p) for w in wanted)]
    rows = []
    for path in paths:
        print(f"... {path.parent.name}/{path.name}", file=sys.stderr, flush=True)
        rows.append(bench(path, args.repeat))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
