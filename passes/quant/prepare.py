"""Getting a model ready for Q/DQ: float32 compute and a recent enough opset (BatchNorm is folded by
the `cleanup` pass the manager runs first: `StaticQuantize.after`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from edgegraph import ir, runtime, verify
from edgegraph.errors import EdgegraphError
from edgegraph.passes.quant.state import PER_CHANNEL_OPSET, QuantRun

logger = logging.getLogger(__name__)

FLOAT16 = onnx.TensorProto.FLOAT16
FLOAT = onnx.TensorProto.FLOAT
INT16_OPSET = 21  # 16-bit and 4-bit types in ai.onnx Q/DQ
MS_DOMAIN = "com.microsoft"


def compute_in_float32(model: ir.Model) -> bool:
    """Turn a float16 model into float32 compute behind Casts at its inputs and outputs.

    ORT's int8 kernels take float32 scales, and its CPU float16 kernels are few (it inserts
    Casts around most ops anyway), so quantizing a float16 model means quantizing it from
    float32. The model's interface keeps its float16 inputs and outputs. Returns True if changed.
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
        logger.warning("quant: could not upgrade the model from opset %d to %d (%s)", model.opset, opset,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if check is not None and not check(converted):
        logger.warning("quant: onnx's opset %d -> %d conversion changed the model's outputs; keeping opset %d",
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


# ---------------------------------------------------------------------------------------------
# The `quant` pass's preparation step


def prepare_model(run: QuantRun, model: ir.Model) -> None:
    """float16 -> float32 compute, the opset the run's Q/DQ need (checked to keep the outputs),
    unique node names and fresh shapes."""
    if compute_in_float32(model):
        run.notes.append("float16 model: quantized from float32 compute, float16 interface kept")
    needed = INT16_OPSET if may_use_int16(run) else (PER_CHANNEL_OPSET if run.o.per_channel else 10)
    original = model.opset
    if model.opset < needed:
        check = _unchanged_outputs(run, model.to_proto())
        upgraded = upgrade_opset(model, needed, check)
        if upgraded is None and needed == INT16_OPSET:
            upgraded = upgrade_opset(model, PER_CHANNEL_OPSET, check)
        if upgraded is None and model.opset < 10:
            raise EdgegraphError(f"quant: the model's opset {model.opset} has no QuantizeLinear and could not be "
                                 "upgraded to opset 10 or later")
        if upgraded is not None:
            model.graph = upgraded.graph
            run.notes.append(f"opset upgraded from {original} to {model.opset}")
    if run.o.per_channel and model.opset < PER_CHANNEL_OPSET:
        run.notes.append(f"per-tensor weights: opset {model.opset} has no per-channel DequantizeLinear")
    name_nodes(model.graph)
    model.refresh_shapes()


def _unchanged_outputs(run: QuantRun, before: onnx.ModelProto):
    """A check that a converted model gives the same outputs as `before` on a few calibration
    samples (onnx's version converter has changed semantics before, e.g. Upsample -> Resize)."""
    def check(after: onnx.ModelProto) -> bool:
        specs = runtime.input_specs(before)
        # A converter's semantic change shows on any input: two samples are enough.
        data = run.ctx.calibration.take(min(run.ctx.verify.samples, 2))
        batches = [runtime.adapt_feeds(specs, b) for b in data.batches(runtime.batch_size_for(specs, 4))]
        try:
            reference = runtime.outputs(before, batches, threads=run.ctx.threads, optimize=False)
            candidate = runtime.outputs(after, batches, threads=run.ctx.threads, optimize=False)
        except Exception as exc:  # noqa: BLE001 - a model that does not run is not unchanged
            logger.debug("quant: opset check failed to run: %s", exc)
            return False
        metrics = verify.compare_all(reference, candidate)
        return verify.exactness_violation(metrics, run.ctx.verify.rtol * 10, run.ctx.verify.atol * 10) is None
    return check


def may_use_int16(run: QuantRun) -> bool:
    return run.o.activation_type == "int16" or run.o.sensitive_type == "int16"


def qdq_domain(run: QuantRun, model: ir.Model) -> str:
    """The domain of 16-bit Q/DQ nodes: ai.onnx from opset 21, else com.microsoft."""
    if may_use_int16(run) and model.opset < INT16_OPSET:
        run.notes.append("int16 activations use com.microsoft QuantizeLinear/DequantizeLinear (opset < 21)")
        return MS_DOMAIN
    return ""


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: plans refer to nodes by name across graph copies."""
    namer = ir.Namer(graph)
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = namer(f"{node.op}_{len(seen)}" if not node.name else node.name)
        seen.add(node.name)


__all__ = ["compute_in_float32", "upgrade_opset", "prepare_model", "qdq_domain", "name_nodes"]
