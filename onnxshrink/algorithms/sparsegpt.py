"""One-shot pruning with OBS weight updates (SparseGPT, Frantar & Alistarh 2023). Knows nothing about ONNX.

A layer computes Y = X W with W [K, N] (K inputs, N outputs, as a MatMul reads it) and H = X^T X [K, K].
Pruning minimises ||X W - X W'||^2 with a fraction of W' zero. Inputs are visited in order k = 0..K-1 (rows
of W here, the "columns" of the paper's W^T): row k's pruned weights are set to zero and the error is spread
over the rows not yet visited by the Optimal Brain Surgeon update, using the upper Cholesky factor U of H^-1
(U^T U = H^-1): the row of U at k holds the inverse Hessian of the inputs k.. with the earlier ones fixed.
Updates are lazy in blocks of `block` rows (the GPTQ scheme, algorithms/gptq.py).

The mask is chosen per block from the weights as updated so far: a weight's cost is w^2 / U_kk^2, the
OBS saliency; unstructured keeps the layer's fraction of zeros in every block (cumulative rounding, so the
total is exact), N:M removes the M-N cheapest of every M consecutive inputs per output.

Zeros already in W cost nothing and are taken first, so pruning a pruned layer to the same sparsity
changes nothing. Inputs that were zero throughout calibration (H_kk = 0) get a unit diagonal: their
weights are pruned by magnitude and compensated by nothing, as in the reference code.
"""

from __future__ import annotations

import numpy as np

from onnxshrink.algorithms.gptq import inverse_cholesky_upper

BLOCK = 128
DAMP = 0.01
CG_ITERATIONS = 25
KEPT_REFIT_DAMP = 0.1  # refit_kept's pull towards the dense weights, relative to mean(diag H)


