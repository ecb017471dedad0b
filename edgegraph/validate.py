"""Is this a model we accept? The checks `modelio.load` runs once on every model it reads.

A model file is hostile input: its external-data references are paths chosen by whoever wrote
it, and its graph may be anything protobuf can parse. Three rules live here:

- `tensors(proto)` is the one walk over every TensorProto a model holds: initializers, sparse
  initializers (values and indices), node attributes (`t`, `tensors`, `sparse_tensor(s)`),
  in the main graph, in If/Loop/Scan bodies at any depth and in local functions.
- `external_data(tensor, folder)` is the one rule for external data: a regular file inside the
  model's own folder (after resolving symlinks), no absolute path, no `..`, offset and length
  decimal whole numbers, the bytes within the file and as many as dims x dtype need. Nothing
  else in edgegraph opens a tensor's data file. A model given as bytes or a ModelProto has no
  folder: its external data is refused unless the caller names one (`modelio.load(..., base_dir=)`).
- `check(proto, ...)` refuses models that are not valid ONNX: the onnx checker, plus what it
  misses (opsets that do not exist, data longer than the dims, repeated graph outputs) and
  clearer words for what it reports as "not topologically sorted" (undefined tensors, cycles).

Every refusal is a `ModelLoadError` naming the tensor or node, one short line.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import Message
from onnx import TensorProto

from edgegraph.errors import NAME_LIMIT, ModelLoadError, shown

_GraphLike = onnx.GraphProto | onnx.FunctionProto

# ---------------------------------------------------------------------------------------------
# The walk


def graphs(proto: onnx.ModelProto) -> Iterator[_GraphLike]:
    """The main graph, every subgraph (any depth) and every local function, in a fixed order."""
    stack: list[_GraphLike] = [*reversed(proto.functions), proto.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in reversed(graph.node):
            stack.extend(reversed(list(subgraphs(node))))


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    # By field, not by the declared attribute type: a hostile attribute may say one and hold the other.
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model, sparse tensors' values and indices included."""
    for graph in graphs(proto):
        yield from _tensors_of(graph)


def _tensors_of(graph: _GraphLike) -> Iterator[TensorProto]:
    if isinstance(graph, onnx.GraphProto):
        yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
    for sparse in _sparse_of(graph):
        yield sparse.values
        yield sparse.indices


def _sparse_of(graph: _GraphLike) -> Iterator[onnx.SparseTensorProto]:
    if isinstance(graph, onnx.GraphProto):
        yield from graph.sparse_initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor
            yield from attribute.sparse_tensors


# ---------------------------------------------------------------------------------------------
# External data


@dataclass(frozen=True)
class ExternalData:
    """Where a tensor's bytes are: `length` bytes at `offset` of the regular file `path`."""

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.length)
        if len(data) != self.length:  # the file shrank since it was checked
            raise ModelLoadError(f"external data file {self.path.name} is shorter than the model says")
        return data


