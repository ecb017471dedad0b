"""What the cleanup passes share: reading constants and shapes safely, and removing nodes only
when that really shortens the graph.

Everything here is defensive on purpose: real exporter output has missing shapes, symbolic dims,
bfloat16/float8 weights numpy cannot hold, custom-domain ops and subgraphs reading outer tensors.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from edgegraph import ir
from edgegraph.analysis import encoding
from edgegraph.ir import NONDETERMINISTIC, STANDARD_DOMAINS, is_standard  # noqa: F401 - the cleanup passes import them from here
from edgegraph.ir import set_inputs, sort_nodes  # noqa: F401 - set_inputs: as for is_standard
from edgegraph.passbase import Pass, PassResult, drop_dead_nodes

# Quantization boundaries are kept: runtimes pattern-match DequantizeLinear -> op -> QuantizeLinear.
KEEP_UNFOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# numpy dtypes whose arithmetic we trust for rewriting weights (fp16 rounding would exceed tolerances).
WIDE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """Graphs in a node's attributes (a faster `ir.subgraphs`: this runs for every node often)."""
    found = []
    for v in node.attrs.values():
        kind = type(v)
        if kind is gs.Graph:
            found.append(v)
        elif kind is list or kind is tuple:
            found.extend(x for x in v if type(x) is gs.Graph)
    return found


def has_subgraph(node: gs.Node) -> bool:
    return bool(node_subgraphs(node))


def graphs(root: gs.Graph) -> list[gs.Graph]:
    """`root`, its subgraphs (recursively) and its local functions (and their subgraphs)."""
    found = [root] + list(getattr(root, "functions", None) or [])
    for graph in found:  # grows while iterating
        found.extend(_nested(graph))
    return found


def _nested(graph: gs.Graph) -> list[gs.Graph]:
    # Nodes without outputs were removed by a rewrite (e.g. an inlined If) and await pruning.
    return [sub for node in graph.nodes if node.attrs and node.outputs for sub in node_subgraphs(node)]


# ---------------------------------------------------------------------------------------------
# Constants


def nbytes(tensor: gs.Tensor) -> int:
    """Bytes a constant (initializer or Constant node output) takes in the file; 0 for computed tensors."""
    if isinstance(tensor, gs.Constant):
        return ir.stored_nbytes(tensor)
    array = ir.constant_value(tensor)
    return 0 if array is None else array.nbytes


# A rewrite may make the model's weights this many bytes bigger (a small Cast, Expand or fused
# weight); beyond it only rewrites that free at least as many bytes as they add are done.
GROWTH_LIMIT = 64 << 10


def freed_bytes(graph: gs.Graph, tensors: Sequence[gs.Tensor], readers: Sequence[gs.Node]) -> int:
    """Bytes of the constants among `tensors` that nothing but `readers` reads: what the model
    loses when those nodes stop reading them.

    A constant is one tensor wherever it is read (main graph, If/Loop bodies: it is stored once),
    so one that another node still reads, in any graph, stays: replacing it by a rewritten
    copy makes the model bigger.
    """
    pinned = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    ids = {id(n) for n in readers}
    total = 0
    for tensor in {id(t): t for t in tensors if not is_empty(t)}.values():
        if id(tensor) in pinned or not all(id(user) in ids for user in tensor.outputs):
            continue
        total += nbytes(tensor)
    return total


def growth_ok(added: int, freed: int, limit: int = GROWTH_LIMIT) -> bool:
    """Whether a rewrite that adds `added` bytes of constants and frees `freed` keeps the model
    small: it frees as much as it adds, or what it adds is small."""
    return added <= freed or added <= limit


