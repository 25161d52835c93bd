"""Activation ranges for static quantization, from calibration batches streamed one at a time.

Memory stays bounded whatever the calibration set's size: each batch's activations
are folded into per-tensor statistics (running min/max, and for the histogram
methods a fixed-size histogram) and dropped before the next batch runs.

The histogram of a tensor has BINS bins for each sign over [0, R), R the power of two
above the largest magnitude seen. When a batch reaches R, R doubles and adjacent bins
merge in pairs: re-binning is exact, and zero stays a bin edge, so a Relu output's many
exact zeros never leak into the negative side.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

from onnxshrink.runtime import capture_activations

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048  # per sign; TensorRT's entropy calibrator uses 2048 bins over |x| too
ENTROPY_LEVELS = 128  # TensorRT's: the levels int8 has for one sign


class RangeStats:
    """Running min/max of one tensor, and optionally its two-sided magnitude histogram."""

    def __init__(self, bins: int | None = BINS):
        self.low = np.inf
        self.high = -np.inf
        self.bins = bins
        self.pos = self.neg = None  # counts of x >= 0 and of -x for x < 0, over [0, reach)
        self.reach = 0.0
        self.zeros = 0  # values seen before the histogram exists, all exactly 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.size and not np.isfinite(x).all():
            x = x[np.isfinite(x)]  # an inf/NaN would stretch every range to uselessness
        if x.size == 0:
            return
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        if not self.bins:
            return
        magnitude = max(-self.low, self.high)
        if magnitude <= 0:  # all zeros so far: count them, and size the histogram on the first nonzero value
            self.zeros += x.size
            return
        if self.pos is None:
            self.reach = float(2.0 ** np.ceil(np.log2(magnitude)))  # powers of two: halving/doubling stay exact
            self.pos = np.zeros(self.bins, np.int64)
            self.neg = np.zeros(self.bins, np.int64)
            self.pos[0] = self.zeros
        while magnitude >= self.reach:  # every value strictly below reach: none clamped into the last bin
            self.reach *= 2.0
            self.pos = _merge_pairs(self.pos)
            self.neg = _merge_pairs(self.neg)
        width = self.reach / self.bins
        for side, part in ((self.pos, x[x >= 0]), (self.neg, -x[x < 0])):
            if part.size:
                # float64: x / (2^k w) is then exactly (x / w) / 2^k, so merged bins equal re-binned ones.
                index = np.minimum((part.astype(np.float64) / width).astype(np.int64), self.bins - 1)
                side += np.bincount(index, minlength=self.bins)

    @property
    def width(self) -> float:
        return self.reach / self.bins

    def minmax(self) -> tuple[float, float]:
        if not np.isfinite(self.low):
            return 0.0, 0.0
        return _with_zero(self.low, self.high)

    def percentile(self, percentile: float) -> tuple[float, float]:
        """Cut (100 - p) / 2 percent of the values from each tail, as onnxruntime's calibrator does."""
        if self.pos is None:
            return self.minmax()
        # One axis from -reach to +reach: negative bins reversed, then positive bins.
        counts = np.concatenate([self.neg[::-1], self.pos]).astype(np.float64)
        edges = np.arange(-self.bins, self.bins + 1) * self.width
        cdf = np.cumsum(counts) / counts.sum()
        cut = (100.0 - percentile) / 200.0
        low = edges[int(np.searchsorted(cdf, cut, side="right"))]
        high = edges[min(int(np.searchsorted(cdf, 1.0 - cut, side="left")) + 1, len(edges) - 1)]
        return _with_zero(max(low, self.low), min(high, self.high))

    def entropy(self, levels: int = ENTROPY_LEVELS) -> tuple[float, float]:
        """TensorRT's KL-divergence threshold on |x| with 128 levels, as for int8 (uint8 then has 256 over it)."""
        if self.pos is None:
            return self.minmax()
        hist = (self.pos + self.neg).astype(np.float64)
        # A Relu output's exact zeros are a spike in bin 0 that would dominate P and pull the threshold down
        # to the first candidate (measured: 0.95 -> 0.70 accuracy on a CNN); like NVIDIA's calibrator, bin 0
        # takes bin 1's count.
        hist[0] = hist[1]
        threshold = _kl_threshold(hist, levels) * self.width
        return _with_zero(max(self.low, -threshold), min(self.high, threshold))

    def mse(self, levels: int = 256) -> tuple[float, float]:
        """The range whose `levels`-step uniform quantization has the least expected squared error."""
        if self.pos is None:
            return self.minmax()
        low, high = self.minmax()
        if high - low <= 0:
            return low, high
        centers = (np.arange(self.bins) + 0.5) * self.width
        values = np.concatenate([-centers[::-1], centers])
        counts = np.concatenate([self.neg[::-1], self.pos]).astype(np.float64)
        keep = counts > 0
        values, counts = values[keep], counts[keep]
        # Coordinate descent: the best high for the current low, then the best low for that high.
        for _ in range(3):
            if high > 0:
                high = _best_bound(values, counts, low, high, levels, upper=True)
            if low < 0:
                low = _best_bound(values, counts, low, high, levels, upper=False)
        return _with_zero(low, high)

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        if method == "minmax":
            return self.minmax()
        if method == "percentile":
            return self.percentile(percentile)
        if method == "entropy":
            return self.entropy()
        if method == "mse":
            return self.mse()
        raise ValueError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")


