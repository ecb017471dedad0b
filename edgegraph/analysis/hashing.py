"""Structural digests of tensors, nodes, subgraphs and models, independent of tensor and node names.

Two tensors get the same digest when the same ops, with the same attributes, compute them from the
same graph inputs (by position) and constants (by dtype, shape and bytes): a Merkle hash over the
producers. A node's digest covers its op, domain, sorted attributes (a subgraph attribute by its
own structural digest, so an If body's contents count), its inputs' digests and its output count.
Common-subexpression elimination merges nodes with equal digests; comparing two models' digests
tells whether they compute the same thing however they were named or ordered.

What cannot be reproduced never compares equal: a random op, a constant whose bytes are not loaded
(external data) and whatever the caller declares `opaque` get a digest of their own (their identity).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from edgegraph import ir

DIGEST_BYTES = 16


def _digest(item) -> bytes:
    return hashlib.blake2b(repr(item).encode(), digest_size=DIGEST_BYTES).digest()


def constant_key(tensor: gs.Constant) -> tuple | None:
    """(dtype, shape, export dtype, digest of the bytes) of an initializer, without decoding odd
    dtypes; None when its bytes are not in memory (external data) or not numeric."""
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
    return dtype, shape, repr(export), hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _random(node: gs.Node) -> bool:
    return node.op in ir.NONDETERMINISTIC and ir.is_standard(node)


class Hasher:
    """Digests of the tensors and nodes of `root` (and of the graphs nested in it), memoised.

    `opaque(node)` marks nodes whose outputs must never compare equal to another's (random ops
    always are). Constant inputs above `max_value_bytes` (None: no limit) are keyed by identity
    instead of content: cheaper where equal weights are already one tensor (dedup-initializers).
    Tensors read from outside `root` that no node in reach produces are keyed by identity.
    """

    def __init__(self, root: gs.Graph, *, opaque: Callable[[gs.Node], bool] = _random,
                 max_value_bytes: int | None = None):
        self.opaque = opaque if opaque is _random else (lambda n: _random(n) or opaque(n))
        self.max_value_bytes = max_value_bytes
        self._inputs: dict[int, tuple] = {}
        self._memo: dict[int, tuple[object, bytes]] = {}  # id -> (object kept alive, digest)
        self._register(root, 0)

    def _register(self, graph: gs.Graph, depth: int) -> None:
        # Inputs are keyed by (nesting depth, position): a Loop body inside a Loop body sees its
        # own inputs and its parent's, which must not collide.
        for index, tensor in enumerate(graph.inputs):
            self._inputs.setdefault(id(tensor), ("input", depth, index))
        for node in graph.nodes:
            for sub in ir.subgraphs(node):
                self._register(sub, depth + 1)

    # -- public --------------------------------------------------------------------------------

    def tensor(self, tensor: gs.Tensor | None) -> bytes:
        """The digest of the value a tensor holds."""
        producer = None if tensor is None or isinstance(tensor, gs.Constant) else ir.producer(tensor)
        if producer is not None:
            self._resolve(producer)
        return self._tensor(tensor)

    def node(self, node: gs.Node) -> bytes:
        """The digest of what a node computes (op, domain, attributes, inputs, output count)."""
        self._resolve(node)
        return self._memo[id(node)][1]

    def tensors(self, tensors: Sequence[gs.Tensor]) -> bytes:
        """The digest of a subgraph given by the tensors it produces, in order."""
        return _digest(("tensors", tuple(self.tensor(t) for t in tensors)))

    def graph(self, graph: gs.Graph) -> bytes:
        """The digest of a graph: its inputs' types (their positions key what reads them) and its
        outputs' digests, in order. Nodes no output depends on do not count. The inputs of a
        graph that is not `root` or nested in it are keyed by identity."""
        if id(graph) not in self._memo:
            types = tuple((repr(t.dtype), _shape(t.shape)) for t in graph.inputs)
            self._memo[id(graph)] = (graph, _digest(("graph", types, self.tensors(graph.outputs))))
        return self._memo[id(graph)][1]

    # -- digests -------------------------------------------------------------------------------

    def _tensor(self, tensor: gs.Tensor | None) -> bytes:
        if tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == ""):
            return b"empty"
        key = id(tensor)
        if key not in self._memo:
            self._memo[key] = (tensor, _digest(self._tensor_item(tensor)))
        return self._memo[key][1]

    def _tensor_item(self, tensor: gs.Tensor) -> tuple:
        if isinstance(tensor, gs.Constant):
            small = self.max_value_bytes is None or getattr(
                tensor._values, "nbytes", self.max_value_bytes + 1) <= self.max_value_bytes
            value = constant_key(tensor) if small else None
            return ("const", value) if value is not None else ("opaque", id(tensor))
        if id(tensor) in self._inputs:
            return self._inputs[id(tensor)]
        producer = ir.producer(tensor)
        if producer is None or id(producer) not in self._memo:
            return ("free", id(tensor))
        index = next(i for i, out in enumerate(producer.outputs) if out is tensor)
        return ("out", self._memo[id(producer)][1], index)

    def _node_item(self, node: gs.Node) -> tuple:
        if self.opaque(node):
            return ("opaque", id(node))
        attrs = tuple((name, self._attr(node.attrs[name])) for name in sorted(node.attrs))
        inputs = tuple(self._tensor(t) for t in node.inputs)
        return node.op, node.domain or "", attrs, inputs, len(node.outputs)

    def _attr(self, value) -> tuple:
        if isinstance(value, gs.Constant):  # a tensor attribute: by content whatever its size
            key = constant_key(value)
            return ("tensor", key) if key is not None else ("opaque", id(value))
        if isinstance(value, gs.Graph):
            return ("graph", self.graph(value))
        if isinstance(value, gs.Node.AttributeRef):
            return ("ref", value.name, repr(value.type))
        if isinstance(value, np.ndarray):
            return ("array", value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, list | tuple):
            return ("list", tuple(self._attr(v) for v in value))
        return (type(value).__name__, repr(value))

    def _resolve(self, node: gs.Node) -> None:
        """Digest `node` after everything it reads (producers of its inputs and of its subgraphs'
        tensors), depth first without recursion: real graphs are thousands of nodes deep."""
        if id(node) in self._memo:
            return
        stack, path = [(node, iter(_reads(node)))], {id(node)}
        while stack:
            top, reads = stack[-1]
            for dep in reads:
                # A dependency on the current path is a cycle (hostile model): its outputs read as "free".
                if id(dep) not in self._memo and id(dep) not in path:
                    path.add(id(dep))
                    stack.append((dep, iter(_reads(dep))))
                    break
            else:
                stack.pop()
                path.discard(id(top))
                self._memo[id(top)] = (top, _digest(self._node_item(top)))


def _reads(node: gs.Node) -> Iterable[gs.Node]:
    """The nodes whose outputs `node` reads, directly or from inside its subgraphs."""
    for tensor in node.inputs:
        if not isinstance(tensor, gs.Constant) and tensor is not None and tensor.inputs:
            yield tensor.inputs[0]
    for sub in ir.subgraphs(node):
        for inner in sub.nodes:
            yield inner
        for tensor in sub.outputs:
            if not isinstance(tensor, gs.Constant) and tensor.inputs:
                yield tensor.inputs[0]


def _shape(shape) -> tuple | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def model_digest(model: ir.Model | onnx.ModelProto) -> str:
    """The structural digest of a whole model (its main graph and opset imports), hex."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model, infer=False)
    graph = model.graph
    opsets = tuple(sorted({(d.domain or "", int(d.version)) for d in graph.import_domains or []}))
    return _digest(("model", int(graph.opset), opsets, Hasher(graph).graph(graph))).hex()


__all__ = ["DIGEST_BYTES", "Hasher", "constant_key", "model_digest"]
