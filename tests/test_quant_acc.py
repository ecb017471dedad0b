"""Tests of quant's accuracy machinery: the floor measured on calibration samples held out of
fitting, and the accuracy methods chosen by measurement."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from conftest import DEFAULT_DIR
from edgegraph import ir
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.passes.quant import state
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse


def _run(model, data, spec, **ctx):
    context = PassContext(calibration=CalibrationData.from_arrays(data), progress=False,
                          verify=VerifyConfig(enabled=False), **ctx)
    result, report = run_pipeline(ir.load(model), parse(spec), context)
    return result.to_proto(), report.passes[-1]


def _digits(count=64):
    calib = np.load(DEFAULT_DIR / "digits_calib.npz")
    return onnx.load(DEFAULT_DIR / "digits_cnn.onnx"), {"input": calib["input"][:count]}


# ---------------------------------------------------------------------------------------------
# The floor's samples


def test_split_holds_out_every_fourth_sample_and_fits_on_the_rest():
    data = CalibrationData.from_arrays({"x": np.arange(40, dtype=np.float32).reshape(40, 1)})
    fitting, held, split = state.split_for_floor(data)
    held_values = [float(held.sample(i)["x"][0]) for i in range(len(held))]
    fit_values = [float(fitting.sample(i)["x"][0]) for i in range(len(fitting))]
    assert held_values == [3.0, 7.0, 11.0, 15.0, 19.0, 23.0, 27.0, 31.0, 35.0, 39.0]
    assert not set(held_values) & set(fit_values) and len(fit_values) == 30
    assert split["held_out"] == 10 and split["fitting"] == 30
    big = CalibrationData.from_arrays({"x": np.zeros((400, 1), np.float32)})
    assert len(state.split_for_floor(big)[1]) == state.HOLD_OUT_MAX


def test_floor_is_measured_on_held_out_samples_and_reported():
    model, data = _digits()
    _, record = _run(model, data, "cleanup,quant(check_speed=false, min_sqnr=36)")
    samples = record.details["fallback"]["samples"]
    assert samples["held_out"] == record.stats["floor_samples"] == 16 and samples["fitting"] == 48
    assert record.stats["calibration_samples"] == 64


def test_without_a_floor_every_sample_fits(caplog):
    model, data = _digits()
    _, record = _run(model, data, "cleanup,quant(check_speed=false)")
    assert "floor_samples" not in record.stats and record.stats["calibration_samples"] == 64


def test_small_calibration_set_measures_the_floor_on_the_fitting_samples_and_says_so(caplog):
    model, data = _digits(state.MIN_SPLIT_SAMPLES - 1)
    with caplog.at_level(logging.WARNING):
        _, record = _run(model, data, "cleanup,quant(check_speed=false, min_sqnr=30)")
    assert record.details["fallback"]["samples"]["held_out"] == 0
    assert "floor_samples" not in record.stats
    assert any("the floor is measured on the samples the ranges were fitted on" in r.getMessage()
               for r in caplog.records)
