"""legalize: every rewrite proven on the ONNX backend node tests of the op it replaces and on the
real models where the op appears; the rule driver's reasons; target-driven rewriting; opset
conversion; fuse-activations leaving HardSigmoid/HardSwish out for a target that lacks them."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgegraph
from edgegraph import runtime
from edgegraph.context import PassContext
from edgegraph.errors import PassOptionError
from edgegraph.passbase import settle
from edgegraph.passes.cleanup import FuseActivations
from edgegraph.passes.cleanup.common import Legal, NoMatch, apply_first_rule
from edgegraph.passes.legalize import REWRITES, Legalize
from edgegraph.targets import Profile, QuantScheme

from clihelp import run_cli
from fixtures.legalize import hard_sigmoid_then_sigmoid
from conftest import MODELS, REPO, require_shared
from test_fuse_activations import hard_swish

sys.path.insert(0, str(REPO / "tools"))
import bench_legalize  # noqa: E402

# The rewrites the backend node tests can prove (each must match on at least one case).
PROVEN_ON_NODE_TESTS = {
    "DepthToSpace", "Einsum", "Erf", "Gather", "Gelu", "GroupNormalization", "HardSigmoid", "HardSwish",
    "InstanceNormalization", "LayerNormalization", "Mish", "BatchNormalization", "Pad", "Softplus", "SpaceToDepth", "Swish", "ConvTranspose",
    "Attention", "Where", "GatherND", "Flatten",
}
# Cases a rule declines, and why (anything else declined is a regression).
DECLINED = {
    ("Einsum", "repeated index"),  # test_einsum_batch_diagonal: '...ii->...i' is no MatMul
    ("Upsample", "needs constant scales"),  # test_upsample_nearest feeds scales as an input (opset 9)
    ("Gather", "indices are computed at run time"),  # cannot know whether they are negative
    ("ConvTranspose", "group or dilations other than 1"),
    ("ConvTranspose", "needs a constant 4-D weight"),  # 1-D and 3-D
    ("Attention", "nonpad_kv_seqlen (external KV cache) is not handled"),
    ("Attention", "sliding windows are not handled"),
    ("BatchNormalization", "training mode"),
    ("Pad", "mode wrap"),
    ("IsNaN", "may be +-inf"),
    ("Where", "not constant"),  # a computed branch (the *_expanded function bodies): no exact 0/1 arithmetic
    ("Where", "+-inf or NaN"),  # attention's -inf masks: -inf * 0 is NaN
    ("Where", "not one float16/32/64 dtype"),  # test_where_long_example: int64 branches
    ("GatherND", "batch_dims is not 0"),  # test_isnan feeds +-inf, where x - x is NaN too (see test_isnan_of_a_bounded_value_...)
}


def _run(proto, feeds):
    return runtime.run(runtime.session(proto, threads=1, optimize=False), feeds)


def _legalize(proto, ops, *, target=None, opset=0):
    model = edgegraph.load(proto)
    ctx = PassContext(progress=False, target=target) if target is not None else None
    result = Legalize(ops=ops, opset=opset).run(model, ctx)
    if result.modified:
        settle(model)
    return model.to_proto(), result


def _ops(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


# --- the backend node tests --------------------------------------------------------------------

def test_every_rewrite_matches_the_backend_node_tests_of_its_op(backend_node_cases):
    results = bench_legalize.node_case_results(backend_node_cases)
    broken = [f"{r.name} ({r.op}): {r.detail}" for r in results if r.status in ("differs", "broken")]
    assert not broken, "\n".join(broken)
    matched = Counter(r.op for r in results if r.status == "matches")
    assert PROVEN_ON_NODE_TESTS <= set(matched), PROVEN_ON_NODE_TESTS - set(matched)
    assert sum(matched.values()) >= 230  # measured: 230 cases rewritten, all matching
    unexpected = [f"{r.name} ({r.op}): {r.detail}" for r in results if r.status == "declined"
                  and not any(op == r.op and phrase in r.detail for op, phrase in DECLINED)]
    assert not unexpected, "\n".join(unexpected)
    # opset-13 Softmax/LogSoftmax/Hardmax are already in the form the opset-7 rewrite makes
    assert all(r.status == "legal" for r in results if r.op in ("Softmax", "LogSoftmax", "Hardmax")
               and r.status != "skipped")


def test_upsample_node_test_with_constant_scales_matches(backend_node_cases):
    """test_upsample_nearest (opset 9, no Resize yet) with its scales given as an initializer."""
    case = next(c for c in backend_node_cases if c.name == "test_upsample_nearest")
    (x, scales), (expected,) = case.data_sets[0]
    proto = onnx.ModelProto()
    proto.CopyFrom(case.model)
    del proto.graph.input[1]
    proto.graph.initializer.append(numpy_helper.from_array(scales, proto.graph.node[0].input[1]))
    rewritten, result = _legalize(proto, ["Upsample"])
    assert result.stats == {"Upsample(nearest)->Gather": 1}
    assert "Upsample" not in _ops(rewritten)
    np.testing.assert_array_equal(_run(rewritten, {"X": x})["Y"], expected)


def _upsample_model(opset: int, mode: str, scales) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if opset < 9:  # scales were an attribute before opset 9
        graph = helper.make_graph([helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=list(map(float, scales)))],
                                  "up", [x], [y])
    else:
        scale = numpy_helper.from_array(np.asarray(scales, np.float32), "scales")
        graph = helper.make_graph([helper.make_node("Upsample", ["x", "scales"], ["y"], mode=mode)], "up", [x], [y],
                                  [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2.5, 2], [1, 1, 1, 3]])
def test_upsample_becomes_gathers_with_the_same_outputs(opset, mode, scales):
    """Upsample is asymmetric (nearest rounds down), as onnxruntime runs it; whole or fractional scales."""
    proto = _upsample_model(opset, mode, scales)
    rewritten, result = _legalize(proto, ["Upsample"])
    assert result.modified and "Upsample" not in _ops(rewritten) and "Gather" in _ops(rewritten)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 3, 5)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6, atol=1e-6)


def _coerced_softmax(op: str, opset: int, axis: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 5])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], axis=axis)], "sm", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize(("opset", "axis"), [(7, 1), (11, 2), (11, -3), (12, 0)])
def test_opset_7_softmax_on_4d_becomes_flatten_softmax_reshape(op, opset, axis):
    proto = _coerced_softmax(op, opset, axis)
    rewritten, result = _legalize(proto, [op])
    assert result.stats == {f"{op}-{opset}->Flatten/{op}/Reshape": 1}
    assert _ops(rewritten)["Flatten"] == 1 and _ops(rewritten)[op] == 1
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6, atol=1e-7)
    again, second = _legalize(rewritten, [op])  # the Softmax it made is legal: nothing reported
    assert not second.modified and not second.details


# --- the real models ---------------------------------------------------------------------------

REAL = [
    ("ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx", ["HardSigmoid", "BatchNormalization"], 0),
    ("ppocr_v4_paddle2onnx/ch_PP-OCRv4_det_infer.onnx", ["HardSigmoid", "ConvTranspose"], 0),
    ("agllnet_lowlight_tf2onnx/model_float32_256x256.onnx", ["ConvTranspose"], 0),
    ("minilm_l6_v2_int8/model.onnx", ["Erf", "LayerNormalization"], 0),
    ("style_transfer_candy/candy.onnx", ["ImageScaler", "Crop", "Affine", "InstanceNormalization", "ConvTranspose", "Pad"], 0),
    ("deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", ["Upsample"], 0),
    ("deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", ["Upsample"], 11),
    ("squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", ["Softmax"], 0),
]


@pytest.mark.parametrize(("name", "ops", "opset"), REAL, ids=[f"{n.split('/')[1][:12]}-{o}" for n, _, o in REAL])
def test_real_models_lose_the_ops_and_keep_their_outputs(name, ops, opset):
    path = require_shared(MODELS / name)
    row = bench_legalize.model_result(path, ops, opset=opset)
    assert row["within_tolerance"], row["max_abs_diff"]
    assert not row["not_rewritten"], row["not_rewritten"]
    for op, (before, after) in row["op_nodes"].items():
        assert before > 0
        # (the opset-7 Softmax rewrite makes an opset-7 Softmax of a 2-D tensor)
        assert after == (before if op == "Softmax" else 0), (op, before, after)
    assert row["rewrites"]


# --- the rule driver -------------------------------------------------------------------------

def test_rule_driver_returns_each_rules_reason_and_lets_errors_through():
    def never(owner, graph, node, opset):
        return NoMatch("wrong phase of the moon")

    def silent(owner, graph, node, opset):
        return None

    def fine(owner, graph, node, opset):
        return Legal("already fine")

    def buggy(owner, graph, node, opset):
        return node.attrs["missing"]  # a bug, not a "no match"

    node = edgegraph.load(_coerced_softmax("Softmax", 13, -1)).graph.nodes[0]
    result = apply_first_rule([never, silent], None, None, node, 13)
    assert not result and isinstance(result, NoMatch) and not isinstance(result, Legal)
    assert result.reason == "never: wrong phase of the moon; silent: pattern not found"
    assert isinstance(apply_first_rule([fine], None, None, node, 13), Legal)
    with pytest.raises(KeyError):
        apply_first_rule([never, buggy], None, None, node, 13)


def test_what_cannot_be_rewritten_is_reported(caplog):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    graph = helper.make_graph([helper.make_node("Einsum", ["x"], ["y"], name="diag", equation="...ii->...i")],
                              "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    _, result = _legalize(proto, ["Einsum"])
    assert not result.modified and result.stats == {"not_rewritten": 1}
    (left,) = result.details["not_rewritten"]
    assert left["node"] == "diag" and "repeated index" in left["not_rewritten"]
    assert "1 node(s) could not be rewritten: Einsum x1 (Einsum is listed in ops: einsum: repeated index" in caplog.text


def test_unknown_op_is_refused_in_one_line(capsys, tmp_path):
    assert REWRITES and "Conv" not in REWRITES
    with pytest.raises(PassOptionError, match="no rewrite for Conv"):
        Legalize(ops=["Conv"])
    path = tmp_path / "m.onnx"
    onnx.save(_coerced_softmax("Softmax", 13, -1), path)
    code, out, err = run_cli(capsys, "opt", str(path), "-p", "legalize(ops=[Conv])", "-o", str(tmp_path / "o.onnx"))
    assert code == 2 and "no rewrite for Conv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


# --- targets ----------------------------------------------------------------------------------

class _LacksHardSigmoid:
    """A stand-in of a target profile (`Profile.unsupported(node, model_context)`)."""

    name = "stand-in"

    def unsupported(self, node, model):
        return "no HardSigmoid here" if node.op == "HardSigmoid" else None


def _profile(name: str, ops) -> Profile:
    """A target profile that runs exactly `ops` (no other constraint)."""
    return Profile(name=name, description="", source=(), ops=frozenset(ops), rules={}, quant=QuantScheme())


@pytest.mark.parametrize("target", [_LacksHardSigmoid(), _profile("list", {"Sigmoid", "Mul", "Add", "Clip"})])
def test_with_a_target_only_what_it_lacks_is_rewritten(target):
    proto = hard_sigmoid_then_sigmoid()
    rewritten, result = _legalize(proto, [], target=target)
    assert result.stats == {"HardSigmoid->Mul/Add/Clip": 1}
    assert _ops(rewritten) == Counter({"Mul": 1, "Add": 1, "Clip": 1, "Sigmoid": 1})
    feeds = {"x": np.linspace(-5, 5, 16, dtype=np.float32).reshape(2, 8)}
    np.testing.assert_allclose(_run(rewritten, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6)
    # the default target (cpu: every op) keeps everything
    assert not _legalize(proto, [], target=edgegraph.api.load_target("cpu"))[1].modified


def test_opset_conversion_down_and_up_keeps_outputs():
    proto = _coerced_softmax("Softmax", 13, -1)
    down, result = _legalize(proto, [], opset=11)
    assert result.stats == {"opset 13->11": 1} and down.opset_import[0].version == 11
    up, result = _legalize(down, [], opset=17)
    assert up.opset_import[0].version == 17
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    for other in (down, up):
        np.testing.assert_allclose(_run(other, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6)


@pytest.mark.parametrize(("lacks", "expected"), [
    (set(), {"HardSwish"}), ({"HardSwish"}, {"HardSigmoid", "Mul"}), ({"HardSwish", "HardSigmoid"}, {"Clip"})])
def test_fuse_activations_fuses_only_into_ops_the_target_runs(lacks, expected):
    class Lacks:
        name = "stand-in"

        def unsupported(self, node, model):
            return "lacks it" if node.op in lacks else None

    proto = hard_swish(17)
    model = edgegraph.load(proto)
    result = FuseActivations().run(model, PassContext(progress=False, target=Lacks()))
    assert result.modified == (lacks != {"HardSwish", "HardSigmoid"})
    settle(model)
    assert expected <= set(_ops(model.to_proto())) and not (lacks & set(_ops(model.to_proto())))
    feeds = {"x": np.linspace(-6, 6, 16, dtype=np.float32).reshape(2, 8)}
    np.testing.assert_allclose(_run(model.to_proto(), feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6, atol=1e-7)


def test_legalize_runs_in_the_pipeline_with_verification(tmp_path):
    """`edgegraph opt -p legalize(...)`: the manager verifies it as an exact pass."""
    proto = _coerced_softmax("Softmax", 7, 1)
    out = edgegraph.optimize(proto, "legalize(ops=[Softmax])", verify=True, timing=False)
    assert _ops(out)["Flatten"] == 1


def _conv_transpose(strides, pads, output_padding, kernel=(3, 3)) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, *kernel)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=strides, pads=pads,
                            output_padding=output_padding)
    return helper.make_model(helper.make_graph([node], "ct", [x], [y], [w, b]), opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(("strides", "pads", "output_padding", "kernel"), [
    ([2, 2], [0, 0, 1, 1], [1, 1], (3, 3)),  # AGLLNet's form
    ([2, 2], [1, 0, 0, 1], [0, 1], (4, 2)), ([3, 3], [2, 1, 1, 2], [2, 0], (5, 3)), ([1, 1], [1, 1, 1, 1], [0, 0], (3, 3)),
    ([2, 3], [1, 2, 0, 1], [1, 2], (3, 4)),  # strides differ: Reshape/Transpose instead of DepthToSpace
])
def test_conv_transpose_becomes_conv_and_depth_to_space(strides, pads, output_padding, kernel):
    proto = _conv_transpose(strides, pads, output_padding, kernel)
    rewritten, result = _legalize(proto, ["ConvTranspose"])
    assert result.stats == {"ConvTranspose->Conv/DepthToSpace/Slice": 1}
    assert "ConvTranspose" not in _ops(rewritten) and _ops(rewritten)["Conv"] == 1
    assert ("DepthToSpace" in _ops(rewritten)) == (strides[0] == strides[1] > 1)
    feeds = {"x": np.random.default_rng(4).standard_normal((1, 4, 5, 6)).astype(np.float32)}
    expected = _run(proto, feeds)["y"]
    got = _run(rewritten, feeds)["y"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_rewrite_into_ops_the_target_lacks_is_undone():
    """A target with neither Gather nor Resize: Upsample as Gathers would not help it."""
    target = _profile("no-gather", {"Mul", "Add", "Relu"})
    proto = _upsample_model(9, "linear", [1, 1, 2, 2])
    rewritten, result = _legalize(proto, [], target=target)
    assert not result.modified and _ops(rewritten) == Counter({"Upsample": 1})
    (left,) = result.details["not_rewritten"]
    assert left["not_rewritten"] == ("upsample: it would make Gather, which no-gather cannot run either "
                                     "(legalize(opset=11) makes it a Resize instead)")


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_becomes_resize_for_a_target_with_resize(opset, mode):
    """A CoreML-like target with Resize but no Upsample or Gather: legalize converts the model to
    opset 11 itself, Resize keeping Upsample's asymmetric coordinates (onnx's converter alone
    would make them half_pixel)."""
    target = _profile("resize-only", {"Resize", "Relu"})
    proto = _upsample_model(opset, mode, [1, 1, 2.5, 2])
    rewritten, result = _legalize(proto, [], target=target)
    assert result.stats == {f"opset {opset}->11 (Upsample->Resize)": 1}
    assert _ops(rewritten) - Counter({"Constant": 2}) == Counter({"Resize": 1})  # (roi and scales)
    (resize,) = [n for n in rewritten.graph.node if n.op_type == "Resize"]
    assert {a.name: helper.get_attribute_value(a) for a in resize.attribute}["coordinate_transformation_mode"] == b"asymmetric"
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 2, 3, 5)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("producer", ["Softmax", "Sigmoid"])
def test_isnan_of_a_bounded_value_becomes_sub_and_cast(backend_node_cases, producer):
    """IsNaN(Softmax(x)) (torch's attention NaN guard) as Cast(p - p, bool) for CoreML, which has
    no IsNaN: on test_isnan's values (NaN, +-inf) and rows of only -inf or +inf, which make NaN."""
    case = next(c for c in backend_node_cases if c.name == "test_isnan")
    values = case.data_sets[0][0][0].astype(np.float32)  # [-1.2, nan, inf, 2.8, -inf, inf]
    rows = np.stack([values, np.full_like(values, -np.inf), np.full_like(values, np.inf), np.arange(6, dtype=np.float32)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(rows.shape))
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, list(rows.shape))
    nodes = [helper.make_node(producer, ["x"], ["p"], **({"axis": -1} if producer == "Softmax" else {})),
             helper.make_node("IsNaN", ["p"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    target = _profile("no-isnan", {producer, "Sub", "Cast"})
    rewritten, result = _legalize(proto, [], target=target)
    assert result.stats == {f"IsNaN({producer})->Sub/Cast": 1} and "IsNaN" not in _ops(rewritten)
    expected = _run(proto, {"x": rows})["y"]
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(_run(rewritten, {"x": rows})["y"], expected)


@pytest.mark.parametrize("name", ["test_reflect_pad", "test_edge_pad"])
def test_reflect_and_edge_pad_become_slices_for_a_target_without_gather(backend_node_cases, name):
    """CoreML's ML Program has neither Pad nor Gather: the Gather rewrite is undone and the
    Slice/Concat one applies, matching the backend node test's expected output."""
    case = next(c for c in backend_node_cases if c.name == name)
    inputs, (expected,) = case.data_sets[0]
    frozen = bench_legalize.freeze_inputs(case.model, inputs)
    target = _profile("no-gather", {"Slice", "Concat"})
    rewritten, result = _legalize(frozen, [], target=target)
    mode = name.split("_")[1]
    assert result.stats == {f"Pad({mode})->Slice/Concat": 1}
    assert set(_ops(rewritten)) == {"Slice", "Concat"}
    np.testing.assert_array_equal(_run(rewritten, {"x": inputs[0]})["y"], expected)


# (model, target, nodes the target still refuses after legalize at the reference shapes)
REAL_TARGETS = [
    ("minilm_l6_v2_int8/model.onnx", "coreml", 0),
    ("style_transfer_candy/candy.onnx", "coreml", 0),
    ("deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx", "coreml", 0),
    # computed in float32; its float16 interface stays: NNAPI takes no float16 input and casts to
    # float32 / int32 only, so the Casts at the input and the output stay on the CPU (65/67 nodes)
    ("squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", "nnapi", 2),
]


@pytest.mark.parametrize(("name", "target"), [r[:2] for r in REAL_TARGETS], ids=[f"{t}-{n.split('/')[0][:10]}" for n, t, _ in REAL_TARGETS])
def test_real_models_become_one_partition_of_the_target(name, target):
    """After legalize for the target (inputs fixed to the reference shapes): one partition, and
    the outputs of the original in onnxruntime."""
    from edgegraph import modelio
    from edgegraph.pipeline import specialise
    from edgegraph.targets import check

    path = require_shared(MODELS / name)
    refused = next(r[2] for r in REAL_TARGETS if r[:2] == (name, target))
    model = modelio.load(path)
    feeds = bench_legalize.model_inputs(path, model.to_proto(weights=False))
    fixed = specialise(model, {k: v.shape for k, v in feeds.items()})
    legal = bench_legalize.legalize_stage(fixed, target)
    result = check.check(legal, target)
    assert result.partitions == 1 and len(result.unsupported) == refused, [(u.op, u.reason) for u in result.unsupported]
    expected, got = _run(model.to_proto(), feeds), _run(legal.to_proto(), feeds)
    for key, ref in expected.items():
        scale = float(np.max(np.abs(ref.astype(np.float64))))
        atol = 1e-2 if ref.dtype == np.float16 else 1e-5 + 1e-4 * scale
        np.testing.assert_allclose(got[key].astype(np.float64), ref.astype(np.float64), rtol=0, atol=atol)


def test_a_static_shape_target_folds_the_shape_computations_first():
    """NNAPI needs static shapes: with MiniLM's inputs fixed, its Shape/Gather/Concat chains fold to
    constants, and LayerNormalization/Erf on the now static tensors are rewritten, the mask's
    GatherND/And/Where too (25 -> 7 partitions; what is left with its interface kept is the Cast
    of the int64 attention_mask and the Softmax NaN guards: tests/test_legalize_interface.py)."""
    from edgegraph import modelio
    from edgegraph.pipeline import specialise
    from edgegraph.targets import check

    path = require_shared(MODELS / "minilm_l6_v2_int8/model.onnx")
    model = modelio.load(path)
    feeds = bench_legalize.model_inputs(path, model.to_proto(weights=False))
    legal = bench_legalize.legalize_stage(specialise(model, {k: v.shape for k, v in feeds.items()}), "nnapi")
    result = check.check(legal, "nnapi")
    assert result.partitions == 7 and result.node_share >= 0.97
    assert {u.op for u in result.unsupported} == {"Where", "IsNaN", "Cast"}


def test_a_rewrite_above_the_targets_max_rank_is_undone():
    """SpaceToDepth as Reshape/Transpose works in rank 6: not for a rank-4 target."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2, 3])
    proto = helper.make_model(helper.make_graph([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)], "s2d",
                                                [x], [y]), opset_imports=[helper.make_opsetid("", 13)])

    class RankFour:
        name, max_rank = "rank-4", 4

        def unsupported(self, node, model):
            return "no SpaceToDepth" if node.op == "SpaceToDepth" else None

        def supports_op(self, op, domain, opset):
            return op != "SpaceToDepth"

    _, result = _legalize(proto, [], target=RankFour())
    assert not result.modified
    assert "it would make Reshape, Transpose, which rank-4 cannot run either" in result.details["not_rewritten"][0]["not_rewritten"]
    rewritten, result = _legalize(proto, ["SpaceToDepth"])  # without the target's limit it is rewritten
    assert result.modified and "SpaceToDepth" not in _ops(rewritten)


@pytest.mark.parametrize("crop", [{"border": [1, 2, 0, 1]}, {"border": [2, 1, 3, 3], "scale": [3, 2]}])
def test_experimental_ops_become_mul_add_slice(crop):
    """ImageScaler -> Crop -> Affine (opset 7, as candy.onnx has them), against onnxruntime's own kernels."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("ImageScaler", ["x"], ["s"], bias=[1.0, -2.0, 0.5], scale=0.25),
             helper.make_node("Crop", ["s"], ["c"], **crop),
             helper.make_node("Affine", ["c"], ["y"], alpha=3.0, beta=-1.0)]
    proto = helper.make_model(helper.make_graph(nodes, "exp", [x], [y]), opset_imports=[helper.make_opsetid("", 7)])
    proto.ir_version = 3
    rewritten, result = _legalize(proto, ["ImageScaler", "Crop", "Affine"])
    assert result.stats == {"Affine->Mul/Add": 1, "Crop->Slice": 1, "ImageScaler->Mul/Add": 1}
    assert set(_ops(rewritten)) == {"Mul", "Add", "Slice"}
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 8, 9)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)["y"], _run(proto, feeds)["y"], rtol=1e-6, atol=1e-6)


