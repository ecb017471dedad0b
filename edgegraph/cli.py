"""The `edgegraph` command: `opt`, `info`, `bench`, `passes`.

Exit codes: 0 success; 2 a user error (bad file, pass, option or data: one line on stderr);
1 an internal error (a pass crashed or broke the model: one line, `--debug` shows the
traceback); 130 interrupted. Output files are written atomically and only once everything
succeeded, so a failed or interrupted run leaves no partial file and never touches the input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path

import onnx_graphsurgeon as gs

import edgegraph
from edgegraph import analysis, ir, runtime, spec
from edgegraph.analysis import ModelStats, human
from edgegraph.errors import EdgegraphError, ModelLoadError, PassFailure
from edgegraph.pipeline import PipelineReport, run_pipeline, verification_data
from edgegraph.targets import available_targets

logger = logging.getLogger("edgegraph")

# Models larger than this together are timed one after the other, each session released before
# the next is made, rather than in turns with all of them held in memory at once.
HOLD_TOGETHER_BYTES = 2 * 2**30


class UsageError(EdgegraphError):
    """Bad command-line syntax (what argparse reports)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every user error is one line."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowercaseLevel("edgegraph: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.ERROR if "--quiet" in argv else logging.WARNING)
    # graphsurgeon prints its warnings to stdout, which must stay clean (`info --json | jq`); its
    # errors arrive as exceptions anyway.
    gs_logger, gs_severity = gs.logger.G_LOGGER, gs.logger.G_LOGGER.severity
    if not debug:
        gs_logger.severity = gs_logger.CRITICAL + 1
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
        return 130
    except EdgegraphError as exc:
        if debug:
            traceback.print_exc()
        hint = "" if exc.exit_code == 2 or debug else " (re-run with --debug for the traceback)"
        _fail(f"{_one_line(exc)}{hint}")
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
        _fail(f"internal error: {what}{_one_line(exc)}{hint}")
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        gs_logger.severity = gs_severity


class _LowercaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(f": {record.levelname}: ", f": {record.levelname.lower()}: ", 1)


def _fail(message: str) -> None:
    print(f"edgegraph: error: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    shapes = _Parser(add_help=False)
    shapes.add_argument("--fix-shape", metavar="NAME=DIMS", action="append", type=_fix_shape, default=[],
                        help="make a dynamic input static, e.g. input=1x3x224x224 (repeatable)")
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
                     help=".npz with one array per input (axis 0 = samples) or a folder of images")
    opt.add_argument("--eval", metavar="DATA.npz",
                     help="held-out data to measure accuracy on (a `labels` array adds label accuracy)")
    opt.add_argument("--target", default="cpu", help=f"deployment target ({', '.join(available_targets())})")
    opt.add_argument("--report", metavar="R.json", help="write the full report (stats, passes, metrics) as JSON")
    opt.add_argument("--no-verify", action="store_true", help="do not check each pass's outputs in onnxruntime")
    opt.add_argument("--seed", type=int, default=0, help="seed for random verification inputs and sampling")
    opt.add_argument("--quiet", action="store_true", help="print nothing but errors")
    images = opt.add_argument_group("image-folder calibration (defaults follow the model's input shape)")
    images.add_argument("--image-size", type=_dims, metavar="H[xW]", help="model input size")
    images.add_argument("--resize", type=_non_negative, metavar="N",
                        help="shorter side before the centre crop (0 resizes straight to the input size)")
    images.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="per channel, after --scale")
    images.add_argument("--std", type=_floats, metavar="S[,S,S]", help="per channel, after --scale")
    images.add_argument("--scale", type=float, metavar="F", help="pixel multiplier before mean/std (default 1/255)")
    images.add_argument("--layout", choices=["NCHW", "NHWC"])
    images.add_argument("--channels", choices=["RGB", "BGR", "L"])
    opt.set_defaults(run=cmd_opt)

    info = commands.add_parser("info", parents=[common, shapes], help="show a model's statistics",
                               description="Ops, parameters, size, MACs, inputs and outputs of a model.")
    info.add_argument("model", metavar="IN.onnx")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--top", type=_non_negative, default=10, help="how many of the costliest nodes to list")
    info.set_defaults(run=cmd_info)

    bench = commands.add_parser("bench", parents=[common, shapes, timing], help="time models and compare outputs",
                                description="Latency medians of models, and their agreement with the first one.")
    bench.add_argument("models", metavar="IN.onnx", nargs="+")
    bench.add_argument("--calib", metavar="DATA.npz|IMAGE_DIR",
                       help="inputs to time and compare on (a `labels` array adds label accuracy)")
    bench.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(run=cmd_bench)

    passes = commands.add_parser("passes", parents=[common], help="list the available passes and their options")
    passes.add_argument("--json", action="store_true", help="print JSON instead of text")
    passes.set_defaults(run=cmd_passes)
    return parser


