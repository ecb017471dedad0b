"""Benchmark and proof harness of `legalize`'s rewrites.

    python tools/bench_legalize.py [--ops HardSigmoid,Erf] [--no-models] [--targets nnapi,coreml] [--json out.json]

Two tables:

  node tests   for every op with a rewrite, the ONNX backend node tests that use it
               (`onnx.backend.test.case.node.collect_testcases`): cases whose original model
               onnxruntime runs and gets right; of those, how many the rewrite handled, how many
               then still match the expected outputs (the case's rtol/atol, default 1e-3/1e-7,
               scaled to the output dtype by `edgegraph.verify.tolerance`), how many the rules
               declined (with the reasons), and how many broke (must be 0).
  models       for each shared model in ../shared/models: the ops with a rewrite it contains,
               `legalize(ops=those)`: nodes of those ops before -> after, total nodes before ->
               after, and max |difference| of the outputs against the original model in
               onnxruntime (optimisations off) on its reference input, else seeded random data.

  targets      (--targets) per profile and model, with the inputs fixed to the reference input's
               shapes: nodes the profile refuses before -> after `legalize` for that target.

`node_case_results` and `model_result` are what tests/test_legalize.py imports, `legalize_stage`
the "after legalize" stage of tools/bench_targets.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edgegraph  # noqa: E402
from edgegraph import runtime, verify  # noqa: E402
from edgegraph.passbase import settle  # noqa: E402
from edgegraph.passes.cleanup.common import graphs  # noqa: E402
from edgegraph.passes.legalize import REWRITES, Legalize  # noqa: E402

MODELS = REPO.parent / "shared" / "models"
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7  # what onnx's backend runner uses


@dataclass
class CaseResult:
    name: str
    op: str
    # "matches", "differs", "broken" (rewrite or run failed), "declined" (no rule applies),
    # "legal" (nothing to rewrite), "skipped" (onnxruntime fails the original)
    status: str
    detail: str = ""
    rewrites: dict = field(default_factory=dict)


def _session(proto: onnx.ModelProto):
    return runtime.session(proto, threads=1, optimize=False)


def _run_case(proto: onnx.ModelProto, inputs) -> list:
    sess = _session(proto)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs)))


def _close(expected, actual, rtol: float, atol: float) -> bool:
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _close(e, a, rtol, atol) for e, a in zip(expected, actual))
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return False
    if expected.dtype.kind in "fc":
        r, a = verify.tolerance(expected.dtype, rtol, atol)
        return bool(np.allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=r, atol=a, equal_nan=True))
    return bool(np.array_equal(expected, actual))


def _matches(proto: onnx.ModelProto, case) -> bool:
    rtol = case.rtol if case.rtol is not None else DEFAULT_RTOL
    atol = case.atol if case.atol is not None else DEFAULT_ATOL
    for inputs, expected in case.data_sets:
        outputs = _run_case(proto, inputs)
        if len(outputs) != len(expected) or not all(_close(e, a, rtol, atol) for e, a in zip(expected, outputs)):
            return False
    return True


def legalized(proto: onnx.ModelProto, ops: list[str], *, opset: int = 0):
    """(rewritten ModelProto, PassResult, op counts after) of legalize(ops) run on its own (no verification)."""
    model = edgegraph.load(proto)
    result = Legalize(ops=list(ops), opset=opset).run(model, None)
    if result.modified:
        settle(model)
    return model.to_proto(), result, op_counts(model)


def op_counts(model) -> Counter:
    """Op types of every node of an edgegraph Model (subgraphs and functions included)."""
    return Counter(n.op for g in graphs(model.graph) for n in g.nodes)


def freeze_inputs(model: onnx.ModelProto, inputs) -> onnx.ModelProto:
    """`model` with its inputs after the first turned into initializers holding `inputs`' values."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    names = [i.name for i in frozen.graph.input]
    for name, array in zip(names[1:], list(inputs)[1:]):
        frozen.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    del frozen.graph.input[1:]
    return frozen


@dataclass
class _Frozen:
    """A node case whose inputs after the first are initializers (`freeze_inputs`)."""

    case: object
    model: onnx.ModelProto

    def __getattr__(self, name):
        if name == "data_sets":
            return [(inputs[:1], expected) for inputs, expected in self.case.data_sets]
        return getattr(self.case, name)


def node_cases(cases, ops) -> list[tuple]:
    """(case, op) for every case whose main graph uses one of `ops` (the first it uses)."""
    found = []
    for case in cases:
        used = [n.op_type for n in case.model.graph.node if n.op_type in ops]
        if used:
            found.append((case, used[0]))
    return found


