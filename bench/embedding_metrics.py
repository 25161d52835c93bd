"""Sentence-embedding quality of a compressed encoder against fp32, in numpy only (tests/test_bench_metrics.py).

What a user of a sentence-embedding model sees: the mean-pooled embedding of each sentence (its direction), which
sentences come out as its nearest neighbours, and the order of all pairwise similarities (search and clustering
depend on the ranking, not on the values).
"""

from __future__ import annotations

import numpy as np


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[batch, sequence, dim] token states -> [batch, dim], averaged over the tokens the attention mask keeps
    (sentence-transformers' pooling: padding must not count)."""
    weights = mask.astype(np.float64)[:, :, None]
    return (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def pooled_embeddings(session, held: dict, batch: int = 50) -> np.ndarray:
    """Mean-pooled embeddings of the held-out sentences (an .npz's arrays) through an onnxruntime session, in batches."""
    names = {i.name for i in session.get_inputs()}
    out = []
    for start in range(0, len(held["input_ids"]), batch):
        feed = {k: v[start:start + batch] for k, v in held.items() if k in names}
        out.append(mean_pool(session.run(None, feed)[0], feed["attention_mask"]))
    return np.concatenate(out)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each candidate embedding with the same sentence's reference embedding."""
    return np.sum(_unit(reference) * _unit(candidate), axis=1)


def similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    unit = _unit(embeddings.astype(np.float64))
    return unit @ unit.T


def neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices of each sentence's k most similar other sentences (itself excluded), most similar first."""
    similarity = similarity_matrix(embeddings)
    np.fill_diagonal(similarity, -np.inf)
    # A stable sort on the negated similarity: ties go to the lower index in both models alike.
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def topk_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> float:
    """Mean fraction of each sentence's k nearest neighbours under the reference that the candidate also finds."""
    if len(reference) <= k:
        raise ValueError(f"need more than k={k} sentences, got {len(reference)}")
    ours, theirs = neighbours(reference, k), neighbours(candidate, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1]
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    result = np.empty(len(values), dtype=np.float64)
    result[order] = np.repeat(average, ends - starts)
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else float("nan")


def pairwise_spearman(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Spearman correlation of all pairwise cosine similarities (the upper triangle) under the two models."""
    upper = np.triu_indices(len(reference), k=1)
    return spearman(similarity_matrix(reference)[upper], similarity_matrix(candidate)[upper])


def embedding_quality(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> dict:
    """The bench's quality columns for one method: mean and worst cosine, top-k overlap, pairwise Spearman."""
    cosines = row_cosines(reference, candidate)
    return {"cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)),
            "topk": topk_overlap(reference, candidate, k), "spearman": pairwise_spearman(reference, candidate)}
