"""What a model costs: parameters, bytes, MACs per node, op mix, quantization, latency, accuracy.

MACs (multiply-accumulates) are counted for the ops that dominate inference cost: convolutions,
matrix products (float, integer, QLinear, QDQ-fed, 4-bit MatMulNBits), Einsum, RNNs and attention.
Other ops count zero. A MAC op whose shapes are not static is *unknown*, and so is the total: a
wrong number is worse than none. Give static input shapes (`--fix-shape`, or a data sample) to
resolve them; a dynamic batch axis alone is assumed to be 1, so MACs are per sample.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir, modelio, runtime, validate, verify
from edgegraph.analysis import capture, encoding
from edgegraph.context import CalibrationData
from edgegraph.errors import CalibrationDataError, EdgegraphError

# Constant inputs that are shapes, axes, indices, bounds or quantization parameters, not weights:
# {op type: input positions}. Integer shape tensors are mostly int64 (never counted anyway); this
# catches the int32/float ones some exporters (tf2onnx) write.
_NON_WEIGHT_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Resize": {1, 2, 3},
    "Upsample": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Split": {1}, "ConstantOfShape": {0}, "TopK": {1},
    "OneHot": {0, 1, 2}, "Range": {0, 1, 2}, "CumSum": {1}, "Gather": {1}, "GatherElements": {1},
    "GatherND": {1}, "Clip": {1, 2}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL2": {1}, "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2},
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7}, "MatMulInteger": {2, 3},
    "ConvInteger": {2, 3}, "DynamicQuantizeLinear": set(),
}

QUANT_PARAM_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Ops that compute on integer data (ONNX and com.microsoft contrib ops).
INTEGER_OPS = {
    "ConvInteger", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
    "QAttention", "QOrderedMatMul", "DynamicQuantizeLSTM", "GatherBlockQuantized",
}
# Ops that only move data or hold graph structure: a DQ feeding them does not make them "quantized".
_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze",
             "Unsqueeze", "Cast", "Shape", "Concat", "Split", "Slice", "Gather"}
_CONTROL_FLOW = {"If", "Loop", "Scan"}

logger = logging.getLogger(__name__)


@dataclass
class NodeCost:
    name: str
    op: str
    macs: int | None  # None: shapes not static


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str | None] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join(str(d) if d not in (None, "") else "?" for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class ModelStats:
    """Static facts about one model (latency is filled in separately, it needs a run)."""

    size_bytes: int  # serialized size, external data included
    params: int  # weight elements (see `count_params`)
    param_bytes: int
    nodes: int  # every node, subgraphs included
    ops: dict[str, int]  # op histogram, most frequent first
    macs: int | None  # total, None when any MAC op has non-static shapes
    macs_known: int  # sum over the MAC ops whose shapes are known
    node_macs: list[NodeCost]  # MAC ops, most expensive first (unknown ones last)
    quantized_nodes: int  # compute nodes running on quantized data (integer ops or fed by DequantizeLinear)
    qdq_nodes: int  # QuantizeLinear + DequantizeLinear nodes
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opsets: dict[str, int]
    producer: str
    ir_version: int
    shapes: str = ""  # which input shapes the MACs assume
    latency_ms: float | None = None
    latency_note: str = ""  # how latency was measured, or why it was not

    @property
    def unknown_mac_nodes(self) -> list[str]:
        return [n.name for n in self.node_macs if n.macs is None]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["unknown_mac_nodes"] = self.unknown_mac_nodes
        return data


# ---------------------------------------------------------------------------------------------
# Static statistics


def model_stats(model, *, fix_shapes: Mapping[str, Sequence[int]] | None = None,
                feeds: runtime.Feeds | None = None, size_bytes: int | None = None) -> ModelStats:
    """Stats of a model (path, bytes, ModelProto or ir.Model). The model is not modified.

    MACs need static shapes. `fix_shapes` makes dynamic inputs static (for the count only; a
    lone dynamic batch axis is taken as 1). Shapes that inference cannot resolve (data-dependent
    reshapes, experimental ops) are read from one onnxruntime run on `feeds`, or on random
    inputs when every input shape is static. `size_bytes` overrides the serialized size (e.g.
    the file size on disk; a path argument measures it).

    Everything but that run works on the graph without its weights, so the stats of a
    multi-GB ir.Model cost no copy of them.
    """
    if size_bytes is None:
        if isinstance(model, str | Path):
            size_bytes = disk_size(model)
        elif isinstance(model, onnx.ModelProto):
            size_bytes = ir.proto_size(model)
        elif isinstance(model, bytes | bytearray):
            size_bytes = len(model)
    loaded = model if isinstance(model, ir.Model) else modelio.load(model)
    proto = loaded.to_proto(weights=False)
    if size_bytes is None:
        size_bytes = serialized_size(loaded, proto)
    params, param_bytes = count_params(loaded.graph)
    nodes = list(ir.iter_nodes(loaded.graph))
    histogram = Counter(_op_label(n) for n in nodes)
    costs, shapes_note = _mac_costs(loaded, fix_shapes, feeds)
    known = sum(c.macs for c in costs if c.macs is not None)
    return ModelStats(
        size_bytes=size_bytes,
        params=params,
        param_bytes=param_bytes,
        nodes=len(nodes),
        ops=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        macs=None if any(c.macs is None for c in costs) else known,
        macs_known=known,
        node_macs=costs,
        quantized_nodes=sum(is_quantized(n) for n in nodes),
        qdq_nodes=sum(n.op in QUANT_PARAM_OPS for n in nodes),
        inputs=[_tensor_info(t) for t in loaded.graph.inputs],
        outputs=[_tensor_info(t) for t in loaded.graph.outputs],
        opsets={d.domain or "ai.onnx": d.version for d in proto.opset_import},
        producer=" ".join(filter(None, (proto.producer_name, proto.producer_version))),
        ir_version=proto.ir_version,
        shapes=shapes_note,
    )


def serialized_size(model: ir.Model, light: onnx.ModelProto | None = None) -> int:
    """Bytes of `model` serialized with its weights inline, without serializing them: the graph
    exported without its weights (`light`, if already at hand) plus the bytes of those weights.
    Exact but for a few bytes per weight left out."""
    light = model.to_proto(weights=False) if light is None else light
    left_out = [t for t in validate.tensors(light) if validate.uses_external_data(t)]
    return light.ByteSize() + sum(math.prod(t.dims) * (ir.numpy_dtype(t.data_type) or np.dtype(np.uint8)).itemsize
                                  for t in left_out)


def _mac_costs(model: ir.Model, fix_shapes, feeds) -> tuple[list[NodeCost], str]:
    static, note = _static_shapes(model, fix_shapes)
    found = node_macs(static.graph)
    if any(macs is None for _, macs in found):
        inputs = [t for t in static.graph.inputs if _is_static(t.shape)]
        run_feeds = feeds
        if run_feeds is not None and any(t.name in feeds and np.shape(feeds[t.name]) != tuple(t.shape)
                                         for t in inputs):
            run_feeds = None  # inputs shaped unlike `fix_shapes`: not the shapes to count with
        if run_feeds is None and len(inputs) == len(static.graph.inputs):
            try:
                run_feeds = sample_feeds(static)
            except CalibrationDataError as exc:  # e.g. shapes too large to run: MACs stay unknown
                logger.debug("no run to observe shapes: %s", exc)
        if run_feeds is not None:
            # `static` has no weights; the model itself computes the same shapes on these inputs.
            observed = observed_shapes(model, run_feeds)
            if observed:
                found = node_macs(static.graph, observed)
                seen = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in run_feeds.items())
                note = f"{note}; " if note else ""
                note += f"other shapes observed running {seen}"
    costs = [NodeCost(n.name or n.outputs[0].name, _op_label(n), macs) for n, macs in found]
    costs.sort(key=lambda c: (c.macs is None, -(c.macs or 0)))
    return costs, note


def observed_shapes(model: ir.Model, feeds: runtime.Feeds) -> dict[str, tuple[int, ...]]:
    """Shapes of the top-level tensors that inference left dynamic, from one onnxruntime run.
    Empty when the model does not run on `feeds`."""
    names = [t.name for n in model.graph.nodes for t in n.outputs if t.name and not _is_static(t.shape)]
    if not names:
        return {}
    try:
        values = next(capture.stream(model, names, [feeds], threads=1))
    except Exception as exc:  # noqa: BLE001 - ORT errors: the shapes stay unknown
        logger.debug("could not observe shapes: %s", exc)
        return {}
    return {name: tuple(np.shape(v)) for name, v in values.items()}


def disk_size(path: str | Path) -> int:
    """Bytes of a model file plus the external data files it references (each counted once).

    Meant for a model `modelio.load` accepted: its external data then passes `validate.external_data`."""
    path = Path(path)
    proto = onnx.load_model(str(path), load_external_data=False)
    files = {validate.external_data(t, path.parent, str(path)).path
             for t in validate.tensors(proto) if validate.uses_external_data(t)}
    return path.stat().st_size + sum(f.stat().st_size for f in files)


def count_params(graph: gs.Graph) -> tuple[int, int]:
    """(elements, bytes) of the weights: constants (initializers and Constant nodes, subgraphs
    included, each counted once) except int64/bool tensors and constants used only as shapes,
    axes, indices, bounds or quantization scales/zero points. Packed 4-bit MatMulNBits weights
    count their logical K*N elements; sparse initializers their dense elements and stored bytes.
    A weight stored encoded (`analysis.encoding`: Q/DQ, codebook, packed 4-bit, Cast * scale)
    counts its decoded elements once, with the bytes of every constant it is decoded from."""
    elements = nbytes = 0
    seen: set[int] = set()
    for g in ir.iter_graphs(graph):
        for tensor, code in encoding.decoded_weights(g):
            count = encoding.elements(tensor)
            if count is None:
                continue  # shape unknown: its constants are counted one by one below
            elements += count
            for constant in code.constants:
                if id(constant) not in seen:
                    seen.add(id(constant))
                    dtype = ir.numpy_dtype(constant.dtype)
                    if dtype is None or (dtype.kind != "b" and dtype != np.int64):  # not shapes
                        nbytes += ir.stored_nbytes(constant)
    for g in ir.iter_graphs(graph):
        for tensor, value_shape, dtype in _constants(g):
            if id(tensor) in seen or id(encoding.stored(tensor)) in seen:
                continue
            seen.add(id(tensor))
            uses = [(user, [i for i, t in enumerate(user.inputs) if t is tensor]) for user in tensor.outputs]
            if uses and all(set(slots) <= _NON_WEIGHT_INPUTS.get(user.op, set()) for user, slots in uses):
                continue
            if dtype is None or dtype.kind == "b" or dtype == np.int64:
                continue
            count = math.prod(value_shape)
            nbits = next((u for u, slots in uses if u.op == "MatMulNBits" and 1 in slots), None)
            elements += nbits.attrs["K"] * nbits.attrs["N"] if nbits is not None else count
            if isinstance(tensor, gs.Constant) and ir.sparse_source(tensor) is not None:
                nbytes += ir.stored_nbytes(tensor)  # bytes as stored: the non-zero values and their indices
            else:
                nbytes += count * dtype.itemsize
    return elements, nbytes


def _constants(graph: gs.Graph):
    """(tensor whose consumers use the value, shape, numpy dtype) for every constant of `graph`."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            yield tensor, tuple(tensor.shape), ir.numpy_dtype(tensor.dtype)
    for node in graph.nodes:
        if node.op != "Constant" or not node.outputs:
            continue
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            yield node.outputs[0], tuple(value.shape), ir.numpy_dtype(value.dtype)
        elif node.attrs.get("value_floats") is not None:
            yield node.outputs[0], (len(node.attrs["value_floats"]),), np.dtype(np.float32)
        elif node.attrs.get("value_float") is not None:
            yield node.outputs[0], (), np.dtype(np.float32)


