"""Target profiles (schema, loading, refusal of bad ones), `Profile.unsupported` on small graphs,
the partition count, `edgegraph check`, and agreement with onnxruntime's mobile usability checker
on the shared real models."""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from clihelp import assert_refused, run_cli
from conftest import DEFAULT_DIR, MODELS, model_id, require_shared, shared_model_paths
from edgegraph import ir, modelio, targets
from edgegraph.cli import STRICT_EXIT
from edgegraph.errors import EdgegraphError
from edgegraph.targets import ModelContext, check

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"
ALL = ["coreml", "coreml-nn", "cpu", "nnapi", "openvino", "qnn", "tensorrt", "tflite", "xnnpack"]
# Ops a profile may list that today's onnx has no schema for: deprecated / experimental ops the
# runtimes still read (ImageScaler, Crop, Affine: the candy model), and frontend-only ones.
LEGACY_OPS = {"ImageScaler", "Crop", "Affine", "ConstantFill", "Scatter", "ParametricSoftplus", "ScaledTanh", "ATen",
              "IsFinite", "SimplifiedLayerNormalization"}


# ---------------------------------------------------------------------------------------------
# Profiles


def test_every_profile_loads_with_its_source_and_a_scheme():
    assert targets.names() == ALL
    for name in ALL:
        profile = targets.load(name)
        assert profile.name == name and profile.description and profile.source, name
        assert profile.quant.activations in targets.QUANT_DTYPES and profile.quant.weights in targets.QUANT_DTYPES
        assert profile.channel_alignment >= 1
        for op in profile.ops or ():
            domain, _, kind = op.rpartition(":")
            if domain:
                continue  # contrib ops (com.microsoft) have no onnx schema
            assert kind in LEGACY_OPS or onnx.defs.has(kind), f"{name}: {op} is no ONNX op (a typo?)"
        for op, rule in profile.rules.items():
            for attr in rule.attrs:
                if ":" not in op and onnx.defs.has(op):
                    assert attr in onnx.defs.get_schema(op).attributes, f"{name}: {op} has no attribute {attr}"


def test_the_schemes_follow_each_runtime():
    quant = {name: targets.load(name).quant for name in ALL}
    assert (quant["cpu"].activations, quant["cpu"].weights) == ("u8", "s8")
    assert quant["tflite"].activations == "s8" and quant["tflite"].symmetric_weights and quant["tflite"].per_channel
    assert not quant["coreml"].qdq and quant["coreml"].weight_only  # CoreML takes no Q/DQ nodes
    assert quant["qnn"].a16w8 and quant["tensorrt"].symmetric_activations
    # what Q/DQ placement aims at: the placeable ops a QDQ-consuming runtime has; none for CoreML
    nnapi = targets.load("nnapi")
    assert {"Conv", "Gemm", "MaxPool"} <= nnapi.quantized_ops <= nnapi.ops and "HardSigmoid" not in nnapi.quantized_ops
    assert not targets.load("coreml").quantized_ops
    assert targets.load("cpu").quantized_ops >= {"Conv", "MatMul", "Where", "ArgMax"}  # written out in cpu.toml


def test_quant_placement_reads_its_op_lists_from_the_cpu_profile():
    from edgegraph.passes.quant import placement

    lists = targets.load("cpu").quant.placement
    assert placement.ANCHORS == lists["anchors"] and placement.SHARED == lists["shared"]
    assert placement.COMPUTE == lists["compute"] and placement.FLOAT_OUTPUT_OK == lists["float_output_ok"]
    assert placement.FOLDABLE_ACTIVATIONS == lists["foldable_activations"]


