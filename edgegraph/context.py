"""What a pass may use besides the model: calibration data, target, seed, verification, progress."""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgegraph.checks import MAX_INPUT_ELEMENTS
from edgegraph.errors import NAME_LIMIT, CalibrationDataError, EdgegraphError, shown
from edgegraph.floor import Floor
from edgegraph.runtime import Feeds, InputSpec, batch_axes, batch_size_for
from edgegraph.targets import Target, load_target

# One line per stage of work (loading, each pass, verification, saving, timing) at INFO. Not
# propagated to the "edgegraph" logger (warnings and errors on stderr): `edgegraph opt` shows
# these lines when progress bars cannot be shown, and a library user can attach a handler.
STAGES = logging.getLogger("edgegraph.stages")
STAGES.propagate = False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_IMAGE_SIDE = 16384  # pixels of a preprocessed image side (what a model input can sensibly be)


def _memory_cap() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return min(8 << 30, physical // 2)


# Bytes of arrays one .npz may give (what its members claim, checked before anything is read):
# 8 GiB, or half the machine's memory when that is less. Fixed per machine, so that whether a
# file is accepted does not depend on how busy the machine is.
MAX_DATA_BYTES = _memory_cap()


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

    def __post_init__(self):
        channels = 1 if self.channels == "L" else 3
        sides = (*self.size, self.resize or 1)
        if self.layout not in ("NCHW", "NHWC") or self.channels not in ("RGB", "BGR", "L"):
            problem = "layout must be NCHW or NHWC, channels RGB, BGR or L"
        elif len(self.size) != 2 or not all(isinstance(v, int) and 0 < v <= MAX_IMAGE_SIDE for v in sides):
            problem = f"size (height, width) and resize must be whole numbers in 1..{MAX_IMAGE_SIDE}"
        elif len(self.mean) not in (1, channels) or len(self.std) not in (1, channels):
            problem = f"mean and std need 1 or {channels} values"
        elif not all(np.isfinite(v) for v in (*self.mean, *self.std, self.scale)) or 0 in self.std:
            problem = "mean, std and scale must be finite, and std not 0"
        else:
            return
        raise EdgegraphError(f"image preprocessing: {problem}")

    def __call__(self, path: Path) -> np.ndarray:
        """The model input for the image at `path`. An unreadable file, or one whose header claims
        more pixels than Pillow's decompression-bomb limit, raises CalibrationDataError naming it;
        the limit is checked on the header, before any pixel is decoded."""
        from PIL import Image  # only image calibration needs Pillow

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img = img.convert("L" if self.channels == "L" else "RGB")
                    height, width = self.size
                    if self.resize:
                        ratio = self.resize / min(img.size)
                        img = img.resize((max(1, round(img.width * ratio)), max(1, round(img.height * ratio))),
                                         Image.BILINEAR)
                        left, top = (img.width - width) // 2, (img.height - height) // 2
                        img = img.crop((left, top, left + width, top + height))
                    else:
                        img = img.resize((width, height), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.float32)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise CalibrationDataError(f"{shown(str(path))}: the image claims more pixels than Pillow's "
                                       f"decompression-bomb limit ({Image.MAX_IMAGE_PIXELS}); not decoded") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a corrupt file
            raise CalibrationDataError(f"{shown(str(path))} is not a readable image "
                                       f"({type(exc).__name__}: {shown(str(exc))})") from None
        if array.ndim == 2:
            array = array[..., None]
        if self.channels == "BGR":
            array = array[..., ::-1]
        array = (array * self.scale - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(array.transpose(2, 0, 1) if self.layout == "NCHW" else array, dtype=np.float32)


@dataclass(frozen=True)
class CalibrationData:
    """A sequence of samples read lazily, in batches.

    A sample is {input name: array}, without the input's batch axis (`batch_axes`: axis 0 for an
    input it does not name; None for an input without one, such as a scalar, whose sample is its
    whole value). `batches` stacks samples along each input's batch axis.
    """

    length: int
    fetch: Callable[[int], Feeds]  # sample index -> one sample
    source: str = ""
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Feeds:
        return self.fetch(index)

    def batches(self, batch_size: int = 8) -> Iterator[Feeds]:
        """Up to `batch_size` samples stacked along each input's batch axis. An input without a
        batch axis is fed as it is, so a batch also ends where its value changes (a stream
        whose sample rate alternates is fed one sample at a time)."""
        group: list[Feeds] = []
        for index in range(self.length):
            sample = self.fetch(index)
            if group and (len(group) >= batch_size or not self._same_unbatched(group[0], sample)):
                yield self._stack(group)
                group = []
            group.append(sample)
        if group:
            yield self._stack(group)

    def _same_unbatched(self, a: Feeds, b: Feeds) -> bool:
        return all(np.array_equal(a[name], b[name]) for name, axis in self.batch_axes.items()
                   if axis is None and name in a)

    def _stack(self, samples: list[Feeds]) -> Feeds:
        axes = self.batch_axes
        return {name: samples[0][name] if name in axes and axes[name] is None
                else np.stack([s[name] for s in samples], axis=axes.get(name, 0)) for name in samples[0]}

    def take(self, count: int, start: int = 0) -> CalibrationData:
        """Samples [start, start + count) as a new dataset (e.g. calibration vs evaluation split)."""
        count = max(0, min(count, self.length - start))
        return CalibrationData(count, lambda i: self.fetch(start + i), self.source, self.batch_axes)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "arrays",
                    specs: Sequence[InputSpec] | None = None) -> CalibrationData:
        """Samples from whole arrays. Without `specs`, axis 0 of every array indexes samples.

        With the model's input specs, each input's array is read by its rank (see the README's
        "Calibration data"): one more than the input's, axis 0 indexes feeds given as they are
        (state N x 2 x 1 x 16 for [2, batch, 16], sr N for a scalar sr); the input's own rank, the
        array is in the model's layout with samples along the batch axis (images N x 3 x H x W,
        state 2 x N x 16), or, for an input without a batch axis, one value for every sample.
        Numbers only (bool, integers, floats), and no NaN or infinity in float data.
        """
        try:
            arrays = {k: np.asarray(v) for k, v in arrays.items()}
        except ValueError as exc:  # ragged lists
            raise CalibrationDataError(f"{source}: {shown(str(exc))}") from None
        if not arrays:
            raise CalibrationDataError(f"{source}: no arrays")
        for name, array in arrays.items():
            if specs is None or name in {s.name for s in specs}:
                _check_values(f"{source}: array '{shown(name, 100)}'", array)
        if specs is None:
            lengths = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
            if len(set(lengths.values())) != 1 or 0 in lengths.values():
                raise CalibrationDataError(f"{source}: arrays need the same, non-zero length on axis 0 "
                                           f"(got {shown(lengths)})")
            return cls(next(iter(lengths.values())), lambda i: {k: v[i] for k, v in arrays.items()}, source)

        axes = batch_axes(specs)
        readers = {}
        for spec in specs:
            if spec.name not in arrays:
                raise CalibrationDataError(f"{source}: no array for model input '{shown(spec.name, 100)}'")
            readers[spec.name] = _reader(source, spec, axes[spec.name], arrays[spec.name])
        counts = {name: count for name, (count, _) in readers.items() if count is not None}
        if len(set(counts.values())) > 1 or 0 in counts.values():
            found = ", ".join(f"{name}: {count}" for name, count in counts.items())
            wanted = "; ".join(f"{s.name}: {layouts(s, axes[s.name])}" for s in specs)
            raise CalibrationDataError(f"{source}: the arrays hold different numbers of samples ({shown(found, 300)}); "
                                       f"give {shown(wanted, 600)}")
        length = next(iter(counts.values()), 1)
        return cls(length, lambda i: {name: get(i) for name, (_, get) in readers.items()}, source, axes)

    @classmethod
    def from_npz(cls, path: str | Path, inputs: Sequence[str | InputSpec] | None = None) -> CalibrationData:
        """An .npz whose keys are input names (an `input__` prefix, as in reference I/O files, is
        accepted). Only the members of `inputs` are read (all but `output__*` when None), each
        checked against MAX_DATA_BYTES before it is decompressed. With InputSpecs, arrays are read
        by the layout rule of `from_arrays`; with names, axis 0 indexes samples."""
        path = Path(path)
        keys = npz_keys(path)
        members = {}
        for key in keys:
            name = key.removeprefix("input__")
            if not key.startswith("output__") and (name not in members or key == name):
                members[name] = key  # a plain key wins over its input__ twin
        names = None if inputs is None else [i.name if isinstance(i, InputSpec) else i for i in inputs]
        if names is not None:
            missing = [name for name in names if name not in members]
            if missing:
                raise CalibrationDataError(f"{path} has no array for model input(s) {shown(', '.join(missing))} "
                                           f"(keys: {shown(', '.join(keys) or 'none')})")
            members = {name: members[name] for name in names}
        arrays = read_npz(path, list(members.values()))
        arrays = {name: arrays[key] for name, key in members.items()}
        specs = [i for i in inputs or () if isinstance(i, InputSpec)]
        return cls.from_arrays(arrays, str(path), specs if specs and len(specs) == len(names) else None)

    @classmethod
    def from_images(cls, folder: str | Path, input_name: str, preprocess: ImagePreprocess = ImagePreprocess()) -> CalibrationData:
        """Every image file in `folder` (sorted by name), preprocessed for the single image input.

        Files are decoded when their sample is read; an unreadable one stops the run there
        (CalibrationDataError naming it), rather than every file being decoded up front."""
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
            if folder.is_dir() else []
        if not files:
            raise CalibrationDataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        return cls(len(files), lambda i: {input_name: preprocess(files[i])}, str(folder))

    @classmethod
    def random(cls, specs: Sequence[InputSpec], count: int = 8, seed: int = 0, dynamic_dim: int = 32, *,
               ranges: Mapping[str, tuple[int, int] | list[int]] | None = None) -> CalibrationData:
        """Seeded random samples shaped from the input specs. Good for checking exactness, not
        for calibrating ranges.

        Floats are uniform in [0, 1); integers are drawn from `ranges[name]` ([low, high), or a
        list of values, which a scalar takes in turn, sample after sample), else are 0 or 1 (valid
        ids, masks and indices); bools are random. A dynamic dim takes `dynamic_dim`.

        Samples leave out each input's batch axis (`runtime.batch_axes`: axis 1 of a
        `state [2, B, H]`, none for a scalar such as `sr`), which `batches` stacks. Where the
        model fixes its batch size to B > 1, the count is rounded up to whole batches of B, and
        inputs without a batch axis keep one value per batch (`batches` would split it). When
        every input shape is static, each sample is one whole feed (which axis is the batch is
        then unknown, e.g. after `--fix-shape`, and does not matter).
        """
        static = all(s.shape is not None and all(isinstance(d, int) and d >= 0 for d in s.shape) for s in specs)
        axes = {s.name: None for s in specs} if static else batch_axes(specs)
        group = 1 if static else batch_size_for(specs, 1)  # samples that must share a batch
        count = -(-count // group) * group

        def shape_of(spec: InputSpec) -> tuple[int, ...]:
            if spec.shape is None:
                raise CalibrationDataError(f"cannot make random inputs for input '{shown(spec.name, NAME_LIMIT)}': it is declared "
                                           "without a shape (give data with --calib, or --fix-shape)")
            dims = list(spec.shape)
            if axes[spec.name] is not None:  # the batch axis, which `batches` adds
                del dims[axes[spec.name]]
            # (0 too is a fixed size: an empty dim)
            return tuple(d if isinstance(d, int) and d >= 0 else dynamic_dim for d in dims)

        shapes = {spec.name: shape_of(spec) for spec in specs}
        for spec in specs:  # a hostile or absurd declaration must not allocate terabytes
            fed = [d if isinstance(d, int) and d >= 0 else dynamic_dim for d in spec.shape or ()]
            if math.prod(fed) > MAX_INPUT_ELEMENTS:
                raise CalibrationDataError(
                    f"cannot make test inputs for input '{shown(spec.name)}': shape {shown('x'.join(map(str, fed)))} "
                    f"has {math.prod(fed):.3g} elements (at most {MAX_INPUT_ELEMENTS}); give real inputs or "
                    "smaller static sizes (--fix-shape)")
        ranges = dict(ranges or {})

        def fetch(index: int) -> Feeds:
            sample = {}
            for spec in specs:
                shape = shapes[spec.name]
                # (an input without a batch axis draws per batch, the others per sample)
                draw = index // group if axes[spec.name] is None else index
                rng = np.random.default_rng([seed, draw, len(sample)])
                if spec.dtype.kind == "f":
                    sample[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    sample[spec.name] = rng.random(shape) < 0.5
                elif spec.dtype.kind in "iu":
                    allowed = ranges.get(spec.name, (0, 2))
                    if isinstance(allowed, list):
                        value = allowed[draw % len(allowed)] if not shape else rng.choice(allowed, shape)
                        sample[spec.name] = np.asarray(value).astype(spec.dtype)
                    else:
                        sample[spec.name] = rng.integers(*allowed, shape).astype(spec.dtype)
                else:
                    raise CalibrationDataError(f"cannot generate random data for input '{spec.name}' of type {spec.dtype}")
            return sample

        return cls(count, fetch, f"random(seed={seed})", axes)


def layouts(spec: InputSpec, axis: int | None) -> str:
    """The array shapes that feed input `spec` whose batch axis is `axis` (for messages), e.g.
    'Nx2x1x16 (N feeds as they are) or 2xNx16 (N samples along its batch axis 1)'."""
    if spec.shape is None:
        return "Nx... (axis 0 indexes samples)"
    dims = [str(d) if isinstance(d, int) and d > 0 else "?" for d in spec.shape]
    if axis is None:
        return f"{'x'.join(['N', *dims])} (one value per sample) or {'x'.join(dims) or 'a scalar'} (one for all)"
    feed, own = list(dims), list(dims)
    feed[axis], own[axis] = "1", "N"
    return f"{'x'.join(['N', *feed])} (N feeds as they are) or {'x'.join(own)} (N samples along its batch axis {axis})"


def _reader(source: str, spec: InputSpec, axis: int | None, array: np.ndarray):
    """(number of samples, or None for one value for all; sample index -> sample) for the array
    of one input, by the layout rule of `CalibrationData.from_arrays`."""
    def along(a: np.ndarray, ax: int, i: int) -> np.ndarray:
        return a[(slice(None),) * ax + (i,)]  # a view

    rank = None if spec.shape is None else len(spec.shape)
    if rank is None and array.ndim:  # unknown rank: axis 0 indexes samples
        return array.shape[0], array.__getitem__
    if rank is not None and array.ndim == rank + 1:  # N feeds along axis 0, as they are
        if axis is None:
            return array.shape[0], array.__getitem__
        per_feed = array.shape[axis + 1]  # usually 1; a feed of B samples gives B of them
        return array.shape[0] * per_feed, lambda i: along(array[i // per_feed], axis, i % per_feed)
    if rank is not None and array.ndim == rank:  # the model's own layout
        if axis is None:
            return None, lambda i: array
        return array.shape[axis], lambda i: along(array, axis, i)
    shape = "x".join(map(str, array.shape)) or "scalar"
    name, dims = shown(spec.name, 100), shown(", ".join(map(str, spec.shape or ())), 100)
    raise CalibrationDataError(f"{source}: array '{name}' has shape {shown(shape, 100)}, which does not feed input "
                               f"'{name}' [{dims}]: give {shown(layouts(spec, axis), 200)}")


def _check_dtype(where: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise CalibrationDataError(f"{where} holds {shown(str(dtype), 60)} values; calibration data must be "
                                   "numbers (bool, integer or float)")


def _check_values(where: str, array: np.ndarray) -> None:
    """Numbers only, and no NaN or infinity in float data (they would make every range infinite)."""
    _check_dtype(where, array.dtype)
    if array.dtype.kind != "f":
        return
    flat = array.reshape(-1)
    step = 1 << 24  # bounded temporaries, whatever the array's size
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + step]))) for i in range(0, flat.size, step))
    if bad:
        share = "all of them" if bad == flat.size else f"of {flat.size}"
        raise CalibrationDataError(f"{where} has {bad} NaN or infinite values ({share}); calibration data must be finite")


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an .npz (its members without `.npy`), reading no array."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration file not found: {path}" if not path.exists()
                                   else f"calibration data {path} is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            return [info.filename.removesuffix(".npy") for info in archive.infolist()]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{path} is not a readable .npz file ({shown(str(exc))})") from None


