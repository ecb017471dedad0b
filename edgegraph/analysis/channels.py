"""Channel coupling groups: which channels of which tensors and weights must be removed together
for the graph to stay valid (the coupling step of structured pruning), and the surgery that
removes them.

The analysis is a union-find over single channels: an element is one index along one axis of a
tensor (a "space": tensor name + axis) or of a stored weight. Every node contributes links
between the spaces of its inputs, outputs and weights (element-wise ops pair equal indices,
Concat adds an offset, Flatten maps a channel to a block of features, a grouped Conv ties the
same position in every group, ...). Starting from the output channels of every weighted layer,
the links are followed; each connected set of elements is one removable channel, and channels
that touch the same spaces form one `Group` (a layer-level coupling group, as in Torch-Pruning).
A space that reaches something no rule covers (a graph output, a computed Reshape shape, an op
with no rule) makes every group touching it unprunable, with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.analysis import layout

Key = tuple  # ("t", tensor name, axis) | ("w", constant name, axis) | ("v", node name, what)
Pairs = Callable[[], tuple[np.ndarray, np.ndarray]]

# Ops applied entry by entry, with numpy broadcasting between their inputs.
BROADCAST = frozenset({
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Identity", "Dropout", "Cast", "Clip", "Not", "Gelu", "Mish", "ThresholdedRelu", "IsNaN",
    "IsInf", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@dataclass
class _Link:
    a: Key
    b: Key
    pairs: Pairs
    directed: bool = False  # followed from a to b only (a merge of several axes into one)


@dataclass
class _Rules:
    """What one node says about the spaces it touches."""

    links: list[_Link] = field(default_factory=list)
    blocks: list[tuple[Key, str]] = field(default_factory=list)
    merges: list[tuple[Key, list[Key]]] = field(default_factory=list)  # out space, the in spaces merged into it
    roles: list[tuple[str, str, int]] = field(default_factory=list)  # (constant, op, input index)


@dataclass
class Slice:
    """The entries of one stored constant that go with each channel of a group."""

    constant: str
    axis: int
    indices: list[np.ndarray]  # per channel of the group


@dataclass
class Group:
    """Channels that can only be removed together with their entries in every member.

    `members` are the activation spaces (tensor, axis) with the indices each channel covers,
    `slices` the weight entries to cut; `reasons` is empty when the group can be pruned.
    """

    id: int
    channels: int
    members: dict[tuple[str, int], list[np.ndarray]]
    slices: list[Slice]
    reasons: list[str]
    roles: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # constant -> (op, input index)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        """One line: size, the weights cut and why not when it cannot be cut."""
        cuts = ", ".join(f"{s.constant}[axis {s.axis}]" for s in self.slices[:4])
        if len(self.slices) > 4:
            cuts += f", ... ({len(self.slices)} weights)"
        state = "prunable" if self.prunable else "fixed: " + "; ".join(self.reasons[:3])
        return f"group {self.id}: {self.channels} channels over {len(self.members)} tensors; cuts {cuts or '-'}; {state}"


def _ident(n: int) -> Pairs:
    return lambda: (np.arange(n), np.arange(n))


def _shape(tensor: gs.Tensor) -> list | None:
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    return None if tensor.shape is None else list(tensor.shape)


def _dim(tensor: gs.Tensor, axis: int):
    shape = _shape(tensor)
    return None if shape is None or not -len(shape) <= axis < len(shape) else shape[axis]


def _known(d) -> bool:
    return isinstance(d, int | np.integer) and d >= 0


class _Builder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.opset = int(graph.opset or 13)
        self.rules = _Rules()
        self._sources: dict[int, list[layout.Source] | None] = {}
        self.holders = _constant_holders(graph)
        self.names = {id(c): name for name, c in self.holders.items()}

    def sources(self, tensor: gs.Tensor) -> list[layout.Source] | None:
        if id(tensor) not in self._sources:
            self._sources[id(tensor)] = layout.sources(tensor)
        return self._sources[id(tensor)]

    def operand(self, node: gs.Node, index: int, axis: int, other: Key, pairs: Pairs) -> None:
        """Link axis `axis` of input `index` (a weight or an activation) to the space `other`."""
        tensor = node.inputs[index]
        found = self.sources(tensor)
        if found is None:
            rank = len(_shape(tensor) or ())
            self.link(("t", tensor.name, axis % rank if rank else axis), other, pairs)
            return
        for source in found:
            if axis < len(source.axes) and source.axes[axis] is not None:
                name = self.names.get(id(source.constant), source.constant.name)
                self.rules.roles.append((name, node.op, index))
                self.link(("w", name, source.axes[axis]), other, pairs)

    def link(self, a: Key, b: Key, pairs: Pairs, directed: bool = False) -> None:
        self.rules.links.append(_Link(a, b, pairs, directed))

    def block(self, key: Key, reason: str) -> None:
        self.rules.blocks.append((key, reason))

    def block_tensor(self, tensor: gs.Tensor, reason: str) -> None:
        for axis in range(len(_shape(tensor) or ())):
            self.block(("t", tensor.name, axis), reason)

    def is_const(self, tensor) -> bool:
        return self.sources(tensor) is not None

    # --- rules ----------------------------------------------------------------------------

    def node(self, node: gs.Node) -> None:
        op = node.op
        if (node.domain or "") not in ir.STANDARD_DOMAINS or ir.subgraphs(node):
            return self.unknown(node)
        if all(self.is_const(t) for t in node.inputs if t is not None and t.name):
            # Constant arithmetic. Its result is a weight only if layout.sources can see through it.
            for t in node.outputs:
                if not self.is_const(t):
                    self.block_tensor(t, f"computed from constants by {op} (fold constants first)")
            return None
        handler = _HANDLERS.get(op) or (_Builder.broadcast if op in BROADCAST else None)
        handler = handler or (_Builder.pool if op in POOLS else None)
        handler = handler or (_Builder.reduce if op in REDUCE else None)
        handler = handler or (_Builder.reshape if op in RESHAPES else None)
        if handler is None:
            return self.unknown(node)
        return handler(self, node)

    def unknown(self, node: gs.Node, odd: bool = False) -> None:
        """Block every tensor the node touches. `odd`: the op has a rule, but not for this node
        (unknown shapes, an unusual rank, a second output in use)."""
        for t in node.inputs:
            if t is not None and t.name and not self.is_const(t):
                self.block_tensor(t, f"{node.op} with unknown shapes or a form no rule covers" if odd
                                  else f"read by an op with no rule: {node.op}")
        for t in node.outputs:
            self.block_tensor(t, f"{node.op} with unknown shapes or a form no rule covers" if odd
                              else f"computed by an op with no rule: {node.op}")

    def broadcast(self, node: gs.Node) -> None:
        out = node.outputs[0]
        shape = _shape(out)
        if shape is None:
            return self.unknown(node, odd=True)
        rank = len(shape)
        for index, tensor in enumerate(node.inputs):
            if tensor is None or not tensor.name:
                continue
            tshape = _shape(tensor)
            if tshape is None:
                return self.unknown(node, odd=True)
            for b in range(rank):
                a = b - (rank - len(tshape))
                if a < 0 or tshape[a] == 1 != shape[b]:
                    continue  # broadcast along the axis
                if _known(shape[b]) and tshape[a] == shape[b]:
                    self.operand(node, index, a, ("t", out.name, b), _ident(shape[b]))
                elif _known(shape[b]) or _known(tshape[a]):
                    self.block(("t", out.name, b), f"{node.op} broadcasts a tensor of unknown shape")
        for extra in node.outputs[1:]:  # Dropout's mask, ...
            if extra.outputs:
                self.block_tensor(extra, f"{node.op} second output is read")

    def batchnorm(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        if shape is None or any(o.outputs for o in node.outputs[1:]):
            return self.unknown(node, odd=True)
        for b in range(len(shape)):
            if _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))
        if len(shape) > 1 and _known(shape[1]):
            for index in range(1, len(node.inputs)):
                if not self.is_const(node.inputs[index]):
                    return self.block_tensor(x, f"{node.op} parameters are computed")
                self.operand(node, index, 0, ("t", y.name, 1), _ident(shape[1]))

    def norm_over(self, node: gs.Node, axes: Iterable[int], what: str) -> None:
        """An op that mixes the entries along `axes` and keeps the other axes apart."""
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        if shape is None:
            return self.unknown(node, odd=True)
        mixed = {a % len(shape) for a in axes}
        for b in range(len(shape)):
            if b in mixed:
                self.block(("t", x.name, b), f"{node.op} {what} the channels")
                self.block(("t", y.name, b), f"{node.op} {what} the channels")
            elif _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))

    def softmax(self, node: gs.Node) -> None:
        rank = len(_shape(node.outputs[0]) or ())
        axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1)) % max(rank, 1)
        axes = [axis] if self.opset >= 13 else range(axis, rank)
        self.norm_over(node, axes, "normalises across")

    def layernorm(self, node: gs.Node) -> None:
        rank = len(_shape(node.outputs[0]) or ())
        axis = int(node.attrs.get("axis", -1)) % max(rank, 1)
        self.norm_over(node, range(axis, rank), "normalises across")

    def conv(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        wshape, yshape, xshape = _shape(w) if w is not None else None, _shape(y), _shape(x)
        if w is None or not self.is_const(w) or wshape is None or yshape is None or xshape is None:
            why = "weight is computed at run time" if w is None or not self.is_const(w) else "shapes are unknown"
            self.block_tensor(x, f"{node.op} {why}")
            return self.block_tensor(y, f"{node.op} {why}")
        lay = layout.of(node, len(wshape))
        groups = lay.groups
        c_in, c_out = lay.input_channels(wshape), lay.output_channels(wshape)
        if _known(xshape[0]) and _known(yshape[0]):
            self.link(("t", x.name, 0), ("t", y.name, 0), _ident(yshape[0]))
        for t in (x, y):
            for a in range(2, len(_shape(t))):
                self.block(("t", t.name, a), f"{node.op} mixes a spatial axis")
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        if groups > 1 and lay.transposed:
            self.block(("t", x.name, 1), "grouped ConvTranspose")
            return self.block(("t", y.name, 1), "grouped ConvTranspose")
        if groups == 1:
            self.operand(node, 1, lay.in_axis, ("t", x.name, 1), _ident(c_in))
            self.operand(node, 1, lay.out_axis, ("t", y.name, 1), _ident(c_out))
        elif wshape[1] == 1:  # depthwise: input channel k feeds outputs k*m .. k*m+m-1 only
            m = c_out // groups
            self.operand(node, 1, 0, ("t", y.name, 1), _ident(c_out))
            self.link(("t", x.name, 1), ("t", y.name, 1), lambda: (np.repeat(np.arange(groups), m), np.arange(c_out)))
        else:  # grouped: every group keeps the same count, so a position is cut in all groups at once
            per_in, per_out = wshape[1], c_out // groups
            self.operand(node, 1, 1, ("t", x.name, 1), lambda: (np.arange(c_in) % per_in, np.arange(c_in)))
            self.operand(node, 1, 0, ("t", y.name, 1), _ident(c_out))
            self.link(("t", y.name, 1), ("v", node.name, "out"), lambda: (np.arange(c_out), np.arange(c_out) % per_out))
        if bias is not None:
            self.operand(node, 2, 0, ("t", y.name, 1), _ident(c_out))

    def gemm(self, node: gs.Node) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ashape, bshape, yshape = _shape(a), _shape(b), _shape(y)
        if ashape is None or bshape is None or yshape is None or len(ashape) != 2 or len(bshape) != 2:
            return self.unknown(node, odd=True)
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        k = ashape[0 if ta else 1]
        if _known(k):
            self.operand(node, 0, 0 if ta else 1, ("v", node.name, "k"), _ident(k))
            self.operand(node, 1, 1 if tb else 0, ("v", node.name, "k"), _ident(k))
        if _known(yshape[0]):
            self.operand(node, 0, 1 if ta else 0, ("t", y.name, 0), _ident(yshape[0]))
        if _known(yshape[1]):
            self.operand(node, 1, 0 if tb else 1, ("t", y.name, 1), _ident(yshape[1]))
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            cshape = _shape(node.inputs[2])
            for axis in range(2):
                ca = axis - (2 - len(cshape))
                if ca >= 0 and cshape[ca] != 1 and _known(yshape[axis]):
                    self.operand(node, 2, ca, ("t", y.name, axis), _ident(yshape[axis]))

    def matmul(self, node: gs.Node) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ashape, bshape, yshape = _shape(a), _shape(b), _shape(y)
        if ashape is None or bshape is None or yshape is None or len(ashape) < 2 or len(bshape) < 2:
            return self.unknown(node, odd=True)
        ra, rb, ry = len(ashape), len(bshape), len(yshape)
        k = ashape[-1]
        if _known(k):  # the contraction: A's columns go with B's rows
            self.operand(node, 0, ra - 1, ("v", node.name, "k"), _ident(k))
            self.operand(node, 1, rb - 2, ("v", node.name, "k"), _ident(k))
        if _known(yshape[-2]):
            self.operand(node, 0, ra - 2, ("t", y.name, ry - 2), _ident(yshape[-2]))
        if _known(yshape[-1]):
            self.operand(node, 1, rb - 1, ("t", y.name, ry - 1), _ident(yshape[-1]))
        for axis in range(ry - 2):  # broadcast batch axes
            for index, (shape, rank) in enumerate(((ashape, ra), (bshape, rb))):
                src = axis - (ry - rank)
                if src >= 0 and shape[src] != 1 and _known(yshape[axis]) and shape[src] == yshape[axis]:
                    self.operand(node, index, src, ("t", y.name, axis), _ident(yshape[axis]))

    def qdq(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        if shape is None:
            return self.unknown(node, odd=True)
        axis = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        for b in range(len(shape)):
            if _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))
        for index in (1, 2):
            if index < len(node.inputs) and node.inputs[index] is not None and node.inputs[index].name:
                pshape = _shape(node.inputs[index])
                if pshape and int(np.prod(pshape)) > 1:
                    self.operand(node, index, 0, ("t", y.name, axis), _ident(shape[axis]))

    def concat(self, node: gs.Node) -> None:
        y = node.outputs[0]
        shape = _shape(y)
        if shape is None or any(_shape(t) is None for t in node.inputs):
            return self.unknown(node, odd=True)
        axis = int(node.attrs["axis"]) % len(shape)
        offset = 0
        for index, t in enumerate(node.inputs):
            n = _shape(t)[axis]
            if not _known(n):
                return self.unknown(node, odd=True)
            for b in range(len(shape)):
                if b == axis:
                    self.operand(node, index, b, ("t", y.name, b), lambda n=n, o=offset: (np.arange(n), o + np.arange(n)))
                elif _known(shape[b]):
                    self.operand(node, index, b, ("t", y.name, b), _ident(shape[b]))
            offset += n

    def split(self, node: gs.Node) -> None:
        x = node.inputs[0]
        shape = _shape(x)
        sizes = _split_sizes(node, shape)
        if shape is None or sizes is None:
            return self.unknown(node, odd=True)
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        offset = 0
        for out, n in zip(node.outputs, sizes):
            for b in range(len(shape)):
                if b == axis:
                    self.link(("t", x.name, b), ("t", out.name, b), lambda n=n, o=offset: (o + np.arange(n), np.arange(n)))
                elif _known(shape[b]):
                    self.link(("t", x.name, b), ("t", out.name, b), _ident(shape[b]))
            offset += n

    def slice(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(x)
        bounds = _slice_bounds(node, shape, self.opset)
        if shape is None or bounds is None:
            self.block_tensor(x, "Slice with computed bounds")
            return self.block_tensor(y, "Slice with computed bounds")
        for b in range(len(shape)):
            if b in bounds:
                start, end, step = bounds[b]
                if step != 1:
                    self.block(("t", x.name, b), "Slice with a step along the channel axis")
                    self.block(("t", y.name, b), "Slice with a step along the channel axis")
                    continue
                self.link(("t", x.name, b), ("t", y.name, b),
                          lambda s=start, e=end: (np.arange(s, e), np.arange(e - s)))
            elif _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))

    def transpose(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        if shape is None:
            return self.unknown(node, odd=True)
        perm = node.attrs.get("perm") or list(range(len(shape)))[::-1]
        for b, a in enumerate(perm):
            if _known(shape[b]):
                self.link(("t", x.name, int(a)), ("t", y.name, b), _ident(shape[b]))

    def pool(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        if shape is None or any(o.outputs for o in node.outputs[1:]):
            return self.unknown(node, odd=True)
        for b in range(len(shape)):
            if b < 2 and _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))
            else:
                self.block(("t", x.name, b), f"{node.op} pools along the axis")
                self.block(("t", y.name, b), f"{node.op} pools along the axis")

    def resize(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        xshape, yshape = _shape(x), _shape(y)
        if xshape is None or yshape is None:
            return self.unknown(node, odd=True)
        sizes = node.inputs[3] if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name else None
        if sizes is not None and ir.constant_value(sizes) is None:
            self.block_tensor(x, f"{node.op} with computed output sizes")
            return self.block_tensor(y, f"{node.op} with computed output sizes")
        for b in range(len(yshape)):
            if _known(yshape[b]) and xshape[b] == yshape[b]:
                self.link(("t", x.name, b), ("t", y.name, b), _ident(yshape[b]))
            else:
                self.block(("t", x.name, b), f"{node.op} resizes the axis")
                self.block(("t", y.name, b), f"{node.op} resizes the axis")

    def pad(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = _shape(y)
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            pads = ir.constant_value(node.inputs[1])
        axes_given = len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name
        if shape is None or pads is None or axes_given:
            self.block_tensor(x, "Pad with computed pads")
            return self.block_tensor(y, "Pad with computed pads")
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(shape)
        for b in range(rank):
            if pads[b] == 0 and pads[b + rank] == 0 and _known(shape[b]):
                self.link(("t", x.name, b), ("t", y.name, b), _ident(shape[b]))
            else:
                self.block(("t", x.name, b), "Pad pads the axis")
                self.block(("t", y.name, b), "Pad pads the axis")

    def reduce(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        xshape = _shape(x)
        if xshape is None:
            return self.unknown(node, odd=True)
        rank = len(xshape)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            axes = ir.constant_value(node.inputs[1])
            if axes is None:
                return self.block_tensor(x, f"{node.op} over computed axes")
        if axes is None or len(np.asarray(axes).reshape(-1)) == 0:
            axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
        axes = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
        keep = int(node.attrs.get("keepdims", 1))
        b = 0
        for a in range(rank):
            if a in axes:
                self.block(("t", x.name, a), f"{node.op} reduces over the channels")
                b += keep
                continue
            if _known(xshape[a]):
                self.link(("t", x.name, a), ("t", y.name, b), _ident(xshape[a]))
            b += 1

    def gather(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        xshape, ishape = _shape(x), _shape(node.inputs[1])
        if xshape is None or ishape is None or self.is_const(x):
            return self.unknown(node, odd=True)
        axis = int(node.attrs.get("axis", 0)) % len(xshape)
        for a in range(len(xshape)):
            if a == axis:
                self.block(("t", x.name, a), "Gather along the channel axis")
            elif _known(xshape[a]):
                self.link(("t", x.name, a), ("t", y.name, a if a < axis else a + len(ishape) - 1), _ident(xshape[a]))

    def shape_of(self, node: gs.Node) -> None:
        """Shape reads every size; harmless only when its readers pick other axes (Gather of constants)."""
        x = node.inputs[0]
        rank = len(_shape(x) or ())
        picked: set[int] | None = set()
        start = int(node.attrs.get("start", 0)) % max(rank, 1) if rank else 0
        for reader in ir.consumers(node.outputs[0]):
            index = ir.constant_value(reader.inputs[1]) if reader.op == "Gather" and len(reader.inputs) > 1 else None
            if index is None:
                picked = None
                break
            picked |= {(start + int(i)) % max(rank, 1) for i in np.asarray(index).reshape(-1)}
        for a in range(rank):
            if picked is None or a in picked:
                self.block(("t", x.name, a), "its size is read by Shape")

    def reshape(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        xshape, yshape = _shape(x), _shape(y)
        if node.op == "Reshape" and (len(node.inputs) < 2 or ir.constant_value(node.inputs[1]) is None):
            self.block_tensor(x, "Reshape with a computed shape")
            return self.block_tensor(y, "Reshape with a computed shape")
        if xshape is not None and yshape is not None:
            xshape, yshape = _one_unknown_each(xshape, yshape)
        blocks = _reshape_blocks(xshape, yshape) if xshape is not None and yshape is not None else None
        if blocks is None:
            self.block_tensor(x, f"{node.op} between shapes that cannot be matched")
            return self.block_tensor(y, f"{node.op} between shapes that cannot be matched")
        for ins, outs in blocks:
            if len(ins) == 1 and len(outs) == 1:
                self.link(("t", x.name, ins[0]), ("t", y.name, outs[0]), _ident(xshape[ins[0]]))
                continue
            for a in ins:
                if xshape[a] == 1:
                    self.block(("t", x.name, a), f"{node.op} drops a unit axis")
            for b in outs:
                if yshape[b] == 1:
                    self.block(("t", y.name, b), f"{node.op} adds a unit axis")
            ins = [a for a in ins if xshape[a] != 1]
            outs = [b for b in outs if yshape[b] != 1]
            if not ins and not outs:
                continue
            if len(ins) == 1 and len(outs) == 1:
                self.link(("t", x.name, ins[0]), ("t", y.name, outs[0]), _ident(xshape[ins[0]]))
            elif len(outs) == 1:  # several axes merged into one: a channel is a set of features
                dims = [xshape[a] for a in ins]
                for rel, a in enumerate(ins):
                    self.link(("t", x.name, a), ("t", y.name, outs[0]),
                              lambda dims=dims, rel=rel: (np.indices(dims)[rel].reshape(-1), np.arange(int(np.prod(dims)))),
                              directed=True)
                self.rules.merges.append((("t", y.name, outs[0]), [("t", x.name, a) for a in ins]))
            else:
                for a in ins:
                    self.block(("t", x.name, a), f"{node.op} splits the channel axis")
                for b in outs:
                    self.block(("t", y.name, b), f"{node.op} splits the channel axis")


_HANDLERS = {
    "Conv": _Builder.conv, "ConvTranspose": _Builder.conv, "Gemm": _Builder.gemm, "MatMul": _Builder.matmul,
    "BatchNormalization": _Builder.batchnorm, "InstanceNormalization": _Builder.batchnorm,
    "QuantizeLinear": _Builder.qdq, "DequantizeLinear": _Builder.qdq,
    "Concat": _Builder.concat, "Split": _Builder.split, "Slice": _Builder.slice, "Transpose": _Builder.transpose,
    "Resize": _Builder.resize, "Upsample": _Builder.resize, "Pad": _Builder.pad, "Gather": _Builder.gather,
    "Shape": _Builder.shape_of, "Softmax": _Builder.softmax, "LogSoftmax": _Builder.softmax,
    "LayerNormalization": _Builder.layernorm, "Constant": lambda self, node: None,
}


def _split_sizes(node: gs.Node, shape) -> list[int] | None:
    if shape is None:
        return None
    axis = int(node.attrs.get("axis", 0)) % len(shape)
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        value = ir.constant_value(node.inputs[1])
        return None if value is None else [int(s) for s in value.reshape(-1)]
    n, parts = shape[axis], len(node.outputs)
    if not _known(n):
        return None
    size = -(-n // parts)
    return [min(size, n - i * size) for i in range(parts)]


def _slice_bounds(node: gs.Node, shape, opset: int) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} normalised to the axis length, or None when not constant."""
    if shape is None:
        return None
    rank = len(shape)
    if opset < 10 or "starts" in node.attrs:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", list(range(len(starts or [])))), [1] * len(starts or [])
    else:
        values = [ir.constant_value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None
                  and node.inputs[i].name else None for i in range(1, 5)]
        if values[0] is None or values[1] is None or (len(node.inputs) > 3 and node.inputs[3].name and values[2] is None) \
                or (len(node.inputs) > 4 and node.inputs[4].name and values[3] is None):
            return None
        starts, ends = values[0].reshape(-1), values[1].reshape(-1)
        axes = values[2].reshape(-1) if values[2] is not None else range(len(starts))
        steps = values[3].reshape(-1) if values[3] is not None else [1] * len(starts)
    if starts is None or ends is None:
        return None
    found = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % rank
        n = shape[a]
        if not _known(n):
            return None
        start, stop, step = slice(int(s), int(e), int(st)).indices(n)
        found[a] = (start, max(stop, start), step)
    return found


