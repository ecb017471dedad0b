"""Target profiles: which ops a deployment runtime runs, and how it wants models quantized.

One TOML file per target in this folder, each citing the public source it was built from
(`source`). The schema (`_KEYS`, `_RULE_KEYS`, `_QUANT_KEYS`) is checked when a profile is
loaded; a bad profile is one `EdgegraphError` line naming the file and the key.

    profile = targets.load("nnapi")
    reason = profile.unsupported(node, targets.ModelContext.of(model))  # None when supported

A profile's keys:

* `ops`: the op types the runtime runs (`Conv`; `domain:Op` outside the default domain). No
  `ops` means every op; `ops_from = "onnxruntime-cpu"` reads the list from the installed
  onnxruntime's CPU kernel registry (what its CPU provider really has, per opset).
* `[rules.Op]`: constraints on an op of `ops`: `opset = [lo, hi]`, `ranks` (of input 0),
  `max_rank`, `dtypes` (of input 0), `constant` (input indices that must be constant),
  `attrs = {name = [allowed values]}` (an absent attribute has its schema default), `absent`
  (attributes that must not be set), `static` (needs static shapes even where the profile does
  not), `note` (a documented caveat that is not checked, shown by `check`).
* Profile-wide: `opset = [lo, hi]` (default domain), `max_rank`, `static_shapes` (every input of
  a supported node must have a fixed shape, as NNAPI needs), `dtypes` (what a node's first,
  data input may be, unless its rule says otherwise; shape and index inputs are not checked).
* `[quant]`: the preferred quantization scheme (see `QuantScheme`), and for `cpu` the lists
  quant's placement plans with (`[quant.placement]`).
* `quantized_ops`: the ops Q/DQ placement quantizes; by default, for a runtime that takes QDQ,
  those of its `ops` that placement can place (for `cpu`: written out, what ORT fuses).
* `channel_alignment`: the channel multiple pruning should keep (SIMD / tensor-core width).
* `ort_provider`: the onnxruntime execution provider name when the target is one: such a
  provider sees the graph after onnxruntime's basic optimisations (which `check` applies first).
"""

from __future__ import annotations

import functools
import reprlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

# (numpy, onnx and onnxruntime are imported where used: the command line imports this module
# before it can turn a signal into a clean exit, so it must stay quick to import.)
from edgegraph.errors import NAME_LIMIT, EdgegraphError, UnknownTargetError, shown

PROFILE_DIR = Path(__file__).parent

DEFAULT_DOMAIN = "ai.onnx"
DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
          "int64", "uint64", "bool", "string", "int4", "uint4", "float8e4m3fn", "float8e5m2")
QUANT_DTYPES = ("u8", "s8", "u16", "s16", "float")


# ---------------------------------------------------------------------------------------------
# Schema: key -> (type of its value, type of a list's items or None)

_KEYS = {
    "description": (str, None), "source": (list, str), "ops": (list, str), "ops_from": (str, None),
    "quantized_ops": (list, str), "rules": (dict, dict), "opset": (list, int), "max_rank": (int, None),
    "static_shapes": (bool, None), "dtypes": (list, str), "quant": (dict, None),
    "channel_alignment": (int, None), "ort_provider": (str, None), "notes": (list, str),
}
_RULE_KEYS = {
    "opset": (list, int), "ranks": (list, int), "max_rank": (int, None), "dtypes": (list, str),
    "constant": (list, int), "attrs": (dict, list), "absent": (list, str), "static": (bool, None),
    "note": (str, None),
}
_QUANT_KEYS = {
    "activations": (str, None), "weights": (str, None), "per_channel": (bool, None),
    "symmetric_weights": (bool, None), "symmetric_activations": (bool, None), "qdq": (bool, None),
    "a16w8": (bool, None), "weight_only": (bool, None), "placement": (dict, list), "note": (str, None),
}
_PLACEMENT_KEYS = ("anchors", "compute", "shared", "float_output_ok", "foldable_activations")
_OPS_FROM = ("onnxruntime-cpu",)


@dataclass(frozen=True)
class Rule:
    """Constraints on one supported op (all optional)."""

    opset: tuple[int, int] | None = None
    ranks: frozenset[int] | None = None
    max_rank: int | None = None
    dtypes: frozenset[str] | None = None
    constant: tuple[int, ...] = ()
    attrs: Mapping[str, tuple] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    static: bool = False
    note: str = ""


