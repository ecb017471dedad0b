"""Lowering: turning an ONNX model into a device runtime's own format, checked in that runtime.

`edgegraph lower M.onnx --target T -o OUT` (`lower` below) runs, for every target:

1. support, before: the nodes the target's profile says it cannot run (`unsupported_nodes`)
   refuse the model (exit 2, "legalize it first"), except for the targets whose lowering is
   legalize itself (`legalized`: nnapi, coreml, qnn, ..., which take ONNX);
2. the target's converter (`ort_format`, `openvino_ir`, `tflite`, `legalized`), in a private temporary folder
   on a private copy of the model, so a converter that writes beside its input or caches files
   cannot touch the user's folder;
3. support, after: the model the converter was given (after the target's own preparation, e.g.
   weight DQ folding for TFLite) is checked again, and the converter's artifact by its own lights
   (a TFLite model that needs Flex ops is not a builtin-ops model);
4. the artifact runs in its runtime (onnxruntime for ORT format, OpenVINO's CPU plugin, the
   LiteRT interpreter) on real data (`--calib`) or seeded random inputs, and its outputs are
   compared with onnxruntime's on the ONNX model: a mismatch is exit 1 naming the output and the
   metric;
5. only then the files are moved into place, together (`files.publish`): nothing on failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgegraph import files, ir, modelio, runtime, verify
from edgegraph.context import STAGES, CalibrationData, PassContext
from edgegraph.errors import EdgegraphError, VerificationDataError, one_line, shown


# Default agreement a lowered model must reach with onnxruntime, as the worst output's SQNR (dB).
# A float model converted faithfully agrees to float rounding (measured 75-150 dB on the shared
# models: ORT format, OpenVINO at f32, TFLite); a quantized (Q/DQ) model's kernels round
# differently in each runtime (measured 24-130 dB for OpenVINO's and TFLite's int8 kernels on
# edgegraph's int8 models), while a wrong conversion is far below (onnx2tf on
# unfolded QDQ weights: -16 dB on the bundled CNN, cosine 0.00-0.83 on the shared models).
MIN_SQNR_FLOAT_DB = 40.0
MIN_SQNR_QUANTIZED_DB = 20.0
SAMPLES = 4  # verification samples (the first of --calib, else seeded random inputs)


class LoweringError(EdgegraphError):
    """The converter failed, or the lowered model does not run in its runtime or computes
    something else (exit 1). `stage`: "convert", "run" or "match"."""

    exit_code = 1

    def __init__(self, message: str, stage: str = "convert"):
        super().__init__(message)
        self.stage = stage


class UnsupportedModelError(EdgegraphError):
    """The target cannot run some nodes of the model (exit 2: legalize it first)."""


@dataclass
class Artifact:
    """What a converter made in its work folder: files by destination (relative to -o), the
    runtime's outputs on the verification batches (in the ONNX model's layout), notes."""

    files: dict[str, Path]  # role ("model", "config", "weights") -> the file made in the work folder
    outputs: list[dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)
    unsupported_after: list[str] = field(default_factory=list)  # what the artifact itself needs that the target lacks


@dataclass(frozen=True)
class Target:
    """A lowering: `convert(model_path, work, batches, options, threads=) -> Artifact`, the
    profile its support checks use, how its batches are cut, and where its files go for an -o."""

    name: str
    profile: str
    summary: str
    convert: Callable[..., Artifact]
    destinations: Callable[[Path], dict[str, Path]] = lambda output: {"model": output}  # role -> path
    prepare: Callable[[ir.Model, dict], tuple[ir.Model, list[str]]] | None = None  # (model, options) -> (converter's input, notes)
    relayout: Callable[[dict, dict], dict] | None = None  # (reference, artifact outputs) -> in the ONNX layout
    batch_size: int | None = None  # None: what the model's inputs allow (runtime.batch_size_for)
    static_shapes: bool = False  # dynamic input dims are fixed to the data's shapes first
    suffix: str = ""  # -o must end so (OpenVINO: .xml), "" for any name
    legalizes: bool = False  # `prepare` is legalize itself: what the profile refuses before it is its work
    whole_graph: bool = True  # (legalizing targets) refused unless one partition over MIN_NODE_SHARE of the nodes


@dataclass
class LowerResult:
    target: str
    outputs: list[Path]
    metrics: dict[str, verify.OutputMetrics]
    min_sqnr_db: float
    samples: int
    data: str
    notes: list[str]
    seconds: float


def targets() -> dict[str, Target]:
    """The lowerings by name (imported here: each module imports its runtime only when run)."""
    from edgegraph.lowering import legalized, openvino_ir, ort_format, tflite

    return {t.name: t for t in (ort_format.TARGET, openvino_ir.TARGET, tflite.TARGET, *legalized.TARGETS)}


def run_passes(model: ir.Model, spec: str, profile: str) -> tuple[ir.Model, list[str]]:
    """`model` through the passes `spec` for the target profile `profile`, each verified in
    onnxruntime (the pass manager's seeded inputs); (the result, a note naming the passes that
    changed it)."""
    from edgegraph.pipeline import run_pipeline
    from edgegraph.spec import parse
    from edgegraph.targets import load_target

    notes: list[str] = []
    with _warnings_into(notes):
        result, report = run_pipeline(model, parse(spec), PassContext(progress=False, target=load_target(profile)))
    for record in report.passes:
        if record.modified:
            counts = ", ".join(f"{k} {v}" for k, v in record.stats.items() if isinstance(v, int) and v)
            notes.append(f"{record.name} for {profile}" + (f": {counts}" if counts else ""))
    return result, notes


# ---------------------------------------------------------------------------------------------
# Support checks: one function, through the targets profiles' interface


def unsupported_nodes(model: ir.Model, profile: str) -> list[str]:
    """'node (Op): reason' for each node of `model` that the target profile `profile` says it
    cannot run (`edgegraph.targets`): the ONE place lowering asks about support."""
    from edgegraph import targets

    target_profile = targets.load(profile)
    context = targets.ModelContext.of(model)
    found = []
    for node in ir.iter_nodes(model.graph):
        reason = target_profile.unsupported(node, context)
        if reason:
            found.append(f"{shown(node.name, 80) or '(unnamed)'} ({node.op}): {reason}")
    return found


@contextlib.contextmanager
def _warnings_into(notes: list[str]):
    """The passes' warnings (legalize: "N node(s) could not be rewritten") become the lowering's
    notes: it either succeeds, with them in its report, or refuses in one line naming the nodes."""
    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    passes = logging.getLogger("edgegraph.passes")
    handler, propagate = Collect(logging.WARNING), passes.propagate
    passes.addHandler(handler)
    passes.propagate = False
    try:
        yield
    finally:
        passes.removeHandler(handler)
        passes.propagate = propagate


# What a target that takes ONNX must make of the legalized model: one partition over this share
# of its nodes (#13's mark: the few left, e.g. a final Softmax on a float16 output, run on the CPU).
MIN_NODE_SHARE = 0.99


def _check_partitions(before: ir.Model, after: ir.Model, target: Target) -> str:
    """The note saying how `edgegraph check` partitions `before` and `after` (the graph the
    execution provider sees: after onnxruntime's basic optimisations, which fold constant subgraphs
    such as MiniLM's int8 weight decode); exit 2 instead when a target that is to run the whole
    graph gets more than one partition or less than MIN_NODE_SHARE of the nodes."""
    from edgegraph.targets.check import check

    was, now = (check(m, target.profile, macs=False) for m in (before, after))
    summary = (f"{target.profile}: {now.partitions} partition(s) over {now.node_share:.1%} of {now.nodes} nodes "
               f"after legalize (before: {was.partitions} over {was.node_share:.1%})")
    if target.whole_graph and (now.partitions > 1 or now.node_share < MIN_NODE_SHARE):
        listed = "; ".join(f"{u.name} ({u.op}): {u.reason}" for u in now.unsupported[:3])
        raise UnsupportedModelError(f"{summary}, short of one over {MIN_NODE_SHARE:.0%} ({listed}); legalize cannot "
                                    f"rewrite the rest (edgegraph check M.onnx --target {target.profile} says what would)")
    left = Counter(u.op for u in now.unsupported)
    return summary + (f"; left to the CPU: {', '.join(f'{op} x{n}' for op, n in sorted(left.items()))}" if left else "")


def _refuse_unsupported(found: Sequence[str], target: Target, when: str) -> None:
    if not found:
        return
    listed = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    raise UnsupportedModelError(f"{len(found)} node(s) {when} cannot run on {target.name} ({listed}); "
                                f"rewrite them first: edgegraph opt M.onnx -p legalize --target {target.profile}")


# ---------------------------------------------------------------------------------------------
# The lowering


def lower(model, target: str, output: str | os.PathLike, *, calib=None, fix_shapes: Mapping | None = None,
          seed: int = 0, threads: int = 0, min_sqnr: float | None = None, options: Mapping | None = None,
          preprocess: Mapping | None = None, inputs_to_protect: Sequence[Path] = ()) -> LowerResult:
    """Lower `model` (a path) for `target` and write the result at `output` (plus its companion
    files), checked in the target's runtime against onnxruntime on `calib` (or seeded random
    inputs). Raises EdgegraphError (exit 2: bad input or unsupported nodes) or LoweringError
    (exit 1: the converter failed, the artifact does not run or does not match); nothing is
    written then. `options`: the target's own (`ort-mobile`: style; `openvino`: precision)."""
    from edgegraph.api import as_calibration
    from edgegraph.pipeline import check_specialisation, random_inputs, specialise

    start = time.perf_counter()
    known = targets()
    if target not in known:
        raise EdgegraphError(f"unknown lowering target {shown(target, 80)} (available: {', '.join(known)})")
    spec = known[target]
    source, output = Path(model), Path(output)
    if spec.suffix and output.suffix.lower() != spec.suffix:
        raise EdgegraphError(f"{target}: -o must end in {spec.suffix} (got {shown(output.name, 80)})")
    destinations = spec.destinations(output)
    _check_outputs(list(destinations.values()), [source, *inputs_to_protect])

    loaded = _load(source)
    if not spec.legalizes:  # (for a legalizing target, what the profile refuses is the work)
        _refuse_unsupported(unsupported_nodes(loaded, spec.profile), spec, "of the model")
    model_ = specialise(loaded, dict(fix_shapes or {}))
    data = as_calibration(calib, model_, preprocess) if calib is not None else None
    ctx = PassContext(calibration=data, seed=seed, progress=False, threads=threads,
                      fixed_shapes=dict(fix_shapes or {}))
    if fix_shapes:
        check_specialisation(loaded, model_, ctx)
    samples = data.take(SAMPLES) if data is not None else random_inputs(model_, SAMPLES, seed=seed)
    if spec.static_shapes:  # converters that want static shapes get the data's
        model_ = _static_for(model_, samples, ctx)
    specs = runtime.input_specs(model_)
    batch = spec.batch_size or runtime.batch_size_for(specs, len(samples))
    batches = [runtime.adapt_feeds(specs, b) for b in samples.batches(batch)]

    quantized = _is_quantized(model_)
    try:  # the untrusted model's first run: in a child process (a native crash is one line)
        reference = runtime.outputs_isolated(model_, batches, threads=threads, optimize=quantized)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise VerificationDataError(f"the input model does not run in onnxruntime on {samples.source}: "
                                    f"{one_line(exc)}") from None
    STAGES.info("onnxruntime ran the model on %d sample(s) of %s", len(samples), samples.source)

    notes: list[str] = []
    converted = model_
    if spec.prepare is not None:
        converted, prepared = spec.prepare(model_, dict(options or {}))
        notes += prepared
    if spec.legalizes:
        notes.append(_check_partitions(model_, converted, spec))
    else:
        _refuse_unsupported(unsupported_nodes(converted, spec.profile), spec, "of the model handed to the converter")

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"edgegraph-lower-{target}-")))
        (work / "model").mkdir()
        model_path = modelio.save(converted, work / "model" / "model.onnx")
        began = time.perf_counter()
        artifact = spec.convert(model_path, work, batches, dict(options or {}), threads=threads)
        STAGES.info("converted and ran in %s in %.2fs", target, time.perf_counter() - began)
        notes += artifact.notes
        if artifact.unsupported_after:
            listed = "; ".join(artifact.unsupported_after[:5])
            raise LoweringError(f"{target}: the converted model needs what the target lacks ({listed}); "
                                "nothing was written", "run")
        outputs = artifact.outputs
        if spec.relayout is not None:
            outputs = [spec.relayout(ref, out) for ref, out in zip(reference, outputs)]
        metrics = verify.compare_all(reference, outputs, scores=verify.score_outputs(model_))
        floor = min_sqnr if min_sqnr is not None else (MIN_SQNR_QUANTIZED_DB if quantized else MIN_SQNR_FLOAT_DB)
        _check_match(metrics, floor, target)
        # Stage beside each destination, then move all into place together.
        moves = []
        for role, made in artifact.files.items():
            destination = destinations[role]
            staged = stack.enter_context(files.staging(destination)) / destination.name
            try:
                shutil.copyfile(made, staged)
            except OSError as exc:
                raise EdgegraphError(f"cannot write {destination}: {exc.strerror or exc}; nothing was written") from None
            moves.append((staged, destination))
        try:
            files.publish(moves, outcome=True)
        except OSError as exc:
            raise EdgegraphError(f"cannot write {exc.filename}: {exc.strerror or exc}; nothing was written") from None
    return LowerResult(target, [d for _, d in moves], metrics, floor, len(samples), samples.source, notes,
                       time.perf_counter() - start)


