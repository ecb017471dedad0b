"""Writing a `Plan` into the graph: Q/DQ pairs on activations, integer weights and biases."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.passes.quant import numerics
from edgegraph.passes.quant.numerics import QType
from edgegraph.passes.quant.placement import WeightSlot

# Bias codes are kept below this so int32 accumulation keeps headroom for the products.
BIAS_LIMIT = 2**30


@dataclass
class QParams:
    """Scale and zero point of one quantized tensor (scalars, or 1-D along `axis`)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None
    code_limit: int | None = None  # weights: largest |code - zero point| allowed


@dataclass
class QuantizedWeight:
    node: gs.Node
    index: int
    float_value: np.ndarray
    params: QParams
    quantized: gs.Constant  # the integer initializer


@dataclass
class QuantizedBias:
    node: gs.Node
    index: int
    float_value: np.ndarray  # the bias the int32 codes approximate (updated by bias correction)
    input_scale: np.float32
    weight: QuantizedWeight
    quantized: gs.Constant

    def set_value(self, value: np.ndarray) -> None:
        """Store a new float bias as int32 codes with the fixed scale input_scale * weight_scale."""
        self.float_value = np.asarray(value, dtype=np.float32)
        codes, _ = numerics.quantize_bias(self.float_value, self.input_scale, self.weight.params.scale)
        self.quantized.values = codes


class QdqWriter:
    """Inserts Q/DQ nodes into `graph` following a plan; keeps graph output names.

    What it adds is named by a number per quantized tensor (`q7` codes, `s7` scale, `z7` zero
    point, `dq7` dequantized; nodes `Q7` / `DQ7`) rather than after the tensor, and zero points
    that are all 0 (ONNX's default) are omitted where runtimes allow it: with exporters' long
    tensor names this bookkeeping was up to 8% of the fp32 file size (PP-OCR, DeepLab).
    """

    def __init__(self, graph: gs.Graph, wide_domain: str = ""):
        self.graph = graph
        self.wide_domain = wide_domain  # of 16-bit Q/DQ: "" (ai.onnx) or "com.microsoft" on old opsets
        self.namer = ir.Namer(graph)
        self.outputs = {t.name for t in graph.outputs}
        self._param_consts: dict[int, tuple[QParams, list[gs.Constant]]] = {}
        self.dequantized: dict[str, gs.Variable] = {}  # point name -> a DQ output carrying it (for analysis)
        self._numbers: dict[str, int] = {}

    def _domain(self, params: QParams) -> str:
        return self.wide_domain if params.qtype.bits == 16 else ""

    def _number(self, tensor_name: str) -> int:
        return self._numbers.setdefault(tensor_name, len(self._numbers))

    def params_inputs(self, params: QParams, number: int, zero_optional: bool = False) -> list[gs.Constant]:
        """[scale] or [scale, zero point]: one set of initializers per QParams object, shared by its Q
        and DQ. A zero point of all zeros is left out (ONNX's default) where `zero_optional`."""
        key = id(params)  # the cache also holds `params`, so the id cannot be reused meanwhile
        if key not in self._param_consts:
            consts = [ir.const(self.namer(f"s{number}"), np.asarray(params.scale, dtype=np.float32))]
            zero = np.asarray(params.zero_point).astype(params.qtype.dtype)
            if not (zero_optional and not zero.any() and self._domain(params) == ""):
                consts.append(ir.const(self.namer(f"z{number}"), zero))
            self._param_consts[key] = (params, consts)
        return self._param_consts[key][1]

    def node(self, op: str, stem: str, inputs, output: gs.Variable, params: QParams) -> gs.Node:
        attrs = {"axis": int(params.axis)} if params.axis is not None else {}
        node = gs.Node(op, self.namer(stem), attrs, list(inputs), [output], domain=self._domain(params) or None)
        self.graph.nodes.append(node)
        return node

    def activation(self, tensor: gs.Variable, params: QParams, quantized_consumers: set[int]) -> None:
        """tensor -> Q -> DQ; each quantized consumer gets its own DQ (one node unit each for ORT),
        float consumers share one. A graph output keeps its name on a DQ output."""
        source = tensor
        producer = ir.producer(tensor)
        # (A graph input passed straight to an output has no producer: the output stays the input.)
        if tensor.name in self.outputs and producer is not None:
            source = gs.Variable(self.namer(f"{tensor.name}_float"), tensor.dtype, tensor.shape)
            producer.outputs[producer.outputs.index(tensor)] = source
            for user in ir.consumers(tensor):
                ir.substitute(user.inputs, tensor, source)
        number = self._number(tensor.name)
        consts = self.params_inputs(params, number)
        q = gs.Variable(self.namer(f"q{number}"), params.qtype.dtype)
        users = ir.consumers(source)
        self.node("QuantizeLinear", f"Q{number}", [source, *consts], q, params)
        shared: gs.Variable | None = tensor if source is not tensor else None
        if shared is not None:
            self.node("DequantizeLinear", f"DQ{number}", [q, *consts], shared, params)
        for user in users:
            if id(user) in quantized_consumers or shared is None:
                dq = gs.Variable(self.namer(f"dq{number}"), tensor.dtype)
                self.node("DequantizeLinear", f"DQ{number}", [q, *consts], dq, params)
                if id(user) not in quantized_consumers:
                    shared = dq
            else:
                dq = shared
            ir.substitute(user.inputs, source, dq)
            self.dequantized.setdefault(tensor.name, dq)
        if shared is not None:
            self.dequantized.setdefault(tensor.name, shared)

    def constant(self, node: gs.Node, index: int, values: np.ndarray, params: QParams,
                 codes: np.ndarray | None = None) -> gs.Constant:
        """Replace a constant input by integer codes + DQ; returns the integer initializer."""
        present = index < len(node.inputs) and node.inputs[index].name
        number = self._number(node.inputs[index].name if present else f"{node.name}/{index}")
        if codes is None:
            codes = numerics.quantize(values, params.scale, params.zero_point, params.qtype, params.axis)
        q = ir.const(self.namer(f"q{number}"), codes)
        out = gs.Variable(self.namer(f"dq{number}"), np.float32)
        # Zero points stay wherever they are needed: an omitted one means uint8 for a Q, and ORT's
        # QGemm fusion wants its weight's; int32 biases and Conv's int8 weights do without.
        zero_optional = params.qtype.name == "int32" or (node.op == "Conv" and params.qtype.name == "int8")
        inputs = [q, *self.params_inputs(params, number, zero_optional)]
        self.node("DequantizeLinear", f"DQ{number}", inputs, out, params)
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = out
        return q

    def bias(self, node: gs.Node, weight: QuantizedWeight, value: np.ndarray, input_scale) -> QuantizedBias:
        """An int32 bias with scale input_scale * weight_scale (what QLinearConv / QGemm fuse)."""
        input_scale = np.float32(np.asarray(input_scale).reshape(()))
        codes, scale = numerics.quantize_bias(value, input_scale, weight.params.scale)
        params = QParams(scale, np.zeros(scale.shape, np.int32), INT32, 0 if scale.ndim else None)
        q = self.constant(node, 2, value, params, codes)
        return QuantizedBias(node, 2, value, input_scale, weight, q)


