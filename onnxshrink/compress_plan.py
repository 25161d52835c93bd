"""Per-layer prices for compress's plan: each layer's codebook bit width chosen from one capture of the calibration
data, before any whole-model validation.

A uniform format spends the same bits on a fragile first convolution as on a wide, redundant late one, so the search
had to try formats one whole-model candidate at a time (minutes each on a 20 MB model) and mostly ran out of time
before the ones that reach 6x. Here the original model runs over the calibration data once (a few layers' inputs at
a time, so only their X^T X are held), and each layer's codebook at every width in BIT_CHOICES is priced by its
relative output error under the layer's input statistics (the proxy GPTQ and HAWQ use):

    e_l(b) = tr(D^T H D) / tr(W^T H W),   D = codebook_b(W) - W,   H = X^T X / rows

Layers whose inputs cannot be captured (a grouped Conv, a weight inside an If) are priced with H = I: their weight
error alone. `frontier` then lowers, step by step, the layer whose next narrower width adds the least error per
bit saved (HAWQ-style greedy on a sum of relative errors), from every layer at the widest width down to every layer
at the narrowest; `ladder` picks the frontier's points at a few average widths. Those are the only allocations
that get a whole-model validation (compress_search bisects them), instead of every format x sparsity.

Everything here is numeric on captured arrays; it writes no graph (the cluster pass does, from per-layer bits rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxshrink import model as model_io
from onnxshrink.algorithms import codebook
from onnxshrink.data import Dataset, input_specs, load_npz
from onnxshrink.passes.common import Site, initializer_owners
from onnxshrink.passes.prune_common import capture, describe, input_size, matrix, token_rows, unfold
from onnxshrink.weights import find_tensors

BIT_CHOICES = (3, 4, 5, 6, 8)  # widths a layer may get: few, since the cluster pass runs once per distinct width
LADDER = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)  # average bits per weight of the allocations validated on the whole model
PROXY_SAMPLES = 4  # calibration samples the prices are captured from: a price ranks layers, it need not be exact
ROWS_PER_SAMPLE = 2048  # rows of X kept per sample and layer (evenly spaced): a 208x208 Conv map has 43k
FIT_ITERATIONS = 30  # Lloyd iterations of a priced codebook (the pass runs 300; the error moves by a few percent)
GRAM_ENTRIES = 24 << 20  # float64 X^T X entries captured in one run (192 MB): more layers -> another run
MIN_LAYER_SHARE = 0.5  # below this share of the float weights in priced layers, no plan (MiniLM: 47%, its tables)
ENERGY_FLOOR = 1e-3  # as passes/cluster.py: codebooks weighted by input energy E[x^2] + floor x mean


@dataclass
class LayerPrice:
    node: str  # the node name the passes use (node.name or OpType_index)
    weights: int
    errors: dict  # bits -> relative output error of that layer alone (monotone: never rises with bits)
    data_aware: bool  # False: priced by its weight error (H = I)
    reason: str = ""  # why not data-aware


@dataclass
class Prices:
    layers: list = field(default_factory=list)  # LayerPrice, graph order
    runs: int = 0  # capture runs of the model
    samples: int = 0
    notes: list = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)


def price_layers(model_path: str | Path, calibration: str | Path | Dataset | None, bits: tuple = BIT_CHOICES,
                 threads: int = 1, samples: int = PROXY_SAMPLES, stop=None, min_share: float = 0.0) -> Prices:
    """Every float MatMul/Gemm/Conv weight's relative output error at each codebook width. `stop()`, asked before
    each capture run, ends the pricing early (the layers not reached are priced by weight error alone). When the
    layers hold less than `min_share` of the model's float weights, nothing is priced (a note says why): their
    widths cannot move the total much, and pricing costs a capture."""
    model = model_io.load(Path(model_path))
    owners = initializer_owners(model)
    records = {r.name: r for r in find_tensors(model)}
    main_outputs = {name for node in model.graph.node for name in node.output}
    layers = []
    for graph in model_io.iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            weight = node.input[1]
            record = records.get(weight)
            if weight not in owners or record is None or record.dtype != "float" or node.input[0] in owners:
                continue
            if node.op_type != "Conv" and len(record.shape) != 2 or node.op_type == "Conv" and len(record.shape) < 3:
                continue
            layer = describe(Site(graph, node, node.name or f"{node.op_type}_{index}", weight), owners, records, main_outputs)
            layers.append(layer)
    prices = Prices()
    floats = sum(r.nbytes for r in records.values() if r.dtype == "float")
    share = sum(4 * layer.size for layer in layers) / max(floats, 1)
    if share < min_share:
        prices.notes.append(f"no planned codebooks: MatMul/Gemm/Conv weights are {share:.0%} of the float weights "
                            f"(under {min_share:.0%}); the rest (embedding tables, ...) is not priced")
        return prices
    dataset = _dataset(model, calibration, samples)
    hessians = {}
    if dataset is not None:
        prices.samples = sum(len(next(iter(b.values()))) for b in dataset.batches) if dataset.batches else 0
        aware = [layer for layer in layers if not layer.reason]
        for chunk in _chunks(aware):
            if stop is not None and stop():
                prices.notes.append(f"pricing stopped after {prices.runs} capture run(s): the other layers are priced by "
                                    "their weight error alone")
                break
            hessians.update(_hessians(dataset, model, chunk, threads))
            prices.runs += 1
    for layer in layers:
        w = matrix(layer, owners).astype(np.float64)
        h = hessians.get(layer.name)
        reason = layer.reason or ("" if h is not None else "no calibration data" if dataset is None else "not captured")
        errors = layer_errors(w, h, bits)
        prices.layers.append(LayerPrice(layer.name, int(w.size), errors, h is not None, reason))
    return prices


def layer_errors(w: np.ndarray, h: np.ndarray | None, bits: tuple = BIT_CHOICES) -> dict:
    """bits -> tr(D^T H D) / tr(W^T H W) of a per-layer codebook of [K, N] weight `w` (H = I when None), fitted the
    cluster pass's way (k-means weighted by input energy, zeros kept at index 0, nearest entry); made monotone."""
    k, n = w.shape
    energy = None
    if h is not None:
        energy = np.clip(np.diag(h), 0, None)
        energy = energy + ENERGY_FLOOR * max(float(energy.mean()), 1e-30)
    reserve = bool(np.any(w == 0))
    rows = w.reshape(1, -1)
    weights = None if energy is None else np.broadcast_to(energy[:, None], (k, n)).reshape(1, -1)
    total = _quadratic(w, h)
    errors, best = {}, 0.0
    for b in sorted(bits, reverse=True):
        books = codebook.fit(rows, 2 ** b, weights, reserve_zero=reserve, iterations=FIT_ITERATIONS)
        d = codebook.decode(codebook.assign(rows, books, reserve_zero=reserve), books).reshape(k, n) - w
        best = max(best, _quadratic(d, h) / total if total > 0 else 0.0)
        errors[b] = float(best)
    return dict(sorted(errors.items()))