def _load(source: Path) -> ir.Model:
    try:
        return modelio.load(source)
    except OSError as exc:
        from edgegraph.errors import ModelLoadError

        raise ModelLoadError(f"cannot read {source}: {exc.strerror or exc}") from None


def _check_outputs(destinations: Sequence[Path], inputs: Sequence[Path]) -> None:
    for path in destinations:
        if path.is_dir():
            raise EdgegraphError(f"output path {path} is a directory")
        if not path.parent.resolve().is_dir():
            raise EdgegraphError(f"output folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise EdgegraphError(f"output folder {path.parent} is not writable")
    files.refuse_overwriting({f"output {p.name}": p for p in destinations},
                             {"an input file": [p for p in inputs if p.is_file()]})


def _is_quantized(model: ir.Model) -> bool:
    from edgegraph.pipeline import QUANTIZED_OPS

    return any(n.op in QUANTIZED_OPS for n in ir.iter_nodes(model.graph))


def _static_for(model: ir.Model, samples: CalibrationData, ctx: PassContext) -> ir.Model:
    """`model` with its dynamic input dims fixed to the first sample's shapes (batch 1), checked
    like `--fix-shape`; `model` itself when its inputs are static."""
    from edgegraph.pipeline import check_specialisation, specialise

    first = next(samples.batches(1))  # one sample, on each input's batch axis
    shapes = {s.name: list(np.shape(first[s.name])) for s in runtime.input_specs(model)
              if s.shape is None or not all(isinstance(d, int) and d > 0 for d in s.shape)}
    if not shapes:
        return model
    fixed = specialise(model, shapes)
    check_specialisation(model, fixed, PassContext(calibration=ctx.calibration, seed=ctx.seed, progress=False,
                                                   threads=ctx.threads, fixed_shapes=shapes))
    STAGES.info("fixed dynamic inputs to %s", ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()))
    return fixed


def _check_match(metrics: Mapping[str, verify.OutputMetrics], floor: float, target: str) -> None:
    for m in metrics.values():
        if m.dtype not in ("float32", "float16", "float64", "bfloat16"):
            if not m.exact_match:
                raise LoweringError(f"{target}: output '{shown(m.name, 80)}' ({m.dtype}) differs from onnxruntime's; "
                                    "nothing was written", "match")
            continue
        if not m.sqnr_db >= floor:
            raise LoweringError(f"{target}: output '{shown(m.name, 80)}' does not match onnxruntime: SQNR "
                                f"{m.sqnr_db:.1f} dB < {floor:g} dB (cosine {m.cosine:.4f}, max |error| "
                                f"{m.max_abs:.3g} of {m.ref_max_abs:.3g}); nothing was written", "match")
