"""Blockwise low-bit weight quantization in numpy: round-to-nearest and GPTQ. Knows nothing about ONNX.

Weights are [K, N] as a MatMul reads them (K inputs, N outputs) and are quantized in
groups of `block_size` consecutive rows along K, one scale (and zero point) per group
and output column: value = (q - zero) * scale, q in [0, 2**bits - 1].

Grid of one group, the same for RTN and GPTQ:
  symmetric   zero = 2**(bits-1); scale = m / -2**(bits-1), m the group's value of largest
              magnitude with its sign, so m lands exactly on the most negative code and all
              2**bits codes are used (onnxruntime's MatMulNBits quantizer does the same).
  asymmetric  range [min(w, 0), max(w, 0)] over 2**bits - 1 steps, integer zero point.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): with H = 2 X^T X over calibration inputs X of the layer,
quantize the weights one input column at a time and spread each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian, which minimizes
||X W - X W_q|| far better than rounding each weight alone. As in the reference code:
1% dampening of the diagonal, the upper Cholesky factor of H^-1, lazy updates in blocks
of LAZY_BLOCK columns, optional act_order (columns by decreasing Hessian diagonal), and a group
grid taken from the error-updated weights when quantization reaches the group
(with act_order, from the original weights, "static groups", so groups stay contiguous
along K as the blockwise format needs). One deviation: weights of inputs that were zero
throughout calibration are quantized as they are instead of being zeroed, so inputs the
calibration data never showed still work.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass

import numpy as np

# Columns updated at once before the error is carried to the rest by one matrix product. The paper's 128 suits a
# GPU; on CPU numpy the per-column updates inside a block are memory-bound and 32 ran 1.3-1.6x faster at
# MPNet's shapes (768x2304, 3072x768; same codes: tests/test_gptq_algorithm.py).
LAZY_BLOCK = 32
DAMP = 0.01


@dataclass
class BlockQuantized:
    """q: [K, N] codes (uint8, unpacked, unpadded); scales and zeros: [n_blocks, N]."""

    q: np.ndarray
    scales: np.ndarray  # float32
    zeros: np.ndarray  # uint8
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scales, self.zeros, self.block_size)

    def columns(self, start: int, stop: int) -> "BlockQuantized":
        """Output columns start:stop (one layer of several quantized together as one wider weight)."""
        return BlockQuantized(np.ascontiguousarray(self.q[:, start:stop]), np.ascontiguousarray(self.scales[:, start:stop]),
                              np.ascontiguousarray(self.zeros[:, start:stop]), self.bits, self.block_size)


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """(q - zero) * scale in float32, each group's parameters broadcast over its rows; [K, N]."""
    k = q.shape[0]
    s = np.repeat(scales.astype(np.float32), block_size, axis=0)[:k]
    z = np.repeat(zeros.astype(np.float32), block_size, axis=0)[:k]
    return (q.astype(np.float32) - z) * s


