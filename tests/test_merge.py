"""`edgegraph merge`: task models sharing a trained backbone become one graph computing it once.

Task sets are built from the real CIFAR-10 CNN (../shared/models): its backbone cut at different
layers with new heads, re-exported with other node/tensor names and initializer orders. Each
task's outputs from the merged model must equal its own model's bitwise, on real images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import version_converter

import edgegraph
from clihelp import assert_refused, run_cli
from conftest import DATA, MODELS, require_shared
from edgegraph import ir, modelio, runtime
from edgegraph.analysis.hashing import constant_key
from edgegraph.merge import merge
from fixtures.reuse import cut, perturb

CIFAR = MODELS / "cifar10_cnn_pytorch_tutorial" / "ImageClassifier.onnx"
AGLLNET = MODELS / "agllnet_lowlight_tf2onnx"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Three tasks on the CIFAR backbone (cut after conv4 with a linear head, after the pool with a
    conv head, conv3's features themselves), exported differently, and real CIFAR images."""
    backbone = onnx.load(require_shared(CIFAR))
    folder = tmp_path_factory.mktemp("tasks")
    models = {
        "cls": cut(backbone, "43", head="linear", classes=10, seed=1),
        "seg": cut(backbone, "37", head="conv", classes=3, seed=2, renamed="export2_", shuffle=3),
        "feat": cut(backbone, "40", head="none", renamed="x/", shuffle=5),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(model, paths[name])
    images = np.load(require_shared(DATA / "cifar10_test_subset" / "cifar10_test_500.npz"))["images"][:8]
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    np.savez(folder / "calib.npz", modelInput=x)
    return folder, paths, x


def _outputs(path_or_proto, feeds, optimize=False):
    model = onnx.load(path_or_proto) if not isinstance(path_or_proto, onnx.ModelProto) else path_or_proto
    return runtime.run(runtime.session(model, optimize=optimize), feeds)


def _assert_tasks_bitwise(merged: onnx.ModelProto, paths: dict, feeds_for) -> None:
    got = _outputs(merged, feeds_for(None))
    for task, path in paths.items():
        want = _outputs(path, feeds_for(task))
        for name, value in want.items():
            np.testing.assert_array_equal(got[f"{task}/{name}"], value, err_msg=f"{task}/{name}")


def test_three_heads_on_one_backbone_share_it_bitwise(tasks, capsys):
    folder, paths, x = tasks
    out, report_path = folder / "merged.onnx", folder / "merged.json"
    code, stdout, err = run_cli(capsys, "merge", *paths.values(), "-o", out, "--report", report_path,
                                "--calib", folder / "calib.npz", "--runs", "2", "--threads", "1")
    assert code == 0, err
    assert "bitwise" in stdout and "separate (sum)" in stdout
    merged = onnx.load(out)
    onnx.checker.check_model(merged)
    _assert_tasks_bitwise(merged, paths, lambda task: {"modelInput": x})
    # ... also as deployed (onnxruntime's fusions), within float rounding
    got = _outputs(merged, {"modelInput": x}, optimize=True)
    for task, path in paths.items():
        for name, value in _outputs(path, {"modelInput": x}, optimize=True).items():
            np.testing.assert_allclose(got[f"{task}/{name}"], value, rtol=1e-5, atol=1e-5)

    report = json.loads(report_path.read_text())
    tasks_report = report["tasks"]
    # The backbone is computed once: conv1..conv3 (+ Relus, pool) are shared by all, conv4 by cls/feat.
    assert tasks_report["cls"]["nodes_shared"] == 7 and tasks_report["cls"]["nodes_own"] == 5
    assert tasks_report["seg"]["nodes_shared"] == 5 and tasks_report["seg"]["nodes_own"] == 2
    assert tasks_report["feat"]["nodes_own"] == 1  # the Identity keeping the name feat/40
    assert report["shared_nothing"] is False
    assert all(d["bitwise"] for d in report["deviation"].values())
    # Shared weights are stored once: the merged model holds exactly the distinct weight tensors.
    distinct = {}
    for path in paths.values():
        for tensor in modelio.load(path).graph.tensors().values():
            if isinstance(tensor, ir.gs.Constant) and tensor.values.size > 1:
                distinct[constant_key(tensor)] = tensor.values.size
    assert report["measured"]["after"]["params"] == sum(distinct.values())
    before, after = report["measured"]["before_sum"], report["measured"]["after"]
    assert after["macs"] < 0.5 * before["macs"] and after["size_bytes"] < before["size_bytes"]
    assert [i.name for i in merged.graph.input] == ["modelInput"]


def test_the_same_models_give_the_same_bytes(tasks):
    folder, paths, x = tasks
    first = merge(list(paths.values()), check_samples=0).model.to_proto().SerializeToString()
    assert merge(list(paths.values()), check_samples=0).model.to_proto().SerializeToString() == first


def test_names_input_map_and_the_library_call(tasks, tmp_path):
    folder, paths, x = tasks
    # Another export of the seg task whose input is called `images`: not unified by name...
    renamed = onnx.load(paths["seg"])
    for node in renamed.graph.node:
        node.input[:] = ["images" if i == "modelInput" else i for i in node.input]
    renamed.graph.input[0].name = "images"
    onnx.save(renamed, tmp_path / "seg2.onnx")
    proto, report = edgegraph.merge_models([paths["cls"], tmp_path / "seg2.onnx"], names=["det", "seg"])
    assert report["shared_nothing"] and "no input is common" in report["note"]
    assert {i.name for i in proto.graph.input} == {"modelInput", "images"}
    # ... unless mapped
    proto, report = edgegraph.merge_models([paths["cls"], tmp_path / "seg2.onnx"], names=["det", "seg"],
                                           input_map={"seg:images": "det:modelInput"})
    assert [i.name for i in proto.graph.input] == ["modelInput"]
    assert [o.name for o in proto.graph.output] == ["det/scores", "seg/scores"]
    assert report["tasks"]["seg"]["nodes_shared"] == 5
    _assert_tasks_bitwise(proto, {"det": paths["cls"], "seg": tmp_path / "seg2.onnx"},
                          lambda task: {"images" if task == "seg" else "modelInput": x})


def test_a_model_normalising_inside_merges_from_the_first_common_node(tasks, tmp_path):
    """cls takes raw 0-255 pixels and normalises them in the graph; seg takes normalised ones.
    `--input-map seg:modelInput=raw:modelInput` feeds seg from raw's normalised tensor."""
    folder, paths, x = tasks
    raw = onnx.load(paths["cls"])
    raw.graph.input[0].name = "image"
    raw.graph.node.insert(0, onnx.helper.make_node("Sub", ["scaled", "one"], ["modelInput"], name="norm_sub"))
    raw.graph.node.insert(0, onnx.helper.make_node("Div", ["image", "half_range"], ["scaled"], name="norm_div"))
    raw.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(127.5, np.float32), "half_range"),
                                  onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    onnx.save(raw, tmp_path / "raw.onnx")
    proto, report = edgegraph.merge_models([tmp_path / "raw.onnx", paths["seg"]],
                                           input_map={"seg:modelInput": "raw:modelInput"})
    assert [i.name for i in proto.graph.input] == ["image"]
    # seg shares conv1..conv2 + pool, and now the normalisation (Div, Sub) too
    assert report["tasks"]["seg"]["nodes_shared"] == 7 and report["tasks"]["seg"]["inputs"] == {
        "modelInput": "raw/modelInput"}
    pixels = ((x + 1.0) * 127.5).astype(np.float32)
    got = _outputs(proto, {"image": pixels})
    np.testing.assert_array_equal(got["raw/scores"], _outputs(tmp_path / "raw.onnx", {"image": pixels})["scores"])
    normalised = pixels / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(got["seg/scores"], _outputs(paths["seg"], {"modelInput": normalised})["scores"])
    with pytest.raises(edgegraph.EdgegraphError, match="task raw has no input or tensor 'nothing'"):
        edgegraph.merge_models([tmp_path / "raw.onnx", paths["seg"]], input_map={"seg:modelInput": "raw:nothing"})


