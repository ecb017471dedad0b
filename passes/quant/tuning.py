"""The tuning step of `quant`: settings the defaults leave open (calibration method, bias
correction, coarse tensors kept out of 8 bits), each chosen by the output SQNR it gives on
held-out calibration samples (`QuantRun.score`)."""

from __future__ import annotations

import time

import numpy as np

from edgegraph import ir
from edgegraph.passes.quant import bias_correction, calibrate
from edgegraph.passes.quant.build import Built, build
from edgegraph.passes.quant.placement import Plan
from edgegraph.passes.quant.qdq import QParams
from edgegraph.passes.quant.state import QuantRun

# `keep_coarse`: a tensor is coarse when its step drowns this share of a typical channel's
# variation (capture.ChannelMoments.coarse_fraction), and kept out of 8 bits when that raises the
# output SQNR by at least FLOAT_GAIN_DB (float or 16-bit layers cost speed).
COARSE_FRACTION = 0.05
FLOAT_GAIN_DB = 1.0
# ... and at most this share of the quantized nodes goes float for them (the coarsest first):
# calibration data that barely varies (one image plus noise) makes many tensors look coarse.
COARSE_FLOAT_SHARE = 0.25


def tuned_build(run: QuantRun, plan: Plan, first: tuple[ir.Model, Built] | None = None) -> tuple[ir.Model, Built, Plan]:
    """`build` with the settings that give the best output SQNR on held-out calibration
    samples (the last ones; bias correction is fitted on the first), trying in turn:

      the calibration method   no one method wins everywhere (entropy on YOLOX, mse on
                               SqueezeNet / DeepLab)
      bias correction          helps some models and hurts others
      weight rounding          (weight_rounding=auto) gram rounding helps CIFAR-10's CNN (+4.5 dB)
                               and hurts the PP-OCR classifier (-5.7 dB)
      coarse tensors           tensors whose per-tensor step drowns most of their channels'
                               variation, kept out of 8 bits (YOLOX's stem: F1 0.55 -> 0.85
                               with 4 nodes float), only for a gain of FLOAT_GAIN_DB, as
                               float or 16-bit layers cost speed

    Settings fixed by options are not tried. `first`: what `first_build` made, if it ran."""
    start = time.perf_counter()
    model, built, sqnr = _tune_ranges(run, plan, first)
    if run.o.weight_rounding == "auto" and built.weights:
        sqnr = run.score(model) if sqnr is None else sqnr
        run.rounding = "gram"
        trial, trial_built = build(run, plan)
        run.tuning["weight_rounding=gram"] = run.score(trial)
        if run.tuning["weight_rounding=gram"] > sqnr:
            model, built, sqnr = trial, trial_built, run.tuning["weight_rounding=gram"]
        else:
            run.rounding = "nearest"
    coarse = _coarse_tensors(run, plan, built.params) if run.o.keep_coarse else {}
    if coarse and run.o.sensitive_type == "float":
        coarse = _within_float_share(plan, coarse)
    if coarse:
        sqnr = run.score(model) if sqnr is None else sqnr
        trial, trial_built, trial_plan = build_protected(run, set(coarse))
        run.tuning["keep_coarse"] = run.score(trial)
        if run.tuning["keep_coarse"] >= sqnr + FLOAT_GAIN_DB and trial_plan.quantized:
            model, built, plan, sqnr = trial, trial_built, trial_plan, run.tuning["keep_coarse"]
            run.coarse = coarse
    run.tuned_sqnr = sqnr
    run.timings["tuning"] = time.perf_counter() - start - run.timings.get("bias_correction", 0.0)
    return model, built, plan


def first_build(run: QuantRun, plan: Plan) -> tuple[ir.Model, Built]:
    """The first model `tuned_build` builds (the first calibration method tried), built ahead
    (for the speed check: ranges and biases change no kernel)."""
    methods = _methods(run)
    run.method = methods[0]
    if not _fixed(run, methods):
        run.correct = False
    return build(run, plan)


def _methods(run: QuantRun) -> tuple[str, ...]:
    return calibrate.AUTO_METHODS if run.o.method == "auto" else (run.o.method,)


