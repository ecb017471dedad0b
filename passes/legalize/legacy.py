"""Deprecated ops (Upsample) and the experimental ops opset 1-9 exporters wrote (ImageScaler,
Crop, Affine: candy.onnx) rewritten into the ops that replaced them."""

from __future__ import annotations

import numpy as np

from ..cleanup.common import value
from .rules import Emit, NoMatch, float_input, rank_of, rewrites, static_shape

_MAX_INT = np.iinfo(np.int64).max


@rewrites("Upsample")
def upsample(owner, graph, node, opset):
    """Upsample maps output x to input x / scale (asymmetric), nearest rounding down.

    Opset >= 11: Resize with coordinate_transformation_mode=asymmetric (and nearest_mode=floor),
    which Resize's default half_pixel is not. Opset 10: Resize-10, asymmetric by definition.
    Before opset 10 there is no Resize: nearest upsampling by whole factors of a static shape is
    spelled Reshape/Tile/Reshape; anything else needs the opset raised first (legalize(opset=13)).
    """
    mode = node.attrs.get("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("nearest", "linear", "bilinear"):
        return NoMatch(f"mode {mode!r}")
    mode = "linear" if mode == "bilinear" else mode
    scales = node.attrs.get("scales")
    scales_tensor = node.inputs[1] if len(node.inputs) > 1 else None
    if scales is None and scales_tensor is not None:
        constant = value(scales_tensor)
        scales = None if constant is None else [float(s) for s in constant.reshape(-1)]
    if scales is None and scales_tensor is None:
        return NoMatch("no scales")
    if opset < 10:
        return _upsample_by_tiling(owner, graph, node, opset, mode, scales)
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    scales_in = e.const(np.asarray(scales, np.float32)) if scales_tensor is None else scales_tensor
    if opset == 10:
        e("Resize", x, scales_in, mode=mode, out=e.outputs[0])
    else:
        roi = None if opset >= 13 else e.const(np.zeros(0, np.float32))
        extra = {"nearest_mode": "floor"} if mode == "nearest" else {}
        e("Resize", x, roi, scales_in, mode=mode, coordinate_transformation_mode="asymmetric", **extra,
          out=e.outputs[0])
    return f"Upsample({mode})->Resize"


def _upsample_by_tiling(owner, graph, node, opset, mode, scales):
    if mode != "nearest":
        return NoMatch(f"{mode} Upsample before opset 10 (no Resize): raise the opset first, e.g. legalize(opset=13)")
    shape = static_shape(node.inputs[0])
    if scales is None or shape is None or len(scales) != len(shape):
        return NoMatch("before opset 10 this needs constant scales and a static input shape")
    factors = [int(s) for s in scales]
    if any(f != s or f < 1 for f, s in zip(factors, scales)):
        return NoMatch(f"scales {scales} are not whole numbers (before opset 10 there is no Resize)")
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    # (d0, d1, ...) -> (d0, 1, d1, 1, ...) -> tiled (d0, f0, d1, f1, ...) -> (d0 f0, d1 f1, ...)
    spread = e("Reshape", x, e.ints([v for d in shape for v in (d, 1)]))
    tiled = e("Tile", spread, e.ints([v for f in factors for v in (1, f)]))
    e("Reshape", tiled, e.ints([d * f for d, f in zip(shape, factors)]), out=e.outputs[0])
    return "Upsample(nearest)->Reshape/Tile"


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
    if rank != 4:
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
