"""Weight pruning of MatMul/Gemm/Conv: zeros chosen by importance, the rest refit to the original's outputs.

Before:                                  After (unstructured / N:M):
    X ──► MatMul ◄── W (f32 [K, N])          X ──► MatMul ◄── W' (f32 [K, N], a fraction of it 0.0)
          Add ◄── b                                Add ◄── b'  (refit when calibration data is given)

The graph keeps its ops, dtypes and shapes: dense onnxruntime kernels run zeros as fast as any
other number, so unstructured sparsity buys size only once the file is packed (`onnxshrink
pack`) or stored sparse (`--storage sparse`). `--pattern channel` (passes/prune_channels.py)
removes whole output channels instead and makes the model smaller and faster as it stands.

Every weight is seen as the [K, N] matrix the layer multiplies by (K inputs, N outputs):
MatMul's weight as it is, Gemm's transposed when transB=1 (alpha folded in), Conv's
[Cout, Cin/g, kh, kw] as [Cin/g*kh*kw, Cout]. N:M groups run along K.

Importance: `magnitude` |w|; `activation` |w| * ||x_k|| (Wanda, Sun et al. 2023), x_k the
layer's k-th input over the calibration data, taken from the diagonal of X^T X.

Allocation (how many zeros each layer gets, the total always exactly round(sparsity * weights)):
  layer   the same fraction everywhere;
  global  one threshold on importance divided by its layer's mean importance;
  auto    equal marginal cost: removing a weight costs its share of the layer's relative output
          error, importance^2 / sum(importance^2) (the diagonal approximation of
          ||X dW||^2 / ||X W||^2), or the measured curves of `onnxshrink sensitivity` when given;
          the cheapest weights across all layers go first (per-layer cost rises as a layer empties).
Zeros already in a weight cost nothing and are taken first, so pruning twice to the same
sparsity changes nothing more. No layer goes past MAX_LAYER_SPARSITY.

With calibration data, layers are processed in graph order; each one's inputs are captured
from the model with every upstream layer already pruned, and its kept weights (and bias) are
refit by least squares to the original model's outputs of that layer (algorithms/reconstruct.py),
in `refit_steps` stages of growing sparsity, survivors re-ranked after each refit (`method` "refit", the
default). `method` "sparsegpt" chooses each layer's zeros and updates the kept weights from X^T X of its inputs
alone (algorithms/sparsegpt.py): one capture run for all layers, or with `sequential` two per wave of layers
(`_Hessians`), never two per layer. `method` "mask" updates nothing.

Memory (issue 15 item 5): the one run's X^T X wait for their layers' turns, so they are kept small: one per distinct
input (q, k and v share theirs), as upper triangles (reconstruct.PackedGram), summed from each batch's real-token rows
(prune_common.layer_rows), each dropped once its layers are pruned; a layer's float weights and scores are made at
its turn, never all at once. The pruned model is the same bytes as with full, per-layer Grams.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.algorithms.reconstruct import Gram, PackedGram, refit
from onnxshrink.algorithms.sparsegpt import output_error, refit_kept, sparsegpt, teacher_weights
from onnxshrink.data import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.passes.common import attr, begin_pass, handed_over, initializer_owners, select_layers
from onnxshrink.passes.prune_common import (MAX_LAYER_SPARSITY, SUPPORTED_OPS, PruneConfig, capture, capture_rounds,
                                            check_config, describe, few_rows_note, input_key, input_size, layer_rows,
                                            matrix, parse_nm, read_bias, resolved_method, row_weights, teacher_gram,
                                            token_rows, unfold, upstream_layers, write)
from onnxshrink.progress import step
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.streaming import TensorStore
from onnxshrink.weights import find_tensors


class Prune:
    """Zero a fraction of MatMul/Gemm/Conv weights; with calibration data, refit the rest to the original."""

    name = "prune"

    def __init__(self, config: PruneConfig | None = None, calibration: Dataset | None = None, threads: int = 1):
        self.config = config = config or PruneConfig()
        check_config(config, calibration)
        if config.pattern == "channel":
            raise UsageError("--pattern channel is handled by the channel pruning pass")
        self.calibration = calibration
        self.threads = threads
        self.nm = parse_nm(config.pattern)
        self.importance = config.importance or ("activation" if calibration is not None else "magnitude")
        self.method = resolved_method(config, calibration)
        self.tensors = TensorStore()  # onnxshrink.streaming swaps in a store that reads one weight at a time

    @property
    def streams(self) -> bool:
        """Without calibration data a weight's mask needs only that weight and the allocation, which
        `_cheapest_streamed` finds exactly from per-layer summaries: onnxshrink.streaming can run it. Calibration
        (captures, refits), measured sensitivity curves, sparse storage and dead-unit removal stay in memory."""
        config = self.config
        return (self.calibration is None and not config.sensitivity and config.storage == "dense"
                and not config.remove_dead_units)

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        config = self.config
        model, report = begin_pass(model, self.name, asdict(self.config))
        original = None
        if self.method == "refit" or (self.method == "sparsegpt" and config.sequential):  # the teacher
            original = onnx.ModelProto()
            original.CopyFrom(model)
        records = {r.name: r for r in find_tensors(model)}
        sites, skipped = select_layers(model, records, SUPPORTED_OPS, config, _judge(records),
                                       read=self.tensors.read)
        for decision in skipped:
            decision.action = "kept"  # select_layers speaks for quantize ("kept float")
        report.layers.extend(skipped)
        names = {site.name for site in sites} | {d.node for d in skipped}
        unknown = sorted(set(config.layer_sparsity) - names)
        if unknown:
            raise UsageError(f"--layer-sparsity names no layer of the model: {', '.join(unknown)} "
                             f"(layers: {', '.join(sorted(names)) or 'none'})")
        if not sites:
            report.notes.append("no MatMul/Gemm/Conv weight to prune")
            return model, report
        owners = initializer_owners(model)
        main_outputs = {name for node in model.graph.node for name in node.output}
        layers = [describe(site, owners, records, main_outputs) for site in sites]
        streamed = getattr(self.tensors, "streaming", False)  # weights read one at a time, never all held
        if streamed:
            grams = {}
            counts = self._allocate(layers, None, report,
                                    cheapest=lambda *a: self._cheapest_streamed(layers, owners, *a))
        else:
            grams = self._original_grams(model, layers) if self.calibration is not None else {}
            if self.method in ("sparsegpt", "refit"):  # the rows of a capture do not depend on the pruning
                short = few_rows_note((gram.k, gram.rows) for gram in grams.values())
                if short:
                    report.notes.append(short)
            # Each layer's weights and scores are made when needed (here and in the loop below), never all at once:
            # the layer's weight is unchanged until its own turn.
            counts = self._allocate(layers, lambda layer: _importance(matrix(layer, owners), grams.get(layer.name),
                                                                      self.importance), report)
        refit_on = self.method == "refit"
        hessians = _Hessians(self, original, model, layers) if self.method == "sparsegpt" else None
        if hessians is not None:
            report.notes.append(hessians.note())
        if refit_on:
            report.notes.append(
                f"reconstruction: {len(layers)} layer(s) refit in graph order to the original model's outputs on "
                f"{self.calibration.samples} calibration sample(s); each layer reruns the model in onnxruntime "
                "(twice per batch) to capture its inputs with upstream layers already pruned")
        total = pruned = 0
        for index, layer in enumerate(layers):
            step("prune: layers", index, len(layers))
            w0 = matrix(layer, owners, self.tensors.read)
            zeros_before = int(np.sum(w0 == 0))
            gram = grams.pop(layer.name, None)  # released with this layer (layers sharing it: with the last of them)
            teacher = None
            if refit_on and not layer.reason:
                teacher = self._teacher_gram(original, model, layer, w0, owners)
                gram = teacher
            score = _importance(w0, gram, self.importance)
            keep = _mask(score, counts[layer.name], self.nm)
            why = []
            hessian, target = (hessians.of(layer, w0, gram) if hessians is not None and not layer.reason
                               else (None, None))
            if hessian is not None and not np.all(w0[~keep] == 0):  # an OBS mask of its own, from the updated weights
                w = sparsegpt(target, hessian, counts[layer.name], self.nm, damp=config.damping)
                if config.kept_refit:  # keeps the zeros where they are: an N:M pattern stays N:M
                    w = refit_kept(target, w, hessian, damping=config.kept_refit_damping)
                keep = w != 0
                keep |= w0 == 0  # zeros before count as kept: the test below sees the layer changed
            if np.all(w0[~keep] == 0):
                zeros = zeros_before
                action = f"sparsity {zeros / w0.size:.1%}"
                why.append("already at this sparsity: unchanged")
            else:
                w, bias = (w if hessian is not None else w0 * keep), None
                if hessian is not None:
                    why.append(f"layer output error {output_error(target, w, hessian):.2%} after OBS updates "
                               f"({output_error(target, w0 * (w != 0), hessian):.2%} masked only)")
                elif teacher is not None:
                    steps = 1 if self.nm else config.refit_steps
                    keep, result = _gradual(w0, counts[layer.name], teacher, read_bias(layer, owners), self.importance,
                                            self.nm, config.damping, steps)
                    w, bias = result.weight, result.bias
                    why.append(f"layer output error {result.error_after:.2%} after refit "
                               f"({result.error_before:.2%} masked only)")
                elif self.method != "mask" and layer.reason:
                    why.append(f"weights not updated: {layer.reason}")
                write(layer, w.astype(np.float32), bias, owners, self.tensors)
                zeros = int(np.sum(w == 0))
                action = f"pruned {zeros / w0.size:.1%}" + (f" {self.nm[0]}:{self.nm[1]}" if self.nm else "")
                report.changed = True
            total, pruned = total + w0.size, pruned + zeros
            if self.importance == "activation" and gram is None:
                why.append(f"magnitude importance: {layer.reason or 'no captured inputs'}")
            # Dense storage: the file holds every zero, so the bytes do not change (pack or --storage sparse do).
            report.layers.append(LayerDecision(layer.name, layer.op_type, layer.weight, action, "; ".join(why),
                                               layer.size * 4, layer.size * 4))
            del w0, keep, score, gram, teacher, hessian, target  # this layer's arrays go before the next one's are made
            w = None
        report.notes.append(
            f"{pruned}/{total} weights zero ({pruned / max(total, 1):.1%}) in {len(layers)} layer(s), "
            f"importance {self.importance}, scope {config.scope if not self.nm else self.config.pattern}")
        if config.remove_dead_units:
            from onnxshrink.passes.dead_units import RemoveDeadUnits

            with handed_over(model):  # this pass's own model: rewritten in place, not copied
                model, dead = RemoveDeadUnits()(model)
            report.notes += dead.notes
            rows = {decision.node: decision for decision in report.layers}
            for decision in dead.layers:  # said on the layer's own row
                row = rows.get(decision.node)
                if row is None:
                    report.layers.append(decision)
                else:
                    row.reason = "; ".join(filter(None, [row.reason, decision.action]))
        if config.storage == "sparse":
            _store_sparse(model, report)
        else:
            report.notes.append("the file stays dense: onnxruntime runs zeros at dense speed and size; `onnxshrink pack` "
                                "(or --storage sparse) turns the zeros into smaller files, --pattern channel into speed")
        return model, report

    # ---- allocation ---------------------------------------------------------------------

    def _allocate(self, layers, score_of, report, cheapest=None) -> dict[str, int]:
        """Zeros per layer; their sum is exactly round(sparsity * all weights) when the overrides allow it.

        `score_of(layer)` gives a layer's importance [K, N], asked once per layer and only when the allocation needs
        it (not for scope layer or N:M); `cheapest(free, caps, target)` (streaming) replaces the costs computed here."""
        config = self.config
        if self.nm:
            return {layer.name: 0 for layer in layers}
        sizes = {layer.name: layer.size for layer in layers}
        fixed = {name: int(round(value * sizes[name])) for name, value in config.layer_sparsity.items() if name in sizes}
        free = [layer.name for layer in layers if layer.name not in fixed]
        target = int(round(config.sparsity * sum(sizes.values()))) - sum(fixed.values())
        caps = {name: int(MAX_LAYER_SPARSITY * sizes[name]) for name in free}
        if target < 0 or target > sum(caps.values()):
            bound = 0 if target < 0 else sum(caps.values())
            report.notes.append(f"--layer-sparsity overrides leave the other layers {target} zeros to take; "
                                f"{bound} taken, so the overall sparsity differs from {config.sparsity}")
            target = bound
        counts = dict(fixed)
        if config.scope == "layer" or not free:
            counts.update({name: int(round(config.sparsity * sizes[name])) for name in free})
            return counts
        if cheapest is not None:
            counts.update(cheapest(free, caps, target))
            return counts
        costs = {}
        curves = _measured_curves(config.sensitivity, free) if config.scope == "auto" else {}
        by_name = {layer.name: layer for layer in layers}
        for name in free:
            s = np.sort(score_of(by_name[name]).reshape(-1))
            if name in curves:
                cost = _curve_costs(*curves[name], sizes[name], int(np.sum(s == 0)))
            else:
                cost = _costs(s, config.scope, _cost_scale(s, config.scope))
            costs[name] = cost[: caps[name]]
        if curves:
            report.notes.append(f"allocation from measured sensitivity for {len(curves)} layer(s)")
        counts.update(_cheapest(costs, free, target))
        return counts

    def _cheapest_streamed(self, layers, owners, free, caps, target) -> dict[str, int]:
        """What `_cheapest` returns on every layer's sorted costs, from the weights read one at a time.

        `_cheapest` takes the costs up to v, the target-th smallest of all layers' (capped) costs, then the
        ties at v in layer order. Costs are non-negative float32, so their bit patterns sort as they do:
        v is found exactly by a radix selection, a histogram per layer of the top 16 bits (first read), then
        one of the low 16 bits within the bin that holds v (second read). Memory: one weight, and 512 KiB
        of counts per layer. A layer's cost scale (a sum or mean, which depends on summation order) is taken
        from its sorted scores as in memory, so every cost is the same float."""
        if target <= 0:
            return {name: 0 for name in free}
        by_name = {layer.name: layer for layer in layers}
        scope = self.config.scope
        scales, high, infinite = {}, {}, {}
        for name in free:  # first read: each layer's cost scale and the top 16 bits of its costs
            s = np.sort(_importance(matrix(by_name[name], owners, self.tensors.read), None, self.importance).reshape(-1))
            scales[name] = _cost_scale(s, scope)
            keys = _cost_keys(_costs(s, scope, scales[name]))
            del s
            high[name] = np.cumsum(np.bincount(keys >> 16, minlength=1 << 16))
            infinite[name] = int(np.count_nonzero(keys == _INF_KEY))
            del keys
        caps_of = np.array([caps[name] for name in free])

        def capped(at_most: dict) -> np.ndarray:  # sum over layers of min(count, cap)
            return sum(np.minimum(at_most[name], cap) for name, cap in zip(free, caps_of))

        finite = {name: int(high[name][(_INF_KEY >> 16) - 1]) for name in free}
        if capped(finite) < target:  # fewer finite costs than zeros wanted: `_cheapest` takes them all, then infinities
            below = finite
            upto = {name: finite[name] + infinite[name] for name in free}
        else:
            totals = capped(high)
            top = int(np.searchsorted(totals, target))  # the first bin whose running count reaches the target
            low = {}
            for name in free:  # second read: the low 16 bits of the costs in that bin
                keys = _cost_keys(_costs(_importance(matrix(by_name[name], owners, self.tensors.read), None,
                                                     self.importance).reshape(-1), scope, scales[name]))
                inside = keys[(keys >> 16) == top] & 0xFFFF
                del keys
                low[name] = np.cumsum(np.bincount(inside, minlength=1 << 16))
            before = {name: int(high[name][top - 1]) if top else 0 for name in free}
            bottom = int(np.searchsorted(capped({name: before[name] + low[name] for name in free}), target))
            below = {name: before[name] + (int(low[name][bottom - 1]) if bottom else 0) for name in free}
            upto = {name: before[name] + int(low[name][bottom]) for name in free}
        taken = {name: min(below[name], caps[name]) for name in free}
        left = target - sum(taken.values())
        for name in free:  # ties at the threshold, in layer order
            extra = min(left, min(upto[name], caps[name]) - taken[name])
            taken[name] += extra
            left -= extra
        return taken

    # ---- data ---------------------------------------------------------------------------

    def _original_grams(self, model, layers) -> dict[str, PackedGram]:
        """X^T X of every layer's inputs in the unpruned model, in one capture run. Held until each layer is pruned,
        so kept small: one Gram per distinct input (q, k and v share theirs), stored as its upper triangle, summed
        from each batch's real-token rows without the batch's joined values (prune_common.layer_rows)."""
        usable = [layer for layer in layers if not layer.reason]
        shared = {}
        for layer in usable:
            shared.setdefault(input_key(layer), PackedGram(input_size(layer)))
        for batch_rows in layer_rows(self.calibration, model, usable, self.threads):
            for key, x, weights in batch_rows:
                shared[key].add(x, weights=weights)
                del x
        return {layer.name: shared[input_key(layer)] for layer in usable}

    def _teacher_gram(self, original, model, layer, w0, owners) -> Gram:
        return teacher_gram(self.calibration, original, model, layer, layer, read_bias(layer, owners) is not None,
                            self.threads)


class _Hessians:
    """X^T X of each layer's inputs for the OBS updates, captured in waves: one onnxruntime run over the
    calibration data serves every layer whose input no unpruned layer upstream still changes (MiniLM: q, k and v
    share a wave), so each layer sees the model with all the layers before it already pruned. The original model
    runs alongside (X^T X0, X0 its inputs there): each layer is pruned towards the original's outputs, not its own,
    which corrects upstream drift as the refit does, at two runs per wave instead of two per layer.
    Without `sequential` (the default) the original model's statistics serve all layers (the one run that the
    allocation needs anyway, no correction)."""

    def __init__(self, owner: "Prune", original, model, layers):
        self.owner, self.original, self.model = owner, original, model
        self.usable = [layer for layer in layers if not layer.reason]
        self.sequential = owner.config.sequential
        self.done: set = set()
        self.grams: dict = {}  # sequential: the Grams captured for the current wave, until each layer's turn
        self.cross: dict = {}
        self.upstream = upstream_layers(model.graph, self.usable) if self.sequential else {}
        self.round = capture_rounds(self.upstream, owner.config.capture_rounds) if self.sequential else {}

    def note(self) -> str:
        how = ("captured in waves from the model with upstream layers already pruned, towards the original's outputs"
               if self.sequential else "captured once from the original model")
        return (f"OBS updates (SparseGPT) of {len(self.usable)} layer(s) from X^T X of their inputs on "
                f"{self.owner.calibration.samples} calibration sample(s), {how}")

    def of(self, layer, w0, original_gram=None) -> tuple:
        """(H, the dense weights to prune towards) of a layer, or (None, None) when not captured. `original_gram`:
        the layer's X^T X in the original model (what serves without `sequential`)."""
        if layer.name not in self.grams and self.sequential:
            self._capture(layer)
        self.done.add(layer.name)
        gram = self.grams.pop(layer.name, None) if self.sequential else original_gram
        cross = self.cross.pop(layer.name, None)
        if gram is None:
            return None, None
        target = w0 if cross is None else teacher_weights(w0, gram.xtx, cross, self.owner.config.damping)
        return gram.xtx, target

    def _capture(self, layer) -> None:
        if self.round:  # a round of several waves: its later layers see the round's earlier ones unpruned
            wave = [other for other in self.usable if other.name not in self.done
                    and self.round[other.name] == self.round[layer.name]]
        else:
            wave = [other for other in self.usable if other.name not in self.done
                    and not (self.upstream[other.name] - self.done - {other.name})]
        wave = wave if any(other.name == layer.name for other in wave) else [layer]
        names_in = {other.name for other in wave}
        for other in wave:
            self.grams[other.name] = Gram(input_size(other))
            # below another layer of the same round: pruned towards its own outputs, or it would correct the upstream
            # drift that the layer above corrects already (prune_common.RoundCapture)
            if not (self.upstream[other.name] - {other.name}) & names_in:
                self.cross[other.name] = np.zeros((input_size(other),) * 2)
        names = [other.x for other in wave]
        threads = self.owner.threads
        data = self.owner.calibration
        for (batch, now), (_, before) in zip(capture(data, self.model, names, threads),
                                             capture(data, self.original, names, threads)):
            for other in wave:
                value = now.get(other.x, batch.get(other.x))
                rows = token_rows(batch, value, other)
                x = unfold(other, value)
                x0 = unfold(other, before.get(other.x, batch.get(other.x)))
                if rows is not None:
                    x, x0 = x[rows], x0[rows]
                weights = row_weights(np.shape(value), other, x, rows)
                self.grams[other.name].add(x, weights=weights)
                if other.name in self.cross:
                    if weights is not None:
                        x, x0 = x * weights[:, None], x0 * weights[:, None]
                    self.cross[other.name] += x.T @ x0  # float32 per batch, summed in float64


