"""The ways to turn activation statistics (`edgegraph.analysis.capture.RangeStats`: exact min / max
and a fixed-size histogram per tensor) into quantization ranges.

Range methods (`activation_range`):
  minmax      observed min / max
  percentile  drop the `percentile` tails on each side
  mse         the clipping range that minimises the expected squared quantization error
              (rounding inside, clipping outside) of the tensor's histogram, measured after the
              activation its readers apply when there is one (SiLU, Sigmoid, HardSwish, ...)
  entropy     TensorRT's KL-divergence threshold on |x|, with as many levels as the side has
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgegraph.analysis.capture import BINS, RangeStats
from edgegraph.passes.quant.numerics import QType, scale_zero_point

METHODS = ("minmax", "percentile", "mse", "entropy")
AUTO_METHODS = ("mse", "entropy", "percentile")  # tried in this order by method=auto; ties keep the first


# ---------------------------------------------------------------------------------------------
# Activation functions a quantized tensor may feed (what its error is measured through).


@dataclass(frozen=True)
class Transfer:
    """An elementwise function and its derivative, vectorised over numpy arrays."""

    name: str
    f: Callable[[np.ndarray], np.ndarray]
    df: Callable[[np.ndarray], np.ndarray]


def sigmoid(x):
    """The logistic function (via tanh, which does not overflow), in the input's float precision."""
    x = np.asarray(x)
    half = x.dtype.type(0.5) if x.dtype.kind == "f" else 0.5
    return half * (1 + np.tanh(half * x))



def _hard_sigmoid(alpha: float, beta: float) -> tuple[Callable, Callable]:
    f = lambda x: np.clip(alpha * x + beta, 0.0, 1.0)  # noqa: E731
    df = lambda x: np.where((alpha * x + beta > 0) & (alpha * x + beta < 1), alpha, 0.0)  # noqa: E731
    return f, df


def transfer(name: str, alpha: float = 0.2, beta: float = 0.5) -> Transfer | None:
    """The Transfer called `name` (silu, sigmoid, tanh, relu, hardsigmoid, hardswish); None = identity."""
    if name == "silu":
        return Transfer(name, lambda x: x * sigmoid(x), lambda x: sigmoid(x) * (1 + x * (1 - sigmoid(x))))
    if name == "sigmoid":
        return Transfer(name, sigmoid, lambda x: sigmoid(x) * (1 - sigmoid(x)))
    if name == "tanh":
        return Transfer(name, np.tanh, lambda x: 1 - np.tanh(x) ** 2)
    if name == "relu":
        return Transfer(name, lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64))
    if name == "hardsigmoid":
        return Transfer(name, *_hard_sigmoid(alpha, beta))
    if name == "hardswish":
        hs, dhs = _hard_sigmoid(alpha, beta)
        return Transfer(name, lambda x: x * hs(x), lambda x: hs(x) + x * dhs(x))
    return None


# ---------------------------------------------------------------------------------------------
# Ranges from statistics.


def activation_range(stats: RangeStats, method: str, qt: QType, symmetric: bool,
                     percentile: float = 99.999, transfer: Transfer | None = None) -> tuple[float, float]:
    """The (lo, hi) to quantize a tensor with, by `method`; always within the observed min/max.

    `transfer` is the activation function applied to the tensor by all its readers, if any;
    method=mse then measures the error after it.
    """
    if stats.empty:
        return 0.0, 0.0
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if method == "minmax" or stats.limit == 0.0:
        return lo, hi
    if method == "percentile":
        lo_p, hi_p = _percentile_range(stats, percentile)
        return max(lo, min(lo_p, 0.0)), min(hi, max(hi_p, 0.0))
    if method == "entropy":
        return _entropy_range(stats, qt, symmetric, lo, hi)
    if method == "mse":
        return _mse_range(stats, qt, symmetric, lo, hi, transfer)
    raise ValueError(f"unknown calibration method {method!r}")


