"""Model I/O and a thin layer over onnx-graphsurgeon: the one place that turns protobuf into graphs."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from edgegraph.errors import EdgegraphError, ModelLoadError

logger = logging.getLogger(__name__)

# protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTO_LIMIT = 2**31 - 64 * 2**20

@dataclass
class Model:
    """A gs graph plus the model-level fields that graphsurgeon does not carry."""

    graph: gs.Graph
    doc_string: str = ""
    domain: str = ""
    model_version: int = 0
    metadata_props: dict[str, str] = field(default_factory=dict)

    @property
    def opset(self) -> int:
        """Opset of the default ONNX domain."""
        return int(self.graph.opset)

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto, keeping ir_version unless the opsets need a newer one."""
        proto = gs.export_onnx(self.graph, do_type_check=False)
        needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        proto.ir_version = max(proto.ir_version or 0, needed)
        proto.doc_string, proto.domain, proto.model_version = self.doc_string, self.domain, self.model_version
        del proto.metadata_props[:]
        for key, value in self.metadata_props.items():
            proto.metadata_props.add(key=key, value=value)
        return proto

    def copy(self) -> Model:
        """A deep copy (through protobuf, so no gs object is shared)."""
        return from_proto(self.to_proto(), infer=False)

    def refresh_shapes(self) -> None:
        """Re-run shape inference, e.g. after a pass created tensors without shapes."""
        self.graph = from_proto(self.to_proto(), infer=True).graph


def from_proto(proto: onnx.ModelProto, *, infer: bool = True) -> Model:
    """Wrap a ModelProto (shape inference first, unless asked not to)."""
    if infer:
        proto = infer_shapes(proto)
    graph = gs.import_onnx(proto)
    # gs drops the IR version of old models if it is not set; keep what the file said.
    graph.ir_version = proto.ir_version
    return Model(
        graph=graph,
        doc_string=proto.doc_string,
        domain=proto.domain,
        model_version=proto.model_version,
        metadata_props={p.key: p.value for p in proto.metadata_props},
    )


def load(source, *, infer: bool = True) -> Model:
    """Load a model from a path, bytes, a ModelProto or a Model (copied; the source is never changed).

    External data next to a path is loaded. Raises `ModelLoadError` with one clear sentence for a
    missing file, a file that is not ONNX, or a truncated one.
    """
    if isinstance(source, Model):
        return source.copy()
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        return from_proto(_validated(proto, "the given ModelProto"), infer=infer)
    if isinstance(source, bytes | bytearray):
        return from_proto(_validated(_parse(bytes(source), "the given bytes"), "the given bytes"), infer=infer)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX model file")
    proto = _parse(path.read_bytes(), str(path))
    if any(_uses_external_data(t) for t in _all_initializers(proto)):
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read its external data: {exc}") from None
    return from_proto(_validated(proto, str(path)), infer=infer)


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


