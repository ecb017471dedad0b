"""Layout and indexing ops rewritten into Reshape / Transpose / MatMul / ReduceSum / Gather."""

from __future__ import annotations

import math
import re

import numpy as np

from edgegraph import ir

from ..cleanup.common import Legal, dtype_of, int_list, shape_of
from .rules import Emit, NoMatch, rank_of, rewrites, static_shape


# --- Einsum -----------------------------------------------------------------------------------

def _parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str] | NoMatch:
    """Operand terms and the output term, one letter per axis ("..." expanded into fresh
    capital-free symbols), or why the equation is not one this rewrite handles."""
    equation = equation.replace(" ", "")
    if "->" in equation:
        inputs, output = equation.split("->")
    else:
        inputs, output = equation, None
    terms = inputs.split(",")
    if len(terms) != len(ranks) or not 1 <= len(terms) <= 2:
        return NoMatch(f"{len(terms)} operands (handled: 1 or 2)")
    letters = set(re.sub(r"[^A-Za-z]", "", equation))
    spare = [c for c in "0123456789!#$%&*+/:;<=>?@^_|~" if c not in letters]
    ellipsis_rank = None
    expanded = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            n = rank - (len(term) - 3)
            if n < 0 or (ellipsis_rank is not None and n != ellipsis_rank):
                return NoMatch("'...' stands for different ranks in different operands (broadcasting)")
            ellipsis_rank = n
            term = term.replace("...", "".join(spare[:n]))
        if len(term) != rank:
            return NoMatch(f"term {term!r} does not match its operand's rank {rank}")
        if len(set(term)) != len(term):
            return NoMatch(f"repeated index in {term!r} (a diagonal)")
        expanded.append(term)
    if output is None:  # implicit form: "..." first, then the letters used once, in order
        counts = {c: sum(t.count(c) for t in expanded) for c in "".join(expanded)}
        output = "".join(spare[:ellipsis_rank or 0]) + "".join(sorted(c for c, n in counts.items() if n == 1 and c.isalpha()))
    else:
        output = output.replace("...", "".join(spare[:ellipsis_rank or 0]))
    if len(set(output)) != len(output) or not set(output) <= set("".join(expanded)):
        return NoMatch(f"output term {output!r} repeats an index or names one no operand has")
    return expanded, output


def _transpose(e: Emit, x, term: str, order: str):
    """x (axes named by `term`) transposed into `order`; no node when already in order."""
    if term == order:
        return x
    return e("Transpose", x, perm=[term.index(c) for c in order])


def _reduce_unused(e: Emit, x, term: str, keep: set) -> tuple:
    """Sum over the axes of `x` whose index is in neither the other operand nor the output."""
    gone = [i for i, c in enumerate(term) if c not in keep]
    if not gone:
        return x, term
    return e.reduce("ReduceSum", x, gone, keepdims=0), "".join(c for c in term if c in keep)


def _product(sizes: list) -> int | None:
    return math.prod(sizes) if all(isinstance(s, int) for s in sizes) else None


