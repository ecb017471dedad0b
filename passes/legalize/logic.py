"""Tests and masks rewritten into arithmetic: IsNaN of a value that cannot be infinite, Where on a
mask computed from integers, and (with `finite`) a Softmax's NaN guard."""

from __future__ import annotations

import numpy as np
import onnx

from edgegraph import ir

from ..cleanup.common import dtype_of
from .rules import FLOATS, Emit, NoMatch, float_input, rank_of, rewrites

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


# --- Where on a mask computed from integers -------------------------------------------------------

# Ops that move or broadcast a mask's values without computing new ones: the same op on the 0/1
# float form gives the 0/1 form of its result. Their data input is input 0 (Concat: every input).
_MOVES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Expand", "Flatten", "Identity", "Gather",
                    "GatherND", "GatherElements", "Slice", "Tile", "Concat"})


def _as_float(e: Emit, tensor, memo: dict[int, object]):
    """The float (e.dtype) tensor equal to Cast(bool `tensor`, float), its ops traced back through
    bool logic and data movement to integers where it can (so that no bool tensor is left for a
    target without bools), else a Cast of the bool tensor itself (exact either way)."""
    if id(tensor) in memo:
        return memo[id(tensor)]
    value = ir.constant_value(tensor)
    node = ir.producer(tensor)
    one = lambda: e.const(np.ones((), e.dtype))  # noqa: E731
    to = onnx.helper.np_dtype_to_tensor_dtype(e.dtype)
    source = dtype_of(node.inputs[0]) if node is not None and node.op == "Cast" and node.inputs else None
    if value is not None:
        made = e.const(value.astype(e.dtype))
    elif node is None or not ir.is_standard(node):
        made = e("Cast", tensor, to=to)
    elif node.op == "Cast" and source is not None and source.kind in "iu":
        # bool(x) for an integer x is x != 0, that is min(|x|, 1) in floats (exact: |x| >= 1 or 0)
        made = e("Min", e("Abs", e("Cast", node.inputs[0], to=to)), one())
    elif node.op == "Not":
        made = e("Sub", one(), _as_float(e, node.inputs[0], memo))
    elif node.op in ("And", "Or", "Xor"):
        p, q = (_as_float(e, t, memo) for t in node.inputs)
        made = e("Abs", e("Sub", p, q)) if node.op == "Xor" else e("Mul" if node.op == "And" else "Max", p, q)
    elif node.op in _MOVES:  # the same op, same attributes, on the float form
        data = [_as_float(e, t, memo) for t in (node.inputs if node.op == "Concat" else node.inputs[:1])]
        made = e(node.op, *data, *([] if node.op == "Concat" else node.inputs[1:]), **dict(node.attrs))
    else:  # (a comparison, a Cast from float: x != 0 has no exact float form, 0.5 is True)
        made = e("Cast", tensor, to=to)
    memo[id(tensor)] = made
    return made


@rewrites("Where")
def where_of_mask(owner, graph, node, opset):
    """Where(c, a, b) with finite constant a, b = a*m + b*(1 - m), m the mask c as 0/1 floats
    (`_as_float`: bool logic traced back to integers, a Cast from an integer x being min(|x|, 1)).
    Exact: m is exactly 0 or 1 and a, b are finite, so each product is a, b or 0 (never inf * 0);
    a mask of -inf has to stay a Where. NNAPI runs no bool tensor, Where, And or Cast to bool
    (MiniLM's attention mask: Cast(attention_mask, bool) -> GatherND -> And -> Where(m, 0, -3.4e38))."""
    if len(node.inputs) != 3:
        return NoMatch("not a three-input Where")
    branches = [ir.constant_value(t) for t in node.inputs[1:]]
    if any(v is None for v in branches):
        return NoMatch("a branch is not constant (computed at run time)")
    a, b = branches
    if a.dtype != b.dtype or a.dtype not in FLOATS:
        return NoMatch(f"branches are {a.dtype}/{b.dtype}, not one float16/32/64 dtype")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return NoMatch("a branch holds +-inf or NaN (0 * inf is NaN): the mask needs finite values")
    rank = rank_of(node.inputs[0])
    e = Emit(owner, graph, node, a.dtype, opset)
    cond = e.take()[0]
    m = _as_float(e, cond, {})
    # One product when a branch is a zero that cannot widen the result's shape.
    narrow = lambda v: v.size == 1 and not v.any() and rank is not None and v.ndim <= rank  # noqa: E731
    if narrow(a):
        e("Mul", e("Sub", e.const(np.ones((), a.dtype)), m), e.const(b), out=e.outputs[0])
    elif narrow(b):
        e("Mul", m, e.const(a), out=e.outputs[0])
    else:
        e("Add", e("Mul", m, e.const(a)), e("Mul", e("Sub", e.const(np.ones((), a.dtype)), m), e.const(b)),
          out=e.outputs[0])
    return "Where(mask)->Mul/Sub"


@rewrites("Where")
def where_nan_guard(owner, graph, node, opset):
    """With `finite` only: Where(IsNaN(p), c, p) = p, p a Softmax. The guard maps NaN rows (a
    row masked entirely with -inf; torch's scaled-dot-product attention export adds it) to c;
    on finite activations, with a finite mask, no Softmax row is NaN. Not exact for inf/NaN
    activations, hence the option: the ops NNAPI runs have no defined NaN result (no IsNaN,
    Equal or Where; Max/Min propagate NaN), so the guard cannot be kept."""
    if not getattr(owner, "finite", False):
        return NoMatch("a NaN guard: legalize(finite=true) drops it when the activations are finite")
    if len(node.inputs) != 3:
        return NoMatch("not a three-input Where")
    cond, _, value = node.inputs
    test = ir.producer(cond)
    source = ir.producer(value)
    if test is None or test.op != "IsNaN" or test.inputs[0] is not value or source is None or source.op != "Softmax":
        return NoMatch("not Where(IsNaN(p), c, p) of a Softmax p")
    e = Emit(owner, graph, node, None, opset)
    e.take()
    e("Identity", value, out=e.outputs[0])
    return "Where(IsNaN(Softmax))->Softmax (finite)"
