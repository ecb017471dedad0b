"""`codebook`: k-means weight sharing stored in standard ONNX (Deep Compression's second stage).

Every selected weight (Conv / ConvTranspose / Gemm / MatMul weights, and embedding tables read
by Gather) is replaced by 2^b centroids and one b-bit index per element, decoded in the graph
with standard ops so that any runtime runs it:

    indices (uint8 | UINT4 | UINT2 | packed bytes) -> [unpack] -> Cast(int32) [-> Add(channel
    offsets)] -> Gather(codebook) [-> Cast(float32)] -> the weight

onnxruntime's Gather wants int32/int64 indices, hence the Cast. Everything in the chain reads
constants only, so onnxruntime folds it at session creation (inference then runs the dense
kernels at the dense model's speed), and `edgegraph.analysis.encoding` recognises it, so
cleanup's folding and quant leave it encoded.

* Clustering (`kmeans1d.py` beside this module): per tensor, the exact 1-D k-means DP (on the distinct
  values, or a 4096-bin histogram of them, then Lloyd steps on the full data); per output
  channel, the exact DP on each channel's 48-bin histogram vectorised over channels, then Lloyd
  (`method=exact`/`auto`), or Lloyd alone (`method=lloyd`, faster, 1.3-1.75x the error at 16
  levels on 576-value rows). A tensor whose exact zeros are at least 1/(2k) of its values keeps a
  centroid at 0 (sparsified or pruned weights stay zero; `_pins_zero`).
* With `--calib` (`datafit.py`): the weight k-means is weighted by diag(X^T X) of the feature each
  weight multiplies (importance), then the layer's output error tr(ΔHΔᵀ), H = XᵀX captured by
  `edgegraph.analysis.capture.grams`, is what is fitted: `fit=gptq` (the default) chooses the
  indices column by column with GPTQ's error feedback through H⁻¹ and refits the centroids by
  least squares (k x k per codebook); `fit=refit` only refits. Layers with few captured rows per
  feature (< 32) get GPTQ on H shrunk halfway toward its diagonal (`datafit.SHRINK`).
* Mixed widths (`ratio=R`, `mixed.py`; the default with `--calib`: R = 6): bits per layer (3..8)
  from each layer's measured output distortion per byte, the budget bisected on the written
  file's real size so that the file is R times smaller than with float32 weights.
* Storage of the indices: in b bits each (UINT4 at opset >= 21 / UINT2 at opset >= 25 with a
  Cast; else bit planes of 4, 2 and 1 bits packed 8 / width codes per byte, unpacked with
  BitShift (4 bits) or a Gather from a 256-row table (2 and 1 bits) and recombined in int32,
  opset >= 11); 8 bits, or opset < 11 when it cannot be
  upgraded, one uint8 per index. `dense=true` writes the snapped weights dense instead.
* Sparse weights (`sparse`, on by default): a weight more than 1/bits of whose elements are
  exactly 0 (after `sparsify` or `prune`) gets 2^bits centroids for its nonzero values and one
  more entry, an exact 0, and is stored as a 1-bit mask of its nonzero elements plus their
  indices only: 1 + (1 - s) * bits bits a weight at sparsity s (50% at 4 bits: 3 bits), decoded
  by Gather(Concat([2^bits], codes), CumSum(mask) * mask), which onnxruntime folds like the rest.
  `ratio=R, sparsity=S` makes pruning a layer to S zeros one of the allocation's choices.
* Strength knob: `bits` (or `ratio`). With a user floor (`--min-agreement`, `--min-sqnr`) the pass
  searches 2..8 bits (with `ratio`: the highest ratio up to it) with `edgegraph.floor.search` on
  held-out calibration samples.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import floor, ir, runtime, validate
from edgegraph.analysis import capture, encoding, layout
from edgegraph.context import CalibrationData, PassContext
from edgegraph.passbase import Pass, PassResult, option, settle
from edgegraph.passes.codebook import datafit, kmeans1d, mixed
from edgegraph.passes.quant.names import warn_unmatched
from edgegraph.registry import register_pass

logger = logging.getLogger("edgegraph")

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
GRANULARITIES = ("auto", "tensor", "scaled", "channel")
METHODS = ("auto", "exact", "lloyd")
STORAGES = ("auto", "uint8", "packed")
SHARES = ("none", "shape", "op")
CODEBOOK_DTYPES = ("float16", "float32")
BITS = tuple(range(2, 9))
DEFAULT_BITS, AUTO_RATIO = 5, 6.0  # bits=0 (auto): without data / with --calib (see the `bits` option)
RATIOS = (16.0, 12.0, 10.0, 8.0, 7.0, 6.0, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0)  # searched below a ratio, strongest first
# Per-channel codebooks when they cost at most this fraction of the indices' bytes (granularity=auto).
CHANNEL_OVERHEAD = 0.125
# A weight is encoded only when that stores it in at most this fraction of its bytes.
WORTH = 0.9
PACK_OPSET = 11  # BitShift
MIN_ELEMENTS, RATIO_MIN_ELEMENTS = 1024, 256  # min_elements=-1 (auto) with fixed bits / with ratio
BISECTIONS = 6  # ratio: steps of the budget's bisection on the written file's size
NODE_BYTES = 400  # a weight's decode nodes and value infos in the file (measured 300-600 on PP-OCR cls)
UNPACK_NODE_BYTES = 50  # one BitShift unpacking step in the file (SqueezeNet: 48 bytes a decode node)
TYPED = {4: (21, ml_dtypes.uint4), 2: (25, ml_dtypes.uint2)}  # code bits -> (first opset, numpy type)
DEFLATE_LIMIT = 1 << 30  # models larger than this get no deflate figure (compressing costs seconds per 100 MB)


@dataclass
class _Weight:
    """One weight tensor to encode, with every node reading it."""

    tensor: gs.Tensor
    value: np.ndarray
    readers: list[gs.Node]
    op: str
    out_axis: int | None  # per-channel codebooks along this axis (None: per tensor only)
    in_axis: int | None = None  # the axis of input channels (importance weighting)
    activation: str | None = None  # the tensor whose channels multiply in_axis
    activation_axis: int | None = None
    bytes_before: int = 0
    importance: np.ndarray | None = None  # (in channels,) E[x^2]
    mean: np.ndarray | None = None  # (in channels,) E[x], for bias correction
    fit: datafit.LayerFit | None = None  # the layer-output objective (--calib, fit != kmeans)
    zeros: int = 0  # elements exactly 0 (sparsified or pruned)
    pruned: bool = False  # a copy pruned to `sparsity` zeros by this pass (ratio with sparsity)


@dataclass
class _Encoding:
    """A weight's codebook(s) and indices, before they become graph constants."""

    codebook: np.ndarray  # (groups, k) in the stored dtype
    indices: np.ndarray  # local indices, the weight's shape
    channel_axis: int | None  # None: one codebook (groups == 1) or a shared one
    scale: np.ndarray | None = None  # granularity "scaled": per-channel factors (broadcastable, the weight's dtype)
    # sparse: each codebook has 2^bits centroids for the nonzero weights and, last (index 2^bits),
    # an exact 0 that the zeros index; stored as a 1-bit mask and the nonzero weights' indices.
    sparse: bool = False