def node_case_results(cases, ops=None) -> list[CaseResult]:
    """Every backend node case using an op of `ops` (default: every op with a rewrite), rewritten
    by legalize(ops=[that op]) and run against the case's expected outputs."""
    ops = sorted(ops or REWRITES)
    results = []
    logging.disable(logging.WARNING)
    try:
        for case, op in node_cases(cases, ops):
            try:
                if not _matches(case.model, case):
                    continue
            except Exception:  # noqa: BLE001 - onnxruntime cannot run this case as it is
                results.append(CaseResult(case.name, op, "skipped", "onnxruntime fails the original"))
                continue
            try:
                rewritten, result, _ = legalized(case.model, [op])
            except Exception as exc:  # noqa: BLE001
                results.append(CaseResult(case.name, op, "broken", f"legalize raised {type(exc).__name__}: {exc}"))
                continue
            left = result.details.get("not_rewritten", [])
            done = {k: v for k, v in result.stats.items() if k != "not_rewritten"}
            if not done and left and "constant" in left[0]["not_rewritten"] and len(case.data_sets) == 1:
                # The rule wants constant weights (what real models have): the same case with every
                # input but the first as an initializer of the values it feeds.
                frozen = freeze_inputs(case.model, case.data_sets[0][0])
                rewritten, result, _ = legalized(frozen, [op])
                left = result.details.get("not_rewritten", [])
                done = {k: v for k, v in result.stats.items() if k != "not_rewritten"}
                case = _Frozen(case, frozen)
            if not done:
                if left:
                    results.append(CaseResult(case.name, op, "declined", left[0]["not_rewritten"]))
                else:  # e.g. an opset-13 Softmax for the opset < 13 rewrite
                    results.append(CaseResult(case.name, op, "legal", "already in the form the rewrite makes"))
                continue
            try:
                ok = _matches(rewritten, case)
            except Exception as exc:  # noqa: BLE001
                results.append(CaseResult(case.name, op, "broken", f"rewritten model fails: {str(exc).splitlines()[0]}", done))
                continue
            note = "weights as initializers" if isinstance(case, _Frozen) else ""
            results.append(CaseResult(case.name, op, "matches" if ok else "differs",
                                      note if ok else f"outputs differ from the expected ones {note}", done))
    finally:
        logging.disable(logging.NOTSET)
    return results


def legalize_stage(model, target_name: str, **options):
    """The "after legalize" stage of tools/bench_targets.py's `support_rows(..., stages=...)`: a
    copy of the ir.Model `model` legalized for the profile `target_name` (with legalize's
    `options`, e.g. interface="target")."""
    from edgegraph.context import PassContext
    from edgegraph.targets import load_target

    legal = model.copy()
    result = Legalize(**options).run(legal, PassContext(progress=False, target=load_target(target_name)))
    if result.modified:
        settle(legal)
    return legal


# --- shared models -------------------------------------------------------------------------------

def model_inputs(path: Path, proto: onnx.ModelProto) -> dict:
    """The reference input stored next to the model, else seeded random data (dynamic dims 1,
    except where the model's own shape rules want more: left to the reference files)."""
    reference = path.with_name(path.stem + ".reference_io.npz")
    if reference.exists():
        with np.load(reference) as data:
            return {k[len("input__"):]: data[k] for k in data.files if k.startswith("input__")}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runtime.input_specs(proto):
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def model_result(path: Path, ops=None, *, opset: int = 0) -> dict:
    """legalize(ops) on one real model: what it rewrote, node counts, worst output difference."""
    proto = onnx.load(str(path))
    before = op_counts(edgegraph.load(proto))
    present = sorted(op for op in (ops or REWRITES) if op in before)
    row = {"model": f"{path.parent.name}/{path.name}", "ops": present, "opset": proto.opset_import[0].version}
    rewritten, result, after = legalized(proto, present, opset=opset) if present or opset else (proto, None, before)
    row.update(
        rewrites={k: v for k, v in result.stats.items() if k != "not_rewritten"} if result else {},
        not_rewritten=result.details.get("not_rewritten", []) if result else [],
        op_nodes={op: [before[op], after[op]] for op in present},
        nodes=[sum(before.values()), sum(after.values())],
    )
    feeds = model_inputs(path, proto)
    reference = runtime.run(_session(proto), feeds)
    candidate = runtime.run(_session(rewritten), feeds)
    worst, exact = 0.0, True
    for name, ref in reference.items():
        got = candidate[name]
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        worst = max(worst, diff)
        # The pipeline's exactness tolerance: atol 1e-5 + rtol 1e-4 * max|reference| (dtype-scaled).
        r, a = verify.tolerance(ref.dtype, 1e-4, 1e-5)
        exact &= diff <= a + r * float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else True
    row.update(max_abs_diff=worst, within_tolerance=bool(exact))
    return row


