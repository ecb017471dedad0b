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

from dataclasses import dataclass

from edgegraph import ir
from edgegraph.passbase import Pass, PassGroup, PassResult, option
from edgegraph.registry import register_pass

from .activations import FuseActivations
from .batchnorm import FoldBatchNorm
from .common import graphs, reinfer_shapes
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
class Cleanup(PassGroup):
    """Run every cleanup sub-pass in rounds until a round changes nothing (or `max_rounds`).

    The rounds are the manager's fixed-point loop (`run_group`), which settles the model after
    each sub-pass that changed it. Shapes are re-inferred (in place) between rounds so rules
    that need them see the tensors earlier rewrites created.
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

    def passes(self) -> list[Pass]:
        passes = []
        for cls in SUB_PASSES:
            if cls.name in self.skip:
                continue
            if cls is FoldConstants:
                passes.append(FoldConstants(size_limit=self.size_limit, growth_limit=self.growth_limit))
            else:
                passes.append(cls())
        return passes

    def between_rounds(self, model: ir.Model) -> None:
        reinfer_shapes(model)  # rewrites left new tensors without shapes; some rules need them

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        before = _node_count(model)
        result = super().run(model, ctx)
        rounds = result.stats.pop("rounds")
        result.stats.update(nodes_before=before, nodes_after=_node_count(model), rounds=rounds)
        return result


def _node_count(model: ir.Model) -> int:
    return sum(len(g.nodes) for g in graphs(model.graph))


__all__ = ["Cleanup", *[cls.__name__ for cls in SUB_PASSES]]
