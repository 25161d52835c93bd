"""Accuracy-aware fallback: keep the layers whose quantization hurts most float, one at a time, until a budget holds.

As NNCF's `quantize_with_accuracy_control` and Intel Neural Compressor's accuracy-aware tuning do: quantize every
layer, judge the result on held-out samples (never on the samples that calibrated it), and while the budget
(`--min-cosine`, `--max-drift`, `--min-agreement`, `--max-accuracy-drop`) fails:

1. rank the quantized layers by measured sensitivity: each one alone restored to float, and the held-out drift
   that leaves (least drift first);
2. restore them in that order, one more per step, judging each result on the held-out samples again.

"Restored" in a QDQ graph (static mode) means in place, one onnxruntime run per measurement: the layer reads its
activation unquantized and its weight as float (restore_float), and the quantized tensor goes for its other
readers too (a residual Add; release_activations) unless a layer still quantized reads it. Layers reading one
quantized tensor (query, key, value) are one unit. Other forms (dynamic, MatMulNBits) are restored by running
the pass again with the layer in its `exclude` (as `--exclude` does), so the loop works with whatever a mode
writes. Bounded: at most `max_layers` layers move (default a quarter of the candidates, at least one unit), and
it stops when no remaining unit lowers the drift alone. Drift is ||y - y0|| / ||y0||, averaged over the float
outputs (as `onnxshrink sensitivity` measures it).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink import data as data_mod
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.passes.common import drop_unused_initializers, glob_literal
from onnxshrink.runtime import make_session, run_batches
from onnxshrink.validate import (Thresholds, _checks, attention_mask, compare_outputs, masks_output, non_score_outputs,
                                 state_outputs, task_accuracy)

DEFAULT_MIN_COSINE = 0.99  # static mode's budget with calibration data and no explicit one (issue 16)
MIN_GAIN = 1e-6  # a restored layer must lower the drift by more than this to be worth moving
WEIGHT_MATCH = 0.05  # int8 rounding of a weight stays far below this; a rescaled (smoothed) weight does not
# A smoothed weight's int8 rounding can be coarse (outlier rows set the channel's scale); a wrong scale is off by ~1.
SCALED_MATCH = 0.5


@dataclass
class FallbackConfig:
    max_layers: int | None = None  # cap on layers moved to float; None: a quarter of the candidates (at least one group)


@dataclass
class FallbackSummary:
    """What the loop did, for the command's report."""

    budget: dict  # the thresholds it aimed at
    data: str  # the samples it judged on
    met: bool = False
    drift_before: float | None = None  # every layer quantized
    drift_after: float | None = None  # the model returned
    layers: list = field(default_factory=list)  # {"node", "drift_alone", "gain", "with"} in the order moved
    ranked: int = 0  # candidate layers measured
    cap: int = 0
    stopped: str = ""  # why the loop ended
    attempts: int = 0  # pass runs (in place restores run none)


def budget_of(thresholds: Thresholds | None) -> Thresholds | None:
    """The accuracy part of validation thresholds (latency is not a fallback's business); None when none is set."""
    if thresholds is None:
        return None
    budget = Thresholds(thresholds.max_drift, thresholds.min_cosine, thresholds.min_agreement, thresholds.max_accuracy_drop)
    return budget if any(v is not None for v in dataclasses.asdict(budget).values()) else None


def evaluation_data(model: onnx.ModelProto, validation, calibration) -> tuple[data_mod.Dataset, str] | None:
    """The samples the loop judges on, as validation will: --data (with labels), else the held-out part of the
    calibration file; None when there are none (the calibrating samples and synthetic inputs never judge)."""
    specs = data_mod.input_specs(model)
    if validation is not None and validation.data:
        dataset = data_mod.load_npz(validation.data, specs, validation.labels, validation.samples, role="evaluation data")
        return dataset, str(validation.data)
    if calibration is None:
        return None
    split = data_mod.split_holdout(data_mod.load_npz(calibration, specs, role="calibration data"), specs)
    if split is None:
        return None
    _, held, rows = split
    if validation is not None and validation.samples and validation.samples < held.samples:
        held = data_mod.take_samples(held, specs, 0, validation.samples)
        rows = range(rows.start, rows.start + validation.samples)
    return held, f"held-out calibration samples {rows.start}..{rows.stop - 1} of {calibration}"