def read_npz(path: str | Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays named `keys` (those present) of an .npz, without reading any other member.

    Each member's .npy header is read first: numbers only, its shape x itemsize must be what the
    zip entry holds, and all the arrays together at most MAX_DATA_BYTES; only then is the member
    decompressed (zipfile stops at the entry's size, so it cannot inflate past what was checked).
    """
    arrays: dict[str, np.ndarray] = {}
    budget = MAX_DATA_BYTES
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for key in (k for k in keys if k in infos):
                arrays[key] = _read_member(archive, infos[key], budget, f"{path}: array '{shown(key, 100)}'")
                budget -= arrays[key].nbytes
    except CalibrationDataError:
        raise
    except MemoryError:
        raise CalibrationDataError(f"{path}: not enough memory to load its arrays") from None
    except (OSError, EOFError, ValueError, SyntaxError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise CalibrationDataError(f"{path} is not a readable .npz file ({type(exc).__name__}: "
                                   f"{shown(str(exc))})") from None
    return arrays


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, where: str) -> np.ndarray:
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        _check_dtype(where, dtype)
        dims = "x".join(map(str, shape)) or "scalar"
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - stream.tell()
        if any(d < 0 for d in shape) or nbytes != held:
            raise CalibrationDataError(f"{where}: its header claims {shown(dims, 80)} {dtype} ({_bytes(nbytes)}) "
                                       f"but the entry holds {_bytes(held)}")
        if nbytes > budget:
            raise CalibrationDataError(f"{where} is {_bytes(nbytes)} ({shown(dims, 80)} {dtype}), more than the "
                                       f"{_bytes(MAX_DATA_BYTES)} calibration data may take on this machine")
        buffer = np.empty(nbytes, np.uint8)
        filled = 0
        while filled < nbytes:
            chunk = stream.read(min(1 << 24, nbytes - filled))
            if not chunk:
                raise CalibrationDataError(f"{where}: the entry ends before its data does")
            buffer[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
            filled += len(chunk)
    return buffer.view(dtype).reshape(shape, order="F" if fortran else "C")


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


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
    # For float32 outputs; other float dtypes scale them with their precision (verify.tolerance).
    rtol: float = 1e-4  # relative to the largest |reference| value of the output
    atol: float = 1e-5
    # Floors for lossy passes (`--min-agreement`, `--min-sqnr`), each vs the model the pass was
    # given: passes with a strength knob search for the strongest setting that holds them, and a
    # lossy pass that ends below one stops the pipeline. None: no floor.
    min_agreement: float | None = None  # top-1 agreement, a fraction
    min_sqnr_db: float | None = None  # worst output
    min_cosine: float | None = None  # worst output

    def __post_init__(self) -> None:
        self.floor()  # checks the floors' values

    def floor(self) -> Floor:
        return Floor(self.min_agreement, self.min_sqnr_db, self.min_cosine)


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

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """A step worth its own line (the floor loop's measurements): a `STAGES` line now."""
        if self.desc:
            STAGES.info("%s: %s", self.desc, text)

    def close(self) -> None:
        if self.desc and not self.done:
            STAGES.info("%s: %d step(s) in %.2fs", self.desc, self.steps, time.perf_counter() - self.start)
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
