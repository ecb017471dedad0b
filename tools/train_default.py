"""Train the bundled default model: a small CNN on rendered digits, written as ONNX.

    /work/.venv/bin/python tools/train_default.py            # writes fixtures/default/
    /work/.venv/bin/python tools/train_default.py --out DIR  # somewhere else

Training is plain numpy (float64, seeded; no torch) on digits 0-9 drawn with the font Pillow (an
edgegraph dependency) bundles: random size, position, slant, stroke width and noise, 16x16 grey,
so nothing is downloaded and no other package is needed. The network is small (< 1 MB)
but built to exercise the passes the way real exporter output does, and to have enough
arithmetic per node (about 7.6 M multiply-adds) that int8 kernels beat float32 on a CPU: a model
whose nodes each take a microsecond measures onnxruntime's per-node overhead, and there the
Quantize/Dequantize steps int8 adds make it slower (the 8x8 digits CNN this replaces came out
1.36x slower after `cleanup,quant`).

    input [batch,1,16,16] (white digit on black, 0..1)
    stem   Conv3x3(1->32, bias) BN Relu, Conv3x3(32->32) BN Relu
    block  depthwise Conv3x3(32, group=32) BN Relu, Conv1x1(32->32) BN, Add(stem) Relu (residual)
    MaxPool 2x2                                                               -> [batch,32,8,8]
    branch Conv1x1(32->32) BN Relu  |  Conv3x3(32->64) BN Relu, Concat         -> [batch,96,8,8]
    head   Conv3x3(96->128, group=2) BN Relu, GlobalAveragePool, Flatten, Gemm(128->10) -> logits

BatchNorm stays a separate node (not folded into the Conv) so that fusion passes have work to
do. The graph is opset 17 with a dynamic batch dimension. The script checks that onnxruntime
reproduces the numpy forward pass, then writes:

    digits_cnn.onnx     the model (input `input`, output `logits`)
    digits_calib.npz    `input`: 64 training samples (calibration data)
    digits_eval.npz     `input`, `labels`: the held-out samples (never trained on)

and prints the held-out accuracy of the ONNX model: 0.9980 (499/500) with seed 0, in about a
minute of CPU time. The same versions of numpy and Pillow give byte-identical files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# One BLAS thread: the products here are small, and BLAS threads spinning on them cost 6x the CPU
# time (and make no difference to the result's bytes).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SEED = 0
EPOCHS = 12
SIZE = 16  # input height and width
TRAIN_SAMPLES, EVAL_SAMPLES = 1200, 500
BATCH = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
BN_EPS = 1e-5
CALIB_SAMPLES = 64
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "default"


# ---------------------------------------------------------------------------------------------
# Layers: `params` holds the trainable arrays, `grads` their gradients after `backward`.


class Conv:
    """2-D convolution, stride 1, 'same' padding, optional groups and bias (NCHW)."""

    def __init__(self, rng, name, cin, cout, k, groups=1, bias=False):
        self.name, self.groups, self.k = name, groups, k
        fan_in = cin // groups * k * k
        self.params = {"weight": rng.normal(0, np.sqrt(2 / fan_in), (cout, cin // groups, k, k))}
        if bias:
            self.params["bias"] = np.zeros(cout)
        self.grads = {}

    def _windows(self, x):
        pad = self.k // 2
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        n, c, h, w = x.shape
        windows = np.lib.stride_tricks.sliding_window_view(padded, (self.k, self.k), axis=(2, 3))  # n c h w k k
        return windows.reshape(n, self.groups, c // self.groups, h, w, self.k, self.k)

    def _grouped_weight(self):
        weight = self.params["weight"]
        return weight.reshape(self.groups, weight.shape[0] // self.groups, *weight.shape[1:])

    def forward(self, x):
        # im2col: one matrix product per group (BLAS), columns kept for the backward pass.
        self.x = x
        n, c, h, w = x.shape
        cols = self._windows(x).transpose(1, 0, 3, 4, 2, 5, 6)  # g n h w c/g k k
        self.cols = cols.reshape(self.groups, n * h * w, -1)
        weight = self._grouped_weight().reshape(self.groups, -1, self.cols.shape[-1])  # g o/g (c/g k k)
        y = np.matmul(self.cols, weight.transpose(0, 2, 1))  # g (n h w) o/g
        y = y.reshape(self.groups, n, h, w, -1).transpose(1, 0, 4, 2, 3).reshape(n, -1, h, w)
        return y + self.params["bias"][None, :, None, None] if "bias" in self.params else y

    def backward(self, dy):
        x, k, groups = self.x, self.k, self.groups
        n, c, h, w = x.shape
        dy_g = dy.reshape(n, groups, -1, h, w).transpose(1, 0, 3, 4, 2).reshape(groups, n * h * w, -1)
        self.grads["weight"] = np.matmul(dy_g.transpose(0, 2, 1), self.cols).reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        weight = self._grouped_weight().reshape(groups, -1, self.cols.shape[-1])
        dwin = np.matmul(dy_g, weight).reshape(groups, n, h, w, c // groups, k, k)
        dwin = dwin.transpose(1, 0, 4, 2, 3, 5, 6).reshape(n, c, h, w, k, k)
        pad = k // 2
        dx = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
        for i in range(k):  # scatter each window position back (col2im)
            for j in range(k):
                dx[:, :, i:i + h, j:j + w] += dwin[..., i, j]
        return dx[:, :, pad:pad + h, pad:pad + w]


class BatchNorm:
    """Batch statistics while training, running statistics (`mean`, `var`) otherwise."""

    def __init__(self, rng, name, channels):
        self.name = name
        # Non-trivial affine parameters from the start so that folding them is never a no-op.
        self.params = {"weight": 1 + 0.1 * rng.standard_normal(channels), "bias": 0.1 * rng.standard_normal(channels)}
        self.mean, self.var = np.zeros(channels), np.ones(channels)
        self.momentum = 0.1
        self.grads = {}

    def forward(self, x, train):
        if train:
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            self.mean = (1 - self.momentum) * self.mean + self.momentum * mean
            self.var = (1 - self.momentum) * self.var + self.momentum * var
        else:
            mean, var = self.mean, self.var
        self.inv_std = 1 / np.sqrt(var + BN_EPS)
        self.x_hat = (x - mean[None, :, None, None]) * self.inv_std[None, :, None, None]
        return self.x_hat * self.params["weight"][None, :, None, None] + self.params["bias"][None, :, None, None]

    def backward(self, dy):
        axes = (0, 2, 3)
        self.grads["weight"] = (dy * self.x_hat).sum(axis=axes)
        self.grads["bias"] = dy.sum(axis=axes)
        dx_hat = dy * self.params["weight"][None, :, None, None]
        count = dy.size / dy.shape[1]
        return (self.inv_std[None, :, None, None] / count) * (
            count * dx_hat - dx_hat.sum(axis=axes, keepdims=True)
            - self.x_hat * (dx_hat * self.x_hat).sum(axis=axes, keepdims=True))


class Linear:
    """y = x @ weight.T + bias, i.e. Gemm(transB=1) as exporters write it."""

    def __init__(self, rng, name, cin, cout):
        self.name = name
        self.params = {"weight": rng.normal(0, np.sqrt(1 / cin), (cout, cin)), "bias": np.zeros(cout)}
        self.grads = {}

    def forward(self, x):
        self.x = x
        return x @ self.params["weight"].T + self.params["bias"]

    def backward(self, dy):
        self.grads["weight"] = dy.T @ self.x
        self.grads["bias"] = dy.sum(axis=0)
        return dy @ self.params["weight"]


class ConvBN:
    """Conv -> BatchNorm, optionally followed by Relu."""

    def __init__(self, rng, name, cin, cout, k, groups=1, bias=False, relu=True):
        self.conv = Conv(rng, f"{name}.conv", cin, cout, k, groups, bias)
        self.bn = BatchNorm(rng, f"{name}.bn", cout)
        self.relu = relu

    def forward(self, x, train):
        y = self.bn.forward(self.conv.forward(x), train)
        if self.relu:
            self.mask = y > 0
            y = y * self.mask
        return y

    def backward(self, dy):
        if self.relu:
            dy = dy * self.mask
        return self.conv.backward(self.bn.backward(dy))


class DigitsCNN:
    def __init__(self, rng):
        self.stem = ConvBN(rng, "stem", 1, 32, 3, bias=True)
        self.stem2 = ConvBN(rng, "stem2", 32, 32, 3)
        self.dw = ConvBN(rng, "block.dw", 32, 32, 3, groups=32)
        self.pw = ConvBN(rng, "block.pw", 32, 32, 1, relu=False)
        self.branch1 = ConvBN(rng, "branch1", 32, 32, 1)
        self.branch3 = ConvBN(rng, "branch3", 32, 64, 3)
        self.head = ConvBN(rng, "head", 96, 128, 3, groups=2)
        self.fc = Linear(rng, "fc", 128, 10)

    def conv_bns(self):
        return [self.stem, self.stem2, self.dw, self.pw, self.branch1, self.branch3, self.head]

    def modules(self):
        return [m for layer in self.conv_bns() for m in (layer.conv, layer.bn)] + [self.fc]

    def forward(self, x, train=False):
        stem = self.stem2.forward(self.stem.forward(x, train), train)
        block = self.pw.forward(self.dw.forward(stem, train), train) + stem
        self.block_mask = block > 0
        block = block * self.block_mask
        # 2x2 max pooling: the argmax of each window routes the gradient back.
        n, c, h, w = block.shape
        windows = block.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
        self.pool_arg = windows.argmax(axis=-1)
        pooled = np.take_along_axis(windows, self.pool_arg[..., None], axis=-1)[..., 0]
        cat = np.concatenate([self.branch1.forward(pooled, train), self.branch3.forward(pooled, train)], axis=1)
        head = self.head.forward(cat, train)
        self.head_hw = head.shape[2:]
        return self.fc.forward(head.mean(axis=(2, 3)))

    def backward(self, dlogits):
        dfeat = self.fc.backward(dlogits)
        h, w = self.head_hw
        dcat = self.head.backward(np.broadcast_to(dfeat[:, :, None, None] / (h * w), (*dfeat.shape, h, w)))
        split = self.branch1.conv.params["weight"].shape[0]
        dpooled = self.branch1.backward(dcat[:, :split]) + self.branch3.backward(dcat[:, split:])
        n, c, ph, pw = dpooled.shape
        dwindows = np.zeros((n, c, ph, pw, 4))
        np.put_along_axis(dwindows, self.pool_arg[..., None], dpooled[..., None], axis=-1)
        dblock = dwindows.reshape(n, c, ph, pw, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ph, 2 * pw)
        dblock = dblock * self.block_mask
        self.stem.backward(self.stem2.backward(self.dw.backward(self.pw.backward(dblock)) + dblock))


def rendered_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` digits (labels cycling 0-9) drawn white on black with Pillow's bundled font at a
    random size, stroke width, offset and rotation, resized to SIZE x SIZE, plus a little noise:
    (images [count, 1, SIZE, SIZE] float32 in 0..1, labels int64)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    canvas = 2 * SIZE
    images = np.zeros((count, 1, SIZE, SIZE), np.float32)
    labels = np.arange(count, dtype=np.int64) % 10
    for i, digit in enumerate(labels):
        font = ImageFont.load_default(size=int(rng.integers(18, 28)))
        img = Image.new("L", (canvas, canvas), 0)
        offset = rng.integers(-3, 4, 2)
        ImageDraw.Draw(img).text((canvas // 2 + int(offset[0]), canvas // 2 + int(offset[1])), str(digit), fill=255,
                                 font=font, anchor="mm", stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(img, np.float32) / 255 + rng.normal(0, 0.05, (SIZE, SIZE))
        images[i, 0] = np.clip(pixels, 0, 1)
    return images, labels


def train(model: DigitsCNN, x: np.ndarray, y: np.ndarray, rng) -> None:
    """Adam with cosine learning-rate decay and decoupled weight decay on conv/fc weights."""
    slots = [(module, key) for module in model.modules() for key in module.params]
    moments = [(np.zeros_like(module.params[key]), np.zeros_like(module.params[key])) for module, key in slots]
    total = EPOCHS * -(-len(x) // BATCH)
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(x))
        loss_sum = 0.0
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            logits = model.forward(x[idx], train=True)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            loss_sum += -np.log(probs[np.arange(len(idx)), y[idx]]).sum()
            probs[np.arange(len(idx)), y[idx]] -= 1  # d(cross-entropy)/d(logits)
            model.backward(probs / len(idx))
            step += 1
            lr = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * step / total))
            for (module, key), (m, v) in zip(slots, moments):
                grad, value = module.grads[key], module.params[key]
                m[...] = 0.9 * m + 0.1 * grad
                v[...] = 0.999 * v + 0.001 * grad * grad
                update = (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
                if value.ndim > 1:
                    update = update + WEIGHT_DECAY * value
                value -= lr * update
        if epoch % 4 == 3:
            print(f"epoch {epoch + 1:3d}  loss {loss_sum / len(x):.4f}")


def set_population_statistics(model: DigitsCNN, x: np.ndarray) -> None:
    """Running BN statistics -> exact statistics over the whole training set.

    One full-batch forward in training mode with momentum 1 stores, in each layer, the mean and
    variance of its inputs over all of `x`; eval mode then reproduces that forward exactly.
    """
    for layer in model.conv_bns():
        layer.bn.momentum = 1.0
    model.forward(x, train=True)


# ---------------------------------------------------------------------------------------------
# ONNX export.


def export(model: DigitsCNN) -> onnx.ModelProto:
    nodes, initializers = [], []

    def init(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def conv_bn(layer: ConvBN, x: str, scope: str) -> str:
        conv, bn = layer.conv, layer.bn
        inputs = [x] + [init(f"{conv.name}.{key}", value) for key, value in conv.params.items()]
        conv_out = f"/{scope}/conv/Conv_output_0"
        nodes.append(helper.make_node("Conv", inputs, [conv_out], name=f"/{scope}/conv/Conv",
                                      kernel_shape=[conv.k, conv.k], pads=[conv.k // 2] * 4, strides=[1, 1],
                                      dilations=[1, 1], group=conv.groups))
        out = f"/{scope}/bn/BatchNormalization_output_0"
        nodes.append(helper.make_node(
            "BatchNormalization",
            [conv_out, init(f"{bn.name}.weight", bn.params["weight"]), init(f"{bn.name}.bias", bn.params["bias"]),
             init(f"{bn.name}.running_mean", bn.mean), init(f"{bn.name}.running_var", bn.var)],
            [out], name=f"/{scope}/bn/BatchNormalization", epsilon=BN_EPS, momentum=0.9))
        if layer.relu:
            nodes.append(helper.make_node("Relu", [out], [f"/{scope}/relu/Relu_output_0"], name=f"/{scope}/relu/Relu"))
            out = nodes[-1].output[0]
        return out

    def op(op_type, inputs, scope, **attrs):
        out = f"/{scope}/{op_type}_output_0"
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"/{scope}/{op_type}", **attrs))
        return out

    stem = conv_bn(model.stem2, conv_bn(model.stem, "input", "stem"), "stem2")
    block = conv_bn(model.pw, conv_bn(model.dw, stem, "block/dw"), "block/pw")
    block = op("Relu", [op("Add", [block, stem], "block")], "block/relu")
    pooled = op("MaxPool", [block], "pool", kernel_shape=[2, 2], strides=[2, 2])
    cat = op("Concat", [conv_bn(model.branch1, pooled, "branch1"), conv_bn(model.branch3, pooled, "branch3")],
             "concat", axis=1)
    head = op("GlobalAveragePool", [conv_bn(model.head, cat, "head")], "gap")
    flat = op("Flatten", [head], "flatten", axis=1)
    nodes.append(helper.make_node("Gemm", [flat, init("fc.weight", model.fc.params["weight"]),
                                           init("fc.bias", model.fc.params["bias"])],
                                  ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgegraph-tools-train_default", producer_version="1")
    proto.ir_version = 8
    proto.doc_string = "Digit classifier (digits rendered with Pillow's font), input 16x16 grey 0..1 NCHW, output 10 logits."
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: fixtures/default)")
    args = parser.parse_args()

    x_train, y_train = rendered_digits(TRAIN_SAMPLES, seed=SEED)
    x_eval, y_eval = rendered_digits(EVAL_SAMPLES, seed=SEED + 1)
    rng = np.random.default_rng(SEED)
    model = DigitsCNN(rng)
    train(model, x_train.astype(np.float64), y_train, rng)
    set_population_statistics(model, x_train.astype(np.float64))
    numpy_logits = model.forward(x_eval.astype(np.float64))

    proto = export(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"input": x_eval})[0]
    # The float32 export must reproduce the float64 training code (the export is the model).
    np.testing.assert_allclose(onnx_logits, numpy_logits, rtol=1e-3, atol=1e-3)
    accuracy = float(np.mean(onnx_logits.argmax(axis=1) == y_eval))
    train_accuracy = float(np.mean(sess.run(["logits"], {"input": x_train})[0].argmax(axis=1) == y_train))

    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, args.out / "digits_cnn.onnx")
    np.savez_compressed(args.out / "digits_calib.npz", input=x_train[:CALIB_SAMPLES])
    np.savez_compressed(args.out / "digits_eval.npz", input=x_eval, labels=y_eval)
    size = (args.out / "digits_cnn.onnx").stat().st_size
    print(f"train accuracy {train_accuracy:.4f} ({len(y_train)} samples)")
    print(f"held-out accuracy {accuracy:.4f} ({len(y_eval)} samples); model {size} bytes -> {args.out}")


if __name__ == "__main__":
    main()
