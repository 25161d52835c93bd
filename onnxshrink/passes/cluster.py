"""Weight sharing as in Deep Compression: each weight becomes uint8 indices into a small float codebook.

Before:                          After (--per layer, the default):
    X ──► MatMul ◄── W (f32)         W_idx (uint8, W's shape) ──► Cast(int32) ──► Gather ◄── W_codebook (f32 [2^bits])
                                                                                    │
                                     X ──► MatMul ◄─────────────────────────────── W'

                                 After (--per channel): W_codebook f32 [C, 2^bits], one row per output
                                 channel; the indices get the channel's offset c * 2^bits (an Add of an
                                 int32 [C] tensor broadcast along the channel axis) and one Gather reads
                                 the codebook reshaped to [C * 2^bits].

Standard ops only, so every runtime runs it. Every input of the decoding is an initializer,
so onnxruntime constant-folds Cast/Add/Reshape/Gather when it creates the session: it runs the
same float MatMul/Gemm/Conv as the original, at the original's speed (api.cluster checks the
optimized graph and says so). The file holds one byte per weight (4x smaller than fp32);
`onnxshrink pack` Huffman-codes the indices in about `bits` bits per weight.

Codebooks (onnxshrink/algorithms/codebook.py): 1-D k-means of the weight values, optionally weighted by
the energy E[x_k^2] of each weight's input over the calibration data (as SqueezeLLM and GPTQ
weigh weights). A weight with exact zeros (pruned) keeps codebook entry 0 = 0.0 for them, so
zeros stay zeros and index 0 is what `pack` codes as gaps.

--codebook entropy fits evenly spaced values, only the cells some weight uses (a heavy tail's far weights span
hundreds of steps but use few of them); mostly 256 or fewer (uint8 indices); past that the indices are uint16 (2
bytes a weight in the file), ordered by use so that `pack` codes them in about their entropy.

Channel scales (per layer, a layer of CHANNEL_SCALE_MIN_INPUTS inputs or more): each output channel is divided by its
peak magnitude (an fp16 scale a channel, decoded as `Gather(codebook, indices) x scale`, folded at load like the
rest) before the layer's codebook is fitted. A transformer's output channels span several times in scale, and 16
values fitted to all of them serve the small ones badly: on all-MiniLM-L6-v2 at 4 bits the pooled cosine rose from
0.9674 to 0.9772 (docs/benchmarks-cluster.md) for 16/K bits a weight of scales (0.04 at K = 384).

Embedding tables (Gather data) get codebooks too (one per table, or one per row with --per channel),
fitted to their values alone; a table tied to an output projection is clustered once for both readers.

With calibration data, layers are fitted in graph order to the ORIGINAL model's outputs: each
layer's inputs are captured from the model with every upstream layer already clustered, and
after the assignment its codebook values (and bias) are refit by least squares so its outputs
match the original layer's outputs (codebook.refit; passes/prune.py's teacher Gram matrices).
The captures run a wave of layers at a time (prune_common.RoundCapture: q, k and v of a transformer
block in one run of each model, only the graph up to them), not one layer per run: the same
statistics for fewer runs; `capture_rounds` N groups waves into at most N runs. Padding tokens
(an `attention_mask` input's zeros) are left out of the statistics (prune_common.token_rows), and each
real token counts relative to its own size (prune_common.row_weights): MPNet's few "massive activation"
tokens otherwise decided every fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import memory
from onnxshrink.algorithms import codebook
from onnxshrink.data import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.model import iter_graphs
from onnxshrink.passes import table_rows
from onnxshrink.passes.common import (INDEX_TYPES, Names, Site, attr, begin_pass, drop_unused_initializers,
                                      gathers_codebook, initializer_owners, raise_opset, select_layers)
from onnxshrink.passes.prune_common import RoundCapture, describe as _describe, few_rows_note, read_bias as _read_bias
from onnxshrink.passes.quantize import QUANTIZED_OPS
from onnxshrink.passes.quantize_embeddings import EmbeddingPlan
from onnxshrink.passes.quantize_weights import _channel_axis
from onnxshrink.progress import step
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import find_tensors

SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
PER = ("layer", "channel")
TABLE_ROWS = ("uniform", "frequency")
WEIGHTINGS = ("none", "activation")
ROUNDINGS = ("nearest", "gptq")
HALF_MIN_ELEMENTS = 32  # below this a tensor saves less than its Cast node costs in the file
HALF_MAX_ERROR = 1e-3  # relative L2 change above which a tensor stays float32 (tiny or huge values)
INT8_MAX_ERROR = 1e-2  # relative L2 change above which --other-floats int8 stores a tensor as fp16 instead
INT8_MAX_PEAK_RATIO = 10.0  # a peak this many times the RMS: one int8 scale would flatten the small values
CODEBOOK_MIN_ELEMENTS = 8  # a 16-entry codebook saves 32 B as fp16, more than its Cast costs packed
OTHER_FLOATS = ("fp32", "fp16", "int8")
ENERGY_FLOOR = 1e-3  # activation weights are E[x^2] + this x their mean: inputs never seen still count a little
# channel scales by default on layers this wide (a scale costs 16/K bits a weight: 1/16 here, 0.04 on MiniLM's 384)
CHANNEL_SCALE_MIN_INPUTS = 256
MAX_OUTLIERS = 0.05  # past this, outliers (6 bytes each) cost more than the codebook saves


@dataclass
class ClusterConfig:
    bits: int = 4  # codebook of 2^bits values, 1..8
    per: str = "layer"  # "layer": one codebook per weight tensor; "channel": one per output channel
    weighting: str | None = None  # "none" or "activation" (needs calibration); None: activation with calibration
    refit: bool = True  # with calibration: least-squares codebook values (and bias) against the original outputs
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # glob patterns on node names
    keep_float: str | None = None  # "first", "last" or "both"
    min_weights: int = 0  # layers with fewer weights stay float
    float16: bool = False  # shorthand for other_floats="fp16"
    other_floats: str = "fp32"  # the float32 tensors left (biases, codebooks, norms, embeddings): fp32, fp16 or int8
    rounding: str | None = None  # "nearest" (None) or "gptq" (needs calibration; better on MiniLM, worse on the samples)
    embeddings: bool = True  # Gather tables (embeddings) get codebooks too, per row with --per channel
    # with calibration: layers whose statistics one run of the model (and of the original) captures together.
    # 0: a wave of layers no pending layer feeds (exactly what one run per layer gives); N > 0: at most N rounds
    # of consecutive depths (6 on MiniLM: one per transformer block); -1: one layer per run.
    capture_rounds: int = 0
    # node name -> bits for that layer (others: `bits`): one pass, so one capture, for a mixed-width plan
    # (compress_plan), where a pass per width captured the calibration data once per width. An embedding table is
    # named by its (first) Gather node: its width is its own, whatever the layers get.
    layer_bits: dict = field(default_factory=dict)
    # the embedding tables' layout: "layer" (one codebook, an fp16 scale a row) or "channel" (a codebook a row);
    # None: as `per`. compress's plan pairs per-channel layer codebooks with the row-scaled table, which costs 0.04
    # bits a weight in scales where a 16-entry codebook a 384-wide row costs 0.67.
    table_per: str | None = None
    # "kmeans": 2^bits values fitted by k-means; "entropy": evenly spaced values, as many as k-means' error allows
    # (up to 256), where their indices Huffman-code smaller in a pack (one codebook a layer or table only; see
    # algorithms/codebook.py). compress's planned candidates use "entropy".
    codebook: str = "kmeans"
    # node name -> codebook form for that layer or table (others: `codebook`), as layer_bits sets widths: compress's
    # plan chooses each table's form
    layer_codebook: dict = field(default_factory=dict)
    # node name -> "layer" or "channel" for that layer (others: `per`), as layer_bits sets widths: compress's plan
    # gives a codebook per channel to the layers one codebook flattens (MPNet's late FFN outputs: 0.029-0.073 of
    # drift at 4 bits per layer, 0.001-0.003 per channel) and keeps one per layer where that is cheaper in bits
    layer_per: dict = field(default_factory=dict)
    # a vocabulary table's rows: "uniform" (all alike) or "frequency" (with calibration: the rows of tokens it never
    # reads on a coarser step; passes/table_rows.py). compress's planned candidates use "frequency".
    table_rows: str = "uniform"
    # per-layer codebooks: an fp16 scale per output channel before the codebook (True), none (False), or None: on for
    # layers of CHANNEL_SCALE_MIN_INPUTS inputs or more. compress's formats and plan say False: priced with them,
    # its 20-minute MPNet search kept 5.06x where it keeps 6.58x without (docs/benchmarks-compress.md).
    channel_scales: bool | None = None
    # the largest-magnitude fraction of each layer's weights stored exactly (fp16 values, uint32 positions) beside
    # its codebook (SqueezeLLM's dense-and-sparse): the codebook and its channel scales then span the other weights
    # only. Layers with exact zeros (pruned) get none. 0: off.
    outliers: float = 0.0
    # node name -> that layer's outlier fraction (others: `outliers`), as layer_bits sets widths: a recipe rule's
    # `outliers`. compress's plan does not offer them: per layer they gained nothing (docs/benchmarks-compress.md)
    layer_outliers: dict = field(default_factory=dict)


def check_config(config: ClusterConfig, calibration) -> None:
    """Refuse contradictory or out-of-range options before anything is read or written."""
    def fraction_ok(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= MAX_OUTLIERS

    for node, fraction in dict(config.layer_outliers or {}).items():
        if not fraction_ok(fraction):
            raise UsageError(f"layer {node!r}: outliers {fraction}: must be between 0 and {MAX_OUTLIERS:g}")
    if not fraction_ok(config.outliers):
        raise UsageError(f"--outliers {config.outliers}: must be between 0 and {MAX_OUTLIERS:g} (a fraction of each "
                         "layer's weights stored exactly)")
    if isinstance(config.bits, bool) or not isinstance(config.bits, (int, np.integer)) or not 1 <= config.bits <= 8:
        raise UsageError(f"--bits {config.bits}: must be between 1 and 8 (a codebook of 2^bits values, uint8 indices)")
    if config.per not in PER:
        raise UsageError(f"--per {config.per!r}: choose layer (one codebook per weight) or channel (one per output channel)")
    if config.table_per not in (None,) + PER:
        raise UsageError(f"table_per {config.table_per!r}: choose layer (one codebook, an fp16 scale a row) or channel "
                         "(one codebook a row)")
    if config.table_rows not in TABLE_ROWS:
        raise UsageError(f"--table-rows {config.table_rows!r}: choose uniform (every row alike) or frequency (with "
                         "calibration data: the rows of tokens it never reads coded coarser)")
    if config.table_rows == "frequency" and calibration is None:
        raise UsageError("--table-rows frequency needs calibration data (--calibration FILE.npz): it counts the rows "
                         "that data reads")
    if config.table_rows == "frequency" and (config.table_per or config.per) == "channel":
        raise UsageError("--table-rows frequency needs the tables' row-scaled layout (one codebook a table): not "
                         "with --per channel")
    if config.codebook not in codebook.FORMS:
        raise UsageError(f"--codebook {config.codebook!r}: choose kmeans (2^bits values) or entropy (evenly spaced "
                         "values at k-means' error, fewer bits once packed)")
    for node, form in dict(config.layer_codebook or {}).items():
        if form not in codebook.FORMS:
            raise UsageError(f"layer {node!r}: codebook {form!r}: choose kmeans or entropy")
    if config.weighting not in (None,) + WEIGHTINGS:
        raise UsageError(f"--weighting {config.weighting!r}: choose none or activation")
    if config.weighting == "activation" and calibration is None:
        raise UsageError("--weighting activation needs calibration data (--calibration FILE.npz)")
    if config.other_floats not in OTHER_FLOATS:
        raise UsageError(f"--other-floats {config.other_floats!r}: choose fp32, fp16 or int8")
    if config.rounding not in (None,) + ROUNDINGS:
        raise UsageError(f"--rounding {config.rounding!r}: choose nearest or gptq")
    if config.rounding == "gptq" and calibration is None:
        raise UsageError("--rounding gptq needs calibration data (--calibration FILE.npz)")
    unknown = set(config.op_types) - set(SUPPORTED_OPS)
    if unknown:
        raise UsageError(f"--op-types: unsupported op type(s) {', '.join(sorted(unknown))} (choose from MatMul, Gemm, Conv)")
    if config.keep_float not in (None, "first", "last", "both"):
        raise UsageError(f"--keep-float {config.keep_float!r}: choose first, last or both")
    if isinstance(config.capture_rounds, bool) or not isinstance(config.capture_rounds, (int, np.integer)) \
            or config.capture_rounds < -1:
        raise UsageError(f"--capture-rounds {config.capture_rounds}: 0 (one run per wave of layers), N > 0 (at most "
                         "N runs) or -1 (one run per layer)")
    for node, per in dict(config.layer_per or {}).items():
        if per not in PER:
            raise UsageError(f"layer {node!r}: per {per!r}: choose layer (one codebook per weight) or channel (one per "
                             "output channel)")
    for node, bits in dict(config.layer_bits or {}).items():
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise UsageError(f"layer {node!r}: bits {bits} must be between 1 and 8")
    if config.channel_scales not in (None, True, False):
        raise UsageError(f"channel_scales {config.channel_scales!r}: true, false, or unset (on for layers of "
                         f"{CHANNEL_SCALE_MIN_INPUTS} inputs or more)")
    if not isinstance(config.min_weights, (int, np.integer)) or config.min_weights < 0:
        raise UsageError(f"--min-weights {config.min_weights}: must be a non-negative integer")


class Cluster:
    """MatMul/Gemm/Conv weights as uint8 indices into per-layer (or per-channel) float codebooks."""

    name = "cluster"

    def __init__(self, config: ClusterConfig | None = None, calibration: Dataset | None = None, threads: int = 1):
        self.config = config = config or ClusterConfig()
        check_config(config, calibration)
        self.calibration = calibration
        self.threads = threads
        self.levels = 2 ** int(config.bits)
        self.layer_levels = {node: 2 ** int(bits) for node, bits in dict(config.layer_bits or {}).items()}
        self.table_per = config.table_per or config.per
        self.weighting = config.weighting or ("activation" if calibration is not None else "none")
        self.refit = bool(config.refit) and calibration is not None
        # GPTQ order raised MiniLM's 4-bit cosine from 0.9655 to 0.9766 but cost the sample models up to 0.7 points
        # (docs/benchmarks-cluster.md): not the default
        self.rounding = config.rounding or "nearest"

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        config = self.config
        model, report = begin_pass(model, self.name, asdict(config))
        records = {r.name: r for r in find_tensors(model)}
        sites, skipped = select_layers(model, records, SUPPORTED_OPS, config, self._judge(records))
        for decision in skipped:  # a clustered layer's reason is select_layers' own ("already clustered: ...")
            decision.action = "kept"  # select_layers speaks for quantize ("kept float")
        report.layers.extend(skipped)
        units: dict[str, list] = {}
        for site in sites:
            units.setdefault(site.weight, []).append(site)
        for weight, group in list(units.items()):
            readers = records[weight].consumers
            if len(readers) > len(group):  # some reader is not clustered: one codebook would change it too
                others = [f"{c.node} ({c.op_type})" for c in readers
                          if not any(c.node == s.name or c.node.endswith("/" + s.name) for s in group)]
                for site in group:
                    report.layers.append(LayerDecision(
                        site.name, site.node.op_type, weight, "kept",
                        f"tied weight also read by {', '.join(others) or 'another input'}, which is not clustered: "
                        "its codebook would change that too", records[weight].nbytes, records[weight].nbytes))
                del units[weight]
        tables = self._tables(model, records, units, report) if config.embeddings else {}
        if not units and not tables:
            report.notes.append(nothing_to_cluster(model))
            return model, report
        # Cast with an integer `to` needs opset 6; per-channel offsets (a broadcasting Add) and int8 scales 7.
        needed = 7 if config.per == "channel" or "channel" in dict(config.layer_per or {}).values() \
            or other_floats(config) == "int8" \
            or (tables and self.table_per == "layer") \
            or any(self._scaled(group[0].node, records[weight].shape) for weight, group in units.items()) else 6
        what = "the codebook decoding (Cast, Gather" + (", broadcasting Add/Mul)" if needed == 7 else ")")
        why = raise_opset(model, needed, what, report.notes)
        if why:
            for group in list(units.values()) + list(tables.values()):
                report.layers.extend(LayerDecision(site.name, site.node.op_type, site.weight, "kept", why,
                                                   records[site.weight].nbytes, records[site.weight].nbytes) for site in group)
            report.notes.append(nothing_to_cluster(model))
            return model, report
        self._owners = initializer_owners(model)
        self._names = Names(model)
        self._records = records
        self._main_outputs = {name for node in model.graph.node for name in node.output}
        self._model_inputs = {value.name for value in model.graph.input} - {t.name for t in model.graph.initializer}
        original = None
        if self.calibration is not None and (self.weighting == "activation" or self.refit or self.rounding == "gptq"):
            original = onnx.ModelProto()
            original.CopyFrom(model)
        stats = []
        if original is not None:  # teacher statistics a round of layers at a time (prune_common.RoundCapture)
            usable = [layer for layer in (self._layer(group) for group in units.values()) if layer is not None]
            self._statistics = RoundCapture(self.calibration, original, model, usable,
                                            {layer.name: layer.bias is not None for layer in usable},
                                            config.capture_rounds, self.threads)
        for index, (weight, group) in enumerate(units.items()):
            step("cluster: layers", index, len(units))
            report.layers.extend(self._cluster(model, original, weight, group, stats))
            memory.release()  # a layer's float64 copies, Gram and refit: freed between small long-lived arrays
        for weight, group in tables.items():
            report.layers.extend(self._cluster_table(weight, group, stats))
        drop_unused_initializers(model)
        report.changed = any(layer.action.startswith("codebook") for layer in report.layers)
        if not report.changed:
            report.notes.append(nothing_to_cluster(model))
            return model, report
        self._notes(report, stats, original is not None)
        others = other_floats(config)
        if others != "fp32":
            report.notes.append(store_other_floats(model, others))
            for layer in report.layers:  # the codebooks went to fp16 with the rest
                layer.action = layer.action.replace(" x fp32", " x fp16")
        return model, report

    # ---- selection ---------------------------------------------------------------------

    def _judge(self, records):
        config = self.config

        def judge(node, record, constants):
            if record.dtype != "float":
                return f"weight is {record.dtype}: only float32 weights are clustered"
            if node.input[0] in records:
                return f"both {node.op_type} operands are constant"
            if node.op_type in ("MatMul", "Gemm") and len(record.shape) != 2:
                return f"{node.op_type} weight of rank {len(record.shape)}: only 2-D weights are clustered"
            if node.op_type == "Conv" and len(record.shape) < 3:
                return f"Conv weight of rank {len(record.shape)}"
            count = int(np.prod(record.shape))
            if count < config.min_weights:
                return f"{count} weights, fewer than --min-weights {config.min_weights}"
            after = self._bytes_after(record.shape, node, self.layer_levels.get(node.name, self.levels))
            if after >= record.nbytes:
                return f"indices and codebook ({after} B) would not be smaller than the weight ({record.nbytes} B)"
            return None

        return judge

    def _bytes_after(self, shape, node, levels=None) -> int:
        count, levels = int(np.prod(shape)), levels or self.levels
        per = self.table_per if node.op_type == "Gather" else self._per(node.name)
        if per == "layer":
            if node.op_type == "Gather":
                scales = shape[0]  # a table's row scales
            else:
                scales = shape[_channel_axis(node)] if self._scaled(node, shape) else 0  # a layer's channel scales
            return count + 4 * levels + 2 * scales
        channels = shape[_channel_axis(node)]
        return count + 4 * levels * channels + 4 * channels + 8

    # ---- embedding tables ----------------------------------------------------------------

    def _tables(self, model, records, units, report) -> dict[str, list]:
        """Gather tables (embeddings) to cluster: table -> every node that reads it (a tied output projection too,
        taken out of `units`). A table is clustered on its values alone: no layer input weighs them."""
        plan = EmbeddingPlan(model, records, self.config.exclude)
        names = {node.name or f"{node.op_type}_{index}": node for index, node in enumerate(model.graph.node)}
        tables = {}
        for table in plan.tables.values():
            count = int(np.prod(table.shape)) if table.shape else 0
            why = table.skip or (f"{count} weights, fewer than --min-weights {self.config.min_weights}"
                                 if count < self.config.min_weights else "")
            first = table.gathers[0][0]
            if not why and self._bytes_after(table.shape, names[first], self.layer_levels.get(first)) >= table.nbytes:
                why = "indices and codebook would not be smaller than the table"
            if why:
                report.layers.extend(LayerDecision(name, "Gather", table.name, "kept", why, table.nbytes, table.nbytes)
                                     for name, _ in table.gathers)
                continue
            readers = [name for name, _ in table.gathers] + [name for name, _, _ in table.others]
            tables[table.name] = [Site(model.graph, names[name], name, table.name) for name in readers]
            units.pop(table.name, None)
        report.layers[:] = [d for d in report.layers if d.weight not in tables]  # a tied reader's "kept" (above)
        return tables

    def _cluster_table(self, weight, group, stats) -> list[LayerDecision]:
        per, levels = self.table_per, self.layer_levels.get(group[0].name, self.levels)
        graph, tensor = self._owners[weight]
        raw = numpy_helper.to_array(tensor).astype(np.float32)
        steps = None
        if per == "layer" and self.config.table_rows == "frequency":
            ids = table_rows.vocabulary_ids([site.node for site in group], self._model_inputs, raw.shape[0])
            steps = table_rows.row_steps(table_rows.row_counts(ids, self.calibration, raw.shape[0]))
        idx, books, row_scale, decoded = table_codebook(raw, levels, per, self._form(group), steps)
        idx, books = wide_grid_order(idx, books)
        mse = float(np.mean((raw - decoded) ** 2))
        uniform = codebook.uniform_mse(raw if per == "channel" else raw.reshape(1, -1), levels)
        stats.append(("mse", mse, uniform))
        gather = next(site for site in group if site.node.op_type == "Gather")
        after = self._write(graph, weight, raw.shape, idx, books.astype(np.float32), gather.node, group, row_scale, per)
        shape = f"{books.shape[-1]}" if per == "layer" else f"{books.shape[0]} x {levels}"
        kind = " per row" if per == "channel" else " x an fp16 scale a row"
        action = f"codebook {shape} x fp32{kind}, {np.dtype(index_dtype(books.shape[-1])).name} indices"
        why = (f"embedding table, rounded to the nearest entry; weight MSE {mse:.3g}, "
               f"{mse / uniform if uniform > 0 else 0.0:.2f}x uniform {levels}-level rounding; decoded at load"
               + table_rows.describe(steps))
        decisions = [LayerDecision(gather.name, "Gather", weight, action, why, raw.nbytes, after)]
        decisions += [LayerDecision(site.name, site.node.op_type, weight, action + " (tied: clustered once)",
                                    f"shares the codebook of {gather.name}", 0, 0) for site in group if site is not gather]
        return decisions

    # ---- clustering one weight -----------------------------------------------------------

    def _scaled(self, node, shape) -> bool:
        """Whether a layer's per-layer codebook gets channel scales (the config's, or by its number of inputs)."""
        if node.op_type == "Gather" or self._per(node.name) != "layer":
            return False
        outputs = shape[_channel_axis(node)]
        inputs = int(np.prod(shape)) // max(outputs, 1)
        if self.config.channel_scales is not None:
            return bool(self.config.channel_scales) and outputs > 1
        return inputs >= CHANNEL_SCALE_MIN_INPUTS and outputs > 1

    def _per(self, node: str) -> str:
        """A layer's codebook layout: its layer_per rule, else --per."""
        return dict(self.config.layer_per or {}).get(node, self.config.per)

    def _outlier_fraction(self, node: str) -> float:
        """A layer's outlier fraction: its layer_outliers rule, else --outliers."""
        return dict(self.config.layer_outliers or {}).get(node, self.config.outliers)

    def _form(self, group) -> str:
        return dict(self.config.layer_codebook or {}).get(group[0].name, self.config.codebook)

    def _layer(self, group):
        """The layer a weight's codebook is fitted to the data of, or None (`_not_data_aware` says why)."""
        layer = _describe(group[0], self._owners, self._records, self._main_outputs)
        return None if _not_data_aware(layer, group) else layer

    def _cluster(self, model, original, weight, group, stats) -> list[LayerDecision]:
        config, levels = self.config, self.layer_levels.get(group[0].name, self.levels)
        per = self._per(group[0].name)
        graph, tensor = self._owners[weight]
        raw = numpy_helper.to_array(tensor).astype(np.float32)
        site = group[0]
        layer = _describe(site, self._owners, self._records, self._main_outputs)
        view = _to_view(raw, layer)  # [K, N]: K inputs, N outputs
        k, n = view.shape
        fraction = self._outlier_fraction(group[0].name)
        keep = codebook.outlier_mask(view, fraction)  # stored exactly: the codebook and scales span the rest
        # the columns the codebook holds: each output channel over its fp16 peak (weight = codebook value x scale)
        spanned = view if keep is None else np.where(keep, 0.0, view)
        scale = _row_scales(spanned.T).reshape(-1) if self._scaled(site.node, raw.shape) else None
        if scale is not None:
            view = view / scale
        gram, plain = None, ""
        if original is not None:
            plain = _not_data_aware(layer, group)
            if not plain:
                gram = self._statistics.of(layer)
                stats.append(("rows", gram.k, gram.rows))
        rows = view.T if per == "channel" else view.reshape(1, -1)
        weights = None
        if gram is not None and self.weighting == "activation":
            energy = np.diag(gram.xtx)[:k] / max(gram.rows, 1)
            energy = energy + ENERGY_FLOOR * max(float(energy.mean()), 1e-30)
            weights = np.broadcast_to(energy[:, None], (k, n))
            if scale is not None:  # a scaled value's error costs scale^2 on the layer's output
                weights = weights * np.square(scale, dtype=np.float64)[None, :]
            weights = weights.T if per == "channel" else weights.reshape(1, -1)
        elif scale is not None:  # and in the weight: k-means minimises the error of the weights decoded
            weights = np.broadcast_to(np.square(scale, dtype=np.float64)[None, :], (k, n)).reshape(1, -1)
        if keep is not None:  # the outliers are not the codebook's to fit
            free = ~(keep.T if per == "channel" else keep.reshape(1, -1))
            weights = free.astype(np.float64) if weights is None else np.where(free, weights, 0.0)
        zeros = int(np.count_nonzero(view == 0))
        reserve = zeros > 0
        books = codebook.fit(rows, levels, weights, reserve_zero=reserve, form=self._form(group),
                             margin=codebook.DATA_AWARE_GRID_MARGIN if gram is not None else 1.0)
        rounded = "nearest entry"
        exact = None
        if gram is not None and self.rounding == "gptq":
            hessian = _input_hessian(gram, k, centred=self.refit)
            if keep is None:
                idx = codebook.gptq_assign(view, books, hessian, reserve_zero=reserve)
            else:
                idx, exact = codebook.gptq_assign(view, books, hessian, keep=keep)
            idx_rows = idx.T if per == "channel" else idx.reshape(1, -1)
            rounded = "GPTQ (errors folded into the inputs not yet rounded)"
        else:
            idx_rows = codebook.assign(rows, books, reserve_zero=reserve)
            idx = idx_rows.T if per == "channel" else idx_rows.reshape(k, n)
            exact = None if keep is None else np.where(keep, view, 0.0)
        if exact is not None:  # as the graph stores them: fp16 values (in the layer's own units) at uint32 positions
            unscaled = exact if scale is None else exact * scale[None, :]
            exact = np.where(keep, unscaled.astype(np.float16).astype(np.float64), 0.0)
        decoded_rows = codebook.decode(idx_rows, books)
        if keep is not None:  # the error of the values the graph decodes, outliers exact
            decoded_rows = np.where(free, decoded_rows, rows)
        mse, uniform = float(np.mean((rows - decoded_rows) ** 2)), codebook.uniform_mse(rows, levels)
        stats.append(("mse", mse, uniform))
        why = [f"rounded to the {rounded}; weight MSE {mse:.3g}, "
               f"{mse / uniform if uniform > 0 else 0.0:.2f}x uniform {levels}-level rounding"
               + (f"; {zeros} zeros kept exactly at index 0" if reserve else "")
               + ("; weighted by input energy" if gram is not None and self.weighting == "activation" else "")
               + ("; channels scaled to peak 1 first (weight MSE in those units)" if scale is not None else "")
               + (f"; {int(keep.sum())} outliers ({fraction:.2%}) stored exactly" if keep is not None else "")
               + (f"; {books.shape[-1]} evenly spaced values (entropy form: fewer bits packed than {levels} k-means "
                  "values at no more error)" if books.shape[-1] != levels else "")]
        if gram is not None and self.refit:
            result = codebook.refit(idx, books * layer.alpha, gram, _read_bias(layer, self._owners), keep_zero=reserve,
                                    column_scale=scale, exact=None if exact is None else exact * layer.alpha,
                                    coded=None if keep is None else ~keep)
            if result is None:
                why.append(f"not refit: {k}x{n} with {levels} levels per channel is too large for the normal equations")
            else:
                books = result.codebooks / layer.alpha
                if result.bias is not None:
                    bias = self._owners[layer.bias][1]
                    value = (result.bias / layer.bias_scale).astype(np.float32).reshape(tuple(bias.dims))
                    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
                subset = f", normal equations from {result.columns} of {n} columns" if result.columns < n else ""
                refit_mse = float(np.mean((rows - codebook.decode(idx_rows, books)) ** 2))
                why.append(f"layer output error {result.error_after:.2%} after refit ({result.error_before:.2%} "
                           f"k-means only{subset}; weight MSE after it {refit_mse:.3g})")
                stats.append(("refit", result.error_before, result.error_after))
        idx, books = wide_grid_order(idx, books.astype(np.float32))
        if plain:
            why.append(f"not data-aware: {plain}")
        if scale is not None:  # [1, N] in the view: the initializer's channel axis
            scale = _from_view(scale.reshape(1, n), layer, (n,) + (1,) * (raw.ndim - 1))
        sparse = None
        if keep is not None:  # positions in the initializer's own layout, row-major
            where = _from_view(keep, layer, raw.shape).reshape(-1)
            positions = np.flatnonzero(where)
            sparse = (positions, _from_view(exact, layer, raw.shape).reshape(-1)[positions])
        after = self._write(graph, weight, raw.shape, _from_view(idx, layer, raw.shape), books, site.node, group,
                            scale, per=per, sparse=sparse)
        shape = f"{books.shape[-1]}" if per == "layer" else f"{books.shape[0]} x {levels}"
        action = (f"codebook {shape} x fp32{' per channel' if per == 'channel' else ''}, "
                  f"{np.dtype(index_dtype(books.shape[-1])).name} indices"
                  + (" x an fp16 scale a channel" if scale is not None else "")
                  + (f", {int(keep.sum())} fp16 outliers" if keep is not None else ""))
        decisions = [LayerDecision(site.name, site.node.op_type, weight, action, "; ".join(why), raw.nbytes, after)]
        for other in group[1:]:
            decisions.append(LayerDecision(other.name, other.node.op_type, weight, action + " (tied: clustered once)",
                                           f"shares the codebook of {site.name}", 0, 0))
        return decisions

    def _write(self, graph, weight, shape, idx, books, node, group, row_scale=None, per=None, sparse=None) -> int:
        """Indices, codebook and the decoding nodes in the graph that owns the weight (times `row_scale`, stored
        fp16, when given: a table's [rows, 1], a layer's along its channel axis), one codebook `per` layer or
        channel (None: the config's), and `sparse` (flat positions, values) written over the decoded weight by a
        ScatterND (outliers); returns their bytes. onnxruntime folds all of it at load."""
        names, per = self._names, per or self.config.per
        idx_name, book_name, decoded = names(weight + "_idx"), names(weight + "_codebook"), names(weight + "_decoded")
        final = decoded
        if sparse is not None:
            decoded = names(weight + "_coded")
        inits = [numpy_helper.from_array(np.ascontiguousarray(idx, dtype=index_dtype(books.shape[-1])), idx_name),
                 numpy_helper.from_array(books if per == "channel" else books[0], book_name)]
        nodes = [helper.make_node("Cast", [idx_name], [idx_name + "_int32"], name=idx_name + "_Cast", to=TensorProto.INT32)]
        index, data = idx_name + "_int32", book_name
        if per == "channel":
            axis = _channel_axis(node)
            offsets_shape = [1] * len(shape)
            offsets_shape[axis] = shape[axis]
            offsets, flat = names(weight + "_offsets"), names(weight + "_codebook_flat")
            inits += [numpy_helper.from_array((np.arange(shape[axis], dtype=np.int32) * books.shape[-1]).reshape(offsets_shape),
                                              offsets),
                      numpy_helper.from_array(np.array([-1], dtype=np.int64), flat + "_shape")]
            nodes += [helper.make_node("Add", [index, offsets], [offsets + "_out"], name=offsets + "_Add"),
                      helper.make_node("Reshape", [book_name, flat + "_shape"], [flat], name=flat + "_Reshape")]
            index, data = offsets + "_out", flat
        if row_scale is None:
            nodes.append(helper.make_node("Gather", [data, index], [decoded], name=decoded + "_Gather", axis=0))
        else:
            kind = "_row_scale" if node.op_type == "Gather" else "_channel_scale"
            scale, unscaled = names(weight + kind), names(weight + "_unscaled")
            inits.append(numpy_helper.from_array(row_scale.astype(np.float16), scale))
            nodes += [helper.make_node("Gather", [data, index], [unscaled], name=decoded + "_Gather", axis=0),
                      helper.make_node("Cast", [scale], [scale + "_float"], name=scale + "_Cast", to=TensorProto.FLOAT),
                      helper.make_node("Mul", [unscaled, scale + "_float"], [decoded], name=decoded + "_Mul")]
        if sparse is not None:
            positions, values = sparse
            where, exact, flat = names(weight + "_outlier_positions"), names(weight + "_outliers"), names(weight + "_flat")
            inits += [numpy_helper.from_array(positions.astype(np.uint32).reshape(-1, 1), where),
                      numpy_helper.from_array(values.astype(np.float16), exact),
                      numpy_helper.from_array(np.array([-1], dtype=np.int64), flat + "_shape"),
                      numpy_helper.from_array(np.array(shape, dtype=np.int64), final + "_shape")]
            nodes += [helper.make_node("Reshape", [decoded, flat + "_shape"], [flat], name=flat + "_Reshape"),
                      helper.make_node("Cast", [where], [where + "_int64"], name=where + "_Cast", to=TensorProto.INT64),
                      helper.make_node("Cast", [exact], [exact + "_float"], name=exact + "_Cast", to=TensorProto.FLOAT),
                      helper.make_node("ScatterND", [flat, where + "_int64", exact + "_float"], [flat + "_exact"],
                                       name=flat + "_ScatterND"),
                      helper.make_node("Reshape", [flat + "_exact", final + "_shape"], [final], name=final + "_Reshape")]
        graph.initializer.extend(inits)
        for site in group:
            for i, name in enumerate(site.node.input):
                if name == weight:
                    site.node.input[i] = final
        for position, new in enumerate(nodes):
            graph.node.insert(position, new)
        return sum(numpy_helper.to_array(t).nbytes for t in inits)

    def _notes(self, report, stats, data_aware) -> None:
        config = self.config
        mse = [(a, b) for kind, a, b in stats if kind == "mse"]
        ratio = sum(a for a, _ in mse) / max(sum(b for _, b in mse), 1e-300)
        entropy_form = config.codebook == "entropy" or "entropy" in dict(config.layer_codebook or {}).values()
        report.notes.append(
            f"{len(mse)} weight(s) clustered into {self.levels}-value codebooks per {config.per}"
            + (f" ({len(self.layer_levels)} layer(s) with their own width: layer_bits)" if self.layer_levels else "")
            + (f" ({len(config.layer_per)} layer(s) with their own layout: layer_per)" if config.layer_per else "")
            + ("; entropy form: evenly spaced values at k-means' error where their indices code smaller"
               if entropy_form else "")
            + f"; weight MSE {ratio:.2f}x that of uniform round-to-nearest at the same widths (summed over layers)")
        if data_aware:
            refits = [(a, b) for kind, a, b in stats if kind == "refit"]
            text = (f"fitted in graph order to the original model on {self.calibration.samples} calibration sample(s), "
                    f"each layer fed the already-clustered upstream layers' outputs ({self._statistics.runs} capture "
                    f"run(s) of each model; tokens an attention_mask marks as padding left out); k-means weighted by "
                    f"{'input energy E[x^2]' if self.weighting == 'activation' else 'nothing (--weighting none)'}")
            if refits:
                text += (f"; codebook values and biases refit by least squares: mean layer output error "
                         f"{np.mean([b for _, b in refits]):.2%} (k-means only {np.mean([a for a, _ in refits]):.2%})")
            report.notes.append(text)
            short = few_rows_note((k, rows) for kind, k, rows in stats if kind == "rows")
            if short:
                report.notes.append(short)
        wide = " (uint16 where an evenly spaced codebook uses over 256 values)" if entropy_form else ""
        report.notes.append(f"the file holds one uint8 index per weight{wide} (4x smaller than fp32); `onnxshrink pack` "
                            f"codes the indices in about {config.bits} bit(s) per weight")


