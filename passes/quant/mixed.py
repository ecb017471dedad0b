"""Mixed precision of `quant` by measured sensitivity, under an accuracy and a latency budget.

When the quantized model's worst output SQNR on the held-out calibration samples is below
`mixed_sqnr`, the tensors whose own quantization adds most output noise are kept out of 8 bits
(float with the nodes around them, or int16: `sensitive_type`), as long as the result stays
faster than `mixed_latency` x the float model's latency.

What each tensor costs is measured, not guessed from its own SQNR: one model holds every
activation's Q/DQ behind a gate (an If node on element g of a graph input), so one session
measures the output noise with each tensor alone quantized (on top of the integer weights).
Quantization noise of different tensors is nearly uncorrelated, so these contributions add up
to the full model's noise (PP-OCRv4 det: 5.3 dB predicted, 5.0 dB measured), and they are very
uneven: there, 10 of 257 tensors (the stem's high-resolution stage, whose noise the rest of the
network amplifies by ~20 dB) carry 89% of it, while their own SQNR looks like anyone else's.
"""

from __future__ import annotations

import heapq
import logging
import time

import numpy as np
import onnx
from onnx import helper

from edgegraph import ir, runtime
from edgegraph.errors import one_line
from edgegraph.passes.quant import numerics, speed
from edgegraph.passes.quant.placement import Plan
from edgegraph.passes.quant.state import QuantRun

logger = logging.getLogger(__name__)

GATES = "__quant_gates"
WEIGHT = "weights of "  # what a weight gate is called: WEIGHT + the node name
# Samples each tensor's contribution is measured on (the first held-out ones): as many as
# MIXED_MACS of forward passes allow, at least MIXED_SAMPLES, at most the held-out samples. Each
# measurement costs a forward pass per sample; the ranking of a heavy model settles on few
# (PP-OCRv4 det: 52 tensors kept float and the same held-out SQNR on 1 sample as on 2;
# YOLOX-nano: 27 of 32 the same, F1 0.895/0.886 on the held-out splits against 0.908/0.869,
# output SQNR 0.4-0.5 dB lower; PP-OCRv4 rec: nothing kept either way), while a classifier's
# noise sits in the few samples near a decision (PP-OCR cls on 2 samples: the contributions
# added up to 1/7 of the noise measured on 8, and the tensor that gained 2 dB was ranked
# 17th). With one sample, the two halves of a group run side by side: the heavy models'
# measurements take half the CPU time they took on 2 samples.
MIXED_SAMPLES = 1
MIXED_MACS = 1e9
# At most this share of the quantized nodes goes out of 8 bits (float sets), the costliest
# tensors first; a tensor carrying under MIN_SHARE of the measured noise is never worth it.
# PP-OCRv4 det (elementwise=float) needs the long tail: with 0.25 / 0.005 / 128 / 0.98 it found
# 20 candidates and reached 18.4/17.6 dB on the held-out splits, with 0.25 / 0.001 / 256 / 0.995
# 36 and 20.6/19.3 dB, with 0.4 as well 52 tensors and 23.4/23.8 dB (at 0.97x float latency).
MIXED_NODE_SHARE = 0.4
MIN_SHARE = 0.001
MAX_MEASUREMENTS = 256
# Group testing stops once single tensors carrying COVER of the measured noise are found (or at
# MAX_MEASUREMENTS): a share that does not depend on the target, so that neither does the
# ranking (stopping at the share the target needed gave PP-OCR cls a different ranking, and
# 8, 16, 8 tensors kept float, for targets of 19, 20 and 21 dB). PP-OCRv4 det needs it high:
# stopping at 80% found 8 tensors and 13.6 dB instead of 28 and 18.8 dB.
COVER = 0.995
SEGMENT_DEPTH = 2  # the measuring model is cut where group testing's first 2 levels of halving start groups
# Sizes tried (number of tensors protected, costliest first), at most MAX_TRIALS of them: on the
# ladder 1, 2, 4, ..., all candidates, from the size the contributions predict reaches the target
# (all candidates when none does) up while short of the target and gaining, down while the
# latency budget does not hold.
MAX_TRIALS = 4
# A trial holds the target when the BOUND_QUANTILE of its output SQNR over BOUND_ROUNDS bootstrap
# resamples of the held-out samples reaches it: those are few (8), and a trial that only just
# reached the target on them fell short elsewhere (PP-OCR cls: 3 tensors kept float gave 23.6 dB
# on its 16 held-out calibration samples, 21.0 dB on evaluation images).
BOUND_QUANTILE = 0.1
BOUND_ROUNDS = 200
GAIN_DB = 1.0  # protecting must gain this much (float / 16-bit layers cost speed)


