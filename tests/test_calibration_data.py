"""Hostile and unusual data files and recipes, and models that are not "batch on axis 0".

Every refusal goes through the command line: exit 2, one short line on stderr, nothing written,
the inputs unchanged. The stateful voice-activity fixture (`fixtures.recurrent`: input
[batch, 32], state [2, batch, 16], scalar sr) is calibrated and verified on recorded frames.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from clihelp import assert_refused
from edgegraph import context, errors, registry, runtime, verify
from edgegraph.cli import main
from edgegraph.context import CalibrationData
from edgegraph.runtime import InputSpec
from fixtures.recurrent import RATES, vad_flat_model, vad_model, vad_stream


def save_model(path: Path, shape=("batch", 3), op: str = "Relu") -> Path:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def refused(capsys, folder: Path, argv: list, phrase: str) -> str:
    """`clihelp.assert_refused`, with nothing on stdout either (every run here is --quiet)."""
    return assert_refused(capsys, folder, argv, phrase, stdout_empty=True)


def opt(folder: Path, model: Path, *args) -> list:
    return ["opt", model, "-o", folder / "out.onnx", "--runs", "0", "--quiet", *args]


# ---------------------------------------------------------------------------------------------
# Recipes


def alias_bomb(levels: int = 9) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\npasses: *l{levels - 1}\n"  # 9^9 strings once expanded


def test_yaml_alias_bomb_is_refused_fast(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    assert recipe.stat().st_size < 600
    import edgegraph.commands  # noqa: F401 - imports done before the clock starts

    registry.list_passes()
    start = time.perf_counter()
    refused(capsys, tmp_path, opt(tmp_path, model, "--recipe", recipe), "aliases (*name) are not allowed")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name, text, phrase", [
    ("key.json", '{"passes": [{"cleanup": {"' + "k" * 60_000 + '": 1}}]}', "has no option 'kkk"),
    ("name.json", '{"passes": ["' + "p" * 60_000 + '"]}', "unknown pass 'ppp"),
    ("item.json", '{"passes": [["' + "i" * 60_000 + '"]]}', "each pass is a name"),
    ("value.yaml", "passes:\n  - cleanup: {max_rounds: '" + "v" * 60_000 + "'}\n", "must be an integer"),
    ("syntax.yaml", "passes: [" + "s, " * 20_000 + "\n", "is not valid YAML"),
    ("spec.json", '{"passes": ["cleanup(' + "(" * 60_000 + '"]}', "unbalanced"),
])
def test_error_lines_stay_short(capsys, tmp_path, name, text, phrase):
    model = save_model(tmp_path / "m.onnx")
    recipe = tmp_path / name
    recipe.write_text(text)
    err = refused(capsys, tmp_path, opt(tmp_path, model, "--recipe", recipe), phrase)
    assert len(err) < 700, len(err)


@pytest.mark.parametrize("name, content, phrase", [
    ("latin1.yaml", "passes: [cleanup]  # caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    ("binary.json", b"\xff\xfe\x00\x01" * 10, "is not UTF-8 text"),
    ("deep.json", b"[" * 5_000 + b"]" * 5_000, "nested too deeply"),
    ("deep.yaml", b"passes: " + b"[" * 5_000 + b"]" * 5_000, "nested too deeply"),
    ("big.json", b'{"passes": ["cleanup"]}' + b" " * (64 << 10), "larger than 64 KiB"),
    ("intkey.yaml", b"passes:\n  - {1: {}}\n", "each pass is a name"),
    ("optkey.yaml", b"passes:\n  - cleanup: {1: 2}\n", "option names of 'cleanup' must be strings"),
])
def test_bad_recipe_files(capsys, tmp_path, name, content, phrase):
    model = save_model(tmp_path / "m.onnx")
    recipe = tmp_path / name
    recipe.write_bytes(content)
    refused(capsys, tmp_path, opt(tmp_path, model, "--recipe", recipe), phrase)


def test_recipe_that_is_not_a_file(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx")
    refused(capsys, tmp_path, opt(tmp_path, model, "--recipe", "/dev/zero"), "not a file")
    os.mkfifo(tmp_path / "fifo.json")  # reading it would block forever
    refused(capsys, tmp_path, opt(tmp_path, model, "--recipe", tmp_path / "fifo.json"), "not a file")


def test_utf8_recipe_with_bom_and_anchor_free_yaml_still_work(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("\ufeffpasses:\n  - cleanup: {max_rounds: 2}  # café\n".encode())
    assert main([str(a) for a in opt(tmp_path, model, "--recipe", recipe)]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# npz files


def npy_header(shape, descr: str = "<f4") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue()


def write_npz(path: Path, arrays: dict[str, np.ndarray], bomb: tuple[str, int] | None = None) -> Path:
    """An .npz of `arrays`, plus optionally a member (name, bytes) of zeros, deflated as it is
    written (a few hundred KB on disk per 256 MiB it claims)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        if bomb:
            name, size = bomb
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                member.write(npy_header((size // 4,)))
                chunk = bytes(1 << 22)
                for _ in range(size // len(chunk)):
                    member.write(chunk)
    return path


BOMB_BYTES = 256 << 20


def test_deflate_bomb_in_an_unused_key_is_not_read(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    data = write_npz(tmp_path / "bomb.npz", {"x": x, "labels": np.arange(6)}, bomb=("junk", BOMB_BYTES))
    assert data.stat().st_size < BOMB_BYTES / 500
    tracemalloc.start()
    try:
        code = main([str(a) for a in opt(tmp_path, model, "-p", "cleanup", "--calib", data, "--eval", data)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0, capsys.readouterr().err
    assert peak < 32 << 20, peak  # the member claims 256 MiB


def test_a_used_member_larger_than_the_bound_is_refused_before_it_is_read(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(context, "MAX_DATA_BYTES", 64 << 20)
    model = save_model(tmp_path / "m.onnx", shape=("batch",))
    data = write_npz(tmp_path / "big.npz", {}, bomb=("x", BOMB_BYTES))
    tracemalloc.start()
    try:
        err = refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data),
                      "array 'x' is 256 MiB (67108864 float32), more than the 64 MiB")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and len(err) < 300


def test_npz_header_claiming_more_than_the_entry_holds(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx")
    data = tmp_path / "huge.npz"
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("x.npy", npy_header((10**6, 10**6)) + bytes(48))
    refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data),
            "array 'x': its header claims 1000000x1000000 float32 (3.73e+03 GiB) but the entry holds 48 bytes")


@pytest.mark.parametrize("array, phrase", [
    (np.array([["a", "b", "c"]] * 4), "holds <U1 values"),
    (np.array([[b"a", b"b", b"c"]] * 4), "holds |S1 values"),
    (np.ones((4, 3), np.complex64), "holds complex64 values"),
    (np.array([[1, 2, 3]] * 4, dtype=object), "holds object values"),
    (np.zeros((4, 3), dtype=[("a", "<f4")]), "holds [('a', '<f4')] values"),
], ids=["str", "bytes", "complex", "object", "structured"])
def test_arrays_that_are_not_numbers(capsys, tmp_path, array, phrase):
    model = save_model(tmp_path / "m.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=array)
    refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data), f"array 'x' {phrase}")


@pytest.mark.parametrize("fill, phrase", [
    (lambda x: x.__setitem__((2, 1), np.nan), "has 1 NaN or infinite values (of 18)"),
    (lambda x: x.__setitem__(slice(None), np.inf), "has 18 NaN or infinite values (all of them)"),
    (lambda x: x.__setitem__(slice(None), np.nan), "has 18 NaN or infinite values (all of them)"),
], ids=["one-nan", "all-inf", "all-nan"])
def test_non_finite_calibration_data(capsys, tmp_path, fill, phrase):
    model = save_model(tmp_path / "m.onnx")
    x = np.ones((6, 3), np.float32)
    fill(x)
    data = tmp_path / "data.npz"
    np.savez(data, x=x)
    refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data), f"array 'x' {phrase}")


def test_only_the_used_keys_are_checked(capsys, tmp_path):
    """A string array beside the inputs (class names, file paths) is neither read nor refused."""
    model = save_model(tmp_path / "m.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((6, 3), np.float32), classes=np.array(["cat", "dog"]), broken=np.full(3, np.nan))
    assert main([str(a) for a in opt(tmp_path, model, "-p", "cleanup", "--calib", data)]) == 0, \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Image folders


def test_corrupt_image_that_sorts_first(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx", shape=("batch", 3, 8, 8))
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    for name in ("b.png", "c.jpg"):
        Image.new("RGB", (12, 12), (10, 200, 30)).save(images / name)
    refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", images),
            f"{images / 'a.png'} is not a readable image")


def test_decompression_bomb_image_is_not_decoded(capsys, tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    model = save_model(tmp_path / "m.onnx", shape=("batch", 3, 8, 8))
    images = tmp_path / "images"
    images.mkdir()
    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)  # 50000x50000 RGB: 7.5 GB decoded
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                   + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))
    assert (images / "a.png").stat().st_size < 200
    tracemalloc.start()
    try:
        refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", images),
                "a.png: the image claims more pixels than Pillow's decompression-bomb limit")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_absurd_image_preprocessing_is_refused(capsys, tmp_path):
    model = save_model(tmp_path / "m.onnx", shape=("batch", 3, 8, 8))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (12, 12)).save(images / "a.png")
    base = opt(tmp_path, model, "-p", "cleanup", "--calib", images)
    refused(capsys, tmp_path, [*base, "--std", "0.2,0,0.2"], "std not 0")
    refused(capsys, tmp_path, [*base, "--mean", "0.1,0.2"], "mean and std need 1 or 3 values")
    refused(capsys, tmp_path, [*base, "--image-size", "100000"], "resize must be whole numbers in 1..16384")
    refused(capsys, tmp_path, [*base, "--resize", "99999"], "resize must be whole numbers in 1..16384")


