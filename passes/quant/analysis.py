"""Measurements on calibration data that steer quantization: per-tensor SQNR against the float
model, the mean error each quantized layer adds (for bias correction), and output agreement.

Everything streams batch by batch through `runtime.capture`, reducing each batch to sums, so
memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegraph import runtime, verify
from edgegraph.runtime import Feeds


@dataclass
class ErrorSums:
    """Running signal and noise energy of a tensor (quantized vs float)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.astype(np.float64, copy=False)
        self.signal += float(np.sum(ref * ref))
        diff = candidate.astype(np.float64) - ref
        self.noise += float(np.sum(diff * diff))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float(10 * np.log10(self.signal / self.noise)) if self.signal > 0 else float("-inf")

    @property
    def relative_noise(self) -> float:
        return self.noise / self.signal if self.signal > 0 else (0.0 if self.noise == 0 else float("inf"))


def paired_errors(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, pairs: Mapping[str, str],
                  batches: Callable[[], Iterable[Feeds]], threads: int = 0,
                  progress: Callable = lambda it, **_: it) -> dict[str, ErrorSums]:
    """Signal / noise of every quantized tensor against its float counterpart.

    `pairs` maps a float-model tensor name to the quantized-model tensor carrying the same value.
    The two models run on the same batches in lockstep.
    """
    float_names = [n for n in pairs if n not in _input_names(float_proto)]
    quant_names = [pairs[n] for n in float_names]
    sums = {name: ErrorSums() for name in float_names}
    reference = runtime.capture(float_proto, float_names, batches(), threads=threads)
    candidate = runtime.capture(quant_proto, quant_names, batches(), threads=threads)
    for ref, cand in progress(zip(reference, candidate), desc="quant: measuring SQNR"):
        for name in float_names:
            sums[name].add(ref[name], cand[pairs[name]])
    return sums


def _input_names(proto: onnx.ModelProto) -> set[str]:
    return {i.name for i in proto.graph.input}


@dataclass(frozen=True)
class Shadow:
    """A quantized layer and a float twin fed the same (dequantized) inputs."""

    node: str  # quantized node name
    output: str  # its output (before any folded activation)
    twin_output: str
    channel_axis: int = 1


def add_float_twins(proto: onnx.ModelProto, layers: Sequence[tuple[str, dict[int, np.ndarray]]]) -> tuple[onnx.ModelProto, list[Shadow]]:
    """A copy of `proto` where each named node gets a float twin whose inputs listed in the dict
    are replaced by the given float arrays (the original weights / bias); other inputs are shared.

    Comparing a layer with its twin isolates the error its own integer weights add, given the
    quantized activations it really sees.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    by_name = {n.name: n for n in model.graph.node}
    shadows = []
    for name, replacements in layers:
        node = by_name[name]
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{name}__float_twin"
        inputs = list(node.input)
        for index, value in replacements.items():
            init = numpy_helper.from_array(np.asarray(value, dtype=np.float32), f"{name}__float_twin_in{index}")
            model.graph.initializer.append(init)
            while len(inputs) <= index:
                inputs.append("")
            inputs[index] = init.name
        del twin.input[:]
        twin.input.extend(inputs)
        del twin.output[:]
        twin.output.append(f"{name}__float_twin_out")
        model.graph.node.append(twin)
        shadows.append(Shadow(name, node.output[0], twin.output[0]))
    return model, shadows


def mean_layer_errors(proto: onnx.ModelProto, shadows: Sequence[Shadow], batches: Iterable[Feeds], threads: int = 0,
                      progress: Callable = lambda it, **_: it) -> dict[str, np.ndarray]:
    """Per output channel, the mean of (quantized layer output - float twin output)."""
    names = [n for s in shadows for n in (s.output, s.twin_output)]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in progress(runtime.capture(proto, names, batches, threads=threads), desc="quant: bias correction"):
        for s in shadows:
            diff = batch[s.output].astype(np.float64) - batch[s.twin_output]
            axes = tuple(i for i in range(diff.ndim) if i != s.channel_axis % diff.ndim)
            sums[s.node] = sums.get(s.node, 0.0) + diff.sum(axis=axes)
            counts[s.node] = counts.get(s.node, 0) + int(np.prod([diff.shape[i] for i in axes]))
    return {name: sums[name] / counts[name] for name in sums}


def output_agreement(reference: Sequence[Feeds], candidate: Sequence[Feeds]) -> tuple[float, float]:
    """(argmax agreement, worst SQNR in dB) of a candidate's outputs vs the reference's.

    Agreement is top-1 for (batch, classes) outputs and the per-position argmax over the last
    axis otherwise (pixels of a segmentation map, anchors of a detector); the mean over float
    outputs with more than one entry on that axis. 1.0 when no output has such an axis.
    """
    metrics = verify.compare_all(reference, candidate)
    agreements, sqnrs = [], []
    for name, m in metrics.items():
        sqnrs.append(m.sqnr_db)
        if m.top1 is not None:
            agreements.append(m.top1)
            continue
        ref = np.concatenate([r[name].reshape(-1, r[name].shape[-1]) for r in reference if r[name].ndim])
        if ref.dtype.kind == "f" and ref.shape[-1] > 1:
            cand = np.concatenate([c[name].reshape(-1, c[name].shape[-1]) for c in candidate if c[name].ndim])
            agreements.append(verify.argmax_agreement(ref, cand))
    agreement = float(np.mean(agreements)) if agreements else 1.0
    return agreement, float(min(sqnrs)) if sqnrs else float("inf")


def model_outputs(proto: onnx.ModelProto, batches: Iterable[Feeds], threads: int = 0, optimize: bool = True) -> list[Feeds]:
    """Outputs of `proto` over batches (ORT optimizations on: the integer kernels users will run)."""
    sess = runtime.session(proto, threads=threads, optimize=optimize)
    specs = runtime.input_specs(proto)
    return [runtime.run(sess, runtime.adapt_feeds(specs, b)) for b in batches]


def make_value_info(name: str) -> onnx.ValueInfoProto:
    return helper.make_empty_tensor_value_info(name)


__all__ = ["ErrorSums", "Shadow", "add_float_twins", "mean_layer_errors", "output_agreement", "paired_errors",
           "model_outputs"]


def optimized_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions, before layout
    changes), e.g. to check that Q/DQ pairs were fused into QLinearConv rather than left standing."""
    import collections
    import os
    import tempfile

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
