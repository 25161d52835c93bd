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
then refit by least squares to the original model's outputs (algorithms/reconstruct.py), in graph
order. --sparsity is the fraction of each layer's output channels removed (at least one kept); a
Conv keeps a multiple of 16 channels (8 when it has 16 or fewer), the blocks onnxruntime's CPU
Conv kernels work in: other counts measured slower than the unpruned layer.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx

from onnxshrink.algorithms.reconstruct import refit
from onnxshrink.data import Dataset
from onnxshrink.passes.channel_chains import (CONV_CHANNEL_MULTIPLE, Chain, chain_weights, initializer_array, parameters,
                                              remove_channels, select_chains)
from onnxshrink.passes.common import Site, attr, begin_pass, initializer_owners
from onnxshrink.passes.prune_common import (PruneConfig, capture, check_config, describe, matrix, read_bias, teacher_gram,
                                            write)
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import find_tensors


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
        chains, skipped = select_chains(model, shapes, config)
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
        params_before = parameters(model)
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
        params_after = parameters(model)
        report.notes.append(f"parameters {params_before} -> {params_after} ({params_after / max(params_before, 1):.1%}); "
                            "shapes re-inferred")
        return model, report

    # ---- ranking --------------------------------------------------------------------------

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

    def _prune(self, model, chain: Chain, fraction: float, feed_norm):
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
        after = initializer_array(owners, producer.input[1]).size * 4
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
            now = describe(site, owners, records, outputs)
            before_node = next(n for n in original.graph.node if n.output[0] == chain.consumer.output[0])
            original_owners = initializer_owners(original)
            then = describe(Site(original.graph, before_node, chain.consumer_name, before_node.input[1]), original_owners,
                            {r.name: r for r in find_tensors(original)}, outputs)
            if now.reason or then.reason:
                continue
            has_bias = now.bias is not None and then.bias is not None
            # A consumer that lost output channels too is compared on the channels it kept.
            gram = teacher_gram(self.calibration, original, model, now, then, has_bias, self.threads,
                                columns=kept_channels.get(chain.consumer_name))
            w0 = matrix(now, owners)
            result = refit(w0, np.ones(w0.shape, dtype=bool), gram, read_bias(now, owners), self.config.damping)
            write(now, result.weight, result.bias, owners)
            done += 1
        report.notes.append(f"reconstruction: {done} consumer layer(s) refit to the original model's outputs on "
                            f"{self.calibration.samples} calibration sample(s)")


def _bn_factor(chain: Chain, owners, channels) -> np.ndarray:
    if chain.batchnorm is None:
        return np.ones(channels)
    scale, _, _, var = (initializer_array(owners, n) for n in chain.batchnorm.input[1:5])
    return scale / np.sqrt(var + float(attr(chain.batchnorm, "epsilon", 1e-5)))