def _all_initializers(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from onnx.external_data_helper._get_all_tensors(proto)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def proto_size(proto: onnx.ModelProto) -> int:
    """Bytes the model would take serialized, counting raw tensor data without serializing."""
    tensor_bytes = sum(len(t.raw_data) for t in _all_initializers(proto))
    # ByteSize() of a >2 GiB message still works (it is serializing that fails).
    return max(proto.ByteSize(), tensor_bytes)


def save(model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write a model atomically: a temporary file in the same folder, renamed into place.

    `external_data=None` chooses external data only when the model would pass protobuf's 2 GiB
    limit; the tensors then go to `<name>.data` beside the model. On any error nothing is left at
    `path` (an existing file there stays as it was).
    """
    proto = model.to_proto() if isinstance(model, Model) else model
    path = Path(path)
    if path.is_dir():
        raise EdgegraphError(f"output path {path} is a directory")
    if not path.parent.exists():
        raise EdgegraphError(f"output folder {path.parent} does not exist")
    if external_data is None:
        external_data = proto_size(proto) > PROTO_LIMIT
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        if external_data:
            data_name = f"{path.name}.data"
            onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staging / data_name, path.parent / data_name)
        else:
            staged.write_bytes(proto.SerializeToString())
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that degrades instead of failing (custom domains, symbolic dims, subgraphs).

    Data propagation is tried first because it resolves Shape->Gather->Reshape chains; some
    exporter output makes it throw, in which case plain inference, and then none, is used.
    """
    if proto_size(proto) > PROTO_LIMIT:
        return _infer_shapes_via_file(proto)
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
        except Exception as exc:  # noqa: BLE001 - onnx raises many unrelated types here
            logger.debug("shape inference (data_prop=%s) failed: %s", data_prop, exc)
    logger.warning("shape inference failed; continuing with the shapes stored in the model")
    return proto


def _infer_shapes_via_file(proto: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save(proto, src, external_data=True)
        try:
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=False, strict_mode=False)
        except Exception as exc:  # noqa: BLE001
            logger.warning("shape inference failed (%s); continuing with the stored shapes", exc)
            return proto
        inferred = onnx.load(str(dst), load_external_data=True)
    return inferred


def fix_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Make the named graph inputs static (`--fix-shape`) and re-infer shapes downstream."""
    inputs = {t.name: t for t in model.graph.inputs}
    for name, shape in shapes.items():
        if name not in inputs:
            raise EdgegraphError(f"--fix-shape: model has no input '{name}' (inputs: {', '.join(inputs)})")
        old = inputs[name].shape
        if old is not None and len(old) != len(shape):
            raise EdgegraphError(f"--fix-shape: input '{name}' has rank {len(old)}, got shape {list(shape)}")
        for axis, (was, now) in enumerate(zip(old or [], shape)):
            if isinstance(was, int) and was > 0 and was != now:
                raise EdgegraphError(f"--fix-shape: input '{name}' axis {axis} is fixed to {was}, got {now}")
        inputs[name].shape = [int(d) for d in shape]
    # Intermediate value_info may still carry the old symbolic dims; drop it so inference is fresh.
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in model.graph.inputs and tensor not in model.graph.outputs:
            tensor.shape = None
    model.refresh_shapes()


# ---------------------------------------------------------------------------------------------
# Graph helpers used by passes.


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor`."""
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None when computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and node.attrs.get("value") is not None:
        value = node.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def const(name: str, values: np.ndarray) -> gs.Constant:
    """A new initializer."""
    return gs.Constant(name, np.ascontiguousarray(values))


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True if `tensor` is one of the graph's outputs (its name must then be kept)."""
    return any(out is tensor for out in graph.outputs)


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
        node.inputs[:] = [new if t is old else t for t in node.inputs]
    if not is_graph_output(graph, old):
        return
    source = producer(new)
    if source is not None and not consumers(new) and not is_graph_output(graph, new):
        old.inputs.clear()
        source.outputs[:] = [old if t is new else t for t in source.outputs]
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


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """Graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph, its subgraphs (recursively) and its local functions' graphs."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)
    for function in getattr(graph, "functions", []) or []:
        yield from iter_graphs(function)


def iter_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Every node of the graph, its subgraphs and its functions."""
    for g in iter_graphs(graph):
        yield from g.nodes


def to_networkx(graph: gs.Graph) -> nx.DiGraph:
    """Node-level dataflow graph of the top-level graph (nodes are indices into graph.nodes)."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.nodes)))
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            for user in out.outputs:
                if id(user) in index:
                    dag.add_edge(i, index[id(user)], tensor=out.name)
    return dag


# Ops whose output is not a function of their inputs: never evaluate them offline.
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def folded_value(tensor: gs.Tensor, opset: int, max_nodes: int = 16) -> np.ndarray | None:
    """The value of `tensor` when it is computed from constants only, else None.

    Covers what exporters leave in front of weights and biases, e.g. `Cast(int8 weight) * scale`
    (weight-only quantized models) or `Reshape(bias, shape)` (paddle2onnx); the few nodes are
    evaluated with onnx's reference implementation. Gives up (None) beyond `max_nodes` nodes,
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
        if (node is None or (node.domain or "") not in ("", "ai.onnx") or node.op in _NONDETERMINISTIC
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
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs], **n.attrs)
         for n in ordered],
        "folded",
        [],
        [onnx.helper.make_value_info(tensor.name, onnx.TypeProto())],
        [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in leaves.items()],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(proto).run([tensor.name], {})[0])
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises many types
        logger.debug("cannot fold %s: %s", tensor.name, exc)
        return None
