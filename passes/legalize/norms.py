"""Normalizations rewritten as ReduceMean / Sub / Mul / Sqrt / Div (and a Reshape for groups)."""

from __future__ import annotations

import numpy as np

from edgegraph import ir

from .rules import Emit, NoMatch, float_input, rank_of, rewrites


def _normalize(e: Emit, x, axes, epsilon: float):
    """(x - mean) / sqrt(var + epsilon) over `axes`, plus the mean and 1/sqrt(var + epsilon)
    (kept dims) for LayerNormalization's optional outputs."""
    mean = e.reduce("ReduceMean", x, axes)
    centred = e("Sub", x, mean)
    variance = e.reduce("ReduceMean", e("Mul", centred, centred), axes)
    std = e("Sqrt", e("Add", variance, epsilon))
    return e("Div", centred, std), mean, std


def _computing_dtype(node, dtype, stash_type: int):
    """LayerNormalization/GroupNormalization compute in float32 when stash_type is 1 (the
    default) for a float16 input: the statistics would lose too much in float16."""
    return np.dtype(np.float32) if stash_type == 1 and dtype == np.float16 else dtype


@rewrites("LayerNormalization")
def layer_normalization(owner, graph, node, opset):
    """Y = (X - mean) / sqrt(var + eps) * scale + B, statistics over axes [axis, rank)."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    rank = rank_of(node.inputs[0])
    if rank is None:
        return NoMatch("the input's rank is unknown")
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return NoMatch(f"axis {node.attrs.get('axis')} is outside rank {rank}")
    stash = int(node.attrs.get("stash_type", 1))
    computing = _computing_dtype(node, dtype, stash)
    e = Emit(owner, graph, node, computing, opset)
    x, scale, bias = (e.take() + [None, None])[:3]
    wanted = [o if o is not None and o.name else None for o in e.outputs]
    if computing != dtype:
        x = e("Cast", x, to=1)
    normalized, mean, std = _normalize(e, x, list(range(axis, rank)), float(node.attrs.get("epsilon", 1e-5)))
    if computing != dtype:
        normalized = e("Cast", normalized, to=10)
    result = e("Mul", normalized, scale, out=None if bias is not None else e.outputs[0])
    if bias is not None:
        e("Add", result, bias, out=e.outputs[0])
    # Optional outputs: Mean and InvStdDev (in the computing dtype, dims kept).
    if len(wanted) > 1 and wanted[1] is not None:
        e("Identity", mean, out=e.outputs[1])
    if len(wanted) > 2 and wanted[2] is not None:
        e("Reciprocal", std, out=e.outputs[2])
    return "LayerNormalization->ReduceMean/Sub/Div"


@rewrites("InstanceNormalization")
def instance_normalization(owner, graph, node, opset):
    """y = (x - mean) / sqrt(var + eps) * scale + B per sample and channel (over axes 2..)."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    rank = rank_of(node.inputs[0])
    if rank is None or rank < 3:
        return NoMatch("the input's rank is unknown" if rank is None else f"rank {rank} < 3")
    e = Emit(owner, graph, node, dtype, opset)
    x, scale, bias = e.take()
    normalized, _, _ = _normalize(e, x, list(range(2, rank)), float(node.attrs.get("epsilon", 1e-5)))
    per_channel = e.ints([-1] + [1] * (rank - 2))  # (C,) -> (C, 1, ..., 1) to broadcast on axis 1
    scaled = e("Mul", normalized, e("Reshape", scale, per_channel))
    e("Add", scaled, e("Reshape", bias, per_channel), out=e.outputs[0])
    return "InstanceNormalization->ReduceMean/Sub/Div"


@rewrites("GroupNormalization")
def group_normalization(owner, graph, node, opset):
    """Statistics per (sample, group): Reshape to (N, G, -1), normalize over axis 2, reshape
    back; scale and bias per channel (opset 21) or per group (opset 18)."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    rank = rank_of(node.inputs[0])
    if rank is None or rank < 3:
        return NoMatch("the input's rank is unknown" if rank is None else f"rank {rank} < 3")
    groups = int(node.attrs["num_groups"])
    # (GroupNormalization-18 has no stash_type: it computes in the input's dtype.)
    computing = dtype if opset < 21 else _computing_dtype(node, dtype, int(node.attrs.get("stash_type", 1)))
    e = Emit(owner, graph, node, computing, opset)
    x, scale, bias = e.take()
    if computing != dtype:
        x = e("Cast", x, to=1)
    grouped = e("Reshape", x, e.ints([0, groups, -1]))
    normalized, _, _ = _normalize(e, grouped, [2], float(node.attrs.get("epsilon", 1e-5)))
    if opset < 21:  # scale and bias per group
        per_group = e.ints([-1, 1])
        normalized = e("Add", e("Mul", normalized, e("Reshape", scale, per_group)), e("Reshape", bias, per_group))
    back = e("Reshape", normalized, e("Shape", x))
    if computing != dtype:
        back = e("Cast", back, to=10)
    if opset < 21:
        e("Identity", back, out=e.outputs[0])
    else:
        per_channel = e.ints([-1] + [1] * (rank - 2))
        e("Add", e("Mul", back, e("Reshape", scale, per_channel)), e("Reshape", bias, per_channel), out=e.outputs[0])
    return "GroupNormalization->Reshape/ReduceMean/Sub/Div"


@rewrites("BatchNormalization")
def batch_normalization(owner, graph, node, opset):
    """Inference BatchNormalization (one output; what `cleanup` could not fold into a Conv) =
    x * a + b per channel (axis 1), a = scale / sqrt(var + eps), b = B - mean * a: constants
    when the statistics are, else computed by the same ops."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    if int(node.attrs.get("training_mode", 0)) or any(o.name for o in node.outputs[1:]):
        return NoMatch("training mode (running statistics as outputs)")
    rank = rank_of(node.inputs[0])
    if rank is None or rank < 2:
        return NoMatch("the input's rank is unknown" if rank is None else "rank below 2")
    if opset < 9 and int(node.attrs.get("spatial", 1)) != 1:
        return NoMatch("spatial=0 (statistics per element)")
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    params = [ir.constant_value(t) for t in node.inputs[1:5]]
    e = Emit(owner, graph, node, dtype, opset)
    x, scale, bias, mean, var = e.take()[:5]
    per_channel = [-1] + [1] * (rank - 2)
    if all(p is not None for p in params):  # fold the statistics in float64, store in the dtype
        s64, b64, m64, v64 = (p.astype(np.float64).reshape(-1) for p in params)
        a = s64 / np.sqrt(v64 + epsilon)
        factor = e.const(a.reshape(per_channel).astype(dtype))
        offset = e.const((b64 - m64 * a).reshape(per_channel).astype(dtype))
    else:
        shape = e.ints(per_channel)
        a = e("Div", scale, e("Sqrt", e("Add", var, epsilon)))
        factor = e("Reshape", a, shape)
        offset = e("Reshape", e("Sub", bias, e("Mul", mean, a)), shape)
    e("Add", e("Mul", x, factor), offset, out=e.outputs[0])
    return "BatchNormalization->Mul/Add"
