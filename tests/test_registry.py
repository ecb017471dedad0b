"""The contract every built-in pass keeps, checked over the registry so that a new pass is covered
the moment it registers: documented, kebab-case, typed options with defaults, its own tests,
deterministic, and honest about doing nothing."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import DEFAULT_DIR
from edgegraph import modelio, registry, runtime
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.passbase import Pass
from edgegraph.pipeline import PassRecord, run_pipeline
from edgegraph.spec import describe_type
from fixtures import cleanup as cfx
from fixtures import equalize as efx
from fixtures.legalize import hard_sigmoid_then_sigmoid
from test_fuse_activations import hard_swish

TESTS = Path(__file__).resolve().parent
KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

# Each built-in pass -> the test module that tests it. A new pass fails test_every_pass_has_a_test_module
# until it is listed here with a module that exists and names it.
TEST_MODULES = {
    "cleanup": "test_cleanup.py", "cse": "test_cleanup.py", "dedup-initializers": "test_cleanup.py",
    "eliminate-dead": "test_cleanup.py", "fold-batchnorm": "test_cleanup.py", "fold-constants": "test_cleanup.py",
    "fuse-activations": "test_fuse_activations.py", "fuse-linear": "test_cleanup.py", "remove-identity": "test_cleanup.py",
    "simplify-shapes": "test_cleanup.py", "equalize": "test_equalize.py", "quant": "test_quant.py",
    "quant-dynamic": "test_quant_dynamic.py", "quant-int4": "test_quant_int4.py",
    "frame-cache": "test_framecache.py", "legalize": "test_legalize.py", "prune": "test_prune.py",
    "codebook": "test_codebook.py", "sparsify": "test_sparsify.py",
}


def builtin_passes() -> list[type[Pass]]:
    # Other test modules register test passes in the same session: the contract is the built-ins'.
    return [cls for cls in registry.list_passes() if cls.__module__.startswith("edgegraph.passes.")]


BUILTINS = builtin_passes()
NAMES = [cls.name for cls in BUILTINS]


def test_the_builtins_are_all_there():
    assert set(NAMES) == set(TEST_MODULES)


@pytest.mark.parametrize("cls", BUILTINS, ids=NAMES)
def test_pass_is_documented_and_named(cls):
    assert KEBAB.match(cls.name), cls.name
    assert cls.summary.strip() and "\n" not in cls.summary and len(cls.summary) <= 120
    assert cls.__doc__ and cls.__doc__.strip()
    assert isinstance(cls.exact, bool)
    assert cls.needs <= {"calibration", "target"}


@pytest.mark.parametrize("cls", BUILTINS, ids=NAMES)
def test_options_are_typed_documented_and_defaulted(cls):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    hints = typing.get_type_hints(cls)
    defaults = cls()  # every option has a default
    for f in dataclasses.fields(cls):
        assert f.name in hints and hints[f.name] is not typing.Any, f"{cls.name}.{f.name} has no type"
        assert describe_type(hints[f.name]), f.name
        assert f.metadata.get("doc"), f"{cls.name}.{f.name} has no doc"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    with pytest.raises(dataclasses.FrozenInstanceError):  # per-run state cannot go on the pass
        defaults.run_state = {}


@pytest.mark.parametrize("cls", BUILTINS, ids=NAMES)
def test_every_pass_has_a_test_module(cls):
    module = TESTS / TEST_MODULES[cls.name]
    assert module.is_file(), module
    text = module.read_text()
    assert cls.name in text or cls.__name__ in text, f"{module.name} never mentions {cls.name}"


# -- behaviour, run generically ------------------------------------------------------------------

def _nothing_to_do() -> onnx.ModelProto:
    """y = Sin(x): nothing to fold, fuse, dedup, equalize or quantize."""
    graph = helper.make_graph([helper.make_node("Sin", ["x"], ["y"], name="sin")], "idle",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _digits() -> onnx.ModelProto:
    return onnx.load(DEFAULT_DIR / "digits_cnn.onnx")


# Models a pass is tried on, cheapest first; the determinism check uses the first one it changes.
CANDIDATES = {
    "digits_cnn": _digits, "conv_batchnorm": cfx.conv_batchnorm, "constant_subgraph": cfx.constant_subgraph,
    "no_ops": cfx.no_ops, "layout_chains": cfx.layout_chains, "linear_fusions": cfx.linear_fusions,
    "duplicates": cfx.duplicates, "subgraph_and_function": cfx.subgraph_and_function,
    "mobilenet_block": efx.mobilenet_block, "mlp": efx.mlp, "hard_swish": hard_swish,
    "hard_sigmoid": hard_sigmoid_then_sigmoid,
}


def _context(proto: onnx.ModelProto) -> PassContext:
    calib = CalibrationData.random(runtime.input_specs(proto), 16, seed=0)
    return PassContext(calibration=calib, progress=False, verify=VerifyConfig(enabled=False))


def _quick(cls: type[Pass]) -> Pass:
    # The speed check times the models (only details change); skipping it keeps this quick.
    if cls.name == "legalize":  # (by default it rewrites only what the target lacks: cpu lacks nothing)
        return cls(ops=["HardSigmoid"])
    return cls(check_speed=False) if cls.name == "quant" else cls()


def _run(cls: type[Pass], proto: onnx.ModelProto) -> tuple[bytes, PassRecord]:
    model, report = run_pipeline(modelio.load(proto), [_quick(cls)], _context(proto))
    record = next(r for r in report.passes if r.name == cls.name and r.wanted_by is None)
    return model.to_proto().SerializeToString(), record


@pytest.mark.parametrize("cls", BUILTINS, ids=NAMES)
def test_pass_is_deterministic(cls):
    for name, build in CANDIDATES.items():
        proto = build()
        first, record = _run(cls, proto)
        if not record.modified:
            continue
        second, _ = _run(cls, proto)
        assert first == second, f"{cls.name} on {name}: two runs gave different bytes"
        assert first != modelio.load(proto).to_proto().SerializeToString()
        return
    pytest.fail(f"{cls.name} changed none of {', '.join(CANDIDATES)}: give it a fixture")


@pytest.mark.parametrize("cls", BUILTINS, ids=NAMES)
def test_pass_with_nothing_to_do_says_so_and_changes_nothing(cls):
    proto = _nothing_to_do()
    model = modelio.load(proto)
    before = model.to_proto().SerializeToString()
    p = _quick(cls)
    result = p.run(model, _context(proto))  # the pass itself, without the manager's tidying
    assert result.modified is False
    assert model.to_proto().SerializeToString() == before
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(runtime.run(runtime.session(model.to_proto()), {"x": x})["y"], np.sin(x))
