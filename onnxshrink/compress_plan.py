"""Per-layer prices for compress's plan: each layer's codebook bit width chosen from one capture of the calibration
data, before any whole-model validation.

A uniform format spends the same bits on a fragile first convolution as on a wide, redundant late one, so the search
had to try formats one whole-model candidate at a time (minutes each on a 20 MB model) and mostly ran out of time
before the ones that reach 6x. Here the original model runs over the calibration data once (a few layers' inputs at
a time, so only their X^T X are held), and each layer's codebook at every width in BIT_CHOICES is priced by its
relative output error under the layer's input statistics (the proxy GPTQ and HAWQ use):

    e_l(b) = tr(D^T H D) / tr(W^T H W),   D = codebook_b(W) - W,   H = X^T X / rows

Layers whose inputs cannot be captured (a grouped Conv, a weight inside an If) are priced with H = I: their weight
error alone.

That error is the layer's own, not the model's: on PP-OCR's recogniser the 2.2M-weight CTC head prices at 0.0035 at
4 bits, a tenth of a typical Conv, yet alone it costs the output 0.025 of cosine, more than any Conv but three
(docs/benchmarks-compress.md). So each layer's curve is scaled to one measurement of the whole model: the drift
(1 - output cosine) with that layer alone at SENSITIVITY_BITS, on a few calibration samples, from one onnxruntime
session in which the weights are overridable inputs (no session build per layer). The same run prices the other
floats (biases, norms) in int8 against fp16, so a finalist stores them in int8 only where that saves bits more
cheaply than its next narrower codebook (`other_floats`).

`frontier` then lowers, step by step, the layer whose next narrower width adds the least error per bit saved
(HAWQ-style greedy on a sum of errors), from every layer at the widest width down to every layer at the narrowest;
`ladder` picks the frontier's points at a few average widths. A width's bits are what the pack stores: the coded
size of the priced indices (coded_bits), not the width. One codebook for a layer with outliers spends its entries on
them: MPNet's late FFN outputs code 4-bit indices in about 2 bits, and priced at 4 the plan overpaid for them.

Each layer is priced in two layouts, one codebook per layer and one per output channel (CHANNEL_BITS, the codebooks
counted in the bits), each measured on the model, and allocations are made in three: every layer in one layout,
every layer in the other, or each its own ("mixed": a channel codebook is one more step of the layer's).
`finalists` keeps each layout's rungs within the drift budget that no other rung of that layout beats on bits and
predicted drift. Those are the only allocations that get a whole-model validation (compress_search bisects them),
instead of every format x sparsity.

Embedding tables (the Gather data the cluster pass codes: one codebook, an fp16 scale a row) are priced as items
beside the layers: no layer input weighs a table's rows, so each width's price is measured outright, the whole
model's drift with the table alone coded at that width (passes/cluster.table_codebook, the pass's own coding), in the
same session as the layers. Their bits count the row scales. On MiniLM the word table is half of the weights: a plan
without it priced under half of the model (MIN_LAYER_SHARE) and was skipped.

Everything here is numeric on captured arrays; it writes no graph (the cluster pass does, from per-layer bits rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import helper, numpy_helper

from onnxshrink import memory, model as model_io
from onnxshrink.algorithms import codebook
from onnxshrink.data import Dataset, input_specs, load_npz, trim_padding
from onnxshrink.passes import table_rows as table_rows_
from onnxshrink.passes.common import Site, initializer_owners, kept_weight_reason
from onnxshrink.passes.prune_common import capture, describe, input_size, matrix, token_rows, unfold
from onnxshrink.validate import attention_mask, masks_output, padding_zeroed, sample_cosines
from onnxshrink.weights import find_tensors

BIT_CHOICES = (3, 4, 5, 6, 8)  # widths a layer may get: few, since the cluster pass runs once per distinct width
LADDER = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)  # average bits per weight of the allocations validated on the whole model
PROXY_SAMPLES = 4  # calibration samples the prices are captured from: a price ranks layers, it need not be exact
ROWS_PER_SAMPLE = 2048  # rows of X kept per sample and layer (evenly spaced): a 208x208 Conv map has 43k
FIT_ITERATIONS = 30  # Lloyd iterations of a priced codebook (the pass runs 300; the error moves by a few percent)
GRAM_ENTRIES = 24 << 20  # float64 X^T X entries captured in one run (192 MB): more layers -> another run
ALL_SAMPLES = 2 ** 62  # _dataset's sample count that keeps every batch
MIN_LAYER_SHARE = 0.5  # below this share of the float weights in priced layers and tables, no plan
SCALE_BITS = 16  # a table's row scale is stored as fp16
ENERGY_FLOOR = 1e-3  # as passes/cluster.py: codebooks weighted by input energy E[x^2] + floor x mean
SENSITIVITY_BITS = 4  # the width at which each layer's whole-model drift is measured, to scale its proxy curve
SENSITIVITY_SAMPLES = 2  # calibration samples of that measurement: one model run per layer on each
CHANNEL_BITS = (3, 4)  # per-channel codebook widths priced: wider ones cost more in codebooks than they save
CODEBOOK_ENTRY_BITS = 16  # a codebook entry is stored as fp16
DRIFT_SLACK = 4.0  # rungs predicted over this many times the drift budget are not validated (within_drift)
# Priced in the entropy form, a table has two codings at each width w: k-means (key w) and evenly spaced values
# (key w - GRID_STEP, a step of the frontier between w and the next narrower width). The grid's indices code smaller
# but its drift is higher, by 17% (MiniLM) to 83% (MPNet) at 4 bits: the frontier takes it only where that is cheap.
GRID_STEP = 0.5
# In a "mixed" allocation (each layer its own layout), a layer's key w + CHANNEL_KEY is w bits with a codebook per
# output channel, w alone one codebook for the layer (layer_choice). One layout for the whole model wasted bits:
# MPNet's FFN outputs of blocks 6-9 drift 0.029-0.073 at 4 bits with one codebook a layer and 0.001-0.003 per
# channel, while per channel costs every other layer its codebooks (0.33 bits a weight on a 768x768 projection).
CHANNEL_KEY = 0.25


@dataclass
class LayerPrice:
    node: str  # the node name the passes use (node.name or OpType_index)
    weights: int
    errors: dict  # bits -> relative output error of that layer alone (monotone: never rises with bits)
    data_aware: bool  # False: priced by its weight error (H = I)
    reason: str = ""  # why not data-aware
    # whole-model drift (1 - output cosine) with this layer alone at SENSITIVITY_BITS; `errors` are scaled to it.
    # None: not measured (no data, stopped, a weight inside a subgraph): scaled by the median of the measured layers
    drift: float | None = None
    proxy: dict | None = None  # the layer-local errors before scaling
    # bits -> error with one codebook per output channel (cluster --per channel), scaled as `errors`; {}: not priced
    channel_errors: dict = field(default_factory=dict)
    channels: int = 0  # output channels: a per-channel codebook each
    # an embedding table's rows (an fp16 scale each, counted in its bits); 0: a layer. A table has one layout (one
    # codebook, rows scaled) in either layout of the layers, and `errors` measured at every width.
    rows: int = 0
    tensor: str = ""  # the table's initializer
    # a table's grid keys (w - GRID_STEP) -> bits a weight its indices code smaller than k-means' at width w
    savings: dict = field(default_factory=dict)
    # key -> bits a weight the pack's Huffman coding of the priced indices approaches (coded_bits), per layout;
    # a key not here is priced at its width (stored_bits). One codebook for a layer with outliers spends most of its
    # entries on them: MPNet's late FFN outputs code 4-bit indices in about 2 bits, per channel in about 3.9.
    coded: dict = field(default_factory=dict)
    channel_coded: dict = field(default_factory=dict)

    @property
    def table(self) -> bool:
        return self.rows > 0


@dataclass
class Prices:
    layers: list = field(default_factory=list)  # LayerPrice, graph order
    runs: int = 0  # capture runs of the model
    samples: int = 0
    notes: list = field(default_factory=list)
    # the other floats that --other-floats int8 would store as int8: their elements, and the whole-model drift with
    # all of them in int8 (None: not measured)
    int8_elements: int = 0
    int8_drift: float | None = None

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def tables(self) -> list:
        return [layer for layer in self.layers if layer.table]


def price_layers(model_path: str | Path, calibration: str | Path | Dataset | None, bits: tuple = BIT_CHOICES,
                 threads: int = 1, samples: int = PROXY_SAMPLES, stop=None, min_share: float = 0.0,
                 measure: bool = True, form: str = "kmeans", table_rows: str = "uniform") -> Prices:
    """Every float MatMul/Gemm/Conv weight's relative output error at each codebook width, scaled to the whole
    model's measured drift when `measure` (and there is calibration data), and each embedding table's drift at each
    width (its relative weight error when not measured). `stop()`, asked before each capture run and each measured
    item, ends the pricing early (the layers not reached are priced by weight error alone). When the layers and
    tables hold less than `min_share` of the model's float weights, nothing is priced (a note says why): their
    widths cannot move the total much, and pricing costs a capture. `form` is the cluster pass's `codebook`, so each
    layer is priced as the pass will code it; in "entropy" each table is priced in both forms (GRID_STEP).
    `table_rows` is the pass's too: "frequency" prices a vocabulary with its unread rows coarser (table_rows.py),
    counted on all of the calibration data, as the pass counts them."""
    model = model_io.load(Path(model_path))
    model_io.prepare(model)  # weights held in Constant nodes (silero-vad's, in If branches) priced as the passes see them
    owners = initializer_owners(model)
    records = {r.name: r for r in find_tensors(model)}
    main_outputs = {name for node in model.graph.node for name in node.output}
    tables = _tables(model, records)
    layers = []
    for graph in model_io.iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            weight = node.input[1]
            record = records.get(weight)
            if weight not in owners or record is None or record.dtype != "float" or node.input[0] in owners \
                    or weight in tables:  # a tied table: priced (and coded) once, as the table
                continue
            if node.op_type != "Conv" and len(record.shape) != 2 or node.op_type == "Conv" and len(record.shape) < 3:
                continue
            if kept_weight_reason(node, numpy_helper.to_array(owners[weight][1])):  # every pass keeps it: not priced
                continue
            layer = describe(Site(graph, node, node.name or f"{node.op_type}_{index}", weight), owners, records, main_outputs)
            layers.append(layer)
    prices = Prices()
    floats = sum(r.nbytes for r in records.values() if r.dtype == "float")
    share = (sum(4 * layer.size for layer in layers) + sum(4 * value.size for _, value, _ in tables.values())) / max(floats, 1)
    if share < min_share:
        prices.notes.append(f"no planned codebooks: MatMul/Gemm/Conv weights and embedding tables are {share:.0%} of "
                            f"the float weights (under {min_share:.0%}); the rest (norms, biases, ...) is not priced")
        return prices
    everything = _dataset(model, calibration, ALL_SAMPLES)  # the file read once: table_rows counts all of it
    dataset = _dataset(model, everything, samples)
    decoded, channel_decoded, priced = {}, {}, {}

    def price(layer, h) -> None:
        w = matrix(layer, owners).astype(np.float64)
        reason = layer.reason or ("" if h is not None else "no calibration data" if dataset is None else "not captured")
        coded, channel_coded = {}, {}
        errors, at_reference = _layer_errors(w, h, bits, SENSITIVITY_BITS if measure else None, form=form, coded=coded)
        if at_reference is not None:
            decoded[layer.name] = (layer.weight, _Decoded(layer, *at_reference))
        per_channel, channel_reference = _layer_errors(w, h, tuple(b for b in CHANNEL_BITS if b in bits),
                                                       SENSITIVITY_BITS if measure else None, per_channel=True,
                                                       coded=channel_coded) if w.shape[1] > 1 else ({}, None)
        if channel_reference is not None:
            channel_decoded[layer.name] = (layer.weight, _Decoded(layer, *channel_reference))
        priced[layer.name] = LayerPrice(layer.name, int(w.size), errors, h is not None, reason,
                                        channel_errors=per_channel, channels=int(w.shape[1]), coded=coded,
                                        channel_coded=channel_coded)

    if dataset is not None:
        dataset = trim_padding(dataset, input_specs(model))  # whole batches: samples by length, padding cut
        prices.samples = sum(len(next(iter(b.values()))) for b in dataset.batches) if dataset.batches else 0
        aware = [layer for layer in layers if not layer.reason]
        for chunk in _chunks(aware):
            if stop is not None and stop():
                prices.notes.append(f"pricing stopped after {prices.runs} capture run(s): the other layers are priced by "
                                    "their weight error alone")
                break
            # each chunk's layers priced from its run, then its X^T X let go: all of MPNet's at once held 1.2 GB
            hessians = _hessians(dataset, model, chunk, threads)
            prices.runs += 1
            for layer in chunk:
                price(layer, hessians.get(layer.name))
            del hessians
            memory.release()
    for layer in layers:
        if layer.name not in priced:
            price(layer, None)
        prices.layers.append(priced[layer.name])
    from onnxshrink.passes.cluster import index_dtype, table_codebook

    coded = {}  # table -> key -> (indices, codebook, row scales): decoded only when measured
    for tensor, (node, value, ids) in tables.items():
        steps = table_rows_.row_steps(table_rows_.row_counts(ids, everything, value.shape[0])) \
            if table_rows == "frequency" else None
        proxy, coded[tensor], worst, savings, coded_bits_ = {}, {}, 0.0, {}, {}
        total = float(np.sum(np.square(value, dtype=np.float64)))
        for b in sorted(bits, reverse=True):
            entropy = {}
            for key, kind in ((b, "kmeans"),) + (((b - GRID_STEP, "entropy"),) if form == "entropy" else ()):
                idx, books, scale, table = table_codebook(value, 2 ** b, "layer", kind, steps)
                entropy[kind] = codebook.entropy(np.bincount(idx.ravel()))
                if kind == "entropy" and (books.shape[-1] == 2 ** b or entropy[kind] >= entropy["kmeans"]):
                    del entropy[kind]  # k-means kept, or nothing saved: no step of its own
                    continue
                error = float(np.sum(np.square(table - value, dtype=np.float64))) / total if total > 0 else 0.0
                worst = proxy[key] = max(worst, error)
                coded_bits_[key] = coded_bits(idx)
                coded[tensor][key] = (idx.astype(index_dtype(books.shape[-1])), books, scale)
            if "entropy" in entropy:
                savings[b - GRID_STEP] = entropy["kmeans"] - entropy["entropy"]
        prices.layers.append(LayerPrice(node, int(value.size), dict(sorted(proxy.items())), False,
                                        "embedding table: no layer input weighs its rows", rows=int(value.shape[0]),
                                        tensor=tensor, savings=savings, coded=coded_bits_))
        memory.release()
    if measure and dataset is not None and not (stop is not None and stop()):
        _measure(prices, model, calibration, decoded, channel_decoded, threads, stop, coded)
    return prices


def _tables(model, records) -> dict:
    """table -> (its first Gather's node name, its values, the model inputs indexing it when it is a vocabulary:
    table_rows.vocabulary_ids) for each embedding table the cluster pass codes (the pass's choice: EmbeddingPlan, and
    a coded form smaller than the table)."""
    from onnxshrink.passes.quantize_embeddings import EmbeddingPlan

    plan = EmbeddingPlan(model, records)
    main = {t.name: t for t in model.graph.initializer}
    nodes = {node.name or f"{node.op_type}_{index}": node for index, node in enumerate(model.graph.node)}
    inputs = {value.name for value in model.graph.input} - set(main)
    out = {}
    for table in plan.tables.values():
        if table.skip or table.name not in main:
            continue
        value = numpy_helper.to_array(main[table.name]).astype(np.float32)
        rows, count = value.shape[0], int(value.size)
        if count + 2 * rows + 4 * 2 ** max(BIT_CHOICES) >= value.nbytes:
            continue
        ids = None if table.others else table_rows_.vocabulary_ids([nodes[name] for name, _ in table.gathers], inputs, rows)
        out[table.name] = (table.gathers[0][0], value, ids)  # a table with other readers is tied: not a vocabulary
    return out


def layer_errors(w: np.ndarray, h: np.ndarray | None, bits: tuple = BIT_CHOICES) -> dict:
    """bits -> tr(D^T H D) / tr(W^T H W) of a per-layer codebook of [K, N] weight `w` (H = I when None), fitted the
    cluster pass's way (k-means weighted by input energy, zeros kept at index 0, nearest entry); made monotone."""
    return _layer_errors(w, h, bits, None)[0]


