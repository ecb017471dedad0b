"""Runs in the TFLite peer environment (onnx2tf, TensorFlow, LiteRT; never edgegraph itself):
`python -I -B _tflite_peer.py WORK OPTIONS_JSON`.

Converts WORK/model/model.onnx (a private copy) with onnx2tf into WORK/tf (a Q/DQ model, with
OPTIONS["activations"] == "int8", into an int8 .tflite: see `_fake_quantize_activations`), then
runs the .tflite in the LiteRT interpreter on WORK/inputs.npz and writes WORK/outputs.npz and
WORK/result.json. Before anything is imported, an audit hook confines the process: no network
(socket connects and name look-ups), no child processes (onnx2tf would run `onnxsim` from PATH),
and no file written, renamed or removed outside WORK. (Native code that writes files without
Python's I/O is not seen by the hook; TensorFlow's caches are pointed into WORK through HOME and
TMPDIR by the parent.) onnx2tf's calibration image sample, which it downloads for 3-channel
image models, is a seeded random file the parent leaves in WORK, the folder it looks in first.
"""

import json
import os
import sys

WORK = os.path.realpath(sys.argv[1])
OPTIONS = json.loads(sys.argv[2])

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod",
                "os.chown", "os.symlink", "os.link", "os.utime", "shutil.copyfile", "shutil.copytree",
                "shutil.move", "os.replace"}
_PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
                   "pty.spawn"}
_NETWORK_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                   "socket.sendto", "urllib.Request"}


def _inside(path) -> bool:
    if isinstance(path, int):  # a file descriptor: opened (and so checked) before
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == WORK or real.startswith(WORK + os.sep) or real == os.devnull


def _guard(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"edgegraph's TFLite sandbox: no writing outside the work folder ({path})")
    elif event in _PATH_EVENTS:
        for value in args:
            if isinstance(value, str | bytes | os.PathLike) and not _inside(value):
                raise PermissionError(f"edgegraph's TFLite sandbox: {event} outside the work folder ({value})")
    elif event in _PROCESS_EVENTS:
        raise PermissionError(f"edgegraph's TFLite sandbox: no child processes ({event} {args[:2]})")
    elif event in _NETWORK_EVENTS:
        raise PermissionError(f"edgegraph's TFLite sandbox: no network ({event})")


sys.addaudithook(_guard)

import numpy as np  # noqa: E402 - after the hook, on purpose


def _convert() -> str:
    import onnx2tf

    if OPTIONS.get("activations") == "int8":
        _fake_quantize_activations()
    keras_model = onnx2tf.convert(
        input_onnx_file_path=os.path.join(WORK, "model", "model.onnx"),
        output_folder_path=os.path.join(WORK, "tf"),
        copy_onnx_input_output_names_to_tflite=True,
        not_use_onnxsim=True,  # it would run `onnxsim` from PATH in a child process
        non_verbose=True,
    )
    if OPTIONS.get("activations") != "int8":
        return os.path.join(WORK, "tf", "model_float32.tflite")
    # TensorFlow's converter turns FakeQuant ranges into int8 tensors (its quantization-aware
    # training path): the kernels are int8, with the ONNX model's own activation scales, and
    # the weights (already int8 values times their scale) quantized per channel again, to the
    # same integers where a channel's largest weight sits on +-127.
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    path = os.path.join(WORK, "tf", "model_int8.tflite")
    with open(path, "wb") as handle:
        handle.write(converter.convert())
    return path


def _fake_quantize_activations() -> None:
    """onnx2tf makes a QuantizeLinear whose readers are all DequantizeLinear an identity (and the
    DequantizeLinear of it one too), so the model computes in float. Instead, such a pair with a
    per-tensor 8-bit scale and zero point becomes one FakeQuant over the same grid:
    [(qmin - zp) * s, (qmax - zp) * s] in 255 steps is s, with zero at zp."""
    import importlib

    import onnx_graphsurgeon as gs
    import tensorflow as tf

    module = importlib.import_module("onnx2tf.ops.QuantizeLinear")
    original = module.make_node

    def make_node(*, graph_node, tf_layers_dict, **kwargs):
        original(graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kwargs)
        output = graph_node.outputs[0]
        inputs = graph_node.inputs
        readers = output.outputs
        if not readers or any(r.op != "DequantizeLinear" for r in readers):
            return  # not the pair onnx2tf bypasses
        scale = inputs[1].values if isinstance(inputs[1], gs.Constant) else None
        zero = inputs[2].values if len(inputs) > 2 and isinstance(inputs[2], gs.Constant) else np.zeros((), np.uint8)
        if scale is None or scale.size != 1 or zero.size != 1 or zero.dtype not in (np.int8, np.uint8):
            return  # per-channel or 16-bit activations stay float
        s, zp, limits = float(scale.reshape(())), int(zero.reshape(())), np.iinfo(zero.dtype)
        tf_layers_dict[output.name]["tf_node"] = tf.quantization.fake_quant_with_min_max_args(
            tf_layers_dict[output.name]["tf_node"], min=(limits.min - zp) * s, max=(limits.max - zp) * s, num_bits=8)

    module.make_node = make_node


