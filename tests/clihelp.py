"""Helpers for tests that run the `edgegraph` command: in-process runs, folder snapshots, and a
worker process that runs hostile inputs with a time and memory bound.

`python tests/clihelp.py --serve ...` is the worker's own entry point (see `Worker`).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`edgegraph ARGS` in this process: (exit code, stdout, stderr)."""
    from edgegraph.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, folder: Path, argv, phrase: str, *, inputs=(), stdout_empty: bool = False) -> str:
    """Run `edgegraph ARGV` in this process and check the promise for bad input: exit 2, one
    `edgegraph: error:` line containing `phrase` and no traceback, nothing written or changed
    under `folder`, the `inputs` (files elsewhere) unchanged, and, with `stdout_empty`, nothing
    on stdout. Returns the error line."""
    before, digests = snapshot(folder), {Path(p): digest(p) for p in inputs}
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err[:3000]
    assert err.count("\n") == 1 and err.startswith("edgegraph: error: ") and "Traceback" not in err, err[:3000]
    assert phrase in err, err
    assert not (stdout_empty and out), out[:3000]
    assert snapshot(folder) == before  # no output, no stray file, inputs unchanged
    assert {p: digest(p) for p in digests} == digests
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path, *, inodes: bool = False) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too, symlinks not followed): relative path ->
    sha256 of a file (with its inode number, if `inodes`: a file replaced by an identical copy
    differs then), 'dir', '-> target' of a symlink, or the kind of a FIFO or device. Equal
    snapshots: nothing was written."""
    folder = Path(folder)
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            elif not path.is_file():  # a FIFO or device: reading it would block or never end
                found[key] = f"special {stat.filemode(path.lstat().st_mode)}"
            else:
                found[key] = f"{digest(path)} inode {path.stat().st_ino}" if inodes else digest(path)
    return found


# ---------------------------------------------------------------------------------------------
# A worker process for hostile inputs


@dataclasses.dataclass
class Outcome:
    """How one `edgegraph` run in the worker ended."""

    code: int | None  # the exit code main() returned; None when it did not return (see `problem`)
    out: str
    err: str
    seconds: float
    problem: str = ""  # a hang, a crash of the process, an exception that escaped main()
    err_bytes: int = 0  # the size of all of stderr (`err` holds at most its first 200 kB)
    opened: list[str] = dataclasses.field(default_factory=list)  # watched paths Python opened


class Worker:
    """Runs `edgegraph.cli.main(argv)` in one long-lived Python process, a run at a time.

    Runs cost what an in-process call costs (no interpreter start-up), but a hang is cut off
    after `timeout` seconds, a native crash (SIGSEGV or SIGFPE in onnxruntime) or a runaway
    allocation (address space capped at `memory_bytes`) ends only the worker, which is started
    again for the next run. stdout and stderr are captured at the file-descriptor level, so
    what native code prints counts too. Every path Python opens under one of `watch` folders
    (or under /dev) is reported in `Outcome.opened`.
    """

    def __init__(self, scratch: Path, *, watch=(), timeout: float = 20.0, memory_bytes: int = 6 * 2**30):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.watch = [str(Path(w).resolve()) for w in watch]
        self.timeout, self.memory_bytes = timeout, memory_bytes
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _start(self) -> None:
        self.starts += 1
        for name in ("hang.txt", "crash.txt"):
            (self.scratch / name).write_text("")
        env = os.environ | {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.scratch), str(self.memory_bytes), *self.watch],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.scratch / "worker.err", "ab"),
            env=env, cwd=self.scratch)
        self._request({"op": "ping"}, timeout=120)  # start-up imports onnx and onnxruntime

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _request(self, request: dict, timeout: float) -> dict:
        os.write(self.proc.stdin.fileno(), (json.dumps(request) + "\n").encode())
        reply, deadline = b"", time.monotonic() + timeout
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            reply += chunk
        return json.loads(reply)

    def run(self, argv, *, cwd: Path) -> Outcome:
        """Run `edgegraph ARGV` with the current directory `cwd`."""
        if self.proc is None:
            self._start()
        start = time.monotonic()
        request = {"op": "run", "argv": [str(a) for a in argv], "cwd": str(cwd), "timeout": self.timeout}
        try:
            reply = self._request(request, self.timeout + 2)
        except TimeoutError:
            self.close()
            return Outcome(None, "", "", time.monotonic() - start,
                           f"no exit after {self.timeout:.0f} s (hang); where it was: {self._dump('hang.txt')}")
        except EOFError:
            code = self.proc.wait()
            self.proc = None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return Outcome(None, "", "", time.monotonic() - start,
                           f"the process died ({how}): {self._dump('crash.txt')}")
        return Outcome(reply["code"], reply["out"], reply["err"], reply["seconds"], reply["problem"],
                       err_bytes=reply["err_bytes"], opened=reply["opened"])

    def check_model(self, path: Path) -> str:
        """'' when onnx's full checker passes and onnxruntime loads the model at `path`, else why not."""
        if self.proc is None:
            self._start()
        try:
            return self._request({"op": "check", "path": str(path)}, self.timeout + 10)["problem"]
        except (TimeoutError, EOFError):
            self.close()
            return f"checking the output killed or hung the worker: {self._dump('crash.txt')}"

    def _dump(self, name: str) -> str:
        """The innermost frames of the main thread in a faulthandler dump, on one line."""
        text = (self.scratch / name).read_text(errors="replace")
        threads = text.split("\n\n") if text.strip() else [""]
        # A crash dump marks the crashing thread; a timeout dump lists the main thread last.
        main = next((t for t in threads if "Current thread" in t), threads[-1])
        frames = [line.strip() for line in main.splitlines() if line.strip().startswith("File ")]
        return " <- ".join(frames[:4]) or "(no Python traceback)"


