"""The legalize rule library: rewrites registered by the op they replace, and what they share.

A rule is `rule(owner, graph, node, opset) -> str | NoMatch`, the signature cleanup's rule
driver (`apply_first_rule`) runs: it returns the counter key of what it did after rewriting
`node` into other ops, or a `NoMatch` saying why it leaves `node` alone. A rule first checks
everything it needs (dtype, rank, constant attributes), and only then touches the graph, so a
NoMatch never leaves a half-made rewrite behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir

from ..cleanup.common import NoMatch, dtype_of, optional_input, shape_of

REWRITES: dict[str, list[Callable]] = {}
# Ops some rule replaces by other ops (not just rewrites into another form of the same op, as the
# opset-7 Softmax and negative-index Gather rules do): a rewrite may make them, the next round
# replaces them.
REPLACED: set[str] = set()

FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def rewrites(*ops: str, removes: bool = True):
    """Register the decorated rule as a rewrite of the op types `ops` (tried in registration
    order); `removes=False` for a rule that makes another form of the same op."""

    def register(rule):
        for op in ops:
            REWRITES.setdefault(op, []).append(rule)
            if removes:
                REPLACED.add(op)
        return rule

    return register


def float_input(node: gs.Node, index: int = 0) -> np.dtype | NoMatch:
    """The numpy float dtype of input `index`, or why the rule cannot make constants for it
    (unknown dtype, integers, bfloat16/float8 that numpy cannot compute with exactly)."""
    tensor = optional_input(node, index)
    dtype = None if tensor is None else dtype_of(tensor)
    if dtype is None:
        return NoMatch(f"input {index} has no known float16/32/64 dtype")
    if dtype not in FLOATS:
        return NoMatch(f"input {index} is {dtype.name}, not float16/32/64")
    return dtype


def rank_of(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    shape = shape_of(tensor)
    return shape if shape is not None and all(isinstance(d, int) for d in shape) else None


class Emit:
    """Builds the replacement of one node: new nodes and constants named after it, float
    constants in its dtype, opset-dependent forms (Clip, Reduce*, Squeeze axes) chosen for
    the graph's opset.

    Usage: `e = Emit(owner, graph, node, dtype, opset)`, `x, = e.take()` (detaches `node`
    and returns its inputs), then `e("Mul", x, 0.5)`, ..., the last op with `out=e.outputs[0]`
    so the node's output tensors (names, graph outputs) are kept.
    """

    def __init__(self, owner, graph: gs.Graph, node: gs.Node, dtype: np.dtype | None, opset: int):
        self.names, self.graph, self.node, self.dtype, self.opset = owner.names, graph, node, dtype, opset
        self.base = node.name or node.op
        self.outputs: list[gs.Tensor] = []
        self.made = getattr(owner, "made", None)  # the run's list of nodes rewrites made

    def take(self) -> list[gs.Tensor | None]:
        """Detach the node being replaced; its inputs (None for omitted ones), its outputs in `outputs`."""
        inputs = [optional_input(self.node, i) for i in range(len(self.node.inputs))]
        self.outputs = list(self.node.outputs)
        self.node.inputs.clear()
        self.node.outputs.clear()
        return inputs

    def const(self, array, dtype=None) -> gs.Constant:
        array = np.asarray(array, dtype=dtype or (self.dtype if isinstance(array, float | list) else None))
        return ir.const(self.names(f"{self.base}_const"), array)

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def __call__(self, op: str, *inputs, out: gs.Tensor | None = None, dtype=None, **attrs) -> gs.Tensor:
        """Append `op(inputs, attrs)`; Python floats become scalar constants of the node's dtype,
        None an omitted input. Returns the (new, or given `out`) output tensor."""
        tensors = []
        for item in inputs:
            if item is None:
                tensors.append(gs.Variable.empty())
            elif isinstance(item, gs.Tensor):
                tensors.append(item)
            else:
                tensors.append(self.const(float(item) if isinstance(item, int | float) else item))
        if out is None:
            out = gs.Variable(self.names(f"{self.base}_{op.lower()}"), dtype=dtype)
        node = gs.Node(op, name=self.names(f"{self.base}/{op}"), attrs=attrs, inputs=tensors, outputs=[out])
        self.graph.nodes.append(node)
        if self.made is not None:
            self.made.append(node)
        return out

    # --- forms that changed between opsets -------------------------------------------------

    def reduce(self, op: str, x: gs.Tensor, axes: Sequence[int], keepdims: int = 1, out=None) -> gs.Tensor:
        """Reduce* over `axes`: an `axes` input from opset 18 (ReduceSum: 13), an attribute before."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            return self(op, x, self.ints(axes), keepdims=keepdims, out=out)
        return self(op, x, axes=list(axes), keepdims=keepdims, out=out)

    def clip(self, x: gs.Tensor, low: float, high: float, out=None) -> gs.Tensor:
        if self.opset >= 11:
            return self("Clip", x, float(low), float(high), out=out)
        return self("Clip", x, min=float(low), max=float(high), out=out)

    def unsqueeze(self, x: gs.Tensor, axes: Sequence[int], out=None) -> gs.Tensor:
        if self.opset >= 13:
            return self("Unsqueeze", x, self.ints(axes), out=out)
        return self("Unsqueeze", x, axes=list(axes), out=out)

    def slice(self, x: gs.Tensor, starts, ends, axes, out=None) -> gs.Tensor:
        if self.opset >= 10:
            return self("Slice", x, self.ints(starts), self.ints(ends), self.ints(axes), out=out)
        return self("Slice", x, starts=list(starts), ends=list(ends), axes=list(axes), out=out)


__all__ = ["REPLACED", "REWRITES", "Emit", "NoMatch", "float_input", "rank_of", "rewrites", "static_shape"]
