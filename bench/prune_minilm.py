"""Prune all-MiniLM-L6-v2 with each method and judge it on held-out sentences (issue 15, item 1-2).

    .venv/bin/python bench/prune_minilm.py --method sparsegpt refit --sparsity 0.5

Runs the Prune pass in-process on the calibration sentences (all 128: validation is not run, the held-out
file judges), times it, and prints wall time, CPU time (all threads: steadier than wall time on a shared machine), peak RSS so far, mean cosine of the mean-pooled embeddings
against fp32, and top-5 neighbour overlap (bench/embedding_metrics.py). The model comes from
bench/transformer_export.py (~/.cache/onnxshrink/minilm/export-*/).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedding_metrics import pooled_embeddings, row_cosines, topk_overlap  # noqa: E402

from onnxshrink.data import input_specs, load_npz, trim_padding  # noqa: E402
from onnxshrink.passes.prune import Prune, PruneConfig  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402


def embeddings(model: onnx.ModelProto, held: dict, threads: int) -> np.ndarray:
    session = make_session(model, threads)
    return pooled_embeddings(session, held)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--method", nargs="+", default=["sparsegpt", "refit"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sequential", action="store_true", help="sparsegpt: capture in waves, upstream pruned")
    parser.add_argument("--scope", default="auto")
    parser.add_argument("--rounds", type=int, default=0, help="sparsegpt: at most this many capture rounds (0: one per wave)")
    parser.add_argument("--no-kept-refit", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--untrimmed", action="store_true", help="run the padding too (before data.trim_padding)")
    args = parser.parse_args()
    path = Path(args.model or sorted(glob.glob(os.path.expanduser("~/.cache/onnxshrink/minilm/export-*/model.onnx")))[0])
    model = onnx.load(path)
    calibration = load_npz(path.parent / "calibration.npz", input_specs(model), role="calibration data")
    if not args.untrimmed:  # as the prune command runs it: samples by length, each run cut to its real tokens
        calibration = trim_padding(calibration, input_specs(model))
    held = dict(np.load(path.parent / "heldout.npz"))
    reference = embeddings(model, held, args.threads)
    print(f"# {platform.machine()} {os.cpu_count()} cores, onnxruntime {ort.__version__}, {path.name}, "
          f"{calibration.samples} calibration / {len(held['input_ids'])} held-out sentences")
    for method in args.method:
        config = PruneConfig(sparsity=None if ":" in args.pattern else args.sparsity, pattern=args.pattern,
                             method=method, sequential=args.sequential, scope=args.scope,
                             capture_rounds=args.rounds, kept_refit=not args.no_kept_refit)
        start, cpu = time.perf_counter(), time.process_time()
        pruned, report = Prune(config, calibration, threads=args.threads)(model)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        candidate = embeddings(pruned, held, args.threads)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{method:10s} {args.pattern} {args.sparsity:g}{' sequential' if args.sequential else ''} scope {args.scope} rounds {args.rounds}"
              f"{' no-kept-refit' if args.no_kept_refit else ''}: "
              f"{wall:6.1f} s wall, {cpu:6.1f} s CPU, peak RSS {rss:.0f} MB, cosine {row_cosines(reference, candidate).mean():.4f}, "
              f"top-5 {topk_overlap(reference, candidate, 5):.3f}", flush=True)


if __name__ == "__main__":
    main()