def _one_unknown_each(xshape: list, yshape: list) -> tuple[list, list]:
    """A Reshape keeps the element count: with one unknown size on each side (the batch of
    (batch_size, 24, 10, 10) -> (unk, 2400), a PyTorch flatten before a Gemm) and equal products
    of the known ones, the two unknown sizes are equal; they get the input's name, so that
    `_reshape_blocks` can pair them."""
    xu = [a for a, d in enumerate(xshape) if not _known(d)]
    yu = [b for b, d in enumerate(yshape) if not _known(d)]
    if len(xu) != 1 or len(yu) != 1 or xshape[xu[0]] is None and yshape[yu[0]] is None:
        return xshape, yshape
    known_x = int(np.prod([d for d in xshape if _known(d)], dtype=np.int64))
    known_y = int(np.prod([d for d in yshape if _known(d)], dtype=np.int64))
    if known_x != known_y:
        return xshape, yshape
    name = xshape[xu[0]] if xshape[xu[0]] is not None else yshape[yu[0]]
    xshape, yshape = list(xshape), list(yshape)
    xshape[xu[0]] = yshape[yu[0]] = name
    return xshape, yshape


def _reshape_blocks(xshape, yshape) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes with equal products (the axes a Reshape merges or splits), or None when
    the shapes cannot be matched (unknown sizes in the way)."""
    blocks, i, j = [], 0, 0
    while i < len(xshape) and j < len(yshape):
        if not _known(xshape[i]) or not _known(yshape[j]):
            if xshape[i] != yshape[j] or xshape[i] is None:
                return None
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs, p, q = [i], [j], xshape[i], yshape[j]
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                if i >= len(xshape) or not _known(xshape[i]):
                    return None
                p *= xshape[i]
                ins.append(i)
                i += 1
            else:
                if j >= len(yshape) or not _known(yshape[j]):
                    return None
                q *= yshape[j]
                outs.append(j)
                j += 1
        blocks.append((ins, outs))
    rest_x = [a for a in range(i, len(xshape)) if xshape[a] != 1]
    rest_y = [b for b in range(j, len(yshape)) if yshape[b] != 1]
    return None if rest_x or rest_y else blocks


# --- the analysis ------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _seeds(graph: gs.Graph, builder: _Builder) -> list[Key]:
    """Output channel spaces of every layer with a stored weight: where prunable channels are made."""
    seeds = []
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or (node.domain or "") not in ir.STANDARD_DOMAINS:
            continue
        y = node.outputs[0]
        rank = len(_shape(y) or ())
        if not rank:
            continue
        if node.op == "MatMul":
            if builder.is_const(node.inputs[1]) and not builder.is_const(node.inputs[0]):
                seeds.append(("t", y.name, rank - 1))
            elif builder.is_const(node.inputs[0]) and not builder.is_const(node.inputs[1]) and rank >= 2:
                seeds.append(("t", y.name, rank - 2))
        elif builder.is_const(node.inputs[1]) and not builder.is_const(node.inputs[0]):
            seeds.append(("t", y.name, 1))
    return seeds


def _size(key: Key, tensors: Mapping[str, gs.Tensor], virtual: Mapping[Key, int]) -> int | None:
    if key[0] == "v":
        return virtual.get(key)
    tensor = tensors.get(key[1])
    d = None if tensor is None else _dim(tensor, key[2])
    return int(d) if _known(d) else None


def groups(graph: gs.Graph) -> list[Group]:
    """The coupling groups of a graph (shapes must be inferred), ordered by first appearance."""
    builder = _Builder(graph)
    for node in graph.nodes:
        builder.node(node)
    rules = builder.rules
    tensors = dict(graph.tensors())
    tensors.update(builder.holders)
    by_key: dict[Key, list[_Link]] = defaultdict(list)
    virtual: dict[Key, int] = {}
    for link in rules.links:
        by_key[link.a].append(link)
        if not link.directed:
            by_key[link.b].append(link)
        for key in (link.a, link.b):
            if key[0] == "v" and key not in virtual:
                ia, ib = link.pairs()
                virtual[key] = int((ib if key == link.b else ia).max()) + 1
    blocks: dict[Key, list[str]] = defaultdict(list)
    for key, reason in rules.blocks:
        blocks[key].append(reason)
    outputs = {t.name for t in graph.outputs}
    inputs = {t.name for t in graph.inputs}

    uf = _UnionFind()
    offsets: dict[Key, int] = {}
    sizes: dict[Key, int] = {}
    todo: list[Key] = []

    def activate(key: Key) -> bool:
        if key in offsets:
            return True
        size = _size(key, tensors, virtual)
        if size is None:
            return False
        offsets[key], sizes[key] = uf.add(size), size
        todo.append(key)
        return True

    # Follow the links from every layer's output channels, joining the channels they pair.
    for key in _seeds(graph, builder):
        activate(key)
    unsized: dict[Key, str] = {}
    while todo:
        key = todo.pop()
        if key[0] == "t" and key[1] in outputs:
            blocks[key].append("reaches a graph output")
        if key[0] == "t" and key[1] in inputs:
            blocks[key].append("comes from a graph input")
        for link in by_key.get(key, ()):
            other = link.b if link.a == key else link.a
            if not activate(other):
                unsized[key] = f"couples with a tensor of unknown size ({other[1]})"
                continue
            ia, ib = link.pairs()
            oa, ob = offsets[link.a], offsets[link.b]
            for x, y in zip(ia.tolist(), ib.tolist()):
                uf.union(oa + x, ob + y)
    for key, reason in unsized.items():
        blocks[key].append(reason)
    for out, ins in rules.merges:
        if out in offsets and sum(k in offsets for k in ins) != 1:
            blocks[out].append("Reshape merges axes that are not one channel axis")

    # Each component is one removable channel; components touching the same spaces form a group.
    components: dict[int, dict[Key, list[int]]] = defaultdict(lambda: defaultdict(list))
    for key, start in offsets.items():
        for i in range(sizes[key]):
            components[uf.find(start + i)][key].append(i)
    reasons: dict[int, list[str]] = defaultdict(list)
    for key, why in blocks.items():
        if key in offsets:
            for root in {uf.find(offsets[key] + i) for i in range(sizes[key])}:
                reasons[root].extend(why)
    clusters: dict[tuple, list[int]] = {}
    for root in sorted(components):
        clusters.setdefault(tuple(sorted(components[root], key=repr)), []).append(root)
    roles: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for name, op, index in rules.roles:
        roles[name].add((op, index))
    found = []
    for number, (keys, roots) in enumerate(clusters.items()):
        members = {(k[1], k[2]): [np.array(components[r][k]) for r in roots] for k in keys if k[0] == "t"}
        slices = [Slice(k[1], k[2], [np.array(components[r][k]) for r in roots]) for k in keys if k[0] == "w"]
        why = list(dict.fromkeys(r for root in roots for r in reasons.get(root, ())))
        found.append(Group(number, len(roots), members, slices, why, {s.constant: roles[s.constant] for s in slices}))
    return found


def _constants(graph: gs.Graph) -> list[gs.Constant]:
    return [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]


# --- surgery -----------------------------------------------------------------------------------


def _merged(cuts: Iterable[tuple[Group, Sequence[int]]]):
    """Indices to remove per tensor space and per (constant, axis), over several groups."""
    spaces: dict[tuple[str, int], set[int]] = defaultdict(set)
    weights: dict[tuple[str, int], set[int]] = defaultdict(set)
    for group, channels in cuts:
        if not group.prunable:
            raise ValueError(f"group {group.id} cannot be pruned: {group.reasons[0]}")
        for c in channels:
            for key, per in group.members.items():
                spaces[key].update(per[c].tolist())
            for s in group.slices:
                weights[(s.constant, s.axis)].update(s.indices[c].tolist())
    return spaces, weights


def _constant_holders(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Stored constants by name; a Constant node's value (paddle2onnx weights) goes by its output's name."""
    found = {c.name: c for c in _constants(graph)}
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant):
            found[node.outputs[0].name] = value
    return found


