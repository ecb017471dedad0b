"""The pass protocol and the manager that runs, checks and times a sequence of passes."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir, runtime, verify
from edgegraph.context import STAGES, CalibrationData, PassContext
from edgegraph.errors import (NAME_LIMIT, FloorViolation, MissingRequirementError, PassFailure, PassOptionError,
                              PreconditionError, VerificationDataError, VerificationError, one_line, shown)
from edgegraph.floor import measure
from edgegraph.passbase import Pass, PassGroup, PassResult, option, run_group, settle
from edgegraph.runtime import Feeds
from edgegraph.spec import format_pass

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """One pass as it ran: the spec, what changed, timing, and agreement with the previous model."""

    name: str
    spec: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    details: dict[str, Any]
    metrics: dict[str, verify.OutputMetrics] = field(default_factory=dict)
    # The pass that asked for this one (`after()`), when the pipeline did not list it itself.
    wanted_by: str | None = None


@dataclass
class PipelineReport:
    passes: list[PassRecord] = field(default_factory=list)
    # Final model vs the input model, on the verification samples (empty when not verified).
    metrics: dict[str, verify.OutputMetrics] = field(default_factory=dict)
    verification_data: str = ""


def check_requirements(passes: Sequence[Pass], ctx: PassContext) -> None:
    """Fail before any work when a pass needs something the context lacks."""
    for p in passes:
        if "calibration" in p.context_needs() and ctx.calibration is None:
            raise MissingRequirementError(
                f"pass '{p.name}' needs calibration data: give --calib DATA.npz (an array per input "
                "name, N samples stacked on axis 0 or in the model's layout) or a folder of images"
            )


def run_pipeline(model: ir.Model, passes: Sequence[Pass], ctx: PassContext, *,
                 unspecialised: ir.Model | None = None) -> tuple[ir.Model, PipelineReport]:
    """Run `passes` in order on a copy of `model`, verifying each one; returns the new model and a report.

    Exact passes must keep every output within `ctx.verify` tolerances of the model they were
    given, or `VerificationError` names the pass and the output. Lossy passes record metrics.
    When `model` is `unspecialised` with some input shapes fixed (`--fix-shape`), that step is
    verified first, like an exact pass (see `check_specialisation`).

    A pass's prerequisites (`Pass.after()`) run before it unless an equal pass ran since the
    model last changed; their records carry `wanted_by`. After every pass that changed the
    model, the manager settles it (`settle`: sorted, dead nodes gone) before verifying.
    """
    schedule = _schedule(passes)
    check_requirements([p for p, _ in schedule], ctx)
    model = model.copy()
    report = PipelineReport()
    checker = None
    if ctx.verify.enabled:
        checker = (check_specialisation(unspecialised, model, ctx) if unspecialised is not None
                   else _Checker(model, ctx))
        report.verification_data = checker.source
    interface = _interface(model)
    settled: list[Pass] = []  # passes run since the model last changed (their job is done)
    for p, wanted_by in schedule:
        if wanted_by is not None and any(p == done for done in settled):
            continue  # a prerequisite that already ran on this very model
        position = len(report.passes) + 1
        record = _run_one(p, position, model, ctx, checker, interface, wanted_by)
        interface = _interface(model)  # (grown by a pass that `extends_interface`)
        report.passes.append(record)
        settled = [*settled, p] if not record.modified else [p]
    if checker:
        report.metrics = checker.against_original()
    return model, report


def _schedule(passes: Sequence[Pass]) -> list[tuple[Pass, str | None]]:
    """The passes with each one's prerequisites (`after()`, recursively) before it, as
    (pass, name of the pass that wants it or None for the user's own)."""
    order: list[tuple[Pass, str | None]] = []

    def add(p: Pass, wanted_by: str | None, chain: tuple[str, ...]) -> None:
        if p.name in chain:
            raise TypeError(f"pass '{p.name}' needs itself first: {' -> '.join((*chain, p.name))}")
        for before in p.after():
            add(before, p.name, (*chain, p.name))
        order.append((p, wanted_by))

    for p in passes:
        add(p, None, ())
    return order


def _run_one(p: Pass, position: int, model: ir.Model, ctx: PassContext, checker: _Checker | None,
             interface: tuple[list[str], list[str]], wanted_by: str | None) -> PassRecord:
    """Run one pass under the manager: pre-condition, run, settle, post-condition, verification."""
    start = time.perf_counter()
    # An exact pass is verified unoptimized on both sides (see `_Checker.step`): for a quantized
    # model that needs the model as it was before the pass.
    before = model.to_proto() if checker and p.exact and checker.runs_optimized(model) else None
    try:
        p.requires(model, ctx)
        result = p.run(model, ctx)
        if result.modified:
            settle(model)
        p.ensures(model, ctx)
    except (MissingRequirementError, PassOptionError, PreconditionError, VerificationError, FloorViolation,
            KeyboardInterrupt):
        raise
    except PassFailure:  # e.g. PostconditionError: already names the problem
        raise
    except Exception as exc:
        if getattr(exc, "exit_code", None) == 2:  # a user error found while running (e.g. bad data)
            raise
        raise PassFailure(f"pass {position} '{p.name}' failed: {type(exc).__name__}: {exc}") from exc
    change = _interface_change(interface, _interface(model), extends=p.extends_interface)
    if change:  # users and runtimes address a model by these names: no pass may touch them
        raise PassFailure(f"pass '{p.name}' {change}")
    if result.new_inputs and checker:
        checker.feed(result.new_inputs)
    record = PassRecord(p.name, format_pass(p), result.modified, time.perf_counter() - start, result.stats,
                        result.details, wanted_by=wanted_by)
    checked = ""
    if checker and result.modified:
        check_start = time.perf_counter()
        record.metrics = checker.step(model, p.name, exact=p.exact, before=before)
        checked = f", verified in {time.perf_counter() - check_start:.2f}s"
    logger.info("%s: %s in %.2fs %s", p.name, "changed" if result.modified else "no change",
                record.seconds, result.stats or "")
    STAGES.info("pass %d %s: %s in %.2fs%s", position, p.name, "changed" if result.modified else "no change",
                record.seconds, checked)
    return record


def _interface(model: ir.Model) -> tuple[list[str], list[str]]:
    return [t.name for t in model.graph.inputs], [t.name for t in model.graph.outputs]


def _interface_change(before: tuple[list[str], list[str]], after: tuple[list[str], list[str]], *,
                      extends: bool = False) -> str | None:
    """What a pass did to the graph's input and output names (and order), in a few words; None if
    nothing, or (`extends`) if it only added names after the existing ones."""
    def names(items: list[str]) -> str:
        listed = ", ".join(shown(name, NAME_LIMIT) for name in items[:3])
        return listed + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    for kind, old, new in zip(("input", "output"), before, after):
        if old == new or (extends and new[:len(old)] == old):
            continue
        removed, added = [n for n in old if n not in new], [n for n in new if n not in old]
        if removed:
            return f"removed graph {kind}(s) {names(removed)}" + (f" (now {names(added)})" if added else "")
        if added:
            return f"added graph {kind}(s) {names(added)}"
        return f"reordered the graph {kind}s"
    return None


def specialise(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None) -> ir.Model:
    """A copy of `model` with the `shapes` inputs made static (`--fix-shape`), or `model` itself
    when there are none. Check it with `check_specialisation` (`run_pipeline(..., unspecialised=
    model)` does)."""
    if not shapes:
        return model
    fixed = model.copy()
    ir.fix_input_shapes(fixed, shapes)
    return fixed


def check_specialisation(unspecialised: ir.Model, specialised: ir.Model, ctx: PassContext) -> _Checker:
    """Check shape specialisation (`--fix-shape`) like an exact pass: on the same inputs, shaped
    as `specialised` wants them, `specialised` must load and run in onnxruntime and give the
    outputs of `unspecialised` within `ctx.verify` tolerances.

    Raises an EdgegraphError (exit 2) when `unspecialised` itself does not run on inputs of the
    fixed shapes (the shapes do not fit the model), PassFailure or VerificationError (exit 1, our
    bug) when the specialised model does not run or computes something else. Returns the checker,
    ready to check passes run on `specialised`.
    """
    start = time.perf_counter()
    checker = _Checker(unspecialised, ctx, shaped_as=specialised)
    checker.step(specialised, FIX_SHAPE, exact=True)
    STAGES.info("%s %s: verified in %.2fs", FIX_SHAPE, _shapes_text(ctx.fixed_shapes), time.perf_counter() - start)
    return checker


FIX_SHAPE = "--fix-shape"  # the name shape specialisation goes by in errors and progress lines

QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                           "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"})

