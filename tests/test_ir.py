"""edgegraph.ir: loading, saving, shape inference and the graph helpers passes rely on."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DEFAULT_DIR
from edgegraph import ir, modelio, runtime
from edgegraph.context import CalibrationData
from edgegraph.errors import EdgegraphError, ModelLoadError
from fixtures import core

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"


def outputs(model, feeds):
    return runtime.run(runtime.session(model), feeds)


def random_feeds(model, count=3, seed=0):
    specs = runtime.input_specs(model if isinstance(model, ir.Model | onnx.ModelProto) else onnx.load(model))
    return next(CalibrationData.random(specs, count, seed=seed, dynamic_dim=5).batches(count))


def assert_same_outputs(a, b, feeds):
    expected, got = outputs(a, feeds), outputs(b, feeds)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def file_state(folder):
    """Every file under `folder` with its bytes and mtime: what "untouched" means."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_from_path_bytes_proto_and_model_agree():
    proto = onnx.load(DIGITS)
    feeds = {"input": np.load(DEFAULT_DIR / "digits_eval.npz")["input"][:8]}
    for source in (DIGITS, str(DIGITS), DIGITS.read_bytes(), proto, modelio.load(DIGITS)):
        model = modelio.load(source)
        assert isinstance(model, ir.Model)
        assert [t.name for t in model.graph.inputs] == ["input"]
        assert model.graph.outputs[0].shape == ["batch", 10]
        assert_same_outputs(proto, model, feeds)


