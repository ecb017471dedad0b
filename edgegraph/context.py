"""What a pass may use besides the model: calibration data, target, seed, verification, progress."""

from __future__ import annotations

import csv
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgegraph.errors import CalibrationDataError
from edgegraph.runtime import Feeds, InputSpec, batch_size_for
from edgegraph.targets import Target, load_target

# One line per stage of work (loading, each pass, verification, saving, timing) at INFO. Not
# propagated to the "edgegraph" logger (warnings and errors on stderr): `edgegraph opt` shows
# these lines when progress bars cannot be shown, and a library user can attach a handler.
STAGES = logging.getLogger("edgegraph.stages")
STAGES.propagate = False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class ImagePreprocess:
    """How to turn an image file into a model input (the usual ImageNet recipe by default)."""

    size: tuple[int, int] = (224, 224)  # height, width fed to the model
    resize: int | None = 256  # shorter side before the center crop; None resizes straight to `size`
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255  # applied before mean/std
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "L"] = "RGB"

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image  # only image calibration needs Pillow

        with Image.open(path) as img:
            img = img.convert("L" if self.channels == "L" else "RGB")
            height, width = self.size
            if self.resize:
                ratio = self.resize / min(img.size)
                img = img.resize((round(img.width * ratio), round(img.height * ratio)), Image.BILINEAR)
                left, top = (img.width - width) // 2, (img.height - height) // 2
                img = img.crop((left, top, left + width, top + height))
            else:
                img = img.resize((width, height), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32)
        if array.ndim == 2:
            array = array[..., None]
        if self.channels == "BGR":
            array = array[..., ::-1]
        array = (array * self.scale - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(array.transpose(2, 0, 1) if self.layout == "NCHW" else array, dtype=np.float32)


@dataclass(frozen=True)
class CalibrationData:
    """A sequence of samples ({input name: array without the batch axis}) read lazily, in batches."""

    length: int
    fetch: Callable[[int], Feeds]  # sample index -> one sample
    source: str = ""

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Feeds:
        return self.fetch(index)

    def batches(self, batch_size: int = 8) -> Iterator[Feeds]:
        """Stacked batches along a new axis 0 (the last batch may be shorter)."""
        for start in range(0, self.length, batch_size):
            samples = [self.fetch(i) for i in range(start, min(start + batch_size, self.length))]
            yield {name: np.stack([s[name] for s in samples]) for name in samples[0]}

    def take(self, count: int, start: int = 0) -> CalibrationData:
        """Samples [start, start + count) as a new dataset (e.g. calibration vs evaluation split)."""
        count = max(0, min(count, self.length - start))
        return CalibrationData(count, lambda i: self.fetch(start + i), self.source)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "arrays") -> CalibrationData:
        """Axis 0 of every array indexes samples."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise CalibrationDataError(f"{source}: no arrays")
        lengths = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise CalibrationDataError(f"{source}: arrays need the same, non-zero length on axis 0 (got {lengths})")
        return cls(next(iter(lengths.values())), lambda i: {k: v[i] for k, v in arrays.items()}, source)

    @classmethod
    def from_npz(cls, path: str | Path, inputs: Sequence[str] | None = None) -> CalibrationData:
        """An .npz whose keys are input names (an `input__` prefix, as in reference I/O files, is accepted)."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"calibration file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k.removeprefix("input__"): npz[k] for k in npz.files if not k.startswith("output__")}
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"{path} is not a readable .npz file ({exc})") from None
        if inputs is not None:
            missing = [name for name in inputs if name not in arrays]
            if missing:
                raise CalibrationDataError(
                    f"{path} has no array for model input(s) {', '.join(missing)} (keys: {', '.join(arrays) or 'none'})"
                )
            arrays = {name: arrays[name] for name in inputs}
        return cls.from_arrays(arrays, str(path))

    @classmethod
    def from_images(cls, folder: str | Path, input_name: str, preprocess: ImagePreprocess = ImagePreprocess()) -> CalibrationData:
        """Every image in `folder` (sorted by name), preprocessed for the single image input."""
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise CalibrationDataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        return cls(len(files), lambda i: {input_name: preprocess(files[i])}, str(folder))

    @classmethod
    def random(cls, specs: Sequence[InputSpec], count: int = 8, seed: int = 0, dynamic_dim: int = 32, *,
               ranges: Mapping[str, tuple[int, int] | list[int]] | None = None,
               whole: bool | None = False) -> CalibrationData:
        """Seeded random samples shaped from the input specs. Good for checking exactness, not
        for calibrating ranges.

        Floats are uniform in [0, 1); integers are drawn from `ranges[name]` ([low, high), or a
        list of values, which a scalar takes in turn, sample after sample), else are 0 or 1 (valid
        ids, masks and indices); bools are random. A dynamic dim takes `dynamic_dim` (the batch
        dim of a whole feed 1), the same value wherever its symbol appears.

        Samples normally leave out axis 0, which `batches` stacks. With `whole`, each sample is
        one complete feed (a dynamic batch dim becomes 1, `batches` yields the samples as they
        are): what a model needs whose inputs cannot all be stacked on axis 0 (a scalar input,
        state whose batch axis is axis 1, a fixed axis 0 that the count does not divide).
        `whole=None` picks that only when stacking cannot give the model's shapes.
        """
        if whole is None:
            whole = not _stackable(specs, count)
        batch_symbols = {s.shape[0] for s in specs if whole and s.shape and isinstance(s.shape[0], str)}

        def size(dim, axis: int) -> int:
            if isinstance(dim, int) and dim >= 0:  # 0 too: an empty dim is a fixed size
                return dim
            return 1 if whole and (axis == 0 or dim in batch_symbols) else dynamic_dim

        def shape_of(spec: InputSpec) -> tuple[int, ...]:
            dims = list(spec.shape or ())
            shape = tuple(size(d, axis) for axis, d in enumerate(dims))
            return shape if whole else shape[1:]  # axis 0 is the batch axis added by `batches`

        shapes = {spec.name: shape_of(spec) for spec in specs}
        ranges = dict(ranges or {})

        def fetch(index: int) -> Feeds:
            rng = np.random.default_rng([seed, index])
            sample = {}
            for spec in specs:
                shape = shapes[spec.name]
                if spec.dtype.kind == "f":
                    sample[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    sample[spec.name] = rng.random(shape) < 0.5
                elif spec.dtype.kind in "iu":
                    allowed = ranges.get(spec.name, (0, 2))
                    if isinstance(allowed, list):
                        value = allowed[index % len(allowed)] if not shape else rng.choice(allowed, shape)
                        sample[spec.name] = np.asarray(value).astype(spec.dtype)
                    else:
                        sample[spec.name] = rng.integers(*allowed, shape).astype(spec.dtype)
                else:
                    raise CalibrationDataError(f"cannot generate random data for input '{spec.name}' of type {spec.dtype}")
            return sample

        source = f"random(seed={seed})"
        return _WholeFeeds(count, fetch, source) if whole else cls(count, fetch, source)


class _WholeFeeds(CalibrationData):
    """Samples that are each one complete feed (see `CalibrationData.random(whole=True)`)."""

    def batches(self, batch_size: int = 8) -> Iterator[Feeds]:
        for index in range(self.length):
            yield self.fetch(index)

    def take(self, count: int, start: int = 0) -> CalibrationData:
        count = max(0, min(count, self.length - start))
        return _WholeFeeds(count, lambda i: self.fetch(start + i), self.source)


def _stackable(specs: Sequence[InputSpec], count: int) -> bool:
    """Whether samples without axis 0, stacked `count` at a time in batches the model accepts,
    give every input the shape the model declares."""
    batch = batch_size_for(specs, count)
    first_axes = {s.shape[0] for s in specs if s.shape and not isinstance(s.shape[0], int)}
    for spec in specs:
        if spec.shape is None:
            continue
        if not spec.shape or count % batch:
            return False  # a scalar input, or a last batch shorter than a fixed axis 0
        first, rest = spec.shape[0], spec.shape[1:]
        if isinstance(first, int) and first > 0 and first != batch:
            return False
        if any(d in first_axes for d in rest if d is not None):
            return False  # a batch symbol on another axis (state [2, B, H]) would get another size
    return True


def read_labels(path: str | Path) -> dict[str, int]:
    """Rows of a labels.csv -> {file name: class index}.

    The file is the first column and the label the first integer column after it, so both
    `file,label` and `file,synset,class_index,class_name` work; a header row is skipped.
    """
    labels = {}
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            label = next((f.strip() for f in row[1:] if f.strip().lstrip("-").isdigit()), None)
            if label is not None:
                labels[row[0].strip()] = int(label)
    return labels


@dataclass(frozen=True)
class VerifyConfig:
    """How each pass is checked against its input model (see `edgegraph.verify`)."""

    enabled: bool = True
    samples: int = 4
    rtol: float = 1e-4  # relative to the largest |reference| value of the output
    atol: float = 1e-5


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may use besides the model. Passes declare what they need in `requires`."""

    calibration: CalibrationData | None = None
    target: Target = field(default_factory=lambda: load_target("cpu"))
    seed: int = 0
    verify: VerifyConfig = VerifyConfig()
    progress: bool = True
    threads: int = 0  # onnxruntime intra-op threads for calibration runs; 0 = all cores
    timing: bool = True  # False (`--runs 0`): passes take no latency measurements of their own
    fixed_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # what --fix-shape made static
    data_option: str = "--calib DATA.npz"  # how the user gives real inputs, for advice ("" where one cannot)

    def progress_bar(self, iterable=None, *, total: int | None = None, desc: str = ""):
        """A tqdm bar on stderr when progress is on and stderr is a terminal. Otherwise the
        iteration is silent and, with progress on, ends with one `STAGES` line: what ran, how
        many steps, how long."""
        if self.progress and is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, unit="batch")
        return _StageLine(iterable, desc if self.progress else "")


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class _StageLine:
    """Stands in for a tqdm bar (iteration, update, close, `with`) where none can be shown."""

    def __init__(self, iterable, desc: str):
        self.iterable, self.desc, self.steps, self.start, self.done = iterable, desc, 0, time.perf_counter(), False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.steps += 1
        self.close()

    def update(self, steps: int = 1) -> None:
        self.steps += steps

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if self.desc and not self.done:
            STAGES.info("%s: %d step(s) in %.2fs", self.desc, self.steps, time.perf_counter() - self.start)
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