def _fix_shape(text: str) -> tuple[str, list[int]]:
    name, eq, dims = text.rpartition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=DIMS like input=1x3x224x224, got '{text}'")
    return name, _dims(dims)


def _dims(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace(",", "x").split("x")]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by 'x' like 1x3x224x224, got '{text}'")
    return dims


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return int(text)


def _shapes(args) -> dict[str, list[int]]:
    return dict(args.fix_shape)


def _preprocess(args) -> dict:
    given = {"size": args.image_size, "resize": args.resize, "mean": args.mean, "std": args.std,
             "scale": args.scale, "layout": args.layout, "channels": args.channels}
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("resize") == 0:
        given["resize"] = None
    if "size" in given and len(given["size"]) == 1:
        given["size"] = given["size"] * 2
    return given


def _load(path: str) -> ir.Model:
    try:
        return ir.load(path)
    except OSError as exc:  # permissions, a vanished file: the user's to fix
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# opt


def cmd_opt(args) -> int:
    source, output = Path(args.model), Path(args.output)
    report_path = Path(args.report) if args.report else None
    _check_writable(output, "output")
    if report_path:
        _check_writable(report_path, "--report")
        if _same_file(report_path, source) or report_path.resolve() == output.resolve():
            raise EdgegraphError("--report must not name the input or output model")
    pipeline = edgegraph.parse_passes(Path(args.recipe) if args.recipe else args.passes)
    model = _load(args.model)
    if args.fix_shape:
        ir.fix_input_shapes(model, _shapes(args))
    ctx = edgegraph.make_context(model, calib=args.calib, target=args.target, seed=args.seed,
                                 verify=not args.no_verify, progress=not args.quiet, threads=args.threads,
                                 preprocess=_preprocess(args))
    eval_data = edgegraph.as_calibration(args.eval, model) if args.eval else None

    start = time.perf_counter()
    result, report = run_pipeline(model, pipeline, ctx)
    seconds = time.perf_counter() - start

    # The result is exported once, to a staging folder beside the output, and every onnxruntime
    # session loads it (and the input model) from disk: onnxruntime maps external data instead
    # of taking a copy, so measuring a multi-GB model costs little memory. The statistics work
    # on the graphs without their weights. The staged file moves into place once all succeeded.
    with _staging(output) as staging:
        staged = _save(result, staging / "result" / output.name, output)
        # What onnxruntime runs as the input model: its file, unless --fix-shape changed it.
        original = _save(model, staging / "input" / source.name, output) if args.fix_shape else source
        sizes = [analysis.disk_size(source), sum(f.stat().st_size for f in staged.parent.iterdir())]
        before, after = _measured_stats([model, result], [original, staged], ctx.calibration, args, sizes=sizes)
        accuracy, accuracy_note = _accuracy(model, [original, staged], ctx, eval_data, args)
        data = {
            "edgegraph": edgegraph.__version__,
            "input": str(source),
            "output": str(output),
            "pipeline": spec.format_pipeline(pipeline),
            "target": ctx.target.name,
            "seed": args.seed,
            "calibration": ({"source": ctx.calibration.source, "samples": len(ctx.calibration)}
                            if ctx.calibration else None),
            "fixed_shapes": _shapes(args),
            "seconds": seconds,
            "before": before,
            "after": after,
            "passes": [dataclasses.asdict(p) | {"metrics": p.metrics} for p in report.passes],
            "accuracy": accuracy,
            "accuracy_note": accuracy_note,
        }
        report_text = json.dumps(analysis.jsonable(data), indent=2) + "\n" if report_path else None
        _write(lambda: _publish(staged, output), output)
    if report_path:
        _write(lambda: _atomic_write_text(report_path, report_text), report_path)
    if not args.quiet:
        print(format_opt_summary(data, before, after, report, accuracy))
    return 0


