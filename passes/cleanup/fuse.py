"""fuse-linear: absorb constant arithmetic and padding into Conv/ConvTranspose/Gemm, turn
MatMul + Add into Gemm, and collapse chains of constant arithmetic."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis import layout
from edgegraph.registry import register_pass

from .common import (
    WIDE_FLOATS, affordable, apply_first_rule, can_remove, dtype_of, GraphPass, int_list, is_read, is_standard,
    live_nodes, only_consumer, optional_input, remove, set_inputs, shape_of,
)

ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})


@register_pass
@dataclass(frozen=True)
class FuseLinear(GraphPass):
    """Fold constant per-channel Add/Sub/Mul/Div after Conv/ConvTranspose into weights and bias,
    zero Pad before Conv into the Conv's pads, MatMul(2-D x, W) + b into Gemm, a constant Add
    after Gemm into its bias, and chains like (x * a) * b or (x + a) - b into one op.

    Weights are only rewritten in float32/float64 (re-rounding float16 weights would move
    outputs by more than float rounding); the fused op is numerically the same computation up
    to float rounding.
    """

    name = "fuse-linear"
    summary = "Fold constant Add/Mul/Pad into Conv/Gemm weights, MatMul+Add -> Gemm, merge constant chains."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        opset = int(graph.opset or model.opset)
        for node in live_nodes(graph):
            if not is_standard(node) or not node.inputs or not node.outputs or not is_read(graph, node.outputs[0]):
                continue
            applied = apply_first_rule(_RULES.get(node.op, ()), self, graph, node, opset)
            if applied:
                done[applied] += 1
        return done

    # --- Conv / ConvTranspose followed by per-channel arithmetic --------------------------------

    def conv_arithmetic(self, graph, node, opset):
        """Conv(x) + c, Conv(x) - c, Conv(x) * c, Conv(x) / c with c per output channel."""
        if len(node.inputs) != 2:
            return None
        side = _variable_side(node)
        if side is None:
            return None
        conv = ir.producer(node.inputs[side])
        if conv is None or conv.op not in ("Conv", "ConvTranspose") or not is_standard(conv):
            return None
        if node.op in ("Sub", "Div") and side != 0:
            return None  # c - Conv(x) and c / Conv(x) are not affine in the weights
        if not only_consumer(conv.outputs[0], node, graph) or not can_remove(graph, node, side):
            return None
        const = ir.constant_value(node.inputs[1 - side])
        weight = ir.constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if const is None or weight is None or weight.dtype not in WIDE_FLOATS or const.dtype != weight.dtype:
            return None
        bias_t = optional_input(conv, 2)
        bias = ir.constant_value(bias_t) if bias_t is not None else None
        if bias_t is not None and (bias is None or bias.dtype != weight.dtype):
            return None
        lay = layout.of(conv, weight.ndim)
        if lay is None:
            return None
        channels = lay.output_channels(weight.shape)
        per_channel = layout.channel_vector(const, weight.ndim, channels)
        if per_channel is None:
            return None
        w64 = weight.astype(np.float64)
        b64 = np.zeros(channels) if bias is None else np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,))
        if node.op in ("Add", "Sub"):
            new_w, new_b = None, b64 + per_channel if node.op == "Add" else b64 - per_channel
        else:
            factor = per_channel if node.op == "Mul" else 1.0 / per_channel
            new_w, new_b = lay.scale_outputs(w64, factor), b64 * factor
        new_w = None if new_w is None else new_w.astype(weight.dtype)
        new_b = new_b.astype(weight.dtype)
        replaced = [bias_t, node.inputs[1 - side]] + ([] if new_w is None else [conv.inputs[1]])
        if not affordable(graph, replaced, [conv, node], [new_b] if new_w is None else [new_w, new_b]):
            return None  # the weights are shared with other nodes: a second copy would grow the model
        base = node.outputs[0].name
        w = conv.inputs[1] if new_w is None else ir.const(self.names(f"{base}_w"), new_w)
        set_inputs(conv, [conv.inputs[0], w, ir.const(self.names(f"{base}_b"), new_b)])
        remove(graph, node, side)
        return f"{conv.op}_{node.op}"

    # --- Pad before Conv -----------------------------------------------------------------------

    def pad_conv(self, graph, node, opset):
        """Conv(Pad(x, zeros on spatial axes)) -> Conv(x) with larger pads."""
        pad = ir.producer(node.inputs[0])
        if pad is None or pad.op != "Pad" or not is_standard(pad) or not only_consumer(pad.outputs[0], node, graph):
            return None
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        rank = len(weight.shape) if weight is not None and shape_of(weight) is not None else None
        pads, fill, mode = _pad_params(pad)
        if rank is None or pads is None or mode != "constant" or fill != 0 or len(pads) != 2 * rank:
            return None
        begin, end = pads[:rank], pads[rank:]
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(pads) < 0:
            return None
        spatial = rank - 2
        current = [int(p) for p in node.attrs.get("pads", [0] * 2 * spatial)]
        node.attrs["pads"] = [current[i] + begin[2 + i] for i in range(spatial)] + \
            [current[spatial + i] + end[2 + i] for i in range(spatial)]
        node.attrs.pop("auto_pad", None)
        node.inputs[0] = pad.inputs[0]
        return "Pad_Conv"

    # --- MatMul / Gemm + bias -------------------------------------------------------------------

    def matmul_add(self, graph, node, opset):
        """MatMul(x, W) + b with 2-D x and a bias per column -> Gemm(x, W, b)."""
        if opset < 7 or len(node.inputs) != 2:
            return None
        side = _variable_side(node)
        if side is None:
            return None
        matmul = ir.producer(node.inputs[side])
        if matmul is None or not is_standard(matmul) or matmul.op not in ("MatMul", "Gemm"):
            return None
        if not only_consumer(matmul.outputs[0], node, graph) or not can_remove(graph, node, side):
            return None
        bias = ir.constant_value(node.inputs[1 - side])
        out_shape = shape_of(matmul.outputs[0])
        dtype = dtype_of(matmul.outputs[0]) or (bias.dtype if bias is not None else None)
        if bias is None or dtype not in WIDE_FLOATS or bias.dtype != dtype or out_shape is None or len(out_shape) != 2:
            return None
        columns = out_shape[1]
        row = bias.reshape(-1) if bias.ndim <= 1 or bias.shape[0] == 1 else None
        if row is None or bias.ndim > 2 or row.size not in (1, columns) or not isinstance(columns, int):
            return None
        label = f"{matmul.op}_Add"
        if matmul.op == "MatMul":
            a_shape = shape_of(matmul.inputs[0])
            b_shape = shape_of(matmul.inputs[1])
            if a_shape is None or len(a_shape) != 2 or b_shape is None or len(b_shape) != 2:
                return None
            matmul.op, matmul.attrs = "Gemm", {}
            set_inputs(matmul, [matmul.inputs[0], matmul.inputs[1], node.inputs[1 - side]])
        else:  # Gemm + b: fold into C (beta scales only the old C)
            beta = float(matmul.attrs.get("beta", 1.0))
            c_t = optional_input(matmul, 2)
            c = ir.constant_value(c_t) if c_t is not None else np.zeros(1, dtype)
            if c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
                return None
            new_c = (beta * c.astype(np.float64).reshape(-1) + row.astype(np.float64)).astype(dtype)
            if not affordable(graph, [c_t, node.inputs[1 - side]], [matmul, node], [new_c]):
                return None
            set_inputs(matmul, [matmul.inputs[0], matmul.inputs[1],
                                ir.const(self.names(f"{node.outputs[0].name}_c"), new_c)])
            matmul.attrs["beta"] = 1.0
        remove(graph, node, side)
        return label

    # --- constant chains -----------------------------------------------------------------------

    def arithmetic_chain(self, graph, node, opset):
        """(x op1 a) op2 b -> x op (a . b) for Add/Sub and Mul/Div pairs."""
        if len(node.inputs) != 2:
            return None
        side = _variable_side(node)
        if side is None or (node.op in ("Sub", "Div") and side != 0):
            return None
        inner = ir.producer(node.inputs[side])
        if inner is None or inner.op not in ARITHMETIC or not is_standard(inner) or len(inner.inputs) != 2:
            return None
        inner_side = _variable_side(inner)
        if inner_side is None or (inner.op in ("Sub", "Div") and inner_side != 0):
            return None
        if not only_consumer(inner.outputs[0], node, graph):
            return None
        a, b = ir.constant_value(inner.inputs[1 - inner_side]), ir.constant_value(node.inputs[1 - side])
        if a is None or b is None or a.dtype != b.dtype or (a.dtype.kind == "f" and a.dtype not in WIDE_FLOATS):
            return None  # float16 would round differently after merging
        merged = _merge_constants(inner.op, a, node.op, b)
        if merged is None:
            return None
        op, const = merged
        if not affordable(graph, [inner.inputs[1 - inner_side], node.inputs[1 - side]], [inner, node], [const]):
            return None
        node.op = op
        set_inputs(node, [inner.inputs[inner_side], ir.const(self.names(f"{node.outputs[0].name}_c"), const)])
        return f"{inner.op}_{node.op}"


def _variable_side(node: gs.Node) -> int | None:
    """Index of the single non-constant input of a binary node."""
    consts = [ir.constant_value(t) is not None for t in node.inputs]
    if consts == [False, True]:
        return 0
    if consts == [True, False]:
        return 1
    return None


def _pad_params(pad: gs.Node) -> tuple[list[int] | None, float | None, str]:
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if "pads" in pad.attrs:  # opset < 11
        return [int(p) for p in pad.attrs["pads"]], float(pad.attrs.get("value", 0.0)), mode
    if optional_input(pad, 3) is not None:  # opset 18 axes: rare, left alone
        return None, None, mode
    pads = int_list(optional_input(pad, 1))
    fill_t = optional_input(pad, 2)
    fill = ir.constant_value(fill_t) if fill_t is not None else np.zeros(1)
    if fill is None or fill.size != 1:
        return pads, None, mode
    return pads, float(fill.reshape(-1)[0]), mode


def _merge_constants(op1: str, a: np.ndarray, op2: str, b: np.ndarray) -> tuple[str, np.ndarray] | None:
    """(x op1 a) op2 b == x op c: returns (op, c), computed in float64 for floats."""
    floating = a.dtype.kind == "f"
    if not floating and a.dtype.kind not in "iu":
        return None
    additive, multiplicative = {"Add", "Sub"}, {"Mul", "Div"}
    if {op1, op2} <= additive:
        sa = a.astype(np.float64) if floating else a
        sb = b.astype(np.float64) if floating else b
        total = (sa if op1 == "Add" else -sa) + (sb if op2 == "Add" else -sb)
        return "Add", np.asarray(total).astype(a.dtype)
    if {op1, op2} <= multiplicative:
        if not floating and "Div" in (op1, op2):
            return None  # integer division truncates: not associative
        sa, sb = a.astype(np.float64), b.astype(np.float64)
        if op1 == "Mul" and op2 == "Mul":
            return "Mul", (sa * sb).astype(a.dtype) if floating else a * b
        if not np.all(np.isfinite(sa)) or not np.all(np.isfinite(sb)) or np.any(sa == 0) or np.any(sb == 0):
            return None
        if op1 == "Div" and op2 == "Div":
            return "Div", (sa * sb).astype(a.dtype)
        numerator, denominator = (sb, sa) if op1 == "Div" else (sa, sb)
        return "Mul", (numerator / denominator).astype(a.dtype)
    return None


_RULES = {
    "Add": (FuseLinear.conv_arithmetic, FuseLinear.matmul_add, FuseLinear.arithmetic_chain),
    "Sub": (FuseLinear.conv_arithmetic, FuseLinear.arithmetic_chain),
    "Mul": (FuseLinear.conv_arithmetic, FuseLinear.arithmetic_chain),
    "Div": (FuseLinear.conv_arithmetic, FuseLinear.arithmetic_chain),
    "Conv": (FuseLinear.pad_conv,),
}
