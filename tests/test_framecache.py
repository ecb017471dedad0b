"""frame-cache: a model made stateful reuses its backbone's features while the frame barely changes.

Run as an application runs it: frame after frame in onnxruntime, the state outputs fed back, the
first frame with empty states."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgegraph
from clihelp import assert_refused
from edgegraph.errors import PassFailure
from edgegraph.passbase import PassResult
from edgegraph.pipeline import run_pipeline
from conftest import DATA, DEFAULT_DIR, MODELS, require_shared
from edgegraph import runtime
from edgegraph.passes.framecache import FrameCache

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"
CIFAR = MODELS / "cifar10_cnn_pytorch_tutorial" / "ImageClassifier.onnx"


def stream(model: onnx.ModelProto, frames, frame_input: str):
    """Run `model` over `frames`, feeding its state back: [(outputs, reused)], first frame empty."""
    onnx.checker.check_model(model, full_check=True)
    sess = runtime.session(model)
    specs = {i.name: i for i in model.graph.input}
    state = {}
    for name in ("cached_features", "cached_summary"):
        dims = [d.dim_value for d in specs[name].type.tensor_type.shape.dim[1:]]
        state[name] = np.zeros([0, *[d or 1 for d in dims]], np.float32)
    results = []
    for frame in frames:
        out = runtime.run(sess, {frame_input: frame, **state})
        state = {"cached_features": out["next_features"], "cached_summary": out["next_summary"]}
        results.append((out, bool(out["reused"])))
    return results


def digit_frames(count: int = 6, noise: float = 0.02, cut_at: int | None = None) -> list[np.ndarray]:
    """A held-out digit with small noise per frame; from `cut_at` on another digit (a scene cut)."""
    images = np.load(DEFAULT_DIR / "digits_eval.npz")["input"]
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        base = images[1 if cut_at is not None and i >= cut_at else 0:][:1]
        frames.append((base + noise * rng.standard_normal(base.shape)).astype(np.float32))
    return frames


def original(path, frames, name):
    sess = runtime.session(onnx.load(path))
    return [runtime.run(sess, {name: f}) for f in frames]


def test_threshold_zero_is_the_original_on_every_frame():
    frames = digit_frames(cut_at=3)
    model = edgegraph.optimize(DIGITS, "frame-cache(threshold=0)")
    want = original(DIGITS, frames, "input")
    for (got, reused), expected in zip(stream(model, frames, "input"), want):
        assert not reused
        np.testing.assert_array_equal(got["logits"], expected["logits"])


def test_threshold_inf_keeps_the_first_frames_features():
    frames = digit_frames(cut_at=3)
    model = edgegraph.optimize(DIGITS, "frame-cache(threshold=inf, at=/concat/Concat_output_0)")
    results = stream(model, frames, "input")
    assert [r for _, r in results] == [False] + [True] * (len(frames) - 1)
    first = results[0][0]
    want = original(DIGITS, frames[:1], "input")[0]
    np.testing.assert_array_equal(first["logits"], want["logits"])
    # The cached features are the first frame's, bitwise, and so is everything the head makes of them.
    probe = runtime.with_outputs(onnx.load(DIGITS), ["/concat/Concat_output_0"])
    features = runtime.run(runtime.session(probe), {"input": frames[0]})["/concat/Concat_output_0"]
    for out, _ in results:
        np.testing.assert_array_equal(out["next_features"], features)
        np.testing.assert_array_equal(out["logits"], first["logits"])


def test_a_threshold_reuses_on_small_changes_and_recomputes_on_a_cut():
    frames = digit_frames(count=6, noise=0.01, cut_at=3)
    model = edgegraph.optimize(DIGITS, "frame-cache(threshold=0.05)")
    results = stream(model, frames, "input")
    assert [r for _, r in results] == [False, True, True, False, True, True]
    want = original(DIGITS, frames, "input")
    for i in (0, 3):  # recomputed frames are the original's
        np.testing.assert_array_equal(results[i][0]["logits"], want[i]["logits"])
    agree = np.mean([np.argmax(o["logits"]) == np.argmax(w["logits"]) for (o, _), w in zip(results, want)])
    assert agree == 1.0


def test_auto_cuts_where_the_most_macs_are_saved_and_keeps_the_head():
    model = edgegraph.load(DIGITS)
    result = FrameCache().run(model)
    assert result.stats["at"] == "/flatten/Flatten_output_0"  # everything but the final Gemm
    # What is not cached is the Gemm's 128 x 10 MACs (the default digits CNN: 7.55M MACs).
    assert result.stats["cached_macs"] == 7553024 and result.stats["total_macs"] == 7553024 + 128 * 10
    head = [n.op for n in model.graph.nodes if n.op not in ("AveragePool", "Size", "Greater", "If")]
    assert head == ["Gemm"]
    assert set(result.new_inputs) == {"cached_features", "cached_summary"}


def test_the_pipeline_verifies_it_and_cleanup_after_it_keeps_the_cache(tmp_path):
    calib = DEFAULT_DIR / "digits_calib.npz"
    model = edgegraph.optimize(DIGITS, "frame-cache(at=/concat/Concat_output_0),cleanup", calib=calib)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("If") == 2
    frames = digit_frames(cut_at=3)
    want = original(DIGITS, frames, "input")
    got = stream(model, frames, "input")
    np.testing.assert_allclose(got[0][0]["logits"], want[0]["logits"], rtol=1e-5, atol=1e-5)


def test_real_images_with_camera_noise():
    """CIFAR images, 32x32, with sensor noise and a scene cut: the change measure tells them apart."""
    images = np.load(require_shared(DATA / "cifar10_test_subset" / "cifar10_test_500.npz"))["images"][:2]
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    rng = np.random.default_rng(1)
    frames = [(x[0 if i < 4 else 1][None] + 0.02 * rng.standard_normal((1, 3, 32, 32))).astype(np.float32)
              for i in range(7)]
    model = edgegraph.optimize(require_shared(CIFAR), "frame-cache(threshold=0.05)")
    results = stream(model, frames, "modelInput")
    assert [r for _, r in results] == [False, True, True, True, False, True, True]
    want = original(CIFAR, frames, "modelInput")
    for i in (0, 4):
        np.testing.assert_array_equal(results[i][0]["modelOutput"], want[i]["modelOutput"])


def test_a_cut_the_head_reaches_past_is_refused(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    # The residual Add after the cut also reads the second stem's output, computed before it.
    assert_refused(capsys, tmp_path, ["opt", DIGITS, "-p", "frame-cache(at=/block/pw/bn/BatchNormalization_output_0)",
                                      "-o", out], "also reads '/stem2/relu/Relu_output_0'")
    assert_refused(capsys, tmp_path, ["opt", DIGITS, "-p", "frame-cache(at=nothing)", "-o", out],
                   "at='nothing' is not a tensor")
    assert_refused(capsys, tmp_path, ["opt", DIGITS, "-p", "frame-cache(threshold=-1)", "-o", out],
                   "threshold must be >= 0")


@pytest.mark.parametrize("threshold", [0.0, 0.05, float("inf")])
def test_it_is_deterministic(threshold):
    spec = f"frame-cache(threshold={threshold})"
    assert edgegraph.optimize(DIGITS, spec).SerializeToString() == edgegraph.optimize(DIGITS, spec).SerializeToString()


def test_a_pass_that_extends_the_interface_may_only_add_to_it():
    """The contract frame-cache relies on: `extends_interface` lets a pass add inputs and outputs
    after the existing ones, nothing else."""

    class Renames(FrameCache):  # (a FrameCache subclass only to inherit the declaration)
        name = "test-renames-input"

        def run(self, model, ctx=None):
            model.graph.inputs[0].name = "renamed"
            return PassResult(modified=True)

    from edgegraph.context import PassContext, VerifyConfig

    ctx = PassContext(progress=False, verify=VerifyConfig(enabled=False))
    with pytest.raises(PassFailure, match="removed graph input"):
        run_pipeline(edgegraph.load(DIGITS), [Renames()], ctx)
    model, report = run_pipeline(edgegraph.load(DIGITS), [FrameCache()], ctx)
    assert [t.name for t in model.graph.inputs] == ["input", "cached_features", "cached_summary"]
    assert [t.name for t in model.graph.outputs] == ["logits", "next_features", "next_summary", "reused"]