# onnxruntime's own message goes into ours whole (it names the node and the shapes), up to this length.
ORT_MESSAGE_LIMIT = 600


class _Checker:
    """Runs each pass's output on the same samples and compares it with the previous model.

    `shaped_as`: the model whose input shapes the samples take, when not `model` itself (the
    specialised model while `model` is the one before `--fix-shape`).
    """

    def __init__(self, model: ir.Model, ctx: PassContext, *, shaped_as: ir.Model | None = None):
        self.ctx = ctx
        shaped_as = shaped_as or model
        self.specs = runtime.input_specs(shaped_as)
        self.scores = verify.score_outputs(model)
        data = verification_data(shaped_as, ctx)
        self.source = data.source
        batch = runtime.batch_size_for(self.specs, len(data))
        self.batches = [runtime.adapt_feeds(self.specs, b) for b in data.batches(batch)]
        start = time.perf_counter()
        try:
            # The input model is untrusted: its first run is in a child process, so that a native
            # crash of onnxruntime becomes this error rather than the end of us.
            self.original = self._outputs(model, isolated=True)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = self.batches[0] if self.batches else {}
            raise VerificationDataError(_does_not_run(exc, data.source, first, ctx, self.specs)) from None
        STAGES.info("verification: the input model ran on %d sample(s) of %s in %.2fs", len(data), data.source,
                    time.perf_counter() - start)
        self.previous = self.original

    @staticmethod
    def runs_optimized(model: ir.Model) -> bool:
        """Whether `model` is run as deployed, with ORT's optimisations (a quantized model: its
        integer kernels' accuracy can differ from the float simulation of Q/DQ); float models
        run unoptimized, the purest reference."""
        return any(n.op in QUANTIZED_OPS for n in ir.iter_nodes(model.graph))

    def _outputs(self, model, *, isolated: bool = False, optimize: bool | None = None) -> list[Feeds]:
        # `model` is an ir.Model, or the proto of one as a pass was given it (with `optimize`).
        optimize = self.runs_optimized(model) if optimize is None else optimize
        if isolated:
            return runtime.outputs_isolated(model, self.batches, threads=self.ctx.threads, optimize=optimize)
        sess = runtime.session(model, threads=self.ctx.threads, optimize=optimize)
        # (A model from before a pass that added inputs, `feed`, is not fed them; one whose input
        # dtypes a pass changed, legalize(interface=target), is fed the same values in its dtypes.)
        specs = runtime.input_specs(sess)
        return [runtime.run(sess, runtime.adapt_feeds(specs, feeds)) for feeds in self.batches]

    def step(self, model: ir.Model, name: str, *, exact: bool,
             before: onnx.ModelProto | None = None) -> dict[str, verify.OutputMetrics]:
        """Compare `model`, the result of pass (or step) `name`, with the previous model.

        An exact pass is judged like with like, both models unoptimized: after `quant`, ORT's
        optimised runs pick integer kernels by the graph's shape, so an exact rewrite (a
        removed Identity) can move the outputs of the deployed model by a quantization step
        without changing what the model computes, and a real bug can hide in the kernels'
        rounding. `before` is the model the pass was given, needed for that when it ran
        optimized; the metrics are then of the unoptimized pair.
        """
        what = name if name == FIX_SHAPE else f"pass '{name}'"
        unoptimized = exact and before is not None
        try:
            current = self._outputs(model, optimize=False if unoptimized else None)
            deployed = self._outputs(model) if unoptimized else current
            reference = self._outputs(before, optimize=False) if unoptimized else self.previous
        except Exception as exc:
            raise PassFailure(f"{what} produced a model onnxruntime cannot run: {_ort_text(exc)}") from exc
        missing = set(reference[0]) - set(current[0])
        if missing:
            raise PassFailure(f"{what} removed graph output(s) {', '.join(sorted(missing))}")
        current = [{name: out[name] for name in prev} for prev, out in zip(reference, current)]
        deployed = [{name: out[name] for name in prev} for prev, out in zip(reference, deployed)]
        metrics = verify.compare_all(reference, current, scores=self.scores)
        floor = self.ctx.verify.floor()
        if not exact and floor:  # what the user asked a lossy pass to hold, measured as the search does
            shortfall = floor.shortfall(measure(reference, current))
            if shortfall:
                raise FloorViolation(name, *shortfall)
        if exact:
            cfg = self.ctx.verify
            violation = verify.exactness_violation(metrics, cfg.rtol, cfg.atol)
            if violation:
                raise VerificationError(name, *violation, seed=self.ctx.seed)
        self.previous = deployed  # later steps and the summary compare models as deployed
        return metrics

    def feed(self, inputs: Mapping[str, np.ndarray]) -> None:
        """From now on also feed `inputs` (the initial state a pass that extends the interface added)."""
        self.batches = [batch | dict(inputs) for batch in self.batches]

    def against_original(self) -> dict[str, verify.OutputMetrics]:
        return verify.compare_all(self.original, self.previous, scores=self.scores)


