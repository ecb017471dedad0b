"""`edgegraph lower`: each artifact is run in its own runtime here and compared with onnxruntime
on the ONNX model (ORT format always; OpenVINO and LiteRT when their extra / peer environment is
installed, skipped with a message otherwise)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clihelp import assert_refused, digest, run_cli, snapshot
from conftest import DEFAULT_DIR

import edgegraph
from edgegraph import lowering, runtime, verify
from edgegraph.lowering import openvino_ir, tflite
from edgegraph.passbase import settle

MODEL, CALIB, EVAL = DEFAULT_DIR / "digits_cnn.onnx", DEFAULT_DIR / "digits_calib.npz", DEFAULT_DIR / "digits_eval.npz"


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    """edgegraph's QDQ model of the bundled CNN (`cleanup,quant`)."""
    path = tmp_path_factory.mktemp("int8") / "digits_int8.onnx"
    onnx.save(edgegraph.optimize(str(MODEL), "cleanup,quant", calib=str(CALIB), timing=False), str(path))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder with a copy of the model and data, for the 'nothing written here' checks."""
    for path in (MODEL, CALIB, EVAL):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def eval_inputs(count: int = 16) -> dict[str, np.ndarray]:
    with np.load(EVAL) as archive:
        return {"input": archive["input"][:count].astype(np.float32)}


def onnx_outputs(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(path, optimize=True), feeds)


def worst_sqnr(reference: dict, candidate: dict) -> float:
    return min(verify.compare(name, reference[name], candidate[name]).sqnr_db for name in reference)


def ort_format_outputs(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return runtime.run(session, feeds)


# ---------------------------------------------------------------------------------------------
# ort-mobile


def test_ort_format_of_a_float_model_runs_and_matches(capsys, folder):
    out = folder / "digits.ort"
    code, stdout, err = run_cli(capsys, "lower", folder / MODEL.name, "--target", "ort-mobile", "-o", out,
                                "--calib", folder / CALIB.name)
    assert code == 0, err
    assert "SQNR" in stdout and "digits.ort" in stdout
    config = folder / "digits.required_operators.config"
    assert "Conv" in config.read_text() and "ai.onnx" in config.read_text()
    feeds = eval_inputs()  # held out from the data lowering checked on
    assert worst_sqnr(onnx_outputs(MODEL, feeds), ort_format_outputs(out, feeds)) > 100  # float rounding only
    assert digest(folder / MODEL.name) == digest(MODEL)


def test_ort_format_of_edgegraphs_int8_model(capsys, tmp_path, int8_model):
    # Conversion used to fail: "sum of input arg count is not equal to size of input defs in node (DQ0)".
    dequantize = [n for n in onnx.load(int8_model).graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and all(len(n.input) == 3 for n in dequantize)  # explicit zero points
    out = tmp_path / "digits_int8.ort"
    code, _, err = run_cli(capsys, "lower", int8_model, "--target", "ort-mobile", "-o", out, "--calib", CALIB)
    assert code == 0, err
    feeds = eval_inputs()
    # The saved QDQ fusions replay into the same integer kernels as onnxruntime's on the ONNX model.
    assert worst_sqnr(onnx_outputs(int8_model, feeds), ort_format_outputs(out, feeds)) > 60


def test_fixed_style_for_cpu_only_deployment(tmp_path):
    result = edgegraph.lower(str(MODEL), "ort-mobile", tmp_path / "m.ort", options={"style": "fixed"})
    assert [p.name for p in result.outputs] == ["m.ort", "m.required_operators.config"]
    assert min(m.sqnr_db for m in result.metrics.values()) > 100
    assert result.data.startswith("random")  # no --calib: seeded random inputs


# ---------------------------------------------------------------------------------------------
# Refusals: exit 2 for bad input, exit 1 with the metric for a mismatch, nothing written


@pytest.mark.parametrize("argv, phrase", [
    (["--target", "ort-mobile", "-o", "{model}"], "must not name an input file"),
    (["--target", "ort-mobile", "-o", "{calib}", "--calib", "{calib}"], "must not name an input file"),
    (["--target", "android", "-o", "{folder}/m.ort"], "unknown lowering target"),
    (["--target", "openvino", "-o", "{folder}/m.bin"], "-o must end in .xml"),
    (["--target", "ort-mobile"], "lower needs -o"),
    (["--target", "ort-mobile", "-o", "{folder}/m.ort", "--calib", "{folder}/missing.npz"], "missing.npz"),
])
def test_bad_input_is_refused(capsys, folder, argv, phrase):
    names = {"model": folder / MODEL.name, "calib": folder / CALIB.name, "folder": folder}
    assert_refused(capsys, folder, ["lower", folder / MODEL.name, *(a.format(**names) for a in argv)], phrase)


def test_a_mismatch_is_exit_1_with_the_metric(capsys, folder):
    before = snapshot(folder)
    code, _, err = run_cli(capsys, "lower", folder / MODEL.name, "--target", "ort-mobile", "-o",
                           folder / "m.ort", "--min-sqnr", "1000")
    assert code == 1 and err.count("\n") == 1, err
    assert "does not match onnxruntime: SQNR" in err and "< 1000 dB" in err and "nothing was written" in err
    assert snapshot(folder) == before


def test_nodes_the_target_cannot_run_are_refused(capsys, folder, monkeypatch):
    # The support check goes through one function (the targets profiles' interface).
    monkeypatch.setattr(lowering, "unsupported_nodes",
                        lambda model, profile: [f"{n.name} ({n.op}): not in {profile}" for n in model.graph.nodes
                                                if n.op == "Gemm"])
    err = assert_refused(capsys, folder, ["lower", folder / MODEL.name, "--target", "ort-mobile", "-o",
                                          folder / "m.ort"], "cannot run on ort-mobile")
    assert "(Gemm): not in cpu" in err and "legalize" in err


# ---------------------------------------------------------------------------------------------
# the legalized ONNX (nnapi, coreml, coreml-nn, qnn, xnnpack, tensorrt)


def test_legalized_onnx_for_coreml_runs_every_node_and_matches(folder):
    before = snapshot(folder)
    out = folder / "m.onnx"
    result = edgegraph.lower(str(folder / MODEL.name), "coreml", out, calib=str(folder / CALIB.name))
    assert {k for k in snapshot(folder) if k not in before} == {"m.onnx"}
    assert lowering.unsupported_nodes(edgegraph.load(str(out)), "coreml") == []
    notes = " ".join(result.notes)
    # ML Program has no BatchNormalization and no Flatten: 7 + 1 nodes rewritten. (onnxruntime folds
    # the BatchNormalizations into the Convs itself, so only the Flatten splits the graph it checks.)
    assert "BatchNormalization->Mul/Add 7, Flatten->Reshape 1" in notes
    assert "coreml: 1 partition(s) over 100.0% of 20 nodes after legalize (before: 2 over 95.0%)" in notes
    feeds = eval_inputs(16)  # beyond the lowering's 4 samples; the batch stays dynamic
    assert worst_sqnr(onnx_outputs(MODEL, feeds), onnx_outputs(out, feeds)) > 120  # measured 132 dB


def test_legalized_onnx_for_nnapi_has_the_datas_static_shapes(folder):
    out = folder / "m.onnx"
    edgegraph.lower(str(folder / MODEL.name), "nnapi", out, calib=str(folder / CALIB.name))
    written = onnx.load(str(out))
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 16, 16]
    assert lowering.unsupported_nodes(edgegraph.load(str(out)), "nnapi") == []


def test_legalize_options_change_a_float16_interface_for_nnapi(capsys, tmp_path):
    """NNAPI takes no float16: the default legalize computes in float32 between Casts at the
    float16 interface, which NNAPI cannot run either (refused); `--legalize interface=target`
    makes the inputs and outputs float32: one partition."""
    from fixtures.cleanup import conv_batchnorm_fp16

    model = tmp_path / "fp16.onnx"
    onnx.save(conv_batchnorm_fp16(), str(model))
    argv = ["lower", model, "--target", "nnapi", "-o", tmp_path / "m.onnx"]
    err = assert_refused(capsys, tmp_path, argv, "nnapi: 1 partition(s) over 50.0% of 4 nodes after legalize (before: "
                         "0 over 0.0%), short of one over 99% (x_to_float32 (Cast): input x is float16")
    assert "edgegraph check M.onnx --target nnapi says what would" in err
    assert_refused(capsys, tmp_path, [*argv, "--legalize", "interface=target),cleanup,(x"],
                   "--legalize takes legalize's options")
    code, out, err = run_cli(capsys, *argv, "--legalize", "interface=target")
    assert code == 0, err
    assert "nnapi: 1 partition(s) over 100.0% of 2 nodes after legalize (before: 0 over 0.0%)" in out  # BN folded by onnxruntime
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert {v.type.tensor_type.elem_type for v in [*written.graph.input, *written.graph.output]} == {onnx.TensorProto.FLOAT}


def test_xnnpack_takes_part_of_the_graph_and_the_notes_say_how_much(capsys, folder):
    # XNNPACK works beside the CPU provider (no standalone Relu, Concat, ...): written, with the share.
    result = edgegraph.lower(str(folder / MODEL.name), "xnnpack", folder / "m.onnx")
    assert ("xnnpack: 7 partition(s) over 45.0% of 20 nodes after legalize (before: 7 over 45.0%); left to the "
            "CPU: Add x1, Concat x1, Flatten x1, GlobalAveragePool x1, Relu x7") in result.notes
    assert_refused(capsys, folder, ["lower", folder / MODEL.name, "--target", "nnapi", "-o", folder / "m.tflite"],
                   "nnapi: -o must end in .onnx")


def test_weight_and_bias_dequantize_folds_exactly(int8_model):
    model = edgegraph.load(str(int8_model))
    folded, notes = tflite.fold_decoded_weights(model)
    dequantize = [n for n in folded.graph.nodes if n.op == "DequantizeLinear"]
    assert notes == ["folded 16 encoded weight(s)/bias(es) into float initializers"]
    # What stays dequantizes activations: the output of a QuantizeLinear.
    assert dequantize and all(n.inputs[0].inputs and n.inputs[0].inputs[0].op == "QuantizeLinear" for n in dequantize)
    feeds = eval_inputs(8)
    before = runtime.run(runtime.session(model), feeds)
    after = runtime.run(runtime.session(folded), feeds)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_weight_only_int8_weights_are_folded_for_onnx2tf():
    """MiniLM's Cast(int8) * scale weights as float initializers (onnx2tf crashes on the decode
    Mul); bit-identical outputs (the fold runs the decode in onnxruntime)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), "w_q")
    scale = numpy_helper.from_array((rng.random((1, 8)) / 50).astype(np.float32), "w_scale")
    nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["w_f", "w_scale"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "wo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weight, scale])
    model = edgegraph.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    folded, notes = tflite.fold_decoded_weights(model)
    assert notes == ["folded 1 encoded weight(s)/bias(es) into float initializers"]
    assert [n.op for n in folded.graph.nodes] == ["MatMul"]
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    assert np.array_equal(runtime.run(runtime.session(model), feeds)["y"], runtime.run(runtime.session(folded), feeds)["y"])


def test_a_dequantize_inside_a_decode_chain_folds_with_its_chain():
    """DQ -> Reshape in front of a MatMul is one encoded weight: folded (and counted) once."""
    from onnx import TensorProto, helper, numpy_helper

    stored = [numpy_helper.from_array(np.arange(-32, 32, dtype=np.int8), "w_q"),
              numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
              numpy_helper.from_array(np.array([8, 8], np.int64), "w_shape")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_flat"]),
             helper.make_node("Reshape", ["w_flat", "w_shape"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], stored)
    model = edgegraph.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    folded, notes = tflite.fold_decoded_weights(model)
    assert notes == ["folded 1 encoded weight(s)/bias(es) into float initializers"]
    assert [n.op for n in folded.graph.nodes] == ["MatMul"]
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)}
    assert np.array_equal(runtime.run(runtime.session(model), feeds)["y"], runtime.run(runtime.session(folded), feeds)["y"])


