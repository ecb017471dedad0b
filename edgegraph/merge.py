"""`edgegraph merge`: several task models that share a backbone become one graph computing it once.

The mechanism is a `join` plus the cleanup passes that already exist, not a matcher of its own:

1. every model is brought to one opset (`onnx.version_converter`, checked in onnxruntime);
2. the graphs are joined side by side in one graph: each task's tensors and nodes are renamed
   `<task>/<name>` (so its outputs are `<task>/<output>`), and inputs that agree in name, shape
   and dtype (or that `input_map` ties) become one input;
3. with a `tolerance`, weights of later tasks within it of an earlier task's (same dtype and
   shape) take that task's values (or both take the average);
4. `dedup-initializers` stores equal weights once and `cse` (structural hashes: independent of
   node and tensor names and initializer order) computes every node that the tasks compute
   identically once, from the shared inputs onward, to a fixed point; `remove-identity` and
   `eliminate-dead` tidy up. A graph output CSE makes redundant stays, as an Identity.

What is left of each task is its head. Each task's outputs are then checked against its own model
on the same inputs (bitwise in exact mode; with a tolerance, the deviation is measured and a task
below `min_sqnr` refuses the merge).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from edgegraph import ir, modelio, runtime, stats, verify
from edgegraph.context import STAGES, CalibrationData
from edgegraph.errors import NAME_LIMIT, EdgegraphError, PassFailure, one_line, shown

logger = logging.getLogger(__name__)

# The cleanup sub-passes that collapse the joined graph; every other one would change what a task
# computes in its last bits (folding BatchNorm, fusing biases), which the exact mode promises not to.
COLLAPSE = ("remove-identity", "dedup-initializers", "cse", "eliminate-dead")
DEFAULT_MIN_SQNR_DB = 40.0  # tolerance mode: the worst task output may fall no lower (vs its own model)
CHECK_SAMPLES = 4


class MergeError(EdgegraphError):
    """Models that cannot be merged as asked (names, inputs, opsets, a task degraded too far)."""


@dataclass
class Task:
    name: str
    source: str  # what the user gave (a path, or "model 2")
    proto: onnx.ModelProto  # at the common opset
    inputs: dict[str, str] = field(default_factory=dict)  # its input name -> the merged model's
    outputs: dict[str, str] = field(default_factory=dict)  # its output name -> the merged model's


@dataclass
class MergeResult:
    model: ir.Model
    report: dict
    tasks: list[Task]
    data: CalibrationData | None = None  # what `calib` gave, for the merged model's inputs


def task_name(source, index: int) -> str:
    return Path(source).stem if isinstance(source, str | Path) else f"model{index + 1}"


def merge(models: Sequence, *, names: Sequence[str] | None = None,
          input_map: Mapping[tuple[str, str], tuple[str, str]] | None = None, tolerance: float = 0.0,
          average: bool = False, calib=None, min_sqnr: float = DEFAULT_MIN_SQNR_DB, seed: int = 0,
          threads: int = 1, check_samples: int = CHECK_SAMPLES) -> MergeResult:
    """Merge `models` (paths, bytes, ModelProtos or ir.Models) into one ir.Model and a report.

    `names`: the task names (default: the file stems), used as output prefixes. `input_map`:
    {(task, input): (task, input)} feeds the first from the second. `tolerance`: weights within
    it, relative to their largest magnitude, count as equal (the first model's values are kept,
    or with `average` both take the mean). `calib`: data for the merged model's inputs (an .npz or
    image folder, see `as_calibration`), or {task: data for that task's own inputs}, else seeded
    random inputs, to check the tasks on (`check_samples` of them; 0 skips the check, and the
    report says so).
    """
    from edgegraph.api import as_calibration

    if len(models) < 2:
        raise MergeError("merge needs at least two models")
    if not 0.0 <= tolerance < 1.0 or not np.isfinite(tolerance):
        raise MergeError(f"tolerance must be in [0, 1), got {tolerance}")
    start = time.perf_counter()
    loaded = [modelio.load(m, infer=False) if not isinstance(m, ir.Model) else m for m in models]
    names = list(names) if names else [task_name(m, i) for i, m in enumerate(models)]
    _check_names(names, models)
    sources = [str(m) if isinstance(m, str | Path) else f"model {i + 1}" for i, m in enumerate(models)]
    STAGES.info("loaded %d models in %.2fs", len(loaded), time.perf_counter() - start)
    protos, conversions = _common_opset([m.to_proto() for m in loaded], sources, seed=seed, threads=threads)
    for c in conversions:
        STAGES.info("converted %s from opset %d to %d (checked)", c["model"], c["from"], c["to"])
    tasks = [Task(n, s, p) for n, s, p in zip(names, sources, protos)]
    merged_inputs = _unify_inputs(tasks, dict(input_map or {}))
    joined = _join(tasks, merged_inputs)
    # (Built here from models already validated: no second validation. CSE and dedup work on the
    # structure; cleanup infers shapes between its rounds for the rules that want them.)
    model = ir.from_proto(joined, infer=False)
    model.value_info = False  # (intermediate types any runtime infers again: not written, ~2% of a file)
    before_nodes = len(model.graph.nodes)
    near = _apply_tolerance(model, tasks, tolerance, average) if tolerance > 0 else []
    collapse(model)
    STAGES.info("merged %d models in %.2fs", len(tasks), time.perf_counter() - start)

    data = (per_task_calibration(calib, model, tasks) if isinstance(calib, Mapping) else
            as_calibration(calib, model) if calib is not None else None)
    checking = time.perf_counter()
    deviation = (_check_tasks(model, tasks, data, exact=tolerance == 0, min_sqnr=min_sqnr, seed=seed,
                              threads=threads, samples=check_samples) if check_samples else
                 {t.name: {"bitwise": None, "note": "not checked (check_samples=0)"} for t in tasks})
    if check_samples:
        STAGES.info("checked every task's outputs in %.2fs", time.perf_counter() - checking)
    sharing, shared_weights = _sharing(model, tasks)
    report = {
        "tasks": sharing,
        "weights_shared": shared_weights,
        "inputs": merged_inputs,
        "opset": int(model.graph.opset),
        "conversions": conversions,
        "nodes_joined": before_nodes,
        "nodes_merged": len(model.graph.nodes),
        "tolerance": tolerance,
        "near_equal_weights": near,
        "deviation": deviation,
        "seconds": time.perf_counter() - start,
    }
    shared = sum(t["nodes_shared"] for t in report["tasks"].values())
    report["shared_nothing"] = shared == 0
    if shared == 0:
        report["note"] = _why_nothing_shared(tasks, merged_inputs, report)
    return MergeResult(model, report, tasks, data)


def collapse(model: ir.Model) -> None:
    """Compute once what the joined tasks compute identically (cleanup's collapsing sub-passes)."""
    from edgegraph.passes.cleanup import Cleanup, SUB_PASSES

    Cleanup(skip=[p.name for p in SUB_PASSES if p.name not in COLLAPSE]).run(model, None)


# ---------------------------------------------------------------------------------------------
# names, opsets, inputs


def parse_input_map(pairs: Mapping[str, str] | Sequence[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """{"b:images": "a:data"} or ["b:images=a:data"] -> {("b", "images"): ("a", "data")}."""
    items = pairs.items() if isinstance(pairs, Mapping) else [p.partition("=")[::2] for p in pairs]
    parsed = {}
    for left, right in items:
        sides = [str(left).partition(":"), str(right).partition(":")]
        if not all(task and sep and name for task, sep, name in sides):
            raise MergeError(f"input map '{shown(left, NAME_LIMIT)}={shown(right, NAME_LIMIT)}': expected "
                             "TASK:INPUT=TASK:INPUT like b:images=a:data")
        parsed[(sides[0][0], sides[0][2])] = (sides[1][0], sides[1][2])
    return parsed


def _check_names(names: Sequence[str], models: Sequence) -> None:
    if len(names) != len(models):
        raise MergeError(f"{len(names)} task names for {len(models)} models")
    for name in names:
        if not name or "/" in name or name != name.strip():
            raise MergeError(f"task name '{shown(name, NAME_LIMIT)}' must be non-empty, without '/' or "
                             "surrounding spaces")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MergeError(f"two models have the task name '{shown(twice[0], NAME_LIMIT)}': give each its own "
                         "with --name FILE=NAME")


def _main_opset(proto: onnx.ModelProto) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _common_opset(protos: list[onnx.ModelProto], sources: list[str], *, seed: int,
                  threads: int) -> tuple[list[onnx.ModelProto], list[dict]]:
    """The models at the highest default-domain opset among them; each conversion is checked in
    onnxruntime against the original on seeded random inputs. Other domains must agree."""
    domains: dict[str, tuple[int, str]] = {}
    for proto, source in zip(protos, sources):
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                continue
            seen = domains.setdefault(o.domain, (int(o.version), source))
            if seen[0] != int(o.version):
                raise MergeError(f"{source} uses domain {o.domain} version {o.version}, {seen[1]} version "
                                 f"{seen[0]}: only the default domain is converted")
    target = max(_main_opset(p) for p in protos)
    converted, conversions = [], []
    for proto, source in zip(protos, sources):
        version = _main_opset(proto)
        if version == target:
            converted.append(proto)
            continue
        try:
            # (An edgegraph export lists no initializer among the inputs, which IR 3 requires: the
            # converter reads it as IR 4, which changed nothing else.)
            proto.ir_version = max(proto.ir_version, 4)
            new = version_converter.convert_version(proto, target)
            new.ir_version = max(new.ir_version, proto.ir_version)
            onnx.checker.check_model(new)
            _check_same_outputs(proto, new, seed=seed, threads=threads)
        except MergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter and the checker raise many kinds
            raise MergeError(f"cannot merge {source} (opset {version}) with opset-{target} models: converting it "
                             f"failed ({one_line(exc)[:300]}); convert it yourself first") from None
        converted.append(new)
        conversions.append({"model": source, "from": version, "to": target})
    return converted, conversions


def _check_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, *, seed: int, threads: int) -> None:
    from edgegraph.context import VerifyConfig
    from edgegraph.pipeline import random_inputs, reference_outputs

    data = random_inputs(before, CHECK_SAMPLES, seed=seed)
    metrics = verify.compare_all(reference_outputs(before, data, threads=threads),
                                 reference_outputs(after, data, threads=threads))
    cfg = VerifyConfig()
    violation = verify.exactness_violation(metrics, cfg.rtol, cfg.atol)
    if violation:
        name, metric, value, threshold = violation
        raise MergeError(f"the opset conversion changed output '{shown(name, NAME_LIMIT)}' ({metric} {value:.3g} > "
                         f"{threshold:.3g})")


def _spec_key(spec: runtime.InputSpec) -> tuple:
    shape = None if spec.shape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in spec.shape)
    return spec.dtype.str, shape


def _unify_inputs(tasks: list[Task], input_map: dict[tuple[str, str], tuple[str, str]]) -> dict[str, dict]:
    """Give every task input its merged name (in `task.inputs`); returns {merged name: {"from":
    [task/input, ...], "dtype", "shape"}}. Inputs with the same name, dtype and shape are one;
    `input_map` ties others (their dtype and shape must agree)."""
    specs = {t.name: {s.name: s for s in runtime.input_specs(t.proto)} for t in tasks}
    by_name = {t.name: t for t in tasks}
    internal: dict[tuple[str, str], runtime.InputSpec] = {}  # sources of input_map that are tensors inside a task
    for (task, name), (other, other_name) in input_map.items():
        for t in (task, other):
            if t not in specs:
                raise MergeError(f"--input-map names task '{shown(t, NAME_LIMIT)}', not one of {', '.join(specs)}")
        if name not in specs[task]:
            raise MergeError(f"--input-map: task {task} has no input '{shown(name, NAME_LIMIT)}' "
                             f"(inputs: {', '.join(specs[task])})")
        b = specs[other].get(other_name) or _tensor_spec(by_name[other], other_name)
        if b is None:
            raise MergeError(f"--input-map: task {other} has no input or tensor '{shown(other_name, NAME_LIMIT)}'")
        if other_name not in specs[other]:
            internal[(other, other_name)] = b
        a = specs[task][name]
        if not _compatible(a, b):
            raise MergeError(f"--input-map {task}:{name}={other}:{other_name}: {_describe(a)} cannot be fed "
                             f"{_describe(b)}")
    order = {t.name: i for i, t in enumerate(tasks)}
    merged: dict[str, dict] = {}
    owner: dict[tuple[str, str], str] = {}  # (task, input) -> merged name
    for task in tasks:
        for spec in specs[task.name].values():
            target = input_map.get((task.name, spec.name))
            if target is not None and order[target[0]] >= order[task.name]:
                raise MergeError(f"--input-map {task.name}:{spec.name}={target[0]}:{target[1]}: map a later "
                                 "model's input to an earlier one's")
            if target in internal:
                # Fed by what an earlier task computes (its preprocessing): not an input any more.
                task.inputs[spec.name] = f"{target[0]}/{target[1]}"
                continue
            if target is not None:
                name = owner[target]
            else:
                name = next((m for m, info in merged.items() if m == spec.name and info["key"] == _spec_key(spec)),
                            None)
            if name is None:
                name = spec.name if spec.name not in merged else f"{task.name}/{spec.name}"
                merged[name] = {"from": [], "dtype": str(spec.dtype),
                                "shape": None if spec.shape is None else list(spec.shape), "key": _spec_key(spec)}
            merged[name]["from"].append(f"{task.name}/{spec.name}")
            owner[(task.name, spec.name)] = name
            task.inputs[spec.name] = name
    for info in merged.values():
        del info["key"]
    return merged


def _tensor_spec(task: Task, name: str) -> runtime.InputSpec | None:
    """dtype and shape of a tensor a node of `task` computes (shape inference), or None."""
    graph = onnx.shape_inference.infer_shapes(task.proto).graph
    if not any(name in n.output for n in graph.node):
        return None
    value = next((v for v in (*graph.value_info, *graph.output) if v.name == name), None)
    if value is None or not value.type.tensor_type.elem_type:
        return runtime.InputSpec(name, np.dtype(np.float32), None)
    tensor = value.type.tensor_type
    shape = (tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
             if tensor.HasField("shape") else None)
    return runtime.InputSpec(name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape)


def _compatible(a: runtime.InputSpec, b: runtime.InputSpec) -> bool:
    """Whether `b`'s values can feed input `a`: one dtype, the same rank, fixed sizes agreeing."""
    (dtype_a, shape_a), (dtype_b, shape_b) = _spec_key(a), _spec_key(b)
    if dtype_a != dtype_b:
        return False
    if shape_a is None or shape_b is None:
        return True
    return len(shape_a) == len(shape_b) and all(x is None or y is None or x == y for x, y in zip(shape_a, shape_b))


def _describe(spec: runtime.InputSpec) -> str:
    dims = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in spec.shape or ())
    return f"{spec.dtype} [{dims}]"


# ---------------------------------------------------------------------------------------------
# join


def _join(tasks: list[Task], merged_inputs: Mapping[str, dict]) -> onnx.ModelProto:
    """One ModelProto holding every task side by side (tensors `<task>/<name>`, inputs merged)."""
    graph = onnx.GraphProto(name="merged")
    added_inputs: set[str] = set()
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    opsets: dict[str, int] = {}
    for task in tasks:
        g = onnx.GraphProto()
        g.CopyFrom(task.proto.graph)
        initializers = {t.name for t in g.initializer}
        rename = {name: merged for name, merged in task.inputs.items()}
        _rename_graph(g, lambda n, r=rename, p=task.name: r.get(n, f"{p}/{n}") if n else n)
        for node in g.node:
            node.name = f"{task.name}/{node.name}" if node.name else ""
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.sparse_initializer.extend(g.sparse_initializer)
        for value in g.input:
            if value.name in added_inputs or (value.name not in merged_inputs and value.name in task.inputs.values()):
                continue  # (one already there, or an input fed by another task's tensor)
            if any(value.name == f"{task.name}/{i}" for i in initializers):  # an overridable default
                graph.input.append(value)
                continue
            added_inputs.add(value.name)
            graph.input.append(value)
        for value, original in zip(g.output, task.proto.graph.output):
            task.outputs[original.name] = value.name
        graph.output.extend(g.output)
        for function in task.proto.functions:
            key = (function.domain, function.name)
            if key in functions and functions[key].SerializeToString() != function.SerializeToString():
                raise MergeError(f"{task.source} defines function {function.domain}.{function.name} unlike an "
                                 "earlier model's")
            functions.setdefault(key, function)
        for o in task.proto.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), int(o.version))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                                   functions=list(functions.values()), producer_name="edgegraph merge")
    model.ir_version = max(t.proto.ir_version for t in tasks)
    return model