def frontier(prices: Prices) -> list[dict]:
    """Allocations (node -> bits) from all layers at the widest width to all at the narrowest, each one layer one
    width narrower than the one before: the step that adds the least summed relative error per bit saved."""
    current = {layer.node: max(layer.errors) for layer in prices.layers}
    by_node = {layer.node: layer for layer in prices.layers}
    path = [dict(current)]
    while True:
        best, best_cost = None, np.inf
        for node, width in current.items():
            layer = by_node[node]
            narrower = [b for b in layer.errors if b < width]
            if not narrower:
                continue
            b = max(narrower)
            cost = (layer.errors[b] - layer.errors[width]) / (layer.weights * (width - b))
            if cost < best_cost or (cost == best_cost and best is not None and layer.weights > by_node[best[0]].weights):
                best, best_cost = (node, b), cost
        if best is None:
            return path
        current[best[0]] = best[1]
        path.append(dict(current))


def average_bits(allocation: dict, prices: Prices) -> float:
    sizes = {layer.node: layer.weights for layer in prices.layers}
    total = sum(sizes[node] for node in allocation)
    return sum(sizes[node] * b for node, b in allocation.items()) / max(total, 1)


def ladder(prices: Prices, averages: tuple = LADDER) -> list[dict]:
    """The frontier's allocations nearest above each average width in `averages` (widest first, no repeats):
    the finalists compress validates on the whole model."""
    path = frontier(prices)
    out = []
    for target in sorted(averages, reverse=True):
        fitting = [a for a in path if average_bits(a, prices) >= target - 1e-9]
        chosen = fitting[-1] if fitting else path[0]
        if not out or chosen != out[-1]:
            out.append(chosen)
    return out


