"""edgegraph.analysis.hashing: structural digests ignore names and orders, and see every weight
bit and every subgraph node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, require_shared
from onnx import TensorProto, helper, numpy_helper

from edgegraph import ir
from edgegraph.analysis import hashing
from edgegraph.context import PassContext, VerifyConfig
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse

RNG = np.random.default_rng(3)
WEIGHTS = {
    "w1": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
    "b1": RNG.standard_normal(4).astype(np.float32),
    "w2": RNG.standard_normal((4, 4, 1, 1)).astype(np.float32),
    "scale": np.array(1.5, np.float32),
    "shift": np.array(-0.25, np.float32),
}


def build(tag: str, *, reorder: bool = False, weights=None, then_op: str = "Mul", body_value: float = 1.5,
          pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    """A small net: Conv -> Relu -> 1x1 Conv -> residual Add -> If(flag: * scale, else + shift).
    Every node and tensor name carries `tag`; `reorder` also reverses the initializers, the
    attributes of every node and the order of two independent nodes."""
    n = lambda name: f"{tag}_{name}" if name else ""  # noqa: E731
    weights = dict(WEIGHTS if weights is None else weights)
    weights["scale"] = np.array(body_value, np.float32)
    then_node = helper.make_node(then_op, [n("add"), n("scale")], [n("then_out")], name=n("then"))
    else_node = helper.make_node("Add", [n("add"), n("shift")], [n("else_out")], name=n("else"))
    out_info = lambda name: helper.make_tensor_value_info(n(name), TensorProto.FLOAT, [1, 4, 8, 8])  # noqa: E731
    then_graph = helper.make_graph([then_node], n("then_g"), [], [out_info("then_out")])
    else_graph = helper.make_graph([else_node], n("else_g"), [], [out_info("else_out")])
    nodes = [
        helper.make_node("Conv", [n("x"), n("w1"), n("b1")], [n("c1")], name=n("conv1"), pads=list(pads),
                         strides=[1, 1], dilations=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", [n("c1")], [n("r1")], name=n("relu")),
        helper.make_node("Conv", [n("r1"), n("w2")], [n("c2")], name=n("conv2")),
        helper.make_node("Sigmoid", [n("x")], [n("side")], name=n("side")),  # independent of the chain
        helper.make_node("Add", [n("c2"), n("r1")], [n("add")], name=n("residual")),
        helper.make_node("If", [n("flag")], [n("y")], name=n("if"), then_branch=then_graph, else_branch=else_graph),
    ]
    inits = [numpy_helper.from_array(v, n(k)) for k, v in weights.items()]
    if reorder:
        inits.reverse()
        nodes[2], nodes[3] = nodes[3], nodes[2]
        for node in nodes:
            attrs = list(node.attribute)
            del node.attribute[:]
            node.attribute.extend(reversed(attrs))
    graph = helper.make_graph(
        nodes, n("net"),
        [helper.make_tensor_value_info(n("x"), TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info(n("flag"), TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n("y"), TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info(n("side"), TensorProto.FLOAT, [1, 3, 8, 8])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def digest(proto: onnx.ModelProto) -> str:
    return hashing.model_digest(proto)


def _node_digests(proto: onnx.ModelProto) -> dict[str, bytes]:
    """Digest per node, keyed by the node's name without its tag."""
    graph = ir.from_proto(proto, infer=False).graph
    hasher = hashing.Hasher(graph)
    return {node.name.split("_", 1)[1]: hasher.node(node) for node in graph.nodes}


def test_names_initializer_order_and_attribute_order_do_not_count():
    a, b = build("first"), build("second", reorder=True)
    assert not {i.name for i in a.graph.initializer} & {i.name for i in b.graph.initializer}
    assert [i.name for i in b.graph.initializer][0].endswith("shift")
    assert digest(a) == digest(b)
    assert _node_digests(a) == _node_digests(b)


def test_attribute_order_does_not_count_but_values_do():
    a = _node_digests(build("a"))
    reordered = _node_digests(build("a", reorder=True))
    assert a["conv1"] == reordered["conv1"]
    other = _node_digests(build("a", pads=(1, 1, 1, 0)))
    assert other["conv1"] != a["conv1"]
    assert other["relu"] != a["relu"]  # everything downstream of a change changes
    assert other["side"] == a["side"]  # and nothing beside it


def _one_ulp(weights: dict, name: str, index: int = 0) -> dict:
    changed = {k: v.copy() for k, v in weights.items()}
    flat = changed[name].reshape(-1)
    flat[index] = np.nextafter(flat[index], np.float32(np.inf))
    return changed


def test_one_ulp_weight_change_changes_the_digest():
    base = digest(build("a"))
    assert digest(build("a", weights=_one_ulp(WEIGHTS, "w1", 17))) != base
    assert digest(build("a", weights=_one_ulp(WEIGHTS, "w2", 3))) != base
    nudged = float(np.nextafter(np.float32(1.5), np.float32(2.0)))
    assert digest(build("a", body_value=nudged)) != base  # a constant inside the If body


