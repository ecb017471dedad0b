"""Shared test helpers: where the real models and data live, and how to skip without them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
DATA = SHARED / "data"

sys.path.insert(0, str(REPO))  # makes `fixtures` importable


def shared_model_paths() -> list[Path]:
    """Every real model under ../shared/models (empty when the folder is absent)."""
    return sorted(MODELS.glob("*/*.onnx")) if MODELS.is_dir() else []


def require_shared(path: Path) -> Path:
    """Skip the calling test when a ../shared file is missing."""
    if not path.exists():
        pytest.skip(f"{path} not found: the real models/data live in ../shared next to the repo")
    return path


def model_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


# The bundled default model (tools/train_default.py): digits_cnn.onnx, digits_calib.npz, digits_eval.npz.
DEFAULT_DIR = REPO / "fixtures" / "default"


@pytest.fixture
def full_exports(monkeypatch) -> list[str]:
    """Grows by the graph's name at every export to protobuf that carries the large weights
    (those of ir.DETACH_BYTES or more): the copies that cost memory on a multi-GB model."""
    import onnx_graphsurgeon as gs

    from edgegraph import ir

    exports: list[str] = []
    export = gs.export_onnx

    def counting(graph, *args, **kwargs):
        proto = export(graph, *args, **kwargs)
        if any(len(t.raw_data) >= ir.DETACH_BYTES for t in proto.graph.initializer):
            exports.append(proto.graph.name)
        return proto

    monkeypatch.setattr(gs, "export_onnx", counting)
    return exports


@pytest.fixture(scope="session")
def backend_node_cases():
    """Every ONNX backend node test case (collected once: it takes seconds)."""
    import warnings

    import numpy as np
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return collect_testcases(None)


def run_spec(model, data, spec: str, **context):
    """`spec` run on `model` (an onnx proto or path) with `data` as calibration, no verification and
    no progress: (the result as a proto, the last pass's report). `context`: more PassContext fields."""
    from edgegraph import modelio
    from edgegraph.context import CalibrationData, PassContext, VerifyConfig
    from edgegraph.pipeline import run_pipeline
    from edgegraph.spec import parse

    ctx = PassContext(calibration=CalibrationData.from_arrays(data), progress=False,
                      verify=VerifyConfig(enabled=False), **context)
    result, report = run_pipeline(modelio.load(model), parse(spec), ctx)
    return result.to_proto(), report.passes[-1]
