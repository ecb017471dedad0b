"""Seeded fuzz of the command line: hostile and broken models through `opt`, `info` and `bench`.

Each case takes a fixture model, breaks it one way (a byte-level mutation or truncation, or a
protobuf-level one: invalid UTF-8 or huge names, negative or huge dims, unknown data types,
short raw data, swapped attribute types, impossible opsets, dangling or cyclic node inputs,
external data pointing out of the model's folder, ...) and runs the three commands on it, from
a folder of its own. The current directory is that folder's parent, which holds "secret" files
(`secret.bin`, and decoys named like the cases' own external-data files). Whatever the model,
the README's promise must hold:

- exit 0 or 2, never 1, never a crash, never a hang (each run is bounded in time and memory);
- on exit 2, exactly one line on stderr, `edgegraph: error: ...`, at most MAX_ERROR_CHARS long;
- on exit 2 nothing is written; on exit 0 only the named outputs are; the input files never change;
- nothing outside the model's folder is read, and the secret's bytes appear in no output;
- what `opt` writes with exit 0 passes the onnx checker (full) and loads in onnxruntime, or fails
  them exactly as its input does;
- mutations that keep the model valid (`none`, `sparse-valid`) exit 0; the first cases are
  controls, one per fixture model, unbroken.

Reproduce one case: `python tests/test_fuzz.py CASE [FOLDER]` writes its files and prints the
commands; `python tests/test_fuzz.py --sweep 3000` runs that many cases and sums up the failures.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clihelp import Worker, snapshot  # noqa: E402

SEED = 8  # issue #8
CASES = 300
QUANT_EVERY = 10  # every 10th case on a model with image-like inputs also runs `cleanup,quant`
MAX_ERROR_CHARS = 1000  # errors.MAX_LINE: room for a whole onnxruntime message and advice
TIMEOUT = 10.0  # seconds per command; an unbroken fixture model takes well under one

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "fixtures" / "default"
SECRET_NAME = "secret.bin"
# Planted beside the case folders with the secret's bytes, under the names of the cases' own
# external-data files: external data resolved against the current directory instead of the
# model's folder reads them.
SECRET_FILES = (SECRET_NAME, "weights.bin", "model.onnx.data", "t0.bin", "t1.bin", "t2.bin")
MODEL = "model.onnx"


# ---------------------------------------------------------------------------------------------
# Fixture models: serialized bytes plus the files beside them (external data)


@functools.cache
def bases() -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """{name: (model bytes, {file name: bytes} of its external data)}."""
    from fixtures import cleanup, core, quant, recurrent

    digits = onnx.load(DEFAULT / "digits_cnn.onnx")
    protos = {
        "digits": digits,
        "if_loop": core.if_loop_model(),
        "local_function": core.local_function_model(),
        "custom_op": core.custom_op_model(),
        "symbolic_dim": core.symbolic_dim_model(),
        "opset11": core.opset_model(11),
        "opset21": core.opset_model(21),
        "vad": recurrent.vad_model(),
        "constant_if": cleanup.constant_if(),
        "subgraph_and_function": cleanup.subgraph_and_function(),
        "conv_batchnorm_fp16": cleanup.conv_batchnorm_fp16(),
        "small_convnet": quant.small_convnet(),
    }
    found = {name: (proto.SerializeToString(), {}) for name, proto in protos.items()}
    found["digits_external"] = _external_digits(digits)
    found["constant_external"] = _constant_external(digits)
    return found


def _external_digits(digits: onnx.ModelProto) -> tuple[bytes, dict[str, bytes]]:
    """The digits model with every initializer in `model.onnx.data` (a valid model)."""
    model = onnx.ModelProto()
    model.CopyFrom(digits)  # saving with external data changes the proto
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / MODEL
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{MODEL}.data", size_threshold=0)
        return path.read_bytes(), {f"{MODEL}.data": (Path(folder) / f"{MODEL}.data").read_bytes()}


def _constant_external(digits: onnx.ModelProto) -> tuple[bytes, dict[str, bytes]]:
    """The digits model with its largest weight in a Constant node whose tensor is external data
    in `weights.bin` beside the model (a valid model: onnx and onnxruntime load it)."""
    model = onnx.ModelProto()
    model.CopyFrom(digits)
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = numpy_helper.to_array(weight).tobytes()
    tensor = TensorProto(name=weight.name, dims=weight.dims, data_type=weight.data_type,
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, helper.make_node("Constant", [], [weight.name], name="weight_constant", value=tensor))
    return model.SerializeToString(), {"weights.bin": data}


# Bases whose inputs are one float image-like tensor, for the quant cases.
QUANT_BASES = {"digits", "digits_external", "opset11", "opset21", "small_convnet"}


def calibration(model_bytes: bytes, base: str) -> bytes:
    """An .npz of 8 seeded samples for the base model's inputs (the bundled data for digits)."""
    if base.startswith("digits"):
        return (DEFAULT / "digits_calib.npz").read_bytes()
    model = onnx.load_from_string(model_bytes)
    rng = np.random.default_rng(0)
    arrays = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        arrays[value.name] = rng.standard_normal([8, *dims[1:]]).astype(dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Mutations. Each takes the case (model proto or bytes, extra files) and a seeded generator and
# returns a description of what it did.


class Case:
    def __init__(self, base: str, rng: np.random.Generator, secret: str):
        model_bytes, files = bases()[base]
        self.base, self.rng = base, rng
        self.secret = secret  # the secret's absolute path
        self.raw: bytes | None = None  # set by byte-level mutations; else `model` is serialized
        self.model = onnx.load_from_string(model_bytes)
        self.files = dict(files)  # name -> bytes, written beside the model
        self.links: dict[str, str] = {}  # name -> symlink target
        self._invalid: dict[bytes, bytes] = {}  # placeholder -> invalid UTF-8 of the same length

    def serialized(self) -> bytes:
        if self.raw is not None:
            return self.raw
        data = self.model.SerializeToString()
        for placeholder, bad in self._invalid.items():
            data = data.replace(placeholder, bad)
        return data

    def invalid_utf8(self, length: int = 12) -> str:
        """A placeholder string that `serialized` turns into as many bytes of invalid UTF-8."""
        placeholder = f"FZ{len(self._invalid):03d}".ljust(length, "~")
        bad = b"\xff\xfe" + bytes(self.rng.integers(0x80, 0x100, length - 2, dtype=np.uint8))
        self._invalid[placeholder.encode()] = bad
        return placeholder

    def pick(self, items):
        items = list(items)
        return items[int(self.rng.integers(len(items)))] if items else None


def _graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), depth first."""
    found = []

    def visit(graph):
        found.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    return found


def _node_lists(model):
    """Everything that holds nodes: graphs and local functions."""
    return [*_graphs(model), *model.functions]


def _all_nodes(model) -> list[onnx.NodeProto]:
    return [node for holder in _node_lists(model) for node in holder.node]


def _tensors(model) -> list[onnx.TensorProto]:
    """Initializers of every graph and the tensors of Constant nodes and tensor attributes."""
    found = [t for g in _graphs(model) for t in g.initializer]
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
    return found


def _tensor_names(model) -> list[str]:
    names = set()
    for graph in _graphs(model):
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in _all_nodes(model):
        names.update(n for n in [*node.input, *node.output] if n)
    return sorted(names)


def _rename_everywhere(model, old: str, new: str) -> None:
    for graph in _graphs(model):
        for item in [*graph.initializer, *graph.input, *graph.output, *graph.value_info]:
            if item.name == old:
                item.name = new
    for node in _all_nodes(model):
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new


def _value_infos(model):
    return [v for g in _graphs(model) for v in [*g.input, *g.output, *g.value_info]]


HUGE = 10**12


def m_none(case):
    return "no mutation (a valid model: must exit 0)"


def m_flip_bits(case):
    data = bytearray(case.serialized())
    count = int(case.rng.integers(1, 17))
    for _ in range(count):
        i = int(case.rng.integers(len(data)))
        data[i] ^= 1 << int(case.rng.integers(8))
    case.raw = bytes(data)
    return f"flipped {count} random bits"


def m_overwrite(case):
    data = bytearray(case.serialized())
    n = int(case.rng.integers(1, 33))
    at = int(case.rng.integers(len(data)))
    data[at:at + n] = bytes(case.rng.integers(0, 256, n, dtype=np.uint8))
    case.raw = bytes(data[:len(case.serialized())])
    return f"overwrote {n} bytes at offset {at}"


def m_insert(case):
    data = case.serialized()
    n, at = int(case.rng.integers(1, 65)), int(case.rng.integers(len(data) + 1))
    case.raw = data[:at] + bytes(case.rng.integers(0, 256, n, dtype=np.uint8)) + data[at:]
    return f"inserted {n} random bytes at offset {at}"


def m_delete(case):
    data = case.serialized()
    n, at = int(case.rng.integers(1, 65)), int(case.rng.integers(len(data)))
    case.raw = data[:at] + data[at + n:]
    return f"deleted {n} bytes at offset {at}"


def m_truncate(case):
    data = case.serialized()
    keep = int(case.rng.integers(len(data)))
    case.raw = data[:keep]
    return f"truncated to {keep} of {len(data)} bytes"


def m_duplicate(case):
    data = case.serialized()
    n, src, dst = int(case.rng.integers(1, 257)), int(case.rng.integers(len(data))), int(case.rng.integers(len(data)))
    case.raw = data[:dst] + data[src:src + n] + data[dst:]
    return f"copied {n} bytes from offset {src} to {dst}"


def m_data_file(case):
    """Corrupt the external data file (or, without one, the model bytes)."""
    if not case.files:
        return m_flip_bits(case)
    name = case.pick(sorted(case.files))
    data = case.files[name]
    keep = int(case.rng.integers(len(data)))
    case.files[name] = data[:keep]
    return f"external data file {name} truncated to {keep} of {len(data)} bytes"


def m_name_utf8(case):
    model = case.model
    where = case.pick(["tensor", "node", "graph", "op_type", "domain", "attribute", "producer", "metadata", "dim_param"])
    bad = case.invalid_utf8(int(case.rng.integers(4, 40)))
    if where == "tensor":
        old = case.pick(_tensor_names(model))
        _rename_everywhere(model, old, bad)
        return f"tensor '{old}' renamed (everywhere) to invalid UTF-8"
    if where == "node":
        node = case.pick(_all_nodes(model))
        node.name = bad
        return f"node '{node.op_type}' named with invalid UTF-8"
    if where == "graph":
        model.graph.name = bad
        return "graph name is invalid UTF-8"
    if where == "op_type":
        node = case.pick(_all_nodes(model))
        old, node.op_type = node.op_type, bad
        return f"op_type of a {old} node is invalid UTF-8"
    if where == "domain":
        node = case.pick(_all_nodes(model))
        node.domain = bad
        model.opset_import.add(domain=bad, version=1)
        return f"domain of a {node.op_type} node (and an opset import) is invalid UTF-8"
    if where == "attribute":
        node = case.pick([n for n in _all_nodes(model) if n.attribute]) or case.pick(_all_nodes(model))
        if node.attribute:
            attr = case.pick(node.attribute)
            old, attr.name = attr.name, bad
            return f"attribute '{old}' of a {node.op_type} node renamed to invalid UTF-8"
        node.attribute.add(name="axis", type=onnx.AttributeProto.STRING, s=b"\xff\xfe\x80")
        return f"{node.op_type} node gets an attribute with invalid UTF-8 bytes"
    if where == "producer":
        model.producer_name = bad
        return "producer_name is invalid UTF-8"
    if where == "metadata":
        model.metadata_props.add(key=bad, value=case.invalid_utf8(8))
        return "metadata_props key and value are invalid UTF-8"
    value = case.pick(model.graph.input)
    dim = case.pick(value.type.tensor_type.shape.dim)
    if dim is None:
        value.type.tensor_type.shape.dim.add(dim_param=bad)
    else:
        dim.dim_param = bad
    return f"a dim_param of input '{value.name}' is invalid UTF-8"


def m_name_huge(case):
    model = case.model
    length = int(case.rng.choice([100_000, 1_000_000, 3_000_000]))
    where = case.pick(["tensor", "node", "doc_string", "op_type"])
    big = "N" * length
    if where == "tensor":
        old = case.pick(_tensor_names(model))
        _rename_everywhere(model, old, big)
        return f"tensor '{old}' renamed (everywhere) to a {length}-character name"
    if where == "node":
        node = case.pick(_all_nodes(model))
        node.name = big
        return f"a {node.op_type} node named with {length} characters"
    if where == "op_type":
        node = case.pick(_all_nodes(model))
        old, node.op_type = node.op_type, big
        return f"op_type of a {old} node is {length} characters"
    model.doc_string = big
    return f"doc_string of {length} characters"


def m_name_clash(case):
    model = case.model
    names = _tensor_names(model)
    old, other = case.pick(names), case.pick(names)
    how = case.pick(["other", "empty"])
    new = "" if how == "empty" else other
    _rename_everywhere(model, old, new)
    return f"tensor '{old}' renamed (everywhere) to '{new}'"


def m_dims(case):
    tensor = case.pick(_tensors(case.model))
    if tensor is None:
        return m_io_dims(case)
    old = list(tensor.dims)
    how = case.pick(["negative", "huge", "extra", "drop", "zero", "huge-product"])
    dims = old or [1]
    if how == "negative":
        dims[int(case.rng.integers(len(dims)))] = -int(case.rng.integers(1, 5))
    elif how == "huge":
        dims[int(case.rng.integers(len(dims)))] = HUGE
    elif how == "extra":
        dims = [*dims, int(case.rng.integers(2, 5))]
    elif how == "drop":
        dims = dims[1:]
    elif how == "zero":
        dims[int(case.rng.integers(len(dims)))] = 0
    else:
        dims = [HUGE, HUGE, HUGE]
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return f"dims of tensor '{tensor.name}' {old} -> {dims} ({how})"


def m_io_dims(case):
    value = case.pick(_value_infos(case.model))
    shape = value.type.tensor_type.shape
    how = case.pick(["negative", "huge", "zero", "rank+3", "no-shape"])
    if how == "no-shape":
        value.type.tensor_type.ClearField("shape")
    elif how == "rank+3":
        for _ in range(3):
            shape.dim.add(dim_value=1)
    else:
        dim = case.pick(shape.dim) or shape.dim.add()
        dim.dim_value = {"negative": -3, "huge": HUGE, "zero": 0}[how]
    return f"shape of value '{value.name}': {how}"


def m_data_type(case):
    tensor = case.pick(_tensors(case.model))
    if tensor is None:
        return m_elem_type(case)
    old = tensor.data_type
    new = int(case.rng.choice([0, 8, 11, 14, 16, 17, 21, 22, 23, 26, 31, 99, 2**31 - 1]))
    tensor.data_type = new
    return f"data_type of tensor '{tensor.name}' {old} -> {new}"


def m_elem_type(case):
    value = case.pick(_value_infos(case.model))
    how = case.pick(["unknown", "other", "string", "sequence", "optional", "map"])
    if how in ("unknown", "other", "string"):
        new = {"unknown": int(case.rng.choice([0, 26, 99, 12345])), "other": int(case.rng.choice([6, 7, 9, 11, 16])),
               "string": TensorProto.STRING}[how]
        value.type.tensor_type.elem_type = new
        return f"elem_type of value '{value.name}' -> {new}"
    tensor_type = onnx.TypeProto()
    tensor_type.CopyFrom(value.type)
    if how == "sequence":
        value.type.CopyFrom(helper.make_sequence_type_proto(tensor_type))
    elif how == "optional":
        value.type.CopyFrom(helper.make_optional_type_proto(tensor_type))
    else:
        value.type.CopyFrom(helper.make_map_type_proto(TensorProto.INT64, tensor_type))
    return f"type of value '{value.name}' wrapped in a {how}"


def m_raw_data(case):
    tensor = case.pick([t for t in _tensors(case.model) if t.raw_data]) or case.pick(_tensors(case.model))
    if tensor is None:
        return m_dims(case)
    how = case.pick(["truncate", "extend", "clear", "odd", "float_data-too"])
    size = len(tensor.raw_data)
    if how == "truncate":
        tensor.raw_data = tensor.raw_data[:int(case.rng.integers(max(size, 1)))]
    elif how == "extend":
        tensor.raw_data = tensor.raw_data + bytes(int(case.rng.integers(1, 64)))
    elif how == "clear":
        tensor.ClearField("raw_data")
    elif how == "odd":
        tensor.raw_data = tensor.raw_data[:-1] if size else b"\x01"
    else:
        tensor.float_data.extend([1.0, 2.0, 3.0])
    return f"raw_data of tensor '{tensor.name}' ({size} bytes): {how}"


def m_attr_type(case):
    node = case.pick([n for n in _all_nodes(case.model) if n.attribute])
    if node is None:
        return m_attr_value(case)
    attr = case.pick(node.attribute)
    old = attr.type
    attr.type = int(case.rng.choice([t for t in range(15) if t != old]))  # (protobuf refuses unknown enum values)
    return f"type of attribute '{attr.name}' of a {node.op_type} node {old} -> {attr.type}"


def m_attr_value(case):
    node = case.pick(_all_nodes(case.model))
    how = case.pick(["extreme-ints", "extreme-int", "nan-float", "remove", "unknown", "duplicate"])
    ints = [a for a in node.attribute if a.type == onnx.AttributeProto.INTS]
    one = [a for a in node.attribute if a.type == onnx.AttributeProto.INT]
    floats = [a for a in node.attribute if a.type == onnx.AttributeProto.FLOAT]
    if how == "extreme-ints" and ints:
        attr = case.pick(ints)
        values = [int(case.rng.choice([-(2**40), -1, 0, HUGE, 2**62])) for _ in range(len(attr.ints) or 2)]
        del attr.ints[:]
        attr.ints.extend(values)
        return f"attribute '{attr.name}' of a {node.op_type} node -> {values}"
    if how == "extreme-int" and one:
        attr = case.pick(one)
        attr.i = int(case.rng.choice([-(2**62), -100, 0, 100, 2**62]))
        return f"attribute '{attr.name}' of a {node.op_type} node -> {attr.i}"
    if how == "nan-float" and floats:
        attr = case.pick(floats)
        attr.f = float(case.rng.choice([np.nan, np.inf, -np.inf, 1e38]))
        return f"attribute '{attr.name}' of a {node.op_type} node -> {attr.f}"
    if how == "remove" and node.attribute:
        attr = case.pick(node.attribute)
        node.attribute.remove(attr)
        return f"attribute '{attr.name}' removed from a {node.op_type} node"
    if how == "duplicate" and node.attribute:
        attr = case.pick(node.attribute)
        node.attribute.append(attr)
        return f"attribute '{attr.name}' of a {node.op_type} node given twice"
    node.attribute.append(helper.make_attribute("fuzz_unknown", [1, 2, 3]))
    return f"unknown attribute added to a {node.op_type} node"


def m_opset(case):
    model = case.model
    how = case.pick(["version", "remove-default", "duplicate", "ir_version"])
    if how == "ir_version":
        model.ir_version = int(case.rng.choice([1, 2, 3, 12, 99, 2**40]))
        return f"ir_version -> {model.ir_version}"
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if how == "version":
        default.version = int(case.rng.choice([0, 1, 6, 99, 10**6, -1, 2**62]))
        return f"default-domain opset -> {default.version}"
    if how == "remove-default":
        model.opset_import.remove(default)
        model.opset_import.add(domain="x.y", version=1)
        return "default-domain opset import removed"
    model.opset_import.add(domain="", version=int(case.rng.choice([7, 13, 21])))
    return "default-domain opset imported twice"


def m_undefined_input(case):
    node = case.pick([n for n in _all_nodes(case.model) if n.input])
    if node is None or case.rng.random() < 0.2:
        case.model.graph.output[0].name = "fuzz_undefined"
        return "graph output names an undefined tensor"
    i = int(case.rng.integers(len(node.input)))
    old, node.input[i] = node.input[i], "fuzz_undefined"
    return f"input {i} ('{old}') of a {node.op_type} node -> an undefined tensor"


def m_cycle(case):
    graph = case.pick([g for g in _graphs(case.model) if len(g.node) >= 1])
    a = int(case.rng.integers(len(graph.node)))
    b = int(case.rng.integers(a, len(graph.node)))
    node, later = graph.node[a], graph.node[b]
    if not node.input or not later.output:
        node.input.append(later.output[0] if later.output else "fuzz_undefined")
    else:
        node.input[int(case.rng.integers(len(node.input)))] = later.output[0]
    return f"a {node.op_type} node reads the output of {'itself' if a == b else 'a later ' + later.op_type}"


def m_double_writer(case):
    model = case.model
    graph = case.pick([g for g in _graphs(model) if len(g.node) >= 2]) or model.graph
    node = case.pick(graph.node)
    other = case.pick([n for n in graph.node if n is not node] or [node])
    how = case.pick(["node", "graph-input", "initializer"])
    names = {"node": other.output[0] if other.output else "x",
             "graph-input": graph.input[0].name if graph.input else "x",
             "initializer": graph.initializer[0].name if graph.initializer else "x"}
    node.output[0] = names[how]
    return f"a {node.op_type} node writes '{names[how]}', which a {how} also defines"


def m_unknown_op(case):
    node = case.pick(_all_nodes(case.model))
    how = case.pick(["default-domain", "unimported-domain"])
    old = node.op_type
    if how == "default-domain":
        node.op_type, node.domain = "Fuzzify", ""
    else:
        node.domain = "fuzz.domain"
    return f"a {old} node -> {how} op '{node.op_type}' (domain '{node.domain}')"


def m_structure(case):
    model = case.model
    how = case.pick(["remove-node", "duplicate-node", "reverse-nodes", "remove-input", "remove-initializer",
                     "no-outputs-of-subgraph", "duplicate-output"])
    graph = case.pick(_graphs(model)) if how != "no-outputs-of-subgraph" else None
    if how == "remove-node":
        node = case.pick(graph.node)
        graph.node.remove(node)
        return f"a {node.op_type} node removed"
    if how == "duplicate-node":
        node = case.pick(graph.node)
        graph.node.append(node)
        return f"a {node.op_type} node given twice"
    if how == "reverse-nodes":
        nodes = list(graph.node)[::-1]
        del graph.node[:]
        graph.node.extend(nodes)
        return "nodes in reverse (not topological) order"
    if how == "remove-input" and graph.input:
        value = case.pick(graph.input)
        graph.input.remove(value)
        return f"graph input '{value.name}' removed"
    if how == "remove-initializer" and graph.initializer:
        tensor = case.pick(graph.initializer)
        graph.initializer.remove(tensor)
        return f"initializer '{tensor.name}' removed"
    if how == "no-outputs-of-subgraph" and len(_graphs(model)) > 1:
        sub = case.pick(_graphs(model)[1:])
        del sub.output[:]
        return f"subgraph '{sub.name}' has no outputs"
    model.graph.output.append(model.graph.output[0])
    return "first graph output listed twice"


# Where hostile external data points (relative to the model's folder unless absolute).
ESCAPES = ["../" + SECRET_NAME, "ABSOLUTE", SECRET_NAME, "link.bin", "sub/../../" + SECRET_NAME, "/dev/zero",
           "/dev/urandom", "/proc/self/environ", "", ".", "missing.bin", "/etc/hostname", "file:../" + SECRET_NAME]


def m_external(case):
    """Point a tensor's external data somewhere hostile, or give it hostile offsets/lengths."""
    model = case.model
    candidates = _tensors(model)
    # Tensors that are not main-graph initializers (Constant values, subgraph initializers)
    # are where external data has been handled differently; they get half the picks.
    others = [t for t in candidates if not any(t is i for i in model.graph.initializer)]
    external = [t for t in candidates if t.data_location == TensorProto.EXTERNAL]
    roll = case.rng.random()
    tensor = case.pick(others if others and roll < 0.5 else external if external and roll < 0.75 else candidates)
    if tensor is None:
        return m_flip_bits(case)
    if tensor.data_location != TensorProto.EXTERNAL:  # move its data to a file of its own first
        data = numpy_helper.to_array(tensor).tobytes()
        name = f"t{len(case.files)}.bin"
        case.files[name] = data
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", name), ("offset", "0"), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
    info = {e.key: e for e in tensor.external_data}
    how = case.pick(["location"] * 3 + ["offset", "length", "raw-too", "duplicate-key", "no-location"])
    if how == "location":
        target = case.pick(ESCAPES)
        if target == "link.bin":
            case.links["link.bin"] = "../" + SECRET_NAME
        elif target == "ABSOLUTE":
            target = case.secret
        info["location"].value = target
        return f"external data of tensor '{tensor.name}' at '{target}'"
    if how in ("offset", "length"):
        value = str(case.pick(["-8", "abc", "1e3", str(HUGE), "0x10", "", " 4", str(2**64)]))
        (info[how] if how in info else tensor.external_data.add(key=how)).value = value
        return f"external data of tensor '{tensor.name}': {how}='{value}'"
    if how == "raw-too":
        tensor.raw_data = b"\x00" * 8
        return f"tensor '{tensor.name}' has both external data and raw_data"
    if how == "duplicate-key":
        tensor.external_data.add(key="location", value="../" + SECRET_NAME)
        return f"external data of tensor '{tensor.name}' gives location twice (second: ../{SECRET_NAME})"
    tensor.external_data.remove(info["location"])
    return f"external data of tensor '{tensor.name}' without a location"


