"""fold-batchnorm: fold inference BatchNormalization into the linear op in front of it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis import layout
from edgegraph.registry import register_pass

from .common import (
    WIDE_FLOATS, affordable, can_remove, GraphPass, is_standard, live_nodes, only_consumer, optional_input, remove,
    set_inputs, shape_of,
)


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(GraphPass):
    """Fold inference-mode BatchNormalization into a preceding Conv, ConvTranspose (grouped
    layouts included), Gemm (transB respected) or 2-D MatMul (+ constant Add).

    y = (x - mean) / sqrt(var + eps) * scale + bias is applied to the weights per output
    channel and to the bias, computed in float64. Only float32/float64 weights are rewritten:
    re-rounding float16 weights would move outputs by more than float rounding.
    """

    name = "fold-batchnorm"
    summary = "Fold BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        for bn in live_nodes(graph):
            if bn.op != "BatchNormalization" or not is_standard(bn):
                continue
            affine = bn_affine(bn)
            if affine is None:
                continue
            producer = ir.producer(bn.inputs[0])
            if producer is None or not is_standard(producer) or not only_consumer(bn.inputs[0], bn, graph):
                continue
            if not can_remove(graph, bn):
                continue
            fold = _FOLDERS.get(producer.op)
            if fold is not None and fold(self, graph, producer, bn, *affine):
                remove(graph, bn)
                done[producer.op] += 1
        return done

    # Each folder rewrites `node` so that its output already equals BN(output), or returns False
    # (also when the new weights would make the model bigger: the old ones are shared).

    def _conv(self, graph, node, bn, scale, shift):
        weight, bias, dtype = _weights(node)
        if weight is None or weight.ndim < 3:
            return False
        lay = layout.of(node, weight.ndim)
        if lay is None or scale.size != lay.output_channels(weight.shape):
            return False
        new_w = lay.scale_outputs(weight, scale)
        new_b = (bias if bias is not None else 0.0) * scale + shift
        new_w, new_b = new_w.astype(dtype), np.asarray(new_b, dtype=np.float64).astype(dtype)
        if not affordable(graph, node.inputs[1:] + bn.inputs[1:], [node, bn], [new_w, new_b]):
            return False
        self._set(node, new_w, new_b, dtype)
        return True

    def _gemm(self, graph, node, bn, scale, shift):
        weight = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.dtype not in WIDE_FLOATS or weight.ndim != 2:
            return False
        lay = layout.of(node, weight.ndim)
        columns = lay.output_channels(weight.shape)
        if scale.size != columns:
            return False
        beta = float(node.attrs.get("beta", 1.0))
        c_tensor = optional_input(node, 2)
        c = ir.constant_value(c_tensor) if c_tensor is not None else np.zeros(1, weight.dtype)
        # C must be a scalar or a row (N,) / (1, N); a per-row C would not stay a bias.
        if c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, columns):
            return False
        new_w = lay.scale_outputs(weight.astype(np.float64), scale)
        new_c = beta * c.astype(np.float64).reshape(-1) * scale + shift
        new_w, new_c = new_w.astype(weight.dtype), new_c.astype(weight.dtype)
        if not affordable(graph, node.inputs[1:] + bn.inputs[1:], [node, bn], [new_w, new_c]):
            return False
        base = node.outputs[0].name
        w = ir.const(self.names(f"{base}_bn_w"), new_w)
        b = ir.const(self.names(f"{base}_bn_b"), new_c)
        set_inputs(node, [node.inputs[0], w, b])
        node.attrs["beta"] = 1.0
        return True

    def _matmul(self, graph, node, bn, scale, shift):
        """MatMul(x, W) with x 2-D: BN over the columns; the shift becomes an Add (-> Gemm later)."""
        weight = ir.constant_value(node.inputs[1])
        rank = shape_of(node.inputs[0])
        if weight is None or weight.dtype not in WIDE_FLOATS or weight.ndim != 2 or rank is None or len(rank) != 2:
            return False
        if scale.size != weight.shape[1]:
            return False
        new_w = (weight.astype(np.float64) * scale[None, :]).astype(weight.dtype)
        if not affordable(graph, [node.inputs[1], *bn.inputs[1:]], [node, bn], [new_w, shift.astype(weight.dtype)]):
            return False
        node.inputs[1] = ir.const(self.names(f"{node.outputs[0].name}_bn_w"), new_w)
        out = node.outputs[0]
        scaled = gs.Variable(self.names(f"{out.name}_scaled"), dtype=out.dtype, shape=out.shape)
        node.outputs[0] = scaled
        add = gs.Node("Add", name=self.names(f"{node.name or out.name}_bn_add"),
                      inputs=[scaled, ir.const(self.names(f"{out.name}_bn_b"), shift.astype(weight.dtype))],
                      outputs=[out])
        graph.nodes.append(add)
        return True

    def _add(self, graph, node, bn, scale, shift):
        """MatMul(x, W) + b followed by BN: scale W and b."""
        if len(node.inputs) != 2:
            return False
        side = 0 if ir.constant_value(node.inputs[1]) is not None else 1  # the input computed by MatMul
        producer, bias = ir.producer(node.inputs[side]), ir.constant_value(node.inputs[1 - side])
        if (producer is None or producer.op != "MatMul" or not is_standard(producer) or bias is None
                or not only_consumer(node.inputs[side], node, graph)):
            return False
        weight = ir.constant_value(producer.inputs[1])
        rank = shape_of(producer.inputs[0])
        if weight is None or weight.dtype not in WIDE_FLOATS or weight.ndim != 2 or rank is None or len(rank) != 2:
            return False
        if scale.size != weight.shape[1] or bias.size not in (1, weight.shape[1]) or bias.ndim > 2:
            return False
        if bias.dtype != weight.dtype or (bias.ndim == 2 and bias.shape[0] != 1):
            return False
        new_w = (weight.astype(np.float64) * scale[None, :]).astype(weight.dtype)
        new_b = bias.astype(np.float64).reshape(-1) * scale + shift
        if not affordable(graph, [producer.inputs[1], node.inputs[1 - side], *bn.inputs[1:]], [producer, node, bn],
                          [new_w, new_b.astype(weight.dtype)]):
            return False
        producer.inputs[1] = ir.const(self.names(f"{producer.outputs[0].name}_bn_w"), new_w)
        node.inputs[1 - side] = ir.const(self.names(f"{node.outputs[0].name}_bn_b"), new_b.astype(weight.dtype))
        return True

    def _set(self, node: gs.Node, weight: np.ndarray, bias: np.ndarray, dtype) -> None:
        base = node.outputs[0].name
        w = ir.const(self.names(f"{base}_bn_w"), weight.astype(dtype))
        b = ir.const(self.names(f"{base}_bn_b"), np.asarray(bias, dtype=np.float64).astype(dtype))
        set_inputs(node, [node.inputs[0], w, b])


def bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel in float64 for an inference BatchNormalization, else None."""
    if int(bn.attrs.get("training_mode", 0)) or int(bn.attrs.get("spatial", 1)) != 1 or len(bn.inputs) < 5:
        return None
    if any(o.outputs for o in bn.outputs[1:]):
        return None
    params = [ir.constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None or p.dtype not in WIDE_FLOATS for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    if not gamma.size == beta.size == mean.size == var.size:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _weights(node: gs.Node):
    """(weight, bias or None) of a Conv/ConvTranspose as float64, plus their dtype; Nones when
    they are not float32/64 constants."""
    weight = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype not in WIDE_FLOATS:
        return None, None, None
    bias_t = optional_input(node, 2)
    bias = ir.constant_value(bias_t) if bias_t is not None else None
    if bias_t is not None and (bias is None or bias.dtype != weight.dtype):
        return None, None, None
    bias = None if bias is None else bias.astype(np.float64).reshape(-1)
    return weight.astype(np.float64), bias, weight.dtype


_FOLDERS = {
    "Conv": FoldBatchNorm._conv,
    "ConvTranspose": FoldBatchNorm._conv,
    "Gemm": FoldBatchNorm._gemm,
    "MatMul": FoldBatchNorm._matmul,
    "Add": FoldBatchNorm._add,
}
