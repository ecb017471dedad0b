"""edgegraph.pipeline: running, verifying and reporting a sequence of passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import DEFAULT_DIR
from edgegraph import ir, modelio
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.errors import (CalibrationDataError, MissingRequirementError, PassFailure, PassOptionError,
                              VerificationError)
from edgegraph.pipeline import Pass, PassResult, option, reference_outputs, run_pipeline

CALIB = CalibrationData.from_npz(DEFAULT_DIR / "digits_calib.npz")
RAN: list[str] = []  # names of the test passes that ran, in order


def digits() -> ir.Model:
    return modelio.load(DEFAULT_DIR / "digits_cnn.onnx")


def context(**kwargs) -> PassContext:
    return PassContext(**{"calibration": CALIB, "progress": False, **kwargs})


def rewrite_output(model: ir.Model, op: str, value: float) -> None:
    """logits = op(old logits, value): the output keeps its name, its values change."""
    out = model.graph.outputs[0]
    namer = ir.Namer(model.graph)
    before = gs.Variable(namer("before_output"), dtype=out.dtype, shape=out.shape)
    ir.producer(out).outputs[0] = before
    model.graph.nodes.append(gs.Node(op, name=namer(op), inputs=[before, ir.const(namer("k"), np.float32(value))],
                                     outputs=[out]))


@dataclass(frozen=True)
class ShiftOutput(Pass):
    """Claims to be exact but adds `amount` to the output."""

    name = "test-shift-output"
    exact = True
    amount: float = option(1.0, "what to add")

    def run(self, model, ctx):
        RAN.append(self.name)
        rewrite_output(model, "Add", self.amount)
        return PassResult(modified=True, stats={"shifted": 1})


@dataclass(frozen=True)
class ScaleOutput(Pass):
    """A lossy pass: multiplies the output by `factor`."""

    name = "test-scale-output"
    exact = False
    factor: float = option(1.01, "scale")

    def run(self, model, ctx):
        RAN.append(self.name)
        rewrite_output(model, "Mul", self.factor)
        return PassResult(modified=True, details={"layers": [{"name": "logits", "factor": self.factor}]})


@dataclass(frozen=True)
class AddIdentity(Pass):
    """An exact pass that changes the graph but not the outputs."""

    name = "test-add-identity"

    def run(self, model, ctx):
        RAN.append(self.name)
        rewrite_output(model, "Mul", 1.0)
        return PassResult(modified=True)


@dataclass(frozen=True)
class Crash(Pass):
    name = "test-crash"

    def run(self, model, ctx):
        RAN.append(self.name)
        raise ValueError("index 7 out of range")


@dataclass(frozen=True)
class UserMistake(Pass):
    """Finds a problem in the user's data while running: that is a user error, not a crash."""

    name = "test-user-mistake"

    def run(self, model, ctx):
        RAN.append(self.name)
        raise CalibrationDataError("samples of input 'input' have 3 channels, the model wants 1")


@dataclass(frozen=True)
class DropOutput(Pass):
    name = "test-drop-output"

    def run(self, model, ctx):
        RAN.append(self.name)
        model.graph.outputs.pop()
        model.graph.outputs.append(model.graph.tensors()["/gap/GlobalAveragePool_output_0"])
        return PassResult(modified=True)


@dataclass(frozen=True)
class UnreportedEdit(Pass):
    """Leaves a dead node behind and says it changed nothing: the manager must not touch the graph."""

    name = "test-unreported-edit"

    def run(self, model, ctx):
        RAN.append(self.name)
        model.graph.nodes.append(gs.Node("Relu", name="dead_relu", inputs=[model.graph.inputs[0]],
                                         outputs=[gs.Variable("dead_out", np.float32)]))
        return PassResult(modified=False)


@dataclass(frozen=True)
class NeedsCalibration(Pass):
    name = "test-needs-calibration"
    needs = frozenset({"calibration"})

    def run(self, model, ctx):
        RAN.append(self.name)
        return PassResult(modified=False)


@pytest.fixture(autouse=True)
def clear_log():
    RAN.clear()


def test_exact_pass_that_changes_outputs_is_rejected():
    with pytest.raises(VerificationError) as caught:
        run_pipeline(digits(), [AddIdentity(), ShiftOutput()], context())
    error = caught.value
    assert (error.pass_name, error.output, error.metric) == ("test-shift-output", "logits", "max_abs")
    assert error.value == pytest.approx(1.0, rel=1e-5) and error.exit_code == 1
    assert "pass 'test-shift-output' changed output 'logits'" in str(error)
    assert RAN == ["test-add-identity", "test-shift-output"]


