"""`tflite`: a .tflite model made by onnx2tf and checked in the LiteRT interpreter.

onnx2tf pins TensorFlow 2.19, onnx 1.19 and numpy 1.26, which clash with edgegraph's, so it
lives in a peer virtualenv (`edgegraph lower --setup tflite` makes it; `$EDGEGRAPH_TFLITE_VENV`
names it, default `<edgegraph's venv>-peer`) and runs as a child process (`_tflite_peer.py`)
on a private copy of the model in a temporary folder: onnx2tf rewrites its input file, runs
`onnxsim` from PATH and downloads a calibration sample from the internet, and the child can do
none of these (see the peer script's sandbox). The child converts, then runs the .tflite on the
verification inputs (NCHW inputs transposed to the NHWC the model takes); the outputs come back
here and are put back in the ONNX model's layout before they are compared.

Before conversion: dynamic input dims are fixed to the data's shapes (batch 1), and constant
DequantizeLinear chains (edgegraph's int8 weights and int32 biases) are folded to float weights,
activations keeping their Q/DQ: onnx2tf converts weight DQ into a TFLite model that runs and is
silently wrong (cosine 0.00-0.83 on the shared models).

A Q/DQ model becomes an int8 TFLite model with the ONNX model's own activation scales: onnx2tf
would make each activation Q/DQ pair an identity (a float model with int8-rounded weights, as
large as the float one), so the peer turns each pair into a FakeQuant over the same grid and
TensorFlow's converter makes int8 kernels of them (its quantization-aware-training path). Where
onnxruntime's QDQ fusion absorbs a Clip into the Conv before it, the Conv's output gets a copy of
the Clip's Q/DQ (`quantize_before_clips`), without which TensorFlow keeps that Conv in float.

Why onnx2tf and not another route: onnx-tf is unmaintained since 2022 (TensorFlow 2.x <= 2.10
only), litert-torch starts from PyTorch, not ONNX, and TensorFlow's converter takes TF models
only; onnx2tf is the maintained ONNX -> TFLite converter, and what it lacks (in-place writes,
network, subprocesses, wrong QDQ weights) is what this module works around.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.context import STAGES
from edgegraph.errors import EdgegraphError, shown
from edgegraph.lowering import Artifact, LoweringError, Target, run_passes

ONNX2TF = "onnx2tf==1.29.24"  # the last release for Python 3.11 (pins tensorflow 2.19, ai-edge-litert 2.1)
VENV_VARIABLE = "EDGEGRAPH_TFLITE_VENV"
PEER_SCRIPT = Path(__file__).with_name("_tflite_peer.py")
TIMEOUT = 3600  # seconds for one conversion (MiniLM takes minutes on 2 cores)
# onnx2tf reads this file from its working folder before it tries to download it.
CALIBRATION_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def venv() -> Path:
    return Path(os.environ.get(VENV_VARIABLE) or f"{sys.prefix.rstrip(os.sep)}-peer")


def peer_python() -> Path:
    return venv() / "bin" / "python"


def available() -> str | None:
    """None when the peer environment is there, else why not (for skips and errors)."""
    if not peer_python().is_file():
        return (f"no TFLite peer environment at {venv()} (make it with `edgegraph lower --setup tflite`, "
                f"or name one with ${VENV_VARIABLE})")
    return None


def setup(log=print) -> Path:
    """Make the peer virtualenv and install onnx2tf (and its pinned TensorFlow) into it."""
    where = venv()
    log(f"making the TFLite peer environment at {where} ({ONNX2TF}; about 1.5 GB)")
    for command in ([sys.executable, "-m", "venv", str(where)],
                    [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", ONNX2TF]):
        done = subprocess.run(command, check=False)
        if done.returncode:
            raise EdgegraphError(f"setup failed: {' '.join(command)} exited with {done.returncode}")
    log(f"done: `edgegraph lower M.onnx --target tflite -o M.tflite` will use {where}")
    return where


def prepare(model: ir.Model, options: dict | None = None) -> tuple[ir.Model, list[str]]:
    """What onnx2tf is given: encoded weights folded (`fold_decoded_weights`), node names that
    are valid TensorFlow scopes (`/head/conv/Conv`, `Softmax@0` are not; onnx2tf names its ops
    after them and stops)."""
    folded, notes = fold_decoded_weights(model)
    folded, simplified = simplify(folded)
    notes += simplified
    notes += quantize_before_clips(folded)
    renamed = 0
    taken = {n.name for g in ir.iter_graphs(folded.graph) for n in g.nodes}
    for graph in ir.iter_graphs(folded.graph):
        for index, node in enumerate(graph.nodes):
            if _TF_SCOPE.fullmatch(node.name or ""):
                continue
            name = re.sub(r"[^A-Za-z0-9_.\\/>-]", "_", node.name or "").lstrip("/_-\\>") or f"node_{index}"
            name = name if _TF_SCOPE.fullmatch(name) and name not in taken else f"n{index}_{name}"
            while name in taken:
                name += "_"
            taken.add(name)
            node.name = name
            renamed += 1
    return folded, notes + ([f"renamed {renamed} node(s) to valid TensorFlow scope names"] if renamed else [])


# Instead of onnxsim (which onnx2tf would run from PATH): edgegraph's exact passes, verified.
# onnx2tf needs constant subgraphs folded (MNIST's Reshape of a weight is otherwise a constant
# it cannot make a layer output of).
SIMPLIFY = "cleanup"


def simplify(model: ir.Model) -> tuple[ir.Model, list[str]]:
    # With the tflite profile: cleanup's fuse-activations would otherwise fuse legalized
    # HardSigmoid (PP-OCR) back, which the check after this refuses.
    return run_passes(model, SIMPLIFY, TARGET.profile)


# Ops whose int8 kernels TFLite's converter makes only when their output has a range of its own.
_INTEGER_KERNELS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def quantize_before_clips(model: ir.Model) -> list[str]:
    """Give `Conv -> Clip -> QuantizeLinear` a copy of that Q/DQ between the Conv and the Clip.
    onnxruntime runs the Conv as one integer kernel into the Clip's quantized range (its QDQ
    fusion absorbs the Clip); TensorFlow's converter needs that range on the Conv's own output,
    else it keeps the Conv in float (PP-OCR's squeeze-excite convs, whose HardSigmoid is a Clip).
    Q(Clip(DQ(Q(x)))) = Q(x) where the Clip's bounds hold the quantized range, as onnxruntime's
    fusion assumes; the lowering's comparison with onnxruntime checks the rest."""
    count = 0
    for graph in ir.iter_graphs(model.graph):
        names = ir.Namer(graph)
        for clip in [n for n in graph.nodes if n.op == "Clip" and ir.is_standard(n)]:
            source = ir.producer(clip.inputs[0])
            readers = ir.consumers(clip.outputs[0])
            if (source is None or source.op not in _INTEGER_KERNELS or len(ir.consumers(clip.inputs[0])) != 1
                    or ir.is_graph_output(graph, clip.inputs[0]) or len(readers) != 1
                    or readers[0].op != "QuantizeLinear"):
                continue
            quantize = readers[0]
            raw = clip.inputs[0]
            coded = gs.Variable(names(f"{raw.name}_q"), dtype=None)
            decoded = gs.Variable(names(f"{raw.name}_dq"), dtype=raw.dtype, shape=raw.shape)
            graph.nodes += [gs.Node("QuantizeLinear", name=names(f"{clip.name}_q"), attrs=dict(quantize.attrs),
                                    inputs=[raw, *quantize.inputs[1:]], outputs=[coded]),
                            gs.Node("DequantizeLinear", name=names(f"{clip.name}_dq"), attrs=dict(quantize.attrs),
                                    inputs=[coded, *quantize.inputs[1:]], outputs=[decoded])]
            ir.set_inputs(clip, [decoded, *clip.inputs[1:]])
            count += 1
        if count:
            ir.sort_nodes(graph)
    return [f"quantized {count} Conv output(s) before their Clip, as onnxruntime's fusion does"] if count else []


_TF_SCOPE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")


def fold_decoded_weights(model: ir.Model) -> tuple[ir.Model, list[str]]:
    """A copy of `model` whose weights stored encoded (DequantizeLinear of int8 weights and int32
    biases, weight-only `Cast(int8) * scale`: MiniLM, codebook Gathers) are float initializers;
    the Q/DQ pairs on activations stay. onnx2tf reads constant DQ as float weights only after
    this (its int8 models are otherwise silently wrong), and it searches transpositions for
    every binary op, the constant-only decode Mul included, crashing there ('NoneType' object
    has no attribute 'shape', common_functions.py). The decode runs in onnxruntime
    (`ir.folded_value`), so the float weights are what the encoded model computes, bit for bit."""
    from edgegraph.analysis import encoding

    model = model.copy()
    count = 0
    for graph in ir.iter_graphs(model.graph):
        opset = int(graph.opset or model.opset)
        decoded = encoding.decoded_weights(graph)
        # DQ of any other constant too: an int32 bias is no low-bit payload, so `encoding` does not
        # count it as an encoded weight. (A DQ inside a decode chain goes with its chain.)
        in_chains = {id(n) for _, code in decoded for n in code.nodes}
        constant_dq = [n.outputs[0] for n in graph.nodes if n.op == "DequantizeLinear" and ir.is_standard(n)
                       and id(n) not in in_chains and all(ir.constant_value(t) is not None for t in n.inputs if t.name)]
        for tensor in [t for t, _ in decoded] + constant_dq:
            value = ir.folded_value(tensor, opset)
            if value is None:
                continue
            ir.replace_all_uses(graph, tensor, ir.const(f"{tensor.name}_folded", np.ascontiguousarray(value)))
            count += 1
        graph.cleanup()
    return model, ([f"folded {count} encoded weight(s)/bias(es) into float initializers"] if count else [])


def convert(model_path: Path, work: Path, batches, options: dict, *, threads: int = 0) -> Artifact:
    missing = available()
    if missing:
        raise EdgegraphError(f"tflite: {missing}")
    names = [n for n in batches[0]]
    np.savez(work / "inputs.npz", **{f"{i}/{name}": np.asarray(v) for i, b in enumerate(batches) for name, v in b.items()})
    rng = np.random.default_rng(0)  # what onnx2tf probes 3-channel image models with, instead of its download
    np.save(work / CALIBRATION_SAMPLE, rng.random((20, 128, 128, 3), dtype=np.float32))
    quantized = _has_qdq(model_path)
    STAGES.info("tflite: converting with onnx2tf in %s", venv())
    done, result = run_peer(work, {"inputs": names, "batches": len(batches), "threads": threads,
                                   "activations": "int8" if quantized else "float"}, threads=threads)
    if result.get("error"):
        what = "onnx2tf cannot convert the model" if result["stage"] == "convert" else \
            "the .tflite does not run in the LiteRT interpreter"
        raise LoweringError(f"tflite: {what}: {shown(_why(result['error'], done.stdout + done.stderr), 600)}; "
                            "nothing was written", result["stage"])
    flex = [op for op in result["ops"] if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")]
    outputs = _outputs(work / "outputs.npz", result["outputs"], len(batches))
    notes = [f"TFLite ops: {', '.join(result['ops'])}"]
    if quantized:
        notes.append(f"int8 TFLite: {result['int8_ops']} of {result['compute_ops']} compute ops run on int8 tensors "
                     "(activation scales from the model's Q/DQ)")
    if result["input_layouts"]:
        notes.append("inputs are channels-last: " + ", ".join(f"{k} transposed {tuple(v)}"
                                                             for k, v in result["input_layouts"].items()))
    return Artifact(files={"model": Path(result["tflite"])}, outputs=outputs, notes=notes,
                    unsupported_after=[f"{op} (not a builtin TFLite op)" for op in flex])


def run_peer(work: Path, options: dict, *, threads: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the peer script on the work folder `work` (its cwd, HOME and TMPDIR: TensorFlow's
    caches land there) with a minimal environment; (the process, its result.json)."""
    for folder in ("home", "tmp"):
        (work / folder).mkdir(exist_ok=True)
    env = {"PATH": os.defpath, "HOME": str(work / "home"), "TMPDIR": str(work / "tmp"),
           "XDG_CACHE_HOME": str(work / "home"), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": str(threads or os.cpu_count() or 1)}
    command = [str(peer_python()), "-I", "-B", str(PEER_SCRIPT), str(work), json.dumps(options)]
    try:
        done = subprocess.run(command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise LoweringError(f"tflite: onnx2tf did not finish in {TIMEOUT}s; nothing was written") from None
    result_file = work / "result.json"
    if not result_file.is_file():
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise LoweringError(f"tflite: the onnx2tf process ended with status {done.returncode} "
                            f"({shown(' | '.join(tail), 600)}); nothing was written")
    return done, json.loads(result_file.read_text())


def _has_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _why(error: str, log: bytes) -> str:
    """onnx2tf reports a failure by printing ERROR lines and exiting: those lines say why."""
    if not error.startswith("SystemExit"):
        return error
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", log.decode(errors="replace"))  # its colours
    lines = [line.strip() for line in text.splitlines() if "ERROR" in line or "Error" in line]
    return " | ".join(lines[-3:]) or error


def _outputs(path: Path, names: list[str], count: int) -> list[dict[str, np.ndarray]]:
    with np.load(path) as archive:
        return [{name: archive[f"{i}/{name}"] for name in names} for i in range(count)]


def to_onnx_layout(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`outputs` of the TFLite model under the ONNX output names (by name; else the one output
    left whose shape fits), channels-first again where the TFLite output is the channels-last
    form of the ONNX one."""
    def fitted(ref: np.ndarray, value: np.ndarray) -> np.ndarray | None:
        ref_shape, shape = np.shape(ref), np.shape(value)
        if shape == ref_shape:
            return value
        if len(shape) >= 3:
            perm = (0, len(shape) - 1, *range(1, len(shape) - 1))  # NHWC -> NCHW
            if tuple(shape[p] for p in perm) == ref_shape:
                return np.transpose(value, perm)
        return None

    left = {k: v for k, v in outputs.items() if k not in reference}
    mapped = {}
    for name, ref in reference.items():
        if name in outputs:
            value = outputs[name]
        else:
            fits = [k for k, v in left.items() if fitted(ref, v) is not None]
            value = left.pop(fits[0]) if len(fits) == 1 else np.empty(0)
        fit = fitted(ref, value)
        mapped[name] = fit if fit is not None else value  # a mismatched shape fails the comparison
    return mapped


TARGET = Target("tflite", "tflite", "TFLite (.tflite) through onnx2tf in a peer environment, checked in LiteRT",
                convert, prepare=prepare, relayout=to_onnx_layout, batch_size=1, static_shapes=True)