def _layer_errors(w: np.ndarray, h: np.ndarray | None, bits: tuple, keep: int | None,
                  per_channel: bool = False, form: str = "kmeans", coded: dict | None = None) -> tuple[dict, tuple | None]:
    """layer_errors, and the weight at width `keep` as (indices, codebooks, per_channel, its [K, N] shape), which
    _Decoded decodes (None: not kept); `per_channel`: one codebook per output column, as cluster --per channel fits
    them. `coded`, when given, gets each width's coded_bits."""
    if not bits and not keep:
        return {}, None
    k, n = w.shape
    energy = None
    if h is not None:
        energy = np.clip(np.diag(h), 0, None)
        energy = energy + ENERGY_FLOOR * max(float(energy.mean()), 1e-30)
    reserve = bool(np.any(w == 0))
    rows = w.T if per_channel else w.reshape(1, -1)
    weights = None if energy is None else (np.broadcast_to(energy[None, :], (n, k)) if per_channel else
                                           np.broadcast_to(energy[:, None], (k, n)).reshape(1, -1))
    total = _quadratic(w, h)
    errors, best, kept = {}, 0.0, None
    for b in sorted(set(bits) | ({keep} if keep else set()), reverse=True):
        books = codebook.fit(rows, 2 ** b, weights, reserve_zero=reserve, iterations=FIT_ITERATIONS, form=form,
                             margin=codebook.DATA_AWARE_GRID_MARGIN if h is not None else 1.0)
        idx = codebook.assign(rows, books, reserve_zero=reserve)
        decoded = codebook.decode(idx, books)
        decoded = decoded.T if per_channel else decoded.reshape(k, n)
        if b == keep:
            kept = (idx.astype(np.uint8 if books.shape[-1] <= 256 else np.uint16), books, per_channel, (k, n))
        if b not in bits:
            continue
        if coded is not None:
            coded[b] = coded_bits(idx)
        best = max(best, _quadratic(decoded - w, h) / total if total > 0 else 0.0)
        errors[b] = float(best)
    return dict(sorted(errors.items())), kept


