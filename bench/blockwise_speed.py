"""Blockwise 4-bit weights (MatMulNBits) vs fp32, side by side with onnxruntime's MatMulNBitsQuantizer.

Model: the generated 4-layer 2048-wide MLP (tests/conftest.make_mlp((2048,) * 5), MatMul + Add + Relu).
Each quantized model is timed against the fp32 model with validate.measure_latency (the two sessions
alternate, so ratios hold on a noisy machine), 1 onnxruntime thread, batch 1 and 32. Also: file sizes,
drift of the logits vs fp32 on random inputs, and the ops onnxruntime runs after its fusions.

    .venv/bin/python bench/blockwise_speed.py [--block-size 32] [--budget 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import make_mlp  # noqa: E402
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise  # noqa: E402
from onnxshrink.runtime import make_session, optimized_op_counts  # noqa: E402
from onnxshrink.validate import measure_latency  # noqa: E402


def onnxshrink_blockwise(model, block_size, accuracy_level):
    quantized, _ = QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=block_size, accuracy_level=accuracy_level))(model)
    return quantized


def ort_matmulnbits(model, block_size, accuracy_level):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    quantizer.process()
    return quantizer.model.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of alternating runs per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = make_mlp((2048,) * 5, seed=1)
    bs = args.block_size
    methods = [
        (f"onnxshrink rtn int4 block {bs} (default accuracy_level 4)", onnxshrink_blockwise, None),
        (f"onnxshrink rtn int4 block {bs}, accuracy_level 1 (fp32 activations)", onnxshrink_blockwise, 1),
        (f"ort MatMulNBitsQuantizer int4 block {bs} sym (default accuracy_level)", ort_matmulnbits, None),
        (f"ort MatMulNBitsQuantizer int4 block {bs} sym, accuracy_level 4", ort_matmulnbits, 4),
    ]
    rng = np.random.default_rng(0)
    feeds = {batch: {"input": rng.standard_normal((batch, 2048)).astype(np.float32)} for batch in (1, 32)}
    drift_input = {"input": rng.standard_normal((64, 2048)).astype(np.float32)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "mlp2048x4.onnx"
        onnx.save(model, str(fp32_path))
        fp32_size = fp32_path.stat().st_size
        fp32 = make_session(fp32_path, threads=1)
        reference = fp32.run(None, drift_input)[0]
        for label, fn, level in methods:
            start = time.perf_counter()
            quantized = fn(model, bs, level)
            wall = time.perf_counter() - start
            path = Path(tmp) / f"q{len(rows)}.onnx"
            onnx.save(quantized, str(path))
            session = make_session(path, threads=1)
            produced = session.run(None, drift_input)[0]
            row = {
                "method": label,
                "size_bytes": path.stat().st_size,
                "size_ratio": path.stat().st_size / fp32_size,
                "logits_rel_error": float(np.linalg.norm(produced - reference) / np.linalg.norm(reference)),
                "quantize_s": wall,
                "ops_run": dict(optimized_op_counts(path)),
            }
            for batch, feed in feeds.items():
                latency = measure_latency([fp32, session], feed, budget_s=args.budget)
                row[f"b{batch}"] = {"fp32_ms": latency["original"]["p50"], "ms": latency["candidate"]["p50"],
                                    "ratio": latency["ratio"]}
            rows.append(row)
            print(f"measured {label}", file=sys.stderr)
    if args.json:
        print(json.dumps({"fp32_size_bytes": fp32_size, "rows": rows}, indent=2))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"4-layer 2048-wide MLP, fp32 {fp32_size / 2**20:.1f} MiB; {cpu}, {os.cpu_count()} cores, onnxruntime "
          f"{ort.__version__}, 1 thread. Latency: p50 ms, ratio = quantized / fp32 (alternating runs).\n")
    print("| method | size | size ratio | logits rel. error | b1 ms (fp32) | b1 ratio | b32 ms (fp32) | b32 ratio | ops run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ops_run"].items()))
        print(f"| {r['method']} | {r['size_bytes'] / 2**20:.2f} MiB | {r['size_ratio']:.3f} | {r['logits_rel_error']:.4f} | "
              f"{r['b1']['ms']:.3f} ({r['b1']['fp32_ms']:.3f}) | {r['b1']['ratio']:.2f} | "
              f"{r['b32']['ms']:.3f} ({r['b32']['fp32_ms']:.3f}) | {r['b32']['ratio']:.2f} | {ops} |")


if __name__ == "__main__":
    main()
