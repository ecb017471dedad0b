"""The faster fit paths of `codebook` compute what the direct ones compute.

* the per-channel assignment by cutting sorted rows equals the binary search per element;
* H⁻¹'s Cholesky factor from the reversed Cholesky factor of H equals cholesky(inv(H));
* the refit by conjugate gradients is the least-squares solution, per channel too, with pinned
  and unused centroids kept;
* the bit planes unpacked by a shared table or by BitShifts decode to the same weights, exactly
  the dense snapped ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgegraph import modelio, runtime
from edgegraph.analysis import capture
from edgegraph.context import PassContext, VerifyConfig
from edgegraph.passes import codebook as cb
from edgegraph.passes.codebook import datafit, kmeans1d
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse
from fixtures import quant as qfx


def test_assign_sorted_equals_assign():
    rng = np.random.default_rng(1)
    for trial in range(60):
        g, n, k = int(rng.integers(1, 6)), int(rng.integers(1, 300)), int(rng.integers(2, 20))
        x = np.round(rng.normal(size=(g, n)), int(rng.integers(0, 3)))  # many ties, some on the edges
        c = np.sort(np.round(rng.normal(size=(g, k)), 1), axis=1)
        if trial % 3 == 0:
            c[:, 1] = c[:, 0]  # a repeated centroid
        order = np.argsort(x, axis=1)
        found = kmeans1d.assign_sorted(np.take_along_axis(x, order, axis=1), order, c)
        np.testing.assert_array_equal(found, kmeans1d.assign(x, c))


@pytest.mark.parametrize("n", [10, 100, 300])
def test_inverse_factor_is_the_cholesky_factor_of_the_inverse(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3 * n, n)) * rng.uniform(0.1, 3, n)
    h = x.T @ x
    h[2, :] = h[:, 2] = 0  # a dead feature
    u, dead = capture.inverse_factor(h)
    damped = h.copy()
    damped[2, 2] = 1.0
    damped[np.diag_indices(n)] += capture.DAMPING * np.mean(np.diag(damped))
    assert dead[2] and dead.sum() == 1
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(damped)).T, rtol=1e-9, atol=1e-12)
    assert np.array_equal(u, np.triu(u))


def test_refit_per_channel_is_the_least_squares_solution():
    rng = np.random.default_rng(4)
    o, f, k, n = 5, 24, 4, 400
    x = rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) * rng.uniform(0.1, 3, f)  # correlated features
    w = rng.normal(size=(o, f))
    idx = rng.integers(0, k - 1, (o, f))  # centroid k-1 is used by no weight: it stays
    scale = rng.uniform(0.5, 2, o)
    start = rng.normal(size=(o, k))
    pinned = np.zeros((o, k), bool)
    pinned[1, 0] = True  # row 1 keeps its first centroid
    fit = datafit.LayerFit((x.T @ x)[None], lambda m: m, lambda m: m, n)
    found = datafit.refit(w, idx, start, np.arange(o), scale, fit, pinned, tolerance=1e-10)
    for r in range(o):  # directly: min over c of ||X (w_r - s_r c[idx_r])||², the pinned entry fixed
        design = x @ (scale[r] * (idx[r][:, None] == np.arange(k)))
        target = x @ w[r]
        free = ~pinned[r] & (np.arange(k) < k - 1)
        target = target - design[:, ~free] @ start[r, ~free]
        direct = np.linalg.lstsq(design[:, free], target, rcond=None)[0]
        np.testing.assert_allclose(found[r, free], direct, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(found[r, ~free], start[r, ~free])
    # The default tolerance (the pass's) reaches the same layer error to 1e-5.
    quick = datafit.refit(w, idx, start, np.arange(o), scale, fit, pinned)
    decode = lambda c: c[np.arange(o)[:, None], idx] * scale[:, None]  # noqa: E731
    best = datafit.objective(w, decode(found), fit)
    assert abs(datafit.objective(w, decode(quick), fit) - best) <= 1e-5 * best


@pytest.mark.parametrize("bits", [3, 6])
def test_table_and_bitshift_unpacking_decode_the_same(monkeypatch, bits):
    """2- and 1-bit planes unpacked by the shared lookup tables or by BitShifts (what `plan` picks
    by the planes' count) give exactly the outputs of the dense snapped model."""
    proto = qfx.small_convnet(17)
    ctx = PassContext(progress=False, verify=VerifyConfig(enabled=False))
    spec = f"codebook(bits={bits}, min_elements=100, codebook_dtype=float32)"
    x = qfx.convnet_inputs(4)
    outputs, tables = [], []
    for node_bytes in (0, 10 ** 9):  # never / always a table
        monkeypatch.setattr(cb, "UNPACK_NODE_BYTES", node_bytes)
        model, _ = run_pipeline(modelio.load(proto), parse(spec), ctx)
        tables.append({c.name for c in model.graph.tensors().values() if c.name.startswith("cbu")})
        sess = runtime.session(model.to_proto(), optimize=True)
        outputs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    dense, _ = run_pipeline(modelio.load(proto), parse(spec.replace("codebook(", "codebook(dense=true, ")), ctx)
    sess = runtime.session(dense.to_proto(), optimize=True)
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert not tables[0] and tables[1]  # the two unpackings were written
    np.testing.assert_array_equal(outputs[0], expected)
    np.testing.assert_array_equal(outputs[1], expected)
