"""A word-embedding table alone as a codebook, the rest of the model fp32: what the table's coding costs a sentence
encoder (cluster's per-layer table codebook, with and without a scale a row).

    .venv/bin/python bench/table_codebooks.py [--model minilm|mpnet] [--bits 4,5]

On the cached export (bench/transformer_bench.py: all-MiniLM-L6-v2 or all-mpnet-base-v2), the word table is
replaced by its decoded codebook form, computed with onnxshrink.algorithms.codebook as `cluster` does: one codebook
of 2^bits values for the whole table (`plain`), or for the table's rows each scaled to peak 1 by an fp16 scale
(`row scale`, what `cluster` writes). Printed: the entropy of the indices in bits per weight (what `pack`'s
Huffman coding approaches; + 16 bits a row for the scales), and the quality of the mean-pooled embeddings of the
200 held-out sentences against fp32: mean cosine (worst sentence) and top-5 neighbour overlap
(bench/embedding_metrics.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import embedding_metrics as em  # noqa: E402
from transformer_bench import cache_root  # noqa: E402

from onnxshrink.algorithms import codebook  # noqa: E402

TABLE = "model.embeddings.word_embeddings.weight"


def entropy(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "mpnet"))
    parser.add_argument("--bits", default="4,5")
    args = parser.parse_args()
    exports = sorted((cache_root() / args.model).glob("export-*/model.onnx"))
    if not exports:
        sys.exit(f"no {args.model} export cached: run `make bench-transformer` (or bench/transformer_bench.py) first")
    model = onnx.load(str(exports[-1]))
    held = dict(np.load(exports[-1].with_name("heldout.npz")))
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == TABLE)
    table = numpy_helper.to_array(model.graph.initializer[index]).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def embed(rows: np.ndarray) -> np.ndarray:
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(rows.astype(np.float32), TABLE))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return em.pooled_embeddings(session, held)

    reference = embed(table)
    print(f"{args.model}: {TABLE} {list(table.shape)}, {len(held['input_ids'])} held-out sentences")
    for bits in (int(b) for b in args.bits.split(",")):
        scale = np.max(np.abs(table), axis=1, keepdims=True).astype(np.float16).astype(np.float32)
        for label, scales in (("plain", None), ("row scale", scale)):
            values = (table if scales is None else table / scales).reshape(1, -1)
            books = codebook.fit(values, 2 ** bits)
            codes = codebook.assign(values, books)
            decoded = codebook.decode(codes, books).reshape(table.shape) * (1.0 if scales is None else scales)
            got = embed(decoded)
            cosines = em.row_cosines(reference, got)
            bits_per_weight = entropy(codes) + (0.0 if scales is None else 16 / table.shape[1])
            print(f"{bits}-bit {label:9s}  {bits_per_weight:.2f} bits/weight  cosine {cosines.mean():.5f} "
                  f"({cosines.min():.4f})  top-5 {em.topk_overlap(reference, got, 5):.3f}", flush=True)


if __name__ == "__main__":
    main()