def _store_sparse(model: onnx.ModelProto, report: PassReport) -> None:
    """Move pruned weights into graph.sparse_initializer (non-zero values + int64 linear indices) where smaller.

    onnxruntime densifies sparse initializers when it loads the model: smaller file, same speed."""
    owners = initializer_owners(model)
    moved = 0
    for decision in report.layers:
        if not decision.action.startswith(("pruned", "sparsity")) or decision.weight not in owners:
            continue
        graph, tensor = owners[decision.weight]
        if tensor not in graph.initializer:
            continue  # already moved (a weight read by two layers)
        dense = numpy_helper.to_array(tensor)
        flat = dense.reshape(-1)
        index = np.flatnonzero(flat)
        stored = index.size * (flat.itemsize + 8)
        if stored >= dense.nbytes:
            decision.reason = "; ".join(filter(None, [decision.reason, f"stored dense: {index.size} non-zeros with int64 "
                                                      "indices would not be smaller (needs > 67% zeros)"]))
            continue
        values = numpy_helper.from_array(flat[index], tensor.name)
        indices = numpy_helper.from_array(index.astype(np.int64), tensor.name + "_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(dense.shape)))
        graph.initializer.remove(tensor)
        decision.bytes_after = stored
        decision.action += " (sparse)"
        moved += 1
    onnx.checker.check_model(model)  # not full_check: its shape inference rejects sparse initializers feeding MatMul
    report.notes.append(f"--storage sparse: {moved} weight(s) stored as ONNX sparse initializers (values + int64 indices); "
                        "onnxruntime densifies them at load, so the file is smaller but runs no faster; onnx-ir drops "
                        "sparse initializers on load")


def _judge(records):
    def judge(node, record, constants):
        if record.dtype != "float":
            return f"weight is {record.dtype}: only float32 weights are pruned"
        if record.tied:
            return "weight is shared by several layers (tied): a mask for one would change the others"
        if record.reason != "weight":
            return f"{record.reason}: pruning it would change those ops too"
        if node.input[0] in records:
            return f"both {node.op_type} operands are constant"
        if node.op_type == "MatMul" and len(record.shape) != 2:
            return f"MatMul weight of rank {len(record.shape)}: only 2-D weights are pruned"
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return "Gemm with transA=1"
        if node.op_type == "Conv" and len(record.shape) < 3:
            return f"Conv weight of rank {len(record.shape)}"
        return None

    return judge


def _importance(w: np.ndarray, gram: Gram | None, importance: str) -> np.ndarray:
    score = np.abs(w)
    if importance == "activation" and gram is not None:
        score = score * gram.input_norms()[:, None]
    return score


def _gradual(w0, zeros, gram, bias0, importance, nm, damping, steps):
    """Prune in `steps` equal stages, refitting after each and ranking the survivors by their refit values.

    The refit moves weight onto the inputs that cover for removed ones; ranking once from the
    original weights ignores that. On the sample MLP at 80% four stages kept 0.9800 accuracy
    where one kept 0.9756 (bench/prune_curves.py). The Gram matrix is shared: each stage is a solve."""
    keep = np.ones(w0.shape, dtype=bool)
    w = w0
    for step in range(1, steps + 1):
        score = np.where(keep, _importance(w, gram, importance), -1.0)  # pruned stays pruned
        keep = _mask(score, int(round(zeros * step / steps)), nm)
        result = refit(w0, keep, gram, bias0, damping)
        w = result.weight
    return keep, result


def _mask(score: np.ndarray, zeros: int, nm) -> np.ndarray:
    """Keep-mask [K, N] with the `zeros` smallest scores of the layer removed, or N of every M along K kept.

    One ranking per layer, not per output column as Wanda does: on the sample models it kept
    more accuracy, with and without the refit (bench/prune_curves.py)."""
    k, n = score.shape
    if nm:
        keep_n, m = nm
        pad = -k % m
        padded = np.concatenate([score, np.full((pad, n), -np.inf)], axis=0) if pad else score
        groups = padded.reshape(-1, m, n)
        rank = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
        keep = (rank < keep_n).reshape(-1, n)[:k]
        return keep
    keep = np.ones((k, n), dtype=bool)
    if zeros <= 0:
        return keep
    flat = score.reshape(-1)
    flat = np.argpartition(flat, zeros - 1)[:zeros] if zeros < flat.size else np.arange(flat.size)  # O(n), not a sort
    keep.reshape(-1)[flat] = False
    return keep


_INF_KEY = 0x7F800000  # float32 +inf as uint32: finite non-negative floats sort below it, NaNs above


def _cost_scale(s: np.ndarray, scope: str) -> float:
    """What a layer's costs are divided by, from its sorted scores (the sum's rounding depends on the order)."""
    if scope == "global":
        return float(np.mean(s))
    return float(np.square(s, dtype=np.float32).sum(dtype=np.float64))


def _costs(s: np.ndarray, scope: str, scale: float) -> np.ndarray:
    """Per-weight cost of zeroing it, element by element from the scores (scope global: score over the layer's
    mean; auto: its share of the layer's squared importance)."""
    if scope == "global":
        return s / max(scale, 1e-30)
    return np.square(s, dtype=np.float32) / np.float32(max(scale, 1e-30))


def _cost_keys(cost: np.ndarray) -> np.ndarray:
    """Non-negative float32 costs as uint32 keys in the same order (NaNs after +inf, as np.sort puts them)."""
    if cost.dtype != np.float32:
        raise RuntimeError(f"costs are {cost.dtype}, not float32")
    return cost.view(np.uint32)


def _cheapest(costs: dict, names: list, target: int) -> dict[str, int]:
    """How many of the `target` cheapest weights over all layers fall in each (each layer's costs sorted).

    Bisection on the cost threshold with a binary search per layer: no Python loop per weight and no
    concatenated copy, so a model with billions of weights allocates in seconds. Ties at the threshold go
    to layers in `names` order.
    """
    arrays = [costs[name] for name in names]
    if target <= 0:
        return {name: 0 for name in names}

    def at_most(t):
        return sum(int(np.searchsorted(c, t, side="right")) for c in arrays)

    finite = [c[np.isfinite(c)] for c in arrays]
    lo = min((float(c[0]) for c in finite if len(c)), default=0.0)
    hi = max((float(c[-1]) for c in finite if len(c)), default=0.0)
    if at_most(hi) < target:
        hi = np.inf
    elif at_most(lo) < target:
        for _ in range(200):  # float bisection: converges to adjacent doubles well within this
            mid = lo + (hi - lo) / 2
            if mid <= lo or mid >= hi:
                break
            lo, hi = (lo, mid) if at_most(mid) >= target else (mid, hi)
    else:
        hi = lo
    taken = {name: int(np.searchsorted(c, hi, side="left")) for name, c in zip(names, arrays)}
    left = target - sum(taken.values())
    for name, c in zip(names, arrays):  # ties at the threshold
        extra = min(left, int(np.searchsorted(c, hi, side="right")) - taken[name])
        taken[name] += extra
        left -= extra
    return taken


def _measured_curves(sensitivity: dict | None, names) -> dict:
    """node -> (sparsities, drift) from a sensitivity report's dict, for the layers it measured."""
    if not sensitivity:
        return {}
    grid = list(sensitivity.get("sparsities", []))
    curves = {}
    for entry in sensitivity.get("layers", []):
        if entry.get("node") in names and len(entry.get("drift", [])) == len(grid):
            curves[entry["node"]] = (grid, [float(d) if d is not None else np.inf for d in entry["drift"]])
    return curves


def _curve_costs(grid, drift, size: int, free: int) -> np.ndarray:
    """Per-weight marginal cost from a measured drift curve (piecewise linear, made non-decreasing)."""
    points = [(0.0, 0.0)] + sorted(zip(grid, drift))
    cost = np.empty(size)
    done = 0
    for (s0, d0), (s1, d1) in zip(points, points[1:]):
        upto = min(size, int(round(s1 * size)))
        if upto > done:
            cost[done:upto] = max(d1 - d0, 0.0) / max((s1 - s0) * size, 1e-9)
            done = upto
    cost[done:] = np.inf
    cost = np.maximum.accumulate(cost)
    cost[:free] = 0.0
    return cost