def test_a_node_refused_for_dynamic_shapes_is_not_rewritten():
    """Its replacement would read the same dynamic tensors: --fix-shape is the fix, and the report says so."""

    class Static:
        name = "static-only"

        def why(self, node, model):
            return ("dynamic", "input x has a dynamic shape") if node.op == "HardSigmoid" else None

        def unsupported(self, node, model):
            found = self.why(node, model)
            return None if found is None else found[1]

    _, result = _legalize(hard_sigmoid_then_sigmoid(), [], target=Static())
    assert not result.modified
    (left,) = result.details["not_rewritten"]
    assert left["why"] == "input x has a dynamic shape" and "--fix-shape" in left["not_rewritten"]


def test_a_static_shape_target_leaves_nodes_on_dynamic_tensors_alone():
    """An op the target lacks, on a dynamic tensor of a target that needs static shapes (NNAPI):
    its replacement would be refused as well, so it stays (MiniLM's LayerNormalization)."""

    class StaticOnly:
        name, static_shapes = "static-only", True

        def unsupported(self, node, context):
            return "no HardSigmoid" if node.op == "HardSigmoid" else None

        def is_static(self, name):  # (the ModelContext part this target reads)
            return name != "x"

    from edgegraph.passes.legalize import _dynamic_for

    target = StaticOnly()
    node = edgegraph.load(hard_sigmoid_then_sigmoid()).graph.nodes[0]  # HardSigmoid(x)
    assert _dynamic_for(target, node, target)  # (the stand-in is its own context: x is dynamic)
    assert not _dynamic_for(_LacksHardSigmoid(), node, target)  # a target without static_shapes
