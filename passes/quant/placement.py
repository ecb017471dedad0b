"""Where Q/DQ pairs go: which nodes run in integer arithmetic and which tensors share a scale.

The plan is made for what onnxruntime's QDQ fusions turn into integer kernels on CPU:

* Anchors - Conv, ConvTranspose, Gemm, MatMul - are always quantized: they hold the weights and
  the compute. Their weights become int8 initializers behind a per-channel DequantizeLinear, and
  a Conv/Gemm bias becomes int32 with scale input_scale * weight_scale (what QLinearConv /
  QGemm need to fuse).
* Other compute ops (Add, Mul, pools, Sigmoid, LeakyRelu, ...) are quantized only when their
  output feeds quantized ops; one that would only hand its result back to float ops costs an
  extra rounding and saves nothing.
* Data-movement ops (MaxPool, Reshape, Transpose, Slice, Resize, Concat, ...) are quantized when
  their inputs are already integer or their output feeds quantized ops, with ONE scale shared by
  their inputs and outputs, so ORT can run them on int8 data and drop the Q/DQ around them.
  Those that only lead to graph outputs (the "tail", e.g. a detector's final Concat/Transpose or
  a segmenter's final Resize) stay float: quantizing them saves nothing and costs precision.
* A Relu or constant Clip right after a quantized op is folded into that op's output range: the
  Q goes after the activation, with a range ORT can prove makes it redundant and remove.
* Gemm / MatMul results read only by float ops stay float (QGemm / MatMulIntegerToFloat).

Only the top-level graph is planned; subgraphs of If/Loop stay float.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, targets
from edgegraph.analysis import encoding, layout

# What onnxruntime fuses into integer kernels on CPU lives in the `cpu` target profile
# (edgegraph/targets/cpu.toml, [quant.placement]); the plan is made for it.
_PLACEMENT = targets.load("cpu").quant.placement
ANCHORS = _PLACEMENT["anchors"]
FLOAT_OUTPUT_OK = _PLACEMENT["float_output_ok"]  # ORT fuses these without a Q on the output
COMPUTE = _PLACEMENT["compute"]
# Ops whose outputs hold values of their (first) input, so input and outputs can share one scale.
SHARED = _PLACEMENT["shared"]
SUPPORTED = ANCHORS | COMPUTE | SHARED
FOLDABLE_ACTIVATIONS = _PLACEMENT["foldable_activations"]
BIASED = frozenset({"Conv", "ConvTranspose", "Gemm"})  # anchors with an int32 bias input


@dataclass
class WeightSlot:
    """A constant weight input quantized per channel along `axis` (None = per tensor)."""

    node: gs.Node
    index: int
    axis: int | None


@dataclass
class BiasSlot:
    """A bias input stored as int32 with scale input_scale * weight_scale."""

    node: gs.Node
    index: int
    weight: WeightSlot


@dataclass
class Plan:
    quantized: list[gs.Node]  # nodes that run on integers, in graph order
    points: list[gs.Variable]  # activation tensors that get a QuantizeLinear -> DequantizeLinear
    groups: dict[str, str]  # point name -> representative name of its shared-scale group
    clips: dict[str, tuple[float, float]]  # point name -> (min, max) of a folded Relu/Clip
    activations: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # point -> reader activation
    weights: list[WeightSlot] = field(default_factory=list)
    biases: list[BiasSlot] = field(default_factory=list)
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)  # constant operands quantized like activations
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float

    def group_members(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for name in (p.name for p in self.points):
            members.setdefault(self.groups[name], []).append(name)
        return members

    def result_point(self, node: gs.Node) -> str | None:
        """The quantized tensor carrying a quantized node's result: its output, or the output of
        the Relu / Clip folded after it (None when its result stays float)."""
        names = {p.name for p in self.points}
        out = node.outputs[0]
        if out.name in names:
            return out.name
        users = ir.consumers(out)
        if len(users) == 1 and clip_bounds(users[0]) is not None and users[0].outputs[0].name in names:
            return users[0].outputs[0].name
        return None


def data_inputs(node: gs.Node) -> list[int]:
    """Indices of the inputs that carry activations (not shapes, indices, axes or sizes)."""
    present = [i for i, t in enumerate(node.inputs) if t is not None and t.name]
    if node.op in ("Concat", "Add", "Mul") or node.op in ANCHORS:
        return present
    return [0] if present and present[0] == 0 else []


def is_float(tensor: gs.Tensor) -> bool:
    dtype = tensor.dtype if not isinstance(tensor, gs.Constant) else tensor.values.dtype
    return ir.numpy_dtype(dtype) == np.float32


def weight_axis(node: gs.Node, weight: np.ndarray) -> int | None:
    """The output-channel axis of a weight, where per-channel scales go (None: per tensor only)."""
    if node.op == "MatMul" and weight.ndim != 2:
        return None
    lay = layout.of(node, weight.ndim) if node.op in _LINEAR else None
    return lay.out_axis if lay is not None and lay.per_axis else None


def output_channels(node: gs.Node, weight: np.ndarray) -> int | None:
    """Number of output channels of a Conv / ConvTranspose / Gemm with this constant weight."""
    lay = layout.of(node, weight.ndim) if node.op in _LINEAR and node.op != "MatMul" else None
    return None if lay is None else lay.output_channels(weight.shape)


_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def constant_input(node: gs.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index] is None or not node.inputs[index].name:
        return None
    return ir.constant_value(node.inputs[index])


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Relu, or of a Clip with constant bounds; None otherwise."""
    if node.op == "Relu":
        return 0.0, float("inf")
    if node.op != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index < len(node.inputs) and node.inputs[index] is not None and node.inputs[index].name:
            value = constant_input(node, index)
            if value is None or value.size != 1:
                return None
            bounds.append(float(value.reshape(())))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