def _check_writable(path: Path, what: str) -> None:
    if path.is_dir():
        raise EdgegraphError(f"{what} path {path} is a directory")
    if not path.parent.resolve().is_dir():
        raise EdgegraphError(f"{what} folder {path.parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _write(save, path: Path):
    try:
        return save()
    except OSError as exc:
        raise EdgegraphError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _staging(output: Path):
    """A temporary folder beside `output` (same file system, so moving out of it is atomic),
    removed with whatever is left in it."""
    folder = Path(_write(lambda: tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent), output))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _save(model: ir.Model, path: Path, output: Path) -> Path:
    """Save `model` alone in a new folder at `path` (external data beside it when it needs some)."""
    path.parent.mkdir()
    return _write(lambda: ir.save(model, path), output)


def _publish(staged: Path, output: Path) -> None:
    """Move a model saved by `_save` into place: its external data file first, then the model."""
    for file in sorted(staged.parent.iterdir(), key=lambda f: f == staged):
        os.replace(file, output.parent / file.name)


def _atomic_write_text(path: Path, text: str) -> None:
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _measured_stats(models: Sequence[ir.Model], files: Sequence[Path], data, args, *,
                    sizes: Sequence[int]) -> list[ModelStats]:
    """Static stats plus latency per model, timed from its file on the first data sample (or
    seeded random inputs)."""
    feeds = [_feeds(model, data, args) for model in models]
    stats = [analysis.model_stats(model, size_bytes=size, feeds=f if data is not None else None)
             for model, size, f in zip(models, sizes, feeds)]
    timed = [i for i, f in enumerate(feeds) if f is not None]
    latencies = analysis.measure_latency([files[i] for i in timed], [feeds[i] for i in timed], runs=args.runs,
                                         warmup=args.warmup, threads=args.threads, in_turns=_in_turns(sizes))
    for i, (ms, note) in zip(timed, latencies):
        stats[i].latency_ms, stats[i].latency_note = ms, note
    return stats


def _feeds(model, data, args):
    try:
        return analysis.sample_feeds(model, data, seed=args.seed)
    except EdgegraphError as exc:  # e.g. random data for an input type we cannot generate
        logger.warning("no inputs to time the model with: %s", exc)
        return None


def _in_turns(sizes: Sequence[int]) -> bool:
    """Whether models of these sizes are small enough to hold in onnxruntime together, to be
    timed in turns (else one after the other, one in memory at a time)."""
    return sum(sizes) <= HOLD_TOGETHER_BYTES


def _accuracy(model: ir.Model, files: Sequence[Path], ctx, eval_data, args) -> tuple[dict | None, str]:
    """(final model vs the input model, from their `files`, or None and why not), run as deployed:
    onnxruntime with all its optimizations, so integer kernels show their real error (pass
    verification runs without them). On --eval data when given, else on the verification samples."""
    if eval_data is None and args.no_verify:
        return None, "--no-verify"
    data = eval_data or verification_data(runtime.input_specs(model), ctx)
    try:
        measured = analysis.compare_models(*files, data, threads=args.threads,
                                           labels=analysis.load_labels(args.eval) if eval_data else None)
    except EdgegraphError as exc:
        return None, _one_line(exc)
    return {"data": data.source} | measured, ""


# ---------------------------------------------------------------------------------------------
# info, bench, passes


def cmd_info(args) -> int:
    stats = analysis.model_stats(_load(args.model), size_bytes=analysis.disk_size(args.model),
                                 fix_shapes=_shapes(args) or None)
    if args.json:
        print(json.dumps(analysis.jsonable({"model": args.model} | stats.as_dict()), indent=2))
    else:
        print(format_info(args.model, stats, top=args.top))
    return 0


def cmd_bench(args) -> int:
    models = [_load(path) for path in args.models]
    if args.fix_shape:
        for model in models:
            ir.fix_input_shapes(model, _shapes(args))
    # onnxruntime loads the files (mapping external data, no export) unless --fix-shape changed the models.
    runnable = models if args.fix_shape else args.models
    sizes = [analysis.disk_size(path) for path in args.models]
    data = edgegraph.as_calibration(args.calib, models[0]) if args.calib else None
    labels = analysis.load_labels(args.calib)
    feeds = [analysis.sample_feeds(model, data, seed=args.seed) for model in models]
    latencies = analysis.measure_latency(runnable, feeds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                                         in_turns=_in_turns(sizes))
    reference = analysis.model_outputs(runnable[0], data, threads=args.threads) if data is not None else None
    rows = []
    for i, (path, size, (ms, note)) in enumerate(zip(args.models, sizes, latencies)):
        row = {"model": path, "size_bytes": size, "latency_ms": ms, "latency_note": note}
        if reference is not None:
            outputs = reference if i == 0 else analysis.model_outputs(runnable[i], data, threads=args.threads)
            row |= {"samples": len(data)} | analysis.compare_outputs(reference, outputs, labels=labels)
        rows.append(row)
    if args.json:
        print(json.dumps(analysis.jsonable({"models": rows}), indent=2))
    else:
        print(format_bench(rows))
    return 0


