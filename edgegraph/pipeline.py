"""The pass protocol and the manager that runs, checks and times a sequence of passes."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


from edgegraph import ir, runtime, verify
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import MissingRequirementError, PassFailure, PassOptionError, VerificationError
from edgegraph.runtime import Feeds

logger = logging.getLogger(__name__)


def option(default: Any, doc: str, **kwargs) -> Any:
    """A documented pass option: `ratio: float = option(0.3, "fraction of channels to remove")`."""
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, counters for the summary, and details
    (e.g. a per-layer table) that go to the JSON report."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pass:
    """Base class of every pass. A pass is a dataclass whose fields are its options.

    Subclasses set `name` (kebab-case, what `-p` accepts), `summary` (one line for `edgegraph
    passes`), `exact` (True when the pass must not change outputs beyond float rounding) and
    `requires` ({"calibration"} and/or {"target"}), and implement `run`, editing `model.graph`
    in place. The manager removes dead nodes and re-sorts after a pass that reports a change.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options as a plain dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def changed_options(self) -> dict[str, Any]:
        """Options that differ from their defaults (what a spec string needs to say)."""
        defaults = type(self)()
        return {k: v for k, v in self.options().items() if getattr(defaults, k) != v}

    @staticmethod
    def check(condition: bool, message: str) -> None:
        """Option validation for `__post_init__`: a clear error instead of a bad run."""
        if not condition:
            raise PassOptionError(message)


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


@dataclass
class PipelineReport:
    passes: list[PassRecord] = field(default_factory=list)
    # Final model vs the input model, on the verification samples (empty when not verified).
    metrics: dict[str, verify.OutputMetrics] = field(default_factory=dict)
    verification_data: str = ""


def check_requirements(passes: Sequence[Pass], ctx: PassContext) -> None:
    """Fail before any work when a pass needs something the context lacks."""
    for p in passes:
        if "calibration" in p.requires and ctx.calibration is None:
            raise MissingRequirementError(
                f"pass '{p.name}' needs calibration data: give --calib DATA.npz (an array per input "
                "name, N samples stacked on axis 0 or in the model's layout) or a folder of images"
            )


def run_pipeline(model: ir.Model, passes: Sequence[Pass], ctx: PassContext) -> tuple[ir.Model, PipelineReport]:
    """Run `passes` in order on a copy of `model`, verifying each one; returns the new model and a report.

    Exact passes must keep every output within `ctx.verify` tolerances of the model they were
    given, or `VerificationError` names the pass and the output. Lossy passes record metrics.
    """
    from edgegraph.spec import format_pass

    check_requirements(passes, ctx)
    model = model.copy()
    report = PipelineReport()
    checker = _Checker(model, ctx) if ctx.verify.enabled else None
    if checker:
        report.verification_data = checker.source
    interface = _interface(model)
    for position, p in enumerate(passes, 1):
        start = time.perf_counter()
        try:
            result = p.run(model, ctx)
            if result.modified:
                for graph in ir.iter_graphs(model.graph):
                    # mode="nodes": sorting the function list recurses forever in onnx-graphsurgeon
                    # 0.6 when a model has both local functions and If/Loop/Scan subgraphs.
                    graph.cleanup(remove_unused_graph_inputs=False).toposort(mode="nodes")
        except (MissingRequirementError, PassOptionError, VerificationError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if getattr(exc, "exit_code", None) == 2:  # a user error found while running (e.g. bad data)
                raise
            raise PassFailure(f"pass {position} '{p.name}' failed: {type(exc).__name__}: {exc}") from exc
        change = _interface_change(interface, _interface(model))
        if change:  # users and runtimes address a model by these names: no pass may touch them
            raise PassFailure(f"pass '{p.name}' {change}")
        record = PassRecord(p.name, format_pass(p), result.modified, time.perf_counter() - start,
                            result.stats, result.details)
        if checker and result.modified:
            record.metrics = checker.step(model, p)
        report.passes.append(record)
        logger.info("%s: %s in %.2fs %s", p.name, "changed" if result.modified else "no change",
                    record.seconds, result.stats or "")
    if checker:
        report.metrics = checker.against_original()
    return model, report


def _interface(model: ir.Model) -> tuple[list[str], list[str]]:
    return [t.name for t in model.graph.inputs], [t.name for t in model.graph.outputs]


def _interface_change(before: tuple[list[str], list[str]], after: tuple[list[str], list[str]]) -> str | None:
    """What a pass did to the graph's input and output names (and order), in a few words; None if nothing."""
    def names(items: list[str]) -> str:
        shown = ", ".join(name[:80] for name in items[:3])
        return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    for kind, old, new in zip(("input", "output"), before, after):
        if old == new:
            continue
        removed, added = [n for n in old if n not in new], [n for n in new if n not in old]
        if removed:
            return f"removed graph {kind}(s) {names(removed)}" + (f" (now {names(added)})" if added else "")
        if added:
            return f"added graph {kind}(s) {names(added)}"
        return f"reordered the graph {kind}s"
    return None


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                           "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"})


