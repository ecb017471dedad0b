"""Second recovery step: refit the layers that lost input channels on the *pruned* model's inputs.

The first step (select.compensate) fits every consumer on the original model's activations, as if
only its own inputs had changed; but the layers before it were pruned too, and their errors add
up along a deep chain. Here each such layer is fitted again (He et al. 2017's reconstruction):
    min ‖Y - W' X'‖² + ridge   over W' and the bias,
X' the layer's kept inputs in the pruned model and Y its output in the original model on the same
calibration inputs. Both models run side by side in one graph (the original's tensors renamed)
and a capture Probe reduces X'ᵀX', X'ᵀY, Σx' and Σy in the graph, one batch at a time: memory per
layer, never the activations themselves. All layers are refitted at once from one pass.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgegraph.analysis import capture

from . import select

PREFIX = "__prune_original__"


def paired(candidate: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """One model computing both: the candidate's graph, plus the original's nodes and initializers
    with every name but the graph inputs prefixed by PREFIX."""
    model = onnx.ModelProto()
    model.CopyFrom(candidate)
    inputs = {i.name for i in original.graph.input}

    def renamed(name: str) -> str:
        return name if not name or name in inputs else PREFIX + name

    for node in original.graph.node:
        copy = model.graph.node.add()
        copy.CopyFrom(node)
        copy.name = PREFIX + node.name
        copy.input[:] = [renamed(n) for n in node.input]
        copy.output[:] = [renamed(n) for n in node.output]
    for tensor in original.graph.initializer:
        copy = model.graph.initializer.add()
        copy.CopyFrom(tensor)
        copy.name = renamed(tensor.name)
    return model


def refit(model: onnx.ModelProto, layers: dict[str, tuple[str, np.ndarray | None, int, int]], batches, *,
          threads: int = 0, progress=lambda it, **_: it,
          means: dict[str, tuple[str, np.ndarray | None, int, int]] | None = None):
    """For each layer {node name: (its output name in the original, kept output channels or None
    for all, channel axis and rank of that output)} of the paired `model`: (XᵀX, XᵀY with the
    constant feature appended as the last row / column, rows). For each layer of `means` (same
    form): (per-channel mean of its output in the pruned model, the same in the original), what
    bias correction needs. Returns (grams, means)."""
    probe = capture.Probe(model)
    reads = {}
    mean_reads = {}
    for name, (target, kept, axis, rank) in (means or {}).items():
        mean_reads[name] = (probe.channel_moments(target, rank, axis),
                            probe.channel_moments(_original(probe, target, kept, axis), rank, axis))
    moments = {name: [0, 0.0, 0.0] for name in mean_reads}
    for name, (target, kept, axis, rank) in layers.items():
        y = _original(probe, target, kept, axis)
        reads[name] = (probe.gram(name, y), probe.channel_moments(y, rank, axis))
    found = {}
    if not reads and not mean_reads:
        return {}, {}
    for out in progress(probe.run(batches, threads), desc="prune: refitting on pruned inputs"):
        for name, (read, (count, ysum, _)) in reads.items():
            gram = found.setdefault(name, [None, None, 0])
            xtx, xty, sums = out[read.xtx][0], out[read.xty][0], out[read.sums][0]
            f, o = xty.shape
            block = np.zeros((f + 1, f + 1))
            block[:f, :f], block[:f, f], block[f, :f] = xtx, sums, sums
            rows = int(out[read.shape][0]) * int(out[read.shape][3])
            block[f, f] = rows
            cross = np.zeros((f + 1, o))
            cross[:f], cross[f] = xty, np.asarray(out[ysum], np.float64).ravel()
            gram[0] = block if gram[0] is None else gram[0] + block
            gram[1] = cross if gram[1] is None else gram[1] + cross
            gram[2] += rows
        for name, ((count, pruned, _), (_, original, _)) in mean_reads.items():
            m = moments[name]
            m[0] += int(out[count])
            m[1] = m[1] + np.asarray(out[pruned], np.float64).ravel()
            m[2] = m[2] + np.asarray(out[original], np.float64).ravel()
    grams = {name: tuple(v) for name, v in found.items()}
    # (the count is the tensor's element count: per channel, that over the channels)
    return grams, {name: (m[1] * m[1].size / max(m[0], 1), m[2] * m[2].size / max(m[0], 1))
                   for name, m in moments.items() if m[0]}


def _original(probe: capture.Probe, target: str, kept, axis: int) -> str:
    """The original model's output `target` in the paired model, its `kept` channels only."""
    y = PREFIX + target
    if kept is not None:
        y = probe._node("Gather", [y, probe._const(np.asarray(kept, np.int64))], axis=axis)
    return y


def solve(xtx: np.ndarray, xty: np.ndarray, rows: int, ridge: float, prior: np.ndarray,
          prior_bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares pulled towards the current weights `prior` (outputs, features) and
    bias (None: the layer has none, the constant feature is left out):
        W' = argmin ‖Y - W' x̃‖² + λ‖W' - prior‖²,  λ = damping(ridge, features, rows) · mean energy.
    Returns (W', bias)."""
    f = xtx.shape[0] - 1
    keep = np.arange(f + 1) if prior_bias is not None else np.arange(f)
    a = xtx[np.ix_(keep, keep)] / max(rows, 1)
    b = xty[keep] / max(rows, 1)
    damp = select.damping(ridge, f, rows) * max(float(np.mean(np.diag(a)[:f])), 1e-12)
    a[np.arange(f), np.arange(f)] += damp
    start = prior.T if prior_bias is None else np.concatenate([prior.T, prior_bias[None, :]])
    b[:f] += damp * start[:f]
    coef = np.linalg.solve(a, b)  # (features [+1], outputs)
    return coef[:f].T, (coef[f] if prior_bias is not None else np.zeros(xty.shape[1]))
