"""Measurements on calibration data that steer quantization.

Reading whole intermediate tensors out of onnxruntime costs more than computing them, so every
measurement here is a `Probe`: a copy of the model with extra reduction nodes (min / max, a
strided sample, per-channel means, energies) whose small outputs are read batch by batch.
Memory does not grow with the number of samples, and the model runs at its normal speed.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegraph import runtime, verify
from edgegraph.runtime import Feeds

INT64_MAX = np.iinfo(np.int64).max


class Probe:
    """A copy of `proto` to which reductions of its tensors are added as extra outputs."""

    def __init__(self, proto: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(proto)
        self.graph = self.model.graph
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.inputs = {i.name for i in self.graph.input}
        self._count = 0
        self._flat: dict[str, str] = {}
        self.outputs: list[str] = []

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"__probe{self._count}_{stem}"

    def _const(self, values: np.ndarray) -> str:
        name = self._fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def _node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        out = self._fresh(op)
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def _reduce(self, op: str, tensor: str, axes: Sequence[int] | None = None) -> str:
        if axes is None:
            return self._node(op, [tensor], keepdims=0)
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):  # axes became an input
            return self._node(op, [tensor, self._const(np.array(axes, dtype=np.int64))], keepdims=0)
        return self._node(op, [tensor], axes=list(axes), keepdims=0)

    def _flatten(self, tensor: str) -> str:
        if tensor not in self._flat:
            self._flat[tensor] = self._node("Reshape", [tensor, self._const(np.array([-1], dtype=np.int64))])
        return self._flat[tensor]

    def output(self, name: str) -> str:
        self.graph.output.append(onnx.ValueInfoProto(name=name))  # ORT infers the type
        self.outputs.append(name)
        return name

    # -- reductions ----------------------------------------------------------------------------

    def minimum(self, tensor: str) -> str:
        return self.output(self._reduce("ReduceMin", self._flatten(tensor)))

    def maximum(self, tensor: str) -> str:
        return self.output(self._reduce("ReduceMax", self._flatten(tensor)))

    def sample(self, tensor: str, step: int) -> str:
        """Every `step`-th element of the flattened tensor."""
        if step <= 1:
            return self.output(self._flatten(tensor))
        starts, ends = self._const(np.array([0], np.int64)), self._const(np.array([INT64_MAX], np.int64))
        axes, steps = self._const(np.array([0], np.int64)), self._const(np.array([step], np.int64))
        return self.output(self._node("Slice", [self._flatten(tensor), starts, ends, axes, steps]))

    def energy(self, tensor: str, minus: str | None = None) -> str:
        """Sum of squares of `tensor` (or of tensor - minus)."""
        x = tensor if minus is None else self._node("Sub", [tensor, minus])
        return self.output(self._reduce("ReduceSumSquare", self._flatten(x)))

    def activation(self, tensor: str, kind: tuple[str, float, float] | None) -> str:
        """`tensor` passed through an activation (name, alpha, beta) as placement.reader_activation
        names it; the tensor itself for None."""
        if kind is None:
            return tensor
        name, alpha, beta = kind
        if name in ("sigmoid", "tanh", "relu"):
            return self._node(name.capitalize(), [tensor])
        if name == "hardsigmoid":
            return self._node("HardSigmoid", [tensor], alpha=alpha, beta=beta)
        gate = self._node("Sigmoid", [tensor]) if name == "silu" else self._node(
            "HardSigmoid", [tensor], alpha=alpha, beta=beta)
        return self._node("Mul", [tensor, gate])

    def channel_sum(self, tensor: str, minus: str, rank: int, axis: int = 1) -> str:
        """Per-channel sum over every other axis of tensor - minus."""
        diff = self._node("Sub", [tensor, minus])
        return self.output(self._reduce("ReduceSum", diff, [a for a in range(rank) if a != axis % rank]))

    # -- running -------------------------------------------------------------------------------

    def run(self, batches: Iterable[Feeds], threads: int = 0, optimize: bool | str = True) -> Iterator[Feeds]:
        """The probe outputs for each batch. With all ORT optimizations (measured fastest: ORT keeps
        probed tensors intact; a quantized model runs its integer kernels, as deployed)."""
        for _, outputs in self.run_with_feeds(batches, threads, optimize):
            yield outputs

    def run_with_feeds(self, batches: Iterable[Feeds], threads: int = 0,
                       optimize: bool | str = True) -> Iterator[tuple[Feeds, Feeds]]:
        """(feeds, probe outputs) per batch, reading each batch once."""
        sess = runtime.session(self.model, threads=threads, optimize=optimize)
        specs = runtime.input_specs(self.model)
        for batch in batches:
            feeds = runtime.adapt_feeds(specs, batch)
            yield feeds, runtime.run(sess, feeds, self.outputs)


def sample_step(elements_per_sample: int, target: int = 8192) -> int:
    """A prime stride that keeps about `target` elements per sample (primes avoid sampling one
    column of an image over and over)."""
    step = max(1, elements_per_sample // target)
    if step <= 2:
        return step
    while any(step % p == 0 for p in range(2, int(step**0.5) + 1)):
        step += 1
    return step


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
    for out in progress(probe.run(batches, threads), desc="quant: measuring SQNR"):
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
    for out in progress(probe.run(batches, threads), desc="quant: bias correction"):
        for name, read in reads.items():
            sums[name] = sums.get(name, 0.0) + out[read].astype(np.float64)
            channels = out[read].size
            totals[name] += int(out[counts[name]]) // max(channels, 1)
    return {name: sums[name] / max(totals[name], 1) for name in sums}


# ---------------------------------------------------------------------------------------------
# Outputs


def output_agreement(reference: Sequence[Feeds], candidate: Sequence[Feeds]) -> tuple[float, float]:
    """(argmax agreement, worst SQNR in dB) of a candidate's outputs vs the reference's.

    Agreement is top-1 for (batch, classes) outputs and the per-position argmax over the last
    axis otherwise (pixels of a segmentation map, anchors of a detector), averaged over float
    outputs with more than one entry on that axis; 1.0 when no output has such an axis.
    """
    metrics = verify.compare_all(reference, candidate)
    agreements, sqnrs = [], []
    for name, m in metrics.items():
        sqnrs.append(m.sqnr_db)
        if m.top1 is not None:
            agreements.append(m.top1)
            continue
        ref = [r[name] for r in reference]
        if isinstance(ref[0], np.ndarray) and ref[0].dtype.kind == "f" and ref[0].ndim and ref[0].shape[-1] > 1:
            ref_rows = np.concatenate([r.reshape(-1, r.shape[-1]) for r in ref])
            cand_rows = np.concatenate([c[name].reshape(-1, c[name].shape[-1]) for c in candidate])
            agreements.append(verify.argmax_agreement(ref_rows, cand_rows))
    agreement = float(np.mean(agreements)) if agreements else 1.0
    return agreement, float(min(sqnrs)) if sqnrs else float("inf")


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


__all__ = ["ErrorSums", "Probe", "add_float_twins", "mean_layer_errors", "optimized_op_counts", "output_agreement",
           "paired_errors", "paired_model", "sample_step"]
