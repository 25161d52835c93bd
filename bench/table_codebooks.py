"""A word-embedding table alone as a codebook, the rest of the model fp32: what the table's coding costs a sentence
encoder (cluster's per-layer table codebook, with and without a scale a row).

    .venv/bin/python bench/table_codebooks.py [--model minilm|mpnet] [--bits 4,5]
    .venv/bin/python bench/table_codebooks.py --layer-bits 5 --bits 4     # the whole model clustered and packed
    .venv/bin/python bench/table_codebooks.py --codebook entropy --rows uniform,frequency --cold-steps 2,2.5,3

On the cached export (bench/transformer_bench.py: all-MiniLM-L6-v2 or all-mpnet-base-v2), the word table is
replaced by its decoded codebook form, computed with onnxshrink.algorithms.codebook as `cluster` does: one codebook
of 2^bits values for the whole table (`plain`), or for the table's rows each scaled to peak 1 by an fp16 scale
(`row scale`, what `cluster` writes, in each --codebook form). Printed: the entropy of the indices in bits per weight (what `pack`'s
Huffman coding approaches; + 16 bits a row for the scales), and the quality of the mean-pooled embeddings of the
200 held-out sentences against fp32: mean cosine (worst sentence) and top-5 neighbour overlap
(bench/embedding_metrics.py). `--rows frequency`: the rows the export's calibration sentences never read on a
coarser step (cluster's table_rows; --cold-steps to compare steps other than passes/table_rows.COLD_STEP), and the
share of the held-out tokens whose rows the calibration does read. `--rows graded`: a row the calibration reads n
times on a step of C / sqrt(n + 1), clipped to [1, C] (measured, not built: docs/benchmarks-compress.md).

`--layer-bits L`: the whole model as `onnxshrink cluster` writes it and `pack` stores it, the MatMuls at L bits
(GPTQ rounding, one capture a block, other floats int8: what compress's codebook candidates run) and the embedding
tables at each of --bits (a width rule on their Gathers, ClusterConfig.layer_bits): the size of the pack against
the fp32 model, and the same pooled cosine and top-5 (the budget arithmetic of docs/benchmarks-compress.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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
from onnxshrink.passes import table_rows  # noqa: E402
from onnxshrink.passes.cluster import table_codebook  # noqa: E402

TABLE = "model.embeddings.word_embeddings.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "mpnet"))
    parser.add_argument("--bits", default="4,5")
    parser.add_argument("--codebook", default="kmeans,entropy", help="the row-scaled table's codebook forms "
                        "(cluster --codebook): kmeans, entropy (evenly spaced values at k-means' error)")
    parser.add_argument("--layer-bits", type=int, help="cluster and pack the whole model, its MatMuls at this width")
    parser.add_argument("--rows", default="uniform", help="the table's rows (cluster's table_rows): uniform, frequency "
                        "(the rows the calibration sentences never read, coarser), random (a control: as many rows, "
                        "chosen at random, coarser), graded (a row read n times on a step of C / sqrt(n + 1), "
                        "clipped to [1, C], C each --cold-steps), comma-separated")
    parser.add_argument("--cold-steps", default=str(table_rows.COLD_STEP),
                        help="with --rows frequency, random or graded: how much coarser the unread rows are (comma-separated to "
                        "compare)")
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
    if args.layer_bits:
        whole_model(exports[-1], model, held, reference, args.layer_bits, [int(b) for b in args.bits.split(",")])
        return
    calibration = SimpleNamespace(batches=[dict(np.load(exports[-1].with_name("calibration.npz")))])
    counts = table_rows.row_counts(["input_ids"], calibration, table.shape[0])
    held_tokens = held["input_ids"][held["attention_mask"] != 0]
    print(f"{args.model}: {TABLE} {list(table.shape)}, {len(held['input_ids'])} held-out sentences; the calibration "
          f"sentences' {counts.sum()} real tokens read {np.count_nonzero(counts)} rows, which hold "
          f"{np.mean(counts[held_tokens] > 0):.0%} of the held-out tokens")
    shuffled = np.random.default_rng(0).permutation(counts)  # a control: as many rows "read", chosen at random
    modes = [("uniform", None)] * ("uniform" in args.rows)
    for cold in (float(step) for step in args.cold_steps.split(",")):
        modes += [(f"frequency {cold:g}x", np.where(counts > 0, 1.0, cold))] * ("frequency" in args.rows)
        modes += [(f"random {cold:g}x", np.where(shuffled > 0, 1.0, cold))] * ("random" in args.rows)
        # the step that minimises a count-weighted squared error for the bits: 1 / sqrt(how often a row is read)
        modes += [(f"graded {cold:g}/sqrt(n+1)", np.clip(cold / np.sqrt(counts + 1.0), 1.0, cold))] * (
            "graded" in args.rows)
    for bits in (int(b) for b in args.bits.split(",")):
        scale = np.max(np.abs(table), axis=1, keepdims=True).astype(np.float16).astype(np.float32)
        rows = [("plain", None, "kmeans", None)] * ("uniform" in args.rows) + [
            (f"row scale {form} {mode}", scale, form, step) for form in args.codebook.split(",") for mode, step in modes]
        for label, scales, form, step in rows:
            if scales is None:
                values = table.reshape(1, -1)
                books = codebook.fit(values, 2 ** bits)
                codes = codebook.assign(values, books)
                decoded = codebook.decode(codes, books).reshape(table.shape)
            else:  # the cluster pass's own coding (an fp16 scale a row; exact zeros kept at entry 0)
                steps = None if step is None else step.astype(np.float32)[:, None]
                codes, books, _, decoded = table_codebook(table, 2 ** bits, "layer", form, steps)
            got = embed(decoded)
            cosines = em.row_cosines(reference, got)
            bits_per_weight = codebook.entropy(np.bincount(np.asarray(codes).ravel())) \
                + (0.0 if scales is None else 16 / table.shape[1])
            print(f"{bits}-bit {label:34s} {books.shape[-1]:3d} values  {bits_per_weight:.2f} bits/weight  cosine {cosines.mean():.5f} "
                  f"({cosines.min():.4f})  top-5 {em.topk_overlap(reference, got, 5):.3f}", flush=True)


def whole_model(path: Path, model, held: dict, reference: np.ndarray, layer_bits: int, table_bits: list) -> None:
    """Cluster the whole model (layers at `layer_bits`, each table at each width of `table_bits`), pack, measure."""
    from onnxshrink import api, session
    from onnxshrink.passes.cluster import ClusterConfig

    gathers = [node.name for node in model.graph.node if node.op_type == "Gather" and node.input[0] in
               {t.name for t in model.graph.initializer if len(t.dims) == 2}]
    for bits in table_bits:
        started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        with tempfile.TemporaryDirectory() as folder:
            clustered, packed = Path(folder) / "c.onnx", Path(folder) / "c.shrink"
            config = ClusterConfig(bits=layer_bits, other_floats="int8", rounding="gptq", capture_rounds=6,
                                   layer_bits={name: bits for name in gathers})
            api.cluster(path, clustered, config, calibration=path.with_name("calibration.npz"), force=True,
                        run_validation=False)
            api.pack(clustered, packed, force=True)
            got = em.pooled_embeddings(session(packed), held)
            size = packed.stat().st_size
        after = resource.getrusage(resource.RUSAGE_SELF)
        cosines = em.row_cosines(reference, got)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"layers {layer_bits} bits, tables {bits} bits: {size} B, {path.stat().st_size / size:.2f}x, cosine "
              f"{cosines.mean():.4f} ({cosines.min():.4f}), top-5 {em.topk_overlap(reference, got, 5):.3f}; "
              f"{time.monotonic() - started:.0f} s wall, {cpu:.0f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