def cmd_passes(args) -> int:
    described = [describe_pass(cls) for cls in edgegraph.list_passes()]
    if args.json:
        print(json.dumps(analysis.jsonable(described), indent=2))
        return 0
    lines = []
    for item in described:
        kind = "exact" if item["exact"] else "lossy"
        needs = f"; requires {', '.join(item['requires'])}" if item["requires"] else ""
        lines.append(f"{item['name']}  ({kind}{needs})")
        lines.append(f"    {item['summary']}")
        for opt in item["options"]:
            lines.append(f"    {opt['name']}: {opt['type']} = {opt['default']}")
            if opt["doc"]:
                lines.append(f"        {opt['doc']}")
        lines.append("")
    lines.append("Use: edgegraph opt IN.onnx -p 'name(option=value, ...),name2' -o OUT.onnx")
    print("\n".join(lines))
    return 0


def describe_pass(cls) -> dict:
    """Name, summary, exactness, requirements and documented options of a pass class."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    options = [
        {"name": f.name, "type": spec.describe_type(hints[f.name]),
         "default": spec._format_value(getattr(defaults, f.name)), "doc": f.metadata.get("doc", "")}
        for f in dataclasses.fields(cls)
    ]
    return {"name": cls.name, "summary": cls.summary, "exact": cls.exact, "requires": sorted(cls.requires),
            "options": options}


# ---------------------------------------------------------------------------------------------
# Text output


def _table(rows: list[list[str]], align: str) -> list[str]:
    """Columns padded to their widest cell; `align` has one of '<' or '>' per column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip() for row in rows]


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == after:
        return ""
    if before == 0:
        return "new"
    return f"{(after - before) / before * 100:+.1f}%"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _cosine(value: float) -> str:
    return f"{value:.6f}"


def _number(value, digits: int = 5) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def format_opt_summary(data: dict, before: ModelStats, after: ModelStats, report: PipelineReport,
                       accuracy: dict | None) -> str:
    lines = [f"{data['input']} -> {data['output']}",
             f"pipeline: {data['pipeline']}   target: {data['target']}   "
             f"calibration: {_calibration_text(data['calibration'])}", "", "passes"]
    for i, p in enumerate(report.passes, 1):
        worst = _worst(p.metrics)
        lines.append(f"  {i}. {p.spec}: {'changed' if p.modified else 'no change'} in {p.seconds:.2f}s"
                     f"{'; outputs ' + worst if worst else ''}")
        if p.stats:
            lines.append("     " + " ".join(f"{k}={_short(v)}" for k, v in p.stats.items()))
    lines.append("")
    rows = [["", "before", "after", "change"]]
    for label, b, a, text in [
        ("file size", before.size_bytes, after.size_bytes, lambda v: human(v, "B", binary=True)),
        ("params", before.params, after.params, human),
        ("MACs", before.macs, after.macs, human),
        ("nodes", before.nodes, after.nodes, str),
        ("quantized nodes", before.quantized_nodes, after.quantized_nodes, str),
        ("Q/DQ nodes", before.qdq_nodes, after.qdq_nodes, str),
        ("latency ms", before.latency_ms, after.latency_ms, _ms),
    ]:
        rows.append([label, text(b), text(a), _change(b, a)])
    lines += _table(rows, "<>>>")
    notes = [f"MACs with {before.shapes}" if before.shapes else "",
             f"MACs: {_unknown_macs(before)}" if before.macs is None else "",
             f"latency: {before.latency_note}",
             f"latency after: {after.latency_note}" if after.latency_ms is None and before.latency_ms else ""]
    lines += [f"  ({n})" for n in notes if n]
    lines.append("")
    lines += format_accuracy(accuracy, "accuracy vs the input model, as deployed (onnxruntime, all optimizations)",
                             data["accuracy_note"])
    return "\n".join(lines).rstrip()


def _calibration_text(calibration: dict | None) -> str:
    return "none" if not calibration else f"{calibration['source']} ({calibration['samples']} samples)"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple | dict) and len(str(value)) > 40:
        return f"<{len(value)} items>"
    return str(value)


