"""A vocabulary table's rows by whether the calibration data reads them: rows of tokens the calibration text never
shows are coded COLD_STEP times coarser, the rows it shows as before.

Why: a word-embedding table is half of a compressed sentence encoder (MiniLM's pack), and text reads few of its rows
often (Zipf): 128 calibration sentences read 607 of MiniLM's 30522 rows, and those rows are 65% of the tokens of
200 other sentences. The table's codebook is shared and each row is read through its fp16 scale, so a row whose scale
is COLD_STEP times its peak uses only the codebook's middle entries: its indices code in fewer bits, its values on a
COLD_STEP times coarser step, and nothing in the graph or the pack format changes. Only a table that Gathers read
with a model input as indices (token ids) and that has at least VOCAB_ROWS rows counts as a vocabulary: position
and segment tables are read by the model's own indices, whose spread the calibration data shows badly (a fixed
sequence length leaves later positions unread), and their few rows would save nothing.
"""

from __future__ import annotations

import numpy as np

from onnxshrink.passes.common import attr
from onnxshrink.passes.prune_common import padding_mask

VOCAB_ROWS = 1024  # fewer rows: not a vocabulary (positions, segments), coded uniformly
# How much coarser the unread rows' step is: the largest of 2, 2.5 and 3 at which MiniLM's word table, alone coded
# at 4 bits, keeps its held-out pooled cosine within 0.0001 (0.99766 -> 0.99763 at 3.60 -> 3.19 bits a weight;
# MPNet, another wheel: 0.99612 -> 0.99862 at 3.50 -> 3.10), and compress's 4.55-bit MiniLM recipe keeps the pooled
# cosine, worst sentence and top-5 of uniform rows at 8.31x instead of 7.90x (bench/table_codebooks.py --rows;
# docs/benchmarks-compress.md).
COLD_STEP = 3.0


def vocabulary_ids(readers: list, model_inputs: set, rows: int) -> list[str] | None:
    """The model inputs that index the table, when its every reader is a Gather of its rows by one (else None: not a
    vocabulary; a table tied to a MatMul, an output projection, weighs its rows by the logits, not by the text)."""
    if rows < VOCAB_ROWS or not readers:
        return None
    if any(node.op_type != "Gather" or attr(node, "axis", 0) != 0 for node in readers):
        return None
    ids = [node.input[1] for node in readers]
    if any(name not in model_inputs for name in ids):
        return None
    return sorted(set(ids))


def row_counts(ids: list[str] | None, dataset, rows: int) -> np.ndarray | None:
    """How often the calibration data reads each row (real tokens only: padding, by an attention mask of the ids'
    shape, is left out), or None when the table is not a vocabulary or the data lacks its ids."""
    if not ids or dataset is None or not dataset.batches:
        return None
    counts = np.zeros(rows, dtype=np.int64)
    for batch in dataset.batches:
        for name in ids:
            if name not in batch:
                return None
            tokens = np.asarray(batch[name])
            real = padding_mask(batch, tokens.shape)
            tokens = (tokens if real is None else tokens[real]).astype(np.int64).ravel()
            tokens = np.where(tokens < 0, tokens + rows, tokens)  # Gather reads negative indices from the end
            counts += np.bincount(tokens[(tokens >= 0) & (tokens < rows)], minlength=rows)
    return counts if counts.any() else None


def row_steps(counts: np.ndarray | None) -> np.ndarray | None:
    """[rows, 1]: how much coarser each row is coded (1: read by the calibration data; COLD_STEP: never read)."""
    if counts is None:
        return None
    return np.where(counts > 0, 1.0, COLD_STEP).astype(np.float32)[:, None]


def describe(steps: np.ndarray | None) -> str:
    if steps is None:
        return ""
    cold = int(np.count_nonzero(steps > 1))
    return (f"; the {cold} of {len(steps)} rows the calibration data never reads on a {COLD_STEP:g}x coarser step "
            "(their row scales)")
