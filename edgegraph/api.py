"""The library calls behind `edgegraph opt`: calibration data, pass lists, contexts, `optimize`."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgegraph.checks import flag, input_shapes, whole_number
from edgegraph.context import CalibrationData, ImagePreprocess, PassContext, VerifyConfig
from edgegraph.errors import CalibrationDataError, EdgegraphError, shown
from edgegraph.ir import Model
from edgegraph.modelio import load
from edgegraph.pipeline import Pass, run_pipeline
from edgegraph.targets import Target, load_target


def as_calibration(calib, model: Model, preprocess: ImagePreprocess | Mapping | None = None) -> CalibrationData | None:
    """Accept CalibrationData, an .npz path, a folder of images, or {input name: array}.

    Arrays (an .npz's or a mapping's) are read by the layout rule of `CalibrationData.from_arrays`
    (one array per input: N feeds along axis 0, or the input's own layout with samples along its
    batch axis); an .npz's other members are not read. For an image folder, `preprocess` is an
    ImagePreprocess, or a dict of some of its fields with the rest derived from the model's
    input shape (size, layout, grey or colour). The first sample is checked against the model's
    inputs (rank and fixed dims) before anything runs.
    """
    from edgegraph.runtime import batch_axes, input_specs

    if calib is None:
        return None
    if not isinstance(calib, CalibrationData | Mapping | str | os.PathLike):
        raise CalibrationDataError("calibration data must be a path (.npz or image folder), {input name: array} "
                                   f"or CalibrationData, got {type(calib).__name__}")
    specs = input_specs(model)  # weights-free
    if isinstance(calib, CalibrationData):
        data = calib
    elif isinstance(calib, Mapping):
        data = CalibrationData.from_arrays(calib, specs=specs)
    elif Path(calib).is_dir():
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise EdgegraphError(f"an image folder can only feed a single-input model (inputs: {names})")
        if not isinstance(preprocess, ImagePreprocess):
            preprocess = image_preprocess_for(specs[0], **(preprocess or {}))
        data = CalibrationData.from_images(Path(calib), specs[0].name, preprocess)
    else:
        path = Path(calib)
        if path.is_file() and not zipfile.is_zipfile(path):  # np.load would suggest unpickling it
            raise CalibrationDataError(f"{path} is not an .npz file (give an .npz with one array per model input, "
                                       "or a folder of images)")
        data = CalibrationData.from_npz(path, specs)
    if not data.batch_axes:  # samples lack each input's batch axis (the class's rule): stack along the model's
        data = dataclasses.replace(data, batch_axes=batch_axes(specs))
    check_samples(data, specs)
    return data


def image_preprocess_for(spec, **given) -> ImagePreprocess:
    """ImagePreprocess for an image input: fields in `given` win; size, layout and channels
    default to what the input's fixed shape says, the resize before the centre crop to the
    usual 0.875 crop ratio, and mean/std to ImageNet's (0 and 1 for grey images)."""
    dims = list(spec.shape or ())[1:]
    layout = given.get("layout") or ("NHWC" if len(dims) == 3 and dims[-1] in (1, 3) and dims[0] not in (1, 3)
                                      else "NCHW")
    if layout == "NCHW":
        channel_dim, spatial = (dims[0] if dims else None), dims[1:]
    else:
        channel_dim, spatial = (dims[-1] if dims else None), dims[:-1]
    channels = given.get("channels") or ("L" if channel_dim == 1 else "RGB")
    size = given.get("size")
    if size is None:
        static = len(spatial) == 2 and all(isinstance(d, int) and d > 0 for d in spatial)
        size = tuple(spatial) if static else (224, 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    grey = channels == "L"
    fields = {
        "size": size,
        "resize": given.get("resize", round(min(size) / 0.875)),
        "mean": tuple(given.get("mean") or ((0.0,) if grey else ImagePreprocess.mean)),
        "std": tuple(given.get("std") or ((1.0,) if grey else ImagePreprocess.std)),
        "scale": given.get("scale", ImagePreprocess.scale),
        "layout": layout,
        "channels": channels,
    }
    unknown = set(given) - set(fields)
    if unknown:
        raise EdgegraphError(f"unknown image preprocessing field(s) {', '.join(sorted(unknown))} "
                             f"(fields: {', '.join(fields)})")
    return ImagePreprocess(**fields)


def check_samples(data: CalibrationData, specs) -> None:
    """Fail early, in one sentence, when samples do not fit the model's inputs."""
    from edgegraph.context import layouts
    from edgegraph.runtime import batch_axes

    if len(data) == 0:
        raise CalibrationDataError(f"{data.source}: no samples")
    sample = data.sample(0)
    axes = batch_axes(specs)
    for spec in specs:
        if spec.name not in sample:
            raise CalibrationDataError(f"{data.source}: no array for model input '{shown(spec.name, 100)}'")
        if spec.shape is None:
            continue
        axis = data.batch_axes.get(spec.name, 0)  # how this data's samples lack the batch axis
        wanted = [d for i, d in enumerate(spec.shape) if i != axis]
        got = np.shape(sample[spec.name])
        fits = len(got) == len(wanted) and all(not isinstance(w, int) or w <= 0 or g == w
                                               for g, w in zip(got, wanted))
        if not fits:
            per_sample = "x".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in wanted)
            raise CalibrationDataError(
                f"{data.source}: samples of input '{shown(spec.name, 100)}' have shape "
                f"{shown('x'.join(map(str, got)) or 'scalar', 100)}, the model wants {shown(per_sample or 'scalar', 100)} "
                f"per sample (as arrays: {shown(layouts(spec, axes[spec.name]), 200)})"
            )


