"""What every weight-rewriting pass shares: choosing layers (with a reason for each one left alone),
fresh names, and initializer bookkeeping across subgraph scopes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.algorithms.sinusoids import sinusoid_bank
from onnxshrink.model import claim_handed_over, handed_over, iter_graphs, prepare  # noqa: F401 (handed_over: passes import it here)
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import tensor_nbytes


def begin_pass(model: onnx.ModelProto, name: str, options: dict) -> tuple[onnx.ModelProto, PassReport]:
    """A copy of the model to rewrite (passes never touch their input, unless it was handed over),
    its Constant-node tensors moved to initializers (an IR 3 model lifted to IR 4, model.prepare says why), and the
    pass's report with a note saying what changed."""
    if claim_handed_over(model):
        copy = model
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    report = PassReport(name, options)
    ir_version = copy.ir_version
    moved = prepare(copy)
    if copy.ir_version != ir_version:
        report.notes.append(f"IR version {ir_version} -> {copy.ir_version}: IR {ir_version} requires every initializer to "
                            "be a graph input; the initializers left the input list (onnxruntime ran them as constants "
                            "already, and refused feeds for them)")
    if moved:
        report.notes.append(f"moved {moved} Constant-node tensor(s) to initializers")
    return copy, report


@dataclass
class Site:
    """A node whose weight a pass will rewrite, in the graph (or subgraph) that holds it."""

    graph: onnx.GraphProto
    node: onnx.NodeProto
    name: str
    weight: str


NONFINITE = "weight holds NaN or infinite values"  # the reason every command gives for leaving such a layer as it is


def nonfinite(values: np.ndarray) -> bool:
    """Whether a float weight holds NaN or +-Inf. No compressed form of it means anything (a scale, a codebook or a
    magnitude order computed with NaN in it), so every command leaves such a layer exactly as it is and says why."""
    return values.dtype.kind == "f" and not bool(np.isfinite(values).all())


def select_layers(model, records, op_types, config, judge, read=numpy_helper.to_array):
    """Nodes of `op_types` to rewrite, and a kept-float LayerDecision with a reason for every other one.

    `config` supplies op_types/exclude/keep_float as every quantize mode spells them;
    `judge(node, record, constants)` returns a pass-specific reason to skip, or None. A layer that would be
    rewritten is last checked for NaN/Inf weights (NONFINITE): each weight read once, through `read` (a streamed
    pass's store reads one external weight at a time, so a big model is never held whole).
    """
    owners = initializer_owners(model)
    verdicts: dict[tuple, str | None] = {}

    def weight_reason(node, weight: str) -> str | None:
        """NONFINITE, or why a signal-processing basis stays float (signal_basis), from one read of the weight."""
        key = (weight, node.op_type, attr(node, "transB", 0))
        if key not in verdicts and weight in owners:
            value = read(owners[weight][1])
            verdicts[key] = kept_weight_reason(node, value)
        return verdicts.get(key)

    sites, skipped = [], []
    candidates = []
    for graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.op_type in op_types and node.domain in ("", "ai.onnx"):
                candidates.append((graph, node, node.name or f"{node.op_type}_{index}"))
    constants = {t.name for g in iter_graphs(model.graph) for t in g.initializer}
    for graph, node, name in candidates:
        weight = node.input[1] if len(node.input) > 1 else ""
        record = records.get(weight)
        size = record.nbytes if record else 0
        if node.op_type not in config.op_types:
            reason = "op type not selected (--op-types)"
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
            reason = "excluded (--exclude)"
        elif record is None:
            reason = _not_constant(graph, weight)
        elif not record.compressible:
            reason = record.reason
        elif record.is_graph_input:
            reason = "weight is also a graph input: a caller may override it at run time, so it stays float"
        else:
            reason = judge(node, record, constants) or weight_reason(node, weight)
        if reason:
            skipped.append(LayerDecision(name, node.op_type, weight, "kept float", reason, size, size))
        else:
            sites.append(Site(graph, node, name, weight))
    # --keep-float applies to the first/last layer that would otherwise be rewritten.
    for site in held_back(sites, config.keep_float):
        sites.remove(site)
        size = records[site.weight].nbytes
        skipped.append(LayerDecision(site.name, site.node.op_type, site.weight, "kept float",
                                     f"--keep-float {config.keep_float}", size, size))
    return sites, skipped


