"""Benchmark: edgegraph `codebook` (and `sparsify,codebook`) vs uniform per-channel weight quantization.

    python tools/bench_codebook.py [--models cifar10,mnist,squeezenet_fp16,ppocr_cls,minilm] [--bits 2,3,4,5,6,8]
                                   [--eval N] [--rounds N] [--json out.json]

For each model: 64 calibration inputs and two disjoint held-out splits from ../shared/data (the
loaders of tools/bench_quant.py). Columns:

  raw x      fp32 file bytes / output file bytes (SqueezeNet: its float32 version's bytes)
  deflate x  fp32 file bytes / deflate(output file) (what a zip / APK stores)
  agree A/B  top-1 agreement with the fp32 model on split A / split B (MiniLM: worst cosine of
             last_hidden_state over the token positions), ORT with all optimizations
  create ms  onnxruntime session creation (median of 3): the decode chains are folded here
  lat1       1-thread latency / the input model's (interleaved medians), after session creation
  fit s      wall time of the tool (edgegraph: the whole pipeline, cleanup and saving included);
  cpu s      its CPU time (more stable than wall time on a shared machine)

Anchors at the same bits: `uniform b` is symmetric per-output-channel min-max quantization of the
same weights written dense (what onnxruntime's per-channel QDQ weight quantizer computes, without
the activation quantization that its static route adds), so the accuracy columns compare the
value sets alone; for MiniLM also onnxruntime's MatMulNBitsQuantizer (int4, block 32, symmetric)
and edgegraph's quant-int4.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgegraph import ir, modelio, runtime  # noqa: E402
from edgegraph.context import CalibrationData, PassContext, VerifyConfig  # noqa: E402
from edgegraph.passes.codebook import weights_of  # noqa: E402
from edgegraph.pipeline import run_pipeline  # noqa: E402
from edgegraph.spec import parse  # noqa: E402
from fixtures import quant as data_fixtures  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS, DATA = SHARED / "models", SHARED / "data"
CALIB = 64


def cases(names, n_eval):
    built = []
    for name in names:
        if name == "cifar10":
            x, _ = data_fixtures.cifar10(DATA)
            built.append((name, MODELS / "cifar10_cnn_pytorch_tutorial/ImageClassifier.onnx", x, "top1"))
        elif name == "mnist":
            x, _ = data_fixtures.mnist(DATA, CALIB + 2 * n_eval)
            built.append((name, MODELS / "mnist_cntk/mnist.onnx", x, "top1"))
        elif name == "squeezenet_fp16":
            x = data_fixtures.squeezenet_inputs(DATA, 0, CALIB + 2 * n_eval)
            built.append((name, MODELS / "squeezenet1.0_imagenet_fp16/SqueezeNet_fp16.onnx", x, "top1"))
        elif name == "ppocr_cls":
            x, _ = data_fixtures.text_line_inputs(DATA, CALIB + 2 * n_eval)
            built.append((name, MODELS / "ppocr_v4_paddle2onnx/ch_ppocr_mobile_v2.0_cls_infer.onnx", x, "top1"))
        elif name == "minilm":
            rng = np.random.default_rng(0)
            ids = rng.integers(1000, 30000, (CALIB + 2 * min(n_eval, 32), 16))
            ids[:, 0], ids[:, -1] = 101, 102
            built.append((name, MODELS / "minilm_l6_v2_int8/model.onnx", ids, "cosine"))
        else:
            raise SystemExit(f"unknown model {name}")
    return built


def feeds_of(path: Path, x: np.ndarray) -> list[dict]:
    specs = runtime.input_specs(onnx.load(str(path), load_external_data=False))
    if len(specs) == 3:  # MiniLM: ids, mask, token types; one sentence per run
        return [{"input_ids": r[None], "attention_mask": np.ones_like(r[None]), "token_type_ids": np.zeros_like(r[None])}
                for r in x]
    spec = specs[0]
    batch = runtime.batch_size_for(specs, 16)
    return [{spec.name: x[i:i + batch].astype(spec.dtype)} for i in range(0, len(x), batch)]


def outputs(path, feeds):
    sess = runtime.session(str(path), threads=0, optimize=True)
    return [sess.run(None, f)[0].astype(np.float32) for f in feeds]


def agreement(ref, out, metric):
    if metric == "cosine":
        worst = 1.0
        for r, o in zip(ref, out):
            r, o = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
            cos = (r * o).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))
            worst = min(worst, float(cos.min()))
        return worst
    r = np.concatenate([a.reshape(len(a), -1) for a in ref])
    o = np.concatenate([a.reshape(len(a), -1) for a in out])
    return float(np.mean(r.argmax(1) == o.argmax(1)))


def float32_input(path: Path, folder: Path) -> Path:
    """The model every tool starts from: the file itself, or for MiniLM (weight-only int8:
    `Cast(int8) * scale`) its float32 version, so that onnxruntime's quantizers see float
    initializers and every tool gets the same fp32 weights."""
    if not path.parent.name.startswith("minilm"):
        return path
    from edgegraph.passbase import settle

    model = modelio.load(path)
    for w in weights_of(model, ("MatMul", "Gemm", "Gather"), (), 0):
        ir.replace_all_uses(model.graph, w.tensor, ir.const(w.tensor.name + "_f32", w.value.astype(np.float32)))
    settle(model)
    out = folder / "minilm_fp32.onnx"
    modelio.save(model, out)
    return out


def fp32_size(path: Path) -> int:
    """Bytes of the model with float32 weights (the float16 SqueezeNet measured as if float32)."""
    from edgegraph.convert import compute_in_float32

    model = modelio.load(path)
    if not compute_in_float32(model):
        return path.stat().st_size
    return len(model.to_proto().SerializeToString())


def edgegraph_tool(spec, calib_x, path):
    def make(out: Path) -> dict:
        calib = None
        if calib_x is not None:
            feeds = feeds_of(path, calib_x)
            calib = CalibrationData.from_arrays({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        ctx = PassContext(calibration=calib, verify=VerifyConfig(enabled=False), progress=False)
        model, report = run_pipeline(modelio.load(path), parse(spec), ctx)
        modelio.save(model, out)
        return report.passes[-1].stats
    return make


def uniform_tool(bits, path):
    """Symmetric per-output-channel min-max quantization at `bits`, written dense (fake-quant)."""
    def make(out: Path) -> dict:
        model = modelio.load(path)
        ctx = PassContext(verify=VerifyConfig(enabled=False), progress=False)
        model, _ = run_pipeline(model, parse("cleanup"), ctx)
        qmax = (1 << (bits - 1)) - 1
        for w in weights_of(model, ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"), (), 1024):
            v = w.value.astype(np.float64)
            axis = w.out_axis
            axes = tuple(a for a in range(v.ndim) if a != axis) if axis is not None else None
            scale = np.abs(v).max(axis=axes, keepdims=True) / qmax
            scale = np.where(scale > 0, scale, 1.0)
            q = np.clip(np.rint(v / scale), -qmax, qmax) * scale
            ir.replace_all_uses(model.graph, w.tensor, ir.const(w.tensor.name + "_uq", q.astype(w.value.dtype)))
        from edgegraph.passbase import settle

        settle(model)
        modelio.save(model, out)
        return {}
    return make


def ort_nbits_tool(path):
    def make(out: Path) -> dict:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        return {}
    return make


def session_ms(path) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        runtime.session(str(path), threads=1, optimize=True)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def default_tools(name, bits_list, calib, path):
    """Without data: each bit width and the default; with the 64 calibration inputs (`+calib`):
    importance-weighted k-means, + least-squares centroids (refit), GPTQ assignment (the default
    fit), mixed widths for a 6x file (ratio=6), sparsity by OBS before the codebook, and 10x files
    (ratio=10: alone, after OBS sparsity, with pruning as a per-layer choice)."""
    tools = {}
    for bits in bits_list:
        tools[f"codebook {bits}"] = edgegraph_tool(f"codebook(bits={bits})", None, path)
    tools["codebook (default)"] = edgegraph_tool("codebook", None, path)
    tools["codebook ratio=6"] = edgegraph_tool("codebook(ratio=6)", None, path)
    tools["codebook 4 +calib kmeans"] = edgegraph_tool("codebook(bits=4, fit=kmeans)", calib, path)
    tools["codebook 4 +calib refit"] = edgegraph_tool("codebook(bits=4, fit=refit)", calib, path)
    tools["codebook 4 +calib gptq"] = edgegraph_tool("codebook(bits=4)", calib, path)
    tools["codebook 5 +calib gptq"] = edgegraph_tool("codebook(bits=5)", calib, path)
    tools["codebook ratio=6 +calib"] = edgegraph_tool("codebook(ratio=6)", calib, path)
    tools["codebook (default) +calib"] = edgegraph_tool("codebook", calib, path)
    tools["codebook 4 share=op"] = edgegraph_tool("codebook(bits=4, share=op)", None, path)
    tools["sparsify 0.5,codebook 4"] = edgegraph_tool("sparsify(sparsity=0.5),codebook(bits=4)", None, path)
    tools["sparsify 0.5 obs,codebook 4 +calib"] = edgegraph_tool("sparsify(sparsity=0.5),codebook(bits=4)", calib, path)
    tools["sparsify 0.7 obs,codebook 3 +calib"] = edgegraph_tool("sparsify(sparsity=0.7),codebook(bits=3)", calib, path)
    # 10x: mixed widths alone, after uniform OBS sparsity, and with pruning as a per-layer choice
    # of the allocation (the pruned layers stored as a mask and their nonzero indices)
    tools["codebook ratio=10 +calib"] = edgegraph_tool("codebook(ratio=10)", calib, path)
    tools["sparsify 0.3 obs,codebook ratio=10 +calib"] = edgegraph_tool("sparsify(sparsity=0.3),codebook(ratio=10)",
                                                                        calib, path)
    tools["codebook ratio=10 sparsity=0.5 +calib"] = edgegraph_tool("codebook(ratio=10, sparsity=0.5)", calib, path)
    for bits in (4, 8):
        tools[f"uniform {bits} (per-channel)"] = uniform_tool(bits, path)
    if name == "minilm":
        tools["ORT MatMulNBits int4"] = ort_nbits_tool(path)
        tools["edgegraph quant-int4"] = edgegraph_tool("quant-int4", None, path)
    return tools


def spec_tools(specs, calib, path):
    """--spec: 'calib:' before a spec runs it with the calibration inputs; 'uniform:B' the uniform
    anchor at B bits, 'ort-int4' onnxruntime's MatMulNBits quantizer."""
    tools = {}
    for spec in specs:
        if spec.startswith("uniform:"):
            tools[f"uniform {spec[8:]} (per-channel)"] = uniform_tool(int(spec[8:]), path)
            continue
        if spec == "ort-int4":
            tools["ORT MatMulNBits int4"] = ort_nbits_tool(path)
            continue
        data = spec.startswith("calib:")
        body = spec[len("calib:"):] if data else spec
        tools[spec] = edgegraph_tool(body, calib if data else None, path)
    return tools


