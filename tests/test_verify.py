"""edgegraph.verify: the metrics every pass is judged by, on arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgegraph import verify


def test_identical_floats():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    m = verify.compare("out", x, x.copy())
    assert m.exact_match and m.max_abs == 0.0
    assert m.cosine == pytest.approx(1.0) and m.sqnr_db == math.inf
    assert m.top1 == 1.0  # (batch, classes)
    assert m.ref_max_abs == pytest.approx(3.0)


def test_known_error():
    ref = np.array([[3.0, 4.0]], np.float32)
    cand = np.array([[3.0, 5.0]], np.float32)
    m = verify.compare("y", ref, cand)
    assert not m.exact_match
    assert m.max_abs == pytest.approx(1.0)
    assert m.sqnr_db == pytest.approx(10 * math.log10(25 / 1))
    assert m.cosine == pytest.approx((9 + 20) / (5 * math.sqrt(34)))
    assert m.top1 == 1.0
    assert m.ref_max_abs == pytest.approx(4.0)


def test_top1_counts_rows_with_the_same_argmax():
    ref = np.array([[1, 2, 3], [3, 2, 1], [0, 5, 0], [1, 0, 0]], np.float32)
    cand = np.array([[1, 2, 3], [1, 2, 3], [0, 5, 0], [0, 0, 1]], np.float32)
    assert verify.compare("p", ref, cand).top1 == pytest.approx(0.5)
    # [batch, classes, 1, 1] (e.g. SqueezeNet's softmax output) still counts as scores.
    assert verify.compare("p", ref[..., None, None], cand[..., None, None]).top1 == pytest.approx(0.5)
    assert verify.looks_like_scores(ref[..., None, None])
    # Feature maps and single-column outputs are not class scores.
    assert verify.compare("map", np.ones((2, 3, 4, 4), np.float32), np.ones((2, 3, 4, 4), np.float32)).top1 is None
    assert not verify.looks_like_scores(np.ones((4, 1), np.float32))
    assert not verify.looks_like_scores(np.ones((4, 3), np.int64))
    assert verify.argmax_agreement(ref, cand, axis=0) == pytest.approx(2 / 3)


def test_integers_must_match_exactly():
    ids = np.array([[1, 2], [3, 4]], np.int64)
    same = verify.compare("ids", ids, ids.copy())
    assert same.exact_match and same.max_abs == 0.0 and same.cosine == 1.0 and same.sqnr_db == math.inf
    off = verify.compare("ids", ids, ids + np.array([[0, 0], [0, 1]]))
    assert not off.exact_match and off.max_abs == math.inf and off.cosine == 0.0 and off.sqnr_db == -math.inf
    assert verify.exactness_violation({"ids": off}, rtol=1e-3, atol=1e-3) == ("ids", "mismatch", math.inf, 0.0)
    flags = np.array([True, False])
    assert verify.compare("mask", flags, flags.copy()).exact_match
    assert not verify.compare("mask", flags, ~flags).exact_match


def test_nan_and_inf_must_sit_in_the_same_places():
    ref = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    m = verify.compare("y", ref, ref.copy())
    assert m.exact_match and m.max_abs == 0.0 and m.sqnr_db == math.inf
    moved = verify.compare("y", ref, np.array([np.nan, 1.0, np.inf, 2.0], np.float32))
    assert not moved.exact_match and moved.max_abs == math.inf
    sign = verify.compare("y", ref, np.array([1.0, np.nan, -np.inf, 2.0], np.float32))
    assert sign.max_abs == math.inf
    # The finite part is still compared numerically.
    close = verify.compare("y", ref, np.array([1.0, np.nan, np.inf, 2.5], np.float32))
    assert close.max_abs == pytest.approx(0.5) and not close.exact_match


def test_shape_mismatch_is_the_worst_result():
    m = verify.compare("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert (m.max_abs, m.cosine, m.sqnr_db, m.top1, m.exact_match) == (math.inf, 0.0, -math.inf, None, False)
    assert verify.exactness_violation({"y": m}, rtol=1, atol=1) is not None


def test_zero_signal():
    zeros = np.zeros((2, 4), np.float32)
    assert verify.compare("z", zeros, zeros.copy()).cosine == 1.0
    m = verify.compare("z", zeros, zeros + 0.5)
    assert m.sqnr_db == -math.inf and m.cosine == 0.0 and m.max_abs == pytest.approx(0.5)
    assert verify.compare("empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)).exact_match


def test_exactness_violation_uses_relative_and_absolute_tolerance():
    ref = np.array([[100.0, -50.0]], np.float32)
    within = verify.compare("y", ref, ref + np.float32(0.009))  # threshold 1e-3 + 1e-4 * 100 = 0.011
    beyond = verify.compare("z", ref, ref + np.float32(0.02))
    assert verify.exactness_violation({"y": within}, rtol=1e-4, atol=1e-3) is None
    name, metric, value, threshold = verify.exactness_violation({"y": within, "z": beyond}, rtol=1e-4, atol=1e-3)
    assert (name, metric) == ("z", "max_abs")
    assert value == pytest.approx(0.02, rel=1e-3) and threshold == pytest.approx(0.011)


def test_compare_all_concatenates_batches():
    refs = [{"y": np.array([[1.0, 0.0]], np.float32)}, {"y": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)}]
    cands = [{"y": np.array([[0.9, 0.1]], np.float32)}, {"y": np.array([[0.2, 0.8], [0.4, 0.6]], np.float32)}]
    metrics = verify.compare_all(refs, cands)
    assert list(metrics) == ["y"]
    assert metrics["y"].top1 == pytest.approx(2 / 3)
    assert metrics["y"].max_abs == pytest.approx(0.6)
    # Outputs whose trailing dims vary per batch are compared flattened.
    ragged = [{"y": np.ones((1, 2), np.float32)}, {"y": np.ones((1, 3), np.float32)}]
    assert verify.compare_all(ragged, ragged)["y"].exact_match
    assert verify.compare_all([], []) == {}
    assert set(metrics["y"].as_dict()) == {"name", "max_abs", "ref_max_abs", "cosine", "sqnr_db", "top1",
                                           "exact_match", "dtype"}


def test_worst_sqnr_matches_compare_all_over_float_outputs():
    rng = np.random.default_rng(0)
    refs = [{"a": rng.standard_normal((2, 50)).astype(np.float32), "b": rng.standard_normal((2, 7)).astype(np.float32),
             "ids": np.arange(3)} for _ in range(3)]
    cands = [{"a": r["a"] + 0.01 * rng.standard_normal(r["a"].shape).astype(np.float32),
              "b": r["b"] + 0.3 * rng.standard_normal(r["b"].shape).astype(np.float32), "ids": r["ids"]} for r in refs]
    full = verify.compare_all(refs, cands)
    assert verify.worst_sqnr_db(refs, cands) == pytest.approx(min(full["a"].sqnr_db, full["b"].sqnr_db), abs=1e-3)
    assert verify.worst_sqnr_db(refs, refs) == math.inf
