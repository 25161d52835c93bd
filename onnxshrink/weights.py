"""Which tensors are compressible weights, and why the others are not.

Every constant tensor is found wherever it lives: graph initializers, `Constant`
nodes, and initializers or Constants inside `If`/`Loop`/`Scan` bodies. Each one is
recorded with the nodes that consume it (in any scope) and as which input, and is
classified once, so `inspect` and every pass agree on what may be compressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

TINY_BYTES = 1024

# op type -> {input index: role}. Roles other than "weight" say why a tensor is kept.
INPUT_ROLES: dict[str, dict[int, str]] = {
    "MatMul": {0: "weight", 1: "weight"},
    "Gemm": {0: "weight", 1: "weight", 2: "bias"},
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gather": {0: "weight", 1: "index"},
    "LSTM": {1: "weight", 2: "weight", 3: "bias", 4: "shape", 5: "state", 6: "state", 7: "weight"},
    "GRU": {1: "weight", 2: "weight", 3: "bias", 4: "shape", 5: "state"},
    "RNN": {1: "weight", 2: "weight", 3: "bias", 4: "shape", 5: "state"},
    "Einsum": {0: "weight", 1: "weight"},
    "DequantizeLinear": {0: "quantized", 1: "scale", 2: "zero_point"},
    "QuantizeLinear": {1: "scale", 2: "zero_point"},
    "MatMulInteger": {0: "quantized", 1: "quantized", 2: "zero_point", 3: "zero_point"},
    "ConvInteger": {0: "quantized", 1: "quantized", 2: "zero_point", 3: "zero_point"},
    "QLinearMatMul": {3: "quantized", 1: "scale", 2: "zero_point", 4: "scale", 5: "zero_point", 6: "scale", 7: "zero_point"},
    "QLinearConv": {3: "quantized", 1: "scale", 2: "zero_point", 4: "scale", 5: "zero_point", 6: "scale", 7: "zero_point", 8: "bias"},
    "MatMulNBits": {1: "quantized", 2: "scale", 3: "zero_point", 4: "index", 5: "bias"},
    "BatchNormalization": {1: "norm", 2: "norm", 3: "norm", 4: "norm"},
    "LayerNormalization": {1: "norm", 2: "norm"},
    "InstanceNormalization": {1: "norm", 2: "norm"},
    "Reshape": {1: "shape"},
    "Expand": {1: "shape"},
    "Tile": {1: "shape"},
    "Slice": {1: "shape", 2: "shape", 3: "shape", 4: "shape"},
    "Pad": {1: "shape", 2: "shape", 3: "shape"},
    "Resize": {1: "shape", 2: "shape", 3: "shape"},
    "Unsqueeze": {1: "shape"},
    "Squeeze": {1: "shape"},
    "ReduceMean": {1: "shape"},
    "ReduceSum": {1: "shape"},
    "Split": {1: "shape"},
    "TopK": {1: "shape"},
    "ConstantOfShape": {0: "shape"},
    "Range": {0: "shape", 1: "shape", 2: "shape"},
}

QUANTIZED_DTYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
}
FLOAT_DTYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


@dataclass
class Consumer:
    node: str  # node name, prefixed with its subgraph path ("If_0/then_branch/fc")
    op_type: str
    input_index: int
    role: str  # weight, bias, scale, index, shape, ... or "other"


@dataclass
class TensorRecord:
    name: str
    shape: list[int]
    dtype: str
    nbytes: int
    location: str  # "initializer", "constant" or "subgraph:<path>"
    consumers: list[Consumer] = field(default_factory=list)
    is_graph_input: bool = False
    compressible: bool = False
    reason: str = ""
    tied: bool = False  # read as a weight by more than one node; a field so --json shows it


def dtype_name(elem_type: int) -> str:
    try:
        return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except Exception:
        return f"type{elem_type}"


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        itemsize = 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    return (count * bits + 7) // 8 if bits else count * itemsize


def find_tensors(model: onnx.ModelProto) -> list[TensorRecord]:
    """All constant tensors of the model with their consumers, classified."""
    records: list[TensorRecord] = []
    graph_inputs = {i.name for i in model.graph.input}
    _walk(model.graph, "", {}, records, graph_inputs)
    for record in records:
        record.compressible, record.reason = _classify(record)
        record.tied = sum(1 for c in record.consumers if c.role == "weight") > 1
    return records


def _walk(graph, path, visible, records, graph_inputs):
    scope = dict(visible)
    location = "initializer" if not path else f"subgraph:{path}"
    for tensor in graph.initializer:
        record = _record(tensor, tensor.name, location)
        record.is_graph_input = not path and tensor.name in graph_inputs
        records.append(record)
        scope[tensor.name] = record
    for index, node in enumerate(graph.node):
        node_name = f"{path}/{node.name or f'{node.op_type}_{index}'}" if path else (node.name or f"{node.op_type}_{index}")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            if value is not None and node.output:
                record = _record(value, node.output[0], "constant" if not path else f"subgraph:{path}")
                records.append(record)
                scope[node.output[0]] = record
            continue
        roles = INPUT_ROLES.get(node.op_type, {}) if node.domain in ("", "ai.onnx", "com.microsoft") else {}
        for i, name in enumerate(node.input):
            if name in scope:
                scope[name].consumers.append(Consumer(node_name, node.op_type, i, roles.get(i, "other")))
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                _walk(sub, f"{node_name}/{attr.name}", scope, records, graph_inputs)
        # Outer-scope tensors read implicitly by a subgraph count as consumed by it too.


def _record(tensor: onnx.TensorProto, name: str, location: str) -> TensorRecord:
    return TensorRecord(
        name=name,
        shape=[int(d) for d in tensor.dims],
        dtype=dtype_name(tensor.data_type),
        nbytes=tensor_nbytes(tensor),
        location=location,
    )


def _classify(record: TensorRecord) -> tuple[bool, str]:
    roles = {c.role for c in record.consumers}
    dtype = record.dtype
    if not record.consumers:
        return False, "unused"
    if dtype in ("int8", "uint8", "int4", "uint4") and ("quantized" in roles or "weight" in roles):
        return False, "already quantized"
    if dtype not in ("float", "float16", "bfloat16", "double"):
        if roles & {"index", "shape"}:
            return False, "shape/index tensor"
        return False, f"not float ({dtype})"
    if roles & {"scale", "zero_point"}:
        return False, "quantization scale"
    if "weight" not in roles:
        named = sorted(roles - {"other"})
        ops = ", ".join(sorted({c.op_type for c in record.consumers}))
        return False, f"{named[0]} tensor" if named else f"not a weight input (feeds {ops})"
    if roles - {"weight"} - {"other"}:
        return False, "used as weight and as " + ",".join(sorted(roles - {"weight", "other"}))
    if record.nbytes < TINY_BYTES:
        return False, "tiny (< 1 KiB)"
    if "other" in roles:
        return True, "weight (also read by other ops)"
    return True, "weight"
