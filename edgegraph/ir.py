"""The in-memory model and a thin layer over onnx-graphsurgeon: protobuf <-> graphs (`Model`,
`from_proto`), shape inference, and the graph helpers passes use. Reading and writing model
files (validation, external data, atomic saves) is `edgegraph.modelio`."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from edgegraph import validate
from edgegraph.errors import EdgegraphError

logger = logging.getLogger(__name__)

# gs skips TypeProto attributes on import (Optional's, SequenceEmpty's `type`...) and so writes
# those nodes without them, a model onnxruntime rejects; let it carry them like other attributes
# (onnx.helper.make_attribute writes them back).
gs.importers.onnx_importer.ONNX_PYTHON_ATTR_MAPPING.setdefault("TYPE_PROTO", "tp")

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTO_LIMIT = 2**31 - 64 * 2**20
# Initializers of at least this size are kept out of protobuf whenever the proto is only a means:
# saving with external data (onnx's own threshold), copying a model, inferring shapes. Shape-like
# constants are smaller, so inference still sees every value it can use.
DETACH_BYTES = 1024
_DETACHED = "edgegraph:detached"  # external-data location of a weight left out of a proto

@dataclass
class Model:
    """A gs graph plus the model-level fields that graphsurgeon does not carry."""

    graph: gs.Graph
    doc_string: str = ""
    domain: str = ""
    model_version: int = 0
    metadata_props: dict[str, str] = field(default_factory=dict)
    # Whether `save` writes the intermediate types that shape inference found (value_info): only
    # when the model this one was read from had them, so that an exact pass never grows a file
    # by ~60 bytes a tensor of types any runtime infers again.
    value_info: bool = True

    @property
    def opset(self) -> int:
        """Opset of the default ONNX domain."""
        return int(self.graph.opset)

    def to_proto(self, *, weights: bool = True) -> onnx.ModelProto:
        """Export to a ModelProto, keeping ir_version unless the opsets need a newer one.

        `weights=False` leaves initializers of DETACH_BYTES or more out (as external-data
        references to nothing): a small proto for looking at the graph or inferring shapes.
        """
        if not weights:
            with detached(detachable_weights(self)):
                return self.to_proto()
        with _exportable(self) as restore:
            proto = gs.export_onnx(self.graph, do_type_check=False)
        restore(proto)
        needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        inputs = {i.name for i in proto.graph.input}
        if any(t.name not in inputs for t in proto.graph.initializer):
            # Before IR 4 every initializer is also a graph input; gs writes them as constants
            # only, which IR 4 (valid with any opset) allows: the checker refused the file.
            needed = max(needed, 4)
        proto.ir_version = max(proto.ir_version or 0, needed)
        if proto.ir_version >= 4:  # (before IR 4 every initializer of the main graph is also an input)
            _store_shared_constants_once(self.graph, proto.graph)
        for name in ("doc_string", "domain", "model_version"):  # (an empty field set would still be written)
            if getattr(self, name):
                setattr(proto, name, getattr(self, name))
        del proto.metadata_props[:]
        for key, value in self.metadata_props.items():
            proto.metadata_props.add(key=key, value=value)
        return proto

    def copy(self) -> Model:
        """A deep copy (through protobuf, so no gs object is shared).

        Weights are not copied through protobuf: values that cannot change (not yet loaded, or
        read-only like memory-mapped external data) are shared, writable arrays are copied.
        """
        return self._rebuilt(infer=False, share=False)

    def refresh_shapes(self, *, what: str | None = None) -> None:
        """Re-run shape inference, e.g. after a pass created tensors without shapes.

        The graph is rebuilt: gs objects held from before the call belong to the old graph.
        `what` names a model being loaded: declared output shapes that contradict inference
        are then refused (see `infer_shapes`).
        """
        self.graph = self._rebuilt(infer=True, share=True, what=what).graph

    def _rebuilt(self, *, infer: bool, share: bool, what: str | None = None) -> Model:
        # Export without the weights (cheap even for a multi-GB model), re-import, then hand the
        # weights to the new graph's constants.
        weights = detachable_weights(self)
        with detached(weights):
            proto = self.to_proto()
        rebuilt = from_proto(infer_shapes(proto, what=what) if infer else proto, infer=False)
        rebuilt.value_info = self.value_info
        by_name = {c.name: c for c in weights}
        for tensor in all_constants(rebuilt):
            source = by_name.get(tensor.name)
            if source is not None and _is_detached(tensor):
                tensor._values = source._values if share else _private_copy(source._values)
                tensor.data_location = source.data_location
        return rebuilt


def _store_shared_constants_once(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Keep one copy, in the main graph, of each constant that several graphs read.

    gs writes a constant into every graph that reads it: a weight that two If branches (or a
    graph and its Loop body) take from an enclosing graph would be stored once per graph, and
    be a separate tensor per graph when read back. Subgraphs see the main graph's initializers.
    Only names that belong to one tensor in the whole graph tree are moved.
    """
    tree = list(iter_graphs(graph, functions=False))
    if len(tree) == 1:
        return
    owners: dict[str, set[int]] = {}
    readers: dict[int, int] = {}  # constant id -> number of graphs reading it
    for g in tree:
        for tensor in g.tensors().values():
            owners.setdefault(tensor.name, set()).add(id(tensor))
            if isinstance(tensor, gs.Constant):
                readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    shared = {name for name, ids in owners.items() if len(ids) == 1 and readers.get(next(iter(ids)), 0) > 1}
    if not shared:
        return
    stored = {t.name for t in proto.initializer}

    def move(g: onnx.GraphProto) -> None:
        for node in g.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    kept = [t for t in sub.initializer if t.name not in shared]
                    if len(kept) != len(sub.initializer):
                        for t in sub.initializer:
                            if t.name in shared and t.name not in stored:
                                proto.initializer.append(t)
                                stored.add(t.name)
                        del sub.initializer[:]
                        sub.initializer.extend(kept)
                    move(sub)

    move(proto)


