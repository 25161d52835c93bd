"""Would rate-aware rounding make GPTQ's grids code smaller? Rate against output error, per layer, on a real encoder.

An evenly spaced grid coded by Huffman (the entropy form of `cluster --codebook entropy`) spends -log2 p(q) bits on a
weight rounded to entry q. GPTQ rounds each weight to its nearest entry and folds the error into the inputs not yet
rounded. Rounding instead to whichever of the two entries around the weight costs less in

    (w - q)^2 + lambda * (-log2 p(q)),    lambda = kappa * 2 ln 2 * step^2 / 12

(rate-distortion optimised quantization, "RDOQ", inside GPTQ: GPTQ's own cost of a rounding is (w - q)^2 / [H^-1]_ii,
and with the slope taken per input column [H^-1]_ii cancels; kappa = 1 is the slope of entropy-coded uniform
quantization at high rate, dD/dR = -2 ln 2 D with D = step^2 / 12) trades error for bits. This prints,
for each layer, the entropy of the indices (bits a weight) and the relative output error tr(D^T H D) / tr(W^T H W)
at several grid steps: nearest rounding, GPTQ, and GPTQ with that rounding at kappa 1 and 2 (code lengths from the
previous pass's index counts, twice). Compare rates at equal error across the rows of one layer. GPTQ runs in one
column loop of its own here (codebook.gptq_assign's, unblocked, on an unbounded grid), so that the plain and the
rate-aware rows differ only in the choice of entry.

    .venv/bin/python bench/rd_rounding.py [--export DIR] [--layers 'layer.0/,layer.3/'] [--samples 32]

The layers come from the export bench/transformer_export.py writes (MiniLM by default); H = X^T X of each layer's
inputs on the first --samples calibration sentences, padding left out, as compress's plan captures them.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink import model as model_io  # noqa: E402
from onnxshrink.algorithms.gptq import inverse_cholesky_upper  # noqa: E402
from onnxshrink.compress_plan import _chunks, _dataset, _hessians  # noqa: E402
from onnxshrink.passes.common import Site, initializer_owners  # noqa: E402
from onnxshrink.passes.prune_common import describe, matrix  # noqa: E402
from onnxshrink.weights import find_tensors  # noqa: E402

STEPS = (0.12, 0.16, 0.2, 0.25, 0.3)  # grid steps, in units of the layer's weight RMS (about 5.1 down to 3.8 bits)
KAPPAS = (1.0, 2.0)


def entropy(idx: np.ndarray) -> float:
    counts = np.bincount((idx - idx.min()).ravel())
    p = counts[counts > 0] / idx.size
    return float(-(p * np.log2(p)).sum())


def relative_error(wq: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    d = wq - w
    return float(np.sum(d * (h @ d)) / np.sum(w * (h @ w)))


def code_lengths(idx: np.ndarray) -> tuple[int, np.ndarray]:
    low = int(idx.min())
    counts = np.bincount((idx - low).ravel()).astype(np.float64) + 0.5  # an entry not yet used still costs bits
    return low, -np.log2(counts / counts.sum())


def gptq_grid(w: np.ndarray, h: np.ndarray, step: float, kappa: float = 0.0, lengths=None) -> np.ndarray:
    """Indices [K, N] of w on the grid step * Z, rounded by GPTQ (1% damping, column by column), to the cheaper of
    the two entries around each weight in error plus kappa-weighted code length when `lengths` is given."""
    k, n = w.shape
    work = w.T.astype(np.float64).copy()
    hh = h.copy()
    dead = np.diag(hh) <= 0
    hh[dead, dead] = 1.0
    upper = inverse_cholesky_upper(hh, 0.01)
    idx = np.empty((n, k), np.int64)
    lam = kappa * 2 * np.log(2) * step ** 2 / 12
    for i in range(k):
        x = work[:, i]
        if lengths is None or kappa <= 0:
            q = np.rint(x / step)
        else:
            low, bits = lengths
            lo = np.floor(x / step)
            hi = lo + 1

            def cost(c):
                return (x - c * step) ** 2 + lam * bits[np.clip(c - low, 0, len(bits) - 1).astype(np.int64)]

            q = np.where(cost(lo) <= cost(hi), lo, hi)
        idx[:, i] = q
        err = (x - q * step) / upper[i, i]
        work[:, i:] -= np.outer(err, upper[i, i:])
    return idx.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="an export folder (default the newest MiniLM export)")
    parser.add_argument("--layers", default="layer.0/,layer.3/", help="comma-separated parts of layer names")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    export = Path(args.export or sorted(glob.glob(os.path.expanduser("~/.cache/onnxshrink/minilm/export-*")))[-1])
    started = time.monotonic()
    model = model_io.load(export / "model.onnx")
    owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
    outputs = {o for node in model.graph.node for o in node.output}
    parts = [p for p in args.layers.split(",") if p]
    layers = [describe(Site(model.graph, node, node.name, node.input[1]), owners, records, outputs)
              for node in model.graph.node
              if node.op_type == "MatMul" and node.input[1] in owners and any(p in node.name for p in parts)
              and records[node.input[1]].dtype == "float" and len(records[node.input[1]].shape) == 2]
    dataset = _dataset(model, export / "calibration.npz", args.samples)
    hessians = {}
    for chunk in _chunks(layers):
        hessians.update(_hessians(dataset, model, chunk, 1))
    print(f"{export.parent.name}: {len(layers)} layers, X^T X from {args.samples} calibration samples "
          f"({time.monotonic() - started:.0f} s)")
    print(f"{'layer':44} {'step/rms':>8} {'rounding':>9} {'bits':>6} {'error':>9}")
    for layer in layers:
        w, h = matrix(layer, owners).astype(np.float64), hessians[layer.name]
        rms = float(np.sqrt(np.mean(w * w)))
        for factor in STEPS:
            step = rms * factor
            rows = [("nearest", np.rint(w / step).astype(np.int64))]
            plain = gptq_grid(w, h, step)
            rows.append(("gptq", plain))
            for kappa in KAPPAS:
                idx = plain
                for _ in range(2):  # code lengths from the previous pass's counts
                    idx = gptq_grid(w, h, step, kappa, code_lengths(idx))
                rows.append((f"rd k={kappa:g}", idx))
            for name, idx in rows:
                print(f"{layer.name[-44:]:44} {factor:8.2f} {name:>9} {entropy(idx):6.3f} "
                      f"{relative_error(idx * step, w, h):9.2e}", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
