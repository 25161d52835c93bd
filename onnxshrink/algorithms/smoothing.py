"""SmoothQuant's activation-to-weight scale migration, on plain arrays (Xiao et al., 2023).

A layer Y = X W (X [rows, K], W [K, N]) is unchanged when channel j of X is divided by s_j
and row j of W multiplied by s_j. Transformer activations have a few channels 10-200x
larger than the rest (MiniLM's LayerNorm outputs: channel 99 at 16x the median channel's
maximum), and one per-tensor uint8 scale spends its 256 levels on them; the weights, int8
per output channel, can take part of that range:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (W_j: row j, over every layer reading X)

alpha is searched per layer on calibration rows by the error of the int8 fake-quantized
layer, uint8 asymmetric per-tensor activations and int8 symmetric per-channel weights as
passes/quantize_static.py writes them. "No smoothing" is a candidate too, so a layer
whose activations have no outliers keeps s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# s is clipped to this range: a dead channel (max 0) keeps s = 1, and no scale may push a weight row or an
# activation channel towards float32's limits.
SCALE_LIMITS = (1e-3, 1e3)


@dataclass
class AlphaSearch:
    """The outcome of one layer's search: alpha None means no smoothing measured best."""

    alpha: float | None
    scales: np.ndarray  # [K], ones when alpha is None
    error: float  # relative squared error of the fake-quantized layer(s) with these scales
    baseline: float  # the same without smoothing
    errors: dict  # alpha -> error, for the report


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), 1 where a channel is dead in X or W."""
    x_absmax = np.asarray(x_absmax, np.float64)
    w_absmax = np.asarray(w_absmax, np.float64)
    live = (x_absmax > 0) & (w_absmax > 0)
    s = np.ones_like(x_absmax)
    s[live] = x_absmax[live] ** alpha / w_absmax[live] ** (1.0 - alpha)
    return np.clip(s, *SCALE_LIMITS).astype(np.float32)


def fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """uint8 asymmetric per-tensor over x's min/max (0 exact), dequantized."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255.0
    if scale <= 0:
        return np.zeros_like(x)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """int8 symmetric per output channel (column of a [K, N] weight), dequantized."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)


def quantized_error(x: np.ndarray, weights: list, scales: np.ndarray) -> float:
    """sum_i ||X W_i - Q(X / s) Q(s W_i)||^2 / sum_i ||X W_i||^2."""
    xq = fake_quant_activation(x / scales)
    error = total = 0.0
    for w in weights:
        reference = x @ w
        candidate = xq @ fake_quant_weight(w * scales[:, None])
        error += float(np.sum((reference - candidate) ** 2, dtype=np.float64))
        total += float(np.sum(reference**2, dtype=np.float64))
    return error / total if total > 0 else 0.0


def search_alpha(x: np.ndarray, weights: list, x_absmax: np.ndarray | None = None, alphas=ALPHAS) -> AlphaSearch:
    """The alpha (or none) whose scales give the least fake-quantized error on the rows x.

    `weights` are the [K, N] weights of every layer that reads x: they share one s, since one
    tensor feeds them. `x_absmax` is the per-channel maximum over all calibration data (x may
    be a sample of its rows); by default x's own.
    """
    x = np.asarray(x, np.float32)
    weights = [np.asarray(w, np.float32) for w in weights]
    if x_absmax is None:
        x_absmax = np.abs(x).max(axis=0)
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    ones = np.ones(x.shape[1], np.float32)
    baseline = quantized_error(x, weights, ones)
    best = AlphaSearch(None, ones, baseline, baseline, {})
    for alpha in alphas:
        scales = smoothing_scales(x_absmax, w_absmax, alpha)
        error = quantized_error(x, weights, scales)
        best.errors[float(alpha)] = error
        if error < best.error:
            best.alpha, best.scales, best.error = float(alpha), scales, error
    return best
