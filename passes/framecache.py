"""frame-cache: reuse a video model's backbone features while the frame barely changes.

The model becomes a stateful one that any runtime runs. Two state inputs are added, the cached
features at tensor `at` and a summary of the frame they were computed from (the frame average-
pooled to about `summary_size` pixels a side), with outputs for their next values and a `reused`
flag. In the graph, the change measure (mean absolute difference between the current frame's
summary and the cached one) picks, through an `If`, between the cached features and recomputing
the backbone up to `at`; everything after `at` (the head) always runs:

    reuse = mean(|pool(frame) - cached_summary|) < threshold
    features, summary = If(reuse, (cached_features, cached_summary), (backbone(frame), pool(frame)))

The summary kept is the one of the frame the features came from (not the last frame's), so a slow
drift still adds up to a recompute. The first frame feeds empty states (a size-0 first axis, e.g.
`np.zeros((0, C, H, W))`): they always recompute, and so the model fed them computes exactly what
it did. `threshold=0` never reuses; `threshold=inf` reuses from the second frame on.

`at=auto` takes, among the tensors through which everything after them is computed (a single-
tensor cut of the graph, found in its node order), the one whose backbone holds the most MACs while
the head keeps a MAC-bearing layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, stats
from edgegraph.errors import NAME_LIMIT, PreconditionError, shown
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.registry import register_pass

STATE_DIM = "frame_cache_n"  # the first axis of the state inputs: 0 on the first frame, then the batch


@register_pass
@dataclass(frozen=True)
class FrameCache(Pass):
    """Make a single-frame model stateful: an in-graph change measure on a downscaled frame
    decides, through an If, whether the backbone up to `at` is recomputed or its cached features
    are reused; the head after `at` always runs. State inputs `cached_features`, `cached_summary`
    (empty on the first frame), outputs `next_features`, `next_summary` and `reused`."""

    name = "frame-cache"
    summary = "Stateful video model: reuse the backbone's features at a cut while the frame barely changes."
    exact = True  # fed its initial (empty) state, the model computes what it did
    extends_interface = True

    at: str = option("auto", "tensor whose value is cached (auto: the cut saving the most MACs, keeping the head)")
    threshold: float = option(0.01, "reuse while the mean absolute change of the downscaled frame is below this "
                                    "(in input units; 0: never, inf: always after the first frame)")
    summary_size: int = option(16, "the change is measured on the frame average-pooled to about this size a side")
    frame: str = option("", "the frame input (default: the model's only 4-D float input)")

    def __post_init__(self):
        self.check(not math.isnan(self.threshold) and self.threshold >= 0,
                   "frame-cache: threshold must be >= 0 (inf: always reuse)")
        self.check(self.summary_size >= 1, "frame-cache: summary_size must be >= 1")

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        graph = model.graph
        frame = self._frame(graph)
        if frame is None:
            if self.at != "auto":
                raise PreconditionError("frame-cache: the model has no 4-D float input with static channels and size "
                                        "to measure the change on (fix its shape with --fix-shape)")
            return PassResult(modified=False, stats={"skipped": "no 4-D float frame input with a static size"})
        # (The graph is in topological order: modelio.load and the manager's settling keep it so.)
        # MACs as `edgegraph info` counts them (a dynamic batch taken as 1), by node.
        counted = {c.name: c.macs or 0 for c in stats.model_stats(model).node_macs}
        macs = {id(n): counted.get(n.name or n.outputs[0].name, 0) for n in graph.nodes if n.outputs}
        if self.at == "auto":
            at = _best_cut(graph, macs)
            if at is None:
                return PassResult(modified=False, stats={"skipped": "no single-tensor cut leaves a head with MACs"})
        else:
            at = graph.tensors().get(self.at)
            if at is None or not isinstance(at, gs.Variable) or ir.producer(at) is None:
                raise PreconditionError(f"frame-cache: at='{shown(self.at, NAME_LIMIT)}' is not a tensor a node "
                                        "of the main graph computes")
        backbone = _backbone(graph, at)
        names = ir.Namer(graph)
        new_inputs = _rewrite(graph, frame, at, backbone, self.threshold, self.summary_size, names)
        saved = sum(macs.get(id(n), 0) for n in backbone)
        return PassResult(modified=True, new_inputs=new_inputs,
                          stats={"at": at.name, "backbone_nodes": len(backbone), "cached_macs": saved,
                                 "total_macs": sum(macs.values())})

    def _frame(self, graph: gs.Graph) -> gs.Variable | None:
        candidates = [t for t in graph.inputs if isinstance(t, gs.Variable) and t.shape is not None
                      and len(t.shape) == 4 and all(isinstance(d, int) and d > 0 for d in t.shape[1:])
                      and np.dtype(t.dtype).kind == "f"]
        if self.frame:
            found = [t for t in candidates if t.name == self.frame]
            if not found:
                raise PreconditionError(f"frame-cache: frame='{shown(self.frame, NAME_LIMIT)}' is not a 4-D float "
                                        "input with static channels and size")
            return found[0]
        if len(candidates) > 1:
            raise PreconditionError("frame-cache: the model has several 4-D float inputs; name the frame with "
                                    "frame=INPUT")
        return candidates[0] if candidates else None


def _best_cut(graph: gs.Graph, macs: dict[int, int]) -> gs.Variable | None:
    """The tensor after which, in node order, only it is still needed, with the most MACs before
    it and some after it (the head)."""
    last_use: dict[int, int] = {}  # tensor id -> index of the last node reading it
    for i, node in enumerate(graph.nodes):
        for t in ir.node_reads(node):
            last_use[id(t)] = i
    outputs = {id(t) for t in graph.outputs}
    open_tensors: set[int] = set()
    tensors: dict[int, gs.Variable] = {}
    total = sum(macs.values())
    done, best, best_macs = 0, None, 0
    for i, node in enumerate(graph.nodes):
        done += macs.get(id(node), 0)
        for t in node.outputs:
            if not isinstance(t, gs.Variable) or not t.name:
                continue
            tensors[id(t)] = t
            if id(t) in outputs:
                open_tensors.add(id(t))  # (a graph output cannot be cached: never a cut)
            elif last_use.get(id(t), -1) > i:
                open_tensors.add(id(t))
        open_tensors = {k for k in open_tensors if k in outputs or last_use.get(k, -1) > i}
        if len(open_tensors) == 1:
            (key,) = open_tensors
            if key not in outputs and 0 < done < total and done >= best_macs:
                best, best_macs = tensors[key], done
    return best


def _backbone(graph: gs.Graph, at: gs.Variable) -> list[gs.Node]:
    """The nodes `at` depends on, in graph order; refused when a node outside them reads one of
    their other results (a skip connection past the cut) or one of them writes a graph output."""
    inside: set[int] = set()
    pending = [at]
    while pending:
        node = ir.producer(pending.pop())
        if node is None or id(node) in inside:
            continue
        inside.add(id(node))
        pending.extend(t for t in ir.node_reads(node) if not isinstance(t, gs.Constant))
    nodes = [n for n in graph.nodes if id(n) in inside]
    made = {id(t): t for n in nodes for t in n.outputs if t is not at}
    for node in graph.nodes:
        if id(node) in inside:
            continue
        crossing = next((t for t in ir.node_reads(node) if id(t) in made), None)
        if crossing is not None:
            raise PreconditionError(f"frame-cache: node '{shown(node.name, NAME_LIMIT)}' after the cut also reads "
                                    f"'{shown(crossing.name, NAME_LIMIT)}', computed before it: cache a later "
                                    "tensor, or use at=auto")
    leaked = next((t for t in graph.outputs if id(t) in made), None)
    if leaked is not None:
        raise PreconditionError(f"frame-cache: graph output '{shown(leaked.name, NAME_LIMIT)}' is computed before the "
                                "cut: cache a later tensor, or use at=auto")
    return nodes


def _rewrite(graph: gs.Graph, frame: gs.Variable, at: gs.Variable, backbone: list[gs.Node], threshold: float,
             summary_size: int, names: ir.Namer) -> dict[str, np.ndarray]:
    """Put `backbone` in the else branch of an If choosing between it and the cached state; returns
    the empty initial state."""
    dtype = np.dtype(at.dtype)
    frame_dtype = np.dtype(frame.dtype)
    height, width = frame.shape[2], frame.shape[3]
    kernel = [max(1, height // summary_size), max(1, width // summary_size)]
    pooled = [frame.shape[1], (height - kernel[0]) // kernel[0] + 1, (width - kernel[1]) // kernel[1] + 1]
    # Dims of `at` that inference left unknown are left free in the state input too.
    rest = list(at.shape[1:]) if at.shape is not None else []
    features_shape = [d if isinstance(d, int) and d > 0 else f"frame_cache_d{i + 1}" for i, d in enumerate(rest)]
    cached = gs.Variable(names("cached_features"), dtype, [STATE_DIM, *features_shape])
    cached_summary = gs.Variable(names("cached_summary"), frame_dtype, [STATE_DIM, *pooled])

    def var(prefix: str, kind=frame_dtype, shape=None) -> gs.Variable:
        return gs.Variable(names(prefix), kind, shape)

    def node(op: str, inputs, outputs, **attrs) -> gs.Node:
        return gs.Node(op, name=names(f"frame_cache_{op.lower()}"), inputs=inputs, outputs=outputs, attrs=attrs)

    summary = var("frame_summary", shape=[frame.shape[0], *pooled])
    state_summary = [STATE_DIM, *pooled]
    delta, magnitude = var("frame_delta", shape=state_summary), var("frame_change_abs", shape=state_summary)
    change = var("frame_change", shape=[])
    size, has_cache = var("cached_size", np.dtype(np.int64), []), var("has_cache", np.dtype(bool), [])
    small, never = var("small_change", np.dtype(bool), []), var("no_cache", np.dtype(bool), [])
    reused = var("reused", np.dtype(bool), [])
    limit = ir.const(names("frame_cache_threshold"), np.array(threshold, frame_dtype))
    zero = ir.const(names("frame_cache_zero"), np.array(0, np.int64))
    # An empty cached summary is the first frame: recompute. Only a cached one is compared with
    # (an empty one does not broadcast against a batch of frames).
    compare = gs.Graph(nodes=[node("Sub", [summary, cached_summary], [delta]),
                              node("Abs", [delta], [magnitude]),
                              node("ReduceMean", [magnitude], [change], keepdims=0),
                              node("Less", [change, limit], [small])],
                       outputs=[small], name=names("frame_cache_compare"), opset=graph.opset,
                       import_domains=graph.import_domains)
    first = gs.Graph(nodes=[node("Constant", [], [never], value=ir.const(names("frame_cache_false"),
                                                                          np.array(False)))],
                     outputs=[never], name=names("frame_cache_first"), opset=graph.opset,
                     import_domains=graph.import_domains)
    measure = [
        node("AveragePool", [frame], [summary], kernel_shape=kernel, strides=kernel),
        node("Size", [cached_summary], [size]),
        node("Greater", [size, zero], [has_cache]),
        node("If", [has_cache], [reused], then_branch=compare, else_branch=first),
    ]

    state_features = [STATE_DIM, *features_shape]
    reuse_features, reuse_summary = var("reuse_features", dtype, state_features), var("reuse_summary", shape=state_summary)
    then_branch = gs.Graph(nodes=[node("Identity", [cached], [reuse_features]),
                                  node("Identity", [cached_summary], [reuse_summary])],
                           outputs=[reuse_features, reuse_summary], name=names("frame_cache_reuse"),
                           opset=graph.opset, import_domains=graph.import_domains)
    fresh_summary = var("fresh_summary", shape=state_summary)
    else_branch = gs.Graph(nodes=[*backbone, node("Identity", [summary], [fresh_summary])],
                           outputs=[at, fresh_summary], name=names("frame_cache_recompute"),
                           opset=graph.opset, import_domains=graph.import_domains)
    features = var("next_features", dtype, state_features)
    next_summary = var("next_summary", frame_dtype, state_summary)
    head_readers = [n for n in at.outputs]
    choose = node("If", [reused], [features, next_summary], then_branch=then_branch, else_branch=else_branch)
    for reader in head_readers:
        ir.substitute(reader.inputs, at, features)
    inside = {id(n) for n in backbone}
    graph.nodes = [n for n in graph.nodes if id(n) not in inside] + measure + [choose]
    graph.inputs.extend([cached, cached_summary])
    graph.outputs.extend([features, next_summary, reused])
    empty_features = np.zeros([0, *(d if isinstance(d, int) else 1 for d in features_shape)], dtype)
    return {cached.name: empty_features, cached_summary.name: np.zeros([0, *pooled], frame_dtype)}


__all__ = ["FrameCache"]