@dataclass(frozen=True)
class QuantScheme:
    """How the target wants a model quantized.

    `activations` / `weights`: "u8", "s8", "u16" or "float" (not quantized); `qdq`: whether the
    runtime consumes QuantizeLinear/DequantizeLinear at all (CoreML does not: weight-only);
    `a16w8`: 16-bit activations with 8-bit weights are supported (QNN HTP); `placement`: for
    `cpu`, the op lists quant's placement plans with (which ops onnxruntime fuses into integer
    kernels, see passes/quant/placement.py).
    """

    activations: str = "u8"
    weights: str = "s8"
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool = False
    qdq: bool = True
    a16w8: bool = False
    weight_only: bool = False
    placement: Mapping[str, frozenset[str]] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: tuple[str, ...]
    ops: frozenset[str] | None  # supported "Op" / "domain:Op"; None: every op
    rules: Mapping[str, Rule]
    quant: QuantScheme
    quantized_ops: frozenset[str] = frozenset()  # ops with fast int8 kernels (what Q/DQ placement aims at)
    opset: tuple[int, int] | None = None
    max_rank: int | None = None
    static_shapes: bool = False
    dtypes: frozenset[str] | None = None
    channel_alignment: int = 1
    ort_provider: str | None = None
    notes: tuple[str, ...] = ()
    ops_from: str | None = None

    def supports_op(self, op: str, domain: str = "", opset: int | None = None) -> bool:
        """Whether the op type is in the profile (no look at shapes or attributes)."""
        key = op_key(op, domain)
        if key == "Constant":  # data, not computation: every converter turns it into a weight
            return True
        if self.ops_from == "onnxruntime-cpu":
            return _ort_cpu_has(op, domain, opset)
        return self.ops is None or key in self.ops

    def unsupported(self, node, model_context: ModelContext) -> str | None:
        """Why `node` (a graphsurgeon Node or an onnx NodeProto) cannot run on this target, or
        None when it can. `model_context` (`ModelContext.of(model)`) gives shapes, dtypes,
        constants and opsets."""
        found = self.why(node, model_context)
        return None if found is None else found[1]

    def why(self, node, ctx: ModelContext) -> tuple[str, str] | None:
        """(kind, reason) or None: kind is "op", "opset", "dynamic", "rank", "dtype", "attr" or
        "constant" (what `check` proposes a fix by)."""
        view = NodeView.of(node)
        domain_opset = ctx.opset(view.domain)
        if not self.supports_op(view.op, view.domain, domain_opset):
            return "op", f"{op_key(view.op, view.domain)} is not supported by {self.name}"
        rule = self.rules.get(op_key(view.op, view.domain), Rule())
        span = rule.opset or (self.opset if view.domain in ("", DEFAULT_DOMAIN) else None)
        if span is not None and domain_opset is not None and not span[0] <= domain_opset <= span[1]:
            return "opset", f"opset {domain_opset} outside {span[0]}..{span[1]}"
        present = [name for name in view.inputs if name]
        if self.static_shapes or rule.static:
            for name in present:
                if not ctx.is_static(name):
                    return "dynamic", f"input {shown(name, NAME_LIMIT)} has a dynamic shape {ctx.shape_text(name)}"
        max_rank = min(r for r in (self.max_rank, rule.max_rank, 10**9) if r is not None)
        for name in present:
            rank = ctx.rank(name)
            if rank is not None and rank > max_rank:
                return "rank", f"input {shown(name, NAME_LIMIT)} has rank {rank}, above {max_rank}"
        if view.op == "Transpose" and len(view.attrs.get("perm", ())) > max_rank:  # rank known from perm
            return "rank", f"Transpose of rank {len(view.attrs['perm'])}, above {max_rank}"
        if rule.ranks is not None and present:
            rank = ctx.rank(present[0])
            if rank is not None and rank not in rule.ranks:
                return "rank", f"rank-{rank} input (supports {', '.join(map(str, sorted(rule.ranks)))})"
        allowed = rule.dtypes if rule.dtypes is not None else self.dtypes
        dtype = ctx.dtype(present[0]) if present else None
        if dtype is not None and allowed is not None and dtype not in allowed:  # the data input's type
            return "dtype", f"input {shown(present[0], NAME_LIMIT)} is {dtype} (supports {', '.join(sorted(allowed))})"
        for index in rule.constant:
            if index < len(view.inputs) and view.inputs[index] and not ctx.is_constant(view.inputs[index]):
                return "constant", f"input {index} ({shown(view.inputs[index], NAME_LIMIT)}) is not constant"
        for name in rule.absent:
            if name in view.attrs:
                return "attr", f"attribute {name} is not supported"
        for name, allowed in rule.attrs.items():
            value = view.attrs.get(name, _MISSING)
            if value is _MISSING:
                value = attribute_default(view.op, view.domain, domain_opset, name)
            if isinstance(value, list | tuple):
                value = list(value)
            if value is not _MISSING and value not in allowed:
                return "attr", f"{name}={value!r} (supports {', '.join(map(repr, allowed))})"
        return None


