"""Finding the MatMul / Gemm / Gather layers whose weights are constants, for weight quantization.

Weights are resolved through constant-only subgraphs (`ir.folded_value`), so a model that is
already weight-only quantized with `Cast(int8) * scale` or `DequantizeLinear(int8)` in front of
its MatMuls is re-quantized from the float values those nodes compute; the old chain becomes dead
and the pipeline's cleanup removes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgegraph import ir


@dataclass
class Linear:
    """`y = alpha * (x @ weight) + beta * bias` for MatMul (alpha = beta = 1, no bias) and Gemm."""

    node: gs.Node
    weight: np.ndarray  # (K, N) float32, as MatMul multiplies it (a transB Gemm's B is transposed)
    bias: gs.Tensor | None = None  # Gemm's C, as it was (any broadcastable shape)
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]


@dataclass
class Embedding:
    """`Gather(table, indices)` on axis 0 of a constant float table (token embeddings)."""

    node: gs.Node
    table: np.ndarray  # (rows, ...) float32

    @property
    def indices(self) -> gs.Tensor:
        return self.node.inputs[1]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]


def _skipped(node: gs.Node, exclude: Iterable[str]) -> bool:
    exclude = set(exclude)
    return node.name in exclude or node.op in exclude


def _float32_input(tensor: gs.Tensor) -> bool:
    # Unknown dtype (no shape inference) is accepted; the weight being float32 then decides.
    return tensor.dtype is None or np.dtype(tensor.dtype) == np.float32


def linear_layers(graph: gs.Graph, opset: int, ops: Iterable[str], exclude: Iterable[str] = (),
                  min_elements: int = 0) -> list[Linear]:
    """MatMul (x @ W with W constant and 2-D) and Gemm (transA = 0, B constant) nodes in `graph`."""
    ops = set(ops)
    found = []
    for node in graph.nodes:
        if node.op not in ops or node.op not in ("MatMul", "Gemm") or (node.domain or "") != "":
            continue
        if _skipped(node, exclude) or len(node.inputs) < 2 or ir.constant_value(node.inputs[0]) is not None:
            continue
        if not _float32_input(node.inputs[0]):
            continue
        weight = ir.folded_value(node.inputs[1], opset)
        if weight is None or weight.dtype != np.float32 or weight.ndim != 2 or weight.size < max(min_elements, 1):
            continue
        if node.op == "MatMul":
            found.append(Linear(node, weight))
            continue
        if node.attrs.get("transA", 0):
            continue
        if node.attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        found.append(Linear(node, weight, bias, float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))))
    return found


def embedding_layers(graph: gs.Graph, opset: int, exclude: Iterable[str] = (), min_elements: int = 0) -> list[Embedding]:
    """Gather nodes on axis 0 of a constant 2-D float32 table."""
    found = []
    for node in graph.nodes:
        if node.op != "Gather" or (node.domain or "") != "" or _skipped(node, exclude):
            continue
        if node.attrs.get("axis", 0) != 0 or ir.constant_value(node.inputs[1]) is not None:
            continue
        table = ir.folded_value(node.inputs[0], opset)
        if table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < max(min_elements, 1):
            continue
        found.append(Embedding(node, table))
    return found


def detach(node: gs.Node) -> gs.Tensor:
    """Disconnect a node being replaced; returns its output, for the replacement to produce."""
    output = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    return output