INT32 = QType("int32", -(2**31), 2**31 - 1, np.dtype(np.int32), 6, 10)


def weight_params(weight: np.ndarray, slot: WeightSlot, qt: QType, reduce_range: bool, method: str) -> QParams:
    """Symmetric per-channel (or per-tensor) weight scales, optionally MSE-clipped per channel.

    Codes stay within +-symmetric_max of the zero point (+-127 for int8), or +-63 with
    `reduce_range` (7 bits: u8 x s8 pair sums then stay below int16 saturation on AVX2).
    """
    limit = qt.symmetric_max // 2 if reduce_range else qt.symmetric_max
    scale, zero = numerics.weight_scale_zero_point(weight, qt, slot.axis, symmetric=True)
    scale = (scale * np.float32(qt.symmetric_max / limit)).astype(np.float32)
    params = QParams(scale, zero, qt, slot.axis if np.ndim(scale) else None, limit)
    if method == "mse":
        params.scale = _mse_weight_scale(weight, params)
    return params


def quantize_weight(weight: np.ndarray, params: QParams) -> np.ndarray:
    """Integer codes of a weight, clipped to the symmetric code range of `params`."""
    codes = numerics.quantize(weight, params.scale, params.zero_point, params.qtype, params.axis)
    if params.code_limit is None:
        return codes
    zero = numerics.broadcast_param(np.asarray(params.zero_point).astype(np.int64), weight.shape, params.axis)
    clipped = np.clip(codes.astype(np.int64), zero - params.code_limit, zero + params.code_limit)
    return clipped.astype(params.qtype.dtype)


def _mse_weight_scale(weight: np.ndarray, params: QParams) -> np.ndarray:
    """Per channel, the clipping of the absmax scale (among a few ratios) with the least error."""
    w = np.asarray(weight, dtype=np.float32)
    axis = params.axis
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim) if axis is not None else None
    best, best_err = params.scale, None
    for ratio in np.linspace(0.5, 1.0, 26, dtype=np.float32):
        trial = QParams((params.scale * ratio).astype(np.float32), params.zero_point, params.qtype, axis,
                        params.code_limit)
        recon = numerics.dequantize(quantize_weight(w, trial), trial.scale, trial.zero_point, trial.qtype, axis)
        err = ((recon - w) ** 2).sum(axis=others)
        if best_err is None:
            best, best_err = trial.scale, err
            continue
        better = err < best_err
        best = np.where(better, trial.scale, best).astype(np.float32)
        best_err = np.where(better, err, best_err)
    return best


def fit_bias(params: QParams, bias: np.ndarray, input_scale) -> QParams:
    """Widen weight scales whose bias would not fit in int32 codes (|bias| / (s_in * s_w) too large).

    Only channels with a tiny weight range next to a large bias need it; their weights then use
    fewer codes, which costs nothing measurable because such channels contribute little.
    """
    needed = np.abs(bias.astype(np.float64)) / (float(np.asarray(input_scale).reshape(())) * BIAS_LIMIT)
    scale = np.asarray(params.scale, dtype=np.float64)
    if scale.ndim == 0:
        needed = needed.max(initial=0.0)
    if np.all(scale >= needed):
        return params
    return QParams(np.maximum(scale, needed).astype(np.float32), params.zero_point, params.qtype, params.axis,
                   params.code_limit)


__all__ = ["QParams", "QuantizedWeight", "QuantizedBias", "QdqWriter", "weight_params", "quantize_weight", "fit_bias"]