@pytest.mark.parametrize(("text", "phrase"), [
    ('ops = ["Conv"]\n[rules.Relu]\nnote = "x"', "rules.Relu: a rule for an op not in `ops`"),
    ('ops = ["Conv"]\n[rules.Conv]\nranks = "4"', "rules.Conv.ranks: must be a list of int"),
    ('ops = ["Conv"]\n[rules.Conv]\nspeed = 1', "rules.Conv.speed: unknown key"),
    ('ops = ["Conv"]\n[rules.Conv]\ndtypes = ["float33"]', "rules.Conv.dtypes: unknown dtype float33"),
    ('ops = ["Conv"]\n[rules.Conv]\nopset = [13, 7]', "rules.Conv.opset: must be [lowest, highest] opset"),
    ('ops = ["Pad"]\n[rules.Pad]\nattrs = { mode = [] }', "rules.Pad.attrs.mode: must list the allowed values"),
    ('[quant]\nactivations = "u7"', "quant.activations: must be one of u8, s8"),
    ('[quant]\nbits = 8', "quant.bits: unknown key"),
    ('[quant.placement]\nanchor = ["Conv"]', "quant.placement.anchor: unknown key"),
    ('channel_alignment = 0', "channel_alignment: must be at least 1"),
    ('channel_alignment = true', "channel_alignment: must be int"),
    ('ops_from = "tensorflow"', "ops_from: must be one of onnxruntime-cpu"),
    ('static_shapes = "yes"', "static_shapes: must be bool"),
])
def test_a_bad_profile_is_one_line_naming_file_and_key(capsys, tmp_path, monkeypatch, text, phrase):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "cpu.toml").write_bytes((targets.PROFILE_DIR / "cpu.toml").read_bytes())
    (profiles / "bad.toml").write_text(text)
    monkeypatch.setattr(targets, "PROFILE_DIR", profiles)
    with pytest.raises(EdgegraphError, match="bad.toml: " + phrase.replace("[", r"\[")):
        targets.load("bad")
    assert_refused(capsys, tmp_path, ["check", DIGITS, "--target", "bad"], f"bad.toml: {phrase}")


def test_an_unknown_target_is_refused(capsys, tmp_path):
    assert_refused(capsys, tmp_path, ["check", DIGITS, "--target", "../targets/cpu"], "unknown target '../targets/cpu'")


# ---------------------------------------------------------------------------------------------
# Profile.unsupported on single nodes


def _model(nodes, inputs, outputs, initializers=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _x(shape, dtype=TensorProto.FLOAT, name="x"):
    return helper.make_tensor_value_info(name, dtype, shape)


def _reasons(model: onnx.ModelProto, target: str) -> list[str | None]:
    """The reason for every node, asked both with NodeProtos and with graphsurgeon Nodes (the
    answers must be the same)."""
    profile = targets.load(target)
    from_proto = [profile.unsupported(n, ModelContext.of(model)) for n in model.graph.node]
    graph = gs.import_onnx(model)
    from_gs = [profile.unsupported(n, ModelContext.of(graph)) for n in graph.nodes]
    assert from_proto == from_gs
    return from_proto


def _pad(mode):
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    return _model([node], [_x([1, 3, 8, 8])], [_x([1, 3, 10, 10], name="y")], [pads])


def _resize(**attrs):
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    return _model([node], [_x([1, 3, 8, 8])], [_x([1, 3, 16, 16], name="y")], [scales])


def test_attribute_values_are_checked_with_schema_defaults():
    assert _reasons(_pad("constant"), "nnapi") == [None]
    assert _reasons(_pad("reflect"), "nnapi") == ["mode='reflect' (supports 'constant')"]
    # Resize's default coordinate_transformation_mode (half_pixel) is not CoreML NeuralNetwork's
    assert "coordinate_transformation_mode='half_pixel'" in _reasons(_resize(mode="nearest"), "coreml-nn")[0]
    assert _reasons(_resize(mode="nearest", coordinate_transformation_mode="asymmetric",
                            nearest_mode="floor"), "coreml-nn") == [None]
    assert "mode='cubic'" in _reasons(_resize(mode="cubic"), "tensorrt")[0]


def test_op_rank_dtype_constant_and_dynamic_shape_reasons():
    hard = _model([helper.make_node("HardSigmoid", ["x"], ["y"])], [_x([1, 8])], [_x([1, 8], name="y")])
    assert _reasons(hard, "nnapi") == ["HardSigmoid is not supported by nnapi"]
    assert _reasons(hard, "coreml") == [None]
    dynamic = _model([helper.make_node("Relu", ["x"], ["y"])], [_x(["n", 8])], [_x(["n", 8], name="y")])
    assert _reasons(dynamic, "nnapi") == ["input x has a dynamic shape [?, 8]"]
    assert _reasons(dynamic, "coreml") == [None]  # CoreML takes dynamic shapes
    six = _model([helper.make_node("Relu", ["x"], ["y"])], [_x([1, 2, 2, 2, 2, 2])], [_x([1, 2, 2, 2, 2, 2], name="y")])
    assert _reasons(six, "coreml") == ["input x has rank 6, above 5"]
    half = _model([helper.make_node("Relu", ["x"], ["y"])], [_x([1, 8], TensorProto.FLOAT16)],
                  [_x([1, 8], TensorProto.FLOAT16, name="y")])
    assert _reasons(half, "nnapi") == ["input x is float16 (supports float32, int32, uint8)"]
    assert _reasons(half, "coreml") == [None]
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_x([1, 3, 8, 8]), _x([4, 3, 3, 3], name="w")],
                  [_x([1, 4, 6, 6], name="y")])
    assert _reasons(conv, "nnapi") == ["input 1 (w) is not constant"]
    conv3d = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_x([1, 3, 4, 8, 8])],
                    [_x([1, 4, 2, 6, 6], name="y")],
                    [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3, 3], np.zeros(324))])
    assert _reasons(conv3d, "nnapi") == ["rank-5 input (supports 4)"]
    assert _reasons(conv3d, "tensorrt") == [None]