def calibrate(
    model: onnx.ModelProto,
    tensor_names: Iterable[str],
    dataset,
    method: str = "minmax",
    threads: int = 1,
    percentile: float = 99.99,
) -> dict[str, tuple[float, float]]:
    """(low, high) for each named float tensor of the main graph, low <= 0 <= high.

    `dataset` is a data.Dataset (or anything with `.batches`, or an iterable of feed
    dicts); batches are run one at a time, so a long calibration set costs time, not memory,
    and a large batch in row chunks (runtime.Capture), so a large model's activations do not
    either: the statistics are those of the whole batch (a tensor without the batch axis is
    seen once per chunk, which weighs it more in a histogram, never in min/max).
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    batches = getattr(dataset, "batches", dataset)
    stats = {name: RangeStats(None if method == "minmax" else BINS) for name in names}
    for values in capture_activations(model, names, batches, threads, batch_axes=getattr(dataset, "batch_axes", None),
                                      join=False):
        for name in names:
            stats[name].update(values[name])
        del values
    return {name: stats[name].range(method, percentile) for name in names}


def _merge_pairs(counts: np.ndarray) -> np.ndarray:
    """Counts of bins twice as wide over twice the reach: pairs summed, upper half empty."""
    merged = counts.reshape(-1, 2).sum(axis=1)
    return np.concatenate([merged, np.zeros(len(counts) - len(merged), counts.dtype)])


def _with_zero(low: float, high: float) -> tuple[float, float]:
    """Quantized ranges must hold 0 exactly (zero padding, Relu's zeros)."""
    return float(min(low, 0.0)), float(max(high, 0.0))


def _kl_threshold(hist: np.ndarray, levels: int) -> float:
    """Number of bins i minimizing KL(P_i || Q_i) (TensorRT's int8 calibration, as onnxruntime ports it).

    P_i is the histogram cut at bin i with everything above folded into its last bin;
    Q_i is P_i merged into `levels` groups and spread back over each group's nonzero bins.
    """
    hist = hist.astype(np.float64)
    nonzero = np.nonzero(hist)[0]
    if len(nonzero) == 0:
        return 0.0
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return float(last)  # every bin gets its own level: no rounding to trade against clipping
    # Candidate cut points; stride keeps the search under ~512 evaluations per tensor.
    stride = max(1, (last - levels) // 512)
    candidates = list(range(levels, last + 1, stride))
    if candidates[-1] != last:
        candidates.append(last)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    best, best_i = np.inf, last
    for i in candidates:
        p = hist[:i].copy()
        p[i - 1] += suffix[i]
        group = (np.arange(i) * levels) // i  # bin -> level, groups differ in size by at most one
        present = hist[:i] > 0
        level_sum = np.bincount(group, weights=hist[:i], minlength=levels)
        level_bins = np.bincount(group, weights=present, minlength=levels)
        q = np.where(present, level_sum[group] / np.maximum(level_bins[group], 1), 0.0)
        divergence = _kl(p, q)
        if divergence < best:
            best, best_i = divergence, i
    return float(best_i)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p_total, q_total = p.sum(), q.sum()
    if p_total <= 0 or q_total <= 0:
        return np.inf
    p = p / p_total
    q = q / q_total
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _best_bound(values, counts, low, high, levels, upper):
    """Best `high` (upper=True) or `low` for the other bound fixed, over 200 shrink factors."""
    factors = np.linspace(0.05, 1.0, 200)
    if upper:
        lows, highs = np.full_like(factors, low), high * factors
    else:
        lows, highs = low * factors, np.full_like(factors, high)
    errors = np.array([_quantization_error(values, counts, lo, hi, levels) for lo, hi in zip(lows, highs)])
    pick = int(np.argmin(errors))
    return float(highs[pick] if upper else lows[pick])


def _quantization_error(values, counts, low, high, levels):
    """Mean squared error of asymmetric `levels`-step quantization (zero exact) of the histogram."""
    scale = (high - low) / (levels - 1)
    if scale <= 0:
        return float(np.sum(counts * values**2))
    zero = np.clip(np.rint(-low / scale), 0, levels - 1)
    q = np.clip(np.rint(values / scale) + zero, 0, levels - 1)
    restored = (q - zero) * scale
    return float(np.sum(counts * (values - restored) ** 2) / counts.sum())