def from_proto(proto: onnx.ModelProto, *, infer: bool = True) -> Model:
    """Wrap a ModelProto (shape inference first, unless asked not to).

    The model's weights stay in `proto` until a pass reads them (gs loads them lazily), so the
    proto must not be changed while the model is in use.
    """
    graph = gs.import_onnx(proto)
    for tensor in _constants_of(graph, attributes=True):
        if type(tensor._values) is SparseValues:
            _read_sparse(tensor)
    unwritable = {v.name: v.type for v in _value_infos(proto) if not _gs_can_write(v.type)}
    if unwritable:
        for g in iter_graphs(graph):
            for tensor in g.tensors().values():
                if tensor.name in unwritable:
                    setattr(tensor, _KEPT_TYPE, unwritable[tensor.name])
    # gs drops the IR version of old models if it is not set; keep what the file said.
    graph.ir_version = proto.ir_version
    model = Model(
        graph=graph,
        doc_string=proto.doc_string,
        domain=proto.domain,
        model_version=proto.model_version,
        metadata_props={p.key: p.value for p in proto.metadata_props},
        value_info=any(len(g.value_info) for g in validate.graphs(proto)),
    )
    if infer:
        model.refresh_shapes()
    return model


_KEPT_TYPE = "_edgegraph_type"  # gs tensor attribute: the TypeProto it was read with


def _value_infos(proto: onnx.ModelProto) -> Iterator[onnx.ValueInfoProto]:
    for graph in validate.graphs(proto):
        if isinstance(graph, onnx.GraphProto):
            yield from graph.input
            yield from graph.output
        yield from graph.value_info


def _gs_can_write(type_proto: onnx.TypeProto) -> bool:
    """Whether graphsurgeon's exporter writes this type back (it fails on the others)."""
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return type_proto.sequence_type.elem_type.WhichOneof("value") == "tensor_type"
    return kind in ("tensor_type", "sparse_tensor_type")  # not None: an empty type reads as an opaque one


class _Sparse(SparseValues):
    """Sparse values that load whatever field holds them (graphsurgeon reads only the typed
    fields, so raw_data, what numpy_helper writes, came out as zeros).

    gs replaces a constant's lazy values by the array they load as soon as a pass reads them,
    and would then write the weight dense. The array loaded is kept (`dense`, read-only, so it
    cannot change behind our back): while a constant still holds it, `sparse_source` finds the
    sparse proto and the export writes that instead (`_exportable`).
    """

    dense: np.ndarray | None = None

    def load(self):
        if self.dense is None:
            self.dense = self._load()
            self.dense.flags.writeable = False
        return self.dense

    def _load(self):
        sparse = self.tensor
        values = onnx.numpy_helper.to_array(sparse.values)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        if values.size:
            indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
            if indices.ndim == 1:
                dense.reshape(-1)[indices] = values
            else:
                dense[tuple(indices.T)] = values
        return dense


_SPARSE = "_edgegraph_sparse"  # gs constant attribute: the `_Sparse` values it was read with


def _read_sparse(constant: gs.Constant) -> None:
    """Give a sparse initializer the form it takes least room in: dense when that is not larger
    (a weight half zeros: 4 bytes a value against 4 + 8 for value and index), which also lets
    onnx's shape inference and checker read it (they do not take sparse inputs); else sparse,
    and written sparse again as long as no pass changes its values."""
    sparse = _Sparse(constant._values.tensor)
    constant._values = sparse
    parts = (sparse.tensor.values, sparse.tensor.indices)
    # (parts in external data are read only through `_map_external_data`'s rule, later)
    if not any(map(validate.uses_external_data, parts)) and sparse.nbytes <= stored_nbytes(constant):
        constant._values = sparse.load()  # (gs's nbytes: the dense shape's)
    else:
        setattr(constant, _SPARSE, sparse)


def sparse_source(constant: gs.Constant) -> SparseValues | None:
    """The sparse initializer whose values `constant` still holds (None if it is dense, or a
    pass gave it other values)."""
    values = constant._values
    if isinstance(values, SparseValues):
        return values
    source = getattr(constant, _SPARSE, None)
    return source if source is not None and values is source.dense else None


