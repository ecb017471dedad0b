"""The library calls behind `edgegraph opt`: calibration data, pass lists, contexts, `optimize`."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgegraph.context import CalibrationData, ImagePreprocess, PassContext, VerifyConfig
from edgegraph.errors import CalibrationDataError, EdgegraphError
from edgegraph.ir import Model, load
from edgegraph.pipeline import Pass, run_pipeline
from edgegraph.targets import load_target


def as_calibration(calib, model: Model, preprocess: ImagePreprocess | Mapping | None = None) -> CalibrationData | None:
    """Accept CalibrationData, an .npz path, a folder of images, or {input name: array}.

    For an image folder, `preprocess` is an ImagePreprocess, or a dict of some of its fields
    with the rest derived from the model's input shape (size, layout, grey or colour). Every
    sample is checked against the model's inputs (rank and fixed dims) before anything runs.
    """
    from edgegraph.runtime import input_specs

    if calib is None:
        return None
    specs = input_specs(model)  # weights-free
    if isinstance(calib, CalibrationData):
        data = calib
    elif isinstance(calib, Mapping):
        data = CalibrationData.from_arrays({k: np.asarray(v) for k, v in calib.items()})
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
        data = CalibrationData.from_npz(path, [s.name for s in specs])
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
    sample = data.sample(0)
    for spec in specs:
        if spec.name not in sample:
            raise CalibrationDataError(f"{data.source}: no array for model input '{spec.name}'")
        if spec.shape is None:
            continue
        got, wanted = np.shape(sample[spec.name]), spec.shape[1:]  # axis 0 is the batch axis
        fits = len(got) == len(wanted) and all(not isinstance(w, int) or w <= 0 or g == w
                                               for g, w in zip(got, wanted))
        if not fits:
            shown = "x".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in wanted)
            raise CalibrationDataError(
                f"{data.source}: samples of input '{spec.name}' have shape {'x'.join(map(str, got)) or 'scalar'}, "
                f"the model wants {shown or 'scalar'} per sample (axis 0 of the arrays indexes samples)"
            )


def parse_passes(passes: str | Path | Sequence[str | Pass]) -> list[Pass]:
    """A spec string (`"cleanup,quant(method=entropy)"`), a recipe file (.json/.yaml/.yml path),
    or a list of spec strings and Pass objects -> Pass objects."""
    from edgegraph import spec

    if isinstance(passes, Path) or (isinstance(passes, str) and passes.endswith((".json", ".yaml", ".yml"))):
        return spec.load_recipe(passes)
    if isinstance(passes, str):
        return spec.parse(passes)
    return [q for p in passes for q in ([p] if isinstance(p, Pass) else spec.parse(p))]


def make_context(model: Model, *, calib=None, target: str = "cpu", seed: int = 0, verify: bool = True,
                 progress: bool = False, threads: int = 0,
                 preprocess: ImagePreprocess | Mapping | None = None,
                 fix_shapes: Mapping[str, Sequence[int]] | None = None) -> PassContext:
    """The PassContext for running passes on `model` (calibration data checked against it);
    `fix_shapes`: the input shapes already fixed in `model`, for advice in error messages."""
    return PassContext(calibration=as_calibration(calib, model, preprocess), target=load_target(target), seed=seed,
                       verify=VerifyConfig(enabled=verify), progress=progress, threads=threads,
                       fixed_shapes=dict(fix_shapes or {}))


def optimize(model, passes: str | Path | Sequence[str | Pass], *, calib=None, target: str = "cpu", seed: int = 0,
             verify: bool = True, progress: bool = False, threads: int = 0,
             fix_shapes: Mapping[str, Sequence[int]] | None = None,
             preprocess: ImagePreprocess | Mapping | None = None) -> onnx.ModelProto:
    """Run a pass pipeline on `model` (path, bytes, ModelProto or Model) and return the new ModelProto.

    `passes` is a spec string (`"cleanup,quant(method=entropy)"`), a recipe file, or a list of
    names/Pass objects. `fix_shapes` ({input: dims}) makes dynamic inputs static first. This is
    what `edgegraph opt` runs. The input is never modified.
    """
    from edgegraph.pipeline import specialise

    pipeline = parse_passes(passes)
    loaded = load(model)
    fixed = specialise(loaded, fix_shapes)
    ctx = make_context(fixed, calib=calib, target=target, seed=seed, verify=verify, progress=progress,
                       threads=threads, preprocess=preprocess, fix_shapes=fix_shapes)
    result, _ = run_pipeline(fixed, pipeline, ctx, unspecialised=loaded if fix_shapes else None)
    return result.to_proto()
