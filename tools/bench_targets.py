"""Benchmark: how much of each model every target runs (`edgegraph check`), per stage.

    python tools/bench_targets.py [--targets nnapi,coreml,...] [--node-tests N] [--legalize] [--json out.json]

For each target profile (edgegraph/targets/*.toml):

  node tests   of the ONNX backend node-test models (onnx.backend.test.case.node.collect_testcases),
               how many the target runs whole (every node supported: one partition). Checked as
               given (a node test is one op on graph inputs: onnxruntime's basic optimisations
               change nothing the verdict depends on, and skipping them keeps this fast).
  real models  of the shared real models (../shared/models), how many run as one partition over
               >= 99% of the nodes, and how many entirely; then per model: partitions and the share
               of nodes (of MACs) supported. onnxruntime providers are checked on the graph
               onnxruntime's basic optimisations make (what they are given), the others as given.

Stages: "as given", and with `--legalize` "after legalize" (tools/bench_legalize.py), with
`--interface` also "legalize(interface=target,finite=true)" (input/output dtypes changed where the
target cannot take them, Softmax NaN guards dropped: not the default, the caller's side changes). `support_rows(models, targets, stages={"after legalize": fn})`
takes more, each a function (model, target name) -> model, so a rewrite pass adds its column
by calling it (tools/bench_targets.py is importable: `from tools.bench_targets import ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgegraph import ir, modelio, targets  # noqa: E402
from edgegraph.errors import EdgegraphError  # noqa: E402
from edgegraph.targets import check  # noqa: E402

MODELS = REPO.parent / "shared" / "models"
Stage = Callable[[ir.Model, str], ir.Model]
AS_GIVEN = "as given"
# The stage of --interface: what the option changes is the model's interface, so its name says so.
INTERFACE_STAGE = "legalize(interface=target,finite=true)"


def node_test_models(limit: int | None = None) -> list[tuple[str, ir.Model]]:
    """(name, model) of the ONNX backend node tests that load (a few are refused by edgegraph's
    validation, e.g. models of ops onnx itself marks as not checkable)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases(None)
    found = []
    for case in cases[:limit]:
        try:
            found.append((case.name, ir.from_proto(case.model)))
        except (EdgegraphError, ValueError, TypeError, KeyError) as exc:  # graphsurgeon / inference limits
            print(f"  skipped {case.name}: {str(exc)[:80]}", file=sys.stderr)
    return found


def real_models() -> list[tuple[str, ir.Model]]:
    return [(f"{p.parent.name}/{p.name}", modelio.load(p)) for p in sorted(MODELS.glob("*/*.onnx"))]


def support_rows(models: Sequence[tuple[str, ir.Model]], target_names: Sequence[str], *,
                 stages: Mapping[str, Stage] | None = None, optimize: bool | None = None,
                 macs: bool = True) -> list[dict]:
    """One row per (model, target, stage): nodes, supported, partitions, node/MAC share, fully
    supported. `stages` maps a stage name to a function (model, target) -> model; "as given"
    is always the first."""
    stages = {AS_GIVEN: lambda model, _target: model, **(stages or {})}
    rows = []
    for label, model in models:
        for stage, make in stages.items():
            try:
                if stage == AS_GIVEN:  # one onnxruntime-optimised copy for all targets
                    results = check.check_all(model, optimize=optimize, macs=macs, profiles=target_names)
                else:
                    results = [check.check(make(model, name), name, optimize=optimize, macs=macs) for name in target_names]
            except EdgegraphError as exc:
                rows += [{"model": label, "target": name, "stage": stage, "error": str(exc)[:200]} for name in target_names]
                continue
            for result in results:
                rows.append({
                    "model": label, "target": result.target, "stage": stage, "nodes": result.nodes,
                    "supported": result.supported, "partitions": result.partitions,
                    "node_share": result.node_share, "mac_share": result.mac_share,
                    "fully": result.fully_supported,
                    "one_partition_99": result.partitions == 1 and result.node_share >= 0.99,
                    "unsupported_ops": sorted({u.op for u in result.unsupported}),
                })
    return rows


