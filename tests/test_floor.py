"""The accuracy-floor loop (edgegraph.floor), the CLI's --min-agreement / --min-sqnr, and the
floors `VerifyConfig` holds lossy passes to."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from conftest import DEFAULT_DIR
from edgegraph import floor, ir, modelio, registry, runtime, verify
from edgegraph.cli import main
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.errors import EdgegraphError, FloorViolation
from edgegraph.passbase import Pass, PassResult, option
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse

MODEL, CALIB, EVAL = (DEFAULT_DIR / name for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_eval.npz"))


# ---------------------------------------------------------------------------------------------
# the search, on a synthetic knob


def _knob(boundary: int, count: int):
    """Settings 0..count-1, strongest first; SQNR rises with the setting and crosses 30 dB at
    `boundary` (29.5 dB just before it, 30.5 dB at it)."""
    calls = []

    def measure(setting):
        calls.append(setting)
        sqnr = 30.5 + (setting - boundary) if setting >= boundary else 29.5 - (boundary - 1 - setting)
        return {"sqnr_db": float(sqnr), "agreement": 1.0}, f"model {setting}"

    return list(range(count)), measure, calls


@pytest.mark.parametrize("boundary", [0, 1, 2, 7, 31, 62, 63])
def test_search_finds_the_boundary_and_records_every_step(boundary):
    settings, measure, calls = _knob(boundary, 64)
    found = floor.search(settings, measure, floor.Floor(min_sqnr=30.0))
    calls = list(calls)
    assert found.best.index == boundary and found.artefact == f"model {boundary}"
    assert [s.setting for s in found.steps] == calls  # every measurement, in the order made
    assert len(calls) == len(set(calls)) <= 1 + math.ceil(math.log2(63)) + 1
    for step in found.steps:  # what was measured, and the verdict on it, per step
        assert step.measured["sqnr_db"] == measure(step.setting)[0]["sqnr_db"]
        assert step.held == (step.setting >= boundary)
    assert calls[0] == 0  # the strongest setting first: when it holds, nothing else is built
    assert (len(calls) == 1) == (boundary == 0)
    # The answer is the boundary: the setting before it was measured and missed.
    assert boundary == 0 or any(s.setting == boundary - 1 and not s.held for s in found.steps)


def test_search_when_nothing_holds_names_the_closest_step():
    settings, measure, calls = _knob(100, 16)  # the boundary lies past the weakest setting
    found = floor.search(settings, measure, floor.Floor(min_sqnr=30.0))
    assert found.best is None and found.artefact is None and 15 in calls
    assert found.closest.setting == 15 and found.closest.measured["sqnr_db"] == 29.5 - 84
    error = floor.not_held("prune", found)
    assert error.exit_code == 2
    assert str(error).startswith("prune: the floor min-sqnr 30 cannot be held: best reached sqnr_db -54.50 dB, "
                                 "agreement 1.0000 (5 setting(s) measured)")


def test_unusable_settings_count_as_too_weak():
    # Settings 10.. are no result (quant: every layer float); 4..9 hold: the answer is 4.
    def measure(setting):
        if setting >= 10:
            return None, None
        return {"sqnr_db": 40.0 if setting >= 4 else 20.0}, setting

    found = floor.search(list(range(16)), measure, floor.Floor(min_sqnr=30.0))
    assert found.best.setting == 4
    assert all(not s.usable and not s.held for s in found.steps if s.setting >= 10)


def test_floor_bounds_and_validation():
    both = floor.Floor(min_agreement=0.98).stricter(floor.Floor(min_agreement=0.99, min_sqnr=30.0))
    assert both == floor.Floor(min_agreement=0.99, min_sqnr=30.0)
    assert both.shortfall({"agreement": 0.985, "sqnr_db": 31.0}) == ("agreement", 0.985, 0.99)
    assert both.shortfall({"agreement": 0.99, "sqnr_db": 29.9}) == ("sqnr_db", 29.9, 30.0)
    assert both.holds({"agreement": 0.99, "sqnr_db": 30.0})
    assert floor.Floor(min_agreement=0.9).holds({"agreement": None})  # no class scores: nothing to hold
    assert not floor.Floor()
    for bad in ({"min_agreement": 1.5}, {"min_sqnr": float("nan")}, {"min_cosine": True}):
        with pytest.raises(EdgegraphError):
            VerifyConfig(**{k.replace("min_sqnr", "min_sqnr_db"): v for k, v in bad.items()})


def test_measure_matches_verify_metrics():
    rng = np.random.default_rng(0)
    ref = [{"y": rng.normal(size=(8, 10)).astype(np.float32)}]
    cand = [{"y": ref[0]["y"] + rng.normal(scale=0.1, size=(8, 10)).astype(np.float32)}]
    m = verify.compare("y", ref[0]["y"], cand[0]["y"])
    assert floor.measure(ref, cand) == {"agreement": m.top1, "sqnr_db": m.sqnr_db, "cosine": m.cosine}
    assert 15 < m.sqnr_db < 25 and 0 < m.top1 <= 1


# ---------------------------------------------------------------------------------------------
# quant under --min-sqnr / --min-agreement


def _eval_sqnr(path) -> tuple[float, float]:
    """(SQNR dB, top-1 agreement) of `path` vs the float model on the eval set (samples the
    search never saw)."""
    feeds = {"input": np.load(EVAL)["input"]}
    reference = runtime.session(MODEL, optimize=True).run(None, feeds)[0]
    candidate = runtime.session(str(path), optimize=True).run(None, feeds)[0]
    m = verify.compare("logits", reference, candidate)
    return m.sqnr_db, m.top1


def test_quant_is_the_pass_with_a_knob():
    registry._load_builtins()
    assert {cls.name for cls in registry.list_passes() if cls.knob} == {"quant", "prune", "codebook", "sparsify"}
    assert all(not cls.exact for cls in registry.list_passes() if cls.knob)


def test_cli_min_sqnr_held(tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["opt", str(MODEL), "-p", "quant", "--calib", str(CALIB), "--min-sqnr", "32", "-o", str(out),
                 "--runs", "0", "--report", str(report)])
    stdout = capsys.readouterr().out
    assert code == 0 and out.exists()
    sqnr, top1 = _eval_sqnr(out)
    # The floor is measured on the 16 calibration samples held out of fitting (every 4th: 32.62 dB
    # there); on the 500 evaluation samples it is 32.31 dB.
    assert 32.0 <= sqnr < 33.0 and top1 == 1.0
    quant = json.loads(report.read_text())["passes"][-1]
    steps = quant["details"]["fallback"]["steps"]
    assert quant["details"]["fallback"]["samples"]["held_out"] == quant["stats"]["floor_samples"] == 16
    # 8 bits everywhere misses 32 dB (31.7), so layers were kept in float, as few as hold it.
    assert steps[0]["index"] == 0 and not steps[0]["held"] and 31.0 < steps[0]["sqnr_db"] < 32.0
    best = min(s["index"] for s in steps if s["held"])
    assert any(s["index"] == best - 1 and not s["held"] for s in steps)
    assert all((s["sqnr_db"] >= 32.0) == s["held"] for s in steps)
    # (7 with elementwise=integer, measured: 32.56 dB either way)
    assert quant["stats"]["fallback_layers"] == len(quant["details"]["fallback"]["kept"]) == 6
    assert sum("quant: floor search" in line and "setting" in line for line in stdout.splitlines()) == len(steps)


def test_cli_floor_that_cannot_be_held_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["opt", str(MODEL), "-p", "quant", "--calib", str(CALIB), "--min-sqnr", "80", "-o", str(out),
                 "--runs", "0", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert len(err) == 1 and err[0].startswith(
        "edgegraph: error: quant: the floor min-sqnr 80 cannot be held: best reached agreement 1.0000, sqnr_db 55.99 dB")


def test_cli_min_agreement_is_the_budget(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["opt", str(MODEL), "-p", "quant", "--calib", str(CALIB), "--min-agreement", "0.98", "-o", str(out),
                 "--runs", "0", "--quiet"])
    assert code == 0 and out.exists()
    assert _eval_sqnr(out)[1] >= 0.98
    for bad in ("1.5", "nan", "x"):
        assert main(["opt", str(MODEL), "-p", "quant", "--calib", str(CALIB), "--min-agreement", bad,
                     "-o", str(out.with_name("bad.onnx"))]) == 2
    assert not out.with_name("bad.onnx").exists()


def test_library_floor_is_the_quant_budget():
    import edgegraph

    with pytest.raises(floor.FloorNotHeld, match="the floor min-sqnr 80 cannot be held"):
        edgegraph.optimize(str(MODEL), "quant", calib=str(CALIB), min_sqnr=80.0)
    with pytest.raises(EdgegraphError, match="min_agreement must be in"):
        edgegraph.optimize(str(MODEL), "quant", calib=str(CALIB), min_agreement=2.0)


# ---------------------------------------------------------------------------------------------
# VerifyConfig floors: a lossy pass that ends below one stops the pipeline


@dataclass(frozen=True)
class Noisy(Pass):
    """Adds relative noise to every float weight (a lossy pass with no knob)."""

    name: ClassVar[str] = "test-noisy"
    summary: ClassVar[str] = "add noise to the weights (test pass)"
    exact: ClassVar[bool] = False
    noise: float = option(0.01, "relative noise")

    def run(self, model, ctx):
        rng = np.random.default_rng(0)
        for tensor in model.graph.tensors().values():
            value = ir.constant_value(tensor)
            if tensor.__class__.__name__ == "Constant" and value is not None and value.dtype == np.float32:
                tensor.values = (value * (1 + self.noise * rng.standard_normal(value.shape))).astype(np.float32)
        return PassResult(True)


@pytest.fixture
def noisy_pass():
    registry._load_builtins()
    registry.register_pass(Noisy)
    yield
    registry._PASSES.pop(Noisy.name, None)


def test_lossy_pass_below_the_floor_stops_the_run(tmp_path, capsys, noisy_pass):
    out = tmp_path / "n.onnx"
    args = ["opt", str(MODEL), "-p", "test-noisy", "--calib", str(CALIB), "-o", str(out), "--runs", "0", "--quiet"]
    assert main([*args, "--min-sqnr", "18"]) == 0 and out.exists()  # 1% noise: 18.7 dB, 18 holds
    out.unlink()
    capsys.readouterr()
    assert main([*args, "--min-sqnr", "40"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists() and len(err) == 1
    assert "pass 'test-noisy' ended below the floor: sqnr_db 18.72 < 40 on the verification samples" in err[0]


def test_verify_config_floor_names_pass_and_metric(noisy_pass):
    data = CalibrationData.from_arrays(dict(np.load(CALIB)))
    ctx = PassContext(calibration=data, progress=False, verify=VerifyConfig(min_cosine=0.9999))
    with pytest.raises(FloorViolation) as caught:
        run_pipeline(modelio.load(str(MODEL)), parse("test-noisy"), ctx)
    assert caught.value.exit_code == 1
    assert (caught.value.pass_name, caught.value.metric, caught.value.bound) == ("test-noisy", "cosine", 0.9999)
    assert 0.98 < caught.value.value < 0.9999
    # No floor: the same pass is only reported.
    _, report = run_pipeline(modelio.load(str(MODEL)), parse("test-noisy"), PassContext(calibration=data, progress=False))
    assert report.passes[-1].metrics["logits"].cosine == pytest.approx(caught.value.value, abs=1e-6)