def _fixed(run: QuantRun, methods: tuple[str, ...]) -> bool:
    """Whether nothing in the calibration method and bias correction is left to measure."""
    return len(methods) == 1 and run.o.bias_correction != "auto"


def _tune_ranges(run: QuantRun, plan: Plan, first: tuple[ir.Model, Built] | None) -> tuple[ir.Model, Built, float | None]:
    """The calibration method and bias correction step of `tuned_build`: the model, what
    was built, and its score (None when nothing was measured)."""
    methods = _methods(run)
    if _fixed(run, methods):
        return (*(first or build(run, plan)), None)
    run.correct = False
    best = None
    for method in methods:
        run.method = method
        model, built = first if first and method == methods[0] else build(run, plan)
        run.tuning[method] = run.score(model)
        if best is None or run.tuning[method] > best[0]:
            best = (run.tuning[method], method, model, built)
    sqnr, run.method, model, built = best
    if run.o.bias_correction is False or not built.biases:
        return model, built, sqnr
    uncorrected = [b.float_value for b in built.biases]
    bias_correction.correct_biases(run, model, built)
    run.correct = True
    if run.o.bias_correction is True:
        return model, built, None  # measured before the correction
    run.tuning["bias_correction"] = run.score(model)
    if run.tuning["bias_correction"] > sqnr:
        return model, built, run.tuning["bias_correction"]
    for bias, value in zip(built.biases, uncorrected):
        bias.set_value(value)
    built.corrected, run.correct = 0, False
    return model, built, sqnr


def build_protected(run: QuantRun, tensors: set[str]) -> tuple[ir.Model, Built, Plan]:
    """`build` with `tensors` kept out of 8 bits: in float together with the nodes around
    them (their `float_sets` in the unprotected plan), or as int16 activations."""
    if run.o.sensitive_type == "int16":
        return (*build(run, run.base_plan, wide=tensors), run.base_plan)
    sets = float_sets(run.base_plan)
    plan = run.plan(run.excluded | set().union(*(sets[t] for t in tensors)))
    return (*build(run, plan), plan)


def _coarse_tensors(run: QuantRun, plan: Plan, params: dict[str, QParams]) -> dict[str, float]:
    """Quantized tensors whose step drowns over COARSE_FRACTION of a typical channel's
    variation, with that fraction (see capture.ChannelMoments.coarse_fraction)."""
    coarse = {}
    for point in plan.points:
        moments, qparams = run.moments.get(point.name), params.get(point.name)
        if moments is None or qparams is None or np.size(qparams.scale) != 1:
            continue
        fraction = moments.coarse_fraction(float(np.asarray(qparams.scale).reshape(())))
        if fraction > COARSE_FRACTION:
            coarse[point.name] = round(fraction, 3)
    return coarse


def float_sets(plan: Plan) -> dict[str, set[str]]:
    """For each quantized tensor, the nodes to keep in float so that it stays float: the node
    computing it and every quantized node reading it (a Q/DQ pair stays wherever one side is
    still quantized)."""
    quantized = {id(n) for n in plan.quantized}
    owners = {result: node.name for node in plan.quantized if (result := plan.result_point(node))}
    sets = {}
    for point in plan.points:
        nodes = {u.name for u in ir.consumers(point) if id(u) in quantized}
        if point.name in owners:
            nodes.add(owners[point.name])
        sets[point.name] = nodes
    return sets


def _within_float_share(plan: Plan, coarse: dict[str, float]) -> dict[str, float]:
    """The coarsest tensors whose float sets together stay within COARSE_FLOAT_SHARE of the
    quantized nodes."""
    sets = float_sets(plan)
    budget = COARSE_FLOAT_SHARE * len(plan.quantized)
    kept, nodes = {}, set()
    for name, fraction in sorted(coarse.items(), key=lambda item: -item[1]):
        if len(nodes | sets[name]) <= budget:
            kept[name] = fraction
            nodes |= sets[name]
    return kept


__all__ = ["tuned_build", "first_build", "build_protected", "float_sets"]
