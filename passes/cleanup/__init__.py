"""Semantics-preserving cleanup: the `cleanup` pass and the sub-passes it runs to a fixed point.

Each sub-pass is also a pass of its own (`edgegraph opt m.onnx -p fold-constants`):

    fold-constants      precompute constant subgraphs, static Shape/Size, constant-condition If
    remove-identity     Identity, inference Dropout, no-op Cast/Reshape/Transpose/Pad/Slice/...
    simplify-shapes     merge/cancel Reshape/Transpose/Squeeze/Unsqueeze/Slice/Concat chains
    fold-batchnorm      BatchNormalization into Conv/ConvTranspose/Gemm/MatMul
    fuse-activations    HardSigmoid/HardSwish spelled out as Add/Clip/Mul/Div
    fuse-linear         constant Add/Mul/Pad into Conv/Gemm, MatMul+Add -> Gemm, constant chains
    dedup-initializers  one initializer for identical constants
    cse                 one node for identical computations
    eliminate-dead      unused nodes, initializers, optional outputs, functions
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from edgegraph import ir
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.registry import register_pass

from .activations import FuseActivations
from .batchnorm import FoldBatchNorm
from .common import graphs, reinfer_shapes, tidy
from .dedup import CommonSubexpressions, DedupInitializers, EliminateDead
from .fold import FoldConstants
from .fuse import FuseLinear
from .identity import RemoveIdentity
from .shapes import SimplifyShapes

# fuse-activations runs before fuse-linear: merging the "/ 6" of a hard-swish into a following
# constant Mul would hide the pattern.
SUB_PASSES = (FoldConstants, RemoveIdentity, SimplifyShapes, FoldBatchNorm, FuseActivations, FuseLinear,
              DedupInitializers, CommonSubexpressions, EliminateDead)


@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Run every cleanup sub-pass in rounds until a round changes nothing (or `max_rounds`).

    Shapes are re-inferred (in place) between rounds so rules that need them see the tensors
    earlier rewrites created.
    Stats count what each sub-pass did; details break the counts down by rewrite.
    """

    name = "cleanup"
    summary = "Fold constants, remove no-ops, simplify shapes, fold BatchNorm/bias/pads, dedup, CSE, dead code."
    exact = True

    max_rounds: int = option(8, "upper bound on rounds of all sub-passes")
    skip: list[str] = option([], "sub-passes to leave out, e.g. [cse, fuse-linear]")
    size_limit: int = option(FoldConstants.size_limit, "fold-constants: largest folded tensor in bytes")
    growth_limit: int = option(
        FoldConstants.growth_limit,
        "fold-constants: largest folded tensor (bytes) that may be bigger than the constants it makes unused",
    )

    def __post_init__(self):
        self.check(self.max_rounds >= 1, "cleanup: max_rounds must be >= 1")
        known = {p.name for p in SUB_PASSES}
        unknown = [s for s in self.skip if s not in known]
        self.check(not unknown, f"cleanup: cannot skip {', '.join(unknown)} (sub-passes: {', '.join(sorted(known))})")

    def sub_passes(self) -> list[Pass]:
        passes = []
        for cls in SUB_PASSES:
            if cls.name in self.skip:
                continue
            if cls is FoldConstants:
                passes.append(FoldConstants(size_limit=self.size_limit, growth_limit=self.growth_limit))
            else:
                passes.append(cls())
        return passes

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        before = _node_count(model)
        counts: Counter = Counter()
        details: dict[str, Counter] = {}
        passes = self.sub_passes()
        rounds = 0
        for rounds in range(1, self.max_rounds + 1):
            if rounds > 1:  # rewrites left new tensors without shapes; some rules need them
                reinfer_shapes(model)
            changed = False
            for p in passes:
                result = p.run(model, ctx)
                if result.modified:
                    changed = True
                    tidy(model)
                    counts[p.name] += sum(v for v in result.stats.values() if isinstance(v, int))
                    details.setdefault(p.name, Counter()).update(result.stats)
            if not changed:
                break
        after = _node_count(model)
        stats = {name: counts[name] for name in (p.name for p in passes) if counts[name]}
        stats.update(nodes_before=before, nodes_after=after, rounds=rounds)
        return PassResult(modified=bool(counts), stats=stats,
                          details={name: dict(sorted(c.items())) for name, c in details.items()})


def _node_count(model: ir.Model) -> int:
    return sum(len(g.nodes) for g in graphs(model.graph))


__all__ = ["Cleanup", *[cls.__name__ for cls in SUB_PASSES]]
