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
from edgegraph import ir, runtime
from edgegraph.context import CalibrationData, PassContext
from edgegraph.pipeline import Pass, PassResult, run_pipeline
from edgegraph.registry import get_pass
from edgegraph.errors import UnknownPassError
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
    """The real cleanup pass when it is registered, else an exact pass that edits the graph."""
    try:
        return [get_pass("cleanup")()]
    except UnknownPassError:
        return [_RemoveIdentities()]


class _RemoveIdentities(Pass):
    name = "test-remove-identities"

    def run(self, model, ctx):
        found = [n for n in model.graph.nodes if n.op == "Identity"]
        for node in found:
            ir.bypass(model.graph, node)
        return PassResult(modified=bool(found))


EVAL = {"input": np.load(DEFAULT_DIR / "digits_eval.npz")["input"][:16]}


def test_external_data_round_trip_through_passes(tmp_path):
    source = tmp_path / "in" / "digits.onnx"
    source.parent.mkdir()
    ir.save(ir.load(DIGITS), source, external_data=True)
    assert (source.parent / "digits.onnx.data").stat().st_size > 0
    assert source.stat().st_size < 10_000  # the weights are in the data file
    before = file_state(source.parent)
    expected = outputs(DIGITS, EVAL)

    model = ir.load(source)
    ctx = PassContext(calibration=CalibrationData.from_npz(DEFAULT_DIR / "digits_calib.npz"), progress=False)
    result, _ = run_pipeline(model, cleanup_passes(), ctx)
    optimized = outputs(result, EVAL)
    np.testing.assert_allclose(optimized["logits"], expected["logits"], rtol=1e-4, atol=1e-4)  # folding rounds
    (tmp_path / "out").mkdir()
    for name, external in (("auto.onnx", None), ("ext.onnx", True), ("inline.onnx", False)):
        path = ir.save(result, tmp_path / "out" / name, external_data=external)
        assert (path.parent / f"{name}.data").exists() == bool(external)
        assert_same_outputs(optimized, outputs(path, EVAL))
        assert_same_outputs(optimized, outputs(ir.load(path), EVAL))
    assert file_state(source.parent) == before


def test_external_weights_are_mapped_not_read(tmp_path):
    path = ir.save(ir.load(DIGITS), tmp_path / "digits.onnx", external_data=True)
    model = ir.load(path)
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
    model = ir.load(proto)  # shape inference without serializing the weights
    assert model.graph.outputs[0].shape == ["batch", 10]
    assert_same_outputs(expected, outputs(model, EVAL))  # session through a temporary folder
    assert_same_outputs(expected, outputs(proto, EVAL))
    result, report = run_pipeline(model, cleanup_passes(), PassContext(progress=False))
    assert report.metrics["logits"].max_abs < 1e-4
    path = ir.save(result, tmp_path / "big.onnx")  # external data chosen automatically
    assert (tmp_path / "big.onnx.data").exists()
    assert_same_outputs(outputs(result, EVAL), outputs(path, EVAL))
    inferred = ir.infer_shapes(proto)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    assert shapes["/pool/MaxPool_output_0"] == ["batch", 16, 4, 4]
    assert len(inferred.graph.initializer) == len(proto.graph.initializer)


def test_session_folder_is_removed_with_the_session(monkeypatch):
    monkeypatch.setattr(ir, "PROTO_LIMIT", 10_000)
    sess = runtime.session(ir.load(DIGITS))
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

    model = ir.load(source)
    assert ir.proto_size(model) > 2**31
    assert model.graph.tensors()["y"].shape == ["batch", "tokens"]
    result, report = run_pipeline(model, cleanup_passes(), PassContext(progress=False))
    assert report.metrics and all(m.max_abs == 0 for m in report.metrics.values())
    assert "Identity" not in {n.op for n in result.graph.nodes}
    del model
    (tmp_path / "out").mkdir()
    path = ir.save(result, tmp_path / "out" / "large.onnx")
    del result
    gc.collect()
    assert (path.parent / "large.onnx.data").stat().st_size > 2**31
    assert_same_outputs(expected, outputs(path, feeds))
    assert {p.name: p.stat().st_mtime_ns for p in source.parent.iterdir()} == before
