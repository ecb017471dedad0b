"""Activation statistics over calibration batches, and the ways to turn them into ranges.

`RangeStats` keeps, per tensor, the exact min / max and a histogram whose memory does not depend
on how many batches are seen: it covers [-R, R] with 2 * BINS equal bins (0 is always a bin edge)
and, when a batch exceeds R, doubles R by merging neighbouring bins, which is exact because the
edges line up. Large tensors are subsampled (deterministically) for the histogram only.

Range methods (`activation_range`):
  minmax      observed min / max
  percentile  drop the `percentile` tails on each side
  mse         the clipping range that minimises the expected squared quantization error
              (rounding inside, clipping outside) of the tensor's histogram, measured after the
              activation its readers apply when there is one (SiLU, Sigmoid, HardSwish, ...)
  entropy     TensorRT's KL-divergence threshold on |x|, with as many levels as the side has
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgegraph.passes.quant.numerics import QType, scale_zero_point

BINS = 2048  # per side of zero
HIST_SAMPLES = 1 << 18  # histogram elements taken from one tensor of one batch
METHODS = ("minmax", "percentile", "mse", "entropy")


class RangeStats:
    """Streaming min / max / histogram of one tensor."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.limit = 0.0  # R: the histogram covers [-R, R]
        self.hist = np.zeros(2 * BINS, dtype=np.int64)

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add a batch of values. `lo` / `hi` are the batch's exact extremes when `values` is only
        a sample of it (the histogram is built from the sample, the range from the extremes)."""
        x = np.asarray(values).ravel()
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            x = x[np.isfinite(x)]  # inf / nan never set a range
            lo = hi = None
        if lo is None or hi is None:
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        lo, hi = float(lo), float(hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if x.size > HIST_SAMPLES:
            x = x[:: -(-x.size // HIST_SAMPLES)]
        self._grow(max(-lo, hi))
        if self.limit == 0.0:  # all zeros so far
            self.hist[BINS] += x.size
        else:
            # Non-finite values (only possible without lo / hi) were dropped above; others lie in range.
            index = ((x + np.float32(self.limit)) * np.float32(BINS / self.limit)).astype(np.int64)
            np.minimum(index, 2 * BINS - 1, out=index)
            np.maximum(index, 0, out=index)
            self.hist += np.bincount(index, minlength=2 * BINS)
        self.count += x.size

    def _grow(self, absmax: float) -> None:
        if absmax <= self.limit:
            return
        if self.limit == 0.0:
            zeros = self.hist.sum()
            self.hist[:] = 0
            self.limit = absmax
            self.hist[BINS] = zeros  # the exact zeros seen so far go to the bin just above 0
            return
        factor = 1 << math.ceil(math.log2(absmax / self.limit))
        if factor >= 2 * BINS:
            negative, positive = self.hist[:BINS].sum(), self.hist[BINS:].sum()
            self.hist[:] = 0
            self.hist[BINS - 1], self.hist[BINS] = negative, positive
        else:
            merged = self.hist.reshape(-1, factor).sum(axis=1)
            self.hist[:] = 0
            offset = BINS - merged.size // 2
            self.hist[offset:offset + merged.size] = merged
        self.limit *= factor

    @property
    def empty(self) -> bool:
        return self.count == 0 and self.min > self.max

    def merge_from(self, other: RangeStats) -> None:
        """Add another tensor's statistics (tensors that share one scale)."""
        if other.empty:
            return
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._grow(other.limit)
        hist = other.hist
        if other.limit and other.limit < self.limit:
            hist = _rebin(other.hist, other.limit, self.limit)
        self.hist += hist
        self.count += other.count

    def fraction_above(self, value: float) -> float:
        """Fraction of the histogram above `value` (bin resolution)."""
        if self.empty or self.limit == 0.0:
            return 0.0 if value >= 0 else 1.0
        index = int(np.clip(np.floor((value + self.limit) / (self.limit / BINS)), 0, 2 * BINS))
        return float(self.hist[index:].sum() / max(self.hist.sum(), 1))

    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, 2 * BINS + 1)


