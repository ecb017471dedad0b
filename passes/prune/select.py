"""Which channels of a coupling group go first: importance orders and the cost of each prefix.

Every method returns, per group, an order of removal (least important first) and `cost[k]`, the
loss of removing the first k + 1 channels of that order, on a scale comparable across groups
(so that one budget can be shared between them):

  l1 / l2 / bn-scale   weight magnitude of the producing layers (or the BN scale |gamma|): the
                       share of the group's total magnitude removed (data-free baselines)
  activation           Wanda-style ‖W[:, c]‖²·E[x_c²] summed over the consuming layers, as a share
                       of each consumer's output energy (needs calibration data)
  reconstruction       greedy selection (ThiNet / He et al. 2017) of the channels whose removal
                       least changes every consumer's output *after* least-squares compensation
                       by the kept channels: optimal-brain-surgeon steps on each consumer's
                       Gram matrix (error of removing feature block S = tr(W_S P_SS⁻¹ W_Sᵀ),
                       P = (XᵀX)⁻¹; after each step W and P are updated, so the next choice
                       knows what the kept channels already compensate). The error is relative to
                       the consumer's output energy.
"""

from __future__ import annotations

import numpy as np

from edgegraph.analysis import capture


def magnitude_order(importance: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Least important first; cost = share of the group's total importance removed."""
    order = np.argsort(importance, kind="stable")
    total = max(float(importance.sum()), 1e-30)
    return order[:steps], np.cumsum(importance[order[:steps]]) / total


class Consumer:
    """A layer reading a group's channels through a plain float weight, as the least-squares
    problem y = W x̃ (x̃ = the layer's input features and a constant 1 for the bias).

    `features[c]` are the columns of W (Gram features) that channel c of the group feeds.
    """

    def __init__(self, node_name: str, matrix: np.ndarray, gram: capture.Gram, bias: bool, ridge: float):
        self.node = node_name
        self.matrix = matrix  # (outputs, features), float64, as stored (Gemm alpha left out: it cancels)
        n = max(gram.rows, 1)
        f = matrix.shape[1]
        sigma = np.zeros((f + 1, f + 1))
        sigma[:f, :f] = gram.xtx / n
        sigma[:f, f] = sigma[f, :f] = gram.sums / n
        sigma[f, f] = 1.0
        if not bias:  # no bias to move the mean into: the constant feature explains nothing
            sigma[:f, f] = sigma[f, :f] = 0.0
        self.sigma = sigma
        scale = float(np.mean(np.diag(sigma)[:f])) if f else 1.0
        self.damp = damping(ridge, f, gram.rows) * max(scale, 1e-12)
        # The output's energy about its mean (with a bias to take it, the mean is never lost): an
        # input with a large mean (PP-OCR's stem after HardSwish) made the raw energy large and the
        # relative cost of a cut there small.
        moment = sigma[:f, :f] - (np.outer(sigma[:f, f], sigma[:f, f]) if bias else 0.0)
        self.energy = max(float(np.einsum("of,fg,og->", matrix, moment, matrix)), 1e-30)

    def regularised(self) -> np.ndarray:
        sigma = self.sigma.copy()
        f = self.matrix.shape[1]
        sigma[np.arange(f), np.arange(f)] += self.damp
        return sigma

    def wanda(self, features: list[np.ndarray]) -> np.ndarray:
        """Per channel: its share of the output energy, ‖W[:, f]‖²·E[x_f²] (no compensation)."""
        col = (self.matrix ** 2).sum(axis=0) * np.diag(self.sigma)[:-1]
        return np.array([col[f].sum() for f in features]) / self.energy


def damping(ridge: float, features: int, rows: int) -> float:
    """Ridge weight relative to the mean input energy: `ridge`, plus features / rows where there
    are fewer than ROWS_PER_FEATURE rows a feature (a Gemm after Flatten sees one row a sample:
    48 rows for 256 features fit the calibration samples exactly and held-out ones badly; MNIST's
    output SQNR at a 10% cut went from 12 to 30 dB with it)."""
    return ridge + (features / max(rows, 1) if rows < ROWS_PER_FEATURE * features else 0.0)


ROWS_PER_FEATURE = 10


def reconstruction_order(consumers: list[tuple[Consumer, list[np.ndarray]]], channels: int,
                         steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy removal of `steps` channels minimising the summed relative output error of the
    consumers after least-squares compensation (optimal brain surgeon, one channel block a step)."""
    states = []
    for consumer, features in consumers:
        p = np.linalg.inv(consumer.regularised())
        w = np.concatenate([consumer.matrix, np.zeros((consumer.matrix.shape[0], 1))], axis=1)
        states.append([consumer, features, w, p])
    alive = np.ones(channels, bool)
    order, cost, total = [], [], 0.0
    for _ in range(steps):
        scores = np.zeros(channels)
        for consumer, features, w, p in states:
            scores += _block_scores(w, p, features) / consumer.energy
        scores[~alive] = np.inf
        best = int(np.argmin(scores))
        total += max(float(scores[best]), 0.0)
        order.append(best)
        cost.append(total)
        alive[best] = False
        for state in states:
            _, features, w, p = state
            f = features[best]
            inv = np.linalg.pinv(p[np.ix_(f, f)])
            state[2] = w - w[:, f] @ inv @ p[f, :]
            state[3] = p - p[:, f] @ inv @ p[f, :]
            state[2][:, f] = 0.0  # removed: exactly, whatever the rounding left
    return np.array(order, dtype=np.int64), np.array(cost)


def _block_scores(w: np.ndarray, p: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
    """tr(W_f P_ff⁻¹ W_fᵀ) for every channel's feature block f (batched when blocks are equal)."""
    sizes = {len(f) for f in features}
    if len(sizes) == 1:
        idx = np.stack(features)  # (C, K)
        blocks = p[idx[:, :, None], idx[:, None, :]]  # (C, K, K)
        wf = w[:, idx]  # (O, C, K)
        if idx.shape[1] == 1:
            return (wf[:, :, 0] ** 2).sum(axis=0) / np.maximum(blocks[:, 0, 0], 1e-30)
        inv = np.linalg.pinv(blocks, hermitian=True)
        return np.einsum("ock,ckl,ocl->c", wf, inv, wf)
    return np.array([float(np.einsum("of,fg,og->", w[:, f], np.linalg.pinv(p[np.ix_(f, f)]), w[:, f]))
                     for f in features])


def compensate(consumer: Consumer, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares recovery of a consumer when the features `removed` disappear: the kept
    columns take over what the removed ones explained (ridge-regularised regression of the removed
    features on the kept ones and the constant). Returns (new matrix with removed columns zero,
    bias change per output)."""
    f = consumer.matrix.shape[1]
    removed = np.unique(removed)
    kept = np.setdiff1d(np.arange(f + 1), removed)  # the constant (index f) is always kept
    sigma = consumer.regularised()
    coef = np.linalg.solve(sigma[np.ix_(kept, kept)], sigma[np.ix_(kept, removed)])  # (|K|, |S|)
    w = consumer.matrix
    delta = w[:, removed] @ coef.T  # (O, |K|)
    new = w.copy()
    new[:, removed] = 0.0
    new[:, kept[kept < f]] += delta[:, kept < f]
    return new, delta[:, -1] if kept[-1] == f else np.zeros(w.shape[0])


def merge_columns(matrix: np.ndarray, producer: np.ndarray, removed: np.ndarray, kept: np.ndarray,
                  features: list[np.ndarray]) -> np.ndarray:
    """Data-free neuron merging (Kim et al. 2020): a removed channel whose producing weights (with
    bias) are close to a positive multiple s of a kept channel's is taken to output s times it,
    so the consumer's columns for it are added, scaled by s, to that kept channel's columns."""
    new = matrix.copy()
    norms = np.linalg.norm(producer, axis=1)
    unit = producer / np.maximum(norms, 1e-30)[:, None]
    for c in removed:
        if not kept.size or norms[c] == 0:
            continue
        cosine = unit[kept] @ unit[c]
        j = int(kept[np.argmax(cosine)])
        if cosine.max() <= MERGE_COSINE:
            continue
        scale = float(producer[c] @ producer[j]) / max(float(producer[j] @ producer[j]), 1e-30)
        if len(features[c]) == len(features[j]):
            new[:, features[j]] += scale * matrix[:, features[c]]
    for c in removed:
        new[:, features[c]] = 0.0
    return new


# Producing weights this similar (cosine) make a removed channel a scaled copy of a kept one: below
# it, merging adds more error than it removes (measured on the CIFAR-10 CNN and SqueezeNet).
MERGE_COSINE = 0.5