def test_if_body_contents_count():
    base = digest(build("a"))
    assert digest(build("b", then_op="Add")) != base
    assert digest(build("b", then_op="Mul")) == base
    a, b = _node_digests(build("a")), _node_digests(build("b", then_op="Sub"))
    assert a["if"] != b["if"] and a["residual"] == b["residual"]


def test_input_positions_and_random_ops():
    def model(first, second, op="Sub"):
        x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in ("x", "y"))
        node = helper.make_node(op, [first, second], ["z"])
        return helper.make_model(helper.make_graph([node], "g", [x, y], [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 13)])

    assert digest(model("x", "y")) != digest(model("y", "x"))
    assert digest(model("x", "y")) == digest(model("x", "y"))
    # Two random draws with the same attributes are different values.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("RandomUniformLike", ["x"], [f"r{i}"]) for i in range(2)]
    graph = ir.from_proto(helper.make_model(helper.make_graph(nodes, "g", [x], [
        helper.make_tensor_value_info(f"r{i}", TensorProto.FLOAT, [2]) for i in range(2)])), infer=False).graph
    hasher = hashing.Hasher(graph)
    assert hasher.node(graph.nodes[0]) != hasher.node(graph.nodes[1])


def test_cse_keeps_random_draws_and_what_reads_them_apart():
    """CSE keys nodes by the structural digest: Relu(rand1) and Relu(rand2) must stay two nodes,
    while two Relus of the same tensor merge."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("RandomUniformLike", ["x"], ["r1"]), helper.make_node("RandomUniformLike", ["x"], ["r2"]),
             helper.make_node("Relu", ["r1"], ["a"]), helper.make_node("Relu", ["r2"], ["b"]),
             helper.make_node("Neg", ["x"], ["c"]), helper.make_node("Neg", ["x"], ["d"]),
             helper.make_node("Sum", ["a", "b", "c", "d"], ["out"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(
        "out", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 13)])
    ctx = PassContext(verify=VerifyConfig(enabled=False), progress=False)
    model, _ = run_pipeline(ir.from_proto(proto), parse("cse,eliminate-dead"), ctx)
    ops = sorted(n.op for n in model.graph.nodes)
    assert ops == ["Neg", "RandomUniformLike", "RandomUniformLike", "Relu", "Relu", "Sum"]


# ---------------------------------------------------------------------------------------------
# Real models


def rename_everything(proto: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy with every tensor and node renamed (subgraphs included) and the initializers shuffled."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    rng = np.random.default_rng(seed)
    names: dict[str, str] = {}

    def new(name: str) -> str:
        if not name:
            return name
        if name not in names:
            names[name] = f"t{seed}_{len(names)}_{rng.integers(1 << 30)}"
        return names[name]

    def visit(graph: onnx.GraphProto) -> None:
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.name = new(value.name)
        for tensor in graph.initializer:
            tensor.name = new(tensor.name)
        for i, node in enumerate(graph.node):
            node.name = f"node{seed}_{i}"
            node.input[:] = [new(x) for x in node.input]
            node.output[:] = [new(x) for x in node.output]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)
        order = rng.permutation(len(graph.initializer))
        shuffled = [graph.initializer[int(i)] for i in order]
        copies = [onnx.TensorProto() for _ in shuffled]
        for copy, tensor in zip(copies, shuffled):
            copy.CopyFrom(tensor)
        del graph.initializer[:]
        graph.initializer.extend(copies)

    visit(out.graph)
    return out


REAL = ["yolox_nano_coco/yolox_nano.onnx", "deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx",
        "ppocr_v4_paddle2onnx/ch_PP-OCRv4_rec_infer.onnx"]


@pytest.mark.parametrize("path", REAL, ids=[p.split("/")[0] for p in REAL])
def test_a_real_model_renamed_and_shuffled_hashes_equal_and_one_ulp_does_not(path):
    proto = onnx.load(require_shared(MODELS / path))
    renamed = rename_everything(proto, 1)
    assert {t.name for t in renamed.graph.initializer}.isdisjoint(t.name for t in proto.graph.initializer)
    if proto.graph.initializer:  # PP-OCR holds its weights in Constant nodes instead
        contents = lambda m: [numpy_helper.to_array(t).tobytes()[:64] for t in m.graph.initializer]  # noqa: E731
        assert contents(renamed) != contents(proto)  # shuffled
    assert digest(renamed) == digest(proto)
    changed = rename_everything(proto, 2)
    held = list(changed.graph.initializer) + [a.t for n in changed.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    weight = max(held, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(weight).copy()
    flat = array.reshape(-1)
    flat[flat.size // 2] = np.nextafter(flat[flat.size // 2], np.float32(np.inf))
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    assert digest(changed) != digest(proto)
    assert digest(rename_everything(proto, 3)) == digest(proto)
