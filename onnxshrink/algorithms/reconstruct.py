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
a batch padded to the largest kept count (padding rows and columns are an identity block,
decoupled from the rest) and solved with batched LAPACK calls, in chunks that bound the memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

DEFAULT_DAMPING = 1e-2
CHUNK_BYTES = 16 * 1024 * 1024
MAX_TOKEN_WEIGHT = 4.0  # a token far smaller than the median counts at most this many times a typical one


def token_weights(x: np.ndarray, samples: np.ndarray | None = None) -> np.ndarray:
    """Each row's weight in a layer's least-squares statistics when its rows are tokens: its sequence's median
    token norm over its own, so a token's output error counts relative to its size. `samples` says which
    sequence each row is from (rows of one sequence adjacent; None: one sequence), so the weights do not depend
    on how sequences were batched. A token far smaller than its sequence's typical one counts at most
    MAX_TOKEN_WEIGHT times as much.

    Why: a transformer's next LayerNorm divides every token by its own norm. Unweighted, a few tokens with
    "massive activations" hold most of X^T X (MPNet's FFN down-projections in blocks 6-10: tokens 8-13x the
    median norm; bench/activation_outliers.py) and every fit spends its accuracy on them; MPNet's 4-bit calibrated
    codebooks scored cosine 0.755 against 0.963 without calibration data (docs/benchmarks-cluster.md)."""
    x = np.asarray(x)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    typical = np.empty_like(norms)
    starts = [0] if samples is None else [0, *(np.flatnonzero(np.diff(np.asarray(samples))) + 1)]
    for start, stop in zip(starts, [*starts[1:], norms.size]):
        typical[start:stop] = np.median(norms[start:stop]) if stop > start else 0.0
    weights = np.ones_like(norms)
    usable = typical > 0
    weights[usable] = typical[usable] / np.maximum(norms[usable], typical[usable] / MAX_TOKEN_WEIGHT)
    return weights