def m_sparse(case, *, valid: bool | None = None):
    """Move an initializer to sparse_initializer (valid unless corrupted)."""
    graph = case.model.graph
    tensor = case.pick([t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1
                        and t.data_location != TensorProto.EXTERNAL])
    if tensor is None:
        return "no in-memory float initializer to make sparse (model unchanged)" if valid else m_dims(case)
    array = numpy_helper.to_array(tensor)
    flat = array.reshape(-1)
    indices = np.flatnonzero(np.abs(flat) > np.median(np.abs(flat))).astype(np.int64)
    values = numpy_helper.from_array(flat[indices], tensor.name)
    index_tensor = numpy_helper.from_array(indices, "")
    how = "valid" if valid else case.pick(["out-of-range", "negative", "count-mismatch", "huge-dims"])
    if how == "out-of-range" and len(indices):
        index_tensor = numpy_helper.from_array(indices + flat.size, "")
    elif how == "negative" and len(indices):
        index_tensor = numpy_helper.from_array(-indices - 1, "")
    elif how == "count-mismatch":
        index_tensor = numpy_helper.from_array(indices[: max(len(indices) - 1, 0)], "")
    dims = [HUGE] * len(array.shape) if how == "huge-dims" else list(array.shape)
    graph.initializer.remove(tensor)
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, index_tensor, dims))
    return f"initializer '{tensor.name}' as a sparse_initializer ({how})"


