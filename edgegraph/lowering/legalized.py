"""`nnapi`, `coreml`, `coreml-nn`, `qnn`, `xnnpack`, `tensorrt`: the legalized ONNX model these
targets' converters take.

These runtimes compile ONNX themselves: onnxruntime's NNAPI, CoreML, QNN and XNNPACK execution
providers partition the ONNX graph on the device, and TensorRT's parser (`trtexec --onnx`) reads
it. Their lowering is what `legalize` makes of the model for the target's profile (dynamic input
dims fixed to the data's shapes first where the profile needs static shapes), written as ONNX once
`edgegraph check` finds it one partition over 99% of its nodes (XNNPACK, a helper of the CPU
provider: whatever its share) and the outputs match onnxruntime's on the original. The device
runtimes do not run here (Android, Apple, Qualcomm and NVIDIA hardware): the written model runs in
onnxruntime's CPU provider, and the notes say so.
"""

from __future__ import annotations

from pathlib import Path

from edgegraph import ir, runtime
from edgegraph.errors import EdgegraphError, one_line, shown
from edgegraph.lowering import Artifact, LoweringError, Target, run_passes

# profile -> the converter or runtime that takes the written ONNX (named in the notes)
RUNTIMES = {
    "nnapi": "onnxruntime's NNAPI execution provider (Android)",
    "coreml": "onnxruntime's CoreML execution provider, ML Program (Apple)",
    "coreml-nn": "onnxruntime's CoreML execution provider, NeuralNetwork (Apple)",
    "qnn": "onnxruntime's QNN execution provider, HTP (Qualcomm)",
    "xnnpack": "onnxruntime's XNNPACK execution provider (beside the CPU provider)",
    "tensorrt": "TensorRT's ONNX parser (trtexec --onnx) or onnxruntime's TensorRT execution provider",
}


# XNNPACK accelerates what it has kernels for (Conv, Gemm, pooling, ...) and leaves the rest to the
# CPU provider by design: no single partition is to be had, so its lowering reports the share.
PARTIAL = {"xnnpack"}


def legalize_for(profile: str):
    """The target's preparation: `legalize` for `profile`, verified in onnxruntime like any pass,
    with the options `options["legalize"]` gives ("interface=target,finite=true")."""
    def prepare(model: ir.Model, options: dict) -> tuple[ir.Model, list[str]]:
        given = options.get("legalize") or ""
        if not isinstance(given, str) or any(c in given for c in "()"):  # options of one pass, not a pipeline
            raise EdgegraphError(f"{profile}: --legalize takes legalize's options (interface=target,finite=true), "
                                 f"not {shown(str(given), 80)}")
        return run_passes(model, f"legalize({given})" if given else "legalize", profile)
    return prepare


def _convert(profile: str):
    def convert(model_path: Path, work: Path, batches, options: dict, *, threads: int = 0) -> Artifact:
        try:
            session = runtime.session(model_path, threads=threads, optimize=True)
            specs = runtime.input_specs(session)  # legalize(interface=target) may change input dtypes
            outputs = [runtime.run(session, runtime.adapt_feeds(specs, feeds)) for feeds in batches]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise LoweringError(f"{profile}: the legalized model does not run in onnxruntime: {one_line(exc)}; "
                                "nothing was written", "run") from None
        return Artifact(files={"model": model_path}, outputs=outputs,
                        notes=[f"checked in onnxruntime's CPU provider: {RUNTIMES[profile]} takes the file, "
                               "and does not run on this machine"])
    return convert


def _target(profile: str) -> Target:
    from edgegraph.targets import load

    return Target(profile, profile, f"legalized ONNX for {RUNTIMES[profile]}", _convert(profile),
                  prepare=legalize_for(profile), static_shapes=load(profile).static_shapes, suffix=".onnx",
                  legalizes=True, whole_graph=profile not in PARTIAL)


TARGETS = [_target(profile) for profile in RUNTIMES]
