"""Structured pruning without training: whole channels of coupling groups are removed, the layers
that read them are recovered by least squares, and the amount removed is what the accuracy floor
allows.

1. Groups come from `edgegraph.analysis.channels.groups` (the channels that must go together;
   groups that cannot be cut keep their reason for the report). Graph outputs are never cut, nor
   the groups of the first layer / the last layer's input (`protect_ends`) or of named nodes.
2. Each group gets a removal order and the cost of every prefix (`select`): by default, greedy
   least-squares reconstruction on the consumers' Gram matrices XᵀX (captured in one streamed
   pass over the fitting samples: memory per layer, never all activations).
3. A budget (a fraction of MACs removed) is shared between groups by cost per MAC saved, in steps
   that keep every group's width a multiple of the target's `channel_alignment` (onnxruntime's
   NCHWc kernels: an unaligned width can make a pruned model slower).
4. Each consumer of removed channels is recovered: its kept columns and bias take over what the
   removed ones explained (ridge least squares on the same Gram matrix); without calibration data,
   neuron merging (a removed channel folded into its most similar kept one) instead.
5. Without `macs` / `ratio`, the strongest budget up to `max_cut` that holds the floor (the
   user's `--min-agreement` / `--min-sqnr`, else a default) on held-out calibration samples (not
   the ones fitted on) is found by `edgegraph.floor.search`; every step goes into the report.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import floor, ir, runtime, stats, verify
from edgegraph.analysis import capture, channels, layout
from edgegraph.context import PassContext
from edgegraph.errors import EdgegraphError
from edgegraph.floor import Floor
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.passes.cleanup import Cleanup
from edgegraph.convert import compute_in_float32
from edgegraph.registry import register_pass

from . import refit, select

logger = logging.getLogger("edgegraph")

IMPORTANCE = ("auto", "reconstruction", "activation", "l1", "l2", "bn-scale")
# The budgets the floor search tries, as fractions of MACs removed, strongest first (up to max_cut).
CUTS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)
# The floor held when the user gives none: top-1 agreement for class scores, else output SQNR.
DEFAULT_AGREEMENT = 0.97
DEFAULT_SQNR_DB = 20.0
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SENSITIVITY_SAMPLES = 8
# `latency`: the MAC cuts timed (weakest first), and how (onnxruntime, 1 thread, interleaved rounds).
LATENCY_CUTS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
LATENCY_RUNS, LATENCY_ROUNDS = 10, 5
SENSITIVITY_POINTS = 4  # widths measured per group


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Structured channel pruning with least-squares recovery and an accuracy floor.

    With calibration data, the default removes as much compute as the floor allows (up to
    `max_cut` of the MACs); without it, the data-free fallback (weight magnitude + neuron merging)
    needs an explicit budget, `macs` or `ratio`.
    """

    name: ClassVar[str] = "prune"
    summary: ClassVar[str] = ("structured channel pruning: calibrated channel choice, least-squares recovery, "
                              "aligned widths")
    exact: ClassVar[bool] = False
    knob: ClassVar[str] = "fraction of MACs removed"

    macs: float | None = option(None, "fraction of MACs to keep (e.g. 0.7); none: the most the floor allows")
    ratio: float | None = option(None, "fraction of channels removed from every prunable group (instead of macs)")
    latency: float | None = option(None, "fraction of the measured latency to keep (e.g. 0.8): the MAC cuts of a "
                                         "grid are timed against the model (onnxruntime, 1 thread, interleaved "
                                         "round medians) and the weakest cut whose median is within it is pruned")
    max_cut: float = option(0.4, "with no macs / ratio: the largest fraction of MACs the floor search tries")
    importance: Literal["auto", "reconstruction", "activation", "l1", "l2", "bn-scale"] = option(
        "auto", "channel choice: reconstruction (greedy least-squares selection on calibration data), activation "
                "(Wanda-style |W|*|x|), l1 / l2 (weight magnitude), bn-scale (|gamma|, keeps BatchNorm unfolded); "
                "auto: reconstruction with calibration data, l2 without")
    recover: bool = option(True, "recover the layers reading removed channels: least squares with calibration "
                                 "data, neuron merging without")
    refit: bool = option(True, "with calibration data, fit the recovered layers again on the pruned model's own "
                               "inputs (the errors of the layers before them included), in one more pass")
    steps: int = option(1, "a MAC budget is reached in this many equal steps: after each, the pruned and refitted "
                           "model's inputs to every consumer are captured (against the original model's outputs) and "
                           "the next channels are chosen on them, by the error left after the refit (1: one shot; "
                           "3 measured at a 30% cut, held-out agreement: SqueezeNet 0.50/0.46 -> 0.52/0.51, the "
                           "CIFAR-10 CNN unchanged, PP-OCR cls 0.80/0.79 -> 0.77/0.77, DeepLab foreground "
                           "0.71/0.55 -> 0.66/0.48; each step costs one more refit)")
    refit_stages: int = option(0, "the refit runs in this many passes over the fitting samples, layers in graph "
                                  "order, each stage fitted on the inputs the stages before it left (0: one "
                                  "stage per layer, fully sequential; 1: all layers at once)")
    refit_downstream: bool = option(False, "the refit also fits every other plain Conv / Gemm / MatMul downstream of a "
                                           "cut (its inputs changed though none were removed) to the original's "
                                           "outputs (off: measured mixed at a 30% cut, SqueezeNet 0.58/0.56 -> "
                                           "0.66/0.58 on 2 x 100 images, the CIFAR-10 CNN 0.86/0.86 -> 0.83/0.83 and "
                                           "PP-OCR cls 0.770/0.772 -> 0.777/0.772 on 2 x 122 / 2 x 400, at 2-4x the time)")
    bias_correction: bool = option(False, "after the refit, every other Conv / Gemm downstream of a cut gets the "
                                          "bias that makes each output channel's mean on the fitting samples the "
                                          "original model's (off: measured no better at a 30% cut, SqueezeNet "
                                          "0.50/0.50 vs 0.48/0.52, YOLOX F1 0.10/0.03 vs 0.16/0.03, 4x slower)")
    sensitivity: bool | Literal["auto"] = option(
        "auto", "with calibration data, measure each group alone (cut to up to 4 widths, on 8 held-out samples) and "
                "use the output error as its cost (true); auto: at the first budget, build both the cut this "
                "allocates and the reconstruction-cost one and keep the nearer to the original on the held-out "
                "samples, judged per output field so that YOLOX's raw box coordinates do not decide (30% cut: "
                "measured costs won on PP-OCR cls 0.85/0.80 vs 0.69/0.67 and DeepLab, lost on SqueezeNet 0.41/0.42 "
                "vs 0.50/0.46 and YOLOX, F1 0.27/0.09 vs 0.63/0.32)")
    ridge: float = option(0.1, "least-squares regularisation, relative to the mean input energy (0.1 measured "
                               "best: 1e-3 overfits the refit, PP-OCR cls agreement 0.47 vs 0.73 at a 10% cut)")
    align: int = option(0, "kept channel counts are multiples of this (halved for groups narrower than four "
                           "times it, but a kept count at or above it stays a multiple of it); 0: the target's "
                           "channel_alignment")
    max_step_cost: float = option(0.5, "no group is cut to where its consumers' reconstruction error after the least-"
                                       "squares compensation exceeds this share of their output energy, unless the "
                                       "budget cannot be met otherwise (0: no bound). A 30% cut of PP-OCR cls halved "
                                       "a 32-channel bottleneck at error 0.93: agreement on 2 x 400 crops 0.72/0.71, "
                                       "0.77/0.77 with the bound; at 20% that step overshot to 27%, 0.73/0.71 vs "
                                       "0.86/0.87. Tighter bounds measured worse there (0.3: 0.67/0.70, 0.2: 0.72/0.71)")
    max_layer_cut: float = option(0.75, "at most this fraction of any group's channels is removed")
    protect_ends: bool = option(False, "never cut the first layer's output or the last layer's input (off: with "
                                       "recovery, cutting them measured better than leaving them)")
    protect: list[str] = option([], "node names whose channels are never cut")
    holdout: int = option(16, "calibration samples held out from fitting and used to measure each budget")
    calib_samples: int = option(256, "calibration samples the Gram matrices and refits are fitted on (0 = all not "
                                     "held out); more rows fit the recovery better: at a 30% cut, 240 instead of 48 "
                                     "measured held-out agreement PP-OCR cls 0.80/0.79 -> 0.86/0.85, SqueezeNet "
                                     "0.50/0.46 -> 0.58/0.56, and 144 DeepLab foreground 0.71/0.55 -> 0.85/0.77, YOLOX F1 "
                                     "0.36/0.41 -> 0.37/0.45, but the CIFAR-10 CNN 0.82/0.80 -> 0.81/0.70 (its cut "
                                     "then removed 40% of the MACs); the time grows with them (the refit runs one "
                                     "pass over them per layer)")

    def __post_init__(self) -> None:
        self.check(self.macs is None or 0.0 < self.macs <= 1.0, f"prune: macs must be in (0, 1], got {self.macs}")
        self.check(self.ratio is None or 0.0 <= self.ratio < 1.0, f"prune: ratio must be in [0, 1), got {self.ratio}")
        self.check(self.latency is None or 0.0 < self.latency < 1.0,
                   f"prune: latency must be in (0, 1), got {self.latency}")
        self.check(sum(v is not None for v in (self.macs, self.ratio, self.latency)) <= 1,
                   "prune: give one of macs, ratio, latency")
        self.check(0.0 < self.max_cut < 1.0, f"prune: max_cut must be in (0, 1), got {self.max_cut}")
        self.check(self.importance in IMPORTANCE, f"prune: importance must be one of {', '.join(IMPORTANCE)}")
        self.check(self.ridge >= 0 and math.isfinite(self.ridge), f"prune: ridge must be >= 0, got {self.ridge}")
        self.check(0 <= self.align <= 1024, f"prune: align must be in 0..1024, got {self.align}")
        self.check(self.max_step_cost >= 0 and math.isfinite(self.max_step_cost),
                   f"prune: max_step_cost must be >= 0, got {self.max_step_cost}")
        self.check(0.0 < self.max_layer_cut < 1.0, f"prune: max_layer_cut must be in (0, 1), got {self.max_layer_cut}")
        self.check(self.sensitivity in (True, False, "auto"), "prune: sensitivity must be true, false or auto")
        self.check(1 <= self.steps <= 20, f"prune: steps must be in 1..20, got {self.steps}")
        self.check(0 <= self.refit_stages <= 10000, f"prune: refit_stages must be >= 0, got {self.refit_stages}")
        self.check(self.holdout >= 1 and self.calib_samples >= 0, "prune: holdout must be >= 1, calib_samples >= 0")
        self.check(all(isinstance(n, str) and n for n in self.protect), "prune: protect must be a list of node names")

    def after(self) -> tuple[Pass, ...]:
        # BatchNorm folded into its Conv: fewer tensors per group, and merging compares whole layers.
        # bn-scale reads the BatchNorm scales, so they must stay.
        return () if self.importance == "bn-scale" else (Cleanup(),)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _Pruner(self, ctx).run(model)


