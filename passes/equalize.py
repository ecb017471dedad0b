"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, "Data-Free Quantization").

Two layers joined by a channel-wise path, e.g. `Conv -> BN -> Relu -> MaxPool -> Conv`, compute
the same function when output channel c of the first is divided by s_c and input channel c of the
second multiplied by s_c, as long as every op on the path commutes with a positive per-channel
scale (ReLU, PReLU, max/average pooling, Resize, multiplication by a constant...) or has a
constant that can be rescaled with it (bias Add, BN gamma/beta, Min/Max bounds). Choosing
s_c = sqrt(r1_c / r2_c), where r1_c and r2_c are the ranges of the channel in the two weight
tensors, gives both the same range, which is what per-tensor weight quantization needs: one
channel with large weights no longer forces a coarse step on all the others (the MobileNet
depthwise case). Sweeps repeat over all pairs until the scales stop changing, so chains like
1x1 -> depthwise -> 1x1 converge jointly.

ReLU6 (Clip(0, 6)) is not scale-equivariant: clip(x / s, 0, 6) != clip(x, 0, 6) / s. With
`clip=skip` (default) a path through such a Clip is left alone. With `clip=rescale` the Clip
becomes Relu followed by Min with a per-channel bound 6 / s_c, which keeps the model exact at
the cost of one elementwise op per rewritten Clip (in float, DeepLabV3-MobileNetV2 runs ~20%
slower; after static quantization the Min is one more quantized op). Scales below 1 would lift
a bound above 6 and widen that tensor's activation range, which per-tensor activation
quantization pays for; `bound_growth` (default 1) caps how far a bound may rise.

High-bias absorption moves a per-channel constant β_c out of the pre-activation h of the first
layer into the bias of the second: when h_c >= β_c >= 0, relu(h_c) = relu(h_c - β_c) + β_c.
It shrinks activation ranges (the second step of DFQ after equalization boosted some biases).
`absorb_bias=calibration` takes β_c as the minimum of h_c over the calibration data (exact on
that data); `absorb_bias=bn` is the data-free estimate β_c = max(0, beta_c - 3 |gamma_c|) of a
BatchNormalization feeding the activation, which assumes Gaussian pre-activations and is
therefore approximate. Absorption needs the second layer to see the shift everywhere: a Conv
without padding, or a Gemm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, runtime
from edgegraph.analysis import capture, layout
from edgegraph.context import PassContext
from edgegraph.errors import MissingRequirementError
from edgegraph.ir import sort_nodes
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.registry import register_pass

CLIP_MODES = ("skip", "rescale")
ABSORB_MODES = ("none", "bn", "calibration")

# Ops that commute with a positive per-channel scale and need no change.
_COMMUTE = {"Relu", "LeakyRelu", "PRelu", "Identity", "Dropout"}
# The same, but only for NCHW tensors (they treat axis 1 as channels and the rest as space).
_COMMUTE_SPATIAL = {"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Upsample"}
_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu"}
# Ops after the activation through which a constant shift passes unchanged (for bias absorption).
_SHIFT_TRANSPARENT = {"Identity", "Dropout", "MaxPool", "GlobalMaxPool", "GlobalAveragePool"}


