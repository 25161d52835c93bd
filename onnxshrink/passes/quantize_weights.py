"""Weight-only int8: the file gets about 4x smaller, activations and kernels stay float.

Before:                       After (default, folded):
    X ──► MatMul ◄── W(f32)       Wq(int8) ──► Cast(float) ──► Mul ◄── Ws ──► W'     (folded_weights.py)
                                  X ──► MatMul ◄── W'
                              After (qdq=True):
                                  Wq(int8), Ws, Wz ──► DequantizeLinear(axis) ──► W'
                                  X ──► MatMul ◄── W'

The folded form is the default: onnxruntime folds Cast and Mul when it loads the model and runs
the fp32 kernels at fp32 speed (the weights take fp32 memory once loaded). QDQ is for runtimes
that read DequantizeLinear as a weight-only int8 kernel; onnxruntime CPU dequantizes those on
every run (1.2-11x slower than fp32 on the sample models and a 1024-wide MLP), so the report says so.
Embedding tables (Gather data) get int8 per row, only the gathered rows decoded (quantize_embeddings.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.passes.common import (Names, begin_pass, drop_unused_initializers, initializer_owners, raise_opset,
                                      select_layers)
from onnxshrink.passes.folded_weights import channel_axis as _channel_axis
from onnxshrink.passes.folded_weights import fold_layers, folded_opset, relabel_folded
from onnxshrink.passes.quantize import embed, nothing_to_do, quantize_int8
from onnxshrink.passes.quantize_embeddings import EmbeddingPlan
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.streaming import TensorStore
from onnxshrink.weights import find_tensors

SLOW_ON_ORT = ("weight-only QDQ: onnxruntime CPU dequantizes these weights on every run and is slower than fp32; "
               "without --qdq the weights are folded at load and run at fp32 speed")
FOLDED_NOTE = ("int8 weights decoded by Cast and Mul, which onnxruntime folds when it loads the model: fp32 kernels at "
               "fp32 speed, from a file about 4x smaller (--qdq writes DequantizeLinear for runtimes that want it)")


@dataclass
class WeightsOnlyConfig:
    op_types: tuple = ("MatMul", "Gemm", "Conv")
    exclude: tuple = ()
    keep_float: str | None = None
    per_channel: bool = True
    symmetric: bool = True
    qdq: bool = False  # DequantizeLinear instead of the folded form (always per-channel symmetric)
    embeddings: bool = True  # Gather tables int8 per row, rows decoded after the Gather (quantize_embeddings.py)


class QuantizeWeightsOnly:
    """int8 weights behind DequantizeLinear; activations stay float."""

    name = "quantize-weights"

    def __init__(self, config: WeightsOnlyConfig | None = None):
        self.config = config or WeightsOnlyConfig()
        self.tensors = TensorStore()

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = begin_pass(model, self.name, asdict(self.config))
        records = {r.name: r for r in find_tensors(model)}

        def judge(node, record, constants):
            if record.dtype != "float":
                return f"weight is {record.dtype}: only float32 weights are quantized"
            if node.op_type in ("MatMul", "Gemm") and len(record.shape) != 2:
                return f"weight has shape {record.shape}: only 2-D MatMul/Gemm weights are quantized"
            if node.op_type == "MatMul" and node.input[0] in records:
                return "both MatMul operands are constant"
            return None

        embeddings = EmbeddingPlan(model, records, self.config.exclude, self.config.embeddings, self.tensors.read)
        sites, skipped = select_layers(model, records, ("MatMul", "Gemm", "Conv"), self.config, judge)
        sites, skipped = embeddings.take_tied(sites), embeddings.drop_skipped(skipped)
        relabel_folded(model, skipped)
        report.layers.extend(skipped)
        if not sites:
            if not embed(model, embeddings, self.tensors, report):
                report.notes.append(nothing_to_do(model, "weight"))
            return model, report
        why = (raise_opset(model, 13, "per-axis DequantizeLinear", report.notes) if self.config.qdq
               else folded_opset(model, report.notes))
        if why:
            report.layers.extend(LayerDecision(site.name, site.node.op_type, site.weight, "kept float", why,
                                               records[site.weight].nbytes, records[site.weight].nbytes) for site in sites)
            report.notes.append("nothing quantized: the model's opset is too old for what this mode writes")
            return model, report
        if not self.config.qdq:
            report.layers.extend(fold_layers(model, sites, {site.name: "weight-only" for site in sites}))
            report.notes.append(FOLDED_NOTE)
            embed(model, embeddings, self.tensors, report)
            report.changed = True
            return model, report
        owners = initializer_owners(model)
        names = Names(model)
        done: dict[tuple[str, int], str] = {}
        for site in sites:
            axis = _channel_axis(site.node)
            key = (site.weight, axis)
            if key in done:
                site.node.input[1] = done[key]
                report.layers.append(LayerDecision(site.name, site.node.op_type, site.weight, "int8 weight-only (shared)"))
                continue
            graph, tensor = owners[site.weight]
            w = numpy_helper.to_array(tensor).astype(np.float32)
            moved_axis = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])
            q, scale, zero = quantize_int8(moved_axis, self.config.per_channel, self.config.symmetric)
            q = np.moveaxis(q.reshape(np.moveaxis(w, axis, -1).shape), -1, axis)
            base = names(site.weight + "_int8")
            inits = [numpy_helper.from_array(np.ascontiguousarray(q), base),
                     numpy_helper.from_array(np.asarray(scale, dtype=np.float32), base + "_scale"),
                     numpy_helper.from_array(np.asarray(zero, dtype=np.int8), base + "_zero_point")]
            graph.initializer.extend(inits)
            kwargs = {"axis": axis} if self.config.per_channel else {}
            dq = helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zero_point"], [base + "_dq"],
                                  name=base + "_DequantizeLinear", **kwargs)
            graph.node.insert(0, dq)
            site.node.input[1] = base + "_dq"
            done[key] = base + "_dq"
            after = sum(t.ByteSize() for t in inits)
            report.layers.append(LayerDecision(site.name, site.node.op_type, site.weight,
                                               "int8 weight-only" + (" per-channel" if self.config.per_channel else ""),
                                               "", w.nbytes, after))
        drop_unused_initializers(model)
        embed(model, embeddings, self.tensors, report)
        report.notes.append(SLOW_ON_ORT)
        report.changed = True
        return model, report
