"""eliminate-dead, dedup-initializers and cse: remove what is unused or computed twice."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from edgegraph import ir
from edgegraph.passbase import PassResult
from edgegraph.registry import register_pass

from .common import (
    NONDETERMINISTIC, GraphPass, graphs, has_subgraph, is_empty, is_read, is_standard, prune, redirect,
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


def constant_key(tensor: gs.Constant) -> tuple | None:
    """(dtype, shape, digest of the bytes) of an initializer, without decoding odd dtypes."""
    source = tensor._values
    if isinstance(source, SparseValues):  # (its proto is a SparseTensorProto): compare the dense values
        source = source.load()
    if isinstance(source, LazyValues):
        proto = source.tensor
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        data = proto.raw_data if proto.HasField("raw_data") else onnx.numpy_helper.to_array(proto).tobytes()
        dtype = ("onnx", int(proto.data_type))
        shape = tuple(int(d) for d in proto.dims)
    else:
        array = np.asarray(source, order="C")
        if array.dtype.kind not in "biufc":
            return None
        data, shape = array.tobytes(), array.shape
        dtype = ("onnx", int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype)))
    export = getattr(tensor, "_export_dtype", None)
    return dtype, shape, repr(export), hashlib.blake2b(data, digest_size=16).digest()


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
    (identical constants count as the same input). Random ops, Dropout, custom-domain ops and
    nodes holding subgraphs are never merged."""

    name = "cse"
    summary = "Merge nodes that compute the same op on the same inputs with the same attributes."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        toposort(graph)
        const_keys: dict[int, tuple | None] = {}
        seen: dict[tuple, gs.Node] = {}
        merged = Counter()
        for node in list(graph.nodes):
            key = self._key(node, const_keys)
            if key is None:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            if self._merge(graph, first, node):
                merged[node.op] += 1
            else:
                seen[key] = first
        return merged

    @staticmethod
    def _key(node: gs.Node, const_keys: dict) -> tuple | None:
        if (not is_standard(node) or node.op in NONDETERMINISTIC or node.op == "Dropout" or has_subgraph(node)
                or not node.outputs):
            return None
        inputs = []
        for t in node.inputs:
            if is_empty(t):
                inputs.append(None)
            elif isinstance(t, gs.Constant):
                # Small constants compare by value; large ones by identity (dedup-initializers,
                # which runs first in `cleanup`, already made equal weights one tensor).
                if id(t) not in const_keys:
                    small = getattr(t._values, "nbytes", CSE_VALUE_BYTES + 1) <= CSE_VALUE_BYTES
                    const_keys[id(t)] = constant_key(t) if small else None
                ck = const_keys[id(t)]
                inputs.append(("const", ck) if ck is not None else ("id", id(t)))
            else:
                inputs.append(("id", id(t)))
        attrs = _attrs_key(node.attrs, const_keys)
        if attrs is None:
            return None
        return node.op, node.domain or "", attrs, tuple(inputs), len(node.outputs)

    @staticmethod
    def _merge(graph: gs.Graph, keep: gs.Node, drop: gs.Node) -> bool:
        pairs = list(zip(drop.outputs, keep.outputs))
        if any(ir.is_graph_output(graph, old) for old, _ in pairs):
            return False  # both names are needed
        for old, new in pairs:
            if not is_empty(old):
                redirect(graph, old, new)
        drop.inputs.clear()
        drop.outputs.clear()
        return True


def _attrs_key(attrs: dict, const_keys: dict) -> tuple | None:
    items = []
    for name in sorted(attrs):
        v = attrs[name]
        if isinstance(v, gs.Constant):
            if id(v) not in const_keys:
                const_keys[id(v)] = constant_key(v)
            if const_keys[id(v)] is None:
                return None
            v = ("tensor", const_keys[id(v)])
        elif isinstance(v, gs.Graph):
            return None
        elif isinstance(v, gs.Node.AttributeRef):
            v = ("ref", v.name, repr(v.type))
        elif isinstance(v, np.ndarray):
            v = ("array", v.dtype.str, v.shape, v.tobytes())
        elif isinstance(v, list | tuple):
            if any(isinstance(x, gs.Graph | gs.Constant) for x in v):
                return None
            v = ("list", repr(list(v)))
        else:
            v = (type(v).__name__, repr(v))
        items.append((name, v))
    return tuple(items)