# ---------------------------------------------------------------------------------------------
# Batch axes and the layout rule


def test_batch_axes_follow_the_batch_dim_name():
    f32 = np.dtype(np.float32)
    vad = [InputSpec("input", f32, ("batch", 32)), InputSpec("state", f32, (2, "batch", 16)),
           InputSpec("sr", np.dtype(np.int64), ())]
    assert runtime.batch_axes(vad) == {"input": 0, "state": 1, "sr": None}
    fixed = [InputSpec("input", f32, (1, 512)), InputSpec("h", f32, (2, 1, 64)), InputSpec("sr", f32, (1,))]
    assert runtime.batch_axes(fixed) == {"input": 0, "h": 1, "sr": 0}
    text = [InputSpec("ids", f32, ("batch", "seq")), InputSpec("mask", f32, ("batch", "seq"))]
    assert runtime.batch_axes(text) == {"ids": 0, "mask": 0}
    assert runtime.batch_axes([InputSpec("x", f32, None), InputSpec("y", f32, (4, 3))]) == {"x": 0, "y": 0}
    assert runtime.batch_size_for(vad, 8) == 8 and runtime.batch_size_for(fixed, 8) == 1


def vad_specs():
    return runtime.input_specs(vad_model())


def stacked_feeds(frames):
    """A recorded stream as N feeds along axis 0: input Nx1x32, state Nx2x1x16, sr N."""
    return {name: np.stack([f[name] for f in frames]) for name in frames[0]}


