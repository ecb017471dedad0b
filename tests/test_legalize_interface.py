"""legalize(interface=target) and the mask rewrites NNAPI needs: SqueezeNet's float16 interface,
MiniLM's int64 inputs, bool attention mask and Softmax NaN guards (issue #13's NNAPI goal)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import REPO, require_shared
from onnx import TensorProto, helper

import edgegraph
from edgegraph import modelio, runtime
from edgegraph.context import PassContext
from edgegraph.errors import PassOptionError
from edgegraph.passbase import settle
from edgegraph.passes.legalize import Legalize
from edgegraph.pipeline import specialise
from edgegraph.targets import check, load_target
from tools import bench_legalize

MODELS = REPO.parent / "shared" / "models"
SQUEEZENET = "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx"
MINILM = "minilm_l6_v2_int8/model.onnx"


def _run(model, feeds):
    """Outputs of `model` fed `feeds` in the dtypes its inputs declare (the same values)."""
    sess = runtime.session(model, threads=1, optimize=False)
    specs = {s.name: s.dtype for s in runtime.input_specs(sess)}
    return runtime.run(sess, {k: np.asarray(v).astype(specs[k]) for k, v in feeds.items()})


def _fixed(name):
    path = require_shared(MODELS / name)
    model = modelio.load(path)
    feeds = bench_legalize.model_inputs(path, model.to_proto(weights=False))
    return model, specialise(model, {k: v.shape for k, v in feeds.items()}), feeds


def _dtypes(model) -> list[str]:
    proto = model.to_proto(weights=False)
    return [TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*proto.graph.input, *proto.graph.output)]


def test_squeezenet_float16_interface_becomes_float32_for_nnapi():
    """The two interface Casts go: one NNAPI partition over every node. Fed the same float16
    values as float32, the output is what the kept-interface model rounds to float16."""
    model, fixed, feeds = _fixed(SQUEEZENET)
    kept = bench_legalize.legalize_stage(fixed, "nnapi")
    assert _dtypes(kept) == _dtypes(model) == ["FLOAT16", "FLOAT16"]  # the default never changes the interface
    assert [(u.op, u.fix) for u in check.check(kept, "nnapi", macs=False).unsupported] == [("Cast", "interface")] * 2
    legal = bench_legalize.legalize_stage(fixed, "nnapi", interface="target")
    assert _dtypes(legal) == ["FLOAT", "FLOAT"]
    result = check.check(legal, "nnapi", macs=False)
    assert result.partitions == 1 and not result.unsupported
    (new,), (old,), (original,) = (list(_run(m, feeds).values()) for m in (legal, kept, model))
    assert new.dtype == np.float32
    np.testing.assert_array_equal(new.astype(np.float16), old)
    np.testing.assert_allclose(new, original.astype(np.float32), rtol=0, atol=1e-3 * float(np.abs(new).max()))


def _padded(feeds, length: int) -> dict:
    """The reference sentence cut to `length` tokens (its [SEP] kept last) and padded back with
    id 0 and attention_mask 0: a real tokenised input whose mask has zeros."""
    ids, mask, types = (np.array(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    ids[0, length - 1], ids[0, length:], mask[0, length:], types[0, length:] = 102, 0, 0, 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_minilm_is_one_nnapi_partition_with_its_mask_in_arithmetic():
    """int64 inputs -> int32, the bool mask chain (Cast/GatherND/And/Where) -> float arithmetic,
    the Softmax NaN guards dropped (finite=true): one NNAPI partition over every node, and the
    original's outputs on real tokenised inputs with and without padding."""
    model, fixed, feeds = _fixed(MINILM)
    legal = bench_legalize.legalize_stage(fixed, "nnapi", interface="target", finite=True)
    assert _dtypes(legal) == ["INT32", "INT32", "INT32", "FLOAT"]
    result = check.check(legal, "nnapi", macs=False)
    assert result.partitions == 1 and not result.unsupported, [(u.op, u.reason) for u in result.unsupported]
    ops = {n.op for n in legal.graph.nodes}
    assert not ops & {"Where", "IsNaN", "And", "GatherND"}
    for length in (12, 9, 5, 2):
        sample = feeds if length == 12 else _padded(feeds, length)
        assert sample["attention_mask"].sum() == length
        (ref,), (got,) = _run(model, sample).values(), _run(legal, sample).values()
        ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        cosine = ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)
        assert cosine >= 0.99999 and np.abs(ref - got).max() <= 1e-4, (length, cosine, np.abs(ref - got).max())


def test_minilm_keeps_its_interface_by_default():
    model, fixed, _ = _fixed(MINILM)
    legal = bench_legalize.legalize_stage(fixed, "nnapi")
    assert _dtypes(legal) == _dtypes(model)
    refused = check.check(legal, "nnapi", macs=False).unsupported
    assert {u.op for u in refused} == {"Cast", "IsNaN", "Where"}
    assert [u.fix for u in refused if u.op == "Cast"] == ["interface"]  # Cast(attention_mask: int64)


def _indices_model() -> onnx.ModelProto:
    """ids (int64) -> Gather from a table; shape (int64) -> Expand: only ids can become int32."""
    table = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(6, 2), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("Expand", ["rows", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
                                           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_int64_input_another_op_reads_keeps_its_dtype():
    model = edgegraph.load(_indices_model())
    result = Legalize(interface="target").run(model, PassContext(progress=False, target=load_target("nnapi")))
    settle(model)
    assert result.stats["interface int64->int32"] == 1
    assert _dtypes(model) == ["INT32", "INT64", "FLOAT"]
    assert result.details["interface_kept"] == [{"tensor": "shape", "dtype": "int64", "why": (
        "Expand reads it as input 1 (only Gather/GatherElements indices and Cast read int32 alike)")}]
    feeds = {"ids": np.array([5, 0, 3]), "shape": np.array([1, 2])}
    np.testing.assert_array_equal(_run(model, feeds)["y"], _run(_indices_model(), feeds)["y"])


def test_the_pipeline_verifies_a_changed_interface_on_the_same_values():
    """`edgegraph opt -p legalize(interface=target) --target nnapi`: the checker feeds the new
    model the same samples in its own dtypes, so the exact pass is verified, not refused."""
    out = edgegraph.optimize(_indices_model(), "legalize(interface=target)", target="nnapi", verify=True, timing=False)
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.INT32, TensorProto.INT64]


def test_interface_needs_a_target_and_a_known_value():
    with pytest.raises(PassOptionError, match="give --target"):
        Legalize(interface="target").run(edgegraph.load(_indices_model()), None)
    with pytest.raises(PassOptionError, match="interface must be one of keep, target"):
        Legalize(interface="float32")
