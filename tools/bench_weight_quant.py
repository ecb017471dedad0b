"""edgegraph's quant-dynamic / quant-int4 beside onnxruntime.quantization on MiniLM (size, speed, accuracy).

    /work/.venv/bin/python tools/bench_weight_quant.py [--seq 128] [--threads 1] [--rounds 5]

The fp32 reference is the shared MiniLM-L6 (../shared/models/minilm_l6_v2_int8, weight-only int8)
with every `Cast(int8) * scale` weight folded to float32, so all tools start from the same floats.
Accuracy: cosine of token vectors and of mean-pooled sentence embeddings, and SQNR, vs fp32 over
the reference input plus 15 synthetic sentences of frequent-word ids. Latency: median over
`rounds` interleaved rounds (every model once per round, so background load hits all alike) of
the median of 10 runs, as a ratio to fp32; one sequence of `--seq` tokens.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgegraph import modelio
from edgegraph.context import PassContext, VerifyConfig
from edgegraph.pipeline import run_pipeline
from edgegraph.spec import parse

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO.parent / "shared/models/minilm_l6_v2_int8/model.onnx"
sys.path.insert(0, str(REPO))  # fixtures

from fixtures.linear import float_weights  # noqa: E402


def fold_weights(src: Path, dst: Path) -> None:
    modelio.save(float_weights(src), dst)


def sentences(count: int = 16, seed: int = 0) -> list[np.ndarray]:
    reference = np.load(MODEL.with_suffix(".reference_io.npz"))["input__input_ids"][0]
    rng = np.random.default_rng(seed)
    out = [reference]
    for _ in range(count - 1):
        length = int(rng.integers(8, 64))
        out.append(np.concatenate([[101], rng.integers(1996, 8000, length - 2), [102]]))
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return sess.run(None, feeds)[0][0].astype(np.float64)


def accuracy(reference: Path, candidate: Path) -> tuple[float, float, float]:
    ref_sess, cand_sess = session(reference, 2), session(candidate, 2)
    token_cos, pooled_cos, noise, signal = [], [], 0.0, 0.0
    for ids in sentences():
        x, y = embed(ref_sess, ids), embed(cand_sess, ids)
        token_cos.append(np.mean(np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)))
        px, py = x.mean(0), y.mean(0)
        pooled_cos.append(px @ py / np.linalg.norm(px) / np.linalg.norm(py))
        noise, signal = noise + np.sum((x - y) ** 2), signal + np.sum(x**2)
    return float(np.mean(token_cos)), float(np.min(pooled_cos)), float(10 * np.log10(signal / noise)) if noise else float("inf")


def latencies(paths: dict[str, Path], seq: int, threads: int, rounds: int) -> dict[str, float]:
    ids = np.concatenate([[101], np.arange(2000, 2000 + seq - 2), [102]])
    sessions = {name: session(path, threads) for name, path in paths.items()}
    for sess in sessions.values():
        for _ in range(3):
            embed(sess, ids)
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            times = []
            for _ in range(10):
                start = time.perf_counter()
                embed(sess, ids)
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in per_round.items()}


def edgegraph_variant(src: Path, spec: str, dst: Path) -> float:
    start = time.perf_counter()
    model, _ = run_pipeline(modelio.load(src), parse(spec), PassContext(progress=False, verify=VerifyConfig(enabled=False)))
    modelio.save(model, dst)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not MODEL.exists():
        print(f"{MODEL} not found (the shared models live in ../shared)", file=sys.stderr)
        return 1
    logging.disable(logging.WARNING)  # onnxruntime.quantization logs every node
    with tempfile.TemporaryDirectory(prefix="edgegraph-bench-") as folder:
        return run(Path(folder), args)


def run(tmp: Path, args) -> int:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = tmp / "fp32.onnx"
    fold_weights(MODEL, fp32)
    paths = {"fp32": fp32, "original (weight-only int8)": MODEL}
    seconds = {}
    for name, kwargs in {"ort quantize_dynamic (default)": {},
                         "ort quantize_dynamic per_channel": {"per_channel": True}}.items():
        start = time.perf_counter()
        quantize_dynamic(fp32, tmp / f"{len(paths)}.onnx", weight_type=QuantType.QInt8, **kwargs)
        seconds[name] = time.perf_counter() - start
        paths[name] = tmp / f"{len(paths)}.onnx"
    for spec in ("quant-dynamic", "quant-dynamic(weight_type=uint8)", "quant-dynamic(reduce_range=false)"):
        paths[f"edgegraph {spec}"] = tmp / f"{len(paths)}.onnx"
        seconds[f"edgegraph {spec}"] = edgegraph_variant(fp32, spec, paths[f"edgegraph {spec}"])
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        for block in (32, 128):
            start = time.perf_counter()
            quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=block, is_symmetric=False)
            quantizer.process()
            name = f"ort MatMulNBitsQuantizer block {block}"
            paths[name] = tmp / f"{len(paths)}.onnx"
            quantizer.model.save_model_to_file(str(paths[name]))
            seconds[name] = time.perf_counter() - start
    except ImportError as exc:  # needs the onnx_ir package
        print(f"(skipping MatMulNBitsQuantizer: {exc})", file=sys.stderr)
    for spec in ("quant-int4", "quant-int4(search=false)", "quant-int4(block_size=128)", "quant-int4(format=qdq)",
                 "quant-int4(accuracy_level=0)"):
        paths[f"edgegraph {spec}"] = tmp / f"{len(paths)}.onnx"
        seconds[f"edgegraph {spec}"] = edgegraph_variant(fp32, spec, paths[f"edgegraph {spec}"])

    times = latencies(paths, args.seq, args.threads, args.rounds)
    print(f"MiniLM-L6 (seq {args.seq}, {args.threads} thread(s), median of {args.rounds} interleaved rounds)\n")
    print("| model | size MB | latency ms | vs fp32 | token cos | pooled cos (min) | SQNR dB | convert s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in paths.items():
        cos, pooled, sqnr = accuracy(fp32, path)
        print(f"| {name} | {path.stat().st_size / 1e6:.1f} | {times[name]:.1f} | {times[name] / times['fp32']:.2f} | "
              f"{cos:.4f} | {pooled:.4f} | {sqnr:.1f} | {seconds.get(name, 0):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