def stored_nbytes(constant: gs.Constant) -> int:
    """Bytes a constant's values take in the file: a sparse one's non-zero values and indices
    (what a rewrite that stops reading it frees), a dense one's array."""
    sparse = sparse_source(constant)
    if sparse is not None:
        return sum(validate.tensor_bytes(part) or 0 for part in (sparse.tensor.values, sparse.tensor.indices))
    proto = getattr(constant._values, "tensor", None)  # a LazyValues: 4-bit types are stored packed
    if proto is not None and proto.data_type in _PACKED_TYPES:
        return validate.tensor_bytes(proto) or 0
    return int(constant._values.nbytes)


# Types stored packed, several values to a byte, while numpy holds one value per byte.
_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                 if hasattr(onnx.TensorProto, n)}


def numpy_dtype(dtype, *, exact: bool = False) -> np.dtype | None:
    """A gs tensor's dtype (numpy type or onnx data type number) as a numpy dtype; None when it
    has none (unknown, or the element type of an optional / map value).

    With `exact`, also None for the types numpy holds but does not compute with exactly
    (ml_dtypes' bfloat16, float8, int4; strings): what a rewrite that evaluates values in numpy
    must leave alone.
    """
    try:
        if isinstance(dtype, int):  # an onnx TensorProto data type
            if exact:  # (gs keeps onnx enums only for the types numpy lacks)
                return None
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        dtype = np.dtype(dtype) if dtype is not None else None
    except (TypeError, KeyError, ValueError):
        return None
    return None if exact and dtype is not None and dtype.name not in _EXACT_DTYPES else dtype


_EXACT_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
}


def onnx_dtype(dtype) -> int:
    """The onnx TensorProto data type of a numpy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def is_opaque(constant: gs.Constant) -> bool:
    """True for initializers whose values numpy would silently change (bfloat16, float8, int4, strings)."""
    source = constant._values
    dtype = source.dtype if isinstance(source, LazyValues) else getattr(source, "dtype", None)
    return numpy_dtype(dtype, exact=True) is None


def storage_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype whose bytes are the tensor's raw bytes, if there is one."""
    if data_type in _PACKED_TYPES or data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None


def proto_size(model) -> int:
    """Bytes a model (Model or ModelProto) takes serialized, without serializing it.

    Serializing is what protobuf's ByteSize() does: seconds and a full copy for a big model, and
    an error past 2 GiB. Tensor payloads are computed from their shapes instead; the rest of the
    proto is measured only when the payload leaves room for it to matter.
    """
    if isinstance(model, Model):
        return sum(stored_nbytes(c) for c in all_constants(model))
    payload = sum(_payload_bytes(t) for t in validate.tensors(model))
    if payload < PROTO_LIMIT // 8:
        return model.ByteSize()
    return payload


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if validate.uses_external_data(tensor):
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    dtype = storage_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * (dtype.itemsize if dtype else 8)


# ---------------------------------------------------------------------------------------------
# Weights outside protobuf: how big models are copied, inferred and saved without extra copies.


def all_constants(model: Model, *, attributes: bool = False) -> list[gs.Constant]:
    """Every initializer of the model (subgraphs included), once each; with `attributes`, the
    tensors of node attributes (Constant nodes' values) too."""
    return _constants_of(model.graph, attributes=attributes)


def _constants_of(top: gs.Graph, *, attributes: bool) -> list[gs.Constant]:
    found: dict[int, gs.Constant] = {}
    for graph in iter_graphs(top):
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                found.setdefault(id(tensor), tensor)
        for node in graph.nodes if attributes else []:
            for value in node.attrs.values():
                for item in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(item, gs.Constant):
                        found.setdefault(id(item), item)
    return list(found.values())


def _nbytes(constant: gs.Constant) -> int:
    return int(constant._values.nbytes)


def detachable_weights(model: Model) -> list[gs.Constant]:
    """The initializers that `detached` can move out: DETACH_BYTES or more, uniquely named,
    with bytes that export unchanged."""
    names: dict[str, int] = {}
    constants = all_constants(model)
    for c in constants:
        names[c.name] = names.get(c.name, 0) + 1
    return [c for c in constants if names[c.name] == 1 and _nbytes(c) >= DETACH_BYTES and _detachable(c._values)
            and _exports_as_stored(c) and sparse_source(c) is None]


def _exports_as_stored(constant: gs.Constant) -> bool:
    """False when gs converts the values on export (a Constant created with `export_dtype`)."""
    wanted = constant._export_dtype
    if wanted is None:
        return True
    try:
        return np.dtype(wanted) == np.dtype(constant.dtype)
    except TypeError:  # an onnx data type number, e.g. TensorProto.BFLOAT16
        return False


def _detachable(values) -> bool:
    if isinstance(values, SparseValues):
        return False
    if isinstance(values, LazyValues):
        return values.tensor.HasField("raw_data")
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, TypeError, ValueError):
        return False
    # numpy holds 4-bit values one per byte; their file bytes are packed (gs packs on export).
    return values.dtype != object and data_type not in _PACKED_TYPES


