"""Model files: reading (validated once, external data inside the model's folder only) and
writing (atomic, with external data past protobuf's 2 GiB limit). The model in memory is
`edgegraph.ir.Model`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from edgegraph import files, ir, validate
from edgegraph.errors import NAME_LIMIT, EdgegraphError, ModelLoadError, shown


def load(source, *, infer: bool = True, base_dir: str | os.PathLike[str] | None = None) -> ir.Model:
    """Load a model from a path, bytes, a ModelProto or a ir.Model (copied; the source is never changed).

    Every model is checked first (`edgegraph.validate`): invalid ONNX, and external data that is
    not a regular file inside the model's folder, raise `ModelLoadError` with one clear sentence,
    as do a missing file, a file that is not ONNX and a truncated one. External data of a path
    is looked for beside it; bytes and ModelProtos have no folder, so their external data is
    refused unless `base_dir` names one. External data is memory-mapped read-only (see
    `_map_external_data`): passes replace constant values, they never write into them.
    """
    if isinstance(source, ir.Model):
        return source.copy()
    folder = Path(base_dir) if base_dir is not None else None
    raw = None
    if isinstance(source, onnx.ModelProto):
        what = "the given ModelProto"
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
    elif isinstance(source, bytes | bytearray):
        what, raw = "the given bytes", bytes(source)
        proto = _parse(raw, what)
    else:
        path = Path(source)
        what = str(path)
        if not path.exists():
            raise ModelLoadError(f"no such file: {path}")
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ModelLoadError(f"{path} is {kind}, not an ONNX model file")
        raw = path.read_bytes()
        proto = _parse(raw, what)
        folder = path.parent
    try:
        validate.check(_validated(proto, what), what, folder, raw)
        model = ir.from_proto(proto, infer=False)
        _map_external_data(model, folder, what)
        for graph in ir.iter_graphs(model.graph):  # (inference walks the nodes in order: unsorted, it
            ir.sort_nodes(graph)                   # misses shapes, and contradictions with them)
        if infer:
            model.refresh_shapes(what=what)
    except UnicodeDecodeError as exc:  # graphsurgeon decodes string attributes (bytes in ONNX) as UTF-8
        raise ModelLoadError(f"{what} has a name or text field that is not valid UTF-8 "
                             f"(byte {exc.object[exc.start:exc.start + 1]!r})") from None
    return model


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{what} is not a valid ONNX model (truncated or corrupt: {exc})") from None
    return proto


def _validated(proto: onnx.ModelProto, what: str) -> onnx.ModelProto:
    # protobuf parses many non-ONNX byte strings without complaint; an ONNX model always has an
    # IR version, an opset and a graph, so that is the cheap test that catches them.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise ModelLoadError(f"{what} is not an ONNX model (no IR version, opset or graph)")
    if not proto.graph.output:
        raise ModelLoadError(f"{what} has no graph outputs")
    return proto


def _map_external_data(model: ir.Model, folder: Path | None, what: str) -> None:
    """Point every constant whose data lives in a file at that data, through the one rule
    (`validate.external_data`); graphsurgeon would read it relative to the working directory.

    Plain numeric tensors become read-only memory maps: nothing is read until a pass uses the
    values, and only the pages it touches. Others (4-bit types) are read into memory, as are
    the parts of sparse tensors. Constants of node attributes (Constant nodes, in subgraphs and
    functions too) are included.
    """
    for tensor in ir.all_constants(model, attributes=True):
        values = tensor._values
        if isinstance(values, SparseValues):
            for part in (values.tensor.values, values.tensor.indices):
                if validate.uses_external_data(part):
                    _inline(part, validate.external_data(part, folder, what))
            continue
        if not isinstance(values, LazyValues) or not validate.uses_external_data(values.tensor):
            continue
        source = validate.external_data(values.tensor, folder, what)
        dtype = ir.storage_dtype(values.tensor.data_type)
        count = int(np.prod(values.tensor.dims, dtype=np.int64))
        if dtype is not None and dtype.itemsize * count == source.length:
            tensor.values = np.memmap(source.path, dtype=dtype, mode="r", offset=source.offset,
                                      shape=tuple(values.tensor.dims)) if count else np.zeros(values.shape, dtype)
        else:
            _inline(values.tensor, source)
        tensor.data_location = None  # the values are in memory now, as far as export is concerned


def _inline(tensor: onnx.TensorProto, source: validate.ExternalData) -> None:
    tensor.raw_data = source.read()
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def save(model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write a model atomically: staged in a hidden folder beside `path`, then moved into place.

    `external_data=None` chooses external data only when the model would pass protobuf's 2 GiB
    limit; the tensors then go to `sidecar_path(path)` (`<name>.data`) beside the model, which
    may only replace a file of that name that the model now at `path` uses (see
    `staged_moves`). On any error nothing is left at `path` and its sidecar (existing files
    there stay as they were).
    """
    path = Path(path)
    if path.is_dir():
        raise EdgegraphError(f"output path {path} is a directory")
    if not path.parent.exists():
        raise EdgegraphError(f"output folder {path.parent} does not exist")
    if external_data is None:
        external_data = ir.proto_size(model) > ir.PROTO_LIMIT
    if external_data and not isinstance(model, ir.Model):
        model = ir.from_proto(model, infer=False)  # the weights are written from the proto, not copied
    with files.staging(path) as staging:
        staged = staging / path.name
        if external_data:
            data_file = sidecar_path(staged)
            weights = ir.detachable_weights(model)
            with ir.detached(weights, data_file):
                proto = model.to_proto()
                written = {_external_reference(c._values.tensor) for c in weights}
            if not weights:
                data_file.unlink()
        else:
            proto, written = model.to_proto() if isinstance(model, ir.Model) else model, set()
        if isinstance(model, ir.Model) and not model.value_info:  # (`proto` is then ours to change)
            for graph in validate.graphs(proto):
                del graph.value_info[:]
        _check_self_contained(proto, written, path)
        _write_proto(proto, staged)
        files.publish(staged_moves(staged, path))
    return path


