"""Static int8 quantization: activations with calibrated ranges, in the QDQ form onnxruntime fuses.

Before:                                  After (as written):
    X ──► Conv ◄── W, B                      X ──► Q ──► DQ ──► Conv ◄── DQ(Wq int8 [M,C,kh,kw], Ws[M], axis 0)
           └──► Relu ──► Y                                        │  ◄── DQ(Bq int32 [M], Xs*Ws[M], axis 0)
                                                                  └──► Relu ──► Q ──► DQ ──► Y
As onnxruntime runs it:
    X ──► QuantizeLinear ──► QLinearConv (NHWC, Relu folded away) ──► ... ──► QGemm (float output)

Activations are uint8 with a calibrated scale and zero point (int8 measured the same speed);
weights int8, symmetric, per output channel; biases int32 with scale Xs*Ws[c], which
QLinearConv/QGemm add in their int32 accumulators. The tensor quantized after a layer is
its Relu's output: with zero point 0 the Relu is a no-op that onnxruntime drops, so the
layer fuses. MaxPool/Flatten/Reshape/Transpose/(Un)Squeeze after a quantized layer reuse
its scale (exact) and run on uint8. MatMul + Add(bias) on a 2-D input is written as one
Gemm (one QGemm, not QLinearMatMul + QLinearAdd); a Gemm that no quantized layer reads
keeps a float output, which QGemm writes itself.

Speed, not size, is why static quantization pays, so a layer stays float, with the
reason, where its integer kernel would be slower: a Conv over 1-3 input channels (an
image's first layer), where QLinearConv is 1.5-5x slower than float Conv in onnxruntime
1.32; or a node onnxruntime does not fuse (checked on the graph it really runs, then the
model is written again without that layer). A layer with fewer multiply-adds per sample than
`integer_min_macs` (shapes from the calibration batch) is not worth its Q/DQ either: its weight
is written in the folded form (passes/folded_weights.py: int8 + Cast + Mul, which onnxruntime
folds at load), so it runs its float kernel at fp32 speed from a 4x smaller file.

Embedding tables are int8 per row (quantize_embeddings.py), except a table of fewer than FEW_ROWS rows (a
transformer's token types), which stays float in every mode: every token gathers one of its rows, so its rounding
is the same shift on all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.calibrate import METHODS, calibrate
from onnxshrink.model import iter_graphs
from onnxshrink.passes.fold_batchnorm import fold_batchnorm
from onnxshrink.passes.common import (NONFINITE, Names, Site, attr, begin_pass, drop_unused_initializers, handed_over,
                                      initializer_owners, nonfinite, output_shapes, select_layers)
from onnxshrink.passes.folded_weights import (FOLD_REQUESTED, FOLDED, INTEGER_MIN_MACS, fold_layers, fold_requested,
                                              macs_per_sample, relabel_folded)
from onnxshrink.passes.quantize import QUANTIZED_OPS, embed, quantize_int8
from onnxshrink.passes.quantize_embeddings import EmbeddingPlan
from onnxshrink.passes.smooth_quant import SmoothQuant
from onnxshrink.progress import step
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.runtime import capture_activations, make_session
from onnxshrink.scratch import scratch_dir
from onnxshrink.streaming import TensorStore
from onnxshrink.weights import TINY_BYTES, find_tensors

SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
ALREADY_QUANTIZED = set(QUANTIZED_OPS) | {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
                                          "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                                          "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QAttention"}
# Ops whose outputs are values of their input, moved or picked: the input's scale is exact for them.
PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
# QLinearConv on fewer input channels per group than this was slower than float Conv (onnxruntime 1.32,
# AVX-512 VNNI/AMX CPU: 1 channel 3x3 1.4x, 3 channels 1.2x slower model; 16 channels 1x1 already 1.4x faster).
MIN_CONV_CHANNELS = 4
FLOAT_KERNELS = {"MatMul", "Gemm", "Conv", "com.microsoft.FusedMatMul", "com.microsoft.FusedGemm",
                 "com.microsoft.FusedConv", "com.microsoft.nchwc.Conv"}
INTEGER_KERNELS = {"QLinearConv", "com.microsoft.QLinearConv", "com.microsoft.QGemm", "QLinearMatMul",
                   "com.microsoft.MatMulIntegerToFloat"}
ATTEMPTS = 4  # rewrites: each one drops the layers onnxruntime did not fuse in the previous one
INT32_MAX = 2**31 - 1


@dataclass
class StaticQuantizeConfig:
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # glob patterns on node names
    keep_float: str | None = None  # "first", "last" or "both"
    per_channel: bool = True
    symmetric: bool = True  # weights; activations are asymmetric uint8
    calibrator: str = "minmax"
    percentile: float = 99.99
    # Layers with fewer multiply-adds per sample get int8 storage with float compute (folded_weights.py):
    # alone between float ops their Q/DQ + integer kernel is slower than fp32. 0: integer kernels everywhere.
    integer_min_macs: int = INTEGER_MIN_MACS["static"]
    embeddings: bool = True  # Gather tables int8 per row, rows decoded after the Gather (quantize_embeddings.py)
    # SmoothQuant (passes/smooth_quant.py): LayerNorm outliers moved into the weights of the MatMuls reading them,
    # alpha searched per tensor on the calibration data; tensors where it measures no better are left alone.
    smooth: bool = True
    # Glob patterns on node names: these layers get the folded form (int8 storage, float kernel) whatever their size
    # (the latency guard names the layers it measured slower than float; latency_guard.py).
    fold: tuple = ()


@dataclass
class _Layer:
    """One node to rewrite, as the rewrite sees it."""

    site: Site
    kind: str  # "Conv", "Gemm" or "MatMul", as written: a 2-D MatMul (+ Add) becomes a Gemm
    x: str  # activation input
    output: str  # the layer's result: the folded Add's output when there is one
    bias: str | None = None  # constant bias: Conv/Gemm input 2, or the folded Add's other input
    add: onnx.NodeProto | None = None  # the Add folded into the Gemm


class QuantizeStatic:
    """int8 weights, uint8 activations with calibrated ranges, written as QDQ for onnxruntime's integer kernels."""

    name = "quantize-static"

    def __init__(self, config: StaticQuantizeConfig | None = None, calibration=None, threads: int = 1):
        self.config = config or StaticQuantizeConfig()
        self.calibration = calibration
        self.threads = threads
        unknown = set(self.config.op_types) - set(SUPPORTED_OPS)
        if unknown:
            raise ValueError(f"unsupported op types for static quantization: {', '.join(sorted(unknown))}")
        if self.config.calibrator not in METHODS:
            raise ValueError(f"unknown calibrator {self.config.calibrator!r} (choose from {', '.join(METHODS)})")
        if calibration is None or not getattr(calibration, "batches", None):
            raise ValueError("static quantization needs calibration data (a Dataset with at least one batch)")

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = self._quantize(model)
        plan = getattr(self, "_embeddings", None)
        if plan is not None:
            # Last, on the model returned: the layers above were found and rewritten by position.
            embed(model, plan, TensorStore(), report)
            self._embeddings = None
        return model, report

    def _quantize(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        self._embeddings = None
        model, report = begin_pass(model, self.name, asdict(self.config))
        present = {n.op_type for g in iter_graphs(model.graph) for n in g.node}
        if not present & ALREADY_QUANTIZED:
            folded = fold_batchnorm(model)
            if folded:
                report.notes.append(f"folded {folded} BatchNormalization node(s) into the Conv before them")
        if present & ALREADY_QUANTIZED:
            report.notes.append(f"model is already quantized (has {', '.join(sorted(present & ALREADY_QUANTIZED))}): "
                                "nothing to do")
            return model, report
        if _opset(model) < 13:
            # Per-axis DequantizeLinear (per-channel weights, int32 bias) needs opset 13.
            try:
                converted = onnx.version_converter.convert_version(model, 13)
            except Exception as exc:  # noqa: BLE001 - any converter failure means: leave the model as it is
                report.notes.append(f"opset {_opset(model)} model could not be converted to opset 13, which "
                                    f"per-channel QDQ needs ({_first_line(exc)}): nothing done")
                return model, report
            report.notes.append(f"converted the model from opset {_opset(model)} to 13 (per-channel QDQ needs it)")
            unchanged, model = model, converted
        else:
            unchanged = model

        records = {r.name: r for r in find_tensors(model)}
        # Before tiny weights are let in below (for the integer chain): a tiny table gains nothing int8.
        self._embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings,
                                         numpy_helper.to_array)
        tiny = set()
        for record in records.values():
            # Static quantization pays in speed, not size: a tiny layer left float would break the integer chain.
            if not record.compressible and record.nbytes < TINY_BYTES and record.reason.startswith("tiny"):
                record.compressible = True
                tiny.add(record.name)
        sites, skipped = self._select(model, records)
        sites, skipped = self._embeddings.take_tied(sites), self._embeddings.drop_skipped(skipped)
        relabel_folded(model, skipped)
        body = _body_sites(model, skipped, records)
        if body:
            # Calibration cannot see inside If/Loop/Scan bodies, but int8 storage needs no activation ranges.
            moved = {(site.name, site.weight) for site in body}
            skipped = [d for d in skipped if d.reason != BODY or (d.node, d.weight) not in moved]
            report.layers.extend(fold_layers(model, body, {site.name: BODY_REASON for site in body}))
            unchanged = model
            report.changed = True
        report.layers.extend(skipped)
        small = self._small_layers(model, sites, records)
        small.update({site.name: FOLD_REQUESTED for site in sites if fold_requested(site.name, self.config.fold)})
        if small:
            # Folded before calibration, so the ranges are measured with the weights the model will run.
            outputs = {site.name: site.node.output[0] for site in sites if site.name not in small}
            folding = [site for site in sites if site.name in small and site.weight not in tiny]
            report.layers.extend(fold_layers(model, folding, small))
            report.layers.extend(LayerDecision(site.name, site.node.op_type, site.weight, "kept float",
                                               "tiny (< 1 KiB), and too small for an integer kernel to pay",
                                               records[site.weight].nbytes, records[site.weight].nbytes)
                                 for site in sites if site.name in small and site.weight in tiny)
            by_output = {n.output[0]: n for n in model.graph.node if n.output}
            sites = [Site(model.graph, by_output[outputs[site.name]], site.name, site.weight)
                     for site in sites if site.name not in small]
            if folding:
                unchanged = model
                report.changed = True
        if not sites:
            report.notes.append("no Conv/MatMul/Gemm layer big enough for an integer kernel: the quantized ones are "
                                "folded (int8 storage, float kernels)" if report.changed else
                                "no Conv/MatMul/Gemm layer to quantize")
            return unchanged, report
        if self.config.smooth:
            # After the layers are chosen: only those that will run integer kernels take a scale. The model is this
            # pass's own (begin_pass): smoothed in place, not copied (a copy held all along was 436 MB on MPNet).
            with handed_over(model):
                model, smoothing = SmoothQuant(calibration=self.calibration, threads=self.threads,
                                               layers={site.node.output[0] for site in sites})(model)
            if smoothing.changed and unchanged is model:
                report.changed = True  # the model returned if no layer fuses below is the smoothed one (exact in float)
            report.notes.extend(smoothing.notes)
            by_output = {n.output[0]: n for n in model.graph.node if n.output}
            sites = [Site(model.graph, by_output[site.node.output[0]], site.name, site.weight) for site in sites]

        ranks = _ranks(model)
        first_outputs = [n.output[0] if n.output else "" for n in model.graph.node]
        position = {site.name: first_outputs.index(site.node.output[0]) for site in sites}
        ranges: dict[str, tuple[float, float]] = {}
        unfused: set[str] = set()
        quantized_outputs: set[str] = set()  # MatMul layers whose float output onnxruntime did not fuse
        result = None
        for _ in range(ATTEMPTS):
            # Each attempt rewrites a fresh copy; its layers are that copy's nodes.
            candidate = onnx.ModelProto()
            candidate.CopyFrom(model)
            graph = candidate.graph
            layers = [self._layer(Site(graph, graph.node[position[s.name]], s.name, s.weight), ranks)
                      for s in sites if s.name not in unfused]
            if not layers:
                break
            plan = _Plan(candidate, layers, quantized_outputs)
            if _relu_after_maxpool(candidate, plan):
                plan = _Plan(candidate, layers, quantized_outputs)
            missing = [t for t in plan.roots if t not in ranges]
            if missing:
                step("quantize: calibrating activations", 0, 0)
                ranges.update(calibrate(model, missing, self.calibration, self.config.calibrator, self.threads,
                                        self.config.percentile))
            decisions = self._rewrite(candidate, plan, ranges)
            runtime_graph = _runtime_graph(candidate, self.threads)
            failed = _unfused_layers(runtime_graph, plan)
            if not failed:
                result = candidate
                break
            # A MatMul written with a float output that did not fuse (onnxruntime's MatMul + Add -> Gemm fusion
            # runs first where shapes are static) is tried again with a quantized output (QLinearMatMul).
            retry = {name for name in failed if name in plan.float_matmuls and name not in quantized_outputs}
            quantized_outputs.update(retry)
            unfused.update(set(failed) - retry)
        for site in sites:
            if site.name in unfused or result is None:
                size = records[site.weight].nbytes
                reason = ("onnxruntime does not fuse it into an integer kernel here: it would run DequantizeLinear + "
                          "a float kernel, slower than fp32" if site.name in unfused else
                          f"still not fused after {ATTEMPTS} rewrites")
                report.layers.append(LayerDecision(site.name, site.node.op_type, site.weight, "kept float", reason,
                                                   size, size))
        if result is None:
            report.notes.append("no layer could be quantized so that onnxruntime runs it as an integer kernel")
            return unchanged, report
        report.layers.extend(decisions)
        for decision in report.layers:
            if decision.action in ("kept float", FOLDED) and _runs_as_integer(runtime_graph, decision.node):
                # onnxruntime's WeightBiasQuantization: a float Conv/Gemm between DequantizeLinear and
                # QuantizeLinear gets per-tensor int8 weights at session start.
                report.notes.append(f"{decision.node}: written float, but onnxruntime quantizes it itself (per-tensor "
                                    "int8 weights) because it sits between quantized tensors")
        report.notes.append(f"activation ranges: {self.config.calibrator} calibration on "
                            f"{getattr(self.calibration, 'samples', '?')} sample(s), {len(plan.roots)} tensor(s)")
        report.changed = True
        return result, report

    # ---- which layers -------------------------------------------------------------------------

    def _small_layers(self, model, sites, records) -> dict[str, str]:
        """Layer name -> why its integer kernel would not pay: too few multiply-adds per sample at the
        calibration batch's shapes (rows of a 3-D MatMul, pixels of a Conv)."""
        threshold = self.config.integer_min_macs
        if threshold <= 0 or not sites:
            return {}
        first = self.calibration.batches[0]
        shapes = output_shapes(model, {name: np.shape(value) for name, value in first.items()})
        # Shape inference loses the rows of a MatMul after a computed Reshape (attention's heads merged back:
        # MiniLM's attention output layers counted 1 row instead of 64, and stayed float). One run knows them.
        unknown = [site.node.output[0] for site in sites if site.node.op_type == "MatMul" and site.graph is model.graph
                   and _rows_unknown(shapes.get(site.node.output[0]))]
        if unknown:
            try:
                measured = next(iter(capture_activations(model, unknown, [first], self.threads)))
                shapes.update({name: list(np.shape(value)) for name, value in measured.items()})
            except Exception:  # noqa: BLE001 - a model that fails here fails calibration with its own message
                pass
        small = {}
        for site in sites:
            macs = macs_per_sample(site.node, records[site.weight].shape, shapes)
            if macs is not None and macs < threshold:
                small[site.name] = (f"{macs} multiply-adds per sample < {threshold} (--integer-min-macs): its "
                                    "Q/DQ and integer kernel would be slower than fp32 here")
        return small

    def _select(self, model, records):
        main = {o for n in model.graph.node for o in n.output}  # tensor names are unique across scopes
        graph_inputs = {i.name for i in model.graph.input}
        producers = {o: n for n in model.graph.node for o in n.output}
        readers: dict[str, list] = {}
        for n in model.graph.node:
            for name in n.input:
                readers.setdefault(name, []).append(n)

        def integer_neighbour(tensor: str, upstream: bool) -> bool:
            """Whether a Conv/Gemm/MatMul is reached through Relu/Clip/pass-through ops (the int8 chain)."""
            seen, todo = set(), [tensor]
            while todo:
                name = todo.pop()
                if name in seen:
                    continue
                seen.add(name)
                nodes = [producers[name]] if upstream and name in producers else ([] if upstream else readers.get(name, []))
                for n in nodes:
                    if n.op_type in SUPPORTED_OPS:
                        return True
                    if n.op_type in PASS_THROUGH | {"Relu", "Clip"}:
                        todo.extend(n.input[:1] if upstream else n.output)
            return False

        def judge(node, record, constants):
            if not node.output or node.output[0] not in main:
                return BODY
            if record.dtype != "float":
                return f"weight is {record.dtype}: only float32 layers are quantized"
            x = node.input[0]
            if x in constants:
                return "the activation input is constant"
            if x not in main and x not in graph_inputs:
                return "the activation input comes from an outer scope"
            if node.op_type == "Conv":
                if len(record.shape) not in (3, 4):
                    return f"{len(record.shape) - 2}-D Conv: only 1-D and 2-D Conv are quantized"
                if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
                    return "Conv bias is computed, not constant (QLinearConv needs a constant int32 bias)"
                per_group, group = record.shape[1], int(attr(node, "group", 1))
                if (per_group == 1 and group > 1 and not integer_neighbour(x, upstream=True)
                        and not integer_neighbour(node.output[0], upstream=False)):
                    return ("depthwise Conv between float ops (e.g. hard-swish): its Q/DQ costs more than "
                            "QLinearConv saves (PP-OCR classifier 1.69x -> 1.14x fp32 time with these float)")
                if per_group < MIN_CONV_CHANNELS and not (per_group == 1 and group > 1):  # depthwise is fast
                    return (f"Conv over {per_group} input channel(s): onnxruntime's QLinearConv is slower than float "
                            "Conv for so short a reduction (kept float, quantized after it)")
                return None
            if len(record.shape) != 2:
                return f"weight is {len(record.shape)}-D: only 2-D MatMul/Gemm weights are quantized"
            if node.op_type == "Gemm":
                if attr(node, "transA", 0):
                    return "Gemm with transA=1"
                if len(node.input) > 2 and node.input[2]:
                    if node.input[2] not in constants:
                        return "Gemm bias is computed, not constant (QGemm needs a constant int32 bias)"
                    n = record.shape[0] if attr(node, "transB", 0) else record.shape[1]
                    if records[node.input[2]].shape not in ([n], [1, n], [], [1]):
                        return f"Gemm bias of shape {records[node.input[2]].shape} is not one value per output column"
            if node.op_type == "MatMul" and node.input[0] in records:
                return "both MatMul operands are constant"
            return None

        return select_layers(model, records, SUPPORTED_OPS, self.config, judge)

    def _layer(self, site: Site, ranks: dict) -> _Layer:
        node = site.node
        layer = _Layer(site, node.op_type, node.input[0], node.output[0])
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            layer.bias = node.input[2]
        if node.op_type == "MatMul" and ranks.get(node.input[0]) == 2:
            # A 2-D MatMul is a Gemm, and with its bias Add one QGemm instead of QLinearMatMul + QLinearAdd.
            layer.kind = "Gemm"
            users = [n for n in site.graph.node if node.output[0] in n.input]
            constants = {t.name: t for t in site.graph.initializer}
            columns = [t for t in site.graph.initializer if t.name == site.weight][0].dims[1]
            if (len(users) == 1 and users[0].op_type == "Add" and users[0].domain in ("", "ai.onnx")
                    and node.output[0] not in {o.name for o in site.graph.output}):
                add = users[0]
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                if other != node.output[0] and other in constants and list(constants[other].dims) in ([columns], [1, columns]):
                    layer.bias, layer.add, layer.output = other, add, add.output[0]
        return layer

    # ---- the rewrite ----------------------------------------------------------------------------

    def _rewrite(self, model, plan, ranges) -> list[LayerDecision]:
        graph = model.graph
        names = Names(model)
        owners = initializer_owners(model)
        params = plan.parameters(ranges)
        after = plan.insert_qdq(graph, names, params)  # renames producers' outputs: read names from nodes below
        before: dict[int, list] = {}
        removed = set()
        written: dict[tuple, tuple] = {}  # (weight, alpha, scale bytes) -> initializer base name
        decisions = []
        for layer in plan.layers:
            node = layer.site.node
            op = node.op_type
            transposed = op == "Gemm" and bool(attr(node, "transB", 0))
            alpha = float(attr(node, "alpha", 1.0)) if op == "Gemm" else 1.0
            beta = float(attr(node, "beta", 1.0)) if op == "Gemm" else 1.0
            x_scale = params[plan.root_of(layer.x)][0]
            w = numpy_helper.to_array(owners[layer.site.weight][1]).astype(np.float32)
            axis = 0 if layer.kind == "Conv" or transposed else 1  # output channels
            channels = w.shape[axis]
            bias = None
            if layer.bias:
                bias = numpy_helper.to_array(owners[layer.bias][1]).astype(np.float32).reshape(-1) * np.float32(beta)
                bias = np.broadcast_to(bias, (channels,)).astype(np.float32)
            q, w_scale, w_zero = self._quantize_weight(w * np.float32(alpha), axis, bias, x_scale)
            key = (layer.site.weight, alpha, w_scale.tobytes())
            first_use = key not in written
            if first_use:
                base = names(layer.site.weight + ("" if alpha == 1.0 else "_alpha"))
                graph.initializer.extend([numpy_helper.from_array(q, base + "_q"),
                                          numpy_helper.from_array(w_scale, base + "_scale"),
                                          numpy_helper.from_array(w_zero, base + "_zero_point")])
                written[key] = base
            base = written[key]
            stem = names(layer.site.name.replace("/", "_") + "_weight")
            weight = stem + "_dq"
            plan.weight_inputs[weight] = layer.site.name
            axis_attr = {"axis": axis} if self.config.per_channel else {}
            new = [helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"], [weight],
                                    name=stem + "_DequantizeLinear", **axis_attr)]
            inputs = [node.input[0], weight]
            if bias is not None:
                # int32 bias in the accumulator's scale: what QLinearConv/QGemm take (a float bias does not fuse).
                b_scale = (np.float32(x_scale) * np.broadcast_to(w_scale, (channels,))).astype(np.float32)
                b_q = np.clip(np.rint(bias / b_scale), -INT32_MAX, INT32_MAX).astype(np.int32)
                bstem = names(layer.site.name.replace("/", "_") + "_bias")
                graph.initializer.extend([numpy_helper.from_array(b_q, bstem + "_int32"),
                                          numpy_helper.from_array(b_scale, bstem + "_scale"),
                                          numpy_helper.from_array(np.zeros(channels, np.int32), bstem + "_zero_point")])
                new.append(helper.make_node("DequantizeLinear", [bstem + "_int32", bstem + "_scale", bstem + "_zero_point"],
                                            [bstem + "_dq"], name=bstem + "_DequantizeLinear", axis=0))
                inputs.append(bstem + "_dq")
            if op == "MatMul" and layer.kind == "Gemm":
                output = (layer.add if layer.add is not None else node).output[0]  # as insert_qdq left it
                node.CopyFrom(helper.make_node("Gemm", inputs, [output], name=node.name))
                if layer.add is not None:
                    removed.add(id(layer.add))
            else:
                del node.input[:]
                node.input.extend(inputs)
                if op == "Gemm":
                    _set_attr(node, "alpha", 1.0)  # folded into the weight
                    _set_attr(node, "beta", 1.0)  # folded into the bias
            before.setdefault(id(node), []).extend(new)
            low, high = ranges[plan.root_of(layer.x)]
            note = f"input uint8 over [{low:.4g}, {high:.4g}]"
            if layer.add is not None:
                note += "; with its bias Add, written as one Gemm"
            elif op == "MatMul" and layer.kind == "Gemm":
                note += "; written as Gemm"
            decisions.append(LayerDecision(
                layer.site.name, op, layer.site.weight,
                "int8 static QDQ " + ("per-channel" if self.config.per_channel else "per-tensor")
                + ("" if first_use else " (shared weight, stored once)"), note,
                int(w.nbytes) if first_use else 0, int(q.nbytes + w_scale.nbytes + w_zero.nbytes) if first_use else 0))
        # Weight/bias DequantizeLinear right before their layer; activation Q -> DQ right after the producer.
        ordered = list(plan.input_qdq)
        for node in graph.node:
            if id(node) not in removed:
                ordered += before.get(id(node), []) + [node]
            ordered += after.get(id(node), [])
        del graph.node[:]
        graph.node.extend(ordered)
        drop_unused_initializers(model)
        return decisions

    def _quantize_weight(self, w, axis, bias, x_scale):
        """int8 weight, scale, zero point; a channel's scale grows where its int32 bias would overflow."""
        moved = np.moveaxis(w, axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])  # [K, channels]: quantize_int8 quantizes along the last axis
        q, scale, zero = quantize_int8(flat, self.config.per_channel, self.config.symmetric)
        if bias is not None:
            needed = np.abs(bias) / (np.float32(x_scale) * np.float32(INT32_MAX // 2))
            if np.any(np.broadcast_to(scale, needed.shape) < needed):
                scale = np.maximum(scale, needed if self.config.per_channel else needed.max()).astype(np.float32)
                low = -127 if self.config.symmetric else -128
                q = np.clip(np.rint(flat / scale) + np.asarray(zero, np.float32), low, 127).astype(np.int8)
        q = np.ascontiguousarray(np.moveaxis(q.reshape(moved.shape), -1, axis))
        return q, np.asarray(scale, np.float32), np.asarray(zero, np.int8)


class _Plan:
    """Which float tensors get QuantizeLinear -> DequantizeLinear, and whose range each one uses."""

    def __init__(self, model, layers, quantized_outputs=frozenset()):
        graph = model.graph
        self.layers = layers
        self.producers = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.constants = {t.name: t for t in graph.initializer}
        self.layer_inputs = {layer.x for layer in layers}
        required = set(self.layer_inputs)
        results = []
        self.float_matmuls: set[str] = set()
        for layer in layers:
            result = self._folded(layer.output)
            # QLinearConv needs a quantized output, and so does a layer followed by a Relu (only a quantized
            # output folds it). Otherwise a Gemm writes float unless a quantized layer reads it, and so does a
            # MatMul (onnxruntime's MatMulIntegerToFloat): quantizing a MatMul's output to uint8 is where static
            # int8 lost most on MiniLM (the FFN output before its residual Add holds channels 200x the median:
            # cosine 0.944 -> 0.989 with MatMul outputs left float).
            float_ok = layer.kind == "Gemm" or (layer.kind == "MatMul" and layer.site.name not in quantized_outputs)
            if not float_ok or result != layer.output or self._wanted(result, set()):
                required.add(result)
                results.append(result)
            elif layer.kind == "MatMul":
                self.float_matmuls.add(layer.site.name)
        # Forwards from quantized layers' outputs: a pass-through op writes a tensor with its input's scale, and
        # onnxruntime runs it on uint8 in the layer's NHWC layout. Not from tensors float ops wrote: there
        # quantizing after the op moves less data (onnxruntime's uint8 MaxPool in NCHW is 25x slower than float).
        self.derived: dict[str, str] = {}
        work = list(results)
        while work:
            tensor = work.pop()
            for consumer in self.consumers.get(tensor, []):
                if self._pass_through(consumer) and consumer.input[0] == tensor:
                    out = consumer.output[0]
                    if out not in self.derived and out not in results:
                        required.add(out)
                        self.derived[out] = tensor
                        work.append(out)
        self.required = required
        self.roots = sorted(t for t in required if t not in self.derived)
        self.layer_nodes = {id(layer.site.node) for layer in layers} | {id(layer.add) for layer in layers if layer.add}
        # Readers that take the quantized tensor: the layers, and pass-through ops whose output is quantized too.
        self.quantized_readers = {id(layer.site.node) for layer in layers} | {
            id(node) for tensor in self.derived for node in self.consumers.get(self.derived[tensor], [])
            if tensor in node.output}
        self.input_qdq: list = []
        self.weight_inputs: dict[str, str] = {}  # weight DequantizeLinear output -> layer name

    def _pass_through(self, node) -> bool:
        if node.op_type not in PASS_THROUGH or node.domain not in ("", "ai.onnx") or not node.input:
            return False
        return not (node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1])  # no Indices output

    def _folded(self, tensor: str) -> str:
        """The tensor that carries a layer's result, past a following Relu or Clip(0, x) that only it feeds."""
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(users) != 1:
            return tensor
        user = users[0]
        if user.domain not in ("", "ai.onnx") or not user.input or user.input[0] != tensor:
            return tensor
        if user.op_type == "Relu" or (user.op_type == "Clip" and self._clip_min(user) == 0.0):
            return user.output[0]
        return tensor

    def _clip_min(self, node):
        if len(node.input) > 1 and node.input[1]:
            tensor = self.constants.get(node.input[1])
            return float(numpy_helper.to_array(tensor).reshape(-1)[0]) if tensor is not None and _size(tensor) == 1 else None
        return float(attr(node, "min", float("-inf")))

    def _wanted(self, tensor: str, seen: set) -> bool:
        """Whether a quantized layer reads this tensor, directly or through pass-through ops."""
        if tensor in seen:
            return False
        seen.add(tensor)
        if tensor in self.layer_inputs:
            return True
        return any(self._pass_through(c) and c.input[0] == tensor and self._wanted(c.output[0], seen)
                   for c in self.consumers.get(tensor, []))

    def root_of(self, tensor: str) -> str:
        while tensor in self.derived:
            tensor = self.derived[tensor]
        return tensor

    def parameters(self, ranges) -> dict[str, tuple[float, int]]:
        """uint8 (scale, zero point) of every root tensor from its (low, high) range; 0 is exact."""
        params = {}
        for tensor in self.roots:
            low, high = ranges[tensor]
            low, high = min(low, 0.0), max(high, 0.0)
            scale = float(np.float32((high - low) / 255.0))
            if not np.isfinite(scale) or scale <= 0:
                params[tensor] = (1.0, 0)  # constant zero: any scale represents it
                continue
            params[tensor] = (scale, int(np.clip(np.rint(-low / scale), 0, 255)))
        return params

    def insert_qdq(self, graph, names, params) -> dict:
        """Q -> DQ after the producer of every required tensor (consumers keep reading its name)."""
        after: dict[int, list] = {}
        bases = {tensor: names(tensor) for tensor in sorted(self.required)}
        for root in self.roots:
            scale, zero = params[root]
            graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), bases[root] + "_scale"),
                                      numpy_helper.from_array(np.array(zero, np.uint8), bases[root] + "_zero_point")])
        for tensor in sorted(self.required):
            base, root_base = bases[tensor], bases[self.root_of(tensor)]
            scale, zero = root_base + "_scale", root_base + "_zero_point"
            if tensor in self.inputs:  # a graph input: its consumers read the DQ output instead
                for node in self.consumers.get(tensor, []):
                    for i, name in enumerate(node.input):
                        if name == tensor:
                            node.input[i] = base + "_dq"
                self.input_qdq += [
                    helper.make_node("QuantizeLinear", [tensor, scale, zero], [base + "_q"], name=base + "_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [base + "_q", scale, zero], [base + "_dq"],
                                     name=base + "_DequantizeLinear")]
                continue
            producer = self.producers[tensor]
            for i, name in enumerate(producer.output):
                if name == tensor:
                    producer.output[i] = base + "_float"
            if tensor not in self.derived and id(producer) not in self.layer_nodes:
                # Written by a float op (a LayerNorm): its float readers (a residual Add) read it unrounded, and
                # onnxruntime runs no DequantizeLinear for them. After a quantized layer they read the DQ instead:
                # a float reader of the float tensor would keep the layer from writing uint8 itself.
                for node in self.consumers.get(tensor, []):
                    if id(node) not in self.quantized_readers:
                        for i, name in enumerate(node.input):
                            if name == tensor:
                                node.input[i] = base + "_float"
            after.setdefault(id(producer), []).extend([
                helper.make_node("QuantizeLinear", [base + "_float", scale, zero], [base + "_q"],
                                 name=base + "_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [base + "_q", scale, zero], [tensor], name=base + "_DequantizeLinear")])
        return after


BODY = "inside an If/Loop/Scan body: calibration sees the main graph only"
BODY_REASON = ("inside an If/Loop/Scan body, which calibration does not reach: int8 storage with float kernels "
               "(needs no activation ranges)")


def _body_sites(model, skipped, records) -> list[Site]:
    """The layers left out only for sitting in a control-flow body, as sites the folded form can rewrite."""
    wanted = {decision.node for decision in skipped if decision.reason == BODY}
    owners = initializer_owners(model)
    sites = []
    for graph in iter_graphs(model.graph):
        if graph is model.graph or not wanted:
            continue
        for index, node in enumerate(graph.node):
            name = node.name or f"{node.op_type}_{index}"
            weight = node.input[1] if len(node.input) > 1 else ""
            record = records.get(weight)
            if (name not in wanted or record is None or record.dtype != "float" or record.is_graph_input
                    or record.nbytes < TINY_BYTES):
                continue
            if node.op_type in ("MatMul", "Gemm") and len(record.shape) != 2:
                continue
            if weight in owners and nonfinite(numpy_helper.to_array(owners[weight][1])):
                for decision in skipped:  # left as it is, as every command leaves such a weight
                    if decision.node == name and decision.reason == BODY:
                        decision.reason = NONFINITE
                continue
            sites.append(Site(graph, node, name, weight))
    return sites


def _relu_after_maxpool(model, plan) -> int:
    """Rewrite a float Relu -> MaxPool as MaxPool -> Relu where the pooled tensor gets quantized.

    They commute exactly (max is monotone). onnxruntime moves a QuantizeLinear up through MaxPool,
    and then runs MaxPool on uint8 in NCHW layout, 25x slower than its float NCHWc MaxPool (173 us
    vs 7 us on 64x32x32, batch 1). With the Relu last the QuantizeLinear stops there and folds it.
    """
    swapped = 0
    layer_outputs = {layer.site.node.output[0] for layer in plan.layers}
    for root in plan.roots:
        pool = plan.producers.get(root)
        if pool is None or pool.op_type != "MaxPool" or not plan._pass_through(pool):
            continue
        relu = plan.producers.get(pool.input[0])
        if (relu is None or relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx")
                or len(plan.consumers.get(relu.output[0], [])) != 1 or relu.output[0] in plan.outputs
                or relu.input[0] in layer_outputs):
            continue
        source, middle, result = relu.input[0], relu.output[0], pool.output[0]
        # Swap the two nodes' contents in place: the Relu's slot (the earlier one) becomes the MaxPool, so the
        # order stays topological and every other node object (the layers the rewrite holds) stays valid.
        first, second = onnx.NodeProto(), onnx.NodeProto()
        first.CopyFrom(pool)
        first.input[0], first.output[0] = source, middle
        second.CopyFrom(relu)
        second.input[0], second.output[0] = middle, result
        relu.CopyFrom(first)
        pool.CopyFrom(second)
        swapped += 1
    return swapped


def _runtime_graph(model, threads) -> onnx.ModelProto:
    """The graph onnxruntime really runs, after all its fusions."""
    with scratch_dir("static") as tmp:
        target = Path(tmp) / "optimized.onnx"
        make_session(model, threads, optimize=True, optimized_path=str(target))
        return onnx.load(str(target), load_external_data=False)


def _unfused_layers(optimized, plan) -> list[str]:
    """Layers onnxruntime does not run as an integer kernel.

    A fused layer's weight DequantizeLinear is gone (absorbed into QLinearConv/QGemm/QLinearMatMul);
    an unfused one still feeds a float kernel, which also keeps the layer's name or output.
    """
    by_name = {layer.site.node.name: layer.site.name for layer in plan.layers if layer.site.node.name}
    by_output = {layer.site.node.output[0]: layer.site.name for layer in plan.layers}
    failed = set()
    for graph in iter_graphs(optimized.graph):
        for node in graph.node:
            failed.update(plan.weight_inputs[name] for name in node.input if name in plan.weight_inputs)
            if _kind(node) in FLOAT_KERNELS or _kind(node) == "com.microsoft.MatMulNBits":  # weight-only: float math
                failed.update(by_output[name] for name in node.output if name in by_output)
                if node.name in by_name:
                    failed.add(by_name[node.name])
    return sorted(failed)


def _runs_as_integer(optimized, name: str) -> bool:
    """Whether an integer kernel in the optimized graph carries this node's name (NHWC adds "_token_N")."""
    return any(_kind(n) in INTEGER_KERNELS and (n.name == name or n.name.startswith(name + "_token_"))
               for g in iter_graphs(optimized.graph) for n in g.node)


def _kind(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _rows_unknown(dims) -> bool:
    """Whether a MatMul output's shape leaves its rows per sample unknown (its rank or a middle dim)."""
    return dims is None or len(dims) < 2 or any(d is None for d in dims[1:-1])


def _size(tensor) -> int:
    return int(np.prod(tensor.dims)) if len(tensor.dims) else 1


def _set_attr(node, name, value):
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _ranks(model) -> dict:
    """Tensor name -> rank, where shape inference knows it (a 2-D MatMul input can become a Gemm)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    except Exception:  # noqa: BLE001 - no shapes only means no MatMul -> Gemm rewrite
        values = list(model.graph.input) + list(model.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