def coded_bits(indices: np.ndarray) -> float:
    """Bits an index that the pack's Huffman coding approaches (order-0 entropy; packing.py): over 256 used entries
    the indices are uint16 (cluster.index_dtype, after wide_grid_order renumbers the used ones), each byte plane
    coded on its own. A codebook's entries and the Huffman tables are left out: a few hundred bytes a layer."""
    counts = np.bincount(np.asarray(indices, dtype=np.int64).ravel())
    counts = counts[counts > 0]  # the used entries, renumbered 0..used-1 as wide_grid_order does
    if len(counts) <= 256:
        return codebook.entropy(counts)
    ranks = np.arange(len(counts))
    planes = (np.bincount(ranks & 255, weights=counts), np.bincount(ranks >> 8, weights=counts))
    return sum(codebook.entropy(plane) for plane in planes)


def layout_errors(layer: LayerPrice, per: str = "layer") -> dict:
    """key -> priced error of `layer` in layout `per`; "mixed": both layouts', a channel width w keyed w + CHANNEL_KEY."""
    if per == "layer" or layer.table:
        return layer.errors
    if per == "channel":
        return layer.channel_errors
    return {**layer.errors, **{b + CHANNEL_KEY: e for b, e in layer.channel_errors.items()}}


def layer_choice(key, per: str = "layer") -> tuple[int, str]:
    """(bits, layout) of a layer's key in an allocation of layout `per` (a "mixed" one keys its own: CHANNEL_KEY)."""
    if per != "mixed":
        return int(key), per
    bits = int(np.floor(key))
    return bits, "layer" if bits == key else "channel"