def other_floats(config: ClusterConfig) -> str:
    """fp32, fp16 or int8: --float16 is --other-floats fp16 (int8 wins when both are given)."""
    return "fp16" if config.float16 and config.other_floats == "fp32" else config.other_floats


def store_other_floats(model: onnx.ModelProto, mode: str) -> str:
    """Store the float32 initializers cluster leaves (biases, LayerNorm parameters, embeddings) as fp16 behind a
    Cast, or with `mode` "int8" as int8 behind Cast and Mul(scale), and the codebooks as fp16 in either mode;
    onnxruntime folds every decoding node at load. Once weights are clustered, pruned and packed, these tensors
    are a fifth to a third of a small model's file, and LZMA cannot shrink float noise. MatMul/Gemm/Conv weights
    are left to the passes that compress them; graph inputs and outputs and tiny tensors stay float32 (a decoding
    node costs about what they would save; codebooks go down to CODEBOOK_MIN_ELEMENTS); a tensor falls back from
    int8 to fp16, or from fp16 to float32, where its values would change by more than INT8_MAX_ERROR or
    HALF_MAX_ERROR (relative L2)."""
    names = Names(model)
    books = codebook_tensors(model)
    counts = {"fp16": 0, "int8": 0}
    saved, worst = 0, {"fp16": 0.0, "int8": 0.0}
    for graph in iter_graphs(model.graph):
        for tensor, value in other_float_tensors(graph, books):
            stored = None
            if mode == "int8" and tensor.name not in books:
                stored = as_int8(value)
            if stored is None:
                stored = _as_fp16(value)
            if stored is None:
                continue
            kind, data, scale, error = stored
            name = names(tensor.name + ("_int8" if kind == "int8" else "_fp16"))
            graph.initializer.remove(tensor)
            graph.initializer.append(numpy_helper.from_array(data, name))
            decoded = name + "_float" if kind == "int8" else tensor.name  # names(...) reserved name + its suffixes
            nodes = [helper.make_node("Cast", [name], [decoded], name=name + "_Cast", to=TensorProto.FLOAT)]
            if kind == "int8":
                scale_name = name + "_scale"
                graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name))
                nodes.append(helper.make_node("Mul", [decoded, scale_name], [tensor.name], name=name + "_Mul"))
            for position, node in enumerate(nodes):
                graph.node.insert(position, node)
            counts[kind] += 1
            saved += value.nbytes - data.nbytes - (4 if kind == "int8" else 0)
            worst[kind] = max(worst[kind], error)
    flag = "--other-floats int8" if mode == "int8" else "--float16"
    if not any(counts.values()):
        return f"{flag}: no other float32 tensor to store in fewer bits"
    parts = [f"{counts[k]} as {k} (largest relative change {worst[k]:.1e})" for k in ("int8", "fp16") if counts[k]]
    return (f"{flag}: other float32 tensors (biases, codebooks, norms, embeddings) stored {', '.join(parts)}, behind "
            f"Casts onnxruntime folds at load: {saved} B smaller")


