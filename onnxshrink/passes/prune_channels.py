"""Channel pruning: remove whole output channels of Conv/Gemm/MatMul and the inputs that read them.

Before:                                                After (channels c removed):
    X ──► Conv(W [C, ...], b [C]) ──► [BatchNorm(C)]       X ──► Conv(W[keep], b[keep]) ──► [BatchNorm(keep)]
        ──► act ──► [MaxPool/AveragePool] ──► [Flatten]        ──► act ──► [pool] ──► [Flatten]
        ──► Conv/MatMul/Gemm(V: C inputs)                      ──► Conv/MatMul/Gemm(V[:, keep], bias + folded)

The model really has fewer parameters and runs faster. A channel is removed only where the
chain from the layer to the next weight layer is provable: every tensor on it has one reader
and is not a graph output, the ops are [Add of a constant bias (MatMul)] -> [BatchNormalization]
-> [one elementwise activation: Relu, LeakyRelu, Sigmoid, Tanh, Clip, Identity] -> [MaxPool /
AveragePool (Conv)] -> [Flatten axis 1 of a static shape (Conv into MatMul/Gemm)] -> a Conv
(group 1), MatMul or Gemm (transA 0) reading it as its data input. Anything else (a residual
Add, Concat, Reshape, a graph output, a second reader) keeps the layer whole, with the reason.

A removed channel's output is the constant act(BN(bias)); its effect on the next layer is
folded into that layer's bias (exact for MatMul/Gemm and unpadded Conv; at padded borders of a
Conv the constant is approximated). Channels are ranked by ||a_c|| * ||V_c||: a_c the channel
as the next layer reads it (calibration data) or, without data, its weight norm scaled by
BatchNorm, V_c the next layer's weights reading it. With calibration data the next layers are
then refit by least squares to the original model's outputs (passes/reconstruct.py), in graph
order. --sparsity is the fraction of each layer's output channels removed (at least one kept); a
Conv keeps a multiple of 16 channels (8 when it has 16 or fewer), the blocks onnxruntime's CPU
Conv kernels work in: other counts measured slower than the unpruned layer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.data import Dataset
from onnxshrink.passes.common import NONFINITE, Site, attr, begin_pass, held_back, initializer_owners, nonfinite
from onnxshrink.passes.prune import PruneConfig, _describe, _matrix, _read_bias, _write, capture, check_config, teacher_gram
from onnxshrink.passes.reconstruct import refit
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import find_tensors

ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Identity")
POOLS = ("MaxPool", "AveragePool")
CONV_CHANNEL_MULTIPLE = 16


@dataclass
class _Chain:
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


class PruneChannels:
    """Remove the least important output channels of Conv/Gemm/MatMul layers whose consumers can follow."""

    name = "prune-channels"

    def __init__(self, config: PruneConfig | None = None, calibration: Dataset | None = None, threads: int = 1):
        self.config = config = config or PruneConfig(pattern="channel")
        check_config(config, calibration)
        self.calibration = calibration
        self.threads = threads

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        config = self.config
        model, report = begin_pass(model, self.name, asdict(config))
        original = onnx.ModelProto()
        original.CopyFrom(model)
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        chains, skipped = self._select(model, shapes)
        report.layers.extend(skipped)
        names = {c.name for c in chains} | {d.node for d in skipped}
        unknown = sorted(set(config.layer_sparsity) - names)
        if unknown:
            from onnxshrink.errors import UsageError

            raise UsageError(f"--layer-sparsity names no layer of the model: {', '.join(unknown)}")
        if not chains:
            report.notes.append("no layer whose output channels can be removed")
            return model, report
        norms = self._feed_norms(model, chains) if self.calibration is not None else {}
        params_before = _parameters(model)
        kept_channels, consumers = {}, []
        for chain in chains:
            fraction = config.layer_sparsity.get(chain.name, config.sparsity)
            decision, keep = self._prune(model, chain, fraction, norms.get(chain.feed))
            report.layers.append(decision)
            if keep is not None:
                kept_channels[chain.name] = keep
                consumers.append(chain)
                report.changed = True
        if report.changed and self.calibration is not None and config.reconstruct:
            self._refit(original, model, consumers, kept_channels, report)
        del model.graph.value_info[:]
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        params_after = _parameters(model)
        report.notes.append(f"parameters {params_before} -> {params_after} ({params_after / max(params_before, 1):.1%}); "
                            "shapes re-inferred")
        return model, report

    # ---- selection ------------------------------------------------------------------------

    def _select(self, model, shapes):
        config = self.config
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
                found = _chain(node, name, records, readers, outputs, shapes, graph)
                if isinstance(found, _Chain):
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

    def _feed_norms(self, model, chains) -> dict[str, np.ndarray]:
        """||a_c|| of every consumer's input channel on the calibration data (original model)."""
        sums: dict[str, np.ndarray] = {}
        for batch, values in capture(self.calibration, model, [c.feed for c in chains], self.threads):
            for chain in chains:
                a = np.asarray(values.get(chain.feed, batch.get(chain.feed)), dtype=np.float64)
                axis = 1 if chain.producer.op_type == "Conv" else a.ndim - 1
                energy = np.sum(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1) ** 2, axis=1)
                sums[chain.feed] = sums.get(chain.feed, 0) + energy
        return {name: np.sqrt(value) for name, value in sums.items()}

    # ---- rewriting -------------------------------------------------------------------------

    def _prune(self, model, chain: _Chain, fraction: float, feed_norm):
        owners = initializer_owners(model)
        producer = chain.producer
        w, out_axis, v, in_axis = chain_weights(chain, owners)
        channels = w.shape[out_axis]
        v_rows = np.moveaxis(v, in_axis, 0).reshape(channels, -1)  # consumer weights read by each channel
        if feed_norm is not None:
            score = feed_norm * np.linalg.norm(v_rows, axis=1)
        else:
            score = np.linalg.norm(np.moveaxis(w, out_axis, 0).reshape(channels, -1), axis=1)
            score = score * np.abs(_bn_factor(chain, owners, channels)) * np.linalg.norm(v_rows, axis=1)
        remove = min(int(round(fraction * channels)), channels - 1)
        rounded = ""
        if producer.op_type == "Conv" and remove > 0:
            # onnxruntime's CPU NCHWc Conv kernels work in blocks of 8/16 channels: 12 or 24 channels ran 6-37%
            # slower than 16 or 32 (AVX-512, bench/prune_curves.py), so the kept count is rounded up.
            multiple = CONV_CHANNEL_MULTIPLE if channels > CONV_CHANNEL_MULTIPLE else 8
            kept = min(channels, -(-(channels - remove) // multiple) * multiple)
            if channels - kept != remove:
                rounded = f"kept channels rounded up to a multiple of {multiple} (onnxruntime's Conv blocks)"
                remove = channels - kept
        size = w.size * 4
        if remove <= 0:
            return LayerDecision(chain.name, producer.op_type, producer.input[1], "kept",
                                 rounded or "nothing to remove at this sparsity", size, size), None
        drop = np.sort(np.argsort(score, kind="stable")[:remove])
        keep, note = remove_channels(model, chain, drop, owners)
        after = _array(owners, producer.input[1]).size * 4
        reason = "; ".join(filter(None, [f"feeds {chain.consumer_name}", note, rounded]))
        return LayerDecision(chain.name, producer.op_type, producer.input[1], f"removed {remove}/{channels} channels",
                             reason, size, after), keep

    def _refit(self, original, model, chains, kept_channels, report):
        """Refit each consumer (graph order) to the original model's outputs, its kept columns only."""
        order = {node.output[0]: i for i, node in enumerate(model.graph.node)}
        done = 0
        for chain in sorted(chains, key=lambda c: order[c.consumer.output[0]]):
            owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
            outputs = {n for node in model.graph.node for n in node.output}
            site = Site(model.graph, chain.consumer, chain.consumer_name, chain.consumer.input[1])
            now = _describe(site, owners, records, outputs)
            before_node = next(n for n in original.graph.node if n.output[0] == chain.consumer.output[0])
            original_owners = initializer_owners(original)
            then = _describe(Site(original.graph, before_node, chain.consumer_name, before_node.input[1]), original_owners,
                             {r.name: r for r in find_tensors(original)}, outputs)
            if now.reason or then.reason:
                continue
            has_bias = now.bias is not None and then.bias is not None
            # A consumer that lost output channels too is compared on the channels it kept.
            gram = teacher_gram(self.calibration, original, model, now, then, has_bias, self.threads,
                                columns=kept_channels.get(chain.consumer_name))
            w0 = _matrix(now, owners)
            result = refit(w0, np.ones(w0.shape, dtype=bool), gram, _read_bias(now, owners), self.config.damping)
            _write(now, result.weight, result.bias, owners)
            done += 1
        report.notes.append(f"reconstruction: {done} consumer layer(s) refit to the original model's outputs on "
                            f"{self.calibration.samples} calibration sample(s)")


def chain_weights(chain: _Chain, owners) -> tuple[np.ndarray, int, np.ndarray, int]:
    """The producer's weight and its output-channel axis, the consumer's weight and its input-channel axis."""
    producer, consumer = chain.producer, chain.consumer
    w = _array(owners, producer.input[1])
    out_axis = 0 if producer.op_type == "Conv" or (producer.op_type == "Gemm" and attr(producer, "transB", 0)) else 1
    v = _array(owners, consumer.input[1])
    in_axis = 1 if consumer.op_type == "Conv" or (consumer.op_type == "Gemm" and attr(consumer, "transB", 0)) else 0
    return w, out_axis, v, in_axis


def remove_channels(model, chain: _Chain, drop: np.ndarray, owners) -> tuple[np.ndarray, str]:
    """Remove the producer's output channels `drop` and the consumer inputs they fed; their constant output
    act(BN(bias)) is folded into the consumer's bias. Returns the kept channels and a note on the fold."""
    producer, consumer = chain.producer, chain.consumer
    if chain.bias is None and producer.op_type in ("Conv", "Gemm") and len(producer.input) > 2 and producer.input[2]:
        chain.bias = producer.input[2]  # created when an upstream layer's removed channels were folded in
    w, out_axis, v, in_axis = chain_weights(chain, owners)
    channels = w.shape[out_axis]
    keep = np.setdiff1d(np.arange(channels), drop)
    constant = _removed_constant(chain, owners, channels)[drop]
    # The producer, its bias and BatchNormalization lose the channels.
    _set(owners, producer.input[1], np.take(w, keep, axis=out_axis))
    if chain.bias:
        bias = _array(owners, chain.bias)
        _set(owners, chain.bias, np.take(bias, keep, axis=bias.ndim - 1))
    if chain.batchnorm is not None:
        for name in chain.batchnorm.input[1:5]:
            _set(owners, name, _array(owners, name)[keep])
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


def _removed_constant(chain: _Chain, owners, channels) -> np.ndarray:
    """What each channel outputs once its weights are gone: act(BN(bias))."""
    z = np.zeros(channels)
    if chain.bias:
        z = z + _array(owners, chain.bias).reshape(-1) * (float(attr(chain.producer, "beta", 1.0)) if chain.producer.op_type == "Gemm" else 1.0)
    if chain.batchnorm is not None:
        scale, b, mean, var = (_array(owners, n).astype(np.float64) for n in chain.batchnorm.input[1:5])
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
    low = _array(owners, act.input[1]).item() if len(act.input) > 1 and act.input[1] else -np.inf
    high = _array(owners, act.input[2]).item() if len(act.input) > 2 and act.input[2] else np.inf
    return np.clip(z, low, high)

def _fold(model, chain: _Chain, folded: np.ndarray, owners) -> str:
    consumer = chain.consumer
    if consumer.op_type in ("Conv", "Gemm"):
        scale = float(attr(consumer, "beta", 1.0)) if consumer.op_type == "Gemm" else 1.0
        if scale == 0:
            return "constant of removed channels not folded (Gemm beta 0)"
        if len(consumer.input) > 2 and consumer.input[2]:
            bias = _array(owners, consumer.input[2])
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
    add = _bias_add(model.graph, consumer, owners)
    if add is None:
        return "constant of removed channels not folded (no bias Add)"
    _set(owners, add, _array(owners, add) + folded.reshape(_array(owners, add).shape))
    return "constant of removed channels folded into its bias"


def _chain(node, name, records, readers, outputs, shapes, graph):
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
    return _Chain(node, name, bias, batchnorm, activation, nxt, nxt.name or f"{nxt.op_type}_{index}", feed, per_channel)


def _bn_factor(chain: _Chain, owners, channels) -> np.ndarray:
    if chain.batchnorm is None:
        return np.ones(channels)
    scale, _, _, var = (_array(owners, n) for n in chain.batchnorm.input[1:5])
    return scale / np.sqrt(var + float(attr(chain.batchnorm, "epsilon", 1e-5)))


def _bias_add(graph, node, owners) -> str | None:
    readers = [n for n in graph.node if node.output[0] in n.input]
    if len(readers) == 1 and readers[0].op_type == "Add":
        other = [i for i in readers[0].input if i != node.output[0]]
        if len(other) == 1 and other[0] in owners:
            return other[0]
    return None


def _array(owners, name) -> np.ndarray:
    return numpy_helper.to_array(owners[name][1])


def _set(owners, name, value) -> None:
    tensor = owners[name][1]
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))


def _parameters(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)

