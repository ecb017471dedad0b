"""`sparsify`: magnitude sparsity of weights (Deep Compression's first stage), unstructured or N:M.

The smallest-magnitude weights become exactly 0. The weights stay dense tensors (onnxruntime has
no sparse kernels for them), so the file shrinks only once compressed, or once `codebook` runs
after it: its zero centroid keeps every zero exactly zero and the indices' entropy drops
(`-p sparsify,codebook`; with the prune pass first, `-p prune,sparsify,codebook`).

* `scope=layer`: every layer loses the same fraction. `scope=global`: one threshold in units of
  each layer's standard deviation (Han et al.'s "quality parameter" times the layer's std), so a
  layer whose weights are far from Gaussian gives up more or less than the average while layers
  of different scales (BatchNorm folded) are treated alike.
* `pattern="2:4"` (any N:M): in every M consecutive weights along the input-channel axis, the
  N largest are kept, the layout NVIDIA's sparse tensor cores run at 2x (TensorRT reads it from
  the dense ONNX weights). Layers whose input channels are not a multiple of M are left alone.
* `method=obs` (the default with `--calib`): SparseGPT (Frantar & Alistarh 2023). Per layer, the
  Gram H = XᵀX of its input features (`edgegraph.analysis.capture`) gives the OBS saliency
  w² / [H⁻¹]_ii² of each weight; in blocks of 128 input features the least salient are zeroed
  and the weights not yet visited are updated through H⁻¹'s Cholesky factor to make up for them
  (`passes/codebook/datafit.py: obs_prune`), so the layer's outputs, not its weights, stay close.
  The fraction per layer is the one magnitude would give (scope). Layers without a usable Gram
  (too few captured rows per feature, no Gram layout) keep magnitude.
* Strength knob: `sparsity`. With a user floor (`--min-agreement`, `--min-sqnr`) and `--calib`
  the pass searches the highest sparsity (0.95 ... 0.1) that holds it, with `edgegraph.floor.search`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgegraph import floor, ir, runtime
from edgegraph.context import PassContext
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.passes.codebook import OPS, datafit, weights_of
from edgegraph.passes.quant.names import warn_unmatched
from edgegraph.registry import register_pass

SCOPES = ("global", "layer")
METHODS = ("auto", "magnitude", "obs")
SETTINGS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # searched, strongest first
_NM = re.compile(r"^(\d+):(\d+)$")


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    """Magnitude sparsity: the smallest weights of each selected layer set to exactly zero."""

    name = "sparsify"
    summary = "Magnitude sparsity of weights (global or per layer, or N:M such as 2:4); zeros stay dense"
    exact = False
    knob = "sparsity (fraction of weights zeroed), with --min-agreement/--min-sqnr: the highest that holds them"

    sparsity: float = option(0.5, "fraction of each layer's weights set to zero (scope=global: on average over "
                                  "the selected weights); with a user floor the highest that holds it is searched")
    scope: str = option("layer", "'layer' (each layer the same fraction) or 'global' (one threshold in units of "
                                 "each layer's std)")
    pattern: str = option("unstructured", "'unstructured' or 'N:M' (e.g. '2:4': N of every M weights along the "
                                          "input channels are kept; sparsity then is 1 - N/M)")
    method: str = option("auto", "'magnitude' (the smallest weights), 'obs' (with --calib: SparseGPT, the weights "
                                 "whose removal moves the layer's outputs least, the rest updated through "
                                 "(X^T X)^-1 to make up for them; layers without a usable Gram: magnitude) or "
                                 "'auto' (obs with --calib)")
    ops: list[str] = option([op for op in OPS if op != "Gather"], "op types whose weights are sparsified")
    exclude: list[str] = option([], "node names or op types to leave alone")
    min_elements: int = option(1024, "leave weights with fewer elements than this alone")

    def __post_init__(self):
        self.check(0.0 <= self.sparsity < 1.0, f"sparsify: sparsity must be in [0, 1), got {self.sparsity}")
        self.check(self.scope in SCOPES, f"sparsify: scope must be one of {', '.join(SCOPES)}, got '{self.scope}'")
        match = _NM.match(self.pattern)
        self.check(self.pattern == "unstructured" or (match is not None and 0 < int(match[1]) < int(match[2]) <= 64),
                   f"sparsify: pattern must be 'unstructured' or 'N:M' with 0 < N < M <= 64, got '{self.pattern}'")
        unknown = [op for op in self.ops if op not in OPS]
        self.check(not unknown, f"sparsify: cannot sparsify {', '.join(unknown)} weights (ops: {', '.join(OPS)})")
        self.check(self.min_elements >= 0, "sparsify: min_elements must be >= 0")
        self.check(self.method in METHODS, f"sparsify: method must be one of {', '.join(METHODS)}, got '{self.method}'")

    def after(self) -> tuple[Pass, ...]:
        from edgegraph.passes.cleanup import Cleanup

        return (Cleanup(),)  # BatchNorm folded first: magnitudes of the weights that run

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        warn_unmatched(f"{self.name}: exclude", self.exclude, model.graph, ops=True, nodes=True)
        if not weights_of(model, self.ops, self.exclude, self.min_elements):
            return PassResult(False, {"layers": 0})
        user_floor = ctx.verify.floor()
        data = ctx.calibration
        fits = {}
        if self.method != "magnitude" and data is not None and len(data):
            fits = datafit.capture_fits(model, weights_of(model, self.ops, self.exclude, self.min_elements), data, ctx)
        if user_floor and data is not None and len(data) and self.n_m is None:
            proto = model.to_proto()
            feeds = runtime.feeds_of(proto, data)
            reference = runtime.outputs(proto, feeds, threads=ctx.threads)

            def measure(sparsity: float):
                trial = model.copy()
                rows = self._apply(trial, sparsity, fits)
                outputs = runtime.outputs(trial.to_proto(), feeds, threads=ctx.threads)
                return floor.measure(reference, outputs), (trial, rows)

            found = floor.search([s for s in SETTINGS if s > 0], measure, user_floor, progress=ctx.progress_bar,
                                 desc="sparsify: floor search (sparsity)")
            if found.best is None:
                raise floor.not_held("sparsify", found)
            trial, rows = found.artefact
            model.graph = trial.graph
            details = {"layers": rows, "floor_search": found.as_dict()}
        else:
            rows = self._apply(model, self.sparsity, fits)
            details = {"layers": rows}
        if not rows:
            return PassResult(False, {"layers": 0})
        zeros = sum(r["zeros"] for r in rows)
        elements = sum(r["elements"] for r in rows)
        stats = {"layers": len(rows), "sparsity": round(zeros / max(elements, 1), 4), "zeroed_weights": zeros}
        return PassResult(True, stats, details)

    def _apply(self, model: ir.Model, sparsity: float, fits: dict) -> list[dict]:
        weights = weights_of(model, self.ops, self.exclude, self.min_elements)
        nm = self.n_m
        threshold = None
        if nm is None and self.scope == "global" and weights:
            # One threshold in units of each layer's std: the quantile of |w| / std over all layers.
            normalized = np.concatenate([np.abs(w.value.astype(np.float64)).ravel() / _std(w.value) for w in weights])
            threshold = float(np.quantile(normalized, sparsity)) if sparsity > 0 else -1.0
        namer = ir.Namer(model.graph)
        rows = []
        for w in weights:
            value = w.value
            if nm is not None:
                keep = _n_m_mask(value, w.in_axis, *nm)
                if keep is None:
                    continue
            elif threshold is not None:
                keep = np.abs(value.astype(np.float64)) / _std(value) > threshold
            else:
                keep = datafit.top_mask(value, sparsity)
            fit = fits.get(w.tensor.name)
            matrix = None if fit is None else fit.to_rows(value.astype(np.float64))
            compensated = None
            # (N:M by OBS where the Gram's features are the input channels: Gemm, MatMul, 1x1 Conv)
            if matrix is not None and datafit.obs_usable(fit, matrix.shape[1]) and (
                    nm is None or (w.in_axis is not None and matrix.shape[1] == value.shape[w.in_axis])):
                # The layer's share as chosen above (global scope: per layer), its weights by OBS.
                compensated = datafit.obs_prune(matrix, fit, 1.0 - keep.mean(), nm)
            if compensated is not None:
                sparse = fit.back(compensated).astype(value.dtype)
            else:
                sparse = np.where(keep, value, np.zeros((), value.dtype)).astype(value.dtype)
            zeros = int((sparse == 0).sum())
            ir.replace_all_uses(model.graph, w.tensor, ir.const(namer(f"{w.tensor.name}_sparse"), sparse))
            rows.append({"weight": w.tensor.name, "op": w.op, "shape": list(value.shape), "elements": int(value.size),
                         "zeros": zeros, "sparsity": round(zeros / value.size, 4)})
        return rows


def _std(value: np.ndarray) -> float:
    std = float(np.asarray(value, np.float64).std())
    return std if std > 0 else 1.0


def _n_m_mask(value: np.ndarray, in_axis: int | None, n: int, m: int) -> np.ndarray | None:
    """Keep the n largest magnitudes of every m consecutive weights along `in_axis`."""
    if in_axis is None or value.shape[in_axis] % m:
        return None
    moved = np.moveaxis(np.abs(value.astype(np.float64)), in_axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (ranks < n).reshape(moved.shape)
    return np.moveaxis(keep, -1, in_axis)


__all__ = ["Sparsify"]
