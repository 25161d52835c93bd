"""The chains along which a layer's output channels can be removed, and the rewrite that removes them.

Channel pruning (prune_channels.py) removes the least important channels, dead-unit removal (dead_units.py) the
ones whose removal changes no output; both find the same chains and remove channels the same way, here. A chain
runs from a Conv/Gemm/MatMul (the producer) through a bias Add, BatchNormalization, an elementwise activation,
pooling or Flatten to the next weight layer (the consumer), every tensor on it read once (prune_channels.py's
docstring has the picture and the full list); `find_chain` says why a layer has none. A removed channel outputs
the constant act(BN(bias)), which `remove_channels` folds into the consumer's bias.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.passes.common import NONFINITE, attr, held_back, nonfinite
from onnxshrink.passes.prune_common import PruneConfig
from onnxshrink.report import LayerDecision
from onnxshrink.weights import find_tensors

ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Identity")
POOLS = ("MaxPool", "AveragePool")
CONV_CHANNEL_MULTIPLE = 16


@dataclass
class Chain:
    """A producer layer, the ops between it and the consumer, and how many consumer inputs each channel feeds."""

    producer: onnx.NodeProto
    name: str
    bias: str | None  # initializer holding the producer's bias (Conv B, Gemm C, the MatMul's Add)
    batchnorm: onnx.NodeProto | None
    activation: onnx.NodeProto | None
    consumer: onnx.NodeProto
    consumer_name: str
    feed: str  # the tensor the consumer reads (its channel norms rank the channels)
    per_channel: int  # consumer input rows per channel (Flatten: H*W)


def select_chains(model, shapes, config: PruneConfig) -> tuple[list[Chain], list[LayerDecision]]:
    """The provable chain of every MatMul/Gemm/Conv layer the config selects, and a "kept" decision with the
    reason for every other one. `shapes`: tensor name -> dims (None where unknown), for Flatten."""
    graph = model.graph
    records = {r.name: r for r in find_tensors(model)}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    chains, skipped = [], []
    candidates = [(i, n) for i, n in enumerate(graph.node) if n.op_type in ("Conv", "Gemm", "MatMul") and n.domain in ("", "ai.onnx")]
    for index, node in candidates:
        name = node.name or f"{node.op_type}_{index}"
        weight = node.input[1] if len(node.input) > 1 else ""
        size = records[weight].nbytes if weight in records else 0
        if node.op_type not in config.op_types:
            reason = "op type not selected (--op-types)"
        elif any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            reason = "excluded (--exclude)"
        else:
            found = find_chain(node, name, records, readers, outputs, shapes, graph)
            if isinstance(found, Chain):
                chains.append(found)
                continue
            reason = found
        skipped.append(LayerDecision(name, node.op_type, weight, "kept", reason, size, size))
    for chain in held_back(chains, config.keep_float):
        chains.remove(chain)
        size = records[chain.producer.input[1]].nbytes
        skipped.append(LayerDecision(chain.name, chain.producer.op_type, chain.producer.input[1], "kept",
                                     f"--keep-float {config.keep_float}", size, size))
    return chains, skipped


def chain_weights(chain: Chain, owners) -> tuple[np.ndarray, int, np.ndarray, int]:
    """The producer's weight and its output-channel axis, the consumer's weight and its input-channel axis."""
    producer, consumer = chain.producer, chain.consumer
    w = initializer_array(owners, producer.input[1])
    out_axis = 0 if producer.op_type == "Conv" or (producer.op_type == "Gemm" and attr(producer, "transB", 0)) else 1
    v = initializer_array(owners, consumer.input[1])
    in_axis = 1 if consumer.op_type == "Conv" or (consumer.op_type == "Gemm" and attr(consumer, "transB", 0)) else 0
    return w, out_axis, v, in_axis


def remove_channels(model, chain: Chain, drop: np.ndarray, owners) -> tuple[np.ndarray, str]:
    """Remove the producer's output channels `drop` and the consumer inputs they fed; their constant output
    act(BN(bias)) is folded into the consumer's bias. Returns the kept channels and a note on the fold."""
    producer, consumer = chain.producer, chain.consumer
    if chain.bias is None and producer.op_type in ("Conv", "Gemm") and len(producer.input) > 2 and producer.input[2]:
        chain.bias = producer.input[2]  # created when an upstream layer's removed channels were folded in
    w, out_axis, v, in_axis = chain_weights(chain, owners)
    channels = w.shape[out_axis]
    keep = np.setdiff1d(np.arange(channels), drop)
    constant = removed_constant(chain, owners, channels)[drop]
    # The producer, its bias and BatchNormalization lose the channels.
    _set(owners, producer.input[1], np.take(w, keep, axis=out_axis))
    if chain.bias:
        bias = initializer_array(owners, chain.bias)
        _set(owners, chain.bias, np.take(bias, keep, axis=bias.ndim - 1))
    if chain.batchnorm is not None:
        for name in chain.batchnorm.input[1:5]:
            _set(owners, name, initializer_array(owners, name)[keep])
    # The consumer loses the inputs those channels fed; their constant output goes into its bias.
    rows = (keep[:, None] * chain.per_channel + np.arange(chain.per_channel)[None, :]).reshape(-1)
    if consumer.op_type == "Conv":
        folded = np.einsum("c,ocij->o", constant, np.take(v, drop, axis=1))
        _set(owners, consumer.input[1], np.take(v, keep, axis=1))
    else:
        gone = (drop[:, None] * chain.per_channel + np.arange(chain.per_channel)[None, :]).reshape(-1)
        v_kn = v.T if in_axis == 1 else v
        folded = np.repeat(constant, chain.per_channel) @ v_kn[gone]
        _set(owners, consumer.input[1], np.take(v, rows, axis=in_axis))
    note = ""
    if np.any(folded != 0):
        note = _fold(model, chain, folded.astype(np.float32), owners)
    return keep, note


