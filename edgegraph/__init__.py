"""edgegraph: make trained ONNX models smaller and faster on edge devices.

    import edgegraph
    small = edgegraph.optimize("model.onnx", "cleanup,quant", calib="calib.npz")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgegraph.context import CalibrationData, ImagePreprocess, PassContext, VerifyConfig
from edgegraph.errors import EdgegraphError
from edgegraph.ir import Model, load, save
from edgegraph.pipeline import Pass, PassResult, PipelineReport, option, run_pipeline
from edgegraph.registry import get_pass, list_passes, register_pass
from edgegraph.targets import load_target

__version__ = "0.1.0"


def as_calibration(calib, model: Model) -> CalibrationData | None:
    """Accept CalibrationData, an .npz path, a folder of images, or {input name: array}."""
    from edgegraph.runtime import input_specs

    if calib is None or isinstance(calib, CalibrationData):
        return calib
    names = [s.name for s in input_specs(model.to_proto())]
    if isinstance(calib, Mapping):
        return CalibrationData.from_arrays({k: np.asarray(v) for k, v in calib.items()})
    path = Path(calib)
    if path.is_dir():
        if len(names) != 1:
            raise EdgegraphError(f"an image folder can only feed a single-input model (inputs: {', '.join(names)})")
        return CalibrationData.from_images(path, names[0])
    return CalibrationData.from_npz(path, names)


def optimize(model, passes: str | Sequence[str | Pass], *, calib=None, target: str = "cpu", seed: int = 0,
             verify: bool = True, progress: bool = False) -> onnx.ModelProto:
    """Run a pass pipeline on `model` (path, bytes, ModelProto or Model) and return the new ModelProto.

    `passes` is a spec string (`"cleanup,quant(method=entropy)"`) or a list of names/Pass objects.
    The input is never modified.
    """
    from edgegraph import spec

    loaded = load(model)
    if isinstance(passes, str):
        pipeline = spec.parse(passes)
    else:
        pipeline = [q for p in passes for q in ([p] if isinstance(p, Pass) else spec.parse(p))]
    ctx = PassContext(calibration=as_calibration(calib, loaded), target=load_target(target), seed=seed,
                      verify=VerifyConfig(enabled=verify), progress=progress)
    result, _ = run_pipeline(loaded, pipeline, ctx)
    return result.to_proto()


__all__ = [
    "CalibrationData", "EdgegraphError", "ImagePreprocess", "Model", "Pass", "PassContext", "PassResult",
    "PipelineReport", "VerifyConfig", "get_pass", "list_passes", "load", "load_target", "optimize", "option",
    "register_pass", "run_pipeline", "save",
]
