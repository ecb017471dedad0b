"""fold-constants: precompute every value that depends only on constants.

Constants are evaluated in onnxruntime (one session for the whole constant subgraph, so results
are bit-identical to what the original model computed at run time) after static `Shape`/`Size`
results are filled in from inferred shapes. Unlike graphsurgeon's `fold_constants` this one
respects `Shape(start, end)`, never folds custom-domain, random or (De)QuantizeLinear ops, has no
"cast elision" (which turns float constants of shape arithmetic into truncated ints), keeps
scalars scalar, and refuses folds that would bloat the model: a result larger than the constants
it makes unused (Expand, Tile, ConstantOfShape, a copy of a weight that other nodes, in this graph
or another, still read ...) is only materialised while it stays small, and a weight stored encoded
(`edgegraph.analysis.encoding`: Q/DQ, codebook Gather, packed 4-bit, Cast(int8) * scale) is never
decoded, however small.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis import encoding
from edgegraph.passbase import option
from edgegraph.registry import register_pass

from .common import (
    GROWTH_LIMIT, KEEP_UNFOLDED, NONDETERMINISTIC, dtype_of, freed_bytes, GraphPass, growth_ok, has_subgraph,
    infer_forward, is_empty, is_standard, nbytes, shape_of, shape_range, toposort,
)

logger = logging.getLogger(__name__)

# Ops whose outputs are sequences or optionals: a Constant cannot hold them.
NON_TENSOR_OUTPUTS = frozenset({
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence", "Optional",
})


@register_pass
@dataclass(frozen=True)
class FoldConstants(GraphPass):
    """Replace nodes whose inputs are all constants by their precomputed outputs.

    Also turns `Constant` nodes into initializers, folds `Shape`/`Size` of tensors whose shape
    (or the sliced/gathered part of it) is static, and inlines `If` nodes whose condition is
    constant. Works in subgraphs and local functions. Graph outputs that become constant stay
    graph outputs (written by a `Constant` node).
    """

    name = "fold-constants"
    summary = "Precompute constant subgraphs, static Shape/Size and constant-condition If nodes."
    exact = True

    size_limit: int = option(128 << 20, "never create a folded tensor larger than this many bytes")
    growth_limit: int = option(
        GROWTH_LIMIT,
        "a fold whose result is larger than the constants it makes unused (Cast to a wider type, Expand, "
        "Tile, ConstantOfShape, a copy of a weight other nodes still read ...) is done only up to this many "
        "bytes, so int8/fp16-stored and shared weights stay stored once",
    )

    def __post_init__(self):
        self.check(self.size_limit >= 0, "fold-constants: size_limit must be >= 0")
        self.check(self.growth_limit >= 0, "fold-constants: growth_limit must be >= 0")

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        done["constant_nodes"] += lower_constant_nodes(graph)
        toposort(graph)
        opsets = _opsets(graph, model)
        # Folding can make more shapes static (a Resize whose sizes became constant), which can
        # make more Shape nodes foldable: repeat, re-inferring shapes only downstream.
        for _ in range(64):
            shapes = fold_static_shapes(graph)
            folded = self._fold(graph, opsets)
            done["shapes"] += len(shapes)
            done["nodes"] += len(folded)
            if not shapes and not folded:
                break
            infer_forward(graph, shapes + folded, opsets)
        done["if_inlined"] += inline_constant_ifs(graph, self.names)
        return +done

    # -----------------------------------------------------------------------------------------

    def _fold(self, graph: gs.Graph, opsets) -> list[gs.Tensor]:
        """Fold what can be; returns the tensors that became constants."""
        # Known values: initializers (this graph's or, in a subgraph, an enclosing graph's) and
        # Constant-node outputs, then everything the candidates compute.
        known: set[int] = set()
        candidates = []
        for node in graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in known and not ir.is_opaque(t):
                    known.add(id(t))
            if node.op == "Constant" and node.outputs and ir.constant_value(node.outputs[0]) is not None:
                known.add(id(node.outputs[0]))
            elif self._foldable(node, known):
                candidates.append(node)
                known.update(id(o) for o in node.outputs)
        if not candidates:
            return []
        return self._replace(graph, candidates, ir.evaluate(candidates, opsets))

    def _foldable(self, node: gs.Node, known: set) -> bool:
        if (
            not is_standard(node)
            or node.op in NONDETERMINISTIC or node.op in KEEP_UNFOLDED or node.op in NON_TENSOR_OUTPUTS
            or node.op == "Constant" or has_subgraph(node)
            or any(isinstance(a, gs.Node.AttributeRef) for a in node.attrs.values())
        ):
            return False
        inputs = [t for t in node.inputs if not is_empty(t)]
        if not inputs or not node.outputs or any(is_empty(o) for o in node.outputs):
            return False
        if not all(id(t) in known for t in inputs):
            return False
        if encoding.decodes(node):
            return False  # a stored weight's decode chain: folded, the weight would be stored dense
        # Skip the evaluation altogether when inference already says the result would be refused.
        sizes = [_static_nbytes(o) for o in node.outputs]
        if None in sizes:
            return True  # decided after evaluation
        out_bytes = sum(sizes)
        # (At most these inputs' bytes are freed; what really is, is decided after evaluation.)
        in_bytes = sum(nbytes(t) if isinstance(t, gs.Constant) else (_static_nbytes(t) or 0)
                       for t in {id(t): t for t in inputs}.values())
        return self._acceptable(in_bytes, out_bytes)

    def _acceptable(self, freed: int, out_bytes: int) -> bool:
        return out_bytes <= self.size_limit and growth_ok(out_bytes, freed, self.growth_limit)

    def _replace(self, graph: gs.Graph, candidates: list[gs.Node], values: dict[str, np.ndarray]) -> list[gs.Tensor]:
        folded = []
        for node in candidates:
            inputs = [t for t in node.inputs if not is_empty(t)]
            if not all(isinstance(t, gs.Constant) or ir.constant_value(t) is not None for t in inputs):
                continue  # an input was not folded (failed, or refused for size)
            results = [values.get(out.name) for out in node.outputs]
            if any(r is None for r in results):
                continue
            # Inputs other nodes (here, in other graphs, or later candidates) still read stay in
            # the model: only the rest is freed by this fold.
            out_bytes = sum(r.nbytes for r in results)
            if not self._acceptable(freed_bytes(graph, inputs, [node]), out_bytes):
                continue
            outputs = list(node.outputs)
            node.inputs.clear()
            node.outputs.clear()
            for out, result in zip(outputs, results):
                _make_constant(graph, out, result, self.names)
            folded.extend(outputs)
        return folded


def _static_nbytes(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    dtype = dtype_of(tensor)
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _make_constant(graph: gs.Graph, tensor: gs.Tensor, array: np.ndarray, names) -> None:
    """Turn `tensor` into an initializer; graph outputs get a Constant node so they stay outputs."""
    array = np.asarray(array)
    tensor.inputs.clear()
    if ir.is_graph_output(graph, tensor):
        tensor.dtype, tensor.shape = array.dtype, list(array.shape)
        graph.nodes.append(gs.Node("Constant", name=names(f"{tensor.name}_const"), attrs={
            "value": gs.Constant(names(f"{tensor.name}_value"), np.asarray(array, order="C"))}, outputs=[tensor]))
    else:
        tensor.to_constant(np.asarray(array, order="C"))


def _opsets(graph: gs.Graph, model: ir.Model) -> list[onnx.OperatorSetIdProto]:
    domains = getattr(graph, "import_domains", None) or getattr(model.graph, "import_domains", None)
    if domains:
        return list(domains)
    return [onnx.helper.make_opsetid("", int(graph.opset or model.opset))]


# ---------------------------------------------------------------------------------------------
# Constant nodes, static shapes, constant-condition If


def lower_constant_nodes(graph: gs.Graph) -> int:
    """Turn `Constant` nodes into initializers (not the ones writing graph outputs)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or not is_standard(node) or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        array = ir.constant_value(out)
        if array is None or ir.is_graph_output(graph, out):
            continue
        out.inputs.clear()
        out.to_constant(np.asarray(array, order="C"))
        node.outputs.clear()
        count += 1
    return count


