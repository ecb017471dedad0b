"""fuse-activations: activations exporters spell out in elementwise ops become the single ONNX op."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir
from edgegraph.registry import register_pass

from .common import (
    WIDE_FLOATS, GraphPass, can_remove, dtype_of, is_read, is_standard, live_nodes, only_consumer, optional_input,
    remove, set_inputs, target_context, target_lacks_op,
)


@register_pass
@dataclass(frozen=True)
class FuseActivations(GraphPass):
    """Rewrite hard-sigmoid / hard-swish written as elementwise ops (PaddlePaddle, TF and Keras
    exports) into HardSigmoid / HardSwish:

        Clip(x + 3, 0, 6) / 6          -> HardSigmoid(x, alpha=1/6, beta=0.5)
        x * Clip(x + 3, 0, 6) / 6      -> HardSwish(x)    (opset >= 14; before: x * HardSigmoid(x))

    Only float32/float64 tensors (in float16 the rewritten formula rounds differently).
    With a target (`--target`), only into ops the target runs: HardSwish falls back to
    x * HardSigmoid(x) where only that runs, and a target with neither keeps the elementwise
    form (the mobile runtimes' partitioners split the graph at every HardSigmoid they lack).
    """

    name = "fuse-activations"
    summary = "Turn x*Clip(x+3,0,6)/6 and Clip(x+3,0,6)/6 into HardSwish / HardSigmoid."
    exact = True

    def rewrite(self, graph: gs.Graph, model: ir.Model) -> Counter:
        done = Counter()
        opset = int(graph.opset or model.opset)
        taken = []

        def context():  # what the target is asked about the model: taken once, when a pattern is found
            if not taken:
                taken.append(target_context(getattr(self, "target", None), model))
            return taken[0]

        for node in live_nodes(graph):
            if node.op in ("Div", "Mul") and is_standard(node) and is_read(graph, node.outputs[0]):
                applied = self._hard(graph, node, opset, context)
                if applied:
                    done[applied] += 1
        return done

    def _runs(self, op: str, attrs: dict, x: gs.Tensor, context) -> bool:
        """Whether the target (when there is one: `GraphPass.run` sets it) runs `op` on `x`."""
        target = getattr(self, "target", None)
        return target is None or target_lacks_op(target, op, attrs, [x], context()) is None

    def _hard(self, graph: gs.Graph, node: gs.Node, opset: int, context) -> str | None:
        """`node` divides by 6 (or multiplies by 1/6) what is either relu6(x + 3) or x * relu6(x + 3)."""
        source = _scaled_by_sixth(node)
        if source is None or not only_consumer(source, node, graph) or not can_remove(graph, node, 0):
            return None
        producer = ir.producer(source)
        if producer is None or not is_standard(producer):
            return None
        x = _relu6_of_x_plus_3(producer, graph)
        if x is not None:  # Clip(x + 3, 0, 6) / 6
            if not self._runs("HardSigmoid", _SIXTH, x, context):
                return None
            return self._replace_with(graph, node, "HardSigmoid", x, dict(_SIXTH))
        if producer.op != "Mul" or len(producer.inputs) != 2:
            return None
        for side in (0, 1):
            x, clip_out = producer.inputs[side], producer.inputs[1 - side]
            clip = ir.producer(clip_out)
            if clip is not None and only_consumer(clip_out, producer, graph) and _relu6_of_x_plus_3(clip, graph) is x:
                break
        else:
            return None
        if opset >= 14 and self._runs("HardSwish", {}, x, context):
            return self._replace_with(graph, node, "HardSwish", x, {})
        if not self._runs("HardSigmoid", _SIXTH, x, context):
            return None
        # x * HardSigmoid(x): the Mul stays, Clip/Add/Div go.
        sigmoid = gs.Variable(self.names(f"{node.outputs[0].name}_hardsigmoid"), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("HardSigmoid", name=self.names(f"{producer.name or 'hard'}_hardsigmoid"),
                                   attrs=dict(_SIXTH), inputs=[x], outputs=[sigmoid]))
        set_inputs(producer, [x, sigmoid])
        remove(graph, node, 0)
        return "HardSwish"

    def _replace_with(self, graph, node, op: str, x: gs.Tensor, attrs: dict) -> str:
        node.op, node.attrs = op, attrs
        set_inputs(node, [x])
        return op


_SIXTH = {"alpha": 1 / 6, "beta": 0.5}  # HardSigmoid's attributes for Clip(x + 3, 0, 6) / 6


def _scaled_by_sixth(node: gs.Node) -> gs.Tensor | None:
    """The tensor `node` divides by 6 (Div(t, 6) or Mul(t, 1/6) in either order), else None."""
    if len(node.inputs) != 2:
        return None
    for side in (0, 1) if node.op == "Mul" else (0,):
        const = ir.constant_value(node.inputs[1 - side])
        if const is None or const.size != 1:
            continue
        wanted = 6.0 if node.op == "Div" else 1 / 6
        if np.isclose(float(const.reshape(-1)[0]), wanted, rtol=1e-6, atol=0):
            tensor = node.inputs[side]
            return tensor if dtype_of(tensor) in WIDE_FLOATS else None
    return None


def _relu6_of_x_plus_3(clip: gs.Node, graph: gs.Graph) -> gs.Tensor | None:
    """x when `clip` is Clip(x + 3, 0, 6) (the Add read by nothing else), else None."""
    if clip.op != "Clip" or not is_standard(clip):
        return None
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        low, high = clip.attrs.get("min"), clip.attrs.get("max")
    else:
        low_t, high_t = optional_input(clip, 1), optional_input(clip, 2)
        low = _scalar(low_t) if low_t is not None else None
        high = _scalar(high_t) if high_t is not None else None
    if low != 0.0 or high != 6.0:
        return None
    add = ir.producer(clip.inputs[0])
    if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
        return None
    if not only_consumer(clip.inputs[0], clip, graph):
        return None
    for side in (0, 1):
        if _scalar(add.inputs[1 - side]) == 3.0 and ir.constant_value(add.inputs[side]) is None:
            return add.inputs[side]
    return None


def _scalar(tensor: gs.Tensor) -> float | None:
    array = ir.constant_value(tensor)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None