def affordable(graph: gs.Graph, replaced: Sequence[gs.Tensor | None], readers: Sequence[gs.Node],
               new: Sequence[np.ndarray]) -> bool:
    """Whether a rewrite in which `readers` stop reading the constants `replaced` and the `new`
    arrays become constants keeps the model small (see `growth_ok`). A rewrite that rewrites a
    stored weight's low-bit payload gets no growth allowance: it would decode the weight."""
    replaced = [t for t in replaced if t is not None]
    limit = 0 if any(isinstance(t, gs.Constant) and encoding.is_payload(t) for t in replaced) else GROWTH_LIMIT
    return growth_ok(sum(np.asarray(a).nbytes for a in new), freed_bytes(graph, replaced, readers), limit)


def int_list(tensor: gs.Tensor | None) -> list[int] | None:
    """A constant 0-d/1-d integer tensor as a list (axes, shapes, pads), else None."""
    array = ir.constant_value(tensor)
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def is_empty(tensor: gs.Tensor | None) -> bool:
    """An omitted optional input/output."""
    return tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "")


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and not is_empty(node.inputs[index]):
        return node.inputs[index]
    return None


# ---------------------------------------------------------------------------------------------
# Shapes


def shape_of(tensor: gs.Tensor) -> list | None:
    """The tensor's shape as a list, or None if even the rank is unknown. Dims are ints when
    known, symbol names when named (equal names mean equal dims), None otherwise."""
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else _symbol(d) for d in shape]


# Dim names exporters reuse for *different* unknown dims: they say nothing about equality.
_PLACEHOLDER_DIMS = {"?", "none", "null", "unk", "unknown", "dynamic"}


def shape_range(shape_node: gs.Node) -> range | None:
    """The axes of its input that a `Shape` node returns (opset-15 start/end clamped as the spec says)."""
    shape = shape_of(shape_node.inputs[0])
    if shape is None:
        return None
    rank = len(shape)
    start, end = int(shape_node.attrs.get("start", 0)), shape_node.attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
    return range(start, end)


def _symbol(dim) -> str | None:
    if not isinstance(dim, str) or not dim or dim.strip().lower() in _PLACEHOLDER_DIMS:
        return None
    return dim if any(c.isalpha() for c in dim) else None


def same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbol."""
    return a == b and a is not None


def broadcast_keeps_shape(shape: list | None, other: Sequence[int]) -> bool:
    """True when broadcasting a tensor of `shape` with a constant of shape `other` yields `shape`."""
    if shape is None or len(other) > len(shape):
        return False
    for dim, o in zip(reversed(shape), reversed(list(other))):
        if o != 1 and not (isinstance(dim, int) and dim == o):
            return False
    return True


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    """The dtype of `tensor` when numpy computes with it exactly (see `ir.numpy_dtype`)."""
    return ir.numpy_dtype(tensor.dtype, exact=True)


# ---------------------------------------------------------------------------------------------
# Attributes and opset-dependent inputs


def axes_of(node: gs.Node, input_index: int = 1) -> list[int] | None:
    """`axes` of Squeeze/Unsqueeze/Reduce*: an attribute before opset 13 (18 for reductions), an
    input after. None when dynamic; [] when absent."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    tensor = optional_input(node, input_index)
    if tensor is None:
        return []
    return int_list(tensor)


def normalize_axes(axes: Sequence[int], rank: int) -> list[int] | None:
    out = []
    for axis in axes:
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            return None
        out.append(axis)
    return out if len(set(out)) == len(out) else None


