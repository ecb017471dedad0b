"""`quant-dynamic`: int8 weights offline, activations quantized at run time; no calibration data.

Each MatMul / Gemm with a constant weight becomes the standard ONNX dynamic-quantization
pattern, the one onnxruntime's CPU provider fuses into its fast kernels
(DynamicQuantizeMatMul, or MatMulIntegerToFloat when several layers read the same input):

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zero_point)      [one per input tensor]
    MatMulInteger(x_q, W_q int8, x_zero_point, W_zero_point) -> Cast(float)
      * (x_scale * W_scale) [+ bias]

Weights get one scale per output column by default (per-tensor, onnxruntime's default, loses
much more on transformers whose columns differ in range). Embedding tables read by Gather are
stored as int8 with one scale per row, dequantized after the lookup so only the gathered rows
are converted. Convolutions are not handled: onnxruntime's ConvInteger is no faster than a
float Conv on CPU; use the static `quant` pass for CNNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.context import PassContext
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.registry import register_pass
from edgegraph.passes.quant import numerics as nq
from edgegraph.passes.quant.names import warn_unmatched
from edgegraph.passes.quant.linear import Embedding, Linear, detach, embedding_layers, linear_layers

DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")
# DynamicQuantizeLinear appeared in opset 11.
MIN_OPSET = 11
# Largest int8 weight magnitude with reduce_range: 255 * 63 * 2 stays below the int16 limit 32767.
REDUCED_MAX = 63


@register_pass
@dataclass(frozen=True)
class QuantDynamic(Pass):
    """Dynamic int8 quantization of MatMul / Gemm layers and embedding tables."""

    name = "quant-dynamic"
    summary = "Dynamic int8 quantization of MatMul/Gemm (activations quantized at run time) and embeddings; no calibration"
    exact = False

    ops: list[str] = option(list(DYNAMIC_OPS), "op types to quantize: MatMul, Gemm (dynamic int8) and Gather "
                            "(int8 embedding tables)")
    per_channel: bool = option(True, "one weight scale per output column (per row for embedding tables); "
                               "false: one per tensor")
    weight_type: str = option("int8", "MatMul/Gemm weight type: int8 (symmetric) or uint8 (asymmetric)")
    reduce_range: bool = option(True, "int8 weights in 7 bits (-63..63): onnxruntime's uint8 x int8 kernels on x86 "
                                "CPUs without VNNI sum pairs of products in int16 and saturate with full-range "
                                "weights (measured: 22% error on one MatMul); costs ~6 dB of weight SQNR, far above "
                                "the activation noise. Turn off for VNNI / ARM targets")
    exclude: list[str] = option([], "node names or op types to keep in float")
    min_elements: int = option(0, "leave weights with fewer elements than this in float")

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in DYNAMIC_OPS]
        self.check(not unknown, f"quant-dynamic: cannot quantize {', '.join(unknown)} dynamically (ops: "
                   f"{', '.join(DYNAMIC_OPS)}; Conv is left to the static 'quant' pass because onnxruntime's "
                   "ConvInteger is not faster than a float Conv)")
        self.check(self.weight_type in ("int8", "uint8"),
                   f"quant-dynamic: weight_type must be int8 or uint8, got '{self.weight_type}'")
        self.check(self.min_elements >= 0, "quant-dynamic: min_elements must be >= 0")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if model.opset < MIN_OPSET:
            return PassResult(False, {"skipped": f"opset {model.opset} < {MIN_OPSET} (no DynamicQuantizeLinear)"})
        graph = model.graph
        warn_unmatched(f"{self.name}: exclude", self.exclude, graph, ops=True, nodes=True)
        namer = ir.Namer(graph)
        linears = linear_layers(graph, model.opset, self.ops, self.exclude, self.min_elements)
        embeddings = embedding_layers(graph, model.opset, self.exclude, self.min_elements) if "Gather" in self.ops else []
        qt = nq.qtype(self.weight_type)
        inputs: dict[str, tuple[gs.Tensor, gs.Tensor, gs.Tensor]] = {}  # one DynamicQuantizeLinear per tensor
        rows, before, after = [], 0, 0
        for layer in linears:
            rows.append(self._quantize_linear(graph, layer, qt, inputs, namer))
        for table in embeddings:
            rows.append(self._quantize_embedding(graph, table, namer))
        for row in rows:
            before, after = before + row.pop("bytes_before"), after + row.pop("bytes_after")
        stats = {
            "matmul": sum(r["op"] == "MatMul" for r in rows),
            "gemm": sum(r["op"] == "Gemm" for r in rows),
            "gather": sum(r["op"] == "Gather" for r in rows),
            "activation_quantizers": len(inputs),
            "weight_mb_before": round(before / 1e6, 3),
            "weight_mb_after": round(after / 1e6, 3),
        }
        if rows:
            stats["worst_weight_sqnr_db"] = round(min(r["weight_sqnr_db"] for r in rows), 2)
        return PassResult(bool(rows), stats, {"layers": rows})

    def _dynamic_input(self, graph, x: gs.Tensor, inputs, namer) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
        if x.name not in inputs:
            base = namer(f"{x.name}_dq")
            q = gs.Variable(f"{base}_quantized", dtype=np.uint8, shape=x.shape)
            scale = gs.Variable(f"{base}_scale", dtype=np.float32, shape=[])
            zero = gs.Variable(f"{base}_zero_point", dtype=np.uint8, shape=[])
            graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=base, inputs=[x], outputs=[q, scale, zero]))
            inputs[x.name] = (q, scale, zero)
        return inputs[x.name]

    def _quantize_linear(self, graph, layer: Linear, qt: nq.QType, inputs, namer) -> dict:
        node, w = layer.node, layer.weight
        axis = 1 if self.per_channel else None
        scale, zero = nq.weight_scale_zero_point(w, qt, axis, symmetric=qt.signed)
        if qt.signed and self.reduce_range:
            scale = (scale * np.float32(qt.symmetric_max / REDUCED_MAX)).astype(np.float32)
        w_q = nq.quantize(w, scale, zero, qt, axis)
        sqnr = nq.sqnr_db(w, nq.dequantize(w_q, scale, zero, qt, axis))
        x_q, x_scale, x_zero = self._dynamic_input(graph, layer.input, inputs, namer)
        base = namer(node.name or "linear")
        output = detach(node)
        acc = gs.Variable(f"{base}_int32", dtype=np.int32)
        acc_f = gs.Variable(f"{base}_float", dtype=np.float32)
        both = gs.Variable(f"{base}_scales", dtype=np.float32)
        w_scale = ir.const(f"{base}_weight_scale", (scale * np.float32(layer.alpha)).astype(np.float32))
        graph.nodes += [
            gs.Node("MatMulInteger", name=f"{base}_matmul", outputs=[acc], inputs=[
                x_q, ir.const(f"{base}_weight_quantized", w_q), x_zero, ir.const(f"{base}_weight_zero_point", zero)]),
            gs.Node("Cast", name=f"{base}_cast", inputs=[acc], outputs=[acc_f], attrs={"to": onnx.TensorProto.FLOAT}),
            gs.Node("Mul", name=f"{base}_scales", inputs=[x_scale, w_scale], outputs=[both]),
        ]
        if layer.bias is None:
            graph.nodes.append(gs.Node("Mul", name=f"{base}_rescale", inputs=[acc_f, both], outputs=[output]))
        else:
            scaled = gs.Variable(f"{base}_rescaled", dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", name=f"{base}_rescale", inputs=[acc_f, both], outputs=[scaled]))
            graph.nodes.append(gs.Node("Add", name=f"{base}_bias", inputs=[scaled, _scaled_bias(graph, layer, base)],
                                       outputs=[output]))
        return {"name": node.name, "op": node.op, "shape": list(w.shape), "weight_sqnr_db": round(sqnr, 2),
                "bytes_before": w.nbytes, "bytes_after": w_q.nbytes + scale.nbytes + zero.nbytes}

    def _quantize_embedding(self, graph, layer: Embedding, namer) -> dict:
        table = layer.table
        qt = nq.qtype("int8")
        axis = 0 if self.per_channel else None
        scale, zero = nq.weight_scale_zero_point(table, qt, axis, symmetric=True)
        q = nq.quantize(table, scale, zero, qt, axis)
        sqnr = nq.sqnr_db(table, nq.dequantize(q, scale, zero, qt, axis))
        base = namer(layer.node.name or "embedding")
        indices = layer.indices
        output = detach(layer.node)
        rows_q = gs.Variable(f"{base}_rows_quantized", dtype=np.int8)
        table_q = ir.const(f"{base}_table_quantized", q)
        if axis is None:
            graph.nodes += [
                gs.Node("Gather", name=f"{base}_gather", inputs=[table_q, indices], outputs=[rows_q], attrs={"axis": 0}),
                gs.Node("DequantizeLinear", name=f"{base}_dequantize", outputs=[output], inputs=[
                    rows_q, ir.const(f"{base}_scale", scale.reshape(())), ir.const(f"{base}_zero_point", zero.reshape(()))]),
            ]
        else:
            # Per-row scales are gathered with the rows: no per-axis DequantizeLinear can follow a lookup.
            rows_f = gs.Variable(f"{base}_rows_float", dtype=np.float32)
            rows_s = gs.Variable(f"{base}_rows_scale", dtype=np.float32)
            graph.nodes += [
                gs.Node("Gather", name=f"{base}_gather", inputs=[table_q, indices], outputs=[rows_q], attrs={"axis": 0}),
                gs.Node("Gather", name=f"{base}_gather_scale", outputs=[rows_s], attrs={"axis": 0},
                        inputs=[ir.const(f"{base}_row_scale", scale.reshape(-1, 1)), indices]),
                gs.Node("Cast", name=f"{base}_cast", inputs=[rows_q], outputs=[rows_f], attrs={"to": onnx.TensorProto.FLOAT}),
                gs.Node("Mul", name=f"{base}_rescale", inputs=[rows_f, rows_s], outputs=[output]),
            ]
        return {"name": layer.node.name, "op": "Gather", "shape": list(table.shape), "weight_sqnr_db": round(sqnr, 2),
                "bytes_before": table.nbytes, "bytes_after": q.nbytes + scale.nbytes}


def _scaled_bias(graph: gs.Graph, layer: Linear, base: str) -> gs.Tensor:
    """Gemm's beta * C as a tensor (a constant when C is one)."""
    value = ir.constant_value(layer.bias)
    if layer.beta == 1.0:
        return layer.bias
    if value is not None:
        return ir.const(f"{base}_bias", (value * np.float32(layer.beta)).astype(value.dtype))
    scaled = gs.Variable(f"{base}_bias_scaled", dtype=np.float32)
    graph.nodes.append(gs.Node("Mul", name=f"{base}_bias_scale", outputs=[scaled],
                               inputs=[layer.bias, ir.const(f"{base}_beta", np.array(layer.beta, np.float32))]))
    return scaled
