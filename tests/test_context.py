"""edgegraph.context: calibration data sources, batching, image preprocessing, the pass context."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, DEFAULT_DIR, require_shared
from edgegraph.context import CalibrationData, ImagePreprocess, PassContext, read_labels
from edgegraph.errors import CalibrationDataError
from edgegraph.runtime import InputSpec

IMAGENET = DATA / "imagenet_sample_256"


# ---------------------------------------------------------------------------------------------
# npz and arrays


def test_from_npz_reads_the_bundled_calibration_file():
    data = CalibrationData.from_npz(DEFAULT_DIR / "digits_calib.npz", ["input"])
    assert len(data) == 64
    sample = data.sample(0)
    assert list(sample) == ["input"]
    assert sample["input"].shape == (1, 16, 16) and sample["input"].dtype == np.float32
    assert str(DEFAULT_DIR / "digits_calib.npz") == data.source


def test_from_npz_accepts_reference_io_files(tmp_path):
    path = tmp_path / "ref.npz"
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.savez(path, input__ids=ids, input__mask=np.ones((3, 4), bool), output__logits=np.zeros((3, 2)))
    data = CalibrationData.from_npz(path)
    assert sorted(data.sample(0)) == ["ids", "mask"]  # outputs are not inputs
    np.testing.assert_array_equal(data.sample(2)["ids"], ids[2])
    only_ids = CalibrationData.from_npz(path, ["ids"])
    assert list(only_ids.sample(0)) == ["ids"]


def test_from_npz_errors(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, images=np.zeros((4, 3)), extra=np.zeros((4, 1)))
    with pytest.raises(CalibrationDataError, match=r"no array for model input\(s\) input, mask .*keys: images, extra"):
        CalibrationData.from_npz(path, ["input", "mask"])
    with pytest.raises(CalibrationDataError, match="not found"):
        CalibrationData.from_npz(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(CalibrationDataError, match="not a readable .npz"):
        CalibrationData.from_npz(garbage)
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, a=np.zeros((4, 2)), b=np.zeros((5, 2)))
    with pytest.raises(CalibrationDataError, match="same, non-zero length"):
        CalibrationData.from_npz(uneven)


def test_from_arrays_errors():
    with pytest.raises(CalibrationDataError, match="no arrays"):
        CalibrationData.from_arrays({})
    with pytest.raises(CalibrationDataError, match="same, non-zero length"):
        CalibrationData.from_arrays({"x": np.zeros((0, 3))})
    with pytest.raises(CalibrationDataError, match="same, non-zero length"):
        CalibrationData.from_arrays({"x": np.float32(1)})


def test_batches_and_take():
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    data = CalibrationData.from_arrays({"x": x, "k": np.arange(10)})
    batches = list(data.batches(4))
    assert [b["x"].shape for b in batches] == [(4, 2), (4, 2), (2, 2)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(batches[2]["k"], [8, 9])
    part = data.take(3, start=5)
    assert len(part) == 3
    np.testing.assert_array_equal(next(part.batches(8))["k"], [5, 6, 7])
    assert len(data.take(100, start=8)) == 2
    assert len(data.take(5, start=20)) == 0
    assert list(data.take(0).batches(4)) == []


# ---------------------------------------------------------------------------------------------
# Random data


SPECS = [
    InputSpec("pixels", np.dtype(np.float32), ("batch", 3, 4, 4)),
    InputSpec("ids", np.dtype(np.int64), ("batch", "seq")),
    InputSpec("mask", np.dtype(bool), (1, 7)),
    InputSpec("half", np.dtype(np.float16), (2,)),
]


def test_random_is_seeded_and_typed():
    first = next(CalibrationData.random(SPECS, 5, seed=3, dynamic_dim=6).batches(5))
    again = next(CalibrationData.random(SPECS, 5, seed=3, dynamic_dim=6).batches(5))
    other = next(CalibrationData.random(SPECS, 5, seed=4, dynamic_dim=6).batches(5))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["pixels"], other["pixels"])
    assert first["pixels"].shape == (5, 3, 4, 4) and first["pixels"].dtype == np.float32
    assert 0 <= first["pixels"].min() and first["pixels"].max() < 1
    assert first["ids"].shape == (5, 6) and first["ids"].dtype == np.int64
    assert set(np.unique(first["ids"])) <= {0, 1}  # valid as ids, masks and indices
    assert first["mask"].shape == (5, 7) and first["mask"].dtype == bool
    assert first["half"].dtype == np.float16 and first["half"].shape == (5,)
    # A sample does not depend on how the data set is batched or sliced.
    data = CalibrationData.random(SPECS, 5, seed=3, dynamic_dim=6)
    np.testing.assert_array_equal(data.take(2, start=3).sample(1)["pixels"], first["pixels"][4])


def test_random_rejects_types_it_cannot_make():
    data = CalibrationData.random([InputSpec("text", np.dtype(object), ("batch",))], 2)
    with pytest.raises(CalibrationDataError, match="cannot generate random data for input 'text'"):
        data.sample(0)


# ---------------------------------------------------------------------------------------------
# Images


def test_image_preprocess_arithmetic(tmp_path):
    colour = (200, 100, 50)
    Image.new("RGB", (40, 30), colour).save(tmp_path / "b.png")
    Image.new("RGB", (30, 40), (0, 0, 0)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    preprocess = ImagePreprocess(size=(16, 16), resize=20)
    data = CalibrationData.from_images(tmp_path, "image", preprocess)
    assert len(data) == 2
    black, flat = data.sample(0)["image"], data.sample(1)["image"]  # sorted by name: a.jpg, b.png
    assert flat.shape == (3, 16, 16) and flat.dtype == np.float32
    expected = (np.float32(colour) / 255 - np.float32(preprocess.mean)) / np.float32(preprocess.std)
    np.testing.assert_allclose(flat[:, 8, 8], expected, rtol=1e-5)
    np.testing.assert_allclose(black[:, 0, 0], -np.float32(preprocess.mean) / np.float32(preprocess.std), rtol=1e-5)

    bgr_nhwc = CalibrationData.from_images(tmp_path, "image", ImagePreprocess(
        size=(8, 12), resize=None, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0, layout="NHWC", channels="BGR"))
    pixel = bgr_nhwc.sample(1)["image"]
    assert pixel.shape == (8, 12, 3)
    np.testing.assert_allclose(pixel[4, 6], colour[::-1])
    grey = CalibrationData.from_images(tmp_path, "image", ImagePreprocess(size=(8, 8), channels="L", mean=(0,),
                                                                          std=(1,), scale=1.0))
    assert grey.sample(1)["image"].shape == (1, 8, 8)
    assert grey.sample(1)["image"][0, 4, 4] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50, abs=1)


def test_from_images_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="no images"):
        CalibrationData.from_images(tmp_path, "image")
    with pytest.raises(CalibrationDataError, match="no images"):
        CalibrationData.from_images(tmp_path / "missing", "image")


def test_from_images_on_real_photos():
    folder = require_shared(IMAGENET)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    data = CalibrationData.from_images(folder, "data", ImagePreprocess())
    assert len(data) == len(files) > 0
    batch = next(data.batches(4))["data"]
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == np.float32
    # ImageNet normalisation puts natural photos roughly around 0 with unit spread.
    assert -1.0 < float(batch.mean()) < 1.0
    assert 0.5 < float(batch.std()) < 1.6
    nhwc = CalibrationData.from_images(folder, "data", ImagePreprocess(size=(96, 128), resize=None, layout="NHWC"))
    assert nhwc.sample(0)["data"].shape == (96, 128, 3)
    np.testing.assert_array_equal(data.take(1, start=2).sample(0)["data"], data.sample(2)["data"])


def test_read_labels(tmp_path):
    with_header = tmp_path / "labels.csv"
    with_header.write_text("file,label\na.jpg,3\nb.jpg, 17\nbad.jpg,x\n")
    assert read_labels(with_header) == {"a.jpg": 3, "b.jpg": 17}
    plain = tmp_path / "plain.csv"
    plain.write_text("c.png,0\nd.png,-1\n")
    assert read_labels(plain) == {"c.png": 0, "d.png": -1}


def test_real_labels_match_the_images():
    folder = require_shared(IMAGENET)
    labels = read_labels(require_shared(folder / "labels.csv"))
    assert labels and all(0 <= v < 1000 for v in labels.values())
    assert all((folder / name).exists() for name in list(labels)[:20])


# ---------------------------------------------------------------------------------------------
# Pass context


def test_pass_context_defaults_and_progress_bar():
    ctx = PassContext(progress=False)
    assert ctx.calibration is None and ctx.seed == 0 and ctx.verify.enabled
    assert ctx.target is not None
    assert list(ctx.progress_bar(range(3), total=3, desc="x")) == [0, 1, 2]
    with pytest.raises(Exception):  # frozen: passes cannot change what later passes see
        ctx.seed = 1


def test_read_labels_takes_the_first_integer_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('file,synset,class_index,class_name\nn1_tench.jpg,n01440764,0,"tench, Tinca tinca"\n'
                    'n2_shark.jpg,n01484850,2,"great white shark"\n')
    assert read_labels(path) == {"n1_tench.jpg": 0, "n2_shark.jpg": 2}