def _rename_graph(graph: onnx.GraphProto, rename) -> None:
    """Apply `rename` to every tensor name of `graph` and of the graphs nested in it (the same
    function everywhere, so a subgraph's references to outer names follow them)."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = rename(value.name)
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = rename(sparse.values.name)
        sparse.indices.name = rename(sparse.indices.name)
    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_graph(attr.g, rename)
            for sub in attr.graphs:
                _rename_graph(sub, rename)


# ---------------------------------------------------------------------------------------------
# near-equal weights


def _apply_tolerance(model: ir.Model, tasks: list[Task], tolerance: float, average: bool) -> list[dict]:
    """Give each weight of a later task that is within `tolerance` of an earlier task's (same
    dtype and shape, the closest one) that weight's values, or both their mean with `average`.
    Returns what changed: [{task, weight, like, relative_difference, layers}]."""
    owner = {}
    for node in model.graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name.partition("/")[0] in {x.name for x in tasks}:
                owner.setdefault(t.name, t)
    by_task: dict[str, list[gs.Constant]] = {t.name: [] for t in tasks}
    for name, tensor in owner.items():
        by_task[name.partition("/")[0]].append(tensor)
    changed = []
    pool: dict[tuple, list[tuple[gs.Constant, np.ndarray]]] = {}
    for task in tasks:
        for tensor in sorted(by_task[task.name], key=lambda c: c.name):
            values = ir.constant_value(tensor)
            if values is None or values.dtype.kind != "f" or values.size == 0:
                continue
            key = (values.dtype.str, values.shape)
            best, best_diff = None, None
            scale = float(np.max(np.abs(values)))
            for other, other_values in pool.get(key, []):
                if other.name.partition("/")[0] == task.name:
                    continue
                diff = float(np.max(np.abs(values - other_values))) / max(scale, float(np.max(np.abs(other_values))),
                                                                            np.finfo(np.float32).tiny)
                if diff <= tolerance and (best_diff is None or diff < best_diff):
                    best, best_diff = (other, other_values), diff
            if best is None or best_diff == 0.0:
                pool.setdefault(key, []).append((tensor, values))
                continue
            other, other_values = best
            if average:
                mean = ((other_values.astype(np.float64) + values) / 2).astype(values.dtype)
                other.values, tensor.values = mean, mean.copy()
            else:
                tensor.values = other_values.copy()
            changed.append({"task": task.name, "weight": tensor.name.partition("/")[2], "like": other.name,
                            "relative_difference": best_diff,
                            "layers": sorted({n.name for n in tensor.outputs} | ({n.name for n in other.outputs}
                                                                                 if average else set()))})
    return changed


# ---------------------------------------------------------------------------------------------
# checks and the report


def per_task_calibration(calib: Mapping[str, object], model: ir.Model, tasks: list[Task]) -> CalibrationData:
    """Samples of the merged model's inputs from each task's own data ({task: data}, read against
    that task's model): sample i holds sample i of every task's data (as many as the shortest
    has); an input two tasks share takes the first one's. Every merged input must be fed."""
    from edgegraph.api import as_calibration

    by_name = {t.name: t for t in tasks}
    unknown = [name for name in calib if name not in by_name]
    if unknown:
        raise MergeError(f"--calib for task '{shown(unknown[0], NAME_LIMIT)}': the tasks are {', '.join(by_name)}")
    sources = {name: as_calibration(data, modelio.load(by_name[name].proto, infer=False)) for name, data in calib.items()}
    fed = {by_name[name].inputs[i] for name in sources for i in by_name[name].inputs}
    missing = [s.name for s in runtime.input_specs(model) if s.name not in fed]
    if missing:
        raise MergeError(f"--calib: no data feeds merged input '{shown(missing[0], NAME_LIMIT)}' (give its task's data)")

    def fetch(index: int) -> dict[str, np.ndarray]:
        sample: dict[str, np.ndarray] = {}
        for name, data in sources.items():
            for own, value in data.sample(index).items():
                sample.setdefault(by_name[name].inputs[own], value)
        return sample

    return CalibrationData(min(len(d) for d in sources.values()), fetch,
                           source=", ".join(f"{n}={d.source}" for n, d in sources.items()),
                           batch_axes=runtime.batch_axes(runtime.input_specs(model)))


def _task_feeds(task: Task, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `task`'s own model is fed: its inputs' values in `feeds` (the merged model's inputs,
    and the tensors of other tasks that feed some of its inputs, see `_exposed`)."""
    return {name: feeds[merged] for name, merged in task.inputs.items()}


def _exposed(model: ir.Model, tasks: list[Task], merged_inputs) -> onnx.ModelProto:
    """The merged model, also returning the tensors that feed a task's input in place of an input
    (`--input-map b:x=a:normalized`), so that the task's own model can be fed the same values."""
    names = {m for t in tasks for m in t.inputs.values() if m not in merged_inputs}
    proto = model.to_proto()
    made = {o for n in proto.graph.node for o in n.output}
    lost = sorted(names - made)
    if lost:
        raise PassFailure(f"merge lost tensor {lost[0]}, which feeds a task; please report this")
    return runtime.with_outputs(proto, sorted(names))


def _check_tasks(model: ir.Model, tasks: list[Task], data: CalibrationData | None, *, exact: bool,
                 min_sqnr: float, seed: int, threads: int, samples: int) -> dict:
    """Each task's outputs of the merged model against its own model, on the same inputs (run
    unoptimized): bitwise in exact mode, else measured and held to `min_sqnr`."""
    from edgegraph.pipeline import random_inputs

    data = random_inputs(model, samples, seed=seed) if data is None else data.take(min(len(data), samples))
    specs = runtime.input_specs(model)
    batches = [runtime.adapt_feeds(specs, b) for b in data.batches(runtime.batch_size_for(specs, samples))]
    result = {}
    sessions = {}
    for task in tasks:  # the user's models first: one that does not run is theirs to fix
        try:
            sess = runtime.session(task.proto, threads=threads)
            sessions[task.name] = sess
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise MergeError(f"{task.source} does not run in onnxruntime ({one_line(exc)[:300]}); merge it with "
                             "--no-verify to skip checking the tasks") from None
    try:
        merged_sess = runtime.session(_exposed(model, tasks, {s.name for s in specs}), threads=threads)
        merged = [runtime.run(merged_sess, feeds) for feeds in batches]
    except Exception as exc:  # noqa: BLE001
        raise PassFailure(f"the merged model does not run in onnxruntime: {one_line(exc)[:300]}") from exc
    for task in tasks:
        sess = sessions[task.name]
        try:
            own = [runtime.run(sess, _task_feeds(task, feeds | out)) for feeds, out in zip(batches, merged)]
        except Exception as exc:  # noqa: BLE001
            raise MergeError(f"{task.source} does not run in onnxruntime on {data.source} ({one_line(exc)[:300]}); "
                             "merge it with --no-verify to skip checking the tasks") from None
        mine = [{name: out[task.outputs[name]] for name in ref} for ref, out in zip(own, merged)]
        bitwise = all(np.array_equal(r[n], m[n], equal_nan=True) for r, m in zip(own, mine) for n in r)
        metrics = verify.compare_all(own, mine)
        worst = verify.worst_sqnr_db(own, mine)
        result[task.name] = {"bitwise": bitwise, "worst_sqnr_db": worst,
                             "max_abs": max((m.max_abs for m in metrics.values()), default=0.0),
                             "samples": len(data), "data": data.source}
        if exact and not bitwise:
            raise PassFailure(f"merge changed the outputs of task {task.name} (worst SQNR {worst:.1f} dB); "
                              "please report this")
        if not exact and worst < min_sqnr:
            raise MergeError(f"task {task.name} would degrade too far: worst output SQNR {worst:.1f} dB < "
                             f"{min_sqnr:g} dB vs its own model; lower --tolerance or allow it with --min-sqnr")
    return result


def _sharing(model: ir.Model, tasks: list[Task]) -> tuple[dict[str, dict], int]:
    """Per task: the merged graph's nodes it needs, how many of them another task needs too (and
    likewise weights); and how many weights two or more tasks read."""
    graph = model.graph
    producers = {id(o): n for n in graph.nodes for o in n.outputs}
    users: dict[int, set[str]] = {}
    needed: dict[str, set[int]] = {}
    by_name = {t.name: t for t in graph.outputs}
    for task in tasks:
        pending = [by_name[name] for name in task.outputs.values()]
        seen: set[int] = set()
        while pending:
            tensor = pending.pop()
            node = producers.get(id(tensor))
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            pending.extend(ir.node_reads(node))
        needed[task.name] = seen
        for key in seen:
            users.setdefault(key, set()).add(task.name)
    weights: dict[int, set[str]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                weights.setdefault(id(t), set()).update(users.get(id(node), set()))
    report = {}
    for task in tasks:
        mine = needed[task.name]
        shared = sum(len(users[k]) > 1 for k in mine)
        report[task.name] = {
            "source": task.source, "outputs": task.outputs, "inputs": task.inputs,
            "nodes": len(mine), "nodes_shared": shared, "nodes_own": len(mine) - shared,
            "weights_shared": sum(task.name in u and len(u) > 1 for u in weights.values()),
        }
    return report, sum(len(u) > 1 for u in weights.values())


def _why_nothing_shared(tasks: list[Task], merged_inputs: Mapping[str, dict], report: dict) -> str:
    if all(len(info["from"]) == 1 for info in merged_inputs.values()):
        shared_weights = report["weights_shared"]
        weights = (f"; {shared_weights} weight(s) are stored once for several tasks (equal values), but each "
                   "task computes from its own input" if shared_weights else "")
        by_name: dict[str, list[str]] = {}
        for merged, info in merged_inputs.items():
            by_name.setdefault(info["from"][0].partition("/")[2], []).append(
                f"{info['dtype']} [{'x'.join(str(d) for d in info['shape'] or ())}]")
        differ = "".join(f" (input '{name}' is {' vs '.join(kinds)})" for name, kinds in by_name.items()
                         if len(kinds) > 1)
        return (f"nothing is shared: no input is common to two tasks{differ}; inputs unify by name, dtype and "
                f"shape, or --input-map{weights}; the models sit side by side in one graph")
    return "nothing is shared: the tasks compute nothing identically from their common inputs; one graph, side by side"


def measure(result: MergeResult, originals: Sequence, merged_file, data: CalibrationData | None, *,
            sizes: Sequence[int], merged_size: int, seed: int = 0, runs: int = 20, warmup: int = 3,
            threads: int = 1) -> dict:
    """MACs, parameters, file size and latency: the sum of the separate models (`originals`, as
    given: paths or protos) against the merged one, all timed in turns on the same inputs."""
    merged_feeds = stats.sample_feeds(result.model, data, seed=seed)
    specs = {s.name for s in runtime.input_specs(result.model)}
    computed = runtime.run(runtime.session(_exposed(result.model, result.tasks, specs), threads=threads), merged_feeds)
    feeds = [_task_feeds(t, merged_feeds | computed) for t in result.tasks]
    facts = [stats.model_stats(t.proto, size_bytes=s, feeds=f) for t, s, f in zip(result.tasks, sizes, feeds)]
    after = stats.model_stats(result.model, size_bytes=merged_size, feeds=merged_feeds)
    latencies = stats.measure_latency([*originals, merged_file], [*feeds, merged_feeds], runs=runs, warmup=warmup,
                                      threads=threads)

    def total(values):
        return None if any(v is None for v in values) else sum(values)

    return {
        "before_sum": {"macs": total([f.macs for f in facts]), "params": sum(f.params for f in facts),
                       "size_bytes": sum(sizes), "nodes": sum(f.nodes for f in facts),
                       "latency_ms": total([ms for ms, _ in latencies[:-1]])},
        "after": {"macs": after.macs, "params": after.params, "size_bytes": merged_size, "nodes": after.nodes,
                  "latency_ms": latencies[-1][0]},
        "per_model": {t.name: {"macs": f.macs, "params": f.params, "size_bytes": s, "latency_ms": ms}
                      for t, f, s, (ms, _) in zip(result.tasks, facts, sizes, latencies)},
        "latency_note": latencies[-1][1],
    }


__all__ = ["MergeError", "MergeResult", "Task", "collapse", "measure", "merge", "parse_input_map", "per_task_calibration",
           "task_name"]
