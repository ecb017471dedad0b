"""edgegraph: make trained ONNX models smaller and faster on edge devices.

    import edgegraph
    small = edgegraph.optimize("model.onnx", "cleanup,quant", calib="calib.npz")

The names below are loaded on first use, so that `import edgegraph` (and the command line's
start-up, where Ctrl-C must already be handled) does not pay for onnx and onnxruntime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CalibrationData": "edgegraph.context", "ImagePreprocess": "edgegraph.context",
    "PassContext": "edgegraph.context", "VerifyConfig": "edgegraph.context",
    "EdgegraphError": "edgegraph.errors",
    "Model": "edgegraph.ir", "load": "edgegraph.modelio", "save": "edgegraph.modelio",
    "Pass": "edgegraph.passbase", "PassResult": "edgegraph.passbase", "PipelineReport": "edgegraph.pipeline",
    "option": "edgegraph.passbase", "run_pipeline": "edgegraph.pipeline",
    "get_pass": "edgegraph.registry", "list_passes": "edgegraph.registry", "register_pass": "edgegraph.registry",
    "load_target": "edgegraph.targets",
    "as_calibration": "edgegraph.api", "check_samples": "edgegraph.api", "image_preprocess_for": "edgegraph.api",
    "make_context": "edgegraph.api", "optimize": "edgegraph.api", "check": "edgegraph.api", "parse_passes": "edgegraph.api",
    "merge_models": "edgegraph.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgegraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
