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

Embedding tables (Gather data) are stored int8 with one scale per row, only the gathered rows decoded
(passes/quantize_embeddings.py); a table an output projection also reads is folded once for both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper

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


class QuantizeDynamic:
    """Weights int8 (per output channel by default), activations quantized at run time."""

    name = "quantize-dynamic"
    streams = True  # reads one weight at a time through self.tensors: onnxshrink.streaming can run it

    def __init__(self, config: QuantizeConfig | None = None, tensors: TensorStore | None = None):
        self.config = config or QuantizeConfig()
        self.tensors = tensors or TensorStore()
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
