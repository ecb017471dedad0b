"""The calibration step of `quant`: statistics of the tensors a plan quantizes, streamed out of the
float model on the calibration data (ranges and histogram samples; per-channel moments for
`tuning`'s coarse-tensor test). How ranges follow from them is `calibrate`'s job."""

from __future__ import annotations

import math
import time

import numpy as np

from edgegraph import ir, runtime
from edgegraph.analysis import capture
from edgegraph.errors import CalibrationDataError
from edgegraph.passes.quant import calibrate
from edgegraph.passes.quant.placement import SHARED, Plan
from edgegraph.passes.quant.state import QuantRun

# Calibration samples that per-channel variances are estimated from.
MOMENT_SAMPLES = 8


def collect(run: QuantRun, plan: Plan, names: list[str], desc: str, timing: str) -> dict[str, capture.RangeStats]:
    """The exact extremes and a strided sample of each tensor, streamed out of the float model
    (capture.Probe).

    Tensors whose statistics follow from another probed tensor are not read out of ORT: the
    output of a data-movement op in its input's scale group (`within_group`; it gets no
    entry), and a Sigmoid output (the sigmoid of its input's sample and extremes).
    """
    start = time.perf_counter()
    tensors = run.float_tensors
    inputs = {s.name for s in run.specs} & set(names)
    wanted = set(names) - within_group(run, plan)
    derived: dict[str, str] = {}  # Sigmoid output -> its probed input
    for name in wanted:
        producer = ir.producer(tensors[name]) if name in tensors else None
        if producer is not None and producer.op == "Sigmoid" and producer.inputs[0].name in wanted:
            derived[name] = producer.inputs[0].name
    probe = capture.Probe(run.float_proto)
    reads, steps = {}, {}
    for name in wanted - inputs - set(derived):
        shape = tensors[name].shape if name in tensors else None
        size = int(np.prod([d for d in (shape or [])[1:] if isinstance(d, int) and d > 0], dtype=np.int64))
        steps[name] = capture.sample_step(size) if shape else 1
        reads[name] = probe.range_sample(name, steps[name])

    # Skipped tensors get no entry: a later plan that splits their group measures them then.
    stats = {name: capture.RangeStats() for name in names if name in wanted}
    stream = probe.run_with_feeds(run.batches(run.calib), run.ctx.threads, side_by_side=True)
    channel_ids = {}  # (tensor, sample length) -> channel of each sampled value
    seen = 0
    try:
        for feeds, out in run.progress(run.calib, desc)(stream):
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
                    _update_moments(run, name, sample, step, channel_ids)
            seen += runtime.batch_length(run.specs, feeds)
    except CalibrationDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT rejects the data (shapes, dtypes)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationDataError(f"quant: the model does not run on the calibration data ({message})") from None
    run.timings[timing] = run.timings.get(timing, 0.0) + time.perf_counter() - start
    return stats


def _update_moments(run: QuantRun, name: str, values: np.ndarray, step: int, channel_ids: dict) -> None:
    """Per-channel moments of a tensor from its flat strided sample (for the coarse-tensor test);
    tensors without a static shape past the batch axis have none."""
    shape = run.float_tensors[name].shape if name in run.float_tensors else None
    if not shape or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return
    channels = shape[capture.ChannelMoments.channel_axis(shape)]
    key = (name, values.size)
    if key not in channel_ids:
        ids = capture.ChannelMoments.channel_ids(shape, np.arange(values.size, dtype=np.int64) * step)
        channel_ids[key] = (ids, np.bincount(ids, minlength=channels))
    if name not in run.moments:
        run.moments[name] = capture.ChannelMoments(channels)
    run.moments[name].update(values, *channel_ids[key])


def within_group(run: QuantRun, plan: Plan) -> set[str]:
    """Outputs of data-movement ops that share their input's scale: their values are a subset
    of the group's, so they need no statistics of their own."""
    skip = set()
    for point in plan.points:
        tensor = run.float_tensors.get(point.name)
        producer = ir.producer(tensor) if tensor is not None else None
        if producer is not None and producer.op in SHARED and producer.inputs:
            source = producer.inputs[0].name
            if source in plan.groups and plan.groups[source] == plan.groups[point.name]:
                skip.add(point.name)
    return skip


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


__all__ = ["collect", "within_group", "MOMENT_SAMPLES"]
