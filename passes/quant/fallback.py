"""The sensitivity fallback of `quant`: under a budget (max_drop / min_sqnr and the user's
--min-agreement / --min-sqnr), the tensors whose quantization adds most noise are kept out of
8 bits until the budget holds, found by the core floor loop (`edgegraph.floor.search`)."""

from __future__ import annotations

import logging
import time

from edgegraph import floor, ir, runtime
from edgegraph.errors import EdgegraphError
from edgegraph.floor import Floor
from edgegraph.passes.quant import sensitivity, state
from edgegraph.passes.quant.state import QuantRun
from edgegraph.passes.quant.tuning import build_protected
from edgegraph.stats import is_quantized

logger = logging.getLogger(__name__)


def budget_floor(run: QuantRun) -> Floor:
    """The budget: the pass's own max_drop / min_sqnr and the user's floors (ctx.verify), the
    stricter of each."""
    own = Floor(None if run.o.max_drop is None else 1.0 - run.o.max_drop, run.o.min_sqnr)
    return own.stricter(run.ctx.verify.floor())


def fallback(run: QuantRun, quant, built, plan, errors, budget: Floor):
    """Keep the tensors whose quantization adds most noise out of 8 bits (see `build_protected`)
    until `budget` holds on the held-out calibration samples (`QuantRun.floor_data`, not used for
    fitting; see state.split_for_floor): the floor loop (`edgegraph.floor.search`) over how many
    of them, most sensitive first."""
    start = time.perf_counter()
    data = run.floor_data
    if not run.split.get("held_out"):
        logger.warning("quant: only %d calibration samples: the floor is measured on the samples the ranges were "
                       "fitted on (optimistic); give %d or more to hold some out", len(run.calib),
                       state.MIN_SPLIT_SAMPLES)
    reference = runtime.outputs(run.float_proto, run.batches(data), threads=run.ctx.threads)
    adopted = set(run.coarse) | set(run.mixed)  # already out of 8 bits
    ranking = [t for t in sensitivity.ranking(plan, errors) if t not in adopted]

    def measure(k: int):
        if k == 0:
            trial = (quant, built, plan)
        else:
            trial = build_protected(run, adopted | set(ranking[:k]))
            if not any(is_quantized(n) for n in ir.iter_nodes(trial[0].graph)):
                return None, None  # a float copy meets any budget, and is no result
        outputs = runtime.outputs(trial[0].to_proto(), run.batches(data), threads=run.ctx.threads)
        return floor.measure(reference, outputs), trial

    # Settings: how many of the ranked tensors are kept out of 8 bits, strongest (none) first.
    found = floor.search(range(len(ranking) + 1), measure, budget, progress=run.ctx.progress_bar,
                         desc=f"quant: floor search ({run.o.knob})")
    run.timings["fallback"] = time.perf_counter() - start
    first = found.steps[0].measured
    run.budget = {"agreement": first["agreement"], "output_sqnr_db": first["sqnr_db"],
                  "met": found.best is not None and found.best.index == 0,
                  "attempts": sum(s.usable for s in found.steps), "steps": found.as_dict()["steps"],
                  "samples": run.split}
    if found.best is not None and found.best.index == 0:
        return quant, built, plan, errors, []
    user_floor = bool(run.ctx.verify.floor())
    if found.best is None and user_floor:
        raise floor.not_held("quant", found)
    if found.best is None and any(not s.usable for s in found.steps):
        wanted = " and ".join(([f"min_sqnr={run.o.min_sqnr:g} dB"] if run.o.min_sqnr is not None else [])
                              + ([f"max_drop={run.o.max_drop:g}"] if run.o.max_drop is not None else []))
        closest = max(s.measured["sqnr_db"] for s in found.steps if s.usable)
        raise EdgegraphError(
            f"quant: nothing was quantized: {wanted} is met only with every layer in float (the best model "
            f"that keeps some layers quantized reaches {closest:.1f} dB output SQNR); lower the floor, or try "
            "sensitive_type=int16")
    if found.best is None:
        logger.warning("quant: the budget (max_drop=%s, min_sqnr=%s) is not met even with every ranked "
                       "tensor kept out of 8 bits; keeping the quantized model", run.o.max_drop, run.o.min_sqnr)
        return quant, built, plan, errors, []
    k = found.best.index
    quant, built, trial_plan = found.artefact
    run.budget.update(agreement=found.best.measured["agreement"], output_sqnr_db=found.best.measured["sqnr_db"],
                      met=True)
    if run.o.sensitive_type == "int16":
        kept = sorted(ranking[:k])  # the tensors given 16 bits
    else:
        kept = sorted({n.name for n in plan.quantized} - {n.name for n in trial_plan.quantized})
    return quant, built, trial_plan, sensitivity.errors(run, quant, built), kept


__all__ = ["budget_floor", "fallback"]
