"""Per-tensor noise of a quantized model for `quant`: signal / noise of every quantized tensor and
output vs the float model (the report's per-layer SQNR), and the ranking of tensors by the noise
their own quantization adds (what the fallback keeps out of 8 bits first)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from edgegraph import ir
from edgegraph.passes.quant import analysis
from edgegraph.passes.quant.placement import ANCHORS, Plan
from edgegraph.passes.quant.state import QuantRun

if TYPE_CHECKING:
    from edgegraph.passes.quant.build import Built


def errors(run: QuantRun, quant: ir.Model, built: Built) -> dict[str, analysis.ErrorSums]:
    """Signal / noise of every quantized tensor, float-output anchors and outputs vs the float model."""
    start = time.perf_counter()
    pairs = {name: dq.name for name, dq in built.writer.dequantized.items()}
    by_name = {n.name: n for n in quant.graph.nodes}
    float_tensors = {o for n in run.float_proto.graph.node for o in n.output}
    for name in built.quantized:  # float-output Gemm / MatMul results
        out = by_name[name].outputs[0].name
        if by_name[name].op in ANCHORS and out in float_tensors:
            pairs.setdefault(out, out)
    # Sequence / optional outputs have no energy to measure.
    run.output_names = [t.name for t in quant.graph.outputs if t.type == "tensor_type"]
    for name in run.output_names:
        pairs.setdefault(name, name)
    data = run.calib.take(run.analysis_count)
    found = analysis.paired_errors(run.float_proto, quant.to_proto(), pairs, run.batches(data),
                                   run.ctx.threads, run.progress(data, "quant: measuring SQNR"),
                                   built.activations)
    run.timings["analysis"] = run.timings.get("analysis", 0.0) + time.perf_counter() - start
    return found


def ranking(plan: Plan, errors: dict[str, analysis.ErrorSums]) -> list[str]:
    """Quantized tensors computed by quantized nodes, by the relative noise quantizing them adds
    (beyond what their producer's inputs carried), most first."""
    owners = {plan.result_point(node): node for node in plan.quantized}
    scored = []
    for point in plan.points:
        error = errors.get(point.name)
        owner = owners.get(point.name)
        if error is None or owner is None:
            continue
        inputs = [errors[t.name].relative_noise for t in owner.inputs if t is not None and t.name in errors]
        scored.append((error.relative_noise - max(inputs, default=0.0), point.name))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [name for _, name in scored]


__all__ = ["errors", "ranking"]