# The ops that carry a model's MACs: int8 or not is what an int8 lowering is about.
COMPUTE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL"}


def _interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite.python.interpreter import Interpreter
    return Interpreter(model_path=path, num_threads=OPTIONS.get("threads") or None)


def _channels_last(shape):
    return (0, *range(2, len(shape)), 1) if len(shape) >= 3 else None


def _run(path: str) -> dict:
    """Run the .tflite on every batch of inputs.npz, through its signature (named like the
    ONNX model's inputs and outputs) when it has one, else its tensors in order."""
    interpreter = _interpreter(path)
    details = interpreter._get_ops_details()
    ops = sorted({d.get("op_name", "?") for d in details})
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    compute = [d for d in details if d.get("op_name") in COMPUTE_OPS]
    int8 = [d for d in compute if dtypes.get(d["inputs"][0]) == np.int8]
    signatures = interpreter.get_signature_list()
    runner = interpreter.get_signature_runner() if signatures else None
    if runner is not None:
        ins = runner.get_input_details()  # name -> detail
        out_names = list(runner.get_output_details())
    else:
        interpreter.allocate_tensors()
        ins = {d["name"]: d for d in interpreter.get_input_details()}
        out_names = [d["name"] for d in interpreter.get_output_details()]
    with np.load(os.path.join(WORK, "inputs.npz")) as archive:
        arrays = {key: archive[key] for key in archive.files}
    results, layouts = {}, {}
    for index in range(OPTIONS["batches"]):
        feeds = {}
        for position, (name, detail) in enumerate(ins.items()):
            onnx_name = name if name in OPTIONS["inputs"] else OPTIONS["inputs"][position]
            array = arrays[f"{index}/{onnx_name}"]
            want = tuple(detail["shape"])
            if array.shape != want:
                perm = _channels_last(array.shape)
                if perm is None or tuple(array.shape[p] for p in perm) != want:
                    raise ValueError(f"input {onnx_name}: data {array.shape}, the TFLite model wants {want}")
                array = array.transpose(perm)
                layouts[onnx_name] = list(perm)
            feeds[name] = np.ascontiguousarray(array.astype(detail["dtype"]))
        if runner is not None:
            got = runner(**feeds)
        else:
            for name, value in feeds.items():
                interpreter.set_tensor(ins[name]["index"], value)
            interpreter.invoke()
            got = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
        for name in out_names:
            results[f"{index}/{name}"] = got[name]
    np.savez(os.path.join(WORK, "outputs.npz"), **results)
    return {"ops": ops, "inputs": list(ins), "outputs": out_names, "input_layouts": layouts,
            "compute_ops": len(compute), "int8_ops": len(int8)}


def _selftest() -> dict:
    """What the sandbox refuses (for edgegraph's tests): a connection, a write outside WORK, a
    child process; and that a write inside WORK works."""
    import socket
    import subprocess

    attempts = {
        "network": lambda: socket.create_connection(("127.0.0.1", 9), timeout=1),
        "write outside": lambda: open(OPTIONS["outside"], "w"),
        "rename outside": lambda: os.rename(os.path.join(WORK, "inside.txt"), OPTIONS["outside"]),
        "child process": lambda: subprocess.run(["true"], check=False),
    }
    with open(os.path.join(WORK, "inside.txt"), "w") as handle:
        handle.write("ok")
    refused = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            refused[what] = False
        except PermissionError:
            refused[what] = True
        except OSError:  # e.g. nothing listening: the attempt got through the sandbox
            refused[what] = False
    return {"stage": "selftest", "refused": refused}


def _described(exc: BaseException) -> str:
    """The exception and where onnx2tf raised it (which op's converter: the file says)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "onnx2tf" in f.filename]
    where = f" (in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def main() -> int:
    if OPTIONS.get("selftest"):
        with open(os.path.join(WORK, "result.json"), "w") as handle:
            json.dump(_selftest(), handle)
        return 0
    result = {}
    try:
        path = _convert()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which says it in one line
        result = {"stage": "convert", "error": _described(exc)}
    else:
        try:
            result = {"stage": "done", "tflite": path} | _run(path)
        except BaseException as exc:  # noqa: BLE001
            result = {"stage": "run", "tflite": path, "error": _described(exc)}
    with open(os.path.join(WORK, "result.json"), "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