def is_quantized(node: gs.Node) -> bool:
    """An integer/QLinear op, or a QDQ node unit: an op fed by DequantizeLinear whose outputs are
    re-quantized (or a Conv/MatMul-like op with dequantized inputs, which runs on integer
    kernels even with a float output). Plumbing such as Reshape does not count.

    The one definition of a quantized node: the summary counts it, and so does `quant` in its
    stats. A Relu / Clip between an op and its QuantizeLinear belongs to the op (onnxruntime
    removes it when the Q's range already clips there)."""
    if node.op.startswith("QLinear") or node.op in INTEGER_OPS:
        return True
    if node.op in _PLUMBING or not any(_is_dequantized(t) for t in node.inputs):
        return False
    return all(_requantized(t) for t in node.outputs) or node.op in _MAC_RULES


def _requantized(tensor: gs.Tensor, through_activation: bool = True) -> bool:
    users = tensor.outputs
    return bool(users) and all(
        user.op == "QuantizeLinear"
        or (through_activation and user.op in ("Relu", "Clip") and _requantized(user.outputs[0], False))
        for user in users)


def _is_dequantized(tensor: gs.Tensor) -> bool:
    source = ir.producer(tensor)
    return source is not None and source.op == "DequantizeLinear"


def _op_label(node: gs.Node) -> str:
    return node.op if ir.is_standard(node) else f"{node.domain}.{node.op}"


