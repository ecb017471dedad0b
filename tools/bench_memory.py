"""Peak memory and wall time of load -> cleanup -> save on a model past protobuf's 2 GiB limit.

    /work/.venv/bin/python tools/bench_memory.py                 # 2.3 GB model, 3 runs per tool
    /work/.venv/bin/python tools/bench_memory.py --size-gb 2.5 --runs 1 --folder /tmp/bench

Builds a synthetic float32 model (fixtures.core.write_large_model: Gather tables and MatMuls, an
Identity to remove, weights in an external data file) and runs, one at a time, each in a fresh
process:

    onnx load+save       onnx.load + onnx.save_model with external data (the floor: no optimisation)
    onnxslim             the `onnxslim IN OUT` command
    edgegraph (library)  modelio.load -> run_pipeline(cleanup, verify off) -> modelio.save
    edgegraph opt        `edgegraph opt IN -p cleanup -o OUT --runs 0 --no-verify`
    edgegraph opt+verify `edgegraph opt IN -p cleanup -o OUT --runs 0` (each pass checked in onnxruntime)

Peak RSS is the process's maximum resident set (os.wait4), which counts pages of memory-mapped
weights a tool touched as well as copies it made; wall time includes interpreter start and imports.
Every output is then run in onnxruntime (in another process) and compared with the input model.
Memory is the point, so keep other heavy jobs off the machine while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(sys.executable).parent

ONNX_BASELINE = """
import sys, onnx
model = onnx.load(sys.argv[1])
onnx.save_model(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location=sys.argv[2].rsplit("/", 1)[-1] + ".data")
"""

EDGEGRAPH_LIBRARY = """
import sys
from edgegraph import modelio, spec
from edgegraph.context import PassContext, VerifyConfig
from edgegraph.pipeline import run_pipeline
model = modelio.load(sys.argv[1])
result, _ = run_pipeline(model, spec.parse("cleanup"), PassContext(verify=VerifyConfig(enabled=False), progress=False))
modelio.save(result, sys.argv[2])
"""

# Runs a model in onnxruntime on the saved feeds: writes the reference outputs when there are none
# yet, else prints the largest difference from them.
CHECK = """
import sys, json, os, numpy as np, onnxruntime as ort
model, feeds, reference = sys.argv[1:4]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dict(np.load(feeds)))))
if not os.path.exists(reference):
    np.savez(reference, **got)
else:
    ref = np.load(reference)
    print(json.dumps(max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref.files)))
"""


def tools() -> dict[str, list[str]]:
    """Tool name -> command; IN and OUT are replaced by the paths."""
    return {
        "onnx load+save": [PYTHON, "-c", ONNX_BASELINE, "IN", "OUT"],
        "onnxslim": [str(BIN / "onnxslim"), "IN", "OUT"],
        "edgegraph (library)": [PYTHON, "-c", EDGEGRAPH_LIBRARY, "IN", "OUT"],
        "edgegraph opt": [str(BIN / "edgegraph"), "opt", "IN", "-p", "cleanup", "-o", "OUT", "--runs", "0",
                          "--no-verify", "--quiet"],
        "edgegraph opt+verify": [str(BIN / "edgegraph"), "opt", "IN", "-p", "cleanup", "-o", "OUT", "--runs", "0",
                                 "--quiet"],
    }


def measure(command: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, stderr tail) of one run."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    return seconds, usage.ru_maxrss * 1024, proc.returncode, tail[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.3, help="weights of the synthetic model in GB (1e9)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool; medians are reported")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--only", nargs="*", help="run only these tools (names as in the table)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from fixtures.core import large_model_feeds, write_large_model
    import numpy as np

    folder = args.folder or Path(tempfile.mkdtemp(prefix="edgegraph-bench-memory-"))
    try:
        source = write_large_model(folder / "in", int(args.size_gb * 1e9))
        size = sum(p.stat().st_size for p in source.parent.iterdir())
        feeds = folder / "feeds.npz"
        np.savez(feeds, **large_model_feeds(source))
        reference = folder / "reference.npz"
        subprocess.run([PYTHON, "-c", CHECK, str(source), str(feeds), str(reference)], check=True)
        print(f"model: {source} ({size / 1e9:.2f} GB with external data), {args.runs} run(s) per tool\n")

        rows = []
        for name, template in tools().items():
            if args.only and name not in args.only:
                continue
            out = folder / "out" / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_") / "m.onnx"
            times, peaks, error = [], [], ""
            for _ in range(args.runs):
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir(parents=True)
                command = [str(source) if a == "IN" else str(out) if a == "OUT" else a for a in template]
                seconds, peak, code, tail = measure(command)
                if code != 0:
                    error = f"exit {code}: {tail}"
                    break
                times.append(seconds)
                peaks.append(peak)
            if error:
                rows.append((name, None, None, None, error))
                print(f"{name}: {error}", flush=True)
                continue
            check = subprocess.run([PYTHON, "-c", CHECK, str(out), str(feeds), str(reference)],
                                   capture_output=True, text=True)
            diff = json.loads(check.stdout) if check.returncode == 0 else None
            written = sum(p.stat().st_size for p in out.parent.iterdir())
            rows.append((name, statistics.median(times), max(peaks), written,
                         f"{diff:.1e}" if diff is not None else "does not run"))
            print(f"{name}: {statistics.median(times):.1f} s, {max(peaks) / 2**30:.2f} GiB", flush=True)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)

    def ratio(row, anchor_name):
        anchor = next((r for r in rows if r[0] == anchor_name and r[1]), None)
        return f"{row[1] / anchor[1]:.2f}x / {row[2] / anchor[2]:.2f}x" if anchor else ""

    print("\n| tool | wall s (median) | peak RSS GiB | RSS / model size | time / RSS vs onnxslim "
          "| time / RSS vs onnx load+save | output GB | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name, seconds, peak, written, diff = row
        if seconds is None:
            print(f"| {name} | failed | | | | | | {diff} |")
            continue
        print(f"| {name} | {seconds:.1f} | {peak / 2**30:.2f} | {peak / size:.2f} | {ratio(row, 'onnxslim')} "
              f"| {ratio(row, 'onnx load+save')} | {written / 1e9:.2f} | {diff} |")

if __name__ == "__main__":
    main()