def m_sparse_valid(case):
    return m_sparse(case, valid=True) + " (a valid model: must exit 0)"


def m_string_tensor(case):
    tensor = case.pick(_tensors(case.model))
    if tensor is None:
        return m_dims(case)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_type = TensorProto.STRING
    tensor.string_data.extend([b"\xff\xfe fuzz"] * min(count, 10_000))
    return f"tensor '{tensor.name}' -> STRING data"


def m_function(case):
    """A local function that calls itself, or a node calling an undefined local function."""
    model = case.model
    # The call added below returns its input, so its output has the type inferred for that input.
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    how = case.pick(["recursive", "undefined", "mutual"])
    node = case.pick([n for n in model.graph.node if n.input and n.output])
    if how == "undefined":
        old = node.op_type
        node.op_type, node.domain = "Missing", "fuzz.local"
        model.opset_import.add(domain="fuzz.local", version=1)
        return f"a {old} node calls an undefined local function"
    names = ["Loop1", "Loop2"] if how == "mutual" else ["Loop1", "Loop1"]
    for name, callee in zip(names, [names[1], names[0]]):
        model.functions.append(helper.make_function(
            "fuzz.local", name, ["X"], ["Y"], [helper.make_node(callee, ["X"], ["Y"], domain="fuzz.local")],
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("fuzz.local", 1)]))
        if how == "recursive":
            break
    model.opset_import.add(domain="fuzz.local", version=1)
    extra = f"{node.output[0]}_fz"
    graph = model.graph
    graph.node.append(helper.make_node("Loop1", [node.output[0]], [extra], domain="fuzz.local"))
    value = graph.output.add(name=extra)
    value.type.CopyFrom(known[node.output[0]].type if node.output[0] in known else graph.output[0].type)
    return f"a {how} local function called on the output of a {node.op_type} node"


