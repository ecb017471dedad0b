"""`codebook(ratio=R)` with --calib scores whole allocations end to end, and zeros are pinned to a
level only when they are a cluster of their own.

* The allocation and its variants with the largest weight one width up or down are encoded and
  scored on the held-out calibration half; the written file is the best scoring one, and the
  same input gives the same bytes.
* A weight with a few exact zeros (what an int8 grid leaves: MiniLM 1.1%) gets no level pinned
  at 0 at 3 bits; a sparsified one keeps its zeros exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_codebook_data import _inputs, _mlp, _run

from edgegraph import ir
from edgegraph.context import CalibrationData
from edgegraph.passes import codebook as cb
from edgegraph.passes.codebook import mixed


def test_ratio_keeps_the_best_scoring_allocation(monkeypatch):
    proto = _mlp(rows=256, cols=160)  # w1 holds 97% of the weight bytes: its widths are tried
    calib = CalibrationData.from_arrays({"x": _inputs(256, features=256)})
    scored = []
    made = cb._scorer

    def recording(model, held, ctx):
        score = made(model, held, ctx)

        def record(trial):
            scored.append((score(trial), trial.to_proto().SerializeToString()))
            return scored[-1][0]
        return record

    monkeypatch.setattr(cb, "_scorer", recording)
    model, _ = _run(proto, "codebook(ratio=6)", calib)
    assert len(scored) >= 2  # the allocation and at least one variant of w1's width
    best = min(scored, key=lambda s: s[0])
    assert model.to_proto().SerializeToString() == best[1]
    scores = [s[0] for s in scored]
    assert len(set(scores)) == len(scores)  # the variants differ
    again, _ = _run(proto, "codebook(ratio=6)", calib)
    assert again.to_proto().SerializeToString() == best[1]


def test_angle_distortion_is_blind_to_row_scale():
    ref = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, -6.0]])
    scaled = ref * np.array([[2.0], [0.5]])  # each row rescaled: cosine 1
    mean_term = float(((scaled - ref) ** 2).sum() / ((ref - ref.mean()) ** 2).sum())
    assert mixed.distortion([{"y": ref}], [{"y": scaled}], angle=True) == pytest.approx(mean_term, abs=1e-12)
    assert mixed.distortion([{"y": ref}], [{"y": scaled}]) == pytest.approx(mean_term + 1.0)  # row 0: |2r - r|² / |r|²


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
