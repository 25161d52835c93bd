"""int8 storage, float compute: a weight kept as int8 + per-channel scale, decoded by standard ops.

Before:                          After:
    X ──► MatMul ◄── W (f32)         Wq (int8, W's shape) ──► Cast(float) ──► Mul ◄── Ws (f32, one per output channel)
                                                                                 │
                                     X ──► MatMul ◄──────────────────────────── W'

Every input of the decoding is an initializer, so onnxruntime constant-folds Cast and Mul when it
creates the session (as it folds cluster's Cast+Gather): it runs the original float kernel at the
original's speed while the file holds one byte per weight. DequantizeLinear is not folded (onnxruntime
keeps it for its QDQ fusions and dequantizes on every run: 1.2-11x slower on the sample models), and
an integer kernel only pays on layers with enough work per sample, because quantizing the activation
costs about 2 us a layer at batch 1. So the quantize modes write this form for the layers where the
integer kernel would be slower than fp32 (fewer multiply-adds per sample than INTEGER_MIN_MACS).
"""

from __future__ import annotations

import fnmatch

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import attr, raise_opset

FOLDED = "int8 folded (float kernel)"  # LayerDecision.action of a layer written in this form
# Multiply-adds per sample (weights x output positions) from which an integer kernel beat fp32 at batch 1
# (onnxruntime 1.32, 2-core Xeon with AVX-512 VNNI, 1 thread; quantized / fp32 latency). Dynamic, one layer:
# 2-D MatMul 256x384 1.03, 256x512 0.98; 3-D (8 rows) 64x128 1.04, 128x128 0.94. Static, whose layer also
# quantizes its input and dequantizes its output: 2-D 256x512 1.07, 384x512 0.93; 3-D 128x256 0.96; a
# 16->32 3x3 Conv after a float Conv, then MaxPool (NHWC transposes): 8x8 1.02, 10x10 0.94, 12x12 0.86.
# At batch 32 the integer kernels were faster from the smallest sizes tried.
INTEGER_MIN_MACS = {"dynamic": 131072, "static": 393216}
FOLDED_OPSET = 7  # Cast with an integer `to` needs opset 6, Mul with numpy broadcasting 7
# LayerDecision.reason of a layer a config's `fold` globs named (the latency guard sets them, and rewrites the reason).
FOLD_REQUESTED = "folded on request (the config's fold patterns)"


def fold_requested(name: str, patterns) -> bool:
    """Whether a layer's node name matches one of a config's `fold` globs (as `exclude` matches)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())


def folded_opset(model: onnx.ModelProto, notes: list | None = None) -> str | None:
    """None when the model's opset lets this form be written (raised to FOLDED_OPSET where that is safe), else why not."""
    return raise_opset(model, FOLDED_OPSET, "the int8 decoding (Cast, broadcasting Mul)", notes)


def channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the weight: N of MatMul's [K, N], Gemm's per transB, Conv's M, a Gather
    table's rows (what it gathers)."""
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type in ("Conv", "Gather"):
        return 0
    return 1


