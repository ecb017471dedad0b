"""fuse-activations: hard-sigmoid / hard-swish spelled out as Add/Clip/Mul/Div become one op, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgegraph import modelio, runtime
from edgegraph.context import PassContext
from edgegraph.passbase import settle
from edgegraph.passes.cleanup import FuseActivations


def hard_swish(opset: int = 17, sigmoid_only: bool = False) -> onnx.ModelProto:
    """y = x * Clip(x + 3, 0, 6) / 6 (or Clip(x + 3, 0, 6) / 6), as PaddlePaddle and Keras export it."""
    consts = [helper.make_tensor(name, TensorProto.FLOAT, [], [value])
              for name, value in (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    nodes = [helper.make_node("Add", ["x", "three"], ["shifted"], name="add"),
             helper.make_node("Clip", ["shifted", "zero", "six"], ["relu6"], name="clip")]
    if sigmoid_only:
        nodes.append(helper.make_node("Div", ["relu6", "six"], ["y"], name="div"))
    else:
        nodes += [helper.make_node("Mul", ["x", "relu6"], ["gated"], name="mul"),
                  helper.make_node("Div", ["gated", "six"], ["y"], name="div")]
    graph = helper.make_graph(nodes, "hard_swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("opset", "sigmoid_only", "ops"), [
    (17, False, ["HardSwish"]), (13, False, ["HardSigmoid", "Mul"]), (17, True, ["HardSigmoid"])])
def test_hard_activations_become_one_op_with_the_same_outputs(opset, sigmoid_only, ops):
    proto = hard_swish(opset, sigmoid_only)
    model = modelio.load(proto)
    result = FuseActivations().run(model, PassContext(progress=False))
    assert result.modified
    assert sum(result.stats.values()) == 1
    settle(model)
    assert [n.op for n in model.graph.nodes] == ops
    x = np.linspace(-5, 5, 16, dtype=np.float32).reshape(2, 8)  # both sides of the clip bounds
    want = runtime.run(runtime.session(proto), {"x": x})["y"]
    got = runtime.run(runtime.session(model.to_proto()), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