class Gram:
    """Running X^T X, X^T Y and ||Y||^2 of a layer (float64), with a constant-1 input appended when `bias`."""

    def __init__(self, k: int, n: int = 0, bias: bool = False):
        self.k, self.n, self.bias = k, n, bias
        size = k + (1 if bias else 0)
        self.xtx = np.zeros((size, size), dtype=np.float64)
        self.xty = np.zeros((size, n), dtype=np.float64)
        self.yty = 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None, xtx: np.ndarray | None = None,
            weights: np.ndarray | None = None) -> None:
        """Fold in a batch of inputs (and outputs); `xtx` is this batch's X^T X when already computed for another
        layer reading the same inputs (it is the costly product), with the same `weights` (one per row, scaling
        the row's input, constant input and output: `token_weights`)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.k)
        if self.bias:
            x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        if weights is not None:
            x = x * np.asarray(weights, dtype=np.float64).reshape(-1, 1)
        self.xtx += x.T @ x if xtx is None else xtx
        if y is not None:
            y = np.asarray(y, dtype=np.float64).reshape(-1, self.n)
            if weights is not None:
                y = y * np.asarray(weights, dtype=np.float64).reshape(-1, 1)
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


class PackedGram:
    """Running X^T X of a layer's inputs (float64), kept as its upper triangle row by row: half a `Gram`'s memory,
    the same numbers. Why: prune holds every layer's X^T X from one capture run until it prunes that layer (MPNet:
    twelve 3072-wide FFN down-projections, 0.9 GB as full matrices). numpy computes x.T @ x with a symmetric
    rank-k update, so each batch's product, and their sum, is exactly symmetric: the lower triangle is redundant."""

    def __init__(self, k: int):
        self.k, self.rows = k, 0
        self.upper = np.zeros(k * (k + 1) // 2, dtype=np.float64)

    def add(self, x: np.ndarray, weights: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.k)
        if weights is not None:  # one per row (`token_weights`)
            x = x * np.asarray(weights, dtype=np.float64).reshape(-1, 1)
        product = x.T @ x
        for i, start in enumerate(self._starts()):
            self.upper[start:start + self.k - i] += product[i, i:]
        self.rows += x.shape[0]

    @property
    def xtx(self) -> np.ndarray:
        """The full [K, K] matrix: a new array on every read (read it once per use)."""
        full = np.empty((self.k, self.k), dtype=np.float64)
        for i, start in enumerate(self._starts()):
            row = self.upper[start:start + self.k - i]
            full[i, i:] = row
            full[i:, i] = row
        return full

    def input_norms(self) -> np.ndarray:
        """||x_k|| over all rows seen, one per input (as Gram's)."""
        return np.sqrt(np.maximum(self.upper[self._starts()], 0.0))

    def _starts(self) -> np.ndarray:
        """Where row i of the upper triangle (its entries i..K-1) starts in `upper`: the diagonal entries."""
        i = np.arange(self.k, dtype=np.int64)
        return i * self.k - i * (i - 1) // 2


@dataclass
class Refit:
    weight: np.ndarray  # [K, N] float32, zero outside the mask
    bias: np.ndarray | None  # [N] float32 when refit
    error_before: float  # relative output error of the masked weights, before the refit
    error_after: float


def refit(w0: np.ndarray, keep: np.ndarray, gram: Gram, bias0: np.ndarray | None = None,
          damping: float = DEFAULT_DAMPING) -> Refit:
    """Refit the kept weights of a [K, N] layer (and its bias when `gram.bias`) against the teacher outputs."""
    with _one_blas_thread():
        return _refit(w0, keep, gram, bias0, damping)


def _one_blas_thread():
    """Many small LAPACK solves run best on one BLAS thread: with OpenBLAS threading and a second busy
    core, a batch of 512 solves of 200 x 200 took 2-26 s instead of 0.17 s. threadpoolctl sets that
    when installed (it is optional); otherwise BLAS keeps its own setting (OPENBLAS_NUM_THREADS=1 helps)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _refit(w0, keep, gram, bias0, damping) -> Refit:
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
    g = gram.xtx + lam * np.eye(size)
    rhs_all = gram.xty + lam * w_aug  # [size, N]
    out = np.zeros_like(w_aug)
    kept = keep_aug.sum(axis=0)
    # Columns keeping few weights: solve G[S, S] w_S = r_S directly. Columns losing few: from H = G^-1,
    # w = H r - H[:, R] (H[R, R])^-1 (H r)[R] with R the removed inputs (w_R = 0 by construction),
    # so every column costs min(|S|, |R|)^3.
    direct = np.flatnonzero(kept <= size - kept)
    if direct.size:
        sets, count = _padded_sets(keep_aug[:, direct])
        for part in _chunks(len(direct), sets.shape[1]):
            idx, ok, cols = sets[part], count[part][:, None] > np.arange(sets.shape[1]), direct[part]
            rhs = np.where(ok, rhs_all[idx, cols[:, None]], 0.0)
            sol = _solve(_block(g, idx, ok), rhs)
            out[idx[ok], np.repeat(cols, count[part])] = sol[ok]
    dual = np.flatnonzero(kept > size - kept)
    if dual.size:
        h = np.linalg.inv(g)
        u = h @ rhs_all[:, dual]  # the unconstrained solutions, [size, columns]
        out[:, dual] = u
        sets, count = _padded_sets(~keep_aug[:, dual])
        if sets.shape[1]:
            for part in _chunks(len(dual), max(sets.shape[1], size)):
                idx, ok, cols = sets[part], count[part][:, None] > np.arange(sets.shape[1]), dual[part]
                u_r = np.where(ok, u[idx, part[:, None]], 0.0)
                lam_r = _solve(_block(h, idx, ok), u_r)  # [c, |R|]
                correction = np.einsum("kcr,cr->kc", np.where(ok[None], h[:, idx], 0.0), lam_r)
                out[:, cols] -= correction
            out[:, dual] *= keep_aug[:, dual]  # exact zeros where removed (the formula gives ~1e-16)
    after = gram.error(out)
    if after > before:  # never worse than plain masking on the calibration data
        out, after = w_aug, before
    weight = out[:k].astype(np.float32)
    return Refit(weight, out[k].astype(np.float32) if gram.bias else None, before, after)


def _padded_sets(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices where each column of `mask` is true, padded with 0: [columns, widest], and the counts."""
    count = mask.sum(axis=0)
    width = int(count.max()) if count.size else 0
    order = np.argsort(~mask, axis=0, kind="stable")[:width].T
    return np.where(np.arange(width)[None, :] < count[:, None], order, 0), count


def _chunks(columns: int, width: int):
    step = max(1, CHUNK_BYTES // (8 * max(width, 1) ** 2))
    for start in range(0, columns, step):
        yield np.arange(start, min(start + step, columns))


def _block(m: np.ndarray, idx: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """m[idx, idx] per column, with an identity block where the index is padding."""
    a = np.where(ok[:, :, None] & ok[:, None, :], m[idx[:, :, None], idx[:, None, :]], 0.0)
    diagonal = np.arange(idx.shape[1])
    a[:, diagonal, diagonal] += ~ok
    return a


def _solve(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(a[i], rhs[i], rcond=None)[0] for i in range(len(a))])