def other_float_tensors(graph: onnx.GraphProto, books: set = frozenset()):
    """(tensor, value) of each float32 initializer of `graph` that --other-floats stores in fewer bits: not a
    MatMul/Gemm/Conv weight (the passes compress those), not a graph input or output, not tiny (a decoding node
    costs about what it would save; codebooks in `books` down to CODEBOOK_MIN_ELEMENTS), not one repeated value (a
    LayerNorm scale of ones: LZMA stores it in bytes). compress_plan prices the same tensors."""
    weights = {node.input[1] for node in graph.node if node.op_type in SUPPORTED_OPS and len(node.input) > 1}
    public = {v.name for v in list(graph.input) + list(graph.output)}
    for tensor in list(graph.initializer):
        small = int(np.prod(tensor.dims)) < (CODEBOOK_MIN_ELEMENTS if tensor.name in books else HALF_MIN_ELEMENTS)
        if tensor.data_type != TensorProto.FLOAT or tensor.name in weights or tensor.name in public or small:
            continue
        value = numpy_helper.to_array(tensor)
        if not np.all(value == value.flat[0]):
            yield tensor, value


def _as_fp16(value: np.ndarray):
    with np.errstate(over="ignore"):
        half = value.astype(np.float16)
    error = _relative_change(value, half.astype(np.float32))
    if not np.all(np.isfinite(half)) or error > HALF_MAX_ERROR:
        return None
    return "fp16", half, None, error


