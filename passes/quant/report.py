"""The report of `quant`: the per-layer table, the stats line, what was tuned and kept out of 8
bits, timings, and a warning naming the costliest layers when the result is badly degraded."""

from __future__ import annotations

import logging

import numpy as np

from edgegraph import ir
from edgegraph.passbase import PassResult
from edgegraph.passes.quant import sensitivity
from edgegraph.passes.quant.build import Built
from edgegraph.passes.quant.names import shorten
from edgegraph.passes.quant.placement import Plan
from edgegraph.passes.quant.state import QuantRun
from edgegraph.stats import is_quantized

logger = logging.getLogger(__name__)

# Worst output SQNR (dB, held-out calibration samples) below which the result is called degraded:
# the pass reaches 25-45 dB on the shared CNNs, classifiers keep their top-1 down to ~20 dB.
LOW_SQNR_DB = 15.0
COSTLIEST_SHOWN = 3  # layers named in that warning


def result(run: QuantRun, model: ir.Model, plan: Plan, built: Built, errors, fallback: list[str],
           latency: dict | None = None) -> PassResult:
    weights = {w.node.name: w for w in built.weights}
    rows = []
    for node in plan.quantized:
        weight = weights.get(node.name)
        point = plan.result_point(node)
        params = built.params.get(point) if point else None
        error = errors.get(point or node.outputs[0].name)
        rows.append({
            "node": node.name,
            "op": node.op,
            "weight_scale": _range(weight.params.scale) if weight else None,
            "activation_scale": float(np.asarray(params.scale).reshape(-1)[0]) if params else None,
            "activation_zero_point": int(np.asarray(params.zero_point).reshape(-1)[0]) if params else None,
            "sqnr_db": round(error.sqnr_db, 2) if error else None,
        })
    outputs = {name: round(errors[name].sqnr_db, 2) for name in run.output_names if name in errors}
    stats = {
        "quantized_nodes": sum(is_quantized(n) for n in ir.iter_nodes(model.graph)),
        "float_nodes": len(plan.skipped),
        "calibration_samples": len(run.calib) + run.split.get("held_out", 0),
        "analysis_samples": run.analysis_count,
        "method": run.method,
        "elementwise": run.elementwise,
        "bias_corrected": built.corrected,
        "saturation_guarded": len(built.guarded),
        "output_sqnr_db": min(outputs.values()) if outputs else None,
    }
    if run.o.weight_rounding != "nearest":
        stats["weight_rounding"] = run.rounding
    if run.split.get("held_out"):
        stats["floor_samples"] = run.split["held_out"]  # held out of fitting (state.split_for_floor)
    if fallback:
        stats["fallback_layers"] = len(fallback)
    if run.coarse:
        stats["coarse_tensors_kept"] = len(run.coarse)
    if run.mixed_info.get("noise_share"):
        stats["sensitive_tensors_kept"] = len(run.mixed_info["noise_share"])
    details = {"layers": rows, "float_nodes": dict(plan.skipped), "output_sqnr_db": outputs,
               "saturation_guarded": built.guarded, "notes": run.notes}
    if run.coarse:
        details["coarse_tensors_kept"] = {"as": run.o.sensitive_type, "tensors": run.coarse}
    if run.mixed_info:
        details["mixed_precision"] = {**run.mixed_info, "as": run.o.sensitive_type}
    if run.tuning:
        details["tuning_output_sqnr_db"] = {k: round(v, 2) for k, v in run.tuning.items()}
    if run.budget is not None:
        details["fallback"] = {"kept": fallback, "as": run.o.sensitive_type, **run.budget}
    degraded = _degraded(run, model, plan, errors)
    if degraded:
        stats["warning"] = f"worst output SQNR {degraded['held_out_sqnr_db']} dB < {LOW_SQNR_DB:g} dB"
        details["warning"] = degraded
    if latency is not None:
        details["latency"] = latency
    details["timings_s"] = {k: round(v, 2) for k, v in run.timings.items()}
    for note in run.notes:
        logger.info("quant: %s", note)
    return PassResult(True, stats, details)


def _degraded(run: QuantRun, model: ir.Model, plan: Plan, errors) -> dict | None:
    """When the worst output SQNR on held-out samples is below LOW_SQNR_DB: a warning naming
    the layers whose quantization adds the most noise and the options that help."""
    sqnr = run.score(model)
    if sqnr >= LOW_SQNR_DB:
        return None
    owners = {plan.result_point(node): node for node in plan.quantized}
    costliest = [owners[t] for t in sensitivity.ranking(plan, errors)[:COSTLIEST_SHOWN]]
    layers = [{"node": n.name, "op": n.op, "sqnr_db": round(errors[plan.result_point(n)].sqnr_db, 2)}
              for n in costliest]
    named = ", ".join(f"{shorten(x['node'])} ({x['op']}, {x['sqnr_db']:.1f} dB)" for x in layers)
    options = []
    if run.o.min_sqnr is None and run.o.max_drop is None:
        options.append(f"quant(min_sqnr={LOW_SQNR_DB + 5:g}) to keep the most sensitive layers in float")
    else:
        options.append("a higher min_sqnr or smaller max_drop on more calibration samples")
    if run.o.sensitive_type != "int16":
        options.append("sensitive_type=int16 to give them 16-bit activations instead")
    if costliest:
        options.append(f"exclude_nodes=[{', '.join(shorten(n.name) for n in costliest)}]")
    suggestion = ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
    message = (f"quant: the quantized model is badly degraded: worst output SQNR {sqnr:.1f} dB on held-out "
               f"calibration samples (below {LOW_SQNR_DB:g} dB){'; costliest layers: ' + named if named else ''}; "
               f"try {suggestion}")
    logger.warning("%s", message)
    return {"held_out_sqnr_db": round(sqnr, 2), "threshold_db": LOW_SQNR_DB, "costliest_layers": layers,
            "suggestion": suggestion, "message": message}


def _range(values) -> list[float]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return [float(values.min()), float(values.max())]


__all__ = ["result", "LOW_SQNR_DB"]