@dataclass
class _Layer:
    """A Conv / Gemm / MatMul with constant weights, as a float64 working copy.

    `out_major` is a view of the weight as (output channels, ...) and `in_view` as
    (groups, out per group, in per group, rest) so that scaling either side edits `weight`.
    """

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None  # per output channel (None: the layer has none yet)
    dtype: np.dtype
    bias_shape: tuple[int, ...] = ()  # as stored (a Gemm's C may be (1, N))

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def lay(self) -> layout.Layout:
        return layout.of(self.node, self.weight.ndim)

    @property
    def out_major(self) -> np.ndarray:
        return self.lay.out_major(self.weight)

    def _in_view(self) -> np.ndarray:
        return self.lay.in_view(self.weight)

    @property
    def out_channels(self) -> int:
        return self.out_major.shape[0]

    @property
    def in_channels(self) -> int:
        view = self._in_view()
        return view.shape[0] * view.shape[2]

    def out_ranges(self) -> np.ndarray:
        return np.abs(self.out_major).max(axis=1)

    def in_ranges(self) -> np.ndarray:
        return np.abs(self._in_view()).max(axis=(1, 3)).reshape(-1)

    def scale_out(self, s: np.ndarray) -> None:
        self.out_major[...] /= s[:, None]
        if self.bias is not None:
            self.bias /= s

    def scale_in(self, s: np.ndarray) -> None:
        view = self._in_view()
        view *= s.reshape(view.shape[0], 1, view.shape[2], 1)

    def in_sums(self, shift: np.ndarray) -> np.ndarray:
        """Per output channel, what the layer adds when every input channel c grows by shift[c]."""
        view = self._in_view()  # (g, out/g, in/g, k)
        per_group = np.einsum("gojk,gj->go", view, shift.reshape(view.shape[0], view.shape[2]))
        return per_group.reshape(-1)


@dataclass
class _Step:
    node: gs.Node
    kind: str  # commute | bn | offset | bound | clip | flatten
    const_index: int = -1  # input holding the constant of offset / bound steps


@dataclass
class _Link:
    """head -> steps -> tails: the channels of head's output reach every tail's input channels."""

    head: _Layer
    steps: list[_Step]
    tails: list[_Layer]
    channels: int
    channel_axis: int  # 1 for NCHW outputs of Conv, -1 for Gemm / MatMul
    rank: int | None
    repeat: int = 1  # features per channel after a Flatten (tails read channels * repeat inputs)
    total: np.ndarray = field(default=None)  # accumulated scale per channel
    bn: dict = field(default_factory=dict)  # the finder's BatchNormalization parameters
    consts: dict = field(default_factory=dict)  # the finder's path constants

    def scale_point(self) -> int:
        """Index of the last BatchNormalization step (where scaling is applied), -1 for the head."""
        return max((i for i, s in enumerate(self.steps) if s.kind == "bn"), default=-1)

    @property
    def name(self) -> str:
        return self.head.node.name


