"""The building step of `quant`: a quantized copy of the prepared float model following a plan —
activation parameters per shared-scale group (inside folded Relu/Clip ranges), integer weights
(per channel, guarded against u8s8 saturation), int32 biases and the Q/DQ pairs (`qdq` writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis import capture
from edgegraph.passes.quant import bias_correction, calibrate, numerics, rounding
from edgegraph.passes.quant.collect import collect, within_group
from edgegraph.passes.quant.numerics import QType
from edgegraph.passes.quant.prepare import MS_DOMAIN
from edgegraph.passes.quant.placement import ANCHORS, Plan, output_channels
from edgegraph.passes.quant.qdq import QdqWriter, QParams, QuantizedBias, QuantizedWeight, fit_bias, weight_params
from edgegraph.passes.quant.state import QuantRun

# A float32 slack ORT allows when it checks that a Q range lies within a Clip's range.
_CLIP_EPS = float(np.finfo(np.float32).eps)
# Share of a layer's input values allowed above u8 code 128 before `saturation_guard` acts.
SATURATION_FRACTION = 0.01


@dataclass
class Built:
    """What `build` made: parameters per point and the integer weights / biases (for bias correction)."""

    params: dict[str, QParams]
    writer: QdqWriter
    quantized: list[str]
    weights: list[QuantizedWeight] = field(default_factory=list)
    biases: list[QuantizedBias] = field(default_factory=list)
    guarded: list[str] = field(default_factory=list)  # layers given 7-bit / uint8 weights
    corrected: int = 0
    activations: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # point -> reader activation


def group_params(run: QuantRun, plan: Plan, wide: set[str] | frozenset[str]) -> dict[str, QParams]:
    """QParams per point: one per shared-scale group, fitted inside folded Relu/Clip ranges;
    int16 for groups holding a `wide` tensor."""
    params: dict[str, QParams] = {}
    run.group_stats = {}
    for members in plan.group_members().values():
        qt = numerics.qtype("int16") if wide.intersection(members) else run.o.activation_qtype
        merged = capture.RangeStats()
        for name in members:
            if name in run.stats:
                merged.merge_from(run.stats[name])
            run.group_stats[name] = merged
        readers = {plan.activations.get(m) for m in members}
        transfer = calibrate.transfer(*readers.pop()) if len(readers) == 1 and None not in readers else None
        lo, hi = calibrate.activation_range(merged, run.method, qt, run.o.symmetric_activations,
                                            run.o.percentile, transfer)
        bounds = [plan.clips[m] for m in members if m in plan.clips]
        floor = max((b[0] for b in bounds), default=-np.inf)
        ceiling = min((b[1] for b in bounds), default=np.inf)
        lo, hi = max(lo, floor), min(hi, ceiling)
        # Never-negative tensors keep the full range (zero point at qmin), which also lets ORT
        # drop a Relu in front of the Q; the others are symmetric only when asked.
        scale, zero = numerics.scale_zero_point(lo, hi, qt, run.o.symmetric_activations and lo < 0)
        shared = QParams(fit_inside(scale, zero, qt, floor, ceiling), zero, qt)
        params.update({name: shared for name in members})
    return params


def build(run: QuantRun, plan: Plan, wide: set[str] | frozenset[str] = frozenset()) -> tuple[ir.Model, Built]:
    """A quantized copy of the prepared float model following `plan` (with run.method ranges),
    bias-corrected when run.correct."""
    skipped = within_group(run, plan)
    missing = [p.name for p in plan.points if p.name not in run.stats and p.name not in skipped]
    if missing:  # a fallback plan can expose tensors the first plan did not quantize
        run.stats.update(collect(run, plan, missing, "quant: calibrating", "calibrate"))
    model = ir.from_proto(run.float_proto, infer=False)
    graph = model.graph
    by_name = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    params = group_params(run, plan, wide)
    writer = QdqWriter(graph, run.domain)
    built = Built(params, writer, quantized=[n.name for n in plan.quantized], activations=plan.activations)

    if run.rounding == "gram" and run.grams is None:
        run.grams = rounding.capture_grams(run, [slot.node.name for slot in plan.weights if slot.index == 1
                                                 and capture.layer_matrix(slot.node, ir.constant_value(
                                                     slot.node.inputs[1])) is not None])
    # Weights and biases first: a bias scale needs the scale of the node's input activation.
    biased = {b.node.name for b in plan.biases}
    for slot in plan.weights:
        node = by_name[slot.node.name]
        fold_gemm_scalars(node)
        value = ir.constant_value(node.inputs[slot.index]).astype(np.float32)
        input_params = params.get(node.inputs[0].name)
        weight_type, reduce_range = run.o.weight_qtype, run.o.reduce_range
        if saturates(run, node, input_params):
            built.guarded.append(node.name)
            if run.o.saturation_guard == "uint8-weights":
                weight_type = numerics.qtype("uint8")
            else:
                reduce_range = True
        wparams = weight_params(value, slot, weight_type, reduce_range, run.o.weight_method)
        bias = bias_value(node, value) if node.name in biased and input_params is not None else None
        if bias is not None:
            wparams = fit_bias(wparams, bias, input_params.scale)
        codes = writer.constant(node, slot.index, value, wparams, rounding.rounded_codes(run, node, slot.index, value,
                                                                                           wparams))
        weight = QuantizedWeight(node, slot.index, value, wparams, codes)
        built.weights.append(weight)
        if bias is not None:
            built.biases.append(writer.bias(node, weight, bias, input_params.scale))
    for plan_node, index in plan.constants:
        node = by_name[plan_node.name]
        value = ir.constant_value(node.inputs[index]).astype(np.float32)
        qt = run.o.activation_qtype
        scale, zero = numerics.scale_zero_point(value.min(initial=0.0), value.max(initial=0.0), qt, False)
        writer.constant(node, index, value, QParams(scale, zero, qt))
    quantized = {id(by_name[name]) for name in built.quantized}
    fuse_silu(run, graph, quantized)
    for point in plan.points:
        writer.activation(tensors[point.name], params[point.name], quantized)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if run.correct and built.biases:
        bias_correction.correct_biases(run, model, built)
    return model, built


def fuse_silu(run: QuantRun, graph: gs.Graph, quantized: set[int]) -> None:
    """With elementwise=float, each SiLU, Mul(x, Sigmoid(x)), left in float becomes one
    com.microsoft QuickGelu(x) (x * Sigmoid(x)) when the target runs that op (onnxruntime).
    onnxruntime makes that fusion itself in a float model, but not between a DequantizeLinear
    and a QuantizeLinear: it gives each reader of a DequantizeLinear its own copy, and the pair
    then reads two tensors (a Sigmoid, a Mul and two DequantizeLinear instead of one kernel:
    on YOLOX-nano's 1x32x104x104 tensors 0.25 vs 0.14 ms, 1 thread)."""
    target = run.ctx.target
    listed = target.ops is not None or target.ops_from is not None  # (no list: "every op", not this one)
    if run.elementwise != "float" or not listed or not target.supports_op("QuickGelu", MS_DOMAIN):
        return
    for mul in [n for n in graph.nodes if n.op == "Mul" and id(n) not in quantized and len(n.inputs) == 2]:
        for x, gate in (mul.inputs, mul.inputs[::-1]):
            sigmoid = ir.producer(gate)
            if (sigmoid is not None and sigmoid.op == "Sigmoid" and id(sigmoid) not in quantized
                    and sigmoid.inputs[0] is x and len(ir.consumers(gate)) == 1 and gate not in graph.outputs):
                out = mul.outputs[0]
                mul.inputs.clear(), mul.outputs.clear(), sigmoid.inputs.clear(), sigmoid.outputs.clear()
                graph.nodes.append(gs.Node("QuickGelu", name=f"{mul.name}_silu", domain=MS_DOMAIN, attrs={"alpha": 1.0},
                                           inputs=[x], outputs=[out]))
                break


def saturates(run: QuantRun, node: gs.Node, input_params: QParams | None) -> bool:
    """Whether this layer's u8 x s8 int16 pair sums would often saturate (see `saturation_guard`)."""
    if run.o.saturation_guard == "off" or input_params is None or run.o.reduce_range:
        return False
    if input_params.qtype.name != "uint8" or run.o.weight_type != "int8" or node.op not in ANCHORS:
        return False  # (ORT has no int8-activation x uint8-weight kernels)
    weight = ir.constant_value(node.inputs[1])
    if node.op == "Conv" and weight is not None and weight.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1:
        return False  # depthwise kernels multiply in int32
    stats = run.group_stats.get(node.inputs[0].name)
    if stats is None:
        return False
    scale = float(np.asarray(input_params.scale).reshape(()))
    zero = int(np.asarray(input_params.zero_point).reshape(()))
    # Above u8 code 128 the u8 x s8 pair sums can pass 32767 (2 * 128 * 127 = 32512).
    return stats.fraction_above((128 - zero) * scale) > SATURATION_FRACTION


def fit_inside(scale: np.ndarray, zero: np.ndarray, qt: QType, floor: float, ceiling: float) -> np.ndarray:
    """Shrink a scale by ulps until the representable range lies within [floor, ceiling] + eps,
    the test ORT applies before removing a Relu/Clip in front of a QuantizeLinear."""
    scale = np.float32(scale)
    zero = int(zero)
    for _ in range(64):
        low = np.float32(qt.qmin - zero) * scale
        high = np.float32(qt.qmax - zero) * scale
        if (floor - low <= _CLIP_EPS or not np.isfinite(floor)) and (high - ceiling <= _CLIP_EPS or not np.isfinite(ceiling)):
            break
        scale = np.nextafter(scale, np.float32(0))
    return np.asarray(scale, dtype=np.float32)


def fold_gemm_scalars(node: gs.Node) -> None:
    """Gemm alpha / beta folded into the constant weight / bias, so QGemm sees alpha = beta = 1."""
    if node.op != "Gemm":
        return
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if alpha != 1.0:
        node.inputs[1] = ir.const(node.inputs[1].name + "_alpha", ir.constant_value(node.inputs[1]) * np.float32(alpha))
        node.attrs["alpha"] = 1.0
    if beta != 1.0 and len(node.inputs) > 2 and node.inputs[2].name:
        value = ir.constant_value(node.inputs[2])
        if value is not None:
            node.inputs[2] = ir.const(node.inputs[2].name + "_beta", value * np.float32(beta))
            node.attrs["beta"] = 1.0


def bias_value(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The node's bias as a 1-D float array over output channels (zeros when it has none)."""
    channels = output_channels(node, weight)
    value = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if value is None:
        return np.zeros(channels, dtype=np.float32)
    return np.broadcast_to(value.reshape(-1).astype(np.float32), (channels,)).copy()


__all__ = ["Built", "build", "group_params"]
