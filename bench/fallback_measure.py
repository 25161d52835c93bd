"""Quality, size and speed of quantized sentence encoders against fp32, for the accuracy-fallback figures in README.

    python bench/fallback_measure.py FP32.onnx HELDOUT.npz CANDIDATE.onnx [CANDIDATE.onnx ...]

Quality on every sentence of HELDOUT.npz (never used to calibrate or to choose fallback layers): cosine of
mean-pooled embeddings vs fp32, top-5 neighbour overlap, Spearman of pairwise similarities (embedding_metrics).
Latency: ratio to fp32 at batch 1 and 8, one onnxruntime thread, the two sessions alternating in one process
(onnxshrink.validate.measure_latency), `--repeats` times; the median ratio is printed with its range.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embedding_metrics  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink.validate import measure_latency  # noqa: E402


def hidden(session, feeds: dict, batch: int = 8) -> np.ndarray:
    count = len(next(iter(feeds.values())))
    return np.concatenate([session.run(["last_hidden_state"], {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, count, batch)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fp32", type=Path)
    parser.add_argument("heldout", type=Path)
    parser.add_argument("candidates", type=Path, nargs="+")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of alternating runs per latency pair")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    feeds = {k: v.astype(np.int64) for k, v in np.load(args.heldout).items()}
    reference = onnxshrink.session(args.fp32, threads=1)
    base = embedding_metrics.mean_pool(hidden(reference, feeds), feeds["attention_mask"])
    for path in args.candidates:
        session = onnxshrink.session(path, threads=1)
        row = embedding_metrics.embedding_quality(base, embedding_metrics.mean_pool(hidden(session, feeds),
                                                                                    feeds["attention_mask"]), 5)
        row["size"] = path.stat().st_size / args.fp32.stat().st_size
        for batch in (1, 8):
            feed = {k: v[:batch] for k, v in feeds.items()}
            ratios = [measure_latency([reference, session], feed, args.budget)["ratio"] for _ in range(args.repeats)]
            row[f"b{batch}"] = [float(np.median(ratios)), float(min(ratios)), float(max(ratios))]
        print(json.dumps({"model": str(path), "sentences": len(feeds["input_ids"]), **row}), flush=True)


if __name__ == "__main__":
    main()