def m_metadata(case):
    model = case.model
    how = case.pick(["many-props", "duplicate-props", "huge-value"])
    if how == "many-props":
        for i in range(20_000):
            model.metadata_props.add(key=f"k{i}", value="v")
    elif how == "duplicate-props":
        model.metadata_props.add(key="k", value="1")
        model.metadata_props.add(key="k", value="2")
    else:
        model.metadata_props.add(key="k", value="V" * 2_000_000)
    return f"metadata_props: {how}"


MUTATIONS = {  # name: (function, weight)
    "none": (m_none, 2),
    "flip-bits": (m_flip_bits, 8), "overwrite": (m_overwrite, 5), "insert": (m_insert, 4), "delete": (m_delete, 4),
    "truncate": (m_truncate, 6), "duplicate-bytes": (m_duplicate, 3), "data-file": (m_data_file, 2),
    "name-utf8": (m_name_utf8, 8), "name-huge": (m_name_huge, 3), "name-clash": (m_name_clash, 4),
    "dims": (m_dims, 6), "io-dims": (m_io_dims, 4), "data-type": (m_data_type, 5), "elem-type": (m_elem_type, 4),
    "raw-data": (m_raw_data, 5), "attr-type": (m_attr_type, 4), "attr-value": (m_attr_value, 5),
    "opset": (m_opset, 4), "undefined-input": (m_undefined_input, 4), "cycle": (m_cycle, 3),
    "double-writer": (m_double_writer, 3), "unknown-op": (m_unknown_op, 3), "structure": (m_structure, 5),
    "external": (m_external, 10), "sparse": (m_sparse, 3), "sparse-valid": (m_sparse_valid, 2),
    "string-tensor": (m_string_tensor, 2), "function": (m_function, 3), "metadata": (m_metadata, 1),
}
MUST_SUCCEED = {"none", "sparse-valid"}
BASE_NAMES = ("digits", "digits_external", "constant_external", "if_loop", "local_function", "custom_op",
              "symbolic_dim", "opset11", "opset21", "vad", "constant_if", "subgraph_and_function",
              "conv_batchnorm_fp16", "small_convnet")


