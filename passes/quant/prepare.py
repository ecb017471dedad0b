"""Getting a model ready for Q/DQ: float32 compute and a recent enough opset (BatchNorm is folded by
the `cleanup` pass the manager runs first: `StaticQuantize.after`)."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from edgegraph import ir, runtime, verify
from edgegraph.convert import compute_in_float32, upgrade_opset
from edgegraph.errors import EdgegraphError
from edgegraph.passes.quant.state import PER_CHANNEL_OPSET, QuantRun

logger = logging.getLogger(__name__)

INT16_OPSET = 21  # 16-bit and 4-bit types in ai.onnx Q/DQ
MS_DOMAIN = "com.microsoft"


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


__all__ = ["prepare_model", "qdq_domain", "name_nodes"]