def _tensor_info(tensor: gs.Tensor) -> TensorInfo:
    dtype = ir.numpy_dtype(tensor.dtype)
    shape = None if tensor.shape is None else [d if isinstance(d, int | str) else None for d in tensor.shape]
    return TensorInfo(tensor.name, str(dtype) if dtype is not None else "?", shape)


def _static_shapes(model: ir.Model, fix_shapes) -> tuple[ir.Model, str]:
    """A weights-free copy (for shapes only) with the requested input shapes, and dynamic batch
    axes set to 1 where that is the only dynamic dim. Returns the model itself when there is
    nothing to fix."""
    shapes = {name: list(dims) for name, dims in (fix_shapes or {}).items()}
    assumed = []
    for tensor in model.graph.inputs:
        dims = tensor.shape
        if tensor.name in shapes or not dims or _is_static(dims):
            continue
        if not _is_static(dims[1:]):
            continue
        shapes[tensor.name] = [1, *dims[1:]]
        assumed.append(tensor.name)
    if not shapes:
        return model, ""
    fixed = ir.from_proto(model.to_proto(weights=False), infer=False)
    try:
        ir.fix_input_shapes(fixed, shapes)
    except EdgegraphError:
        if fix_shapes:
            raise
        return model, ""
    note = ", ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in shapes.items())
    if assumed:
        note += f"; batch axis of {', '.join(assumed)} taken as 1"
    return fixed, note


