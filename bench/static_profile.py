"""Where static int8 spends its time: onnxruntime's profiler per op type, fp32 vs a quantized model.

    python bench/static_profile.py FP32.onnx QUANTIZED.onnx INPUTS.npz [--batch 1] [--runs 50]

Prints, for each model, the op types of the graph onnxruntime really runs (after its fusions) and the
summed kernel time per op type (1 thread, median run of `--runs`), so a slow static model shows which float
ops, Q/DQ pairs or unfused layers cost it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def profile(path: str, feed: dict, runs: int) -> tuple[Counter, dict, float]:
    """Optimized op counts, per-op-type microseconds per run, and wall microseconds per run (median)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in feed.items() if k in names}
        for _ in range(5):
            session.run(None, feed)
        import time
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            walls.append(time.perf_counter() - start)
        trace = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts = Counter((n.domain + "." if n.domain else "") + n.op_type for n in optimized.graph.node)
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total_runs = runs + 5
    return counts, {k: v / total_runs for k, v in per_op.items()}, float(np.median(walls)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ONNX files (the first is the reference)")
    parser.add_argument("--inputs", required=True, help=".npz of int64 inputs (e.g. heldout.npz)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    data = np.load(args.inputs)
    feed = {k: data[k][:args.batch].astype(np.int64) for k in data.files}
    results = [profile(path, feed, args.runs) for path in args.models]
    ops = sorted({op for _, per_op, _ in results for op in per_op}, key=lambda op: -max(r[1].get(op, 0) for r in results))
    print("| op type | " + " | ".join(f"{Path(p).name} µs (nodes)" for p in args.models) + " |")
    print("|---|" + "---:|" * len(args.models))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{per_op.get(op, 0):.0f} ({counts.get(op, counts.get('com.microsoft.' + op, 0))})"
                                         for counts, per_op, _ in results) + " |")
    print("| kernels, sum | " + " | ".join(f"{sum(per_op.values()):.0f}" for _, per_op, _ in results) + " |")
    print("| run, median wall | " + " | ".join(f"{wall:.0f}" for _, _, wall in results) + " |")


if __name__ == "__main__":
    sys.exit(main())
