"""Mixed bit widths per layer under a size budget (`codebook(ratio=R)`).

Layers differ in how much their codebook error moves the model's outputs (a first conv or a
classifier more than a wide middle layer) and in how many bytes a bit costs them. Given each
layer's output distortion at one probe width, D_l(probe), the distortion at b bits is taken as
D_l(probe) * 4^(probe - b) (each bit of a k-means codebook quarters the squared error: the
high-resolution rule, measured within ~1.5x on these weights from 3 to 8 bits), and bits are
handed out greedily: every layer starts at the widest choice and the layer whose next step down
costs the least distortion per byte saved steps down, until the layers fit the budget. With
`codebook(sparsity=S)` a layer's choices also include pruning it to S zeros first (stored
sparse: a mask and the nonzero weights' indices), measured the same way; the steps then follow
each layer's lower convex hull of (bytes, distortion) over all its choices.

D_l is measured with `--calib`: the model runs with that one layer snapped (all others float)
and D_l is the output error energy over the output's variance plus the worst row's (token's or
sample's) relative error, on the calibration samples (see `distortion`).
Without data it is the layer's relative weight error (SSE / energy) at the probe width.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir, runtime
from edgegraph.context import CalibrationData, PassContext

CHOICES = (3, 4, 5, 6, 8)  # 2 bits: the 4^-b rule underestimates its error (CIFAR fc1 chosen at 2 bits: 0.90 agreement); 7: rarely worth its planes
PROBE = 4
SAMPLES = 16  # calibration samples the per-layer sensitivities are measured on


def _vectors(a: np.ndarray) -> np.ndarray:
    """An output as rows: one per token (rank >= 3 with a last axis > 1, e.g. a transformer's
    hidden states), else one per sample."""
    a = a.astype(np.float64)
    if a.ndim >= 3 and a.shape[-1] > 1:
        return a.reshape(-1, a.shape[-1])
    return a.reshape(a.shape[0] if a.ndim else 1, -1)


def distortion(reference: list[dict], outputs: list[dict]) -> float:
    """Σ over outputs of ||y - y_ref||² / ||y_ref - mean(y_ref)||², plus the worst row's relative
    error ||y_i - y_ref,i||² / ||y_ref,i||² (rows: tokens or samples). The mean alone ranks an
    error spread over every row like one that ruins a few: MiniLM's token embedding at 4 bits
    costs little mean error but sets the worst token's cosine (0.988 alone, every other layer
    at 6-8 bits 0.9999)."""
    total = 0.0
    for name in reference[0]:
        ref = np.concatenate([_vectors(r[name]) for r in reference])
        out = np.concatenate([_vectors(o[name]) for o in outputs])
        spread = float(((ref - ref.mean()) ** 2).sum()) or 1.0
        total += float(((out - ref) ** 2).sum()) / spread
        energy = (ref ** 2).sum(axis=1)
        rows = energy > 0
        if rows.any():
            total += float((((out - ref) ** 2).sum(axis=1)[rows] / energy[rows]).max())
    return total


def measured(model: ir.Model, weights, snapped: dict[str, np.ndarray], data: CalibrationData,
             ctx: PassContext) -> dict[str, float]:
    """{weight: output distortion with that weight alone replaced by snapped[weight]}. The weights
    become graph inputs of a copy of the model, so one session serves every layer."""
    trial = model.copy()
    tensors = trial.graph.tensors()
    inputs = {}
    for w in weights:
        t = tensors.get(w.tensor.name)
        if t is None:
            continue
        var = gs.Variable(f"{w.tensor.name}__codebook_probe", dtype=w.value.dtype, shape=list(w.value.shape))
        ir.replace_all_uses(trial.graph, t, var)
        trial.graph.inputs.append(var)
        inputs[w.tensor.name] = var.name
    from edgegraph.passbase import settle

    settle(trial)
    proto = trial.to_proto()
    sess = runtime.session(proto, threads=ctx.threads, optimize=True)
    data = data.take(min(len(data), SAMPLES))
    feeds = runtime.feeds_of(model.to_proto(), data)
    originals = {inputs[w.tensor.name]: w.value for w in weights if w.tensor.name in inputs}
    reference = [runtime.run(sess, {**f, **originals}) for f in feeds]
    found = {}
    for w in ctx.progress_bar(weights, desc="codebook: layer sensitivities"):
        if w.tensor.name not in inputs or w.tensor.name not in snapped:
            continue
        swapped = {**originals, inputs[w.tensor.name]: snapped[w.tensor.name]}
        found[w.tensor.name] = distortion(reference, [runtime.run(sess, {**f, **swapped}) for f in feeds])
    return found


def weight_error(value: np.ndarray, snapped: np.ndarray) -> float:
    ref = value.astype(np.float64)
    return float(((ref - snapped.astype(np.float64)) ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))


def at_bits(probe_distortion: float, bits: int) -> float:
    """A layer's distortion at `bits`, from the one measured at PROBE bits (the 4^-b rule)."""
    return probe_distortion * 4.0 ** (PROBE - bits)