def _is_static(dims) -> bool:
    return dims is not None and all(isinstance(d, int | np.integer) and d >= 0 for d in dims)


# ---------------------------------------------------------------------------------------------
# MACs


def node_macs(graph: gs.Graph, observed: Mapping[str, Sequence[int]] | None = None) -> list[tuple[gs.Node, int | None]]:
    """(node, MACs or None when unknown) for every node of `graph` that does multiply-accumulates.

    Shapes come from shape inference, else from `observed` ({tensor name: shape} seen in a run).
    Control flow and calls to local functions that contain MAC ops are unknown (trip counts and
    branches are only known at run time).
    """
    shape = _ShapeLookup(observed or {})
    functions = {(f.domain, f.name): f for f in getattr(graph, "functions", []) or []}
    found = []
    for node in graph.nodes:
        counter = _MAC_RULES.get(node.op)
        if counter is not None:
            try:
                found.append((node, counter(node, shape)))
            except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
                found.append((node, None))
        elif node.op in _CONTROL_FLOW or (node.domain, node.op) in functions:
            bodies = ir.subgraphs(node) or [functions[(node.domain, node.op)]]
            if any(n.op in _MAC_RULES for body in bodies for n in ir.iter_nodes(body)):
                found.append((node, None))
    return found


class _ShapeLookup:
    """Static shape of a tensor: inferred, observed in a run, or seen through DequantizeLinear/Cast."""

    def __init__(self, observed: Mapping[str, Sequence[int]]):
        self.observed = observed

    def __call__(self, tensor: gs.Tensor | None) -> tuple[int, ...] | None:
        while tensor is not None and tensor.name:
            if _is_static(tensor.shape):
                return tuple(int(d) for d in tensor.shape)
            if tensor.name in self.observed:
                return tuple(int(d) for d in self.observed[tensor.name])
            node = ir.producer(tensor)
            if node is None or node.op not in ("DequantizeLinear", "Cast", "Identity"):
                return None
            tensor = node.inputs[0]
        return None


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _conv(x: int, w: int):
    # Each output element accumulates (C / group) * prod(kernel) products: w is [M, C/g, *k].
    def count(node, shape):
        out, weight = shape(node.outputs[0]), shape(_input(node, w))
        return None if out is None or weight is None else math.prod(out) * math.prod(weight[1:])
    return count


def _conv_transpose(node, shape):
    # Each input element scatters into (M / group) * prod(kernel) outputs: w is [C, M/g, *k].
    x, weight = shape(_input(node, 0)), shape(_input(node, 1))
    return None if x is None or weight is None else math.prod(x) * math.prod(weight[1:])


