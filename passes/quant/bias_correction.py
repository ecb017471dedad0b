"""Bias correction for `quant`: each quantized layer's bias minus the mean error its integer weights
and its input's rounding / clipping add, measured against a float twin (analysis.mean_layer_errors)
on the first analysis samples.

A layer's mean error is measured once per run for each quantization of the layer (its integer
weights and its input's scale and zero point: `_layer_key`) and reused by later builds that
quantize it the same way (tuning's coarse-tensor trial, mixed precision's trials, the speed
check's and fallback's plans): what those builds change elsewhere in the network moves the
layer's input distribution, and so its mean error, only a little, and every such build is still
scored on held-out samples as it is. On YOLOX-nano, 3 of the 4 bias-correction runs (each a pass
of the model and its float twins over the analysis samples) had measured the same layers again."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.passes.quant import analysis
from edgegraph.passes.quant.state import QuantRun

if TYPE_CHECKING:
    from edgegraph.passes.quant.build import Built
    from edgegraph.passes.quant.qdq import QuantizedBias


def correct_biases(run: QuantRun, quant: ir.Model, built: Built) -> None:
    """Each bias minus the mean error of its layer vs a float twin (see analysis.mean_layer_errors)."""
    start = time.perf_counter()
    layers, keys = [], {}
    for bias in built.biases:
        rank = _output_rank(bias.node)
        if rank is None:
            continue
        source = _before_quantize(bias.node.inputs[0])
        keys[bias.node.name] = key = _layer_key(bias, source)
        if key in run.layer_errors:
            continue
        twin_inputs = {1: bias.weight.float_value, 2: bias.float_value}
        if source is not None:
            twin_inputs[0] = source.name
        layers.append((bias.node.name, twin_inputs, rank))
    if layers:
        data = run.calib.take(run.analysis_count)
        measured = analysis.mean_layer_errors(quant.to_proto(), layers, run.batches(data), run.ctx.threads,
                                              run.progress(data, "quant: bias correction"))
        run.layer_errors.update({keys[name]: error for name, error in measured.items()})
    errors = {name: run.layer_errors.get(key) for name, key in keys.items()}
    for bias in built.biases:
        error = errors.get(bias.node.name)
        if error is not None and error.shape == bias.float_value.shape:
            bias.set_value(bias.float_value - error.astype(np.float32))
            built.corrected += 1
    run.timings["bias_correction"] = run.timings.get("bias_correction", 0.0) + time.perf_counter() - start


def _layer_key(bias: QuantizedBias, source: gs.Tensor | None) -> tuple:
    """What a layer's mean error depends on besides the rest of the network: the layer, its
    integer weights (codes and scales) and its input's quantization (scale and zero point)."""
    weight = bias.weight
    digest = hashlib.sha1(np.ascontiguousarray(weight.quantized.values).tobytes())
    digest.update(np.asarray(weight.params.scale, np.float32).tobytes())
    dq = ir.producer(bias.node.inputs[0]) if source is not None else None
    for tensor in (dq.inputs[1:] if dq is not None else ()):
        value = ir.constant_value(tensor)
        digest.update(b"-" if value is None else np.asarray(value).tobytes())
    return bias.node.name, source is None, digest.hexdigest()


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
