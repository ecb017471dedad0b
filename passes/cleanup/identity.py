"""remove-identity: drop nodes whose output is provably equal to one of their inputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.registry import register_pass

from .common import (
    broadcast_keeps_shape, dtype_of, GraphPass, int_list, is_empty, is_standard, live_nodes, optional_input, perm_of,
    remove, same_dim, shape_of,
)

INT_MAX_LIKE = 2**31 - 1  # exporters write INT32/INT64 max for "to the end"


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(GraphPass):
    """Remove Identity, inference-mode Dropout, and ops that are no-ops for their arguments.

    No-ops: Cast/CastLike to the input's own type; Reshape to the input's shape; Transpose with
    the identity permutation; Pad, Slice, Tile and Expand that change nothing; Concat, Split,
    Sum, Max, Min and Mean of a single tensor; Flatten of a matrix; Add/Sub of zeros and
    Mul/Div by ones (and Pow by one) when broadcasting keeps the shape. Graph output names are
    kept; a node that would have to be replaced by an Identity to keep one is left alone.
    """

    name = "remove-identity"
    summary = "Remove Identity, inference Dropout and no-op Cast/Reshape/Transpose/Pad/Slice/Expand/arithmetic."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        opset = int(graph.opset or model.opset)
        for node in live_nodes(graph):
            if not is_standard(node) or not node.inputs or is_empty(node.inputs[0]):
                continue
            keep = passthrough_input(node, opset)
            if keep is not None and remove(graph, node, keep):
                done[node.op] += 1
        return done


def passthrough_input(node: gs.Node, opset: int) -> int | None:
    """Index of the input the node's (first) output is identical to, or None."""
    check = _CHECKS.get(node.op)
    if check is None:
        return None
    return check(node, opset)  # (an exception here is a bug in the check, not "not a no-op")


def _identity(node, opset):
    return 0


def _dropout(node, opset):
    # (`remove` refuses the node while its mask output is read.)
    if opset < 7 and not node.attrs.get("is_test", 0):
        return None  # before opset 7 Dropout trained unless is_test was set
    training = optional_input(node, 2)
    if training is not None:
        flag = ir.constant_value(training)
        if flag is None or bool(flag.reshape(-1)[0]):
            return None
    return 0


def _cast(node, opset):
    source = dtype_of(node.inputs[0])
    to = node.attrs.get("to")
    if source is None or to is None:
        return None
    return 0 if ir.onnx_dtype(source) == int(to) else None


def _cast_like(node, opset):
    a, b = dtype_of(node.inputs[0]), dtype_of(node.inputs[1])
    return 0 if a is not None and a == b else None


def _same_shape(node) -> bool:
    """Input and output shapes are known to be equal dim for dim."""
    a, b = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    return a is not None and b is not None and len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def _reshape(node, opset):
    data = shape_of(node.inputs[0])
    target = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if data is None:
        return None
    if target is None:
        return 0 if _same_shape(node) and all(isinstance(d, int) for d in data) else None
    if len(target) != len(data):
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    unresolved = 0
    for want, dim in zip(target, data):
        if want == 0 and not allowzero:
            continue  # copies the input dim
        if isinstance(dim, int) and want == dim:
            continue
        if want == -1:
            unresolved += 1
            continue
        return None
    # A single -1 among dims that all match resolves to the remaining dim itself.
    return 0 if unresolved <= 1 else None


def _transpose(node, opset):
    perm = perm_of(node)
    if perm is None:
        return None
    if perm == list(range(len(perm))):
        return 0
    # A perm that only swaps size-1 axes among themselves changes neither data nor shape.
    shape = shape_of(node.inputs[0])
    if shape is None or len(shape) != len(perm):
        return None
    return 0 if all(p == i or (shape[p] == 1 and shape[i] == 1) for i, p in enumerate(perm)) else None


def _pad(node, opset):
    if "pads" in node.attrs:  # opset < 11
        pads = [int(p) for p in node.attrs["pads"]]
    else:
        pads = int_list(optional_input(node, 1))
    return 0 if pads is not None and not any(pads) else None


def _slice(node, opset):
    shape = shape_of(node.inputs[0])
    if shape is None:
        return None
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = int_list(node.inputs[1]), int_list(node.inputs[2])
        axes_t, steps_t = optional_input(node, 3), optional_input(node, 4)
        axes = int_list(axes_t) if axes_t is not None else (list(range(len(starts))) if starts is not None else None)
        steps = int_list(steps_t) if steps_t is not None else ([1] * len(starts) if starts is not None else None)
    if None in (starts, ends, axes, steps) or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape) or step != 1:
            return None
        dim = shape[axis]
        if start < 0:
            if not isinstance(dim, int) or start + dim > 0:
                return None
        elif start != 0:
            return None
        if end >= INT_MAX_LIKE:
            continue
        if not isinstance(dim, int):
            return None
        if (end + dim if end < 0 else end) < dim:
            return None
    return 0


def _expand(node, opset):
    target = int_list(node.inputs[1])
    return 0 if target is not None and broadcast_keeps_shape(shape_of(node.inputs[0]), target) else None


def _tile(node, opset):
    repeats = int_list(node.inputs[1])
    return 0 if repeats is not None and all(r == 1 for r in repeats) else None


def _single_input(node, opset):
    live = [t for t in node.inputs if not is_empty(t)]
    return 0 if len(live) == 1 and len(node.outputs) == 1 else None


def _split(node, opset):
    # A valid Split into one part returns the whole tensor.
    return 0 if len(node.outputs) == 1 else None


def _flatten(node, opset):
    shape = shape_of(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    return 0 if shape is not None and len(shape) == 2 and axis in (1, -1) else None


def _neutral(element: float, commutative: bool):
    """Add/Sub with zeros, Mul/Div/Pow with ones, when the constant does not broadcast the other side."""

    def check(node, opset):
        sides = (0, 1) if commutative else (0,)
        for keep in sides:
            const = ir.constant_value(node.inputs[1 - keep])
            if const is None or const.size == 0 or not np.all(const == element):
                continue
            data = node.inputs[keep]
            if dtype_of(data) is not None and dtype_of(data) != const.dtype:
                continue
            if broadcast_keeps_shape(shape_of(data), const.shape):
                return keep
        return None

    return check


_CHECKS = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Tile": _tile,
    "Concat": _single_input,
    "Sum": _single_input,
    "Max": _single_input,
    "Min": _single_input,
    "Mean": _single_input,
    "Split": _split,
    "Flatten": _flatten,
    "Add": _neutral(0, commutative=True),
    "Sub": _neutral(0, commutative=False),
    "Mul": _neutral(1, commutative=True),
    "Div": _neutral(1, commutative=False),
    "Pow": _neutral(1, commutative=False),
}
