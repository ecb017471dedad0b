"""Runs in the TFLite peer environment (onnx2tf, TensorFlow, LiteRT; never edgegraph itself):
`python -I -B _tflite_peer.py WORK OPTIONS_JSON`.

Converts WORK/model/model.onnx (a private copy) with onnx2tf into WORK/tf, then runs the
.tflite in the LiteRT interpreter on WORK/inputs.npz and writes WORK/outputs.npz and
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

    onnx2tf.convert(
        input_onnx_file_path=os.path.join(WORK, "model", "model.onnx"),
        output_folder_path=os.path.join(WORK, "tf"),
        copy_onnx_input_output_names_to_tflite=True,
        not_use_onnxsim=True,  # it would run `onnxsim` from PATH in a child process
        non_verbose=True,
    )
    return os.path.join(WORK, "tf", "model_float32.tflite")


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
    ops = sorted({d.get("op_name", "?") for d in interpreter._get_ops_details()})
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
    return {"ops": ops, "inputs": list(ins), "outputs": out_names, "input_layouts": layouts}


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
