"""edgegraph.analysis.capture: Gram matrices, moments and histograms against dense numpy, and
memory that does not grow with the number of samples."""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
from conftest import MODELS, require_shared
from onnx import TensorProto, helper, numpy_helper

from edgegraph import runtime
from edgegraph.analysis import capture

RNG = np.random.default_rng(7)


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv_model(c, o, kernel, group=1, opset=13, **attrs):
    w = RNG.standard_normal((o, c // group, *kernel)).astype(np.float32)
    b = RNG.standard_normal(o).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, **attrs)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 9, 11])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    return _model([node, relu], [x], [z], {"w": w, "b": b}, opset), w


def _batches(shape, count, scale=1.0, offset=0.0):
    return [{"x": (RNG.standard_normal(shape) * scale + offset).astype(np.float32)} for _ in range(count)]


def _values(model, name, batches):
    """A tensor's values as a probe sees them (ORT optimisations on: the same kernels)."""
    probe = capture.Probe(model)
    probe.output(name)
    return np.concatenate([out[name] for out in probe.run(batches)]).astype(np.float64)


def _im2col(x, kernel, strides, pads, dilations):
    """Rows of patches of an NCHW input, feature c*K + k (the order of W.reshape(O, -1))."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    oh = (padded.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (padded.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, c, kh, kw, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            r, s = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = padded[:, :, r:r + strides[0] * oh:strides[0], s:s + strides[1] * ow:strides[1]]
    return cols.reshape(n, c * kh * kw, oh * ow).transpose(0, 2, 1).reshape(-1, c * kh * kw)


CONVS = {
    "1x1": dict(c=6, o=5, kernel=(1, 1)),
    "1x1 strided": dict(c=6, o=5, kernel=(1, 1), strides=[2, 2]),
    "3x3 padded": dict(c=4, o=7, kernel=(3, 3), pads=[1, 1, 1, 1]),
    "3x2 strided dilated": dict(c=3, o=4, kernel=(3, 2), strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 0]),
    "3x3 grouped": dict(c=6, o=4, kernel=(3, 3), group=2, pads=[1, 1, 1, 1]),
    "3x3 opset 11": dict(c=4, o=3, kernel=(3, 3), opset=11),
}


@pytest.mark.parametrize("case", CONVS, ids=list(CONVS))
def test_conv_gram_equals_dense_im2col(case):
    spec = dict(CONVS[case])
    c, o, kernel, group = spec.pop("c"), spec.pop("o"), spec.pop("kernel"), spec.get("group", 1)
    model, w = _conv_model(c, o, kernel, **spec)
    batches = _batches((2, c, 9, 11), 3)
    gram = capture.grams(model, ["conv"], batches, targets={"conv": "y"})["conv"]
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    strides, dilations = spec.get("strides", [1, 1]), spec.get("dilations", [1, 1])
    cols = _im2col(x, kernel, strides, spec.get("pads", [0, 0, 0, 0]), dilations)
    y = _values(model, "y", batches).transpose(0, 2, 3, 1).reshape(-1, o)
    assert gram.rows == cols.shape[0]
    per = cols.shape[1] // group
    for g in range(group):
        xg = cols[:, g * per:(g + 1) * per]
        yg = y[:, g * (o // group):(g + 1) * (o // group)]
        got_xtx, got_xty, got_sums = ((gram.xtx, gram.xty, gram.sums) if group == 1
                                      else (gram.xtx[g], gram.xty[g], gram.sums[g]))
        np.testing.assert_allclose(got_xtx, xg.T @ xg, rtol=1e-12, atol=1e-9)  # the patch copy is exact
        np.testing.assert_allclose(got_sums, xg.sum(axis=0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got_xty, xg.T @ yg, rtol=1e-12, atol=1e-9)
    # The Gram is what least squares needs: the layer's weights solve the normal equations.
    if group == 1:
        design = np.hstack([cols, np.ones((cols.shape[0], 1))])
        normal = np.block([[gram.xtx, gram.sums[:, None]], [gram.sums[None, :], np.array([[gram.rows]])]])
        rhs = np.vstack([gram.xty, y.sum(axis=0)[None, :]])
        solved = np.linalg.solve(normal, rhs)
        np.testing.assert_allclose(solved[:-1].T, w.reshape(o, -1), atol=1e-4)
        assert design.shape[0] == gram.rows


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_gram_equals_dense(trans_a, trans_b):
    k, n = 6, 4
    b = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "b"], ["y"], name="gemm", transA=trans_a, transB=trans_b)
    shape = ["m", k] if not trans_a else [k, "m"]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    model = _model([node], [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"b": b})
    batches = [{"x": RNG.standard_normal((k, 5) if trans_a else (5, k)).astype(np.float32)} for _ in range(4)]
    gram = capture.grams(model, ["gemm"], batches, targets={"gemm": "y"})["gemm"]
    x = np.concatenate([(v["x"].T if trans_a else v["x"]).astype(np.float64) for v in batches])
    y = x @ (b.T if trans_b else b).astype(np.float64)
    assert gram.rows == 20
    np.testing.assert_allclose(gram.xtx, x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(gram.sums, x.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(gram.xty, x.T @ y, rtol=1e-5, atol=1e-5)


def test_matmul_gram_equals_dense_over_leading_axes():
    k, n = 5, 3
    w = RNG.standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])
    model = _model([node], [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"w": w})
    batches = [{"x": RNG.standard_normal((2, 7, k)).astype(np.float32)} for _ in range(3)]
    gram = capture.grams(model, ["mm"], batches, targets={"mm": "y"})["mm"]
    x = np.concatenate([v["x"].reshape(-1, k) for v in batches]).astype(np.float64)
    assert gram.rows == 42
    np.testing.assert_allclose(gram.xtx, x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(gram.xty, x.T @ (x @ w.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_gram_of_an_unsupported_node_is_refused():
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], {})
    with pytest.raises(ValueError, match="no Gram matrix for Relu"):
        capture.Probe(model).gram("relu")


def test_moments_equal_numpy_per_channel():
    model, _ = _conv_model(4, 6, (3, 3), pads=[1, 1, 1, 1])
    batches = _batches((3, 4, 9, 11), 4, scale=2.0, offset=0.5)
    found = capture.moments(model, {"y": 1, "x": 1}, batches)
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    y = _values(model, "y", batches)
    for name, value in (("x", x), ("y", y)):
        per_channel = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
        np.testing.assert_array_equal(found[name].count, per_channel.shape[1])
        np.testing.assert_allclose(found[name].mean, per_channel.mean(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(found[name].variance, per_channel.var(axis=1), rtol=1e-9)


def test_sampled_channel_moments_equal_numpy():
    values = RNG.standard_normal((2, 3, 4, 5)) * np.array([1.0, 3.0, 0.5])[None, :, None, None]
    moments = capture.ChannelMoments(3)
    ids = capture.ChannelMoments.channel_ids(values.shape, np.arange(values.size))
    moments.update(values.ravel(), ids)
    per_channel = np.moveaxis(values, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(moments.mean, per_channel.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.variance, per_channel.var(axis=1), rtol=1e-12)


def test_histograms_equal_numpy():
    """Values at bin centres of the finest grid (never near an edge), in batches whose growing range
    makes the histogram merge bins twice: the counts equal numpy's over the final edges."""
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 500])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {})
    width = 1.0 / capture.BINS
    batches = []
    for limit in (1.0, 3.0, 7.5):
        bins = RNG.integers(-int(limit * capture.BINS), int(limit * capture.BINS), size=(2, 500))
        x = ((bins + 0.5) * width).astype(np.float32)
        x[0, 0] = -1.0  # the first batch sets the range to exactly [-1, 1] (-1 is a left edge, as in numpy)
        batches.append({"x": x})
    stats = capture.histograms(model, ["y"], batches)["y"]
    everything = np.concatenate([b["x"].ravel() for b in batches]).astype(np.float64)
    assert stats.limit == 8.0
    assert (stats.min, stats.max, stats.count) == (everything.min(), everything.max(), everything.size)
    expected, _ = np.histogram(everything, bins=stats.edges())
    np.testing.assert_array_equal(stats.hist, expected)


