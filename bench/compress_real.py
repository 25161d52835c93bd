"""`onnxshrink compress` on a real model (MiniLM, issue 15): wall time, peak RSS, what the search tried, and the
held-out quality a sentence-embedding user sees (mean-pooled cosine, top-5 neighbours; bench/embedding_metrics.py).

    python bench/compress_real.py [--budget 10m] [--min-cosine 0.99] [--out DIR]
    python bench/compress_real.py --result DIR/compress.json     # measure an earlier run's pack again
    python bench/compress_real.py --recipe R.toml                 # one fixed candidate (recipe mode) instead

The model is the cached export (bench/transformer_export.py makes it); nothing is downloaded. Run it with
`nice -n 10` on a shared machine, and say in the doc how busy the machine was: the search is bounded in seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding_metrics import pooled_embeddings, row_cosines, topk_overlap  # noqa: E402

EXPORT = os.path.expanduser("~/.cache/onnxshrink/minilm/export-c346037fd464")


def embeddings(path: Path, held: dict) -> np.ndarray:
    import onnxshrink

    session = onnxshrink.session(path)
    return pooled_embeddings(session, held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", default=EXPORT if os.path.isdir(EXPORT) else
                        sorted(glob.glob(os.path.expanduser("~/.cache/onnxshrink/minilm/export-*")))[-1])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--min-cosine", default="0.99")
    parser.add_argument("--out", default="/tmp/compress-real")
    parser.add_argument("--result", help="an earlier run's compress.json: measure its pack, run nothing")
    parser.add_argument("--recipe", help="run this recipe (compress --recipe) instead of the search")
    args = parser.parse_args()
    export = Path(args.export)
    if args.result:
        result_path, wall, rss = Path(args.result), None, None
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result_path = out / "compress.json"
        command = [str(Path(sys.executable).parent / "onnxshrink"), "compress", str(export / "model.onnx"),
                   "--calibration", str(export / "calibration.npz"), "--data", str(export / "heldout.npz"),
                   "--min-cosine", args.min_cosine, "-o", str(out / "out.shrink"), "--force", "--json"]
        command += ["--recipe", args.recipe] if args.recipe else ["--time-budget", args.budget]
        print(" ".join(command), file=sys.stderr)
        started = time.monotonic()
        with open(result_path, "wb") as stream:
            subprocess.run(command, stdout=stream, check=False)
        wall = time.monotonic() - started
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = json.loads(result_path.read_text())
    held = dict(np.load(export / "heldout.npz"))
    reference = embeddings(export / "model.onnx", held)
    candidate = embeddings(Path(result["output"]), held)
    cosines = row_cosines(reference, candidate)
    print(f"wall {wall:.0f} s, peak RSS {rss / 1024:.2f} GB" if wall is not None else "(an earlier run)")
    budget = f" of {result['time_budget_s']:.0f} s" if result.get("time_budget_s") else ""
    lossless = result["size"].get("lossless")
    print(f"search {result['seconds']:.0f} s{budget}, stopped: {result['stopped']}; "
          f"{result['size']['times_smaller']:.2f}x smaller ({result['size']['output']} B)"
          + (f", lossless {result['size']['original'] / lossless:.2f}x" if lossless else ""))
    print(f"held-out: pooled cosine {cosines.mean():.4f} (worst {cosines.min():.4f}), top-5 "
          f"{topk_overlap(reference, candidate, 5):.3f}; compress's own check (token states, padding left out): "
          f"{min(o['cosine'] for o in result['validation']['outputs'].values()):.4f}")
    print(f"recipe: {result['recipe_summary']}")
    for c in result["candidates"]:
        ratio = f"{c['times_smaller']:.2f}x" if c["times_smaller"] else "-"
        cosine = f"{c['cosine']:.4f}" if c["cosine"] is not None else "-"
        print(f"  {c['index']} {c['phase']:9} {c['seconds']:6.1f} s {ratio:>7} cos {cosine} "
              f"{'pass' if c['passed'] else 'FAIL'} {c['recipe']}{'  [' + c['error'] + ']' if c['error'] else ''}")
    for note in result.get("notes", []):
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
