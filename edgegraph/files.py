"""The files a run writes: one outcome, never over an input, nothing left behind.

Outputs are staged in a hidden folder beside their destination (so that moving them into place
is a rename on one file system) and `publish`ed together: all of them, or none. SIGINT, SIGTERM
and SIGHUP become `Interrupted` exceptions (see `interrupts_raise`), so the clean-up code that
runs for Ctrl-C runs for them too; moves, roll-backs and clean-ups are `shielded`, a signal that
arrives meanwhile takes effect once they are complete. Light module: the command line loads it
before anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from edgegraph.errors import EdgegraphError

INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The process got an interrupting signal (number `signum`); handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received while shielded, acted on when the outermost shield ends.
_deferred: list[int] = []
_shield_depth = 0


def _on_signal(signum, frame) -> None:
    if _shield_depth:
        _deferred.append(signum)
    else:
        raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While active, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread.

    Signals the parent chose to ignore (`nohup` ignores SIGHUP) stay ignored. Outside the main
    thread (where Python cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in INTERRUPTS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Shield:
    """`with shielded:` defers interrupting signals to the end of the block (re-entrant)."""

    def __enter__(self) -> None:
        global _shield_depth
        _shield_depth += 1

    def __exit__(self, kind, exc, traceback) -> bool:
        global _shield_depth
        _shield_depth -= 1
        if _shield_depth or not _deferred:
            return False
        signum = _deferred[0]
        _deferred.clear()
        if isinstance(exc or sys.exc_info()[1], KeyboardInterrupt):  # already on the way out
            return False
        raise Interrupted(signum)


shielded = _Shield()


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """Every temporary file of the process goes into one new folder for as long as this is
    active, and is removed with it at the end, however the run ends: edgegraph's (onnxruntime
    copies of big models, passes' scratch space) through `tempfile`, native libraries' through
    $TMPDIR (onnxruntime writes a `.ses` file there when it is imported)."""
    previous, previous_env, folder = tempfile.tempdir, os.environ.get("TMPDIR"), None
    try:
        with shielded:
            folder = Path(tempfile.mkdtemp(prefix="edgegraph-"))
            tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
        yield folder
    finally:
        with shielded:
            tempfile.tempdir = previous
            if previous_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous_env
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staging(destination: Path) -> Iterator[Path]:
    """A new hidden folder beside `destination`, removed with whatever is left in it."""
    folder = None
    try:
        with shielded:
            try:
                folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
            except OSError as exc:
                raise EdgegraphError(f"cannot write in {destination.parent}: {exc.strerror or exc}") from None
        yield folder
    finally:
        if folder is not None:
            with shielded:
                shutil.rmtree(folder, ignore_errors=True)


# The files `publish(..., outcome=True)` put in place: what the run has written for good (so that
# a signal after that is not reported as "nothing was written").
written: list[Path] = []


def publish(moves: Sequence[tuple[Path, Path]], *, outcome: bool = False) -> None:
    """Move each staged file to its destination (staged in the destination's folder): all of
    them or, when a move fails or a signal arrives, none. Files that were replaced are put back.
    Raises what made it fail (OSError, Interrupted). `outcome`: these are the run's results."""
    done: list[tuple[Path, Path | None]] = []  # (destination, the file it replaced, kept aside)
    failed = None
    with shielded:
        try:
            for index, (staged, destination) in enumerate(moves):
                failed = destination
                previous = None
                if os.path.lexists(destination):
                    previous = staged.parent / f".replaced-{index}-{destination.name}"
                    try:  # a second name for the old file: the destination never goes missing
                        os.link(destination, previous, follow_symlinks=False)
                    except OSError:  # no hard links on this file system
                        os.replace(destination, previous)
                done.append((destination, previous))
                os.replace(staged, destination)
            if _deferred:
                raise Interrupted(_deferred[0])
            if outcome:
                written.extend(destination for _, destination in moves)
        except BaseException as exc:
            for moved, previous in reversed(done):
                with contextlib.suppress(OSError):
                    if previous is None:
                        os.unlink(moved)
                    else:
                        os.replace(previous, moved)
            if isinstance(exc, OSError):  # name the destination, not the hidden file
                raise OSError(exc.errno, exc.strerror or str(exc), str(failed)) from exc
            raise


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` leads to (through symlinks), None if there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one existing file (the same path, a symlink or a hard link)."""
    ia = identity(a)
    return ia is not None and ia == identity(b)


def files_in(path: Path) -> list[Path]:
    """`path` if it is a file, the files directly in it if it is a folder."""
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path]


def refuse_overwriting(outputs: Mapping[str, Path], inputs: Mapping[str, Iterable[Path]], *,
                       replaceable: Mapping[str, Iterable[Path]] | None = None) -> None:
    """Refuse (EdgegraphError) an output ({what: path}) that is one of the input files ({what:
    paths}) by path, symlink or hard link, unless it is one of the files `replaceable[what]`
    lists; and two outputs that are one file."""
    owners: dict[tuple[int, int], str] = {}
    for what, paths in inputs.items():
        for path in paths:
            found = identity(path)
            if found is not None:
                owners.setdefault(found, f"{what} ({path})")
    seen: dict[object, str] = {}
    for what, path in outputs.items():
        found = identity(path)
        allowed = {identity(p) for p in (replaceable or {}).get(what, ())}
        if found in owners and found not in allowed:
            raise EdgegraphError(f"{what} must not name {owners[found]}: it would be overwritten; "
                                 "choose another path")
        key = found or os.path.realpath(path)
        if key in seen:
            raise EdgegraphError(f"{what} must not name the same file as {seen[key]}")
        seen[key] = what
