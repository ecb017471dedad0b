"""Compare a candidate model's outputs with a reference's: the numbers every pass is judged by."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from edgegraph.runtime import Feeds


@dataclass(frozen=True)
class OutputMetrics:
    """Agreement of one output over a set of samples."""

    name: str
    max_abs: float
    ref_max_abs: float  # scale of the reference values, what tolerances are relative to
    cosine: float
    sqnr_db: float
    top1: float | None  # fraction of rows with the same argmax, when the output looks like class scores
    exact_match: bool  # bitwise equal (integer outputs must be)
    dtype: str = "float32"  # of the reference output: exact-pass tolerances scale with its precision

    def as_dict(self) -> dict:
        return asdict(self)


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB from the two energies (inf when there is no noise)."""
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def looks_like_scores(array: np.ndarray) -> bool:
    """(batch, classes) after squeezing trailing singleton dims, with more than one class."""
    squeezed = _squeeze_trailing(array)
    return squeezed.ndim == 2 and squeezed.shape[1] > 1 and array.dtype.kind == "f"


# Class scores come out of a softmax, or of the linear layer of a classifier's head; these ops
# only reshape or retype them on the way to the output.
_SCORE_OPS = {"Softmax", "LogSoftmax"}
_HEAD_OPS = {"Gemm", "MatMul"}
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout"}


def score_outputs(model) -> frozenset[str]:
    """The outputs of `model` (an ir.Model) that are class scores, for which top-1 agreement
    means something; `compare_all(..., scores=...)` reports it for these only.

    An output is class scores when it is (batch, classes) shaped (`looks_like_scores`, and its
    axis 0 is the inputs' axis 0, so not one row per anchor or prior) and is computed by a
    Softmax/LogSoftmax, or, for a model with a single output, by a Gemm/MatMul (+ bias Add):
    a classifier's logits. The boxes, states or embeddings beside other outputs are not scores.
    """
    from edgegraph import ir

    graph = model.graph
    batch_dims = {t.shape[0] for t in graph.inputs if t.shape}
    found = set()
    for out in graph.outputs:
        shape = list(out.shape or [])
        while len(shape) > 2 and shape[-1] == 1:
            shape.pop()
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] < 2) or shape[0] not in batch_dims:
            continue
        node = ir.producer(out)
        while node is not None and node.op in _PASS_THROUGH and node.inputs:
            node = ir.producer(node.inputs[0])
        if node is not None and node.op == "Add" and len(graph.outputs) == 1:
            node = next((ir.producer(t) for t in node.inputs if ir.producer(t) is not None
                         and ir.producer(t).op in _HEAD_OPS), node)
        if node is not None and (node.op in _SCORE_OPS or (node.op in _HEAD_OPS and len(graph.outputs) == 1)):
            found.add(out.name)
    return frozenset(found)


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray, axis: int = -1) -> float:
    """Fraction of positions whose argmax along `axis` agrees (top-1 per row, or per pixel)."""
    return float(np.mean(np.argmax(reference, axis=axis) == np.argmax(candidate, axis=axis)))


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, *, scores: bool | None = None) -> OutputMetrics:
    """Agreement of one output; top-1 when `scores` (None: when the arrays look like scores)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        return OutputMetrics(name, float("inf"), 0.0, 0.0, float("-inf"), None, False, reference.dtype.name)
    exact = bool(np.array_equal(reference, candidate, equal_nan=reference.dtype.kind == "f"))
    if reference.dtype.kind not in "fc" or reference.size == 0:
        diff = 0.0 if exact else float("inf")
        return OutputMetrics(name, diff, 0.0, 1.0 if exact else 0.0, float("inf") if exact else float("-inf"), None,
                             exact, reference.dtype.name)
    ref = reference.astype(np.float64).ravel()
    cand = candidate.astype(np.float64).ravel()
    finite = np.isfinite(ref) & np.isfinite(cand)
    # Non-finite values must match position and value; the rest are compared numerically.
    same_nonfinite = np.array_equal(ref[~finite], cand[~finite], equal_nan=True)
    ref, cand = ref[finite], cand[finite]
    error = cand - ref
    max_abs = float(np.max(np.abs(error))) if error.size else 0.0
    if not same_nonfinite:
        max_abs = float("inf")
    signal, noise = float(np.sum(ref**2)), float(np.sum(error**2))
    sqnr = sqnr_db(signal, noise)
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    cosine = float(ref @ cand / norms) if norms > 0 else (1.0 if noise == 0 else 0.0)
    top1 = None
    if looks_like_scores(reference) and scores is not False:
        top1 = argmax_agreement(_squeeze_trailing(reference), _squeeze_trailing(candidate))
    ref_scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return OutputMetrics(name, max_abs, ref_scale, cosine, sqnr, top1, exact, reference.dtype.name)


def compare_all(references: Iterable[Feeds], candidates: Iterable[Feeds], *,
                scores: Collection[str] | None = None) -> dict[str, OutputMetrics]:
    """Metrics per output over batches of outputs (concatenated along axis 0); top-1 only for
    the outputs named in `scores` (see `score_outputs`), or by their shape when it is None."""
    refs, cands = list(references), list(candidates)
    names = list(refs[0]) if refs else []
    return {n: compare(n, _concat([r[n] for r in refs]), _concat([c[n] for c in cands]),
                       scores=None if scores is None else n in scores) for n in names}


def worst_sqnr_db(references: Iterable[Feeds], candidates: Iterable[Feeds]) -> float:
    """The lowest SQNR (dB) over the float outputs, from float32 dot products: cheap enough to
    score many candidate models (`compare_all` also finds max errors, cosines and top-1)."""
    refs, cands = list(references), list(candidates)
    worst = float("inf")
    for name, value in (refs[0].items() if refs else ()):
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":  # (sequences, optionals: not scored)
            continue
        signal = noise = 0.0
        for ref, cand in zip(refs, cands):
            r = np.ascontiguousarray(ref[name], dtype=np.float32).ravel()
            error = np.ascontiguousarray(cand[name], dtype=np.float32).ravel() - r
            signal, noise = signal + float(np.dot(r, r)), noise + float(np.dot(error, error))
        worst = min(worst, sqnr_db(signal, noise))
    return worst


# An output stored in a dtype coarser than float32 may differ by this many units of its own
# rounding (machine epsilon relative to max|reference|): one pass computing in float32 and
# another in float16 already round the last result differently, and rounding errors of a few
# operations add up. 4 units pass SqueezeNet-fp16's 1-unit differences and catch 10 units.
ROUNDING_UNITS = 4
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def machine_epsilon(dtype) -> float | None:
    """Machine epsilon of a float (or complex) dtype, ml_dtypes' bfloat16/float8 included; None otherwise."""
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        pass
    try:
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    except (ImportError, TypeError, ValueError):
        return None


