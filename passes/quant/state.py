"""One run of `quant`: the prepared float model, its statistics, the data the steps share, and what
was measured on the way (notes, timings, tuning scores) for the report.

The steps are functions over a `QuantRun` in their own modules (prepare, collect, build,
bias_correction, tuning, sensitivity, fallback, report, speed); `static.StaticQuantize.run`
calls them in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, runtime, verify
from edgegraph.analysis import capture, encoding
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import CalibrationDataError
from edgegraph.passes.quant import scheme
from edgegraph.passes.quant.placement import Plan, make_plan

if TYPE_CHECKING:
    from edgegraph.passes.quant.static import StaticQuantize

PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`
# The elementwise ops `elementwise=float` runs in float between the integer kernels.
ELEMENTWISE = frozenset({"Add", "Mul", "Sigmoid", "LeakyRelu"})
GLUE_CONSTANT_SIZE = 16  # constant operands of those with at least this many values are stored in 8 bits
# Under a floor (max_drop / min_sqnr / --min-agreement / --min-sqnr), every HOLD_OUT_EVERY-th
# calibration sample (indices 3, 7, 11, ...), at most HOLD_OUT_MAX of them, is held out of fitting
# (ranges, bias correction, tuning) and the floor is measured on those alone. Below
# MIN_SPLIT_SAMPLES there are too few to spare: nothing is held out, the floor is measured on the
# fitting samples (an optimistic measurement, which the report and a warning say).
HOLD_OUT_EVERY = 4
HOLD_OUT_MAX = 64
MIN_SPLIT_SAMPLES = 8


class QuantRun:
    """State of one run of the pass (the pass object itself is immutable)."""

    def __init__(self, options: StaticQuantize, ctx: PassContext):
        self.o, notes = scheme.resolve(options, ctx.target)  # ("target" options from the profile's [quant])
        self.ctx = ctx
        self.notes: list[str] = notes
        self.timings: dict[str, float] = {}
        self.budget: dict | None = None
        self.method = options.method  # "auto" is resolved by tuning.tuned_build
        self.correct = options.bias_correction is True
        self.rounding = "gram" if options.weight_rounding == "gram" else "nearest"  # "auto": tuning decides
        self.elementwise = options.elementwise
        self.tuning: dict[str, float] = {}  # output SQNR (dB) of each setting tried
        self.tuned_sqnr: float | None = None  # the score of what tuning chose (None: not measured)
        self.moments: dict[str, capture.ChannelMoments] = {}  # per-channel statistics of quantized tensors
        self.coarse: dict[str, float] = {}  # coarse tensors kept out of 8 bits -> their coarse fraction
        self.mixed: dict[str, float] = {}  # tensors kept out of 8 bits by `mixed` -> their share of the noise
        self.mixed_info: dict = {}  # what `mixed` measured, for the report
        self.stats: dict[str, capture.RangeStats] = {}  # calibration statistics per tensor
        self.group_stats: dict[str, capture.RangeStats] = {}  # per tensor, the merged stats of its scale group
        self.output_names: list[str] = []
        self.grams: dict | None = None  # layer -> capture.Gram of its input (weight_rounding=gram)
        self.gram_factors: dict[str, list] = {}  # layer -> its factored H⁻¹ per group (rounding.py)
        self.macs = 0  # a sample's MACs (known ones), once analysis_samples is set
        self.float_session = None  # the float model's 1-thread session of the speed checks
        self.timed: dict[tuple, dict] = {}  # latency of each model structure timed (speed.structure)
        self._held_out: list | None = None  # batches `score` runs on, and the float model's outputs
        self._reference: list | None = None
        self.floor_data: CalibrationData | None = None  # what a floor is measured on (see HOLD_OUT_EVERY)
        self.split: dict = {}  # how the calibration set was split, for the report

    def start(self, float_proto, hold_out: bool = False) -> None:
        """What every later step reads: the prepared float model and the calibration set (split
        into fitting and floor samples when `hold_out`: a floor is to be held)."""
        self.float_proto = float_proto
        self.float_tensors = ir.from_proto(float_proto, infer=False).graph.tensors()
        self.specs = runtime.input_specs(float_proto)
        self.calib = self._calibration_set()
        if hold_out:
            self.calib, self.floor_data, self.split = split_for_floor(self.calib)

    def _calibration_set(self) -> CalibrationData:
        data = self.ctx.calibration
        if self.o.calib_samples:
            data = data.take(self.o.calib_samples)
        if len(data) == 0:
            raise CalibrationDataError("quant: the calibration data has no samples")
        return data

    def batches(self, data: CalibrationData, size: int = 8):
        """Batches of up to `size` samples (1 when the model's batch axis is fixed), cast to the input types."""
        size = runtime.batch_size_for(self.specs, size)
        return (runtime.adapt_feeds(self.specs, b) for b in data.batches(size))

    def progress(self, data: CalibrationData, desc: str):
        total = -(-len(data) // runtime.batch_size_for(self.specs, 8))
        return lambda it, **_: self.ctx.progress_bar(it, total=total, desc=desc)

    def plan(self, float_nodes: set[str]) -> Plan:
        graph = ir.from_proto(self.float_proto, infer=False).graph
        ops = set(self.ctx.target.quantized_ops) - set(self.o.exclude_ops)
        if not self.o.quantize_softmax:
            ops.discard("Softmax")
        glue = elementwise_glue(graph, ops) if self.elementwise == "float" else set()
        opset = int(graph.opset)
        per_channel = self.o.per_channel and opset >= PER_CHANNEL_OPSET
        plan = make_plan(graph, ops, set(float_nodes) | glue, per_channel)
        unfused = unfused_matmuls(plan)
        if unfused:
            graph = ir.from_proto(self.float_proto, infer=False).graph
            plan = make_plan(graph, ops, set(float_nodes) | glue | unfused, per_channel)
            for name in unfused:
                plan.skipped[name] = ("MatMul + constant Add: onnxruntime fuses them into a float Gemm, which would "
                                      "dequantize int8 weights at every run")
        # MatMuls that quant quantizes, or leaves float for onnxruntime's Gemm fusion (not those
        # it leaves alone, e.g. weight-only int8 ones): their biases stay exact.
        matmuls = {id(n) for n in plan.quantized if n.op in ("MatMul", "Gemm")} | {
            id(n) for n in graph.nodes if n.name in unfused}
        for node in graph.nodes:
            if node.name in glue and node.name not in float_nodes and node.name in plan.skipped:
                plan.skipped[node.name] = "elementwise op run in float between integer kernels (elementwise=float)"
                # Their constant vectors are stored in 8 bits as the integer kernels stored them
                # (MiniLM's LayerNorm shifts and biases: its file would grow by 22 KB in float); a
                # scalar costs nothing to keep exact.
                bias = any(id(ir.producer(t)) in matmuls for t in node.inputs if ir.producer(t) is not None)
                if not encoding.decodes(node) and not bias:  # (a stored weight's decoding stays as it is)
                    plan.constants.extend((node, i) for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)
                                          and t.values.size >= GLUE_CONSTANT_SIZE and t.values.dtype == np.float32)
        return plan

    def held_out(self) -> tuple[list, list]:
        """(batches, the float model's outputs on them) of the held-out samples: the last
        `analysis_count` calibration samples (bias correction is fitted on the first)."""
        if self._reference is None:
            data = self.calib.take(self.analysis_count, start=max(0, len(self.calib) - self.analysis_count))
            self._held_out = list(self.batches(data))
            self._reference = runtime.outputs(self.float_proto, self._held_out, threads=self.ctx.threads,
                                              side_by_side=True)
        return self._held_out, self._reference

    def score(self, model: ir.Model) -> float:
        """The worst output SQNR (dB) of a model vs the float model on the held-out samples."""
        batches, reference = self.held_out()
        candidate = runtime.outputs(model.to_proto(), batches, threads=self.ctx.threads, side_by_side=True)
        return verify.worst_sqnr_db(reference, candidate)

    def sample_errors(self, model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
        """(signal, noise): the float outputs' energy and the model's squared error against
        them, per held-out sample (rows; a batch is one row when an output has no batch axis
        of its size) and float output (columns)."""
        batches, reference = self.held_out()
        candidate = runtime.outputs(model.to_proto(), batches, threads=self.ctx.threads, side_by_side=True)
        names = [n for n, v in reference[0].items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        signal, noise = [], []
        for feeds, ref, got in zip(batches, reference, candidate):
            count = runtime.batch_length(self.specs, feeds)
            rows = count if all(np.ndim(ref[n]) and np.shape(ref[n])[0] == count for n in names) else 1
            for part in range(rows):
                r = {n: np.asarray(ref[n][part] if rows > 1 else ref[n], np.float64) for n in names}
                signal.append([np.sum(np.square(r[n])) for n in names])
                noise.append([np.sum(np.square(np.asarray(got[n][part] if rows > 1 else got[n], np.float64) - r[n]))
                              for n in names])
        return np.array(signal).reshape(-1, len(names)), np.array(noise).reshape(-1, len(names))


def elementwise_glue(graph, ops: set[str]) -> set[str]:
    """The nodes `elementwise=float` runs in float: those of ELEMENTWISE ops that `ops` quantizes."""
    return {node.name for node in graph.nodes if node.op in ELEMENTWISE and node.op in ops}


def unfused_matmuls(plan: Plan) -> set[str]:
    """Quantized MatMuls with a float result read only by a constant Add (a bias) that stays
    float. onnxruntime fuses such a pair into a float Gemm before its QDQ fusions, which then
    leave the Gemm in float and its int8 weights dequantized at every run (PP-OCRv4 rec's
    120 x 6625 head: 1.6-2 ms of 14, more than the float MatMul and Add together)."""
    quantized = {id(n) for n in plan.quantized}
    points = {p.name for p in plan.points}
    found = set()
    for node in plan.quantized:
        if node.op != "MatMul" or node.outputs[0].name in points:
            continue
        users = ir.consumers(node.outputs[0])
        if len(users) == 1 and users[0].op == "Add" and id(users[0]) not in quantized \
                and any(ir.constant_value(t) is not None for t in users[0].inputs):
            found.add(node.name)
    return found


def split_for_floor(data: CalibrationData) -> tuple[CalibrationData, CalibrationData, dict]:
    """(fitting samples, floor samples, a description for the report): every HOLD_OUT_EVERY-th
    sample (up to HOLD_OUT_MAX) is held out; below MIN_SPLIT_SAMPLES nothing is."""
    count = len(data)
    if count < MIN_SPLIT_SAMPLES:
        return data, data, {"held_out": 0, "fitting": count, "floor_on": "fitting samples",
                            "why": f"fewer than {MIN_SPLIT_SAMPLES} calibration samples: none can be spared"}
    held = [i for i in range(HOLD_OUT_EVERY - 1, count, HOLD_OUT_EVERY)][:HOLD_OUT_MAX]
    held_set = set(held)
    fitting = [i for i in range(count) if i not in held_set]
    split = {"held_out": len(held), "fitting": len(fitting), "floor_on": "held-out samples",
             "held_out_indices": f"{held[0]}, {held[1]}, ... every {HOLD_OUT_EVERY}th (at most {HOLD_OUT_MAX})"}
    return _subset(data, fitting), _subset(data, held), split


def _subset(data: CalibrationData, indices: list[int]) -> CalibrationData:
    return CalibrationData(len(indices), lambda i: data.fetch(indices[i]), data.source, data.batch_axes)


__all__ = ["QuantRun", "PER_CHANNEL_OPSET", "ELEMENTWISE", "elementwise_glue", "unfused_matmuls", "split_for_floor"]
