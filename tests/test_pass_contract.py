"""The pass contract the manager enforces: immutable passes, prerequisites, pre/post-conditions,
exact-only fixed points, one registry entry per class, and like-with-like verification."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import DEFAULT_DIR
from edgegraph import ir, modelio, pipeline, registry
from edgegraph.context import CalibrationData, PassContext
from edgegraph.errors import PassFailure, PostconditionError, PreconditionError
from edgegraph.passbase import Pass, PassGroup, PassResult, option
from edgegraph.passes.cleanup import Cleanup, FoldBatchNorm
from edgegraph.pipeline import run_pipeline
from test_pipeline import AddIdentity, ScaleOutput, rewrite_output

CALIB = CalibrationData.from_npz(DEFAULT_DIR / "digits_calib.npz")
RAN: list[str] = []


def digits() -> ir.Model:
    return modelio.load(DEFAULT_DIR / "digits_cnn.onnx")


def context(**kwargs) -> PassContext:
    return PassContext(**{"calibration": CALIB, "progress": False, **kwargs})


@dataclass(frozen=True)
class Marker(Pass):
    """Exact; changes the graph when `change`."""

    name = "test-marker"
    change: bool = option(False, "rewrite the output (x * 1)")

    def run(self, model, ctx):
        RAN.append(f"marker({self.change})")
        if self.change:
            rewrite_output(model, "Mul", 1.0)
        return PassResult(self.change)


@dataclass(frozen=True)
class NeedsMarker(Pass):
    """Asks for Marker() first."""

    name = "test-needs-marker"

    def after(self):
        return (Marker(),)

    def run(self, model, ctx):
        RAN.append(self.name)
        return PassResult(False)


@pytest.fixture(autouse=True)
def clear():
    RAN.clear()


def test_a_prerequisite_runs_first_unless_it_just_ran():
    _, report = run_pipeline(digits(), [NeedsMarker()], context())
    assert RAN == ["marker(False)", "test-needs-marker"]
    assert [(r.name, r.wanted_by) for r in report.passes] == [("test-marker", "test-needs-marker"),
                                                              ("test-needs-marker", None)]
    RAN.clear()
    run_pipeline(digits(), [Marker(), NeedsMarker()], context())
    assert RAN == ["marker(False)", "test-needs-marker"]  # the user's own Marker() counts
    RAN.clear()
    # A pass that changed the model in between: the prerequisite's work may be undone, it runs again.
    run_pipeline(digits(), [Marker(), Marker(change=True), NeedsMarker()], context())
    assert RAN == ["marker(False)", "marker(True)", "marker(False)", "test-needs-marker"]


def test_quant_asks_the_manager_for_cleanup():
    from edgegraph.passes.quant.static import StaticQuantize

    assert StaticQuantize().after() == (Cleanup(),)
    assert StaticQuantize(prepare=False).after() == ()
    _, report = run_pipeline(digits(), [StaticQuantize(check_speed=False)], context())
    assert [(r.name, r.wanted_by) for r in report.passes] == [("cleanup", "quant"), ("quant", None)]
    assert report.passes[0].stats["fold-batchnorm"] == 7  # BatchNorm folded before quant placed Q/DQ
    _, report = run_pipeline(digits(), [Cleanup(), StaticQuantize(check_speed=False)], context())
    assert [r.name for r in report.passes] == ["cleanup", "quant"]  # not twice


def test_a_pass_that_needs_itself_is_refused():
    @dataclass(frozen=True)
    class Loop(Pass):
        name = "test-loop"

        def after(self):
            return (Loop(),)

    with pytest.raises(TypeError, match="needs itself first"):
        run_pipeline(digits(), [Loop()], context())


def test_pre_and_postconditions():
    @dataclass(frozen=True)
    class Picky(Pass):
        name = "test-picky"

        def requires(self, model, ctx):
            if not any(n.op == "Gelu" for n in model.graph.nodes):
                raise PreconditionError("test-picky needs a Gelu")

        def run(self, model, ctx):
            RAN.append(self.name)
            return PassResult(False)

    @dataclass(frozen=True)
    class Sloppy(Pass):
        name = "test-sloppy"

        def run(self, model, ctx):
            rewrite_output(model, "Mul", 1.0)
            return PassResult(True)

        def ensures(self, model, ctx):
            if any(n.op == "Mul" and n.outputs[0] in model.graph.outputs for n in model.graph.nodes):
                raise PostconditionError("test-sloppy left a Mul on the output")

    with pytest.raises(PreconditionError, match="needs a Gelu"):
        run_pipeline(digits(), [Picky()], context())
    assert RAN == []  # refused before it ran
    with pytest.raises(PassFailure, match="left a Mul"):
        run_pipeline(digits(), [Sloppy()], context())


def test_only_exact_passes_repeat_to_a_fixed_point():
    @dataclass(frozen=True)
    class Lossy(PassGroup):
        name = "test-lossy-group"

        def passes(self):
            return [AddIdentity(), ScaleOutput()]

    with pytest.raises(PassFailure, match="repeats lossy pass"):
        run_pipeline(digits(), [Lossy()], context())


def test_cleanup_rounds_are_the_managers_loop(monkeypatch):
    calls = []
    real = pipeline.run_group
    monkeypatch.setattr("edgegraph.passbase.run_group", lambda *a: calls.append(a[0].name) or real(*a))
    result = Cleanup().run(digits())
    assert calls == ["cleanup"] and result.stats["rounds"] == 2 and result.stats["fold-batchnorm"] == 7


def test_passes_are_not_changed_by_running():
    p = FoldBatchNorm()
    before = dict(vars(p))
    assert p.run(digits()).modified
    assert vars(p) == before  # the run's name generator was the run's, not the pass's
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.names = None


def test_register_pass_compares_classes_not_names():
    def plugin():
        @dataclass(frozen=True)
        class Prune(Pass):
            name = "test-prune-twice"

        return Prune

    first, second = plugin(), plugin()
    assert first.__qualname__ == second.__qualname__ and first is not second
    registry.register_pass(first)
    registry.register_pass(first)  # the very same class again: fine
    with pytest.raises(ValueError, match="'test-prune-twice' is taken"):
        registry.register_pass(second)
    assert registry.get_pass("test-prune-twice") is first


def test_old_style_passes_are_refused():
    with pytest.raises(TypeError, match="frozen"):
        @dataclass
        class Mutable(Pass):
            name = "test-mutable"

    @dataclass(frozen=True)
    class OldNeeds(Pass):
        name = "test-old-needs"
        requires = frozenset({"calibration"})  # what context needs were called before `needs`

    with pytest.raises(TypeError, match="`needs`"):
        registry.register_pass(OldNeeds)


def test_exact_pass_after_quant_is_verified_unoptimized(monkeypatch):
    from edgegraph.passes.quant.static import StaticQuantize

    seen = []
    real = pipeline._Checker._outputs

    def outputs(self, model, *, isolated=False, optimize=None):
        seen.append((RAN[-1] if RAN else "", optimize))
        return real(self, model, isolated=isolated, optimize=optimize)

    monkeypatch.setattr(pipeline._Checker, "_outputs", outputs)
    _, report = run_pipeline(digits(), [StaticQuantize(check_speed=False), Marker(change=True)], context())
    assert report.passes[-1].name == "test-marker" and report.passes[-1].metrics
    after_quant = [flag for ran, flag in seen if ran == "marker(True)"]
    # The changed model and the one it was given, both unoptimized; then the changed one as deployed.
    assert after_quant == [False, None, False]


def test_the_contract_sits_below_registry_spec_and_manager():
    # No import cycle: the registry and the spec parser need the contract, not the manager.
    code = ("import sys, edgegraph.registry, edgegraph.spec, edgegraph.passbase; "
            "print('edgegraph.pipeline' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    import edgegraph

    assert edgegraph.Pass is Pass and edgegraph.PassResult is PassResult and edgegraph.option is option