def group_grid(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (integer) of each row of w, a [rows, group] slice.

    Computed in float32 as onnxruntime's MLAS blockwise quantizer does (same scales, same
    choice of the negative value on a magnitude tie, zero point rounded half away from zero).
    """
    w = np.asarray(w, dtype=np.float32)
    maxq = 2**bits - 1
    hi, lo = w.max(axis=1), w.min(axis=1)
    if symmetric:
        half = 2 ** (bits - 1)
        signed = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = signed / np.float32(-half)
        zero = np.full(w.shape[0], half, dtype=np.int64)
    else:
        lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
        scale = (hi - lo) / np.float32(maxq)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_fp = np.where(scale != 0, -lo / scale, np.float32(0)).astype(np.float64)
        zero = np.clip(np.floor(zero_fp + 0.5), 0, maxq).astype(np.int64)
    # A group of zeros: any nonzero scale represents it exactly (q = zero).
    scale = np.where(scale != 0, scale, np.float32(1)).astype(np.float32)
    return scale, zero


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of w ([rows, ...]) on the grid of each row (scale/zero broadcast along axis 0)."""
    shape = (-1,) + (1,) * (np.ndim(w) - 1)
    s = np.asarray(scale, dtype=np.float64).reshape(shape)
    z = np.asarray(zero, dtype=np.float64).reshape(shape)
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) / s) + z, 0, 2**bits - 1)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuantized:
    """Round each weight to the nearest code of its group's grid."""
    wt = np.asarray(w, dtype=np.float32).T  # [N, K]: a group is a column slice
    n, k = wt.shape
    groups = -(-k // block_size)
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((groups, n), dtype=np.float32)
    zeros = np.empty((groups, n), dtype=np.uint8)
    for g in range(groups):
        cols = slice(g * block_size, min((g + 1) * block_size, k))
        scale, zero = group_grid(wt[:, cols], bits, symmetric)
        codes[:, cols] = quantize_codes(wt[:, cols], scale, zero, bits)
        scales[g], zeros[g] = scale, zero
    return BlockQuantized(np.ascontiguousarray(codes.T), scales, zeros, bits, block_size)


@contextlib.contextmanager
def blas_threads(limit: int):
    """At most `limit` BLAS threads inside the block (threadpoolctl when installed, else OpenBLAS's own setter).

    On a busy 2-core machine (load average 10) OpenBLAS's threads wait on each other: a Cholesky and triangular
    inverse at K=1536 took 6-8 s on 2 threads and 0.6 s on one, and made 4-bit GPTQ on MiniLM half factorization."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        with threadpool_limits(limits=limit, user_api="blas"):
            yield
        return
    library = _openblas()
    if library is None:
        yield
        return
    before = library[1]()
    library[0](min(limit, before))
    try:
        yield
    finally:
        library[0](before)


_OPENBLAS: list = []


def _openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS numpy loaded (Linux), or None."""
    if not _OPENBLAS:
        found = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line.split()[-1]}
            for path in sorted(paths):
                library = ctypes.CDLL(path)
                for prefix in ("scipy_openblas_", "openblas_"):
                    for suffix in ("64_", "_64_", ""):
                        setter = getattr(library, f"{prefix}set_num_threads{suffix}", None)
                        getter = getattr(library, f"{prefix}get_num_threads{suffix}", None)
                        if setter is not None and getter is not None:
                            setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                            found = (setter, getter)
                            break
                    if found:
                        break
                if found:
                    break
        except (OSError, IndexError):
            found = None
        _OPENBLAS.append(found)
    return _OPENBLAS[0]


class Hessian:
    """Running H = 2/n * sum X^T X of a layer's inputs; only this K x K matrix is kept (float64).

    `add_gram` takes a batch as its X^T X, so layers reading one tensor (q, k and v) share one product; the pass
    computes it in float32 (half a float64 product's time; a batch's few thousand rows lose nothing a 1%
    dampening would notice) and the sum across batches stays float64."""

    def __init__(self, k: int):
        self.k = k
        self.h = np.zeros((k, k), dtype=np.float64)
        self.samples = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1, self.k).astype(np.float64)
        if x.shape[0]:
            self.add_gram(x.T @ x, x.shape[0])

    def add_gram(self, xtx: np.ndarray, rows: int) -> None:
        """Add a batch given as its X^T X over `rows` rows (layers reading one tensor share it)."""
        if rows == 0:
            return
        total = self.samples + rows
        self.h *= self.samples / total
        self.h += (2.0 / total) * np.asarray(xtx, dtype=np.float64)
        self.samples = total


def inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 (U^T U = H^-1); damping grows if needed.

    One factorization and one triangular inverse: with J the order reversal, chol(J H J) = M gives H = R R^T with
    R = J M J upper, so H^-1 = R^-T R^-1 and U = R^-1 = J M^-1 J (the same U as chol(inv(H)), a third the work)."""
    mean_diag = float(np.mean(np.diag(h)))
    reversed_h = np.asarray(h, dtype=np.float64)[::-1, ::-1]
    for attempt in range(6):
        damped = reversed_h + np.eye(h.shape[0]) * damp * mean_diag * (10.0**attempt)
        try:
            lower = np.linalg.cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(np.triu(inverse_lower(lower)[::-1, ::-1]))
    raise np.linalg.LinAlgError("Hessian is not positive definite even with 10^5 x dampening")


def inverse_lower(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """Inverse of a lower-triangular matrix by halves, [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]:
    the work lands in matrix products (np.linalg.inv, a general LU, took 3x a Cholesky at K=1536)."""
    n = lower.shape[0]
    if n <= leaf:
        return np.tril(np.linalg.inv(lower))
    half = n // 2
    a_inv, d_inv = inverse_lower(lower[:half, :half], leaf), inverse_lower(lower[half:, half:], leaf)
    out = np.zeros_like(lower)
    out[:half, :half], out[half:, half:] = a_inv, d_inv
    out[half:, :half] = -d_inv @ (lower[half:, :half] @ a_inv)
    return out


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    damp: float = DAMP,
    act_order: bool = False,
    lazy_block: int = LAZY_BLOCK,
) -> BlockQuantized:
    """GPTQ-quantize w ([K, N]) given H ([K, K]) of the layer's inputs; groups of block_size along K."""
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian is {hessian.shape}, weight has K={k}")
    maxq = 2**bits - 1
    W = np.asarray(w, dtype=np.float64).T.copy()  # [N, K]: columns are inputs, as in the paper
    pruned = W == 0  # pruned weights stay exactly zero; the error of keeping them there is compensated like rounding
    H = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    if not np.any(~dead):  # no input ever nonzero: nothing to compensate with
        return rtn(w, bits, block_size, symmetric)
    groups = -(-k // block_size)
    scales = np.empty((groups, n), dtype=np.float32)
    zeros = np.empty((groups, n), dtype=np.int64)
    if act_order:
        for g in range(groups):  # static groups: grid from the original weights
            scales[g], zeros[g] = group_grid(W[:, g * block_size:(g + 1) * block_size], bits, symmetric)
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H, pruned = W[:, perm], H[np.ix_(perm, perm)], pruned[:, perm]
    else:
        perm = np.arange(k)
    U = inverse_cholesky_upper(H, damp)
    codes = np.empty((n, k), dtype=np.uint8)
    for i1 in range(0, k, lazy_block):
        i2 = min(i1 + lazy_block, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = perm[i1 + i]
            g = column // block_size
            if not act_order and column % block_size == 0:
                end = min(column + block_size, k)  # columns of this group, as updated so far
                current = W1[:, i:min(end, i2) - i1]
                if end > i2:
                    current = np.hstack([current, W[:, i2:end]])
                scales[g], zeros[g] = group_grid(current, bits, symmetric)
            scale = scales[g].astype(np.float64)
            zero = zeros[g]
            x = W1[:, i]
            q = np.where(pruned[:, i1 + i], zero, np.clip(np.rint(x / scale) + zero, 0, maxq))
            codes[:, i1 + i] = q
            err = (x - (q - zero) * scale) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if act_order:
        unpermuted = np.empty_like(codes)
        unpermuted[:, perm] = codes
        codes = unpermuted
    return BlockQuantized(np.ascontiguousarray(codes.T), scales, zeros.astype(np.uint8), bits, block_size)


def layer_error(x: np.ndarray, w: np.ndarray, w_q: np.ndarray) -> float:
    """||X W - X W_q||_F / ||X W||_F for a layer's inputs x ([..., K])."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, w.shape[0])
    reference = x @ np.asarray(w, dtype=np.float64)
    return float(np.linalg.norm(reference - x @ np.asarray(w_q, dtype=np.float64)) / max(np.linalg.norm(reference), 1e-30))
