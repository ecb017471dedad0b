"""The same input, options and seed give byte-identical output, however busy the machine is.

Nothing a pass decides may depend on how long something took: the model and the report (less
its timing fields) must come out the same with the machine idle, loaded, or seen through a
clock that runs thousands of times faster (what a very slow machine looks like to the code).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clihelp import run_cli
from conftest import DEFAULT_DIR, model_id, shared_model_paths

# Report fields that are measurements of time (they differ run to run by design).
TIMING_KEYS = {"seconds", "latency_ms", "latency_note", "latency", "timings_s"}
# How much faster the fake clock runs: the calibration of the digits model then seems to take
# about a second per sample instead of ~0.1 ms (a machine 10^4 times slower or busier).
CLOCK_SPEEDUP = 1e4

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"
CALIB = DEFAULT_DIR / "digits_calib.npz"


@contextlib.contextmanager
def busy_cores(seconds_before: float = 1.0):
    """Processes that keep every core busy (two per core) while the block runs, started
    `seconds_before` it so the machine is loaded in between runs too."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(seconds_before)
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


@contextlib.contextmanager
def fast_clock(monkeypatch, speedup: float = CLOCK_SPEEDUP):
    """perf_counter, monotonic and time run `speedup` times faster than real time."""
    with monkeypatch.context() as patch:
        for name in ("perf_counter", "monotonic", "time"):
            real = getattr(time, name)
            start = real()
            patch.setattr(time, name, lambda real=real, start=start: start + (real() - start) * speedup)
        yield


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def opt_outputs(capsys, folder: Path, *args) -> tuple[dict[str, bytes], dict | None]:
    """Run `edgegraph opt ... -o folder/out.onnx` (and --report folder/report.json if asked):
    ({file name: bytes} of the model and its sidecars, the report less its timing fields)."""
    folder.mkdir()
    report = folder / "report.json"
    argv = [a if a != "REPORT" else report for a in args]
    code, _, err = run_cli(capsys, *argv, "-o", folder / "out.onnx", "--quiet")
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p != report}
    return files, without_timing(json.loads(report.read_text())) if report.exists() else None


def assert_same(first, second, what: str) -> None:
    (files_a, report_a), (files_b, report_b) = first, second
    assert sorted(files_a) == sorted(files_b), f"{what}: different files {sorted(files_a)} vs {sorted(files_b)}"
    for name in files_a:
        assert files_a[name] == files_b[name], f"{what}: {name} differs between two identical runs"
    if report_a is not None:
        # Paths differ only by the run's folder; the rest must be identical.
        a = json.dumps(report_a, sort_keys=True, indent=1).replace("/run1/", "/RUN/").splitlines()
        b = json.dumps(report_b, sort_keys=True, indent=1).replace("/run2/", "/RUN/").splitlines()
        diff = [f"{x.strip()} | {y.strip()}" for x, y in zip(a, b) if x != y][:8]
        assert a == b, f"{what}: the reports differ (less timing fields): {diff}"


QUANT = ["opt", DIGITS, "-p", "cleanup,quant", "--calib", CALIB, "--report", "REPORT"]


def test_quant_is_byte_identical_with_the_machine_loaded(capsys, tmp_path):
    first = opt_outputs(capsys, tmp_path / "run1", *QUANT)
    with busy_cores():
        second = opt_outputs(capsys, tmp_path / "run2", *QUANT)
    assert_same(first, second, "cleanup,quant on digits, idle vs loaded")


def test_quant_is_byte_identical_on_a_slow_machine(capsys, tmp_path, monkeypatch):
    """What a machine too slow or too busy for the pass's time budgets gives: same bytes."""
    first = opt_outputs(capsys, tmp_path / "run1", *QUANT)
    with fast_clock(monkeypatch):
        second = opt_outputs(capsys, tmp_path / "run2", *QUANT)
    assert_same(first, second, f"cleanup,quant on digits, real clock vs one {CLOCK_SPEEDUP:g}x faster")


SHARED = shared_model_paths()


@pytest.mark.parametrize("path", SHARED or [None], ids=lambda p: model_id(p) if p else "no-shared-models")
def test_cleanup_of_real_models_is_byte_identical(capsys, tmp_path, path):
    if path is None:
        pytest.skip("../shared/models not found: the real models live next to the repo")
    # Verification is seeded and does not change the output; it is left out to keep this quick,
    # as is loading the machine (that costs seconds per model here; the quant tests above do it).
    args = ["opt", path, "-p", "cleanup", "--no-verify", "--runs", "0"]
    first = opt_outputs(capsys, tmp_path / "run1", *args)
    second = opt_outputs(capsys, tmp_path / "run2", *args)
    assert_same(first, second, f"cleanup on {model_id(path)}")