def test_the_cpu_profile_is_onnxruntimes_kernel_registry():
    cpu = targets.load("cpu")
    assert cpu.supports_op("Conv", "", 11) and cpu.supports_op("ImageScaler", "", 7)
    assert not cpu.supports_op("NoSuchOp", "", 13)


# ---------------------------------------------------------------------------------------------
# Partitions


def _chain(ops: list[str]) -> onnx.ModelProto:
    names = ["x"] + [f"t{i}" for i in range(len(ops))]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}") for i, op in enumerate(ops)]
    return _model(nodes, [_x([1, 8])], [_x([1, 8], name=names[-1])])


def _ort_partitions(model: onnx.ModelProto, ep_table: str, fixed: bool):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    path = pathlib.Path(uc.__file__).parent / ep_table
    info = uc.check_partitioning(model.graph, uc._SupportedOpsChecker(path), fixed)
    return info.num_supported_nodes, info.num_partitions


@pytest.mark.parametrize("ops", [
    ["Relu", "HardSigmoid", "Relu"],
    ["HardSigmoid", "Relu", "Relu", "HardSigmoid", "Sigmoid", "HardSigmoid"],
    ["Relu", "Relu"],
    ["HardSigmoid"],
])
def test_partitions_are_counted_like_onnxruntimes_partitioner(ops):
    model = _chain(ops)
    result = check.check(ir.from_proto(model), "nnapi", optimize=False, macs=False)
    assert (result.supported, result.partitions) == _ort_partitions(model, "nnapi_supported_ops.md", True)


def test_a_side_branch_node_waits_for_the_next_partition():
    # x -> Relu(a) -> {HardSigmoid(b), Sigmoid(c)} -> Add(d): b reads the group of a, so it is
    # handled after that group closes; d reads b, so it starts a second partition.
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("HardSigmoid", ["a"], ["b"], name="b"),
             helper.make_node("Sigmoid", ["a"], ["c"], name="c"), helper.make_node("Add", ["b", "c"], ["y"], name="d")]
    model = _model(nodes, [_x([1, 8])], [_x([1, 8], name="y")])
    result = check.check(ir.from_proto(model), "nnapi", optimize=False, macs=False, rewrites={"HardSigmoid"})
    assert (result.supported, result.partitions, result.partition_sizes) == (3, 2, [2, 1])
    assert (result.supported, result.partitions) == _ort_partitions(model, "nnapi_supported_ops.md", True)
    assert [(u.name, u.kind, u.fix) for u in result.unsupported] == [("b", "op", "HardSigmoid")]


# ---------------------------------------------------------------------------------------------
# edgegraph check


def test_check_command_table_json_and_strict(capsys):
    code, out, _ = run_cli(capsys, "check", DIGITS, "--target", "nnapi")
    assert code == 0 and "nnapi" in out and "partitions" in out
    code, out, _ = run_cli(capsys, "check", DIGITS, "--target", "all", "--json", "--strict")
    data = json.loads(out)
    assert [t["target"] for t in data["targets"]] == ALL
    by = {t["target"]: t for t in data["targets"]}
    assert by["cpu"]["fully_supported"] and by["cpu"]["mac_share"] == 1.0
    assert code == (0 if all(t["fully_supported"] for t in data["targets"]) else STRICT_EXIT)


def test_strict_exit_code_when_a_target_splits_the_model(capsys, tmp_path):
    path = tmp_path / "hard.onnx"
    onnx.save(_chain(["Relu", "HardSigmoid", "Relu"]), path)
    code, out, _ = run_cli(capsys, "check", path, "--target", "nnapi", "--strict", "--as-given")
    assert code == STRICT_EXIT and "HardSigmoid is not supported by nnapi" in out
    code, _, _ = run_cli(capsys, "check", path, "--target", "coreml", "--strict", "--as-given")
    assert code == 0


def test_fix_shape_makes_a_dynamic_model_nnapi_ready(capsys):
    path = require_shared(MODELS / "cifar10_cnn_pytorch_tutorial" / "ImageClassifier.onnx")
    code, out, _ = run_cli(capsys, "check", path, "--target", "nnapi", "--json")
    before = json.loads(out)["targets"][0]
    assert before["supported"] == 0 and {u["fix"] for u in before["unsupported"]} == {"fix-shape"}
    code, out, _ = run_cli(capsys, "check", path, "--target", "nnapi", "--json", "--fix-shape", "modelInput=1x3x32x32")
    after = json.loads(out)["targets"][0]
    assert after["fully_supported"] and after["mac_share"] == 1.0