def _percentile_range(stats: RangeStats, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(stats.hist, dtype=np.float64)
    total = cdf[-1]
    tail = total * (100.0 - percentile) / 100.0
    edges = stats.edges()
    lo_bin = int(np.searchsorted(cdf, tail, side="right"))
    hi_bin = int(np.searchsorted(cdf, total - tail, side="left"))
    return float(edges[lo_bin]), float(edges[min(hi_bin + 1, 2 * BINS)])


def _centers_counts(stats: RangeStats) -> tuple[np.ndarray, np.ndarray]:
    edges = stats.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    used = stats.hist > 0
    return centers[used], stats.hist[used].astype(np.float64)


def quantization_mse(centers: np.ndarray, counts: np.ndarray, lo, hi, qt: QType, symmetric: bool,
                     transfer: Transfer | None = None) -> np.ndarray:
    """Expected squared error of quantizing a histogram to [lo, hi] (vectorised over candidate ranges).

    Inside the range the error is the rounding noise s^2 / 12; outside it is the clipping
    distance. With a `transfer` g (the activation the tensor feeds, e.g. SiLU), errors are
    measured after it: clipping costs (g(x) - g(clip(x)))^2 and rounding g'(x)^2 s^2 / 12, so
    the range is not wasted on values the activation flattens (SiLU of -50 and of -8 are both ~0).
    """
    return _HistogramError(centers, counts, transfer)(lo, hi, qt, symmetric)


class _HistogramError:
    """`quantization_mse` of one histogram (sorted bin centers) for many candidate ranges.

    The clipping error below `low` is sum(n * (g(low) - g(x))^2) = g(low)^2 N - 2 g(low) S1 + S2
    over the clipped bins, so prefix sums of n, n g(x), n g(x)^2 and n g'(x)^2 turn each
    candidate into two binary searches instead of a pass over every bin.
    """

    def __init__(self, centers: np.ndarray, counts: np.ndarray, transfer: Transfer | None):
        self.centers = np.asarray(centers, dtype=np.float64)
        self.f = transfer.f if transfer is not None else (lambda x: x)
        g = self.f(self.centers)
        slope2 = transfer.df(self.centers) ** 2 if transfer is not None else 1.0
        prefix = lambda v: np.concatenate([[0.0], np.cumsum(np.broadcast_to(v, counts.shape))])  # noqa: E731
        self.n, self.g1, self.g2, self.w = prefix(counts), prefix(counts * g), prefix(counts * g * g), prefix(
            counts * slope2)

    def __call__(self, lo, hi, qt: QType, symmetric: bool) -> np.ndarray:
        lo, hi = np.atleast_1d(np.asarray(lo, dtype=np.float64)), np.atleast_1d(np.asarray(hi, dtype=np.float64))
        scale, zero_point = scale_zero_point(lo, hi, qt, symmetric)
        scale = scale.astype(np.float64)
        low = (qt.qmin - zero_point.astype(np.float64)) * scale
        high = (qt.qmax - zero_point.astype(np.float64)) * scale
        a = np.searchsorted(self.centers, low, side="left")  # bins below the range: [0, a)
        b = np.searchsorted(self.centers, high, side="right")  # bins above it: [b, end)
        g_low, g_high = self.f(low), self.f(high)
        below = g_low**2 * self.n[a] - 2 * g_low * self.g1[a] + self.g2[a]
        above = (g_high**2 * (self.n[-1] - self.n[b]) - 2 * g_high * (self.g1[-1] - self.g1[b])
                 + (self.g2[-1] - self.g2[b]))
        return np.maximum(below, 0.0) + np.maximum(above, 0.0) + (self.w[b] - self.w[a]) * scale**2 / 12.0


def _mse_range(stats: RangeStats, qt: QType, symmetric: bool, lo: float, hi: float,
               transfer: Transfer | None = None) -> tuple[float, float]:
    """Coordinate search over clipping ratios of the observed range: the upper bound with the lower
    fixed, then the lower bound, twice; each a coarse grid refined around its best point. A
    symmetric range has one free parameter, so both bounds scale together."""
    error = _HistogramError(*_centers_counts(stats), transfer)

    def best_ratio(candidates: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], sym: bool) -> float:
        ratios = np.linspace(0.02, 1.0, 50)
        for _ in range(2):
            errors = error(*candidates(ratios), qt, sym)
            best = float(ratios[int(np.argmin(errors))])
            ratios = np.clip(np.linspace(best - 0.02, best + 0.02, 21), 0.005, 1.0)
        return best

    if symmetric:
        r = best_ratio(lambda t: (lo * t, hi * t), True)
        return lo * r, hi * r
    best_lo, best_hi = lo, hi
    for _ in range(2):
        if best_hi > 0:
            best_hi = hi * best_ratio(lambda t: (np.full_like(t, best_lo), hi * t), False)
        if best_lo < 0:
            best_lo = lo * best_ratio(lambda t: (lo * t, np.full_like(t, best_hi)), False)
    return best_lo, best_hi


