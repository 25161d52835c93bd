"""Remove the units that pruning left dead: the model computes exactly the same, with smaller weights.

A unit (output channel) of a MatMul/Gemm/Conv layer is dead when every weight of the next layer
that reads it is zero: its value is never used. Its column of the producer's weight, its bias
entry and its BatchNormalization entries are then wasted bytes, nonzero or not. A unit whose own
weights are all zero outputs the constant act(BN(bias)), which the next layer's bias can absorb.
Both kinds are removed (passes/channel_chains.py's rewrite, so the same chains qualify: one
reader, an elementwise activation, pooling or Flatten in between). Removing units can make more
dead (fewer inputs left, an emptied row), so the pass repeats until nothing changes.

Deep Compression's pruned LeNet-300-100 keeps such neurons; at high sparsity a good share of a
layer's units can be dead (78 of the sample MLP's 256 at 92% sparsity of the layer after it).
The result is exact: a constant unit goes only where its value folds exactly into the next
layer's bias (not at a padded Conv's borders, not into a MatMul without a bias Add) or is 0.
Conv layers keep a multiple of their channel block (onnxruntime's blocked kernels, see
prune_channels) by keeping some unread channels.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxshrink.passes.channel_chains import (CONV_CHANNEL_MULTIPLE, bias_add, chain_weights, parameters, remove_channels,
                                              removed_constant, select_chains)
from onnxshrink.passes.common import attr, begin_pass, initializer_owners, output_shapes
from onnxshrink.passes.prune_common import PruneConfig
from onnxshrink.report import LayerDecision, PassReport

MAX_ROUNDS = 8


class RemoveDeadUnits:
    """Drop output channels whose outputs no one reads, or whose weights are all zero (folded as a constant)."""

    name = "remove-dead-units"

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        model, report = begin_pass(model, self.name, {})
        params_before = parameters(model)
        removed: dict[str, list] = {}  # layer -> [units removed, units before]
        for _ in range(MAX_ROUNDS):
            changed = self._round(model, removed)
            if not changed:
                break
        for name, (count, total, op_type, weight) in removed.items():
            report.layers.append(LayerDecision(name, op_type, weight, f"removed {count}/{total} dead units",
                                               "no weight reads them, or their own weights are all zero: output unchanged",
                                               0, 0))
        if removed:
            report.changed = True
            del model.graph.value_info[:]  # stale; not re-added: a checked inference is enough, and bytes count here
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
            params_after = parameters(model)
            report.notes.append(f"{sum(v[0] for v in removed.values())} dead unit(s) removed: parameters {params_before} "
                                f"-> {params_after} ({params_after / max(params_before, 1):.1%}), outputs unchanged")
        else:
            report.notes.append("no dead units")
        return model, report

    def _round(self, model, removed) -> bool:
        shapes = output_shapes(model)  # inferred on a copy without the weights, each round
        # Every layer, whatever the user's filters: removing a dead unit changes no output.
        chains, _ = select_chains(model, shapes, PruneConfig(pattern="channel"))
        changed = False
        for chain in chains:
            owners = initializer_owners(model)
            drop = _dead(model, chain, owners)
            if drop.size == 0:
                continue
            keep, _ = remove_channels(model, chain, drop, owners)
            entry = removed.setdefault(chain.name, [0, keep.size + drop.size, chain.producer.op_type, chain.producer.input[1]])
            entry[0] += drop.size
            changed = True
        return changed


def _dead(model, chain, owners) -> np.ndarray:
    """The channels of the chain's producer that can go without changing the model's output."""
    producer, consumer = chain.producer, chain.consumer
    w, out_axis, v, in_axis = chain_weights(chain, owners)
    channels = w.shape[out_axis]
    unread = ~np.any(np.moveaxis(v, in_axis, 0).reshape(channels, -1) != 0, axis=1)
    constant = ~np.any(np.moveaxis(w, out_axis, 0).reshape(channels, -1) != 0, axis=1)
    padded = consumer.op_type == "Conv" and any(attr(consumer, "pads", [0]))
    # A constant channel is exact to remove where its value can go into the next layer's bias (not at a padded
    # Conv's borders, not into a MatMul without a bias Add or a Gemm with beta 0), or where the value is 0.
    foldable = (consumer.op_type == "Conv" and not padded
                or consumer.op_type == "Gemm" and float(attr(consumer, "beta", 1.0)) != 0
                or consumer.op_type == "MatMul" and bias_add(model.graph, consumer, owners) is not None)
    constant &= foldable | (removed_constant(chain, owners, channels) == 0)
    dead = unread | constant
    if producer.op_type == "Conv":
        # Keep a multiple of the Conv block size; the dead channels kept are the ones no one reads (still exact).
        multiple = CONV_CHANNEL_MULTIPLE if channels > CONV_CHANNEL_MULTIPLE else 8
        live = channels - int(dead.sum())
        kept = min(channels, max(multiple, -(-live // multiple) * multiple))
        extra = kept - live
        order = np.flatnonzero(dead)
        dead = dead.copy()
        dead[order[:extra]] = False
    drop = np.flatnonzero(dead)
    if drop.size >= channels:
        drop = drop[1:]  # a layer keeps at least one unit
    return drop