def fold_static_shapes(graph: gs.Graph) -> list[gs.Tensor]:
    """Fold `Shape`, `Size`, and `Gather`/`Slice` of a `Shape` whose selected dims are static;
    returns the tensors that became constants."""
    folded = []
    for node in list(graph.nodes):
        if not is_standard(node) or not node.outputs or not node.inputs or ir.is_graph_output(graph, node.outputs[0]):
            continue
        result = None
        if node.op == "Shape":
            dims = _shape_dims(node)
            if dims is not None and all(isinstance(d, int) for d in dims):
                result = np.array(dims, dtype=np.int64)
        elif node.op == "Size":
            shape = shape_of(node.inputs[0])
            if shape is not None and all(isinstance(d, int) for d in shape):
                result = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        elif node.op == "Gather" and _from_shape(node.inputs[0]):
            result = _gather_dims(node)
        elif node.op == "Slice" and _from_shape(node.inputs[0]):
            result = _slice_dims(node)
        if result is not None:
            out = node.outputs[0]
            out.inputs.clear()  # also detaches it from node.outputs
            out.to_constant(result)
            node.inputs.clear()
            node.outputs.clear()
            folded.append(out)
    return folded


def _from_shape(tensor: gs.Tensor) -> bool:
    source = ir.producer(tensor)
    return source is not None and source.op == "Shape" and is_standard(source)


def _shape_dims(shape_node: gs.Node) -> list | None:
    """The dims `Shape` returns, ints or symbols."""
    axes = shape_range(shape_node)
    return None if axes is None else [shape_of(shape_node.inputs[0])[k] for k in axes]