def _matmul(a: int, b: int):
    def count(node, shape):
        left, right = shape(_input(node, a)), shape(_input(node, b))
        if left is None or right is None:
            return None
        if node.op == "FusedMatMul":  # com.microsoft: optional transposes of the last two axes
            left = left[:-2] + left[-2:][::-1] if node.attrs.get("transA") and len(left) > 1 else left
            right = right[:-2] + right[-2:][::-1] if node.attrs.get("transB") and len(right) > 1 else right
        rows = left[-2] if len(left) > 1 else 1
        cols = right[-1] if len(right) > 1 else 1
        batch = np.broadcast_shapes(left[:-2], right[:-2])
        return math.prod(batch) * rows * cols * left[-1]
    return count


def _gemm(a: int, b: int):
    def count(node, shape):
        left, right = shape(_input(node, a)), shape(_input(node, b))
        if left is None or right is None:
            return None
        m, k = left[::-1] if node.attrs.get("transA") else left
        n = right[0] if node.attrs.get("transB") else right[1]
        return m * n * k
    return count


def _matmul_nbits(node, shape):
    a = shape(_input(node, 0))
    return None if a is None else math.prod(a[:-1]) * node.attrs["K"] * node.attrs["N"]


def _rnn(node, shape):
    # X is [seq, batch, in] (or [batch, seq, in]), W [dirs, gates*H, in], R [dirs, gates*H, H].
    x, w, r = shape(_input(node, 0)), shape(_input(node, 1)), shape(_input(node, 2))
    if x is None or w is None or r is None:
        return None
    return x[0] * x[1] * w[0] * (w[1] * w[2] + r[1] * r[2])


def _einsum(node, shape):
    equation = node.attrs["equation"].replace(" ", "")
    terms = equation.split("->")[0].split(",")
    if len(terms) != 2:
        return None
    sizes: dict[str, int] = {}
    ellipsis: list[tuple[int, ...]] = []
    for term, tensor in zip(terms, node.inputs):
        dims = shape(tensor)
        if dims is None:
            return None
        if "..." in term:
            head, tail = term.split("...")
            ellipsis.append(dims[len(head):len(dims) - len(tail)])
            letters = head + tail
            dims = dims[:len(head)] + dims[len(dims) - len(tail):]
        else:
            letters = term
        for letter, dim in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    return math.prod(sizes.values()) * math.prod(np.broadcast_shapes(*ellipsis) if ellipsis else ())


def _attention_core(batch: int, q_len: int, kv_len: int, qk_width: int, v_width: int) -> int:
    # Q @ K^T and softmax(.) @ V summed over heads: widths are heads * head size.
    return batch * q_len * kv_len * (qk_width + v_width)


def _ms_attention(node, shape):
    # com.microsoft.Attention: input [B, S, In] @ weights [In, Hq+Hk+Hv], then attention.
    x, w = shape(_input(node, 0)), shape(_input(node, 1))
    if x is None or w is None or _input(node, 4) is not None:  # past state: kv length unknown here
        return None
    sizes = node.attrs.get("qkv_hidden_sizes") or [w[1] // 3] * 3
    b, s = x[0], x[1]
    return b * s * x[2] * w[1] + _attention_core(b, s, s, sizes[0], sizes[2])


def _multi_head_attention(node, shape):
    q, k, v = shape(_input(node, 0)), shape(_input(node, 1)), shape(_input(node, 2))
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) == 3):
        return None
    return _attention_core(q[0], q[1], k[1], q[2], v[2])


