"""Bias correction for `quant`: each quantized layer's bias minus the mean error its integer weights
and its input's rounding / clipping add, measured against a float twin (analysis.mean_layer_errors)
on the first analysis samples."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.passes.quant import analysis
from edgegraph.passes.quant.state import QuantRun

if TYPE_CHECKING:
    from edgegraph.passes.quant.build import Built


def correct_biases(run: QuantRun, quant: ir.Model, built: Built) -> None:
    """Each bias minus the mean error of its layer vs a float twin (see analysis.mean_layer_errors)."""
    start = time.perf_counter()
    layers = []
    for bias in built.biases:
        rank = _output_rank(bias.node)
        if rank is None:
            continue
        twin_inputs = {1: bias.weight.float_value, 2: bias.float_value}
        source = _before_quantize(bias.node.inputs[0])
        if source is not None:
            twin_inputs[0] = source.name
        layers.append((bias.node.name, twin_inputs, rank))
    data = run.calib.take(run.analysis_count)
    errors = analysis.mean_layer_errors(quant.to_proto(), layers, run.batches(data), run.ctx.threads,
                                        run.progress(data, "quant: bias correction"))
    for bias in built.biases:
        error = errors.get(bias.node.name)
        if error is not None and error.shape == bias.float_value.shape:
            bias.set_value(bias.float_value - error.astype(np.float32))
            built.corrected += 1
    run.timings["bias_correction"] = run.timings.get("bias_correction", 0.0) + time.perf_counter() - start


def _before_quantize(tensor: gs.Tensor) -> gs.Tensor | None:
    """For the output of DequantizeLinear(QuantizeLinear(x)), x; else None."""
    dq = ir.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or isinstance(dq.inputs[0], gs.Constant):
        return None
    q = ir.producer(dq.inputs[0])
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None


def _output_rank(node: gs.Node) -> int | None:
    """Rank of a Conv / Gemm output (known from its weight when shape inference gave none)."""
    shape = node.outputs[0].shape
    if shape is not None:
        return len(shape)
    if node.op == "Gemm":
        return 2
    weight = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return weight.ndim if weight is not None and node.op in ("Conv", "ConvTranspose") else None


__all__ = ["correct_biases"]
