"""`inspect`: what a model is made of, and which of its tensors are worth compressing."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink import model as model_io
from onnxshrink.passes.common import signal_basis
from onnxshrink.report import ModelInfo, TensorIO
from onnxshrink.weights import dtype_name, find_tensors


def inspect_model(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> ModelInfo:
    """Describe a model file: signature, opsets, op histogram, every constant tensor classified."""
    model = model if model is not None else model_io.load(path, with_data=False)  # shapes and types suffice
    histogram = Counter()
    for graph in model_io.iter_graphs(model.graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            histogram[key] += 1
    tensors = find_tensors(model)
    _mark_signal_bases(model, tensors)
    weights = [t for t in tensors if t.compressible]
    totals = {
        "tensors": len(tensors),
        "tensor_bytes": sum(t.nbytes for t in tensors),
        "weights": len(weights),
        "weight_bytes": sum(t.nbytes for t in weights),
        "parameters": sum(_count(t.shape) for t in tensors),
        "in_constant_nodes": sum(1 for t in tensors if t.location == "constant"),
        "in_subgraphs": sum(1 for t in tensors if t.location.startswith("subgraph")),
        "tied_weights": sum(1 for t in weights if t.tied),
        "denormal_weights": _denormals(model),
    }
    initializers = {t.name for t in model.graph.initializer}
    return ModelInfo(
        path=str(path),
        file_bytes=model_io.file_size(path),
        ir_version=model.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=[_io(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_io(v) for v in model.graph.output],
        op_histogram=dict(histogram.most_common()),
        node_count=sum(histogram.values()),
        tensors=tensors,
        totals=totals,
        metadata={p.key: p.value for p in model.metadata_props},
    )


FLOAT_BITS = {  # element bits, magnitude mask, bits of the smallest normal number
    onnx.TensorProto.FLOAT: (np.dtype("<u4"), np.uint32(0x7FFFFFFF), 0x00800000),
}


def _denormals(model: onnx.ModelProto) -> int | None:
    """Nonzero fp32 weights below the smallest normal float (1.2e-38): CPUs compute with them many times slower
    (PP-OCRv6's detector has 10% of them; zeroing them ran it 3x faster). None when the weights are external
    (inspect does not read them)."""
    count = 0
    for graph in model_io.iter_graphs(model.graph):
        for tensor in graph.initializer:
            layout = FLOAT_BITS.get(tensor.data_type)
            if layout is None:
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            if tensor.HasField("raw_data"):  # exponent bits all zero, mantissa not: a denormal
                dtype, magnitude, smallest_normal = layout
                bits = np.frombuffer(tensor.raw_data, dtype=dtype) & magnitude
                count += int(np.count_nonzero((bits > 0) & (bits < smallest_normal)))
    return count


def _mark_signal_bases(model: onnx.ModelProto, tensors: list) -> None:
    """Weights every pass keeps as they are because they are a signal-processing basis (passes/common.signal_basis)
    are not "worth compressing": inspect says so as the passes will. Weights held in external data are not read."""
    records = {t.name: t for t in tensors if t.compressible}
    for graph in model_io.iter_graphs(model.graph):
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
                continue
            record, tensor = records.get(node.input[1]), inits.get(node.input[1])
            if record is None or tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            reason = signal_basis(node, numpy_helper.to_array(tensor))
            if reason:
                record.compressible, record.reason = False, reason.split(":")[0]


def _io(value: onnx.ValueInfoProto) -> TensorIO:
    tensor_type = value.type.tensor_type
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return TensorIO(value.name, dtype_name(tensor_type.elem_type), shape if tensor_type.HasField("shape") else None)


def _count(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total