def as_int8(value: np.ndarray):
    """Symmetric int8 with one scale for the tensor: norms and biases span a narrow range. A tensor with an outlier
    (peak over INT8_MAX_PEAK_RATIO x its RMS) would lose its small values to the scale the outlier needs."""
    peak = float(np.max(np.abs(value))) if value.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64)))) if value.size else 0.0
    if not np.isfinite(peak) or peak == 0.0 or peak > INT8_MAX_PEAK_RATIO * rms:
        return None
    scale = np.float32(peak / 127.0)
    q = np.clip(np.rint(value / scale), -127, 127).astype(np.int8)
    error = _relative_change(value, q.astype(np.float32) * scale)
    return None if error > INT8_MAX_ERROR else ("int8", q, scale, error)


def table_codebook(raw: np.ndarray, levels: int, per: str = "layer", form: str = "kmeans",
                   row_step: np.ndarray | None = None) -> tuple:
    """An embedding table [rows, width] coded as the pass writes it: (indices [rows, width], codebooks [R, levels],
    fp16 row scales [rows, 1] or None, the decoded table). compress_plan prices tables with this very coding.

    per "layer": one codebook for the table, its rows scaled to peak 1 first (an fp16 scale a row), since rows span
    20x in scale and one set of values fits them all badly. MiniLM's word table alone, pooled cosine on held-out
    sentences: 0.99685 -> 0.99831 at 4 bits, 0.99822 -> 0.99957 at 5, for 2 bytes a row (docs/benchmarks-cluster.md).
    per "channel": one codebook a row, fitted to the row's own values. `form`: codebook.fit's (per "layer" only).
    `row_step` [rows, 1] (per "layer" only): each row's scale is its peak times this, so a row of step s > 1 reads only
    the middle of the codebook, on an s times coarser step (table_rows: the rows the calibration data never reads)."""
    row_scale = _row_scales(raw, row_step) if per == "layer" else None
    scaled = raw if row_scale is None else raw / row_scale
    rows = scaled if per == "channel" else scaled.reshape(1, -1)
    reserve = bool(np.any(raw == 0))
    books = codebook.fit(rows, levels, None, reserve_zero=reserve, form=form)
    idx_rows = codebook.assign(rows, books, reserve_zero=reserve)
    decoded = codebook.decode(idx_rows, books).reshape(raw.shape)
    if row_scale is not None:
        decoded *= row_scale  # in place: a word table's float64 copy is 187 MB on MPNet
    return idx_rows.reshape(raw.shape), books, row_scale, decoded.astype(np.float32)