def bench(name, path, x, metric, bits_list, n_eval, rounds, folder, specs=None):
    n_eval = min(n_eval, (len(x) - CALIB) // 2)  # (MiniLM: 32 sentences a split)
    calib, split_a, split_b = x[:CALIB], x[CALIB:CALIB + n_eval], x[CALIB + n_eval:CALIB + 2 * n_eval]
    source = path
    path = float32_input(path, folder)
    feeds_a, feeds_b = feeds_of(path, split_a), feeds_of(path, split_b)
    ref_a, ref_b = outputs(path, feeds_a), outputs(path, feeds_b)
    base = fp32_size(path)
    tools = {"input": None} if path == source else {"input (int8)": lambda out: _copy(source, out), "fp32": None}
    tools.update(spec_tools(specs, calib, path) if specs else default_tools(name, bits_list, calib, path))
    rows = []
    for label, make in tools.items():
        out = path if make is None else folder / f"{name}_{label.replace(' ', '_').replace(',', '_')}.onnx"
        row = {"model": name, "tool": label, "path": out}
        if make is not None:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                row["stats"] = make(out)
            except Exception as exc:  # noqa: BLE001 - a failing tool is a result
                rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:100]}"})
                continue
            row["fit_s"] = time.perf_counter() - start
            row["cpu_s"] = time.process_time() - cpu  # (the machine may be shared: CPU time says more)
        data = Path(out).read_bytes()
        row["raw"] = base / len(data)
        row["deflate"] = base / len(zlib.compress(data, 6))
        row["agree_a"] = agreement(ref_a, outputs(out, feeds_a), metric)
        row["agree_b"] = agreement(ref_b, outputs(out, feeds_b), metric)
        row["create_ms"] = session_ms(out)
        rows.append(row)
    timed = [r for r in rows if "error" not in r]
    samples = {r["tool"]: [] for r in timed}
    for _ in range(rounds):  # interleaved: background load hits every model alike
        for r in timed:
            samples[r["tool"]].append(runtime.latency_ms(str(r["path"]), feeds_of(path, x[:1])[0], runs=20, threads=1))
    for r in timed:
        r["lat_ms"] = statistics.median(samples[r["tool"]])
        r["lat1"] = r["lat_ms"] / statistics.median(samples["input" if "input" in samples else "fp32"])
    return [{k: v for k, v in r.items() if k not in ("path",)} for r in rows]