def reader_activation(tensor: gs.Tensor) -> tuple[str, float, float] | None:
    """The activation every reader of `tensor` applies, as (name, alpha, beta), or None.

    Recognised: SiLU (Sigmoid + Mul(x, sigmoid(x))), HardSwish (HardSigmoid + Mul), and a lone
    Sigmoid, Tanh, HardSigmoid or Relu. Quantization error of such a tensor only matters as far
    as it survives the activation, which the range search then accounts for.
    """
    users = ir.consumers(tensor)
    ops = sorted(u.op for u in users)
    if len(users) == 1 and ops[0] in ("Sigmoid", "Tanh", "Relu", "HardSigmoid"):
        user = users[0]
        if user.op == "HardSigmoid":
            return "hardsigmoid", float(user.attrs.get("alpha", 0.2)), float(user.attrs.get("beta", 0.5))
        return user.op.lower(), 0.2, 0.5
    if len(users) == 2 and ops in (["Mul", "Sigmoid"], ["HardSigmoid", "Mul"]):
        gate = next(u for u in users if u.op != "Mul")
        mul = next(u for u in users if u.op == "Mul")
        if {t.name for t in mul.inputs} == {tensor.name, gate.outputs[0].name} and len(ir.consumers(gate.outputs[0])) == 1:
            if gate.op == "Sigmoid":
                return "silu", 0.2, 0.5
            return "hardswish", float(gate.attrs.get("alpha", 0.2)), float(gate.attrs.get("beta", 0.5))
    return None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class Planner:
    """Builds a `Plan` for one graph; `float_nodes` are node names forced to stay float."""

    def __init__(self, graph: gs.Graph, ops: Iterable[str], float_nodes: Iterable[str] = (),
                 per_channel: bool = True):
        self.graph = graph
        self.ops = frozenset(ops) & SUPPORTED
        self.float_nodes = set(float_nodes)
        self.per_channel = per_channel
        self.outputs = {t.name for t in graph.outputs}
        self.skipped: dict[str, str] = {}

    # -- eligibility ---------------------------------------------------------------------------

    def eligible(self, node: gs.Node) -> bool:
        reason = self._ineligible(node)
        if reason and node.op in SUPPORTED:
            self.skipped[node.name] = reason
        return reason is None

    def _ineligible(self, node: gs.Node) -> str | None:
        if node.op not in self.ops or not ir.is_standard(node):
            return "op not quantized for this target" if node.op in SUPPORTED else "op has no int8 kernel"
        if node.name in self.float_nodes:
            return "kept float by option or sensitivity"
        indices = data_inputs(node)
        if not indices:
            return "no activation input"
        for i in indices:
            if not is_float(node.inputs[i]):
                return "input is not float32"
            code = encoding.encoded(node.inputs[i])
            if code is not None:  # a second Q/DQ would only add error; quantizing it anew would decode it
                return f"weight already stored encoded ({code.kind})"
        if all(ir.constant_value(node.inputs[i]) is not None for i in indices):
            return "all inputs constant (a constant subgraph: `cleanup` folds it)"
        if node.op == "MaxPool" and len(node.outputs) > 1 and ir.consumers(node.outputs[1]):
            return "MaxPool indices output is used"
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return "Resize mode has no int8 kernel"
        if node.op in BIASED:
            weight = ir.constant_value(node.inputs[1])
            if weight is None:
                return "weights computed at run time"
            if output_channels(node, weight) is None:
                return "weights have an unexpected shape"
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                bias = ir.constant_value(node.inputs[2])
                if bias is None or not is_float(node.inputs[2]) or bias.size not in (1, output_channels(node, weight)):
                    return "bias is not a constant per output channel"
        if any(not is_float(o) for o in node.outputs[:1]):
            return "output is not float32"
        return None

    # -- helpers -------------------------------------------------------------------------------

    def folded_output(self, node: gs.Node) -> tuple[gs.Variable, tuple[float, float] | None]:
        """The tensor to quantize for `node`'s result: after a Relu/Clip it alone feeds, if any."""
        out = node.outputs[0]
        users = ir.consumers(out)
        if len(users) == 1 and out.name not in self.outputs and users[0].op in FOLDABLE_ACTIVATIONS:
            bounds = clip_bounds(users[0])
            if bounds is not None and is_float(users[0].outputs[0]):
                return users[0].outputs[0], bounds
        return out, None

    def result_tensors(self, node: gs.Node) -> list[gs.Variable]:
        if node.op == "Split":
            return list(node.outputs)
        if node.op in SHARED:
            return [node.outputs[0]]
        return [self.folded_output(node)[0]]

    # -- planning ------------------------------------------------------------------------------

    def plan(self) -> Plan:
        nodes = [n for n in self.graph.nodes if self.eligible(n)]
        tail = self._tail(nodes)
        for n in nodes:
            if id(n) in tail:
                self.skipped[n.name] = "only leads to graph outputs through data movement"
        nodes = [n for n in nodes if id(n) not in tail]
        chosen = {id(n) for n in nodes if n.op in ANCHORS}
        integer = set()  # names of tensors that quantized nodes produce as integers
        changed = True
        while changed:
            changed = False
            for n in nodes:
                integer.update(t.name for t in self.result_tensors(n) if id(n) in chosen)
            for n in nodes:
                if id(n) in chosen:
                    continue
                feeds = any(id(u) in chosen for t in self.result_tensors(n) for u in ir.consumers(t))
                inputs_integer = all(
                    n.inputs[i].name in integer or ir.constant_value(n.inputs[i]) is not None
                    for i in data_inputs(n)
                )
                if feeds or (n.op in SHARED and inputs_integer):
                    chosen.add(id(n))
                    changed = True
        for n in nodes:
            if id(n) not in chosen:
                self.skipped[n.name] = "neither reads integer inputs nor feeds quantized ops"
        quantized = [n for n in self.graph.nodes if id(n) in chosen]
        return self._points(quantized)

    def _tail(self, nodes: list[gs.Node]) -> set[int]:
        """Data-movement nodes from which every path reaches only graph outputs via data movement."""
        candidates = {id(n): n for n in nodes if n.op in SHARED}
        tail: set[int] = set()
        for node in reversed(self.graph.nodes):  # graph order is topological
            if id(node) not in candidates:
                continue
            outs = node.outputs if node.op == "Split" else node.outputs[:1]
            users = [u for o in outs for u in ir.consumers(o)]
            reaches_output = any(o.name in self.outputs for o in outs)
            if (reaches_output or users) and all(id(u) in tail for u in users):
                tail.add(id(node))
        return tail

    def _points(self, quantized: list[gs.Node]) -> Plan:
        groups = _UnionFind()
        points: dict[str, gs.Variable] = {}
        clips: dict[str, tuple[float, float]] = {}
        plan = Plan(quantized, [], {}, clips, skipped=self.skipped)
        chosen = {id(n) for n in quantized}

        def add_point(tensor: gs.Variable) -> None:
            points.setdefault(tensor.name, tensor)
            groups.find(tensor.name)

        for node in quantized:
            for i in data_inputs(node):
                tensor = node.inputs[i]
                value = ir.constant_value(tensor)
                if value is None:
                    add_point(tensor)
                    continue
                if node.op in ANCHORS and i == 1:
                    axis = weight_axis(node, value) if self.per_channel else None
                    slot = WeightSlot(node, i, axis)
                    plan.weights.append(slot)
                    if node.op in BIASED:  # a missing bias becomes zeros: bias correction can then fix it
                        plan.biases.append(BiasSlot(node, 2, slot))
                elif node.op in BIASED and i == 2:
                    continue
                else:
                    plan.constants.append((node, i))
            # Results: a Q point unless only float ops read a Gemm/MatMul result.
            for result in self.result_tensors(node):
                users = ir.consumers(result)
                if node.op in FLOAT_OUTPUT_OK and not any(id(u) in chosen for u in users):
                    continue
                add_point(result)
                if node.op in SHARED:
                    source = node.inputs[0]
                    if ir.constant_value(source) is None:
                        groups.union(source.name, result.name)
                else:
                    _, bounds = self.folded_output(node)
                    if bounds is not None:
                        clips[result.name] = bounds
            if node.op == "Concat":
                for i in data_inputs(node):
                    if ir.constant_value(node.inputs[i]) is None:
                        groups.union(node.inputs[i].name, node.outputs[0].name)

        plan.points = [points[name] for name in points]
        plan.activations = {name: act for name, t in points.items() if (act := reader_activation(t)) is not None}
        plan.groups = {name: groups.find(name) for name in points}
        return plan


def make_plan(graph: gs.Graph, ops: Iterable[str], float_nodes: Iterable[str] = (), per_channel: bool = True) -> Plan:
    return Planner(graph, ops, float_nodes, per_channel).plan()


__all__ = ["ANCHORS", "SHARED", "COMPUTE", "SUPPORTED", "Plan", "WeightSlot", "BiasSlot", "make_plan", "data_inputs",
           "clip_bounds", "weight_axis", "output_channels", "BIASED", "reader_activation"]
