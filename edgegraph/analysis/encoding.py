"""Encoded weights: a weight stored in fewer bits than it is computed in, decoded by a small
subgraph of the model itself.

The encodings recognised are the ones exporters and edgegraph's own passes write:

* Q/DQ: `DequantizeLinear(int8/uint8/int4 initializer, scale, zero point)`;
* a codebook: `Gather(codebook, indices)` with low-bit indices (through a `Cast` to int32/int64,
  which Gather's index type needs); sparse: the indices gathered from the nonzero weights' codes
  at the CumSum ranks of a packed 1-bit mask;
* packed 4-bit: UINT4/INT4 initializers, or uint8 bytes holding two 4-bit codes unpacked with
  BitShift / BitwiseAnd / Concat / Reshape; `codebook`'s bit planes (2- and 1-bit codes looked up
  per byte in a small uint8 table by Gather, Transpose, recombined in int32 by Mul / Add);
* weight-only scaling: `Cast(int8) * scale` (and `- zero point`, `/ scale`).

The stored low-bit constant is the weight's *payload*. Everything that rewrites constants asks
here first: folding a decode chain back into a dense float initializer makes the file up to 8x
larger, a second Q/DQ on top of one adds error for nothing, and counting the payload's bytes as
the weight's elements miscounts the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir

# Element types a payload is stored in: integers of at most 8 bits.
PAYLOAD_TYPES = frozenset({"int8", "uint8", "int4", "uint4", "int2", "uint2"})

# Ops a decode chain is made of: {op: the inputs through which it reads the weight's data (None:
# all)}. Other inputs (shapes, axes, shift amounts) must be constants too.
DECODE_OPS = {
    "DequantizeLinear": (0,), "Cast": (0,), "Gather": (0, 1), "Mul": (0, 1), "Div": (0,), "Sub": (0, 1),
    "Add": (0, 1), "CumSum": (0,), "BitShift": (0,), "BitwiseAnd": (0,), "BitwiseOr": (0,), "Concat": None,
    "Reshape": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Flatten": (0,), "Transpose": (0,), "Identity": (0,),
}
_FLOATS = frozenset({"float32", "float16", "float64", "bfloat16"})
# Decode steps walked at most: codebook's longest chain (bit plane: Cast, Gather(table), Transpose,
# Reshape, Concat(tail), Reshape, Cast, Mul, Add; then Add(channel offsets), Gather(codebook),
# Cast(fp16 -> fp32), Mul(scale)) is 13; a sparse codebook's (the nonzero codes' plane, Concat,
# Gather at the mask's CumSum ranks, Reshape, then the same) is 18.
_DEPTH = 24


@dataclass(frozen=True)
class Encoded:
    """A weight tensor decoded in the graph from stored constants."""

    kind: str  # "codebook", "packed-int4", "int4", "qdq", "scaled"
    payload: tuple[gs.Constant, ...]  # the low-bit stored constants holding its values
    constants: tuple[gs.Constant, ...]  # every stored constant it is decoded from (payload included)
    nodes: tuple[gs.Node, ...]  # the decode steps, producers first


def stored(tensor: gs.Tensor) -> gs.Constant | None:
    """The stored constant behind an initializer or a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return tensor
    node = ir.producer(tensor)
    if node is not None and node.op == "Constant" and ir.is_standard(node):
        value = node.attrs.get("value")
        return value if isinstance(value, gs.Constant) else None
    return None


def _dtype_name(constant: gs.Constant) -> str | None:
    dtype = getattr(constant._values, "dtype", None)
    try:
        return np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        return None


def is_payload(constant: gs.Constant) -> bool:
    """A stored constant of low-bit integers (int8, uint8, 4- and 2-bit)."""
    return _dtype_name(constant) in PAYLOAD_TYPES


@dataclass
class _Chain:
    constants: dict  # every stored constant read
    data: dict  # those read as data (not as a scale, zero point, mask, shift or shape)
    nodes: dict


def _walk(tensor: gs.Tensor, chain: _Chain, depth: int, data: bool = True) -> bool:
    """Collect the constants and decode steps `tensor` is computed from; False when it depends
    on anything else (a graph input, an op that is not a decode step)."""
    constant = stored(tensor)
    if constant is not None:
        chain.constants[id(constant)] = constant
        if data:
            chain.data[id(constant)] = constant
        if not isinstance(tensor, gs.Constant):  # a Constant node: part of the chain
            chain.nodes[id(ir.producer(tensor))] = ir.producer(tensor)
        return True
    node = ir.producer(tensor)
    if node is None or depth == 0 or node.op not in DECODE_OPS or not ir.is_standard(node):
        return False
    if id(node) in chain.nodes:
        return True
    chain.nodes[id(node)] = node
    slots = DECODE_OPS[node.op]
    return all(t is None or not t.name or _walk(t, chain, depth - 1, data and (slots is None or i in slots))
               for i, t in enumerate(node.inputs))


