"""Integer types and the arithmetic of ONNX QuantizeLinear / DequantizeLinear, in numpy.

Everything the quantization passes compute offline (weights, biases, fake-quantized activations
for sensitivity analysis) goes through these functions so that it matches, bit for bit, what
onnxruntime does at run time:

    QuantizeLinear:   q = saturate(round_half_to_even(x / scale) + zero_point)
    DequantizeLinear: x = (q - zero_point) * scale

`scale` / `zero_point` are scalars (per tensor), 1-D along `axis` (per channel), or, with
`block_size`, the input's shape with `axis` shrunk to ceil(dim / block_size) (blocked, opset 21).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from edgegraph import verify
from edgegraph.errors import PassOptionError


@dataclass(frozen=True)
class QType:
    """An integer type Q/DQ can use: its range, numpy storage dtype and ONNX element type."""

    name: str
    qmin: int
    qmax: int
    dtype: np.dtype  # numpy dtype of the stored tensor (ml_dtypes int4/uint4 for 4-bit)
    onnx_type: int  # TensorProto.DataType
    min_opset: int  # first ai.onnx opset whose QuantizeLinear/DequantizeLinear accept the type

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return int(np.log2(self.qmax - self.qmin + 1))

    @property
    def symmetric_max(self) -> int:
        """Largest magnitude of the restricted symmetric range (127 for int8: -127..127)."""
        return self.qmax if self.signed else (self.qmax - self.qmin) // 2

    def __str__(self) -> str:
        return self.name


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("int8", -128, 127, np.dtype(np.int8), TensorProto.INT8, 10),
        QType("uint8", 0, 255, np.dtype(np.uint8), TensorProto.UINT8, 10),
        QType("int16", -32768, 32767, np.dtype(np.int16), TensorProto.INT16, 21),
        QType("uint16", 0, 65535, np.dtype(np.uint16), TensorProto.UINT16, 21),
        QType("int4", -8, 7, np.dtype(ml_dtypes.int4), TensorProto.INT4, 21),
        QType("uint4", 0, 15, np.dtype(ml_dtypes.uint4), TensorProto.UINT4, 21),
    )
}


def qtype(name: str | QType) -> QType:
    """The QType called `name` (int8, uint8, int16, uint16, int4, uint4)."""
    if isinstance(name, QType):
        return name
    found = QTYPES.get(str(name).lower())
    if found is None:
        raise PassOptionError(f"unknown quantized type '{name}' (choose from {', '.join(QTYPES)})")
    return found


# Scales below this would make x / scale overflow or turn denormal; such ranges are treated as empty.
_TINY_SCALE = float(np.finfo(np.float32).tiny) * 2**10


def scale_zero_point(lo, hi, qt: str | QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (qt.dtype) mapping the real range [lo, hi] onto qt.

    `lo`/`hi` are scalars or per-channel arrays. The range is widened to include 0 so that 0 is
    exactly representable (zero padding, ReLU outputs). Symmetric ranges use zero point 0 for
    signed types (restricted range, e.g. -127..127 for int8) and the mid code for unsigned ones.
    An empty range (lo == hi == 0) gets scale 1 so nothing divides by zero.
    """
    qt = qtype(qt)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(-lo, hi)
        if qt.signed:
            scale = absmax / qt.symmetric_max
            zero_point = np.zeros_like(scale)
        else:
            scale = absmax / ((qt.qmax - qt.qmin) / 2)
            zero_point = np.full_like(scale, (qt.qmin + qt.qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qt.qmax - qt.qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.clip(np.rint(qt.qmin - lo / scale), qt.qmin, qt.qmax)
    empty = ~(scale >= _TINY_SCALE)  # also catches NaN
    scale = np.where(empty, 1.0, scale).astype(np.float32)
    if not qt.signed and symmetric:
        zero_point = np.where(empty, (qt.qmin + qt.qmax + 1) // 2, zero_point)
    else:
        zero_point = np.where(empty, 0 if qt.signed else qt.qmin, zero_point)
    return scale, np.asarray(zero_point).astype(qt.dtype)


def weight_scale_zero_point(w: np.ndarray, qt: str | QType, axis: int | None, symmetric: bool = True,
                            block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for a weight tensor from its own min/max.

    axis=None: one pair for the tensor. axis=k: one pair per index of axis k (a 1-D array, the
    layout DequantizeLinear's `axis` attribute expects). axis=k with block_size=B: blocks of B
    consecutive elements along axis k; the result has w's shape with axis k of ceil(dim / B).
    """
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        if block_size is not None:
            raise ValueError("blocked quantization needs an axis")
        return scale_zero_point(w.min(initial=0.0), w.max(initial=0.0), qt, symmetric)
    axis = axis % w.ndim
    if block_size is None:
        others = tuple(i for i in range(w.ndim) if i != axis)
        return scale_zero_point(w.min(axis=others, initial=0.0), w.max(axis=others, initial=0.0), qt, symmetric)
    blocks = _blocked_view(w, axis, block_size)  # (..., n_blocks, block_size, ...)
    return scale_zero_point(blocks.min(axis=axis + 1), blocks.max(axis=axis + 1), qt, symmetric)


def _blocked_view(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """w padded with zeros along `axis` to a multiple of block_size and split into (blocks, block_size)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    dim = w.shape[axis]
    n_blocks = -(-dim // block_size)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, n_blocks * block_size - dim)
    padded = np.pad(w, pad)
    return padded.reshape(w.shape[:axis] + (n_blocks, block_size) + w.shape[axis + 1:])


def broadcast_param(param: np.ndarray, shape: tuple[int, ...], axis: int | None = None,
                    block_size: int | None = None) -> np.ndarray:
    """Expand a scale / zero point to broadcast against a tensor of `shape`, as Q/DQ do."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1 and axis is None:
        return param.reshape(())
    if axis is None:
        raise ValueError("a non-scalar scale needs an axis")
    axis = axis % len(shape)
    if block_size:
        return np.repeat(param, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    return param.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def quantize(x: np.ndarray, scale, zero_point, qt: str | QType, axis: int | None = None,
             block_size: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point), as qt.dtype."""
    qt = qtype(qt)
    x = np.asarray(x, dtype=np.float32)
    scale = broadcast_param(np.asarray(scale, dtype=np.float32), x.shape, axis, block_size)
    zero_point = broadcast_param(np.asarray(zero_point).astype(np.int64), x.shape, axis, block_size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(x / scale) + zero_point
    q = np.nan_to_num(q, nan=0.0)  # NaN inputs: ORT yields the zero point's neighbourhood; keep finite
    return np.clip(q, qt.qmin, qt.qmax).astype(qt.dtype)


def dequantize(q: np.ndarray, scale, zero_point, qt: str | QType | None = None, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in the dtype of `scale` (float32 by default)."""
    q = np.asarray(q)
    scale = np.asarray(scale)
    out_dtype = scale.dtype if scale.dtype.kind == "f" else np.float32
    scale = broadcast_param(scale.astype(np.float32), q.shape, axis, block_size)
    zero_point = broadcast_param(np.asarray(zero_point).astype(np.int32), q.shape, axis, block_size)
    return ((q.astype(np.int32) - zero_point).astype(np.float32) * scale).astype(out_dtype)


def fake_quantize(x: np.ndarray, scale, zero_point, qt: str | QType, axis: int | None = None,
                  block_size: int | None = None) -> np.ndarray:
    """dequantize(quantize(x)): the value a Q->DQ pair hands to the next op."""
    return dequantize(quantize(x, scale, zero_point, qt, axis, block_size), scale, zero_point, qt, axis, block_size)


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale input_scale * weight_scale (per output channel), zero point 0.

    This is the layout ORT's QLinearConv / QGemm fusions require. Returns (q int32, scale float32).
    Values beyond int32 saturate (only happens for absurdly small scales).
    """
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32), scale


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((np.asarray(approximation, dtype=np.float64) - ref) ** 2))
    return verify.sqnr_db(float(np.sum(ref**2)), noise)


__all__ = [
    "QType", "QTYPES", "qtype", "scale_zero_point", "weight_scale_zero_point", "broadcast_param", "quantize",
    "dequantize", "fake_quantize", "quantize_bias", "sqnr_db",
]