def removed_constant(chain: Chain, owners, channels) -> np.ndarray:
    """What each channel outputs once its weights are gone: act(BN(bias))."""
    z = np.zeros(channels)
    if chain.bias:
        beta = float(attr(chain.producer, "beta", 1.0)) if chain.producer.op_type == "Gemm" else 1.0
        z = z + initializer_array(owners, chain.bias).reshape(-1) * beta
    if chain.batchnorm is not None:
        scale, b, mean, var = (initializer_array(owners, n).astype(np.float64) for n in chain.batchnorm.input[1:5])
        z = (z - mean) / np.sqrt(var + float(attr(chain.batchnorm, "epsilon", 1e-5))) * scale + b
    act = chain.activation
    if act is None or act.op_type == "Identity":
        return z
    if act.op_type == "Relu":
        return np.maximum(z, 0)
    if act.op_type == "LeakyRelu":
        return np.where(z >= 0, z, z * float(attr(act, "alpha", 0.01)))
    if act.op_type == "Sigmoid":
        return 1 / (1 + np.exp(-z))
    if act.op_type == "Tanh":
        return np.tanh(z)
    low = initializer_array(owners, act.input[1]).item() if len(act.input) > 1 and act.input[1] else -np.inf
    high = initializer_array(owners, act.input[2]).item() if len(act.input) > 2 and act.input[2] else np.inf
    return np.clip(z, low, high)

def _fold(model, chain: Chain, folded: np.ndarray, owners) -> str:
    consumer = chain.consumer
    if consumer.op_type in ("Conv", "Gemm"):
        scale = float(attr(consumer, "beta", 1.0)) if consumer.op_type == "Gemm" else 1.0
        if scale == 0:
            return "constant of removed channels not folded (Gemm beta 0)"
        if len(consumer.input) > 2 and consumer.input[2]:
            bias = initializer_array(owners, consumer.input[2])
            if bias.size == folded.size:
                _set(owners, consumer.input[2], bias + (folded / scale).reshape(bias.shape))
            elif bias.size == 1:
                _set(owners, consumer.input[2], bias.reshape(()) + folded / scale)
            else:
                return "constant of removed channels not folded (bias shape)"
        else:
            name = f"{consumer.input[1]}_folded_bias"
            model.graph.initializer.append(numpy_helper.from_array(folded / np.float32(scale), name))
            consumer.input.append(name)
        padded = consumer.op_type == "Conv" and any(attr(consumer, "pads", [0]))
        return "constant of removed channels folded into its bias" + (" (approximate at padded borders)" if padded else "")
    add = bias_add(model.graph, consumer, owners)
    if add is None:
        return "constant of removed channels not folded (no bias Add)"
    _set(owners, add, initializer_array(owners, add) + folded.reshape(initializer_array(owners, add).shape))
    return "constant of removed channels folded into its bias"