def test_both_layouts_give_the_same_samples_and_batches_follow_each_batch_axis():
    frames = vad_stream(1, 6)
    feeds = CalibrationData.from_arrays(stacked_feeds(frames), specs=vad_specs())
    own = CalibrationData.from_arrays({"input": np.concatenate([f["input"] for f in frames]),
                                       "state": np.concatenate([f["state"] for f in frames], axis=1),
                                       "sr": np.stack([f["sr"] for f in frames])}, specs=vad_specs())
    assert len(feeds) == len(own) == 6
    for i in range(6):
        for name in ("input", "state", "sr"):
            np.testing.assert_array_equal(feeds.sample(i)[name], own.sample(i)[name])
    assert feeds.sample(0)["state"].shape == (2, 16) and feeds.sample(0)["sr"].shape == ()
    # sr alternates 16000/8000 in the stream, so every batch is one frame; with one rate, batches grow.
    assert [b["state"].shape for b in feeds.batches(4)] == [(2, 1, 16)] * 6
    same_rate = CalibrationData.from_arrays({"input": np.zeros((6, 32), np.float32),
                                             "state": np.zeros((2, 6, 16), np.float32),
                                             "sr": np.array(RATES[0])}, specs=vad_specs())
    batches = list(same_rate.batches(4))
    assert [b["state"].shape for b in batches] == [(2, 4, 16), (2, 2, 16)]
    assert [b["input"].shape for b in batches] == [(4, 32), (2, 32)] and batches[0]["sr"].shape == ()
    assert [runtime.batch_length(vad_specs(), b) for b in batches] == [4, 2]
    # One recorded feed, at every input's own rank, is one sample.
    single = CalibrationData.from_arrays(frames[0], specs=vad_specs())
    assert len(single) == 1
    np.testing.assert_array_equal(next(single.batches())["state"], frames[0]["state"])


