"""`quant`: static post-training quantization to QDQ, calibrated on data, placed for ORT's int8 kernels.

The pass's options live here; one run (`state.QuantRun`) goes through these steps, each in its
own module:
  prepare          float16 -> float32 compute, opset >= 13 (the manager runs `cleanup` first: BatchNorm folding)
  placement        which nodes run on integers, where Q/DQ go, which tensors share a scale
  collect          streaming min/max, histogram samples and channel moments of those tensors
  calibrate        ranges from those statistics (minmax/percentile/mse/entropy)
  build            integer weights (per channel), int32 biases, Q/DQ pairs on activations (written by `qdq`)
  rounding         weight_rounding=gram: weights rounded for the least layer-output error (Gram matrices)
  bias_correction  each layer's bias corrected by its mean error vs a float twin
  tuning           settings the defaults leave open (calibration method, bias correction, coarse
                   tensors kept out of 8 bits), chosen by the output SQNR on held-out calibration samples
  mixed            below mixed_sqnr dB: the tensors adding most output noise (measured one at a time)
                   kept out of 8 bits, within a latency budget
  sensitivity      per-tensor SQNR and the ranking of tensors by the noise they add
  fallback         sensitive tensors kept out of 8 bits until a drop budget holds (edgegraph.floor)
  report, speed    the pass's report; the latency check against the float model (and what is written
                   when int8 is slower: static._not_slower), first on tuning's first build (when int8
                   stays slower, float is written before any tuning), each model structure timed once
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from edgegraph import ir
from edgegraph.context import PassContext
from edgegraph.errors import CalibrationDataError
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.passes.cleanup import Cleanup
from edgegraph.passes.quant import mixed, numerics, prepare, report, sensitivity, speed
from edgegraph.passes.quant.build import build
from edgegraph.passes.quant.collect import collect
from edgegraph.passes.quant.fallback import budget_floor, fallback
from edgegraph.passes.quant.names import warn_unmatched
from edgegraph.passes.quant.numerics import QType
from edgegraph.passes.quant.state import QuantRun
from edgegraph.passes.quant.tuning import first_build, tuned_build
from edgegraph.registry import register_pass
from edgegraph.stats import model_stats

logger = logging.getLogger(__name__)

# Samples for bias correction, tuning and the per-layer table, unless the model is so heavy that
# ANALYSIS_MACS of forward passes allow fewer (each step runs a model on every one of them). A
# count, not a clock, so that the result does not depend on the machine's load: 80 GMACs are
# about the second of forward passes the earlier time budget allowed on the 2-core development
# machine (AGLLNet 256x256, 18.7 GMACs a sample: 4 samples; SqueezeNet, DeepLab, YOLOX: 8).
DEFAULT_ANALYSIS_SAMPLES = 8
ANALYSIS_MACS = 80e9


@register_pass
@dataclass(frozen=True)
class StaticQuantize(Pass):
    """Static int8 QDQ quantization calibrated on the calibration data.

    With `prepare` (the default) it wants BatchNorm and constant subgraphs folded first: `after()`
    asks the manager for `cleanup`. Called directly, outside `run_pipeline`, run `cleanup` first.
    """

    name: ClassVar[str] = "quant"
    summary: ClassVar[str] = "static int8 QDQ quantization (calibrated; per-channel weights; ORT-fusable placement)"
    exact: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})
    knob: ClassVar[str] = "layers kept out of 8 bits"

    method: Literal["auto", "minmax", "percentile", "mse", "entropy"] = option(
        "auto", "how activation ranges come from calibration data: minmax | percentile | mse | entropy (KL) | "
                "auto (mse, entropy and percentile are each tried; the best output SQNR on held-out samples wins)")
    percentile: float = option(99.999, "for method=percentile: the percentile of values kept on each side")
    per_channel: bool | Literal["target"] = option(
        "target", "one weight scale per output channel (needs opset >= 13; older models are upgraded); target: as "
                  "the target's scheme says (every profile: true)")
    weight_type: Literal["target", "int8", "uint8"] = option(
        "target", "weight type (symmetric; uint8 uses zero point 128); target: the target's scheme (int8 everywhere)")
    weight_method: Literal["minmax", "mse"] = option(
        "minmax", "weight ranges: minmax (absmax) | mse (per-channel clipping with the least error; on PP-OCRv4 rec, "
                  "whose weights carry half the output noise, strings unchanged 0.75/0.81 -> 0.77/0.79 on the held-out "
                  "splits with the rest of the defaults, and below the floors of tests on small fixtures: not the "
                  "default)")
    weight_rounding: Literal["nearest", "gram", "auto"] = option(
        "nearest", "integer weights by nearest rounding, or gram: rounded for the least layer-output error on the "
                   "layer's captured input (Gram matrix; AdaRound's objective, GPTQ's greedy solver; rounding.py); "
                   "auto: gram kept only when it raises the output SQNR on held-out samples")
    reduce_range: bool = option(
        False, "7-bit weights: avoids int16 saturation in u8s8 kernels on x86 CPUs without VNNI, costs precision")
    saturation_guard: Literal["reduce-range", "uint8-weights", "off"] = option(
        "reduce-range", "x86 CPUs without VNNI add uint8 x int8 products in saturating int16 pairs; layers whose "
                        "input codes are often above 128 (e.g. signed inputs, zero point ~128) get 7-bit weights "
                        "(reduce-range: fast u8s8 kernels) or uint8 weights (uint8-weights: exact but slower u8u8 "
                        "kernels); off: no guard")
    activation_type: Literal["target", "uint8", "int8", "int16"] = option(
        "target", "activation type; int16 needs opset 21 (or com.microsoft Q/DQ) and runs on float kernels; target: "
                  "the target's scheme (cpu, nnapi, qnn, openvino: uint8; tflite, xnnpack, tensorrt: int8; see "
                  "passes/quant/scheme.py)")
    symmetric_activations: bool | Literal["target"] = option(
        "target", "symmetric activation ranges; tensors that are never negative always use the full range; target: "
                  "the target's scheme (tensorrt: true)")
    exclude_ops: list[str] = option([], "op types kept in float")
    exclude_nodes: list[str] = option([], "node names kept in float")
    quantize_softmax: bool = option(False, "quantize Softmax too (its 8-bit output loses small probabilities)")
    elementwise: Literal["float", "integer"] = option(
        "float", "elementwise ops between the integer kernels (Add, Mul, Sigmoid, LeakyRelu): float runs them in "
                 "float between their inputs' DequantizeLinear and the next kernel's QuantizeLinear, so a chain of "
                 "them (HardSwish and a learned scalar affine in PP-OCRv4, SiLU in YOLOX: as com.microsoft "
                 "QuickGelu where the target runs it) is rounded once; integer runs each on an int8 kernel and "
                 "rounds each result to 8 bits (PP-OCRv4 det on the held-out splits, mixed precision as before: "
                 "16.1/15.6 dB integer, 18.4/17.6 float; YOLOX-nano F1 0.85/0.78 integer, 0.88/0.82 float, and its "
                 "int8 faster than fp32 only with float)")
    bias_correction: bool | Literal["auto"] = option(
        "auto", "correct each layer's bias by the mean error its integer weights and its input's rounding / "
                "clipping add; auto: kept only when it raises the output SQNR on held-out samples")
    keep_coarse: bool = option(
        True, "keep out of 8 bits (see sensitive_type) the tensors whose per-tensor step is coarse next to most "
              "of their channels' variation (e.g. a detector's stem), when that raises the output SQNR on held-out "
              "samples by 1 dB")
    sensitive_type: Literal["float", "int16"] = option(
        "float", "how tensors kept out of 8 bits (keep_coarse, max_drop / min_sqnr) are kept: float, with the "
                 "nodes around them, or int16 activations (for NPUs that run 16-bit activations but not float, "
                 "e.g. QNN's a16w8; needs opset 21 or com.microsoft Q/DQ; ORT's CPU runs such layers in float)")
    mixed: Literal["auto", "off"] = option(
        "auto", "mixed precision by measured sensitivity: when the output SQNR on held-out samples is below "
                "mixed_sqnr, the tensors whose quantization adds most output noise (each measured alone) are kept "
                "out of 8 bits (see sensitive_type), within mixed_latency; off: never")
    mixed_sqnr: float = option(20.0, "for mixed=auto: the output SQNR (dB) below which sensitive tensors are kept "
                                     "out of 8 bits")
    mixed_latency: float = option(1.0, "for mixed=auto: the latency budget, as a multiple of the float model's "
                                       "(1 thread; only checked when timing is on)")
    max_drop: float | None = option(
        None, "allowed drop in argmax/top-1 agreement with the float model (e.g. 0.01); the most sensitive tensors "
              "are kept out of 8 bits (see sensitive_type) until it holds on the calibration data")
    min_sqnr: float | None = option(
        None, "minimum output SQNR in dB vs the float model; sensitive tensors are kept out of 8 bits as for max_drop")
    calib_samples: int = option(0, "calibration samples to use (0 = all)")
    analysis_samples: int = option(
        0, "samples used for bias correction, tuning, the per-layer table and sensitivity (0 = 8, or fewer, "
           "down to 2, for models above 10 GMACs a sample: 80 GMACs of forward passes in all)")
    prepare: bool = option(True, "have the exact `cleanup` pass run first, unless it just ran (folds BatchNorm and "
                                 "constants)")
    check_speed: bool = option(True, "time the result against the float model in ORT (not with --runs 0); when it "
                                     "is not faster, keep in float what int8 makes slower, and if that does not help "
                                     "either, see if_slower")
    if_slower: Literal["float", "int8"] = option(
        "float", "when the int8 model stays slower than float in the speed check: float writes the float model "
                 "(after cleanup) instead, with a warning; int8 keeps the slower int8 model")

    def __post_init__(self) -> None:
        self.check(0.0 < self.percentile < 100.0, f"quant: percentile must be in (0, 100), got {self.percentile}")
        self.check(self.calib_samples >= 0, f"quant: calib_samples must be >= 0, got {self.calib_samples}")
        self.check(self.analysis_samples >= 0, f"quant: analysis_samples must be >= 0, got {self.analysis_samples}")
        self.check(self.max_drop is None or 0.0 <= self.max_drop < 1.0,
                   f"quant: max_drop must be in [0, 1), got {self.max_drop}")
        self.check(np.isfinite(self.mixed_sqnr), "quant: mixed_sqnr must be a finite number")
        self.check(self.mixed_latency > 0, f"quant: mixed_latency must be > 0, got {self.mixed_latency}")
        self.check(self.min_sqnr is None or np.isfinite(self.min_sqnr), "quant: min_sqnr must be a finite number")
        for kind, values in (("exclude_ops", self.exclude_ops), ("exclude_nodes", self.exclude_nodes)):
            self.check(all(isinstance(v, str) and v for v in values), f"quant: {kind} must be a list of names")

    def after(self) -> tuple[Pass, ...]:
        # Placement wants BatchNorm folded into its Conv and constant subgraphs folded.
        return (Cleanup(),) if self.prepare else ()

    @property
    def activation_qtype(self) -> QType:
        return numerics.qtype(self.activation_type)

    @property
    def weight_qtype(self) -> QType:
        return numerics.qtype(self.weight_type)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _run(QuantRun(self, ctx), model)


def _run(run: QuantRun, model: ir.Model) -> PassResult:
    """The steps of one run in order (see the module docstring)."""
    if run.ctx.calibration is None:  # run_pipeline checks this; direct callers may not
        raise CalibrationDataError("quant needs calibration data")
    start = time.perf_counter()
    original = model.graph
    model.graph = model.copy().graph  # preparation edits this copy; `original` comes back if nothing quantizes
    prepare.prepare_model(run, model)
    budget = budget_floor(run)
    run.start(model.to_proto(), hold_out=bool(budget))
    run.domain = prepare.qdq_domain(run, model)
    run.excluded = excluded = set(run.o.exclude_nodes)
    warn_unmatched("quant: exclude_nodes", run.o.exclude_nodes, model.graph, ops=False, nodes=True)
    warn_unmatched("quant: exclude_ops", run.o.exclude_ops, model.graph, ops=True, nodes=False)
    plan = run.base_plan = run.plan(excluded)
    run.timings["prepare"] = time.perf_counter() - start
    if not plan.quantized:
        logger.warning("quant: nothing to quantize (no supported op with float inputs); the model is unchanged")
        model.graph = original
        return PassResult(False, {"quantized_nodes": 0}, {"float_nodes": plan.skipped})
    run.stats = collect(run, plan, [p.name for p in plan.points], "quant: calibrating", "calibrate")
    run.macs = _sample_macs(run)
    run.analysis_count = run.o.analysis_samples or _affordable_samples(run)
    first = None
    if run.o.check_speed and run.ctx.timing and run.o.if_slower == "float":
        # Ranges and biases change no kernel: whether int8 is faster shows on the first build
        # already, and when it is not, tuning and mixed precision would work on a model that
        # is not written (PP-OCR cls, YOLOX on the development machine).
        first = first_build(run, plan)
        *faster, latency = _not_slower(run, *first, plan)
        if latency.get("wrote") == "float":
            return _wrote_float(run, model, original, latency)
        if faster[2] is not plan:
            # Faster with the nodes int8 slows kept float: tuning and mixed precision work on
            # that model, the one written (YOLOX-nano: mixed precision was never tried, as the
            # model with every node int8 was over its latency budget).
            run.excluded = run.excluded | speed.slow_nodes(plan)
            first, plan = (faster[0], faster[1]), faster[2]
            run.base_plan = plan
    quant, built, plan = tuned_build(run, plan, first)
    quant, built, plan = mixed.protect(run, quant, built, plan)
    errors, kept = None, []
    if budget:
        errors = sensitivity.errors(run, quant, built)
        quant, built, plan, errors, kept = fallback(run, quant, built, plan, errors, budget)
    latency = None
    if run.o.check_speed and run.ctx.timing:  # (`--runs 0`: no timing at all)
        timed = quant
        quant, built, plan, latency = _not_slower(run, quant, built, plan)
        if latency.get("wrote") == "float":
            return _wrote_float(run, model, original, latency)
        if quant is not timed:
            errors = None
    if errors is None:  # (measured once the model is settled: not for a model the speed check drops)
        errors = sensitivity.errors(run, quant, built)
    model.graph = quant.graph
    if all(ir.is_standard(node) for node in ir.iter_nodes(model.graph)):
        # What onnx can infer again (every op is standard) needs no value_info: it was 2-6%
        # of the quantized PP-OCR classifier and MNIST files.
        ir.forget_intermediate_types(model.graph, dtypes=True)
    return report.result(run, model, plan, built, errors, kept, latency)


def _wrote_float(run: QuantRun, model: ir.Model, original, latency: dict) -> PassResult:
    """The result when int8 stays slower than float (if_slower=float): the float model."""
    model.graph = original
    # (The stats carry no timings: the same run on a busier machine gives the same report.)
    warning = ("int8 was slower than float here, also with the ops int8 slows kept float: wrote the float "
               "model; quant(if_slower=int8) keeps int8")
    logger.warning("quant: %s (%.3g ms vs %.3g ms, 1 thread)", warning, latency["quantized_ms"], latency["float_ms"])
    return PassResult(False, {"quantized_nodes": 0, "warning": warning}, {"latency": latency, "notes": run.notes})


def _not_slower(run: QuantRun, quant, built, plan):
    """The speed check, and what to do when int8 is not faster than float: the same model with
    the nodes int8 makes slower kept in float (speed.slow_nodes), if that is faster; else the
    float model (latency["wrote"] = "float") unless if_slower=int8. Only this step's output
    depends on the machine (and mixed precision's latency budget): with check_speed=false or
    --runs 0 it does not run."""
    latency = speed.speed_check(run, quant, built, warn=False)
    if not latency or speed.faster(latency):
        return quant, built, plan, latency
    slow = speed.slow_nodes(plan)
    if slow:
        kept_float = {n.name for n in run.base_plan.quantized} - {n.name for n in plan.quantized}
        trial_plan = run.plan(run.excluded | kept_float | slow)
        if trial_plan.quantized:
            trial, trial_built = build(run, trial_plan)
            timed = speed.speed_check(run, trial, trial_built, warn=False)
            latency["slow_ops_in_float"] = {"nodes": len(slow), **timed}
            if speed.faster(timed):
                note = (f"int8 was not faster than float; kept {len(slow)} nodes int8 makes slower in float "
                        "(depthwise Conv, Mul, MaxPool, GlobalAveragePool)")
                if note not in run.notes:  # (the check before tuning may have found the same)
                    run.notes.append(note)
                return trial, trial_built, trial_plan, {**latency, **timed}
    if run.o.if_slower == "float":
        return quant, built, plan, {**latency, "wrote": "float"}
    logger.warning("quant: the quantized model is not faster than float in onnxruntime on this machine "
                   "(%.2f ms vs %.2f ms, 1 thread); its gain here is size only", latency["quantized_ms"],
                   latency["float_ms"])
    return quant, built, plan, latency


def _affordable_samples(run: QuantRun) -> int:
    """Analysis samples for analysis_samples=0: 8, or as many as ANALYSIS_MACS of forward
    passes allow (MACs at the calibration data's shape), at least 2."""
    return int(np.clip(ANALYSIS_MACS // max(run.macs, 1), 2, DEFAULT_ANALYSIS_SAMPLES))


def _sample_macs(run: QuantRun) -> int:
    """The known MACs of one forward pass at the calibration data's shape."""
    feeds = next(run.batches(run.calib.take(1)))
    shapes = {name: np.shape(value) for name, value in feeds.items()}
    return model_stats(run.float_proto, fix_shapes=shapes, feeds=feeds).macs_known


__all__ = ["StaticQuantize"]