def test_tolerance_comes_from_the_context():
    shift = ShiftOutput(amount=1e-3)
    with pytest.raises(VerificationError):
        run_pipeline(digits(), [shift], context())
    loose = context(verify=VerifyConfig(rtol=0.0, atol=2e-3))
    _, report = run_pipeline(digits(), [shift], loose)
    assert report.passes[0].metrics["logits"].max_abs == pytest.approx(1e-3, rel=1e-3)
    _, report = run_pipeline(digits(), [ShiftOutput(amount=5.0)], context(verify=VerifyConfig(enabled=False)))
    assert report.passes[0].metrics == {} and report.metrics == {}


def test_lossy_pass_records_metrics():
    model = digits()
    result, report = run_pipeline(model, [AddIdentity(), ScaleOutput(factor=1.01)], context())
    first, second = report.passes
    assert first.metrics["logits"].exact_match or first.metrics["logits"].max_abs == 0
    scaled = second.metrics["logits"]
    assert scaled.top1 == 1.0 and scaled.cosine == pytest.approx(1.0, abs=1e-6)
    assert 0 < scaled.max_abs <= 0.011 * scaled.ref_max_abs
    assert scaled.sqnr_db == pytest.approx(40.0, abs=0.1)  # 20*log10(1/0.01)
    assert report.metrics["logits"].sqnr_db == pytest.approx(40.0, abs=0.1)  # final vs original
    assert second.details == {"layers": [{"name": "logits", "factor": 1.01}]}
    assert second.spec == "test-scale-output" and first.spec == "test-add-identity"
    assert report.verification_data == CALIB.source
    assert "Mul" not in {n.op for n in model.graph.nodes}  # the input model is never changed
    assert [n.op for n in result.graph.nodes].count("Mul") == 2


def test_unexpected_exception_becomes_pass_failure_with_position():
    with pytest.raises(PassFailure, match=r"pass 2 'test-crash' failed: ValueError: index 7 out of range") as caught:
        run_pipeline(digits(), [AddIdentity(), Crash(), AddIdentity()], context())
    assert isinstance(caught.value.__cause__, ValueError)
    assert RAN == ["test-add-identity", "test-crash"]


def test_user_errors_inside_a_pass_are_not_crashes():
    with pytest.raises(CalibrationDataError, match="3 channels"):
        run_pipeline(digits(), [UserMistake()], context())


def test_removing_a_graph_output_is_a_failure():
    with pytest.raises(PassFailure, match="pass 'test-drop-output' removed graph output\\(s\\) logits"):
        run_pipeline(digits(), [DropOutput()], context())


def test_requirements_are_checked_before_anything_runs():
    with pytest.raises(MissingRequirementError, match="'test-needs-calibration' needs calibration data"):
        run_pipeline(digits(), [AddIdentity(), NeedsCalibration()], context(calibration=None))
    assert RAN == []
    run_pipeline(digits(), [NeedsCalibration()], context())
    assert RAN == ["test-needs-calibration"]


def test_unmodified_graph_is_left_alone():
    model = digits()
    result, report = run_pipeline(model, [UnreportedEdit()], context())
    assert "dead_relu" in {n.name for n in result.graph.nodes}  # no cleanup after "no change"
    assert report.passes[0].modified is False and report.passes[0].metrics == {}
    assert "dead_relu" not in {n.name for n in model.graph.nodes}
    # A change that is reported is cleaned up: the dead node goes with the next pass's cleanup.
    result, _ = run_pipeline(model, [UnreportedEdit(), AddIdentity()], context())
    assert "dead_relu" not in {n.name for n in result.graph.nodes}


def test_no_calibration_verifies_on_seeded_random_inputs():
    _, report = run_pipeline(digits(), [AddIdentity()], context(calibration=None, seed=5))
    assert report.verification_data == "random(seed=5)"
    assert report.passes[0].metrics["logits"].max_abs == 0.0


def test_option_errors_are_raised_as_they_are():
    @dataclass(frozen=True)
    class Picky(Pass):
        name = "test-picky"

        def run(self, model, ctx):
            raise PassOptionError("test-picky.level must be 1 or 2")

    with pytest.raises(PassOptionError, match="level must be 1 or 2"):
        run_pipeline(digits(), [Picky()], context())


def test_reference_outputs_cover_the_data_in_batches():
    eval_data = CalibrationData.from_npz(DEFAULT_DIR / "digits_eval.npz", ["input"]).take(20)
    batches = reference_outputs(digits(), eval_data, batch_size=8)
    assert [b["logits"].shape for b in batches] == [(8, 10), (8, 10), (4, 10)]
