"""onnxruntime sessions, feeds and latency: the one place that runs models (statistics of
intermediate tensors are captured by edgegraph.analysis.capture on top of it)."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgegraph import ir, modelio
from edgegraph.errors import NAME_LIMIT, CalibrationDataError, EdgegraphError, shown

logger = logging.getLogger(__name__)

# Errors surface as Python exceptions; ORT's own log lines would only duplicate them on stderr.
ort.set_default_logger_severity(4)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints for fixed dims, str/None for dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def batch_axes(specs: Sequence[InputSpec]) -> dict[str, int | None]:
    """Each input's batch axis, the one samples are stacked along; None for a scalar input
    (e.g. a sample rate), which has none.

    The batch dim is the dim name most inputs carry on axis 0 ("batch"): an input's batch axis
    is where that name sits (axis 1 in a recurrent state [2, batch, 128]). Without the name it
    is axis 0, unless axis 0 is fixed and another is 1 (a fixed state [2, 1, 128] -> axis 1).
    """
    names = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)]
    batch = max(dict.fromkeys(names), key=names.count) if names else None  # ties: the first seen
    axes: dict[str, int | None] = {}
    for spec in specs:
        shape = spec.shape
        if shape is None:
            axes[spec.name] = 0
        elif not shape:
            axes[spec.name] = None
        elif batch is not None and batch in shape:
            axes[spec.name] = shape.index(batch)
        else:
            axes[spec.name] = shape.index(1) if _fixed(shape[0]) and 1 in shape else 0
    return axes


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def input_specs(proto: onnx.ModelProto | ir.Model | ort.InferenceSession) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers).

    From a session no model is exported or read again; an input declared without a shape then
    reads as a scalar's `()` rather than None.
    An input of type optional(tensor) is fed a tensor (its spec is the tensor's); inputs that
    hold no tensor (sequences, maps) cannot be fed: EdgegraphError.
    """
    if isinstance(proto, ort.InferenceSession):
        return [InputSpec(i.name, _ort_dtype(i.type), tuple(i.shape)) for i in proto.get_inputs()]
    if isinstance(proto, ir.Model):
        proto = proto.to_proto(weights=False)
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        type_proto = value.type
        if type_proto.WhichOneof("value") == "optional_type":
            type_proto = type_proto.optional_type.elem_type
        kind = type_proto.WhichOneof("value")
        if kind not in ("tensor_type", None):  # (None: a type left empty, read as a float tensor)
            raise EdgegraphError(f"input '{shown(value.name, NAME_LIMIT)}' is of type {_type_text(value.type)}: only tensor "
                                 "inputs (plain or optional) can be fed, others are not supported")
        tensor_type = type_proto.tensor_type
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.float32
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def _type_text(type_proto: onnx.TypeProto) -> str:
    """onnxruntime's name of a type, e.g. optional(tensor(float)) or sequence(tensor(int64))."""
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(type_proto, kind).elem_type
        name = onnx.TensorProto.DataType.Name(elem).lower() if elem in onnx.TensorProto.DataType.values() else str(elem)
        return f"{kind.removesuffix('_type')}({name})"
    if kind in ("optional_type", "sequence_type"):
        return f"{kind.removesuffix('_type')}({_type_text(getattr(type_proto, kind).elem_type)})"
    return kind.removesuffix("_type") if kind else "unknown"


def _ort_dtype(type_name: str) -> np.dtype:
    # onnxruntime names types after TensorProto's, e.g. "tensor(float16)" for FLOAT16, and
    # "optional(tensor(float))" for an optional one (fed a tensor).
    if type_name.startswith("optional("):
        type_name = type_name.removeprefix("optional(").removesuffix(")")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(type_name[7:-1].upper())))
    except (KeyError, ValueError, TypeError):  # sequences, maps
        return np.dtype(np.float32)


_LEVELS = {
    False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,  # no fusions/layout changes: cheap to probe
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,  # + QDQ and op fusions, no NCHWc
}


def session(model, *, threads: int = 1, optimize: bool | str = False) -> ort.InferenceSession:
    """A CPU session. `optimize=False` disables ORT's graph rewrites (what verification wants);
    True enables all of them (as deployed); "basic" / "extended" pick ORT's intermediate levels.

    Models past protobuf's limit are written with external data to a temporary folder that lives
    as long as the session.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors arrive as exceptions: no second copy on stderr
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = _LEVELS[optimize]
    providers = ["CPUExecutionProvider"]
    if isinstance(model, str | os.PathLike):
        return ort.InferenceSession(str(model), options, providers=providers)
    if ir.proto_size(model) <= ir.PROTO_LIMIT:
        proto = model.to_proto() if isinstance(model, ir.Model) else model
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    folder = Path(tempfile.mkdtemp(prefix="edgegraph-ort-"))
    try:
        path = modelio.save(model, folder / "model.onnx", external_data=True)
        sess = ort.InferenceSession(str(path), options, providers=providers)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    sess._edgegraph_cleanup = _Cleanup(folder)  # removed when the session is collected
    return sess


class _Cleanup:
    def __init__(self, folder: Path):
        self.folder = folder

    def __del__(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def adapt_feeds(specs: Sequence[InputSpec], sample: Mapping[str, np.ndarray]) -> Feeds:
    """Pick the model's inputs from `sample`, cast to the model's dtypes (e.g. float16 inputs)."""
    feeds = {}
    for spec in specs:
        if spec.name not in sample:
            raise CalibrationDataError(
                f"data has no array for model input '{spec.name}' (data keys: {shown(', '.join(sample))})"
            )
        feeds[spec.name] = np.asarray(sample[spec.name]).astype(spec.dtype, copy=False)
    return feeds


def batch_size_for(specs: Sequence[InputSpec], wanted: int) -> int:
    """The batch to feed: `wanted`, or the size the model fixes its batch axis to (e.g. 1)."""
    axes = batch_axes(specs)
    fixed = [s.shape[axes[s.name]] for s in specs if s.shape and axes[s.name] is not None
             and _fixed(s.shape[axes[s.name]])]
    return min(fixed) if fixed else wanted


def feeds_of(model, data, *, batch: int = 8) -> list[Feeds]:
    """`data` (CalibrationData) as feeds for `model` (Model, proto or session): samples stacked
    up to `batch` on each input's batch axis (fewer where the model fixes it), dtypes adapted."""
    specs = input_specs(model)
    return [adapt_feeds(specs, b) for b in data.batches(batch_size_for(specs, batch))]


