"""Cancel a Transpose against its inverse across layout-agnostic ops (part of simplify-shapes).

    x -> Transpose(p) -> [elementwise ops, constant operands, Slices] -> Transpose(p^-1) -> ...

becomes the same ops on x in its own layout: constant operands are transposed once, Slice axes
renumbered, and both Transposes disappear. tf2onnx output is full of such NHWC/NCHW round trips.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir

from .common import (
    affordable, is_empty, is_standard, perm_of, remove, set_inputs, shape_of,
)

UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Cos", "Cosh", "Elu", "Erf", "Exp",
    "Floor", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not",
    "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan",
    "Tanh", "ThresholdedRelu", "Gelu", "Celu",
})
BINARY = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "BitShift", "Where",
})


def sink_transpose(graph: gs.Graph, first: gs.Node, names) -> bool:
    """Remove `first` (a Transpose) and the inverse Transposes its region ends in; True if done."""
    perm = perm_of(first)
    if perm is None or ir.is_graph_output(graph, first.outputs[0]):
        return False
    rank = len(perm)
    inverse = list(np.argsort(perm))
    region = _region(graph, first, perm, rank)
    if region is None:
        return False
    nodes, exits = region
    source, start = first.inputs[0], first.outputs[0]
    relaid = {}  # (node id, input index) -> the constant operand in x's layout
    for node in nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor is not start and not is_empty(tensor) and ir.constant_value(tensor) is not None:
                array = _relayout(node, index, tensor, inverse, rank, perm)
                if array is not None:
                    relaid[(id(node), index)] = (tensor, array)
    replaced = [tensor for tensor, _ in relaid.values()]
    if not affordable(graph, replaced, nodes, [array for _, array in relaid.values()]):
        return False  # the operands are shared with other nodes: relaid copies would grow the model
    for node in nodes:
        for index, tensor in enumerate(list(node.inputs)):
            if tensor is start:
                node.inputs[index] = source
            elif (id(node), index) in relaid:
                node.inputs[index] = names.const(f"{tensor.name}_untransposed", relaid[(id(node), index)][1])
        if node.op == "Slice" and (len(node.inputs) < 4 or is_empty(node.inputs[3])):
            # No axes: they default to 0..k-1 of the transposed layout; name them explicitly.
            count = ir.constant_value(node.inputs[1]).size
            axes = names.const(f"{node.outputs[0].name}_axes", np.array([perm[a] for a in range(count)], np.int64))
            set_inputs(node, list(node.inputs[:3]) + [axes] + list(node.inputs[4:]))
        for out in node.outputs:
            shape = shape_of(out)
            out.shape = None if shape is None or len(shape) != rank else [shape[i] for i in inverse]
    for exit_node in exits:  # perm p followed by p^-1: the data is back in x's layout
        if not remove(graph, exit_node, 0):
            exit_node.op, exit_node.attrs = "Identity", {}
    return True


def _region(graph: gs.Graph, first: gs.Node, perm: list[int], rank: int):
    """The nodes between `first` and inverse Transposes, or None if the data escapes elsewhere."""
    nodes, exits, seen = [], [], set()
    pending = [first.outputs[0]]
    while pending:
        tensor = pending.pop()
        if ir.is_graph_output(graph, tensor):
            return None
        for user in tensor.outputs:
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op == "Transpose" and is_standard(user) and _cancels(perm, perm_of(user, rank)):
                exits.append(user)
                continue
            if not _movable(user, rank):
                return None
            nodes.append(user)
            pending.extend(user.outputs)
    if not exits or not nodes:
        return None
    # Every non-constant input of a region node must come from the region itself.
    inside = {id(first.outputs[0])} | {id(o) for n in nodes for o in n.outputs}
    for node in nodes:
        for tensor in node.inputs:
            if is_empty(tensor) or id(tensor) in inside:
                continue
            constant = ir.constant_value(tensor)
            if constant is None or constant.ndim > rank:
                return None
    return nodes, exits


def _cancels(perm: list[int], other: list[int] | None) -> bool:
    return other is not None and len(other) == len(perm) and [perm[i] for i in other] == list(range(len(perm)))


def _movable(node: gs.Node, rank: int) -> bool:
    """Ops that work the same on any layout once constants/axes are adjusted."""
    if not is_standard(node) or len(node.outputs) != 1:
        return False
    shape = shape_of(node.outputs[0])
    if shape is not None and len(shape) != rank:
        return False  # broadcasting raised the rank: constants would not line up
    if node.op in UNARY or node.op in BINARY:
        return True
    if node.op == "Clip":
        return all(is_empty(t) or (ir.constant_value(t) is not None and ir.constant_value(t).size == 1) for t in node.inputs[1:])
    if node.op == "Slice" and len(node.inputs) >= 3:  # opset 10+: constant starts/ends/axes/steps
        return all(ir.constant_value(t) is not None for t in node.inputs[1:] if not is_empty(t))
    return False


def _relayout(node: gs.Node, index: int, tensor: gs.Tensor, inverse: list[int], rank: int, perm: list[int]):
    """The constant input `index` of `node` for the untransposed layout, or None to keep it."""
    array = ir.constant_value(tensor)
    if node.op == "Slice":
        if index != 3:
            return None  # starts/ends/steps are per listed axis, unchanged
        return np.array([perm[a + rank if a < 0 else a] for a in array.reshape(-1)], dtype=array.dtype)
    if node.op == "Clip" or array.ndim == 0:
        return None  # scalars broadcast the same in any layout
    padded = array.reshape((1,) * (rank - array.ndim) + array.shape)
    return np.ascontiguousarray(padded.transpose(inverse)) if array.ndim else array
