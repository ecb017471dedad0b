"""Tests on float values rewritten into arithmetic: IsNaN of a value that cannot be infinite."""

from __future__ import annotations

import onnx

from edgegraph import ir

from .rules import Emit, NoMatch, float_input, rewrites

# Ops whose output is finite or NaN, never +-inf, whatever their input: Softmax in [0, 1] (NaN
# for a row of NaN, +inf or only -inf), Sigmoid/HardSigmoid in [0, 1], Tanh/Erf/Sin/Cos in [-1, 1].
_NEVER_INFINITE = frozenset({"Softmax", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Sin", "Cos"})


@rewrites("IsNaN")
def is_nan_of_bounded(owner, graph, node, opset):
    """IsNaN(x) = Cast(x - x, bool) when x cannot be +-inf: x - x is 0 (False) for every finite x
    and NaN (True: Cast makes every non-zero float True) for NaN. For an infinite x it would say
    True, so the rule only takes x made by an op in `_NEVER_INFINITE` (MiniLM: torch's
    scaled-dot-product attention guards each Softmax with Where(IsNaN(p), 0, p); CoreML has no
    IsNaN, but Sub and Cast to bool)."""
    dtype = float_input(node)
    if isinstance(dtype, NoMatch):
        return dtype
    source = ir.producer(node.inputs[0])
    if source is None or source.op not in _NEVER_INFINITE or not ir.is_standard(source):
        made = "a graph input or constant" if source is None else source.op
        return NoMatch(f"its input ({made}) may be +-inf, where x - x is NaN too")
    e = Emit(owner, graph, node, dtype, opset)
    x = e.take()[0]
    e("Cast", e("Sub", x, x), to=onnx.TensorProto.BOOL, out=e.outputs[0])
    return f"IsNaN({source.op})->Sub/Cast"