def stored_bits(layer: LayerPrice, width, per: str = "layer") -> float:
    """Bits per weight of `layer` at `width` as the pack stores it: its index's coded bits (coded_bits; the width
    where not priced), plus its share of per-channel codebooks, or of a table's fp16 row scales and codebook (a table
    has one layout whatever the layers'; cluster's table_per). Unpriced, a table's grid key (table_choice) counts its
    width less the bits its indices save."""
    if layer.table:
        bits, _ = table_choice(width)
        index = layer.coded[width] if width in layer.coded else bits - layer.savings.get(width, 0.0)
        return index + (SCALE_BITS * layer.rows + CODEBOOK_ENTRY_BITS * 2 ** bits) / max(layer.weights, 1)
    width, per = layer_choice(width, per)
    if per == "layer":
        return float(layer.coded.get(width, width))
    books = CODEBOOK_ENTRY_BITS * (2 ** width) * layer.channels / max(layer.weights, 1)
    return layer.channel_coded.get(width, width) + books


def table_choice(key) -> tuple[int, str]:
    """(bits, cluster codebook form) of a table's key in an allocation: w is w-bit k-means, w - GRID_STEP the
    w-bit entropy form."""
    bits = int(np.ceil(key))
    return bits, "kmeans" if bits == key else "entropy"