def _ort_text(exc: BaseException) -> str:
    text = one_line(exc)
    return text if len(text) <= ORT_MESSAGE_LIMIT else text[:ORT_MESSAGE_LIMIT - 3] + "..."


def _does_not_run(exc: BaseException, source: str, feeds: Feeds, ctx: PassContext, specs) -> str:
    """Why verification cannot start, with advice that fits what the user already gave."""
    shapes = ", ".join(f"{name}={'x'.join(map(str, value.shape)) or 'scalar'}" for name, value in feeds.items())
    advice = []
    if ctx.fixed_shapes:
        advice.append(f"check the {FIX_SHAPE} sizes ({_shapes_text(ctx.fixed_shapes)}) against the model")
    if ctx.calibration is not None:
        advice.append(f"check that {source} holds inputs this model accepts")
    elif ctx.data_option:
        advice.append(f"give real inputs with {ctx.data_option}")
    if ctx.calibration is None and not ctx.fixed_shapes:
        dynamic = [s.name for s in specs if s.shape is None or not all(isinstance(d, int) and d > 0 for d in s.shape)]
        if dynamic:
            advice.append(f"fix its dynamic inputs ({', '.join(dynamic[:4])}) with {FIX_SHAPE} NAME=DIMS")
    advice.append("or skip verification with --no-verify")
    return f"the input model does not run in onnxruntime on {source} ({shapes}): {_ort_text(exc)}; " + ", ".join(advice)


