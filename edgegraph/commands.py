"""The work behind each command of `edgegraph`: `opt`, `info`, `bench`, `check`, `merge`, `lower`, `passes`.

`cli` parses the arguments and maps errors to exit codes; this module (and what it imports:
onnx, onnxruntime) is only loaded once the arguments are known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path

import onnx_graphsurgeon as gs

import edgegraph
from edgegraph import files, ir, modelio, spec, stats, verify
from edgegraph.stats import ModelStats
from edgegraph.context import STAGES, PassContext, is_terminal
from edgegraph.errors import NAME_LIMIT, EdgegraphError, ModelLoadError, one_line, shown
from edgegraph.pipeline import check_specialisation, run_pipeline, specialise, verification_data
from edgegraph.tables import (
    format_bench, format_groups, format_info, format_lower, format_merge, format_opt_header, format_opt_summary,
    group_row,
)

logger = logging.getLogger("edgegraph")

# Models larger than this together are timed one after the other, each session released before
# the next is made, rather than in turns with all of them held in memory at once.
HOLD_TOGETHER_BYTES = 2 * 2**30


def run(args, *, debug: bool = False) -> int:
    """Run the command `args.command_name` with its parsed arguments; returns the exit code."""
    # graphsurgeon prints its warnings to stdout, which must stay clean (`info --json | jq`); its
    # errors arrive as exceptions anyway.
    _report_native_crashes()
    gs_logger, gs_severity = gs.logger.G_LOGGER, gs.logger.G_LOGGER.severity
    if not debug:
        gs_logger.severity = gs_logger.CRITICAL + 1
    # One line per stage on stdout, between the header and the summary, where no progress bar
    # can show that work is going on (stderr is not a terminal: CI logs, pipes).
    stages = None
    # `lower` has no progress bars: its stage lines show on a terminal too (a conversion takes minutes).
    if args.command_name in ("opt", "merge", "lower") and not args.quiet and \
            (args.command_name == "lower" or not is_terminal(sys.stderr)):
        stages = _StageHandler(sys.stdout)
        stages.setFormatter(logging.Formatter("  %(message)s"))
        STAGES.addHandler(stages)
        STAGES.setLevel(logging.INFO)
    try:
        return COMMANDS[args.command_name](args)
    finally:
        gs_logger.severity = gs_severity
        if stages:
            STAGES.removeHandler(stages)
            STAGES.setLevel(logging.NOTSET)


class _StageHandler(logging.StreamHandler):
    """Stage lines on stdout; when the reader has gone (`edgegraph opt ... | head`), the lines
    stop and the work goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            self.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the handler
            return
        super().handleError(record)


def _report_native_crashes() -> None:
    """A native crash (onnxruntime dividing by zero, a bad read) still says something on stderr:
    Python's fault handler prints the signal and where we were. The input model's first run is
    in a child process (`runtime.outputs_isolated`) and becomes a one-line error instead."""
    if faulthandler.is_enabled():
        return
    with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
        faulthandler.enable(sys.stderr, all_threads=False)


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
    start = time.perf_counter()
    try:
        model = modelio.load(path)
    except OSError as exc:  # permissions, a vanished file: the user's to fix
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    STAGES.info("loaded %s in %.2fs", path, time.perf_counter() - start)
    return model


# ---------------------------------------------------------------------------------------------
# opt


