"""The `edgegraph` command: `opt`, `info`, `bench`, `check`, `merge`, `lower`, `passes`.

Exit codes: 0 success; 2 a user error (bad file, pass, option or data: one line on stderr);
1 an internal error (a pass crashed or broke the model: one line, `--debug` shows the
traceback); 128+N for signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP). Output files are written
atomically and only once everything succeeded, so a failed or interrupted run leaves no partial
file or temporary file and never touches the input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence

import edgegraph
from edgegraph import checks, files
from edgegraph.errors import NAME_LIMIT, EdgegraphError, PassFailure, one_line, shown
from edgegraph.targets import available_targets

logger = logging.getLogger("edgegraph")


STRICT_EXIT = 3  # `check --strict`: some target does not run the whole model in one partition


class UsageError(EdgegraphError):
    """Bad command-line syntax (what argparse reports)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every user error is one line."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    # First of all, so that a signal at any moment, imports included, ends the run the same way:
    # one line, exit 128+N, every temporary file (all in one private folder) removed.
    with files.interrupts_raise():
        try:
            files.written.clear()
            with files.private_tempdir():
                return _main(argv)
        except KeyboardInterrupt as exc:
            with files.shielded:  # a second signal does not cut the one line short
                signum = getattr(exc, "signum", None)
                what = f"after writing {', '.join(map(str, files.written))}" if files.written else "nothing was written"
                _fail(f"interrupted{f' ({signal.Signals(signum).name})' if signum else ''}; {what}")
                return 128 + (signum or signal.SIGINT)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowercaseLevel("edgegraph: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.ERROR if "--quiet" in argv else logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        # Only now the heavy imports (onnx, onnxruntime): start-up stays quick and interruptible.
        commands = importlib.import_module("edgegraph.commands")
        return commands.run(args, debug=debug)
    except EdgegraphError as exc:
        if debug:
            traceback.print_exc()
        hint = "" if exc.exit_code == 2 or debug else " (re-run with --debug for the traceback)"
        _fail(f"{one_line(exc)}{hint}")
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `edgegraph info m.onnx | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the promise is one line, not a traceback
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; re-run with --debug for the traceback"
        what = "" if isinstance(exc, PassFailure) else f"{type(exc).__name__}: "  # PassFailure names the pass
        _fail(f"internal error: {what}{one_line(exc)}{hint}")
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


class _LowercaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(f": {record.levelname}: ", f": {record.levelname.lower()}: ", 1)


def _fail(message: str) -> None:
    print(f"edgegraph: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    shapes = _Parser(add_help=False)
    shapes.add_argument("--fix-shape", metavar="NAME=DIMS", action="append", type=_fix_shape, default=[],
                        help="make a dynamic input static, e.g. input=1x3x224x224 (repeatable; at most "
                             f"{checks.MAX_INPUT_ELEMENTS} elements)")
    shapes.add_argument("--no-verify", action="store_true",
                        help="do not check in onnxruntime (the passes' outputs, the --fix-shape result)")
    timing = _Parser(add_help=False)
    timing.add_argument("--threads", type=_non_negative, default=0,
                        help="onnxruntime threads for calibration and timing (0 = all cores; default)")
    timing.add_argument("--runs", type=_non_negative, default=20,
                        help="timed runs per model, the median is reported (0 skips timing; default 20)")
    timing.add_argument("--warmup", type=_non_negative, default=3, help="untimed runs first (default 3)")

    parser = _Parser(prog="edgegraph", description="Graph-level optimiser for ONNX models on edge devices.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"edgegraph {edgegraph.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    opt = commands.add_parser("opt", parents=[common, shapes, timing], help="run passes on a model",
                              description="Run a pass pipeline; print and optionally save a before/after report.")
    opt.add_argument("model", metavar="IN.onnx")
    which = opt.add_mutually_exclusive_group(required=True)
    which.add_argument("-p", "--passes", metavar="PASSES", help="pass spec, e.g. 'cleanup,quant(method=entropy)'")
    which.add_argument("--recipe", metavar="R.json|R.yaml", help='recipe file: {"passes": ["cleanup", {"quant": {}}]}')
    opt.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the result")
    opt.add_argument("--calib", metavar="DATA.npz|IMAGE_DIR",
                     help=".npz with one array per input (N samples stacked on axis 0, or in the model's layout) or a folder of images")
    opt.add_argument("--eval", metavar="DATA.npz",
                     help="held-out data to measure accuracy on (a `labels` array adds label accuracy)")
    opt.add_argument("--target", default="cpu", help=f"deployment target ({', '.join(available_targets())})")
    opt.add_argument("--report", metavar="R.json", help="write the full report (stats, passes, metrics) as JSON")
    opt.add_argument("--seed", type=_non_negative, default=0, help="seed for random verification inputs and sampling")
    opt.add_argument("--quiet", action="store_true", help="print nothing but errors")
    floors = opt.add_argument_group("accuracy floors for lossy passes (each vs the model the pass was given)")
    floors.add_argument("--min-agreement", type=_fraction, metavar="A",
                        help="top-1 agreement to hold, e.g. 0.98: passes with a strength knob (quant: layers kept "
                             "in float) take the strongest setting that holds it; exit 2 when none does")
    floors.add_argument("--min-sqnr", type=_finite, metavar="DB", help="worst-output SQNR (dB) to hold, likewise")
    images = opt.add_argument_group("image-folder calibration (defaults follow the model's input shape)")
    images.add_argument("--image-size", type=_dims, metavar="H[xW]", help="model input size")
    images.add_argument("--resize", type=_non_negative, metavar="N",
                        help="shorter side before the centre crop (0 resizes straight to the input size)")
    images.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="per channel, after --scale")
    images.add_argument("--std", type=_floats, metavar="S[,S,S]", help="per channel, after --scale")
    images.add_argument("--scale", type=float, metavar="F", help="pixel multiplier before mean/std (default 1/255)")
    images.add_argument("--layout", choices=["NCHW", "NHWC"])
    images.add_argument("--channels", choices=["RGB", "BGR", "L"])
    opt.set_defaults(command_name="opt")

    info = commands.add_parser("info", parents=[common, shapes], help="show a model's statistics",
                               description="Ops, parameters, size, MACs, inputs and outputs of a model.")
    info.add_argument("model", metavar="IN.onnx")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--top", type=_non_negative, default=10, help="how many of the costliest nodes to list")
    info.add_argument("--groups", action="store_true",
                      help="also list the channel coupling groups (what `prune` can cut) and why a group cannot be cut")
    info.set_defaults(command_name="info")

    bench = commands.add_parser("bench", parents=[common, shapes, timing], help="time models and compare outputs",
                                description="Latency medians of models, and their agreement with the first one.")
    bench.add_argument("models", metavar="IN.onnx", nargs="+")
    bench.add_argument("--calib", metavar="DATA.npz|IMAGE_DIR",
                       help="inputs to time and compare on (a `labels` array adds label accuracy)")
    bench.add_argument("--seed", type=_non_negative, default=0, help="seed for random inputs")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(command_name="bench")

    check = commands.add_parser("check", parents=[common, shapes], help="which nodes a target runs, and why not",
                                description="Unsupported nodes per target with the reason and the rewrite that "
                                            "fixes each, the share of nodes and MACs supported, the partitions.")
    check.add_argument("model", metavar="IN.onnx")
    check.add_argument("--target", default="all", help=f"a profile ({', '.join(available_targets())}) or 'all' (default)")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.add_argument("--strict", action="store_true",
                       help=f"exit {STRICT_EXIT} unless every target checked runs the whole model in one partition")
    check.add_argument("--as-given", action="store_true",
                       help="check the graph as given, not after onnxruntime's basic optimisations "
                            "(what onnxruntime's execution providers see)")
    check.set_defaults(command_name="check")

    merge = commands.add_parser("merge", parents=[common, timing], help="merge task models sharing a backbone",
                                description="Join models into one graph that computes what they share once "
                                            "(outputs TASK/OUTPUT); check every task's outputs.")
    merge.add_argument("models", metavar="IN.onnx", nargs="+")
    merge.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the merged model")
    merge.add_argument("--report", metavar="R.json", help="write the report (sharing, stats, checks) as JSON")
    merge.add_argument("--name", metavar="FILE=TASK", action="append", default=[], type=_pair,
                       help="task name of a model (default its file stem), the prefix of its outputs (repeatable)")
    merge.add_argument("--input-map", metavar="TASK:IN=TASK:IN", action="append", default=[],
                       help="feed one task's input from an earlier task's, e.g. b:images=a:data (repeatable)")
    merge.add_argument("--tolerance", type=_finite, default=0.0, metavar="T",
                       help="weights within T (relative to their largest magnitude) count as equal (default 0: exact)")
    merge.add_argument("--average", action="store_true",
                       help="with --tolerance: near-equal weights take their mean (default: the first model's)")
    merge.add_argument("--min-sqnr", type=_finite, metavar="DB",
                       help="with --tolerance: refuse when a task's worst output SQNR vs its own model falls below "
                            "DB (default 40)")
    merge.add_argument("--calib", metavar="[TASK=]DATA", action="append", default=[],
                       help="inputs of the merged model (.npz or image folder) to check the tasks on and time, or "
                            "TASK=DATA per task for its own inputs (repeatable; default: seeded random)")
    merge.add_argument("--seed", type=_non_negative, default=0, help="seed for random inputs")
    merge.add_argument("--no-verify", action="store_true",
                       help="do not check each task's outputs against its own model in onnxruntime")
    merge.add_argument("--quiet", action="store_true", help="print nothing but errors")
    merge.set_defaults(command_name="merge")

    lower = commands.add_parser("lower", parents=[common], help="convert a model for a device runtime, checked in it",
                                description="Lower an ONNX model to a device runtime's format (ort-mobile: ORT "
                                            "format + reduced-operator config; openvino: OpenVINO IR; tflite: "
                                            "TFLite; nnapi, coreml, coreml-nn, qnn, xnnpack, tensorrt: the "
                                            "legalized ONNX their runtimes take), run it in that runtime (the "
                                            "legalized ONNX in onnxruntime's CPU provider) and compare its outputs "
                                            "with onnxruntime's; nothing is written unless they match.")
    lower.add_argument("model", metavar="IN.onnx", nargs="?")
    lower.add_argument("--target", metavar="T",
                       help="ort-mobile, openvino, tflite, nnapi, coreml, coreml-nn, qnn, xnnpack or tensorrt")
    lower.add_argument("-o", "--output", metavar="OUT",
                       help="OUT.ort, OUT.xml (+ OUT.bin), OUT.tflite or (the legalized ONNX) OUT.onnx")
    lower.add_argument("--calib", metavar="DATA.npz|IMAGE_DIR", help="real inputs to compare on (default: seeded random)")
    lower.add_argument("--fix-shape", metavar="NAME=DIMS", action="append", type=_fix_shape, default=[],
                       help="make a dynamic input static first (repeatable)")
    lower.add_argument("--min-sqnr", type=_finite, metavar="DB",
                       help="worst-output SQNR vs onnxruntime to accept (default 40 dB, 20 for Q/DQ models)")
    lower.add_argument("--precision", choices=["f32", "f16", "bf16"], default="f32", help="openvino: (default f32)")
    lower.add_argument("--style", choices=["runtime", "fixed"], default="runtime",
                       help="ort-mobile: optimisations saved for runtime (NNAPI/CoreML; default) or baked in")
    lower.add_argument("--legalize", metavar="OPTIONS", default="",
                       help="nnapi, coreml, ...: legalize's options, e.g. interface=target,finite=true")
    lower.add_argument("--setup", choices=["tflite"],
                       help="make the peer environment a target's converter runs in, and stop")
    lower.add_argument("--seed", type=_non_negative, default=0, help="seed for random inputs")
    lower.add_argument("--threads", type=_non_negative, default=0, help="runtime threads (0 = all cores)")
    lower.add_argument("--quiet", action="store_true", help="print nothing but errors")
    lower.set_defaults(command_name="lower")

    passes = commands.add_parser("passes", parents=[common], help="list the available passes and their options")
    passes.add_argument("--json", action="store_true", help="print JSON instead of text")
    passes.set_defaults(command_name="passes")
    return parser


def _fix_shape(text: str) -> tuple[str, list[int]]:
    name, eq, dims = text.rpartition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=DIMS like input=1x3x224x224, got '{shown(text, NAME_LIMIT)}'")
    return name, _dims(dims)


def _pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key or not value:
        raise argparse.ArgumentTypeError(f"expected FILE=NAME like a.onnx=det, got '{shown(text, NAME_LIMIT)}'")
    return key, value


def _dims(text: str) -> list[int]:
    sizes = text.replace(",", "x").split("x")
    if not all(_is_number(d) for d in sizes) or not all(int(d) > 0 for d in sizes):
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by 'x' like 1x3x224x224, got '{shown(text, NAME_LIMIT)}'")
    try:
        return checks.dims([int(d) for d in sizes], "shape")
    except EdgegraphError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _non_negative(text: str) -> int:
    if not _is_number(text):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{shown(text, NAME_LIMIT)}'")
    return int(text)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{shown(text, NAME_LIMIT)}'")
    return value


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got '{shown(text, NAME_LIMIT)}'")
    return value


def _is_number(text: str) -> bool:
    """Plain decimal digits, short enough for int() (which refuses thousands of digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 100


if __name__ == "__main__":
    sys.exit(main())