def _hull(options: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """The (bytes, distortion, choice) options on the lower convex hull, the most bytes first: an
    option that costs more and distorts no less than another is never worth it, nor one above
    the line between its neighbours (taking both halves of a step is as good)."""
    pareto = []
    for o in sorted(options, key=lambda o: (-o[0], o[1])):  # (ties: model order of the choices)
        if pareto and o[0] == pareto[-1][0]:
            continue  # as many bytes, more distortion
        while pareto and o[1] <= pareto[-1][1]:
            pareto.pop()  # cheaper and no worse
        pareto.append(o)

    def slope(a, b):  # distortion added per byte saved from a to the cheaper b
        return (b[1] - a[1]) / (a[0] - b[0])

    hull = []
    for o in pareto:
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) >= slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def allocate(options: dict[str, list[tuple[float, float, object]]], budget: float) -> dict[str, object]:
    """{layer: choice} within `budget` bytes (the cheapest choices when nothing fits).
    options[layer]: its (bytes, distortion, choice) alternatives. Every layer starts at its
    costliest choice; the layer whose next step down its hull adds the least distortion per byte
    saved takes it, until the layers fit (ties: the first in model order, deterministic)."""
    hulls = {n: _hull(o) for n, o in options.items()}
    at = {n: 0 for n in hulls}
    total = sum(h[0][0] for h in hulls.values())
    while total > budget:
        best, best_rate = None, None
        for n, h in hulls.items():
            i = at[n]
            if i + 1 < len(h):
                rate = (h[i + 1][1] - h[i][1]) / (h[i][0] - h[i + 1][0])
                if best is None or rate < best_rate:
                    best, best_rate = n, rate
        if best is None:
            break
        h, i = hulls[best], at[best]
        total -= h[i][0] - h[i + 1][0]
        at[best] = i + 1
    return {n: hulls[n][at[n]][2] for n in hulls}


def fill(options: dict[str, list[tuple[float, float, object]]], chosen: dict[str, object],
         slack: float) -> dict[str, object]:
    """`chosen` with steps up the hulls taken, the most distortion saved per byte first, while
    their estimated bytes fit in `slack`."""
    hulls = {n: _hull(o) for n, o in options.items()}
    at = {n: next(i for i, o in enumerate(h) if o[2] == chosen[n]) for n, h in hulls.items()}
    while True:
        best, best_gain, best_extra = None, None, 0.0
        for n, h in hulls.items():
            i = at[n]
            if i == 0:
                continue
            extra = h[i - 1][0] - h[i][0]
            if extra > slack:
                continue
            gain = (h[i][1] - h[i - 1][1]) / extra
            if best is None or gain > best_gain:
                best, best_gain, best_extra = n, gain, extra
        if best is None:
            return {n: hulls[n][at[n]][2] for n in hulls}
        slack -= best_extra
        at[best] -= 1


__all__ = ["CHOICES", "PROBE", "allocate", "at_bits", "fill", "distortion", "measured", "weight_error"]
