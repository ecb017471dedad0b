"""The weight-layout table: which axis of each weight holds output and input channels, checked
against what onnxruntime computes (scaling output channel c of the weight scales output channel c)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegraph import ir, runtime
from edgegraph.analysis import layout


def _node(op: str, **attrs) -> gs.Node:
    return gs.Node(op, attrs=attrs)


@pytest.mark.parametrize("op, attrs, ndim, expected", [
    ("Conv", {}, 4, (0, 1, 1, False)),
    ("Conv", {"group": 4}, 4, (0, 1, 4, False)),
    ("ConvTranspose", {}, 4, (1, 0, 1, True)),
    ("ConvTranspose", {"group": 2}, 4, (1, 0, 2, True)),
    ("Gemm", {}, 2, (1, 0, 1, False)),
    ("Gemm", {"transB": 1}, 2, (0, 1, 1, False)),
    ("MatMul", {}, 2, (1, 0, 1, False)),
    ("MatMul", {}, 3, (2, 1, 1, False)),
])
def test_table(op, attrs, ndim, expected):
    lay = layout.of(_node(op, **attrs), ndim)
    assert (lay.out_axis, lay.in_axis, lay.groups, lay.transposed) == expected


def test_no_layout():
    assert layout.of(_node("Relu"), 2) is None
    assert layout.of(gs.Node("Conv", domain="com.microsoft"), 4) is None
    assert layout.of(_node("BatchNormalization"), 1, index=1).out_axis == 0
    assert layout.of(_node("Gemm", transA=1), 2).x_axis == 0
    assert layout.of(_node("MatMul"), 2, index=0).y_axis == -2  # W @ x: rows of y


def _run_layer(op: str, attrs: dict, weight: np.ndarray, x_shape) -> np.ndarray:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = {"x": np.random.default_rng(1).normal(size=x_shape).astype(np.float32)}
    return runtime.run(runtime.session(ir.from_proto(model).to_proto()), feeds)["y"]


@pytest.mark.parametrize("op, attrs, wshape, x_shape, y_axis", [
    ("Conv", {}, (6, 4, 3, 3), [1, 4, 5, 5], 1),
    ("Conv", {"group": 2}, (6, 2, 3, 3), [1, 4, 5, 5], 1),
    ("ConvTranspose", {}, (4, 6, 3, 3), [1, 4, 5, 5], 1),
    ("ConvTranspose", {"group": 2}, (4, 3, 3, 3), [1, 4, 5, 5], 1),
    ("Gemm", {}, (4, 6), [2, 4], 1),
    ("Gemm", {"transB": 1}, (6, 4), [2, 4], 1),
    ("MatMul", {}, (4, 6), [3, 2, 4], -1),
])
def test_scale_outputs_scales_output_channels(op, attrs, wshape, x_shape, y_axis):
    weight = np.random.default_rng(0).normal(size=wshape).astype(np.float32)
    node = _node(op, **attrs)
    lay = layout.of(node, weight.ndim)
    channels = lay.output_channels(weight.shape)
    assert channels == 6
    factor = np.arange(1, channels + 1, dtype=np.float32)
    before = _run_layer(op, attrs, weight, x_shape)
    after = _run_layer(op, attrs, lay.scale_outputs(weight, factor).astype(np.float32), x_shape)
    shape = [1] * before.ndim
    shape[y_axis] = -1
    np.testing.assert_allclose(after, before * factor.reshape(shape), rtol=1e-5, atol=1e-5)
    assert lay.per_axis == (not (op == "ConvTranspose" and attrs.get("group", 1) > 1))


def test_sources_through_encodings():
    q = gs.Constant("q", np.ones((6, 4), np.int8))
    scale = gs.Constant("s", np.full(4, 0.1, np.float32))
    zero = gs.Constant("z", np.zeros(4, np.int8))
    dq = gs.Variable("dq", dtype=np.float32, shape=(6, 4))
    gs.Node("DequantizeLinear", inputs=[q, scale, zero], outputs=[dq], attrs={"axis": 1})
    found = {s.constant.name: s.axes for s in layout.sources(dq)}
    assert found == {"q": (0, 1), "s": (None, 0), "z": (None, 0)}

    cast = gs.Variable("cast", dtype=np.float32, shape=(6, 4))
    gs.Node("Cast", inputs=[q], outputs=[cast], attrs={"to": 1})
    scaled = gs.Variable("scaled", dtype=np.float32, shape=(6, 4))
    gs.Node("Mul", inputs=[cast, gs.Constant("m", np.full((1, 4), 2, np.float32))], outputs=[scaled])
    found = {s.constant.name: s.axes for s in layout.sources(scaled)}
    assert found == {"q": (0, 1), "m": (None, 1)}

    held = gs.Constant("", np.ones(5, np.float32))
    const_out = gs.Variable("c_out", dtype=np.float32, shape=(5,))
    gs.Node("Constant", outputs=[const_out], attrs={"value": held})
    reshaped = gs.Variable("r", dtype=np.float32, shape=(1, 5, 1, 1))
    gs.Node("Reshape", inputs=[const_out, gs.Constant("shape", np.array([1, 5, 1, 1]))], outputs=[reshaped])
    assert [s.axes for s in layout.sources(reshaped)] == [(None, 0, None, None)]

    computed = gs.Variable("computed", dtype=np.float32, shape=(6, 4))
    gs.Node("Relu", inputs=[gs.Variable("x", dtype=np.float32, shape=(6, 4))], outputs=[computed])
    assert layout.sources(computed) is None


def test_channel_vector():
    assert layout.channel_vector(np.ones((3, 1, 1)), 4, 3).tolist() == [1, 1, 1]
    assert layout.channel_vector(np.ones((1, 3)), 4, 3) is None  # varies along the last axis
    assert layout.channel_vector(np.arange(3.0), 4, 3, channels_last=True).tolist() == [0, 1, 2]
    assert layout.activation_axis((1, 8, 4, 4)) == 1 and layout.activation_axis((2, 7, 384)) == 2
