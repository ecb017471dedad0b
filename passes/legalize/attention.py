"""Attention (opset 23+) spelled out: MatMul, Softmax, MatMul, as the op's definition does."""

from __future__ import annotations

import numpy as np

from ..cleanup.common import dtype_of, optional_input, shape_of
from .rules import Emit, NoMatch, float_input, rewrites

_ONNX_TYPE = {np.dtype(np.float16): 10, np.dtype(np.float32): 1, np.dtype(np.float64): 11}


@rewrites("Attention")
def attention(owner, graph, node, opset):
    """softmax((Q sqrt(scale)) (K sqrt(scale))^T, softcapped, + bias) V, per head, with:

    3-D inputs split into heads (q_num_heads / kv_num_heads) and merged back; past_key /
    past_value concatenated in front (present_* outputs); grouped-query attention repeating
    each KV head; a causal bias aligned bottom-right (query i sees key j <= i + past length);
    a boolean mask as 0 / -inf; a mask shorter than the keys padded with -inf; rows that see no
    key give 0 (not NaN); qk_matmul_output for modes 0-3; softmax_precision by Casts.
    Needs static shapes (sequence lengths and head sizes).
    """
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    if optional_input(node, 6) is not None or len(node.inputs) > 7:
        return NoMatch("nonpad_kv_seqlen (external KV cache) is not handled")
    if any(k in node.attrs for k in ("left_window_size", "right_window_size")):
        return NoMatch("sliding windows are not handled")
    q, k, v = (node.inputs[i] for i in range(3))
    mask, past_k, past_v = (optional_input(node, i) for i in (3, 4, 5))
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or not all(isinstance(d, int) for d in s[1:]) for s in shapes):
        return NoMatch("needs static shapes for Q, K and V (batch aside)")
    rank = len(shapes[0])
    if rank not in (3, 4) or any(len(s) != rank for s in shapes):
        return NoMatch("Q, K and V must all be 3-D or all 4-D")
    if (past_k is None) != (past_v is None):
        return NoMatch("past_key without past_value")
    if rank == 3:
        heads_q, heads_kv = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
        if heads_q is None or heads_kv is None:
            return NoMatch("3-D inputs without q_num_heads / kv_num_heads")
        heads_q, heads_kv = int(heads_q), int(heads_kv)
        seq_q, head = shapes[0][1], shapes[0][2] // heads_q
        seq_new, head_v = shapes[1][1], shapes[2][2] // heads_kv
    else:
        heads_q, seq_q, head = shapes[0][1:]
        heads_kv, seq_new = shapes[1][1:3]
        head_v = shapes[2][3]
    past = 0
    if past_k is not None:
        past_shape = shape_of(past_k)
        if past_shape is None or not isinstance(past_shape[2], int):
            return NoMatch("the past length is not static")
        past = past_shape[2]
    seq_kv = past + seq_new
    if heads_q % heads_kv:
        return NoMatch(f"{heads_q} query heads are no multiple of {heads_kv} KV heads")
    mask_shape = shape_of(mask) if mask is not None else None
    if mask is not None and (mask_shape is None or not isinstance(mask_shape[-1], int) or mask_shape[-1] > seq_kv):
        return NoMatch("the mask's key length is not static, or longer than the keys")
    mask_bool = mask is not None and dtype_of(mask) == np.dtype(bool)
    if mask is not None and not mask_bool and dtype_of(mask) != dtype:
        return NoMatch("the mask is neither bool nor the inputs' float type")
    mode = int(node.attrs.get("qk_matmul_output_mode", 0))
    if len(node.outputs) > 3 and node.outputs[3].name and mode not in (0, 1, 2, 3):
        return NoMatch(f"qk_matmul_output_mode {mode}")
    precision = node.attrs.get("softmax_precision")
    softcap = float(node.attrs.get("softcap", 0.0))
    causal = bool(node.attrs.get("is_causal", 0))
    scale = node.attrs.get("scale")
    scale = 1 / np.sqrt(head) if scale is None else float(scale)

    e = Emit(owner, graph, node, dtype, opset)
    inputs = e.take()
    q, k, v = inputs[:3]
    outputs = e.outputs + [None] * (4 - len(e.outputs))
    wanted = [o if o is not None and o.name else None for o in outputs]
    if rank == 3:  # (B, S, H*D) -> (B, H, S, D)
        q = e("Transpose", e("Reshape", q, e.ints([0, 0, heads_q, head])), perm=[0, 2, 1, 3])
        k = e("Transpose", e("Reshape", k, e.ints([0, 0, heads_kv, head])), perm=[0, 2, 1, 3])
        v = e("Transpose", e("Reshape", v, e.ints([0, 0, heads_kv, head_v])), perm=[0, 2, 1, 3])
    if past_k is not None:
        k = e("Concat", past_k, k, axis=2, out=wanted[1])
        v = e("Concat", past_v, v, axis=2, out=wanted[2])
    else:
        if wanted[1] is not None:
            e("Identity", k, out=wanted[1])
        if wanted[2] is not None:
            e("Identity", v, out=wanted[2])
    if heads_q != heads_kv:  # each KV head serves heads_q / heads_kv consecutive query heads
        group = heads_q // heads_kv

        def repeat(t, size):
            wide = e("Expand", e.unsqueeze(t, [2]), e.ints([1, 1, group, 1, 1]))
            return e("Reshape", wide, e.ints([0, heads_q, seq_kv, size]))

        k, v = repeat(k, head), repeat(v, head_v)
    root = float(np.sqrt(scale))
    scores = e("MatMul", e("Mul", q, root), e("Transpose", e("Mul", k, root), perm=[0, 1, 3, 2]))
    if softcap > 0:
        scores = e("Mul", e("Tanh", e("Div", scores, softcap)), softcap)
    raw = scores
    # The additive bias: the mask (bool as 0 / -inf; padded with -inf to the key length), plus
    # the causal bias. A constant part is made here; a fully masked row is found on it.
    bias, constant_bias = None, None
    if causal:
        i = np.arange(seq_q).reshape(-1, 1)
        j = np.arange(seq_kv).reshape(1, -1)
        constant_bias = np.where(j <= i + past, 0.0, -np.inf).astype(dtype)
        bias = e.const(constant_bias)
    if mask is not None:
        m = inputs[3]
        if mask_bool:
            m = e("Where", m, 0.0, -np.inf)
        if mask_shape[-1] < seq_kv:
            pad = [0] * (2 * len(mask_shape))
            pad[2 * len(mask_shape) - 1] = seq_kv - mask_shape[-1]
            m = e("Pad", m, e.ints(pad), -np.inf)
        bias = m if bias is None else e("Add", m, bias)
    if bias is not None:
        scores = e("Add", scores, bias)
    with_bias = scores
    computing = dtype
    if precision is not None and int(precision) != _ONNX_TYPE.get(dtype):
        scores = e("Cast", scores, to=int(precision))
        computing = None
    probabilities = e("Softmax", scores, axis=-1)
    if computing is None:
        probabilities = e("Cast", probabilities, to=_ONNX_TYPE[dtype])
    if bias is not None and (mask is not None or np.isneginf(constant_bias.max(axis=-1)).any()):
        # A row that sees no key softmaxes to 0 (Softmax alone gives NaN): decided on the bias.
        unseen = e("IsInf", e.reduce("ReduceMax", bias, [-1]), detect_positive=0)
        probabilities = e("Where", unseen, 0.0, probabilities)
    if wanted[3] is not None:
        exposed = {0: raw, 1: raw, 2: with_bias, 3: probabilities}[mode]
        e("Identity", exposed, out=wanted[3])
    y = e("MatMul", probabilities, v, out=None if rank == 3 else e.outputs[0])
    if rank == 3:
        e("Reshape", e("Transpose", y, perm=[0, 2, 1, 3]), e.ints([0, 0, heads_q * head_v]), out=e.outputs[0])
    return "Attention->MatMul/Softmax/MatMul"