def test_check_never_crashes_where_onnxruntimes_checker_does():
    path = require_shared(MODELS / "style_transfer_candy" / "candy.onnx")
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    with pytest.raises(ValueError, match="infer_shapes"):  # ImageScaler/Crop/Affine leave no shape info
        uc.check_nnapi_partitions(onnx.load(path), True)
    results = {r.target: r for r in check.check_all(modelio.load(path), macs=False)}
    assert set(results) == set(ALL) and results["cpu"].fully_supported
    assert {u.op for u in results["coreml"].unsupported} >= {"ImageScaler", "Crop", "Affine"}
    assert results["openvino"].fully_supported  # OpenVINO's ONNX frontend still reads them


def test_float16_models_are_checked_without_the_casts_of_onnxruntimes_cpu_session():
    # onnxruntime's CPU provider wraps float16 ops in InsertedPrecisionFreeCast_* casts; an NNAPI or
    # CoreML session never has them (onnxruntime's checker counts them: 119 nodes, all "supported").
    path = require_shared(MODELS / "squeezenet1.0_imagenet_fp16" / "SqueezeNet_fp16.onnx")
    results = {r.target: r for r in check.check_all(modelio.load(path), macs=False, profiles=["nnapi", "coreml"])}
    assert results["coreml"].fully_supported and results["coreml"].nodes == 65
    assert results["nnapi"].supported == 0 and {u.kind for u in results["nnapi"].unsupported} == {"dtype"}


# ---------------------------------------------------------------------------------------------
# Agreement with onnxruntime's usability checker on the shared models (NNAPI, CoreML)

# check(rules=False) looks at what onnxruntime's checker looks at (op type, dynamic inputs, max
# rank) on the same graph (the checker's own onnxruntime-optimised copy, casts of the CPU session
# included: see the float16 test above); these are the models where the two still differ, and why.
# With rules (the default) check also refuses what the tables' notes and the EPs' op builders
# rule out (dtypes, ranks, attribute values, constant inputs): e.g. SqueezeNet fp16 on NNAPI.
CHECKER_DIFFERS = {
    # The checker's is_fixed_size_tensor starts from "fixed" and only a dim can refute it, so a
    # value whose type has no shape at all (paddle2onnx's data-dependent Reshape/Flatten outputs)
    # counts as fixed-size; we count it as dynamic, as the NNAPI EP (which needs every dim) does.
    ("ch_PP-OCRv4_rec_infer.onnx", "nnapi"): "rank-unknown values counted as fixed by the checker",
    # The checker raises (no value_info: onnx's strict shape inference stops at ImageScaler).
    # (Only its NNAPI pass, which needs shapes; it runs first, so the real checker stops there.)
    ("candy.onnx", "nnapi"): "checker crashes",
}
EP_TABLES = {"nnapi": ("nnapi_supported_ops.md", True), "coreml": ("coreml_supported_mlprogram_ops.md", False),
             "coreml-nn": ("coreml_supported_neuralnetwork_ops.md", False)}


@pytest.mark.parametrize("path", shared_model_paths(), ids=model_id)
def test_check_agrees_with_onnxruntimes_usability_checker(path):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory() as folder:
        optimized = pathlib.Path(folder) / path.name
        optimize_model(path, optimized, use_external_initializers=True)  # what the checker does first
        proto = onnx.load(optimized)
    ours_graph = ir.from_proto(proto)
    try:
        theirs_graph = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception:  # noqa: BLE001 - the checker itself would stop here
        theirs_graph = None
    for target, (table, fixed) in EP_TABLES.items():
        ours = check.check(ours_graph, target, optimize=False, rules=False, macs=False)
        try:
            # NNAPI: with fixed input sizes required; CoreML takes dynamic shapes (the checker's
            # "if the shapes were fixed" pass is the one that matches it)
            info = uc.check_partitioning(theirs_graph.graph, uc._SupportedOpsChecker(
                pathlib.Path(uc.__file__).parent / table), fixed, max_rank=5 if "coreml" in target else 999)
            theirs = (info.num_nodes, info.num_supported_nodes, info.num_partitions)
        except (AttributeError, ValueError):
            theirs = None
        if (path.name, target) in CHECKER_DIFFERS:
            assert theirs != (ours.nodes, ours.supported, ours.partitions), f"{path.name} {target} agrees now"
            continue
        assert theirs == (ours.nodes, ours.supported, ours.partitions), target