def test_load_never_changes_its_source():
    proto = onnx.load(DIGITS)
    before = proto.SerializeToString()
    model = modelio.load(proto)
    model.graph.nodes.clear()
    modelio.load(model).graph.outputs.clear()
    assert proto.SerializeToString() == before
    assert len(model.graph.outputs) == 1


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing.onnx", "no such file"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: _write(tmp / "empty.onnx", b""), "not an ONNX model"),
    (lambda tmp: _write(tmp / "noise.onnx", np.random.default_rng(0).bytes(4096)), "not a valid ONNX model"),
    (lambda tmp: _write(tmp / "cut.onnx", DIGITS.read_bytes()[:20000]), "not a valid ONNX model"),
    (lambda tmp: _write(tmp / "notes.onnx", b'{"this": "is json"}\n'), "ONNX"),
    (lambda tmp: _write(tmp / "tensor.onnx", numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString()),
     "not an ONNX model"),
])
def test_load_errors_say_what_is_wrong(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as caught:
        modelio.load(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_load_errors_for_bytes_and_protos():
    with pytest.raises(ModelLoadError, match="the given bytes is not a valid ONNX model"):
        modelio.load(DIGITS.read_bytes()[:20000])
    with pytest.raises(ModelLoadError, match="the given ModelProto is not an ONNX model"):
        modelio.load(onnx.ModelProto())
    no_outputs = onnx.load(DIGITS)
    del no_outputs.graph.output[:]
    with pytest.raises(ModelLoadError, match="has no graph outputs"):
        modelio.load(no_outputs)


def test_load_error_for_missing_or_escaping_external_data(tmp_path):
    path = modelio.save(modelio.load(DIGITS), tmp_path / "model.onnx", external_data=True)
    data = tmp_path / "model.onnx.data"
    data.rename(tmp_path / "elsewhere.data")
    with pytest.raises(ModelLoadError, match="external data file 'model.onnx.data' .* missing"):
        modelio.load(path)
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    (tmp_path / "sub").mkdir()
    onnx.save(proto, tmp_path / "sub" / "model.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        modelio.load(tmp_path / "sub" / "model.onnx")


# ---------------------------------------------------------------------------------------------
# Saving


def test_save_round_trip_keeps_model_fields(tmp_path):
    proto = core.custom_op_model(opset=13)
    proto.ir_version = 7
    proto.doc_string = "a doc string"
    proto.producer_name, proto.producer_version = "some-exporter", "4.2"
    proto.domain, proto.model_version = "com.example", 12
    helper.set_model_props(proto, {"author": "me", "labels": "a,b,c"})
    saved = onnx.load(modelio.save(modelio.load(proto), tmp_path / "out.onnx"))
    assert saved.ir_version == 7
    assert {o.domain: o.version for o in saved.opset_import} == {"": 13, "com.microsoft": 1}
    assert saved.doc_string == "a doc string"
    assert (saved.producer_name, saved.producer_version) == ("some-exporter", "4.2")
    assert (saved.domain, saved.model_version) == ("com.example", 12)
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "me", "labels": "a,b,c"}
    assert_same_outputs(proto, saved, random_feeds(proto))


@pytest.mark.parametrize("name", sorted(core.all_models()))
def test_save_round_trip_of_core_models(tmp_path, name):
    proto = core.all_models()[name]
    saved = onnx.load(modelio.save(modelio.load(proto), tmp_path / "out.onnx"))
    onnx.checker.check_model(saved)
    assert saved.ir_version == proto.ir_version
    assert len(saved.functions) == len(proto.functions)
    assert_same_outputs(proto, saved, random_feeds(proto))


def test_save_does_not_touch_the_input_file(tmp_path):
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(DIGITS.read_bytes())
    before = file_state(source.parent)
    model = modelio.load(source)
    modelio.save(model, tmp_path / "out.onnx")
    modelio.save(model, tmp_path / "out_ext.onnx", external_data=True)
    assert file_state(source.parent) == before


def test_save_over_the_input_file(tmp_path):
    path = tmp_path / "model.onnx"
    modelio.save(modelio.load(DIGITS), path, external_data=True)
    model = modelio.load(path)  # weights are mapped from model.onnx.data
    modelio.save(model, path, external_data=True)
    modelio.save(model, path, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert_same_outputs(DIGITS, path, random_feeds(DIGITS))


@pytest.mark.parametrize("external_data", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, external_data):
    model = modelio.load(DIGITS)
    old = tmp_path / "kept.onnx"
    old.write_bytes(b"previous contents")

    def failing_write(proto, path):
        path.write_bytes(proto.SerializeToString()[:100])  # half-written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelio, "_write_proto", failing_write)
    for target in (tmp_path / "new.onnx", old):
        with pytest.raises(OSError, match="No space left"):
            modelio.save(model, target, external_data=external_data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.onnx"]
    assert old.read_bytes() == b"previous contents"


def test_save_errors(tmp_path):
    model = modelio.load(DIGITS)
    with pytest.raises(EdgegraphError, match="is a directory"):
        modelio.save(model, tmp_path)
    with pytest.raises(EdgegraphError, match="does not exist"):
        modelio.save(model, tmp_path / "missing" / "out.onnx")


def test_save_of_a_model_proto_with_external_data_leaves_the_proto_alone(tmp_path):
    proto = onnx.load(DIGITS)
    before = proto.SerializeToString()
    modelio.save(proto, tmp_path / "out.onnx", external_data=True)
    assert proto.SerializeToString() == before
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    assert_same_outputs(proto, tmp_path / "out.onnx", random_feeds(proto))


# ---------------------------------------------------------------------------------------------
# Shape inference


EXPECTED_SHAPES = {
    "if_loop": {"branch": ["batch", 3], "y": ["batch", 3]},
    "local_function": {"h": ["batch", 8], "y": ["batch", 8]},
    # Nothing is known about com.microsoft.Gelu's output; what comes after it still is.
    "custom_op": {"h": ["batch", 16], "g": None, "y": ["batch", 4]},
    # Only data propagation turns the declared [?, ?, ?, ?] into this.
    "symbolic_dim": {"h": ["batch", "seq", 8], "y": ["batch", "seq", 2, 4]},
    "opset11": {"a_mean": ["batch", 2, 1, 1], "sq": ["batch", 2], "y": ["batch", 2, 8, 8]},
    "opset13": {"a_mean": ["batch", 2, 1, 1], "sq": ["batch", 2], "y": ["batch", 2, 8, 8]},
    "opset17": {"a_mean": ["batch", 2, 1, 1], "sq": ["batch", 2], "y": ["batch", 2, 8, 8]},
    "opset21": {"a_mean": ["batch", 2, 1, 1], "sq": ["batch", 2], "y": ["batch", 2, 8, 8]},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_shape_inference_on_exporter_shapes(name):
    model = modelio.load(core.all_models()[name])
    tensors = model.graph.tensors()
    for tensor, shape in EXPECTED_SHAPES[name].items():
        assert tensors[tensor].shape == shape, tensor


def test_shape_inference_leaves_unknown_domains_alone():
    model = modelio.load(core.unknown_op_model())
    tensors = model.graph.tensors()
    assert tensors["r"].shape == ["batch", 3, 8, 8]
    assert tensors["w"].shape is None
    warp = next(n for n in model.graph.nodes if n.op == "Warp")
    assert warp.domain == "my.company" and warp.attrs["strength"] == pytest.approx(0.5)
    saved = model.to_proto()
    assert {o.domain: o.version for o in saved.opset_import}["my.company"] == 1


def test_shape_inference_degrades_when_onnx_fails(monkeypatch, caplog):
    proto = core.symbolic_dim_model()
    real = onnx.shape_inference.infer_shapes

    def without_data_propagation(model, check_type=False, strict_mode=False, data_prop=False):
        if data_prop:
            raise RuntimeError("data propagation crashed")
        return real(model, check_type=check_type, strict_mode=strict_mode, data_prop=False)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", without_data_propagation)
    assert modelio.load(proto).graph.tensors()["h"].shape == ["batch", "seq", 8]

    def always_fails(*args, **kwargs):
        raise RuntimeError("inference crashed")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", always_fails)
    with caplog.at_level(logging.WARNING, logger="edgegraph.ir"):
        assert ir.infer_shapes(proto) is proto
        model = modelio.load(proto)
    assert "shape inference failed" in caplog.text
    assert model.graph.tensors()["h"].shape is None
    assert_same_outputs(proto, model, random_feeds(proto))


def test_fix_input_shapes():
    model = modelio.load(core.symbolic_dim_model())
    ir.fix_input_shapes(model, {"x": [2, 5, 8]})
    tensors = model.graph.tensors()
    assert tensors["x"].shape == [2, 5, 8]
    assert tensors["h"].shape == [2, 5, 8]
    assert tensors["y"].shape == [2, 5, 2, 4]
    assert runtime.input_specs(model)[0].shape == (2, 5, 8)


@pytest.mark.parametrize("shapes, message", [
    ({"nope": [1, 2, 8]}, "has no input 'nope'"),
    ({"x": [1, 8]}, "rank 3"),
    ({"x": [1, 2, 9]}, "axis 2 is fixed to 8"),
])
def test_fix_input_shapes_errors(shapes, message):
    with pytest.raises(EdgegraphError, match=message):
        ir.fix_input_shapes(modelio.load(core.symbolic_dim_model()), shapes)


# ---------------------------------------------------------------------------------------------
# Copies and sizes


def test_copy_shares_nothing_mutable():
    model = modelio.load(DIGITS)
    original = outputs(model, random_feeds(model))
    clone = model.copy()
    weight = clone.graph.tensors()["stem.conv.weight"]
    weight.values[...] = 0  # in place: must not reach the original
    clone.graph.nodes.pop()
    assert np.any(model.graph.tensors()["stem.conv.weight"].values != 0)
    assert len(model.graph.nodes) == len(clone.graph.nodes) + 1
    np.testing.assert_array_equal(outputs(model, random_feeds(model))["logits"], original["logits"])


def test_to_proto_without_weights_is_small_and_complete():
    model = modelio.load(DIGITS)
    full, light = model.to_proto(), model.to_proto(weights=False)
    assert len(light.SerializeToString()) < len(full.SerializeToString()) / 4
    assert [t.name for t in light.graph.initializer] == [t.name for t in full.graph.initializer]
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in full.graph.node]
    assert model.to_proto().SerializeToString() == full.SerializeToString()  # weights are back


def test_proto_size_matches_serialized_size():
    proto = onnx.load(DIGITS)
    assert ir.proto_size(proto) == len(proto.SerializeToString())
    weights = sum(t.values.nbytes for t in modelio.load(proto).graph.tensors().values() if isinstance(t, gs.Constant))
    assert ir.proto_size(modelio.load(proto)) == weights


# ---------------------------------------------------------------------------------------------
# Graph helpers


def _chain(*ops: str) -> onnx.ModelProto:
    """x -> ops[0] -> t0 -> ops[1] -> ... -> y (every op unary)."""
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}") for i, op in enumerate(ops)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bypass_keeps_the_graph_output_name():
    proto = _chain("Relu", "Identity")
    model = modelio.load(proto)
    identity = next(n for n in model.graph.nodes if n.op == "Identity")
    ir.bypass(model.graph, identity)
    model.graph.cleanup().toposort()
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert [t.name for t in model.graph.outputs] == ["y"]
    assert model.graph.nodes[0].outputs[0].name == "y"
    assert_same_outputs(proto, model, random_feeds(proto))


def test_replace_all_uses_inserts_identity_when_the_producer_cannot_rename():
    # y = Identity(x): after bypassing, the output is the graph input itself.
    proto = _chain("Identity")
    model = modelio.load(proto)
    ir.bypass(model.graph, model.graph.nodes[0])
    model.graph.cleanup().toposort()
    assert [t.name for t in model.graph.outputs] == ["y"]
    assert [n.op for n in model.graph.nodes] == ["Identity"]
    assert_same_outputs(proto, model, random_feeds(proto))

    # The new tensor has another reader: it keeps its name, the output gets an Identity.
    proto = _chain("Relu", "Neg")
    model = modelio.load(proto)
    graph = model.graph
    relu_out, y = graph.tensors()["t0"], graph.tensors()["y"]
    graph.nodes.append(gs.Node("Abs", inputs=[relu_out], outputs=[gs.Variable("extra", np.float32, [2, 3])]))
    graph.outputs.append(graph.tensors()["extra"])
    neg = next(n for n in graph.nodes if n.op == "Neg")
    neg.outputs.clear()
    ir.replace_all_uses(graph, y, relu_out)
    graph.cleanup().toposort()
    assert [t.name for t in graph.outputs] == ["y", "extra"]
    assert ir.producer(graph.tensors()["y"]).op == "Identity"
    result = outputs(model, random_feeds(proto))
    np.testing.assert_array_equal(result["y"], np.maximum(random_feeds(proto)["x"], 0))


def test_namer_avoids_taken_names_and_is_deterministic():
    model = modelio.load(_chain("Relu", "Neg"))
    namer = ir.Namer(model.graph)
    assert namer("x") == "x_1"  # tensor name taken
    assert namer("n0") == "n0_1"  # node name taken
    assert namer("fresh") == "fresh"
    assert namer("fresh") == "fresh_1"
    assert namer("x") == "x_2"
    again = ir.Namer(model.graph)
    assert [again("x"), again("fresh")] == ["x_1", "fresh"]


def test_iteration_covers_subgraphs_and_functions():
    loops = modelio.load(core.if_loop_model())
    graphs = list(ir.iter_graphs(loops.graph))
    assert len(graphs) == 4  # main, then, else, body
    assert sorted(n.op for n in ir.iter_nodes(loops.graph)) == sorted(
        ["ReduceSum", "Greater", "If", "Loop", "MatMul", "MatMul", "Mul", "Add", "Identity"])
    functions = modelio.load(core.local_function_model())
    assert len(list(ir.iter_graphs(functions.graph))) == 2  # main and the function, once
    assert "Sigmoid" in {n.op for n in ir.iter_nodes(functions.graph)}


def test_constant_value_and_helpers():
    model = modelio.load(core.opset_model(13))
    tensors = model.graph.tensors()
    np.testing.assert_array_equal(ir.constant_value(tensors["sq_axes"]), [2, 3])
    assert ir.constant_value(tensors["x"]) is None
    conv = ir.producer(tensors["c"])
    assert conv.op == "Conv" and ir.producer(tensors["x"]) is None
    assert [n.op for n in ir.consumers(tensors["sq_axes"])] == ["Squeeze", "Unsqueeze"]
    assert ir.is_graph_output(model.graph, tensors["y"]) and not ir.is_graph_output(model.graph, tensors["c"])


def test_an_ir3_model_saves_as_one_that_loads_again(tmp_path):
    # IR 3 (CNTK, Caffe2 exports): every initializer is also a graph input. graphsurgeon writes
    # them as constants only, which the checker refuses at IR 3: the saved file says IR 4.
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ir3",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(proto)
    path = modelio.save(modelio.load(proto), tmp_path / "out.onnx")
    saved = onnx.load(path)
    onnx.checker.check_model(saved, full_check=True)
    assert saved.ir_version == 4 and [i.name for i in saved.graph.input] == ["x"]
    x = np.array([[1.0, 2.0]], np.float32)
    assert np.array_equal(runtime.run(runtime.session(modelio.load(path)), {"x": x})["y"], x @ numpy_helper.to_array(w))
