"""`ort-mobile`: the ORT-format model and the reduced-operator config for onnxruntime's mobile
(minimal) builds, made by onnxruntime's own `convert_onnx_models_to_ort` (its Python API).

Style `runtime` (the default, what NNAPI and CoreML want): basic optimisations applied, the
rest (QDQ fusions into integer kernels) saved to be replayed on the nodes the compiling EP
leaves to the CPU; `fixed`: all optimisations baked in for CPU-only deployment. The config
(`OUT stem.required_operators.config`) is what a reduced build takes (`--include_ops_by_config`).
Both are made for ARM (`session.qdqisint8allowed=1`: int8 Q/DQ may fuse, as on phones).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from edgegraph import runtime
from edgegraph.errors import EdgegraphError, one_line
from edgegraph.lowering import Artifact, LoweringError, Target

STYLES = ("runtime", "fixed")


def config_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.required_operators.config")


def convert(model_path: Path, work: Path, batches, options: dict, *, threads: int = 0):
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    style = options.get("style", "runtime")
    if style not in STYLES:
        raise EdgegraphError(f"ort-mobile: unknown style {style!r} (styles: {', '.join(STYLES)})")
    out = work / "ort"
    chatty = logging.getLogger("ort_format_model.utils")  # logs INFO lines of its own on stderr
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
            convert_onnx_models_to_ort(model_path, output_dir=out, target_platform="arm",
                                       optimization_styles=[OptimizationStyle[style.capitalize()]])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise LoweringError(f"ort-mobile: onnxruntime cannot convert the model to ORT format: {one_line(exc)}; "
                            "nothing was written") from None
    finally:
        chatty.setLevel(level)
    model = next(out.glob("*.ort"))
    config = next(out.glob("*.config"))
    options_ = ort.SessionOptions()
    options_.log_severity_level = 4
    options_.intra_op_num_threads = threads
    options_.inter_op_num_threads = 1
    if style == "runtime":  # replay the saved QDQ fusions, as a deployment would
        options_.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    try:
        session = ort.InferenceSession(str(model), options_, providers=["CPUExecutionProvider"])
        outputs = [runtime.run(session, feeds) for feeds in batches]
    except Exception as exc:  # noqa: BLE001
        raise LoweringError(f"ort-mobile: the ORT-format model does not run in onnxruntime: {one_line(exc)}; "
                            "nothing was written", "run") from None
    ops = sum(1 for line in config.read_text().splitlines() if line and not line.startswith("#"))
    return Artifact(files={"model": model, "config": config}, outputs=outputs,
                    notes=[f"style {style}; the config lists {ops} op domain/opset line(s)"])


def _destinations(output: Path) -> dict[str, Path]:
    return {"model": output, "config": config_path(output)}


TARGET = Target("ort-mobile", "cpu", "ORT-format model + reduced-operator config (onnxruntime mobile builds)",
                convert, destinations=_destinations)