Target = Profile  # the name edgegraph used before profiles had rules


def op_key(op: str, domain: str = "") -> str:
    return op if domain in ("", DEFAULT_DOMAIN) else f"{domain}:{op}"


# ---------------------------------------------------------------------------------------------
# Loading


def names() -> list[str]:
    """The names of the profiles in this folder."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


available_targets = names


def load(name: str) -> Profile:
    """The profile `name` from this folder; only these names, never a path to another file."""
    if not isinstance(name, str) or name not in names():
        given = reprlib.repr(name) if isinstance(name, str) else type(name).__name__
        raise UnknownTargetError(f"unknown target {given} (available: {', '.join(names())})")
    path = PROFILE_DIR / f"{name}.toml"
    try:
        stat = path.stat()
    except OSError as exc:
        raise EdgegraphError(f"target profile {path}: {exc}") from None
    return _read(name, path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read(name: str, path: Path, mtime_ns: int, size: int) -> Profile:
    """The parsed profile, once per file version (checks call `load` for every node test)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgegraphError(f"target profile {path}: {exc}") from None
    return _profile(name, data, path)


load_target = load


def _typed(table: Mapping, keys: Mapping[str, tuple], where: str) -> None:
    for key, value in table.items():
        if key not in keys:
            raise EdgegraphError(f"{where}{shown(key, NAME_LIMIT)}: unknown key (keys: {', '.join(keys)})")
        kind, item = keys[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and item is not None:
            ok = all(isinstance(v, item) and not (item is int and isinstance(v, bool))
                     for v in (value.values() if isinstance(value, dict) else value))
        if not ok:
            wanted = f"a {'table' if kind is dict else 'list'} of {item.__name__}" if item else \
                ("a table" if kind is dict else kind.__name__)
            raise EdgegraphError(f"{where}{key}: must be {wanted}, got {reprlib.repr(value)}")


def _span(value: list, where: str) -> tuple[int, int]:
    if len(value) != 2 or value[0] > value[1] or value[0] < 1:
        raise EdgegraphError(f"{where}: must be [lowest, highest] opset, got {value}")
    return int(value[0]), int(value[1])


def _dtypes(value: list, where: str) -> frozenset[str]:
    for dtype in value:
        if dtype not in DTYPES:
            raise EdgegraphError(f"{where}: unknown dtype {shown(dtype, NAME_LIMIT)} (dtypes: {', '.join(DTYPES)})")
    return frozenset(value)


def _profile(name: str, data: Mapping[str, Any], path: Path) -> Profile:
    where = f"target profile {path}: "
    _typed(data, _KEYS, where)
    if "ops_from" in data and data["ops_from"] not in _OPS_FROM:
        raise EdgegraphError(f"{where}ops_from: must be one of {', '.join(_OPS_FROM)}, got {reprlib.repr(data['ops_from'])}")
    ops = frozenset(data["ops"]) if "ops" in data else None
    rules = {}
    for op, table in data.get("rules", {}).items():
        here = f"{where}rules.{shown(op, NAME_LIMIT)}."
        if ops is not None and op not in ops:
            raise EdgegraphError(f"{here[:-1]}: a rule for an op not in `ops`")
        _typed(table, _RULE_KEYS, here)
        for attr, allowed in table.get("attrs", {}).items():
            if not allowed:
                raise EdgegraphError(f"{here}attrs.{attr}: must list the allowed values")
        rules[op] = Rule(
            opset=_span(table["opset"], f"{here}opset") if "opset" in table else None,
            ranks=frozenset(table["ranks"]) if "ranks" in table else None,
            max_rank=table.get("max_rank"),
            dtypes=_dtypes(table["dtypes"], f"{here}dtypes") if "dtypes" in table else None,
            constant=tuple(table.get("constant", ())),
            attrs={k: tuple(v) for k, v in table.get("attrs", {}).items()},
            absent=tuple(table.get("absent", ())),
            static=table.get("static", False),
            note=table.get("note", ""),
        )
    quant = dict(data.get("quant", {}))
    _typed(quant, _QUANT_KEYS, f"{where}quant.")
    for key in ("activations", "weights"):
        if key in quant and quant[key] not in QUANT_DTYPES:
            raise EdgegraphError(f"{where}quant.{key}: must be one of {', '.join(QUANT_DTYPES)}, got {reprlib.repr(quant[key])}")
    placement = quant.pop("placement", {})
    for key, value in placement.items():
        if key not in _PLACEMENT_KEYS:
            raise EdgegraphError(f"{where}quant.placement.{shown(key, NAME_LIMIT)}: unknown key "
                                 f"(keys: {', '.join(_PLACEMENT_KEYS)})")
        if not all(isinstance(v, str) for v in value):
            raise EdgegraphError(f"{where}quant.placement.{key}: must be a list of str, got {reprlib.repr(value)}")
    alignment = data.get("channel_alignment", 1)
    if alignment < 1:
        raise EdgegraphError(f"{where}channel_alignment: must be at least 1, got {alignment}")
    if "max_rank" in data and data["max_rank"] < 0:
        raise EdgegraphError(f"{where}max_rank: must be at least 0, got {data['max_rank']}")
    quantized = frozenset(data.get("quantized_ops", []))
    if "quantized_ops" not in data and ops is not None and quant.get("qdq", True) and not quant.get("weight_only"):
        # A runtime that takes QDQ node units runs in integers the ops it has of those quant's
        # placement knows how to place (the cpu profile's [quant.placement] lists).
        placement = load("cpu").quant.placement
        placeable = frozenset().union(*(placement.get(k, ()) for k in ("anchors", "compute", "shared")))
        quantized = ops & placeable
    return Profile(
        name=name,
        description=data.get("description", ""),
        source=tuple(data.get("source", ())),
        ops=ops,
        rules=MappingProxyType(rules),
        quant=QuantScheme(**quant, placement=MappingProxyType({k: frozenset(v) for k, v in placement.items()})),
        quantized_ops=quantized,
        opset=_span(data["opset"], f"{where}opset") if "opset" in data else None,
        max_rank=data.get("max_rank"),
        static_shapes=data.get("static_shapes", False),
        dtypes=_dtypes(data["dtypes"], f"{where}dtypes") if "dtypes" in data else None,
        channel_alignment=alignment,
        ort_provider=data.get("ort_provider"),
        notes=tuple(data.get("notes", ())),
        ops_from=data.get("ops_from"),
    )


@functools.cache
def _ort_cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(domain, op) -> opset ranges of the installed onnxruntime's CPU kernels."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider":
            kernels.setdefault((kernel.domain or "", kernel.op_name), []).append(tuple(kernel.version_range))
    return kernels


def _ort_cpu_has(op: str, domain: str, opset: int | None) -> bool:
    domain = "" if domain == DEFAULT_DOMAIN else domain
    ranges = _ort_cpu_kernels().get((domain, op))
    if not ranges:
        # onnxruntime runs ops that an onnx function defines by expanding them (e.g. Gelu before
        # its kernel existed); those have no kernel entry.
        return _has_function_body(op, domain, opset)
    return opset is None or any(lo <= opset <= hi for lo, hi in ranges)


def _has_function_body(op: str, domain: str, opset: int | None) -> bool:
    import onnx

    try:
        schema = onnx.defs.get_schema(op, opset or onnx.defs.onnx_opset_version(), domain)
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


# ---------------------------------------------------------------------------------------------
# What a rule looks at


_MISSING = object()


@dataclass(frozen=True)
class NodeView:
    """The parts of a node a rule reads, from a graphsurgeon Node or an onnx NodeProto."""

    op: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]

    @classmethod
    def of(cls, node) -> NodeView:
        if isinstance(node, NodeView):
            return node
        if hasattr(node, "op_type"):  # onnx.NodeProto
            import onnx

            attrs = {}
            for attr in node.attribute:
                value = onnx.helper.get_attribute_value(attr)
                attrs[attr.name] = _plain(value)
            return cls(node.op_type, node.domain or "", node.name, tuple(node.input), tuple(node.output), attrs)
        attrs = {k: _plain(v) for k, v in node.attrs.items()}
        return cls(node.op, node.domain or "", node.name or "", tuple(t.name if t is not None else "" for t in node.inputs),
                   tuple(t.name for t in node.outputs), attrs)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # a numpy scalar
        return value.item()
    return value