def has_channel_layout(prices: Prices) -> bool:
    layers = [layer for layer in prices.layers if not layer.table]
    return bool(layers) and all(layer.channel_errors for layer in layers)


def layouts(prices: Prices) -> tuple:
    """The layouts the plan prices allocations in: one codebook a layer; one a channel, where every layer has a
    channel price; each layer its own ("mixed"), where some layer has one."""
    mixed = any(layer.channel_errors for layer in prices.layers if not layer.table)
    return ("layer",) + (("channel",) if has_channel_layout(prices) else ()) + (("mixed",) if mixed else ())


def frontier(prices: Prices, per: str = "layer", start: dict | None = None, frozen: frozenset = frozenset()) -> list[dict]:
    """Allocations (node -> bits) from all layers at the widest width to all at the narrowest, each one layer one
    width narrower than the one before: the step that adds the least summed relative error per bit saved. `per`
    "channel" prices one codebook per output channel (CHANNEL_BITS), its codebooks counted in the bits. From
    `start` instead of the widest, the items in `frozen` never narrower than there (a step the whole model failed:
    the rest of the frontier without it)."""
    current = dict(start) if start is not None else {layer.node: max(layout_errors(layer, per)) for layer in prices.layers}
    by_node = {layer.node: layer for layer in prices.layers}
    path = [dict(current)]
    while True:
        best, best_cost = None, np.inf
        for node, width in current.items():
            if node in frozen:
                continue
            layer = by_node[node]
            errors = layout_errors(layer, per)
            step = _cheapest_step(layer, width, errors, per)
            if step is None:
                continue
            b, cost = step
            if cost < best_cost or (cost == best_cost and best is not None and layer.weights > by_node[best[0]].weights):
                best, best_cost = (node, b), cost
        if best is None:
            return path
        current[best[0]] = best[1]
        path.append(dict(current))


def _cheapest_step(layer: LayerPrice, width, errors: dict, per: str) -> tuple | None:
    """(key, error per bit saved) of an item's next step from `width`: a layer's next narrower width; a table's or
    a mixed layer's narrower key of the least error per bit (the lower hull of its points: a grid that saves 0.15
    bits for 3x the drift, MPNet's 4-bit one, must not stand between the table and its next width; a mixed layer's
    keys are not ordered by bits, nor its errors by key). A layer's next width is the next that codes smaller: priced
    at coded bits, a narrower width can code no smaller (a codebook whose outliers take most entries). None: no step
    saves bits."""
    here = stored_bits(layer, width, per)
    narrower = [b for b in errors if stored_bits(layer, b, per) < here and (per == "mixed" or b < width)]
    best = None
    for b in (narrower if layer.table or per == "mixed" else [max(narrower)] if narrower else []):
        saved = layer.weights * (here - stored_bits(layer, b, per))
        if saved <= 0:
            continue
        cost = (errors[b] - errors[width]) / saved
        if best is None or cost < best[1]:
            best = (b, cost)
    return best


