"""Rounding optimisation of `quant`'s integer weights on captured activations (weight_rounding=gram).

Rounding each weight to the nearest code minimises the weight error, not the layer's output
error ||X (W - Ŵ)ᵀ||² = tr(Δ H Δᵀ) with H = XᵀX, the Gram matrix of the layer's input features
(captured on calibration samples by edgegraph.analysis.capture.Gram). Like AdaRound (Nagel et
al. 2020) this chooses up or down per weight for that objective; the solver is the greedy
column-by-column one with error feedback through H⁻¹ (OBQ / GPTQ, Frantar et al. 2022): each
feature's rounding error is spread over the features not yet rounded, in numpy, in O(F³ + O·F²)
per layer: well under a second per layer for these CNNs (no gradient iterations).
"""

from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph.analysis import capture
from edgegraph.passes.quant.qdq import QParams, quantize_weight
from edgegraph.passes.quant.state import QuantRun

# Calibration samples the Gram matrices are summed over (one sample a batch: a Conv's im2col
# features of one sample are F x H x W values).
GRAM_SAMPLES = 8
# Fewer input rows than this many per feature (e.g. a Gemm after Flatten: one row a sample) make H
# rank-deficient: the solver then fits the few captured samples and fails on others (CIFAR's
# classifier: 15.8 dB instead of 38.9), so such layers keep nearest rounding.
MIN_ROWS_PER_FEATURE = 4


def capture_grams(run: QuantRun, nodes: list[str]) -> dict[str, capture.Gram]:
    """Gram matrices of the named layers' inputs in the float model, on the first GRAM_SAMPLES
    fitting samples."""
    start = time.perf_counter()
    data = run.calib.take(GRAM_SAMPLES)
    try:
        grams = capture.grams(run.float_proto, nodes, run.batches(data, 1), threads=run.ctx.threads,
                              progress=run.progress(data, "quant: weight rounding (Gram matrices)"))
    finally:
        run.timings["rounding"] = run.timings.get("rounding", 0.0) + time.perf_counter() - start
    return grams


def round_weight(node: gs.Node, value: np.ndarray, params: QParams, gram: capture.Gram,
                 factors: list | None = None) -> np.ndarray | None:
    """Integer codes of `value` with the least layer-output error on the Gram's inputs (None: use
    nearest rounding). `factors`, when given, caches the factored H⁻¹ per group across calls."""
    layer = capture.layer_matrix(node, value)
    if layer is None:
        return None
    rows, back = layer
    out_channels = rows.shape[0]
    h = np.asarray(gram.xtx, dtype=np.float64)
    groups = 1 if h.ndim == 2 else h.shape[0]
    h = h.reshape(groups, h.shape[-2], h.shape[-1])
    if h.shape[-1] != rows.shape[1] or h.shape[-1] > capture.MAX_FEATURES or out_channels % groups \
            or gram.rows < MIN_ROWS_PER_FEATURE * h.shape[-1]:
        return None
    scale = np.broadcast_to(np.asarray(params.scale, np.float64).reshape(-1), (out_channels,)) \
        if params.axis is not None else np.full(out_channels, float(np.asarray(params.scale).reshape(())))
    zero = np.broadcast_to(np.asarray(params.zero_point, np.float64).reshape(-1), (out_channels,)) \
        if params.axis is not None else np.full(out_channels, float(np.asarray(params.zero_point).reshape(())))
    limit = params.code_limit if params.code_limit is not None else params.qtype.symmetric_max
    lo = np.maximum(zero - limit, params.qtype.qmin)
    hi = np.minimum(zero + limit, params.qtype.qmax)
    factors = [] if factors is None else factors
    if not factors:  # (the same for every build of a run: computed once)
        factors.extend(capture.inverse_factor(h[g]) for g in range(groups))
    codes = np.empty(rows.shape, dtype=np.float64)
    per_group = out_channels // groups
    for g in range(groups):
        sel = slice(g * per_group, (g + 1) * per_group)
        codes[sel] = _greedy(rows[sel].astype(np.float64), factors[g], scale[sel], zero[sel], lo[sel], hi[sel])
    return back(codes).astype(params.qtype.dtype)


def _greedy(w: np.ndarray, factor, scale, zero, lo, hi) -> np.ndarray:
    """OBQ/GPTQ: round feature by feature, feeding each rounding error forward through H⁻¹."""
    if factor is None:
        return np.clip(np.round(w / scale[:, None]) + zero[:, None], lo[:, None], hi[:, None])
    u, dead = factor
    w = w.copy()
    w[:, dead] = 0.0
    codes = np.empty_like(w)
    for i in range(w.shape[1]):
        q = np.clip(np.round(w[:, i] / scale) + zero, lo, hi)
        codes[:, i] = q
        error = (w[:, i] - (q - zero) * scale) / u[i, i]
        w[:, i + 1:] -= np.outer(error, u[i, i + 1:])
    return codes


def rounded_codes(run: QuantRun, node: gs.Node, index: int, value: np.ndarray, params: QParams) -> np.ndarray:
    """The weight's integer codes: optimised rounding where the run captured the layer's Gram."""
    gram = run.grams.get(node.name) if run.rounding == "gram" and run.grams and index == 1 else None
    factors = run.gram_factors.setdefault(node.name, [])
    codes = round_weight(node, value, params, gram, factors) if gram is not None else None
    return quantize_weight(value, params) if codes is None else codes


__all__ = ["capture_grams", "round_weight", "rounded_codes"]