def _entropy_range(stats: RangeStats, qt: QType, symmetric: bool, lo: float, hi: float) -> tuple[float, float]:
    """KL-optimal thresholds, found separately for each side of zero that has data."""
    levels = qt.qmax - qt.qmin + 1
    negative = stats.hist[:BINS][::-1]
    positive = stats.hist[BINS:]
    width = stats.limit / BINS
    if symmetric or (lo < 0 and hi > 0):
        # Both sides share one grid: a threshold on |x| with half the levels per side.
        threshold = _kl_threshold(negative + positive, levels // 2) * width
        return max(lo, -threshold), min(hi, threshold)
    if hi > 0:
        return lo, min(hi, _kl_threshold(positive, levels) * width)
    return max(lo, -_kl_threshold(negative, levels) * width), hi


def _kl_threshold(hist: np.ndarray, levels: int) -> float:
    """Number of bins (a threshold in bin units) minimising KL(P || Q), TensorRT style.

    For a threshold t, P is the first t bins with the tail folded into bin t-1, and Q the same
    bins merged into `levels` contiguous groups, each spread back evenly over its non-empty
    bins. Q is constant within a group, so sum(p log q) needs only the group sums, and sum(p log p)
    comes from a running sum of h log h: every candidate costs O(levels), not O(t).
    """
    hist = hist.astype(np.float64)
    # The first bin holds the exact zeros of ReLU-like tensors, a spike that both P and Q keep
    # exactly; leaving it in lets it dominate the divergence and pull the threshold far down.
    hist[0] = 0.0
    last = int(np.nonzero(hist)[0][-1]) + 1 if hist.any() else 0
    if last <= levels:
        return float(max(last, 1))
    t = np.unique(np.linspace(levels, last, 128).astype(np.int64))
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    occupied = np.concatenate([[0], np.cumsum(hist > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        h_log_h = np.concatenate([[0.0], np.cumsum(np.where(hist > 0, hist * np.log(hist), 0.0))])
    total, kept = cum[-1], cum[t]
    bounds = -((-np.arange(levels + 1)[None, :] * t[:, None]) // levels)  # first bin of each group
    sums = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    mean = sums / np.maximum(occupied[bounds[:, 1:]] - occupied[bounds[:, :-1]], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(sums > 0, np.log(mean) - np.log(kept)[:, None], 0.0)  # per group, normalised
    # Bin t-1 carries the tail in P; where it is empty, Q is 0 there (TensorRT's epsilon).
    h_last = hist[t - 1]
    group_last = np.minimum(((t - 1) * levels) // t, levels - 1)
    log_q_last = np.where(h_last > 0, log_q[np.arange(t.size), group_last], np.log(1e-12))
    p_last = (h_last + total - kept) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = (h_log_h[t - 1] - cum[t - 1] * np.log(total)) / total + np.where(
            p_last > 0, p_last * np.log(p_last), 0.0)
    p_log_q = ((sums * log_q).sum(axis=1) - h_last * np.where(h_last > 0, log_q_last, 0.0)) / total \
        + p_last * log_q_last
    return float(t[int(np.argmin(p_log_p - p_log_q))])


__all__ = ["AUTO_METHODS", "METHODS", "Transfer", "activation_range", "quantization_mse", "sigmoid", "transfer"]