def parse_passes(passes: str | os.PathLike | Sequence[str | Mapping | Pass] | Mapping[str, Mapping | None]) -> list[Pass]:
    """A spec string (`"cleanup,quant(method=entropy)"`), a recipe file (.json/.yaml/.yml path),
    a list of what a recipe's `passes` holds (spec strings, {name: {options}}) and Pass objects,
    or a mapping {name: {options}} (in order) -> Pass objects."""
    from edgegraph import spec

    if isinstance(passes, os.PathLike) or (isinstance(passes, str) and passes.endswith((".json", ".yaml", ".yml"))):
        return spec.load_recipe(passes)
    if isinstance(passes, str):
        return spec.parse(passes)
    if isinstance(passes, Mapping):
        items = [{name: options} for name, options in passes.items()]
    elif isinstance(passes, Sequence) and not isinstance(passes, bytes | bytearray):
        items = list(passes)
    else:
        raise EdgegraphError("passes must be a spec string, a recipe path, a list or a {name: options} mapping, "
                             f"got {type(passes).__name__}")
    if not items:
        raise EdgegraphError("no passes given")
    return spec.from_items(items, "passes")


def make_context(model: Model, *, calib=None, target: str | Target = "cpu", seed: int = 0, verify: bool = True,
                 progress: bool = False, threads: int = 0, timing: bool = True,
                 preprocess: ImagePreprocess | Mapping | None = None,
                 fix_shapes: Mapping[str, Sequence[int]] | None = None, min_agreement: float | None = None,
                 min_sqnr: float | None = None) -> PassContext:
    """The PassContext for running passes on `model` (calibration data checked against it).

    `timing=False` tells passes to take no latency measurements of their own (`--runs 0`);
    `fix_shapes`: the input shapes already fixed in `model`, for advice in error messages;
    `min_agreement` / `min_sqnr`: the accuracy floors of lossy passes (`VerifyConfig`).
    """
    seed, threads = whole_number(seed, "seed"), whole_number(threads, "threads")
    verify, progress, timing = flag(verify, "verify"), flag(progress, "progress"), flag(timing, "timing")
    if preprocess is not None and not isinstance(preprocess, ImagePreprocess | Mapping):
        raise EdgegraphError(f"preprocess must be an ImagePreprocess or a mapping of its fields, "
                             f"got {type(preprocess).__name__}")
    return PassContext(calibration=as_calibration(calib, model, preprocess),
                       target=target if isinstance(target, Target) else load_target(target), seed=seed,
                       verify=VerifyConfig(enabled=verify, min_agreement=min_agreement, min_sqnr_db=min_sqnr),
                       progress=progress, threads=threads, timing=timing,
                       fixed_shapes=dict(fix_shapes or {}))