def _copy(source: Path, out: Path) -> dict:
    out.write_bytes(source.read_bytes())
    return {}


def print_rows(rows):
    width = max([26] + [len(r["tool"]) for r in rows])
    print(f"{'model':16} {'tool':{width}} {'raw x':>6} {'defl x':>6} {'agree A':>8} {'agree B':>8} {'create ms':>9} "
          f"{'lat1':>6} {'fit s':>6} {'cpu s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:16} {r['tool']:{width}} ERROR {r['error']}")
            continue
        print(f"{r['model']:16} {r['tool']:{width}} {r['raw']:6.2f} {r['deflate']:6.2f} {r['agree_a']:8.4f} "
              f"{r['agree_b']:8.4f} {r['create_ms']:9.1f} {r['lat1']:6.3f} {r.get('fit_s', 0):6.1f} "
              f"{r.get('cpu_s', 0):6.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cifar10,mnist,squeezenet_fp16,ppocr_cls,minilm")
    parser.add_argument("--bits", default="2,3,4,5,6,8")
    parser.add_argument("--eval", type=int, default=100, help="samples per held-out split")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spec", action="append", help="a pass spec to run instead of the default tools "
                        "(repeatable; prefix 'calib:' to give it the calibration inputs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    bits = [int(b) for b in args.bits.split(",")]
    everything = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, x, metric in cases(args.models.split(","), args.eval):
            rows = bench(name, path, x, metric, bits, args.eval, args.rounds, Path(tmp), args.spec)
            print_rows(rows)
            everything += rows
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
