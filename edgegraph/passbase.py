"""The pass contract (`Pass`, `PassGroup`, `PassResult`, `option`) and how a changed model is settled.

Below the registry, the spec parser and the manager, which all import it (and it none of them).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.errors import PassOptionError

if TYPE_CHECKING:
    from edgegraph.context import PassContext


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
    # Only for a pass that `extends_interface`: a value for each graph input it added under which
    # the model computes what it did before (a stateful model's initial state).
    new_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. A pass is a frozen dataclass whose fields are its options.

    Subclasses set `name` (kebab-case, what `-p` accepts), `summary` (one line for `edgegraph
    passes`), `exact` (True when the pass must not change outputs beyond float rounding) and
    `needs` (what the context must hold: {"calibration"} and/or {"target"}), `knob` for a lossy
    pass with a strength knob (what it turns: the user's floors, `ctx.verify.floor()`, are then its
    budget, searched with `edgegraph.floor.search`), and implement
    `run`, editing `model.graph` in place. A pass object is immutable, so that one object can
    run on many models (and twice in a pipeline): what a run computes lives in that run.

    `after()` lists passes that must have run on the model first (quant wants BatchNorm folded:
    cleanup); the manager runs them unless they just ran. `requires(model, ctx)` and
    `ensures(model, ctx)` are optional pre- and post-conditions that raise PreconditionError /
    PostconditionError. The manager removes dead nodes and re-sorts after a pass that reports a
    change.

    No pass may change the graph's inputs and outputs (users and runtimes address the model by
    them), except one that sets `extends_interface`: it may add inputs and outputs after the
    existing ones (a state the application feeds back, `frame-cache`), and returns in
    `PassResult.new_inputs` the values of its new inputs under which the model computes what it
    did; the manager feeds them when it verifies this pass and the later ones.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()
    knob: ClassVar[str] = ""
    extends_interface: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def after(self) -> tuple[Pass, ...]:
        """Passes the model must have been through before this one (run by the manager)."""
        return ()

    def context_needs(self) -> frozenset[str]:
        """What this pass object needs from the context: `needs`, or more for some options."""
        return self.needs

    def requires(self, model: ir.Model, ctx: PassContext) -> None:
        """Precondition on the model the pass is given; raise PreconditionError when it fails."""

    def ensures(self, model: ir.Model, ctx: PassContext) -> None:
        """Postcondition on the model the pass made; raise PostconditionError when it fails."""

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


@dataclass(frozen=True)
class PassGroup(Pass):
    """Exact passes run in rounds to a fixed point (`cleanup`): the manager's `run_group` runs
    `passes()` until a round changes nothing or `max_rounds` rounds ran, settling the model
    after each pass that changed it. Lossy passes cannot be in a group: repeating them compounds.
    """

    max_rounds: ClassVar[int] = 8

    def passes(self) -> Sequence[Pass]:
        raise NotImplementedError

    def between_rounds(self, model: ir.Model) -> None:
        """Work between two rounds (cleanup re-infers shapes for the tensors rewrites made)."""

    def run(self, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
        return run_group(self, model, ctx)


def run_group(group: PassGroup, model: ir.Model, ctx: PassContext | None) -> PassResult:
    """Run `group`'s passes in rounds until a round changes nothing (at most `group.max_rounds`),
    settling the model after every pass that changed it; the result sums what each pass did.

    Only exact passes may repeat: re-running a lossy one (prune, quant) would compound its loss.
    """
    passes = list(group.passes())
    lossy = [p.name for p in (group, *passes) if not p.exact]
    if lossy:
        raise TypeError(f"group '{group.name}' repeats lossy pass(es) {', '.join(lossy)}; only exact passes repeat")
    counts: Counter = Counter()
    details: dict[str, Counter] = {}
    rounds = 0
    for rounds in range(1, group.max_rounds + 1):
        if rounds > 1:
            group.between_rounds(model)
        changed = False
        for p in passes:
            result = p.run(model, ctx)
            if result.modified:
                changed = True
                settle(model)
                counts[p.name] += sum(v for v in result.stats.values() if isinstance(v, int))
                details.setdefault(p.name, Counter()).update(result.stats)
        if not changed:
            break
    stats: dict[str, Any] = {name: counts[name] for name in (p.name for p in passes) if counts[name]}
    stats["rounds"] = rounds
    return PassResult(modified=bool(counts), stats=stats,
                      details={name: dict(sorted(c.items())) for name, c in details.items()})


def settle(model: ir.Model) -> None:
    """Re-sort every graph of `model` (subgraphs and functions too) and drop its dead nodes: what
    the manager does after every pass that changed the model, and the only place that does it."""
    for graph in list(ir.iter_graphs(model.graph)):
        ir.sort_nodes(graph)
        drop_dead_nodes(graph)


def drop_dead_nodes(graph: gs.Graph) -> int:
    """Drop nodes no graph output depends on (graph must be sorted); returns how many."""
    live = {id(t) for t in graph.outputs}
    keep = []
    for node in reversed(graph.nodes):
        if any(id(o) in live for o in node.outputs):
            keep.append(node)
            live.update(id(t) for t in ir.node_reads(node))
        else:
            node.inputs.clear()
            node.outputs.clear()
    removed = len(graph.nodes) - len(keep)
    if removed:
        graph.nodes = keep[::-1]
    return removed


__all__ = ["Pass", "PassGroup", "PassResult", "option", "run_group", "settle"]