def batch_length(specs: Sequence[InputSpec], feeds: Mapping[str, np.ndarray]) -> int:
    """How many samples a batch of feeds holds: the size of its inputs' batch axis (1 when no
    input has one)."""
    axes = batch_axes(specs)
    return next((np.shape(feeds[s.name])[axes[s.name]] for s in specs
                 if axes[s.name] is not None and s.name in feeds and np.ndim(feeds[s.name]) > axes[s.name]), 1)


def run(sess: ort.InferenceSession, feeds: Feeds, outputs: Sequence[str] | None = None) -> Feeds:
    """Run once; returns {output name: array}."""
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `proto` that also returns the given intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            # ORT infers the type of an output declared without one.
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return exposed


def latency_ms(model, feeds: Feeds, *, runs: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median wall time of one inference in ms, with ORT's full optimizations (as deployed).

    `model` may also be a session made earlier (timed as it is; `threads` is then its own).
    """
    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads=threads, optimize=True)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def outputs(model, batches: Iterable[Feeds], *, threads: int = 0, optimize: bool = True,
            side_by_side: bool = False) -> list[Feeds]:
    """Outputs of a model (path, ModelProto, Model or open session) over batches of inputs;
    optimized by default, i.e. as deployed, so quantized models run ORT's integer kernels.
    `side_by_side`: the batches run SideBySide, on 1-thread sessions (not for an open session)."""
    if isinstance(model, ort.InferenceSession) or not side_by_side:
        sess = model if isinstance(model, ort.InferenceSession) else session(model, threads=threads, optimize=optimize)
        specs = input_specs(sess)
        return [run(sess, adapt_feeds(specs, batch)) for batch in batches]
    batches = list(batches)
    runner = SideBySide(len(batches), threads)
    try:
        sess = session(model, threads=runner.session_threads, optimize=optimize)
        specs = input_specs(sess)
        return runner.map(lambda batch: run(sess, adapt_feeds(specs, batch)), batches)
    finally:
        runner.close()


class SideBySide:
    """Runs a function over batches `threads` at a time (0: every core this process may use),
    each session on one thread (`session_threads`), when there are at least two batches; one
    batch runs alone on `threads`. A thread that waits for its partner spins, so on a machine
    shared with other work one 2-thread run of PP-OCRv4 det took 3x a 1-thread run, while two
    1-thread runs side by side share no work; the results do not depend on the core count."""

    def __init__(self, count: int, threads: int):
        self.workers = max(1, min(count, threads or cores()))
        self.session_threads = 1 if self.workers > 1 else threads
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def map(self, function, items) -> list:
        return list(self.pool.map(function, items) if self.pool else map(function, items))

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


def cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say: macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class NativeCrash(RuntimeError):
    """onnxruntime killed the process that ran a model (a signal such as SIGFPE or SIGSEGV)."""


def outputs_isolated(model, batches: Sequence[Feeds], *, threads: int = 0, optimize: bool | str = False) -> list[Feeds]:
    """`run(session(model), feeds)` for each of `batches`, in a forked child process: the first
    run of an untrusted model, whose native crash in onnxruntime (a kernel dividing by zero on
    an integer input: SIGFPE) would otherwise kill edgegraph without a word. A crash raises
    NativeCrash, an error in onnxruntime a RuntimeError with its message. Costs a fork (a few
    ms) and pickling the outputs; runs in this process where fork is unsafe or missing (not Linux).
    """
    if not sys.platform.startswith("linux"):
        sess = session(model, threads=threads, optimize=optimize)
        return [run(sess, feeds) for feeds in batches]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        status = 0
        try:
            faulthandler.disable()  # a crash here is the parent's to report, in one line
            os.close(read)
            try:
                sess = session(model, threads=threads, optimize=optimize)
                try:
                    result = ("outputs", [run(sess, feeds) for feeds in batches])
                finally:
                    del sess  # a big model's temporary folder goes with it: os._exit collects nothing
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                result = ("error", str(exc) or type(exc).__name__)
            with os.fdopen(write, "wb") as pipe:
                pickle.dump(result, pipe, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:  # noqa: BLE001 - interrupted: the parent is told by the exit status
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read()  # all of it before waiting, or a large result would fill the pipe
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C, SIGTERM: do not leave the child behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        raise NativeCrash(f"onnxruntime crashed ({name})")
    if not message:
        raise RuntimeError(f"the onnxruntime process ended with status {os.WEXITSTATUS(status)}")
    kind, value = pickle.loads(message)
    if kind == "error":
        raise RuntimeError(value)
    return value