@pytest.mark.parametrize("arrays, phrase", [
    ({"input": np.zeros((5, 32)), "state": np.zeros((5, 2, 16)), "sr": np.array(16000)},
     "different numbers of samples (input: 5, state: 2); give input: Nx1x32 (N feeds as they are) or Nx32 (N "
     "samples along its batch axis 0); state: Nx2x1x16 (N feeds as they are) or 2xNx16 (N samples along its batch "
     "axis 1); sr: N (one value per sample) or a scalar (one for all)"),
    ({"input": np.zeros((5, 32)), "state": np.zeros((5, 2, 1, 1, 16)), "sr": np.array(16000)},
     "array 'state' has shape 5x2x1x1x16, which does not feed input 'state' [2, batch, 16]: give Nx2x1x16"),
    ({"input": np.zeros((5, 31)), "state": np.zeros((5, 2, 1, 16)), "sr": np.full(5, 16000)},
     "samples of input 'input' have shape 31, the model wants 32 per sample (as arrays: Nx1x32 (N feeds as they "
     "are) or Nx32"),
    ({"input": np.zeros((5, 32)), "state": np.zeros((5, 3, 1, 16)), "sr": np.full(5, 16000)},
     "samples of input 'state' have shape 3x16, the model wants 2x16 per sample"),
], ids=["state-without-batch-axis", "state-rank", "input-dims", "state-dims"])
def test_mismatched_vad_data_gets_the_shapes_that_would_fit(capsys, tmp_path, arrays, phrase):
    model = tmp_path / "vad.onnx"
    onnx.save(vad_model(), model)
    data = tmp_path / "vad.npz"
    np.savez(data, **arrays)
    refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data), phrase)


# ---------------------------------------------------------------------------------------------
# Stateful models end to end


def report_of(tmp_path: Path, *argv) -> dict:
    report = tmp_path / "report.json"
    code = main([str(a) for a in [*argv, "--report", report]])
    assert code == 0
    return json.loads(report.read_text())


@pytest.mark.parametrize("layout", ["feeds", "own"])
def test_cleanup_on_the_vad_model_is_verified_on_its_data(capsys, tmp_path, layout):
    model = tmp_path / "vad.onnx"
    onnx.save(vad_model(), model)
    frames = vad_stream(1, 12)
    arrays = stacked_feeds(frames) if layout == "feeds" else {
        "input": np.concatenate([f["input"] for f in frames]),
        "state": np.concatenate([f["state"] for f in frames], axis=1), "sr": np.array(RATES[1])}
    data = tmp_path / "vad.npz"
    np.savez(data, **arrays)
    report = report_of(tmp_path, *opt(tmp_path, model, "-p", "cleanup", "--calib", data))
    err = capsys.readouterr().err
    assert "verification disabled" not in err, err
    assert report["calibration"] == {"source": str(data), "samples": 12}
    metrics = report["passes"][0]["metrics"]
    assert set(metrics) == {"output", "stateN"}
    assert all(m["max_abs"] < 1e-5 for m in metrics.values()), metrics
    assert report["accuracy"]["data"] == str(data)


