"""The pass contract: `Pass`, `PassResult` and `option`, below the registry, the spec parser and the manager."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edgegraph.errors import PassOptionError

if TYPE_CHECKING:
    from edgegraph import ir
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


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. A pass is a frozen dataclass whose fields are its options.

    Subclasses set `name` (kebab-case, what `-p` accepts), `summary` (one line for `edgegraph
    passes`), `exact` (True when the pass must not change outputs beyond float rounding) and
    `needs` (what the context must hold: {"calibration"} and/or {"target"}), and implement
    `run`, editing `model.graph` in place. A pass object is immutable, so that one object can
    run on many models (and twice in a pipeline): what a run computes lives in that run.

    `after()` lists passes that must have run on the model first (quant wants BatchNorm folded:
    cleanup); the manager runs them unless they just ran. `requires(model, ctx)` and
    `ensures(model, ctx)` are optional pre- and post-conditions that raise PreconditionError /
    PostconditionError. The manager removes dead nodes and re-sorts after a pass that reports a
    change.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()

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


__all__ = ["Pass", "PassResult", "option"]