def sparsegpt(w: np.ndarray, h: np.ndarray, zeros: int = 0, nm: tuple[int, int] | None = None,
              block: int = BLOCK, damp: float = DAMP, mask: np.ndarray | None = None) -> np.ndarray:
    """Pruned copy of w ([K, N], float64 result) with `zeros` zeros (or N of every M along K kept, `nm`).

    `mask` ([K, N], True = prune) fixes which weights go; only the compensating updates are computed."""
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian is {h.shape}, weight has K={k}")
    W = np.asarray(w, dtype=np.float64).copy()
    H = np.array(h, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    if np.all(dead):
        H = np.eye(k)
    U = inverse_cholesky_upper(H, damp)
    diag = np.diag(U) ** 2
    zeros = int(min(max(zeros, 0), W.size))
    if nm is not None:
        block = max(nm[1], block - block % nm[1])  # an N:M group never straddles two blocks
    pruned_so_far = 0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if mask is not None:
            prune1 = np.asarray(mask[i1:i2], dtype=bool)
        elif nm is None:
            want = int(round(zeros * i2 / k)) - pruned_so_far  # cumulative rounding: the total is exact
            prune1 = _cheapest(W1 ** 2 / diag[i1:i2, None], want)
            pruned_so_far += want
        else:
            prune1 = np.zeros_like(W1, dtype=bool)
        for i in range(i2 - i1):
            if nm is not None and mask is None and (i1 + i) % nm[1] == 0:
                end = min(i + nm[1], i2 - i1)
                prune1[i:end] = _nm_rows(W1[i:end] ** 2 / diag[i1 + i:i1 + end, None], nm)
            row = W1[i]
            err = np.where(prune1[i], row, 0.0) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            W1[i] = np.where(prune1[i], 0.0, W1[i])  # exact zeros (the update leaves ~1e-16)
            Err1[i] = err
        W[i1:i2] = W1
        W[i2:] -= U[i1:i2, i2:].T @ Err1
    return W


def _cheapest(score: np.ndarray, count: int) -> np.ndarray:
    """Mask (True = prune) of the `count` smallest scores; zeros first, ties in index order."""
    out = np.zeros(score.shape, dtype=bool)
    if count <= 0:
        return out
    flat = score.reshape(-1)
    count = min(count, flat.size)
    out.reshape(-1)[np.argsort(flat, kind="stable")[:count]] = True
    return out


def _nm_rows(score: np.ndarray, nm: tuple[int, int]) -> np.ndarray:
    """Prune mask of M consecutive rows (fewer at the end, which keep N as prune's mask does): all but the N
    dearest per column."""
    keep_n, m = nm
    drop = max(score.shape[0] - keep_n, 0)
    order = np.argsort(score, axis=0, kind="stable")
    out = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(out, order[:drop], True, axis=0)
    return out


def teacher_weights(w: np.ndarray, h: np.ndarray, cross: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The dense weights that best map this layer's inputs X (upstream already pruned, H = X^T X) to the original
    model's outputs X0 W (cross = X^T X0): (H + damp*mean(diag H)*I)^-1 cross W. Pruning these with H minimises
    ||X W' - X0 W||^2 up to a constant, so each layer also corrects the drift of the layers before it."""
    h = np.asarray(h, dtype=np.float64)
    lam = damp * max(float(np.mean(np.diag(h))), 1e-12)
    return np.linalg.solve(h + lam * np.eye(h.shape[0]), np.asarray(cross, dtype=np.float64) @ np.asarray(w, np.float64))


def refit_kept(w: np.ndarray, pruned: np.ndarray, h: np.ndarray, damping: float = KEPT_REFIT_DAMP,
               iterations: int = CG_ITERATIONS) -> np.ndarray:
    """The weights kept by `pruned` (its non-zeros) refit by least squares to X W from H alone: the OBS updates
    cannot move a row once it is passed, a refit moves all of them (the better of the two is returned).

    The objective is ||X (W - W')||^2 + lam ||W - W'||^2 over the kept weights, lam = damping * mean(diag H): the
    damped Hessian the OBS updates use, so the refit pulls kept weights towards their dense values, not towards
    zero. With fewer calibration rows than inputs (MiniLM's 1536-input FFN output layer: 1530 tokens) X^T X is
    singular and a nearly undamped refit (1e-6, as before) fits those rows: damping 0.1 raised held-out cosine at
    50% from 0.932 to 0.941 (docs/prune.md).

    Conjugate gradients on every output at once, from the OBS result, preconditioned by diag(H): each step is one
    H @ W product (K^2 N), where solving each output's kept system exactly costs N kept^3 (MiniLM's FFN output
    layer: seconds instead of a minute)."""
    t = np.asarray(w, dtype=np.float64)
    start = np.asarray(pruned, dtype=np.float64)
    keep = start != 0
    h = np.asarray(h, dtype=np.float64)
    lam = damping * max(float(np.mean(np.diag(h))), 1e-12)
    damped = h + lam * np.eye(h.shape[0])
    d = np.diag(damped)[:, None]
    x = start.copy()
    r = keep * (damped @ (t - x))
    z = r / d
    p = z.copy()
    rz = np.sum(r * z, axis=0)
    for _ in range(iterations):
        ap = keep * (damped @ p)  # the masked, damped Hessian
        curvature = np.sum(p * ap, axis=0)
        alpha = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0)
        x += alpha * p
        r -= alpha * ap
        z = r / d
        rz_new = np.sum(r * z, axis=0)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta * p
        rz = rz_new
    x *= keep  # exact zeros where pruned
    return x if output_error(t, x, damped) < output_error(t, start, damped) else start


def output_error(w: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    """||X (W - W')||_F / ||X W||_F from H = X^T X alone."""
    d = np.asarray(w, dtype=np.float64) - w_new
    num = float(np.sum(d * (h @ d)))
    den = float(np.sum(w * (h @ w)))
    return float(np.sqrt(max(num, 0.0) / max(den, 1e-300)))