_4BIT_NAMES = ("int4", "uint4", "float4_e2m1fn")
# Value types gs imports but cannot export (it crashes on optional types, drops the rest).
_GS_EXPORTS = ("tensor_type", "sequence_type", "sparse_tensor_type")


@contextmanager
def _exportable(model: Model):
    """While active, the model's graph is one gs can export as it should be (one walk over it):

    * a 4-bit initializer that a pass read is a numpy array of one value per byte, which gs
      would write unpacked (a tensor onnx rejects): it gets its packed proto back (for good);
    * a sparse initializer that a pass read, but did not change, is written sparse again;
    * tensors of a type gs cannot export (optional, map, sequences of those, opaque) have no
      dtype meanwhile, so gs writes them untyped; the `restore` yielded puts back the type they
      were read with (`from_proto` keeps it), or an optional type made from their dtype.
    """
    saved, types, dense = [], {}, []
    for graph in iter_graphs(model.graph):
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                values = tensor._values
                if isinstance(values, np.ndarray) and values.dtype.itemsize == 1 and values.dtype.name in _4BIT_NAMES:
                    tensor._values = LazyValues(onnx.numpy_helper.from_array(values, tensor.name))
                elif isinstance(values, np.ndarray) and (sparse := sparse_source(tensor)) is not None:
                    dense.append((tensor, values))
                    tensor._values = sparse
            elif hasattr(tensor, _KEPT_TYPE) or (tensor.dtype is not None and tensor.type not in _GS_EXPORTS):
                if hasattr(tensor, _KEPT_TYPE):
                    types[tensor.name] = getattr(tensor, _KEPT_TYPE)
                elif tensor.type == "optional_type" and isinstance(tensor.dtype, onnx.TypeProto):
                    types[tensor.name] = onnx.helper.make_optional_type_proto(tensor.dtype)
                saved.append((tensor, tensor.dtype))
                tensor.dtype = None

    def restore(proto: onnx.ModelProto) -> None:
        for info in _value_infos(proto) if types else ():
            if info.name in types and not info.type.WhichOneof("value"):
                info.type.CopyFrom(types[info.name])
    try:
        yield restore
    finally:
        for tensor, dtype in saved:
            tensor.dtype = dtype
        for tensor, values in dense:
            tensor._values = values


def _is_detached(constant: gs.Constant) -> bool:
    values = constant._values
    return isinstance(values, LazyValues) and any(
        e.key == "location" and e.value == _DETACHED for e in values.tensor.external_data)


def _private_copy(values):
    """Values a copied model may own: arrays nobody can change are shared, others copied."""
    if isinstance(values, np.ndarray) and values.flags.writeable:
        return values.copy()
    return values