@rewrites("Einsum")
def einsum(owner, graph, node, opset):
    """One operand: ReduceSum + Transpose. Two: each operand reduced over its own summed
    indices, transposed to [batch, free, contracted] and reshaped to 3 groups, one MatMul, then
    reshaped and transposed into the output order."""
    ranks = [rank_of(t) for t in node.inputs]
    if None in ranks:
        return NoMatch("an operand's rank is unknown")
    if any(dtype_of(t) is None for t in node.inputs):
        return NoMatch("an operand's dtype is unknown or not one numpy computes with (bfloat16)")
    parsed = _parse_einsum(str(node.attrs.get("equation", "")), ranks)
    if isinstance(parsed, NoMatch):
        return parsed
    terms, output = parsed
    sizes = {}
    for tensor, term in zip(node.inputs, terms):
        for c, d in zip(term, shape_of(tensor)):
            if isinstance(d, int):
                sizes[c] = d
    if len(terms) == 2:
        a, b = terms
        batch = [c for c in a if c in b and c in output]
        contracted = [c for c in a if c in b and c not in output]
        left = [c for c in a if c not in b and c in output]
        right = [c for c in b if c not in a and c in output]
        size = lambda letters: _product([sizes.get(c) for c in letters])  # noqa: E731
        # Reshapes copy batch dims (0) and need the sizes of the axes they merge or split.
        needed = (left + contracted if (len(left), len(contracted)) != (1, 1) else []) + \
                 (contracted + right if (len(contracted), len(right)) != (1, 1) else []) + \
                 (left + right if (len(left), len(right)) != (1, 1) else [])
        if any(c not in sizes for c in needed):
            return NoMatch("merging or splitting axes needs their sizes, which are not static")
    e = Emit(owner, graph, node, None, opset)
    operands = e.take()
    out = e.outputs[0]
    if len(terms) == 1:
        x, term = _reduce_unused(e, operands[0], terms[0], set(output))
        if term == output:
            e("Identity", x, out=out)
        else:
            e("Transpose", x, perm=[term.index(c) for c in output], out=out)
        return "Einsum->ReduceSum/Transpose"
    (x, a), (y, b) = (_reduce_unused(e, operands[0], a, set(b) | set(output)),
                      _reduce_unused(e, operands[1], b, set(a) | set(output)))
    nb = len(batch)

    def grouped(t, term, first, second):
        t = _transpose(e, t, term, "".join(batch + first + second))
        if len(first) == 1 and len(second) == 1:
            return t
        return e("Reshape", t, e.ints([0] * nb + [size(first), size(second)]))

    product = e("MatMul", grouped(x, a, left, contracted), grouped(y, b, contracted, right))
    produced = "".join(batch + left + right)
    if len(left) != 1 or len(right) != 1:
        split = [sizes[c] for c in left + right]
        product = e("Reshape", product, e.ints([0] * nb + split),
                    out=out if produced == output else None)
    if produced != output:
        e("Transpose", product, perm=[produced.index(c) for c in output], out=out)
    elif product is not out:
        e("Identity", product, out=out)
    return "Einsum->Transpose/Reshape/MatMul"


# --- SpaceToDepth / DepthToSpace --------------------------------------------------------------

def _blocks(node) -> tuple[list[int], int] | NoMatch:
    shape = static_shape(node.inputs[0])
    if shape is None or len(shape) != 4:
        return NoMatch("needs a static 4-D input shape")
    return shape, int(node.attrs["blocksize"])


