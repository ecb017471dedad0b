"""`codebook` pins a level at exactly zero only when the zeros are a cluster of their own: a weight
with a few exact zeros (what an int8 grid leaves: MiniLM 1.1%) gets no level pinned at 0 at 3
bits; a sparsified one keeps its zeros exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from test_codebook_data import _mlp, _run

from edgegraph import ir


def _decoded_w1(zeros: float, bits: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(w1 with `zeros` of it set to 0, its decoded weight after codebook(bits, tensor))."""
    proto = _mlp(rows=256, cols=160)
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    w1 = np.where(np.random.default_rng(5).random(w1.shape) < zeros, np.float32(0), w1)
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    model, _ = _run(proto, f"codebook(bits={bits}, granularity=tensor, sparse=false, min_elements=100)")
    mm = next(n for n in model.graph.nodes if n.op == "MatMul" and n.name == "mm1")
    return w1, ir.folded_value(mm.inputs[1], model.opset, max_nodes=64)


def test_zero_level_only_for_many_zeros():
    w1, decoded = _decoded_w1(0.01)
    assert (w1 == 0).sum() > 100 and not (decoded == 0).any()  # 1%: no level spent on them
    w1, decoded = _decoded_w1(0.3)
    assert (w1 == 0).sum() > 10000 and np.all(decoded[w1 == 0] == 0)  # 30% (>= 1/16 at 3 bits): they stay zero