@contextmanager
def detached(weights: Iterable[gs.Constant], data_file: Path | None = None):
    """While active, `weights` export as external-data references instead of their values.

    With `data_file`, the values are written there (each at a 4 KiB-aligned offset, so runtimes
    can map them) and referenced by the file's name; without, the references point nowhere.
    Either way exporting costs no copy of the weights.
    """
    saved = [(c, c._values, c.data_location) for c in weights]
    handle = open(data_file, "wb") if data_file is not None else None
    try:
        for constant, values, _ in saved:
            data_type = (values.tensor.data_type if isinstance(values, LazyValues)
                         else onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
            stub = onnx.TensorProto(name=constant.name, dims=list(constant.shape), data_type=data_type,
                                    data_location=onnx.TensorProto.EXTERNAL)
            if handle is None:
                stub.external_data.add(key="location", value=_DETACHED)
            else:
                offset = -(-handle.tell() // 4096) * 4096
                handle.seek(offset)
                if isinstance(values, LazyValues):
                    handle.write(values.tensor.raw_data)
                else:
                    handle.write(np.ascontiguousarray(values).reshape(-1).view(np.uint8).data)
                for key, value in (("location", data_file.name), ("offset", str(offset)),
                                   ("length", str(handle.tell() - offset))):
                    stub.external_data.add(key=key, value=value)
            constant._values = LazyValues(stub)
            constant.data_location = None
        if handle is not None:
            handle.close()
        yield
    finally:
        if handle is not None:
            handle.close()
        for constant, values, location in saved:
            constant._values, constant.data_location = values, location


def infer_shapes(proto: onnx.ModelProto, *, what: str | None = None) -> onnx.ModelProto:
    """Shape inference that degrades instead of failing (custom domains, symbolic dims, subgraphs).

    Data propagation is tried first because it resolves Shape->Gather->Reshape chains; some
    exporter output makes it throw, in which case plain inference, and then none, is used.
    With `what` (the model's name, when it is loaded), a graph output (of the main graph or a
    subgraph) declared with a size that contradicts the computed one is refused
    (`validate.check_declared_shape`): onnx would only note it, keep the declared size, and
    the model written would fail the onnx checker.
    """
    if proto_size(proto) > PROTO_LIMIT:  # onnx cannot take it in memory; infer without the weights
        model = from_proto(proto, infer=False)
        if proto_size(model.to_proto(weights=False)) > PROTO_LIMIT:  # weights that cannot be left out
            logger.warning("shape inference skipped: the model is too big for onnx even without its weights")
            return proto
        model.refresh_shapes(what=what)
        return model.to_proto()
    declared = _set_aside_output_shapes(proto)
    hints = _set_aside_computable_types(proto)
    lent = _lend_outer_constants(proto)
    try:
        for data_prop in (True, False):
            try:
                inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                             data_prop=data_prop)
            except Exception as exc:  # noqa: BLE001 - onnx raises many unrelated types here
                logger.debug("shape inference (data_prop=%s) failed: %s", data_prop, exc)
                continue
            _take_back(inferred, lent)
            _merge_output_shapes(inferred, declared, what)
            _restore_types(inferred, hints, only_missing=True)
            return inferred
    finally:
        _take_back(proto, lent)
        _merge_output_shapes(proto, declared, None, computed=False)
        _restore_types(proto, hints, only_missing=False)
    logger.warning("shape inference failed; continuing with the shapes stored in the model")
    return proto


def _set_aside_computable_types(proto: onnx.ModelProto) -> list[tuple[int, onnx.ValueInfoProto]]:
    """Take out the declared types (value_info) of tensors computed by default-domain ops, which
    inference computes again: a stale or hostile declaration would otherwise win over the computed
    type (onnx keeps it and says nothing), and the model written would fail the onnx checker.
    Those of custom ops' outputs stay: inference cannot compute them, and reads them downstream.
    Returns (graph, value_info) pairs, graphs in `validate.graphs` order, for `_restore_types`."""
    saved = []
    for g, graph in enumerate(validate.graphs(proto)):
        standard = {name for node in graph.node if node.domain in STANDARD_DOMAINS for name in node.output}
        kept = []
        for info in graph.value_info:
            if info.name in standard:
                saved.append((g, onnx.ValueInfoProto.FromString(info.SerializeToString())))
            else:
                kept.append(info)
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return saved


def _restore_types(proto: onnx.ModelProto, saved: list[tuple[int, onnx.ValueInfoProto]], *, only_missing: bool) -> None:
    """Put back what `_set_aside_computable_types` took out: all of it, or (`only_missing`, into
    an inferred model) the declarations of tensors inference found no shape for."""
    graphs = list(validate.graphs(proto)) if saved else []
    found = [{v.name: v for v in g.value_info} for g in graphs] if only_missing else []
    for g, info in saved:
        inferred = found[g].get(info.name) if only_missing else None
        if inferred is None:
            graphs[g].value_info.append(info)
        elif not _has_shape(inferred.type):  # (onnx found the element type only)
            inferred.CopyFrom(info)


def _has_shape(type_proto: onnx.TypeProto) -> bool:
    """A type that says more than an element type (a tensor's shape, or a non-tensor type)."""
    kind = type_proto.WhichOneof("value")
    return kind is not None and (kind != "tensor_type" or type_proto.tensor_type.HasField("shape"))


def _set_aside_output_shapes(proto: onnx.ModelProto) -> list[tuple[int, int, onnx.TensorShapeProto]]:
    """Take the declared shapes off the graph outputs that no node reads (main graph and
    subgraphs), so that inference writes there the shapes it computes: where they differ, onnx
    keeps the declared one and says nothing. Returns (graph, output, shape) indices for
    `_merge_output_shapes`, graphs in `validate.graphs` order."""
    saved = []
    for g, graph in enumerate(validate.graphs(proto)):
        if not isinstance(graph, onnx.GraphProto):
            continue  # (a function's outputs have no types)
        read = {name for node in graph.node for name in node.input}
        read |= {name for node in graph.node for sub in validate.subgraphs(node) for name in validate.names_read(sub)}
        for o, output in enumerate(graph.output):
            tensor_type = output.type.tensor_type if output.type.WhichOneof("value") == "tensor_type" else None
            if tensor_type is not None and tensor_type.HasField("shape") and output.name not in read:
                shape = onnx.TensorShapeProto()
                shape.CopyFrom(tensor_type.shape)
                tensor_type.ClearField("shape")
                saved.append((g, o, shape))
    return saved


def _merge_output_shapes(proto: onnx.ModelProto, declared: list, what: str | None, *, computed: bool = True) -> None:
    """Put the declared output shapes back into `proto`, merged as onnx merges them with the
    computed ones found there (`computed`): a computed size fills or replaces a symbolic or
    unknown dim; where the two contradict, the declared shape is kept, or, with `what`,
    refused by `validate.check_declared_shape`."""
    graphs = list(validate.graphs(proto)) if declared else []
    for g, o, shape in declared:
        output = graphs[g].output[o]
        found = output.type.tensor_type
        if computed and found.HasField("shape"):
            if what is not None:
                validate.check_declared_shape(output.name, g == 0, shape, found.shape, what)
            merged = _merged_shape(shape, found.shape)
            shape = merged if merged is not None else shape
        found.shape.CopyFrom(shape)


def _merged_shape(declared: onnx.TensorShapeProto, computed: onnx.TensorShapeProto) -> onnx.TensorShapeProto | None:
    """onnx's merge of a computed shape into a declared one; None where they differ."""
    if len(declared.dim) != len(computed.dim):
        return None
    merged = onnx.TensorShapeProto()
    merged.CopyFrom(declared)
    for dim, source in zip(merged.dim, computed.dim):
        if source.HasField("dim_value"):
            if dim.HasField("dim_value") and dim.dim_value != source.dim_value:
                return None
            dim.dim_value = source.dim_value
        elif not dim.HasField("dim_value") and not dim.HasField("dim_param") and source.HasField("dim_param"):
            dim.dim_param = source.dim_param
    return merged


# Integer constants up to this many elements (axes, shapes, pads): what shape inference reads.
SHAPE_LIKE_ELEMENTS = 64


def _lend_outer_constants(proto: onnx.ModelProto) -> list[int]:
    """Copy into each subgraph the small integer initializers of enclosing graphs that it reads.

    onnx's shape inference reads the values of axes/shape inputs only from the subgraph's own
    initializers, and `Model.to_proto` stores a constant several graphs read once, in the main
    graph. Returns how many were appended to each subgraph (in `validate.graphs` order), for
    `_take_back`.
    """
    lent: list[int] = []

    def visit(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto]) -> None:
        for node in graph.node:
            for sub in validate.subgraphs(node):
                own = {t.name for t in sub.initializer} | set(_defined_names(sub))
                wanted = [outer[name] for name in sorted(validate.names_read(sub)) if name in outer and name not in own]
                sub.initializer.extend(wanted)
                lent.append(len(wanted))
                visit(sub, outer | {t.name: t for t in sub.initializer if _shape_like(t)})

    visit(proto.graph, {t.name: t for t in proto.graph.initializer if _shape_like(t)})
    return lent