def test_a_pair_sharing_only_the_input(tasks, tmp_path):
    folder, paths, x = tasks
    other = perturb(onnx.load(paths["cls"]), 0.1, seed=4)  # same architecture, other weights
    onnx.save(other, tmp_path / "other.onnx")
    result = merge([paths["cls"], tmp_path / "other.onnx"], check_samples=2)
    assert result.report["shared_nothing"]
    assert "compute nothing identically" in result.report["note"]
    proto = result.model.to_proto()
    assert [i.name for i in proto.graph.input] == ["modelInput"]
    _assert_tasks_bitwise(proto, {"cls": paths["cls"], "other": tmp_path / "other.onnx"},
                          lambda task: {"modelInput": x})


def test_a_pair_sharing_nothing_sits_side_by_side(tasks, capsys):
    folder, paths, x = tasks
    mnist = require_shared(MODELS / "mnist_cntk" / "mnist.onnx")  # opset 7: converted to 10 first
    out, report_path = folder / "side.onnx", folder / "side.json"
    digits_npz = folder / "digits.npz"  # each task checked on its own data: --calib TASK=DATA
    np.savez(digits_npz, Input3=np.random.default_rng(1).uniform(0, 255, (3, 1, 28, 28)).astype(np.float32))
    code, stdout, err = run_cli(capsys, "merge", paths["cls"], mnist, "-o", out, "--report", report_path,
                                "--runs", "0", "--calib", f"cls={folder / 'calib.npz'}", "--calib", f"mnist={digits_npz}")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["shared_nothing"] and "nothing is shared" in stdout
    assert report["conversions"] == [{"model": str(mnist), "from": 7, "to": 10}]
    assert report["deviation"]["mnist"]["samples"] == 3 and "digits.npz" in report["deviation"]["mnist"]["data"]
    digits = np.random.default_rng(0).uniform(0, 255, (1, 1, 28, 28)).astype(np.float32)
    _assert_tasks_bitwise(onnx.load(out), {"cls": paths["cls"], "mnist": mnist},
                          lambda task: {"Input3": digits} if task == "mnist" else
                          {"modelInput": x[:1]} if task == "cls" else {"modelInput": x[:1], "Input3": digits})