def finalists(prices: Prices, min_cosine: float | None) -> list[tuple]:
    """(allocation, layout) pairs compress validates, widest first: each layout's ladder (the per-channel and the
    mixed ones when priced), kept within the drift budget once measured, and of each layout only the rungs no other
    rung of that layout beats on both bits and predicted drift. One codebook per layer flattens the small output
    channels of a conv whose batch norm was folded in (PP-OCR's recogniser: single-layer drift 0.24-0.35 at 4 bits on
    three Convs); one per channel costs 2^bits fp16 entries a channel, which the bits count."""
    rungs = []
    for per in layouts(prices):
        chosen = ladder(prices, per=per)
        if min_cosine is not None and measured(prices):
            chosen = within_drift(prices, chosen, 1.0 - min_cosine, per=per)
        for allocation in chosen:
            allocation, layout = _one_layout(allocation, prices, per)
            if not any(allocation == r[0] and layout == r[1] for r in rungs):  # a mixed rung may be a pure one
                rungs.append((allocation, layout, average_bits(allocation, prices, layout),
                              predicted_drift(allocation, prices, layout)))
    if not measured(prices):  # unmeasured drift cannot compare layouts: per layer, as before
        rungs = [r for r in rungs if r[1] == "layer"]
    # A rung beats only rungs of its own layout: predicted drift ranks allocations within a layout, not across
    # (plan_phase). On PP-OCR's recogniser mixed rungs predicted lower (most layers 8 bits a layer) removed the
    # per-channel ones and failed on the model (8.20x -> 5.2x); priced at their coded bits (about 5 bits at 8),
    # per-layer rungs predicted near lossless removed its per-channel rungs under 5.3 bits, though its 8-bit layer
    # codebooks drift 0.0136.
    front = [r for r in rungs if not any(o is not r and o[2] <= r[2] and o[3] <= r[3] and (o[2], o[3]) != (r[2], r[3])
                                         and o[1] == r[1] for o in rungs)]
    front.sort(key=lambda r: -r[2])
    return [(a, per) for a, per, _, _ in front]


def _one_layout(allocation: dict, prices: Prices, per: str) -> tuple[dict, str]:
    """A mixed allocation whose layers all took one layout, written in that layout (as is otherwise)."""
    if per != "mixed":
        return allocation, per
    tables = {layer.node for layer in prices.tables}
    chosen = {node: layer_choice(key, per) for node, key in allocation.items() if node not in tables}
    kinds = {layout for _, layout in chosen.values()}
    if len(kinds) != 1:
        return allocation, per
    return {node: chosen[node][0] if node in chosen else key for node, key in allocation.items()}, kinds.pop()


def predicted_drift(allocation: dict, prices: Prices, per: str = "layer", tables: bool | None = None) -> float:
    """The summed per-layer prices of `allocation` over those of every layer at its widest width: in units of
    output drift once the prices are measured (`measured`). Layers do not add up exactly, and the cluster pass
    rounds and refits better than the priced codebooks: validated drift was 0.03-0.75 of this on ddddocr's
    detector and PP-OCR's recogniser (docs/benchmarks-compress.md), hence DRIFT_SLACK. `tables` True or False:
    the embedding tables' share alone (measured outright, the pass's own coding), or the layers' alone."""
    return float(sum(layout_errors(layer, per)[allocation[layer.node]] - layer.errors[max(layer.errors)]
                     for layer in prices.layers if layer.node in allocation and tables in (None, layer.table)))


def measured(prices: Prices) -> bool:
    return any(layer.drift is not None for layer in prices.layers)


def within_drift(prices: Prices, rungs: list[dict], budget: float, slack: float = DRIFT_SLACK,
                 per: str = "layer") -> list[dict]:
    """The rungs predicted within `slack` x `budget` of drift (the widest always), plus the frontier's narrowest
    allocation so predicted, in place of the rungs beyond it: bisecting from the middle of the ladder spent a
    whole-model candidate on a rung predicted 15x over (PP-OCR's recogniser at 4.5 bits), and the rung the budget
    allows fell between two of the ladder's."""
    limit = slack * budget
    kept = [r for r in rungs if predicted_drift(r, prices, per) <= limit] or rungs[:1]
    fitting = [a for a in frontier(prices, per) if predicted_drift(a, prices, per) <= limit]
    edge = fitting[-1] if fitting else None
    if edge is not None and average_bits(edge, prices, per) < average_bits(kept[-1], prices, per) - 0.05 \
            and len(kept) < len(rungs):
        kept.append(edge)
    return kept


def marginal_price(allocation: dict, prices: Prices, per: str = "layer") -> float:
    """Error per bit saved of the frontier's next step from `allocation` (inf when every layer is at its narrowest):
    the going rate a byte saved elsewhere must beat."""
    best = np.inf
    for layer in prices.layers:
        width = allocation.get(layer.node)
        step = None if width is None else _cheapest_step(layer, width, layout_errors(layer, per), per)
        if step is not None:
            best = min(best, step[1])
    return float(best)


def other_floats(allocation: dict, prices: Prices, per: str = "layer") -> str:
    """"int8" or "fp16" for the other floats of a planned allocation: int8 saves 8 bits per element over fp16, and
    is worth it only when its measured drift per bit saved is below the allocation's marginal codebook price (on
    PP-OCR's recogniser it is not: 0.3% of the pack for about 0.01 of output cosine). Unmeasured: int8, as the
    uniform codebook formats store them."""
    if prices.int8_drift is None or prices.int8_elements == 0:
        return "int8"
    price = prices.int8_drift / (8 * prices.int8_elements)
    return "int8" if price <= marginal_price(allocation, prices, per) else "fp16"