def uses_external_data(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_data(tensor: TensorProto, folder: Path | None, what: str) -> ExternalData:
    """Check a tensor's external-data reference against the rule above (see the module doc)."""
    name = f"'{shown(tensor.name, NAME_LIMIT)}'"
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in info:
            raise ModelLoadError(f"{what}: external data of tensor {name} gives '{shown(entry.key, NAME_LIMIT)}' twice")
        info[entry.key] = entry.value
    location = info.get("location", "")
    if folder is None:
        raise ModelLoadError(f"{what}: tensor {name} keeps its data in an external file ('{shown(location, NAME_LIMIT)}'), "
                             "which needs the model's folder: load the model from its file")
    folder = folder.resolve()
    # One reading of the path on every platform: `/` separates folders, and a backslash (a
    # separator on Windows, a name character elsewhere) is refused rather than guessed at.
    parts = PurePosixPath(location).parts
    if (not location or "\0" in location or "\\" in location or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).drive or ".." in parts):
        raise ModelLoadError(f"{what}: external data file '{shown(location, NAME_LIMIT)}' of tensor {name} is missing or "
                             "outside the model's folder (it must be a relative path with '/', without '..')")
    try:
        file = folder.joinpath(*parts).resolve()
        inside = file.is_relative_to(folder) and file != folder
        mode = os.stat(file).st_mode if inside else 0
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        inside, mode = False, 0
    if not inside:
        raise ModelLoadError(f"{what}: external data file '{shown(location, NAME_LIMIT)}' of tensor {name} is missing or "
                             "outside the model's folder")
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{what}: external data file '{shown(location, NAME_LIMIT)}' of tensor {name} is not a regular file")
    offset = _whole_number(info.get("offset", "0"), "offset", name, what)
    expected = tensor_bytes(tensor)
    if expected is None:
        raise ModelLoadError(f"{what}: tensor {name} of type {_type_name(tensor.data_type)} cannot be stored "
                             "as external data")
    length = _whole_number(info["length"], "length", name, what) if "length" in info else expected
    if length != expected:
        raise ModelLoadError(f"{what}: external data of tensor {name} is {length} bytes, but its dims "
                             f"{list(tensor.dims)} and type need {expected}")
    if offset + length > file.stat().st_size:
        raise ModelLoadError(f"{what}: external data of tensor {name} runs past the end of {file.name}")
    return ExternalData(file, offset, length)


def _whole_number(text: str, key: str, name: str, what: str) -> int:
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise ModelLoadError(f"{what}: external data {key} '{shown(text, NAME_LIMIT)}' of tensor {name} is not a whole "
                             "number >= 0")
    return int(text)


# ---------------------------------------------------------------------------------------------
# Tensor sizes

_PACKED_BITS = {getattr(TensorProto, n): bits for n, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, n)}
_DECLARABLE_TYPES = frozenset(TensorProto.DataType.values())  # a declared type may be UNDEFINED (unknown)
_KNOWN_TYPES = _DECLARABLE_TYPES - {TensorProto.UNDEFINED}


def _type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type) if data_type in _KNOWN_TYPES else str(data_type)


def elements(tensor: TensorProto) -> int:
    return math.prod(tensor.dims)


