"""Weight-only int8 QDQ, for runtimes other than onnxruntime CPU (which runs it slower than fp32).

Before:                       After:
    X ──► MatMul ◄── W(f32)       Wq(int8), Ws, Wz ──► DequantizeLinear(axis) ──► W'
                                  X ──► MatMul ◄── W'

The file gets about 4x smaller and the graph stays float, so any runtime can run it;
onnxruntime CPU dequantizes on every run (measured 7.5x slower on a 2048-wide MLP),
so the report says so and `validate` shows the latency ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.passes.common import (Names, attr, begin_pass, drop_unused_initializers, ensure_opset,
                                      initializer_owners, select_layers)
from onnxshrink.passes.quantize import nothing_to_do, quantize_int8
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import find_tensors

SLOW_ON_ORT = ("weight-only QDQ: onnxruntime CPU dequantizes these weights on every run and is slower than fp32; "
               "use the default dynamic mode (or --mode static) for onnxruntime")


@dataclass
class WeightsOnlyConfig:
    op_types: tuple = ("MatMul", "Gemm", "Conv")
    exclude: tuple = ()
    keep_float: str | None = None
    per_channel: bool = True
    symmetric: bool = True


class QuantizeWeightsOnly:
    """int8 weights behind DequantizeLinear; activations stay float."""

    name = "quantize-weights"

    def __init__(self, config: WeightsOnlyConfig | None = None):
        self.config = config or WeightsOnlyConfig()

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

        sites, skipped = select_layers(model, records, ("MatMul", "Gemm", "Conv"), self.config, judge)
        report.layers.extend(skipped)
        if not sites:
            report.notes.append(nothing_to_do(model, "weight"))
            return model, report
        ensure_opset(model, 13)  # per-axis DequantizeLinear
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
        report.notes.append(SLOW_ON_ORT)
        report.changed = True
        return model, report


def _channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight: N of MatMul's [K, N], Gemm's per transB, Conv's M."""
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "Conv":
        return 0
    return 1