@register_pass
@dataclass(frozen=True)
class Equalize(Pass):
    """Cross-layer equalization (+ optional high-bias absorption), keeping outputs unchanged."""

    name = "equalize"
    summary = "Cross-layer equalization of Conv/Gemm pairs so per-tensor weight quantization loses less"
    exact = True

    clip: str = option("skip", "Clip/ReLU6 between two layers: 'skip' leaves the pair alone (ReLU6 is not "
                       "scale-equivariant); 'rescale' rewrites the Clip as Relu + Min with per-channel bounds "
                       "so the pair is equalized exactly (one extra elementwise op each)")
    bound_growth: float = option(1.0, "with clip=rescale, how far a channel's ReLU6 bound may rise above the "
                                 "original (6 -> 6 * bound_growth): 1 keeps activation ranges from growing, which "
                                 "per-tensor activation quantization needs; larger values balance weights further "
                                 "(best for weight-only quantization)")
    iterations: int = option(100, "maximum sweeps over all layer pairs (chains converge jointly)")
    tolerance: float = option(1e-3, "stop when no channel scale of a sweep differs from 1 by more than this")
    max_scale: float = option(1e4, "bound on any channel's accumulated scale (and its inverse), to keep "
                              "near-dead channels from blowing up the other layer")
    absorb_bias: str = option("none", "high-bias absorption: 'none'; 'calibration' (minimum pre-activation "
                              "over the calibration data, exact on it); 'bn' (data-free beta - 3|gamma| of a "
                              "BatchNormalization before the activation, approximate)")

    def __post_init__(self):
        self.check(self.clip in CLIP_MODES, f"equalize: clip must be one of {', '.join(CLIP_MODES)}, got '{self.clip}'")
        self.check(self.absorb_bias in ABSORB_MODES,
                   f"equalize: absorb_bias must be one of {', '.join(ABSORB_MODES)}, got '{self.absorb_bias}'")
        self.check(self.iterations >= 1, f"equalize: iterations must be >= 1, got {self.iterations}")
        self.check(0 < self.tolerance < 1, f"equalize: tolerance must be in (0, 1), got {self.tolerance}")
        self.check(self.max_scale > 1, f"equalize: max_scale must be > 1, got {self.max_scale}")
        self.check(self.bound_growth >= 1, f"equalize: bound_growth must be >= 1, got {self.bound_growth}")

    def context_needs(self) -> frozenset[str]:
        # Only this mode reads data; the class-level `needs` stays empty.
        return frozenset({"calibration"}) if self.absorb_bias == "calibration" else self.needs

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if self.absorb_bias == "calibration" and ctx.calibration is None:
            raise MissingRequirementError("equalize(absorb_bias=calibration) needs calibration data (--calib)")
        graph = model.graph
        finder = _LinkFinder(graph, model.opset, self.clip == "rescale")
        links = finder.links()
        stats = {"pairs": len(links), "layers": len(finder.layers), "sweeps": 0, "pairs_scaled": 0}
        if not links:
            return PassResult(False, stats)
        tensors = {id(layer): layer for link in links for layer in (link.head, *link.tails)}
        before = {key: _imbalance(layer, links) for key, layer in tensors.items()}

        sweeps = self._equalize(links)
        stats["sweeps"] = sweeps
        namer = ir.Namer(graph)
        changed = [link for link in links if np.max(np.abs(np.log(link.total))) > 1e-6]
        stats["pairs_scaled"] = len(changed)
        stats["clips_rescaled"] = _commit(graph, finder, links, namer)

        after = {key: _imbalance(layer, links) for key, layer in tensors.items()}
        valid = [k for k in before if before[k] > 0 and after[k] > 0]
        if valid:
            stats["range_ratio_before"] = _geomean([before[k] for k in valid])
            stats["range_ratio_after"] = _geomean([after[k] for k in valid])
            stats["worst_range_ratio_before"] = max(before[k] for k in valid)
            stats["worst_range_ratio_after"] = max(after[k] for k in valid)
        details = {"pairs": [
            {"head": link.name, "tails": [t.node.name for t in link.tails], "channels": link.channels,
             "scale_min": float(link.total.min()), "scale_max": float(link.total.max()),
             "head_range_ratio": [before[id(link.head)], after[id(link.head)]]}
            for link in links]}

        absorbed = 0
        if self.absorb_bias != "none":
            sort_nodes(graph)  # absorption runs the model: the nodes _commit added must be in order
            absorbed = _absorb_biases(model, finder, links, self.absorb_bias, ctx, namer)
            stats["bias_channels_absorbed"] = absorbed
        return PassResult(bool(changed) or absorbed > 0, stats, details)

    def _equalize(self, links: list[_Link]) -> int:
        limit = math.log(self.max_scale)
        # A bound b on the path becomes b / scale: scales below 1 / bound_growth would raise it further.
        bounded = {id(link): any(s.kind in ("clip", "bound") for s in link.steps) for link in links}
        floor = max(-limit, -math.log(self.bound_growth))
        for sweep in range(1, self.iterations + 1):
            worst = 0.0
            for link in links:
                r1 = link.head.out_ranges() * _gain(link)
                r2 = link.tails[0].in_ranges()
                for tail in link.tails[1:]:
                    r2 = np.maximum(r2, tail.in_ranges())
                if link.repeat > 1:
                    r2 = r2.reshape(link.channels, link.repeat).max(axis=1)
                ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
                log_s = np.where(ok, 0.5 * (np.log(np.where(ok, r1, 1)) - np.log(np.where(ok, r2, 1))), 0.0)
                # Keep the accumulated scale within bounds (near-dead channels).
                log_total = np.log(link.total)
                low = floor if bounded[id(link)] else -limit
                log_s = np.clip(log_total + log_s, low, limit) - log_total
                s = np.exp(log_s)
                _apply(link, s)
                worst = max(worst, float(np.max(np.abs(s - 1))))
            if worst < self.tolerance:
                return sweep
        return self.iterations