@register_pass
@dataclass(frozen=True)
class Codebook(Pass):
    """k-means weight codebooks (2^bits shared values per tensor or per output channel), stored in
    standard ONNX and decoded by Gather so that onnxruntime folds them at session creation."""

    name = "codebook"
    summary = "k-means weight sharing: 2^bits centroids per tensor/channel, low-bit indices decoded by Gather"
    exact = False
    knob = "bits per index (2..8), with --min-agreement/--min-sqnr: the fewest that holds them"

    bits: int = option(0, "index bits, 2..8 (2^bits centroids), stored in that many bits; with a user floor the "
                          "fewest bits that holds it is searched instead. 0 (auto, the default): with --calib "
                          "mixed widths for a 6x smaller file (ratio=6), else 5 bits (6.1x smaller float32 "
                          "weights); see the README and tools/bench_codebook.py for what was measured")
    granularity: str = option("auto", "'tensor' (one codebook per weight), 'scaled' (one codebook for the weight's "
                                      "channels each divided by its RMS, decoded times a per-channel scale), "
                                      "'channel' (one codebook per output channel) or 'auto' (channel when those "
                                      "codebooks cost <= 12.5% of the indices, else scaled)")
    method: str = option("auto", "'exact' (1-D k-means by dynamic programming; per channel on a 48-bin histogram, "
                                 "then Lloyd), 'lloyd' (Lloyd from density-matched quantiles) or 'auto' (exact)")
    codebook_dtype: str = option("float16", "codebook entries: 'float16' (half the codebook bytes; fp16 rounding "
                                            "of the centroids, ~5e-4 relative) or 'float32'")
    storage: str = option("auto", "indices: 'auto' (packed when bits <= 4: UINT4/UINT2 where the opset has "
                                  "them, else bytes unpacked by BitShift), 'uint8' (one byte each) or 'packed'")
    dense: bool = option(False, "write dense weights snapped to the codebook instead (for runtimes that want "
                                "dense weights; the file only shrinks once compressed)")
    share: str = option("none", "one codebook for a group of layers: 'none', 'shape' (weights of one shape) or "
                                "'op' (one op type and kernel size, e.g. all 3x3 convs); per tensor only")
    sparse: bool = option(True, "a weight more than 1/bits of whose elements are exactly 0 (after sparsify or "
                                "prune) gets 2^bits centroids for its nonzero values plus an exact 0, and is "
                                "stored as a 1-bit mask of its nonzeros and their indices only (decoded by "
                                "CumSum and Gather; bits < 8, opset >= 11); false: the zeros take one of the "
                                "2^bits centroids and every element an index")
    bias_correction: bool = option(True, "with --calib, move each Conv / Gemm bias by the mean output shift the "
                                         "snapped weights cause (its input's channel means times the weight error)")
    importance: bool = option(True, "with --calib, weight each squared error by E[x^2] of the input channel "
                                   "it multiplies (the diagonal of X^T X; per kernel position with fit != kmeans): "
                                   "measured with GPTQ at 4 bits, SqueezeNet 0.84/0.81 instead of 0.79/0.80 top-1 "
                                   "agreement, MiniLM's refit layers 0.91 instead of 0.58 worst cosine")
    fit: str = option("auto", "with --calib, what the codebook fits: 'kmeans' (the weights), 'refit' (k-means, "
                              "then least-squares centroids on the layer outputs X W^T), 'gptq' (indices chosen "
                              "column by column with error feedback through (X^T X)^-1, then the refit) or "
                              "'auto' (gptq)")
    ratio: float = option(0.0, "mixed widths: the file this many times smaller than with float32 weights, with "
                               "2..8 bits per layer chosen by each layer's output distortion (measured with "
                               "--calib, else its weight error) per byte; with a user floor the highest ratio up "
                               "to this that holds it. 0: every layer `bits`")
    sparsity: float = option(0.0, "with ratio: a layer may also be pruned to this fraction of zeros before its "
                                  "codebook (SparseGPT with --calib, where the layer has a Gram; else the smallest "
                                  "magnitudes), stored sparse, where its measured distortion per byte says so; "
                                  "0: no pruning")
    ops: list[str] = option(list(OPS), "op types whose weights are encoded (Gather: embedding tables)")
    exclude: list[str] = option([], "node names or op types to leave alone")
    min_elements: int = option(-1, "leave weights with fewer elements than this dense (a codebook costs more "
                                    "than it saves on small tensors); -1 (auto): 1024, or 256 with ratio (the "
                                    "allocation gives small sensitive tensors more bits; PP-OCR cls keeps 51 KB of "
                                    "its 174 KB 4-bit file in float32 tensors below 1024 elements)")

    def after(self) -> tuple[Pass, ...]:
        # BatchNorm folded into its Conv first: the codebook then fits the weights that run.
        from edgegraph.passes.cleanup import Cleanup

        return (Cleanup(),)

    def __post_init__(self):
        self.check(self.bits in BITS or self.bits == 0, f"codebook: bits must be 2..8 (or 0: auto), got {self.bits}")
        for name, value, allowed in (("granularity", self.granularity, GRANULARITIES),
                                     ("method", self.method, METHODS), ("storage", self.storage, STORAGES),
                                     ("share", self.share, SHARES),
                                     ("codebook_dtype", self.codebook_dtype, CODEBOOK_DTYPES)):
            self.check(value in allowed, f"codebook: {name} must be one of {', '.join(allowed)}, got '{value}'")
        self.check(self.fit in datafit.FITS, f"codebook: fit must be one of {', '.join(datafit.FITS)}, got '{self.fit}'")
        unknown = [op for op in self.ops if op not in OPS]
        self.check(not unknown, f"codebook: cannot encode {', '.join(unknown)} weights (ops: {', '.join(OPS)})")
        self.check(self.min_elements >= -1, "codebook: min_elements must be >= 0 (or -1: auto)")
        self.check(self.ratio == 0 or 1.0 < self.ratio <= 32.0, f"codebook: ratio must be 0 or in (1, 32], got {self.ratio}")
        self.check(self.ratio == 0 or self.share == "none", "codebook: ratio (mixed widths) needs share=none")
        self.check(0.0 <= self.sparsity < 1.0, f"codebook: sparsity must be in [0, 1), got {self.sparsity}")
        self.check(self.sparsity == 0 or self.ratio, "codebook: sparsity needs ratio (the allocation chooses "
                                                     "which layers are pruned); use -p sparsify,codebook otherwise")
        self.check(self.share == "none" or self.granularity != "channel",
                   "codebook: share needs granularity=tensor (or auto): a shared codebook is one per tensor group")

    # -- the run ------------------------------------------------------------------------------

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if self.bits == 0:  # auto: mixed widths when data measures the layers' sensitivity
            data = ctx.calibration is not None and len(ctx.calibration) > 0
            mixed_widths = data and not ctx.verify.floor() and not self.ratio and self.share == "none"
            return replace(self, bits=DEFAULT_BITS, ratio=self.ratio or (AUTO_RATIO if mixed_widths else 0.0))._run(
                model, ctx, auto=not self.ratio)
        return self._run(model, ctx)

    def _run(self, model: ir.Model, ctx: PassContext, auto: bool = False) -> PassResult:
        """`run` with bits and ratio resolved; `auto`: the ratio is the default's, and a model that
        cannot reach it (small models: decode nodes and float tensors left) gets `bits` instead."""
        warn_unmatched(f"{self.name}: exclude", self.exclude, model.graph, ops=True, nodes=True)
        weights = weights_of(model, self.ops, self.exclude, self._min_elements)
        if not weights:
            return PassResult(False, {"layers": 0})
        deflate_before = deflated_size_later(model)
        if model.opset < PACK_OPSET and not self.dense and self.storage != "uint8" and (self.bits < 8 or ctx.verify.floor()):
            # Packing needs BitShift (opset 11): upgrade like quant does (opset 13); else one byte per index.
            from edgegraph.convert import upgrade_opset

            upgraded = upgrade_opset(model, 13)
            if upgraded is not None:
                model.graph = upgraded.graph
                weights = weights_of(model, self.ops, self.exclude, self._min_elements)
        data = ctx.calibration
        fit, held = _split(data)
        user_floor = ctx.verify.floor()
        if self._fit_mode() != "kmeans" and data is not None and len(data):
            # The layer objective's Gram on all samples unless a floor is measured on the held-out half.
            fits = datafit.capture_fits(model, weights, fit if user_floor else data, ctx)
            for w in weights:
                w.fit = fits.get(w.tensor.name)
                if w.fit is not None and self.importance and w.activation is not None:  # (it weighs by diag(H))
                    w.importance = np.ones(w.value.shape[w.in_axis])
        if (self.importance or self.bias_correction) and fit is not None:
            # Channel moments where they are used: the importance of weights without a Gram fit,
            # the means of bias correction (MiniLM: none, one pass over the data less).
            _add_moments(model, [w for w in weights if (self.importance and w.importance is None) or
                                 (self.bias_correction and _correctable(w) is not None)], fit, ctx, self.importance)
        search, cache, sensitivity = None, {}, None
        if self.ratio:
            sensitivity = self._sensitivity(model, weights, fit if user_floor else data, ctx, cache)
        if user_floor and held is not None:
            model, rows, search = self._search(model, weights, held, user_floor, ctx, cache, sensitivity)
        elif self.ratio:
            trial, rows, reached = self._apply_ratio(model, weights, self.ratio, sensitivity, cache)
            if auto and not reached:
                logger.info("codebook: %.3g x is out of reach for this model; %d bits instead", self.ratio, self.bits)
                if self.min_elements < 0:  # (the fixed-width default's size limit)
                    weights = [w for w in weights if w.value.size >= MIN_ELEMENTS]
                rows = self._apply(model, weights, self.bits, cache)
            else:
                model.graph = trial.graph
        else:
            rows = self._apply(model, weights, self.bits, cache)
        if not rows:
            return PassResult(False, {"layers": 0})
        stats = _totals(rows)
        settle(model)  # (the replaced weights' old decode chains are dead now: not part of the file)
        _drop_types(model)
        stats.update(deflate_bytes_before=deflate_before(), deflate_bytes_after=deflated_size(model))
        details = {"layers": rows}
        if search is not None:
            details["floor_search"] = search.as_dict()
            stats["ratio" if self.ratio else "bits"] = search.best.setting
        widths = [r["bits"] for r in rows if r["elements"]]
        if len(set(widths)) > 1:
            stats["layers_by_bits"] = {str(b): widths.count(b) for b in sorted(set(widths))}
        return PassResult(True, stats, details)

    def _search(self, model: ir.Model, weights: list[_Weight], held: CalibrationData, user_floor, ctx,
                cache: dict, sensitivity: dict | None):
        """The fewest bits (2..8), or with `ratio` the highest ratio up to it, that hold the user's
        floor on held-out samples."""
        proto = model.to_proto()
        feeds = runtime.feeds_of(proto, held)
        reference = runtime.outputs(proto, feeds, threads=ctx.threads)

        def measure(setting):
            if self.ratio:
                trial, rows, _ = self._apply_ratio(model, weights, setting, sensitivity, cache)
                outputs = runtime.outputs(trial.to_proto(), feeds, threads=ctx.threads)
                return floor.measure(reference, outputs), (trial, rows)
            trial = model.copy()
            rows = self._apply(trial, self._same_weights(trial, weights), setting, cache)
            if not rows:
                return None, None
            outputs = runtime.outputs(trial.to_proto(), feeds, threads=ctx.threads)
            return floor.measure(reference, outputs), (trial, rows)

        settings = [r for r in RATIOS if r < self.ratio] if self.ratio else list(BITS)
        found = floor.search([self.ratio, *settings] if self.ratio else settings, measure, user_floor,
                             progress=ctx.progress_bar, desc=f"codebook: floor search ({'ratio' if self.ratio else 'bits'})")
        if found.best is None:
            raise floor.not_held("codebook", found)
        trial, rows = found.artefact
        model.graph = trial.graph
        return model, rows, found

    # -- encoding -----------------------------------------------------------------------------

    def _apply(self, model: ir.Model, weights: list[_Weight], widths: int | dict[str, int],
               cache: dict | None = None, sizing: bool = False) -> list[dict]:
        """Encode `weights` of `model` with `widths`-bit indices (or {weight: bits}); one report row
        per weight. `cache` keeps encodings by (weight, bits) across calls (mixed widths, searches).
        `sizing`: placeholder encodings of the right shapes and types (the written file's size
        without clustering anything; the values are meaningless)."""
        graph = model.graph
        namer = ir.Namer(graph)
        writer = _Writer(graph, namer, model.opset, self.storage)
        groups = self._encoded_groups(weights, widths, cache)
        writer.plan([(writer.planes(bits), self._sparse(w, bits)) for group, bits in groups for w in group])
        rows = []
        for group, bits in groups:
            if len(group) > 1:
                encodings = self._cluster_shared(group, bits)
            elif sizing:
                encodings = [self._placeholder(group[0], bits)]
            else:
                encodings = [self._cached(group[0], bits, cache)]
            shared = None
            for w, enc in zip(group, encodings):
                row = {"weight": w.tensor.name, "op": w.op, "shape": list(w.value.shape), "bits": bits,
                       **({"pruned_to": round(w.zeros / w.value.size, 4)} if w.pruned else {}),
                       "granularity": "channel" if enc.channel_axis is not None else "shared" if len(group) > 1
                       else "scaled" if enc.scale is not None else "tensor", "bytes_before": w.bytes_before}
                # (the placeholders of a sizing trial decode to nothing that is used)
                snapped = None if sizing and not self.dense else _decode(enc, w.value.dtype)
                if self.dense:
                    decoded = ir.const(namer(f"{w.tensor.name}_snapped"), snapped)
                    after = ir.stored_nbytes(decoded)
                else:
                    written = len(graph.nodes)
                    decoded, after, shared = writer.write(w, enc, bits, shared)
                    if after > WORTH * w.bytes_before and len(group) == 1:
                        del graph.nodes[written:]  # not worth it: the weight stays as it was
                        continue
                ir.replace_all_uses(graph, w.tensor, decoded)
                if self.bias_correction and w.mean is not None and not sizing:
                    row["bias_corrected"] = _correct_bias(w, snapped, namer)
                row.update({"bytes_after": int(after)} if sizing else _row_numbers(w, enc, snapped, after))
                rows.append(row)
        if rows and writer.shared():  # the unpacking tables and shift amounts all weights use
            rows.append({"weight": "(shared unpacking constants)", "op": "", "shape": [], "bits": None,
                         "granularity": "", "bytes_before": 0, "bytes_after": writer.shared(), "elements": 0,
                         "bits_per_weight": None, "index_entropy_bits": 0.0, "weight_sqnr_db": None})
        return rows

    def _encoded_groups(self, weights: list[_Weight], widths, cache: dict | None) -> list[tuple[list[_Weight], int]]:
        """(the weights of one codebook as they are encoded, their bits) for `widths` (bits, or
        {weight: bits or (bits, True)}: pruned to `sparsity` first)."""
        found = []
        for group in self._groups(weights):
            bits = widths if isinstance(widths, int) else widths[group[0].tensor.name]
            if isinstance(bits, tuple):
                found.append(([self._pruned(group[0], cache)], bits[0]))
            else:
                found.append((group, bits))
        return found

    def _groups(self, weights: list[_Weight]) -> list[list[_Weight]]:
        if self.share == "none":
            return [[w] for w in weights]
        groups: dict[tuple, list[_Weight]] = {}
        for w in weights:
            key = (w.value.dtype.name, tuple(w.value.shape)) if self.share == "shape" else \
                (w.value.dtype.name, w.op, tuple(w.value.shape[2:]) if w.op in ("Conv", "ConvTranspose") else ())
            groups.setdefault(key, []).append(w)
        return list(groups.values())

    def _granularity(self, w: _Weight, bits: int) -> str:
        if w.out_axis is None or w.value.shape[w.out_axis] < 2:
            return "tensor"
        if self.granularity != "auto":
            return self.granularity
        channels = w.value.shape[w.out_axis]
        codebooks = channels * (1 << bits) * (2 if self._codebook_dtype(w) == np.float16 else 4)
        return "channel" if codebooks <= CHANNEL_OVERHEAD * w.value.size * bits / 8 else "scaled"

    def _codebook_dtype(self, w: _Weight) -> np.dtype:
        return np.dtype(np.float16 if self.codebook_dtype == "float16" or w.value.dtype == np.float16 else np.float32)

    def _cached(self, w: _Weight, bits: int, cache: dict | None) -> _Encoding:
        if cache is None:
            return self._cluster(w, bits, {})
        key = (w.tensor.name, bits, w.pruned)
        if key not in cache:
            cache[key] = self._cluster(w, bits, cache)
        return cache[key]

    def _placeholder(self, w: _Weight, bits: int) -> _Encoding:
        """An encoding stored exactly like `_cluster(w, bits)`'s (shapes, dtypes), of zeros."""
        granularity = self._granularity(w, bits)
        groups = w.value.shape[w.out_axis] if granularity == "channel" else 1
        scale = None
        if granularity == "scaled":
            shape = [1] * w.value.ndim
            shape[w.out_axis] = w.value.shape[w.out_axis]
            scale = np.ones(shape, w.value.dtype)
        sparse = self._sparse(w, bits)
        # (sparse: the mask and the nonzero codes are sized by the zeros, which the fit keeps)
        indices = np.where(w.value == 0, 1 << bits, 0).astype(np.uint8) if sparse else np.zeros(w.value.shape, np.uint8)
        return _Encoding(np.zeros((groups, (1 << bits) + sparse), self._codebook_dtype(w)), indices,
                         w.out_axis if granularity == "channel" else None, scale, sparse)

    def _sensitivity(self, model: ir.Model, weights: list[_Weight], data: CalibrationData | None,
                     ctx: PassContext, cache: dict) -> dict[str, tuple[float, float | None]]:
        """Each weight's output distortion at mixed.PROBE bits, and with `sparsity` also pruned first
        (None without), measured with data, else its weight error."""
        found = {}
        for pruned in (False, True) if self.sparsity else (False,):
            variants = [self._pruned(w, cache) if pruned else w for w in weights]
            snapped = {v.tensor.name: _decode(self._cached(v, mixed.PROBE, cache), v.value.dtype) for v in variants}
            if data is not None and len(data):
                found[pruned] = mixed.measured(model, weights, snapped, data, ctx)
            else:
                found[pruned] = {w.tensor.name: mixed.weight_error(w.value, snapped[w.tensor.name]) for w in weights}
        return {n: (d, found[True].get(n) if self.sparsity else None) for n, d in found[False].items()}

    def _pruned(self, w: _Weight, cache: dict | None) -> _Weight:
        """`w` with `sparsity` of its elements zeroed: by OBS through its Gram when it has a usable
        one (the rest updated to make up for them, as `sparsify` does), else the smallest magnitudes."""
        key = (w.tensor.name, "pruned")  # (the value only: `w` may be a trial copy's weight)
        value = None if cache is None else cache.get(key)
        if value is None:
            value = w.value
            rows = None if w.fit is None else w.fit.to_rows(value.astype(np.float64))
            compensated = None
            if rows is not None and datafit.obs_usable(w.fit, rows.shape[1]):
                compensated = datafit.obs_prune(rows, w.fit, self.sparsity)
            if compensated is not None:
                value = w.fit.back(compensated).astype(value.dtype)
            else:
                value = np.where(datafit.top_mask(value, self.sparsity), value, np.zeros((), value.dtype))
            if cache is not None:
                cache[key] = value
        return replace(w, value=value, zeros=int(value.size - np.count_nonzero(value)), pruned=True)

    def _same_weights(self, trial: ir.Model, weights: list[_Weight]) -> list[_Weight]:
        """`weights` found again in a copy of their model (its own tensors), with what was measured on them."""
        found = {w.tensor.name: w for w in weights_of(trial, self.ops, self.exclude, self._min_elements)}
        for w in weights:
            if w.tensor.name in found:
                found[w.tensor.name].importance, found[w.tensor.name].mean = w.importance, w.mean
                found[w.tensor.name].fit = w.fit
        return [found[w.tensor.name] for w in weights if w.tensor.name in found]

    def _apply_ratio(self, model: ir.Model, weights: list[_Weight], ratio: float, sensitivity: dict,
                     cache: dict) -> tuple[ir.Model, list[dict], bool]:
        """A copy of `model` encoded with the widths that make its file `ratio` times smaller than
        with float32 weights. The byte estimates leave out the decode nodes and shared unpacking
        tables, so the budget is bisected on the size the written file really has: the largest
        budget whose file fits (or the smallest file, when none does: then False)."""
        rest = file_size(model, types=False) - sum(w.bytes_before for w in weights)
        target = (rest + sum(4 * w.value.size for w in weights)) / ratio
        tried: dict[tuple, tuple] = {}

        def build(widths: dict[str, int], sizing: bool = True):
            # The trials only need the written file's size, which the values do not change:
            # placeholders instead of a k-means (and fit) for every width a trial tries.
            key = (sizing, tuple(sorted(widths.items())))
            if key not in tried:  # (budgets in one step of the allocation give the same file)
                trial = model.copy()
                rows = self._apply(trial, self._same_weights(trial, weights), widths, cache, sizing=sizing)
                settle(trial)
                _drop_types(trial)
                tried[key] = (file_size(trial), trial, rows, widths)
            return tried[key]

        high = target - rest
        options = self._options(weights, sensitivity, cache)
        best = build(mixed.allocate(options, high))
        low, fits = (high, best) if best[0] <= target else (0.0, None)
        # The estimates miss the file by about a constant (the decode nodes): move the budget by what
        # the file misses the target by until the other side is reached, then bisect between the two
        # (MiniLM: a file 10 KB over its 15 MB target; bisected from 0 the last step was 230 KB).
        moved = best
        for _ in range(BISECTIONS):
            budget = (low if fits is not None else high) + (target - moved[0])
            found = build(mixed.allocate(options, budget))
            if found[3] == moved[3]:
                if fits is not None:
                    high = None  # (no layer moved up: the budget is not what limits the file)
                break
            moved = found
            if fits is not None and found[0] > target:
                high = budget
                break
            if fits is not None:
                low, fits = budget, found
            elif found[0] <= target:
                low, fits = budget, found
                break
            else:
                high = budget
        if high is not None:
            for _ in range(BISECTIONS):
                middle = (low + high) / 2
                found = build(mixed.allocate(options, middle))
                if found[0] <= target:
                    low, fits = middle, found
                else:
                    high = middle
        if fits is None:
            best = build(min(tried.values(), key=lambda t: t[0])[3], sizing=False)
            return best[1], best[2], False
        best = fits
        # The greedy path down from 8 bits moves in whole steps: spend what is left of the budget
        # on the steps up that buy the most distortion per byte (CIFAR: 7.2x -> 6.0x at ratio 6).
        for share in (1.0, 0.75, 0.5, 0.25):
            raised = mixed.fill(options, best[3], share * (target - best[0]))
            if raised != best[3]:
                found = build(raised)
                if found[0] <= target:
                    best = found
                    break
        final = build(best[3], sizing=False)
        return final[1], final[2], True

    def _options(self, weights: list[_Weight], sensitivity: dict, cache: dict) -> dict[str, list[tuple]]:
        """{weight: [(estimated bytes, distortion, choice)]} for `mixed.allocate`: each width of
        mixed.CHOICES (choice: bits), and with `sparsity` each but 8 bits pruned first (choice:
        (bits, True)). A pruned layer's distortion at b bits is the one measured at PROBE bits plus
        the change the dense layer's codebook error makes from PROBE to b bits on the share of
        the elements left."""
        options = {}
        for w in weights:
            dense, pruned = sensitivity.get(w.tensor.name, (0.0, None))
            found = [(self._estimate(w, b), mixed.at_bits(dense, b), b) for b in mixed.CHOICES]
            if pruned is not None:
                p = self._pruned(w, cache)
                left = 1.0 - p.zeros / p.value.size
                found += [(self._estimate(p, b), pruned + left * (mixed.at_bits(dense, b) - dense), (b, True))
                          for b in mixed.CHOICES if b < 8]
            options[w.tensor.name] = found
        return options

    def _estimate(self, w: _Weight, bits: int) -> float:
        """Bytes `w` takes at `bits` (indices, codebooks, scales; the decode nodes ~ NODE_BYTES)."""
        k, channels = 1 << bits, w.value.shape[w.out_axis] if w.out_axis is not None else 1
        entry = self._codebook_dtype(w).itemsize
        granularity = self._granularity(w, bits)
        size = math.ceil(w.value.size * bits / 8) + NODE_BYTES
        if self._sparse(w, bits):  # the mask, the nonzero weights' indices, the zero entry
            size = math.ceil(w.value.size / 8) + math.ceil((w.value.size - w.zeros) * bits / 8) + 2 * NODE_BYTES
            k += 1
        size += channels * (k * entry + 4) if granularity == "channel" else \
            k * entry + (channels * w.value.dtype.itemsize if granularity == "scaled" else 0)
        return size if size <= WORTH * w.bytes_before else w.bytes_before

    def _sparse(self, w: _Weight, bits: int) -> bool:
        """`w`'s zeros get a codebook entry of their own and a mask (`sparse`): when a 1-bit mask
        costs less than the indices of the zeros it saves (more than 1/bits of `w` is zero)."""
        return self.sparse and bits < 8 and 0 < w.zeros < w.value.size and w.zeros * bits > w.value.size

    @property
    def _min_elements(self) -> int:
        return self.min_elements if self.min_elements >= 0 else RATIO_MIN_ELEMENTS if self.ratio else MIN_ELEMENTS

    def _fit_mode(self) -> str:
        return "gptq" if self.fit == "auto" else self.fit

    def _cluster(self, w: _Weight, bits: int, cache: dict) -> _Encoding:
        enc = self._cluster_weights(w, bits, cache)
        if w.fit is not None and self._fit_mode() != "kmeans":
            enc = self._fit_outputs(w, enc)
        return enc

    def _fit_outputs(self, w: _Weight, enc: _Encoding) -> _Encoding:
        """The encoding with centroids (refit) and indices (gptq) chosen for the layer's outputs;
        kept only when it lowers tr(ΔHΔᵀ) on the captured inputs."""
        fit = w.fit
        rows = fit.to_rows(w.value.astype(np.float64))
        if not datafit.usable(fit, rows.shape[1], 0.0):
            return enc
        idx = fit.to_rows(enc.indices).astype(np.int64)
        o_rows = rows.shape[0]
        owner = np.arange(o_rows) if enc.channel_axis is not None else np.zeros(o_rows, np.int64)
        scale = np.ones(o_rows) if enc.scale is None else \
            fit.to_rows(np.broadcast_to(enc.scale, w.value.shape).astype(np.float64))[:, 0]
        dtype = enc.codebook.dtype
        stored = enc.codebook.astype(np.float64)
        refits = stored.shape[1] - enc.sparse <= datafit.REFIT_MAX_LEVELS
        if np.array_equal(stored[owner[:, None], idx] * scale[:, None], rows):
            return enc  # exact already
        has_zero = np.zeros(stored.shape[0], bool)
        np.logical_or.at(has_zero, owner, (rows == 0).any(axis=1))
        pinned = (stored == 0) & has_zero[:, None]
        if enc.sparse:
            pinned[:, -1] = True  # the zeros' entry stays 0 (also in a codebook whose rows have none)
        zeros = (rows == 0) & pinned[owner].any(axis=1)[:, None] if pinned.any() else None

        def snapped(cb, ix):
            return cb[owner[:, None], ix] * scale[:, None]

        best = (datafit.objective(rows, snapped(stored, idx), fit), stored, idx)

        def step(cb, ix):
            """The centroids refitted to indices `ix` (as stored: in the codebook's dtype), kept in
            `best` when that lowers the layer error."""
            nonlocal best
            if refits:
                cb = datafit.refit(rows, ix, cb, owner, scale, fit, pinned).astype(dtype).astype(np.float64)
            err = datafit.objective(rows, snapped(cb, ix), fit)
            if err < best[0]:
                best = (err, cb, ix)
            return cb

        cb = stored
        # GPTQ moves each weight by what H says; with few captured rows per feature H is the
        # captured samples' alone (MiniLM at 2.7 rows per feature: held-out cosine 0.58 instead of
        # 0.91), so such layers' H comes shrunk toward its diagonal (`datafit.SHRINK`).
        rounds = datafit.ROUNDS if self._fit_mode() == "gptq" and (fit.shrunk or datafit.usable(
            fit, rows.shape[1], datafit.GPTQ_ROWS_PER_FEATURE)) else 0
        for _ in range(rounds if refits else min(rounds, 1)):  # (without the refit a second round is the same)
            new = datafit.gptq_assign(rows, cb, owner, scale, fit, zeros)
            if new is None:
                break
            idx = new
            cb = step(cb, idx)
        if not rounds and refits:
            step(cb, idx)
        _, cb, idx = best
        return _Encoding(cb.astype(dtype), fit.back(idx).astype(np.uint8), enc.channel_axis, enc.scale, enc.sparse)

    def _cluster_weights(self, w: _Weight, bits: int, cache: dict) -> _Encoding:
        """k-means codebook(s) of `w` at `bits`. The values' sort order, which does not depend on the
        bits, is kept in `cache` for the other widths (MiniLM: 11.7 M embedding values sorted per row)."""
        k = 1 << bits
        value = w.value.astype(np.float64)
        importance = _importance_array(w)
        dtype = self._codebook_dtype(w)
        granularity = self._granularity(w, bits)
        sparse = self._sparse(w, bits)
        if granularity == "channel":
            rows = np.moveaxis(value, w.out_axis, 0).reshape(value.shape[w.out_axis], -1)
            hrows = None if importance is None else np.moveaxis(importance, w.out_axis, 0).reshape(rows.shape)
            order = _sort_order(rows, cache, (w.tensor.name, w.pruned, "rows"))
            x = np.take_along_axis(rows, order, axis=1)
            centroids = self._centroids_rows(x, None if hrows is None else np.take_along_axis(hrows, order, axis=1),
                                             k, sparse)
            codebook = centroids.astype(dtype)
            local = kmeans1d.assign_sorted(x, order, codebook.astype(np.float64))
            if sparse:  # the zeros: the entry after the k centroids
                local[rows == 0] = k
                codebook = np.concatenate([codebook, np.zeros((len(codebook), 1), dtype)], axis=1)
            moved = list(np.moveaxis(value, w.out_axis, 0).shape)
            indices = np.moveaxis(local.reshape(moved), 0, w.out_axis)
            return _Encoding(codebook, indices.astype(np.uint8), w.out_axis, sparse=sparse)
        scale = None
        if granularity == "scaled":  # channels brought to one scale share the codebook well
            axes = tuple(a for a in range(value.ndim) if a != w.out_axis)
            rms = np.sqrt((value ** 2).mean(axis=axes, keepdims=True))
            scale = np.where(rms > 0, rms, 1.0).astype(w.value.dtype)
            value = value / scale.astype(np.float64)
        flat = value.ravel()
        h = None if importance is None else importance.ravel()
        fitted = flat != 0 if sparse else slice(None)  # sparse: the k centroids fit the nonzero values
        order = _sort_order(flat[fitted][None], cache, (w.tensor.name, w.pruned, granularity, sparse))[0]
        centroids = self._centroids_flat(flat[fitted], None if h is None else h[fitted], k, order)
        codebook = centroids.astype(dtype)[None]
        indices = kmeans1d.assign(flat[None], codebook.astype(np.float64))[0]
        if sparse:
            indices[flat == 0] = k
            codebook = np.concatenate([codebook, np.zeros((1, 1), dtype)], axis=1)
        return _Encoding(codebook, indices.reshape(value.shape).astype(np.uint8), None, scale, sparse)

    def _cluster_shared(self, group: list[_Weight], bits: int) -> list[_Encoding]:
        k = 1 << bits
        flat = np.concatenate([w.value.astype(np.float64).ravel() for w in group])
        hs = [_importance_array(w) for w in group]
        h = None if all(x is None for x in hs) else np.concatenate(
            [np.ones(w.value.size) if x is None else x.ravel() for w, x in zip(group, hs)])
        codebook = self._centroids_flat(flat, h, k).astype(self._codebook_dtype(group[0]))[None]
        return [_Encoding(codebook, kmeans1d.assign(w.value.astype(np.float64).ravel()[None],
                                                    codebook.astype(np.float64)).reshape(w.value.shape).astype(np.uint8),
                          None) for w in group]

    def _centroids_flat(self, flat: np.ndarray, h: np.ndarray | None, k: int,
                        order: np.ndarray | None = None) -> np.ndarray:
        """k centroids of the 1-D `flat` (importance `h`); `order`: its argsort, if known (`_sort_order`)."""
        order = np.argsort(flat, kind="stable") if order is None else order
        x = flat[order]
        hs = None if h is None else h[order]
        pin = _pins_zero(int(x.size - np.count_nonzero(x)), x.size, k)
        distinct = x[np.concatenate([[True], x[1:] != x[:-1]])]  # (x is sorted)
        if distinct.size <= k:  # exactly representable
            return np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
        if self.method == "lloyd":
            return kmeans1d.lloyd(x[None], k, None if hs is None else hs[None], np.array([pin]))[0]
        start = kmeans1d.exact(x, k, hs, pin_zero=pin)
        return kmeans1d.lloyd(x[None], k, None if hs is None else hs[None], np.array([pin]), start=start[None])[0]

    def _centroids_rows(self, x: np.ndarray, hs: np.ndarray | None, k: int, sparse: bool = False) -> np.ndarray:
        """(G, k) centroids of each row of the row-sorted `x` (importance `hs`, in the same order)."""
        zero = x == 0
        pin = zero.any(axis=1) & _pins_zero(int(zero.sum()), x.size, k)
        if sparse:  # the zeros have an entry of their own: weight 0 here, and k centroids for the rest
            hs = np.where(x == 0, 0.0, 1.0 if hs is None else hs)
            pin = np.zeros_like(pin)
        out = np.empty((x.shape[0], k))
        step = max(1, (1 << 22) // (49 * 49 * 8))  # rows per chunk of the binned DP (~4 MB per cost matrix)
        for start in range(0, x.shape[0], step):
            part = slice(start, start + step)
            hp = None if hs is None else hs[part]
            if self.method == "lloyd" or k > 16:  # the binned DP needs bins >> k
                out[part] = kmeans1d.lloyd(x[part], k, hp, pin[part])
            else:
                out[part] = kmeans1d.binned_rows(x[part], k, hp, pin[part])
        # Rows with at most k distinct values: those values, exactly.
        distinct = 1 + (np.diff(x, axis=1) > 0).sum(axis=1)
        for g in np.flatnonzero(distinct <= k):
            values = np.unique(x[g])
            out[g] = np.concatenate([values, np.full(k - values.size, values[-1])])
        return out


# ---------------------------------------------------------------------------------------------
# Which weights (shared with `sparsify`)


def weights_of(model: ir.Model, ops, exclude, min_elements: int) -> list[_Weight]:
    """The float weights read by `ops` nodes (not in `exclude`, names or op types) with at least
    `min_elements` elements: stored constants, or computed from constants only through a decode
    chain (weight-only int8 `Cast * scale`, Q/DQ; their float values are re-encoded). A weight
    also read by anything else, or already a codebook, is left alone."""
    graph = model.graph
    found: dict[int, _Weight] = {}
    skipped: set[int] = set()
    for node in graph.nodes:
        if node.op not in ops or node.op in exclude or node.name in exclude or not ir.is_standard(node):
            continue
        index = 0 if node.op == "Gather" else 1
        if len(node.inputs) <= index or node.inputs[index] is None or not node.inputs[index].name:
            continue
        tensor = node.inputs[index]
        if id(tensor) in found:
            found[id(tensor)].readers.append(node)
        elif id(tensor) not in skipped:
            weight = _weight(model, node, index, tensor, min_elements)
            if weight is None:
                skipped.add(id(tensor))
            else:
                found[id(tensor)] = weight
    return [w for w in found.values() if len(w.readers) == len(ir.consumers(w.tensor))
            and not ir.is_graph_output(graph, w.tensor)]


def _weight(model: ir.Model, node: gs.Node, index: int, tensor: gs.Tensor, min_elements: int) -> _Weight | None:
    code = encoding.encoded(tensor)
    if code is not None and code.kind in ("codebook", "packed-int4"):
        return None  # a codebook already
    if not isinstance(tensor, gs.Constant) and code is None and encoding.stored(tensor) is None:
        return None  # computed at run time
    value = ir.folded_value(tensor, model.opset)
    if value is None or value.dtype not in (np.float32, np.float16) or value.size < max(min_elements, 2):
        return None
    if node.op == "Gather":
        if int(node.attrs.get("axis", 0)) != 0 or value.ndim < 2:
            return None
        w = _Weight(tensor, value, [node], "Gather", value.ndim - 1)
    else:
        lay = layout.of(node, value.ndim, index)
        if lay is None:
            return None
        w = _Weight(tensor, value, [node], node.op, lay.out_axis if lay.per_axis else None)
        if lay.in_axis is not None and lay.groups == 1 and node.inputs[0] is not None and node.inputs[0].name:
            w.in_axis, w.activation = lay.in_axis, node.inputs[0].name
            w.activation_axis = lay.x_axis
    w.zeros = int(value.size - np.count_nonzero(value))
    stored = code.constants if code is not None else (encoding.stored(tensor),)
    w.bytes_before = sum(ir.stored_nbytes(c) for c in stored)
    return w


# ---------------------------------------------------------------------------------------------
# Writing the decode subgraph


class _Writer:
    """Writes one weight's codebook, indices and decode nodes into the graph."""

    def __init__(self, graph: gs.Graph, namer: ir.Namer, opset: int, storage: str):
        self.graph, self.namer, self.opset, self.storage = graph, namer, opset, storage
        self.shifts: dict[int, gs.Constant] = {}  # shared BitShift amounts
        self.tables: dict[int, gs.Constant] = {}  # shared unpacking tables
        self.lookup: set[int] = set()  # code widths unpacked by a table (`plan`)
        self.flat: gs.Constant | None = None
        self.axis: gs.Constant | None = None  # CumSum's axis (sparse indices)
        self.count = 0  # decode tensors named so far (`_node`)

    def plan(self, weights: list[tuple[list[int], bool]]) -> None:
        """Choose the code widths whose planes are unpacked by one lookup in a shared (256, 8 / width)
        table instead of BitShifts, from (planes, sparse) of every weight to write: where the nodes the
        table saves (2 * codes a byte - 4 per plane, ~50 bytes each) outweigh its bytes (1-bit: from 4
        planes on, 2-bit: from 6)."""
        count = {1: 0, 2: 0}
        for planes, sparse in weights:
            for width in [*planes, *([1] if sparse and planes != [8] else [])]:
                if width in count and not self._typed(width):
                    count[width] += 1
        self.lookup = {w for w, n in count.items() if n * (2 * (8 // w) - 4) * UNPACK_NODE_BYTES >= 256 * (8 // w)}

    def planes(self, bits: int) -> list[int]:
        """How `bits`-bit indices are stored: [8] one uint8 each, [4] / [2] typed UINT4 / UINT2
        where the opset has them, else bit planes packed into bytes, low bits first: 3 = 2 + 1,
        5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1 (each plane unpacked by BitShift, recombined in int32)."""
        if self.storage == "uint8" or bits == 8:
            return [8]
        if bits in (2, 4) and self._typed(bits):
            return [bits]
        if self.opset < PACK_OPSET:
            return [8]
        return [p for p in (4, 2, 1) if bits & p]

    def _typed(self, code_bits: int) -> bool:
        return self.storage == "auto" and code_bits in TYPED and self.opset >= TYPED[code_bits][0]

    def write(self, w: _Weight, enc: _Encoding, bits: int, shared: gs.Constant | None):
        """The decoded weight tensor, the bytes its new constants take, and the codebook constant
        (for the next weight of a shared group)."""
        # Short names (cb, cb_1, ...): each decode tensor's name is written 2-3 times, and exporters'
        # long weight names made a third of a small model's encoded file (the report names the weight).
        base = self.namer("cb")
        shape = list(w.value.shape)
        stored = 0
        codebook = shared
        if codebook is None:
            codebook = ir.const(f"{base}_codebook", np.ascontiguousarray(enc.codebook.reshape(-1)))
            stored += ir.stored_nbytes(codebook)
        planes = self.planes(bits)
        if enc.sparse and planes != [8]:
            wide, payload = self._sparse_indices(base, enc.indices, bits, planes, shape)
        else:  # (sparse in bytes: the zeros' index 2^bits is a byte like the others)
            wide, payload = self._indices(base, enc.indices, planes, shape)
        stored += payload
        if enc.channel_axis is not None:
            k = enc.codebook.shape[1]
            offsets_shape = [1] * len(shape)
            offsets_shape[enc.channel_axis] = shape[enc.channel_axis]
            offsets = np.arange(shape[enc.channel_axis]) * k
            # uint16 where they fit, widened by a Cast (half their bytes: SqueezeNet's are 8.5 KB in int32)
            narrow = offsets[-1] < 1 << 16
            offsets = ir.const(f"{base}_offsets", offsets.astype(np.uint16 if narrow else np.int32).reshape(offsets_shape))
            stored += ir.stored_nbytes(offsets)
            if narrow:
                offsets = self._node("Cast", [offsets], f"{base}_offsets32", np.int32, offsets_shape, to=6)
            wide = self._node("Add", [wide, offsets], f"{base}_index_global", np.int32, shape)
        cb_dtype = enc.codebook.dtype
        decoded = self._node("Gather", [codebook, wide], f"{base}_decoded", cb_dtype, shape, axis=0)
        if cb_dtype != w.value.dtype:
            decoded = self._node("Cast", [decoded], f"{base}_decoded_{w.value.dtype.name}", w.value.dtype, shape,
                                 to=int(1 if w.value.dtype == np.float32 else 10))
        if enc.scale is not None:
            scale = ir.const(f"{base}_scale", np.ascontiguousarray(enc.scale))
            stored += ir.stored_nbytes(scale)
            if w.value.dtype == np.float16:
                # onnxruntime's CPU provider has no float16 Mul, so it cannot fold one at session
                # creation and runs it on every inference (SqueezeNet fp16: 3x the input's latency).
                # The float32 product of two float16 values is exact (22 significant bits), so
                # rounding it to float16 once is the float16 product `_decode` computes.
                wide_scale = self._node("Cast", [scale], f"{base}_scale32", np.float32, list(enc.scale.shape), to=1)
                decoded = self._node("Cast", [decoded], f"{base}_decoded32", np.float32, shape, to=1)
                decoded = self._node("Mul", [decoded, wide_scale], f"{base}_scaled32", np.float32, shape)
                decoded = self._node("Cast", [decoded], f"{base}_scaled", np.float16, shape, to=10)
            else:
                decoded = self._node("Mul", [decoded, scale], f"{base}_scaled", w.value.dtype, shape)
        return decoded, stored, codebook

    def _indices(self, base: str, indices: np.ndarray, planes: list[int], shape: list[int]) -> tuple[gs.Tensor, int]:
        """The stored indices, and an int32 tensor of them in the weight's shape (what Gather reads)."""
        if planes == [8] or (len(planes) == 1 and self._typed(planes[0])):
            dtype = np.uint8 if planes == [8] else TYPED[planes[0]][1]
            c = ir.const(f"{base}_indices", np.ascontiguousarray(indices.astype(dtype)))
            return self._node("Cast", [c], f"{base}_index", np.int32, shape, to=6), ir.stored_nbytes(c)  # INT32
        flat = indices.astype(np.uint8).ravel()
        total, stored, shift = None, 0, 0
        for width in planes:  # low bits first
            plane = (flat >> shift) & ((1 << width) - 1)
            name = base if len(planes) == 1 else f"{base}_plane{shift}"
            codes, nbytes = self._plane(name, plane, width, shape)
            stored += nbytes
            wide = self._node("Cast", [codes], f"{name}_index", np.int32, shape, to=6)
            if shift:
                factor = ir.const(f"{name}_factor", np.array(1 << shift, np.int32))
                stored += ir.stored_nbytes(factor)
                wide = self._node("Mul", [wide, factor], f"{name}_shifted", np.int32, shape)
            total = wide if total is None else self._node("Add", [total, wide], f"{name}_sum", np.int32, shape)
            shift += width
        return total, stored

    def _sparse_indices(self, base: str, indices: np.ndarray, bits: int, planes: list[int],
                        shape: list[int]) -> tuple[gs.Tensor, int]:
        """A sparse encoding's indices (2^bits where the weight is 0) stored as a 1-bit mask of the
        nonzero elements and the nonzero elements' indices in order, and the int32 tensor of all
        of them in the weight's shape: Gather(Concat([2^bits], codes), CumSum(mask) * mask), i.e.
        the i-th nonzero element takes the i-th code and every zero the entry 2^bits."""
        flat = indices.ravel()
        nonzero = flat != (1 << bits)
        codes, stored = self._indices(f"{base}_nz", flat[nonzero], planes, [int(nonzero.sum())])
        bits_mask, nbytes = self._plane(f"{base}_mask", nonzero.astype(np.uint8), 1, [flat.size])
        zero = ir.const(f"{base}_zero", np.array([1 << bits], np.int32))
        stored += nbytes + ir.stored_nbytes(zero)
        table = self._node("Concat", [zero, codes], f"{base}_table", np.int32, [int(nonzero.sum()) + 1], axis=0)
        mask = self._node("Cast", [bits_mask], f"{base}_mask32", np.int32, [flat.size], to=6)
        if self.axis is None:
            self.axis = ir.const(self.namer("cba0"), np.array(0, np.int32))
        rank = self._node("CumSum", [mask, self.axis], f"{base}_rank", np.int32, [flat.size])
        at = self._node("Mul", [rank, mask], f"{base}_at", np.int32, [flat.size])
        picked = self._node("Gather", [table, at], f"{base}_picked", np.int32, [flat.size], axis=0)
        target = ir.const(f"{base}_shape", np.array(shape, np.int64))
        stored += ir.stored_nbytes(target)
        return self._node("Reshape", [picked, target], f"{base}_index", np.int32, shape), stored

    def _plane(self, base: str, codes: np.ndarray, code_bits: int, shape: list[int]) -> tuple[gs.Tensor, int]:
        """`code_bits`-bit codes packed into bytes and the uint8 subgraph unpacking them (weight's shape)."""
        per_byte = 8 // code_bits
        packed, tail = pack(codes, code_bits)
        parts: list[gs.Tensor] = []
        stored = 0
        if packed.size and code_bits in self.lookup:
            # 4 or 8 codes a byte: one lookup of each byte's codes in a (256, per_byte) table shared by
            # the model, where it saves more node bytes than it costs (`plan`).
            p = ir.const(f"{base}_packed", packed)
            stored += ir.stored_nbytes(p)
            rows = self._node("Cast", [p], f"{base}_bytes", np.int32, [packed.size], to=6)
            table = self._node("Gather", [self._table(code_bits), rows], f"{base}_split", np.uint8,
                               [packed.size, per_byte], axis=0)
            planar = self._node("Transpose", [table], f"{base}_planar", np.uint8, [per_byte, packed.size], perm=[1, 0])
            parts.append(self._node("Reshape", [planar, self._flat()], f"{base}_body", np.uint8,
                                    [per_byte * packed.size]))
        elif packed.size:
            p = ir.const(f"{base}_packed", packed)
            stored += ir.stored_nbytes(p)
            for j in range(per_byte):  # code j of each byte: bits [j*code_bits, (j+1)*code_bits)
                left = 8 - code_bits * (j + 1)
                part = p
                if left:
                    part = self._node("BitShift", [part, self._shift(left)], f"{base}_up{j}", np.uint8, [packed.size],
                                      direction="LEFT")
                part = self._node("BitShift", [part, self._shift(8 - code_bits)], f"{base}_code{j}", np.uint8,
                                  [packed.size], direction="RIGHT")
                parts.append(part)
        if tail.size:
            t = ir.const(f"{base}_tail", tail)
            stored += ir.stored_nbytes(t)
            parts.append(t)
        flat_codes = parts[0] if len(parts) == 1 else self._node("Concat", parts, f"{base}_codes", np.uint8,
                                                                 [codes.size], axis=0)
        if len(shape) == 1:  # (the sparse path's planes: flat already, no Reshape and shape to store)
            return flat_codes, stored
        target = ir.const(f"{base}_shape", np.array(shape, np.int64))
        stored += ir.stored_nbytes(target)
        return self._node("Reshape", [flat_codes, target], f"{base}_codes_nd", np.uint8, shape), stored

    def shared(self) -> int:
        """Bytes of the constants every weight's decoding shares."""
        return sum(ir.stored_nbytes(c) for c in [*self.shifts.values(), *self.tables.values(), self.flat, self.axis]
                   if c is not None)

    def _table(self, code_bits: int) -> gs.Constant:
        """(256, 8 / code_bits) uint8: the codes each byte value holds, low bits first (one per model)."""
        if code_bits not in self.tables:
            per_byte = 8 // code_bits
            values = np.arange(256, dtype=np.uint8)[:, None]
            shifts = (np.arange(per_byte, dtype=np.uint8) * code_bits)[None]
            codes = ((values >> shifts) & ((1 << code_bits) - 1)).astype(np.uint8)
            self.tables[code_bits] = ir.const(self.namer(f"cbu{code_bits}"), codes)
        return self.tables[code_bits]

    def _flat(self) -> gs.Constant:
        if self.flat is None:
            self.flat = ir.const(self.namer("cbf"), np.array([-1], np.int64))
        return self.flat

    def _shift(self, amount: int) -> gs.Constant:
        if amount not in self.shifts:
            self.shifts[amount] = ir.const(self.namer(f"cbs{amount}"), np.array(amount, np.uint8))
        return self.shifts[amount]

    def _node(self, op: str, inputs: list, label: str, dtype, shape, **attrs) -> gs.Variable:
        """A decode step's node and output. `label` says what the step computes (for the reader of
        this code): the output gets a short name instead, "t" and a base-36 count. Each decode
        tensor's name is written twice (by its node and its reader), and descriptive ones took 45 KB
        of SqueezeNet's 525 KB at 10x; no node name either (~40 bytes a node)."""
        self.count += 1
        out = gs.Variable(self.namer(f"t{np.base_repr(self.count, 36).lower()}"), dtype=np.dtype(dtype),
                          shape=list(shape))
        self.graph.nodes.append(gs.Node(op, inputs=inputs, outputs=[out], attrs=attrs))
        return out


def pack(codes: np.ndarray, code_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Planar packing of uint8 codes of `code_bits` (1, 2 or 4) bits: with r = 8 / code_bits and
    p = len // r, byte i holds codes[i], codes[p + i], ..., codes[(r-1)p + i] from the low bits up;
    the len % r codes left over are returned as they are (the tail). `unpack` inverts it."""
    per_byte = 8 // code_bits
    p = codes.size // per_byte
    body = codes[:p * per_byte].astype(np.uint8).reshape(per_byte, p)
    packed = np.zeros(p, np.uint8)
    for j in range(per_byte):
        packed |= (body[j] << (j * code_bits)).astype(np.uint8)
    return packed, np.ascontiguousarray(codes[p * per_byte:].astype(np.uint8))


def unpack(packed: np.ndarray, tail: np.ndarray, code_bits: int) -> np.ndarray:
    """The codes `pack` packed (what the BitShift subgraph computes)."""
    mask = (1 << code_bits) - 1
    parts = [(packed >> (j * code_bits)) & mask for j in range(8 // code_bits)]
    return np.concatenate([*parts, tail]).astype(np.uint8)


def _sort_order(rows: np.ndarray, cache: dict, key: tuple) -> np.ndarray:
    """The argsort of each row of `rows` (G, n), kept in `cache` under `key`. (numpy's default sort,
    vectorised, is 7x faster than its stable one on MiniLM's embedding; equal values, which
    int8-derived weights have many of, then come in an order that is deterministic but not the
    stable one, which only changes the rounding of the clusters' sums.)"""
    if key not in cache:
        order = np.argsort(rows, axis=1)
        cache[key] = order.astype(np.int32) if order.size and rows.shape[1] < 2 ** 31 else order
    return cache[key]


def _decode(enc: _Encoding, dtype) -> np.ndarray:
    """What the decode subgraph computes: codebook[indices] (per channel: each channel's own
    codebook) in `dtype`, times the channel scales (granularity scaled)."""
    if enc.channel_axis is None:
        values = enc.codebook[0][enc.indices]
    else:
        k = enc.codebook.shape[1]
        shape = [1] * enc.indices.ndim
        shape[enc.channel_axis] = -1
        offsets = (np.arange(enc.codebook.shape[0]) * k).reshape(shape)
        values = enc.codebook.reshape(-1)[enc.indices.astype(np.int64) + offsets]
    values = values.astype(dtype)
    return values if enc.scale is None else values * enc.scale


# ---------------------------------------------------------------------------------------------
# Importance, accounting


def _split(data: CalibrationData | None) -> tuple[CalibrationData | None, CalibrationData | None]:
    """Samples to fit on (importance) and held-out samples to measure the floor on: halves of
    the calibration data (both all of it when there is a single sample)."""
    if data is None or len(data) == 0:
        return None, None
    if len(data) < 2:
        return data, data
    half = len(data) // 2
    return data.take(half), data.take(len(data) - half, start=half)


def _add_moments(model: ir.Model, weights: list[_Weight], data: CalibrationData, ctx: PassContext,
                 importance: bool) -> None:
    """E[x] (and with `importance` E[x^2]) per input channel of every weight that multiplies an activation."""
    wanted = {}
    for w in weights:
        if w.activation is not None:
            shape = model.graph.tensors().get(w.activation)
            rank = len(shape.shape) if shape is not None and shape.shape is not None else None
            if rank:
                wanted[w.activation] = w.activation_axis % rank
    if not wanted:
        return
    proto = model.to_proto()
    specs = runtime.input_specs(proto)
    size = runtime.batch_size_for(specs, 8)
    batches = (runtime.adapt_feeds(specs, b) for b in data.batches(size))
    total = -(-len(data) // size)
    found = capture.moments(proto, wanted, batches, threads=ctx.threads,
                            progress=lambda it, **_: ctx.progress_bar(it, total=total, desc="codebook: channel moments"))
    for w in weights:
        stats = found.get(w.activation) if w.activation else None
        if stats is None or stats.count.size != w.value.shape[w.in_axis]:
            continue
        w.mean = stats.mean
        energy = stats.variance + stats.mean ** 2
        if importance and energy.max() > 0:
            w.importance = np.maximum(energy / energy.mean(), 1e-3)  # no weight is free


def _correctable(w: _Weight) -> np.ndarray | None:
    """The bias `_correct_bias` can move for `w`: of its single Conv or plain Gemm (alpha = beta
    = 1), a constant of one value per output channel in the weight's dtype; else None."""
    node = w.readers[0]
    if len(w.readers) != 1 or node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or w.out_axis is None:
        return None
    if node.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return None
    bias = ir.constant_value(node.inputs[2])
    if bias is None or bias.shape != (w.value.shape[w.out_axis],) or bias.dtype != w.value.dtype:
        return None
    return bias


def _correct_bias(w: _Weight, snapped: np.ndarray, namer: ir.Namer) -> bool:
    """Subtract the mean output shift of the snapped weight, (W' - W) . E[x], from the bias of
    its (single) Conv or plain Gemm (alpha = beta = 1), as quant's bias correction does."""
    bias = _correctable(w)
    if bias is None:
        return False
    node = w.readers[0]
    channels = w.value.shape[w.out_axis]
    error = np.moveaxis(snapped.astype(np.float64) - w.value.astype(np.float64), [w.out_axis, w.in_axis], [0, 1])
    shift = error.reshape(channels, error.shape[1], -1).sum(axis=2) @ w.mean
    node.inputs[2] = ir.const(namer(f"{node.inputs[2].name}_corrected"), (bias - shift).astype(bias.dtype))
    return True


def _pins_zero(zeros: int, size: int, k: int) -> bool:
    """A codebook of k levels keeps one at exactly 0 for the zeros of its `size` values when they are
    at least 1/(2k) of them (sparsified or pruned weights: they stay zero). Fewer are the zeros a
    finer grid left (MiniLM's int8 weights: 1.1%), and a level pinned for them is a level lost:
    MiniLM's token embedding at 3 bits, alone, 0.899/0.916 worst-token cosine pinned, 0.934/0.935 not."""
    return zeros > 0 and 2 * k * zeros >= size


def _importance_array(w: _Weight) -> np.ndarray | None:
    if w.fit is not None and w.importance is not None:  # diag(X^T X) per feature (kernel position)
        d = w.fit.hdiag(w.fit.to_rows(w.value).shape[0])
        if d.max() > 0:
            return w.fit.back(np.maximum(d / d.mean(), 1e-3))
    if w.importance is None:
        return None
    shape = [1] * w.value.ndim
    shape[w.in_axis] = -1
    return np.broadcast_to(w.importance.reshape(shape), w.value.shape)


def entropy_bits(indices: np.ndarray) -> float:
    """Shannon entropy of the indices, bits per index (what Huffman coding approaches)."""
    counts = np.bincount(indices.ravel().astype(np.int64))
    p = counts[counts > 0] / indices.size
    return float(-(p * np.log2(p)).sum())


def _row_numbers(w: _Weight, enc: _Encoding, snapped: np.ndarray, after: int) -> dict:
    ref = w.value.astype(np.float64)
    noise = float(((ref - snapped.astype(np.float64)) ** 2).sum())
    signal = float((ref ** 2).sum())
    return {"bytes_after": int(after), "bits_per_weight": round(after * 8 / w.value.size, 3),
            "index_entropy_bits": round(entropy_bits(enc.indices), 3),
            "weight_sqnr_db": round(10 * math.log10(signal / noise), 2) if noise > 0 and signal > 0 else None,
            "elements": int(w.value.size)}


def _totals(rows: list[dict]) -> dict:
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    elements = sum(r["elements"] for r in rows)
    entropy = sum(r["index_entropy_bits"] * r["elements"] for r in rows) / max(elements, 1)
    sqnrs = [r["weight_sqnr_db"] for r in rows if r["weight_sqnr_db"] is not None]
    return {"layers": sum(1 for r in rows if r["elements"]), "weight_bytes_before": before, "weight_bytes_after": after,
            "weight_ratio": round(before / max(after, 1), 2), "bits_per_weight": round(after * 8 / max(elements, 1), 3),
            "index_entropy_bits": round(entropy, 3), "worst_weight_sqnr_db": min(sqnrs) if sqnrs else None}


def _drop_types(model: ir.Model) -> None:
    """The file without the intermediate types (value_info) when every node is a standard op (any
    runtime infers them again): each decode node's output would add ~60 bytes of them (PP-OCR cls
    at 4 bits: 21 KB of a 206 KB file)."""
    if all(ir.is_standard(n) for n in model.graph.nodes):
        model.value_info = False


def file_size(model: ir.Model, types: bool | None = None) -> int:
    """Bytes of the model's file as `modelio.save` writes it (value_info per `types`, default the model's)."""
    proto = model.to_proto()
    if not (model.value_info if types is None else types):
        for graph in validate.graphs(proto):
            del graph.value_info[:]
    return proto.ByteSize()


def deflated_size(model: ir.Model) -> int | None:
    """Bytes of the serialized model after deflate (what a zip / APK stores), or None when it is too big."""
    return deflated_size_later(model)()


def deflated_size_later(model: ir.Model) -> Callable[[], int | None]:
    """`deflated_size(model)`, compressed in a background thread: call the result for it. zlib lets
    the interpreter run meanwhile, so the pass clusters while the input model is compressed
    (MiniLM's 90 MB: 2.5 s at level 6)."""
    if ir.proto_size(model) > DEFLATE_LIMIT:
        return lambda: None
    data = model.to_proto().SerializeToString()
    pool = ThreadPoolExecutor(1)
    found = pool.submit(zlib.compress, data, 6)
    pool.shutdown(wait=False)
    return lambda: len(found.result())


__all__ = ["Codebook", "deflated_size", "entropy_bits", "file_size", "pack", "unpack", "weights_of"]
