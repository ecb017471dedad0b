"""Statistics of chosen tensors over calibration data, with memory that does not grow with the
number of samples.

Reading whole intermediate tensors out of onnxruntime costs more than computing them, so most
measurements are a `Probe`: a copy of the model with extra reduction nodes (min / max, a strided
sample, per-channel sums, energies, Gram matrices) whose small outputs are read batch by batch and
summed on the host in float64. The model runs at its normal speed.

  stream           whole values of tensors, one batch at a time (the caller reduces them)
  RangeStats       exact min / max and a fixed-size histogram (from a strided sample)
  ChannelMoments   per-channel count, sum and sum of squares -> mean and variance
  Gram             XᵀX, XᵀY and column sums of a layer's input features X (least squares):
                     Gemm / MatMul  X = the input's rows (transA honoured), one feature per column
                     Conv           X = im2col patches of the input (any kernel, strides, pads,
                                    dilations, auto_pad), feature c*K + k for channel c and kernel
                                    position k (the order of W.reshape(O, -1)); a 1x1 Conv with
                                    stride 1 and no padding reads the input as it is. A grouped
                                    Conv gets one Gram per group: shapes (G, F/G, F/G)
  layer_matrix     a layer's weight as rows over those features (and back)
  inverse_factor   the damped H⁻¹'s Cholesky factor that GPTQ-style solvers use
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from edgegraph import ir, runtime
from edgegraph.analysis import layout
from edgegraph.runtime import Feeds

INT64_MAX = np.iinfo(np.int64).max
BINS = 2048  # histogram bins per side of zero
HIST_SAMPLES = 1 << 18  # histogram elements taken from one tensor of one batch


# ---------------------------------------------------------------------------------------------
# Whole values


@contextmanager
def _exposing(graph: gs.Graph, names: Iterable[str]):
    """While active, `graph` also returns the named tensors (`runtime.with_outputs` for a gs graph)."""
    present = {t.name for t in graph.outputs}
    tensors = graph.tensors()
    # An unknown name still becomes an output, so that ORT reports it as with_outputs would.
    added = [tensors[name] if name in tensors else gs.Variable(name) for name in dict.fromkeys(names)
             if name not in present]
    graph.outputs.extend(added)
    try:
        yield
    finally:
        del graph.outputs[len(graph.outputs) - len(added):]


def stream(model, tensors: Sequence[str], batches: Iterable[Feeds], *, threads: int = 0) -> Iterator[Feeds]:
    """The values of intermediate `tensors` over calibration batches, one batch at a time.

    The caller reduces each batch, so memory stays bounded by one batch of activations; for
    reductions ORT can compute itself, a `Probe` avoids even that copy.
    """
    if isinstance(model, ir.Model):
        with _exposing(model.graph, tensors):  # no copy of the model: a big one reaches ORT as a file
            sess = runtime.session(model, threads=threads)
    else:
        sess = runtime.session(runtime.with_outputs(model, tensors), threads=threads)
    specs = runtime.input_specs(sess)
    for batch in batches:
        yield runtime.run(sess, runtime.adapt_feeds(specs, batch), tensors)


# ---------------------------------------------------------------------------------------------
# In-graph reductions


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
        self._double: dict[str, str] = {}
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
            self._flat[tensor] = self._reshape(tensor, [-1])
        return self._flat[tensor]

    def _reshape(self, tensor: str, shape: Sequence[int]) -> str:
        return self._node("Reshape", [tensor, self._const(np.array(shape, dtype=np.int64))])

    def _float64(self, tensor: str) -> str:
        """`tensor` cast to float64: sums over many rows keep their precision."""
        if tensor not in self._double:
            self._double[tensor] = self._node("Cast", [tensor], to=onnx.TensorProto.DOUBLE)
        return self._double[tensor]

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

    def range_sample(self, tensor: str, step: int) -> tuple[str, str, str]:
        """(strided sample, min, max) of a tensor: what `RangeStats.update` takes."""
        return self.sample(tensor, step), self.minimum(tensor), self.maximum(tensor)

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

    def channel_moments(self, tensor: str, rank: int, axis: int = 1) -> tuple[str, str, str]:
        """(element count, per-channel sum, per-channel sum of squares) of a tensor, in float64;
        what `ChannelMoments.add_sums` takes."""
        x = self._float64(tensor)
        others = [a for a in range(rank) if a != axis % rank]
        return (self.output(self._node("Size", [tensor])), self.output(self._reduce("ReduceSum", x, others)),
                self.output(self._reduce("ReduceSum", self._node("Mul", [x, x]), others)))

    def gram(self, node: str, target: str | None = None) -> GramRead:
        """XᵀX, column sums and row count of the input features of the named Gemm, MatMul or Conv
        node (see the module's docstring), and XᵀY for `target`, a tensor shaped like the node's
        output (e.g. the node's output itself, or the float model's)."""
        layer = next((n for n in self.graph.node if n.name == node), None)
        if layer is None:
            raise ValueError(f"capture: no node named {node!r}")
        features, groups, outputs = self._features(layer)  # [B, G, F, P]
        x = self._float64(features)
        xt = self._node("Transpose", [x], perm=[0, 1, 3, 2])
        read = GramRead(
            xtx=self.output(self._reduce("ReduceSum", self._node("MatMul", [x, xt]), [0])),
            sums=self.output(self._reduce("ReduceSum", x, [0, 3])),
            shape=self.output(self._node("Shape", [features])),
            groups=groups,
        )
        if target is not None:
            if layer.op_type == "Conv":
                y = self._reshape(target, [0, groups, outputs // groups, -1])  # [N, G, O/G, P]
            else:
                y = self._rows_to_features(target, outputs)
            yt = self._node("Transpose", [self._float64(y)], perm=[0, 1, 3, 2])
            read.xty = self.output(self._reduce("ReduceSum", self._node("MatMul", [x, yt]), [0]))
        return read

    def _features(self, layer: onnx.NodeProto) -> tuple[str, int, int]:
        """The layer's input as [B, G, F, P] (F features per group, B * P rows), its group count
        and its number of output channels / features."""
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
        if layer.op_type in ("Gemm", "MatMul"):
            shape = self._weight_shape(layer)
            if layer.op_type == "Gemm":
                width, outputs = shape[::-1] if attrs.get("transB", 0) else shape
                if attrs.get("transA", 0):  # A is [K, M]: features first already
                    return self._reshape(layer.input[0], [1, 1, width, -1]), 1, outputs
            else:
                width, outputs = shape[-2:]
            return self._rows_to_features(layer.input[0], width), 1, outputs
        if layer.op_type != "Conv":
            raise ValueError(f"capture: no Gram matrix for {layer.op_type} node {layer.name!r} (Gemm, MatMul, Conv)")
        shape = self._weight_shape(layer)  # [O, C/G, k...]
        groups = int(attrs.get("group", 1))
        channels, kernel = shape[1] * groups, [int(k) for k in shape[2:]]
        size = math.prod(kernel)
        plain = (size == 1 and not any(attrs.get("pads", [])) and all(s == 1 for s in attrs.get("strides", []))
                 and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
        x = layer.input[0]
        if not plain:
            # im2col in the graph: a depthwise Conv whose one-hot kernel copies each channel's
            # patch values to channels c*K + k (exact: one product by 1, the rest by 0).
            onehot = np.zeros((channels * size, 1, *kernel), np.float32)
            onehot.reshape(channels, size, size)[:, np.arange(size), np.arange(size)] = 1.0
            copied = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
            x = self._node("Conv", [x, self._const(onehot)], group=channels, kernel_shape=kernel, **copied)
        return self._reshape(x, [0, groups, channels * size // groups, -1]), groups, shape[0]

    def _rows_to_features(self, tensor: str, width: int) -> str:
        """A [..., F] tensor as [1, 1, F, rows]."""
        rows = self._reshape(tensor, [-1, width])
        return self._reshape(self._node("Transpose", [rows], perm=[1, 0]), [1, 1, width, -1])

    def _weight_shape(self, layer: onnx.NodeProto) -> list[int]:
        name = layer.input[1] if len(layer.input) > 1 else ""
        for tensor in self.graph.initializer:
            if tensor.name == name:
                return [int(d) for d in tensor.dims]
        for node in self.graph.node:
            if node.op_type == "Constant" and name in node.output and node.attribute:
                value = helper.get_attribute_value(node.attribute[0])
                if isinstance(value, onnx.TensorProto):
                    return [int(d) for d in value.dims]
        for info in list(self.graph.value_info) + list(self.graph.input):
            dims = info.type.tensor_type.shape.dim
            if info.name == name and dims and all(d.HasField("dim_value") for d in dims):
                return [int(d.dim_value) for d in dims]
        raise ValueError(f"capture: the weight shape of {layer.op_type} node {layer.name!r} is unknown")

    # -- running -------------------------------------------------------------------------------

    def run(self, batches: Iterable[Feeds], threads: int = 0, optimize: bool | str = True, *,
            side_by_side: bool = False) -> Iterator[Feeds]:
        """The probe outputs for each batch. With all ORT optimizations (measured fastest: ORT keeps
        probed tensors intact; a quantized model runs its integer kernels, as deployed)."""
        for _, outputs in self.run_with_feeds(batches, threads, optimize, side_by_side=side_by_side):
            yield outputs

    def run_with_feeds(self, batches: Iterable[Feeds], threads: int = 0, optimize: bool | str = True, *,
                       side_by_side: bool = False) -> Iterator[tuple[Feeds, Feeds]]:
        """(feeds, probe outputs) per batch in order, reading each batch once; `side_by_side`:
        a few batches at a time run runtime.SideBySide, on 1-thread sessions."""
        pending = iter(batches)
        chunk = list(itertools.islice(pending, (threads or runtime.cores()) if side_by_side else 1))
        runner = runtime.SideBySide(len(chunk), threads)
        try:
            sess = runtime.session(self.model, threads=runner.session_threads, optimize=optimize)
            specs = runtime.input_specs(self.model)

            def one(batch):
                feeds = runtime.adapt_feeds(specs, batch)
                return feeds, runtime.run(sess, feeds, self.outputs)
            while chunk:
                yield from runner.map(one, chunk)
                chunk = list(itertools.islice(pending, runner.workers))
        finally:
            runner.close()


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
# Histograms


class RangeStats:
    """Streaming min / max / histogram of one tensor.

    The histogram covers [-R, R] with 2 * BINS equal bins (0 is always a bin edge) and, when a
    batch exceeds R, doubles R by merging neighbouring bins, which is exact because the edges line
    up. Large tensors are subsampled (deterministically) for the histogram only.
    """

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.limit = 0.0  # R: the histogram covers [-R, R]
        self.hist = np.zeros(2 * BINS, dtype=np.int64)

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add a batch of values. `lo` / `hi` are the batch's exact extremes when `values` is only
        a sample of it (the histogram is built from the sample, the range from the extremes)."""
        x = np.asarray(values).ravel()
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            x = x[np.isfinite(x)]  # inf / nan never set a range
            lo = hi = None
        if lo is None or hi is None:
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        lo, hi = float(lo), float(hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if x.size > HIST_SAMPLES:
            x = x[:: -(-x.size // HIST_SAMPLES)]
        self._grow(max(-lo, hi))
        if self.limit == 0.0:  # all zeros so far
            self.hist[BINS] += x.size
        else:
            # Non-finite values (only possible without lo / hi) were dropped above; others lie in range.
            index = ((x + np.float32(self.limit)) * np.float32(BINS / self.limit)).astype(np.int64)
            np.minimum(index, 2 * BINS - 1, out=index)
            np.maximum(index, 0, out=index)
            self.hist += np.bincount(index, minlength=2 * BINS)
        self.count += x.size

    def _grow(self, absmax: float) -> None:
        if absmax <= self.limit:
            return
        if self.limit == 0.0:
            zeros = self.hist.sum()
            self.hist[:] = 0
            self.limit = absmax
            self.hist[BINS] = zeros  # the exact zeros seen so far go to the bin just above 0
            return
        factor = 1 << math.ceil(math.log2(absmax / self.limit))
        if factor >= 2 * BINS:
            negative, positive = self.hist[:BINS].sum(), self.hist[BINS:].sum()
            self.hist[:] = 0
            self.hist[BINS - 1], self.hist[BINS] = negative, positive
        else:
            merged = self.hist.reshape(-1, factor).sum(axis=1)
            self.hist[:] = 0
            offset = BINS - merged.size // 2
            self.hist[offset:offset + merged.size] = merged
        self.limit *= factor

    @property
    def empty(self) -> bool:
        return self.count == 0 and self.min > self.max

    def merge_from(self, other: RangeStats) -> None:
        """Add another tensor's statistics (tensors that share one scale)."""
        if other.empty:
            return
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._grow(other.limit)
        hist = other.hist
        if other.limit and other.limit < self.limit:
            hist = _rebin(other.hist, other.limit, self.limit)
        self.hist += hist
        self.count += other.count

    def fraction_above(self, value: float) -> float:
        """Fraction of the histogram above `value` (bin resolution)."""
        if self.empty or self.limit == 0.0:
            return 0.0 if value >= 0 else 1.0
        index = int(np.clip(np.floor((value + self.limit) / (self.limit / BINS)), 0, 2 * BINS))
        return float(self.hist[index:].sum() / max(self.hist.sum(), 1))

    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, 2 * BINS + 1)


def _rebin(hist: np.ndarray, limit: float, new_limit: float) -> np.ndarray:
    """A histogram over [-limit, limit] re-expressed over [-new_limit, new_limit] (new_limit >= limit)."""
    factor = new_limit / limit
    power = round(math.log2(factor))
    if math.isclose(2.0**power, factor, rel_tol=1e-9) and (1 << power) < 2 * BINS:
        merged = hist.reshape(-1, 1 << power).sum(axis=1)
        out = np.zeros_like(hist)
        offset = BINS - merged.size // 2
        out[offset:offset + merged.size] = merged
        return out
    centers = (np.arange(2 * BINS) + 0.5) * (2 * limit / (2 * BINS)) - limit
    index = np.clip(np.floor((centers + new_limit) / (new_limit / BINS)).astype(np.int64), 0, 2 * BINS - 1)
    return np.bincount(index, weights=hist, minlength=2 * BINS).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Per-channel moments


class ChannelMoments:
    """Streaming per-channel mean and variance of one tensor: from (a sample of) its values and
    the channel each value belongs to, or from sums reduced in the graph (`Probe.channel_moments`)."""

    def __init__(self, channels: int):
        self.count = np.zeros(channels)
        self.sum = np.zeros(channels)
        self.sum_sq = np.zeros(channels)

    @staticmethod
    def channel_axis(shape: Sequence[int]) -> int:
        """The channel axis of a tensor of `shape` (batch first): 1 for an NCHW activation, else the last."""
        return layout.activation_axis(shape)

    @staticmethod
    def channel_ids(shape: Sequence[int], positions: np.ndarray) -> np.ndarray:
        """The channel of each flat position of a tensor of `shape`."""
        axis = ChannelMoments.channel_axis(shape)
        return (positions // int(np.prod(shape[axis + 1:], dtype=np.int64))) % shape[axis]

    def update(self, values: np.ndarray, channel_ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Add values; `counts` (the bincount of `channel_ids`) may be passed when ids repeat."""
        x = np.asarray(values, dtype=np.float64).ravel()
        size = self.count.size
        self.count += np.bincount(channel_ids, minlength=size) if counts is None else counts
        self.sum += np.bincount(channel_ids, weights=x, minlength=size)
        self.sum_sq += np.bincount(channel_ids, weights=x * x, minlength=size)

    def add_sums(self, count: int, sums: np.ndarray, sums_sq: np.ndarray) -> None:
        """Add a batch's per-channel sums over `count` elements in all (every channel has count / C)."""
        self.count += int(count) // max(self.count.size, 1)
        self.sum += np.asarray(sums, dtype=np.float64).ravel()
        self.sum_sq += np.asarray(sums_sq, dtype=np.float64).ravel()

    @property
    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        """Population variance per channel (never negative)."""
        return np.maximum(self.sum_sq / np.maximum(self.count, 1) - self.mean**2, 0.0)

    def coarse_fraction(self, scale: float) -> float:
        """How much of a typical channel's variation a uniform step `scale` drowns: the mean over
        live channels of min(1, (scale^2 / 12) / variance). Near 0 when every channel varies over
        many steps; near 1 when most vary within one step (their information is rounded away)."""
        seen = self.count > 1
        if not seen.any():
            return 0.0
        mean = self.sum[seen] / self.count[seen]
        variance = np.maximum(self.sum_sq[seen] / self.count[seen] - mean**2, 0.0)
        live = variance > 1e-6 * max(float(np.median(variance)), 1e-30)  # dead (constant) channels lose nothing
        if not live.any():
            return 0.0
        return float(np.minimum(scale**2 / 12.0 / variance[live], 1.0).mean())


# ---------------------------------------------------------------------------------------------
# Gram matrices


@dataclass
class GramRead:
    """Names of a `Probe.gram`'s outputs."""

    xtx: str
    sums: str
    shape: str
    groups: int
    xty: str | None = None


@dataclass
class Gram:
    """Running XᵀX, XᵀY and column sums of a layer's input features X (float64). With groups
    (grouped Conv), every array has a leading axis per group."""

    xtx: np.ndarray
    sums: np.ndarray
    rows: int = 0
    xty: np.ndarray | None = None

    def add(self, out: Feeds, read: GramRead) -> None:
        squeeze = (lambda a: a[0]) if read.groups == 1 else (lambda a: a)
        self.xtx += squeeze(out[read.xtx])
        self.sums += squeeze(out[read.sums])
        shape = out[read.shape]
        self.rows += int(shape[0]) * int(shape[3])
        if read.xty is not None:
            if self.xty is None:
                self.xty = np.zeros_like(squeeze(out[read.xty]))
            self.xty += squeeze(out[read.xty])


# Layers with more input features than this are not solved on their Gram (the F x F inverse grows as F³).
MAX_FEATURES = 4096
# Added to H's diagonal, as a share of its mean, so that H is invertible (dead features).
DAMPING = 0.01


def layer_matrix(node: gs.Node, value: np.ndarray) -> tuple[np.ndarray, Callable] | None:
    """A layer's weight as O x F rows over its Gram's features, and how to put such a matrix back
    in the weight's shape; None for layouts without a Gram (ConvTranspose, Gemm with transA, an
    N-D MatMul weight). quant's rounding, codebook's fits and prune's recovery all solve on these."""
    if node.op == "Conv":
        return value.reshape(value.shape[0], -1), lambda m: m.reshape(value.shape)
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        if int(node.attrs.get("transB", 0)):
            return value, lambda m: m
        return value.T, lambda m: np.ascontiguousarray(m.T)
    if node.op == "MatMul" and value.ndim == 2:
        return value.T, lambda m: np.ascontiguousarray(m.T)
    return None


def inverse_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(U with H⁻¹ = UᵀU, dead features) of a damped Gram matrix (what GPTQ/OBQ-style solvers
    feed errors forward through); None when it is not positive definite."""
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    # U = J L⁻¹ J with J H J = L Lᵀ (J reverses the order): upper triangular, UᵀU = H⁻¹, so it is
    # the Cholesky factor of H⁻¹ without forming H⁻¹ (n³ flops instead of ~3n³: 0.63 -> 0.2 s at 1536).
    try:
        lower = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        return None
    return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1]), dead


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0],
    [-B⁻¹ C A⁻¹, B⁻¹]] (numpy has no triangular inverse; its general one costs 3x)."""
    n = lower.shape[0]
    if n <= 64:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    out = np.zeros_like(lower)
    out[:m, :m] = _lower_inverse(lower[:m, :m])
    out[m:, m:] = _lower_inverse(lower[m:, m:])
    out[m:, :m] = -out[m:, m:] @ (lower[m:, :m] @ out[:m, :m])
    return out


# ---------------------------------------------------------------------------------------------
# Drivers: one pass over the data, statistics per tensor or layer


def _ranks(proto: onnx.ModelProto, names: Iterable[str]) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    infos = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    ranks = {}
    for name in names:
        info = infos.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            raise ValueError(f"capture: the rank of tensor {name!r} is unknown")
        ranks[name] = len(info.type.tensor_type.shape.dim)
    return ranks


def histograms(proto: onnx.ModelProto, names: Sequence[str], batches: Iterable[Feeds], *, step: int = 1,
               threads: int = 0, progress: Callable = lambda it, **_: it) -> dict[str, RangeStats]:
    """Exact min / max and the histogram of every `step`-th element of each named tensor."""
    probe = Probe(proto)
    reads = {name: probe.range_sample(name, step) for name in names}
    stats = {name: RangeStats() for name in names}
    for out in progress(probe.run(batches, threads), desc="capture: histograms"):
        for name, (sample, low, high) in reads.items():
            stats[name].update(out[sample], out[low], out[high])
    return stats


def moments(proto: onnx.ModelProto, axes: Mapping[str, int], batches: Iterable[Feeds], *, threads: int = 0,
            progress: Callable = lambda it, **_: it) -> dict[str, ChannelMoments]:
    """Per-channel moments of each tensor in `axes` ({tensor: its channel axis}), reduced in the graph."""
    probe = Probe(proto)
    ranks = _ranks(proto, axes)
    reads = {name: probe.channel_moments(name, ranks[name], axis) for name, axis in axes.items()}
    found: dict[str, ChannelMoments] = {}
    for out in progress(probe.run(batches, threads), desc="capture: moments"):
        for name, (count, sums, sums_sq) in reads.items():
            if name not in found:
                found[name] = ChannelMoments(out[sums].size)
            found[name].add_sums(out[count], out[sums], out[sums_sq])
    return found


def grams(proto: onnx.ModelProto, layers: Sequence[str], batches: Iterable[Feeds], *,
          targets: Mapping[str, str] | None = None, threads: int = 0,
          progress: Callable = lambda it, **_: it) -> dict[str, Gram]:
    """The `Gram` of each named layer's input (and XᵀY against `targets[layer]`, a tensor shaped like
    its output), in one pass over the batches."""
    targets = targets or {}
    probe = Probe(proto)
    reads = {name: probe.gram(name, targets.get(name)) for name in layers}
    found: dict[str, Gram] = {}
    for out in progress(probe.run(batches, threads), desc="capture: Gram matrices"):
        for name, read in reads.items():
            if name not in found:
                first = out[read.xtx][0] if read.groups == 1 else out[read.xtx]
                found[name] = Gram(np.zeros_like(first), np.zeros(first.shape[:-1]))
            found[name].add(out, read)
    return found


__all__ = ["BINS", "ChannelMoments", "Gram", "GramRead", "HIST_SAMPLES", "Probe", "RangeStats", "grams",
           "histograms", "moments", "sample_step", "stream"]