def _take_back(proto: onnx.ModelProto, lent: list[int]) -> None:
    """Remove what `_lend_outer_constants` appended (from `proto` or a copy of it)."""
    for graph, count in zip(list(validate.graphs(proto))[1:], lent):
        if count:
            del graph.initializer[len(graph.initializer) - count:]


def _shape_like(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and not validate.uses_external_data(tensor)
            and math.prod(tensor.dims) <= SHAPE_LIKE_ELEMENTS)


def _defined_names(graph: onnx.GraphProto) -> Iterator[str]:
    yield from (i.name for i in graph.input)
    for node in graph.node:
        yield from node.output


def fix_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Make the named graph inputs static (`--fix-shape`) and re-infer shapes downstream.

    A symbolic dim names one size in all inputs, so fixing `input [batch, 32]` to 1x32 also
    fixes `state [2, batch, 16]` to 2x1x16 (giving that symbol two sizes in two inputs is an
    error). Within one input a repeated name is no constraint (paddle2onnx writes `?` for both H
    and W of `x [-1, 3, ?, ?]`), and names exporters write for "unknown" (`?`, `unk__N`) tie
    nothing. Check the result in onnxruntime with `pipeline.check_specialisation`.
    """
    inputs = {t.name: t for t in model.graph.inputs}
    symbols: dict[str, tuple[int, str]] = {}  # symbol -> (size, the input that fixed it)
    for name, shape in shapes.items():
        if name not in inputs:
            raise EdgegraphError(f"--fix-shape: model has no input '{name}' (inputs: {', '.join(inputs)})")
        old = inputs[name].shape
        if old is not None and len(old) != len(shape):
            raise EdgegraphError(f"--fix-shape: input '{name}' has rank {len(old)}, got shape {list(shape)}")
        for axis, (was, now) in enumerate(zip(old or [], shape)):
            if isinstance(was, int) and was > 0 and was != now:
                raise EdgegraphError(f"--fix-shape: input '{name}' axis {axis} is fixed to {was}, got {now}")
            if _shared_symbol(was):
                size, by = symbols.setdefault(was, (int(now), name))
                if size != now and by != name:
                    raise EdgegraphError(f"--fix-shape: dim '{was}' of inputs '{by}' and '{name}' must be the same "
                                         f"size, got {size} and {now}")
        inputs[name].shape = [int(d) for d in shape]
    for tensor in model.graph.inputs:
        if tensor.name not in shapes and tensor.shape is not None:
            tensor.shape = [symbols[d][0] if _shared_symbol(d) and d in symbols else d for d in tensor.shape]
    # Shapes inferred before (value_info, in subgraphs too) may carry the old symbolic or stale
    # sizes, which onnxruntime then checks outputs against: forget them so inference is fresh.
    forget_intermediate_types(model.graph, dtypes=False)
    model.refresh_shapes()


def _shared_symbol(dim) -> bool:
    """A dim name that stands for one size wherever it appears (not an exporter's "unknown")."""
    return isinstance(dim, str) and dim not in ("", "?", "None") and not dim.startswith("unk__")


def forget_intermediate_types(graph: gs.Graph, *, dtypes: bool) -> None:
    """Forget the shapes of tensors other than the model's inputs and outputs, in subgraphs too,
    and their dtypes too when `dtypes` (then no value_info is written for them). A subgraph's own
    inputs and outputs keep their dtype, which ONNX requires."""
    model_io = {id(t) for t in [*graph.inputs, *graph.outputs]}
    for g in iter_graphs(graph):
        declared = {id(t) for t in [*g.inputs, *g.outputs]}
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Variable) and id(tensor) not in model_io:
                tensor.shape = None
                if dtypes and id(tensor) not in declared:
                    tensor.dtype = None