def tensor_bytes(tensor: TensorProto) -> int | None:
    """Bytes of the tensor's data as stored (raw_data or external), None for strings."""
    count = elements(tensor)
    if tensor.data_type in _PACKED_BITS:
        return -(-count * _PACKED_BITS[tensor.data_type] // 8)
    if tensor.data_type == TensorProto.STRING:
        return None
    storage = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return count * storage.itemsize


def _typed_count(tensor: TensorProto) -> int:
    """How many values the tensor's typed field (float_data, int32_data, ...) must hold."""
    count = elements(tensor)
    if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * count
    if tensor.data_type in _PACKED_BITS:  # packed into int32_data, one byte's worth per value
        return -(-count * _PACKED_BITS[tensor.data_type] // 8)
    return count


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _length_delimited(data: memoryview, start: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each length-delimited field `wanted` of the message data[start:end]."""
    at = start
    while at < end:
        tag, at = _varint(data, at)
        kind = tag & 7
        if kind == 0:
            _, at = _varint(data, at)
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
        elif kind == 2:
            size, at = _varint(data, at)
            if tag >> 3 == wanted:
                yield at, at + size
            at += size
        else:  # groups: not in onnx.proto
            raise ValueError(f"wire type {kind}")


def _initializer_raw_lengths(raw: bytes) -> list[int | None]:
    """len(raw_data) of each initializer of the main graph, read from the serialized model.

    Reading `tensor.raw_data` copies the bytes out of protobuf: on MiniLM (22 MB) that alone
    was a third of the load time. The lengths are in the wire format for free (ModelProto field
    7 is the graph, GraphProto field 5 an initializer, TensorProto field 9 its raw_data).
    """
    data = memoryview(raw)
    lengths: list[int | None] = []
    for graph_start, graph_end in _length_delimited(data, 0, len(data), 7):  # a repeated graph field merges
        for start, end in _length_delimited(data, graph_start, graph_end, 5):
            found = None
            for raw_start, raw_end in _length_delimited(data, start, end, 9):
                found = raw_end - raw_start
            lengths.append(found)
    return lengths


# The typed value fields of a TensorProto (raw_data and external data are the other two places).
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor(tensor: TensorProto, folder: Path | None, what: str, raw_length: int | None = None) -> None:
    name = f"'{shown(tensor.name, NAME_LIMIT)}'"
    if tensor.data_type not in _KNOWN_TYPES:
        raise ModelLoadError(f"{what}: tensor {name} has unknown data type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{what}: tensor {name} has negative dims {shown(str(list(tensor.dims)), NAME_LIMIT)}")
    if tensor.HasField("segment"):
        raise ModelLoadError(f"{what}: tensor {name} is a segment of a larger tensor (not supported)")
    fields = [f for f in _VALUE_FIELDS if len(getattr(tensor, f))]  # (repeated fields: no copy)
    if tensor.HasField("raw_data") and (len(tensor.raw_data) if raw_length is None else raw_length):
        fields.append("raw_data")
    if uses_external_data(tensor):
        fields.append("external data")
    if len(fields) > 1:  # which one holds the values? Readers differ (the onnx checker refuses it)
        raise ModelLoadError(f"{what}: tensor {name} has its values in more than one field "
                             f"({', '.join(fields)}); ONNX allows one")
    if uses_external_data(tensor):
        external_data(tensor, folder, what)
        return
    if tensor.HasField("raw_data"):
        expected = tensor_bytes(tensor)
        held = len(tensor.raw_data) if raw_length is None else raw_length
        if expected is not None and held != expected:
            raise ModelLoadError(f"{what}: tensor {name} holds {held} bytes, but its dims "
                                 f"{shown(str(list(tensor.dims)), NAME_LIMIT)} and type {_type_name(tensor.data_type)} "
                                 f"need {expected}")
        return
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    held, expected = len(getattr(tensor, field)), _typed_count(tensor)
    if held != expected:
        raise ModelLoadError(f"{what}: tensor {name} holds {held} values, but its dims "
                             f"{shown(str(list(tensor.dims)), NAME_LIMIT)} need {expected}")
    if tensor.data_type == TensorProto.STRING:  # onnx (and so every reader here) decodes them as UTF-8
        try:
            for value in tensor.string_data:
                value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{what}: string tensor {name} holds bytes that are not UTF-8 "
                                 f"(byte {exc.start} of a value)") from None


def _check_sparse(sparse: onnx.SparseTensorProto, what: str) -> None:
    name = f"'{shown(sparse.values.name, NAME_LIMIT)}'"
    if any(d < 0 for d in sparse.dims):
        raise ModelLoadError(f"{what}: sparse tensor {name} has negative dims {shown(str(list(sparse.dims)), NAME_LIMIT)}")
    nnz = elements(sparse.values)
    shape = list(sparse.indices.dims)
    if (len(sparse.values.dims) != 1 or sparse.indices.data_type != TensorProto.INT64
            or shape not in ([nnz], [nnz, len(sparse.dims)])):
        raise ModelLoadError(f"{what}: sparse tensor {name} has values of shape {list(sparse.values.dims)[:4]} "
                             f"and indices of shape {shape[:4]}: expected [NNZ] values and int64 indices "
                             "[NNZ] or [NNZ, rank]")
    if not uses_external_data(sparse.indices) and nnz:
        indices = onnx.numpy_helper.to_array(sparse.indices).reshape(nnz, -1)
        bounds = [math.prod(sparse.dims)] if len(shape) == 1 else list(sparse.dims)
        if (indices < 0).any() or any((indices[:, i] >= bound).any() for i, bound in enumerate(bounds)):
            raise ModelLoadError(f"{what}: sparse tensor {name} has indices outside its dims "
                                 f"{shown(str(list(sparse.dims)), NAME_LIMIT)}")


# ---------------------------------------------------------------------------------------------
# Text fields and declared types


class _NotUtf8(Exception):
    pass


def _utf8(*values) -> None:
    # protobuf hands out a string field that is not valid UTF-8 as bytes instead of str.
    for value in values:
        if value.__class__ is bytes:
            raise _NotUtf8(value)


def _check_type(type_proto: onnx.TypeProto, name: str, what: str) -> None:
    """Declared types: known element types (graphsurgeon fails on others), UTF-8 dim names,
    sizes >= -1 (-1 is how some exporters, paddle2onnx among them, write a dynamic dim)."""
    kind = type_proto.WhichOneof("value")
    _utf8(type_proto.denotation)
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(type_proto, kind)
        if inner.elem_type not in _DECLARABLE_TYPES:
            raise ModelLoadError(f"{what}: '{shown(name, NAME_LIMIT)}' is declared with unknown data type {inner.elem_type}")
        for dim in inner.shape.dim:
            _utf8(dim.dim_param, dim.denotation)
            if dim.HasField("dim_value") and dim.dim_value < -1:
                raise ModelLoadError(f"{what}: '{shown(name, NAME_LIMIT)}' is declared with a dim of size {dim.dim_value}")
    elif kind in ("sequence_type", "optional_type"):
        _check_type(getattr(type_proto, kind).elem_type, name, what)
    elif kind == "map_type":
        if type_proto.map_type.key_type not in _DECLARABLE_TYPES:
            raise ModelLoadError(f"{what}: '{shown(name, NAME_LIMIT)}' is declared with unknown map key type "
                                 f"{type_proto.map_type.key_type}")
        _check_type(type_proto.map_type.value_type, name, what)


def _check_texts(proto: onnx.ModelProto, what: str) -> None:
    """The names and texts edgegraph and graphsurgeon read are UTF-8; declared types are known.
    (Node names, op types and tensor names are checked where `_check_graph` reads them.)"""
    try:
        _utf8(proto.producer_name, proto.producer_version, proto.domain, proto.doc_string,
              *(o.domain for o in proto.opset_import))
        for entry in proto.metadata_props:
            _utf8(entry.key, entry.value)
        for graph in graphs(proto):
            _utf8(graph.name, graph.doc_string)
            if isinstance(graph, onnx.GraphProto):
                values = [*graph.input, *graph.output, *graph.value_info]
            else:
                values = list(graph.value_info)
                _utf8(graph.domain, graph.overload, *graph.attribute, *(o.domain for o in graph.opset_import))
            for value in values:
                _utf8(value.name)
                _check_type(value.type, value.name, what)
            for tensor in _tensors_of(graph):
                _utf8(tensor.name, *(t for e in tensor.external_data for t in (e.key, e.value)))
    except _NotUtf8 as exc:
        raise _not_utf8(exc, what) from None


def _not_utf8(exc: _NotUtf8, what: str) -> ModelLoadError:
    return ModelLoadError(f"{what} has a name or text field that is not valid UTF-8 ({shown(repr(exc.args[0]), 40)})")


# ---------------------------------------------------------------------------------------------
# Graph structure: what the onnx checker reports as "not topologically sorted", in plain words


def _node_label(node: onnx.NodeProto) -> str:
    return f"node '{shown(node.name, NAME_LIMIT)}' ({shown(node.op_type, NAME_LIMIT)})" if node.name else f"a {shown(node.op_type, NAME_LIMIT)} node"


# Attribute types onnx-graphsurgeon carries through (type protos since edgegraph.ir teaches it
# them); it drops the others (sparse tensors, lists of tensors or graphs) with a warning, which
# would change what the model means.
_KEPT_ATTRIBUTES = frozenset({onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
                              onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.FLOATS,
                              onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS, onnx.AttributeProto.TYPE_PROTO})


def _check_attributes(node: onnx.NodeProto, what: str) -> None:
    for attribute in node.attribute:
        if attribute.type not in _KEPT_ATTRIBUTES and not attribute.ref_attr_name:
            kind = onnx.AttributeProto.AttributeType.Name(attribute.type) if attribute.type in \
                onnx.AttributeProto.AttributeType.values() else str(attribute.type)
            raise ModelLoadError(f"{what}: {_node_label(node)} has attribute '{shown(attribute.name, NAME_LIMIT)}' of "
                                 f"type {kind}, which edgegraph cannot keep (not supported yet)")


def _check_graph(graph: _GraphLike, outer: frozenset[str], what: str, unsorted: list[bool]) -> set[str]:
    """Check one graph or function (subgraphs recursively); return the outer-scope names it reads.

    Sets `unsorted[0]` when the nodes of a graph are valid but not in dependency order.
    """
    if isinstance(graph, onnx.GraphProto):
        inputs = [v.name for v in graph.input]
        local = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
        outputs = [v.name for v in graph.output]
        kind = "graph"
    else:
        inputs, local, outputs, kind = list(graph.input), set(), list(graph.output), "function"
    try:
        _utf8(*inputs, *outputs, *local)
    except _NotUtf8 as exc:
        raise _not_utf8(exc, what) from None
    for names, role in ((inputs, "input"), (outputs, "output")):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ModelLoadError(f"{what}: {kind} {role} '{shown(name, NAME_LIMIT)}' is declared twice")
            seen.add(name)
    local |= set(inputs)
    producer: dict[str, int] = {}
    nodes = list(graph.node)
    for node in nodes:
        try:
            _utf8(node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute))
        except _NotUtf8 as exc:
            raise _not_utf8(exc, what) from None
        _check_attributes(node, what)
    for index, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                raise ModelLoadError(f"{what}: tensor '{shown(name, NAME_LIMIT)}' is written by two nodes, "
                                     f"{_node_label(graph.node[producer[name]])} and {_node_label(node)}")
            if name in local:
                raise ModelLoadError(f"{what}: {_node_label(node)} writes '{shown(name, NAME_LIMIT)}', which is already a "
                                     f"{kind} input or initializer")
            producer[name] = index
    visible = outer | local | producer.keys()
    free: set[str] = set()
    needs: list[set[int]] = []
    for node in graph.node:
        reads = {name for name in node.input if name}
        for sub in subgraphs(node):
            reads |= _check_graph(sub, frozenset(visible), what, unsorted)
        for name in reads:
            if name not in visible:
                raise ModelLoadError(f"{what}: {_node_label(node)} reads '{shown(name, NAME_LIMIT)}', which no node, "
                                     f"{kind} input or initializer defines")
        free |= {name for name in reads if name not in local and name not in producer}
        needs.append({producer[name] for name in reads if name in producer})
    for name in outputs:
        if name not in visible:
            raise ModelLoadError(f"{what}: {kind} output '{shown(name, NAME_LIMIT)}' is not computed by any node")
        if name not in local and name not in producer:
            free.add(name)
    if any(j >= i for i, deps in enumerate(needs) for j in deps):
        _require_acyclic(graph, needs, what)
        unsorted[0] = True
    return free


def _require_acyclic(graph: _GraphLike, needs: list[set[int]], what: str) -> None:
    waiting = [len(deps) for deps in needs]
    users: list[list[int]] = [[] for _ in needs]
    for i, deps in enumerate(needs):
        for j in deps:
            users[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    while ready:
        for user in users[ready.pop()]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    stuck = [i for i, count in enumerate(waiting) if count]
    if stuck:
        raise ModelLoadError(f"{what}: the graph has a cycle through {_node_label(graph.node[stuck[0]])}")


def _topological_order(needs: list[set[int]]) -> list[int]:
    order: list[int] = []
    placed: set[int] = set()
    for start in range(len(needs)):
        stack = [start]
        while stack:
            node = stack[-1]
            if node in placed:
                stack.pop()
                continue
            pending = [j for j in needs[node] if j not in placed]
            if pending:
                stack.extend(pending)
            else:
                placed.add(node)
                order.append(node)
                stack.pop()
    return order


def _dependencies(graph: _GraphLike) -> list[set[int]]:
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    needs = []
    for node in graph.node:
        reads = {name for name in node.input if name}
        for sub in subgraphs(node):
            reads |= names_read(sub)
        needs.append({producer[name] for name in reads if name in producer})
    return needs


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Names the nodes of `graph` (and of its subgraphs) read, and its outputs."""
    reads = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for node in graph.node:
        for sub in subgraphs(node):
            reads |= names_read(sub)
    return reads


def check_declared_shape(name: str, main: bool, declared: onnx.TensorShapeProto, computed: onnx.TensorShapeProto,
                         what: str) -> None:
    """Refuse a graph output declared with a shape that contradicts the one shape inference
    computes (`ir.infer_shapes` calls this at load): another rank, or a size >= 0 where the
    other says another size >= 0. Symbolic, unknown and negative (dynamic) dims agree with anything."""
    def size(dim):
        return dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None

    if len(declared.dim) == len(computed.dim) and all(
            size(a) is None or size(b) is None or size(a) == size(b) for a, b in zip(declared.dim, computed.dim)):
        return
    where = "graph output" if main else "subgraph output"
    raise ModelLoadError(f"{what}: {where} '{shown(name, NAME_LIMIT)}' is declared with shape {_shape_text(declared)}, but "
                         f"its computed shape is {_shape_text(computed)}")


def _shape_text(shape: onnx.TensorShapeProto) -> str:
    dims = [str(d.dim_value) if d.HasField("dim_value") else shown(d.dim_param, 20) or "?" for d in shape.dim[:9]]
    return "[" + ", ".join(dims) + (", ..." if len(shape.dim) > 9 else "") + "]"


# ---------------------------------------------------------------------------------------------
# Opsets and the onnx checker

# Ops of the default domain the onnx checker accepts without a schema, printing a warning on
# stdout (candy.onnx has three); the checker sees them in a private domain instead.
_EXPERIMENTAL = frozenset({"ATen", "Affine", "ConstantFill", "Crop", "DynamicSlice", "GRUUnit", "GivenTensorFill",
                           "ImageScaler", "ParametricSoftplus", "Scale", "ScaledTanh"})
_CHECKER_DOMAIN = "edgegraph.experimental"


def _check_opsets(proto: onnx.ModelProto, what: str) -> None:
    known = onnx.defs.C.schema_version_map()
    seen: set[str] = set()
    for opset in proto.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in seen:
            raise ModelLoadError(f"{what}: the opset of domain '{shown(opset.domain, NAME_LIMIT)}' is imported twice")
        seen.add(domain)
        if domain in known:
            low, high = known[domain]
            if not low <= opset.version <= high:
                raise ModelLoadError(f"{what}: opset {opset.version} of domain '{opset.domain or 'ai.onnx'}' does "
                                     f"not exist (this onnx knows {low} to {high})")


def _run_checker(proto: onnx.ModelProto, unsorted: bool, what: str) -> None:
    try:
        data = _checker_view(proto, unsorted).SerializeToString()
    except ValueError:  # nodes past protobuf's 2 GiB (a ModelProto in memory): the checks above ran
        return
    try:
        onnx.checker.C.check_model(data, False, False, False)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{what} is not a valid ONNX model: {_checker_message(str(exc))}") from None


def _checker_view(proto: onnx.ModelProto, unsorted: bool) -> onnx.ModelProto:
    """What the onnx checker is given: the model without what `check` has covered already.

    - The main graph's initializers are stubs without data (their data was checked above):
      the checker would take a copy of every weight, most of its time on a big model.
    - External data references are dropped: checked by our rule; the checker would look for
      the files relative to the working directory.
    - Nodes are in dependency order: the checker refuses valid graphs that are not sorted.
    - Experimental ops (accepted by the checker) are in a private domain: the checker would
      print a warning about them on stdout.
    - Graph inputs and outputs of unknown rank (a tensor type without a shape) and a graph
      without a name are allowed, as onnxruntime allows them; the checker would refuse them.
    """
    view = onnx.ModelProto()
    _copy_fields(proto, view, skip="graph")
    _copy_fields(proto.graph, view.graph, skip="initializer")
    view.graph.initializer.extend(TensorProto(name=t.name, data_type=t.data_type, dims=[0])
                                  for t in proto.graph.initializer)
    view.graph.name = view.graph.name or "main"
    for value in [*view.graph.input, *view.graph.output]:
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
    for tensor in tensors(view):
        if uses_external_data(tensor):
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
            del tensor.dims[:]
            tensor.dims.append(0)
    experimental = False
    for graph in graphs(view):
        needs = _dependencies(graph) if unsorted else []
        if any(j >= i for i, deps in enumerate(needs) for j in deps):
            nodes = [onnx.NodeProto() for _ in graph.node]
            for copy, j in zip(nodes, _topological_order(needs)):
                copy.CopyFrom(graph.node[j])
            del graph.node[:]
            graph.node.extend(nodes)
        for node in graph.node:
            if node.op_type in _EXPERIMENTAL and node.domain in ("", "ai.onnx"):
                node.domain, experimental = _CHECKER_DOMAIN, True
    if experimental:
        view.opset_import.add(domain=_CHECKER_DOMAIN, version=1)
    return view


def _copy_fields(source, target, *, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):  # repeated
            getattr(target, field.name).extend(value)
        elif isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _checker_message(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else "rejected by the onnx checker"
    context = next((line for line in lines[1:] if line.startswith("==> Context:")), "")
    if context:
        message += f" ({context.removeprefix('==> Context:').strip()})"
    return shown(message, 300)


def check(proto: onnx.ModelProto, what: str, folder: Path | None, raw: bytes | None = None) -> None:
    """Refuse (ModelLoadError) a model edgegraph must not read or rewrite; see the module doc.

    `folder` is where external data may live (None: nowhere); `raw` the serialized model when
    at hand, where the lengths of the weights are read without copying them.
    """
    _check_texts(proto, what)
    _check_opsets(proto, what)
    lengths = iter(())
    if raw is not None:
        try:
            found = _initializer_raw_lengths(raw)
        except ValueError:  # protobuf parsed it, so this cannot happen; read the fields instead
            found = []
        if len(found) == len(proto.graph.initializer):
            lengths = iter(found)
    for graph in graphs(proto):  # the main graph's initializers come first
        for tensor in _tensors_of(graph):
            _check_tensor(tensor, folder, what, next(lengths, None))
        for sparse in _sparse_of(graph):
            _check_sparse(sparse, what)
    unsorted = [False]
    _check_graph(proto.graph, frozenset(), what, unsorted)
    for function in proto.functions:
        _check_graph(function, frozenset(), what, unsorted)
    _require_no_recursion(proto, what)
    _run_checker(proto, unsorted[0], what)


def _require_no_recursion(proto: onnx.ModelProto, what: str) -> None:
    """Local functions may call each other, but not in a cycle (ONNX forbids recursion; shape
    inference and onnxruntime would expand it forever)."""
    local = {(f.domain, f.name): f for f in proto.functions}
    calls = {key: sorted({(n.domain, n.op_type) for g in _function_graphs(f) for n in g.node} & local.keys())
             for key, f in local.items()}
    state: dict[tuple[str, str], int] = {}  # 1: on the current path, 2: done

    def visit(key: tuple[str, str], path: list[str]) -> None:
        state[key] = 1
        for callee in calls[key]:
            if state.get(callee) == 1:
                cycle = " -> ".join(shown(name, NAME_LIMIT) for name in [*path, key[1], callee[1]][-4:])
                raise ModelLoadError(f"{what}: local functions call each other in a cycle ({cycle}); "
                                     "ONNX functions cannot be recursive")
            if callee not in state:
                visit(callee, [*path, key[1]])
        state[key] = 2

    for key in local:
        if key not in state:
            visit(key, [])


def _function_graphs(function: onnx.FunctionProto) -> Iterator[_GraphLike]:
    """A function's body and the subgraphs in it."""
    stack: list[_GraphLike] = [function]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack.extend(subgraphs(node))