def _shapes_text(shapes) -> str:
    return " ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in (shapes or {}).items())


def verification_data(model: ir.Model, ctx: PassContext) -> CalibrationData:
    """Samples to verify `model` on: the calibration data's first samples, else seeded random
    inputs that the graph accepts (see `random_inputs`)."""
    wanted = ctx.verify.samples
    if ctx.calibration is not None:
        return ctx.calibration.take(wanted)
    return random_inputs(model, wanted, seed=ctx.seed)


def random_inputs(model, count: int, seed: int = 0) -> CalibrationData:
    """Seeded random inputs for `model` (an ir.Model or ModelProto): shaped from its inputs
    (each input batched on its own batch axis), integers in ranges that its graph
    accepts (`integer_input_ranges`)."""
    specs = runtime.input_specs(model)
    return CalibrationData.random(specs, count, seed=seed, ranges=integer_input_ranges(model))


# What an integer input may hold, by what reads it: (op, input index) -> [low, high).
# A size, count, divisor or step must be positive (0 makes onnxruntime divide by zero: SIGFPE);
# a shape for Expand is all ones and for Reshape all zeros (keep each dim), valid for any input;
# TopK's k is 1; an index is in range of the axis it indexes (see _INDEXES), else 0.
_POSITIVE = (1, 4)
_VALUE_RANGES = {
    **dict.fromkeys([("Div", 1), ("Mod", 1), ("ConstantOfShape", 0), ("Tile", 1), ("OneHot", 1), ("Range", 1),
                     ("Range", 2), ("Resize", 3), ("Loop", 0), ("NonMaxSuppression", 2), ("STFT", 1), ("STFT", 3),
                     ("DFT", 1), ("HannWindow", 0), ("HammingWindow", 0), ("BlackmanWindow", 0),
                     ("MelWeightMatrix", 0), ("MelWeightMatrix", 1), ("MelWeightMatrix", 2), ("CenterCropPad", 1),
                     ("Col2Im", 1), ("Col2Im", 2), ("AffineGrid", 1), ("Slice", 4)], _POSITIVE),
    **dict.fromkeys([("Expand", 1), ("TopK", 1), ("ReverseSequence", 1)], (1, 2)),
    **dict.fromkeys([("Reshape", 1), ("GatherND", 1), ("ScatterND", 1), ("CumSum", 1), ("RoiAlign", 2)], (0, 1)),
}
# (op, indices input) -> (data input, default axis): indices must be in [0, data.shape[axis]).
_INDEXES = {("Gather", 1): (0, 0), ("GatherElements", 1): (0, 0), ("ScatterElements", 1): (0, 0),
            ("Scatter", 1): (0, 0), ("NegativeLogLikelihoodLoss", 1): (0, 1), ("SoftmaxCrossEntropyLoss", 1): (0, 1)}