# ---------------------------------------------------------------------------------------------
# Finding the pairs.


class _LinkFinder:
    def __init__(self, graph: gs.Graph, opset: int, rescale_clips: bool):
        self.graph, self.opset, self.rescale_clips = graph, opset, rescale_clips
        self.layers: dict[int, _Layer] = {}  # id(node) -> working copy, shared by the links using it
        self.bn: dict[int, dict[str, np.ndarray]] = {}  # id(node) -> gamma, beta, mean, var, eps
        self.consts: dict[tuple[int, int], np.ndarray] = {}  # (id(node), input index) -> constant
        self._outputs = {id(t) for t in graph.outputs}

    def links(self) -> list[_Link]:
        found = []
        for node in self.graph.nodes:
            head = self.layer(node)
            if head is None:
                continue
            link = self._follow(head)
            if link is not None:
                found.append(link)
        return found

    def layer(self, node: gs.Node) -> _Layer | None:
        """The working copy of a Conv / Gemm / MatMul with constant float weights, else None."""
        if id(node) in self.layers:
            return self.layers[id(node)]
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or (node.domain or "") != "":
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return None
        weight = ir.folded_value(node.inputs[1], self.opset)
        if weight is None or weight.dtype not in (np.float32, np.float64):
            return None  # computed weights, or fp16 (rounding would break exactness)
        if node.op == "Conv" and weight.ndim < 3 or node.op != "Conv" and weight.ndim != 2:
            return None
        if ir.constant_value(node.inputs[0]) is not None:
            return None
        bias = None
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
            bias = ir.folded_value(node.inputs[2], self.opset)
            out = layout.of(node, weight.ndim).output_channels(weight.shape)
            if bias is None or bias.size not in (1, out) or bias.size == 1 and out != 1 and node.op == "Conv":
                return None
            if node.op == "Gemm" and (bias.ndim > 2 or bias.ndim == 2 and bias.shape[0] != 1):
                return None  # a (M, N) C is not a per-channel bias
        bias_shape = ()
        if bias is not None:
            bias_shape = bias.shape
            bias = np.broadcast_to(bias.reshape(-1), (out,)).astype(np.float64)
        layer = _Layer(node, weight.astype(np.float64), bias, weight.dtype, bias_shape)
        self.layers[id(node)] = layer
        return layer

    def _single_user(self, tensor: gs.Tensor) -> gs.Node | None:
        users = ir.consumers(tensor)
        if len(users) != 1 or id(tensor) in self._outputs:
            return None
        return users[0]

    def _follow(self, head: _Layer) -> _Link | None:
        conv = head.op == "Conv"
        axis = 1 if conv else -1
        rank = head.weight.ndim if conv else None
        channels = head.out_channels
        tensor = head.node.outputs[0]
        steps: list[_Step] = []
        while True:
            users = ir.consumers(tensor)
            if not users or id(tensor) in self._outputs:
                return None
            tails = [self.layer(u) for u in users]
            if all(t is not None and t.node.inputs[0] is tensor and t.node.inputs[1] is not tensor for t in tails):
                return self._make(head, steps, tails, channels, axis, rank, tensor)
            user = self._single_user(tensor)
            if user is None:
                return None
            step = self._step(user, tensor, conv, channels, rank)
            if step is None:
                return None
            steps.append(step)
            if step.kind == "flatten":
                return self._flatten_tail(head, steps, channels, axis, rank, tensor, user)
            extra = [o for o in user.outputs[1:] if ir.consumers(o) or id(o) in self._outputs]
            if extra:
                return None
            tensor = user.outputs[0]

    def _make(self, head, steps, tails, channels, axis, rank, tensor, repeat=1) -> _Link | None:
        if any(t.in_channels != channels * repeat for t in tails) or any(t is head for t in tails):
            return None
        return _Link(head, steps, tails, channels, axis, rank, repeat, np.ones(channels), self.bn, self.consts)

    def _flatten_tail(self, head, steps, channels, axis, rank, before, flatten) -> _Link | None:
        shape = before.shape
        if not shape or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return None
        spatial = int(shape[2] * shape[3])
        out = flatten.outputs[0]
        users = ir.consumers(out)
        if not users or id(out) in self._outputs:
            return None
        tails = [self.layer(u) for u in users]
        if not all(t is not None and t.op != "Conv" and t.node.inputs[0] is out for t in tails):
            return None
        return self._make(head, steps, tails, channels, axis, rank, out, repeat=spatial)

    def _step(self, node: gs.Node, tensor: gs.Tensor, conv: bool, channels: int, rank: int | None) -> _Step | None:
        if (node.domain or "") != "" or node.inputs[0] is not tensor and node.op not in ("Add", "Mul", "Min", "Max"):
            return None
        op = node.op
        if op in _COMMUTE or op in _COMMUTE_SPATIAL and conv:
            if op == "PRelu" and node.inputs[1] is tensor:
                return None
            if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
                value = ir.constant_value(node.inputs[2])  # training_mode
                if value is None or bool(value):
                    return None
            return _Step(node, "commute")
        if op == "BatchNormalization":
            return self._bn_step(node, channels) if conv else None
        if op == "Clip":
            lo, hi = self._clip_bounds(node)
            if lo is None and hi is None:
                return None
            if (lo[0] in (0.0, -np.inf) and hi[0] == np.inf):
                return _Step(node, "commute")
            return _Step(node, "clip") if self.rescale_clips else None
        if op in ("Add", "Sub", "Mul", "Div", "Min", "Max"):
            if len(node.inputs) != 2:
                return None
            index = 1 if node.inputs[0] is tensor else 0
            if node.inputs[index] is tensor or op in ("Sub", "Div") and index == 0:
                return None  # x op x, c - x, c / x
            value = ir.folded_value(node.inputs[index], self.opset)
            if value is None or value.dtype.kind != "f" or _per_channel(value, channels, rank) is None:
                return None
            self.consts[(id(node), index)] = value
            kind = {"Mul": "commute", "Div": "commute", "Add": "offset", "Sub": "offset"}.get(op, "bound")
            return _Step(node, kind, index)
        if op in ("Flatten", "Reshape") and conv and rank == 4:
            if op == "Flatten" and node.attrs.get("axis", 1) != 1:
                return None
            if op == "Reshape":
                target = ir.constant_value(node.inputs[1])
                shape = tensor.shape
                if target is None or target.size != 2 or not shape or len(shape) != 4:
                    return None
                dims = shape[1:]
                if not all(isinstance(d, int) and d > 0 for d in dims):
                    return None
                features = int(np.prod(dims))
                batch_ok = target[0] in (0, -1) or isinstance(shape[0], int) and target[0] == shape[0]
                if not (target[1] == features and batch_ok or target[1] == -1 and
                        (target[0] == 0 or isinstance(shape[0], int) and target[0] == shape[0])):
                    return None
            return _Step(node, "flatten")
        return None

    def _bn_step(self, node: gs.Node, channels: int) -> _Step | None:
        if node.attrs.get("training_mode", 0) or len(node.inputs) != 5:
            return None
        params = [ir.folded_value(t, self.opset) for t in node.inputs[1:]]
        if any(p is None or p.size != channels or p.dtype.kind != "f" for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        self.bn[id(node)] = {"gamma": gamma, "beta": beta, "mean": mean, "var": var,
                             "eps": float(node.attrs.get("epsilon", 1e-5)), "dtype": params[0].dtype}
        return _Step(node, "bn")

    def _clip_bounds(self, node: gs.Node):
        """((lo,), (hi,)) as floats with ±inf for absent bounds, or (None, None) if not constant."""
        if self.opset < 11 or "min" in node.attrs or "max" in node.attrs:
            lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
            return (float(lo),), (float(hi),)
        bounds = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            if len(node.inputs) > index and node.inputs[index].name:
                value = ir.constant_value(node.inputs[index])
                if value is None or value.size != 1:
                    return None, None
                bounds.append((float(value.reshape(())),))
            else:
                bounds.append((default,))
        return bounds[0], bounds[1]


def _per_channel(value: np.ndarray, channels: int, rank: int | None) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis only, as a (channels,) vector, else None.

    `rank` None means channels last. A single value may have any rank: it is rescaled, never removed.
    """
    value = np.asarray(value)
    if value.size == 1:
        return np.full(channels, float(value.reshape(())))
    return layout.channel_vector(value, value.ndim if rank is None else rank, channels, channels_last=rank is None)


def _channel_shape(link: _Link, original: np.ndarray) -> tuple[int, ...]:
    """Shape of a per-channel version of a constant that broadcasts like `original` did."""
    if link.rank is None:
        return (link.channels,) if original.ndim <= 1 else (1,) * (original.ndim - 1) + (link.channels,)
    ndim = max(original.ndim, link.rank - 1)  # (C, 1, 1) for NCHW
    return (link.channels,) + (1,) * (ndim - 1) if ndim == link.rank - 1 else \
        (1,) * (ndim - link.rank + 1) + (link.channels,) + (1,) * (link.rank - 2)


# ---------------------------------------------------------------------------------------------
# Equalization arithmetic on the working copies.


def _gain(link: _Link) -> np.ndarray:
    """Per-channel factor between the head's weights and the pre-activation (BN and Mul/Div)."""
    gain = np.ones(link.channels)
    for step in link.steps:
        if step.node.op in _ACTIVATIONS or step.kind in ("clip", "bound"):
            break  # what follows the activation is not folded into the head's weights
        if step.kind == "bn":
            p = link.bn[id(step.node)]
            gain = gain * np.abs(p["gamma"] / np.sqrt(p["var"] + p["eps"]))
        elif step.kind == "commute" and step.node.op in ("Mul", "Div"):
            factor = np.abs(_per_channel(link.consts[(id(step.node), step.const_index)], link.channels, link.rank))
            gain = gain * (factor if step.node.op == "Mul" else 1 / np.where(factor > 0, factor, 1))
    return gain


def _apply(link: _Link, s: np.ndarray) -> None:
    point = link.scale_point()
    if point < 0:
        link.head.scale_out(s)
    else:
        p = link.bn[id(link.steps[point].node)]
        p["gamma"] /= s
        p["beta"] /= s
    expanded = np.repeat(s, link.repeat)
    for tail in link.tails:
        tail.scale_in(expanded)
    link.total = link.total * s


def _imbalance(layer: _Layer, links: list[_Link]) -> float:
    """max / min over output channels of the weight range (BN folded in), ignoring dead channels."""
    ranges = layer.out_ranges()
    for link in links:
        if link.head is layer:
            ranges = ranges * _gain(link)
            break
    # Channels below 1e-6 of the largest are dead (they quantize to zero under any scheme).
    alive = ranges[ranges > 1e-6 * ranges.max(initial=0.0)]
    return float(alive.max() / alive.min()) if alive.size else 0.0


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


# ---------------------------------------------------------------------------------------------
# Writing the result back into the graph.


def _set_input(graph_node: gs.Node, index: int, values: np.ndarray, namer: ir.Namer) -> None:
    """Give input `index` of a node new constant values, in place when nobody else reads them."""
    tensor = graph_node.inputs[index]
    if isinstance(tensor, gs.Constant) and len(ir.consumers(tensor)) == 1:
        tensor.values = np.ascontiguousarray(values)
    else:
        base = tensor.name or f"{graph_node.name}_in{index}"
        graph_node.inputs[index] = ir.const(namer(f"{base}_eq"), values)


def _write_layer(layer: _Layer, namer: ir.Namer) -> None:
    node = layer.node
    _set_input(node, 1, layer.weight.astype(layer.dtype), namer)
    if layer.bias is None:
        return
    two_d = node.op == "Gemm" and len(layer.bias_shape) == 2
    bias = (layer.bias.reshape(1, -1) if two_d else layer.bias).astype(layer.dtype)
    if len(node.inputs) > 2 and node.inputs[2].name:
        _set_input(node, 2, bias, namer)
    else:
        if len(node.inputs) > 2:  # an empty optional input
            node.inputs[2] = ir.const(namer(f"{node.name}_bias"), bias)
        else:
            node.inputs.append(ir.const(namer(f"{node.name}_bias"), bias))


def _commit(graph: gs.Graph, finder: _LinkFinder, links: list[_Link], namer: ir.Namer) -> int:
    """Write weights, BN parameters and rescaled path constants; returns the number of Clips rewritten."""
    for layer in finder.layers.values():
        if any(layer is link.head or layer in link.tails for link in links):
            _write_layer(layer, namer)
    for node_id, p in finder.bn.items():
        node = next((s.node for link in links for s in link.steps if id(s.node) == node_id), None)
        if node is not None:
            _set_input(node, 1, p["gamma"].astype(p["dtype"]), namer)
            _set_input(node, 2, p["beta"].astype(p["dtype"]), namer)
    rewritten = 0
    for link in links:
        point = link.scale_point()
        if np.allclose(link.total, 1.0, rtol=0, atol=1e-12):
            continue
        new_steps = link.steps[:point + 1]
        for step in link.steps[point + 1:]:
            if step.kind in ("offset", "bound"):
                value = finder.consts[(id(step.node), step.const_index)]
                vector = _per_channel(value, link.channels, link.rank) / link.total
                _set_input(step.node, step.const_index,
                           vector.reshape(_channel_shape(link, value)).astype(value.dtype), namer)
                new_steps.append(step)
            elif step.kind == "clip":
                new_steps.extend(_rewrite_clip(graph, finder, link, step.node, namer))
                rewritten += 1
            else:
                new_steps.append(step)
        link.steps = new_steps
    return rewritten


def _rewrite_clip(graph: gs.Graph, finder: _LinkFinder, link: _Link, clip: gs.Node, namer: ir.Namer) -> list[_Step]:
    """Clip(x, lo, hi) on scaled channels -> Relu / Max(x, lo / s) then Min(x, hi / s)."""
    (lo,), (hi,) = finder._clip_bounds(clip)
    dtype = clip.inputs[0].dtype or np.float32
    shape = _channel_shape(link, np.zeros(()))
    source, result = clip.inputs[0], clip.outputs[0]
    clip.inputs.clear()
    clip.outputs.clear()
    steps, current = [], source
    parts = []
    if lo == 0.0:
        parts.append(("Relu", None))
    elif lo != -np.inf:
        parts.append(("Max", np.full(link.channels, lo) / link.total))
    if hi != np.inf:
        parts.append(("Min", np.full(link.channels, hi) / link.total))
    for i, (op, bound) in enumerate(parts):
        out = result if i == len(parts) - 1 else gs.Variable(namer(f"{result.name}_{op.lower()}"), dtype=source.dtype)
        inputs = [current]
        if bound is not None:
            inputs.append(ir.const(namer(f"{clip.name or 'clip'}_{op.lower()}_bound"),
                                   bound.reshape(shape).astype(dtype)))
        node = gs.Node(op, name=namer(f"{clip.name or 'clip'}_{op.lower()}"), inputs=inputs, outputs=[out])
        graph.nodes.append(node)
        if bound is not None:
            finder.consts[(id(node), 1)] = np.asarray(node.inputs[1].values)
        steps.append(_Step(node, "commute" if bound is None else "bound", -1 if bound is None else 1))
        current = out
    return steps


# ---------------------------------------------------------------------------------------------
# High-bias absorption.


def _absorb_biases(model: ir.Model, finder: _LinkFinder, links: list[_Link], mode: str, ctx: PassContext,
                   namer: ir.Namer) -> int:
    candidates = []
    for link in links:
        plan = _absorption_plan(link)
        if plan is not None:
            candidates.append((link, plan))
    if not candidates:
        return 0
    if mode == "calibration":
        shifts = _calibrated_minimums(model, [link.steps[act].node.inputs[0] for link, act in candidates], ctx)
    else:
        shifts = [_bn_shift(link, act) for link, act in candidates]
    absorbed = 0
    for (link, act), beta in zip(candidates, shifts):
        if beta is None:
            continue
        beta = np.maximum(beta, 0.0)
        if not np.any(beta > 0):
            continue
        _shift_link(link, act, beta, namer)
        absorbed += int(np.count_nonzero(beta))
    return absorbed


def _absorption_plan(link: _Link) -> int | None:
    """Index of the activation step through which a shift can be absorbed, or None."""
    point = link.scale_point()
    act = next((i for i, s in enumerate(link.steps) if s.node.op in _ACTIVATIONS), None)
    if act is None or act <= point:
        return None
    if link.head.bias is None and point < 0 and link.head.op != "Conv":
        return None
    if any(s.kind != "offset" and s.node.op not in ("Identity", "Dropout") for s in link.steps[point + 1:act]):
        return None
    for step in link.steps[act + 1:]:
        node = step.node
        if step.kind in ("bound", "flatten") or node.op in _SHIFT_TRANSPARENT:
            if node.op == "Max":
                return None  # max(x - b, c) needs c - b, which is a "bound" step too, but keep it simple
            continue
        if node.op == "AveragePool" and (not any(node.attrs.get("pads", [])) and
                                         node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
                                         or not node.attrs.get("count_include_pad", 0)):
            continue
        return None
    for tail in link.tails:
        node = tail.node
        if tail.op == "MatMul":
            return None
        if tail.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 0.0:
            return None
        if tail.op == "Conv" and (any(node.attrs.get("pads", [])) or
                                  node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            return None
    return act


def _calibrated_minimums(model: ir.Model, tensors: list[gs.Tensor], ctx: PassContext) -> list[np.ndarray]:
    names = [t.name for t in tensors]
    specs = runtime.input_specs(model.to_proto())
    batch = runtime.batch_size_for(specs, 8)
    lows: dict[str, np.ndarray] = {}
    data = ctx.calibration
    batches = ctx.progress_bar(data.batches(batch), total=-(-len(data) // batch), desc="equalize: bias ranges")
    for values in capture.stream(model, names, batches, threads=ctx.threads):
        for name, array in values.items():
            axis = 1 if array.ndim >= 3 else array.ndim - 1
            low = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).min(axis=1).astype(np.float64)
            lows[name] = low if name not in lows else np.minimum(lows[name], low)
    return [lows.get(name) for name in names]


def _bn_shift(link: _Link, act: int) -> np.ndarray | None:
    point = link.scale_point()
    if point < 0 or point != act - 1:
        return None  # BN must feed the activation directly
    p = link.bn[id(link.steps[point].node)]
    return p["beta"] - 3 * np.abs(p["gamma"])


def _shift_link(link: _Link, act: int, beta: np.ndarray, namer: ir.Namer) -> None:
    """Subtract beta before the activation and add its effect to every tail's bias."""
    point = link.scale_point()
    if point < 0:
        head = link.head
        if head.bias is None:
            head.bias = np.zeros(head.out_channels)
        head.bias -= beta
        _write_layer(head, namer)
    else:
        node = link.steps[point].node
        p = link.bn[id(node)]
        p["beta"] -= beta
        _set_input(node, 2, p["beta"].astype(p["dtype"]), namer)
    for step in link.steps[act + 1:]:
        if step.kind == "bound":
            value = np.asarray(ir.constant_value(step.node.inputs[step.const_index]))
            vector = _per_channel(value, link.channels, link.rank) - beta
            _set_input(step.node, step.const_index,
                       vector.reshape(_channel_shape(link, value)).astype(value.dtype), namer)
    shift = np.repeat(beta, link.repeat)
    for tail in link.tails:
        extra = tail.in_sums(shift)
        if tail.op == "Gemm":
            extra = extra * float(tail.node.attrs.get("alpha", 1.0)) / float(tail.node.attrs.get("beta", 1.0))
        tail.bias = extra if tail.bias is None else tail.bias + extra
        _write_layer(tail, namer)
