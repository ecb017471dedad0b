"""`legalize(interface=target)`: the model's input and output dtypes, changed where the target
cannot take them. Only on request: a deployed model's callers feed and read these dtypes.

What changes, and why the values stay the same:

* float16 inputs and outputs -> float32, for a target without float16 (NNAPI: onnxruntime's
  NNAPI EP takes float32 / quantized uint8 tensors only, base_op_builder.cc). legalize has
  already made such a model compute in float32 behind a Cast at each float16 input and output
  (`convert.compute_in_float32`); those Casts are all the target refuses (SqueezeNet: 2 of 67
  nodes). Here they go: the caller feeds the same values as float32 (every float16 value is a
  float32 value) and reads the float32 result the Cast used to round. This is the reverse of
  onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`, which keeps a float32
  interface around float16 compute.
* int64 inputs -> int32, for a target without int64 (NNAPI: "Only support cast to int32 or
  float", cast_op_builder.cc; int32 indices are what its Gather takes from a non-constant input),
  when every reader of the input computes the same from int32: indices of Gather /
  GatherElements, a Cast. Token ids, masks and positions fit int32; a caller passing a value
  beyond 2^31 would have to keep the int64 model. MiniLM's input_ids / token_type_ids (Gather)
  and attention_mask (Cast to bool).

An input any other op reads (a Reshape's shape, Equal with an int64 constant) keeps its dtype,
and is listed in the details with the reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from edgegraph import ir

INTERFACES = ("keep", "target")
# (op, input index) that read an int32 tensor exactly as they read the int64 one.
_INT32_READERS = frozenset({("Gather", 1), ("GatherElements", 1), ("Cast", 0)})


def retype(model: ir.Model, target) -> tuple[Counter, list[dict]]:
    """Change the interface dtypes `target` lacks; (counter of what changed, [{tensor, why kept}])."""
    dtypes = getattr(target, "dtypes", None)
    done: Counter = Counter()
    kept: list[dict] = []
    if dtypes is None:
        return done, kept
    graph = model.graph
    if "float16" not in dtypes:
        done["interface float16->float32"] = _float16_to_float32(graph)
    if "int64" not in dtypes and "int32" in dtypes:
        for tensor in list(graph.inputs):
            if ir.numpy_dtype(tensor.dtype) != np.int64:
                continue
            why = _int32_refusal(graph, tensor)
            if why is None:
                tensor.dtype = np.int32
                done["interface int64->int32"] += 1
            else:
                kept.append({"tensor": tensor.name, "dtype": "int64", "why": why})
    return +done, kept


def _float16_to_float32(graph) -> int:
    """Drop the Casts that give a float32-compute graph its float16 interface: a float16 input
    read only by Cast(to=float) becomes a float32 input, a float16 output made by Cast(to=float16)
    of a float32 tensor becomes that tensor (under the output's name)."""
    changed = 0
    for tensor in graph.inputs:
        readers = ir.consumers(tensor)
        if ir.numpy_dtype(tensor.dtype) != np.float16 or not readers or ir.is_graph_output(graph, tensor) or not all(
                n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT for n in readers):
            continue
        tensor.dtype = np.float32
        for cast in readers:
            inner = cast.outputs[0]
            cast.inputs.clear()
            cast.outputs.clear()
            inner.inputs.clear()
            ir.replace_all_uses(graph, inner, tensor)
        changed += 1
    for position, tensor in enumerate(graph.outputs):
        cast = ir.producer(tensor)
        if ir.numpy_dtype(tensor.dtype) != np.float16 or cast is None or cast.op != "Cast" or \
                cast.attrs.get("to") != onnx.TensorProto.FLOAT16 or tensor.outputs:
            continue
        inner = cast.inputs[0]
        if ir.numpy_dtype(inner.dtype) != np.float32 or ir.producer(inner) is None or len(inner.outputs) != 1 or \
                inner.outputs[0] is not cast or ir.is_graph_output(graph, inner):
            continue  # (read elsewhere too, or an input: it keeps its own name)
        cast.inputs.clear()
        cast.outputs.clear()
        name = tensor.name
        tensor.name = f"{name}__float16_gone"  # (the object leaves the graph; its name goes to `inner`)
        inner.name = name
        graph.outputs[position] = inner
        changed += 1
    return changed


def _int32_refusal(graph, tensor) -> str | None:
    """Why int64 input `tensor` must stay int64 (a reader that computes differently from
    int32), or None."""
    if ir.is_graph_output(graph, tensor):
        return "it is also a graph output"
    for node in ir.consumers(tensor):
        for index, item in enumerate(node.inputs):
            if item is tensor and (node.op, index) not in _INT32_READERS:
                return f"{node.op} reads it as input {index} (only Gather/GatherElements indices and Cast read int32 alike)"
    return None


__all__ = ["INTERFACES", "retype"]
