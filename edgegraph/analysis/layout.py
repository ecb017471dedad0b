"""Weight layouts: which axis of a layer's weight holds its output channels and which its input
channels, how groups tie them, and where the stored constant behind a weight is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir

# Ops whose second input is a weight with a channel layout (BatchNormalization's are its 1-D params).
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})


@dataclass(frozen=True)
class Layout:
    """Where channels live in one weight of one node.

    `out_axis` indexes output channels and `in_axis` input channels (None: the weight has none,
    like BN parameters). With `groups` > 1 the weight holds one group's share on one of the two
    axes: Conv (C_out, C_in / g, k...) has all outputs on axis 0 and C_in / g inputs per group on
    axis 1; ConvTranspose (C_in, C_out / g, k...) has all inputs on axis 0 and C_out / g outputs
    per group on axis 1. `x_axis` / `y_axis` are the channel axes of the activation read and
    written (negative: counted from the end).
    """

    op: str
    out_axis: int
    in_axis: int | None
    groups: int = 1
    transposed: bool = False  # ConvTranspose: out_axis holds the outputs of one group
    x_axis: int = 1
    y_axis: int = 1

    def output_channels(self, shape) -> int:
        return int(shape[self.out_axis]) * (self.groups if self.transposed else 1)

    def input_channels(self, shape) -> int | None:
        if self.in_axis is None:
            return None
        return int(shape[self.in_axis]) * (1 if self.transposed else self.groups)

    @property
    def per_axis(self) -> bool:
        """Output channels are exactly the entries of `out_axis` (a grouped ConvTranspose spreads
        them over two axes), so a per-channel vector can be laid along it."""
        return not (self.transposed and self.groups > 1)

    def scale_outputs(self, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
        """`weight` with every output channel c multiplied by factor[c]."""
        if self.per_axis:
            shape = [1] * weight.ndim
            shape[self.out_axis] = -1
            return weight * factor.reshape(shape)
        # ConvTranspose with groups: output channel g * (C_out / g) + j is W[g-th block of rows, j]
        per_group = weight.shape[1]
        grouped = weight.reshape(self.groups, weight.shape[0] // self.groups, per_group, *weight.shape[2:])
        scaled = grouped * factor.reshape(self.groups, 1, per_group, *[1] * (weight.ndim - 2))
        return scaled.reshape(weight.shape)

    def out_major(self, weight: np.ndarray) -> np.ndarray:
        """A view of `weight` as (output channels, rest) that writes through (ungrouped or Conv only)."""
        if weight.ndim == 2:
            return np.moveaxis(weight, self.out_axis, 0)
        if self.out_axis != 0:
            raise ValueError(f"no output-major view of a {self.op} weight")
        return weight.reshape(weight.shape[0], -1)

    def in_view(self, weight: np.ndarray) -> np.ndarray:
        """A view of a Conv / Gemm / MatMul weight as (groups, out per group, in per group, rest)."""
        if self.op == "Conv":
            out, per_group = weight.shape[:2]
            return weight.reshape(self.groups, out // self.groups, per_group, -1)
        return self.out_major(weight)[None, :, :, None]


def activation_axis(shape) -> int:
    """The channel axis of an activation of `shape` (batch first) when nothing else says: 1 for
    NCHW (rank 4), else the last (tokens, features)."""
    return 1 if len(shape) == 4 else len(shape) - 1


def channel_vector(value: np.ndarray, rank: int, channels: int, *, channels_last: bool = False) -> np.ndarray | None:
    """`value` as a (channels,) float64 vector when, broadcast against an activation of `rank`
    dims (N, C, ... or, channels last, N, ..., C), it varies along the channel axis only; else None."""
    value = np.asarray(value)
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    axis = rank - 1 if channels_last else 1
    if shape[axis] not in (1, channels) or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


def of(node: gs.Node, ndim: int, index: int = 1) -> Layout | None:
    """The layout of input `index` (of rank `ndim`) of `node`, or None when it has no channel layout."""
    op = node.op
    if (node.domain or "") not in ir.STANDARD_DOMAINS:
        return None
    if op in ("Conv", "ConvTranspose") and index == 1 and ndim >= 3:
        groups = int(node.attrs.get("group", 1))
        if op == "Conv":
            return Layout(op, 0, 1, groups)
        return Layout(op, 1, 0, groups, transposed=True)
    if op in ("Conv", "ConvTranspose") and index == 2 and ndim == 1:  # bias
        return Layout(op, 0, None)
    if op == "Gemm" and index == 1 and ndim == 2:
        x_axis = 0 if node.attrs.get("transA", 0) else 1
        if node.attrs.get("transB", 0):
            return Layout(op, 0, 1, x_axis=x_axis)
        return Layout(op, 1, 0, x_axis=x_axis)
    if op == "MatMul" and ndim >= 2:
        if index == 1:  # x @ W: W is (..., K, N)
            return Layout(op, ndim - 1, ndim - 2, x_axis=-1, y_axis=-1)
        if index == 0:  # W @ x: W is (..., M, K), y rows are its outputs
            return Layout(op, ndim - 2, ndim - 1, x_axis=-2, y_axis=-2)
    if op == "BatchNormalization" and 1 <= index <= 4 and ndim == 1:
        return Layout(op, 0, None)
    return None


def weight(node: gs.Node) -> Layout | None:
    """The layout of a node's main weight (input 1), when it is a constant of a known rank."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    shape = node.inputs[1].shape
    return None if shape is None else of(node, len(shape))