@dataclass
class _Plan:
    """One prunable group and how its channels would go."""

    group: channels.Group
    multiple: int  # kept widths are multiples of this
    macs: float  # MACs saved per channel removed
    order: np.ndarray | None = None  # removal order
    cost: np.ndarray | None = None  # cost[k]: loss of removing order[:k + 1]
    importance: np.ndarray | None = None
    local: np.ndarray | None = None  # reconstruction cost curve (its consumers' error after compensation)
    skipped: str = ""
    align: int = 1  # the target's alignment: kept widths at or above it are multiples of it

    def allowed(self, max_layer_cut: float) -> list[int]:
        """Channel counts that may be removed, ascending (kept widths multiples of `multiple`, and
        of `align` where they are not narrower than it: onnxruntime's NCHWc kernels pad a layer's
        output channels to their block, and its input channels too from one block on, so 24 -> 20
        channels saves MACs but no time; on the CIFAR-10 CNN, 24 -> 16 in one layer made the model
        0.82x as slow, 24 -> 20 in two layers 0.90x). A group whose width is a multiple of `align`
        stays one: YOLOX's 16-channel stem cut to 12 saved MACs but no time in its Conv (the output
        is padded back to 16) and made the 1x1 Conv reading it 2x slower (59 -> 123 us, 1 thread)."""
        c, m = self.group.channels, self.multiple
        low = max(1, math.ceil(c * (1 - max_layer_cut)))
        return [c - k for k in range((c - 1) // m * m, 0, -m)
                if k >= low and c - k > 0 and (k % self.align == 0 or (k < self.align and c % self.align))] if c > 1 else []


class _Pruner:
    def __init__(self, options: Prune, ctx: PassContext):
        self.o, self.ctx = options, ctx
        self.notes: list[str] = []
        self.features: dict[int, list[tuple[str, list[np.ndarray]]]] = {}
        self.consumers: dict[str, select.Consumer] = {}
        self.latency_table: dict | None = None  # latency=: the timed MAC cuts (report)
        self.allocation: dict | None = None  # sensitivity=auto: which cost curve won (report)

    # -- the run -----------------------------------------------------------------------------

    def run(self, model: ir.Model) -> PassResult:
        o, ctx = self.o, self.ctx
        data = ctx.calibration
        if data is None and o.macs is None and o.ratio is None and o.latency is None:
            raise EdgegraphError("prune: without calibration data (--calib) give a budget, e.g. "
                                 "-p 'prune(macs=0.8)' (data-free: magnitude importance and neuron merging)")
        given = model
        model = model.copy()  # the working copy: named nodes, a bias on every layer (recovery moves means there)
        _name_nodes(model.graph)
        _zero_biases(model.graph)
        graph = model.graph
        self.work_model = model
        found = channels.groups(graph)
        self.nodes = {n.name: n for n in graph.nodes}
        self.readers = _readers(graph)
        self.holders = channels._constant_holders(graph)
        self.node_macs = self._node_macs(model, data)
        self.macs_before = sum(self.node_macs.values())
        self.params_before = stats.count_params(graph)[0]
        protected = self._protected(graph)
        align = o.align or ctx.target.channel_alignment
        plans, fixed = [], []
        for g in found:
            if not g.prunable:
                fixed.append({"group": g.id, "channels": g.channels, "decision": "fixed", "why": g.reasons[:3]})
                continue
            plan = _Plan(g, _multiple(g.channels, align), self._channel_macs(g), align=max(1, align))
            names = self._group_nodes(g)
            if names & protected:
                plan.skipped = f"protected ({', '.join(sorted(names & protected)[:2])})"
            elif plan.macs <= 0:
                plan.skipped = "no MACs to save"
            elif not plan.allowed(o.max_layer_cut):
                plan.skipped = f"too narrow for width multiple {plan.multiple}"
            plans.append(plan)
        live = [p for p in plans if not p.skipped]
        self.method = (("reconstruction" if data is not None else "l2") if o.importance == "auto" else o.importance)
        if data is None and self.method in ("reconstruction", "activation"):
            raise EdgegraphError(f"prune: importance={self.method} needs calibration data (--calib)")
        if not live:
            return PassResult(False, {"groups": len(found), "prunable": 0},
                              {"groups": fixed + [self._row(p, 0) for p in plans]})

        fit, held = self._split(data)
        self.consumers = self._consumers(model, live, fit) if data is not None else {}
        for plan in live:
            self._order(plan)
        live = [p for p in live if not p.skipped]
        costs = {"reconstruction": {p.group.id: p.cost for p in live}}
        if o.sensitivity is not False and data is not None and o.ratio is None:  # (ratio: no sharing to weigh)
            self._sensitivity(model, live, held)
            costs["measured"] = {p.group.id: p.cost for p in live}
        reference = self._reference(given, held)
        scores = verify.score_outputs(model)

        def build(setting):  # (costs: measured sensitivity curves when those are the ones allocating)
            return self._iterate(model, live, setting, "measured" in costs and (len(costs) == 1 or o.sensitivity is True))

        def measure(setting):
            if len(costs) > 1 and o.sensitivity == "auto" and held is not None and setting[0] == "macs":
                candidate, removed = self._choose_costs(live, costs, setting, reference, scores)
            else:
                candidate, removed = build(setting)
            if not any(len(v) for v in removed.values()):
                return None, None
            if held is None:
                return {}, (candidate, removed)
            out = runtime.outputs(candidate.to_proto(), self.held_batches, threads=ctx.threads)
            measured = floor.measure(reference, out)
            measured["macs_removed"] = 1 - self._macs_of(live, removed) / self.macs_before
            return measured, (candidate, removed)

        user = ctx.verify.floor()
        if o.latency is not None:
            settings = [("macs", self._latency_cut(model, live, data))]
            budget = user
        elif o.macs is not None or o.ratio is not None:
            settings = [("macs", round(1 - o.macs, 6)) if o.macs is not None else ("ratio", o.ratio)]
            budget = user
        else:
            settings = [("macs", cut) for cut in CUTS if cut <= o.max_cut + 1e-9]
            budget = user or self._default_floor(model)
        found_ = floor.search(settings, measure, budget, progress=ctx.progress_bar,
                              desc=f"prune: floor search ({self.o.knob})")
        if found_.best is None:
            if user:
                raise floor.not_held("prune", found_)
            closest = found_.closest
            logger.warning("prune: no budget holds %s on the held-out samples (smallest cut tried: %s); the model is "
                           "unchanged", budget, floor.describe(closest.measured) if closest else "nothing removed")
            return PassResult(False, {"groups": len(found), "prunable": len(live), "macs_removed": 0.0},
                              {"groups": fixed + [self._row(p, 0) for p in plans], "search": found_.as_dict(),
                               "notes": self.notes})
        candidate, removed = found_.artefact
        given.graph = candidate.graph
        return self._result(given, found, fixed, plans, removed, found_, budget)

    # -- analysis ----------------------------------------------------------------------------

    def _split(self, data):
        """(fitting data, held-out batches): the last `holdout` samples measure, the rest fit."""
        if data is None:
            return None, None
        n = len(data)
        if n < 2:
            self.notes.append("one calibration sample: budgets are measured on the sample fitted on")
            held = data
            fit = data
        else:
            count = min(self.o.holdout, max(1, n // 4))
            held, fit = data.take(count, n - count), data.take(n - count)
        if self.o.calib_samples:
            fit = fit.take(self.o.calib_samples)
        self.samples = {"fit": len(fit), "held_out": len(held)}
        return fit, held


    def _reference(self, model: ir.Model, held):
        if held is None:
            return None
        self.held_batches = runtime.feeds_of(model, held)
        return runtime.outputs(model.to_proto(), self.held_batches, threads=self.ctx.threads)

    def _node_macs(self, model: ir.Model, data) -> dict[str, int]:
        """MACs per node; dynamic sizes are taken from a run on one sample (else on seeded inputs)."""
        found = stats.node_macs(model.graph)
        if all(m is not None for _, m in found):
            return {n.name: m for n, m in found if m}
        feeds = stats.sample_feeds(model, data.take(1) if data is not None else None, seed=self.ctx.seed)
        observed = stats.observed_shapes(model, feeds)
        return {n.name: m for n, m in stats.node_macs(model.graph, observed) if m}

    def _default_floor(self, model: ir.Model) -> Floor:
        if verify.score_outputs(model):
            return Floor(min_agreement=DEFAULT_AGREEMENT)
        return Floor(min_sqnr=DEFAULT_SQNR_DB)

    def _protected(self, graph: gs.Graph) -> set[str]:
        names = {n.name for n in graph.nodes}
        missing = [n for n in self.o.protect if n not in names]
        if missing:
            logger.warning("prune: protect: no node named %s", ", ".join(missing[:5]))
        protected = set(self.o.protect)
        if self.o.protect_ends:
            layers = [n for n in graph.nodes if n.op in _MAC_OPS and n.name in self.node_macs]
            if layers:
                protected |= {layers[0].name, layers[-1].name}
        return protected

    def _group_nodes(self, g: channels.Group) -> set[str]:
        """Nodes whose weights the group cuts."""
        return {n.name for s in g.slices for n, _ in self.readers.get(s.constant, ())}

    def _channel_macs(self, g: channels.Group) -> float:
        """MACs saved per channel removed: each MAC node's share along the cut weight axis."""
        saved = 0.0
        for s in g.slices:
            for node, index in self.readers.get(s.constant, ()):
                if index == 1 and node.op in _MAC_OPS and node.name in self.node_macs:
                    size = np.asarray(self.holders[s.constant].values).shape[s.axis]
                    saved += self.node_macs[node.name] * np.mean([len(i) for i in s.indices]) / size
        return saved

    def _macs_of(self, plans, removed) -> float:
        """MACs of the model with `removed` channels gone (per MAC node: the kept share of each cut axis)."""
        share: dict[tuple[str, int], float] = {}
        for plan in plans:
            gone = removed.get(plan.group.id)
            if gone is None or not len(gone):
                continue
            for s in plan.group.slices:
                size = np.asarray(self.holders[s.constant].values).shape[s.axis]
                cut = sum(len(s.indices[c]) for c in gone)
                for node, index in self.readers.get(s.constant, ()):
                    if index == 1 and node.name in self.node_macs:
                        share[(node.name, s.axis)] = share.get((node.name, s.axis), 0.0) + cut / size
        total = 0.0
        for name, macs in self.node_macs.items():
            kept = 1.0
            for (node, _axis), cut in share.items():
                if node == name:
                    kept *= max(0.0, 1.0 - cut)
            total += macs * kept
        return total

    def _consumers(self, model: ir.Model, plans: list[_Plan], fit) -> dict[str, select.Consumer]:
        """The layers reading pruned channels through a plain float weight, with their Gram matrices."""
        wanted: dict[str, gs.Node] = {}
        self.features: dict[int, list[tuple[str, list[np.ndarray]]]] = {}
        for plan in plans:
            entries = []
            for s in plan.group.slices:
                for node, index in self.readers.get(s.constant, ()):
                    feats = self._features(node, index, s)
                    if feats is not None:
                        wanted[node.name] = node
                        entries.append((node.name, feats))
            self.features[plan.group.id] = entries
        if not wanted:
            return {}
        probed = model.copy()
        compute_in_float32(probed)  # the probe's im2col and float64 sums need float32 layers
        proto = self.original_fp32 = probed.to_proto()
        self.fit_batches = runtime.feeds_of(model, fit)
        self.work_nodes = {n.name: n for n in model.graph.nodes}
        grams = capture.grams(proto, sorted(wanted), self.fit_batches, threads=self.ctx.threads,
                              progress=lambda it, **kw: self.ctx.progress_bar(it, desc="prune: capturing XᵀX"))
        found = {}
        for name, gram in grams.items():
            node = wanted[name]
            layer = capture.layer_matrix(node, np.asarray(self.holders[node.inputs[1].name].values, np.float64))
            if layer is None:  # (a layout with no Gram: nothing to reconstruct on)
                continue
            matrix = layer[0]
            found[name] = select.Consumer(name, matrix, gram, _bias_ok(node, matrix.shape[0]), self.o.ridge)
        return found

    def _features(self, node: gs.Node, index: int, s: channels.Slice) -> list[np.ndarray] | None:
        """The Gram features each channel of slice `s` feeds in `node`, when `node` consumes them
        through its own plain float weight (ungrouped Conv, 2-D Gemm / MatMul)."""
        if index != 1 or node.op not in ("Conv", "Gemm", "MatMul") or node.inputs[1].name != s.constant:
            return None
        value = np.asarray(self.holders[s.constant].values)
        if value.dtype.kind != "f" or len(self.readers.get(s.constant, ())) != 1:
            return None  # a shared weight would be recovered for one reader only
        lay = layout.of(node, value.ndim)
        if lay is None or lay.in_axis != s.axis or lay.groups != 1 or lay.transposed:
            return None
        if node.op == "Conv":
            k = int(np.prod(value.shape[2:], dtype=np.int64))
            return [(i[:, None] * k + np.arange(k)[None, :]).reshape(-1) for i in s.indices]
        if value.ndim != 2:
            return None
        return [np.asarray(i) for i in s.indices]

    def _order(self, plan: _Plan) -> None:
        g = plan.group
        steps = max(plan.allowed(self.o.max_layer_cut))
        consumers = [(self.consumers[name], feats) for name, feats in self.features.get(g.id, ())
                     if name in self.consumers]
        method = self.method
        if method in ("reconstruction", "activation") and not consumers:
            method = "l2"  # no layer to measure on: weight magnitude
        if method == "bn-scale" and not self._bn_scale(g).size:
            method = "l2"
        plan.method = method
        if method == "reconstruction":
            with np.errstate(divide="ignore", invalid="ignore"):
                plan.order, plan.cost = select.reconstruction_order(consumers, g.channels, steps)
            plan.local = plan.cost  # (what max_step_cost bounds, whichever curve then allocates)
            plan.importance = None
            return
        if method == "activation":
            importance = sum(c.wanda(f) for c, f in consumers)
            plan.importance = importance
            plan.order = np.argsort(importance, kind="stable")[:steps]
            plan.cost = np.cumsum(importance[plan.order])
            return
        importance = self._bn_scale(g) if method == "bn-scale" else self._magnitude(g, 1 if method == "l1" else 2)
        plan.importance = importance
        plan.order, plan.cost = select.magnitude_order(importance, steps)

    def _producers(self, g: channels.Group) -> list[tuple[np.ndarray, channels.Slice]]:
        """(weight, slice) of the layers that make the group's channels (output-axis slices)."""
        found = []
        for s in g.slices:
            for node, index in self.readers.get(s.constant, ()):
                if index != 1 or node.op not in _MAC_OPS:
                    continue
                value = np.asarray(self.holders[s.constant].values, np.float64)
                lay = layout.of(node, value.ndim)
                if lay is not None and lay.out_axis == s.axis and lay.groups == 1:
                    found.append((value, s))
        return found

    def _magnitude(self, g: channels.Group, p: int) -> np.ndarray:
        total = np.zeros(g.channels)
        for value, s in self._producers(g):
            moved = np.moveaxis(value, s.axis, 0)
            norms = np.array([np.linalg.norm(moved[i].ravel(), ord=p) for i in s.indices])
            total += norms / max(float(norms.mean()), 1e-30)  # each layer counts alike
        return total

    def _bn_scale(self, g: channels.Group) -> np.ndarray:
        for s in g.slices:
            if ("BatchNormalization", 1) in g.roles.get(s.constant, ()):
                value = np.abs(np.asarray(self.holders[s.constant].values, np.float64))
                return np.array([value[i].sum() for i in s.indices])
        return np.zeros(0)

    def _sensitivity(self, model: ir.Model, plans: list[_Plan], samples) -> None:
        """Replace each group's cost curve by the output error measured when that group alone is
        cut (with least-squares compensation), at up to SENSITIVITY_POINTS of its allowed widths,
        on SENSITIVITY_SAMPLES held-out samples: relative noise energy over every output (class
        probabilities as logits), linear in between. Local reconstruction error says little about
        how much of it reaches the outputs (PP-OCR cls at a 30% cut: 0.69/0.67 -> 0.85/0.80 agreement,
        but SqueezeNet 0.50/0.46 -> 0.41/0.42); one point scaled by the local curve's shape cut
        SqueezeNet's last layer by 75% (0.32/0.27)."""
        batches = runtime.feeds_of(model, samples.take(min(SENSITIVITY_SAMPLES, len(samples))))
        scores = verify.score_outputs(model)
        reference = runtime.outputs(model.to_proto(), batches, threads=self.ctx.threads)
        points = {}
        for plan in plans:
            allowed = [k for k in plan.allowed(self.o.max_layer_cut) if k <= len(plan.order)]
            pick = np.unique(np.linspace(0, len(allowed) - 1, min(SENSITIVITY_POINTS, len(allowed))).round())
            points[plan.group.id] = [allowed[int(i)] for i in pick]
        bar = self.ctx.progress_bar(total=sum(len(v) for v in points.values()), desc="prune: sensitivity of each group")
        try:
            for plan in plans:
                measured = [0.0]
                for k in points[plan.group.id]:
                    candidate = self._build(model, [plan], {plan.group.id: plan.order[:k]}, refit_=False)
                    out = runtime.outputs(candidate.to_proto(), batches, threads=self.ctx.threads)
                    measured.append(_relative_noise(reference, out, scores, per_field=False))
                    bar.update(1)
                ks = [0] + points[plan.group.id]
                curve = np.interp(np.arange(1, len(plan.order) + 1), ks, np.maximum.accumulate(measured))
                plan.sensitivity = float(measured[-1])
                plan.cost = curve
        finally:
            bar.close()

    def _choose_costs(self, plans, costs, setting, reference, scores):
        """sensitivity=auto: at the first budget measured, build the cut each cost curve allocates
        and keep for the whole run the one whose outputs are nearer the original's on the held-out
        samples (relative noise energy, class probabilities as logits). Neither wins everywhere
        (30% cut: measured costs PP-OCR cls 0.85/0.80 vs 0.69/0.67, SqueezeNet 0.41/0.42 vs 0.50/0.46)."""
        noise, built = {}, {}
        for kind, cost in costs.items():
            for plan in plans:
                plan.cost = cost[plan.group.id]
            built[kind] = self._iterate(self.work_model, plans, setting, kind == "measured", steps=1)
            out = runtime.outputs(built[kind][0].to_proto(), self.held_batches, threads=self.ctx.threads)
            noise[kind] = _relative_noise(reference, out, scores)
        best = min(noise, key=lambda k: (noise[k], k))
        for plan in plans:
            plan.cost = costs[best][plan.group.id]
        self.allocation = {"chosen": best, "setting": list(setting),
                           "held_out_relative_noise": {k: round(v, 6) for k, v in noise.items()}}
        costs.clear()
        costs[best] = {p.group.id: p.cost for p in plans}
        if self.o.steps > 1:  # (the two curves are compared in one shot: iterating both took twice as long)
            return self._iterate(self.work_model, plans, setting, best == "measured")
        return built[best]

    # -- budget ------------------------------------------------------------------------------

    def _latency_cut(self, model: ir.Model, plans: list[_Plan], data) -> float:
        """The MAC cut for `latency`: every cut of LATENCY_CUTS is built (the surgery only: weights
        do not change the time) and timed with the model in interleaved rounds (1 thread, round
        medians); the weakest cut whose median ratio is within the budget wins, else the strongest.
        The choice is a function of the measured table alone (in the report): the same
        measurements give the same model; timings on a busy machine can differ between runs."""
        cuts = list(LATENCY_CUTS)
        structures = []
        for cut in cuts:
            removed = self._allocate(plans, ("macs", cut))
            cuts_ = [(p.group, sorted(removed[p.group.id].tolist())) for p in plans if len(removed.get(p.group.id, ()))]
            candidate = model.copy()
            channels.remove_channels(candidate.graph, cuts_)
            structures.append(candidate.to_proto())
        feeds = stats.sample_feeds(model, data.take(1) if data is not None else None, seed=self.ctx.seed)
        timed = stats.measure_latency([model.to_proto()] + structures, [feeds] * (len(cuts) + 1), runs=LATENCY_RUNS,
                                      threads=1, rounds=LATENCY_ROUNDS)
        base = timed[0][0]
        table = [(cut, (ms / base) if ms and base else None) for cut, (ms, _) in zip(cuts, timed[1:])]
        self.latency_table = {"model_ms": round(base, 4) if base else None,
                              "cuts": [{"macs_removed": c, "latency_ratio": round(r, 4) if r else None} for c, r in table]}
        within = [c for c, r in table if r is not None and r <= self.o.latency]
        if not within:
            self.notes.append(f"no MAC cut up to {cuts[-1]:.0%} reached latency {self.o.latency} (measured: "
                              + ", ".join(f"{c:.0%}: {r:.3f}" for c, r in table if r) + ")")
        return within[0] if within else cuts[-1]

    def _allocate(self, plans: list[_Plan], setting, start: dict[int, int] | None = None,
                  limit: dict[int, int] | None = None) -> dict[int, np.ndarray]:
        """Channels to remove per group for `setting`; `start`: counts already removed (each group
        keeps at least those, its order's prefix), `limit`: the most each group may lose."""
        kind, amount = setting
        if kind == "ratio":
            removed = {}
            for plan in plans:
                most = int(amount * plan.group.channels + 1e-9)
                allowed = [k for k in plan.allowed(self.o.max_layer_cut) if k <= most]
                removed[plan.group.id] = plan.order[:max(allowed)] if allowed else plan.order[:0]
            return removed
        # The cut shared by cost per MAC saved may land short of the target (a layer between two
        # pruned groups saves less than both count): aim higher until the real MACs reach it.
        for bound in dict.fromkeys((self.o.max_step_cost or math.inf, math.inf)):  # (bounded first)
            aim, removed = amount, {}
            for _ in range(6):
                removed = self._share(plans, aim, start or {}, limit, bound)
                reached = 1 - self._macs_of(plans, removed) / self.macs_before
                if reached >= amount - 0.005 or aim >= 0.95:
                    break
                aim = min(0.95, aim + (amount - reached))
            if reached >= amount - 0.005:
                break
        return removed

    def _share(self, plans: list[_Plan], cut: float, start: dict[int, int],
               limit: dict[int, int] | None = None, bound: float = math.inf) -> dict[int, np.ndarray]:
        """Remove channels in aligned steps, the cheapest loss per MAC saved first, until `cut` of
        the MACs would be saved, from the `start` counts on."""
        target = cut * self.macs_before
        taken = {p.group.id: start.get(p.group.id, 0) for p in plans}
        heap = []

        def push(plan: _Plan, done: int) -> None:
            for k in plan.allowed(self.o.max_layer_cut):
                if k > done and k <= len(plan.order) and (limit is None or k <= limit.get(plan.group.id, 0)):
                    if plan.local is not None and k > start.get(plan.group.id, 0) and plan.local[k - 1] > bound:
                        return  # (a cut its consumers cannot compensate: only if the budget needs it)
                    before = plan.cost[done - 1] if done else 0.0
                    ratio = (plan.cost[k - 1] - before) / ((k - done) * plan.macs)
                    heapq.heappush(heap, (float(ratio), plan.group.id, k, done))
                    return

        by_id = {p.group.id: p for p in plans}
        for plan in plans:
            push(plan, taken[plan.group.id])
        saved = sum(taken[p.group.id] * p.macs for p in plans)
        while heap and saved < target:
            _, gid, k, done = heapq.heappop(heap)
            plan = by_id[gid]
            step = (k - done) * plan.macs
            if saved + step - target > target - saved and saved > 0:
                break  # an aligned step of a wide layer would overshoot more than stopping short
            saved += step
            taken[gid] = k
            push(plan, k)
        return {gid: by_id[gid].order[:k] for gid, k in taken.items()}

    # -- the iterative loop ------------------------------------------------------------------

    def _iterate(self, model: ir.Model, plans: list[_Plan], setting, measured: bool = False,
                 steps: int | None = None):
        """Prune, recover, re-capture, in `steps` equal MAC steps towards `setting`: after each step
        the pruned and refitted model's inputs to every consumer are captured (XᵀX, and XᵀY against
        the original model's outputs: errors are measured from the original, so they do not
        accumulate) and each group's next channels are chosen on them (`_reselect`). Every model is
        built from the original with the channels removed so far (exact surgery, then the same
        least squares and refit), so the last one is dense and deterministic. The plans' orders and
        costs are restored afterwards. Returns (model, removed)."""
        kind, amount = setting
        steps = (steps or self.o.steps) if kind == "macs" and self.consumers and self.o.recover else 1
        saved = {p.group.id: (p.order, p.cost) for p in plans}
        removed: dict[int, np.ndarray] = {}
        # Each group loses at most what the one-shot allocation takes from it: the steps change
        # which channels go, not how many (aligned steps taken early and kept made the CIFAR-10
        # CNN's 30% cut remove 40% of its MACs).
        limit = {gid: len(v) for gid, v in self._allocate(plans, setting).items()} if steps > 1 else None
        try:
            for step in range(1, steps + 1):
                if step > 1:
                    self._reselect(candidate, plans, removed, measured)
                start = {gid: len(v) for gid, v in removed.items()}
                removed = self._allocate(plans, (kind, amount * step / steps), start, limit)
                # (every step refitted: with least squares alone before the last, SqueezeNet at a
                # 30% cut measured 0.54/0.46 instead of 0.57/0.50, both without the limit)
                candidate = self._build(model, plans, removed)
        finally:
            for p in plans:
                p.order, p.cost = saved[p.group.id]
        return candidate, removed

    def _reselect(self, candidate: ir.Model, plans: list[_Plan], removed: dict[int, np.ndarray],
                  measured: bool) -> None:
        """Choose each group's remaining channels on the pruned model: every consumer's Gram on
        the candidate's inputs (kept features) and its least-squares optimum against the original
        model's outputs, then the same greedy reconstruction as the first choice (ThiNet / He et
        al. 2017: the error is what the refit cannot recover). The order keeps the removed prefix;
        for reconstruction costs, the curve past it is the prefix's cost plus the new errors
        (measured sensitivity curves, by channel count, stay)."""
        cuts = [(p.group, sorted(removed[p.group.id].tolist())) for p in plans if len(removed.get(p.group.id, ()))]
        if not cuts:
            return
        spaces, _ = channels._merged(cuts)
        gone: dict[str, set[int]] = {}  # per consumer, the Gram features removed so far
        for plan in plans:
            for name, feats in self.features.get(plan.group.id, ()):
                chosen = removed.get(plan.group.id)
                gone.setdefault(name, set()).update(
                    int(f) for c in (chosen if chosen is not None else ()) for f in feats[c])
        names = [n for n in gone if n in self.consumers]
        layers = {name: _captured_output(self.work_nodes[name], spaces) for name in names}
        probed = candidate.copy()
        compute_in_float32(probed)
        grams, _ = refit.refit(refit.paired(probed.to_proto(), self.original_fp32), layers, self.fit_batches,
                               threads=self.ctx.threads,
                               progress=lambda it, **kw: self.ctx.progress_bar(it, desc="prune: re-capturing XᵀX"))
        nodes = {n.name: n for n in candidate.graph.nodes}
        holders = channels._constant_holders(candidate.graph)
        renewed: dict[str, tuple[select.Consumer, np.ndarray]] = {}
        for name, (xtx, xty, rows) in grams.items():
            f = self.consumers[name].matrix.shape[1]
            kept = np.setdiff1d(np.arange(f), sorted(gone[name]))
            if xtx.shape[0] - 1 != kept.size:
                continue  # (features cut some other way: keep the first choice)
            matrix = self._refit_solution(nodes[name], holders, xtx, xty, rows)[0]  # (a Gemm's alpha: scales cancel)
            gram = capture.Gram(xtx=xtx[:-1, :-1], sums=xtx[:-1, -1], rows=rows)
            position = np.full(f, -1)
            position[kept] = np.arange(kept.size)
            bias = _bias_ok(self.work_nodes[name], self.consumers[name].matrix.shape[0])
            renewed[name] = (select.Consumer(name, matrix, gram, bias, self.o.ridge), position)
        for plan in plans:
            done = len(removed.get(plan.group.id, ()))
            entries = [(name, feats) for name, feats in self.features.get(plan.group.id, ()) if name in renewed]
            if plan.method != "reconstruction" or len(entries) != len(self.features.get(plan.group.id, ())) \
                    or not entries:
                continue
            alive = np.setdiff1d(np.arange(plan.group.channels), removed.get(plan.group.id, np.zeros(0, np.int64)))
            steps = min(max(plan.allowed(self.o.max_layer_cut)), len(plan.order)) - done
            if steps <= 0:
                continue
            consumers = [(renewed[name][0], [renewed[name][1][feats[c]] for c in alive]) for name, feats in entries]
            if any((f < 0).any() for _, fs in consumers for f in fs):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                order, cost = select.reconstruction_order(consumers, alive.size, steps)
            plan.order = np.concatenate([plan.order[:done], alive[order]])
            if not measured:
                base = plan.cost[done - 1] if done else 0.0
                plan.cost = np.concatenate([plan.cost[:done], base + cost])

    # -- surgery -----------------------------------------------------------------------------

    def _build(self, model: ir.Model, plans: list[_Plan], removed: dict[int, np.ndarray],
               refit_: bool = True) -> ir.Model:
        candidate = model.copy()
        holders = channels._constant_holders(candidate.graph)
        nodes = {n.name: n for n in candidate.graph.nodes}
        cuts = [(p.group, sorted(removed[p.group.id].tolist())) for p in plans if len(removed.get(p.group.id, ()))]
        if self.o.recover:
            if self.consumers:
                self._least_squares(candidate, holders, nodes, plans, removed)
            else:
                self._merge(holders, plans, removed)
        channels.remove_channels(candidate.graph, cuts)
        if refit_ and self.o.recover and self.o.refit and self.consumers and cuts:
            self._refit(candidate, holders, {n.name: n for n in candidate.graph.nodes}, cuts)
        return candidate

    def _refit(self, candidate: ir.Model, holders, nodes, cuts) -> None:
        """Fit every recovered layer again on the pruned model's inputs (refit.py), in
        `refit_stages` passes in graph order: a layer's inputs are those of the layers before it
        already refitted (fitting all at once fits each layer to inputs that then change; on the
        PP-OCR classifier at a 30% cut that gave an output SQNR of -0.6 dB, 5.1 without the refit,
        6.8 in sequence). With
        `bias_correction`, every other Conv / Gemm after the first cut gets its bias moved so that
        each kept output channel's mean is the original's, in the same passes."""
        spaces, _ = channels._merged(cuts)
        order = [n.name for n in candidate.graph.nodes]
        first = min((order.index(n) for n in self.recovered if n in order), default=len(order))
        layers, means = {}, {}
        fitted = set(self.recovered)
        if self.o.refit_downstream:
            fitted |= {n for n in _downstream(candidate.graph, self.recovered)
                       if _refittable(nodes[n], holders, self.readers)}
        for name in order[first:]:
            node = self.work_nodes.get(name)
            if node is None or node.op not in ("Conv", "Gemm", "MatMul") or not node.outputs[0].shape:
                continue
            if name not in fitted and not (self.o.bias_correction and _has_bias(nodes[name], holders)):
                continue
            (layers if name in fitted else means)[name] = _captured_output(node, spaces)
        names = [n for n in order if n in layers or n in means]
        if not names:
            return
        stages = max(1, min(self.o.refit_stages or len(names), len(names)))
        bounds = np.linspace(0, len(names), stages + 1).round().astype(int)
        bar = self.ctx.progress_bar(total=stages, desc="prune: refitting on pruned inputs")
        try:
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                part = names[lo:hi]
                probed = candidate.copy()
                compute_in_float32(probed)
                grams, found = refit.refit(refit.paired(probed.to_proto(), self.original_fp32),
                                           {n: layers[n] for n in part if n in layers}, self.fit_batches,
                                           threads=self.ctx.threads, means={n: means[n] for n in part if n in means})
                for name, (xtx, xty, rows) in grams.items():
                    self._solve_refit(nodes[name], holders, xtx, xty, rows)
                for name, (pruned, original) in found.items():
                    node = nodes[name]
                    if np.asarray(holders[node.inputs[2].name].values).size == pruned.size:
                        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
                        _add_bias(node, (original - pruned) / alpha, holders)  # (_add_bias: times alpha / beta)
                bar.update(1)
        finally:
            bar.close()

    def _solve_refit(self, node: gs.Node, holders, xtx, xty, rows) -> None:
        matrix, bias, back = self._refit_solution(node, holders, xtx, xty, rows)
        weight = holders[node.inputs[1].name]
        weight.values = back(matrix).astype(np.asarray(weight.values).dtype)
        if node.op != "MatMul":
            holder = holders[node.inputs[2].name]
            value = np.asarray(holder.values)
            holder.values = bias.reshape(value.shape).astype(value.dtype)

    def _refit_solution(self, node: gs.Node, holders, xtx, xty, rows):
        """The layer's ridge least-squares weights on its captured (XᵀX, XᵀY), pulled towards its
        current ones: (matrix, bias, how to put the matrix back in the weight's shape), in the
        stored units (a Gemm's alpha / beta divided out)."""
        has_bias = node.op != "MatMul"
        stored = np.asarray(holders[node.inputs[1].name].values)
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        prior, back = capture.layer_matrix(node, stored.astype(np.float64))
        prior = prior * alpha
        prior_bias = (np.asarray(holders[node.inputs[2].name].values, np.float64).reshape(-1) * beta
                      if has_bias else None)
        matrix, bias = refit.solve(xtx, xty, rows, self.o.ridge, prior, prior_bias)
        return matrix / alpha, bias / beta, back

    def _least_squares(self, candidate, holders, nodes, plans, removed) -> None:
        gone: dict[str, list[np.ndarray]] = {}
        for plan in plans:
            chosen = removed.get(plan.group.id)
            if chosen is None or not len(chosen):
                continue
            for name, feats in self.features.get(plan.group.id, ()):
                if name in self.consumers:
                    gone.setdefault(name, []).extend(feats[c] for c in chosen)
        self.recovered = set(gone)
        for name, parts in sorted(gone.items()):
            consumer = self.consumers[name]
            matrix, bias = select.compensate(consumer, np.concatenate(parts))
            node = nodes[name]
            weight = holders[node.inputs[1].name]
            stored = np.asarray(weight.values)
            weight.values = capture.layer_matrix(node, stored)[1](matrix).astype(stored.dtype)
            if consumer.sigma[-1, :-1].any() and np.any(bias):
                _add_bias(node, bias, holders)

    def _merge(self, holders, plans, removed) -> None:
        for plan in plans:
            chosen = removed.get(plan.group.id)
            producers = self._producers(plan.group)
            if chosen is None or not len(chosen) or len(producers) != 1 or len(producers[0][1].indices[0]) != 1:
                continue
            value, s = producers[0]
            rows = np.moveaxis(value, s.axis, 0).reshape(value.shape[s.axis], -1)[np.concatenate(s.indices)]
            bias = self._producer_bias(plan.group)
            if bias is not None:
                rows = np.concatenate([rows, bias[:, None]], axis=1)
            kept = np.setdiff1d(np.arange(plan.group.channels), chosen)
            for slice_ in plan.group.slices:
                for node, index in self.readers.get(slice_.constant, ()):
                    feats = self._features(node, index, slice_)
                    if feats is None:
                        continue
                    weight = holders[slice_.constant]
                    stored = np.asarray(weight.values)
                    layer = capture.layer_matrix(node, stored.astype(np.float64))
                    if layer is None:
                        continue
                    matrix, back = layer
                    merged = select.merge_columns(matrix, rows, np.asarray(chosen), kept, feats)
                    weight.values = back(merged).astype(stored.dtype)

    def _producer_bias(self, g: channels.Group) -> np.ndarray | None:
        for s in g.slices:
            for node, index in self.readers.get(s.constant, ()):
                if index == 2 and node.op in ("Conv", "Gemm"):
                    value = np.asarray(self.holders[s.constant].values, np.float64).reshape(-1)
                    return value[np.concatenate(s.indices)] if value.size >= g.channels else None
        return None

    # -- report ------------------------------------------------------------------------------

    def _row(self, plan: _Plan, removed_count: int) -> dict:
        row = {"group": plan.group.id, "channels": plan.group.channels, "kept": plan.group.channels - removed_count,
               "removed": removed_count, "multiple": plan.multiple,
               "weights": [s.constant for s in plan.group.slices[:4]],
               "decision": "skipped" if plan.skipped else ("cut" if removed_count else "kept")}
        if plan.skipped:
            row["why"] = plan.skipped
        if getattr(plan, "sensitivity", None) is not None:
            row["sensitivity"] = round(float(plan.sensitivity), 6)
        if plan.cost is not None and removed_count:
            row["cost"] = round(float(plan.cost[removed_count - 1]), 6)
            row["importance"] = getattr(plan, "method", "")
        return row

    def _result(self, model, found, fixed, plans, removed, search, budget) -> PassResult:
        rows = fixed + [self._row(p, len(removed.get(p.group.id, ()))) for p in plans]
        params_after = stats.count_params(model.graph)[0]
        macs_after = self._macs_of(plans, removed)
        best = search.best.measured
        cut = 1 - macs_after / self.macs_before
        recovery = ("least squares" if self.consumers else "neuron merging (data-free)") if self.o.recover else "none"
        if self.ctx.calibration is None:
            self.notes.append("no calibration data: data-free importance (weight magnitude) and neuron merging; "
                              "give --calib for calibrated selection and least-squares recovery")
        stats_ = {"groups": len(found), "prunable": sum(not p.skipped for p in plans),
                  "groups_cut": sum(bool(len(removed.get(p.group.id, ()))) for p in plans),
                  "channels_removed": int(sum(len(v) for v in removed.values())),
                  "macs_removed": round(cut, 4), "importance": self.method, "recovery": recovery}
        for metric in ("agreement", "sqnr_db"):
            if best.get(metric) is not None and math.isfinite(best[metric]):
                stats_[f"held_out_{metric}"] = round(float(best[metric]), 4)
        details = {"params": [self.params_before, params_after], "macs": [self.macs_before, macs_after],
                   "importance": self.method, "recovery": recovery,
                   "floor": budget.bounds(), "samples": getattr(self, "samples", {}),
                   "search": search.as_dict(), "groups": rows, "notes": self.notes}
        if self.latency_table:
            details["latency"] = self.latency_table
        if self.allocation:
            details["allocation"] = self.allocation
            stats_["allocation"] = self.allocation["chosen"]
        for note in self.notes:
            logger.warning("prune: %s", note)
        return PassResult(True, stats_, details)


# -- helpers ----------------------------------------------------------------------------------


def _multiple(channels_: int, align: int) -> int:
    """The width multiple for a group: the alignment, halved while the group is narrower than four
    times it (a 16-channel layer has no fast blocked kernel to keep, and steps of 16 would leave it
    all or nothing)."""
    m = max(1, align)
    while m > 1 and channels_ < 4 * m:
        m //= 2
    return m


def _logit_space(outputs: dict[str, np.ndarray], scores) -> dict[str, np.ndarray]:
    """Class probabilities (a score output whose rows are >= 0 and sum to 1) as centred log
    probabilities, i.e. logits: the error energy of probabilities is that of the top class alone
    (on SqueezeNet's 1000-way softmax, sensitivity measured on them made the 30% cut worse)."""
    found = {}
    for name, value in outputs.items():
        value = np.asarray(value, np.float64)
        if name in scores and value.ndim >= 2 and value.min() >= 0 and np.allclose(value.sum(axis=1), 1, atol=1e-2):
            value = np.log(np.maximum(value, 1e-12))
            value = value - value.mean(axis=1, keepdims=True)
        found[name] = value
    return found


def _relative_noise(reference: list[dict], outputs: list[dict], scores, per_field: bool = True) -> float:
    """Error energy over signal energy (class probabilities as logits). `per_field`: of every
    output field (`_fields`), averaged over the fields of every output, so that one field's scale
    cannot decide which of two cuts is nearer: YOLOX packs raw box coordinates beside 81 sigmoid
    scores in one output, and summed, the boxes' energy picked the cut with detection F1 0.27/0.09
    over the one with 0.63/0.32. Else summed over every output (what a group's sensitivity curve is
    measured in: averaged per field, YOLOX's 80 class fields outweigh its 4 box fields, and the cut
    they allocate kept the scores but lost the boxes, F1 0.21/0.50)."""
    noise: dict[str, np.ndarray] = {}
    signal: dict[str, np.ndarray] = {}
    for r, c in zip(reference, outputs):
        r, c = _logit_space(r, scores), _logit_space(c, scores)
        for n in r:
            a, b = _fields(r[n], n in scores or not per_field), _fields(c[n], n in scores or not per_field)
            noise[n] = noise.get(n, 0.0) + ((a - b) ** 2).sum(axis=0)
            signal[n] = signal.get(n, 0.0) + (a ** 2).sum(axis=0)
    if not per_field:
        return float(sum(v.sum() for v in noise.values()) / max(sum(v.sum() for v in signal.values()), 1e-30))
    ratios = [noise[n] / np.maximum(signal[n], 1e-30) for n in noise]
    return float(np.mean(np.concatenate(ratios))) if ratios else 0.0


def _fields(value: np.ndarray, scores: bool) -> np.ndarray:
    """An output as (values, fields): class scores and outputs of rank < 3 are one field; else the
    fields are its shortest axis after the batch (YOLOX's 85 box / score fields per anchor,
    DeepLab's 21 class maps, an NCHW map's channels)."""
    value = np.asarray(value, np.float64)
    if scores or value.ndim < 3:
        return value.reshape(-1, 1)
    sizes = value.shape[1:]
    axis = 1 + max(i for i, size in enumerate(sizes) if size == min(sizes))  # (the last of equal lengths)
    return np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])


def _zero_biases(graph: gs.Graph) -> None:
    """A zero bias on every Conv and Gemm without one, so that recovery can move means into it and
    the channel groups cut it with the layer's outputs."""
    namer = ir.Namer(graph)
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2 or (len(node.inputs) > 2 and node.inputs[2].name):
            continue
        weight = ir.constant_value(node.inputs[1])
        if weight is None or weight.dtype.kind != "f" or not node.outputs[0].shape:
            continue
        if node.op == "Conv":
            count = layout.of(node, weight.ndim).output_channels(weight.shape)
        else:
            count = weight.shape[0] if int(node.attrs.get("transB", 0)) else weight.shape[-1]
        bias = ir.const(namer(f"{node.name}_bias"), np.zeros(count, weight.dtype))
        if len(node.inputs) == 2:
            node.inputs.append(bias)
        else:
            node.inputs[2] = bias


def _readers(graph: gs.Graph) -> dict[str, list[tuple[gs.Node, int]]]:
    """(node, input index) reading each tensor name."""
    found: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in graph.nodes:
        for index, t in enumerate(node.inputs):
            if t is not None and t.name:
                found.setdefault(t.name, []).append((node, index))
    return found


def _name_nodes(graph: gs.Graph) -> None:
    """Unique node names: consumers are found by name in the capture probe and in copies."""
    namer = ir.Namer(graph)
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = namer(f"{node.op}_prune")
        seen.add(node.name)


def _captured_output(node: gs.Node, spaces) -> tuple[str, np.ndarray | None, int, int]:
    """What refit.refit captures of a Conv / Gemm / MatMul of the working model: (its output's
    name, the output channels the cuts keep (None: all), the channel axis, the rank)."""
    out = node.outputs[0]
    rank = len(out.shape)
    axis = 1 if node.op in ("Conv", "Gemm") else rank - 1
    gone = spaces.get((out.name, axis))
    return out.name, None if not gone else np.setdiff1d(np.arange(out.shape[axis]), sorted(gone)), axis, rank


def _downstream(graph: gs.Graph, sources: set[str]) -> list[str]:
    """Names of the nodes reading, directly or not, an output of the nodes named `sources`
    (the graph is in topological order)."""
    changed: set[str] = set()
    found = []
    for node in graph.nodes:
        if node.name in sources:
            changed.update(t.name for t in node.outputs)
        elif any(t is not None and t.name in changed for t in node.inputs):
            changed.update(t.name for t in node.outputs)
            found.append(node.name)
    return found


def _refittable(node: gs.Node, holders, readers) -> bool:
    """Whether the refit can fit this layer: a plain float weight that only it reads, in a layout
    with a Gram (ungrouped Conv, Gemm without transA, 2-D MatMul), and a bias holder on a Conv / Gemm."""
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return False
    holder = holders.get(node.inputs[1].name)
    value = None if holder is None else np.asarray(holder.values)
    if value is None or value.dtype.kind != "f" or len(readers.get(node.inputs[1].name, ())) != 1:
        return False  # (a shared weight would be fitted for one reader only)
    if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
        return False
    if capture.layer_matrix(node, value) is None:
        return False
    return node.op == "MatMul" or _has_bias(node, holders)


def _bias_ok(node: gs.Node, outputs: int) -> bool:
    """Whether a per-output bias can take the mean of removed channels (Conv; Gemm with a 1-D or
    (1, N) C or none)."""
    if node.op == "Conv":
        return True
    if node.op != "Gemm":
        return False
    if len(node.inputs) < 3 or node.inputs[2] is None or not node.inputs[2].name:
        return True
    value = ir.constant_value(node.inputs[2])
    return value is not None and value.size == outputs and value.ndim <= 2 and value.shape[-1] == outputs


def _has_bias(node: gs.Node, holders) -> bool:
    """Whether the layer has a float bias holder that `_add_bias` can move."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    holder = holders.get(node.inputs[2].name)
    return holder is not None and np.asarray(holder.values).dtype.kind == "f"


def _add_bias(node: gs.Node, delta: np.ndarray, holders) -> None:
    """Add `delta` to the layer's bias."""
    if node.op == "Gemm":
        delta = delta * float(node.attrs.get("alpha", 1.0)) / float(node.attrs.get("beta", 1.0))
    holder = holders.get(node.inputs[2].name) if len(node.inputs) > 2 and node.inputs[2].name else None
    if holder is None:  # (_zero_biases gave every Conv / Gemm one)
        return
    value = np.asarray(holder.values)
    holder.values = (value.astype(np.float64) + delta.reshape(value.shape)).astype(value.dtype)


__all__ = ["Prune"]