def _worst(metrics: dict) -> str:
    if not metrics:
        return ""
    cos = min(m.cosine for m in metrics.values())
    sqnr = min(m.sqnr_db for m in metrics.values())
    top1 = [m.top1 for m in metrics.values() if m.top1 is not None]
    text = f"cosine {_cosine(cos)}, SQNR {_number(sqnr, 4)} dB"
    return text + (f", top-1 agreement {_percent(min(top1))}" if top1 else "")


def _unknown_macs(stats: ModelStats) -> str:
    return (f"{len(stats.unknown_mac_nodes)} of {len(stats.node_macs)} MAC nodes unknown: dynamic shapes or "
            "control flow; try --fix-shape NAME=DIMS")


def format_accuracy(accuracy: dict | None, title: str, missing: str = "") -> list[str]:
    if not accuracy:
        return [f"{title}: not measured ({missing or 'no data'})"]
    lines = [f"{title}, {accuracy['samples']} samples of {accuracy['data']}"]
    rows = [["output", "cosine", "SQNR dB", "top-1 agree", "max |err|"]]
    for name, m in accuracy["outputs"].items():
        rows.append([name, _cosine(m.cosine), _number(m.sqnr_db, 4), _percent(m.top1), _number(m.max_abs, 4)])
    lines += ["  " + line for line in _table(rows, "<>>>>")]
    labels = accuracy.get("label_accuracy")
    if labels and labels["reference"] is not None:
        lines.append(f"  label accuracy: {_percent(labels['reference'])} -> {_percent(labels['candidate'])}")
    return lines


def format_info(path: str, stats: ModelStats, *, top: int = 10) -> str:
    opsets = ", ".join(f"{domain} {version}" for domain, version in stats.opsets.items())
    macs = human(stats.macs)
    if stats.macs is None:
        macs += f" ({_unknown_macs(stats)})"
    elif stats.shapes:
        macs += f" ({stats.shapes})"
    rows = [
        ["model", path],
        ["producer", f"{stats.producer or 'unknown'}   IR {stats.ir_version}   opsets {opsets}"],
        ["size", human(stats.size_bytes, "B", binary=True) + f" ({stats.size_bytes} bytes)"],
        ["params", f"{human(stats.params)} ({human(stats.param_bytes, 'B', binary=True)})"],
        ["nodes", f"{stats.nodes} (quantized {stats.quantized_nodes}, Q/DQ {stats.qdq_nodes})"],
        ["MACs", macs],
    ]
    rows += [["inputs" if i == 0 else "", t.describe()] for i, t in enumerate(stats.inputs)]
    rows += [["outputs" if i == 0 else "", t.describe()] for i, t in enumerate(stats.outputs)]
    lines = _table(rows, "<<")
    lines += ["", "ops"] + ["  " + line for line in _table([[op, str(n)] for op, n in stats.ops.items()], "<>")]
    costly = [c for c in stats.node_macs if c.macs][:top]
    if costly:
        total = stats.macs_known or 1
        lines += ["", f"top {len(costly)} nodes by MACs"]
        lines += ["  " + line for line in _table(
            [[human(c.macs), f"{c.macs / total * 100:.1f}%", c.op, c.name] for c in costly], ">><<")]
    return "\n".join(lines)


def format_bench(rows: list[dict]) -> str:
    first = rows[0]["latency_ms"]
    compared = "outputs" in rows[0]
    header = ["model", "size", "latency ms", "speedup"]
    if compared:
        header += ["cosine", "SQNR dB", "top-1 agree"]
        if rows[0].get("label_accuracy", {}).get("reference") is not None:
            header.append("accuracy")
    table = [header]
    for i, row in enumerate(rows):
        speedup = "" if first is None or row["latency_ms"] is None else f"{first / row['latency_ms']:.2f}x"
        cells = [row["model"], human(row["size_bytes"], "B", binary=True), _ms(row["latency_ms"]), speedup]
        if compared:
            metrics = list(row["outputs"].values())
            top1 = [m.top1 for m in metrics if m.top1 is not None]
            cells += ["-", "-", "-"] if i == 0 else [
                _cosine(min(m.cosine for m in metrics)), _number(min(m.sqnr_db for m in metrics), 4),
                _percent(min(top1)) if top1 else "-"]
            if len(header) > 7:
                cells.append(_percent(row["label_accuracy"]["candidate"]))
        table.append(cells)
    lines = _table(table, "<>>>>>>>")
    lines.append(f"(latency: {rows[0]['latency_note']}; speedup and agreement are relative to the first model)")
    if compared:
        lines.append(f"(agreement over {rows[0]['samples']} samples, worst output shown)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