def summary(node_rows: list[dict], real_rows: list[dict], target_names: Sequence[str]) -> list[str]:
    from edgegraph.tables import columns

    stages = list(dict.fromkeys(r["stage"] for r in node_rows + real_rows))
    header = ["target", "stage", "node tests whole", "real: 1 partition >=99%", "real: whole"]
    table = [header]
    for name in target_names:
        for stage in stages:
            nodes = [r for r in node_rows if r["target"] == name and r["stage"] == stage]
            real = [r for r in real_rows if r["target"] == name and r["stage"] == stage]
            table.append([name, stage, f"{sum(r.get('fully', False) for r in nodes)}/{len(nodes)}",
                          f"{sum(r.get('one_partition_99', False) for r in real)}/{len(real)}",
                          f"{sum(r.get('fully', False) for r in real)}/{len(real)}"])
    lines = columns(table, "<<>>>")
    models = list(dict.fromkeys(r["model"] for r in real_rows))
    if models:
        lines += ["", "partitions (supported nodes %) per real model and target" +
                  (f", stage {', '.join(stages)}" if len(stages) > 1 else "")]
        grid = [["model", *target_names]]
        for model in models:
            for stage in stages:
                cells = []
                for name in target_names:
                    row = next((r for r in real_rows if (r["model"], r["target"], r["stage"]) == (model, name, stage)), None)
                    cells.append("err" if row is None or "error" in row else
                                 f"{row['partitions']} ({row['node_share'] * 100:.0f}%)")
                grid.append([model if len(stages) == 1 else f"{model} [{stage}]", *cells])
        lines += columns(grid, "<" + ">" * len(target_names))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="all", help="comma-separated profiles (default: all)")
    parser.add_argument("--node-tests", type=int, default=None, help="only the first N node tests (default: all)")
    parser.add_argument("--no-macs", action="store_true", help="skip the MAC shares (faster)")
    parser.add_argument("--legalize", action="store_true",
                        help="add the stage 'after legalize' (the legalize pass for each target) to the real models, "
                             "and each real model once more with its inputs fixed to its reference shapes (--fix-shape)")
    parser.add_argument("--interface", action="store_true",
                        help="with --legalize, also the stage 'legalize(interface=target,finite=true)': the model's "
                             "input/output dtypes changed where the target cannot take them (float16 -> float32, "
                             "int64 -> int32) and Softmax NaN guards dropped; callers then feed the new dtypes")
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    args = parser.parse_args()
    import onnx_graphsurgeon as gs

    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # one warning per opset-less node test otherwise
    names = targets.names() if args.targets == "all" else args.targets.split(",")
    start = time.perf_counter()
    nodes = node_test_models(args.node_tests)
    print(f"{len(nodes)} node-test models loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    node_rows = support_rows(nodes, names, optimize=False, macs=False)
    print(f"node tests checked in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    real = real_models() if MODELS.is_dir() else []
    stages = {}
    if args.legalize:
        from edgegraph.pipeline import specialise
        from tools.bench_legalize import legalize_stage, model_inputs

        stages["after legalize"] = legalize_stage
        if args.interface:
            stages[INTERFACE_STAGE] = lambda model, name: legalize_stage(model, name, interface="target", finite=True)
        # Dynamic dims stop NNAPI (static shapes only) whatever a rewrite does: --fix-shape first.
        for label, model in list(real):
            shapes = {n: a.shape for n, a in model_inputs(MODELS / label, model.to_proto(weights=False)).items()}
            fixed = specialise(model, {n: s for n, s in shapes.items() if n in {i.name for i in model.graph.inputs}})
            real.append((f"{label} (fixed shape)", fixed))
    real_rows = support_rows(real, names, stages=stages, macs=not args.no_macs)
    print(f"real models checked in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print("\n".join(summary(node_rows, real_rows, names)))
    if args.json:
        args.json.write_text(json.dumps({"node_tests": node_rows, "real_models": real_rows}, indent=1))


if __name__ == "__main__":
    main()