def output_channels(node: gs.Node, weight_value: np.ndarray) -> int | None:
    """Number of output channels of a Conv / ConvTranspose / Gemm / MatMul with this weight."""
    lay = of(node, np.ndim(weight_value))
    return None if lay is None else lay.output_channels(np.shape(weight_value))


@dataclass(frozen=True)
class Source:
    """A stored constant behind a weight: `axes[i]` is the constant's axis that weight axis i
    reads (None: the constant is broadcast along it)."""

    constant: gs.Constant
    axes: tuple[int | None, ...]


# Ops through which a weight is computed from stored constants, entry for entry.
_SAME_SHAPE = frozenset({"Cast", "Identity"})


def sources(tensor: gs.Tensor, depth: int = 8) -> list[Source] | None:
    """The stored constants a weight tensor is computed from, through Cast, DequantizeLinear,
    Constant nodes (paddle2onnx), Identity and Mul/Div by constants (weight-only scales), with how
    their axes line up with the weight's. None when the weight is computed from anything else."""
    if isinstance(tensor, gs.Constant):
        return [Source(tensor, tuple(range(tensor.values.ndim)))]
    node = ir.producer(tensor)
    if node is None or depth == 0 or (node.domain or "") not in ir.STANDARD_DOMAINS:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return [Source(value, tuple(range(value.values.ndim)))] if isinstance(value, gs.Constant) else None
    if node.op in _SAME_SHAPE:
        return sources(node.inputs[0], depth - 1)
    if node.op == "DequantizeLinear":
        found = sources(node.inputs[0], depth - 1)
        if found is None:
            return None
        ndim = len(found[0].axes)
        axis = int(node.attrs.get("axis", 1)) % max(ndim, 1)
        for param in node.inputs[1:3]:
            if param is None or not param.name:
                continue
            shape = param.shape if param.shape is not None else ir.constant_value(param).shape
            if len(shape) == 0 or int(np.prod(shape)) == 1:
                continue  # per tensor
            inner = sources(param, depth - 1)
            if inner is None or len(inner[0].axes) != 1:
                return None  # blocked quantization: not a per-axis layout
            found += [Source(s.constant, tuple(s.axes[0] if i == axis else None for i in range(ndim))) for s in inner]
        return found
    if node.op in ("Mul", "Div") and len(node.inputs) == 2:
        parts = [sources(t, depth - 1) for t in node.inputs]
        if any(p is None for p in parts):
            return None
        ndim = max(len(p[0].axes) for p in parts)
        found = []
        for part in parts:
            for s in part:
                pad = ndim - len(s.axes)
                axes = (None,) * pad + tuple(
                    a if a is not None and s.constant.values.shape[a] != 1 else None for a in s.axes)
                found.append(Source(s.constant, axes))
        return found
    if node.op in ("Reshape", "Unsqueeze", "Squeeze"):  # only adding or dropping unit axes (a bias made (1, C, 1, 1))
        found = sources(node.inputs[0], depth - 1)
        before, after = node.inputs[0].shape, tensor.shape
        if found is None or before is None or after is None:
            return None
        kept_before = [a for a, d in enumerate(before) if d != 1]
        kept_after = [a for a, d in enumerate(after) if d != 1]
        if [before[a] for a in kept_before] != [after[a] for a in kept_after]:
            return None
        where = dict(zip(kept_after, kept_before))
        return [Source(s.constant, tuple(s.axes[where[a]] if a in where else None for a in range(len(after))))
                for s in found]
    if node.op == "Transpose":
        found = sources(node.inputs[0], depth - 1)
        if found is None:
            return None
        perm = node.attrs.get("perm") or list(range(len(found[0].axes)))[::-1]
        return [Source(s.constant, tuple(s.axes[p] for p in perm)) for s in found]
    return None