class AccuracyFallback:
    """A quantize pass wrapped in the fallback loop; called like the pass, returns the best (model, PassReport).

    `make_pass(extra)` builds the pass with the node-name globs in `extra` added to its exclude list."""

    def __init__(self, make_pass, budget: Thresholds, dataset: data_mod.Dataset, origin: str,
                 config: FallbackConfig | None = None, threads: int = 1):
        self.make_pass = make_pass
        self.budget = budget
        self.dataset = dataset
        self.config = config or FallbackConfig()
        self.threads = threads
        self.summary = FallbackSummary({k: v for k, v in dataclasses.asdict(budget).items() if v is not None}, origin)

    def __call__(self, model: onnx.ModelProto):
        original = _copy(model)
        self._original = original
        self._weights = {t.name: t for t in original.graph.initializer}
        self._reference = run_batches(make_session(original, self.threads), self.dataset.batches)
        # Judged as validate judges: padded positions of token outputs count nowhere (validate.attention_mask).
        found = attention_mask(data_mod.input_specs(original), self.dataset.batches, self.dataset.batch_axes)
        self._mask = None if found is None else found[1]
        # Top-1 agreement where validate counts it: not on a recurrent state, a hidden state or a detector's rows.
        self._not_scores = non_score_outputs(original.graph, {n: a.ndim for n, a in self._reference.items()}) | state_outputs(
            self._reference, self.dataset.batches[0] if self.dataset.batches else {}, self.dataset.batch_axes)
        summary = self.summary
        base = self._attempt(original, [])
        self._base_layers = base.report.layers
        summary.drift_before = summary.drift_after = base.drift
        if base.passed or not base.report.changed:
            summary.met, summary.stopped = base.passed, "budget held with every layer quantized" if base.passed else "nothing quantized"
            return self._finish(base, {})
        ranking, in_place = self._rank(original, base)
        summary.ranked = sum(len(group) for group, _ in ranking)
        # Default: a quarter of the quantized layers, and at least the most sensitive group.
        first = len(ranking[0][0]) if ranking else 1
        summary.cap = self.config.max_layers if self.config.max_layers is not None else max(first, summary.ranked // 4)
        best, moved, alone = base, [], {}
        for group, drift in ranking:
            if len(moved) >= summary.cap:
                summary.stopped = f"cap reached ({summary.cap} layer(s), --max-fallback)"
                break
            if len(moved) + len(group) > summary.cap:  # a group that does not fit: the next one may
                summary.stopped = f"cap reached ({summary.cap} layer(s), --max-fallback)"
                continue
            if base.drift - drift <= MIN_GAIN:
                summary.stopped = "no remaining layer lowers the drift when restored alone"
                break
            moved.extend(group)
            alone.update({node: (drift, group) for node in group})
            current = self._restored(base, moved) if in_place else self._attempt(original, moved)
            if current.passed or current.drift < best.drift:
                best = current
            if current.passed:
                break
        else:
            summary.stopped = summary.stopped or "every ranked layer tried"
        if summary.stopped.startswith("cap reached") and not moved:
            summary.stopped += ": the most sensitive layers read a shared quantized input and go together"
        summary.met = best.passed
        if best.passed:
            summary.stopped = f"budget held after {len(best.moved)} layer(s) kept float"
        summary.drift_after = best.drift
        summary.layers = [{"node": n, "drift_alone": alone[n][0], "gain": base.drift - alone[n][0], "with": alone[n][1]}
                          for n in best.moved]
        return self._finish(best, alone)

    # ---- steps ------------------------------------------------------------------------------------

    def _attempt(self, original, moved: list) -> _Attempt:
        """The pass run again with `moved` excluded, judged."""
        self.summary.attempts += 1
        transform = self.make_pass(tuple(glob_literal(n) for n in moved))
        result, report = transform(_copy(original))
        passed, drift = self._judge(result)
        return _Attempt(result, report, list(moved), passed, drift)

    def _restored(self, base: _Attempt, moved: list) -> _Attempt:
        """The pass's QDQ model with `moved` restored to float in place (restore_float), judged."""
        result = self._restore(base.model, moved)
        passed, drift = self._judge(result)
        return _Attempt(result, copy.deepcopy(base.report), list(moved), passed, drift)

    def _judge(self, candidate: onnx.ModelProto) -> tuple[bool, float]:
        produced = run_batches(make_session(candidate, self.threads), self.dataset.batches)
        outputs = {name: compare_outputs(y0, produced[name], self._mask_for(y0), scores=name not in self._not_scores)
                   for name, y0 in self._reference.items()}
        accuracy = None
        if self.dataset.labels is not None and self._reference:
            first = next(iter(self._reference))
            accuracy = {"original": task_accuracy(self._reference[first], self.dataset.labels),
                        "candidate": task_accuracy(produced[first], self.dataset.labels)}
        checks = _checks(self.budget, outputs, accuracy, None)
        return all(c.passed for c in checks), relative_drift(self._reference, produced, self._mask)

    def _mask_for(self, output):
        mask = getattr(self, "_mask", None)
        return mask if mask is not None and masks_output(mask, output) else None

    def _rank(self, original, base: _Attempt) -> tuple[list[tuple[list, float]], bool]:
        """([nodes], held-out drift with them alone restored to float), most sensitive first; and whether they are
        restored in place (QDQ) rather than by running the pass again without them.

        In a QDQ graph the unit is a quantized activation: the layers that read the same one (attention's query,
        key and value) are restored together, since restoring one leaves the others' error where it was (NNCF
        reverts quantizer groups likewise). Only layers whose activations are quantized are candidates there:
        their error dominates weight rounding's, so int8-stored layers that run float kernels are not."""
        quantized = [d for d in base.report.layers if d.action.startswith("int") and d.node]
        groups: dict[tuple, list] = {}
        for d in quantized:
            activations, _ = _qdq_inputs(base.model, d.node)
            if activations:
                groups.setdefault(tuple(sorted(activations.values())), []).append(d.node)
        measured = []
        for nodes in groups.values() if groups else ([d.node] for d in quantized):
            try:
                drift = self._judge(self._restore(base.model, nodes))[1] if groups else self._attempt(original, nodes).drift
            except OnnxShrinkError:  # a restored graph onnxruntime refuses: that layer is not a candidate
                continue
            measured.append((nodes, drift))
        return sorted(measured, key=lambda item: item[1]), bool(groups)

    def _restore(self, model, nodes: list):
        sources = set()
        for node in nodes:
            activations = _qdq_inputs(model, node)[0]
            for source in activations.values():
                sources |= {source} | _quantized_upstream(model, source)
            scale = input_scale(model, self._original, activations[0]) if 0 in activations else None
            model = restore_float(model, node, self._original_weight(node), scale)
        # The quantized input itself goes: its other readers (a residual Add, a Softmax) read the float tensor
        # too, unless a layer still quantized reads it (then its quantizer must stay).
        keep = {d.node for d in self._base_layers if d.action.startswith("int")} - set(nodes)
        return release_activations(model, sources, keep)

    def _original_weight(self, node: str) -> np.ndarray | None:
        weight = next((d.weight for d in self._base_layers if d.node == node), None)
        tensor = self._weights.get(weight)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    def _finish(self, attempt: _Attempt, alone: dict):
        summary, report = self.summary, attempt.report
        for decision in report.layers:
            if decision.node in attempt.moved:
                drift, group = alone[decision.node]
                others = [n for n in group if n != decision.node]
                decision.action, decision.reason = "kept float", (
                    f"accuracy fallback: restored alone{' with ' + ', '.join(others) + ' (same quantized input)' if others else ''}"
                    f" it lowered the held-out drift {summary.drift_before:.4g} -> {drift:.4g}")
                decision.bytes_after = decision.bytes_before
        budget = ", ".join(f"{k} {v:g}" for k, v in summary.budget.items())
        if not attempt.moved:
            text = (f"accuracy fallback: budget ({budget}) held on {summary.data} with every layer quantized (drift "
                    f"{summary.drift_before:.4g})" if summary.met else
                    f"accuracy fallback: budget ({budget}) missed on {summary.data} (drift {summary.drift_before:.4g}) "
                    f"and no layer moved: {summary.stopped}")
        else:
            text = (f"accuracy fallback: {len(attempt.moved)} layer(s) kept float "
                    f"({', '.join(attempt.moved)}); held-out drift {summary.drift_before:.4g} -> {summary.drift_after:.4g}; "
                    + (f"budget ({budget}) held on {summary.data}" if summary.met else
                       f"budget ({budget}) still missed on {summary.data}: {summary.stopped}; the best model tried is "
                       "the one written"))
        report.notes.append(text + f" ({summary.attempts} pass run(s), {summary.ranked} layer(s) ranked)")
        return attempt.model, report


@dataclass
class _Attempt:
    model: onnx.ModelProto
    report: object  # PassReport
    moved: list
    passed: bool
    drift: float


def relative_drift(reference: dict, produced: dict, mask: np.ndarray | None = None) -> float:
    """Mean over the float outputs of ||y - y0|| / ||y0|| (as layer_sensitivity measures it); padded positions of
    outputs that `mask` covers (validate.masks_output) are left out."""
    errors = []
    for name, y0 in reference.items():
        if np.asarray(y0).dtype.kind != "f":
            continue
        a, b = np.asarray(y0, np.float64), np.asarray(produced[name], np.float64)
        if mask is not None and masks_output(mask, a):
            a, b = a[mask], b[mask]
        norm = float(np.linalg.norm(a))
        errors.append(float(np.linalg.norm(b - a)) / norm if norm > 0 else float(np.linalg.norm(b)))
    return float(np.mean(errors)) if errors else 0.0


def _qdq_inputs(model: onnx.ModelProto, node_name: str) -> tuple[dict, dict]:
    """A node's inputs written by DequantizeLinear: ({index: float tensor} for activations, DequantizeLinear(
    QuantizeLinear(x)) -> x; {index: DequantizeLinear node} for constants (weights, int32 biases))."""
    graph = model.graph
    target = next((n for n in graph.node if n.name == node_name), None)
    if target is None:
        return {}, {}
    producers = {o: n for n in graph.node for o in n.output}
    constants = {t.name for t in graph.initializer}
    activations, weights = {}, {}
    for index, name in enumerate(target.input):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            activations[index] = q.input[0]
        elif all(i in constants for i in dq.input if i) and not any(a.name == "block_size" for a in dq.attribute):
            weights[index] = dq
    return activations, weights


def restore_float(model: onnx.ModelProto, node_name: str, original_weight: np.ndarray | None = None,
                  input_scale: np.ndarray | None = None) -> onnx.ModelProto:
    """A copy of a QDQ model in which `node_name` runs as a float kernel: it reads its activations unquantized
    (DequantizeLinear(QuantizeLinear(x)) -> x) and its weight and bias as float initializers. The weight is
    `original_weight` where the written one is only its rounding (same shape, relative error under
    WEIGHT_MATCH). `input_scale` c: the pass feeds the layer x * c (SmoothQuant), so its float weight is
    `original_weight` / c along the input axis, taken where the written one is its rounding (SCALED_MATCH).
    Otherwise, and for the bias, the values the DequantizeLinear gave. Q/DQ nodes and initializers nothing
    reads any more are dropped."""
    activations, weights = _qdq_inputs(model, node_name)
    result = _copy(model)
    graph = result.graph
    node = next((n for n in graph.node if n.name == node_name), None)
    if node is None:
        return result
    arrays = {t.name: t for t in graph.initializer}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    for index, source in activations.items():
        node.input[index] = source
    for index, dq in weights.items():
        values = _dequantize(dq, arrays)
        if index == 1 and original_weight is not None and original_weight.shape == values.shape:
            values = _float_weight(node, values, original_weight, input_scale)
        name, k = f"{dq.output[0]}_float", 1
        while name in taken:
            name, k = f"{dq.output[0]}_float{k}", k + 1
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(values, name))
        node.input[index] = name
    _drop_dead_nodes(graph)
    drop_unused_initializers(result)
    return result