def optimize(model, passes: str | os.PathLike | Sequence[str | Mapping | Pass] | Mapping[str, Mapping | None], *,
             calib=None, target: str | Target = "cpu", seed: int = 0, verify: bool = True, progress: bool = False,
             threads: int = 0, timing: bool = True, fix_shapes: Mapping[str, Sequence[int]] | None = None,
             preprocess: ImagePreprocess | Mapping | None = None, min_agreement: float | None = None,
             min_sqnr: float | None = None) -> onnx.ModelProto:
    """Run a pass pipeline on `model` (path, bytes, ModelProto or Model) and return the new ModelProto.

    `passes` is a spec string (`"cleanup,quant(method=entropy)"`), a recipe file, a list of
    names/{name: options}/Pass objects, or a mapping {name: options}. `fix_shapes` ({input:
    dims}) makes dynamic inputs static first. `min_agreement` (top-1 agreement) and `min_sqnr`
    (worst-output dB) are floors for the lossy passes (`--min-agreement`, `--min-sqnr`): passes
    with a strength knob take the strongest setting that holds them (FloorNotHeld when none
    does), and a lossy pass that ends below one raises FloorViolation. This is what `edgegraph opt` runs. The input is
    never modified. Arguments of the wrong type or value raise EdgegraphError.
    """
    from edgegraph.pipeline import specialise

    if not isinstance(model, str | os.PathLike | bytes | bytearray | onnx.ModelProto | Model):
        raise EdgegraphError(f"model must be a path, bytes, an onnx.ModelProto or an edgegraph Model, "
                             f"got {type(model).__name__}")
    shapes = input_shapes(fix_shapes) if fix_shapes is not None else {}
    pipeline = parse_passes(passes)
    loaded = load(model)
    fixed = specialise(loaded, shapes)
    ctx = make_context(fixed, calib=calib, target=target, seed=seed, verify=verify, progress=progress,
                       threads=threads, timing=timing, preprocess=preprocess, fix_shapes=shapes,
                       min_agreement=min_agreement, min_sqnr=min_sqnr)
    result, _ = run_pipeline(fixed, pipeline, ctx, unspecialised=loaded if shapes else None)
    return result.to_proto()


def check(model, target: str | Target = "all", *, fix_shapes: Mapping[str, Sequence[int]] | None = None,
          optimize: bool | None = None, rules: bool = True):
    """Which nodes of `model` (a path or a Model) each target runs: a list of
    `edgegraph.targets.check.CheckResult`, one per target ("all": every profile).

    `fix_shapes` makes dynamic inputs static first (`--fix-shape`); `optimize`: check the graph
    onnxruntime's basic optimisations make (default: for onnxruntime execution providers, which
    are given that graph); `rules=False` checks only what onnxruntime's usability checker does.
    """
    from edgegraph.pipeline import specialise
    from edgegraph.targets import check as target_check

    loaded = model if isinstance(model, Model) else load(model)
    loaded = specialise(loaded, dict(fix_shapes)) if fix_shapes else loaded
    if isinstance(target, str) and target == "all":
        return target_check.check_all(loaded, optimize=optimize, rules=rules)
    return [target_check.check(loaded, target, optimize=optimize, rules=rules)]


def merge_models(models: Sequence, *, names: Sequence[str] | None = None,
                 input_map: Mapping[str, str] | None = None, tolerance: float = 0.0, average: bool = False,
                 calib=None, min_sqnr: float | None = None, seed: int = 0,
                 threads: int = 1) -> tuple[onnx.ModelProto, dict]:
    """Merge task models that share a backbone into one ModelProto computing it once, and a report
    (what each task shares and owns, the check of each task's outputs). What `edgegraph merge` runs.

    `models`: paths, bytes, ModelProtos or Models; `names`: task names (default the file stems),
    the prefix of each task's outputs (`det/boxes`); `input_map`: {"b:images": "a:data"} feeds
    task b's input `images` from task a's `data` (inputs with equal name, dtype and shape are one
    anyway); `tolerance`: weights within it (relative) count as equal, the first model's kept or,
    with `average`, their mean; each task's outputs must then keep `min_sqnr` dB (default 40)
    against its own model on `calib` (data for the merged inputs) or seeded random inputs.
    Raises EdgegraphError (MergeError) for models that cannot be merged as asked.
    """
    from edgegraph.merge import DEFAULT_MIN_SQNR_DB, merge, parse_input_map

    if not isinstance(models, Sequence) or isinstance(models, str | bytes):
        raise EdgegraphError(f"models must be a list of models, got {type(models).__name__}")
    result = merge(list(models), names=names, input_map=parse_input_map(input_map or {}), tolerance=tolerance,
                   average=flag(average, "average"), calib=calib,
                   min_sqnr=DEFAULT_MIN_SQNR_DB if min_sqnr is None else min_sqnr,
                   seed=whole_number(seed, "seed"), threads=whole_number(threads, "threads"))
    return result.model.to_proto(), result.report
