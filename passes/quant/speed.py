"""The speed check of `quant`: ORT latency of the quantized model against the float model it came
from (1 thread, interleaved single runs), with a warning when int8 is not faster."""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from edgegraph import ir, runtime
from edgegraph.passes.quant.build import Built
from edgegraph.passes.quant.placement import Plan
from edgegraph.passes.quant.state import QuantRun

logger = logging.getLogger(__name__)

# The speed check times each model in SPEED_ROUNDS interleaved rounds of about SPEED_CHECK_MACS
# of forward passes in all (1 to 50 runs a round): 2e9 is about a second on the 2-core
# development machine (YOLOX-nano, 1.1 GMACs: 1 run a round; the digits CNN: 50).
SPEED_ROUNDS = 5
SPEED_CHECK_MACS = 2e9
# What int8 makes slower in onnxruntime's CPU kernels on small feature maps, by per-node profiling
# (SessionOptions.enable_profiling, 1 thread) of the PP-OCR classifier, whose int8 model is 1.5x
# slower than float: float depthwise Convs run in NCHWc with the activation fused, QLinearConv's
# depthwise kernel does not; HardSwish (HardSigmoid, Mul) and SE blocks become DQ -> HardSigmoid
# -> Q -> QLinearMul (the DQ/Q pairs cost more than the float Mul); uint8 MaxPool and
# QLinearGlobalAveragePool have no NCHWc kernels. With these in float it runs at 0.99x float.
SLOW_IN_INT8 = frozenset({"Mul", "MaxPool", "GlobalAveragePool"})


def speed_check(run: QuantRun, model: ir.Model, built: Built, warn: bool = True) -> dict:
    """ORT latency of the quantized model vs the float input; warns when int8 is not faster.

    How many runs follows the model's MACs, not a clock (SPEED_CHECK_MACS of forward passes, as
    for the analysis samples), so that a busier or slower machine measures the same number of
    interleaved rounds: its choice (`static._not_slower`) then flips only where int8 and float are
    within the noise of each other.

    A model whose structure was already timed in this run (`structure`: the ranges and biases
    tuning picks change no kernel) is not timed again."""
    key = structure(built)
    if key in run.timed:
        return dict(run.timed[key])
    start = time.perf_counter()
    feeds = next(run.batches(run.calib.take(1)))
    runs = int(np.clip(SPEED_CHECK_MACS / max(run.macs, 1) / SPEED_ROUNDS, 1, 50))
    try:
        if run.float_session is None:  # (one for every check of the run: mixed precision's trials time it too)
            run.float_session = runtime.session(run.float_proto, threads=1, optimize=True)
        sessions = [run.float_session, runtime.session(model.to_proto(), threads=1, optimize=True)]
        for s in sessions:
            runtime.latency_ms(s, feeds, runs=1, warmup=1)
        # Interleaved rounds (a burst of other load then slows both models alike).
        rounds = [[runtime.latency_ms(s, feeds, runs=runs, warmup=0) for s in sessions] for _ in range(SPEED_ROUNDS)]
        float_ms, quant_ms = (statistics.median(times) for times in zip(*rounds))
    except Exception as exc:  # noqa: BLE001 - timing is advisory
        logger.warning("quant: could not time the quantized model: %s", exc)
        return {}
    run.timings["speed_check"] = run.timings.get("speed_check", 0.0) + time.perf_counter() - start
    if quant_ms >= float_ms and warn:
        logger.warning("quant: the quantized model is not faster than float in onnxruntime on this machine "
                       "(%.2f ms vs %.2f ms, 1 thread); its gain here is size only", quant_ms, float_ms)
    latency = {"float_ms": round(float_ms, 3), "quantized_ms": round(quant_ms, 3),
               "speedup": round(float_ms / quant_ms, 3) if quant_ms > 0 else None}
    run.timed[key] = latency
    return dict(latency)


def structure(built: Built) -> tuple:
    """What the speed of a model `build` made depends on: the nodes running on integers, the
    type of each quantized tensor and the layers the saturation guard changed (uint8 weights
    run on other kernels); not the ranges, weights or biases."""
    return (frozenset(built.quantized), frozenset((name, p.qtype.name) for name, p in built.params.items()),
            frozenset(built.guarded))


def slow_nodes(plan: Plan) -> set[str]:
    """The quantized nodes of `plan` that int8 makes slower than float on ORT's CPU (SLOW_IN_INT8
    and depthwise / grouped Convs)."""
    slow = set()
    for node in plan.quantized:
        grouped = node.op == "Conv" and int(node.attrs.get("group", 1)) > 1
        if node.op in SLOW_IN_INT8 or grouped:
            slow.add(node.name)
    return slow


def faster(latency: dict) -> bool:
    return bool(latency) and latency["quantized_ms"] < latency["float_ms"]


__all__ = ["speed_check", "slow_nodes", "faster", "structure"]