def tolerance(dtype, rtol: float, atol: float) -> tuple[float, float]:
    """(rtol, atol) for an output of `dtype`, given float32's.

    float32's tolerance is a number of units of float32 rounding; a finer dtype (float64) gets
    the same number of units of its own epsilon. A coarser one (float16, bfloat16) cannot agree
    closer than its rounding: rtol becomes at least ROUNDING_UNITS epsilons of that dtype.
    """
    eps = machine_epsilon(dtype)
    if eps is None:
        return rtol, atol
    ratio = eps / _FLOAT32_EPS
    if ratio <= 1:
        return rtol * ratio, atol * ratio
    return max(rtol, ROUNDING_UNITS * eps), atol


def exactness_violation(metrics: Mapping[str, OutputMetrics], rtol: float, atol: float):
    """The first output outside `atol + rtol * max|reference|` as (output, metric, value, threshold), or None.

    `rtol` and `atol` are float32's; other float outputs get them scaled by `tolerance`.
    """
    for m in metrics.values():
        if m.exact_match:
            continue
        if m.top1 is None and m.ref_max_abs == 0.0 and m.max_abs == float("inf"):
            return m.name, "mismatch", m.max_abs, 0.0
        out_rtol, out_atol = tolerance(m.dtype, rtol, atol)
        threshold = out_atol + out_rtol * m.ref_max_abs
        if not m.max_abs <= threshold:
            return m.name, "max_abs", m.max_abs, threshold
    return None


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1 or any(a.ndim == 0 for a in arrays):
        return arrays[0] if len(arrays) == 1 else np.stack(arrays)
    try:
        return np.concatenate(arrays)
    except ValueError:  # outputs whose non-batch dims vary per sample
        return np.concatenate([a.ravel() for a in arrays])


def _squeeze_trailing(array: np.ndarray) -> np.ndarray:
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return array