def _rebin(hist: np.ndarray, limit: float, new_limit: float) -> np.ndarray:
    """A histogram over [-limit, limit] re-expressed over [-new_limit, new_limit] (new_limit >= limit)."""
    factor = new_limit / limit
    power = round(math.log2(factor))
    if math.isclose(2.0**power, factor, rel_tol=1e-9) and (1 << power) < 2 * BINS:
        merged = hist.reshape(-1, 1 << power).sum(axis=1)
        out = np.zeros_like(hist)
        offset = BINS - merged.size // 2
        out[offset:offset + merged.size] = merged
        return out
    centers = (np.arange(2 * BINS) + 0.5) * (2 * limit / (2 * BINS)) - limit
    index = np.clip(np.floor((centers + new_limit) / (new_limit / BINS)).astype(np.int64), 0, 2 * BINS - 1)
    return np.bincount(index, weights=hist, minlength=2 * BINS).astype(np.int64)


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
    lo, hi = np.atleast_1d(lo)[:, None], np.atleast_1d(hi)[:, None]
    scale, zero_point = scale_zero_point(lo, hi, qt, symmetric)
    scale = scale.astype(np.float64)
    low = (qt.qmin - zero_point.astype(np.float64)) * scale
    high = (qt.qmax - zero_point.astype(np.float64)) * scale
    clipped = np.clip(centers, low, high)
    inside = (centers >= low) & (centers <= high)
    if transfer is None:
        error = (centers - clipped) ** 2 + inside * (scale**2 / 12.0)
    else:
        # Only clipped entries need f(clipped); f of the low / high bound per candidate is enough.
        f_centers = transfer.f(centers)
        clip_error = np.where(centers < low, transfer.f(low) - f_centers, 0.0) + np.where(
            centers > high, transfer.f(high) - f_centers, 0.0)
        error = clip_error**2 + inside * transfer.df(centers) ** 2 * (scale**2 / 12.0)
    return (error * counts).sum(axis=1)


def _mse_range(stats: RangeStats, qt: QType, symmetric: bool, lo: float, hi: float,
               transfer: Transfer | None = None) -> tuple[float, float]:
    """Coordinate search over clipping ratios of the observed range: the upper bound with the lower
    fixed, then the lower bound, twice; each a coarse grid refined around its best point. A
    symmetric range has one free parameter, so both bounds scale together."""
    centers, counts = _centers_counts(stats)

    def best_ratio(candidates: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], sym: bool) -> float:
        ratios = np.linspace(0.02, 1.0, 50)
        for _ in range(2):
            errors = quantization_mse(centers, counts, *candidates(ratios), qt, sym, transfer)
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
    """Number of bins (a threshold in bin units) minimising KL(P || Q), TensorRT style."""
    hist = hist.astype(np.float64)
    # The first bin holds the exact zeros of ReLU-like tensors, a spike that both P and Q keep
    # exactly; leaving it in lets it dominate the divergence and pull the threshold far down.
    hist[0] = 0.0
    last = int(np.nonzero(hist)[0][-1]) + 1 if hist.any() else 0
    if last <= levels:
        return float(max(last, 1))
    candidates = np.unique(np.linspace(levels, last, 128).astype(np.int64))
    best, best_kl = last, math.inf
    for t in candidates:
        p = hist[:t].copy()
        p[-1] += hist[t:].sum()
        # Q: the first t bins merged into `levels` groups, each spread back over its non-empty bins.
        groups = np.minimum((np.arange(t) * levels) // t, levels - 1)
        sums = np.bincount(groups, weights=hist[:t], minlength=levels)
        nonzero = np.bincount(groups, weights=(hist[:t] > 0).astype(np.float64), minlength=levels)
        q = np.where(hist[:t] > 0, sums[groups] / np.maximum(nonzero[groups], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best, best_kl = int(t), kl
    return float(best)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q_sum = q.sum()
    if q_sum == 0:
        return math.inf
    q = q / q_sum
    mask = p > 0
    with np.errstate(divide="ignore"):
        terms = p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))
    return float(terms.sum())


__all__ = ["BINS", "METHODS", "RangeStats", "Transfer", "activation_range", "quantization_mse", "sigmoid", "transfer"]