def plan(case: int, seed: int = SEED) -> tuple[np.random.Generator, str, str]:
    """(the case's generator, base model, mutation): the same for the same seed and case."""
    rng = np.random.default_rng([seed, case])
    base = BASE_NAMES[int(rng.integers(len(BASE_NAMES)))]
    names = list(MUTATIONS)
    weights = np.array([MUTATIONS[n][1] for n in names], float)
    mutation = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if case < len(BASE_NAMES):  # the first cases are the controls: each fixture model unbroken
        base, mutation = BASE_NAMES[case], "none"
    return rng, base, mutation


def case_id(case: int) -> str:
    _, base, mutation = plan(case)
    return f"{case:04d}-{base}-{mutation}"


def write_case(case: int, folder: Path, seed: int = SEED) -> tuple[str, list[list[str]]]:
    """Write the case's model (and its files) into `folder`; (what was done, the commands to run)."""
    rng, base, mutation = plan(case, seed)
    fuzz = Case(base, rng, str(folder.parent.resolve() / SECRET_NAME))
    calib = calibration(bases()[base][0], base)
    what = MUTATIONS[mutation][0](fuzz)
    data = fuzz.serialized()
    folder.mkdir(parents=True)
    (folder / MODEL).write_bytes(data)
    (folder / "calib.npz").write_bytes(calib)
    for name, content in fuzz.files.items():
        (folder / name).write_bytes(content)
    for name, target in fuzz.links.items():
        (folder / name).symlink_to(target)
    (folder / "sub").mkdir()  # so that sub/../../secret.bin resolves
    return f"{mutation} of {base}: {what}", commands(case, folder.name, base)