def quantize_folded(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values in [-127, 127] and a float32 scale per channel along `axis`, shaped to broadcast against w."""
    w = np.asarray(w, np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    if axis == w.ndim - 1:
        scale = scale.reshape(-1)  # [N] broadcasts along the last axis as it is
    return q, scale


def decode(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What Cast + Mul computes: the float weight the layer runs with."""
    return q.astype(np.float32) * scale


def add_folded(tensors, graph: onnx.GraphProto, q: np.ndarray, scale: np.ndarray, base: str) -> tuple[list, int]:
    """Add Wq and Ws (quantize_folded's) to `graph` through `tensors` (a streaming.TensorStore); return the decoding
    nodes (output `base + "_dq"`) and the bytes the two tensors take. `base` comes from passes.common.Names."""
    tensors.add(graph, q, base)
    tensors.add(graph, scale, base + "_scale")
    return decoding_nodes(base), int(q.nbytes + scale.nbytes)


def decoding_nodes(base: str) -> list:
    return [helper.make_node("Cast", [base], [base + "_float"], to=TensorProto.FLOAT, name=base + "_Cast"),
            helper.make_node("Mul", [base + "_float", base + "_scale"], [base + "_dq"], name=base + "_Mul")]


def macs_per_sample(node: onnx.NodeProto, weight_shape, shapes: dict) -> int | None:
    """Multiply-adds one sample costs this layer: its weights times its output positions (rows of a 3-D
    MatMul, pixels of a Conv). Unknown dims count as 1 for MatMul/Gemm (a lower bound: the layer may get
    the float kernel where an integer one would have paid, never the reverse); a Conv whose output size
    is unknown gives None (the caller keeps the integer kernel, as image models need)."""
    weights = int(np.prod(weight_shape)) if len(weight_shape) else 1
    dims = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "Conv":
        spatial = dims[2:] if dims and len(dims) > 2 else None
        return None if not spatial or any(d is None for d in spatial) else weights * int(np.prod(spatial))
    rows = [d for d in (dims[1:-1] if dims and len(dims) > 2 else []) if d is not None]
    return weights * int(np.prod(rows)) if rows else weights


def folded_source(graph: onnx.GraphProto, weight: str) -> str | None:
    """The int8 initializer behind `weight` when it is this form's Mul(Cast(int8), scale), else None."""
    producers = {o: n for n in graph.node for o in n.output}
    mul = producers.get(weight)
    if mul is None or mul.op_type != "Mul" or not mul.input:
        return None
    cast = producers.get(mul.input[0])
    if cast is None or cast.op_type != "Cast" or not cast.input:
        return None
    source = next((t for g in iter_graphs(graph) for t in g.initializer if t.name == cast.input[0]), None)
    return source.name if source is not None and source.data_type == TensorProto.INT8 else None


def constant_nodes_left(optimized: onnx.ModelProto) -> int:
    """Nodes of the graph onnxruntime runs whose inputs are all initializers: decoding it failed to fold."""
    count = 0
    for graph in iter_graphs(optimized.graph):
        constants = {t.name for t in graph.initializer}
        for node in graph.node:
            inputs = [name for name in node.input if name]
            if node.op_type in ("Cast", "Mul") and inputs and all(name in constants for name in inputs):
                count += 1
    return count


def has_folded(model: onnx.ModelProto) -> bool:
    """Whether some Cast reads an int8 initializer: this form, written by an earlier run."""
    for graph in iter_graphs(model.graph):
        int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
        if any(n.op_type == "Cast" and n.input and n.input[0] in int8 for n in graph.node):
            return True
    return False


def relabel_folded(model: onnx.ModelProto, skipped: list) -> None:
    """A layer left alone because an earlier run folded its weight says so, not 'not a constant tensor'."""
    for decision in skipped:
        if decision.action == "kept float" and decision.reason == "weight input is not a constant tensor":
            if any(folded_source(graph, decision.weight) for graph in iter_graphs(model.graph)
                   if any(decision.weight in n.output for n in graph.node)):
                decision.action, decision.reason = "kept as is", "already int8 (folded form)"


def fold_layers(model: onnx.ModelProto, sites: list, reasons: dict, tensors=None) -> list:
    """Rewrite these layers' weights in the folded form, in place; one LayerDecision each, reason from
    `reasons` (site name -> why). A weight read by several layers is stored once per axis and scope."""
    from onnxshrink.passes.common import Names, drop_unused_initializers, initializer_owners
    from onnxshrink.streaming import TensorStore

    tensors = tensors or TensorStore()
    owners, names = initializer_owners(model), Names(model)
    by_node = {id(site.node): site for site in sites}
    graphs = {id(site.graph): site.graph for site in sites}
    done: dict[tuple, str] = {}
    decisions = []
    for graph in graphs.values():
        rewritten = []
        for node in graph.node:
            site = by_node.get(id(node))
            if site is not None:
                decisions.append(fold_site(site, graph, tensors, owners, names, done, rewritten, reasons[site.name]))
            rewritten.append(node)
        del graph.node[:]
        graph.node.extend(rewritten)
    drop_unused_initializers(model)
    return decisions


def fold_site(site, graph, tensors, owners, names, done: dict, new_nodes: list, reason: str):
    """Point one layer at its weight decoded from int8 (Cast, Mul), written once per weight, axis and scope
    (`done`: key -> decoded name); the decoding nodes go to `new_nodes`. Returns the layer's LayerDecision.
    The float weight is dropped before the int8 one is written: a streamed model holds one weight at a time."""
    from onnxshrink.report import LayerDecision

    node = site.node
    key = (site.weight, channel_axis(node), id(graph))
    if key in done:
        decision = LayerDecision(site.name, node.op_type, site.weight, FOLDED + " (shared weight)", reason)
    else:
        owner, tensor = owners[site.weight]
        w = tensors.read(tensor).astype(np.float32, copy=False)
        size = int(w.nbytes)
        q, scale = quantize_folded(w, key[1])
        del w
        base = names(site.weight + "_int8")
        nodes, after = add_folded(tensors, owner, q, scale, base)
        new_nodes.extend(nodes)
        done[key] = base + "_dq"
        decision = LayerDecision(site.name, node.op_type, site.weight, FOLDED, reason, size, after)
    node.input[1] = done[key]
    return decision
