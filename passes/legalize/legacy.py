"""Deprecated ops (Upsample) and the experimental ops opset 1-9 exporters wrote (ImageScaler,
Crop, Affine: candy.onnx) rewritten into the ops that replaced them."""

from __future__ import annotations

import numpy as np

from edgegraph import ir

from ..cleanup.common import shape_of
from .rules import Emit, NoMatch, float_input, rank_of, rewrites

_MAX_INT = np.iinfo(np.int64).max


@rewrites("Upsample")
def upsample(owner, graph, node, opset):
    """Upsample (opsets 7-9; deprecated from 10, where Resize replaces it) as onnxruntime
    computes it: output o of a scaled axis reads input position p = min(o / scale, n - 1)
    (asymmetric), nearest takes floor(p), linear mixes floor(p) and the next (clamped) by the
    fraction of p. Each scaled axis (static size, constant scales) is a Gather at constant
    positions (linear: two, mixed by constant weights).

    Upsample -> Resize is the opset conversion (`legalize(opset=11)`: onnx's converter plus
    quant's fix that keeps the asymmetric coordinates Resize does not default to).
    """
    mode = node.attrs.get("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("nearest", "linear", "bilinear"):
        return NoMatch(f"mode {mode!r}")
    mode = "linear" if mode == "bilinear" else mode
    scales = node.attrs.get("scales")
    if scales is None and len(node.inputs) > 1:
        constant = ir.constant_value(node.inputs[1])
        scales = None if constant is None else [float(s) for s in constant.reshape(-1)]
    return _upsample_by_gathering(owner, graph, node, opset, mode, scales)


def _upsample_by_gathering(owner, graph, node, opset, mode, scales):
    """Upsample as onnxruntime computes it, one scaled axis at a time, with constant indices:
    input position p = min(o / scale, n - 1) of output o; nearest takes floor(p), linear
    mixes floor(p) and the next (clamped) by the fraction of p."""
    shape = shape_of(node.inputs[0])
    if scales is None or shape is None or len(scales) != len(shape):
        return NoMatch("needs constant scales and a known rank")
    axes = [axis for axis, s in enumerate(scales) if s != 1.0]
    if any(not isinstance(shape[axis], int) for axis in axes):
        return NoMatch("the size of a scaled axis is not static")
    if any(scales[axis] < 1.0 for axis in axes):
        return NoMatch(f"scales {scales} shrink an axis")
    dtype = None
    if mode == "linear":
        dtype = float_input(node)
        if isinstance(dtype, NoMatch):
            return dtype
    e = Emit(owner, graph, node, dtype, opset)
    y = e.take()[0]
    for count, axis in enumerate(axes, 1):
        size = shape[axis]
        wanted = int(np.floor(size * scales[axis]))
        position = np.minimum(np.arange(wanted, dtype=np.float32) / np.float32(scales[axis]), np.float32(size - 1))
        low = position.astype(np.int64)
        out = e.outputs[0] if count == len(axes) else None
        if mode == "nearest":
            y = e("Gather", y, e.ints(low), axis=axis, out=out)
            continue
        high = np.minimum(low + 1, size - 1)
        # weights shaped to broadcast along `axis` (rank - axis - 1 trailing ones)
        fraction = (position - low).astype(dtype).reshape([-1] + [1] * (len(shape) - axis - 1))
        below = e("Mul", e("Gather", y, e.ints(low), axis=axis), e.const((1 - fraction).astype(dtype)))
        above = e("Mul", e("Gather", y, e.ints(high), axis=axis), e.const(fraction))
        y = e("Add", below, above, out=out)
    if not axes:
        e("Identity", y, out=e.outputs[0])
    return f"Upsample({mode})->Gather" + ("/Mul/Add" if mode == "linear" else "")


@rewrites("ImageScaler")
def image_scaler(owner, graph, node, opset):
    """ImageScaler(x) = x * scale + bias[c] (bias per channel, NCHW)."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    rank = rank_of(node.inputs[0])
    if rank is None or rank < 2:
        return NoMatch("the input's rank is unknown or below 2")
    bias = np.asarray(node.attrs.get("bias", [0.0]), dtype).reshape([1, -1] + [1] * (rank - 2))
    e = Emit(owner, graph, node, dtype, opset)
    x = e.take()[0]
    e("Add", e("Mul", x, float(node.attrs.get("scale", 1.0))), e.const(bias), out=e.outputs[0])
    return "ImageScaler->Mul/Add"


@rewrites("Affine")
def affine(owner, graph, node, opset):
    """Affine(x) = alpha * x + beta."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    e = Emit(owner, graph, node, dtype, opset)
    x = e.take()[0]
    e("Add", e("Mul", x, float(node.attrs.get("alpha", 1.0))), float(node.attrs.get("beta", 0.0)), out=e.outputs[0])
    return "Affine->Mul/Add"


@rewrites("Crop")
def crop(owner, graph, node, opset):
    """Crop(x, border=[left, top, right, bottom], scale=[height, width]) = a Slice of H and W:
    from (top, left), `scale` in size when given, else up to `bottom`/`right` from the end."""
    border = [int(b) for b in node.attrs.get("border", [])]
    if len(border) != 4 or min(border) < 0:
        return NoMatch(f"border {border} is not 4 non-negative values")
    rank = rank_of(node.inputs[0])
    if rank not in (None, 4):  # (Crop is defined on NCHW; onnx infers no shapes through it)
        return NoMatch("needs a 4-D (NCHW) input")
    left, top, right, bottom = border
    scale = [int(s) for s in node.attrs.get("scale", [])]
    if scale and len(scale) != 2:
        return NoMatch(f"scale {scale} is not [height, width]")
    if scale:
        ends = [top + scale[0], left + scale[1]]
    else:
        ends = [-bottom if bottom else _MAX_INT, -right if right else _MAX_INT]
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    e.slice(x, [top, left], ends, [2, 3], out=e.outputs[0])
    return "Crop->Slice"
