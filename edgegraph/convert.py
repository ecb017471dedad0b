"""Model-level conversions passes share: float16 models computed in float32, and opset conversion
through onnx's version converter with the fix it needs (Upsample's coordinates)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from edgegraph import ir

logger = logging.getLogger(__name__)

FLOAT16 = onnx.TensorProto.FLOAT16
FLOAT = onnx.TensorProto.FLOAT


def compute_in_float32(model: ir.Model) -> bool:
    """Turn a float16 model into float32 compute behind Casts at its inputs and outputs.

    ORT's int8 kernels take float32 scales, and its CPU float16 kernels are few (it inserts
    Casts around most ops anyway), so quantizing (or pruning, measuring in float64) a float16
    model starts from float32. The model's interface keeps its float16 inputs and outputs. Returns True if changed.
    """
    graph = model.graph
    is_fp16 = lambda dtype: ir.numpy_dtype(dtype) == np.float16  # noqa: E731
    io16 = [t for t in list(graph.inputs) + list(graph.outputs) if is_fp16(t.dtype)]
    changed = bool(io16)
    for g in ir.iter_graphs(graph):
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant):
                if is_fp16(tensor.values.dtype):
                    tensor.values = tensor.values.astype(np.float32)
                    changed = True
            elif is_fp16(tensor.dtype):
                tensor.dtype = np.float32
                changed = True
        for node in g.nodes:
            if node.op == "Cast" and node.attrs.get("to") == FLOAT16:
                node.attrs["to"] = FLOAT
                changed = True
            for key, value in list(node.attrs.items()):
                if isinstance(value, gs.Constant) and is_fp16(value.values.dtype):
                    value.values = value.values.astype(np.float32)
                    changed = True
                elif isinstance(value, np.ndarray) and is_fp16(value.dtype):
                    node.attrs[key] = value.astype(np.float32)
                    changed = True
    if not changed:
        return False
    namer = ir.Namer(graph)
    for position, tensor in enumerate(graph.inputs):
        if any(tensor is t for t in io16):
            outer = gs.Variable(tensor.name, np.float16, tensor.shape)
            tensor.name = namer(f"{outer.name}_float32")
            graph.nodes.insert(0, gs.Node("Cast", namer(f"{outer.name}_to_float32"), {"to": FLOAT}, [outer], [tensor]))
            graph.inputs[position] = outer
    for position, tensor in enumerate(graph.outputs):
        if any(tensor is t for t in io16):
            outer = gs.Variable(tensor.name, np.float16, tensor.shape)
            tensor.name = namer(f"{outer.name}_float32")
            graph.nodes.append(gs.Node("Cast", namer(f"{outer.name}_to_float16"), {"to": FLOAT16}, [tensor], [outer]))
            graph.outputs[position] = outer
    return True


def upgrade_opset(model: ir.Model, opset: int, check: Callable[[onnx.ModelProto], bool] | None = None, *,
                  down: bool = False) -> ir.Model | None:
    """The model converted to ai.onnx `opset` (when older; also when newer with `down`: legalize),
    or None if onnx cannot convert it or `check` (e.g. "outputs unchanged on a few samples")
    rejects the result."""
    if model.opset == opset or (model.opset > opset and not down):
        return model
    proto = model.to_proto()
    # IR < 4 wants initializers listed as graph inputs, which exported graphs no longer do; the
    # target opset needs a newer IR anyway.
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)], ignore_unknown=True))
    try:
        converted = version_converter.convert_version(proto, opset)
        if model.opset < 11 <= opset:  # (Resize-10 has no coordinate modes: it is asymmetric already)
            _keep_upsample_semantics(converted)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        logger.warning("could not convert the model from opset %d to %d (%s)", model.opset, opset,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if check is not None and not check(converted):
        logger.warning("onnx's opset %d -> %d conversion changed the model's outputs; keeping opset %d",
                       model.opset, opset, model.opset)
        return None
    upgraded = ir.from_proto(converted, infer=True)
    upgraded.graph.ir_version = max(converted.ir_version, proto.ir_version)
    return upgraded


def _keep_upsample_semantics(model: onnx.ModelProto) -> None:
    """Before opset 11, Upsample and Resize map output x to input x / scale (asymmetric; nearest
    rounds down). onnx's converter emits Resize-11+ nodes with the default half_pixel coordinates,
    which shifts every upsampled map; say asymmetric explicitly."""
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        attrs = {a.name for a in node.attribute}
        if "coordinate_transformation_mode" not in attrs:
            node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if mode == "nearest" and "nearest_mode" not in attrs:
            node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))