_COLUMNS = ("cases", "ok", "legal", "rewritten", "match", "declined", "broken")
_WIDTHS = (6, 8, 7, 10, 7, 9, 7)


def target_rows(paths, target_names) -> list[dict]:
    """For each model (inputs fixed to its reference input's shapes, else dims of 1) and target
    profile: nodes the profile refuses before -> after `legalize` for that target, by op."""
    from edgegraph import ir, targets

    rows = []
    logging.disable(logging.WARNING)
    try:
        for path in paths:
            proto = onnx.load(str(path))
            shapes = {name: list(array.shape) for name, array in model_inputs(path, proto).items()}
            for name in target_names:
                profile = targets.load(name)
                model = edgegraph.load(proto)
                ir.fix_input_shapes(model, shapes)
                model.refresh_shapes()
                refused = lambda m: Counter(n.op for n in m.graph.nodes  # noqa: E731
                                            if profile.unsupported(n, targets.ModelContext.of(m)))
                before, after = refused(model), refused(legalize_stage(model, name))
                rows.append({"model": f"{path.parent.name}/{path.name}", "target": name, "refused_before": sum(before.values()),
                             "refused_after": sum(after.values()), "left": dict(sorted(after.items()))})
    finally:
        logging.disable(logging.NOTSET)
    return rows


def _node_table(results: list[CaseResult]) -> str:
    lines = [f"{'op':<24}{'cases':>6}{'ORT ok':>8}{'legal':>7}{'rewritten':>10}{'match':>7}{'declined':>9}{'broken':>7}"]
    by_op: dict[str, list[CaseResult]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    total = Counter()
    for op in sorted(by_op):
        c = Counter(r.status for r in by_op[op])
        runs = len(by_op[op]) - c["skipped"]
        row = (len(by_op[op]), runs, c["legal"], c["matches"] + c["differs"] + c["broken"], c["matches"],
               c["declined"], c["differs"] + c["broken"])
        total.update(dict(zip(_COLUMNS, row)))
        lines.append(f"{op:<24}" + "".join(f"{v:>{w}}" for v, w in zip(row, _WIDTHS)))
    lines.append(f"{'total':<24}" + "".join(f"{total[k]:>{w}}" for k, w in zip(_COLUMNS, _WIDTHS)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", help="comma-separated op types (default: every op with a rewrite)")
    parser.add_argument("--no-models", action="store_true", help="skip the shared models")
    parser.add_argument("--json", help="write every row as JSON here")
    parser.add_argument("--targets", help="also: nodes these profiles refuse before -> after legalize, e.g. nnapi,coreml,tflite")
    args = parser.parse_args(argv)
    ops = args.ops.split(",") if args.ops else None
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases(None)
    results = node_case_results(cases, ops)
    print("backend node tests (legalize(ops=[op]) on each case using op)")
    print(_node_table(results))
    for r in results:
        if r.status in ("declined", "differs", "broken"):
            print(f"  {r.status:<9}{r.name}: {r.detail[:150]}")
    rows = []
    if not args.no_models and MODELS.is_dir():
        print("\nshared models (legalize(ops=<ops with a rewrite in the model>))")
        print(f"{'model':<58}{'rewritten (nodes of the op before->after)':<58}{'nodes':>12}{'max|diff|':>11}  ok")
        for path in sorted(MODELS.glob("*/*.onnx")):
            row = model_result(path, ops)
            rows.append(row)
            done = ", ".join(f"{op} {b}->{a}" for op, (b, a) in row["op_nodes"].items()) or "-"
            print(f"{row['model']:<58}{done:<58}{row['nodes'][0]:>5} ->{row['nodes'][1]:>5}"
                  f"{row['max_abs_diff']:>11.2e}  {'yes' if row['within_tolerance'] else 'NO'}")
            for left in row["not_rewritten"]:
                print(f"    not rewritten: {left['node']} ({left['op']}): {left['not_rewritten'][:120]}")
    target_table = []
    if args.targets and MODELS.is_dir():
        print("\ntargets (nodes the profile refuses, inputs fixed to the reference shapes: before -> after legalize)")
        target_table = target_rows(sorted(MODELS.glob("*/*.onnx")), args.targets.split(","))
        for row in target_table:
            left = ", ".join(f"{op} {n}" for op, n in row["left"].items())[:100] or "-"
            print(f"{row['target']:<10}{row['model']:<58}{row['refused_before']:>5} ->{row['refused_after']:>5}  {left}")
    if args.json:
        Path(args.json).write_text(json.dumps({"node_tests": [r.__dict__ for r in results], "models": rows,
                                               "targets": target_table}, indent=1))
    broken = [r for r in results if r.status in ("differs", "broken")]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