def index_dtype(levels: int):
    """uint8 indices for up to 256 codebook entries; uint16 for an entropy-form grid's wider ones."""
    return np.uint8 if levels <= 256 else np.uint16


def wide_grid_order(idx: np.ndarray, books: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A codebook of over 256 entries (one, [1, L]: an entropy-form grid, whose step the bulk of the weights sets)
    cut to the entries the indices use, the indices renumbered to match: rounding with GPTQ may leave some unused.
    Where 256 or fewer are left they are kept in sorted order. Otherwise they are ordered by use: `pack` codes
    uint16 indices as two byte planes, so the bulk of the weights shares a high byte of 0 and the most used entry
    is index 0, the background a sparse coding skips. Narrower codebooks are returned as they are."""
    if books.shape[-1] <= 256 or books.shape[0] != 1:
        return idx, books
    counts = np.bincount(np.asarray(idx).ravel(), minlength=books.shape[-1])
    used = np.flatnonzero(counts)
    order = used if len(used) <= 256 else used[np.argsort(-counts[used], kind="stable")]
    renumber = np.zeros(books.shape[-1], dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[idx], books[:, order]


def _row_scales(table: np.ndarray, row_step: np.ndarray | None = None) -> np.ndarray:
    """Each row's largest magnitude [rows, 1] (times its `row_step`), as fp16 stores it, so the scaled rows the
    codebook is fitted to are the rows the graph decodes. A row whose peak fp16 cannot hold keeps scale 1 (all
    zero, or under fp16's smallest value: a DFT basis's sine row at the Nyquist frequency, 1e-13 of rounding noise,
    made a zero scale and NaN weights) or the largest fp16 (its values then code above 1)."""
    peak = np.max(np.abs(table), axis=1, keepdims=True).astype(np.float64)
    if row_step is not None:
        peak = peak * row_step
    half = np.minimum(peak, float(np.finfo(np.float16).max)).astype(np.float16)
    return np.where(half > 0, half, np.float16(1.0)).astype(np.float32)


def _relative_change(value: np.ndarray, stored: np.ndarray) -> float:
    norm = float(np.linalg.norm(value))
    return float(np.linalg.norm(stored - value)) / norm if norm > 0 else 0.0


def codebook_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers that are codebooks: the data a codebook-decoding Gather reads (directly or through Reshape)."""
    gathers = codebook_outputs(model)
    producers, inits = {}, set()
    for graph in iter_graphs(model.graph):
        inits.update(t.name for t in graph.initializer)
        producers.update((output, node) for node in graph.node for output in node.output)
    found = set()
    for name in gathers:
        source = producers[name].input[0]
        while source not in inits and source in producers and producers[source].op_type == "Reshape":
            source = producers[source].input[0]
        if source in inits:
            found.add(source)
    return found


def _not_data_aware(layer, group) -> str:
    """Why a weight is clustered from its values alone even with calibration data ("" when it is not)."""
    node = group[0].node
    if len(group) > 1:
        return f"tied weight read by {len(group)} layers: fitted to the weights alone"
    if layer.reason:
        return layer.reason
    if node.op_type == "Gemm" and (attr(node, "transA", 0) or layer.alpha == 0):
        return "Gemm with transA=1 or alpha=0"
    return ""


def _input_hessian(gram, k: int, centred: bool) -> np.ndarray:
    """X^T X of the layer's K inputs; `centred` when the refit will re-solve the layer's bias (a constant error
    across samples costs nothing once the bias absorbs it)."""
    h = gram.xtx[:k, :k]
    if centred and gram.bias and gram.xtx[k, k] > 0:
        s = gram.xtx[:k, k]
        h = h - np.outer(s, s) / gram.xtx[k, k]
    return h


def _to_view(raw: np.ndarray, layer) -> np.ndarray:
    """The weight as the [K, N] matrix its layer multiplies by (no alpha): N output channels as columns."""
    if layer.op_type == "Conv":
        return raw.reshape(raw.shape[0], -1).T
    return raw.T if layer.transposed else raw


def _from_view(view: np.ndarray, layer, shape) -> np.ndarray:
    if layer.op_type == "Conv":
        return view.T.reshape(shape)
    return view.T if layer.transposed else view


def codebook_outputs(model: onnx.ModelProto) -> set[str]:
    """Tensors that decode a codebook: a Gather whose indices come (through Cast, and Add) from a uint8 initializer
    (uint16: an entropy-form grid of over 256 entries)."""
    producers, index_tensors = {}, set()
    for graph in iter_graphs(model.graph):
        index_tensors.update(t.name for t in graph.initializer if t.data_type in INDEX_TYPES)
        for node in graph.node:
            for output in node.output:
                producers[output] = node
    return {name for name, node in producers.items() if gathers_codebook(node, producers, index_tensors)}


def nothing_to_cluster(model: onnx.ModelProto) -> str:
    """Why no layer was clustered: the model is clustered or quantized already, or has no such weight."""
    if codebook_outputs(model):
        return "model is already clustered (weights decoded from codebooks): nothing to cluster"
    if any(n.op_type in QUANTIZED_OPS for g in iter_graphs(model.graph) for n in g.node):
        return "model is already quantized: nothing to cluster"
    return "no float MatMul/Gemm/Conv weight to cluster"
