"""eliminate-dead, dedup-initializers and cse: remove what is unused or computed twice."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis.hashing import Hasher, constant_key
from edgegraph.passbase import PassResult
from edgegraph.registry import register_pass

from .common import (
    NONDETERMINISTIC, GraphPass, graphs, has_subgraph, is_empty, is_read, is_standard, prune,
    toposort,
)

CSE_VALUE_BYTES = 4096

# Outputs a node computes only when asked (by index): unused ones can be dropped.
OPTIONAL_OUTPUTS = {
    "Dropout": 1, "BatchNormalization": 1, "MaxPool": 1, "LayerNormalization": 1,
    "LSTM": 0, "GRU": 0, "RNN": 0,
}


@register_pass
@dataclass(frozen=True)
class EliminateDead(GraphPass):
    """Remove nodes no graph output depends on, initializers nothing reads, unused optional
    outputs (Dropout mask, MaxPool indices, LayerNormalization statistics ...) and local
    functions no node calls. Graph inputs and outputs are never removed."""

    name = "eliminate-dead"
    summary = "Remove dead nodes, unused initializers, unused optional outputs and uncalled functions."
    exact = True

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        done = Counter()
        for graph in graphs(model.graph):
            done += self.rewrite(graph, model)
        done["functions"] += _drop_uncalled_functions(model.graph)
        done = +done
        return PassResult(modified=bool(done), stats=dict(sorted(done.items())))

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        before_consts = _constants(graph)
        toposort(graph)
        done["nodes"] += prune(graph)
        for node in graph.nodes:
            done["outputs"] += _drop_unused_outputs(graph, node)
        done["initializers"] += len(before_consts - _constants(graph))
        return done


def _constants(graph: gs.Graph) -> set[int]:
    return {id(t) for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant)}


def _drop_unused_outputs(graph: gs.Graph, node: gs.Node) -> int:
    """Blank out optional outputs nobody reads (the node itself is live: `prune` ran first)."""
    first = OPTIONAL_OUTPUTS.get(node.op)
    if first is None or not is_standard(node):
        return 0
    dropped = 0
    for i in range(first, len(node.outputs)):
        out = node.outputs[i]
        if not is_empty(out) and not is_read(graph, out):
            node.outputs[i] = gs.Variable.empty()
            dropped += 1
    while len(node.outputs) > 1 and is_empty(node.outputs[-1]):
        node.outputs.pop()
    return dropped


def _drop_uncalled_functions(root: gs.Graph) -> int:
    functions = list(getattr(root, "functions", None) or [])
    if not functions:
        return 0
    called: set[tuple[str, str]] = set()
    pending = [root]
    by_key = {(f.domain or "", f.name): f for f in functions}
    while pending:
        graph = pending.pop()
        for node in (n for g in graphs(graph) for n in g.nodes):
            key = (node.domain or "", node.op)
            if key in by_key and key not in called:
                called.add(key)
                pending.append(by_key[key])
    kept = [f for f in functions if (f.domain or "", f.name) in called]
    root.functions = kept
    return len(functions) - len(kept)


# ---------------------------------------------------------------------------------------------


@register_pass
@dataclass(frozen=True)
class DedupInitializers(GraphPass):
    """Make nodes share one initializer where several hold identical values (same dtype, shape and
    bytes), anywhere in the main graph and its subgraphs (a constant several graphs read is stored
    once, in the main graph); local functions only share their own. Initializers that are graph
    inputs (overridable defaults) or outputs are left alone."""

    name = "dedup-initializers"
    summary = "Share one initializer among identical constants (dtype + shape + bytes)."
    exact = True

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        removed = _dedup(model.graph)
        for function in getattr(model.graph, "functions", None) or []:
            removed += _dedup(function)
        return PassResult(modified=removed > 0, stats={"initializers": removed} if removed else {})


def _dedup(root: gs.Graph) -> int:
    """Dedup the initializers of `root` and every graph nested in it; returns how many went."""
    tree = list(ir.iter_graphs(root, functions=False))
    pinned = {id(t) for graph in tree for t in list(graph.inputs) + list(graph.outputs)}
    by_shape: dict[tuple, dict[int, gs.Constant]] = defaultdict(dict)
    for graph in tree:
        for node in graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in pinned:
                    by_shape[_cheap_key(t)].setdefault(id(t), t)
    removed = 0
    for group in by_shape.values():
        if len(group) == 1:
            continue  # nothing to compare with: skip hashing the bytes
        canonical: dict[tuple, gs.Constant] = {}
        for tensor in group.values():
            key = constant_key(tensor)
            if key is None:
                continue
            keep = canonical.setdefault(key, tensor)
            if keep is not tensor:
                for consumer in list(tensor.outputs):
                    ir.substitute(consumer.inputs, tensor, keep)
                removed += 1
    return removed


def _cheap_key(tensor: gs.Constant) -> tuple:
    source = tensor._values
    return (repr(source.dtype), tuple(source.shape))


# ---------------------------------------------------------------------------------------------


@register_pass
@dataclass(frozen=True)
class CommonSubexpressions(GraphPass):
    """Compute once what several nodes compute identically: same op, domain, attributes and inputs
    (identical constants count as the same input). A merged node that wrote a graph output leaves
    an Identity keeping that name. Random ops, Dropout, custom-domain ops and nodes holding
    subgraphs are never merged."""

    name = "cse"
    summary = "Merge nodes that compute the same op on the same inputs with the same attributes."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        toposort(graph)
        # Small constants compare by value; large ones by identity (dedup-initializers, which runs
        # first in `cleanup`, already made equal weights one tensor). What is never merged never
        # compares equal, so neither does anything computed from it.
        hasher = Hasher(graph, opaque=lambda n: not self._mergeable(n), max_value_bytes=CSE_VALUE_BYTES)
        seen: dict[bytes, gs.Node] = {}
        merged = Counter()
        for node in list(graph.nodes):
            if not self._mergeable(node):
                continue
            key = hasher.node(node)
            first = seen.setdefault(key, node)
            if first is node:
                continue
            if self._merge(graph, first, node):
                merged[node.op] += 1
            else:
                seen[key] = first
        return merged

    @staticmethod
    def _mergeable(node: gs.Node) -> bool:
        return (is_standard(node) and node.op not in NONDETERMINISTIC and node.op != "Dropout"
                and not has_subgraph(node) and bool(node.outputs))

    @staticmethod
    def _merge(graph: gs.Graph, keep: gs.Node, drop: gs.Node) -> bool:
        pairs = [(old, new) for old, new in zip(drop.outputs, keep.outputs) if not is_empty(old)]
        if drop.op == "Identity" and all(ir.is_graph_output(graph, old) for old, _ in pairs):
            return False  # already the cheapest way to give one value a second output name
        for old, new in pairs:
            # A graph output's name is the model's interface: the value is computed once and the
            # name kept by an Identity (or moved onto `keep`'s output when nothing else reads it).
            # `edgegraph merge` relies on this: one task's output is another's backbone tensor.
            ir.replace_all_uses(graph, old, new)
        drop.inputs.clear()
        drop.outputs.clear()
        return True