def _onnx_attention(node, shape):
    q, k, v = shape(_input(node, 0)), shape(_input(node, 1)), shape(_input(node, 2))
    if q is None or k is None or v is None:
        return None
    if len(q) == 4:  # [B, heads, S, head size]; kv heads are shared by groups of q heads
        return _attention_core(q[0], q[2], k[2], q[1] * q[3], q[1] * v[3])
    q_heads, kv_heads = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
    return _attention_core(q[0], q[1], k[1], q[2], q_heads * (v[2] // kv_heads))


def _attention(node, shape):
    # One op name, two definitions: ONNX's (opset 23, Q/K/V inputs) and com.microsoft's (fused projections).
    return (_onnx_attention if ir.is_standard(node) else _ms_attention)(node, shape)


_MAC_RULES = {
    "Conv": _conv(0, 1), "FusedConv": _conv(0, 1), "NhwcConv": _conv(0, 1), "ConvInteger": _conv(0, 1),
    "QLinearConv": _conv(0, 3), "ConvTranspose": _conv_transpose,
    "MatMul": _matmul(0, 1), "MatMulInteger": _matmul(0, 1), "QLinearMatMul": _matmul(0, 3),
    "DynamicQuantizeMatMul": _matmul(0, 1), "MatMulIntegerToFloat": _matmul(0, 1), "FusedMatMul": _matmul(0, 1),
    "Gemm": _gemm(0, 1), "QGemm": _gemm(0, 3), "MatMulNBits": _matmul_nbits,
    "LSTM": _rnn, "GRU": _rnn, "RNN": _rnn, "Einsum": _einsum,
    "Attention": _attention,
    "MultiHeadAttention": _multi_head_attention,
}


# ---------------------------------------------------------------------------------------------
# Running: latency and accuracy


def sample_feeds(model, data: CalibrationData | None = None, *, seed: int = 0) -> runtime.Feeds:
    """One inference's inputs: the first sample of `data` (as a batch the model accepts), or
    seeded random inputs that the model accepts (`pipeline.random_inputs`)."""
    from edgegraph.pipeline import random_inputs

    specs = runtime.input_specs(model)  # weights-free for an ir.Model
    size = runtime.batch_size_for(specs, 1)  # 1, unless axis 0 is fixed to more
    if data is None:
        data = random_inputs(model, size, seed=seed)
    return runtime.adapt_feeds(specs, next(data.take(size).batches(size)))


def feeds_text(feeds: runtime.Feeds) -> str:
    """`x=1x3x48x192, sr=scalar`: the shapes a model was run (timed) at."""
    return ", ".join(f"{name}={'x'.join(map(str, np.shape(value))) or 'scalar'}" for name, value in feeds.items())


def measure_latency(models: Sequence, feeds: Sequence[runtime.Feeds], *, runs: int = 20, warmup: int = 3,
                    threads: int = 0, rounds: int = 3, budget_s: float = 10.0,
                    in_turns: bool = True) -> list[tuple[float | None, str]]:
    """(median ms or None, note) per model (a path, ModelProto or ir.Model), each run on its feeds.

    Each model gets one onnxruntime session for all its runs. The models are timed in turns over
    `rounds` rounds and the median of the round medians is reported, so a slow spell of a shared
    machine does not land on one model only. That holds every session at once; with
    `in_turns=False` (models too big to hold together) each is timed in full and released
    before the next. A model whose `runs` would take longer than `budget_s` gets fewer runs (at
    least 3). A model onnxruntime cannot run gives None and the reason.
    """
    if runs <= 0:
        return [(None, "not measured (--runs 0)")] * len(models)
    plans: dict[int, tuple[int, int, int]] = {}  # model index -> (rounds, runs per round, warm-up runs)
    failures: dict[int, str] = {}
    medians: dict[int, list[float]] = {}
    groups = [range(len(models))] if in_turns else [[i] for i in range(len(models))]
    for group in groups:
        sessions = {}
        for i in group:
            try:
                sessions[i] = runtime.session(models[i], threads=threads, optimize=True)
                probe = runtime.latency_ms(sessions[i], feeds[i], runs=1, warmup=1)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                sessions.pop(i, None)
                failures[i] = f"onnxruntime could not run it: {_first_line(exc)}"
                continue
            affordable = max(min(runs, 3), min(runs, int(budget_s * 1e3 / max(probe, 1e-3))))
            model_rounds = min(rounds, affordable)
            # The probe already warmed the caches; slow models get one warm-up run per round, not `warmup`.
            plans[i] = (model_rounds, math.ceil(affordable / model_rounds), min(warmup, max(1, affordable // 6)))
            medians[i] = []
        for round_index in range(rounds):
            for i, sess in sessions.items():
                model_rounds, per_round, warm = plans[i]
                if round_index < model_rounds:
                    medians[i].append(runtime.latency_ms(sess, feeds[i], runs=per_round, warmup=warm))
        del sessions  # before the next group's are made
    order = "models timed in turns" if in_turns else "models timed one after the other"
    results = []
    for i, inputs in enumerate(feeds):
        if i in failures:
            results.append((None, failures[i]))
            continue
        model_rounds, per_round, warm = plans[i]
        note = (f"at {feeds_text(inputs)}, median of {model_rounds} rounds x {per_round} runs (+{warm} warm-up), "
                f"{order}, threads={threads or 'all'}")
        results.append((statistics.median(medians[i]), note))
    return results


def compare_models(reference, candidate, data: CalibrationData, *, threads: int = 0,
                   labels: np.ndarray | None = None, scores=None) -> dict:
    """Outputs of `candidate` vs `reference` (paths, ModelProtos or ir.Models) over `data`:
    {"outputs": {name: OutputMetrics}, "samples": n, and with labels "label_accuracy":
    {"reference": acc, "candidate": acc}}. `scores`: the outputs to give top-1 for
    (`verify.score_outputs`)."""
    return {"samples": len(data)} | compare_outputs(model_outputs(reference, data, threads=threads),
                                                    model_outputs(candidate, data, threads=threads), labels=labels,
                                                    scores=scores)


def compare_outputs(reference: Sequence[runtime.Feeds], candidate: Sequence[runtime.Feeds], *,
                    labels: np.ndarray | None = None, scores=None) -> dict:
    """`compare_models` on outputs already computed (`model_outputs`), e.g. one reference for many
    models; without the "samples" count."""
    missing = set(reference[0]) - set(candidate[0]) if reference else set()
    if missing:
        raise EdgegraphError(f"the models' outputs differ: {', '.join(sorted(missing))} missing in the second one")
    candidate = [{name: out[name] for name in ref} for ref, out in zip(reference, candidate)]
    result = {"outputs": verify.compare_all(reference, candidate, scores=scores)}
    if labels is not None:
        result["label_accuracy"] = {"reference": label_accuracy(reference, labels),
                                    "candidate": label_accuracy(candidate, labels)}
    return result


def label_accuracy(outputs: Sequence[runtime.Feeds], labels: np.ndarray) -> float | None:
    """Top-1 accuracy of the first output that looks like class scores, or None if none does."""
    for name in outputs[0] if outputs else []:
        scores = np.concatenate([o[name] for o in outputs])
        if verify.looks_like_scores(scores):
            predicted = np.argmax(verify._squeeze_trailing(scores), axis=-1)
            truth = np.asarray(labels).reshape(-1)[: len(predicted)]
            return float(np.mean(predicted[: len(truth)] == truth))
    return None


def load_labels(path: str | Path | None) -> np.ndarray | None:
    """The `labels` array of an .npz (ground-truth class per sample), or None."""
    if path is None or not str(path).endswith(".npz") or not Path(path).is_file():
        return None
    from edgegraph.context import read_npz  # reads that member only, its size checked first

    return read_npz(path, ["labels"]).get("labels")


def model_outputs(model, data: CalibrationData, *, threads: int = 0) -> list[runtime.Feeds]:
    """Outputs of a model (path, ModelProto or ir.Model) over `data`, in batches, run as deployed."""
    from edgegraph.pipeline import reference_outputs

    try:
        return reference_outputs(model, data, threads=threads)
    except EdgegraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - the data does not fit the model
        raise EdgegraphError(f"onnxruntime could not run the model on {data.source}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # ORT prefixes messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "; keep the rest.
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Formatting


def human(value: float | None, unit: str = "", *, binary: bool = False) -> str:
    """1234567 -> '1.23M' (or '1.18 MiB' with binary=True); None -> 'unknown'."""
    if value is None:
        return "unknown"
    base, prefixes = (1024.0, ["", "Ki", "Mi", "Gi", "Ti"]) if binary else (1000.0, ["", "K", "M", "G", "T"])
    magnitude = 0
    while abs(value) >= base and magnitude < len(prefixes) - 1:
        value /= base
        magnitude += 1
    number = f"{value:.0f}" if magnitude == 0 else f"{value:.2f}"
    sep = " " if unit or binary else ""
    return f"{number}{sep}{prefixes[magnitude]}{unit}".rstrip()


def jsonable(value):
    """Plain JSON values for reports: numpy scalars/arrays, dataclasses, paths, sets; non-finite
    floats as the strings "inf", "-inf", "nan" (strict JSON has no such numbers)."""
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if hasattr(value, "as_dict"):
        return jsonable(value.as_dict())
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


__all__ = ["ModelStats", "NodeCost", "TensorInfo", "compare_models", "compare_outputs", "count_params",
           "disk_size", "human", "is_quantized", "jsonable", "label_accuracy", "load_labels", "measure_latency",
           "model_outputs", "model_stats", "node_macs", "sample_feeds", "serialized_size"]
