"""ConvTranspose for targets without it (NNAPI: PP-OCR det, AGLLNet, candy), as a Conv, a
DepthToSpace and a Slice ("sub-pixel convolution")."""

from __future__ import annotations

import math

import numpy as np

from edgegraph import ir

from ..cleanup.common import optional_input, shape_of
from .rules import Emit, NoMatch, float_input, rank_of, rewrites

_MAX_INT = np.iinfo(np.int64).max


@rewrites("ConvTranspose")
def conv_transpose(owner, graph, node, opset):
    """2-D ConvTranspose with strides s, kernel K, group 1, dilation 1:

    output position q = m s + r (before cropping the pads) sums x[m - j] W[j s + r], so each of
    the s*s phases r is a stride-1 correlation of x with the kernel taps j s + r, flipped. One
    Conv makes all phases as s*s*C_out channels (phase-major, what DepthToSpace DCR interleaves),
    padded so every output position exists; a Slice then drops `pads` (and what is beyond the
    output size) from each end. Strides that differ per axis interleave the phases with
    Reshape/Transpose instead (rank 6; needs a static input shape).
    """
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    weight = ir.constant_value(node.inputs[1])
    if weight is None or weight.ndim != 4:
        return NoMatch("needs a constant 4-D weight (2-D ConvTranspose)")
    if rank_of(node.inputs[0]) not in (None, 4):
        return NoMatch("needs a 4-D input")
    bias_t = optional_input(node, 2)
    bias = None if bias_t is None else ir.constant_value(bias_t)
    if bias_t is not None and bias is None:
        return NoMatch("the bias is not constant")
    attrs = node.attrs
    if int(attrs.get("group", 1)) != 1 or any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
        return NoMatch("group or dilations other than 1")
    strides = [int(v) for v in attrs.get("strides", [1, 1])]
    c_in, c_out, kh, kw = weight.shape
    kernel = (kh, kw)
    extra = [int(p) for p in attrs.get("output_padding", [0, 0])]
    shape = shape_of(node.inputs[0])
    if shape is not None and not all(isinstance(d, int) for d in shape[2:]):
        shape = None  # (only the spatial sizes matter: candy's batch is dynamic)
    pads = _pads(attrs, strides, kernel, extra, shape)
    if isinstance(pads, NoMatch):
        return pads
    if min(pads[:2]) < 0 or min(extra) < 0 or any(o >= st for o, st in zip(extra, strides)):
        return NoMatch(f"pads {pads} / output_padding {extra} out of range")
    # Right pads R: the output ends at q = (L - 1) s + K - p_end + output_padding; the phases
    # reach (L + R) s.
    taps = [math.ceil(k / st) for k, st in zip(kernel, strides)]  # J: kernel taps per phase
    right = [max(taps[a], math.ceil((kernel[a] - pads[2 + a] + extra[a] - strides[a]) / strides[a])) for a in (0, 1)]
    square = strides[0] == strides[1]
    if not square and shape is None:
        return NoMatch(f"strides {strides} differ per axis and the input shape is not static (for the Reshape)")
    sh, sw = strides
    # V[(rh, rw, o), c, th, tw] = W[c, o, (Jh - 1 - th) sh + rh, (Jw - 1 - tw) sw + rw] (0 past the kernel)
    phased = np.zeros((sh, sw, c_out, c_in, taps[0], taps[1]), weight.dtype)
    for rh in range(sh):
        for rw in range(sw):
            for th in range(taps[0]):
                for tw in range(taps[1]):
                    i, j = (taps[0] - 1 - th) * sh + rh, (taps[1] - 1 - tw) * sw + rw
                    if i < kh and j < kw:
                        phased[rh, rw, :, :, th, tw] = weight[:, :, i, j].T
    phased = phased.reshape(sh * sw * c_out, c_in, taps[0], taps[1])
    ends = []
    for a in (0, 1):
        offset = kernel[a] - pads[2 + a] + extra[a] - strides[a] - right[a] * strides[a]  # <= 0: from the end
        ends.append(offset if offset < 0 else _MAX_INT)
    e = Emit(owner, graph, node, dtype, opset)
    x = e.take()[0]
    conv_bias = [] if bias is None else [e.const(np.tile(bias, sh * sw).astype(bias.dtype))]
    y = e("Conv", x, e.const(phased), *conv_bias, kernel_shape=taps,
          pads=[taps[0] - 1, taps[1] - 1, right[0], right[1]])
    if square and sh > 1:
        y = e("DepthToSpace", y, blocksize=sh, **({"mode": "DCR"} if opset >= 11 else {}))
    elif not square:  # phases (rh, rw) interleaved by hand: (N, sh, sw, C, H', W') -> (N, C, H' sh, W' sw)
        height, width = shape[2] + right[0], shape[3] + right[1]
        split = e("Reshape", y, e.ints([0, sh, sw, c_out, height, width]))
        y = e("Reshape", e("Transpose", split, perm=[0, 3, 4, 1, 5, 2]), e.ints([0, c_out, height * sh, width * sw]))
    if pads[:2] == [0, 0] and ends == [_MAX_INT, _MAX_INT]:
        e("Identity", y, out=e.outputs[0])
    else:
        e.slice(y, pads[:2], ends, [2, 3], out=e.outputs[0])
    return "ConvTranspose->Conv/DepthToSpace/Slice"


def _pads(attrs, strides, kernel, extra, shape) -> list[int] | NoMatch:
    """[begin_h, begin_w, end_h, end_w] as onnxruntime derives them. With `output_shape` (or
    auto_pad SAME_*: output = input * stride) the natural size s (L - 1) + output_padding + K
    is cut by total = natural - output: SAME_UPPER cuts total // 2 at the start, the other modes
    total - total // 2; an output larger than natural extends the end (a negative end pad)."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if "output_shape" not in attrs and auto_pad in ("NOTSET", "VALID"):
        return [int(p) for p in attrs.get("pads", [0, 0, 0, 0])] if auto_pad == "NOTSET" else [0] * 4
    if shape is None:
        return NoMatch("output_shape or auto_pad SAME_* needs static spatial sizes")
    size = shape[2:]
    wanted = [int(v) for v in attrs["output_shape"]][-2:] if "output_shape" in attrs else [n * st for n, st in zip(size, strides)]
    begin, end = [], []
    for n, st, k, o, out in zip(size, strides, kernel, extra, wanted):
        total = st * (n - 1) + o + k - out
        if total <= 0:
            first = 0
        else:
            first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(first)
        end.append(total - first)
    return begin + end