def commands(case: int, folder: str, base: str) -> list[list[str]]:
    model, out = f"{folder}/{MODEL}", f"{folder}/out.onnx"
    timing = ["--runs", "1", "--warmup", "0"]
    quant = case % QUANT_EVERY == 0 and base in QUANT_BASES
    calib = ["--calib", f"{folder}/calib.npz"] if quant else []
    report = ["--report", f"{folder}/report.json"] if case % 2 else []
    return [["opt", model, "-p", "cleanup,quant(method=minmax)" if quant else "cleanup", "-o", out, *timing, *calib,
             *report],
            ["info", model, *(["--json"] if case % 3 == 0 else [])],
            ["bench", model, *timing, *calib]]


# ---------------------------------------------------------------------------------------------
# Running a case and checking the promise


def secret_bytes(seed: int = SEED) -> bytes:
    """A periodic printable pattern: any 16 bytes read from it are one of `secret_windows()`."""
    letters = np.random.default_rng([seed, 10**6]).integers(ord("a"), ord("z") + 1, 10, dtype=np.uint8)
    return (b"SECRET" + bytes(letters)) * 4096  # 64 KiB: more than any fixture tensor


def plant_secrets(root: Path, seed: int = SEED) -> None:
    for name in SECRET_FILES:
        (root / name).write_bytes(secret_bytes(seed))


