"""Dynamic int8 quantization of MatMul/Gemm weights in onnxruntime's integer-operator form.

Before:                       After:
    X ──► MatMul ◄── W(f32)       X ──► DynamicQuantizeLinear ──► (Xq, Xs, Xz)
                                  MatMulInteger(Xq, Wq int8, Xz, Wz) ──► Cast(f32)
                                  Mul(Xs, Ws[N]) ─┐
                                  Mul(cast, scale) ──► [Add(bias)] ──► Y

Why this form and not QDQ: weight-only QDQ makes onnxruntime dequantize on every
run (measured 7.5x slower), and QDQ fusion breaks on a Relu or a bias between
layers. This form is what onnxruntime's MatMulIntegerToFloat / DynamicQuantizeMatMul
fusions match, so every quantized layer runs an integer kernel; the pass's caller
checks that on the graph onnxruntime really runs.

Where the integer kernel would be slower than fp32 the weight is written in the folded form
instead (passes/folded_weights.py: int8 + Cast + Mul, folded by onnxruntime at load, so the
layer runs its float kernel at fp32 speed from a 4x smaller file): every Conv (ConvInteger is
slower than fp32 Conv in onnxruntime CPU) and every layer with fewer multiply-adds per sample
than `integer_min_macs` (quantizing its input at run time costs about 2 us, more than it saves).

A layer whose input dynamic int8 would damage gets the folded form too, decided by measurement
(check_activations): one onnxruntime run of the original on the inputs validation judges on exposes each
layer's input x; DynamicQuantizeLinear's rounding (uint8, asymmetric, one scale per run from min/max) is
applied to it, and the layer is folded where the rows of its output lose more than ACTIVATION_ERROR_BOUND
(||(Q(x) - x) W|| / ||x W||, averaged over rows). That happens where a few channels reach hundreds of times the
typical |x| (GELU outputs of all-mpnet-base-v2's FFN down-projections: 600-1000x): the 256 levels go to
the outliers and most values round to zero (docs/benchmarks-transformer-mpnet.md).

Embedding tables (Gather data) are stored int8 with one scale per row, only the gathered rows decoded
(passes/quantize_embeddings.py); a table an output projection also reads is folded once for both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper

from onnxshrink import model as model_io
from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import (Names, Site, attr, begin_pass, drop_unused_initializers,
                                      initializer_owners, output_shapes, raise_opset, select_layers)
from onnxshrink.passes.folded_weights import (FOLD_REQUESTED, INTEGER_MIN_MACS, fold_requested, fold_site, folded_opset,
                                              has_folded, macs_per_sample, relabel_folded)
from onnxshrink.passes.quantize_embeddings import EmbeddingPlan, row_scales
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.streaming import TensorStore
from onnxshrink.weights import find_tensors

QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DequantizeLinear", "MatMulNBits",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "GatherBlockQuantized"}
SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")  # Conv in the folded form only
# Mean over rows of ||(Q(x) - x) W|| / ||x W||, Q as DynamicQuantizeLinear rounds, above which a layer is folded:
# a third of each output row lost to the input's rounding, i.e. the rows' cosine to the float output under 0.95
# (1 / sqrt(1 + e^2)). A round figure, not fitted: checked against two real encoders (docs/benchmarks-transformer-
# mpnet.md), MiniLM's layers measure 0.01-0.21 and MPNet's outlier layers 0.45-0.85, its others under 0.23.
ACTIVATION_ERROR_BOUND = 1 / 3
ACTIVATION_CHECK_SAMPLES = 4  # samples run one at a time (the range is per run, as at batch 1)
ACTIVATION_CHECK_ROWS = 16  # rows of each sample's layer input whose output error is computed (evenly spaced)


@dataclass
class QuantizeConfig:
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # glob patterns on node names
    keep_float: str | None = None  # "first", "last" or "both"
    per_channel: bool = True
    symmetric: bool = True
    # Layers with fewer weights stay float (not even stored int8).
    min_weights: int = 0
    # Layers with fewer multiply-adds per sample get int8 storage with float compute (folded_weights.py):
    # at batch 1 their integer kernel is slower than fp32 (docs/benchmarks.md). 0: integer kernels everywhere.
    integer_min_macs: int = INTEGER_MIN_MACS["dynamic"]
    # Embedding tables (Gather data) int8 per row (passes/quantize_embeddings.py); --exclude matches Gather names.
    embeddings: bool = True
    # Glob patterns on node names: these layers get the folded form (int8 storage, float kernel) whatever their size
    # (the latency guard names the layers it measured slower than float; latency_guard.py).
    fold: tuple = ()
    # Layers whose output rows would lose more than this to the run-time int8 rounding of their input get the folded
    # form (check_activations); 0 turns the measurement off. Measured only where the pass is given inputs.
    activation_error_bound: float = ACTIVATION_ERROR_BOUND


class QuantizeDynamic:
    """Weights int8 (per output channel by default), activations quantized at run time."""

    name = "quantize-dynamic"
    streams = True  # reads one weight at a time through self.tensors: onnxshrink.streaming can run it

    def __init__(self, config: QuantizeConfig | None = None, tensors: TensorStore | None = None, inputs=None):
        """`inputs`: a callable (model, session) -> (data.Dataset, origin) giving the samples the activation check
        runs (inputs_for: validation's), a string saying why it cannot run, or None (no check, no note)."""
        self.config = config or QuantizeConfig()
        self.tensors = tensors or TensorStore()
        self.inputs = inputs
        unknown = set(self.config.op_types) - set(SUPPORTED_OPS)
        if unknown:
            raise ValueError(f"unsupported op types for dynamic quantization: {', '.join(sorted(unknown))}")

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = begin_pass(model, self.name, asdict(self.config))
        records = {r.name: r for r in find_tensors(model)}
        self._folded: dict[int, str] = {}  # id(node) -> why it gets the folded form
        embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings, self.tensors.read)
        sites, skipped = self._select(model, records)
        sites, skipped = embeddings.take_tied(sites), embeddings.drop_skipped(skipped)
        for site in sites:
            if fold_requested(site.name, self.config.fold):
                self._folded.setdefault(id(site.node), FOLD_REQUESTED)
        relabel_folded(model, skipped)
        report.layers.extend(skipped)
        if not sites:
            if not embed(model, embeddings, self.tensors, report):
                report.notes.append(nothing_to_do(model, "MatMul/Gemm/Conv weight"))
            return model, report
        self._fold_small_layers(model, sites, records)
        self._fold_outlier_inputs(model, sites, report)
        sites = self._check_opset(model, sites, records, report)
        if not sites:
            embed(model, embeddings, self.tensors, report)
            return model, report
        quantized: dict[tuple, tuple[str, str, str]] = {}  # (weight, transposed, alpha) -> int8 names
        folded: dict[tuple, str] = {}  # (weight, axis, graph) -> decoded weight
        by_graph: dict[int, list[Site]] = {}
        for site in sites:
            by_graph.setdefault(id(site.graph), []).append(site)
        owners = initializer_owners(model)
        names = Names(model)
        for graph_sites in by_graph.values():
            graph = graph_sites[0].graph
            self._rewrite_graph(graph, graph_sites, owners, quantized, folded, report, names)
        drop_unused_initializers(model)
        embed(model, embeddings, self.tensors, report)
        report.changed = True
        return model, report

    def _select(self, model, records):
        def judge(node, record, constants):
            if record.dtype != "float" or (node.op_type != "Conv" and len(record.shape) != 2):
                return f"weight is {record.dtype} {record.shape}: only 2-D float32 weights are quantized"
            if node.op_type == "MatMul" and node.input[0] in records:
                return "both MatMul operands are constant"
            weights = int(np.prod(record.shape))
            if weights < self.config.min_weights:
                return f"small layer ({weights} weights < --min-weights {self.config.min_weights})"
            if node.op_type == "Conv":
                self._folded[id(node)] = "Conv: onnxruntime's ConvInteger is slower than fp32 Conv"
            elif node.op_type == "Gemm" and attr(node, "transA", 0):
                self._folded[id(node)] = "Gemm with transA=1 has no integer form"
            elif (node.op_type == "Gemm" and float(attr(node, "beta", 1.0)) != 1.0
                    and len(node.input) > 2 and node.input[2] and node.input[2] not in constants):
                self._folded[id(node)] = "Gemm with beta != 1 and a computed bias (no integer form: it cannot be pre-scaled)"
            return None

        return select_layers(model, records, ("MatMul", "Gemm", "Conv"), self.config, judge, read=self.tensors.read)

    def _check_opset(self, model, sites, records, report):
        """The integer form needs opset 11 (DynamicQuantizeLinear), the folded one 7: each raised only where that
        changes none of the model's own ops (common.raise_opset); otherwise the integer layers get the folded
        form, and if even that cannot be written the layers stay float, each with the reason."""
        integer = [site for site in sites if id(site.node) not in self._folded]
        why = integer and raise_opset(model, 11, "DynamicQuantizeLinear (the integer form)", report.notes)
        for site in integer if why else ():
            self._folded[id(site.node)] = why + ": the weight is folded instead"
        if not any(id(site.node) in self._folded for site in sites):
            return sites
        why = folded_opset(model, report.notes)
        if not why:
            return sites
        for site in sites:
            size = records[site.weight].nbytes
            report.layers.append(LayerDecision(site.name, site.node.op_type, site.weight, "kept float", why, size, size))
        report.notes.append("nothing quantized: the model's opset is too old for what this mode writes")
        return []

    def _fold_small_layers(self, model, sites, records):
        """Layers with too little work per sample for the integer kernel to pay get the folded form."""
        threshold = self.config.integer_min_macs
        if threshold <= 0 or all(id(site.node) in self._folded for site in sites):
            return
        shapes = output_shapes(model)
        for site in sites:
            if id(site.node) in self._folded:
                continue
            macs = macs_per_sample(site.node, records[site.weight].shape, shapes)
            if macs is not None and macs < threshold:
                self._folded[id(site.node)] = (f"{macs} multiply-adds per sample < {threshold} (--integer-min-macs): "
                                               "an integer kernel would be slower than fp32 here")

    def _fold_outlier_inputs(self, model, sites, report):
        """Layers whose input the run-time int8 rounding would damage get the folded form (check_activations)."""
        bound = self.config.activation_error_bound
        if self.inputs is None or not bound or bound <= 0:
            return
        candidates = [s for s in sites if id(s.node) not in self._folded and s.node.op_type in ("MatMul", "Gemm")
                      and s.graph is model.graph]
        if not candidates:
            return
        skip = self.inputs if isinstance(self.inputs, str) else None
        if skip is None and model_io.has_external_data(model):
            skip = "the weights are streamed from external data (the original is never whole in memory to run)"
        if skip is None:
            try:
                measured, origin = check_activations(model, candidates, self.inputs, self.tensors.read)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's load and run errors carry no common type
                skip = f"the original did not run on the inputs ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})"
        if skip is not None:
            report.notes.append(f"activation check not run: {skip}; every layer the integer form suits gets it")
            return
        folded = 0
        for site in candidates:
            error, spread = measured.get(site.name, (None, None))
            if error is not None and error > bound:
                folded += 1
                self._folded[id(site.node)] = (
                    f"input spans {spread:.0f}x its median |x|: dynamic int8 of the input would lose {error:.0%} of the "
                    f"layer's output (> {bound:.0%}); folded (int8 storage, float kernel)")
        report.notes.append(f"activation check on {origin}: {folded} of {len(candidates)} layer(s) folded, their input's "
                            f"run-time int8 rounding losing more than {bound:.0%} of their output")

    def _rewrite_graph(self, graph, sites, owners, quantized, folded, report, names):
        site_ids = {id(s.node): s for s in sites}
        activations: dict[str, tuple[str, str, str]] = {}
        new_nodes = []
        for node in graph.node:
            site = site_ids.get(id(node))
            if site is None:
                new_nodes.append(node)
                continue
            if id(node) in self._folded:
                report.layers.append(fold_site(site, graph, self.tensors, owners, names, folded, new_nodes,
                                               self._folded[id(node)]))
                new_nodes.append(node)
                continue
            x = node.input[0]
            if x not in activations:
                base = names(x + "_dq")
                activations[x] = (base + "_quant", base + "_scale", base + "_zero_point")
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]), name=base))
            xq, xs, xz = activations[x]
            transpose = node.op_type == "Gemm" and bool(attr(node, "transB", 0))
            alpha = float(attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
            key = (site.weight, transpose, alpha)
            if key in quantized:
                wq, ws, wz = quantized[key]
                report.layers.append(LayerDecision(site.name, node.op_type, site.weight, "int8 (shared weight, quantized once)"))
            else:
                wq, ws, wz, before, after = self._quantize_weight(owners, site.weight, transpose, alpha, names)
                quantized[key] = (wq, ws, wz)
                decision = "int8 per-channel" if self.config.per_channel else "int8 per-tensor"
                report.layers.append(LayerDecision(site.name, node.op_type, site.weight, decision, "", before, after))
            stem = names(site.name.replace("/", "_"))
            out = node.output[0]
            has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
            product = stem + "_out" if has_bias else out
            new_nodes += [
                helper.make_node("MatMulInteger", [xq, wq, xz, wz], [stem + "_int32"], name=stem + "_MatMulInteger"),
                helper.make_node("Cast", [stem + "_int32"], [stem + "_float"], to=onnx.TensorProto.FLOAT, name=stem + "_Cast"),
                helper.make_node("Mul", [xs, ws], [stem + "_scale"], name=stem + "_ScaleMul"),
                helper.make_node("Mul", [stem + "_float", stem + "_scale"], [product], name=stem + "_Mul"),
            ]
            if has_bias:
                bias = node.input[2]
                beta = float(attr(node, "beta", 1.0))
                if beta != 1.0:
                    bias = self._scaled_bias(owners, bias, beta, stem)
                new_nodes.append(helper.make_node("Add", [product, bias], [out], name=stem + "_BiasAdd"))
        del graph.node[:]
        graph.node.extend(new_nodes)

    def _quantize_weight(self, owners, name, transpose, alpha, names):
        graph, tensor = owners[name]
        w = self.tensors.read(tensor).astype(np.float32, copy=False)
        if transpose:
            w = w.T
        w = w * np.float32(alpha)
        q, scale, zero = quantize_int8(w, self.config.per_channel, self.config.symmetric)
        suffix = ("_T" if transpose else "") + (f"_a{alpha:g}" if alpha != 1.0 else "")
        base = names(name + suffix + "_int8")
        for array, tensor_name in ((q, base), (scale, base + "_scale"), (zero, base + "_zero_point")):
            self.tensors.add(graph, array, tensor_name)
        return base, base + "_scale", base + "_zero_point", w.nbytes, q.nbytes + scale.nbytes + zero.nbytes

    def _scaled_bias(self, owners, bias, beta, stem):
        if bias not in owners:
            raise NotImplementedError("Gemm beta != 1 with a computed bias")
        graph, tensor = owners[bias]
        scaled = self.tensors.read(tensor) * np.float32(beta)
        self.tensors.add(graph, scaled.astype(np.float32), stem + "_bias")
        return stem + "_bias"


def inputs_for(model: onnx.ModelProto, validation=None, calibration=None, threads: int = 1):
    """The activation check's inputs as validation picks them (--data, else the held-out calibration samples, else
    synthesized), for QuantizeDynamic(inputs=); a reason string where the check cannot run on this model."""
    if model_io.has_external_data(model):
        return "the model keeps its weights in external data (running a copy of it to measure would hold it twice)"

    def inputs(original: onnx.ModelProto, session):
        import dataclasses

        from onnxshrink import data as data_mod
        from onnxshrink.validate import ValidateConfig, _dataset

        config = validation or ValidateConfig(threads=threads)
        if calibration is not None and not config.data:
            config = dataclasses.replace(config, calibration=str(calibration))
        return _dataset(config, data_mod.input_specs(original), original, session)

    return inputs


def dynamic_quantize_linear(x: np.ndarray) -> np.ndarray:
    """What onnxruntime's DynamicQuantizeLinear then dequantization give back: uint8, asymmetric, one scale and zero
    point from the min/max of the whole tensor (widened to include 0), rounding half to even."""
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    if high == low:
        return np.zeros_like(x)
    scale = np.float32((high - low) / 255.0)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def row_error(x: np.ndarray, w: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Per row of x [rows, K]: ||(Q(x) - x) W|| / ||x W||, Q = dynamic_quantize_linear over all of x (its range is
    the whole tensor's), on `rows` evenly spaced rows (all by default: the products cost a forward pass each);
    rows whose output is zero are left out."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    rounded = dynamic_quantize_linear(x)
    if rows is not None and rows < x.shape[0]:
        pick = np.linspace(0, x.shape[0] - 1, rows).round().astype(int)
        x, rounded = x[pick], rounded[pick]
    error = (rounded - x) @ w
    out = x @ w
    signal = np.einsum("ij,ij->i", out, out, dtype=np.float64)
    keep = signal > 0
    return np.sqrt(np.einsum("ij,ij->i", error, error, dtype=np.float64)[keep] / signal[keep])


def check_activations(model: onnx.ModelProto, sites: list, inputs, read) -> tuple[dict, str]:
    """{layer name: (mean row error, input max|x| / median|x|)} from one unoptimized onnxruntime session of `model`
    with the layers' inputs as extra outputs, run on up to ACTIVATION_CHECK_SAMPLES samples one at a time; and
    where the samples came from. `read` gives a weight initializer's array."""
    from onnxshrink import data as data_mod
    from onnxshrink.runtime import make_session

    tensors = list(dict.fromkeys(site.node.input[0] for site in sites))
    outputs = len(model.graph.output)
    existing = {o.name for o in model.graph.output}
    # The layers' inputs as extra outputs for as long as the session is made (no copy of a large model held).
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in existing)
    try:
        session = make_session(model, 1, optimize=False)
    finally:
        del model.graph.output[outputs:]
    dataset, origin = inputs(model, session)
    specs = data_mod.input_specs(model)
    owners = initializer_owners(model)
    weights = {}
    for site in sites:
        w = read(owners[site.weight][1]).astype(np.float32, copy=False)
        if site.node.op_type == "Gemm":
            w = (w.T if attr(site.node, "transB", 0) else w) * np.float32(attr(site.node, "alpha", 1.0))
        weights[site.name] = w
    sums = {site.name: [0.0, 0] for site in sites}
    spread = {t: 0.0 for t in tensors}
    taken = 0
    for feed in _one_sample_feeds(dataset, specs):
        if taken >= ACTIVATION_CHECK_SAMPLES:
            break
        taken += 1
        values = dict(zip(tensors, session.run(tensors, feed)))
        for t, x in values.items():
            magnitude = np.abs(x)
            median = float(np.median(magnitude))
            if median > 0:
                spread[t] = max(spread[t], float(magnitude.max()) / median)
        for site in sites:
            errors = row_error(values[site.node.input[0]], weights[site.name], ACTIVATION_CHECK_ROWS)
            sums[site.name][0] += float(errors.sum())
            sums[site.name][1] += errors.size
        del values
    measured = {name: (total / count, spread[site.node.input[0]])
                for site in sites for name, (total, count) in [(site.name, sums[site.name])] if count}
    return measured, f"{origin} ({taken} sample(s), each run alone)"


def _one_sample_feeds(dataset, specs):
    """The dataset's samples one at a time (inputs with a batch axis sliced, the others passed whole): the
    range DynamicQuantizeLinear takes is then one sample's, as at batch 1."""
    axes = dataset.batch_axes or {s.name: 0 for s in specs if s.dynamic_batch}
    for batch in dataset.batches:
        sliced = [n for n in batch if n in axes and batch[n].ndim > axes[n]]
        rows = batch[sliced[0]].shape[axes[sliced[0]]] if sliced else 1
        for i in range(rows):
            yield {n: (np.take(a, [i], axis=axes[n]) if n in sliced else a) for n, a in batch.items()}


def embed(model: onnx.ModelProto, plan: EmbeddingPlan, tensors, report: PassReport, **options) -> bool:
    """Rewrite the planned embedding tables (after the pass's own layers); their decisions go to the report."""
    decisions, changed = plan.apply(model, tensors, notes=report.notes, **options)
    decided = {d.node for d in decisions}  # a tied projection's kept-float line gives way to what was written
    report.layers[:] = [d for d in report.layers if d.node not in decided] + decisions
    report.changed = report.changed or changed
    return changed


def nothing_to_do(model: onnx.ModelProto, what: str) -> str:
    """Why a quantize pass found no layer: the model is quantized already, or has no such weight."""
    if (any(n.op_type in QUANTIZED_OPS for g in iter_graphs(model.graph) for n in g.node) or has_folded(model)
            or row_scales(model.graph)):
        return "model is already quantized: nothing to do"
    return f"no {what} to quantize"


def quantize_int8(w: np.ndarray, per_channel: bool = True, symmetric: bool = True):
    """Quantize a [K, N] weight along N (output channels): int8 values, float32 scales, int8 zero points.

    Symmetric uses [-127, 127] so negation stays exact; asymmetric uses the full [-128, 127].
    """
    axis_reduce = 0 if per_channel else None
    if symmetric:
        amax = np.max(np.abs(w), axis=axis_reduce)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        zero = np.zeros_like(scale, dtype=np.int8)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    else:
        lo = np.minimum(np.min(w, axis=axis_reduce), 0.0)
        hi = np.maximum(np.max(w, axis=axis_reduce), 0.0)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        zero_f = np.clip(np.rint(-128 - lo / scale), -128, 127)
        zero = zero_f.astype(np.int8)
        q = np.clip(np.rint(w / scale) + zero_f, -128, 127).astype(np.int8)
    return q, np.atleast_1d(scale) if per_channel else np.float32(scale), np.atleast_1d(zero) if per_channel else np.int8(zero)
