"""A task check for `compress --task-check` on a sentence encoder: nearest neighbours kept (issue 15's top-5 target).

    python bench/embedding_check.py SENTENCES.npz ORIGINAL CANDIDATE [--min-top5 0.9] [--min-cosine C]

Mean-pooled embeddings of the tokenized sentences in SENTENCES.npz through both models (.onnx or .shrink); exits 0
when the candidate finds at least --min-top5 of each sentence's 5 nearest neighbours under the original, on average
(and, with --min-cosine, when the mean pooled cosine is at least that), 1 when not. Prints the figures either way.
bench/compress_real.py --task-check judges on prose of its own (bench/calibration_text.py's last sentences), so the
held-out sentences it reports on stay unseen by the search.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedding_metrics import pooled_embeddings, row_cosines, topk_overlap  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sentences")
    parser.add_argument("original")
    parser.add_argument("candidate")
    parser.add_argument("--min-top5", type=float, default=0.9)
    parser.add_argument("--min-cosine", type=float, default=None)
    args = parser.parse_args(argv)
    import onnxshrink

    with np.load(args.sentences) as data:
        held = {name: data[name] for name in data.files}
    reference = pooled_embeddings(onnxshrink.session(args.original), held)
    candidate = pooled_embeddings(onnxshrink.session(args.candidate), held)
    top5, cosine = topk_overlap(reference, candidate, 5), float(row_cosines(reference, candidate).mean())
    kept = top5 >= args.min_top5 and (args.min_cosine is None or cosine >= args.min_cosine)
    print(f"top-5 {top5:.3f}, pooled cosine {cosine:.4f} on {len(reference)} sentences")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