# Ops that carry one activation through, elementwise with a constant or by moving values: a quantized tensor
# before them (a Relu output quantized for its layer's fused output, then scaled by SmoothQuant's Mul) still
# quantizes the restored layer's input.
CARRIERS = {"Mul", "Div", "Add", "Sub", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity"}


def _quantized_upstream(model: onnx.ModelProto, tensor: str, depth: int = 4) -> set:
    """The float tensors x above `tensor`, through CARRIERS with one non-constant input, that are quantized as
    DequantizeLinear(QuantizeLinear(x)) on the way."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    found = set()
    for _ in range(depth):
        node = producers.get(tensor)
        if node is None or node.op_type not in CARRIERS:
            break
        moving = [i for i in node.input[:1 if node.op_type in ("Reshape", "Squeeze", "Unsqueeze") else None]
                  if i and i not in constants and not (producers.get(i) is not None and producers[i].op_type == "Constant")]
        if len(moving) != 1:
            break
        tensor = moving[0]
        dq = producers.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                break
            found.add(q.input[0])
            tensor = q.input[0]
    return found


def release_activations(model: onnx.ModelProto, sources: set, keep: set) -> onnx.ModelProto:
    """Every reader of DequantizeLinear(QuantizeLinear(x)), x in `sources`, reads x instead, unless a node named
    in `keep` (a layer still quantized) reads it too; Q/DQ left unread are dropped."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rewire = {}
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or not dq.input:
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in sources:
            continue
        if any(r.name in keep for r in readers.get(dq.output[0], [])) or dq.output[0] in {o.name for o in graph.output}:
            continue
        rewire[dq.output[0]] = q.input[0]
    if not rewire:
        return model
    result = _copy(model)
    for node in result.graph.node:
        for index, name in enumerate(node.input):
            if name in rewire:
                node.input[index] = rewire[name]
    _drop_dead_nodes(result.graph)
    drop_unused_initializers(result)
    return result


def _float_weight(node, written: np.ndarray, original: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The float weight a restored layer gets: the original, rescaled by the pass's input scale when it has one,
    where the written weight is that one rounded; else the written one."""
    candidates = [(original, WEIGHT_MATCH)]
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    k = original.shape[-1] if transposed else original.shape[0]
    if scale is not None and original.ndim == 2 and scale.size == k and np.all(scale != 0):
        scaled = original / (scale.reshape(1, -1) if transposed else scale.reshape(-1, 1))
        candidates.insert(0, (scaled, SCALED_MATCH))
    for candidate, bound in candidates:
        norm = float(np.linalg.norm(candidate))
        if norm > 0 and float(np.linalg.norm(written - candidate)) / norm < bound:
            return candidate.astype(np.float32)
    return written


def input_scale(quantized: onnx.ModelProto, original: onnx.ModelProto, source: str) -> np.ndarray | None:
    """c where the pass feeds a layer `source` = x * c, x what the original model fed it: a Mul by a constant
    vector before it, or a LayerNormalization whose scale (gamma) differs from the original's by c (SmoothQuant's
    two forms). None when neither is there."""
    producer = next((n for n in quantized.graph.node if source in n.output), None)
    if producer is None:
        return None
    constants = {t.name: t for t in quantized.graph.initializer}
    if producer.op_type == "Mul":
        factors = [numpy_helper.to_array(constants[i]) for i in producer.input if i in constants]
        if len(factors) == 1 and factors[0].ndim >= 1:
            return factors[0].reshape(-1).astype(np.float64)
    if producer.op_type == "LayerNormalization" and len(producer.input) > 1 and producer.input[1] in constants:
        before = next((n for n in original.graph.node if n.name == producer.name and n.op_type == producer.op_type), None)
        gammas = {t.name: t for t in original.graph.initializer}
        if before is not None and len(before.input) > 1 and before.input[1] in gammas:
            old = numpy_helper.to_array(gammas[before.input[1]]).astype(np.float64).reshape(-1)
            new = numpy_helper.to_array(constants[producer.input[1]]).astype(np.float64).reshape(-1)
            if old.shape == new.shape and np.all(old != 0):
                return new / old
    return None


def _dequantize(dq, arrays: dict) -> np.ndarray:
    q = numpy_helper.to_array(arrays[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(arrays[dq.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(arrays[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    if np.ndim(scale) == 1 and q.ndim > 1:  # per axis
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return ((q - zero) * scale).astype(np.float32)


def _drop_dead_nodes(graph) -> None:
    """Remove nodes whose outputs nothing reads (the Q/DQ pairs a restored layer no longer uses)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for node in graph.node:  # subgraph bodies may read outer names
            for a in node.attribute:
                for g in ([a.g] if a.g.node else []) + list(a.graphs):
                    read |= {i for n in g.node for i in n.input}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy

