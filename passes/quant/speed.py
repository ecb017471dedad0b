"""The speed check of `quant`: ORT latency of the quantized model against the float model it came
from (1 thread, interleaved single runs), with a warning when int8 is not faster."""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from edgegraph import ir, runtime
from edgegraph.passes.quant.state import QuantRun

logger = logging.getLogger(__name__)

# Wall time the speed check spends timing, beyond one warm-up run of each model.
SPEED_CHECK_SECONDS = 1.0


def speed_check(run: QuantRun, model: ir.Model) -> dict:
    """ORT latency of the quantized model vs the float input; warns when int8 is not faster."""
    start = time.perf_counter()
    feeds = next(run.batches(run.calib.take(1)))
    try:
        sessions = [runtime.session(m, threads=1, optimize=True) for m in (run.float_proto, model.to_proto())]
        rounds = [[runtime.latency_ms(s, feeds, runs=1, warmup=1) for s in sessions]]
        # More interleaved single runs while they fit the budget (a burst of other load then
        # slows both models alike).
        more = int(np.clip(SPEED_CHECK_SECONDS / max(sum(rounds[0]) / 1e3, 1e-9), 1, 9)) - 1
        rounds += [[runtime.latency_ms(s, feeds, runs=1, warmup=0) for s in sessions] for _ in range(more)]
        float_ms, quant_ms = (statistics.median(times) for times in zip(*rounds))
    except Exception as exc:  # noqa: BLE001 - timing is advisory
        logger.warning("quant: could not time the quantized model: %s", exc)
        return {}
    run.timings["speed_check"] = time.perf_counter() - start
    if quant_ms >= float_ms:
        logger.warning("quant: the quantized model is not faster than float in onnxruntime on this machine "
                       "(%.2f ms vs %.2f ms, 1 thread); its gain here is size only", quant_ms, float_ms)
    return {"float_ms": round(float_ms, 3), "quantized_ms": round(quant_ms, 3),
            "speedup": round(float_ms / quant_ms, 3) if quant_ms > 0 else None}


__all__ = ["speed_check"]