def test_cleanup_on_the_vad_model_without_data_verifies_on_random_inputs(capsys, tmp_path):
    model = tmp_path / "vad.onnx"
    onnx.save(vad_model(), model)
    report = report_of(tmp_path, *opt(tmp_path, model, "-p", "cleanup"))
    assert "verification disabled" not in capsys.readouterr().err
    assert set(report["passes"][0]["metrics"]) == {"output", "stateN"}


def test_quant_runs_on_the_vad_model(capsys, tmp_path):
    """Its work sits in If branches, which quant leaves in float: it must say so, not crash."""
    model = tmp_path / "vad.onnx"
    onnx.save(vad_model(), model)
    data = tmp_path / "vad.npz"
    np.savez(data, **stacked_feeds(vad_stream(1, 16)))
    code = main([str(a) for a in opt(tmp_path, model, "-p", "cleanup,quant", "--calib", data)])
    err = capsys.readouterr().err
    assert code == 0 or code == 2 and "nothing" in err, err  # never an internal error


def test_quant_calibrates_a_stateful_model_and_holds_up_on_held_out_frames(capsys, tmp_path):
    model, out = tmp_path / "vad_flat.onnx", tmp_path / "out.onnx"
    onnx.save(vad_flat_model(), model)
    calib, held_out = tmp_path / "calib.npz", tmp_path / "held_out.npz"
    np.savez(calib, **stacked_feeds(vad_stream(1, 200, seed=1)))
    frames = vad_stream(1, 100, seed=7)
    np.savez(held_out, **stacked_feeds(frames))
    report = report_of(tmp_path, *opt(tmp_path, model, "-p", "quant", "--calib", calib, "--eval", held_out))
    cleanup, quant = report["passes"]  # quant's prerequisite first
    assert (cleanup["name"], cleanup["wanted_by"], quant["name"]) == ("cleanup", "quant", "quant")
    assert quant["stats"]["quantized_nodes"] >= 3
    assert report["accuracy"]["data"] == str(held_out)
    quantized = onnx.load(out)
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 3

    # Held-out frames, one at a time as a stream is run, float vs int8 in onnxruntime.
    reference = [runtime.run(runtime.session(model), f) for f in frames]
    candidate = [runtime.run(runtime.session(out, optimize=True), f) for f in frames]
    metrics = verify.compare_all(reference, candidate)
    assert metrics["output"].sqnr_db > 45  # measured 50.5 dB
    assert metrics["stateN"].sqnr_db > 32  # measured 36.3 dB
    assert metrics["output"].max_abs < 0.02  # probabilities; measured 0.006


def test_library_calibration_data_without_batch_axes_gets_the_models():
    """A CalibrationData built by hand (samples without their batch axis) is batched along the
    model's batch axes, and `optimize` verifies on it."""
    import edgegraph
    from edgegraph import ir

    frames = vad_stream(1, 4)
    data = CalibrationData(4, lambda i: {"input": frames[i]["input"][0], "state": frames[i]["state"][:, 0],
                                         "sr": np.array(RATES[0])}, "frames")
    checked = edgegraph.as_calibration(data, ir.from_proto(vad_model()))
    assert dict(checked.batch_axes) == {"input": 0, "state": 1, "sr": None}
    batch = next(checked.batches(4))
    assert batch["state"].shape == (2, 4, 16) and batch["input"].shape == (4, 32) and batch["sr"].shape == ()
    np.testing.assert_array_equal(batch["state"][:, 2], frames[2]["state"][:, 0])
    assert edgegraph.optimize(vad_model(), "cleanup", calib=data).graph.input[1].name == "state"


def test_every_error_line_is_bounded_whatever_it_echoes(capsys, tmp_path):
    """A model input named with 30 000 characters, fed a mismatched array: the names are cut."""
    name = "n" * 30_000  # zip member names stop at 64 KiB
    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    data = tmp_path / "data.npz"
    np.savez(data, **{name: np.zeros((2, 2, 2, 3), np.float32)})
    err = refused(capsys, tmp_path, opt(tmp_path, model, "-p", "cleanup", "--calib", data), "does not feed input")
    assert len(err) < 1000, len(err)
    assert len(errors.one_line(ValueError("m" * 10**6))) < errors.MAX_LINE + 50  # whatever a message holds