def _gather_dims(node: gs.Node) -> np.ndarray | None:
    dims = _shape_dims(ir.producer(node.inputs[0]))
    indices = ir.constant_value(node.inputs[1])
    if dims is None or indices is None or indices.dtype.kind not in "iu" or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    flat = [int(i) + len(dims) if int(i) < 0 else int(i) for i in indices.reshape(-1)]
    if any(not 0 <= i < len(dims) for i in flat):
        return None
    picked = [dims[i] for i in flat]
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(indices.shape)


def _slice_dims(node: gs.Node) -> np.ndarray | None:
    dims = _shape_dims(ir.producer(node.inputs[0]))
    if dims is None:
        return None
    if len(node.inputs) >= 3:  # opset 10+: starts, ends, axes, steps as inputs
        params = [ir.constant_value(t) if not is_empty(t) else None for t in node.inputs[1:5]]
        if params[0] is None or params[1] is None or any(
            p is None for p, t in zip(params[2:], node.inputs[3:5]) if not is_empty(t)
        ):
            return None
        starts, ends = params[0].reshape(-1).tolist(), params[1].reshape(-1).tolist()
        axes = params[2].reshape(-1).tolist() if len(params) > 2 and params[2] is not None else [0]
        steps = params[3].reshape(-1).tolist() if len(params) > 3 and params[3] is not None else [1]
    else:
        starts, ends = list(node.attrs.get("starts", [])), list(node.attrs.get("ends", []))
        axes, steps = list(node.attrs.get("axes", [0])), [1]
    if len(starts) != 1 or len(ends) != 1 or axes not in ([0], [-1]) or len(steps) != 1 or steps[0] == 0:
        return None
    # Python slicing clamps out-of-range starts/ends exactly as ONNX Slice does.
    picked = dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, dtype=np.int64)


def inline_constant_ifs(graph: gs.Graph, namer) -> int:
    """Replace `If` nodes with a constant condition by the nodes of the branch taken.

    An If is left alone unless the branch's outputs are typed exactly like the If's: a runtime
    may accept a model only because the If hides a precise type from its readers (ONNX's own
    AffineGrid expansion feeds a 1-element vector to `Range`, which wants a scalar).
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "If" or not is_standard(node) or not node.outputs:
            continue
        cond = ir.constant_value(node.inputs[0])
        if cond is None or cond.size != 1:
            continue
        branch = node.attrs["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"]
        if len(branch.outputs) != len(node.outputs) or branch.inputs:
            continue
        if not _same_types(node.outputs, branch.outputs):
            continue
        # What the branch defines may repeat names of the outer graph: rename it first. What it
        # reads from enclosing graphs (possibly only inside a nested If) keeps its name: that
        # may be a graph input or an initializer shared with other graphs.
        for tensor in _defined_in(branch, graph):
            tensor.name = namer(tensor.name)
        for inner_node in branch.nodes:
            inner_node.name = namer(inner_node.name or inner_node.op)
        results, inners, moved = list(node.outputs), list(branch.outputs), list(branch.nodes)
        node.outputs.clear()
        node.inputs.clear()
        # The branch's nodes now belong to `graph`: detach them from the If so nothing that still
        # walks the old node's subgraphs (graphsurgeon's cleanup does) can touch them there.
        node.attrs.clear()
        branch.nodes, branch.outputs = [], []
        graph.nodes.extend(moved)
        for result, inner in zip(results, inners):
            source = ir.producer(inner)
            if (source is not None and any(n is source for n in moved) and not inner.outputs
                    and sum(o is inner for o in inners) == 1):
                ir.substitute(source.outputs, inner, result)
                result.dtype, result.shape = result.dtype or inner.dtype, result.shape or inner.shape
            else:  # the branch returns a constant, an outer tensor, or one value twice
                graph.nodes.append(gs.Node("Identity", name=namer(f"{result.name}_inlined"), inputs=[inner],
                                           outputs=[result]))
        count += 1
    if count:
        toposort(graph)
    return count


def _defined_in(branch: gs.Graph, outer: gs.Graph) -> list[gs.Tensor]:
    """Tensors `branch` itself defines: its nodes' outputs, and the initializers nothing outside
    it reads (an initializer that is an input or output of `outer` is never the branch's)."""
    own_nodes = {id(n) for n in branch.nodes}
    inside = {id(n) for g in ir.iter_graphs(branch, functions=False) for n in g.nodes}
    pinned = {id(t) for t in list(outer.inputs) + list(outer.outputs)}
    defined = []
    for tensor in branch.tensors().values():
        if isinstance(tensor, gs.Constant):
            local = id(tensor) not in pinned and all(id(user) in inside for user in tensor.outputs)
        else:
            local = any(id(n) in own_nodes for n in tensor.inputs)
        if local:
            defined.append(tensor)
    return defined


def _same_types(results, inners) -> bool:
    """Branch outputs typed exactly as the If's outputs (dtype and every dim known and equal)."""
    for result, inner in zip(results, inners):
        a, b = shape_of(result), shape_of(inner)
        if dtype_of(result) != dtype_of(inner) or a is None or a != b or None in a:
            return False
    return True