def find_chain(node, name, records, readers, outputs, shapes, graph):
    """The provable chain from a layer's output to the next weight layer, or the reason there is none."""
    weight = node.input[1] if len(node.input) > 1 else ""
    owned = [weight]
    record = records.get(weight)
    if record is None or record.is_graph_input:
        return "weight input is not a constant tensor"
    if record.dtype != "float":
        return f"weight is {record.dtype}: only float32 weights are pruned"
    conv = node.op_type == "Conv"
    if conv and (attr(node, "group", 1) != 1 or len(record.shape) != 4):
        return "only 2-D, group 1 Conv layers lose channels"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA=1"
    if node.op_type == "MatMul" and len(record.shape) != 2:
        return "MatMul weight is not 2-D"
    if node.input[0] in records:
        return f"both {node.op_type} operands are constant"

    def single(tensor):
        users = readers.get(tensor, [])
        if tensor in outputs:
            return None, "its output is a graph output"
        if len(users) != 1:
            return None, f"its output {tensor!r} is read by {len(users)} nodes"
        return users[0], ""

    bias = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] else None
    tensor = node.output[0]
    nxt, why = single(tensor)
    if nxt is None:
        return why
    if node.op_type == "MatMul" and nxt.op_type == "Add":
        other = [i for i in nxt.input if i != tensor]
        if len(other) == 1 and other[0] in records:
            bias, tensor = other[0], nxt.output[0]
            nxt, why = single(tensor)
            if nxt is None:
                return why
    if bias:
        owned.append(bias)
    batchnorm = activation = None
    if nxt.op_type == "BatchNormalization" and node.op_type != "MatMul" and all(i in records for i in nxt.input[1:5]):
        batchnorm, tensor = nxt, nxt.output[0]
        owned += list(nxt.input[1:5])
        nxt, why = single(tensor)
        if nxt is None:
            return why
    if nxt.op_type in ACTIVATIONS and all(not i or i in records for i in nxt.input[1:]):
        activation, tensor = nxt, nxt.output[0]
        nxt, why = single(tensor)
        if nxt is None:
            return why
    if conv and nxt.op_type in POOLS:
        tensor = nxt.output[0]
        nxt, why = single(tensor)
        if nxt is None:
            return why
    per_channel, feed = 1, tensor
    if conv and nxt.op_type == "Flatten" and attr(nxt, "axis", 1) == 1:
        dims = shapes.get(tensor)
        if not dims or len(dims) < 3 or any(d is None for d in dims[2:]):
            return "Flatten of a tensor whose spatial size is not static"
        per_channel = int(np.prod(dims[2:]))
        tensor = nxt.output[0]
        nxt, why = single(tensor)
        if nxt is None:
            return why
        if nxt.op_type not in ("MatMul", "Gemm"):
            return f"Flatten feeds {nxt.op_type}"
    elif conv and nxt.op_type != "Conv":
        return f"its output reaches {nxt.op_type} ({nxt.name or 'unnamed'}): the channels cannot be followed there"
    if nxt.op_type not in ("Conv", "MatMul", "Gemm") or nxt.input[0] != tensor:
        return f"its output reaches {nxt.op_type} ({nxt.name or 'unnamed'}): the channels cannot be followed there"
    if not conv and nxt.op_type == "Conv":
        return "a MatMul/Gemm output feeding a Conv"
    next_weight = nxt.input[1] if len(nxt.input) > 1 else ""
    next_record = records.get(next_weight)
    if next_record is None or next_record.dtype != "float" or next_record.is_graph_input:
        return f"the next layer {nxt.name or nxt.op_type} has no constant float weight"
    if nxt.op_type == "Conv" and attr(nxt, "group", 1) != 1:
        return "the next Conv is grouped"
    if nxt.op_type == "Gemm" and attr(nxt, "transA", 0):
        return "the next Gemm has transA=1"
    if nxt.op_type == "MatMul" and len(next_record.shape) != 2:
        return "the next MatMul weight is not 2-D"
    owned.append(next_weight)
    for tensor_name in owned:
        shared = records.get(tensor_name)
        if shared is None or len(shared.consumers) != 1 or shared.is_graph_input:
            return f"{tensor_name!r} is shared with other nodes or not a constant"
    # Both weights lose channels (rows of the next one): one holding NaN/Inf stays as it is, as in every command.
    inits = {t.name: t for t in graph.initializer}
    if weight in inits and nonfinite(numpy_helper.to_array(inits[weight])):
        return NONFINITE
    if next_weight in inits and nonfinite(numpy_helper.to_array(inits[next_weight])):
        return f"the next layer's weight {next_weight!r}: {NONFINITE}"
    index = list(graph.node).index(nxt)
    return Chain(node, name, bias, batchnorm, activation, nxt, nxt.name or f"{nxt.op_type}_{index}", feed, per_channel)


def bias_add(graph, node, owners) -> str | None:
    """The constant that a MatMul's only reader, an Add, adds to its output (its bias), or None."""
    readers = [n for n in graph.node if node.output[0] in n.input]
    if len(readers) == 1 and readers[0].op_type == "Add":
        other = [i for i in readers[0].input if i != node.output[0]]
        if len(other) == 1 and other[0] in owners:
            return other[0]
    return None


def initializer_array(owners, name) -> np.ndarray:
    return numpy_helper.to_array(owners[name][1])


def _set(owners, name, value) -> None:
    tensor = owners[name][1]
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))


def parameters(model) -> int:
    """How many values the main graph's initializers hold."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