def kept_weight_reason(node, value: np.ndarray) -> str | None:
    """Why every pass leaves this layer's weight as it is, judged by its values (NaN/Inf, a signal-processing
    basis), or None: select_layers asks it of each layer, and compress's plan prices no layer it names."""
    return NONFINITE if nonfinite(value) else signal_basis(node, value)


def signal_basis(node, value: np.ndarray) -> str | None:
    """Why a layer's weight stays float when it is a bank of sinusoids (algorithms/sinusoids.py: an STFT as a Conv
    of one input channel, a DFT or DCT as a MatMul or Gemm); None for a learned weight."""
    if node.op_type == "Conv":
        if value.ndim < 3 or value.shape[1] != 1 or sum(d > 1 for d in value.shape[2:]) != 1:
            return None
        filters = value.reshape(value.shape[0], -1)
    elif node.op_type in ("MatMul", "Gemm") and value.ndim == 2:
        filters = value if node.op_type == "Gemm" and attr(node, "transB", 0) else value.T
    else:
        return None
    bank = sinusoid_bank(filters)
    if bank is None:
        return None
    return (f"signal-processing basis ({bank}, a Fourier or cosine transform): rounding it leaks loud frequencies "
            "into the quiet bins, so it stays float")


def _not_constant(graph, weight: str) -> str:
    """Why a weight input is not a tensor to rewrite: named more precisely when it is a Cast/Dequantize of one."""
    producer = next((n for n in graph.node if weight in n.output), None)
    if producer is not None and producer.op_type in ("Cast", "DequantizeLinear") and producer.input:
        source = next((t for t in graph.initializer if t.name == producer.input[0]), None)
        if source is not None:
            kind = onnx.TensorProto.DataType.Name(source.data_type).lower()
            return (f"weight is {producer.op_type} of a {kind} initializer ({source.name}): only float32 initializers "
                    "are rewritten (convert the model to float32 first)")
    if _decoded_from_codebook(graph, producer):
        return "already clustered: the weight is decoded from a codebook"
    return "weight input is not a constant tensor"


INDEX_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16)  # a codebook's indices (uint16: wide entropy grids)


def _decoded_from_codebook(graph, producer) -> bool:
    """Whether `producer` decodes a codebook as the cluster pass writes it, times fp16 scales (a table's rows, a
    layer's channels) or not."""
    producers = {output: node for node in graph.node for output in node.output}
    if producer is not None and producer.op_type == "Reshape":  # outliers written over the decoded weight
        scatter = producers.get(producer.input[0])
        flat = producers.get(scatter.input[0]) if scatter is not None and scatter.op_type == "ScatterND" else None
        producer = producers.get(flat.input[0]) if flat is not None and flat.op_type == "Reshape" else None
    if producer is not None and producer.op_type == "Mul" and producer.input:
        producer = producers.get(producer.input[0])
    indices = {t.name for t in graph.initializer if t.data_type in INDEX_TYPES}
    return producer is not None and gathers_codebook(producer, producers, indices)


def gathers_codebook(node, producers: dict, indices: set) -> bool:
    """Whether a Gather decodes a codebook as the cluster pass writes it: its indices come (through Cast, and the
    Add of per-channel offsets) from a uint8/uint16 initializer in `indices`; `producers`: tensor -> node."""
    if node.op_type != "Gather" or len(node.input) < 2:
        return False
    source = producers.get(node.input[1])
    while source is not None and source.op_type in ("Add", "Cast"):
        if source.op_type == "Cast" and source.input[0] in indices:
            return True
        source = producers.get(source.input[0])
    return False


