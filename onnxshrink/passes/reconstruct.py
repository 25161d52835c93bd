"""Least-squares refit of a pruned layer so that its outputs match the original model's (the teacher).

A layer computes Y = X W (+ b) with W [K, N] (K inputs, N outputs). After pruning, only the
weights of a mask may be non-zero. For each output column j the kept weights are refit:

    min over w_j[S_j]:  || X w_j - y_j ||^2  +  lam * || w_j - w0_j ||^2

where X are the layer's inputs with every upstream layer already pruned, y_j the ORIGINAL
model's output of this layer on the same calibration inputs, and w0 the weights before the
refit. Only X^T X (the Gram matrix G, K x K) and X^T Y are kept, accumulated batch by batch,
so memory does not grow with the calibration set. The damping pulls towards w0 (not towards
zero): a layer whose mask removes nothing is a fixed point, so refitting twice changes
nothing more. lam = damping * mean(diag G).

A bias is refit too, as one more input that is always 1 and never pruned.

Columns are solved together: each column's kept-index submatrix G[S_j, S_j] is gathered into
a batch padded to the largest kept count (padding rows are an identity block, decoupled from
the rest) and solved with one batched LAPACK call, in chunks that bound the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_DAMPING = 1e-2
CHUNK_BYTES = 64 * 1024 * 1024


class Gram:
    """Running X^T X, X^T Y and ||Y||^2 of a layer (float64), with a constant-1 input appended when `bias`."""

    def __init__(self, k: int, n: int = 0, bias: bool = False):
        self.k, self.n, self.bias = k, n, bias
        size = k + (1 if bias else 0)
        self.xtx = np.zeros((size, size), dtype=np.float64)
        self.xty = np.zeros((size, n), dtype=np.float64)
        self.yty = 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.k)
        if self.bias:
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        self.xtx += x.T @ x
        if y is not None:
            y = np.asarray(y, dtype=np.float64).reshape(-1, self.n)
            self.xty += x.T @ y
            self.yty += float(np.sum(y * y))
        self.rows += x.shape[0]

    def input_norms(self) -> np.ndarray:
        """||x_k|| over all rows seen, one per input (the bias input excluded)."""
        return np.sqrt(np.maximum(np.diag(self.xtx)[: self.k], 0.0))

    def error(self, w: np.ndarray) -> float:
        """||X w - Y|| / ||Y|| for augmented weights w [K(+1), N]."""
        if self.yty <= 0:
            return 0.0
        sq = float(np.sum(w * (self.xtx @ w)) - 2.0 * np.sum(w * self.xty) + self.yty)
        return float(np.sqrt(max(sq, 0.0) / self.yty))


@dataclass
class Refit:
    weight: np.ndarray  # [K, N] float32, zero outside the mask
    bias: np.ndarray | None  # [N] float32 when refit
    error_before: float  # relative output error of the masked weights, before the refit
    error_after: float


def refit(w0: np.ndarray, keep: np.ndarray, gram: Gram, bias0: np.ndarray | None = None,
          damping: float = DEFAULT_DAMPING) -> Refit:
    """Refit the kept weights of a [K, N] layer (and its bias when `gram.bias`) against the teacher outputs."""
    k, n = w0.shape
    w_aug = np.asarray(w0, dtype=np.float64) * keep
    keep_aug = keep
    if gram.bias:
        b = np.zeros(n) if bias0 is None else np.asarray(bias0, dtype=np.float64).reshape(n)
        w_aug = np.concatenate([w_aug, b[None, :]], axis=0)
        keep_aug = np.concatenate([keep, np.ones((1, n), dtype=bool)], axis=0)
    before = gram.error(w_aug)
    size = w_aug.shape[0]
    lam = damping * max(float(np.mean(np.diag(gram.xtx))), 1e-12)
    # G extended by one decoupled identity row/column that padding indices point to.
    g = np.zeros((size + 1, size + 1))
    g[:size, :size] = gram.xtx
    g[np.arange(size), np.arange(size)] += lam
    g[size, size] = 1.0
    rhs_all = gram.xty + lam * w_aug  # [size, N]
    counts = keep_aug.sum(axis=0)
    width = int(counts.max()) if n else 0
    out = np.zeros_like(w_aug)
    if width:
        # Kept indices of each column, padded with the dummy index `size`.
        order = np.argsort(~keep_aug, axis=0, kind="stable")[:width].T  # [N, width]
        valid = np.arange(width)[None, :] < counts[:, None]
        index = np.where(valid, order, size)
        chunk = max(1, CHUNK_BYTES // (8 * width * width))
        for start in range(0, n, chunk):
            cols = np.arange(start, min(start + chunk, n))
            idx = index[cols]
            a = g[idx[:, :, None], idx[:, None, :]]
            rhs = np.where(valid[cols], rhs_all[np.minimum(idx, size - 1), cols[:, None]], 0.0)
            try:
                sol = np.linalg.solve(a, rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:
                sol = np.stack([np.linalg.lstsq(a[i], rhs[i], rcond=None)[0] for i in range(len(cols))])
            rows = idx[valid[cols]]
            out[rows, np.repeat(cols, counts[cols])] = sol[valid[cols]]
    after = gram.error(out)
    if after > before:  # never worse than plain masking on the calibration data
        out, after = w_aug, before
    weight = out[:k].astype(np.float32)
    return Refit(weight, out[k].astype(np.float32) if gram.bias else None, before, after)