# Ops that pass integer values through unchanged (their consumers decide the range).
_VALUE_PRESERVING = {"Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Reshape", "Expand"}


def integer_input_ranges(model) -> dict[str, tuple[int, int] | list[int]]:
    """{integer graph input: [low, high) of values its readers accept, or a list of values}, for
    random inputs (`CalibrationData.random(ranges=...)`).

    Inputs that nothing in `_VALUE_RANGES` / `_INDEXES` reads are left out (0 or 1 then: valid
    ids, masks and indices). When readers disagree, the intersection wins if there is one. An
    input only compared with constants (`Equal(sr, 16000)` choosing an If branch) takes those
    constants and one other value in turn, so that every branch runs.
    """
    model = model if isinstance(model, ir.Model) else ir.from_proto(model, infer=False)
    readers: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in ir.iter_nodes(model.graph):
        for index, tensor in enumerate(node.inputs):
            readers.setdefault(tensor.name, []).append((node, index))
    ranges = {}
    for tensor in model.graph.inputs:
        try:
            if np.dtype(tensor.dtype).kind not in "iu":
                continue
        except TypeError:  # no dtype, or not a numpy one
            continue
        compared = _compared_with(tensor.name, readers)
        if compared:
            ranges[tensor.name] = [*compared, min(compared) - 1]
            continue
        found = _reader_ranges(tensor.name, readers, set())
        if found:
            low, high = max(r[0] for r in found), min(r[1] for r in found)
            ranges[tensor.name] = (low, high) if low < high else found[0]
    return ranges


def _compared_with(name: str, readers) -> list[int]:
    """The scalar constants `name` is compared with, when Equal with a constant is all it feeds."""
    values = []
    for node, index in readers.get(name, []):
        other = node.inputs[1 - index] if node.op == "Equal" and len(node.inputs) == 2 else None
        value = ir.constant_value(other) if other is not None else None
        if value is None or value.size != 1:
            return []
        values.append(int(value.reshape(())))
    return sorted(set(values))


def _reader_ranges(name: str, readers, seen: set) -> list[tuple[int, int]]:
    found = []
    seen.add(name)
    for node, index in readers.get(name, []):
        key = (node.op, index)
        if key == ("Reshape", 1) and node.attrs.get("allowzero"):
            continue  # a 0 would mean an empty dim, not "keep this dim"
        if key in _VALUE_RANGES:
            found.append(_VALUE_RANGES[key])
        elif key in _INDEXES:
            data, axis = _INDEXES[key]
            axis = int(node.attrs.get("axis", axis))
            shape = node.inputs[data].shape if len(node.inputs) > data else None
            dim = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
            found.append((0, int(dim)) if isinstance(dim, int | np.integer) and dim > 0 else (0, 1))
        elif node.op in _VALUE_PRESERVING and not (node.op in ("Reshape", "Expand") and index):
            for out in node.outputs:
                if out.name not in seen:
                    found += _reader_ranges(out.name, readers, seen)
    return found


def reference_outputs(model, data: CalibrationData, batch_size: int = 8, threads: int = 0) -> list[Feeds]:
    """Outputs of `model` (a path, ModelProto or Model) over `data` in batches, e.g. for accuracy tables."""
    sess = runtime.session(model, threads=threads, optimize=True)
    batch = runtime.batch_size_for(runtime.input_specs(sess), batch_size)
    return runtime.outputs(sess, data.batches(batch))


__all__ = ["Pass", "PassGroup", "PassResult", "PassRecord", "PipelineReport", "option", "run_group", "run_pipeline", "settle"]
