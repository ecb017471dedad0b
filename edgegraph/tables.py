"""Text output of the command line: the before -> after summary, `info` and `bench` tables."""

from __future__ import annotations

from edgegraph.stats import ModelStats, human
from edgegraph.pipeline import PipelineReport


def columns(rows: list[list[str]], align: str) -> list[str]:
    """Columns padded to their widest cell; `align` has one of '<' or '>' per column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip() for row in rows]


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == after:
        return ""
    if before == 0:
        return "new"
    return f"{(after - before) / before * 100:+.1f}%"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _cosine(value: float) -> str:
    return f"{value:.6f}"


def _number(value, digits: int = 5) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def format_opt_header(data: dict) -> str:
    """What `opt` is about to do (printed before the work): IN -> OUT, pipeline, target, data."""
    return (f"{data['input']} -> {data['output']}\n"
            f"pipeline: {data['pipeline']}   target: {data['target']}   "
            f"calibration: {_calibration_text(data['calibration'])}")


def format_opt_summary(data: dict, before: ModelStats, after: ModelStats, report: PipelineReport,
                       accuracy: dict | None) -> str:
    """What `opt` did (printed after `format_opt_header`): passes, before -> after, accuracy."""
    lines = ["", "passes"]
    for i, p in enumerate(report.passes, 1):
        worst = _worst(p.metrics)
        wanted = f" (for {p.wanted_by})" if p.wanted_by else ""
        lines.append(f"  {i}. {p.spec}{wanted}: {'changed' if p.modified else 'no change'} in {p.seconds:.2f}s"
                     f"{'; outputs ' + worst if worst else ''}")
        if p.stats:
            lines.append("     " + " ".join(f"{k}={_short(v)}" for k, v in p.stats.items()))
    lines.append("")
    rows = [["", "before", "after", "change"]]
    for label, b, a, text in [
        ("file size", before.size_bytes, after.size_bytes, lambda v: human(v, "B", binary=True)),
        ("params", before.params, after.params, human),
        ("MACs", before.macs, after.macs, human),
        # Q/DQ nodes get their own row: onnxruntime fuses them into its integer kernels, so
        # counting them as nodes would make every quantized model look 2-3x bigger.
        ("nodes", before.nodes - before.qdq_nodes, after.nodes - after.qdq_nodes, str),
        ("quantized nodes", before.quantized_nodes, after.quantized_nodes, str),
        ("Q/DQ nodes", before.qdq_nodes, after.qdq_nodes, str),
        ("latency ms", before.latency_ms, after.latency_ms, _ms),
    ]:
        rows.append([label, text(b), text(a), _change(b, a)])
    lines += columns(rows, "<>>>")
    notes = [f"MACs with {before.shapes}" if before.shapes else "",
             "nodes without Q/DQ" if before.qdq_nodes or after.qdq_nodes else "",
             f"MACs: {_unknown_macs(before)}" if before.macs is None else "",
             _latency_note(before.latency_ms, before.latency_note),
             f"latency after: {after.latency_note}" if after.latency_ms is None and before.latency_ms else ""]
    lines += [f"  ({n})" for n in notes if n]
    lines.append("")
    lines += format_accuracy(accuracy, "accuracy vs the input model, as deployed (onnxruntime, all optimizations)",
                             data["accuracy_note"])
    return "\n".join(lines).rstrip()


def _calibration_text(calibration: dict | None) -> str:
    if not calibration:
        return "none"
    return calibration["source"] + (f" ({calibration['samples']} samples)" if "samples" in calibration else "")


def _latency_note(ms: float | None, note: str) -> str:
    """`latency at x=1x3x48x192, median of ...` (the note of a timed model starts with its shapes)."""
    return f"latency {note}" if ms is not None else f"latency: {note}"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple | dict) and len(str(value)) > 40:
        return f"<{len(value)} items>"
    return str(value)


def _worst(metrics: dict) -> str:
    if not metrics:
        return ""
    cos = min(m.cosine for m in metrics.values())
    sqnr = min(m.sqnr_db for m in metrics.values())
    top1 = [m.top1 for m in metrics.values() if m.top1 is not None]
    text = f"cosine {_cosine(cos)}, SQNR {_number(sqnr, 4)} dB"
    return text + (f", top-1 agreement {_percent(min(top1))}" if top1 else "")


def _unknown_macs(stats: ModelStats) -> str:
    return (f"{len(stats.unknown_mac_nodes)} of {len(stats.node_macs)} MAC nodes unknown: dynamic shapes or "
            "control flow; try --fix-shape NAME=DIMS")


def format_accuracy(accuracy: dict | None, title: str, missing: str = "") -> list[str]:
    if not accuracy:
        return [f"{title}: not measured ({missing or 'no data'})"]
    lines = [f"{title}, {accuracy['samples']} samples of {accuracy['data']}"]
    rows = [["output", "cosine", "SQNR dB", "top-1 agree", "max |err|"]]
    for name, m in accuracy["outputs"].items():
        rows.append([name, _cosine(m.cosine), _number(m.sqnr_db, 4), _percent(m.top1), _number(m.max_abs, 4)])
    lines += ["  " + line for line in columns(rows, "<>>>>")]
    labels = accuracy.get("label_accuracy")
    if labels and labels["reference"] is not None:
        lines.append(f"  label accuracy: {_percent(labels['reference'])} -> {_percent(labels['candidate'])}")
    return lines


def format_info(path: str, stats: ModelStats, *, top: int = 10) -> str:
    opsets = ", ".join(f"{domain} {version}" for domain, version in stats.opsets.items())
    macs = human(stats.macs)
    if stats.macs is None:
        macs += f" ({_unknown_macs(stats)})"
    elif stats.shapes:
        macs += f" ({stats.shapes})"
    rows = [
        ["model", path],
        ["producer", f"{stats.producer or 'unknown'}   IR {stats.ir_version}   opsets {opsets}"],
        ["size", human(stats.size_bytes, "B", binary=True) + f" ({stats.size_bytes} bytes)"],
        ["params", f"{human(stats.params)} ({human(stats.param_bytes, 'B', binary=True)})"],
        ["nodes", f"{stats.nodes} (quantized {stats.quantized_nodes}, Q/DQ {stats.qdq_nodes})"],
        ["MACs", macs],
    ]
    rows += [["inputs" if i == 0 else "", t.describe()] for i, t in enumerate(stats.inputs)]
    rows += [["outputs" if i == 0 else "", t.describe()] for i, t in enumerate(stats.outputs)]
    lines = columns(rows, "<<")
    lines += ["", "ops"] + ["  " + line for line in columns([[op, str(n)] for op, n in stats.ops.items()], "<>")]
    costly = [c for c in stats.node_macs if c.macs][:top]
    if costly:
        total = stats.macs_known or 1
        lines += ["", f"top {len(costly)} nodes by MACs"]
        lines += ["  " + line for line in columns(
            [[human(c.macs), f"{c.macs / total * 100:.1f}%", c.op, c.name] for c in costly], ">><<")]
    return "\n".join(lines)


def format_bench(rows: list[dict]) -> str:
    first = rows[0]["latency_ms"]
    compared = "outputs" in rows[0]
    header = ["model", "size", "latency ms", "speedup"]
    if compared:
        header += ["cosine", "SQNR dB", "top-1 agree"]
        if rows[0].get("label_accuracy", {}).get("reference") is not None:
            header.append("accuracy")
    rows_text = [header]
    for i, row in enumerate(rows):
        speedup = "" if first is None or row["latency_ms"] is None else f"{first / row['latency_ms']:.2f}x"
        cells = [row["model"], human(row["size_bytes"], "B", binary=True), _ms(row["latency_ms"]), speedup]
        if compared:
            metrics = list(row["outputs"].values())
            top1 = [m.top1 for m in metrics if m.top1 is not None]
            cells += ["-", "-", "-"] if i == 0 else [
                _cosine(min(m.cosine for m in metrics)), _number(min(m.sqnr_db for m in metrics), 4),
                _percent(min(top1)) if top1 else "-"]
            if len(header) > 7:
                cells.append(_percent(row["label_accuracy"]["candidate"]))
        rows_text.append(cells)
    lines = columns(rows_text, "<>>>>>>>")
    lines.append(f"({_latency_note(rows[0]['latency_ms'], rows[0]['latency_note'])}; speedup and agreement are "
                 "relative to the first model)")
    if compared:
        lines.append(f"(agreement over {rows[0]['samples']} samples, worst output shown)")
    return "\n".join(lines)


def format_merge(report: dict) -> str:
    """`edgegraph merge`'s summary: what each task shares and owns, its check, the sum of the
    separate models against the merged one."""
    rows = [["task", "nodes", "shared", "own", "weights shared", "check"]]
    for name, task in report["tasks"].items():
        check = report["deviation"][name]
        text = ("not checked" if check["bitwise"] is None else "bitwise" if check["bitwise"] else
                f"SQNR {_number(check['worst_sqnr_db'], 3)} dB")
        rows.append([name, str(task["nodes"]), str(task["nodes_shared"]), str(task["nodes_own"]),
                     str(task["weights_shared"]), text])
    lines = columns(rows, "<>>>><")
    if report.get("note"):
        lines.append(report["note"])
    if report.get("near_equal_weights"):
        worst = max(w["relative_difference"] for w in report["near_equal_weights"])
        lines.append(f"{len(report['near_equal_weights'])} weight(s) within --tolerance taken as equal "
                     f"(largest relative difference {worst:.3g}; the report lists them)")
    measured = report.get("measured")
    if measured:
        before, after = measured["before_sum"], measured["after"]
        table = [["", "separate (sum)", "merged", "change"]]
        for key, label, show in (("size_bytes", "size", lambda v: human(v, "B", binary=True)),
                                 ("params", "params", human), ("macs", "MACs", human),
                                 ("nodes", "nodes", str), ("latency_ms", "latency ms", _ms)):
            table.append([label, "-" if before[key] is None else show(before[key]),
                          "-" if after[key] is None else show(after[key]), _change(before[key], after[key])])
        lines += ["", *columns(table, "<>>>"), f"latency: {measured['latency_note']}"]
    return "\n".join(lines)


def format_lower(result) -> str:
    """The files a lowering wrote, and how its runtime's outputs agree with onnxruntime's."""
    rows = [["output", "cosine", "SQNR dB", "max |error|", "of max |ref|"]]
    for m in result.metrics.values():
        rows.append([m.name, _cosine(m.cosine), _number(m.sqnr_db, 4), f"{m.max_abs:.3g}", f"{m.ref_max_abs:.3g}"])
    lines = [f"wrote {', '.join(map(str, result.outputs))} in {result.seconds:.1f}s"]
    lines += columns(rows, "<>>>>")
    lines.append(f"({result.target} vs onnxruntime on {result.samples} sample(s) of {result.data}; "
                 f"accepted from {result.min_sqnr_db:g} dB)")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def group_row(group) -> dict:
    """One channel coupling group (analysis.channels.Group) for `info --groups --json`."""
    return {"group": group.id, "channels": group.channels, "prunable": group.prunable,
            "tensors": sorted({name for name, _ in group.members}), "weights": [s.constant for s in group.slices],
            "why_not": group.reasons}


def format_groups(groups) -> str:
    """`info --groups`: one line per coupling group, the unprunable ones with their reasons."""
    prunable = sum(g.prunable for g in groups)
    lines = [f"channel groups: {len(groups)} ({prunable} prunable, {sum(g.channels for g in groups if g.prunable)} "
             "channels `prune` may cut)"]
    rows = [["group", "channels", "weights cut", "state"]]
    for g in groups:
        weights = ", ".join(s.constant for s in g.slices[:3]) + (f", +{len(g.slices) - 3}" if len(g.slices) > 3 else "")
        rows.append([str(g.id), str(g.channels), weights or "-",
                     "prunable" if g.prunable else "fixed: " + "; ".join(g.reasons[:2])])
    return "\n".join(lines + ["  " + line for line in columns(rows, "><<<")])
