"""simplify-shapes: shorten chains of layout and shape-arithmetic ops."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.registry import register_pass

from .transposes import sink_transpose
from .common import (
    apply_first_rule, axes_of, dtype_of, GraphPass, int_list, is_empty, is_read, is_standard, live_nodes,
    normalize_axes, only_consumer, optional_input, perm_of, remove, same_dim, set_inputs, shape_of, shape_range,
)

VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
REDUCE_OPS = frozenset({
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
})
# Casts from the key type to these types are exact, so a following cast sees the original value.
LOSSLESS_CASTS = {
    "bool": {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"},
    "int8": {"int16", "int32", "int64", "float16", "float32", "float64"},
    "uint8": {"int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"},
    "int16": {"int32", "int64", "float32", "float64"},
    "uint16": {"int32", "uint32", "int64", "uint64", "float32", "float64"},
    "int32": {"int64", "float64"},
    "uint32": {"int64", "uint64", "float64"},
    "float16": {"float32", "float64"},
    "float32": {"float64"},
}


@register_pass
@dataclass(frozen=True)
class SimplifyShapes(GraphPass):
    """Merge and cancel layout ops and resolve shape arithmetic.

    - consecutive Reshape/Flatten/Squeeze/Unsqueeze (and Transposes that only move size-1
      axes) become one Reshape; Transpose pairs compose or cancel, also across elementwise ops
      and Slices (NHWC/NCHW round trips); Squeeze/Unsqueeze of the same axes cancel;
    - a Reshape whose target is assembled from `Shape` pieces gets a constant target (dims
      copied from its own input become 0, one unknown dim becomes -1); a Concat of all dims of
      a tensor becomes its `Shape`;
    - consecutive Slices on different axes merge; nested Concats on one axis flatten; a
      Reduce with keepdims=0 followed by Unsqueeze of the same axes keeps the dims instead;
      Cast chains whose first cast is lossless skip it.
    """

    name = "simplify-shapes"
    summary = "Merge/cancel Reshape/Transpose/Squeeze/Unsqueeze/Slice/Concat chains, resolve Shape arithmetic."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        opset = int(graph.opset or model.opset)
        for node in live_nodes(graph):
            if not is_standard(node) or not node.inputs or is_empty(node.inputs[0]) or not node.outputs:
                continue
            if not any(is_read(graph, o) for o in node.outputs):
                continue  # made dead by an earlier rewrite
            applied = apply_first_rule(_RULES.get(node.op, ()), self, graph, node, opset)
            if applied:
                done[applied] += 1
        return done

    # --- Transpose ---------------------------------------------------------------------------

    def transpose_pair(self, graph, node, opset):
        first = ir.producer(node.inputs[0])
        if first is None or first.op != "Transpose" or not is_standard(first):
            return None
        if not only_consumer(first.outputs[0], node, graph):
            return None
        p1, p2 = perm_of(first), perm_of(node)
        if p1 is None or p2 is None or len(p1) != len(p2):
            return None
        composed = [p1[p] for p in p2]
        source = first.inputs[0]
        if composed == list(range(len(composed))):
            _becomes(graph, node, source)
            return "transpose_cancelled"
        node.inputs[0] = source
        node.attrs["perm"] = composed
        return "transpose_merged"

    def transpose_sink(self, graph, node, opset):
        """Transpose(p) -> layout-agnostic ops -> Transpose(p^-1): both Transposes go."""
        return "transposes_cancelled" if sink_transpose(graph, node, self.names) else None

    # --- views -------------------------------------------------------------------------------

    def squeeze_pair(self, graph, node, opset):
        """Unsqueeze(Squeeze(x, a), a) and Squeeze(Unsqueeze(x, a), a) are x."""
        first = ir.producer(node.inputs[0])
        pair = {("Squeeze", "Unsqueeze"), ("Unsqueeze", "Squeeze")}
        if first is None or (first.op, node.op) not in pair or not is_standard(first):
            return None
        if not only_consumer(first.outputs[0], node, graph):
            return None
        # Both axes lists refer to the rank of the larger tensor (the Squeeze input / Unsqueeze output).
        big = first.inputs[0] if first.op == "Squeeze" else first.outputs[0]
        shape = shape_of(big)
        a, b = axes_of(first), axes_of(node)
        if shape is None or not a or not b:
            return None
        a, b = normalize_axes(a, len(shape)), normalize_axes(b, len(shape))
        if a is None or b is None or sorted(a) != sorted(b):
            return None
        _becomes(graph, node, first.inputs[0])
        return "squeeze_cancelled"

    def view_chain(self, graph, node, opset):
        """view(view(x)) -> Reshape(x, target) when the target can be written down."""
        if opset < 5 or not _is_view(node):
            return None
        first = ir.producer(node.inputs[0])
        if first is None or not is_standard(first) or not _is_view(first):
            return None
        if not only_consumer(first.outputs[0], node, graph):
            return None
        target = _reshape_target(node, first.inputs[0])
        if target is None:
            return None
        allowzero = int(node.attrs.get("allowzero", 0)) if node.op == "Reshape" else 0
        node.op = "Reshape"
        node.attrs = {"allowzero": allowzero} if allowzero else {}
        set_inputs(node, [first.inputs[0], self.names.const(f"{node.outputs[0].name}_shape", target)])
        return "views_merged"

    # --- Reshape targets built from Shape ------------------------------------------------------

    def reshape_target(self, graph, node, opset):
        """Reshape(x, Concat(Shape pieces, constants)) -> Reshape(x, constant).

        A piece that is x's own dim at the same position (or a dim with the same symbolic name)
        becomes 0, "copy the input dim"; one unknown piece becomes -1; static dims become numbers.
        """
        if opset < 5 or len(node.inputs) < 2 or ir.constant_value(node.inputs[1]) is not None:
            return None
        entries = dim_sources(node.inputs[1])
        if entries is None:
            return None
        allowzero = int(node.attrs.get("allowzero", 0))
        # With allowzero=1 a 0 means an empty dim; copies (0s) are then only possible if the
        # target has no literal 0, and the new Reshape drops allowzero.
        can_copy = not (allowzero and ("const", 0) in entries)
        data_shape = shape_of(node.inputs[0])
        target, unknown, copies = [], 0, False
        for position, entry in enumerate(entries):
            if entry[0] == "const":
                unknown += entry[1] == -1
                target.append(entry[1])
                continue
            dim = entry[3] if entry[0] == "dim" else None
            if isinstance(dim, int) and dim > 0:
                target.append(dim)
            elif can_copy and entry[0] == "dim" and _same_position_dim(entry, node.inputs[0], data_shape, position):
                target.append(0)
                copies = True
            else:
                unknown += 1
                target.append(-1)
        if unknown > 1:
            return None
        if copies:
            node.attrs.pop("allowzero", None)
        node.inputs[1] = self.names.const(f"{node.outputs[0].name}_shape", np.array(target, dtype=np.int64))
        return "reshape_targets"

    def concat_of_shape(self, graph, node, opset):
        """Concat(dim 0 of t, dim 1 of t, ..., all dims of t) is Shape(t)."""
        if int(node.attrs.get("axis", 0)) not in (0, -1) or ir.is_graph_output(graph, node.outputs[0]):
            return None
        entries = dim_sources(node.outputs[0])
        if not entries or any(e[0] != "dim" for e in entries):
            return None
        tensor = entries[0][1]
        shape = shape_of(tensor)
        if shape is None or len(entries) != len(shape) or any(e[1] is not tensor or e[2] != i
                                                               for i, e in enumerate(entries)):
            return None
        shape_node = _find_shape_node(tensor)
        if shape_node is None:
            return None
        ir.replace_all_uses(graph, node.outputs[0], shape_node.outputs[0])
        node.inputs.clear()
        node.outputs.clear()
        return "shape_reused"

    # --- Slice, Concat, Reduce, Cast ---------------------------------------------------------

    def slice_pair(self, graph, node, opset):
        """Slice(Slice(x)) on different axes -> one Slice."""
        if opset < 10:
            return None
        first = ir.producer(node.inputs[0])
        if first is None or first.op != "Slice" or not is_standard(first):
            return None
        if not only_consumer(first.outputs[0], node, graph):
            return None
        shape = shape_of(first.inputs[0])
        a, b = _slice_params(first), _slice_params(node)
        if a is None or b is None:
            return None
        rank = len(shape) if shape is not None else None
        axes_a, axes_b = a[2], b[2]
        if any(x < 0 for x in axes_a + axes_b):
            if rank is None:
                return None
            axes_a, axes_b = normalize_axes(axes_a, rank), normalize_axes(axes_b, rank)
            if axes_a is None or axes_b is None:
                return None
        if set(axes_a) & set(axes_b):
            return None
        merged = [np.array(x + y, dtype=np.int64) for x, y in zip(a[:2], b[:2])]
        merged += [np.array(axes_a + axes_b, dtype=np.int64), np.array(a[3] + b[3], dtype=np.int64)]
        base = node.outputs[0].name
        set_inputs(node, [first.inputs[0]] + [self.names.const(f"{base}_{part}", array) for part, array in
                                              zip(("starts", "ends", "axes", "steps"), merged)])
        return "slices_merged"

    def concat_flatten(self, graph, node, opset):
        """Concat(Concat(a, b), c) on one axis -> Concat(a, b, c)."""
        axis = int(node.attrs.get("axis", 0))
        rank = _rank(node.outputs[0])
        for index, tensor in enumerate(node.inputs):
            inner = ir.producer(tensor)
            if inner is None or inner.op != "Concat" or not is_standard(inner):
                continue
            if not only_consumer(tensor, node, graph) or node.inputs.count(tensor) != 1:
                continue
            inner_axis = int(inner.attrs.get("axis", 0))
            if inner_axis != axis and (rank is None or inner_axis % rank != axis % rank):
                continue
            set_inputs(node, list(node.inputs[:index]) + list(inner.inputs) + list(node.inputs[index + 1:]))
            return "concats_flattened"
        return None

    def reduce_unsqueeze(self, graph, node, opset):
        """Unsqueeze(Reduce(x, axes, keepdims=0), axes) -> Reduce(x, axes, keepdims=1)."""
        reduce = ir.producer(node.inputs[0])
        if reduce is None or reduce.op not in REDUCE_OPS or not is_standard(reduce):
            return None
        if int(reduce.attrs.get("keepdims", 1)) != 0 or not only_consumer(reduce.outputs[0], node, graph):
            return None
        shape = shape_of(reduce.inputs[0])
        raxes, uaxes = axes_of(reduce), axes_of(node)
        if shape is None or not raxes or not uaxes:
            return None
        raxes, uaxes = normalize_axes(raxes, len(shape)), normalize_axes(uaxes, len(shape))
        if raxes is None or uaxes is None or sorted(raxes) != sorted(uaxes):
            return None
        reduce.attrs["keepdims"] = 1
        reduce.outputs[0].shape = node.outputs[0].shape
        node.inputs[0] = reduce.outputs[0]
        if remove(graph, node):
            return "reduce_keepdims"
        reduce.attrs["keepdims"] = 0  # could not drop the Unsqueeze after all
        return None

    def cast_chain(self, graph, node, opset):
        """Cast(Cast(x, wider), to) -> Cast(x, to) when the first cast loses nothing."""
        first = ir.producer(node.inputs[0])
        if first is None or first.op != "Cast" or not is_standard(first):
            return None
        if not only_consumer(first.outputs[0], node, graph):
            return None
        source, middle = dtype_of(first.inputs[0]), dtype_of(first.outputs[0])
        if source is None or middle is None or middle.name not in LOSSLESS_CASTS.get(source.name, ()):
            return None
        node.inputs[0] = first.inputs[0]
        return "casts_merged"


def _becomes(graph: gs.Graph, node: gs.Node, source: gs.Tensor) -> None:
    """`node` turned out to return `source`: drop it, or make it an Identity when its output
    name must survive (a graph output)."""
    set_inputs(node, [source])
    if not remove(graph, node):
        node.op, node.attrs = "Identity", {}


def _rank(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def _is_view(node: gs.Node) -> bool:
    """Ops that only reinterpret the shape (row-major element order is untouched)."""
    if node.op not in VIEW_OPS or not is_standard(node) or len(node.outputs) != 1:
        return False
    if node.op != "Transpose":
        return True
    shape, perm = shape_of(node.inputs[0]), perm_of(node)
    if shape is None or perm is None or len(perm) != len(shape):
        return False
    moved = [p for p in perm if shape[p] != 1]  # unknown dims count as not 1
    return moved == sorted(moved)


def _reshape_target(node: gs.Node, source: gs.Tensor) -> np.ndarray | None:
    """A Reshape target turning `source` into `node`'s output, or None."""
    if node.op == "Reshape":
        target = int_list(node.inputs[1])
        if target is not None and (0 not in target or int(node.attrs.get("allowzero", 0))):
            return np.array(target, dtype=np.int64)  # independent of the intermediate tensor
    out, src = shape_of(node.outputs[0]), shape_of(source)
    if out is None or any(d == 0 for d in out):
        return None
    target, unknown = [], 0
    for i, dim in enumerate(out):
        if isinstance(dim, int):
            target.append(dim)
        elif src is not None and i < len(src) and same_dim(dim, src[i]) and isinstance(dim, str):
            target.append(0)
        else:
            unknown += 1
            target.append(-1)
    return np.array(target, dtype=np.int64) if unknown <= 1 else None


