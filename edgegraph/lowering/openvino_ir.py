"""`openvino`: OpenVINO IR (`OUT.xml` + `OUT.bin`) through the `openvino` package (the optional
extra: `pip install -e .[openvino]`), checked in OpenVINO's CPU runtime.

Precision is f32 unless asked (`precision=f16` stores the weights in float16, `bf16` keeps them
f32 and computes in bfloat16): OpenVINO's CPU plugin computes in bf16 by default where the CPU
has it (relative errors up to 0.66 measured on MiniLM), so verification compiles with
INFERENCE_PRECISION_HINT set, and dynamic quantization of MatMul activations is off
(DYNAMIC_QUANTIZATION_GROUP_SIZE=0; MiniLM does not match with it). Both are also written into the
IR's `runtime_options`; the CPU plugin of 2026.4 honours the second one from there, not the first:
deployments compile with `{"INFERENCE_PRECISION_HINT": "f32"}` (the note says so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgegraph.errors import EdgegraphError, one_line
from edgegraph.lowering import Artifact, LoweringError, Target

PRECISIONS = ("f32", "f16", "bf16")


def available() -> str | None:
    """None when the openvino package imports, else why not (for skips and errors)."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"the openvino package is not installed (pip install -e '.[openvino]'): {exc}"
    return None


def compile_config(precision: str) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": precision, "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def convert(model_path: Path, work: Path, batches, options: dict, *, threads: int = 0) -> Artifact:
    missing = available()
    if missing:
        raise EdgegraphError(f"openvino: {missing}")
    import openvino as ov

    precision = options.get("precision", "f32")
    if precision not in PRECISIONS:
        raise EdgegraphError(f"openvino: unknown precision {precision!r} (precisions: {', '.join(PRECISIONS)})")
    config = compile_config(precision)
    xml = work / "ov" / "model.xml"
    xml.parent.mkdir()
    try:
        model = ov.convert_model(str(model_path))
        for key, value in config.items():
            model.set_rt_info(value, ["runtime_options", key])
        ov.save_model(model, str(xml), compress_to_fp16=precision == "f16")
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        raise LoweringError(f"openvino: cannot convert the model: {one_line(exc)}; nothing was written") from None
    core = ov.Core()
    if threads:
        config = config | {"INFERENCE_NUM_THREADS": str(threads)}
    try:
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        request = compiled.create_infer_request()
        names = [out.get_any_name() for out in compiled.outputs]
        outputs = []
        for feeds in batches:
            result = request.infer(feeds)
            outputs.append({name: np.array(result[port]) for name, port in zip(names, compiled.outputs)})
    except Exception as exc:  # noqa: BLE001
        raise LoweringError(f"openvino: the IR does not run in OpenVINO's CPU runtime: {one_line(exc)}; "
                            "nothing was written", "run") from None
    return Artifact(files={"model": xml, "weights": xml.with_suffix(".bin")}, outputs=outputs,
                    notes=[f"OpenVINO {ov.get_version().split('-')[0]}, precision {precision}: compile with "
                           f"{{'INFERENCE_PRECISION_HINT': '{precision}'}} (the CPU default here may be bf16)"])


TARGET = Target("openvino", "openvino", "OpenVINO IR (.xml + .bin), checked in OpenVINO's CPU runtime", convert,
                destinations=lambda output: {"model": output, "weights": output.with_suffix(".bin")}, suffix=".xml")