def cmd_opt(args) -> int:
    source, output = Path(args.model), Path(args.output)
    report_path = Path(args.report) if args.report else None
    _check_writable(output, "output")
    if report_path:
        _check_writable(report_path, "--report")
    pipeline = edgegraph.parse_passes(Path(args.recipe) if args.recipe else args.passes)
    data = {"edgegraph": edgegraph.__version__, "input": str(source), "output": str(output),
            "pipeline": spec.format_pipeline(pipeline), "target": args.target, "seed": args.seed,
            "calibration": {"source": args.calib} if args.calib else None}
    if not args.quiet:  # before the work, so that a long run says what it is doing
        print(format_opt_header(data), flush=True)
    loaded = _load(args.model)
    _check_outputs(args, source, output, report_path)
    model = specialise(loaded, _shapes(args))
    ctx = edgegraph.make_context(model, calib=args.calib, target=args.target, seed=args.seed,
                                 verify=not args.no_verify, progress=not args.quiet, threads=args.threads,
                                 timing=args.runs > 0, preprocess=_preprocess(args), fix_shapes=_shapes(args),
                                 min_agreement=args.min_agreement, min_sqnr=args.min_sqnr)
    eval_data = edgegraph.as_calibration(args.eval, model) if args.eval else None

    start = time.perf_counter()
    result, report = run_pipeline(model, pipeline, ctx, unspecialised=loaded if args.fix_shape else None)
    seconds = time.perf_counter() - start

    # The result is exported once, to a staging folder beside the output, and every onnxruntime
    # session loads it (and the input model) from disk: onnxruntime maps external data instead
    # of taking a copy, so measuring a multi-GB model costs little memory. The statistics work
    # on the graphs without their weights. The staged file moves into place once all succeeded.
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(files.staging(output))
        saving = time.perf_counter()
        staged = _save(result, staging / "result" / output.name, output)
        STAGES.info("saved the result in %.2fs", time.perf_counter() - saving)
        # What onnxruntime runs as the input model: its file, unless --fix-shape changed it.
        original = _save(model, staging / "input" / source.name, output) if args.fix_shape else source
        sizes = [stats.disk_size(source), sum(f.stat().st_size for f in staged.parent.iterdir())]
        before, after = _measured_stats([model, result], [original, staged], ctx.calibration or eval_data, args,
                                        sizes=sizes)
        accuracy, accuracy_note = _accuracy(model, [original, staged], ctx, eval_data, args)
        data |= {
            "target": ctx.target.name,
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
        _publish(stack, staged, output, report_path, data)
    if not args.quiet:
        print(format_opt_summary(data, before, after, report, accuracy))
    return 0


def _check_writable(path: Path, what: str) -> None:
    if path.is_dir():
        raise EdgegraphError(f"{what} path {path} is a directory")
    if not path.parent.resolve().is_dir():
        raise EdgegraphError(f"{what} folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # say so now, not after the run
        raise EdgegraphError(f"{what} folder {path.parent} is not writable")


def _check_outputs(args, source: Path, output: Path, report: Path | None) -> None:
    """Refuse outputs that are input files (by path, symlink or hard link): the model, its
    external data, calibration and eval data, the recipe. `-o` may name the input model, and
    its external data then be replaced by the new one: everything the new model holds is in its
    own, new files before anything is moved, and the old files stay readable until then."""
    sidecar = modelio.sidecar_path(output)
    outputs = {"-o": output, f"the external data file of -o ({sidecar.name})": sidecar}
    if report:
        outputs["--report"] = report
    inputs, replaceable = {}, {}
    existing = {files.identity(p) for p in outputs.values()} - {None}
    if existing:  # else none of them can be an input: skip the look
        # External data lives in the model's folder; the model is read again for its list only
        # when an output is one of the other files there (never for weights inside the model).
        others = {files.identity(f) for f in files.files_in(source.parent)} - {files.identity(source)}
        external = modelio.external_data_files(source) if existing & others else []
        inputs = {"the input model": [source], "the input's external data": external,
                  "the --calib data": files.files_in(Path(args.calib)) if args.calib else [],
                  "the --eval data": [Path(args.eval)] if args.eval else [],
                  "the --recipe": [Path(args.recipe)] if args.recipe else []}
        if files.same_file(output, source):
            replaceable = {what: [source, *external] for what in outputs if what != "--report"}
    files.refuse_overwriting(outputs, inputs, replaceable=replaceable)


def _write(save, path: Path):
    try:
        return save()
    except OSError as exc:
        raise EdgegraphError(f"cannot write {path}: {exc.strerror or exc}") from None


def _save(model: ir.Model, path: Path, output: Path) -> Path:
    """Save `model` alone in a new folder at `path` (external data beside it when it needs some)."""
    path.parent.mkdir()
    return _write(lambda: modelio.save(model, path), output)


def _measured_stats(models: Sequence[ir.Model], files: Sequence[Path], data, args, *,
                    sizes: Sequence[int]) -> list[ModelStats]:
    """Static stats plus latency per model, timed from its file on the first data sample (or
    seeded random inputs)."""
    start = time.perf_counter()
    feeds = [_feeds(model, data, args) for model in models]
    facts = [stats.model_stats(model, size_bytes=size, feeds=f if data is not None else None)
             for model, size, f in zip(models, sizes, feeds)]
    timed = [i for i, f in enumerate(feeds) if f is not None]
    STAGES.info("statistics in %.2fs", time.perf_counter() - start)
    start = time.perf_counter()
    latencies = stats.measure_latency([files[i] for i in timed], [feeds[i] for i in timed], runs=args.runs,
                                         warmup=args.warmup, threads=args.threads, in_turns=_in_turns(sizes))
    for i, (ms, note) in zip(timed, latencies):
        facts[i].latency_ms, facts[i].latency_note = ms, note
    if args.runs:
        STAGES.info("timing (%d runs per model) in %.2fs", args.runs, time.perf_counter() - start)
    return facts


def _feeds(model, data, args):
    try:
        return stats.sample_feeds(model, data, seed=args.seed)
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
    data = eval_data or verification_data(model, ctx)
    start = time.perf_counter()
    try:
        measured = stats.compare_models(*files, data, threads=args.threads,
                                           labels=stats.load_labels(args.eval) if eval_data else None,
                                           scores=verify.score_outputs(model))
    except EdgegraphError as exc:
        return None, one_line(exc)
    STAGES.info("accuracy on %d sample(s) of %s in %.2fs", len(data), data.source, time.perf_counter() - start)
    return {"data": data.source} | measured, ""


# ---------------------------------------------------------------------------------------------
# info, bench, passes


def cmd_info(args) -> int:
    model = _load(args.model)
    if args.fix_shape and not args.no_verify:  # the statistics are only as good as the shapes: check them
        ctx = PassContext(progress=False, fixed_shapes=_shapes(args), data_option="")
        check_specialisation(model, specialise(model, _shapes(args)), ctx)
    facts = stats.model_stats(model, size_bytes=stats.disk_size(args.model),
                                 fix_shapes=_shapes(args) or None)
    groups = _channel_groups(model, _shapes(args)) if getattr(args, "groups", False) else None
    if args.json:
        extra = {} if groups is None else {"groups": [group_row(g) for g in groups]}
        print(json.dumps(stats.jsonable({"model": args.model} | facts.as_dict() | extra), indent=2))
    else:
        print(format_info(args.model, facts, top=args.top))
        if groups is not None:
            print(format_groups(groups))
    return 0


def _channel_groups(model, shapes):
    """The channel coupling groups of the model (specialised by --fix-shape), as `prune` sees them."""
    from edgegraph.analysis import channels

    return channels.groups(specialise(model, shapes).graph)


def cmd_bench(args) -> int:
    loaded = [_load(path) for path in args.models]
    models = [specialise(model, _shapes(args)) for model in loaded]
    # onnxruntime loads the files (mapping external data, no export) unless --fix-shape changed the models.
    runnable = models if args.fix_shape else args.models
    sizes = [stats.disk_size(path) for path in args.models]
    data = edgegraph.as_calibration(args.calib, models[0]) if args.calib else None
    if args.fix_shape and not args.no_verify:
        ctx = PassContext(calibration=data, seed=args.seed, progress=False, threads=args.threads,
                          fixed_shapes=_shapes(args))
        for before, after in zip(loaded, models):
            check_specialisation(before, after, ctx)
    labels = stats.load_labels(args.calib)
    feeds = [stats.sample_feeds(model, data, seed=args.seed) for model in models]
    latencies = stats.measure_latency(runnable, feeds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                                         in_turns=_in_turns(sizes))
    reference = stats.model_outputs(runnable[0], data, threads=args.threads) if data is not None else None
    scores = verify.score_outputs(models[0])  # top-1 for the first model's class scores only
    rows = []
    for i, (path, size, (ms, note)) in enumerate(zip(args.models, sizes, latencies)):
        row = {"model": path, "size_bytes": size, "latency_ms": ms, "latency_note": note}
        if reference is not None:
            outputs = reference if i == 0 else stats.model_outputs(runnable[i], data, threads=args.threads)
            row |= {"samples": len(data)} | stats.compare_outputs(reference, outputs, labels=labels, scores=scores)
        rows.append(row)
    if args.json:
        print(json.dumps(stats.jsonable({"models": rows}), indent=2))
    else:
        print(format_bench(rows))
    return 0


def _publish(stack: contextlib.ExitStack, staged: Path, output: Path, report_path: Path | None, report) -> None:
    """Move the model saved at `staged` (with its external data) and the JSON `report` into
    place as one outcome: together, or not at all."""
    moves = modelio.staged_moves(staged, output)
    if report_path:
        staged_report = stack.enter_context(files.staging(report_path)) / report_path.name
        _write(lambda: staged_report.write_text(json.dumps(stats.jsonable(report), indent=2) + "\n"),
               report_path)
        moves.append((staged_report, report_path))
    try:
        files.publish(moves, outcome=True)
    except OSError as exc:
        raise EdgegraphError(f"cannot write {exc.filename}: {exc.strerror or exc}; nothing was written") from None


def cmd_merge(args) -> int:
    from edgegraph import merge

    output = Path(args.output)
    report_path = Path(args.report) if args.report else None
    _check_writable(output, "output")
    if report_path:
        _check_writable(report_path, "--report")
    sources = [Path(m) for m in args.models]
    names = [merge.task_name(m, i) for i, m in enumerate(args.models)]
    for key, name in args.name:  # FILE=NAME: by the path as given, else by the file's stem
        hits = [i for i, m in enumerate(args.models) if key == m] or [i for i, m in enumerate(sources) if key in (m.name, m.stem)]
        if len(hits) != 1:
            raise merge.MergeError(f"--name {shown(key, NAME_LIMIT)}=...: {'no' if not hits else 'more than one'} "
                                   "model given is that file")
        names[hits[0]] = name
    outputs = {"-o": output, f"the external data file of -o ({modelio.sidecar_path(output).name})": modelio.sidecar_path(output)}
    if report_path:
        outputs["--report"] = report_path
    inputs = {f"input model {m}": [m] for m in sources if m.is_file()}
    inputs |= {f"the external data of {m}": modelio.external_data_files(m) for m in sources if m.is_file()}
    for given in args.calib:
        inputs[f"the --calib data {given}"] = files.files_in(Path(given.partition("=")[2] or given))
    files.refuse_overwriting(outputs, inputs)
    if not args.quiet:
        print(f"merge {', '.join(f'{m} as {n}' for m, n in zip(args.models, names))} -> {output}", flush=True)
    calib = _merge_calibration(args.calib, names)
    result = merge.merge(args.models, names=names, input_map=merge.parse_input_map(args.input_map),
                         tolerance=args.tolerance, average=args.average, calib=calib,
                         min_sqnr=merge.DEFAULT_MIN_SQNR_DB if args.min_sqnr is None else args.min_sqnr,
                         seed=args.seed, threads=args.threads or 1,
                         check_samples=0 if args.no_verify else merge.CHECK_SAMPLES)
    report = {"edgegraph": edgegraph.__version__, "models": args.models, "output": str(output)} | result.report
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(files.staging(output))
        staged = _save(result.model, staging / "result" / output.name, output)
        if args.runs:
            sizes = [stats.disk_size(m) for m in sources]
            merged_size = sum(f.stat().st_size for f in staged.parent.iterdir())
            report["measured"] = merge.measure(result, args.models, staged, result.data, sizes=sizes,
                                               merged_size=merged_size, seed=args.seed, runs=args.runs,
                                               warmup=args.warmup, threads=args.threads)
        _publish(stack, staged, output, report_path, report)
    if not args.quiet:
        print(format_merge(report))
    return 0


def _merge_calibration(given: list[str], names: list[str]):
    """`--calib DATA` (the merged model's inputs) or `--calib TASK=DATA ...` (each task's own)."""
    if not given:
        return None
    per_task = {}
    for item in given:
        task, eq, path = item.partition("=")
        if eq and task in names:
            per_task[task] = path
        elif len(given) > 1:
            raise EdgegraphError(f"--calib {shown(item, NAME_LIMIT)}: several --calib must each be TASK=DATA "
                                 f"(tasks: {', '.join(names)})")
        else:
            return item
    return per_task


def cmd_lower(args) -> int:
    """`edgegraph lower IN.onnx --target T -o OUT` (or `--setup tflite`)."""
    from edgegraph.lowering import tflite

    if args.setup:
        tflite.setup(log=(lambda line: None) if args.quiet else print)
        return 0
    missing = [flag for flag, value in (("IN.onnx", args.model), ("--target", args.target), ("-o", args.output))
               if not value]
    if missing:
        raise EdgegraphError(f"lower needs {', '.join(missing)} (see 'edgegraph lower --help')")
    if not args.quiet:
        print(f"{args.model} -> {args.output} (lowering for {args.target})", flush=True)
    result = edgegraph.lower(args.model, args.target, args.output, calib=args.calib, fix_shapes=_shapes(args),
                             seed=args.seed, threads=args.threads, min_sqnr=args.min_sqnr,
                             options={"precision": args.precision, "style": args.style, "legalize": args.legalize})
    if not args.quiet:
        print(format_lower(result))
    return 0


def cmd_passes(args) -> int:
    described = [describe_pass(cls) for cls in edgegraph.list_passes()]
    if args.json:
        print(json.dumps(stats.jsonable(described), indent=2))
        return 0
    lines = []
    for item in described:
        kind = "exact" if item["exact"] else "lossy"
        needs = f"; needs {', '.join(item['needs'])}" if item["needs"] else ""
        after = f"; after {', '.join(item['after'])}" if item["after"] else ""
        lines.append(f"{item['name']}  ({kind}{needs}{after})")
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
    """Name, summary, exactness, context needs, prerequisite passes and documented options of a pass class."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    options = [
        {"name": f.name, "type": spec.describe_type(hints[f.name]),
         "default": spec._format_value(getattr(defaults, f.name)), "doc": f.metadata.get("doc", "")}
        for f in dataclasses.fields(cls)
    ]
    return {"name": cls.name, "summary": cls.summary, "exact": cls.exact, "needs": sorted(cls.needs),
            "after": [spec.format_pass(p) for p in defaults.after()], "options": options}


def cmd_check(args) -> int:
    from edgegraph.cli import STRICT_EXIT
    from edgegraph.targets import check as target_check

    model = _load(args.model)
    if args.target != "all":
        edgegraph.load_target(args.target)  # an unknown name is exit 2 before any work
    if args.fix_shape and not args.no_verify:  # like `info`: the verdicts are only as good as the shapes
        ctx = PassContext(progress=False, fixed_shapes=_shapes(args), data_option="")
        check_specialisation(model, specialise(model, _shapes(args)), ctx)
    results = edgegraph.check(model, args.target, fix_shapes=_shapes(args) or None,
                              optimize=False if args.as_given else None)
    if args.json:
        print(json.dumps(stats.jsonable({"model": args.model, "targets": [r.as_dict() for r in results]}), indent=2))
    else:
        print(target_check.format_check(args.model, results))
    return STRICT_EXIT if args.strict and not all(r.fully_supported for r in results) else 0


COMMANDS = {"opt": cmd_opt, "info": cmd_info, "bench": cmd_bench, "check": cmd_check, "merge": cmd_merge,
            "lower": cmd_lower, "passes": cmd_passes}
