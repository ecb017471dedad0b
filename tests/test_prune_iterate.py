"""prune's iterative loop (`steps`): the budget is reached in steps, and after each the pruned and
refitted model's inputs to every consumer are captured again, against the original model's
outputs, so that the next channels are chosen by the error the refit leaves on the pruned model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegraph import ir, runtime
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.passes.prune import Prune, _Pruner


def _ctx(calib: CalibrationData) -> PassContext:
    return PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False))


def _gemm_chain() -> onnx.ModelProto:
    """x (16) -> fc1 (12) relu fc2 (12) relu fc3 (4) -> y: two prunable groups (fc1's and fc2's
    outputs), whose consumers' inputs are plain activations numpy can compute."""
    rng = np.random.default_rng(3)
    values = {"w1": rng.normal(0, 0.4, (12, 16)), "b1": rng.normal(0, 0.3, 12),
              "w2": rng.normal(0, 0.4, (12, 12)), "b2": rng.normal(0, 0.3, 12),
              "w3": rng.normal(0, 0.4, (4, 12)), "b3": rng.normal(0, 0.3, 4)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), n) for n, v in values.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _forward(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's input and output (float64) from the model's own weights."""
    w = {t.name: np.asarray(t.values, np.float64) for t in model.graph.tensors().values() if hasattr(t, "values")}
    acts = {"fc1": x.astype(np.float64)}
    acts["fc1_out"] = acts["fc1"] @ w["w1"].T + w["b1"]
    acts["fc2"] = np.maximum(acts["fc1_out"], 0)
    acts["fc2_out"] = acts["fc2"] @ w["w2"].T + w["b2"]
    acts["fc3"] = np.maximum(acts["fc2_out"], 0)
    acts["fc3_out"] = acts["fc3"] @ w["w3"].T + w["b3"]
    return acts


def _refit_error(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares error of y on x and a constant."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(((y - a @ coef) ** 2).sum())


def test_next_channels_are_chosen_by_the_error_the_refit_leaves_on_the_pruned_model(monkeypatch):
    """After the first step, each group's next channel is the one whose removal the least-squares
    refit of its consumer, on the pruned model's inputs and against the original's outputs, can
    best make up for (checked by brute force: every channel tried, the consumer refitted); the
    steps remove nested sets, and the result is the dense model of the last one."""
    model = ir.from_proto(_gemm_chain())
    x = np.random.default_rng(4).normal(0, 1, (320, 16)).astype(np.float32)
    calib = CalibrationData.from_arrays({"x": x})
    fit = x[:-16]  # (holdout 16: the last samples measure, the rest fit)
    original = _forward(model, fit)
    seen = []
    reselect = _Pruner._reselect

    def spy(self, candidate, plans, removed, measured):
        reselect(self, candidate, plans, removed, measured)
        seen.append((candidate.copy(), {p.group.id: (p, len(removed.get(p.group.id, ())), p.order.copy())
                                        for p in plans}, {k: v.copy() for k, v in removed.items()}))

    monkeypatch.setattr(_Pruner, "_reselect", spy)
    pruned = model.copy()
    result = Prune(macs=0.55, steps=3, align=1, holdout=16, calib_samples=0, sensitivity=False,
                   ridge=1e-9).run(pruned, _ctx(calib))
    assert result.modified and len(seen) == 2  # (3 steps: the choice is renewed twice)
    checked = 0
    for candidate, plans, removed in seen:
        acts = _forward(candidate, fit)
        group = {("fc2" if "b1" in {s.constant for s in p.group.slices} else "fc3"): gid
                 for gid, (p, _, _) in plans.items()}  # (the group each layer reads)
        for plan, done, order in plans.values():
            assert np.array_equal(np.sort(order[:done]), np.sort(removed[plan.group.id]))  # (the prefix stays)
            if len(order) == done:
                continue
            consumer = next(name for name, gid in group.items() if gid == plan.group.id)
            # Its inputs: the candidate's kept channels, in order; its target: the original's
            # outputs at the channels the candidate keeps (fc3's 4 outputs are never cut).
            alive = np.setdiff1d(np.arange(plan.group.channels), order[:done])
            kept_out = (np.setdiff1d(np.arange(12), removed.get(group["fc3"], [])) if consumer == "fc2"
                        else np.arange(4))
            target = original[f"{consumer}_out"][:, kept_out]
            errors = [_refit_error(np.delete(acts[consumer], i, axis=1), target) for i in range(len(alive))]
            assert order[done] == alive[int(np.argmin(errors))], (consumer, errors)
            checked += 1
    assert checked >= 2
    # Nested cuts, and the model written is the last step's (dense, its outputs those of the last candidate).
    cuts = [{k: set(v.tolist()) for k, v in r.items()} for _, _, r in seen]
    assert all(cuts[0][k] <= cuts[1].get(k, set()) for k in cuts[0])
    assert result.stats["macs_removed"] >= 0.44
    y = runtime.outputs(pruned.to_proto(), [{"x": x[-16:]}], threads=1)[0]["y"]
    want = runtime.outputs(model.to_proto(), [{"x": x[-16:]}], threads=1)[0]["y"]
    assert np.isfinite(y).all() and y.shape == want.shape