def zero_channels(graph: gs.Graph, cuts: Iterable[tuple[Group, Sequence[int]]]) -> None:
    """Set every weight entry of the given channels to zero (BN variances to one, zero points
    kept), so that those channels carry exact zeros into every reader: the model that removing
    them must reproduce."""
    cuts = list(cuts)
    _, weights = _merged(cuts)
    roles = {name: r for group, _ in cuts for name, r in group.roles.items()}
    holders = _constant_holders(graph)
    for (name, axis), indices in weights.items():
        role = roles.get(name, set())
        if any(op == "DequantizeLinear" and index == 2 for op, index in role):
            continue
        fill = 1 if ("BatchNormalization", 4) in role or ("InstanceNormalization", 4) in role else 0
        values = np.array(holders[name].values)
        index = [slice(None)] * values.ndim
        index[axis] = sorted(indices)
        values[tuple(index)] = fill
        holders[name].values = values


def remove_channels(graph: gs.Graph, cuts: Iterable[tuple[Group, Sequence[int]]]) -> None:
    """Remove channels of prunable groups from every member: weights are cut, and the nodes whose
    attributes count channels (depthwise Conv groups, Split sizes, Slice bounds, Reshape shapes)
    are updated. Indices refer to the graph the groups were computed on."""
    spaces, weights = _merged(cuts)
    holders = _constant_holders(graph)
    # Reshapes inside weight chains (a bias reshaped to (1, C, 1, 1)) get their target from the cut
    # constant: layout.sources only sees through ones that add or drop unit axes.
    cut = {name for name, _ in weights}
    reshaped = [(node, list(holders[node.inputs[0].name].values.shape), list(node.outputs[0].shape))
                for node in graph.nodes
                if node.op == "Reshape" and node.inputs[0].name in cut and node.outputs[0].shape is not None]
    by_constant: dict[str, list[tuple[int, set[int]]]] = defaultdict(list)
    for (name, axis), indices in weights.items():
        by_constant[name].append((axis, indices))
    for name, cuts_ in by_constant.items():
        values = np.asarray(holders[name].values)
        for axis, indices in sorted(cuts_, reverse=True):
            values = np.delete(values, sorted(indices), axis=axis)
        holders[name].values = np.ascontiguousarray(values)
    namer = ir.Namer(graph)
    for node, before, after in reshaped:
        new = list(holders[node.inputs[0].name].values.shape)
        target = np.array(after, np.int64)
        target[[b for b, d in enumerate(after) if d != 1]] = [new[a] for a, d in enumerate(before) if d != 1]
        node.inputs[1] = ir.const(namer(f"{node.name}_shape"), target)
    for node in list(graph.nodes):
        removed = {(i, key[1]): spaces[key] for i, t in enumerate(node.inputs) if t is not None
                   for key in [(t.name, a) for a in range(len(_shape(t) or ()))] if spaces.get(key)}
        outs = {(i, key[1]): spaces[key] for i, t in enumerate(node.outputs)
                for key in [(t.name, a) for a in range(len(_shape(t) or ()))] if spaces.get(key)}
        if removed or outs:
            _adjust(graph, node, removed, outs)
    ir.forget_intermediate_types(graph, dtypes=False)  # sizes changed: the runtime infers them again


