"""Channel coupling groups: removing the channels of any group the analysis calls prunable gives
exactly the outputs of the model where those channels were zeroed (run in onnxruntime)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgegraph import ir, modelio, runtime
from edgegraph.analysis import channels
from fixtures import channels as fx

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
SHARED = sorted(MODELS.glob("*/*.onnx")) if MODELS.is_dir() else []


def _feeds(model: ir.Model, path: Path | None = None) -> dict[str, np.ndarray]:
    reference = path.with_suffix(".reference_io.npz") if path is not None else None
    if reference is not None and reference.exists():
        data = np.load(reference)
        return {k[len("input__"):]: data[k] for k in data.files if k.startswith("input__")}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runtime.input_specs(model):
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 32) for i, d in enumerate(spec.shape or ())]
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.normal(0, 1, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feeds


def _run(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(model.to_proto()), feeds)


def _params(model: ir.Model) -> int:
    return sum(int(np.prod(c.values.shape)) for c in channels._constant_holders(model.graph).values())


def _cut(group: channels.Group, rng: np.random.Generator) -> list[int]:
    """Some channels of a group, never all (at least one channel of each member stays)."""
    count = max(1, group.channels // 2)
    return sorted(rng.choice(group.channels, size=count, replace=False).tolist())


def assert_exact(model: ir.Model, cuts, feeds) -> None:
    """Zero the cut channels, remove them, and compare the two models' outputs."""
    zeroed = model.copy()
    channels.zero_channels(zeroed.graph, cuts)
    pruned = zeroed.copy()
    channels.remove_channels(pruned.graph, cuts)
    assert _params(pruned) < _params(zeroed)
    want, got = _run(zeroed, feeds), _run(pruned, feeds)
    for name, expected in want.items():
        # Removing zero terms only changes the order of float sums: a few ulps of the output dtype.
        rtol = 1e-4 if expected.dtype != np.float16 else 4e-3
        expected = expected.astype(np.float64)
        assert np.all(np.isfinite(expected)), name
        actual = got[name].astype(np.float64)
        assert actual.shape == expected.shape, name
        scale = max(float(np.abs(expected).max()), 1e-6)
        err = float(np.abs(actual - expected).max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} against {scale:.3g}"


def _prunable(model: ir.Model) -> list[channels.Group]:
    return [g for g in channels.groups(model.graph) if g.prunable and g.channels > 1]


# --- fixtures: every group ---------------------------------------------------------------------

FIXTURES = {name: build for name, build in vars(fx).items() if name.startswith("build_")}
CUTTABLE = sorted(name for name in FIXTURES if name != "build_blocked")


@pytest.mark.parametrize("name", CUTTABLE)
def test_fixture_groups_cut_exactly(name):
    model = ir.from_proto(FIXTURES[name]())
    groups = _prunable(model)
    assert groups, "the fixture has prunable groups"
    feeds = _feeds(model)
    rng = np.random.default_rng(0)
    for group in groups:
        assert_exact(model, [(group, _cut(group, rng))], feeds)


def test_fixture_group_counts():
    """Coupling is what the architecture says: the residual ties its producers together, the concat
    keeps its inputs apart, the depthwise conv ties its input to its output, and channels reaching
    a graph output are not prunable."""
    counts = {}
    for name, build in FIXTURES.items():
        found = channels.groups(ir.from_proto(build()).graph)
        counts[name] = (len(found), sum(g.prunable for g in found))
    assert counts == fx.EXPECTED


def test_residual_group_has_every_producer():
    groups = channels.groups(ir.from_proto(fx.build_residual()).graph)
    residual = next(g for g in groups if ("add1", 1) in g.members)
    cut = {s.constant for s in residual.slices}
    assert {"w_stem", "w_b2", "bn_s", "bn_b", "bn_m", "bn_v", "w_head"} <= cut
    assert residual.prunable
    assert "group" in residual.describe() and "prunable" in residual.describe()


def test_reasons():
    groups = channels.groups(ir.from_proto(fx.build_blocked()).graph)
    reasons = {r for g in groups for r in g.reasons}
    assert "reaches a graph output" in reasons
    assert "Reshape with a computed shape" in reasons
    assert "read by an op with no rule: LRN" in reasons
    assert all(not g.prunable for g in groups if g.reasons)


def test_unprunable_group_refuses_surgery():
    model = ir.from_proto(fx.build_blocked())
    fixed = next(g for g in channels.groups(model.graph) if not g.prunable)
    with pytest.raises(ValueError, match="cannot be pruned"):
        channels.remove_channels(model.graph, [(fixed, [0])])


# --- shared models: every prunable group ------------------------------------------------------------


@pytest.mark.skipif(not SHARED, reason=f"no shared models in {MODELS}")
@pytest.mark.parametrize("path", SHARED, ids=[p.parent.name + "/" + p.stem for p in SHARED])
def test_shared_model_groups_cut_exactly(path):
    model = modelio.load(path)
    start = time.perf_counter()
    found = channels.groups(model.graph)
    assert time.perf_counter() - start < 20
    ends = {t.name for t in [*model.graph.inputs, *model.graph.outputs]}
    assert not any(g.prunable and {name for name, _ in g.members} & ends for g in found)
    groups = [g for g in found if g.prunable and g.channels > 1]
    if not groups:
        pytest.skip(f"{path.name}: no prunable group ({'; '.join(sorted({r for g in found for r in g.reasons})[:3])})")
    rng = np.random.default_rng(0)  # every group at once, half of its channels each (two sessions a model)
    assert_exact(model, [(g, _cut(g, rng)) for g in groups], _feeds(model, path))