def _payload(chain: _Chain) -> tuple[gs.Constant, ...]:
    return tuple(c for c in chain.data.values() if is_payload(c))


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = ir.numpy_dtype(tensor.dtype)
    if dtype is not None:
        return dtype.name in _FLOATS
    node = ir.producer(tensor)  # dtype not inferred: what the op makes
    if node is None:
        return False
    if node.op == "DequantizeLinear":
        return True
    if node.op == "Cast":
        to = ir.numpy_dtype(node.attrs.get("to"))
        return to is not None and to.name in _FLOATS
    data = node.inputs[:1] if node.op == "Gather" else node.inputs
    return any(t is not None and t.name and _is_float(t) for t in data)


def encoded(tensor: gs.Tensor) -> Encoded | None:
    """How the float tensor `tensor` decodes a stored weight, or None when it is not one: it must
    be computed only from stored constants, only through decode steps, and read a payload."""
    if isinstance(tensor, gs.Constant) or not _is_float(tensor):
        return None
    chain = _Chain({}, {}, {})
    if not _walk(tensor, chain, _DEPTH):
        return None
    payload = _payload(chain)
    if not payload:
        return None
    nodes = [n for n in chain.nodes.values() if n.op != "Constant"]
    if not nodes:
        return None
    ops = {n.op for n in nodes}
    bits4 = any(_dtype_name(c) in ("int4", "uint4") for c in payload)
    if ops & {"BitShift", "BitwiseAnd", "BitwiseOr"}:
        kind = "packed-int4"  # (two 4-bit codes a byte, decoded by a codebook or a scale)
    elif "Gather" in ops:
        kind = "codebook"
    elif bits4:
        kind = "int4"
    elif "DequantizeLinear" in ops:
        kind = "qdq"
    else:
        kind = "scaled"
    nodes.reverse()  # _walk meets consumers first
    return Encoded(kind, payload, tuple(chain.constants.values()), tuple(nodes))


def decodes(node: gs.Node) -> bool:
    """`node` is a step of decoding a stored weight: a decode op computing, from stored constants
    only, a value that reads a payload. Constant folding must leave it alone."""
    if node.op not in DECODE_OPS or not ir.is_standard(node) or not node.outputs:
        return False
    chain = _Chain({}, {}, {})
    return _walk(node.outputs[0], chain, _DEPTH) and bool(_payload(chain))


def is_decoded_weight(tensor: gs.Tensor) -> bool:
    """`tensor` is a whole decoded weight: encoded, and not only the input of a further decode step."""
    if encoded(tensor) is None:
        return False
    return not tensor.outputs or any(
        user.op not in DECODE_OPS or not user.outputs or encoded(user.outputs[0]) is None for user in tensor.outputs)


def decoded_weights(graph: gs.Graph) -> list[tuple[gs.Tensor, Encoded]]:
    """Every whole decoded weight of `graph` (not its subgraphs), in graph order."""
    found = []
    for node in graph.nodes:
        if node.op not in DECODE_OPS:
            continue
        for out in node.outputs[:1]:
            if is_decoded_weight(out):
                found.append((out, encoded(out)))
    return found


def elements(tensor: gs.Tensor) -> int | None:
    """Elements of a decoded weight, from its inferred shape or the shapes along its chain."""
    shape = _shape(tensor, _DEPTH)
    return None if shape is None else int(np.prod(shape, dtype=np.int64))


def _shape(tensor: gs.Tensor, depth: int) -> tuple[int, ...] | None:
    constant = stored(tensor)
    if constant is not None:
        return tuple(int(d) for d in constant.shape)
    if tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape):
        return tuple(tensor.shape)
    node = ir.producer(tensor)
    if node is None or depth == 0:
        return None
    shapes = [None if t is None or not t.name else _shape(t, depth - 1) for t in node.inputs]
    if node.op in ("DequantizeLinear", "Cast", "Identity", "CumSum"):
        return shapes[0]
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and None not in shapes[:2]:
        return shapes[1] + shapes[0][1:]
    if node.op == "Reshape":
        target = ir.constant_value(node.inputs[1])
        if target is None or shapes[0] is None:
            return None
        total = int(np.prod(shapes[0], dtype=np.int64))
        dims = [shapes[0][i] if d == 0 else int(d) for i, d in enumerate(target.tolist())]
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
            dims[dims.index(-1)] = total // known if known else 0
        return tuple(dims)
    if node.op in ("Mul", "Div", "Sub", "Add", "BitShift", "BitwiseAnd", "BitwiseOr") and None not in shapes:
        try:
            return tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            return None
    return None


__all__ = ["DECODE_OPS", "Encoded", "PAYLOAD_TYPES", "decoded_weights", "decodes", "elements", "encoded",
           "is_decoded_weight", "is_payload", "stored"]