def _same_position_dim(entry: tuple, data: gs.Tensor, data_shape: list | None, position: int) -> bool:
    """Whether dim entry[2] of tensor entry[1] is surely the data's dim at `position`: the very
    same dim, or one carrying the same symbolic name (shape inference gives equal dims one name)."""
    _, tensor, k, dim = entry
    if tensor is data and k == position:
        return True
    return (data_shape is not None and position < len(data_shape) and isinstance(dim, str)
            and data_shape[position] == dim)


def _slice_params(node: gs.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    starts, ends = int_list(node.inputs[1]), int_list(node.inputs[2])
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes_t, steps_t = optional_input(node, 3), optional_input(node, 4)
    axes = int_list(axes_t) if axes_t is not None else list(range(len(starts)))
    steps = int_list(steps_t) if steps_t is not None else [1] * len(starts)
    if axes is None or steps is None or len(axes) != len(starts) or len(steps) != len(starts):
        return None
    return starts, ends, axes, steps


def _find_shape_node(tensor: gs.Tensor) -> gs.Node | None:
    """A full `Shape(tensor)` node already in the graph."""
    for user in tensor.outputs:
        if user.op == "Shape" and is_standard(user) and "start" not in user.attrs and "end" not in user.attrs:
            return user
    return None


def dim_sources(tensor: gs.Tensor, depth: int = 0) -> list[tuple] | None:
    """What each element of a 1-D int64 shape tensor is: ("const", v), ("dim", t, k, d) (dim k of
    tensor t, whose inferred value is d: int, symbol or None) or ("?",) for a runtime value.
    None when the length is unknown."""
    array = ir.constant_value(tensor)
    if array is not None:
        if array.dtype != np.int64 or array.ndim > 1:
            return None
        return [("const", int(v)) for v in array.reshape(-1)]
    node = ir.producer(tensor)
    if node is None or not is_standard(node) or depth > 8:
        return _unknown(tensor)
    if node.op == "Shape":
        dims = _shape_entries(node)
        return dims if dims is not None else _unknown(tensor)
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = []
        for t in node.inputs:
            sub = dim_sources(t, depth + 1)
            if sub is None:
                return None
            parts.extend(sub)
        return parts
    if node.op == "Unsqueeze" and axes_of(node) in ([0], [-1]) and _rank(node.inputs[0]) == 0:
        return dim_sources(node.inputs[0], depth + 1)
    if node.op in ("Gather", "Slice") and ir.producer(node.inputs[0]) is not None \
            and ir.producer(node.inputs[0]).op == "Shape":
        dims = _shape_entries(ir.producer(node.inputs[0]))
        if dims is not None:
            picked = _pick(node, dims)
            if picked is not None:
                return picked
    return _unknown(tensor)


def _unknown(tensor: gs.Tensor) -> list[tuple] | None:
    shape = shape_of(tensor)
    if shape is None or len(shape) > 1:
        return None
    count = 1 if len(shape) == 0 else shape[0]
    return [("?",)] * count if isinstance(count, int) else None


def _shape_entries(shape_node: gs.Node) -> list[tuple] | None:
    tensor = shape_node.inputs[0]
    axes = shape_range(shape_node)
    return None if axes is None else [("dim", tensor, k, shape_of(tensor)[k]) for k in axes]


def _pick(node: gs.Node, dims: list[tuple]) -> list[tuple] | None:
    if node.op == "Gather":
        indices = ir.constant_value(node.inputs[1])
        if indices is None or indices.ndim > 1 or int(node.attrs.get("axis", 0)) != 0:
            return None
        flat = [int(i) + len(dims) if int(i) < 0 else int(i) for i in indices.reshape(-1)]
        if any(not 0 <= i < len(dims) for i in flat):
            return None
        return [dims[i] for i in flat]
    params = _slice_params(node) if len(node.inputs) >= 3 else None
    if params is None or params[2] not in ([0], [-1]) or params[3][0] == 0:
        return None
    return dims[slice(params[0][0], params[1][0], params[3][0])]


_RULES = {
    "Transpose": (SimplifyShapes.transpose_pair, SimplifyShapes.view_chain, SimplifyShapes.transpose_sink),
    "Squeeze": (SimplifyShapes.squeeze_pair, SimplifyShapes.view_chain),
    "Unsqueeze": (SimplifyShapes.squeeze_pair, SimplifyShapes.reduce_unsqueeze, SimplifyShapes.view_chain),
    "Reshape": (SimplifyShapes.view_chain, SimplifyShapes.reshape_target),
    "Flatten": (SimplifyShapes.view_chain,),
    "Concat": (SimplifyShapes.concat_flatten, SimplifyShapes.concat_of_shape),
    "Slice": (SimplifyShapes.slice_pair,),
    "Cast": (SimplifyShapes.cast_chain,),
}