def summary(allocation: dict, prices: Prices) -> str:
    """'4.1 bits per weight: 8 bits x2, 5 bits x10, 4 bits x60', for notes and candidate labels."""
    counts: dict = {}
    for b in allocation.values():
        counts[b] = counts.get(b, 0) + 1
    parts = ", ".join(f"{b} bits x{counts[b]}" for b in sorted(counts, reverse=True))
    return f"{average_bits(allocation, prices):.2f} bits per weight ({parts})"


# ---- capture ------------------------------------------------------------------------------------

def _dataset(model, calibration, samples: int) -> Dataset | None:
    if calibration is None:
        return None
    dataset = calibration if isinstance(calibration, Dataset) else load_npz(Path(calibration), input_specs(model),
                                                                            role="calibration data")
    batches, count = [], 0
    for batch in dataset.batches:  # the first `samples` samples, whole batches
        if count >= samples:
            break
        batches.append(batch)
        count += len(next(iter(batch.values()))) if batch else 1
    return Dataset(batches, None, count, dataset.synthetic, [])


def _chunks(layers: list) -> list[list]:
    """Layers in graph order, grouped so one run's X^T X stay under GRAM_ENTRIES (layers sharing an input count once)."""
    chunks, current, entries, inputs = [], [], 0, set()
    for layer in layers:
        k = input_size(layer) + 1
        cost = 0 if (layer.x, str(layer.conv)) in inputs else k * k
        if current and entries + cost > GRAM_ENTRIES:
            chunks.append(current)
            current, entries, inputs = [], 0, set()
            cost = k * k
        current.append(layer)
        entries += cost
        inputs.add((layer.x, str(layer.conv)))
    if current:
        chunks.append(current)
    return chunks


def _hessians(dataset: Dataset, model, layers: list, threads: int) -> dict:
    """layer name -> X^T X / rows (float64, [K, K]) of the original model's inputs to it, from one run."""
    shared: dict = {}  # (input, unfolding) -> X^T X: layers reading the same input share it
    rows: dict = {}
    for batch, values in capture(dataset, model, sorted({layer.x for layer in layers}), threads):
        done = set()
        for layer in layers:
            key = (layer.x, str(layer.conv))
            value = values.get(layer.x, batch.get(layer.x))
            if value is None or key in done:
                continue
            done.add(key)
            x = unfold(layer, value)
            keep = token_rows(batch, value, layer)
            if keep is not None:
                x = x[keep]
            if x.shape[0] > ROWS_PER_SAMPLE * len(next(iter(batch.values()))):
                x = x[np.linspace(0, x.shape[0] - 1, ROWS_PER_SAMPLE * len(next(iter(batch.values())))).astype(np.int64)]
            x = np.ascontiguousarray(x, dtype=np.float32)
            shared[key] = shared.get(key, 0.0) + (x.T @ x).astype(np.float64)
            rows[key] = rows.get(key, 0) + x.shape[0]
    out = {}
    for layer in layers:
        key = (layer.x, str(layer.conv))
        if key in shared and rows[key] > 0:
            out[layer.name] = shared[key] / rows[key]
    return out


def _quadratic(d: np.ndarray, h: np.ndarray | None) -> float:
    return float(np.sum(d * d)) if h is None else float(np.sum(d * (h @ d)))
