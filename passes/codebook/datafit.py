"""Data-aware codebooks (`--calib`): fit what the layer computes, not the weights.

Snapping W to a codebook changes a layer's output by X (W - Ŵ)ᵀ; its energy over calibration
inputs is tr(Δ H Δᵀ) with H = XᵀX, the Gram matrix of the layer's input features (captured in
one streamed pass by `edgegraph.analysis.capture.grams`, im2col features for Conv). Three ways
to use H, each on top of the one before:

* importance: the weight k-means weighs each squared error by diag(H) of the feature it
  multiplies (the issue's importance weighting; diag(H) per kernel position for a Conv);
* refit: with the indices fixed, Ŵ is linear in the centroids, so the centroids that minimise
  tr(Δ H Δᵀ) solve a k x k system per codebook: (Σ_o s_o² A_o H A_oᵀ) c = Σ_o s_o A_o H w_o,
  A_o the one-hot (k x F) assignment of row o, s_o its scale (granularity scaled);
* gptq: the indices themselves chosen column by column with the error of each fed forward to the
  columns not yet assigned through the Cholesky factor of H⁻¹ (OBQ / GPTQ, Frantar et al. 2022:
  it works for any grid, here each row's codebook), columns in order of decreasing diag(H), then
  the refit, twice.

Layers without a usable Gram (embeddings, ConvTranspose, transposed inputs) keep the plain
k-means; layers with few captured rows per feature get H shrunk toward its diagonal (SHRINK). `quant`'s rounding shares the layer matrix and the damped
H⁻¹ factor (`edgegraph/analysis/capture.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgegraph import runtime
from edgegraph.analysis import capture
from edgegraph.context import CalibrationData, PassContext

FITS = ("auto", "kmeans", "refit", "gptq")
ROUNDS = 2  # gptq -> refit rounds (the second gains ~5-10% of the objective, a third < 1%)
# GPTQ / OBS move weights along H's directions: with few captured rows per feature H is mostly the
# captured samples' (an MLP with 48 inputs at 10.7 rows per feature: 3.5x lower output error than
# k-means on the calibration inputs, 1.6x higher on held-out ones). Below this the layer gets the
# refit (k parameters per codebook) only. (quant's rounding, which moves a weight by one step at
# most, stops at 4.)
GPTQ_ROWS_PER_FEATURE = 32
# Below that, H is shrunk toward its diagonal, (1 - s) H + s diag(H) (covariance shrinkage: the
# off-diagonal correlations are what a few samples get wrong, the feature energies they get
# right), and GPTQ runs on it. MiniLM (2.7 rows per feature), its 37 MatMuls at 5 bits, worst
# held-out cosine: refit only 0.971/0.975; GPTQ on H shrunk by 0.3: 0.988/0.984, by 0.7:
# 0.985/0.987 (unshrunk: 0.58, above).
SHRINK = 0.5
GPTQ_BLOCK = 32  # columns whose error feedback is applied at once (GPTQ's lazy batch updates; 32: the
# in-block updates, one per column, are what a column step costs, 2x less than at 128 on MiniLM)
REFIT_TOLERANCE = 1e-4  # the refit's conjugate gradients stop at this relative residual
# Past 64 levels (7-8 bits) the k-means error is already ~1/250 of the 4-bit one: no refit there.
REFIT_MAX_LEVELS = 64


@dataclass
class LayerFit:
    """A weight's layer objective: the weight as rows over the Gram's features."""

    h: np.ndarray  # (groups, F, F) float64 (not damped)
    back: callable  # O x F matrix -> the weight's layout
    to_rows: callable  # the weight's layout -> O x F
    rows: int = 0  # feature rows captured (samples x positions)
    shrunk: bool = False  # h is shrunk toward its diagonal (few rows per feature, SHRINK)
    factors: list | None = None  # per group: (U with H⁻¹ = UᵀU, dead features) or None (lazily)
    h32: np.ndarray | None = None  # h in float32 (lazily)

    @property
    def groups(self) -> int:
        return self.h.shape[0]

    def hdiag(self, rows: int) -> np.ndarray:
        """(O, F) diag(H) of each row's group (the importance of every weight)."""
        d = np.diagonal(self.h, axis1=1, axis2=2)  # (G, F)
        return np.repeat(d, rows // self.groups, axis=0)

    def times_h(self, rows: np.ndarray) -> np.ndarray:
        """(O, F) rows times the H of their group, in float32 (float32 BLAS is twice as fast, and
        what it feeds, the refit's steps and the objective's comparisons, needs no more)."""
        if self.h32 is None:
            self.h32 = self.h.astype(np.float32)
        rows = rows.astype(np.float32)
        per = rows.shape[0] // self.groups
        if self.groups == 1:
            return rows @ self.h32[0]
        return np.concatenate([rows[g * per:(g + 1) * per] @ self.h32[g] for g in range(self.groups)])

    def factor(self, g: int):
        """(column order by decreasing diag(H), U of the permuted H, its dead features) or None."""
        if self.factors is None:
            self.factors = []
            for h in self.h:
                order = np.argsort(-np.diag(h), kind="stable")
                found = capture.inverse_factor(h[np.ix_(order, order)])
                self.factors.append(None if found is None else (order, *found))
        return self.factors[g]


def capture_fits(model, weights, data: CalibrationData, ctx: PassContext) -> dict[str, LayerFit]:
    """{weight name: LayerFit} for the weights read by one Conv / Gemm / MatMul with a Gram."""
    from edgegraph.convert import compute_in_float32
    from edgegraph.passes.quant.prepare import name_nodes

    name_nodes(model.graph)  # the probe finds its layers by name (exporters leave some unnamed)
    wanted = {}
    for w in weights:
        if len(w.readers) != 1 or w.op not in ("Conv", "Gemm", "MatMul"):
            continue
        if capture.layer_matrix(w.readers[0], w.value) is None:
            continue
        wanted[w.readers[0].name] = w
    if not wanted:
        return {}
    probed = model.copy()
    compute_in_float32(probed)  # the probe's im2col and float64 sums need float32 layers
    proto = probed.to_proto()
    batches = runtime.feeds_of(proto, data)
    try:
        grams = capture.grams(proto, sorted(wanted), batches, threads=ctx.threads,
                              progress=lambda it, **_: ctx.progress_bar(it, total=len(batches),
                                                                         desc="codebook: capturing XᵀX"))
    except (ValueError, RuntimeError):  # a layout the probe cannot read: no data-aware fit
        return {}
    fits = {}
    for name, gram in grams.items():
        w = wanted[name]
        node = w.readers[0]
        rows, back = capture.layer_matrix(node, w.value)
        h = np.asarray(gram.xtx, np.float64)
        h = h.reshape(-1, h.shape[-2], h.shape[-1])
        if h.shape[-1] != rows.shape[1] or rows.shape[0] % h.shape[0]:
            continue
        shrunk = gram.rows < GPTQ_ROWS_PER_FEATURE * h.shape[-1]
        if shrunk:
            diag = np.diagonal(h, axis1=1, axis2=2).copy()
            h = h * (1 - SHRINK)
            for g in range(h.shape[0]):
                h[g][np.diag_indices(h.shape[-1])] += SHRINK * diag[g]
        fits[w.tensor.name] = LayerFit(h, back, lambda v, node=node: capture.layer_matrix(node, v)[0], gram.rows,
                                       shrunk=shrunk)
    return fits


# ---------------------------------------------------------------------------------------------
# The objective in row form: Ŵ[o, f] = s[o] * C[r[o], idx[o, f]]


def objective(w: np.ndarray, snapped: np.ndarray, fit: LayerFit) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) summed over the groups (rows as O x F)."""
    d = w - snapped
    return float((fit.times_h(d) * d).sum(dtype=np.float64))


def refit(w: np.ndarray, idx: np.ndarray, codebook: np.ndarray, owner: np.ndarray, scale: np.ndarray,
          fit: LayerFit, pinned: np.ndarray, tolerance: float = REFIT_TOLERANCE) -> np.ndarray:
    """Least-squares centroids (the same shape as `codebook`, (R, k)) for fixed indices idx (O, F):
    row o decodes scale[o] * codebook[owner[o], idx[o]]. Centroids in `pinned` (R, k) stay as they are
    (a zero centroid keeps pruned weights zero), and so do centroids no weight uses.

    The k x k normal equations (Σ_o s_o² A_o H A_oᵀ) c = Σ_o s_o A_o H w_o are solved by conjugate
    gradients, all R systems at once, started at the current centroids: each step costs one
    (O x F) @ (F x F) product, Δ H, and a scatter of it onto the centroids, where forming the
    systems costs k such products (O F² k: MiniLM's 36 layers 20 s, 53% of the whole pass). The
    preconditioner is the systems' diagonal with H taken as diagonal (exact when it is); measured
    on MiniLM's layers, 4 (per-tensor codebooks) to 12 steps (per-channel) reach 1e-4, where the
    objective matches the direct solve's to 1e-4 of the refit's gain. In exact arithmetic k steps
    solve each system exactly; `tolerance` (relative preconditioned residual) stops earlier."""
    r_count, k = codebook.shape
    per = w.shape[0] // fit.groups
    slot = (owner[:, None] * k + idx).ravel()  # the centroid each weight decodes to

    def scatter(q):  # (O, F) -> (R, k): Σ over each centroid's weights of scale * q
        return np.bincount(slot, weights=(q * scale[:, None]).ravel(), minlength=r_count * k).reshape(r_count, k)

    def expand(c):  # (R, k) -> (O, F): the decoded rows
        return c[owner[:, None], idx] * scale[:, None]

    diag = np.repeat(np.diagonal(fit.h, axis1=1, axis2=2), per, axis=0)  # (O, F) H_ff of each weight
    precondition = np.bincount(slot, weights=(diag * (scale ** 2)[:, None]).ravel(),
                               minlength=r_count * k).reshape(r_count, k)
    free = ~pinned & (precondition > 0)
    inverse = np.where(free, 1.0 / np.where(free, precondition, 1.0), 0.0)
    start = codebook.astype(np.float64)
    r = np.where(free, scatter(fit.times_h(w - expand(start))), 0.0)  # b - M c: minus half the gradient
    x = np.zeros_like(start)
    z = r * inverse
    d = z
    rz = (r * z).sum(axis=1)
    stop = tolerance ** 2 * rz
    for _ in range(k + 2):  # (k steps are exact; two more for rounding)
        active = rz > stop
        if not active.any():
            break
        rows = active[owner]
        if fit.groups == 1 and rows.mean() < 0.75:  # the systems solved already drop out of the product
            at = np.flatnonzero(rows)
            shown = d[owner[at][:, None], idx[at]] * scale[at][:, None]
            q = np.bincount(slot.reshape(idx.shape)[at].ravel(), weights=(fit.times_h(shown) * scale[at][:, None]).ravel(),
                            minlength=r_count * k).reshape(r_count, k)
        else:
            q = scatter(fit.times_h(expand(d)))
        q = np.where(free & active[:, None], q, 0.0)  # M d
        dq = (d * q).sum(axis=1)
        alpha = np.where(dq > 0, rz / np.where(dq > 0, dq, 1.0), 0.0)
        x += alpha[:, None] * d
        r = r - alpha[:, None] * q
        z = r * inverse
        rz_next = (r * z).sum(axis=1)
        beta = np.where(rz > 0, rz_next / np.where(rz > 0, rz, 1.0), 0.0)
        d = z + beta[:, None] * d
        rz = rz_next
    return start + x


def gptq_assign(w: np.ndarray, codebook: np.ndarray, owner: np.ndarray, scale: np.ndarray, fit: LayerFit,
                zeros: np.ndarray | None) -> np.ndarray | None:
    """Indices (O, F) chosen column by column with error feedback through H⁻¹'s Cholesky factor;
    columns by decreasing diag(H). Weights in `zeros` (exact zeros to keep) take the zero centroid
    with their (zero) error. None when a group's H cannot be factored.

    In float32 (as GPTQ itself; the objective of the result within 1e-5 of float64's on MiniLM),
    features as rows so that each column step reads contiguous memory, and each row's nearest
    level found among its sorted levels' midpoints."""
    o_rows, f = w.shape
    per = o_rows // fit.groups
    idx = np.empty((o_rows, f), np.int64)
    for g in range(fit.groups):
        factor = fit.factor(g)
        if factor is None:
            return None
        sel = slice(g * per, (g + 1) * per)
        order, u, dead = factor
        u = u.astype(np.float32)
        step = np.where(dead, 0.0, 1.0 / np.where(dead, 1.0, np.diag(u))).astype(np.float32)
        work = np.array(w[sel][:, order].T, np.float32)  # (F, rows)
        keep = None if zeros is None else np.ascontiguousarray(zeros[sel][:, order].T)
        levels = codebook[owner[sel]] * scale[sel][:, None]  # (rows, k) each row's decoded levels
        sorted_at = np.argsort(levels, axis=1, kind="stable")
        levels = np.take_along_axis(levels, sorted_at, axis=1)
        n, k = levels.shape
        shared = codebook.shape[0] == 1  # one sorted codebook: the nearest by searchsorted on w / scale
        if shared:
            centroids = levels[0] / scale[sel][0]
            midpoints = (centroids[1:] + centroids[:-1]) / 2
            unscale = (1.0 / scale[sel]).astype(np.float32)
        else:
            midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
        zero_at = np.abs(levels).argmin(axis=1)
        flat_levels = levels.astype(np.float32).ravel()
        row_start = np.arange(n) * k
        out = np.empty(work.shape, np.int64)
        for b0 in range(0, f, GPTQ_BLOCK):  # the error of a block's columns reaches the rest in one product
            b1 = min(b0 + GPTQ_BLOCK, f)
            errors = np.zeros((b1 - b0, n), np.float32)
            for i in range(b0, b1):
                col = work[i]
                if shared:
                    pick = np.searchsorted(midpoints, col * unscale)
                else:
                    pick = (col[:, None] > midpoints).sum(axis=1)
                if keep is not None:
                    pick = np.where(keep[i], zero_at, pick)
                out[i] = pick
                if dead[i]:
                    continue
                error = (col - flat_levels.take(row_start + pick)) * step[i]
                errors[i - b0] = error
                work[i + 1:b1] -= u[i, i + 1:b1, None] * error
            work[b1:] -= u[b0:b1, b1:].T @ errors
        inverse = np.empty_like(order)
        inverse[order] = np.arange(f)
        idx[sel] = np.take_along_axis(sorted_at, out[inverse].T, axis=1)
    return idx


def obs_usable(fit: LayerFit | None, features: int) -> bool:
    """OBS / SparseGPT can use the layer's Gram: enough captured rows per feature, or fewer with
    the Gram shrunk toward its diagonal (as GPTQ uses it, SHRINK; MiniLM at 50% sparsity before
    a 10x codebook: worst-token cosine 0.66 instead of 0.47 by magnitude)."""
    return usable(fit, features, GPTQ_ROWS_PER_FEATURE) or (fit is not None and fit.shrunk and usable(fit, features, 0.0))


def top_mask(value: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep all but the round(sparsity * size) smallest magnitudes (ties broken by position)."""
    drop = int(round(sparsity * value.size))
    keep = np.ones(value.size, bool)
    if drop:
        keep[np.argsort(np.abs(value.astype(np.float64)).ravel(), kind="stable")[:drop]] = False
    return keep.reshape(value.shape)


def usable(fit: LayerFit | None, features: int, rows_per_feature: float) -> bool:
    """A Gram the objective can trust: enough captured rows per feature (else H fits the few
    captured samples and fails on others, as quant's rounding measured) and a factorable size."""
    return fit is not None and features <= capture.MAX_FEATURES and fit.rows >= rows_per_feature * features


__all__ = ["FITS", "GPTQ_ROWS_PER_FEATURE", "REFIT_MAX_LEVELS", "obs_prune", "obs_usable", "top_mask", "LayerFit", "capture_fits", "gptq_assign", "objective", "refit", "usable"]


# ---------------------------------------------------------------------------------------------
# Sparsity with compensation (`sparsify` with --calib)

BLOCK = 128  # columns whose pruning mask is chosen together (SparseGPT's adaptive mask blocks)


def obs_prune(w: np.ndarray, fit: LayerFit, sparsity: float, n_m: tuple[int, int] | None = None) -> np.ndarray | None:
    """SparseGPT (Frantar & Alistarh 2023): rows (O, F) with `sparsity` of each block's weights (or
    all but N of every M consecutive features of a row) set to zero, chosen by the OBS saliency
    w² / [H⁻¹]_ii² and the remaining weights of the row updated through H⁻¹'s Cholesky factor to
    make up for them. None when a group's H cannot be factored. Natural column order (an N:M
    group must be consecutive features)."""
    o_rows, f = w.shape
    per = o_rows // fit.groups
    out = np.empty_like(w, dtype=np.float64)
    for g in range(fit.groups):
        found = capture.inverse_factor(fit.h[g])
        if found is None:
            return None
        u, dead = found
        work = w[g * per:(g + 1) * per].astype(np.float64).copy()
        diag = np.diag(u)
        mask = np.zeros(work.shape, bool)  # True: pruned
        for b0 in range(0, f, BLOCK):
            b1 = min(b0 + BLOCK, f)
            if n_m is None:  # the block's lowest-saliency weights, over its rows and columns
                saliency = work[:, b0:b1] ** 2 / diag[b0:b1] ** 2
                drop = int(round(sparsity * saliency.size))
                if drop:
                    block = np.zeros(saliency.size, bool)
                    block[np.argsort(saliency.ravel(), kind="stable")[:drop]] = True
                    mask[:, b0:b1] = block.reshape(saliency.shape)
            for i in range(b0, b1):
                if n_m is not None and (i % n_m[1]) == 0 and i + n_m[1] <= f:
                    group = work[:, i:i + n_m[1]] ** 2 / diag[i:i + n_m[1]] ** 2
                    lowest = np.argsort(group, axis=1, kind="stable")[:, :n_m[1] - n_m[0]]
                    np.put_along_axis(mask[:, i:i + n_m[1]], lowest, True, axis=1)
                col = work[:, i]
                q = np.where(mask[:, i], 0.0, col)
                if not dead[i]:
                    error = (col - q) / u[i, i]
                    work[:, i + 1:] -= np.outer(error, u[i, i + 1:])
                work[:, i] = q
        out[g * per:(g + 1) * per] = work
    return out
