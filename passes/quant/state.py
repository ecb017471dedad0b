"""One run of `quant`: the prepared float model, its statistics, the data the steps share, and what
was measured on the way (notes, timings, tuning scores) for the report.

The steps are functions over a `QuantRun` in their own modules (prepare, collect, build,
bias_correction, tuning, sensitivity, fallback, report, speed); `static.StaticQuantize.run`
calls them in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgegraph import ir, runtime, verify
from edgegraph.analysis import capture
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import CalibrationDataError
from edgegraph.passes.quant.placement import Plan, make_plan

if TYPE_CHECKING:
    from edgegraph.passes.quant.static import StaticQuantize

PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis`


class QuantRun:
    """State of one run of the pass (the pass object itself is immutable)."""

    def __init__(self, options: StaticQuantize, ctx: PassContext):
        self.o = options
        self.ctx = ctx
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.budget: dict | None = None
        self.method = options.method  # "auto" is resolved by tuning.tuned_build
        self.correct = options.bias_correction is True
        self.tuning: dict[str, float] = {}  # output SQNR (dB) of each setting tried
        self.moments: dict[str, capture.ChannelMoments] = {}  # per-channel statistics of quantized tensors
        self.coarse: dict[str, float] = {}  # coarse tensors kept out of 8 bits -> their coarse fraction
        self.stats: dict[str, capture.RangeStats] = {}  # calibration statistics per tensor
        self.group_stats: dict[str, capture.RangeStats] = {}  # per tensor, the merged stats of its scale group
        self.output_names: list[str] = []
        self._held_out: list | None = None  # batches `score` runs on, and the float model's outputs
        self._reference: list | None = None

    def start(self, float_proto) -> None:
        """What every later step reads: the prepared float model and the calibration set."""
        self.float_proto = float_proto
        self.float_tensors = ir.from_proto(float_proto, infer=False).graph.tensors()
        self.specs = runtime.input_specs(float_proto)
        self.calib = self._calibration_set()

    def _calibration_set(self) -> CalibrationData:
        data = self.ctx.calibration
        if self.o.calib_samples:
            data = data.take(self.o.calib_samples)
        if len(data) == 0:
            raise CalibrationDataError("quant: the calibration data has no samples")
        return data

    def batches(self, data: CalibrationData):
        """Batches of up to 8 samples (1 when the model's batch axis is fixed), cast to the input types."""
        size = runtime.batch_size_for(self.specs, 8)
        return (runtime.adapt_feeds(self.specs, b) for b in data.batches(size))

    def progress(self, data: CalibrationData, desc: str):
        total = -(-len(data) // runtime.batch_size_for(self.specs, 8))
        return lambda it, **_: self.ctx.progress_bar(it, total=total, desc=desc)

    def plan(self, float_nodes: set[str]) -> Plan:
        graph = ir.from_proto(self.float_proto, infer=False).graph
        ops = set(self.ctx.target.quantized_ops) - set(self.o.exclude_ops)
        if not self.o.quantize_softmax:
            ops.discard("Softmax")
        opset = int(graph.opset)
        return make_plan(graph, ops, float_nodes, self.o.per_channel and opset >= PER_CHANNEL_OPSET)

    def score(self, model: ir.Model) -> float:
        """The worst output SQNR (dB) of a model vs the float model on the held-out samples (the
        last `analysis_count` calibration samples; bias correction is fitted on the first)."""
        if self._reference is None:
            data = self.calib.take(self.analysis_count, start=max(0, len(self.calib) - self.analysis_count))
            self._held_out = list(self.batches(data))
            self._reference = runtime.outputs(self.float_proto, self._held_out, threads=self.ctx.threads)
        candidate = runtime.outputs(model.to_proto(), self._held_out, threads=self.ctx.threads)
        return verify.worst_sqnr_db(self._reference, candidate)


__all__ = ["QuantRun", "PER_CHANNEL_OPSET"]