@rewrites("DepthToSpace")
def depth_to_space(owner, graph, node, opset):
    """(N, C, H, W) -> Reshape (N, b, b, C/b^2, H, W) [DCR] or (N, C/b^2, b, b, H, W) [CRD],
    Transpose, Reshape (N, C/b^2, H b, W b)."""
    found = _blocks(node)
    if isinstance(found, NoMatch):
        return found
    (_, c, h, w), b = found
    mode = node.attrs.get("mode", "DCR")
    if mode not in ("DCR", "CRD") or c % (b * b):
        return NoMatch(f"mode {mode!r} or {c} channels not divisible by blocksize^2")
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    if mode == "DCR":
        split, perm = [0, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
    else:
        split, perm = [0, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
    moved = e("Transpose", e("Reshape", x, e.ints(split)), perm=perm)
    e("Reshape", moved, e.ints([0, c // (b * b), h * b, w * b]), out=e.outputs[0])
    return "DepthToSpace->Reshape/Transpose"


@rewrites("SpaceToDepth")
def space_to_depth(owner, graph, node, opset):
    """(N, C, H, W) -> Reshape (N, C, H/b, b, W/b, b), Transpose (DCR: blocks before channels;
    CRD: after), Reshape (N, C b^2, H/b, W/b)."""
    found = _blocks(node)
    if isinstance(found, NoMatch):
        return found
    (_, c, h, w), b = found
    mode = node.attrs.get("mode", "DCR")
    if mode not in ("DCR", "CRD") or h % b or w % b:
        return NoMatch(f"mode {mode!r} or spatial size {h}x{w} not divisible by blocksize {b}")
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    perm = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    moved = e("Transpose", e("Reshape", x, e.ints([0, c, h // b, b, w // b, b])), perm=perm)
    e("Reshape", moved, e.ints([0, c * b * b, h // b, w // b]), out=e.outputs[0])
    return "SpaceToDepth->Reshape/Transpose"


# --- Flatten ---------------------------------------------------------------------------------

@rewrites("Flatten")
def flatten_as_reshape(owner, graph, node, opset):
    """Flatten(axis) -> Reshape to (d0 ... d(axis-1) multiplied, -1): CoreML's ML Program has
    Reshape and no Flatten. Axis 0 is (1, -1); axis 1 keeps a dynamic batch (Reshape's 0 copies
    that dim); past it, the leading dims must be static."""
    shape = shape_of(node.inputs[0])
    if shape is None:
        return NoMatch("the input's rank is unknown")
    axis = int(node.attrs.get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    lead = 1 if axis == 0 else 0 if axis == 1 else _product(shape[:axis])
    if lead is None:
        return NoMatch(f"the dims before axis {axis} are not static")
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    e("Reshape", x, e.ints([lead, -1]), out=e.outputs[0])
    return "Flatten->Reshape"


# --- Softmax before opset 13 ------------------------------------------------------------------

@rewrites("Softmax", "LogSoftmax", "Hardmax", removes=False)
def coerced_softmax(owner, graph, node, opset):
    """Before opset 13 these normalize over all axes from `axis` on, flattened to 2-D (opset 7
    SqueezeNet: [1, 1000, 1, 1] over 1000 values; a runtime applying the opset-13 meaning works
    over the last axis, of size 1). Spelled out: Flatten(axis), op(axis=1), Reshape back."""
    if opset >= 13:
        return Legal("opset >= 13: the op already works on one axis")
    rank = rank_of(node.inputs[0])
    if rank is None:
        return NoMatch("the input's rank is unknown")
    axis = int(node.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if rank <= 2 or axis == rank - 1:
        return Legal("2-D, or over the last axis: the same in every opset")
    e = Emit(owner, graph, node, None, opset)
    x = e.take()[0]
    flat = e(node.op, e("Flatten", x, axis=axis), axis=1)
    e("Reshape", flat, e("Shape", x), out=e.outputs[0])
    return f"{node.op}-{opset}->Flatten/{node.op}/Reshape"


# --- Gather with negative indices -------------------------------------------------------------

@rewrites("Gather", removes=False)
def gather_negative_indices(owner, graph, node, opset):
    """Constant negative indices made positive (index + size of the gathered axis)."""
    indices = ir.constant_value(node.inputs[1])
    if indices is None:
        return NoMatch("indices are computed at run time")
    if not (indices < 0).any():
        return Legal("no negative index")
    shape = shape_of(node.inputs[0])
    axis = int(node.attrs.get("axis", 0))
    if shape is None or not isinstance(shape[axis], int):
        return NoMatch("the size of the gathered axis is not static")
    size = shape[axis]
    e = Emit(owner, graph, node, None, opset)
    data, _ = e.take()
    fixed = np.where(indices < 0, indices + size, indices).astype(indices.dtype)
    e("Gather", data, e.const(fixed), axis=axis, out=e.outputs[0])
    return "Gather(negative indices)->Gather"


# Registered with removes=False although it replaces Gather: a Gather another rewrite would make
# (Pad, Upsample) is better made directly as what the target runs (CoreML: Slice/Concat, Resize)
# than as Gather -> GatherND, so Gather does not count as an op the next round replaces.
@rewrites("Gather", removes=False)
def gather_as_gather_nd(owner, graph, node, opset):
    """Gather(data, indices, axis) = GatherND(data', Unsqueeze(indices, -1)) with data' the data
    with `axis` moved first (a Transpose, then one back on the result when axis > 0): CoreML's
    ML Program has GatherND but no Gather (MiniLM's embedding lookups). Both take negative
    indices."""
    if opset < 11:
        return NoMatch(f"opset {opset}: GatherND is opset 11+")
    data_rank, index_rank = rank_of(node.inputs[0]), rank_of(node.inputs[1])
    if data_rank is None or index_rank is None:
        return NoMatch("the rank of the data or the indices is unknown")
    axis = int(node.attrs.get("axis", 0))
    axis = axis + data_rank if axis < 0 else axis
    e = Emit(owner, graph, node, None, opset)
    data, indices = e.take()
    if axis:
        data = e("Transpose", data, perm=[axis, *(a for a in range(data_rank) if a != axis)])
    # GatherND's result: indices' dims, then data' dims after the first (data dims before axis, then after)
    picked = e("GatherND", data, e.unsqueeze(indices, [index_rank]), batch_dims=0,
               out=None if axis else e.outputs[0])
    if axis:
        before = list(range(index_rank, index_rank + axis))
        perm = before + list(range(index_rank)) + list(range(index_rank + axis, index_rank + data_rank - 1))
        e("Transpose", picked, perm=perm, out=e.outputs[0])
    return "Gather->GatherND" + ("/Transpose" if axis else "")


# --- Pad modes other than constant ---------------------------------------------------------------

def _non_constant_pad(node, opset):
    """(mode, input shape, [(axis, pads before, pads after)] of the padded axes) of a reflect /
    edge Pad the rewrites below handle, Legal for a constant one, or why not."""
    mode = node.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode == "constant":
        return Legal("constant mode: nothing to rewrite")
    if mode not in ("reflect", "edge"):
        return NoMatch(f"mode {mode}")
    shape = shape_of(node.inputs[0])
    if shape is None:
        return NoMatch("the input's rank is unknown")
    rank = len(shape)
    if opset < 11:
        pads = [int(p) for p in node.attrs.get("pads", [])]
    else:
        pads = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            return NoMatch("pads are not constant")
    axes = list(range(rank))
    if opset >= 18 and len(node.inputs) > 3 and node.inputs[3].name:
        axes = int_list(node.inputs[3])
        if axes is None:
            return NoMatch("axes are not constant")
        axes = [a + rank if a < 0 else a for a in axes]
    if len(pads) != 2 * len(axes) or min(pads, default=0) < 0:
        return NoMatch(f"pads {pads} (negative pads crop)")
    padded = [(axis, pads[i], pads[i + len(axes)]) for i, axis in enumerate(axes) if pads[i] or pads[i + len(axes)]]
    for axis, begin, end in padded:
        n = shape[axis]
        if not isinstance(n, int):
            return NoMatch(f"the size of padded axis {axis} is not static")
        if mode == "reflect" and max(begin, end) > n - 1:
            return NoMatch(f"reflect pads {begin}, {end} exceed axis {axis} of size {n}")
    return mode, shape, padded


def _pad_rows(mode: str, n: int, begin: int, end: int) -> tuple[list[int], list[int]]:
    """The rows of an axis of size `n` that Pad(reflect / edge) puts before and after it."""
    if mode == "reflect":
        return list(range(begin, 0, -1)), list(range(n - 2, n - 2 - end, -1))
    return [0] * begin, [n - 1] * end


@rewrites("Pad", removes=False)
def reflect_or_edge_pad(owner, graph, node, opset):
    """Pad mode reflect / edge (NNAPI and CoreML run only constant mode) as one Gather per padded
    axis, at constant positions: reflect [b..1, 0..n-1, n-2..n-1-e], edge [0]*b, 0..n-1, [n-1]*e."""
    found = _non_constant_pad(node, opset)
    if isinstance(found, NoMatch):
        return found
    mode, shape, padded = found
    e = Emit(owner, graph, node, None, opset)
    y = e.take()[0]
    for count, (axis, begin, end) in enumerate(padded, 1):
        before, after = _pad_rows(mode, shape[axis], begin, end)
        y = e("Gather", y, e.ints(before + list(range(shape[axis])) + after), axis=axis,
              out=e.outputs[0] if count == len(padded) else None)
    if not padded:
        e("Identity", y, out=e.outputs[0])
    return f"Pad({mode})->Gather"


@rewrites("Pad", removes=False)
def reflect_or_edge_pad_as_slices(owner, graph, node, opset):
    """Pad mode reflect / edge for a target without Gather (CoreML's ML Program): per padded axis
    one Concat of [the mirrored (reflect) or repeated first (edge) rows as 1-wide Slices, x, the
    same at the end]. Step-1 Slices only (negative steps are not taken everywhere)."""
    found = _non_constant_pad(node, opset)
    if isinstance(found, NoMatch):
        return found
    mode, shape, padded = found
    e = Emit(owner, graph, node, None, opset)
    y = e.take()[0]
    for count, (axis, begin, end) in enumerate(padded, 1):
        n = shape[axis]
        rows_before, rows_after = _pad_rows(mode, n, begin, end)
        row = {}  # one Slice per distinct row (edge repeats one)
        for r in rows_before + rows_after:
            if r not in row:
                row[r] = e.slice(y, [r], [r + 1], [axis])
        parts = [row[r] for r in rows_before] + [y] + [row[r] for r in rows_after]
        y = e("Concat", *parts, axis=axis, out=e.outputs[0] if count == len(padded) else None)
    if not padded:
        e("Identity", y, out=e.outputs[0])
    return f"Pad({mode})->Slice/Concat"


# --- GatherND with constant indices --------------------------------------------------------------

# Registered with removes=False, as Gather -> GatherND above: a target lacking both keeps the node
# (with the reason) instead of the two rules turning one into the other round after round.
@rewrites("GatherND", removes=False)
def gather_nd_as_gather(owner, graph, node, opset):
    """GatherND(data, indices) with constant indices (batch_dims 0) and a static data shape =
    Gather(Reshape(data, [d0*...*d(k-1), dk, ...]), flat indices, axis=0), k the length of an index
    tuple: each tuple becomes its row-major position in the first k axes. NNAPI has Gather but no
    GatherND (MiniLM's attention mask broadcast over positions)."""
    if int(node.attrs.get("batch_dims", 0)):
        return NoMatch("batch_dims is not 0")
    indices = ir.constant_value(node.inputs[1])
    if indices is None:
        return NoMatch("indices are not constant (computed at run time)")
    shape = static_shape(node.inputs[0])
    if shape is None:
        return NoMatch("the data shape is not static")
    k = indices.shape[-1] if indices.ndim else 0
    if not 1 <= k <= len(shape):
        return NoMatch(f"index tuples of length {k} for rank-{len(shape)} data")
    sizes = np.asarray(shape[:k], dtype=np.int64)
    tuples = indices.astype(np.int64).reshape(-1, k)
    tuples = np.where(tuples < 0, tuples + sizes, tuples)
    if (tuples < 0).any() or (tuples >= sizes).any():
        return NoMatch("an index is out of range")
    flat = np.ravel_multi_index(tuple(tuples.T), tuple(int(s) for s in sizes)).reshape(indices.shape[:-1])
    e = Emit(owner, graph, node, None, opset)
    data, _ = e.take()
    rows = e("Reshape", data, e.ints([math.prod(shape[:k]), *shape[k:]]))
    e("Gather", rows, e.const(flat.astype(np.int64)), axis=0, out=e.outputs[0])
    return "GatherND->Reshape/Gather"