def secret_windows(seed: int = SEED) -> list[bytes]:
    period = secret_bytes(seed)[:16]
    return [(period * 2)[i:i + 16] for i in range(16)]


def run_case(case: int, worker: Worker, root: Path, seed: int = SEED) -> tuple[str, list[str]]:
    """Write and run one case under `root` (which holds the secret); (description, problems)."""
    folder = root / f"case_{case:04d}"
    what, argvs = write_case(case, folder, seed)
    mutation = plan(case, seed)[2]
    inputs = snapshot(folder)
    outside = sorted(p.name for p in root.iterdir())
    windows = secret_windows(seed)
    problems = []
    for argv in argvs:
        outcome = worker.run(argv, cwd=root)
        problems += [f"`edgegraph {' '.join(argv)}` {p}" for p in check_run(argv, outcome, folder, inputs, windows)]
        if outcome.code == 0 and argv[0] == "opt":
            checked = worker.check_model(folder / "out.onnx")
            # The output must pass every check its input passes: a model the full checker refuses
            # for a reason edgegraph cannot repair (an output of unknown rank that no inference
            # can compute) may come out refused for that same reason.
            if checked and checked != worker.check_model(folder / "model.onnx"):
                problems.append(f"`edgegraph {' '.join(argv)}` exit 0 but its output is not a valid model: {checked}")
        if mutation in MUST_SUCCEED and outcome.code != 0 and not outcome.problem:
            problems.append(f"`edgegraph {' '.join(argv)}` exit {outcome.code} on a valid model: {outcome.err[:300]!r}")
        _restore(folder, inputs)  # the next command starts from the case's own files
        if sorted(p.name for p in root.iterdir()) != outside:
            problems.append(f"`edgegraph {' '.join(argv)}` changed the folder outside the model's: "
                            f"{sorted(set(p.name for p in root.iterdir()) ^ set(outside))}")
        if any((root / name).read_bytes() != secret_bytes(seed) for name in SECRET_FILES):
            problems.append(f"`edgegraph {' '.join(argv)}` changed a file outside the model's folder")
            plant_secrets(root, seed)
    return what, problems