def gated_model(proto: onnx.ModelProto, points: set[str],
                weights: dict[str, dict[int, np.ndarray | None]] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the quantized model where each activation Q/DQ of `points` and each integer
    weight of `weights` (node name -> {input index: float value}, the weight and its bias) is behind a gate (element i of
    the graph input GATES: 0 = float, 1 = quantized), and what each gate holds, in graph order
    (a weight as WEIGHT + node name).

    Each gate is an If node, so a gate that is off costs no Q/DQ, and every DequantizeLinear of a
    constant becomes its float value, so ORT prepacks the weights as in a float model: a gated
    layer is the If choosing between the layer with its integer weights (dequantized) and the
    layer with its float ones. (Arithmetic gates, t + g * (DQ(Q(t)) - t) with weights computed
    at run time, ran 4-5x slower than the float model on PP-OCRv4 det; this runs at 1.3-1.7x.)"""
    weights = weights or {}
    gated = onnx.ModelProto()
    gated.CopyFrom(proto)
    graph = gated.graph
    constants = {t.name: t for t in graph.initializer}
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants}
    dequantized = {n.output[0]: _dequantized(n, constants) for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    order: list[str] = []
    index: dict[str, int] = {}
    nodes: list[onnx.NodeProto] = [helper.make_node("Cast", [GATES], [GATES + "_on"], name=GATES + "_cast",
                                                    to=onnx.TensorProto.BOOL)]

    def gate(key: str) -> str:
        """The boolean scalar of `key`'s gate (made on first use)."""
        if key not in index:
            index[key] = i = len(order)
            order.append(key)
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(i, np.int64), f"__gate{i}_i"))
            nodes.append(helper.make_node("Gather", [GATES + "_on", f"__gate{i}_i"], [f"__gate{i}"],
                                          name=f"__gate{i}_gather", axis=0))
        return f"__gate{index[key]}"

    for node in graph.node:
        if node.output[0] in dequantized:
            continue  # (a float constant now)
        q = quantizers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        point = None if q is None else q.input[0] if q.input[0] in points else node.output[0] \
            if node.output[0] in points else None
        if point is not None:
            out = node.output[0]
            on = _branch("on", [_renamed(q, out + "__q"), _renamed(node, out + "__on", {0: out + "__q"})])
            off = _branch("off", [helper.make_node("Identity", [q.input[0]], [out + "__off"])])
            nodes.append(helper.make_node("If", [gate(point)], [out], name=f"{node.name}__gate", then_branch=on,
                                          else_branch=off))
        elif node.name in weights and len(node.input) > 1 and node.input[1] in dequantized:
            # The bias with its weight: a corrected int32 bias belongs to the integer weight.
            floats = {slot: value for slot, value in weights[node.name].items()
                      if value is not None and slot < len(node.input) and node.input[slot]}
            integer = {slot: dequantized[node.input[slot]] for slot in floats if node.input[slot] in dequantized}
            key = WEIGHT + node.name
            branches = [_layer(node, label, values) for label, values in (("on", integer), ("off", floats))]
            nodes.append(helper.make_node("If", [gate(key)], list(node.output), name=f"{node.name}__gate",
                                          then_branch=branches[0], else_branch=branches[1]))
        else:
            nodes.append(node)
    used = {name for n in nodes for name in _outer_reads(n)} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "QuantizeLinear" or n.output[0] in used)
    graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in dequantized.items())
    graph.input.append(helper.make_tensor_value_info(GATES, onnx.TensorProto.FLOAT, [len(order)]))
    del graph.value_info[:]  # (the gated tensors' producers changed: let ORT infer again)
    return gated, order


def _dequantized(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The float value of DequantizeLinear(constant) (numerics.dequantize: ORT's arithmetic)."""
    read = [onnx.numpy_helper.to_array(constants[name]) if name else None for name in node.input]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    zero = read[2] if len(read) > 2 and read[2] is not None else 0
    axis = attrs.get("axis", 1) if np.ndim(read[1]) > 0 else None
    return numerics.dequantize(read[0], read[1], zero, axis=axis, block_size=attrs.get("block_size") or None)


def _renamed(node: onnx.NodeProto, output: str, inputs: dict[int, str] | None = None) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name}__{output}"
    for slot, name in (inputs or {}).items():
        copy.input[slot] = name
    copy.output[0] = output
    return copy


def _branch(label: str, nodes: list[onnx.NodeProto], initializers=()) -> onnx.GraphProto:
    """An If branch: `nodes`, returning the last one's outputs."""
    results = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in nodes[-1].output]
    return helper.make_graph(nodes, label, [], results, initializer=list(initializers))