def test_models_at_different_opsets_are_converted_and_still_share(tasks, tmp_path):
    folder, paths, x = tasks
    newer = version_converter.convert_version(onnx.load(paths["seg"]), 13)
    onnx.save(newer, tmp_path / "seg13.onnx")
    result = merge([paths["cls"], tmp_path / "seg13.onnx"])
    assert result.report["opset"] == 13
    assert result.report["conversions"] == [{"model": str(paths["cls"]), "from": 10, "to": 13}]
    assert result.report["tasks"]["seg13"]["nodes_shared"] == 5
    _assert_tasks_bitwise(result.model.to_proto(), {"cls": paths["cls"], "seg13": tmp_path / "seg13.onnx"},
                          lambda task: {"modelInput": x})


def test_the_agllnet_pair_shares_its_weights_not_its_computation():
    """Same weights exported at 256x256 and 384x512: the inputs differ in shape, so they are two
    inputs and nothing computed is common; the equal weights are stored once (half the size)."""
    small = require_shared(AGLLNET / "model_float32_256x256.onnx")
    large = require_shared(AGLLNET / "model_float32_384x512.onnx")
    result = merge([small, large], names=["small", "large"], check_samples=0)  # (running them: slow test below)
    report = result.report
    assert report["shared_nothing"]
    assert "input 'input_1' is float32 [1x3x256x256] vs float32 [1x3x384x512]" in report["note"]
    assert report["weights_shared"] >= 244  # the manifest: 244 of 266 initializers bit-identical
    assert sorted(report["inputs"]) == ["input_1", "large/input_1"]
    params = edgegraph.load(small).graph.tensors()
    one = sum(t.values.size for t in params.values() if isinstance(t, ir.gs.Constant))
    merged = sum(t.values.size for t in result.model.graph.tensors().values() if isinstance(t, ir.gs.Constant))
    assert merged < 1.01 * one


@pytest.mark.slow
def test_the_agllnet_pair_merged_is_bitwise():
    small = require_shared(AGLLNET / "model_float32_256x256.onnx")
    large = require_shared(AGLLNET / "model_float32_384x512.onnx")
    result = merge([small, large], names=["small", "large"], check_samples=1)
    assert all(d["bitwise"] for d in result.report["deviation"].values())


