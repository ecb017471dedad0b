"""`edgegraph check`: which nodes a target cannot run, why, what would fix them, and the
partitions the graph would split into.

Partitions are counted as onnxruntime's partitioner makes them
(onnxruntime/core/providers/partitioning_utils.cc: CreateSupportedPartitionNodeGroups, which
onnxruntime's usability checker replicates in python): nodes are visited in topological order,
supported ones join the current group, an unsupported node that reads the group waits for the
next one; each group is one partition (one compiled subgraph, with a copy to and from the CPU
around it).

An onnxruntime execution provider sees the graph after onnxruntime's basic optimisations
(constant folding, redundant-node removal, a few fusions: e.g. YOLOX's Slice stem becomes a
SpaceToDepth), so for profiles with an `ort_provider` the check runs on that graph, like
onnxruntime's checker does; `optimize=False` checks the graph as given.

The fix proposed for each unsupported node: `fix-shape` (a dynamic shape: `--fix-shape`), `opset`
(opset conversion), `interface` (a dtype of the model's inputs/outputs the target cannot take:
`legalize(interface=target)`), or the name of a `legalize` rewrite, which are named by the op they replace
(`HardSigmoid`): the names come from `edgegraph.passes.legalize.REWRITES` (any collection of op
names) when that module exists.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path

from edgegraph import ir, modelio
from edgegraph.errors import EdgegraphError, one_line
from edgegraph.targets import ModelContext, NodeView, Profile, load, names, op_key

logger = logging.getLogger("edgegraph")


@dataclass
class Unsupported:
    name: str  # node name (or its first output's name when the node has none)
    op: str  # "Op" or "domain:Op"
    kind: str  # op, opset, dynamic, rank, dtype, attr, constant
    reason: str
    fix: str  # a rewrite name, "fix-shape", "opset", or "" when none is known
    macs: int | None


@dataclass
class CheckResult:
    target: str
    graph: str  # which graph was checked ("as given", "after onnxruntime basic optimisations")
    nodes: int
    supported: int
    partitions: int
    partition_sizes: list[int]
    macs: int | None  # MACs of all nodes (None when some are unknown)
    macs_supported: int  # MACs of the supported nodes (of those with known MACs)
    macs_known: int
    unsupported: list[Unsupported]
    caveats: list[str] = field(default_factory=list)  # documented, unchecked limits of ops in the model

    @property
    def fully_supported(self) -> bool:
        return self.nodes > 0 and self.supported == self.nodes and self.partitions == 1

    @property
    def node_share(self) -> float:
        return self.supported / self.nodes if self.nodes else 1.0

    @property
    def mac_share(self) -> float | None:
        return self.macs_supported / self.macs_known if self.macs_known else None

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(fully_supported=self.fully_supported, node_share=self.node_share, mac_share=self.mac_share)
        return data


@functools.cache
def rewrite_names() -> frozenset[str]:
    """Op names `legalize` has a rewrite for (empty until that pass exists)."""
    try:
        module = import_module("edgegraph.passes.legalize")
    except ImportError:
        return frozenset()
    return frozenset(getattr(module, "REWRITES", ()) or ())


def _at_interface(kind: str, view: NodeView, graph) -> bool:
    """Whether the dtype the target refuses is the model's interface's: a node refused for the
    dtype of a graph input it reads, or a Cast refused for the dtype of the graph output it
    writes (SqueezeNet's float16 Casts on NNAPI). `legalize(interface=target)` changes those."""
    if kind == "dtype":
        return bool(view.inputs) and view.inputs[0] in {t.name for t in graph.inputs}
    return kind == "attr" and view.op == "Cast" and bool(set(view.outputs) & {t.name for t in graph.outputs})


def _fix(kind: str, op: str, rewrites: Collection[str]) -> str:
    if kind == "dynamic":
        return "fix-shape"
    if kind == "opset":
        return "opset"
    return op if op in rewrites else ""


# ---------------------------------------------------------------------------------------------
# The graph an execution provider sees


def ort_basic_optimized(model: ir.Model) -> ir.Model | None:
    """`model` after onnxruntime's basic graph optimisations (what its execution providers are
    given), or None when onnxruntime cannot load it."""
    import onnxruntime as ort

    folder = Path(tempfile.mkdtemp(prefix="edgegraph-check-"))
    try:
        source = modelio.save(model, folder / "in.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folder / "basic.onnx")
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (and RuntimeError)
            logger.info("onnxruntime cannot load the model, checking it as given: %s", one_line(exc))
            return None
        import onnx

        # onnxruntime's own output (e.g. IR 3 with initializers that are not inputs) need not pass
        # the onnx checker that `modelio.load` applies to user files; it is only looked at.
        return ir.from_proto(_without_inserted_casts(onnx.load(folder / "basic.onnx")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Casts onnxruntime's CPU provider adds around ops it has no float16 kernel for (its
# InsertCastTransformer, which runs when nodes are assigned to the CPU provider, whatever the
# optimisation level). They are in the saved graph only because the session was a CPU one: an
# NNAPI or CoreML session partitions the float16 graph before any such cast exists.
INSERTED_CAST = "InsertedPrecisionFreeCast_"


def _without_inserted_casts(proto):
    """`proto` (onnxruntime's optimised graph) without the casts onnxruntime's CPU provider
    inserted; intermediate types are dropped, to be inferred again."""
    graph = proto.graph
    casts = [n for n in graph.node if n.op_type == "Cast" and n.name.startswith(INSERTED_CAST)]
    if not casts:
        return proto
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for cast in casts:
        source, result = cast.input[0], cast.output[0]
        if result in outputs:  # keep the graph output's name: its producer writes it directly
            rename[source] = result
        else:
            rename[result] = source
    def final(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name
    keep = [n for n in graph.node if not (n.op_type == "Cast" and n.name.startswith(INSERTED_CAST))]
    for node in keep:
        node.input[:] = [final(n) if n else n for n in node.input]
        node.output[:] = [final(n) for n in node.output]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.value_info[:]
    return proto


# ---------------------------------------------------------------------------------------------
# Partitions


def partitions(nodes: Sequence, supported: Sequence[bool]) -> list[list[int]]:
    """Groups of supported node indices, as onnxruntime's partitioner forms them (see the
    module docstring). `nodes` are gs Nodes in topological order."""
    producer_of = {t.name: i for i, n in enumerate(nodes) for t in n.outputs}
    producers: list[set[int]] = []
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        found = {producer_of[name] for name in _reads(node) if name in producer_of} - {i}
        producers.append(found)
        for p in sorted(found):
            consumers[p].append(i)
    in_degree = [len(p) for p in producers]
    ready = deque(i for i, d in enumerate(in_degree) if d == 0)
    later: deque[int] = deque()
    groups: list[list[int]] = []
    group: list[int] = []
    border: set[int] = set()
    while ready or later:
        if not ready:
            if group:
                groups.append(group)
            group, border = [], set()
            ready, later = later, deque()
            continue
        i = ready.popleft()
        if not supported[i]:
            if i in border:  # it reads the current group: handled after the group closes
                later.append(i)
                continue
        else:
            group.append(i)
            border.discard(i)
            border.update(consumers[i])
        for c in consumers[i]:
            in_degree[c] -= 1
            if in_degree[c] == 0:
                ready.append(c)
    if group:
        groups.append(group)
    return groups


def _reads(node) -> list[str]:
    """Names a node reads, its subgraphs' outer-scope reads included."""
    names_read = [t.name for t in node.inputs if t is not None and t.name]
    for sub in ir.subgraphs(node):
        inner = {t.name for n in ir.iter_nodes(sub) for t in n.outputs} | {t.name for t in sub.inputs}
        names_read += [t.name for n in ir.iter_nodes(sub) for t in n.inputs
                       if t is not None and t.name and t.name not in inner]
    return names_read


# ---------------------------------------------------------------------------------------------
# The check


def check(model: ir.Model, target: str | Profile, *, optimize: bool | None = None, rules: bool = True,
          macs: bool | tuple = True, rewrites: Collection[str] | None = None) -> CheckResult:
    """Which nodes of `model`'s main graph `target` runs, the partitions, and why the rest not.

    `optimize` (default: when the target is an onnxruntime execution provider) checks the graph
    onnxruntime's basic optimisations make. `rules=False` checks only what onnxruntime's
    usability checker does (the op type, dynamic shapes where the target needs static ones, the
    target's maximum rank), for comparing with it. `macs=False` skips counting MACs (or is
    `node_macs(model)`, already counted).
    """
    profile = target if isinstance(target, Profile) else load(target)
    graph_note = "as given"
    if optimize is None:
        optimize = profile.ort_provider is not None
    if optimize:
        optimized = ort_basic_optimized(model)
        if optimized is not None:
            model, graph_note = optimized, "after onnxruntime basic optimisations"
        else:
            graph_note = "as given (onnxruntime cannot load it)"
    ctx = ModelContext.of(model)
    nodes = list(model.graph.nodes)
    rewrites = rewrite_names() if rewrites is None else rewrites
    if isinstance(macs, tuple):
        mac_of, total_macs = macs
    else:
        mac_of, total_macs = node_macs(model) if macs and nodes else ({}, 0)
    verdicts, found, seen_ops = [], [], set()
    for node in nodes:
        view = NodeView.of(node)
        key = op_key(view.op, view.domain)
        why = profile.why(node, ctx) if rules else _checker_why(profile, view, ctx)
        verdicts.append(why is None)
        label = node.name or (node.outputs[0].name if node.outputs else "")
        if why is None:
            seen_ops.add(key)
            continue
        kind, reason = why
        fix = _fix(kind, view.op, rewrites)
        if not fix and _at_interface(kind, view, model.graph):
            fix = "interface"
        found.append(Unsupported(label, key, kind, reason, fix, mac_of.get(label)))
    groups = partitions(nodes, verdicts)
    known = sum(m for m in mac_of.values() if m is not None)
    unsupported_macs = sum(u.macs for u in found if u.macs is not None)
    caveats = [f"{op}: {profile.rules[op].note}" for op in sorted(seen_ops)
               if op in profile.rules and profile.rules[op].note]
    return CheckResult(
        target=profile.name, graph=graph_note, nodes=len(nodes), supported=sum(verdicts),
        partitions=len(groups), partition_sizes=[len(g) for g in groups],
        macs=total_macs if macs else None, macs_supported=known - unsupported_macs, macs_known=known,
        unsupported=found, caveats=caveats,
    )


def node_macs(model: ir.Model) -> tuple[dict[str, int | None], int | None]:
    """{node label: MACs or None} and the total (None when some are unknown), as `info` counts
    them (a model whose shapes inference cannot resolve is run once in onnxruntime)."""
    from edgegraph import stats

    try:
        facts = stats.model_stats(model)
    except EdgegraphError as exc:  # e.g. shapes that cannot be made static to count with
        logger.info("MACs not counted: %s", exc)
        return {}, None
    return {c.name: c.macs for c in facts.node_macs}, facts.macs


def _checker_why(profile: Profile, view: NodeView, ctx: ModelContext) -> tuple[str, str] | None:
    """What onnxruntime's usability checker looks at: op type, dynamic inputs, max rank."""
    if not profile.supports_op(view.op, view.domain, ctx.opset(view.domain)):
        return "op", f"{op_key(view.op, view.domain)} is not supported by {profile.name}"
    present = [name for name in view.inputs if name]
    if profile.static_shapes and any(not ctx.is_static(name) for name in present):
        return "dynamic", "a dynamic input shape"
    limit = profile.max_rank
    if limit is not None and (any((ctx.rank(n) or 0) > limit for n in present)
                              or view.op == "Transpose" and len(view.attrs.get("perm", ())) > limit):
        return "rank", f"rank above {limit}"
    return None


def check_all(model: ir.Model, *, optimize: bool | None = None, rules: bool = True, macs: bool = True,
              profiles: Sequence[str] | None = None) -> list[CheckResult]:
    """`check` for every profile (or those named); the onnxruntime-optimised graph and each
    graph's MACs are made once and shared."""
    graphs: dict[bool, tuple[ir.Model, str, tuple]] = {}

    def graph(optimized: bool) -> tuple[ir.Model, str, tuple]:
        if optimized not in graphs:
            made = ort_basic_optimized(model) if optimized else None
            chosen, note = (made, "after onnxruntime basic optimisations") if made is not None else \
                (model, "as given (onnxruntime cannot load it)" if optimized else "as given")
            graphs[optimized] = chosen, note, node_macs(chosen) if macs and chosen.graph.nodes else ({}, 0)
        return graphs[optimized]

    results = []
    for name in names() if profiles is None else profiles:
        profile = load(name)
        chosen, note, counted = graph(profile.ort_provider is not None if optimize is None else optimize)
        result = check(chosen, profile, optimize=False, rules=rules, macs=counted if macs else False)
        result.graph = note
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# Text


def format_check(path: str, results: Sequence[CheckResult], *, top: int = 40) -> str:
    from edgegraph.stats import human
    from edgegraph.tables import columns

    lines = [f"model {path}"]
    rows = [["target", "nodes supported", "MACs supported", "partitions", "unsupported", "graph"]]
    for r in results:
        share = r.mac_share
        rows.append([r.target, f"{r.supported}/{r.nodes} ({r.node_share * 100:.1f}%)",
                     "-" if share is None else f"{share * 100:.1f}% of {human(r.macs_known)}",
                     str(r.partitions), str(len(r.unsupported)), r.graph])
    lines += ["", *columns(rows, "<>>><<")]
    for r in results:
        if not r.unsupported:
            continue
        lines += ["", f"{r.target}: {len(r.unsupported)} unsupported node(s)"
                      + (f" (first {top})" if len(r.unsupported) > top else "")]
        table = [["node", "op", "reason", "fix"]]
        table += [[u.name, u.op, u.reason, u.fix or "-"] for u in r.unsupported[:top]]
        lines += ["  " + line for line in columns(table, "<<<<")]
        fixes = sorted({u.fix for u in r.unsupported if u.fix})
        if fixes:
            lines.append(f"  fixes: {', '.join(fixes)}")
    for r in results:
        if r.caveats:
            lines += ["", f"{r.target}: documented limits not checked for ops in this model"]
            lines += [f"  {c}" for c in r.caveats]
    return "\n".join(lines)
