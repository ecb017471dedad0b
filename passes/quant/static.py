"""`quant`: static post-training quantization to QDQ, calibrated on data, placed for ORT's int8 kernels.

Steps (each in its own module):
  prepare    float16 -> float32 compute, opset >= 13 (the manager runs `cleanup` first: BatchNorm folding)
  placement  which nodes run on integers, where Q/DQ go, which tensors share a scale
  calibrate  streaming min/max + histograms of those tensors -> ranges (minmax/percentile/mse/entropy)
  qdq        integer weights (per channel), int32 biases, Q/DQ pairs on activations
  analysis   bias correction, per-layer SQNR, sensitivity fallback for a drop budget

Settings the defaults leave open (calibration method, bias correction, coarse tensors kept out of
8 bits) are chosen here by the output SQNR they give on held-out calibration samples.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgegraph import floor, ir, runtime, verify
from edgegraph.analysis import capture
from edgegraph.stats import is_quantized, model_stats
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import CalibrationDataError, EdgegraphError
from edgegraph.floor import Floor
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.registry import register_pass
from edgegraph.passes.cleanup import Cleanup
from edgegraph.passes.quant import analysis, calibrate, numerics, prepare
from edgegraph.passes.quant.names import shorten, warn_unmatched
from edgegraph.passes.quant.numerics import QType
from edgegraph.passes.quant.placement import ANCHORS, SHARED, Plan, clip_bounds, make_plan, output_channels
from edgegraph.passes.quant.qdq import (QdqWriter, QParams, QuantizedBias, QuantizedWeight, fit_bias, quantize_weight,
                                        weight_params)

logger = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`
INT16_OPSET = 21  # 16-bit and 4-bit types in ai.onnx Q/DQ
MS_DOMAIN = "com.microsoft"
# A float32 slack ORT allows when it checks that a Q range lies within a Clip's range.
_CLIP_EPS = float(np.finfo(np.float32).eps)
# Share of a layer's input values allowed above u8 code 128 before `saturation_guard` acts.
SATURATION_FRACTION = 0.01
# Samples for bias correction, tuning and the per-layer table, unless the model is so heavy that
# ANALYSIS_MACS of forward passes allow fewer (each step runs a model on every one of them). A
# count, not a clock, so that the result does not depend on the machine's load: 80 GMACs are
# about the second of forward passes the earlier time budget allowed on the 2-core development
# machine (AGLLNet 256x256, 18.7 GMACs a sample: 4 samples; SqueezeNet, DeepLab, YOLOX: 8).
DEFAULT_ANALYSIS_SAMPLES = 8
ANALYSIS_MACS = 80e9
# Wall time the speed check spends timing, beyond one warm-up run of each model.
SPEED_CHECK_SECONDS = 1.0
# Calibration samples that per-channel variances are estimated from.
MOMENT_SAMPLES = 8
# `keep_coarse`: a tensor is coarse when its step drowns this share of a typical channel's
# variation (capture.ChannelMoments.coarse_fraction), and kept out of 8 bits when that raises the
# output SQNR by at least FLOAT_GAIN_DB (float or 16-bit layers cost speed).
COARSE_FRACTION = 0.05
FLOAT_GAIN_DB = 1.0
# ... and at most this share of the quantized nodes goes float for them (the coarsest first):
# calibration data that barely varies (one image plus noise) makes many tensors look coarse.
COARSE_FLOAT_SHARE = 0.25
# Worst output SQNR (dB, held-out calibration samples) below which the result is called degraded:
# the pass reaches 25-45 dB on the shared CNNs, classifiers keep their top-1 down to ~20 dB.
LOW_SQNR_DB = 15.0
COSTLIEST_SHOWN = 3  # layers named in that warning


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
    per_channel: bool = option(True, "one weight scale per output channel (needs opset >= 13; older models are upgraded)")
    weight_type: Literal["int8", "uint8"] = option("int8", "weight type (symmetric; uint8 uses zero point 128)")
    weight_method: Literal["minmax", "mse"] = option(
        "minmax", "weight ranges: minmax (absmax) | mse (per-channel clipping with the least error)")
    reduce_range: bool = option(
        False, "7-bit weights: avoids int16 saturation in u8s8 kernels on x86 CPUs without VNNI, costs precision")
    saturation_guard: Literal["reduce-range", "uint8-weights", "off"] = option(
        "reduce-range", "x86 CPUs without VNNI add uint8 x int8 products in saturating int16 pairs; layers whose "
                        "input codes are often above 128 (e.g. signed inputs, zero point ~128) get 7-bit weights "
                        "(reduce-range: fast u8s8 kernels) or uint8 weights (uint8-weights: exact but slower u8u8 "
                        "kernels); off: no guard")
    activation_type: Literal["uint8", "int8", "int16"] = option(
        "uint8", "activation type; int16 needs opset 21 (or com.microsoft Q/DQ) and runs on float kernels")
    symmetric_activations: bool = option(
        False, "symmetric activation ranges; tensors that are never negative always use the full range")
    exclude_ops: list[str] = option([], "op types kept in float")
    exclude_nodes: list[str] = option([], "node names kept in float")
    quantize_softmax: bool = option(False, "quantize Softmax too (its 8-bit output loses small probabilities)")
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
    check_speed: bool = option(True, "time the result against the float model in ORT and warn if it is not faster "
                                     "(not with --runs 0)")

    def __post_init__(self) -> None:
        self.check(0.0 < self.percentile < 100.0, f"quant: percentile must be in (0, 100), got {self.percentile}")
        self.check(self.calib_samples >= 0, f"quant: calib_samples must be >= 0, got {self.calib_samples}")
        self.check(self.analysis_samples >= 0, f"quant: analysis_samples must be >= 0, got {self.analysis_samples}")
        self.check(self.max_drop is None or 0.0 <= self.max_drop < 1.0,
                   f"quant: max_drop must be in [0, 1), got {self.max_drop}")
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
        return _Quantizer(self, ctx).run(model)


class _Quantizer:
    """One run of the pass: the prepared float model, its statistics, and what was built from them."""

    def __init__(self, options: StaticQuantize, ctx: PassContext):
        self.o = options
        self.ctx = ctx
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.budget: dict | None = None
        self.method = options.method  # "auto" is resolved by _tuned_build
        self.correct = options.bias_correction is True
        self.tuning: dict[str, float] = {}  # output SQNR (dB) of each setting tried
        self.moments: dict[str, capture.ChannelMoments] = {}  # per-channel statistics of quantized tensors
        self.coarse: dict[str, float] = {}  # coarse tensors kept out of 8 bits -> their coarse fraction
        self._held_out: list | None = None  # batches `_score` runs on, and the float model's outputs
        self._reference: list | None = None

    def run(self, model: ir.Model) -> PassResult:
        if self.ctx.calibration is None:  # run_pipeline checks this; direct callers may not
            raise CalibrationDataError("quant needs calibration data")
        start = time.perf_counter()
        original = model.graph
        model.graph = model.copy().graph  # preparation edits this copy; `original` comes back if nothing quantizes
        self._prepare(model)
        self.float_proto = model.to_proto()
        self.float_tensors = ir.from_proto(self.float_proto, infer=False).graph.tensors()
        self.specs = runtime.input_specs(self.float_proto)
        self.calib = self._calibration_set()
        self.domain = self._qdq_domain(model)
        self.excluded = excluded = set(self.o.exclude_nodes)
        warn_unmatched("quant: exclude_nodes", self.o.exclude_nodes, model.graph, ops=False, nodes=True)
        warn_unmatched("quant: exclude_ops", self.o.exclude_ops, model.graph, ops=True, nodes=False)
        plan = self.base_plan = self._plan(excluded)
        self.timings["prepare"] = time.perf_counter() - start
        if not plan.quantized:
            logger.warning("quant: nothing to quantize (no supported op with float inputs); the model is unchanged")
            model.graph = original
            return PassResult(False, {"quantized_nodes": 0}, {"float_nodes": plan.skipped})
        self.stats = self._collect(plan, [p.name for p in plan.points], "quant: calibrating", "calibrate")
        self.analysis_count = self.o.analysis_samples or self._affordable_samples()
        quant, built, plan = self._tuned_build(plan)
        errors = self._errors(quant, built)
        fallback: list[str] = []
        budget = self._floor()
        if budget:
            quant, built, plan, errors, fallback = self._fallback(quant, built, plan, errors, budget)
        model.graph = quant.graph
        if all(ir.is_standard(node) for node in ir.iter_nodes(model.graph)):
            # What onnx can infer again (every op is standard) needs no value_info: it was 2-6%
            # of the quantized PP-OCR classifier and MNIST files.
            ir.forget_intermediate_types(model.graph, dtypes=True)
        return self._result(model, plan, built, errors, fallback)

    # -- preparation ---------------------------------------------------------------------------

    def _prepare(self, model: ir.Model) -> None:
        if prepare.compute_in_float32(model):
            self.notes.append("float16 model: quantized from float32 compute, float16 interface kept")
        needed = INT16_OPSET if self._may_use_int16 else (PER_CHANNEL_OPSET if self.o.per_channel else 10)
        original = model.opset
        if model.opset < needed:
            check = self._unchanged_outputs(model.to_proto())
            upgraded = prepare.upgrade_opset(model, needed, check)
            if upgraded is None and needed == INT16_OPSET:
                upgraded = prepare.upgrade_opset(model, PER_CHANNEL_OPSET, check)
            if upgraded is None and model.opset < 10:
                raise EdgegraphError(f"quant: the model's opset {model.opset} has no QuantizeLinear and could not be "
                                     "upgraded to opset 10 or later")
            if upgraded is not None:
                model.graph = upgraded.graph
                self.notes.append(f"opset upgraded from {original} to {model.opset}")
        if self.o.per_channel and model.opset < PER_CHANNEL_OPSET:
            self.notes.append(f"per-tensor weights: opset {model.opset} has no per-channel DequantizeLinear")
        _name_nodes(model.graph)
        model.refresh_shapes()

    def _unchanged_outputs(self, before: onnx.ModelProto):
        """A check that a converted model gives the same outputs as `before` on a few calibration
        samples (onnx's version converter has changed semantics before, e.g. Upsample -> Resize)."""
        def check(after: onnx.ModelProto) -> bool:
            specs = runtime.input_specs(before)
            # A converter's semantic change shows on any input: two samples are enough.
            data = self.ctx.calibration.take(min(self.ctx.verify.samples, 2))
            batches = [runtime.adapt_feeds(specs, b) for b in data.batches(runtime.batch_size_for(specs, 4))]
            try:
                reference = runtime.outputs(before, batches, threads=self.ctx.threads, optimize=False)
                candidate = runtime.outputs(after, batches, threads=self.ctx.threads, optimize=False)
            except Exception as exc:  # noqa: BLE001 - a model that does not run is not unchanged
                logger.debug("quant: opset check failed to run: %s", exc)
                return False
            metrics = verify.compare_all(reference, candidate)
            return verify.exactness_violation(metrics, self.ctx.verify.rtol * 10, self.ctx.verify.atol * 10) is None
        return check

    @property
    def _may_use_int16(self) -> bool:
        return self.o.activation_type == "int16" or self.o.sensitive_type == "int16"

    def _qdq_domain(self, model: ir.Model) -> str:
        """The domain of 16-bit Q/DQ nodes: ai.onnx from opset 21, else com.microsoft."""
        if self._may_use_int16 and model.opset < INT16_OPSET:
            self.notes.append("int16 activations use com.microsoft QuantizeLinear/DequantizeLinear (opset < 21)")
            return MS_DOMAIN
        return ""

    def _calibration_set(self) -> CalibrationData:
        data = self.ctx.calibration
        if self.o.calib_samples:
            data = data.take(self.o.calib_samples)
        if len(data) == 0:
            raise CalibrationDataError("quant: the calibration data has no samples")
        return data

    def _batches(self, data: CalibrationData):
        """Batches of up to 8 samples (1 when the model's batch axis is fixed), cast to the input types."""
        size = runtime.batch_size_for(self.specs, 8)
        return (runtime.adapt_feeds(self.specs, b) for b in data.batches(size))

    def _progress(self, data: CalibrationData, desc: str):
        total = -(-len(data) // runtime.batch_size_for(self.specs, 8))
        return lambda it, **_: self.ctx.progress_bar(it, total=total, desc=desc)

    def _plan(self, float_nodes: set[str]) -> Plan:
        graph = ir.from_proto(self.float_proto, infer=False).graph
        ops = set(self.ctx.target.quantized_ops) - set(self.o.exclude_ops)
        if not self.o.quantize_softmax:
            ops.discard("Softmax")
        opset = int(graph.opset)
        return make_plan(graph, ops, float_nodes, self.o.per_channel and opset >= PER_CHANNEL_OPSET)

    # -- calibration ---------------------------------------------------------------------------

    def _collect(self, plan: Plan, names: list[str], desc: str, timing: str) -> dict[str, capture.RangeStats]:
        """The exact extremes and a strided sample of each tensor, streamed out of the float model
        (capture.Probe).

        Tensors whose statistics follow from another probed tensor are not read out of ORT: the
        output of a data-movement op in its input's scale group (`_within_group`; it gets no
        entry), and a Sigmoid output (the sigmoid of its input's sample and extremes).
        """
        start = time.perf_counter()
        tensors = self.float_tensors
        inputs = {s.name for s in self.specs} & set(names)
        wanted = set(names) - self._within_group(plan)
        derived: dict[str, str] = {}  # Sigmoid output -> its probed input
        for name in wanted:
            producer = ir.producer(tensors[name]) if name in tensors else None
            if producer is not None and producer.op == "Sigmoid" and producer.inputs[0].name in wanted:
                derived[name] = producer.inputs[0].name
        probe = capture.Probe(self.float_proto)
        reads, steps = {}, {}
        for name in wanted - inputs - set(derived):
            shape = tensors[name].shape if name in tensors else None
            size = int(np.prod([d for d in (shape or [])[1:] if isinstance(d, int) and d > 0], dtype=np.int64))
            steps[name] = capture.sample_step(size) if shape else 1
            reads[name] = probe.range_sample(name, steps[name])

        # Skipped tensors get no entry: a later plan that splits their group measures them then.
        stats = {name: capture.RangeStats() for name in names if name in wanted}
        stream = probe.run_with_feeds(self._batches(self.calib), self.ctx.threads)
        channel_ids = {}  # (tensor, sample length) -> channel of each sampled value
        seen = 0
        try:
            for feeds, out in self._progress(self.calib, desc)(stream):
                values = {}  # what the histograms get: a sample (with its stride) or a whole input
                for name, (sample, low, high) in reads.items():
                    stats[name].update(out[sample], out[low], out[high])
                    values[name] = (out[sample], steps[name])
                for name in inputs:
                    stats[name].update(feeds[name])
                    values[name] = (feeds[name], 1)
                for name, source in derived.items():
                    if source in reads:
                        sample, low, high = (out[r] for r in reads[source])
                        values[name] = (calibrate.sigmoid(sample), steps[source])
                        stats[name].update(values[name][0], _sigmoid(float(low)), _sigmoid(float(high)))
                    else:
                        values[name] = (calibrate.sigmoid(feeds[source]), 1)
                        stats[name].update(values[name][0])
                if seen < MOMENT_SAMPLES:  # per-channel variances settle long before ranges do
                    for name, (sample, step) in values.items():
                        self._update_moments(name, sample, step, channel_ids)
                seen += runtime.batch_length(self.specs, feeds)
        except CalibrationDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT rejects the data (shapes, dtypes)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CalibrationDataError(f"quant: the model does not run on the calibration data ({message})") from None
        self.timings[timing] = self.timings.get(timing, 0.0) + time.perf_counter() - start
        return stats

    def _update_moments(self, name: str, values: np.ndarray, step: int, channel_ids: dict) -> None:
        """Per-channel moments of a tensor from its flat strided sample (for `_coarse_tensors`);
        tensors without a static shape past the batch axis have none."""
        shape = self.float_tensors[name].shape if name in self.float_tensors else None
        if not shape or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return
        channels = shape[capture.ChannelMoments.channel_axis(shape)]
        key = (name, values.size)
        if key not in channel_ids:
            ids = capture.ChannelMoments.channel_ids(shape, np.arange(values.size, dtype=np.int64) * step)
            channel_ids[key] = (ids, np.bincount(ids, minlength=channels))
        if name not in self.moments:
            self.moments[name] = capture.ChannelMoments(channels)
        self.moments[name].update(values, *channel_ids[key])

    def _affordable_samples(self) -> int:
        """Analysis samples for analysis_samples=0: 8, or as many as ANALYSIS_MACS of forward
        passes allow (MACs at the calibration data's shape), at least 2."""
        feeds = next(self._batches(self.calib.take(1)))
        shapes = {name: np.shape(value) for name, value in feeds.items()}
        macs = model_stats(self.float_proto, fix_shapes=shapes, feeds=feeds).macs_known
        return int(np.clip(ANALYSIS_MACS // max(macs, 1), 2, DEFAULT_ANALYSIS_SAMPLES))

    def _within_group(self, plan: Plan) -> set[str]:
        """Outputs of data-movement ops that share their input's scale: their values are a subset
        of the group's, so they need no statistics of their own."""
        skip = set()
        for point in plan.points:
            tensor = self.float_tensors.get(point.name)
            producer = ir.producer(tensor) if tensor is not None else None
            if producer is not None and producer.op in SHARED and producer.inputs:
                source = producer.inputs[0].name
                if source in plan.groups and plan.groups[source] == plan.groups[point.name]:
                    skip.add(point.name)
        return skip

    # -- building ------------------------------------------------------------------------------

    def _group_params(self, plan: Plan, wide: set[str] | frozenset[str]) -> dict[str, QParams]:
        """QParams per point: one per shared-scale group, fitted inside folded Relu/Clip ranges;
        int16 for groups holding a `wide` tensor."""
        params: dict[str, QParams] = {}
        self.group_stats: dict[str, capture.RangeStats] = {}
        for members in plan.group_members().values():
            qt = numerics.qtype("int16") if wide.intersection(members) else self.o.activation_qtype
            merged = capture.RangeStats()
            for name in members:
                if name in self.stats:
                    merged.merge_from(self.stats[name])
                self.group_stats[name] = merged
            readers = {plan.activations.get(m) for m in members}
            transfer = calibrate.transfer(*readers.pop()) if len(readers) == 1 and None not in readers else None
            lo, hi = calibrate.activation_range(merged, self.method, qt, self.o.symmetric_activations,
                                                self.o.percentile, transfer)
            bounds = [plan.clips[m] for m in members if m in plan.clips]
            floor = max((b[0] for b in bounds), default=-np.inf)
            ceiling = min((b[1] for b in bounds), default=np.inf)
            lo, hi = max(lo, floor), min(hi, ceiling)
            # Never-negative tensors keep the full range (zero point at qmin), which also lets ORT
            # drop a Relu in front of the Q; the others are symmetric only when asked.
            scale, zero = numerics.scale_zero_point(lo, hi, qt, self.o.symmetric_activations and lo < 0)
            shared = QParams(_fit_inside(scale, zero, qt, floor, ceiling), zero, qt)
            params.update({name: shared for name in members})
        return params

    def _tuned_build(self, plan: Plan) -> tuple[ir.Model, _Built, Plan]:
        """`_build` with the settings that give the best output SQNR on held-out calibration
        samples (the last ones; bias correction is fitted on the first), trying in turn:

          the calibration method   no one method wins everywhere (entropy on YOLOX, mse on
                                   SqueezeNet / DeepLab)
          bias correction          helps some models and hurts others
          coarse tensors           tensors whose per-tensor step drowns most of their channels'
                                   variation, kept out of 8 bits (YOLOX's stem: F1 0.55 -> 0.85
                                   with 4 nodes float), only for a gain of FLOAT_GAIN_DB, as
                                   float or 16-bit layers cost speed

        Settings fixed by options are not tried."""
        start = time.perf_counter()
        model, built, sqnr = self._tune_ranges(plan)
        coarse = self._coarse_tensors(plan, built.params) if self.o.keep_coarse else {}
        if coarse and self.o.sensitive_type == "float":
            coarse = _within_float_share(plan, coarse)
        if coarse:
            sqnr = self._score(model) if sqnr is None else sqnr
            trial, trial_built, trial_plan = self._build_protected(set(coarse))
            self.tuning["keep_coarse"] = self._score(trial)
            if self.tuning["keep_coarse"] >= sqnr + FLOAT_GAIN_DB and trial_plan.quantized:
                model, built, plan = trial, trial_built, trial_plan
                self.coarse = coarse
        self.timings["tuning"] = time.perf_counter() - start - self.timings.get("bias_correction", 0.0)
        return model, built, plan

    def _tune_ranges(self, plan: Plan) -> tuple[ir.Model, _Built, float | None]:
        """The calibration method and bias correction step of `_tuned_build`: the model, what
        was built, and its score (None when nothing was measured)."""
        methods = calibrate.AUTO_METHODS if self.o.method == "auto" else (self.o.method,)
        if len(methods) == 1 and self.o.bias_correction != "auto":
            return (*self._build(plan), None)
        self.correct = False
        best = None
        for method in methods:
            self.method = method
            model, built = self._build(plan)
            self.tuning[method] = self._score(model)
            if best is None or self.tuning[method] > best[0]:
                best = (self.tuning[method], method, model, built)
        sqnr, self.method, model, built = best
        if self.o.bias_correction is False or not built.biases:
            return model, built, sqnr
        uncorrected = [b.float_value for b in built.biases]
        self._correct_biases(model, built)
        self.correct = True
        if self.o.bias_correction is True:
            return model, built, None  # measured before the correction
        self.tuning["bias_correction"] = self._score(model)
        if self.tuning["bias_correction"] > sqnr:
            return model, built, self.tuning["bias_correction"]
        for bias, value in zip(built.biases, uncorrected):
            bias.set_value(value)
        built.corrected, self.correct = 0, False
        return model, built, sqnr

    def _build_protected(self, tensors: set[str]) -> tuple[ir.Model, _Built, Plan]:
        """`_build` with `tensors` kept out of 8 bits: in float together with the nodes around
        them (their `_float_sets` in the unprotected plan), or as int16 activations."""
        if self.o.sensitive_type == "int16":
            return (*self._build(self.base_plan, wide=tensors), self.base_plan)
        float_sets = _float_sets(self.base_plan)
        plan = self._plan(self.excluded | set().union(*(float_sets[t] for t in tensors)))
        return (*self._build(plan), plan)

    def _coarse_tensors(self, plan: Plan, params: dict[str, QParams]) -> dict[str, float]:
        """Quantized tensors whose step drowns over COARSE_FRACTION of a typical channel's
        variation, with that fraction (see capture.ChannelMoments.coarse_fraction)."""
        coarse = {}
        for point in plan.points:
            moments, qparams = self.moments.get(point.name), params.get(point.name)
            if moments is None or qparams is None or np.size(qparams.scale) != 1:
                continue
            fraction = moments.coarse_fraction(float(np.asarray(qparams.scale).reshape(())))
            if fraction > COARSE_FRACTION:
                coarse[point.name] = round(fraction, 3)
        return coarse

    def _score(self, model: ir.Model) -> float:
        """The worst output SQNR (dB) of a model vs the float model on the held-out samples."""
        if self._reference is None:
            data = self.calib.take(self.analysis_count, start=max(0, len(self.calib) - self.analysis_count))
            self._held_out = list(self._batches(data))
            self._reference = runtime.outputs(self.float_proto, self._held_out, threads=self.ctx.threads)
        candidate = runtime.outputs(model.to_proto(), self._held_out, threads=self.ctx.threads)
        return verify.worst_sqnr_db(self._reference, candidate)

    def _build(self, plan: Plan, wide: set[str] | frozenset[str] = frozenset()) -> tuple[ir.Model, _Built]:
        """A quantized copy of the prepared float model following `plan` (with self.method ranges),
        bias-corrected when self.correct."""
        skipped = self._within_group(plan)
        missing = [p.name for p in plan.points if p.name not in self.stats and p.name not in skipped]
        if missing:  # a fallback plan can expose tensors the first plan did not quantize
            self.stats.update(self._collect(plan, missing, "quant: calibrating", "calibrate"))
        model = ir.from_proto(self.float_proto, infer=False)
        graph = model.graph
        by_name = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        params = self._group_params(plan, wide)
        writer = QdqWriter(graph, self.domain)
        built = _Built(params, writer, quantized=[n.name for n in plan.quantized], activations=plan.activations)

        # Weights and biases first: a bias scale needs the scale of the node's input activation.
        biased = {b.node.name for b in plan.biases}
        for slot in plan.weights:
            node = by_name[slot.node.name]
            _fold_gemm_scalars(node)
            value = ir.constant_value(node.inputs[slot.index]).astype(np.float32)
            input_params = params.get(node.inputs[0].name)
            weight_type, reduce_range = self.o.weight_qtype, self.o.reduce_range
            if self._saturates(node, input_params):
                built.guarded.append(node.name)
                if self.o.saturation_guard == "uint8-weights":
                    weight_type = numerics.qtype("uint8")
                else:
                    reduce_range = True
            wparams = weight_params(value, slot, weight_type, reduce_range, self.o.weight_method)
            bias = _bias_value(node, value) if node.name in biased and input_params is not None else None
            if bias is not None:
                wparams = fit_bias(wparams, bias, input_params.scale)
            codes = writer.constant(node, slot.index, value, wparams, quantize_weight(value, wparams))
            weight = QuantizedWeight(node, slot.index, value, wparams, codes)
            built.weights.append(weight)
            if bias is not None:
                built.biases.append(writer.bias(node, weight, bias, input_params.scale))
        for plan_node, index in plan.constants:
            node = by_name[plan_node.name]
            value = ir.constant_value(node.inputs[index]).astype(np.float32)
            qt = self.o.activation_qtype
            scale, zero = numerics.scale_zero_point(value.min(initial=0.0), value.max(initial=0.0), qt, False)
            writer.constant(node, index, value, QParams(scale, zero, qt))
        quantized = {id(by_name[name]) for name in built.quantized}
        for point in plan.points:
            writer.activation(tensors[point.name], params[point.name], quantized)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if self.correct and built.biases:
            self._correct_biases(model, built)
        return model, built

    def _saturates(self, node: gs.Node, input_params: QParams | None) -> bool:
        """Whether this layer's u8 x s8 int16 pair sums would often saturate (see `saturation_guard`)."""
        if self.o.saturation_guard == "off" or input_params is None or self.o.reduce_range:
            return False
        if input_params.qtype.name != "uint8" or self.o.weight_type != "int8" or node.op not in ANCHORS:
            return False  # (ORT has no int8-activation x uint8-weight kernels)
        weight = ir.constant_value(node.inputs[1])
        if node.op == "Conv" and weight is not None and weight.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1:
            return False  # depthwise kernels multiply in int32
        stats = self.group_stats.get(node.inputs[0].name)
        if stats is None:
            return False
        scale = float(np.asarray(input_params.scale).reshape(()))
        zero = int(np.asarray(input_params.zero_point).reshape(()))
        # Above u8 code 128 the u8 x s8 pair sums can pass 32767 (2 * 128 * 127 = 32512).
        return stats.fraction_above((128 - zero) * scale) > SATURATION_FRACTION

    def _correct_biases(self, quant: ir.Model, built: _Built) -> None:
        """Each bias minus the mean error of its layer vs a float twin (see analysis.mean_layer_errors)."""
        start = time.perf_counter()
        layers = []
        for bias in built.biases:
            rank = _output_rank(bias.node)
            if rank is None:
                continue
            twin_inputs = {1: bias.weight.float_value, 2: bias.float_value}
            source = _before_quantize(bias.node.inputs[0])
            if source is not None:
                twin_inputs[0] = source.name
            layers.append((bias.node.name, twin_inputs, rank))
        data = self.calib.take(self.analysis_count)
        errors = analysis.mean_layer_errors(quant.to_proto(), layers, self._batches(data), self.ctx.threads,
                                            self._progress(data, "quant: bias correction"))
        for bias in built.biases:
            error = errors.get(bias.node.name)
            if error is not None and error.shape == bias.float_value.shape:
                bias.set_value(bias.float_value - error.astype(np.float32))
                built.corrected += 1
        self.timings["bias_correction"] = self.timings.get("bias_correction", 0.0) + time.perf_counter() - start

    # -- measurement ---------------------------------------------------------------------------

    def _errors(self, quant: ir.Model, built: _Built) -> dict[str, analysis.ErrorSums]:
        """Signal / noise of every quantized tensor, float-output anchors and outputs vs the float model."""
        start = time.perf_counter()
        pairs = {name: dq.name for name, dq in built.writer.dequantized.items()}
        by_name = {n.name: n for n in quant.graph.nodes}
        float_tensors = {o for n in self.float_proto.graph.node for o in n.output}
        for name in built.quantized:  # float-output Gemm / MatMul results
            out = by_name[name].outputs[0].name
            if by_name[name].op in ANCHORS and out in float_tensors:
                pairs.setdefault(out, out)
        # Sequence / optional outputs have no energy to measure.
        self.output_names = [t.name for t in quant.graph.outputs if t.type == "tensor_type"]
        for name in self.output_names:
            pairs.setdefault(name, name)
        data = self.calib.take(self.analysis_count)
        errors = analysis.paired_errors(self.float_proto, quant.to_proto(), pairs, self._batches(data),
                                        self.ctx.threads, self._progress(data, "quant: measuring SQNR"),
                                        built.activations)
        self.timings["analysis"] = self.timings.get("analysis", 0.0) + time.perf_counter() - start
        return errors

    # -- sensitivity fallback ------------------------------------------------------------------

    def _floor(self) -> Floor:
        """The budget: the pass's own max_drop / min_sqnr and the user's floors (ctx.verify), the
        stricter of each."""
        own = Floor(None if self.o.max_drop is None else 1.0 - self.o.max_drop, self.o.min_sqnr)
        return own.stricter(self.ctx.verify.floor())

    def _fallback(self, quant, built, plan, errors, budget: Floor):
        """Keep the tensors whose quantization adds most noise out of 8 bits (see `_build_protected`)
        until `budget` holds on the calibration data: the floor loop (`edgegraph.floor.search`)
        over how many of them, most sensitive first."""
        start = time.perf_counter()
        data = self.calib.take(max(self.analysis_count, min(len(self.calib), 64)))
        reference = runtime.outputs(self.float_proto, self._batches(data), threads=self.ctx.threads)
        adopted = set(self.coarse)  # already out of 8 bits
        ranking = [t for t in _sensitivity_ranking(plan, errors) if t not in adopted]

        def measure(k: int):
            if k == 0:
                trial = (quant, built, plan)
            else:
                trial = self._build_protected(adopted | set(ranking[:k]))
                if not any(is_quantized(n) for n in ir.iter_nodes(trial[0].graph)):
                    return None, None  # a float copy meets any budget, and is no result
            outputs = runtime.outputs(trial[0].to_proto(), self._batches(data), threads=self.ctx.threads)
            return floor.measure(reference, outputs), trial

        # Settings: how many of the ranked tensors are kept out of 8 bits, strongest (none) first.
        found = floor.search(range(len(ranking) + 1), measure, budget, progress=self.ctx.progress_bar,
                             desc=f"quant: floor search ({self.o.knob})")
        self.timings["fallback"] = time.perf_counter() - start
        first = found.steps[0].measured
        self.budget = {"agreement": first["agreement"], "output_sqnr_db": first["sqnr_db"],
                       "met": found.best is not None and found.best.index == 0,
                       "attempts": sum(s.usable for s in found.steps), "steps": found.as_dict()["steps"]}
        if found.best is not None and found.best.index == 0:
            return quant, built, plan, errors, []
        user_floor = bool(self.ctx.verify.floor())
        if found.best is None and user_floor:
            raise floor.not_held("quant", found)
        if found.best is None and any(not s.usable for s in found.steps):
            wanted = " and ".join(([f"min_sqnr={self.o.min_sqnr:g} dB"] if self.o.min_sqnr is not None else [])
                                  + ([f"max_drop={self.o.max_drop:g}"] if self.o.max_drop is not None else []))
            closest = max(s.measured["sqnr_db"] for s in found.steps if s.usable)
            raise EdgegraphError(
                f"quant: nothing was quantized: {wanted} is met only with every layer in float (the best model "
                f"that keeps some layers quantized reaches {closest:.1f} dB output SQNR); lower the floor, or try "
                "sensitive_type=int16")
        if found.best is None:
            logger.warning("quant: the budget (max_drop=%s, min_sqnr=%s) is not met even with every ranked "
                           "tensor kept out of 8 bits; keeping the quantized model", self.o.max_drop, self.o.min_sqnr)
            return quant, built, plan, errors, []
        k = found.best.index
        quant, built, trial_plan = found.artefact
        self.budget.update(agreement=found.best.measured["agreement"], output_sqnr_db=found.best.measured["sqnr_db"],
                           met=True)
        if self.o.sensitive_type == "int16":
            kept = sorted(ranking[:k])  # the tensors given 16 bits
        else:
            kept = sorted({n.name for n in plan.quantized} - {n.name for n in trial_plan.quantized})
        return quant, built, trial_plan, self._errors(quant, built), kept

    # -- report --------------------------------------------------------------------------------

    def _result(self, model: ir.Model, plan: Plan, built: _Built, errors, fallback: list[str]) -> PassResult:
        weights = {w.node.name: w for w in built.weights}
        rows = []
        for node in plan.quantized:
            weight = weights.get(node.name)
            result = _result_point(plan, node)
            params = built.params.get(result) if result else None
            error = errors.get(result or node.outputs[0].name)
            rows.append({
                "node": node.name,
                "op": node.op,
                "weight_scale": _range(weight.params.scale) if weight else None,
                "activation_scale": float(np.asarray(params.scale).reshape(-1)[0]) if params else None,
                "activation_zero_point": int(np.asarray(params.zero_point).reshape(-1)[0]) if params else None,
                "sqnr_db": round(error.sqnr_db, 2) if error else None,
            })
        outputs = {name: round(errors[name].sqnr_db, 2) for name in self.output_names if name in errors}
        stats = {
            "quantized_nodes": sum(is_quantized(n) for n in ir.iter_nodes(model.graph)),
            "float_nodes": len(plan.skipped),
            "calibration_samples": len(self.calib),
            "analysis_samples": self.analysis_count,
            "method": self.method,
            "bias_corrected": built.corrected,
            "saturation_guarded": len(built.guarded),
            "output_sqnr_db": min(outputs.values()) if outputs else None,
        }
        if fallback:
            stats["fallback_layers"] = len(fallback)
        if self.coarse:
            stats["coarse_tensors_kept"] = len(self.coarse)
        details = {"layers": rows, "float_nodes": dict(plan.skipped), "output_sqnr_db": outputs,
                   "saturation_guarded": built.guarded, "notes": self.notes}
        if self.coarse:
            details["coarse_tensors_kept"] = {"as": self.o.sensitive_type, "tensors": self.coarse}
        if self.tuning:
            details["tuning_output_sqnr_db"] = {k: round(v, 2) for k, v in self.tuning.items()}
        if self.budget is not None:
            details["fallback"] = {"kept": fallback, "as": self.o.sensitive_type, **self.budget}
        degraded = self._degraded(model, plan, errors)
        if degraded:
            stats["warning"] = f"worst output SQNR {degraded['held_out_sqnr_db']} dB < {LOW_SQNR_DB:g} dB"
            details["warning"] = degraded
        if self.o.check_speed and self.ctx.timing:  # (`--runs 0`: no timing at all)
            details["latency"] = self._speed(model)
        details["timings_s"] = {k: round(v, 2) for k, v in self.timings.items()}
        for note in self.notes:
            logger.info("quant: %s", note)
        return PassResult(True, stats, details)

    def _degraded(self, model: ir.Model, plan: Plan, errors) -> dict | None:
        """When the worst output SQNR on held-out samples is below LOW_SQNR_DB: a warning naming
        the layers whose quantization adds the most noise and the options that help."""
        sqnr = self._score(model)
        if sqnr >= LOW_SQNR_DB:
            return None
        owners = {_result_point(plan, node): node for node in plan.quantized}
        costliest = [owners[t] for t in _sensitivity_ranking(plan, errors)[:COSTLIEST_SHOWN]]
        layers = [{"node": n.name, "op": n.op, "sqnr_db": round(errors[_result_point(plan, n)].sqnr_db, 2)}
                  for n in costliest]
        named = ", ".join(f"{shorten(x['node'])} ({x['op']}, {x['sqnr_db']:.1f} dB)" for x in layers)
        options = []
        if self.o.min_sqnr is None and self.o.max_drop is None:
            options.append(f"quant(min_sqnr={LOW_SQNR_DB + 5:g}) to keep the most sensitive layers in float")
        else:
            options.append("a higher min_sqnr or smaller max_drop on more calibration samples")
        if self.o.sensitive_type != "int16":
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

    def _speed(self, model: ir.Model) -> dict:
        """ORT latency of the quantized model vs the float input; warns when int8 is not faster."""
        start = time.perf_counter()
        feeds = next(self._batches(self.calib.take(1)))
        try:
            sessions = [runtime.session(m, threads=1, optimize=True) for m in (self.float_proto, model.to_proto())]
            rounds = [[runtime.latency_ms(s, feeds, runs=1, warmup=1) for s in sessions]]
            # More interleaved single runs while they fit the budget (a burst of other load then
            # slows both models alike).
            more = int(np.clip(SPEED_CHECK_SECONDS / max(sum(rounds[0]) / 1e3, 1e-9), 1, 9)) - 1
            rounds += [[runtime.latency_ms(s, feeds, runs=1, warmup=0) for s in sessions] for _ in range(more)]
            float_ms, quant_ms = (statistics.median(times) for times in zip(*rounds))
        except Exception as exc:  # noqa: BLE001 - timing is advisory
            logger.warning("quant: could not time the quantized model: %s", exc)
            return {}
        self.timings["speed_check"] = time.perf_counter() - start
        if quant_ms >= float_ms:
            logger.warning("quant: the quantized model is not faster than float in onnxruntime on this machine "
                           "(%.2f ms vs %.2f ms, 1 thread); its gain here is size only", quant_ms, float_ms)
        return {"float_ms": round(float_ms, 3), "quantized_ms": round(quant_ms, 3),
                "speedup": round(float_ms / quant_ms, 3) if quant_ms > 0 else None}


@dataclass
class _Built:
    """What `_build` made: parameters per point and the integer weights / biases (for bias correction)."""

    params: dict[str, QParams]
    writer: QdqWriter
    quantized: list[str]
    weights: list[QuantizedWeight] = field(default_factory=list)
    biases: list[QuantizedBias] = field(default_factory=list)
    guarded: list[str] = field(default_factory=list)  # layers given 7-bit / uint8 weights
    corrected: int = 0
    activations: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # point -> reader activation


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: plans refer to nodes by name across graph copies."""
    namer = ir.Namer(graph)
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = namer(f"{node.op}_{len(seen)}" if not node.name else node.name)
        seen.add(node.name)


def _fit_inside(scale: np.ndarray, zero: np.ndarray, qt: QType, floor: float, ceiling: float) -> np.ndarray:
    """Shrink a scale by ulps until the representable range lies within [floor, ceiling] + eps,
    the test ORT applies before removing a Relu/Clip in front of a QuantizeLinear."""
    scale = np.float32(scale)
    zero = int(zero)
    for _ in range(64):
        low = np.float32(qt.qmin - zero) * scale
        high = np.float32(qt.qmax - zero) * scale
        if (floor - low <= _CLIP_EPS or not np.isfinite(floor)) and (high - ceiling <= _CLIP_EPS or not np.isfinite(ceiling)):
            break
        scale = np.nextafter(scale, np.float32(0))
    return np.asarray(scale, dtype=np.float32)


def _fold_gemm_scalars(node: gs.Node) -> None:
    """Gemm alpha / beta folded into the constant weight / bias, so QGemm sees alpha = beta = 1."""
    if node.op != "Gemm":
        return
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if alpha != 1.0:
        node.inputs[1] = ir.const(node.inputs[1].name + "_alpha", ir.constant_value(node.inputs[1]) * np.float32(alpha))
        node.attrs["alpha"] = 1.0
    if beta != 1.0 and len(node.inputs) > 2 and node.inputs[2].name:
        value = ir.constant_value(node.inputs[2])
        if value is not None:
            node.inputs[2] = ir.const(node.inputs[2].name + "_beta", value * np.float32(beta))
            node.attrs["beta"] = 1.0


def _bias_value(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The node's bias as a 1-D float array over output channels (zeros when it has none)."""
    channels = output_channels(node, weight)
    value = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if value is None:
        return np.zeros(channels, dtype=np.float32)
    return np.broadcast_to(value.reshape(-1).astype(np.float32), (channels,)).copy()


def _before_quantize(tensor: gs.Tensor) -> gs.Tensor | None:
    """For the output of DequantizeLinear(QuantizeLinear(x)), x; else None."""
    dq = ir.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or isinstance(dq.inputs[0], gs.Constant):
        return None
    q = ir.producer(dq.inputs[0])
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None


def _output_rank(node: gs.Node) -> int | None:
    """Rank of a Conv / Gemm output (known from its weight when shape inference gave none)."""
    shape = node.outputs[0].shape
    if shape is not None:
        return len(shape)
    if node.op == "Gemm":
        return 2
    weight = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return weight.ndim if weight is not None and node.op in ("Conv", "ConvTranspose") else None


def _result_point(plan: Plan, node: gs.Node) -> str | None:
    names = {p.name for p in plan.points}
    out = node.outputs[0]
    if out.name in names:
        return out.name
    users = ir.consumers(out)
    if len(users) == 1 and clip_bounds(users[0]) is not None and users[0].outputs[0].name in names:
        return users[0].outputs[0].name
    return None


def _float_sets(plan: Plan) -> dict[str, set[str]]:
    """For each quantized tensor, the nodes to keep in float so that it stays float: the node
    computing it and every quantized node reading it (a Q/DQ pair stays wherever one side is
    still quantized)."""
    quantized = {id(n) for n in plan.quantized}
    owners = {result: node.name for node in plan.quantized if (result := _result_point(plan, node))}
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
    float_sets = _float_sets(plan)
    budget = COARSE_FLOAT_SHARE * len(plan.quantized)
    kept, nodes = {}, set()
    for name, fraction in sorted(coarse.items(), key=lambda item: -item[1]):
        if len(nodes | float_sets[name]) <= budget:
            kept[name] = fraction
            nodes |= float_sets[name]
    return kept


def _sensitivity_ranking(plan: Plan, errors: dict[str, analysis.ErrorSums]) -> list[str]:
    """Quantized tensors computed by quantized nodes, by the relative noise quantizing them adds
    (beyond what their producer's inputs carried), most first."""
    owners = {_result_point(plan, node): node for node in plan.quantized}
    scored = []
    for point in plan.points:
        error = errors.get(point.name)
        owner = owners.get(point.name)
        if error is None or owner is None:
            continue
        inputs = [errors[t.name].relative_noise for t in owner.inputs if t is not None and t.name in errors]
        scored.append((error.relative_noise - max(inputs, default=0.0), point.name))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [name for _, name in scored]


def _range(values) -> list[float]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return [float(values.min()), float(values.max())]


__all__ = ["StaticQuantize"]