def _adjust(graph: gs.Graph, node: gs.Node, removed: dict, outs: dict) -> None:
    """Update the attributes and shape inputs of one node whose channels shrank."""
    namer = ir.Namer(graph)
    if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and (0, 1) in removed:
        if _dim(node.inputs[1], 1) == 1:  # depthwise: one group per input channel
            node.attrs["group"] = int(node.attrs["group"]) - len(removed[(0, 1)])
    elif node.op == "Split":
        axis = int(node.attrs.get("axis", 0)) % len(_shape(node.inputs[0]))
        if (0, axis) in removed:
            sizes = _split_sizes(node, _shape(node.inputs[0]))
            gone = removed[(0, axis)]
            new, start = [], 0
            for n in sizes:
                new.append(n - sum(start <= i < start + n for i in gone))
                start += n
            if "split" in node.attrs:
                node.attrs["split"] = new
            else:
                node.attrs.pop("num_outputs", None)
                ir.set_inputs(node, [node.inputs[0], ir.const(namer(f"{node.name}_split"), np.array(new, np.int64))])
    elif node.op == "Slice":
        shape = _shape(node.inputs[0])
        bounds = _slice_bounds(node, shape, int(graph.opset or 13))
        changed = {a: b for a, b in bounds.items() if (0, a) in removed}
        if changed:
            axes = sorted(bounds)
            starts, ends = [], []
            for a in axes:
                start, end, _ = bounds[a]
                gone = removed.get((0, a), set())
                starts.append(start - sum(i < start for i in gone))
                ends.append(end - sum(i < end for i in gone))
            if "starts" in node.attrs:
                node.attrs.update(starts=starts, ends=ends, axes=axes)
            else:
                ir.set_inputs(node, [node.inputs[0]] + [ir.const(namer(f"{node.name}_{what}"), np.array(v, np.int64))
                                                      for what, v in (("starts", starts), ("ends", ends), ("axes", axes))])
    elif node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:  # constant output sizes
        sizes = np.array(ir.constant_value(node.inputs[3])).reshape(-1).copy()
        for (_, axis), gone in outs.items():
            sizes[axis] -= len(gone)
        node.inputs[3] = ir.const(namer(f"{node.name}_sizes"), sizes.astype(np.int64))
    elif node.op == "Reshape":
        target = np.array(ir.constant_value(node.inputs[1])).reshape(-1).copy()
        for (_, axis), gone in outs.items():
            if target[axis] > 0:
                target[axis] -= len(gone)
        node.inputs[1] = ir.const(namer(f"{node.name}_shape"), target.astype(np.int64))
