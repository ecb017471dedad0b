"""SIGINT, SIGTERM and SIGHUP at any moment of `edgegraph opt`: one line, exit 128+N, nothing written,
no temporary file left (in the output folder or in $TMPDIR). Real processes, real signals.

The moments: start-up (while `edgegraph.commands` imports onnx and onnxruntime: numpy is mapped
into the process, which the command line itself never imports), a pass running (a pass
registered by the wrapper below, the way plugins register theirs, that says when it has
started), and the write (the staging folder beside the output exists while the staged result
is timed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_DIR, REPO

from edgegraph import cli

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists() or not hasattr(signal, "SIGHUP"),
                                reason="needs Linux signals and /proc")

MODEL = DEFAULT_DIR / "digits_cnn.onnx"
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

# `python -c WRAPPER opt ...`: the command line with one more pass, `test-wait`, which writes
# its `marker` file and then waits for a signal (holding, if asked, an onnxruntime session of a
# model "past 2 GiB", whose copy lives in an `edgegraph-ort-*` temporary folder).
WRAPPER = """
import dataclasses, sys, time
from pathlib import Path
import edgegraph
from edgegraph.pipeline import Pass, PassResult, option

@edgegraph.register_pass
@dataclasses.dataclass(frozen=True)
class Wait(Pass):
    name = "test-wait"
    summary = "Write `marker`, then wait (test pass)"
    marker: str = option("", "file to create once running")
    session: bool = option(False, "hold an onnxruntime session of the model as if it were past 2 GiB")

    def run(self, model, ctx):
        if self.session:
            from edgegraph import ir, runtime
            ir.PROTO_LIMIT = 20_000  # the digits CNN holds ~35 KB of weights
            held = runtime.session(model)  # a copy with external data in a temporary folder
        Path(self.marker).write_text("running")
        for _ in range(600):
            time.sleep(0.05)
        return PassResult(False)

from edgegraph.cli import main
sys.exit(main())
"""


def start(tmp_path: Path, argv: list, *, wrapper: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    env = os.environ | {"TMPDIR": str(tmp)}
    env.pop("PYTHONWARNINGS", None)
    command = [sys.executable, "-c", WRAPPER] if wrapper else [sys.executable, "-m", "edgegraph"]
    process = subprocess.Popen([*command, *map(str, argv)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return process, out_dir, tmp


def wait_for(condition, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited early with {process.returncode}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the moment to signal never came")
        time.sleep(0.002)


def maps(process: subprocess.Popen) -> str:
    try:
        return Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return ""


def assert_clean_end(process: subprocess.Popen, signum: int, out_dir: Path, tmp: Path, *,
                     wrapper: bool = False) -> None:
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr
    assert stderr == f"edgegraph: error: interrupted ({name}); nothing was written\n"
    assert list(out_dir.iterdir()) == []  # no output, no staging folder
    # No temporary folder of edgegraph's or onnxruntime's. (The wrapper imports onnxruntime
    # before `main` takes charge of temporary files, and so onnxruntime's `.ses` file lands in $TMPDIR.)
    assert [p.name for p in tmp.iterdir()] == ([".ses"] if wrapper and (tmp / ".ses").exists() else [])


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_during_start_up_imports(tmp_path, signum):
    # Many timed runs: wherever the signal lands after the imports, the run is far from done.
    process, out_dir, tmp = start(tmp_path, ["opt", MODEL, "-p", "cleanup", "-o", tmp_path / "out" / "out.onnx",
                                             "--runs", "1000000"])
    wait_for(lambda: "_multiarray_umath" in maps(process), process)
    assert_clean_end(process, signum, out_dir, tmp)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_while_a_pass_runs(tmp_path, signum):
    marker = tmp_path / "running"
    process, out_dir, tmp = start(tmp_path, ["opt", MODEL, "-p", f"cleanup,test-wait(marker={marker})",
                                             "-o", tmp_path / "out" / "out.onnx"], wrapper=True)
    wait_for(marker.exists, process)
    assert_clean_end(process, signum, out_dir, tmp, wrapper=True)


def test_signal_while_onnxruntime_holds_a_temporary_copy(tmp_path):
    marker = tmp_path / "running"
    process, out_dir, tmp = start(tmp_path, ["opt", MODEL, "-p", f"test-wait(marker={marker}, session=true)",
                                             "-o", tmp_path / "out" / "out.onnx"], wrapper=True)
    wait_for(marker.exists, process)
    assert len(list(tmp.glob("edgegraph-*/edgegraph-ort-*/model.onnx.data"))) == 1
    assert_clean_end(process, signal.SIGTERM, out_dir, tmp, wrapper=True)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_while_the_output_is_staged(tmp_path, signum):
    out = tmp_path / "out" / "out.onnx"
    process, out_dir, tmp = start(tmp_path, ["opt", MODEL, "-p", "cleanup", "-o", out, "--report",
                                             out.with_name("report.json"), "--runs", "1000000"])
    wait_for(lambda: any(p.name.startswith(".out.onnx.") for p in out.parent.iterdir()), process)
    assert_clean_end(process, signum, out_dir, tmp)


def test_ctrl_c_while_importing_the_commands_is_one_line(capsys, monkeypatch):
    """The heavy import happens after the arguments are parsed; a KeyboardInterrupt inside it (the
    user pressing Ctrl-C while onnxruntime loads) is the same one line and exit 130."""
    def interrupted_import(name, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted_import)
    code = cli.main(["opt", str(MODEL), "-p", "cleanup", "-o", "unused.onnx"])
    _, err = capsys.readouterr()
    assert (code, err) == (130, "edgegraph: error: interrupted; nothing was written\n")