def glob_literal(name: str) -> str:
    """A glob (as --exclude takes) that matches exactly this node name."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def held_back(items: list, keep_float: str | None) -> list:
    """The first and/or last of `items` that --keep-float first/last/both leaves alone."""
    keep = []
    if keep_float in ("first", "both") and items:
        keep.append(items[0])
    if keep_float in ("last", "both") and items and items[-1] not in keep:
        keep.append(items[-1])
    return keep


class Names:
    """Fresh tensor/node names that collide with nothing in the model, in any scope."""

    SUFFIXES = ("", "_quant", "_scale", "_zero_point", "_out", "_int32", "_float", "_bias",
                "_MatMulInteger", "_Cast", "_ScaleMul", "_Mul", "_BiasAdd", "_q", "_dq", "_QuantizeLinear",
                "_DequantizeLinear", "_MatMulNBits", "_codebook", "_indices")

    def __init__(self, model):
        self.used = set()
        for graph in iter_graphs(model.graph):
            self.used.update(t.name for t in graph.initializer)
            self.used.update(v.name for v in list(graph.input) + list(graph.output))
            for node in graph.node:
                self.used.update(node.input)
                self.used.update(node.output)
                self.used.add(node.name)

    def __call__(self, base: str) -> str:
        """A base name such that base + any of SUFFIXES is unused; reserves them all."""
        name, i = base, 1
        while any(name + suffix in self.used for suffix in self.SUFFIXES):
            name, i = f"{base}_{i}", i + 1
        self.used.update(name + suffix for suffix in self.SUFFIXES)
        return name


def attr(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def ensure_opset(model, version, domain=""):
    """Raise the model's opset for `domain` to at least `version` (add the import if missing)."""
    for opset in model.opset_import:
        if opset.domain == domain or (domain == "" and opset.domain == "ai.onnx"):
            if opset.version < version:
                opset.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def default_opset(model) -> int:
    """The model's opset for the default (ai.onnx) domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def raise_opset(model, version: int, what: str, notes: list | None = None) -> str | None:
    """Let a pass write default-domain ops of opset `version` (`what` names them, for the reason): raise the model's
    opset to `version` when every op it holds means the same there (the same schema version at both opsets) and
    return None; else change nothing and return why the layer stays as it is.

    Never a version converter: that rewrites the user's own nodes (Clip's attributes becoming inputs at 11, say),
    and a node it gets wrong would be the tool's fault reported as the input's. An older opset than a written op
    needs is a reason to leave that layer alone, never an error. A raise is noted in `notes` (a report's).
    """
    current = default_opset(model)
    if current >= version:
        return None
    changed = set()
    if model.functions:
        changed.add("model-local function")
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            if _schema_version(node.op_type, current) != _schema_version(node.op_type, version):
                changed.add(node.op_type)
    if changed:
        return (f"{what} needs opset {version}; the model has opset {current}, and raising it would change the meaning "
                f"of its {', '.join(sorted(changed))} node(s)")
    ensure_opset(model, version)
    if notes is not None:
        notes.append(f"opset {current} -> {version}: {what} needs it, and every op of the model means the same there")
    return None


def _schema_version(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def initializer_owners(model):
    """Initializer name -> (graph that holds it, tensor), first definition wins (outer scope)."""
    owners = {}
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            owners.setdefault(tensor.name, (graph, tensor))
    return owners


def drop_unused_initializers(model):
    """Remove initializers no node (in any scope) or graph output reads any more."""
    used = set()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            used.update(node.input)
        used.update(o.name for o in graph.output)
    for graph in iter_graphs(model.graph):
        keep = [t for t in graph.initializer if t.name in used]
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)


SHAPE_COPY_MAX_BYTES = 1 << 20  # output_shapes' copy of the model leaves initializers this big out (dims only)


def output_shapes(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Tensor name -> dims (None where unknown) as shape inference finds them, graph inputs included.
    `input_shapes` (name -> shape) pins graph inputs, e.g. to a calibration batch's. Inference runs on a
    copy whose big initializers are graph inputs (dims only), so no weight is copied."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    existing = {i.name for i in model.graph.input}
    for value in model.graph.input:
        copy = graph.input.add()
        copy.CopyFrom(value)
        shape = (input_shapes or {}).get(value.name)
        if shape is not None and copy.type.HasField("tensor_type"):
            dims = copy.type.tensor_type.shape
            del dims.dim[:]
            for size in shape:
                dims.dim.add().dim_value = int(size)
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL or tensor_nbytes(tensor) >= SHAPE_COPY_MAX_BYTES:
            if tensor.name not in existing:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - no shapes only means unknown sizes
        return {}
    shapes = {}
    for scope in iter_graphs(inferred.graph):
        inputs = list(scope.input) if scope is inferred.graph else []  # the main graph's inputs are layer inputs too
        for value in list(scope.value_info) + list(scope.output) + inputs:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                      for d in value.type.tensor_type.shape.dim]
    return shapes
