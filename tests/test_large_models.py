"""External data and models past protobuf's 2 GiB limit: load, run passes, save, run in onnxruntime.

The fast tests shrink `ir.PROTO_LIMIT` so that a small model takes the >2 GiB code paths; the
slow one (`pytest -m slow`) builds a real 2.3 GB model on disk.
"""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest

from conftest import DEFAULT_DIR
from edgegraph import ir, modelio, runtime
from edgegraph.context import CalibrationData, PassContext
from edgegraph.pipeline import Pass, run_pipeline
from edgegraph.registry import get_pass
from fixtures import core

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"


def file_state(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def outputs(model, feeds):
    sess = runtime.session(model)
    return runtime.run(sess, feeds)


def assert_same_outputs(expected, got):
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def cleanup_passes() -> list[Pass]:
    return [get_pass("cleanup")()]


EVAL = {"input": np.load(DEFAULT_DIR / "digits_eval.npz")["input"][:16]}


def test_external_data_round_trip_through_passes(tmp_path):
    source = tmp_path / "in" / "digits.onnx"
    source.parent.mkdir()
    modelio.save(modelio.load(DIGITS), source, external_data=True)
    assert (source.parent / "digits.onnx.data").stat().st_size > 0
    assert source.stat().st_size < DIGITS.stat().st_size / 10  # the weights are in the data file
    before = file_state(source.parent)
    expected = outputs(DIGITS, EVAL)

    model = modelio.load(source)
    ctx = PassContext(calibration=CalibrationData.from_npz(DEFAULT_DIR / "digits_calib.npz"), progress=False)
    result, _ = run_pipeline(model, cleanup_passes(), ctx)
    optimized = outputs(result, EVAL)
    np.testing.assert_allclose(optimized["logits"], expected["logits"], rtol=1e-4, atol=1e-4)  # folding rounds
    (tmp_path / "out").mkdir()
    for name, external in (("auto.onnx", None), ("ext.onnx", True), ("inline.onnx", False)):
        path = modelio.save(result, tmp_path / "out" / name, external_data=external)
        assert (path.parent / f"{name}.data").exists() == bool(external)
        assert_same_outputs(optimized, outputs(path, EVAL))
        assert_same_outputs(optimized, outputs(modelio.load(path), EVAL))
    assert file_state(source.parent) == before


def test_external_weights_are_mapped_not_read(tmp_path):
    path = modelio.save(modelio.load(DIGITS), tmp_path / "digits.onnx", external_data=True)
    model = modelio.load(path)
    weight = model.graph.tensors()["branch3.conv.weight"]
    assert isinstance(weight.values, np.memmap) and not weight.values.flags.writeable
    # Copies share the read-only map; a pass replaces values, it cannot scribble on the file.
    clone = model.copy()
    assert clone.graph.tensors()["branch3.conv.weight"].values is weight.values
    with pytest.raises(ValueError, match="read-only"):
        clone.graph.tensors()["branch3.conv.weight"].values[0] = 0
    clone.graph.tensors()["branch3.conv.weight"].values = np.zeros_like(weight.values)
    assert np.any(model.graph.tensors()["branch3.conv.weight"].values != 0)
    assert_same_outputs(outputs(DIGITS, EVAL), outputs(model, EVAL))


def test_models_past_the_proto_limit_take_the_external_data_path(tmp_path, monkeypatch):
    proto = onnx.load(DIGITS)
    monkeypatch.setattr(ir, "PROTO_LIMIT", 10_000)  # the digits model (40 kB) is now "too big"
    expected = outputs(proto, EVAL)

    serialize = onnx.ModelProto.SerializeToString

    def refuse_big(message, *args, **kwargs):
        data = serialize(message, *args, **kwargs)
        if len(data) > 20_000:
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
        return data

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", refuse_big)
    assert ir.proto_size(proto) > ir.PROTO_LIMIT
    model = modelio.load(proto)  # shape inference without serializing the weights
    assert model.graph.outputs[0].shape == ["batch", 10]
    assert_same_outputs(expected, outputs(model, EVAL))  # session through a temporary folder
    assert_same_outputs(expected, outputs(proto, EVAL))
    result, report = run_pipeline(model, cleanup_passes(), PassContext(progress=False))
    assert report.metrics["logits"].max_abs < 1e-4
    path = modelio.save(result, tmp_path / "big.onnx")  # external data chosen automatically
    assert (tmp_path / "big.onnx.data").exists()
    assert_same_outputs(outputs(result, EVAL), outputs(path, EVAL))
    inferred = ir.infer_shapes(proto)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    assert shapes["/pool/MaxPool_output_0"] == ["batch", 32, 8, 8]
    assert len(inferred.graph.initializer) == len(proto.graph.initializer)


def test_session_folder_is_removed_with_the_session(monkeypatch):
    monkeypatch.setattr(ir, "PROTO_LIMIT", 10_000)
    sess = runtime.session(modelio.load(DIGITS))
    folder = sess._edgegraph_cleanup.folder
    assert (folder / "model.onnx").exists()
    runtime.run(sess, EVAL)
    del sess
    gc.collect()
    assert not folder.exists()


@pytest.mark.slow
def test_model_over_2gb(tmp_path):
    """A 2.3 GB model: load, cleanup, save (external data chosen by size), run in onnxruntime."""
    source = core.write_large_model(tmp_path / "in", int(2.3e9))
    feeds = core.large_model_feeds(source)
    expected = outputs(source, feeds)
    before = {p.name: p.stat().st_mtime_ns for p in source.parent.iterdir()}

    model = modelio.load(source)
    assert ir.proto_size(model) > 2**31
    assert model.graph.tensors()["y"].shape == ["batch", "tokens"]
    result, report = run_pipeline(model, cleanup_passes(), PassContext(progress=False))
    assert report.metrics and all(m.max_abs == 0 for m in report.metrics.values())
    assert "Identity" not in {n.op for n in result.graph.nodes}
    del model
    (tmp_path / "out").mkdir()
    path = modelio.save(result, tmp_path / "out" / "large.onnx")
    del result
    gc.collect()
    assert (path.parent / "large.onnx.data").stat().st_size > 2**31
    assert_same_outputs(expected, outputs(path, feeds))
    assert {p.name: p.stat().st_mtime_ns for p in source.parent.iterdir()} == before


def test_external_data_of_every_storage_kind(tmp_path):
    """Memory-mapped (float16, int8, bool, int64) and read-in (packed int4) weights both survive."""
    rng = np.random.default_rng(0)
    arrays = {
        "w_f16": rng.standard_normal((32, 32)).astype(np.float16),
        "w_i8": rng.integers(-128, 127, (40, 40), dtype=np.int8),
        "w_bool": rng.random((30, 50)) < 0.5,
        "w_i64": rng.integers(-2**40, 2**40, (16, 16), dtype=np.int64),
    }
    tensors = [onnx.numpy_helper.from_array(a, name) for name, a in arrays.items()]
    int4 = rng.integers(-8, 8, 4096).astype(np.int8)
    nibbles = (int4 & 0x0F).astype(np.uint8)  # two's complement, first value in the low nibble
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    tensors.append(onnx.helper.make_tensor("w_i4", onnx.TensorProto.INT4, [4096], packed, raw=True))
    # onnxruntime reads int4 only through DequantizeLinear (scale 1 gives the values back as floats).
    nodes = [onnx.helper.make_node("Identity", [n], [f"{n}_out"]) for n in arrays]
    nodes.append(onnx.helper.make_node("DequantizeLinear", ["w_i4", "one"], ["w_i4_out"]))
    tensors.append(onnx.numpy_helper.from_array(np.float32(1), "one"))
    outs = [onnx.helper.make_tensor_value_info(f"{t.name}_out", t.data_type, list(t.dims)) for t in tensors[:4]]
    outs.append(onnx.helper.make_tensor_value_info("w_i4_out", onnx.TensorProto.FLOAT, [4096]))
    graph = onnx.helper.make_graph(nodes, "kinds", [], outs, tensors)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    expected = outputs(proto, {})
    source = tmp_path / "kinds.onnx"
    onnx.save_model(proto, source, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 7  # one data file per tensor (the scalar too), as some exporters write

    model = modelio.load(source)
    values = {n: model.graph.tensors()[n].values for n in arrays}
    assert all(isinstance(values[n], np.memmap) for n in arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(values[name], array)
    np.testing.assert_array_equal(expected["w_i4_out"], int4)
    assert_same_outputs(expected, outputs(model, {}))
    (tmp_path / "out").mkdir()
    out = modelio.save(model.copy(), tmp_path / "out" / "kinds.onnx", external_data=True)
    assert_same_outputs(expected, outputs(out, {}))