def test_probe_leaves_the_model_outputs_unchanged():
    model, _ = _conv_model(4, 6, (3, 3), pads=[1, 1, 1, 1])
    batches = _batches((2, 4, 9, 11), 1)
    probe = capture.Probe(model)
    probe.gram("conv", "y")
    probe.channel_moments("y", 4)
    expected = runtime.outputs(model, batches, optimize=False)[0]["z"]
    sess = runtime.session(probe.model)
    np.testing.assert_array_equal(runtime.run(sess, batches[0], ["z"])["z"], expected)


# ---------------------------------------------------------------------------------------------
# Memory on a real model


DEEPLAB = MODELS / "deeplabv3_mobilenetv2_tf2onnx/deeplab_v3_1_default_1.onnx"


def _deeplab_layers(proto):
    """The biggest layers of each kind: the widest 1x1 Conv, a strided 3x3 Conv and a depthwise Conv."""
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    convs = [(n.name, weights[n.input[1]], {a.name: helper.get_attribute_value(a) for a in n.attribute})
             for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    pointwise = max((c for c in convs if c[1][2:] == (1, 1)), key=lambda c: c[1][1])
    full = next(c for c in convs if c[1][2:] == (3, 3) and c[2].get("group", 1) == 1)
    depthwise = max((c for c in convs if c[2].get("group", 1) > 1), key=lambda c: c[1][0])
    return [pointwise[0], full[0], depthwise[0]]


def _capture_peak(proto, layers, samples):
    batches = ({"sub_7": (RNG.standard_normal((1, 257, 257, 3)) * 0.5).astype(np.float32)} for _ in range(samples))
    gc.collect()
    tracemalloc.start()
    try:
        grams = capture.grams(proto, layers, batches)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, grams


def test_memory_stays_bounded_on_deeplab():
    """Host memory (numpy arrays and Python objects: what tracemalloc sees; ORT's arena is per run)
    of Gram capture on three DeepLab layers (the widest 1x1 Conv, the stem's strided 3x3, a
    depthwise 3x3) is the same for 4 and 32 samples: about 8.2 MB measured, a fraction of the
    design matrices (rows x features) that 32 samples make."""
    proto = onnx.load(require_shared(DEEPLAB))
    layers = _deeplab_layers(proto)
    few, _ = _capture_peak(proto, layers, 4)
    many, grams = _capture_peak(proto, layers, 32)
    assert many <= few * 1.02 + 64 * 1024, (few, many)
    assert many < 10 * 2**20, many
    dense = sum(g.rows * g.xtx.shape[-1] * (g.xtx.shape[0] if g.xtx.ndim == 3 else 1) * 8 for g in grams.values())
    assert dense > 40 * many, (dense, many)
    assert grams[layers[0]].rows == 32 * 33 * 33  # 1x1 Conv at output stride 8
    assert grams[layers[0]].xtx.shape == (512, 512) and grams[layers[2]].xtx.shape == (480, 9, 9)


RSS_SCRIPT = """
import sys
import numpy as np, onnx
from edgegraph.analysis import capture


def peak():  # VmHWM: this process's peak RSS since exec (ru_maxrss would include the parent's, inherited)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


proto = onnx.load(sys.argv[1])
layers = sys.argv[2].split(",")
rng = np.random.default_rng(0)
for samples in (4, 32):
    batches = ({"sub_7": (rng.standard_normal((1, 257, 257, 3)) * 0.5).astype(np.float32)} for _ in range(samples))
    capture.grams(proto, layers, batches, threads=1)  # one compute thread: no malloc arenas made by contention
    print(peak())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_process_peak_memory_does_not_grow_with_samples_on_deeplab():
    """The whole process (onnxruntime's arena included): the peak after 4 samples and after 32 more
    is the same, about 210 MB measured, where the dense design matrices of 32 samples are 1.4 GB."""
    proto = onnx.load(require_shared(DEEPLAB))
    layers = _deeplab_layers(proto)
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(DEEPLAB), ",".join(layers)],
                         capture_output=True, text=True, timeout=300, check=True)
    few, many = (int(line) for line in run.stdout.split())
    assert many - few < 4 * 2**20, (few, many)
    assert many < 240 * 2**20, many


def test_gram_on_deeplab_equals_dense():
    """The same numbers as numpy on a real model's streamed activations (2 samples)."""
    proto = onnx.load(require_shared(DEEPLAB))
    layer = _deeplab_layers(proto)[0]
    node = next(n for n in proto.graph.node if n.name == layer)
    batches = [{"sub_7": (RNG.standard_normal((1, 257, 257, 3)) * 0.5).astype(np.float32)} for _ in range(2)]
    gram = capture.grams(proto, [layer], batches)[layer]
    x = _values(proto, node.input[0], batches)
    rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    np.testing.assert_allclose(gram.xtx, rows.T @ rows, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(gram.sums, rows.sum(axis=0), rtol=1e-12, atol=1e-9)