def _serve(scratch: str, memory_bytes: int, watch: list[str]) -> None:
    """The worker's loop: one JSON request per line on stdin, one JSON reply per line."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    replies = os.fdopen(os.dup(1), "w")
    real_out, real_err = os.dup(1), os.dup(2)
    hang = open(Path(scratch) / "hang.txt", "w")
    faulthandler.enable(open(Path(scratch) / "crash.txt", "w"), all_threads=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import edgegraph.commands  # noqa: F401 - the heavy imports, once
    from edgegraph.cli import main

    opened: list[str] = []
    watched = tuple(w.rstrip("/") + "/" for w in watch) + ("/dev/",)
    own = str(Path(scratch).resolve()) + "/"  # the capture files

    def audit(event, args):
        if event != "open" or not isinstance(args[0], int | str | bytes):
            return
        try:  # a file descriptor opened in C (onnx's external data) is seen when Python wraps it
            path = (os.readlink(f"/proc/self/fd/{args[0]}") if isinstance(args[0], int)
                    else os.path.realpath(os.fsdecode(args[0])))
        except OSError:
            return
        # Directories are opened to list or remove them, not read; shutil.rmtree opens them
        # relative to a dir_fd, which realpath cannot see (so they seem not to exist).
        if (path.startswith(watched) and not path.startswith(own) and path not in ("/dev/null", "/dev/urandom")
                and os.path.exists(path) and not os.path.isdir(path)):
            opened.append(path)

    sys.addaudithook(audit)
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"code": None, "out": "", "err": "", "seconds": 0.0, "problem": "", "opened": [], "err_bytes": 0}
        if request["op"] == "check":
            reply["problem"] = _check(request["path"])
        elif request["op"] == "run":
            os.chdir(request["cwd"])
            opened.clear()
            out_path, err_path = Path(scratch) / "out.txt", Path(scratch) / "err.txt"
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
                faulthandler.dump_traceback_later(request["timeout"], file=hang)
                start = time.perf_counter()
                try:
                    reply["code"] = main(request["argv"])
                except BaseException as exc:  # noqa: BLE001 - what escapes main() is the finding
                    reply["problem"] = f"{type(exc).__name__} escaped main(): {str(exc)[:300]}"
                finally:
                    reply["seconds"] = time.perf_counter() - start
                    faulthandler.cancel_dump_traceback_later()
                    sys.stdout.flush(), sys.stderr.flush()
                    os.dup2(real_out, 1), os.dup2(real_err, 2)
            reply["out"] = out_path.read_bytes()[:200_000].decode(errors="replace")
            reply["err"] = err_path.read_bytes()[:200_000].decode(errors="replace")
            reply["err_bytes"] = err_path.stat().st_size
            reply["opened"] = sorted(set(opened))
            os.chdir(scratch)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _check(path: str) -> str:
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(path, full_check=True)
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return ""


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
