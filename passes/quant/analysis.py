"""Measurements on calibration data that steer quantization.

Every measurement here is an `edgegraph.analysis.capture.Probe`: a copy of the model with extra
reduction nodes whose small outputs are read batch by batch, so memory does not grow with the
number of samples.

  calibration      min, max and a sample of each tensor (histograms are built from the sample)
  paired errors    the float and the quantized model in one graph: signal and noise energy per
                   quantized tensor -> per-layer SQNR and sensitivity
  bias correction  each quantized layer beside a float twin with the original weights, fed the
                   layer's input as it was before its own QuantizeLinear: the per-channel mean of
                   their difference is the bias error that layer's weights and input rounding /
                   clipping add (upstream errors reach both, so nothing is corrected twice)
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from edgegraph import verify
from edgegraph.analysis.capture import Probe
from edgegraph.runtime import Feeds

# ---------------------------------------------------------------------------------------------
# Paired float / quantized errors


@dataclass
class ErrorSums:
    """Running signal and noise energy of a tensor (quantized vs float)."""

    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return verify.sqnr_db(self.signal, self.noise)

    @property
    def relative_noise(self) -> float:
        return self.noise / self.signal if self.signal > 0 else (0.0 if self.noise == 0 else float("inf"))


FLOAT_PREFIX = "__float__/"


def paired_model(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto) -> onnx.ModelProto:
    """One graph holding the quantized model and a prefixed copy of the float model, both fed by
    the same inputs (so one run computes both on the same batch)."""
    float_copy = onnx.compose.add_prefix(float_proto, FLOAT_PREFIX)
    merged = onnx.ModelProto()
    merged.CopyFrom(quant_proto)
    graph = merged.graph
    for value in float_copy.graph.input:
        original = value.name[len(FLOAT_PREFIX):]
        graph.node.append(helper.make_node("Identity", [original], [value.name], name=value.name))
    graph.node.extend(float_copy.graph.node)
    graph.initializer.extend(float_copy.graph.initializer)
    graph.value_info.extend(float_copy.graph.value_info)
    known = {(o.domain, o.version) for o in merged.opset_import}
    domains = {o.domain for o in merged.opset_import}
    for opset in float_copy.opset_import:
        if opset.domain not in domains and (opset.domain, opset.version) not in known:
            merged.opset_import.append(opset)
    merged.functions.extend(f for f in float_copy.functions)
    return merged


def paired_errors(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, pairs: Mapping[str, str],
                  batches: Iterable[Feeds], threads: int = 0,
                  progress: Callable = lambda it, **_: it,
                  activations: Mapping[str, tuple[str, float, float]] | None = None) -> dict[str, ErrorSums]:
    """Signal / noise energy of every quantized tensor against its float counterpart.

    `pairs` maps a float-model tensor name to the quantized-model tensor carrying its value. A
    tensor listed in `activations` is compared after that activation (what its readers see):
    SiLU flattens large negative values, so their clipping is no error.
    """
    inputs = {i.name for i in float_proto.graph.input}
    activations = activations or {}
    probe = Probe(paired_model(float_proto, quant_proto))
    reads = {}
    for name, quantized in pairs.items():
        if name in inputs:
            continue
        kind = activations.get(name)
        reference = probe.activation(FLOAT_PREFIX + name, kind)
        reads[name] = (probe.energy(reference), probe.energy(probe.activation(quantized, kind), reference))
    sums = {name: ErrorSums() for name in reads}
    for out in progress(probe.run(batches, threads, side_by_side=True), desc="quant: measuring SQNR"):
        for name, (signal, noise) in reads.items():
            sums[name].signal += float(out[signal])
            sums[name].noise += float(out[noise])
    return sums


# ---------------------------------------------------------------------------------------------
# Bias correction


def add_float_twins(probe: Probe, layers: Sequence[tuple[str, Mapping[int, np.ndarray | str]]]) -> dict[str, str]:
    """Give each named node a float twin whose listed inputs are replaced: by an array (its
    original weights / bias) or by another tensor's name (e.g. its input before quantization).
    Other inputs are shared. Returns {node: twin output name}."""
    by_name = {n.name: n for n in probe.graph.node}
    twins = {}
    for name, replacements in layers:
        node = by_name[name]
        inputs = list(node.input)
        for index, value in replacements.items():
            while len(inputs) <= index:
                inputs.append("")
            inputs[index] = value if isinstance(value, str) else probe._const(np.asarray(value, dtype=np.float32))
        twin = helper.make_node(node.op_type, inputs, [probe._fresh(f"{name}_twin")], name=probe._fresh(name),
                                domain=node.domain)
        twin.attribute.extend(node.attribute)
        probe.graph.node.append(twin)
        twins[name] = twin.output[0]
    return twins


def mean_layer_errors(proto: onnx.ModelProto, layers: Sequence[tuple[str, Mapping[int, np.ndarray | str], int]],
                      batches: Iterable[Feeds], threads: int = 0,
                      progress: Callable = lambda it, **_: it) -> dict[str, np.ndarray]:
    """Per output channel (axis 1), the mean of (quantized layer output - float twin output).

    `layers` holds (node name, {input index: float value or tensor name}, output rank).
    """
    probe = Probe(proto)
    outputs = {n.name: n.output[0] for n in probe.graph.node}
    twins = add_float_twins(probe, [(name, values) for name, values, _ in layers])
    reads = {name: probe.channel_sum(outputs[name], twins[name], rank) for name, _, rank in layers}
    counts = {name: probe.output(probe._node("Size", [outputs[name]])) for name, _, _ in layers}
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, int] = collections.Counter()
    for out in progress(probe.run(batches, threads, side_by_side=True), desc="quant: bias correction"):
        for name, read in reads.items():
            sums[name] = sums.get(name, 0.0) + out[read].astype(np.float64)
            channels = out[read].size
            totals[name] += int(out[counts[name]]) // max(channels, 1)
    return {name: sums[name] / max(totals[name], 1) for name in sums}


# ---------------------------------------------------------------------------------------------
# Outputs


def optimized_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions, before layout
    changes), e.g. to check that Q/DQ pairs were fused into QLinearConv rather than left standing."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    return dict(collections.Counter(n.op_type for n in optimized.graph.node))


__all__ = ["ErrorSums", "add_float_twins", "mean_layer_errors", "optimized_op_counts",
           "paired_errors", "paired_model"]