def _restore(folder: Path, inputs: dict[str, str]) -> None:
    """Remove what a run added to the case folder (checked already), so each command sees the input alone."""
    for name in set(snapshot(folder)) - set(inputs):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_run(argv, outcome, folder: Path, inputs: dict[str, str], windows: list[bytes]) -> list[str]:
    found = []
    if outcome.problem:
        return [outcome.problem]
    err = outcome.err
    if outcome.code not in (0, 2):
        first = err.strip().splitlines()[-1][:300] if err.strip() else "(no stderr)"
        found.append(f"exit {outcome.code} (only 0 or 2 allowed): {first}")
    if outcome.code == 2:
        if not (err.startswith("edgegraph: error: ") and err.count("\n") == 1 and err.endswith("\n")):
            found.append(f"exit 2 but stderr is not exactly one 'edgegraph: error:' line "
                         f"({err.count(chr(10))} lines): {err[:300]!r}")
        if max(len(err.rstrip("\n")), outcome.err_bytes - 1) > MAX_ERROR_CHARS:
            found.append(f"stderr of {outcome.err_bytes} bytes (limit {MAX_ERROR_CHARS}): {err[:200]!r}...")
    now = snapshot(folder)
    changed = sorted(k for k in inputs if now.get(k) != inputs[k])
    if changed:
        found.append(f"input files changed or removed: {changed}")
    added = sorted(set(now) - set(inputs))
    if outcome.code == 0 and argv[0] == "opt":
        allowed = {"out.onnx", "report.json"}
        added = [a for a in added if a not in allowed and not a.startswith("out.onnx.")]
    if added:
        found.append(f"exit {outcome.code} left files behind: {added}")
    outside = [p for p in outcome.opened if not p.startswith(str(folder.resolve()) + os.sep)]
    if outside:
        found.append(f"read files outside the model's folder: {outside}")
    leaked = [name for name in ["stdout", "stderr", *sorted(set(now) - set(inputs))]
              if _contains_secret(_output_bytes(name, outcome, folder), windows)]
    if leaked:
        found.append(f"the secret's bytes appear in {leaked}")
    return found


def _output_bytes(name: str, outcome, folder: Path) -> bytes:
    if name == "stdout":
        return outcome.out.encode()
    if name == "stderr":
        return outcome.err.encode()
    path = folder / name
    return path.read_bytes() if path.is_file() and not path.is_symlink() else b""


def _contains_secret(data: bytes, windows: list[bytes]) -> bool:
    return any(w in data for w in windows)


def failure_message(case: int, seed: int, what: str, problems: list[str]) -> str:
    lines = [f"fuzz seed {seed}, case {case} ({what}):", *[f"  - {p}" for p in problems],
             f"  reproduce: python tests/test_fuzz.py {case} /tmp/fuzz_case  (writes the case, prints the commands)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    plant_secrets(root)
    worker = Worker(tmp_path_factory.mktemp("fuzz_worker"), watch=[root], timeout=TIMEOUT)
    yield root, worker
    worker.close()


@pytest.mark.parametrize("case", range(CASES), ids=case_id)
def test_fuzz_case(fuzz_root, case):
    root, worker = fuzz_root
    what, problems = run_case(case, worker, root)
    if problems:
        pytest.fail(failure_message(case, SEED, what, problems), pytrace=False)
    shutil.rmtree(root / f"case_{case:04d}")


def test_fuzz_plan_is_seeded():
    """The same seed gives the same cases (what makes a failing case reproducible)."""
    assert [case_id(c) for c in range(20)] == [case_id(c) for c in range(20)]
    root, folders = Path(tempfile.mkdtemp()), []
    for case in (5, 5, 6):
        write_case(case, root / "case")
        folders.append(snapshot(root / "case"))
        shutil.rmtree(root / "case")
    shutil.rmtree(root)
    assert folders[0] == folders[1] != folders[2]


# ---------------------------------------------------------------------------------------------
# Outside pytest: reproduce one case, or sweep many


def _sweep(count: int, seed: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="edgegraph-fuzz-"))
    plant_secrets(root, seed)
    worker = Worker(root.parent / f"{root.name}-worker", watch=[root], timeout=TIMEOUT)
    start, failed = time.monotonic(), 0
    for case in range(count):
        what, problems = run_case(case, worker, root, seed)
        if problems:
            failed += 1
            print(failure_message(case, seed, what, problems), flush=True)
        else:
            shutil.rmtree(root / f"case_{case:04d}")
    worker.close()
    print(f"{failed} of {count} cases failed in {time.monotonic() - start:.1f} s (seed {seed}); files in {root}")


if __name__ == "__main__":
    args = sys.argv[1:]
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else SEED
    if "--sweep" in args:
        _sweep(int(args[args.index("--sweep") + 1]), seed)
    else:
        case = int(args[0])
        folder = Path(args[1] if len(args) > 1 else f"fuzz_case_{case}").resolve() / f"case_{case:04d}"
        what, argvs = write_case(case, folder, seed)
        plant_secrets(folder.parent, seed)
        print(f"seed {seed}, case {case}: {what}\nfrom {folder.parent}:")
        for argv in argvs:
            print("  edgegraph " + " ".join(argv))
