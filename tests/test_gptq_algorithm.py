"""GPTQ's fast path (lazy block updates, one factorization, layers sharing a Hessian quantized together) against a
textbook GPTQ written here column by column, on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.algorithms import gptq


def correlated_inputs(rng, rows, k):
    """Inputs with correlated features (as a transformer's are), so GPTQ's updates matter."""
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    return rng.standard_normal((rows, k)) @ mix


def textbook_gptq(w, h, bits, block, symmetric, damp=gptq.DAMP):
    """Frantar et al.'s algorithm 1 without lazy batching: each column quantized, its error spread at once over
    every later column through the Cholesky factor of the inverse Hessian computed the plain way."""
    k, n = w.shape
    maxq = 2**bits - 1
    W = np.asarray(w, dtype=np.float64).T.copy()
    H = np.array(h, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    damped = H + np.eye(k) * damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(damped)).T
    codes = np.empty((n, k), dtype=np.uint8)
    groups = -(-k // block)
    scales, zeros = np.empty((groups, n), np.float32), np.empty((groups, n), np.int64)
    for i in range(k):
        g = i // block
        if i % block == 0:
            scales[g], zeros[g] = gptq.group_grid(W[:, i:i + block], bits, symmetric)
        scale, zero = scales[g].astype(np.float64), zeros[g]
        q = np.clip(np.rint(W[:, i] / scale) + zero, 0, maxq)
        codes[:, i] = q
        err = (W[:, i] - (q - zero) * scale) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    return codes.T, scales, zeros.astype(np.uint8)


@pytest.mark.parametrize("k", [40, 300, 600])
def test_inverse_cholesky_upper_is_the_factor_of_the_damped_inverse(k):
    rng = np.random.default_rng(k)
    x = correlated_inputs(rng, 2 * k, k)
    h = x.T @ x
    upper = gptq.inverse_cholesky_upper(h, 0.01)
    damped = h + np.eye(k) * 0.01 * np.mean(np.diag(h))
    expected = np.linalg.cholesky(np.linalg.inv(damped)).T
    assert np.array_equal(upper, np.triu(upper))
    np.testing.assert_allclose(upper, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_allclose(upper.T @ upper @ damped, np.eye(k), atol=1e-8)


@pytest.mark.parametrize("n", [5, 256, 700])
def test_inverse_lower_by_halves_equals_the_inverse(n):
    rng = np.random.default_rng(n)
    lower = np.tril(rng.standard_normal((n, n)) / np.sqrt(n)) + 2 * np.eye(n)
    inverse = gptq.inverse_lower(lower, leaf=64)
    assert np.array_equal(inverse, np.tril(inverse))
    np.testing.assert_allclose(inverse @ lower, np.eye(n), atol=1e-10)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("lazy_block", [8, 32, 128])
@pytest.mark.parametrize("k, block", [(96, 32), (80, 16), (200, 64)])
def test_lazy_blocks_give_the_textbook_codes(symmetric, lazy_block, k, block):
    rng = np.random.default_rng(k + block + lazy_block)
    w = rng.standard_normal((k, 24)) / np.sqrt(k)
    x = correlated_inputs(rng, 4 * k, k)
    h = 2 * x.T @ x / len(x)
    fast = gptq.gptq(w, h, 4, block, symmetric, lazy_block=lazy_block)
    codes, scales, zeros = textbook_gptq(w, h, 4, block, symmetric)
    assert np.array_equal(fast.q, codes)
    np.testing.assert_allclose(fast.scales, scales, rtol=1e-6)
    assert np.array_equal(fast.zeros, zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_layers_sharing_a_hessian_quantized_together_get_their_own_codes(act_order):
    """q, k and v read one input: quantized as one [K, 3N] weight they must come out as if quantized alone."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 500, 128)
    h = 2 * x.T @ x / len(x)
    weights = [rng.standard_normal((128, n)) / 11 for n in (32, 48, 16)]
    joined = gptq.gptq(np.concatenate(weights, axis=1), h, 4, 32, act_order=act_order)
    start = 0
    for w in weights:
        alone = gptq.gptq(w, h, 4, 32, act_order=act_order)
        part = joined.columns(start, start + w.shape[1])
        start += w.shape[1]
        assert np.array_equal(part.q, alone.q)
        np.testing.assert_allclose(part.scales, alone.scales, rtol=1e-6)
        assert np.array_equal(part.zeros, alone.zeros)


def test_fast_path_quality_matches_the_textbook_on_a_wider_layer():
    """Whatever rounding ties do, the output error is the textbook's and well under round-to-nearest's."""
    rng = np.random.default_rng(11)
    k = 384
    x = correlated_inputs(rng, 1500, k)
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((k, 64)) / np.sqrt(k)
    fast = gptq.gptq(w, h, 4, 32).dequantize()
    codes, scales, zeros = textbook_gptq(w, h, 4, 32, True)
    textbook = gptq.dequantize(codes, scales, zeros, 32)
    ours, theirs = gptq.layer_error(x, w, fast), gptq.layer_error(x, w, textbook)
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours < 0.8 * gptq.layer_error(x, w, gptq.rtn(w, 4, 32).dequantize())


def test_hessian_from_shared_grams_equals_the_row_by_row_sum():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 48)).astype(np.float32)
    by_rows, by_gram = gptq.Hessian(48), gptq.Hessian(48)
    for part in (x[:100], x[100:101], x[101:]):
        by_rows.add(part)
        by_gram.add_gram(part.T.astype(np.float64) @ part.astype(np.float64), len(part))
    by_gram.add_gram(np.zeros((48, 48)), 0)  # an empty batch changes nothing
    exact = 2 * x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    np.testing.assert_allclose(by_gram.h, exact, rtol=1e-10)
    np.testing.assert_allclose(by_rows.h, exact, rtol=1e-10)
    assert by_rows.samples == by_gram.samples == 300


def test_blas_threads_limits_inside_the_block_and_restores_after():
    library = gptq._openblas()
    before = library[1]() if library else None
    with gptq.blas_threads(1):
        if library:
            assert library[1]() == 1
        np.linalg.cholesky(np.eye(8))
    if library:
        assert library[1]() == before