class _Checker:
    """Runs each pass's output on the same samples and compares it with the previous model."""

    def __init__(self, model: ir.Model, ctx: PassContext):
        self.ctx = ctx
        self.specs = runtime.input_specs(model)
        data = verification_data(self.specs, ctx)
        self.source = data.source
        batch = runtime.batch_size_for(self.specs, len(data))
        self.batches = [runtime.adapt_feeds(self.specs, b) for b in data.batches(batch)]
        try:
            self.original = self._outputs(model)
        except Exception as exc:  # noqa: BLE001 - the input model itself does not run on this data
            logger.warning("verification disabled: the input model does not run on %s (%s); give --calib "
                           "data or --fix-shape", self.source, str(exc).splitlines()[0])
            self.batches = []
            self.original = []
        self.previous = self.original

    def _outputs(self, model: ir.Model) -> list[Feeds]:
        # Float models run unoptimized (the purest reference). Quantized ones run as deployed,
        # with ORT's integer kernels, whose accuracy can differ from the float simulation of Q/DQ.
        quantized = any(n.op in QUANTIZED_OPS for n in ir.iter_nodes(model.graph))
        sess = runtime.session(model, threads=self.ctx.threads, optimize=quantized)
        return [runtime.run(sess, feeds) for feeds in self.batches]

    def step(self, model: ir.Model, p: Pass) -> dict[str, verify.OutputMetrics]:
        if not self.batches:
            return {}
        try:
            current = self._outputs(model)
        except Exception as exc:
            raise PassFailure(f"pass '{p.name}' produced a model onnxruntime cannot run: {exc}") from exc
        missing = set(self.previous[0]) - set(current[0])
        if missing:
            raise PassFailure(f"pass '{p.name}' removed graph output(s) {', '.join(sorted(missing))}")
        current = [{name: out[name] for name in prev} for prev, out in zip(self.previous, current)]
        metrics = verify.compare_all(self.previous, current)
        if p.exact:
            cfg = self.ctx.verify
            violation = verify.exactness_violation(metrics, cfg.rtol, cfg.atol)
            if violation:
                raise VerificationError(p.name, *violation, seed=self.ctx.seed)
        self.previous = current
        return metrics

    def against_original(self) -> dict[str, verify.OutputMetrics]:
        if not self.batches:
            return {}
        return verify.compare_all(self.original, self.previous)


def verification_data(specs, ctx: PassContext) -> CalibrationData:
    """Samples to verify on: the explicit verification set, else the calibration data's first
    samples, else seeded random inputs."""
    wanted = ctx.verify.samples
    if ctx.calibration is not None:
        return ctx.calibration.take(wanted)
    return CalibrationData.random(specs, wanted, seed=ctx.seed)


def reference_outputs(model, data: CalibrationData, batch_size: int = 8, threads: int = 0) -> list[Feeds]:
    """Outputs of `model` (a path, ModelProto or Model) over `data` in batches, e.g. for accuracy tables."""
    sess = runtime.session(model, threads=threads, optimize=True)
    batch = runtime.batch_size_for(runtime.input_specs(sess), batch_size)
    return runtime.outputs(sess, data.batches(batch))


__all__ = ["Pass", "PassResult", "PassRecord", "PipelineReport", "option", "run_pipeline"]