def test_a_conv_before_a_clip_gets_the_clips_quantized_range():
    """Conv -> Clip(0, 6) -> Q/DQ (uint8, scale 6/255): the copy of the Q/DQ on the Conv's output
    (what TensorFlow's converter needs to make the Conv int8) changes no output bit in onnxruntime,
    optimised (the Clip fused into the integer Conv) or not."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    stored = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
              numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
              numpy_helper.from_array(np.array(6 / 255, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], stored)
    model = edgegraph.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    changed = model.copy()
    assert tflite.quantize_before_clips(changed) == ["quantized 1 Conv output(s) before their Clip, as onnxruntime's fusion does"]
    assert [n.op for n in changed.graph.nodes] == ["Conv", "QuantizeLinear", "DequantizeLinear", "Clip",
                                                   "QuantizeLinear", "DequantizeLinear"]
    feeds = {"x": 3 * rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for optimize in (False, True):
        before = runtime.run(runtime.session(model, optimize=optimize), feeds)["y"]
        assert 0 < (before == 6).mean() < 0.5 and 0 < (before == 0).mean() < 0.9  # both bounds bite
        assert np.array_equal(before, runtime.run(runtime.session(changed, optimize=optimize), feeds)["y"])
    assert tflite.quantize_before_clips(changed) == []  # the Conv's only reader is now its Q


def test_tflite_profile_sends_convtranspose_with_output_shape_to_legalize():
    """onnx2tf crashes on ConvTranspose's output_shape (candy): the tflite profile refuses it, so
    `legalize --target tflite` rewrites it into Conv/DepthToSpace/Slice, with the same outputs."""
    from onnx import TensorProto, helper, numpy_helper

    from edgegraph.context import PassContext
    from edgegraph.passes.legalize import Legalize

    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="VALID", output_shape=[10, 12])
    graph = helper.make_graph([node], "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model = edgegraph.load(proto)
    assert "output_shape is not supported" in lowering.unsupported_nodes(model, "tflite")[0]
    result = Legalize().run(model, PassContext(progress=False, target=edgegraph.load_target("tflite")))
    assert result.stats == {"ConvTranspose->Conv/DepthToSpace/Slice": 1}
    settle(model)
    assert not lowering.unsupported_nodes(model, "tflite")
    feeds = {"x": rng.standard_normal((1, 4, 5, 6)).astype(np.float32)}
    np.testing.assert_allclose(runtime.run(runtime.session(model), feeds)["y"],
                               runtime.run(runtime.session(proto), feeds)["y"], rtol=1e-5, atol=1e-5)


def test_tflite_preparation_does_not_fuse_what_legalize_spelled_out():
    """PP-OCR's HardSigmoid, legalized for tflite into Mul/Add/Clip, stays so through the cleanup
    the tflite route runs instead of onnxsim (fuse-activations fuses only into ops tflite runs)."""
    from fixtures.legalize import hard_sigmoid_then_sigmoid

    from edgegraph.context import PassContext
    from edgegraph.passes.legalize import Legalize

    model = edgegraph.load(hard_sigmoid_then_sigmoid())
    assert Legalize().run(model, PassContext(progress=False, target=edgegraph.load_target("tflite"))).modified
    settle(model)
    prepared, _ = tflite.prepare(model)
    assert "HardSigmoid" not in {n.op for n in prepared.graph.nodes}
    assert not lowering.unsupported_nodes(prepared, "tflite")


def test_tflite_outputs_go_back_to_the_onnx_layout():
    reference = {"y": np.zeros((1, 4, 5, 6)), "scores": np.zeros((1, 10)), "boxes": np.zeros((7, 4))}
    nchw = np.arange(120.0).reshape(1, 4, 5, 6)
    # By name, else the one output left of a fitting shape (a model without a signature: tensor names).
    mapped = tflite.to_onnx_layout(reference, {"y": nchw.transpose(0, 2, 3, 1), "PartitionedCall:1": np.ones((7, 4)),
                                               "PartitionedCall:0": np.ones((1, 10))})
    assert np.array_equal(mapped["y"], nchw) and mapped["scores"].shape == (1, 10) and mapped["boxes"].shape == (7, 4)


# ---------------------------------------------------------------------------------------------
# OpenVINO (the `openvino` extra)


def _needs(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("which", ["float", "int8"])
def test_openvino_ir_runs_in_openvinos_cpu_runtime(tmp_path, int8_model, which):
    _needs(openvino_ir.available())
    import openvino as ov

    model = MODEL if which == "float" else int8_model
    result = edgegraph.lower(str(model), "openvino", tmp_path / "m.xml", calib=str(CALIB))
    assert [p.name for p in result.outputs] == ["m.xml", "m.bin"]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(tmp_path / "m.xml")), "CPU", openvino_ir.compile_config("f32"))
    feeds = eval_inputs()
    got = {"logits": np.array(compiled(feeds)[compiled.outputs[0]])}
    # f32: float rounding (measured 130 dB); int8: OpenVINO's integer kernels round like ORT's within a step (36-40 dB)
    assert worst_sqnr(onnx_outputs(model, feeds), got) > (100 if which == "float" else 30)


# ---------------------------------------------------------------------------------------------
# TFLite (onnx2tf in the peer environment, LiteRT interpreter)


def test_the_tflite_peer_is_sandboxed(tmp_path):
    _needs(tflite.available())
    outside = tmp_path / "outside.txt"
    work = tmp_path / "work"
    work.mkdir()
    _, result = tflite.run_peer(work, {"selftest": True, "outside": str(outside)})
    assert result["refused"] == {"network": True, "write outside": True, "rename outside": True,
                                 "child process": True}
    assert not outside.exists() and (work / "inside.txt").read_text() == "ok"


# Each conversion imports TensorFlow in a new process (8-14 s on an idle 2-core machine): the
# default suite runs the int8 one (it goes through weight folding and the float path alike).
@pytest.mark.parametrize("which", [pytest.param("float", marks=pytest.mark.slow), "int8"])
def test_tflite_runs_in_litert_and_matches(folder, int8_model, which):
    _needs(tflite.available())
    model = folder / MODEL.name
    if which == "int8":
        model = folder / int8_model.name
        shutil.copy(int8_model, model)
    before = snapshot(folder)
    out = folder / "m.tflite"
    result = edgegraph.lower(str(model), "tflite", out, calib=str(folder / CALIB.name))
    assert out.read_bytes()[4:8] == b"TFL3"
    notes = " ".join(result.notes)
    assert "transposed (0, 2, 3, 1)" in notes  # NCHW input fed as the NHWC the model takes
    # Measured in LiteRT vs onnxruntime: float 131 dB; int8 33 dB (TFLite's int8 kernels vs onnxruntime's).
    assert min(m.sqnr_db for m in result.metrics.values()) > (100 if which == "float" else 31)
    if which == "int8":
        assert "folded 16 encoded weight(s)/bias(es)" in notes
        # Every conv and the first FC run in int8; the last FC writes the float logits.
        assert "int8 TFLite: 7 of 8 compute ops run on int8 tensors" in notes
    # Only the .tflite is new: onnx2tf rewrote nothing beside the model (it worked on a copy).
    assert {k: v for k, v in snapshot(folder).items() if k != "m.tflite"} == before


def _lower_in_a_new_process(*args) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgegraph", "lower", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_same_input_gives_the_same_openvino_ir(tmp_path):
    # (Within one process OpenVINO numbers its nodes on from the last model: the CLI's runs agree.)
    _needs(openvino_ir.available())
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _lower_in_a_new_process(MODEL, "--target", "openvino", "-o", tmp_path / run / "m.xml", "--calib", CALIB)
    assert all(digest(tmp_path / "a" / f) == digest(tmp_path / "b" / f) for f in ("m.xml", "m.bin"))


def test_ort_format_differs_only_in_serialisation_order(tmp_path):
    # onnxruntime's ORT-format writer orders some tables differently from run to run: the config
    # is identical, the models compute the same.
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _lower_in_a_new_process(MODEL, "--target", "ort-mobile", "-o", tmp_path / run / "m.ort")
    a, b = tmp_path / "a", tmp_path / "b"
    assert digest(a / "m.required_operators.config") == digest(b / "m.required_operators.config")
    assert (a / "m.ort").stat().st_size == (b / "m.ort").stat().st_size
    feeds = eval_inputs()
    first, second = ort_format_outputs(a / "m.ort", feeds), ort_format_outputs(b / "m.ort", feeds)
    assert all(np.array_equal(first[k], second[k]) for k in first)