def perm_of(node: gs.Node, rank: int | None = None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    if rank is None:
        shape = shape_of(node.inputs[0])
        rank = None if shape is None else len(shape)
    return None if rank is None else list(reversed(range(rank)))


# ---------------------------------------------------------------------------------------------
# Removing and redirecting without growing the graph


def only_consumer(tensor: gs.Tensor, node: gs.Node, graph: gs.Graph) -> bool:
    """`node` is the sole reader of `tensor` and the tensor is not a graph output."""
    users = tensor.outputs
    return len(users) == 1 and users[0] is node and not ir.is_graph_output(graph, tensor)


def _name_can_move(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, leaving: gs.Node | None) -> bool:
    """Whether `ir.replace_all_uses(graph, old, new)` can give graph output `old`'s name to `new`'s
    producer instead of adding an Identity (`leaving` is a node about to stop reading `new`).

    The producer must belong to this very graph: in a subgraph, `new` may come from an outer
    graph whose node must not start writing the subgraph's output name.
    """
    source = ir.producer(new)
    return (
        not old.outputs
        and source is not None
        and any(n is source for n in graph.nodes)
        and not ir.is_graph_output(graph, new)
        and all(u is leaving for u in new.outputs)
    )


def redirect(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make readers of `old` read `new` unless that would need an extra Identity; True if done."""
    if old is new:
        return False
    if ir.is_graph_output(graph, old) and not _name_can_move(graph, old, new, None):
        return False
    ir.replace_all_uses(graph, old, new)
    return True


def is_read(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether a node or the graph's outputs still read `tensor`."""
    return bool(tensor.outputs) or ir.is_graph_output(graph, tensor)


def can_remove(graph: gs.Graph, node: gs.Node, keep: int = 0) -> bool:
    """Whether `node` (output 0 equal to input `keep`) can go without adding an Identity."""
    result = node.outputs[0]
    if any(is_read(graph, o) for o in node.outputs[1:]):
        return False
    return not ir.is_graph_output(graph, result) or _name_can_move(graph, result, node.inputs[keep], node)


def remove(graph: gs.Graph, node: gs.Node, keep: int = 0) -> bool:
    """Drop `node`, whose first output equals its input `keep`; False (graph unchanged) when the
    node has to stay to keep a graph output's name."""
    if not can_remove(graph, node, keep):
        return False
    ir.bypass(graph, node, keep)
    return True


# ---------------------------------------------------------------------------------------------
# Pass plumbing


@dataclass(frozen=True)
class GraphPass(Pass):
    """A cleanup pass applied to the main graph, every subgraph and every local function.

    Subclasses implement `rewrite(graph, model) -> Counter` of what they did; a non-empty
    counter means the model changed.
    """

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        raise NotImplementedError

    def run(self, model: ir.Model, ctx=None) -> PassResult:
        # Rules name new tensors through `self.names`, which belongs to this model: it is set on
        # a copy made for this run, so the pass object itself stays immutable.
        run = copy.copy(self)
        object.__setattr__(run, "names", Names(model))
        object.__setattr__(run, "target", getattr(ctx, "target", None))  # (None: run outside a pipeline)
        return run._run(model)

    def _run(self, model: ir.Model) -> PassResult:
        total = Counter()
        # Subgraphs are collected after their parent is rewritten: a rewrite may inline one.
        pending = [model.graph] + list(getattr(model.graph, "functions", None) or [])
        while pending:
            graph = pending.pop(0)
            total += self.rewrite(graph, model)
            pending.extend(_nested(graph))
        return PassResult(modified=sum(total.values()) > 0, stats=dict(sorted(total.items())))


@dataclass(frozen=True)
class NoMatch:
    """Why a rule left a node alone (a rule's "no" with its reason). Falsy, so that a driver's
    `if applied:` reads the same for a rule that says why and one that just returns None."""

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


class Legal(NoMatch):
    """A NoMatch meaning the node already has the form the rule would make (an opset-13
    Softmax for the opset-7 Softmax rewrite): nothing is wrong with it."""


def apply_first_rule(rules, owner: GraphPass, graph: gs.Graph, node: gs.Node, opset: int) -> str | NoMatch:
    """Apply the first of `rules` that rewrites `node`: returns its counter key, else a NoMatch
    giving each rule's reason.

    A rule returns a key when it changed the graph, and a NoMatch (or None, "pattern not
    found") when it did not; when every rule says Legal, so does the result. A rule checks the
    forms it handles and says no to the others: an exception it raises is a bug and propagates
    (it is not a "no match").
    """
    reasons, legal = [], bool(rules)
    for rule in rules:
        applied = rule(owner, graph, node, opset)
        if applied:
            return applied
        why = applied.reason if isinstance(applied, NoMatch) else "pattern not found"
        legal &= isinstance(applied, Legal)
        reasons.append(f"{getattr(rule, '__name__', 'rule')}: {why}")
    return (Legal if legal else NoMatch)("; ".join(reasons) if reasons else f"no rule for {node.op}")


def target_context(target, model: ir.Model):
    """What a profile's `unsupported(node, model_context)` reads about `model` (shapes, dtypes,
    constants, opsets): a `targets.ModelContext` snapshot where profiles have one, else the
    model itself. Take a new one after rewriting the graph."""
    try:
        from edgegraph.targets import ModelContext
    except ImportError:  # profiles without rules: they judge by op type alone
        return model
    return ModelContext.of(model)


def target_lacks(target, node: gs.Node, context) -> str | None:
    """Why `target` (a profile, or None for "no target") cannot run `node`, else None.
    `context` is `target_context(target, model)`.

    A profile that judges nodes (`unsupported`: opset, dtype, rank, attribute limits) is
    asked; a plain op list (`ops`, empty meaning "everything") is read otherwise.
    """
    if target is None:
        return None
    judge = getattr(target, "unsupported", None)
    if callable(judge):
        return judge(node, context)
    ops = getattr(target, "ops", None)
    if ops and node.op not in ops:
        return f"{node.op} is not among {getattr(target, 'name', 'the target')}'s ops"
    return None


def target_verdict(target, node: gs.Node, context) -> tuple[str, str] | None:
    """(kind, reason) when `target` cannot run `node`, else None. Profiles that classify their
    reasons (`why`: "op", "opset", "dynamic", "rank", "dtype", "attr", "constant") say which;
    otherwise every reason counts as "op"."""
    classify = getattr(target, "why", None)
    if target is not None and callable(classify):
        return classify(node, context)
    reason = target_lacks(target, node, context)
    return None if reason is None else ("op", reason)


def target_lacks_op(target, op: str, attrs: dict, inputs: Sequence[gs.Tensor], context) -> str | None:
    """`target_lacks` for a node not yet made (would a fusion into `op` run on the target?).
    The probe node is unlinked from `inputs` again before returning."""
    if target is None:
        return None
    probe = gs.Node(op, name=f"{op}_probe", attrs=dict(attrs), inputs=list(inputs),
                    outputs=[gs.Variable(f"{op}_probe_out", dtype=inputs[0].dtype, shape=inputs[0].shape)])
    try:
        return target_lacks(target, probe, context)
    finally:
        probe.inputs.clear()
        probe.outputs.clear()


class Names:
    """Fresh tensor/node names unique across the model, collected only when first needed."""

    def __init__(self, model: ir.Model):
        self._model = model
        self._namer: ir.Namer | None = None

    def __call__(self, prefix: str) -> str:
        if self._namer is None:
            self._namer = ir.Namer(self._model.graph)
        return self._namer(prefix)

    def const(self, prefix: str, array: np.ndarray) -> gs.Constant:
        return ir.const(self(prefix), np.asarray(array))


# Settling a changed model is the manager's (`settle`); these are its two steps, which some
# rewrites need on one graph mid-pass (e.g. eliminate-dead).
toposort = sort_nodes
prune = drop_dead_nodes


def infer_forward(graph: gs.Graph, changed: Sequence[gs.Tensor], opsets: Sequence) -> None:
    """Re-infer output shapes downstream of `changed` (tensors that became constants or got a
    shape), node by node with onnx's inference; only fills in what was unknown.

    Much cheaper than re-inferring the whole model, and keeps every gs object alive.
    """
    dirty = {id(n) for t in changed for n in t.outputs}
    for node in graph.nodes:
        if id(node) not in dirty or not is_standard(node) or has_subgraph(node):
            continue
        for out in _infer_node(node, opsets):
            dirty.update(id(n) for n in out.outputs)


_INFER_DATA_BYTES = 1 << 16  # constants passed to inference as data (shapes, axes, sizes)


def node_inference(node: gs.Node, opsets: Sequence, overrides: dict | None = None) -> dict | None:
    """onnx's type/shape inference for one node: {output name: TypeProto}, or None when it
    cannot be asked (unknown op or input type). `overrides` maps input tensor ids to the
    (dtype, shape) to assume instead of the tensor's own.

    Raises `onnx.shape_inference.InferenceError` when the node contradicts its input types.
    """
    version = next((o.version for o in opsets if (o.domain or "") in STANDARD_DOMAINS), None)
    try:
        schema = onnx.defs.get_schema(node.op, max_inclusive_version=version or 1, domain="")
    except Exception:  # noqa: BLE001 - unknown op for this opset
        return None
    overrides = overrides or {}
    types, data = {}, {}
    for t in node.inputs:
        if is_empty(t) or t.name in types:
            continue
        dtype, shape = overrides.get(id(t), (t.dtype, shape_of(t)))
        dtype = ir.numpy_dtype(dtype, exact=True)
        if dtype is None:
            return None
        types[t.name] = onnx.helper.make_tensor_type_proto(ir.onnx_dtype(dtype), shape)
        if isinstance(t, gs.Constant) and not ir.is_opaque(t) and t._values.nbytes <= _INFER_DATA_BYTES:
            data[t.name] = onnx.numpy_helper.from_array(np.asarray(t.values), t.name)
    try:
        proto = OnnxExporter.export_node(node)
    except Exception:  # noqa: BLE001
        return None
    return onnx.shape_inference.infer_node_outputs(schema, proto, types, data, opset_imports=list(opsets))


def _infer_node(node: gs.Node, opsets) -> list[gs.Tensor]:
    """Fill in unknown output shapes/dtypes of one node; returns the outputs that improved."""
    try:
        result = node_inference(node, opsets)
    except Exception:  # noqa: BLE001 - inference rejects odd nodes; shapes just stay unknown
        return []
    if not result:
        return []
    improved = []
    for out in node.outputs:
        inferred = result.get(out.name)
        if inferred is None or not inferred.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inferred.tensor_type.shape.dim]
        if _more_specific(dims, shape_of(out)):
            out.shape = dims
            if out.dtype is None and inferred.tensor_type.elem_type:
                out.dtype = onnx.helper.tensor_dtype_to_np_dtype(inferred.tensor_type.elem_type)
            improved.append(out)
    return improved


def reinfer_shapes(model: ir.Model) -> None:
    """Re-run whole-model shape inference and fill in the shapes it learned, keeping every gs
    object (unlike `Model.refresh_shapes`, which rebuilds the graph). Weights stay out of it."""
    inferred = ir.infer_shapes(model.to_proto(weights=False))
    tensors = {}
    # Local functions are left out: their tensor names live in their own namespace.
    main = [model.graph]
    for graph in main:  # grows while iterating
        main.extend(_nested(graph))
    for graph in main:
        for node in graph.nodes:
            for out in node.outputs:
                if not is_empty(out):
                    tensors[out.name] = out
    for info in _value_infos(inferred.graph):
        tensor = tensors.get(info.name)
        type_ = info.type.tensor_type
        if tensor is None or not info.type.HasField("tensor_type"):
            continue
        if tensor.dtype is None and type_.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(type_.elem_type)
        if type_.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in type_.shape.dim]
            if _more_specific(dims, shape_of(tensor)):
                tensor.shape = dims


def _value_infos(graph: onnx.GraphProto):
    yield from graph.value_info
    yield from graph.output
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _value_infos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _value_infos(g)


def _more_specific(new: list, old: list | None) -> bool:
    if old is None:
        return True
    if len(new) != len(old):
        return False
    return sum(isinstance(d, int) for d in new) > sum(isinstance(d, int) for d in old)


def live_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Nodes of `graph` still wired in (rewrites clear the nodes they replace)."""
    for node in list(graph.nodes):
        if node.outputs:
            yield node