@functools.cache
def attribute_default(op: str, domain: str, opset: int | None, name: str):
    """The schema default of an attribute (e.g. Resize `mode` = "nearest"), or _MISSING."""
    import onnx

    try:
        schema = onnx.defs.get_schema(op, opset or onnx.defs.onnx_opset_version(),
                                      "" if domain == DEFAULT_DOMAIN else domain)
    except onnx.defs.SchemaError:
        return _MISSING
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name and attr.default_value.type == 0:
        return _MISSING
    return _plain(onnx.helper.get_attribute_value(attr.default_value))


@dataclass
class ModelContext:
    """Shapes, dtypes, constants and opsets of one model's main graph, for `Profile.unsupported`.

    `shapes[name]` is a tuple of dims (int, or None when unknown / symbolic), or absent when
    not even the rank is known. Build it with `ModelContext.of(model)` (an ir.Model, a gs.Graph
    or an onnx.ModelProto with its shapes inferred).
    """

    opsets: dict[str, int]
    shapes: dict[str, tuple[int | None, ...]]
    dtypes: dict[str, str]
    constants: set[str]

    @classmethod
    def of(cls, model) -> ModelContext:
        from edgegraph import ir

        if isinstance(model, ir.Model):
            return cls._of_graph(model.graph)
        if hasattr(model, "graph") and hasattr(model, "opset_import"):  # onnx.ModelProto
            return cls._of_proto(model)
        return cls._of_graph(model)

    @classmethod
    def _of_graph(cls, graph) -> ModelContext:
        import numpy as np
        import onnx_graphsurgeon as gs

        from edgegraph import ir

        opsets = {"": int(graph.opset)}
        for imported in graph.import_domains or []:
            domain = "" if imported.domain in ("", DEFAULT_DOMAIN) else imported.domain
            opsets[domain] = int(imported.version)
        shapes, dtypes, constants = {}, {}, set()
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant):
                constants.add(name)
                values = tensor.values
                shapes[name] = tuple(int(d) for d in values.shape)
                dtypes[name] = _dtype_name(values.dtype)
                continue
            producer = ir.producer(tensor)
            if producer is not None and producer.op == "Constant":
                constants.add(name)
            if tensor.shape is not None:
                shapes[name] = tuple(int(d) if isinstance(d, int | np.integer) and d >= 0 else None for d in tensor.shape)
            if tensor.dtype is not None:
                dtypes[name] = _dtype_name(tensor.dtype)
        # A weight stored encoded and decoded in the graph (edgegraph's int8 Q/DQ weights,
        # Cast(int8) * scale) is a constant to a rule wanting constant weights: converters and
        # runtimes take it as one (QDQ node units; onnx2tf after lowering folds it).
        from edgegraph.analysis import encoding

        constants.update(t.name for t, _ in encoding.decoded_weights(graph))
        # So is the DequantizeLinear of any other constant (an int32 bias, which `encoding` does
        # not count as a low-bit weight): a QDQ node unit takes it as the kernel's constant bias.
        constants.update(n.outputs[0].name for n in graph.nodes if n.op == "DequantizeLinear"
                         and all(t.name in constants for t in n.inputs if t.name))
        return cls(opsets, shapes, dtypes, constants)

    @classmethod
    def _of_proto(cls, proto) -> ModelContext:
        opsets = {(i.domain or ""): int(i.version) for i in proto.opset_import}
        opsets[""] = opsets.get("ai.onnx", opsets.get("", 0))
        shapes, dtypes, constants = {}, {}, set()
        graph = proto.graph
        for init in graph.initializer:
            constants.add(init.name)
            shapes[init.name] = tuple(int(d) for d in init.dims)
            dtypes[init.name] = _dtype_name(init.data_type)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", DEFAULT_DOMAIN):
                constants.update(node.output)
        for info in (*graph.input, *graph.value_info, *graph.output):
            if info.name in shapes or not info.type.HasField("tensor_type"):
                continue
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                          for d in tensor_type.shape.dim)
            if tensor_type.elem_type:
                dtypes[info.name] = _dtype_name(tensor_type.elem_type)
        return cls(opsets, shapes, dtypes, constants)

    def opset(self, domain: str = "") -> int | None:
        return self.opsets.get("" if domain == DEFAULT_DOMAIN else domain)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dtype(self, name: str) -> str | None:
        return self.dtypes.get(name)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def is_static(self, name: str) -> bool:
        """A fixed shape: a constant, or every dim known and positive (an unknown shape is dynamic)."""
        if name in self.constants:
            return True
        shape = self.shapes.get(name)
        return shape is not None and all(d is not None and d > 0 for d in shape)

    def shape_text(self, name: str) -> str:
        shape = self.shapes.get(name)
        return "(unknown)" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype_name(dtype) -> str:
    import numpy as np

    from edgegraph import ir

    numpy = ir.numpy_dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if numpy is None:
        return str(dtype)
    return "bool" if numpy == np.bool_ else str(np.dtype(numpy))


__all__ = ["Profile", "Rule", "QuantScheme", "ModelContext", "NodeView", "load", "names", "op_key",
           "Target", "load_target", "available_targets", "PROFILE_DIR"]
