"""Is a weight a bank of sinusoids (a DFT, STFT or DCT basis) rather than learned filters? Knows nothing about ONNX.

Signal-processing front ends (a mel spectrogram's STFT as a Conv, a DCT as a MatMul) hold such bases as weights.
Rounding one is not rounding a learned layer: its error leaks every loud frequency into all the other bins, and a
log-power output (dB, 80 dB of range) shows that leak in the quiet bins: livekit's melspectrogram with its STFT at
per-channel int8 scored cosine 0.963 against the original on a clean chirp and 1.0000 at 20 dB SNR
(bench/audio_clean.py). So the passes keep such a basis float (see passes/common.select_layers).

A filter is a sinusoid when nearly all of its spectral energy lies within a few bins of its peak (a window only
widens the peak: a Hann window's main lobe is 4 bins); the bank is one when nearly every non-zero filter is, and
their peaks are spread over the band rather than all at one frequency (a bank of learned smoothing filters peaks at
DC)."""

from __future__ import annotations

import numpy as np

MIN_TAPS = 16  # shorter filters have too few bins to tell a sinusoid from a learned filter
MIN_FILTERS = 8
PAD = 4  # zero padding of the spectrum: bins of 1/4 of the filter's own resolution
HALF_WIDTH = 2.5  # bins (of the filter's resolution) either side of the peak counted as the sinusoid's
MIN_CONCENTRATION = 0.9  # share of a filter's energy within HALF_WIDTH bins of its peak
MIN_SHARE = 0.9  # share of the non-zero filters that must be sinusoids
MIN_SPREAD = 0.25  # the peaks must span at least this fraction of the band (0 to the Nyquist frequency)
SAMPLE = 16  # filters tested first (spread over the bank): most weights fail here and cost one small FFT


def sinusoid_bank(filters: np.ndarray) -> str | None:
    """A description ("257 sinusoids of 512 taps") when the rows of `filters` [count, taps] form a bank
    of sinusoids; None otherwise."""
    count, taps = filters.shape
    if taps < MIN_TAPS or count < MIN_FILTERS:
        return None
    # reductions only: a large learned layer (every MatMul is asked) is never copied whole
    peak = np.maximum(np.max(filters, axis=1), -np.min(filters, axis=1)).astype(np.float64)
    live = np.flatnonzero(peak > 1e-6 * max(float(np.max(peak)), 1e-300))
    if live.size < MIN_FILTERS:
        return None
    sample = live[np.unique(np.linspace(0, live.size - 1, min(SAMPLE, live.size)).astype(np.int64))]
    if _share(np.asarray(filters[sample], dtype=np.float64), taps)[0] < MIN_SHARE:
        return None
    share, peaks = _share(np.asarray(filters[live], dtype=np.float64), taps)
    if share < MIN_SHARE:
        return None
    band = taps * PAD // 2
    if (np.max(peaks) - np.min(peaks)) < MIN_SPREAD * band:
        return None
    return f"{live.size} sinusoids of {taps} taps"


def _share(rows: np.ndarray, taps: int) -> tuple[float, np.ndarray]:
    """The share of `rows` whose energy lies within HALF_WIDTH bins of their peak, and each row's peak bin."""
    power = np.abs(np.fft.rfft(rows, n=taps * PAD, axis=1)) ** 2
    peaks = np.argmax(power, axis=1)
    width = int(np.ceil(HALF_WIDTH * PAD))
    bins = np.arange(power.shape[1])[None, :]
    near = np.abs(bins - peaks[:, None]) <= width
    total = np.sum(power, axis=1)
    concentrated = np.sum(np.where(near, power, 0.0), axis=1) >= MIN_CONCENTRATION * np.maximum(total, 1e-300)
    return float(np.mean(concentrated)), peaks