def test_tolerance_merges_a_slightly_finetuned_backbone_and_refuses_a_far_one(tasks, tmp_path, capsys):
    folder, paths, x = tasks
    near, far = tmp_path / "near.onnx", tmp_path / "far.onnx"
    onnx.save(perturb(cut(onnx.load(CIFAR), "43", head="linear", classes=4, seed=7, renamed="p_"), 1e-4, 1), near)
    onnx.save(perturb(cut(onnx.load(CIFAR), "43", head="linear", classes=4, seed=7, renamed="p_"), 1e-1, 1), far)
    calib = folder / "calib.npz"
    exact = merge([paths["cls"], near], calib=calib)
    assert exact.report["shared_nothing"]  # exact mode: the perturbed weights are other weights
    report_path = tmp_path / "near.json"
    code, _, err = run_cli(capsys, "merge", paths["cls"], near, "-o", tmp_path / "m.onnx", "--tolerance", "1e-3",
                           "--calib", calib, "--report", report_path, "--runs", "0")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["tasks"]["near"]["nodes_shared"] == 11  # the whole backbone, all but the heads' Gemm
    differed = report["near_equal_weights"]
    assert len(differed) == 8 and all(1e-5 < w["relative_difference"] <= 1e-4 for w in differed)
    assert all(w["layers"] for w in differed)
    assert report["deviation"]["cls"]["bitwise"]  # it kept its own weights
    assert 60 < report["deviation"]["near"]["worst_sqnr_db"] < 120  # measured 83.5 dB on these images
    averaged = merge([paths["cls"], near], tolerance=1e-3, average=True, calib=calib)
    assert not averaged.report["deviation"]["cls"]["bitwise"]  # both tasks moved halfway
    assert all(d["worst_sqnr_db"] > 60 for d in averaged.report["deviation"].values())
    assert_refused(capsys, tmp_path, ["merge", paths["cls"], far, "-o", tmp_path / "m2.onnx", "--tolerance", "0.2",
                                      "--calib", calib, "--runs", "0"], "task far would degrade too far")


def test_bad_input_is_one_line_and_writes_nothing(tasks, tmp_path, capsys):
    folder, paths, x = tasks
    (tmp_path / "other").mkdir()
    onnx.save(onnx.load(paths["cls"]), tmp_path / "other" / "cls.onnx")
    out = tmp_path / "m.onnx"
    custom = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Foo", ["modelInput"], ["y"], domain="my.ops")], "custom",
                               [onnx.helper.make_tensor_value_info("modelInput", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 32, 32])]),
        opset_imports=[onnx.helper.make_opsetid("", 10), onnx.helper.make_opsetid("my.ops", 1)])
    onnx.save(custom, tmp_path / "custom.onnx")
    cases = [
        (["merge", paths["cls"], tmp_path / "custom.onnx", "-o", out], "custom.onnx does not run in onnxruntime"),
        (["merge", paths["cls"], "-o", out], "at least two models"),
        (["merge", paths["cls"], tmp_path / "other" / "cls.onnx", "-o", out], "two models have the task name 'cls'"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--input-map", "seg-images"], "expected TASK:INPUT=TASK:INPUT"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--input-map", "seg:x=cls:modelInput"], "task seg has no input 'x'"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--input-map", "cls:modelInput=seg:modelInput"],
         "map a later model's input to an earlier one's"),
        (["merge", paths["cls"], paths["seg"], "-o", paths["cls"]], "must not name input model"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--tolerance", "-1"], "tolerance must be in [0, 1)"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--name", "nothere.onnx=x"], "no model given is that file"),
        (["merge", paths["cls"], tmp_path / "missing.onnx", "-o", out], "no such file"),
        (["merge", paths["cls"], paths["seg"], "-o", out, "--calib", f"cls={folder / 'calib.npz'}", "--calib", "x.npz"],
         "several --calib must each be TASK=DATA"),
    ]
    for argv, phrase in cases:
        assert_refused(capsys, tmp_path, argv, phrase, inputs=list(paths.values()))