def _external_reference(tensor: onnx.TensorProto) -> tuple:
    return (tensor.name, *((e.key, e.value) for e in tensor.external_data))


def _check_self_contained(proto: onnx.ModelProto, written: set[tuple], path: Path) -> None:
    """Refuse to write a model with tensors that refer to external data other than what this
    save wrote (`written`): such data belongs to another model, in a file this save may even
    replace (the sidecar of a model saved over itself), so the written model would be
    incomplete or silently wrong."""
    for tensor in validate.tensors(proto):
        if validate.uses_external_data(tensor) and _external_reference(tensor) not in written:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise EdgegraphError(f"cannot save {path}: tensor '{shown(tensor.name, NAME_LIMIT)}' refers to external data in "
                                 f"'{shown(location, NAME_LIMIT)}', which is not saved with it")


def sidecar_path(path: Path) -> Path:
    """Where `save` puts the external data of a model saved at `path`."""
    return path.with_name(f"{path.name}.data")


def staged_moves(staged: Path, path: Path) -> list[tuple[Path, Path]]:
    """The (file, destination) moves for `files.publish` that put the model `save`d at `staged`
    at `path`: its sidecar, if it has one, then the model.

    The sidecar may replace an existing file only if the model now at `path` (the one being
    replaced, e.g. by a re-run) keeps its external data there; any other file of that name
    belongs to someone else and is refused (EdgegraphError).
    """
    moves = [(staged, path)]
    data, destination = sidecar_path(staged), sidecar_path(path)
    if data.exists():
        if os.path.lexists(destination) and destination.name not in _external_locations(path):
            raise EdgegraphError(f"{destination} exists and is not the external data of {path}: "
                                 "it would be overwritten; move it away or choose another output name")
        moves.insert(0, (data, destination))
    return moves


def _external_locations(path: Path) -> set[str]:
    """The external-data locations the model file at `path` names (none if it is not a model)."""
    try:
        proto = _parse(path.read_bytes(), str(path))
    except (OSError, ModelLoadError):
        return set()
    return {entry.value for tensor in validate.tensors(proto) if validate.uses_external_data(tensor)
            for entry in tensor.external_data if entry.key == "location"}


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files beside the model at `path` that hold its external data (those that exist)."""
    path = Path(path)
    found = [path.parent / location for location in sorted(_external_locations(path))]
    return [f for f in found if f.is_file()]


def _write_proto(proto: onnx.ModelProto, path: Path) -> None:
    try:
        data = proto.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - protobuf's EncodeError or ValueError past 2 GiB
        raise EdgegraphError(f"cannot write {path.name}: the model is too big for one file ({exc}); "
                             "save it with external data") from None
    path.write_bytes(data)