def average_bits(allocation: dict, prices: Prices, per: str = "layer") -> float:
    by_node = {layer.node: layer for layer in prices.layers}
    total = sum(by_node[node].weights for node in allocation)
    return sum(by_node[node].weights * stored_bits(by_node[node], b, per) for node, b in allocation.items()) / max(total, 1)


def ladder(prices: Prices, averages: tuple = LADDER, per: str = "layer") -> list[dict]:
    """The frontier's allocations nearest above each average width in `averages` (widest first, no repeats):
    the finalists compress validates on the whole model."""
    path = frontier(prices, per)
    out = []
    for target in sorted(averages, reverse=True):
        fitting = [a for a in path if average_bits(a, prices, per) >= target - 1e-9]
        chosen = fitting[-1] if fitting else path[0]
        if not out or chosen != out[-1]:
            out.append(chosen)
    return out


def summary(allocation: dict, prices: Prices, per: str = "layer") -> str:
    """'4.1 bits per weight (8 bits x2, 5 bits x10, 4 bits per channel x4, 4 bits x60; table 4 bits)', for notes
    and candidate labels."""
    tables = {layer.node for layer in prices.tables}
    counts: dict = {}
    for node, b in allocation.items():
        if node not in tables:
            counts[b] = counts.get(b, 0) + 1
    parts = []
    for key in sorted(counts, reverse=True):
        bits, layout = layer_choice(key, per)
        parts.append(f"{bits} bits{' per channel' if per == 'mixed' and layout == 'channel' else ''} x{counts[key]}")
    parts = ", ".join(parts)
    widths = [table_choice(allocation[layer.node]) for layer in prices.tables if layer.node in allocation]
    if widths:
        parts += f"; table{'s' if len(widths) > 1 else ''} " + ", ".join(
            f"{b}" + (" evenly spaced" if form == "entropy" else "") for b, form in widths) + " bits"
    layout = ", codebook per channel" if per == "channel" else ""
    return f"{average_bits(allocation, prices, per):.2f} bits per weight ({parts}{layout})"


# ---- whole-model drift ---------------------------------------------------------------------------

