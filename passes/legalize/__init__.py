"""legalize: rewrite the ops a deployment target lacks into ops it runs.

Each rewrite is a small rule registered by the op it replaces (`rules.REWRITES`; the modules
below register them on import). The pass asks, for every node, whether it must go: listed in
the `ops` option, or (with `--target`) not run by the target's profile. It then runs the rules
for that op through cleanup's rule driver, which returns either what was done or why no rule
applies; what could not be rewritten is reported (stats, details, one warning), never hidden.

Rewrites are exact up to float rounding (Erf: a rational approximation within a few float32
units), so the manager verifies the result like any exact pass. Each is proven on the ONNX
backend node tests of its op and on the shared real models (tests/test_legalize.py,
tools/bench_legalize.py).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass

from edgegraph import ir
from edgegraph.errors import PassOptionError
from edgegraph.passbase import Pass, PassResult, option, settle
from edgegraph.registry import register_pass
from edgegraph.targets import ModelContext

from ..cleanup.common import (
    Legal, Names, NoMatch, apply_first_rule, graphs, int_list, is_standard, live_nodes, reinfer_shapes, target_context,
    target_verdict,
)
from edgegraph.convert import compute_in_float32, upgrade_opset
from . import activations, attention, convs, legacy, logic, norms, shapes  # noqa: F401 - importing registers the rewrites
from . import interface as _interface
from .rules import REPLACED, REWRITES

logger = logging.getLogger(__name__)

# Rounds run until one changes nothing: a rewrite may produce an op the target lacks too (Gelu ->
# Erf), and one of an op onnx cannot infer shapes through (Crop, ImageScaler) gives the nodes
# after it the ranks and dtypes their rules need (candy: a round per Crop).
ROUNDS = 32
# What to do instead, for ops whose rewrite may not suit a target.
HINTS = {"Upsample": "legalize(opset=11) makes it a Resize instead"}
RESIZE_OPSET = 11  # the first opset whose Resize has coordinate modes (Upsample becomes Resize with asymmetric ones)
SHOWN = 5  # op types named in the "could not rewrite" warning


@register_pass
@dataclass(frozen=True)
class Legalize(Pass):
    """Rewrite the nodes the target cannot run (with `--target`), or those of the op types in
    `ops`, into equivalent ops: HardSigmoid/HardSwish -> Mul/Add/Clip, Gelu/Erf/Mish/Softplus/
    Swish -> elementwise ops, Layer/Group/InstanceNormalization -> ReduceMean/Sub/Div, Einsum ->
    Transpose/Reshape/MatMul, Attention -> MatMul/Softmax/MatMul, ConvTranspose -> Conv/
    DepthToSpace/Slice, Space/DepthToSpace -> Reshape/Transpose, Upsample -> Gathers
    (asymmetric, as onnxruntime runs it), opset < 13 Softmax on N-D -> Flatten/Softmax/Reshape,
    ImageScaler/Crop/Affine -> Mul/Add/Slice, Gather with constant negative indices -> positive,
    Gather -> GatherND, reflect/edge Pad -> Slice/Concat, IsNaN of a never-infinite value ->
    Cast(x - x, bool), Where on a mask with finite constant branches -> Mul/Sub, GatherND with
    constant indices -> Reshape/Gather. With a target, a rewrite that would make an op the target lacks (or an
    attribute value it refuses) is undone and the next rule tried, and what the whole model
    needs comes first (`_whole_model_steps`: float32 compute, Upsample -> Resize, folding).

    `interface=target` changes the input/output dtypes the target cannot take (interface.py;
    the default keeps them), `finite` drops Softmax NaN guards the target cannot run (only true
    for finite activations). `opset` converts the model first (onnx's version converter, through
    `upgrade_opset`, which keeps Upsample's coordinates when it becomes Resize). Nodes that
    must go but that no rule can rewrite are listed in the details (`not_rewritten`, with the
    reason) and in a warning.
    """

    name = "legalize"
    summary = "Rewrite ops the target lacks (or those listed in ops) into ops it runs; optional opset conversion."
    exact = True

    ops: list[str] = option([], "op types to rewrite whatever the target runs, e.g. [HardSigmoid, Erf]")
    opset: int = option(0, "convert the model to this ai.onnx opset first (up or down); 0 keeps its opset (but "
                           "an opset 7-10 model with Upsample becomes opset 11 for a target that runs Resize only)")
    interface: str = option("keep", "keep: the model's input/output dtypes never change; target: those the target cannot "
                                    "take change (float16 -> float32 inputs/outputs, int64 -> int32 inputs where every "
                                    "reader takes int32 alike): callers then feed and read the new dtypes")
    finite: bool = option(False, "the model's activations are finite on the inputs it will see: a NaN guard the "
                                 "target cannot run (Where(IsNaN(p), c, p) after a Softmax) becomes p")

    def __post_init__(self):
        self.check(self.opset == 0 or 7 <= self.opset, "legalize: opset must be 0 (keep) or at least 7")
        unknown = sorted(set(self.ops) - set(REWRITES))
        self.check(not unknown, f"legalize: no rewrite for {', '.join(unknown)} (rewrites: {', '.join(sorted(REWRITES))})")
        self.check(self.interface in _interface.INTERFACES,
                   f"legalize: interface must be one of {', '.join(_interface.INTERFACES)}, got {self.interface!r}")

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        stats: Counter = Counter()
        if self.opset and self.opset != model.opset:
            before = model.opset
            converted = upgrade_opset(model, self.opset, down=True)
            if converted is None:
                raise PassOptionError(f"legalize: onnx cannot convert this model from opset {before} to {self.opset}")
            model.graph = converted.graph
            stats[f"opset {before}->{self.opset}"] = 1
        target = getattr(ctx, "target", None)
        interface_kept: list[dict] = []
        if self.interface != "keep" and target is None:
            raise PassOptionError("legalize: interface=target changes the dtypes the target cannot take: give --target")
        if target is not None:
            stats.update(_whole_model_steps(model, target, ctx, keep_opset=bool(self.opset)))
            if self.interface == "target":
                changed, interface_kept = _interface.retype(model, target)
                if changed:
                    settle(model)
                    reinfer_shapes(model)
                stats.update(changed)
        run = copy.copy(self)  # what a run makes lives on this copy: the pass object stays immutable
        object.__setattr__(run, "names", Names(model))
        object.__setattr__(run, "made", [])  # nodes rewrites made, in order (not rewritten again, see _must_go)
        object.__setattr__(run, "target", target)
        left: dict[int, dict] = {}
        for _ in range(ROUNDS):
            changed = False
            left = {}
            context = target_context(target, model) if target is not None else None  # (a snapshot per round)
            made = {id(n) for n in run.made}
            for graph in graphs(model.graph):
                opset = int(graph.opset or model.opset)
                for node in live_nodes(graph):
                    verdict = run._must_go(node, target, context, made)
                    if verdict is None:
                        continue
                    kind, why = verdict
                    rules = [_checked(rule) for rule in REWRITES.get(node.op, ())]
                    if kind == "dynamic" or _dynamic_for(target, node, context):
                        # the ops a rewrite makes would read the same dynamic tensors
                        applied = NoMatch("no rewrite makes a shape static: --fix-shape does")
                    elif not is_standard(node):
                        applied = NoMatch(f"custom domain {node.domain}")
                    else:
                        applied = apply_first_rule(rules, run, graph, node, opset)
                    if applied:
                        stats[applied] += 1
                        changed = True
                    elif not isinstance(applied, Legal):
                        reason = applied.reason + (f" ({HINTS[node.op]})" if node.op in HINTS else "")
                        left[id(node)] = {"node": node.name, "op": node.op, "why": why, "not_rewritten": reason}
            if not changed:
                break
            # Rewrites add initializers that no graph input lists; before IR 4 (opset 7-8 exports:
            # candy, SqueezeNet) every initializer had to be an input, or inference ignores it.
            model.graph.ir_version = max(int(getattr(model.graph, "ir_version", None) or 0), 4)
            settle(model)
            reinfer_shapes(model)  # later rules need the ranks and dtypes of the tensors made here
        not_rewritten = sorted(left.values(), key=lambda d: (d["op"], d["node"]))
        if not_rewritten:
            by_op: dict[str, list[dict]] = {}
            for d in not_rewritten:
                by_op.setdefault(d["op"], []).append(d)
            # One entry per op type, biggest first: its count, the first node's reason and why no rule helped.
            ranked = sorted(by_op.items(), key=lambda item: (-len(item[1]), item[0]))
            shown = "; ".join(f"{op} x{len(ds)} ({ds[0]['why']}: {ds[0]['not_rewritten']})" for op, ds in ranked[:SHOWN])
            more = f"; and {len(ranked) - SHOWN} more op types" if len(ranked) > SHOWN else ""
            logger.warning("legalize: %d node(s) could not be rewritten: %s%s", len(not_rewritten), shown, more)
            stats["not_rewritten"] = len(not_rewritten)
        modified = any(k != "not_rewritten" for k in stats)
        details = {"not_rewritten": not_rewritten} if not_rewritten else {}
        if interface_kept:
            details["interface_kept"] = interface_kept
        return PassResult(modified=modified, stats=dict(sorted(stats.items())), details=details)

    def _must_go(self, node, target, context, made: set[int]) -> tuple[str, str] | None:
        """(kind, reason) why `node` has to be rewritten (kinds as `target_verdict`), or None."""
        if node.op in self.ops:  # (not one a rewrite of this very op made: Softmax-7 -> Flatten/Softmax/Reshape)
            return None if id(node) in made else ("op", f"{node.op} is listed in ops")
        return target_verdict(target, node, context)

    def runs_op(self, node, opset: int) -> bool:
        """Whether the target runs `node` (shapes aside: new tensors have none yet), or
        a rewrite exists for it (the next round tries it: Gelu -> Erf -> polynomial)."""
        if self.target is None or node.op in REPLACED:
            return True
        limit = getattr(self.target, "max_rank", None)
        if limit is not None and (_made_rank(node) or 0) > limit:  # (rank-6 Reshape/Transpose of SpaceToDepth)
            return False
        why = getattr(self.target, "why", None)
        if callable(why):  # a profile: its op list, opsets and attribute limits (NNAPI casts to float/int32 only)
            found = why(node, _Unshaped(opsets={"": opset}, shapes={}, dtypes={}, constants=set()))
            return found is None or found[0] not in ("op", "opset", "attr")
        has = getattr(self.target, "supports_op", None)
        if callable(has):
            return has(node.op, node.domain or "", opset)
        ops = getattr(self.target, "ops", None)
        return not ops or node.op in ops


def _whole_model_steps(model: ir.Model, target, ctx, *, keep_opset: bool = False) -> Counter:
    """What a target needs done to the whole model before node rewrites (their counter keys):

    * float16 compute for a target that takes no float16 (NNAPI): the model computes in float32
      behind Casts at its float16 inputs and outputs (`convert.compute_in_float32`; its interface
      stays float16, so those Casts are what stays off the target).
    * Upsample (opset <= 10) for a target without it that runs Resize: the opset conversion to
      11 (`convert.upgrade_opset`, which keeps Upsample's asymmetric coordinates; onnx's
      converter alone would shift them to half_pixel). Resize is the op that replaced Upsample:
      one node instead of a Gather per scaled axis (CoreML has no Gather at all). Not when the
      user chose the opset (`legalize(opset=N)`, `keep_opset`).
    * constants folded (fold-constants, exact) when the target refuses a node for a dynamic shape
      (NNAPI) or a computed input it wants constant (TFLite's Slice bounds): once the inputs are
      fixed (--fix-shape), Shape/Gather/Concat chains become constants (MiniLM: 25 NNAPI
      partitions before, 7 after; TFLite 26 -> 1).
    """
    done: Counter = Counter()
    dtypes = getattr(target, "dtypes", None)
    if dtypes is not None and "float16" not in dtypes and compute_in_float32(model):
        done["float16->float32 compute"] = 1
    has = getattr(target, "supports_op", None)
    upsamples = [n for g in graphs(model.graph) for n in g.nodes if n.op == "Upsample" and is_standard(n)]
    if upsamples and not keep_opset and model.opset < RESIZE_OPSET and callable(has) and not has("Upsample", "", model.opset) \
            and has("Resize", "", RESIZE_OPSET):
        before = model.opset
        converted = upgrade_opset(model, RESIZE_OPSET)
        if converted is not None:  # (else the Upsample rules below say what they can do)
            model.graph = converted.graph
            done[f"opset {before}->{RESIZE_OPSET} (Upsample->Resize)"] = 1
    if _refused_for_shapes(model, target):
        from ..cleanup import FoldConstants

        folded = FoldConstants().run(model, ctx)
        if folded.modified:
            settle(model)
            reinfer_shapes(model)
            done["shape computations folded"] = sum(folded.stats.values()) or 1
    return done


def _refused_for_shapes(model: ir.Model, target) -> bool:
    """Whether the target refuses a node for a dynamic shape or for a computed input it wants
    constant (TFLite: MiniLM's Slice by the sequence length), which folding may settle."""
    context = target_context(target, model)
    return any((target_verdict(target, node, context) or ("",))[0] in ("dynamic", "constant")
               for node in live_nodes(model.graph))


class _Unshaped(ModelContext):
    """What a profile is told about the nodes a rewrite just made: no shapes, dtypes or constants
    yet (and not "dynamic" for that), so only their op type, opset and attributes are judged."""

    def is_static(self, name: str) -> bool:
        return True


def _dynamic_for(target, node, context) -> bool:
    """Whether `target` needs static shapes (NNAPI) and `node` reads a dynamic one: whatever
    replaced the node would be refused too (MiniLM's LayerNormalization, refused as an op)."""
    if not getattr(target, "static_shapes", False) or not hasattr(context, "is_static"):
        return False
    return any(t.name and not context.is_static(t.name) for t in node.inputs)


def _made_rank(node) -> int | None:
    """The rank a new Reshape/Transpose works in, read from its constants (new tensors have no
    shapes yet)."""
    if node.op == "Transpose" and "perm" in node.attrs:
        return len(node.attrs["perm"])
    if node.op == "Reshape" and len(node.inputs) > 1:
        shape = int_list(node.inputs[1])
        return None if shape is None else len(shape)
    return None


def _checked(rule):
    """`rule`, undone when what it made has an op type the target lacks (CoreML has Resize but no
    Gather: Upsample as Gathers would not help it): the next rule is tried, else the reason kept."""

    def checked(owner, graph, node, opset):
        inputs, outputs, mark = list(node.inputs), list(node.outputs), len(owner.made)
        applied = rule(owner, graph, node, opset)
        if not applied:
            return applied
        made = owner.made[mark:]
        lacking = sorted({n.op for n in made if not owner.runs_op(n, opset)})
        if not lacking:
            return applied
        for new in made:  # undo: unlink what the rule made and give the node its tensors back
            new.inputs.clear()
            new.outputs.clear()
        gone = {id(n) for n in made}
        graph.nodes = [n for n in graph.nodes if id(n) not in gone]
        del owner.made[mark:]
        node.inputs.clear()
        node.outputs.clear()
        node.inputs.extend(inputs)
        node.outputs.extend(outputs)
        return NoMatch(f"it would make {', '.join(lacking)}, which {getattr(owner.target, 'name', 'the target')} cannot run either")

    checked.__name__ = rule.__name__
    return checked

__all__ = ["Legalize", "REWRITES"]