# ---------------------------------------------------------------------------------------------
# Graph helpers used by passes.


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor`."""
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None when computed at run time.

    Never loads types numpy cannot represent exactly (`is_opaque`): reading those through gs
    would change their dtype, so they count as unknown.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return None if is_opaque(tensor) else np.asarray(tensor.values)
    node = producer(tensor)
    if node is None or node.op != "Constant" or not is_standard(node):
        return None
    attr = node.attrs.get("value")
    if isinstance(attr, gs.Constant):
        return None if is_opaque(attr) else np.asarray(attr.values)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
        if name in node.attrs:
            return np.array(node.attrs[name], dtype=dtype)
    return None


def const(name: str, values: np.ndarray) -> gs.Constant:
    """A new initializer (4-bit ml_dtypes arrays are packed two per byte, as ONNX stores them)."""
    values = np.asarray(values)
    if not values.flags.c_contiguous:  # (np.ascontiguousarray would also turn a scalar into shape [1])
        values = np.ascontiguousarray(values)
    if values.dtype.itemsize == 1 and values.dtype.name in ("int4", "uint4", "float4_e2m1fn"):
        # graphsurgeon would write one byte per element; onnx's own converter packs them.
        return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True if `tensor` is one of the graph's outputs (its name must then be kept)."""
    return any(out is tensor for out in graph.outputs)


def substitute(items: list, old, new) -> None:
    """Replace `old` by `new` in a node's inputs/outputs list, in place.

    gs keeps tensor<->node links in sync only through item assignment; slice assignment
    (`node.inputs[:] = ...`) raises inside graphsurgeon, so lists are edited entry by entry.
    """
    for index, item in enumerate(items):
        if item is old:
            items[index] = new


def set_inputs(node: gs.Node, tensors: Iterable[gs.Tensor]) -> None:
    """Replace all inputs of `node` (gs lists cannot be slice-assigned; see `substitute`)."""
    tensors = list(tensors)  # (may be computed from node.inputs itself)
    node.inputs.clear()
    node.inputs.extend(tensors)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead; graph outputs keep their names.

    When `old` is a graph output, `new`'s producer is made to write `old` directly, so the
    output name users rely on survives. That needs `new` to be computed by a node whose output
    nobody else reads and which is not itself a graph input or constant; otherwise an Identity
    keeps the name.
    """
    if new is old:
        return
    for node in consumers(old):
        substitute(node.inputs, old, new)
    if not is_graph_output(graph, old):
        return
    source = producer(new)
    if source is not None and not consumers(new) and not is_graph_output(graph, new):
        old.inputs.clear()
        substitute(source.outputs, new, old)
        old.dtype, old.shape = old.dtype or new.dtype, old.shape or new.shape
    else:
        old.inputs.clear()
        graph.nodes.append(gs.Node("Identity", name=f"{old.name}_keep_name", inputs=[new], outputs=[old]))


def bypass(graph: gs.Graph, node: gs.Node, keep: int = 0) -> None:
    """Remove a node whose output equals its input number `keep` (Identity, Dropout, no-op Reshape)."""
    source, result = node.inputs[keep], node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    result.inputs.clear()
    replace_all_uses(graph, result, source)


class Namer:
    """Fresh, deterministic tensor and node names that never collide with existing ones."""

    def __init__(self, graph: gs.Graph):
        # Subgraph-local names count too: a new top-level name must not shadow one of them.
        self._taken = {name for g in iter_graphs(graph) for name in g.tensors()} | {n.name for n in iter_nodes(graph)}
        self._counters: dict[str, int] = {}

    def __call__(self, prefix: str) -> str:
        count = self._counters.get(prefix, 0)
        while (name := prefix if count == 0 else f"{prefix}_{count}") in self._taken:
            count += 1
        self._counters[prefix] = count + 1
        self._taken.add(name)
        return name


def node_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node reads: its inputs plus what its subgraphs take from enclosing graphs."""
    tensors = list(node.inputs)
    for sub in subgraphs(node):
        tensors.extend(sub._foreign_tensors().values())
    return tensors


def sort_nodes(graph: gs.Graph) -> None:
    """Stable topological sort of `graph.nodes` (original order wherever dependencies allow).

    Not graphsurgeon's toposort: it is much slower, reorders sorted graphs, and recurses forever
    in onnx-graphsurgeon 0.6 when a model has both local functions and If/Loop/Scan subgraphs.
    """
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        producers = {index[id(t.inputs[0])] for t in node_reads(node) if t.inputs and id(t.inputs[0]) in index}
        producers.discard(i)
        pending[i] = len(producers)
        for p in producers:
            users[p].append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):  # a cycle (invalid model): keep the rest as it was
        placed = set(order)
        order.extend(i for i in range(len(nodes)) if i not in placed)
    if order != list(range(len(nodes))):
        graph.nodes = [nodes[i] for i in order]


STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


def is_standard(node: gs.Node) -> bool:
    """An op of the default ONNX domain (custom-domain ops are left alone)."""
    return (node.domain or "") in STANDARD_DOMAINS


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """Graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def iter_graphs(graph: gs.Graph, *, functions: bool = True) -> Iterator[gs.Graph]:
    """The graph, its subgraphs (recursively) and its local functions' graphs."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from iter_graphs(sub, functions=False)
    # gs gives every graph, subgraphs and functions included, the model's list of functions.
    for function in (getattr(graph, "functions", None) or []) if functions else []:
        yield from iter_graphs(function, functions=False)


def iter_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Every node of the graph, its subgraphs and its functions."""
    for g in iter_graphs(graph):
        yield from g.nodes


# Ops whose output is not a function of their inputs: never evaluated offline, never merged.
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


def folded_value(tensor: gs.Tensor, opset: int, max_nodes: int = 16) -> np.ndarray | None:
    """The value of `tensor` when it is computed from constants only, else None.

    Covers what exporters leave in front of weights and biases, e.g. `Cast(int8 weight) * scale`
    (weight-only quantized models) or `Reshape(bias, shape)` (paddle2onnx); the few nodes are
    evaluated in onnxruntime (`evaluate`). Gives up (None) beyond `max_nodes` nodes,
    on custom domains, subgraphs and random ops.
    """
    value = constant_value(tensor)
    if value is not None:
        return value
    nodes: dict[int, gs.Node] = {}
    leaves: dict[str, np.ndarray] = {}
    stack = [tensor]
    while stack:
        current = stack.pop()
        if current.name in leaves:
            continue
        value = constant_value(current)
        if value is not None:
            leaves[current.name] = value
            continue
        node = producer(current)
        if (node is None or not is_standard(node) or node.op in NONDETERMINISTIC
                or subgraphs(node)):
            return None
        if id(node) not in nodes:
            nodes[id(node)] = node
            if len(nodes) > max_nodes:
                return None
            stack.extend(t for t in node.inputs if t.name)
    # Dependencies first: a node is placed after the producers of its inputs.
    ordered: list[gs.Node] = []
    placed: set[int] = set()

    def place(node: gs.Node) -> None:
        if id(node) in placed:
            return
        for t in node.inputs:
            source = producer(t) if t.name and t.name not in leaves else None
            if source is not None and id(source) in nodes:
                place(source)
        placed.add(id(node))
        ordered.append(node)

    for node in nodes.values():
        place(node)
    return evaluate(ordered, [onnx.helper.make_opsetid("", opset)], leaves).get(tensor.name)


def evaluate(nodes: list[gs.Node], opsets: Sequence[onnx.OperatorSetIdProto],
             known: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run `nodes` (topologically sorted, reading only constants and the `known` values by name)
    in onnxruntime; returns every output it could compute by name. A failing batch is retried
    node by node.

    The one constant evaluator: onnxruntime's numerics, so a folded value is bit-identical to
    what the model computed at run time (onnx's reference evaluator differs in the last bits).
    """
    try:
        return _evaluate(nodes, opsets, known)
    except Exception as exc:  # noqa: BLE001 - ORT raises assorted types for unsupported ops
        logger.debug("batched constant evaluation failed (%s); evaluating node by node", exc)
    known = known or {}
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        extra = {t.name: v for t in node.inputs if (v := values.get(t.name, known.get(t.name))) is not None}
        try:
            values.update(_evaluate([node], opsets, extra))
        except Exception as exc:  # noqa: BLE001
            logger.debug("cannot evaluate %s (%s): %s", node.name, node.op, exc)
    return values


def _evaluate(nodes: list[gs.Node], opsets, extra: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    import onnxruntime as ort  # (here: importing edgegraph.ir stays light for the CLI)

    extra = extra or {}
    produced = {o.name for n in nodes for o in n.outputs}
    initializers, seen = [], set()
    for node in nodes:
        for t in node.inputs:
            if not t.name or t.name in produced or t.name in seen:
                continue
            seen.add(t.name)
            if t.name in extra:
                initializers.append(onnx.numpy_helper.from_array(np.asarray(extra[t.name]), t.name))
            elif isinstance(t, gs.Constant):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(OnnxExporter.export_tensor_proto(t))
                tensor.name = t.name
                initializers.append(tensor)
            else:
                initializers.append(onnx.numpy_helper.from_array(constant_value(t), t.name))
    outputs = [onnx.ValueInfoProto(name=name) for name in dict.fromkeys(o.name for n in nodes for o in n.outputs)]
    graph = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "fold", [], outputs, initializers)
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    model.ir_version = max(7, onnx.helper.find_min_ir_version_for(list(opsets), ignore_unknown=True))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {})))