def _measure(prices: Prices, model, calibration, decoded: dict, channel_decoded: dict, threads: int, stop,
             coded: dict | None = None) -> None:
    """Scale each layer's errors to its whole-model drift at SENSITIVITY_BITS, per layout (a per-layer codebook
    wrecks small channels that a per-channel one keeps: the two amplify differently), price each table in `coded`
    (table -> bits -> indices, codebook, row scales) at each width by its measured drift, and measure the other
    floats in int8: one session whose weights are overridable inputs, one run of SENSITIVITY_SAMPLES samples per
    layer and layout, and per table and width."""
    coded = coded or {}
    from onnxshrink.passes.cluster import as_int8, other_float_tensors
    from onnxshrink.runtime import make_session, run_batches

    dataset = _dataset(model, calibration, SENSITIVITY_SAMPLES)
    if dataset is None or not dataset.batches:
        return
    graph = model.graph
    main = {t.name: t for t in graph.initializer}
    others = {}
    for tensor, value in other_float_tensors(graph):  # those store_other_floats would put in int8 (no codebook yet)
        if tensor.name in coded:  # a priced table: the cluster pass codes it before the other floats are stored
            continue
        stored = as_int8(value)
        if stored is not None:
            others[tensor.name] = (stored[1].astype(np.float32) * stored[2]).reshape(value.shape)
    feeds = list(dict.fromkeys([name for name, _ in decoded.values() if name in main] + list(others)
                               + [name for name in coded if name in main]))  # in a fixed order
    if not feeds:
        return
    specs = input_specs(model)
    known = {v.name for v in graph.input}
    added = [helper.make_tensor_value_info(name, main[name].data_type, list(main[name].dims)) for name in feeds
             if name not in known]
    # The weights made overridable inputs of the model itself, for the session only: a copy of it held 440 MB more
    # on MPNet
    graph.input.extend(added)
    try:
        session = make_session(model, threads)
    finally:
        del graph.input[len(graph.input) - len(added):]
    inputs = {v.name for v in session.get_inputs()}
    batches, left = [], SENSITIVITY_SAMPLES  # a batch may hold more samples than that: cut it (16 on PP-OCR's data)
    for batch in dataset.batches:
        if left <= 0:
            break
        size = min(len(next(iter(batch.values()))), left) if batch else 1
        batches.append({k: v[:size] if getattr(v, "ndim", 0) else v for k, v in batch.items() if k in inputs})
        left -= size
    batches = trim_padding(Dataset(batches, None, SENSITIVITY_SAMPLES - left, False, [], dict(dataset.batch_axes)),
                           specs).batches  # the samples chosen first, then their padding cut
    reference = run_batches(session, batches)
    found = attention_mask(specs, batches, dataset.batch_axes)
    masks = {name: found[1] for name, value in reference.items() if found is not None and masks_output(found[1], value)}

    def drift(replaced: dict) -> float:
        outputs = run_batches(session, [dict(batch, **replaced) for batch in batches])
        return max((_drift(reference[name], outputs[name], masks.get(name)) for name in reference), default=0.0)

    for layer in prices.tables:  # first: a handful of runs, and their prices are the measurements themselves
        if stop is not None and stop():
            break
        if layer.tensor not in coded or layer.tensor not in main:
            continue
        drifts, worst = {}, 0.0
        for b in sorted(coded[layer.tensor], reverse=True):
            idx, books, scale = coded[layer.tensor][b]
            table = (books[0][idx] * scale).astype(np.float32)
            worst = drifts[b] = max(worst, drift({layer.tensor: table}))
        layer.proxy, layer.errors = layer.errors, {b: drifts[b] for b in sorted(drifts) if b in layer.errors}
        layer.drift = layer.errors.get(SENSITIVITY_BITS)
    measured, channel_drift = {}, {}
    for layer in prices.layers:
        if layer.table:
            continue
        if stop is not None and stop():
            prices.notes.append(f"sensitivity stopped after {len(measured)} of {len(prices.layers) - len(prices.tables)} layers: the "
                                "others are scaled by the median of those measured")
            break
        entry = decoded.get(layer.node)
        if entry is None or entry[0] not in main:
            continue
        if entry[0] not in measured:
            measured[entry[0]] = drift({entry[0]: entry[1].value()})
            if layer.node in channel_decoded:
                channel_drift[entry[0]] = drift({entry[0]: channel_decoded[layer.node][1].value()})
        layer.drift = measured[entry[0]]
    ratios = [layer.drift / layer.errors[SENSITIVITY_BITS] for layer in prices.layers
              if not layer.table and layer.drift is not None and layer.errors.get(SENSITIVITY_BITS, 0) > 0]
    if not ratios:
        return
    median = float(np.median(ratios))
    for layer in prices.layers:
        if layer.table:
            continue
        base = layer.errors.get(SENSITIVITY_BITS, 0)
        scale = median if layer.drift is None or base <= 0 else layer.drift / base
        layer.proxy = dict(layer.errors)
        layer.errors = {b: e * scale for b, e in layer.errors.items()}
        base, measured_channel = layer.channel_errors.get(SENSITIVITY_BITS, 0), channel_drift.get(decoded.get(
            layer.node, ("",))[0])
        if measured_channel is not None and base > 0:
            scale = measured_channel / base
        layer.channel_errors = {b: e * scale for b, e in layer.channel_errors.items()}
    if others and not (stop is not None and stop()):
        prices.int8_elements = sum(int(v.size) for v in others.values())
        prices.int8_drift = drift(others)


def _drift(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """1 - validate's mean per-sample cosine of two outputs (validate.sample_cosines); 0 for non-float outputs. With
    `mask` ([samples, sequence], validate.masks_output), padding positions are zeroed in both, as validate leaves
    them out: a padded position's state follows the [PAD] row of a word table, which a coded table moves freely,
    and counted it priced MPNet's word table at 4 bits at 0.175 of drift where validate measures 0.004."""
    if a.dtype.kind != "f" or a.size == 0:
        return 0.0
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    cosines = sample_cosines(padding_zeroed(a, keep), padding_zeroed(b.reshape(a.shape), keep), keep)
    return float(max(0.0, 1.0 - np.mean(cosines)))


def _raw(layer, w: np.ndarray) -> np.ndarray:
    """A [K, N] matrix in the initializer's own layout (prune_common.write's mapping)."""
    if layer.op_type == "Conv":
        return w.T.reshape(layer.shape)
    return (w.T if layer.transposed else w) / layer.alpha


@dataclass
class _Decoded:
    """A layer's weight at SENSITIVITY_BITS, kept as its indices and codebooks and decoded into the initializer's
    layout when fed (value()): every layer's float32 copy in both layouts held 680 MB on MPNet while it was priced."""
    layer: object
    idx: np.ndarray  # [R, n]: codebook.assign's rows (one row, or one a column)
    books: np.ndarray
    per_channel: bool
    shape: tuple  # [K, N]

    def value(self) -> np.ndarray:
        decoded = codebook.decode(self.idx, self.books)  # uint8/uint16 indices index as they are
        return _raw(self.layer, decoded.T if self.per_channel else decoded.reshape(self.shape)).astype(np.float32)


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
    return Dataset(batches, None, count, dataset.synthetic, [], dict(dataset.batch_axes))


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
    means = {key: shared.pop(key) / count for key, count in rows.items() if count > 0}  # one array per input
    return {layer.name: means[(layer.x, str(layer.conv))] for layer in layers if (layer.x, str(layer.conv)) in means}


def _quadratic(d: np.ndarray, h: np.ndarray | None) -> float:
    return float(np.sum(d * d)) if h is None else float(np.sum(d * (h @ d)))