def _layer(node: onnx.NodeProto, label: str, values: dict[int, np.ndarray]) -> onnx.GraphProto:
    """An If branch running `node` with the given constant inputs (slot -> value)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name}__{label}"
    initializers = []
    for slot, value in values.items():
        initializers.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), f"{copy.name}_{slot}"))
        copy.input[slot] = initializers[-1].name
    del copy.output[:]
    copy.output.extend(f"{o}__{label}" for o in node.output)
    return _branch(label, [copy], initializers)


def contributions(run: QuantRun, quant: ir.Model, built, plan: Plan) -> Ranking:
    """The quantized activations and integer weights ranked by the relative output noise each
    adds on its own (noise relative to each output's energy, the worst output counted; on
    MIXED_SAMPLES held-out samples), measured as far as the ranking is read (`Ranking`).
    Close it when done: it holds the measuring sessions."""
    batches, reference = _measuring_batches(run)
    float_nodes = {n.name: n for n in ir.from_proto(run.float_proto, infer=False).graph.nodes}
    biases = {b.node.name for b in built.biases}
    weights = {w.node.name: {1: w.float_value, 2: _bias(float_nodes.get(w.node.name)) if w.node.name in biases else None}
               for w in built.weights if w.index == 1}
    proto, order = gated_model(quant.to_proto(), {p.name for p in plan.points}, weights)
    measure = _Segments(proto, order, batches, run.ctx.threads)
    names = measure.outputs
    energy = {n: sum(float(np.sum(np.square(r[n], dtype=np.float64))) for r in reference) for n in names}

    def noise(groups: list[list[int]]) -> list[float]:
        settings = []
        for members in groups:
            settings.append(np.zeros(len(order), np.float32))
            settings[-1][members] = 1.0
        values = []
        for outputs in measure(settings):
            total = dict.fromkeys(names, 0.0)
            for got, ref in zip(outputs, reference):
                for n in names:
                    total[n] += float(np.sum(np.square(got[n].astype(np.float64) - ref[n], dtype=np.float64)))
            values.append(max(total[n] / energy[n] for n in names if energy[n] > 0))
        return values

    try:
        return Ranking(noise, order, close=measure.close)
    except BaseException:
        measure.close()
        raise


class Ranking:
    """The gates of `order` (tensor names) by the noise each adds alone (`noise(groups)`: for
    each list of gates, the output noise with those on; the two halves of a group are measured
    in one call, side by side), found by group testing, lazily: `next()` measures only until
    the next-costliest tensor is known.

    Few tensors carry most of the noise, and neighbours in graph order share it, so the
    noisiest group is halved first (both halves measured: inferring one as the group's noise
    minus the other's kept 10 of PP-OCRv4 det's 20 costliest tensors out of the ranking, as the
    noise of neighbours adds up only roughly), and a group below MIN_SHARE of all is not split
    (its members share its noise evenly): ~k log2(n) measurements for the k costliest tensors,
    at most MAX_MEASUREMENTS (the groups left then share theirs evenly too), and splitting stops
    once single tensors carrying COVER of the noise are known. A tensor is ranked once its
    value is at least every unsplit group's (a group's members add at most about its noise),
    so the ranking's first k are what a run that measured everything would rank first, in
    the same order: how far trials read it changes no tensor's place. Mixed precision reads
    it only as far as its trials go (YOLOX-nano: 8 tensors after 76 measurements, where
    measuring the whole ranking took 258)."""

    def __init__(self, noise, order: list[str], close=lambda: None):
        self.order, self._noise, self.close = order, noise, close
        self.weights_only, everything = noise([[], list(range(len(order)))])
        everything = max(everything - self.weights_only, 0.0)
        self.measured = 2
        self._everything = everything
        self._groups = [(-everything, 0, list(range(len(order))))]  # a heap: noisiest first, ties in graph order
        self._ready: list[tuple[float, str]] = []  # a heap of (-noise, name) of tensors whose noise is known
        self._single = 0.0  # the noise of the single tensors found
        self._known = 0.0  # the noise of the tensors in _ready or ranked
        self.values: dict[str, float] = {}  # ranked tensor -> its noise, in rank order

    @property
    def total(self) -> float:
        """All the noise measured so far: that of the tensors known and of the groups unsplit."""
        return self._known - sum(g[0] for g in self._groups)

    def next(self) -> tuple[str, float] | None:
        """The next-costliest tensor and its noise (None when all are ranked)."""
        while self._groups and (not self._ready or self._ready[0][0] > self._groups[0][0]):
            self._split()
        if not self._ready:
            return None
        value, name = heapq.heappop(self._ready)
        self.values[name] = -value
        return name, -value

    def _split(self) -> None:
        """Pop the noisiest group: halve it (measuring both halves), or share out its noise."""
        value, _, members = heapq.heappop(self._groups)
        value = -value
        if len(members) == 1:
            self._single += value
        known = self.total + value  # (all noise, with the popped group's)
        if len(members) == 1 or value < MIN_SHARE * self._everything or self.measured + 2 > MAX_MEASUREMENTS \
                or self._single >= COVER * known:
            for i in members:
                heapq.heappush(self._ready, (-value / len(members), self.order[i]))
            self._known += value
            return
        half = len(members) // 2
        parts = (members[:half], members[half:])
        for part, noise in zip(parts, self._noise(parts)):
            heapq.heappush(self._groups, (-max(noise - self.weights_only, 0.0), part[0], part))
        self.measured += 2


def _measuring_batches(run: QuantRun) -> tuple[list[dict], list[dict]]:
    """The first held-out batches holding the samples contributions are measured on (see
    MIXED_MACS), and the float model's outputs on them."""
    batches, reference = run.held_out()
    wanted = int(np.clip(MIXED_MACS // max(run.macs, 1), MIXED_SAMPLES, run.analysis_count))
    count = 0
    for taken, feeds in enumerate(batches, 1):
        count += runtime.batch_length(run.specs, feeds)
        if count >= wanted:
            break
    return batches[:taken], reference[:taken]


class _Segments:
    """The gated model's outputs on the measuring batches for a setting of the gates, run from
    the latest cut before the first gate that is on: what comes before it is what the model
    computes with every gate off, run once and cached. Group testing's groups are runs of
    gates in graph order, and the cuts are where its first SEGMENT_DEPTH levels of halving
    start them, so measurements of later groups skip the network before them (the values are
    the same as from the whole model, up to the float rounding of kernels ORT fuses across a
    cut; PP-OCRv4 det: 18% less CPU time). The batches and the settings of one call (the two
    halves of a group) run side by side (runtime.SideBySide):
    with other work on the 2-core development machine, det's measurements went from 9.4 s to
    3.8 s of CPU time (14-18 s to 7.7 s wall), with the same tensors chosen."""

    def __init__(self, proto: onnx.ModelProto, order: list[str], batches: list[dict], threads: int):
        graph = proto.graph
        self.outputs = [o.name for o in graph.output]
        self.batches = batches
        self.size = len(order)
        self.runner = runtime.SideBySide(2 * len(batches), threads)  # (two settings of the gates at a time)
        each = self.runner.session_threads
        position = {int(node.input[0][len("__gate"):]): i for i, node in enumerate(graph.node)
                    if node.op_type == "If" and node.input[0].startswith("__gate")}
        starts = sorted(j for j in _halving_starts(self.size, SEGMENT_DEPTH) if 0 < j and j in position)
        cuts = {j: _cut(graph, position[j]) for j in starts}
        exposed = sorted({name for _, crossing, early in cuts.values() for name in crossing + early})
        self.full = runtime.session(runtime.with_outputs(proto, exposed), threads=each, optimize=True)
        off = np.zeros(self.size, np.float32)
        self.cached = self.runner.map(lambda feeds: runtime.run(self.full, {**feeds, GATES: off}), batches)
        self.cuts = [(j, runtime.session(_segment(proto, kept, crossing, self.cached[0]), threads=each, optimize=True),
                      crossing, early) for j, (kept, crossing, early) in cuts.items()]

    def close(self) -> None:
        self.runner.close()

    def __call__(self, settings: list[np.ndarray]) -> list[list[dict]]:
        """The outputs on each measuring batch for each setting of the gates, all run side by side."""
        jobs = [(gates, i) for gates in settings for i in range(len(self.batches))]
        done = self.runner.map(lambda job: self._one(*job), jobs)
        count = len(self.batches)
        return [done[k:k + count] for k in range(0, len(done), count)]

    def _one(self, gates: np.ndarray, index: int) -> dict:
        feeds, cached = self.batches[index], self.cached[index]
        on = np.flatnonzero(gates)
        if not len(on):
            return {n: cached[n] for n in self.outputs}
        cut = next((c for c in reversed(self.cuts) if c[0] <= on[0]), None)
        if cut is None:
            return runtime.run(self.full, {**feeds, GATES: gates}, self.outputs)
        _, sess, crossing, early = cut
        wanted = {i.name for i in sess.get_inputs()}
        got = runtime.run(sess, {**{k: v for k, v in feeds.items() if k in wanted},
                                 **{n: cached[n] for n in crossing}, GATES: gates})
        return {n: got[n] if n in got else cached[n] for n in self.outputs}


def _halving_starts(size: int, depth: int) -> set[int]:
    """Where group testing's groups start in its first `depth` levels of halving [0, size)."""
    starts, level = {0}, [(0, size)]
    for _ in range(depth):
        level = [part for first, count in level if count > 1
                 for part in ((first, count // 2), (first + count // 2, count - count // 2))]
        starts |= {first for first, _ in level}
    return starts


def _cut(graph: onnx.GraphProto, start: int) -> tuple[list[onnx.NodeProto], list[str], list[str]]:
    """The gated graph's nodes from top-level node `start` on (with the gates' own nodes), the
    tensors they read from before the cut, and the graph outputs computed before it."""
    kept = [n for i, n in enumerate(graph.node) if i >= start or _is_gate_node(n)]
    produced = {o for n in kept for o in n.output}
    reads = set().union(*(_outer_reads(n) for n in kept)) - {""}
    outside = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    crossing = sorted(reads - produced - outside)
    return kept, crossing, [o.name for o in graph.output if o.name not in produced]


def _segment(proto: onnx.ModelProto, kept: list[onnx.NodeProto], crossing: list[str],
             values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model of the `kept` nodes (`_cut`), reading the `crossing` tensors (typed as in
    `values`) as graph inputs."""
    graph = proto.graph
    reads = set().union(*(_outer_reads(n) for n in kept))
    produced = {o for n in kept for o in n.output}
    inputs = [i for i in graph.input if i.name in reads or i.name == GATES]
    inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), None)
               for n in crossing]
    sub = helper.make_graph(kept, graph.name, inputs, [o for o in graph.output if o.name in produced],
                            initializer=[t for t in graph.initializer if t.name in reads])
    return helper.make_model(sub, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def _is_gate_node(node: onnx.NodeProto) -> bool:
    return node.output[0] == GATES + "_on" or node.output[0].startswith("__gate")


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads from its scope (its subgraphs' reads of the outer scope included)."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in attr.g.node for o in n.output} | {t.name for t in attr.g.initializer}
            names |= set().union(*(_outer_reads(n) for n in attr.g.node)) - inner
    return names


def protect(run: QuantRun, quant: ir.Model, built, plan: Plan):
    """(model, built, plan) with the costliest tensors kept out of 8 bits when the output SQNR is
    below run.o.mixed_sqnr and that gains GAIN_DB within the latency budget; else the input."""
    target = run.o.mixed_sqnr
    if run.o.mixed == "off" or not plan.points:
        return quant, built, plan
    sqnr = run.score(quant) if run.tuned_sqnr is None else run.tuned_sqnr
    if sqnr >= target:
        return quant, built, plan
    start = time.perf_counter()
    run.mixed_info = {}
    timing = run.ctx.timing and run.o.check_speed
    latency = speed.speed_check(run, quant, built, warn=False) if timing else {}
    if latency and latency["quantized_ms"] > run.o.mixed_latency * latency["float_ms"]:
        # Keeping tensors out of 8 bits adds float layers and Q/DQ around them: it does not make a
        # model that is already over the budget faster (PP-OCR cls, YOLOX: every trial was over).
        run.notes.append(f"mixed precision: not tried, the 8-bit model is already over {run.o.mixed_latency:g}x "
                         f"float latency ({latency['quantized_ms']} vs {latency['float_ms']} ms)")
        run.timings["mixed"] = time.perf_counter() - start
        return quant, built, plan
    ranking = contributions(run, quant, built, plan)
    candidates = _Candidates(run, ranking)
    try:
        return _trials(run, candidates, quant, built, plan, sqnr, timing)
    finally:
        ranking.close()
        run.mixed_info.update(measurements=ranking.measured, candidates_ranked=len(candidates.names))
        run.timings["mixed"] = time.perf_counter() - start


class _Candidates:
    """The tensors mixed precision may keep out of 8 bits, costliest first, read off a `Ranking`
    as far as asked: those carrying MIN_SHARE of the noise measured or more, not kept already
    (coarse), whose float sets together stay within MIXED_NODE_SHARE of the quantized nodes."""

    def __init__(self, run: QuantRun, ranking: Ranking):
        self.ranking = ranking
        self.names: list[str] = []
        self._coarse = run.coarse
        self._sets = _float_nodes(run)
        self._budget = MIXED_NODE_SHARE * len(run.base_plan.quantized)
        self._nodes: set[str] = set()
        self._done = False

    def first(self, count: int) -> list[str]:
        """The `count` costliest candidates (fewer when there are no more)."""
        while len(self.names) < count and not self._done:
            item = self.ranking.next()
            if item is None or item[1] <= 0 or item[1] < MIN_SHARE * self.ranking.total:
                self._done = True  # (the rest add less)
                break
            name, cost = item[0], self._sets.get(item[0], set())
            if name not in self._coarse and len(self._nodes | cost) <= self._budget:
                self.names.append(name)
                self._nodes |= cost
        return self.names[:count]

    def share(self, names: list[str]) -> float:
        """The share of the noise measured so far that `names` carry."""
        total = self.ranking.total
        return sum(self.ranking.values[n] for n in names) / total if total > 0 else 0.0


def _trials(run: QuantRun, candidates: _Candidates, quant: ir.Model, built, plan: Plan, sqnr: float, timing: bool):
    """`protect`'s trials: models with the first k candidates out of 8 bits, for k on a ladder."""
    target, ranking = run.o.mixed_sqnr, candidates.ranking
    run.mixed_info["before_db"] = round(sqnr, 2)
    # The prefix the contributions predict reaches the target: the noise the held-out samples
    # measured, less the share of it those tensors carry (the contributions were measured on
    # fewer samples: their shares count, not their values); all candidates when none does.
    need = 1 - 10 ** (-(target - sqnr) / 10)
    predicted = 0
    while len(candidates.first(predicted + 1)) > predicted:
        predicted += 1
        if candidates.share(candidates.names[:predicted]) >= need:
            break
    run.mixed_info["predicted_db"] = _db(ranking.total + ranking.weights_only)
    if not predicted:
        return quant, built, plan
    # Trials go up a fixed ladder of prefix sizes (1, 2, 4, ..., all candidates) from the one
    # the prediction rounds up to, and stop at the first whose bootstrap lower bound reaches the
    # target: the ladder and the ranking do not depend on the target (how far the ranking is
    # measured changes no tensor's place in it), so a higher target never keeps fewer tensors
    # out of 8 bits; the sizes the doubling and halving of one predicted size reached did
    # (PP-OCR cls: 3, 16 and 12 tensors for 20, 21 and 22 dB).
    step = (predicted - 1).bit_length()  # (the first rung 2 ** step >= predicted)
    best, tried, float_ms, k, direction = None, 0, None, 0, 0
    while step >= 0 and tried < MAX_TRIALS:
        kept = candidates.first(2 ** step)
        if step and len(kept) == len(candidates.first(2 ** (step - 1))):
            break  # (past the top rung: all candidates)
        k, tried = len(kept), tried + 1
        trial, trial_built, trial_plan = _build_kept(run, kept)
        try:
            score, bound = _score_and_bound(run, trial)
        except Exception as exc:  # noqa: BLE001 - e.g. ORT's QDQ rewrites adding Round to an opset-10 model
            run.notes.append(f"mixed precision: a trial with {k} tensors out of 8 bits does not run in "
                             f"onnxruntime ({one_line(exc)}); not used")
            break
        run.tuning[f"mixed_{k}"] = score
        if best is not None and score <= best[4]:
            break  # more tensors out of 8 bits gained nothing (the noise adds up only roughly): no more trials
        latency = speed.speed_check(run, trial, trial_built, warn=False) if timing else {}
        fits = not latency or latency["quantized_ms"] <= run.o.mixed_latency * latency["float_ms"]
        float_ms = latency.get("float_ms", float_ms)
        if fits and trial_plan.quantized and score >= sqnr + GAIN_DB:
            best = (trial, trial_built, trial_plan, kept, score, latency, bound)
        if not fits:  # over the latency budget: fewer tensors (and never more again)
            if direction > 0:
                break
            direction, step = -1, step - 1
        elif bound >= target or direction < 0:
            break
        else:
            direction, step = 1, step + 1
    if best is None:
        run.notes.append(f"mixed precision: keeping the {k} costliest tensors out of 8 bits did not gain "
                         f"{GAIN_DB:g} dB within {run.o.mixed_latency:g}x float latency"
                         + (f" ({float_ms} ms float)" if float_ms else ""))
        return quant, built, plan
    trial, trial_built, trial_plan, kept, score, latency, bound = best
    shares = {t: round(candidates.share([t]), 3) for t in kept}
    run.mixed = {t: share for t, share in shares.items() if not t.startswith(WEIGHT)}
    # Layers kept float for their weights stay so in later plans (fallback, speed check).
    run.excluded = run.excluded | {t[len(WEIGHT):] for t in kept if t.startswith(WEIGHT)}
    run.mixed_info["noise_share"] = shares
    run.mixed_info.update(after_db=round(score, 2), after_bound_db=round(bound, 2), tensors=len(kept),
                          **({"latency": latency} if latency else {}))
    run.notes.append(f"mixed precision: {len(kept)} tensors carrying {100 * candidates.share(kept):.0f}% "
                     f"of the measured activation noise kept {run.o.sensitive_type} "
                     f"(output SQNR {sqnr:.1f} -> {score:.1f} dB on held-out samples)")
    return trial, trial_built, trial_plan


def _score_and_bound(run: QuantRun, model: ir.Model) -> tuple[float, float]:
    """The worst output SQNR (dB) of `model` on the held-out samples, and its BOUND_QUANTILE
    over BOUND_ROUNDS bootstrap resamples of those samples (seeded: the same every run)."""
    signal, noise = run.sample_errors(model)
    picks = np.random.default_rng(0).integers(0, len(signal), (BOUND_ROUNDS, len(signal)))
    point = _worst_db(signal.sum(0), noise.sum(0))
    resampled = _worst_db(signal[picks].sum(1), noise[picks].sum(1))
    return float(point), float(np.quantile(resampled, BOUND_QUANTILE))


def _worst_db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The lowest SQNR (dB) over outputs (the last axis) from their energies (verify.sqnr_db's
    conventions: inf without noise, outputs without signal at -inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        db = np.where(noise > 0, 10 * np.log10(signal / np.where(noise > 0, noise, 1)), np.inf)
    db = np.where((noise > 0) & (signal <= 0), -np.inf, db)
    return db.min(axis=-1) if db.shape[-1] else np.full(db.shape[:-1], np.inf)


def _bias(node) -> np.ndarray | None:
    """The float bias (input 2) of a node of the float model, shaped as there."""
    if node is None or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    return ir.constant_value(node.inputs[2])


def _float_nodes(run: QuantRun) -> dict[str, set[str]]:
    """What keeping each gate's tensor in float costs: the nodes around an activation
    (tuning.float_sets), or the layer of a weight."""
    from edgegraph.passes.quant.tuning import float_sets

    sets = float_sets(run.base_plan)
    sets.update({WEIGHT + n.name: {n.name} for n in run.base_plan.quantized})
    return sets


def _build_kept(run: QuantRun, kept: list[str]):
    """`build` with the `kept` gates out of 8 bits: weights' layers in float, activations as
    tuning.build_protected keeps them (float or int16)."""
    from edgegraph.passes.quant.build import build
    from edgegraph.passes.quant.tuning import build_protected

    layers = {t[len(WEIGHT):] for t in kept if t.startswith(WEIGHT)}
    tensors = set(run.coarse) | {t for t in kept if not t.startswith(WEIGHT)}
    saved = run.excluded
    run.excluded = saved | layers
    try:
        if tensors:
            return build_protected(run, tensors)
        plan = run.plan(run.excluded)
        return (*build(run, plan), plan)
    finally:
        run.excluded = saved


def _db(relative_noise: float) -> float:
    return round(float(-10 * np.log10(relative_noise)), 2) if relative_noise > 0 else float("inf")


__all__ = ["Ranking", "contributions", "gated_model", "protect"]
