"""Low-rank factorization of MatMul/Gemm weights: one [K, N] weight becomes two thin ones.

Before:                                   After (rank r, r * (K + N) < K * N):
    X ──► MatMul ◄── W (f32 [K, N])           X ──► MatMul ◄── W_A (f32 [K, r])   (new node, `<name>/lowrank`)
          Add ◄── b                                 MatMul ◄── W_B (f32 [r, N])   (the original node, same output)
                                                    Add ◄── b'                   (b refit with calibration data)
    X ──► Gemm(transB=1) ◄── W [N, K], C      X ──► MatMul ◄── W_A [K, r] ──► Gemm(transB=1) ◄── W_B [N, r], C'

The original node keeps its name, attributes (alpha, beta, transB) and output, so everything
downstream is untouched; only its first input and its weight change.

Plain (no data): the truncated SVD of W, split evenly (A = U_r S_r^1/2, B = S_r^1/2 V_r^T); it
minimizes ||W - A B|| but not the layer's output error.

Data-aware (calibration data; SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023): the error
that matters is the layer's OUTPUT error ||X W - X A B||. With G = X^T X + lam I = L L^T
(Cholesky; lam = damping x mean diag, since X^T X is singular whenever an input is constant or
there are fewer samples than inputs), ||X (W - W')||^2 ~ ||L^T (W - W')||^2, so the best rank-r
W' is L^-T times the truncated SVD of L^T W. As in prune and cluster, layers are fitted in graph
order to the ORIGINAL model's outputs Y: X comes from the model with every upstream layer
already factorized, W is replaced by the ridge solution W* = (G)^-1 (X^T Y + lam W) (which is W
itself while nothing upstream changed), and an exclusive bias is refit (centred statistics: the
mean output error goes into the bias, which costs no rank).

Which rank: `rank_ratio` keeps ceil(ratio x min(K, N)); `energy` the smallest rank whose squared
singular values (of L^T W* with data: the layer's output energy) reach that fraction. A layer is
factorized only where it saves parameters, and by default only where the two thin MatMuls did
not run slower than the one in onnxruntime: each distinct layer shape is timed alone (see
`measure_layer`), with the rows the layer sees at batch 1.

Left alone, with the reason: weights of rank other than 2, non-float weights, Gemm with transA=1
or alpha=0, weights also read by a layer or op that is not factorized, layers already factorized
(X @ A @ B with a bottleneck: running the pass twice changes nothing more). A tied weight read by
several MatMuls in the same layout is factorized once and shared. Weights in Constant nodes are
moved to initializers first; layers inside If/Loop bodies are factorized without data.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.data import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import (Names, attr, begin_pass, drop_unused_initializers, initializer_owners,
                                      output_shapes, select_layers)
from onnxshrink.passes.prune_common import describe as _describe, matrix as _matrix, read_bias as _read_bias, teacher_gram
from onnxshrink.algorithms.reconstruct import Gram
from onnxshrink.report import LayerDecision, PassReport
from onnxshrink.weights import find_tensors

SUPPORTED_OPS = ("MatMul", "Gemm")
DEFAULT_DAMPING = 1e-2  # lam = damping x mean(diag X^T X): bench/factorize_bench.py compares 1e-4 .. 1e-1
LATENCY_BUDGET_S = 0.15  # per distinct layer shape and variant
LATENCY_MIN_RUNS, LATENCY_MAX_RUNS = 30, 3000


@dataclass
class FactorizeConfig:
    rank_ratio: float | None = None  # keep ceil(ratio x min(K, N)) of each layer's rank, 0 < ratio <= 1
    energy: float | None = None  # or: the smallest rank keeping this fraction of the squared singular values
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # glob patterns on node names
    keep_float: str | None = None  # "first", "last" or "both": left as they are
    check_latency: bool = True  # factorize a layer only where the two thin MatMuls measured no slower
    require_saving: bool = True  # False: factorize even where it adds parameters (experiments, tests)
    damping: float = DEFAULT_DAMPING


def check_config(config: FactorizeConfig, calibration=None) -> None:
    """Contradictions and out-of-range values as UsageError, before any model is read."""
    if config.rank_ratio is not None and config.energy is not None:
        raise UsageError("--rank-ratio and --energy both choose the rank: give one of them")
    if config.rank_ratio is None and config.energy is None:
        raise UsageError("a rank is required: --rank-ratio (such as 0.5) or --energy (such as 0.99)")
    for option, value, what in (("--rank-ratio", config.rank_ratio, "the fraction of each layer's full rank min(K, N) kept"),
                                ("--energy", config.energy, "the fraction of the squared singular values kept")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                                  or not 0.0 < float(value) <= 1.0):
            raise UsageError(f"{option} {value}: must be greater than 0 and at most 1 ({what})")
    unknown = set(config.op_types) - set(SUPPORTED_OPS)
    if unknown:
        raise UsageError(f"--op-types: unsupported op type(s) {', '.join(sorted(unknown))} (choose from MatMul, Gemm)")
    if config.keep_float not in (None, "first", "last", "both"):
        raise UsageError(f"--keep-float {config.keep_float!r}: choose first, last or both")
    if not (isinstance(config.damping, (int, float)) and config.damping > 0):
        raise UsageError(f"damping {config.damping}: must be positive")


@dataclass
class FactorizedLayer(LayerDecision):
    """A layer's decision with what factorization is about: its rank and parameters before and after."""

    rank: int | None = None  # r written (None: kept)
    full_rank: int | None = None  # min(K, N)
    params_before: int = 0
    params_after: int = 0
    output_error: float | None = None  # relative layer output error on the calibration data (data-aware)
    plain_svd_error: float | None = None  # the same for the plain SVD at this rank, for comparison
    latency_us: dict | None = None  # the layer timed alone: original, factored, rows


@dataclass
class LowRank:
    """W ~ A @ B (layer units: [K, N], Gemm alpha folded in) and, with data, a refit bias."""

    a: np.ndarray  # [K, r] float64
    b: np.ndarray  # [r, N] float64
    bias: np.ndarray | None  # [N], refit (data-aware with an exclusive bias)
    rank: int
    kept_energy: float  # fraction of the squared singular values kept
    error: float | None = None  # relative output error on the calibration data
    plain_error: float | None = None  # plain SVD's, same rank and data
    fallback: str | None = None  # why plain SVD was used although data was given


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    return max(1, min(min(k, n), math.ceil(ratio * min(k, n) - 1e-9)))


def rank_for_energy(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose leading squared singular values reach `energy` of their sum."""
    sq = np.square(singular.astype(np.float64))
    total = float(sq.sum())
    if total <= 0:
        return 1
    cumulative = np.cumsum(sq) / total
    return int(min(len(sq), np.searchsorted(cumulative, energy - 1e-12) + 1))


def low_rank(w: np.ndarray, rank: int | None = None, energy: float | None = None, gram: Gram | None = None,
             bias: np.ndarray | None = None, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Rank-r factors of a [K, N] weight: plain truncated SVD, or data-aware when `gram` is given.

    `gram` holds X^T X and X^T Y of the layer (X its current inputs, Y the original model's outputs;
    with a constant-1 column when `gram.bias`, then `bias` is the layer's bias and is refit)."""
    w = np.asarray(w, dtype=np.float64)
    k, n = w.shape
    u, s, vt = np.linalg.svd(w, full_matrices=False)

    def plain(fallback: str | None = None) -> LowRank:
        r = rank if rank is not None else rank_for_energy(s, energy)
        root = np.sqrt(s[:r])
        return LowRank(u[:, :r] * root, root[:, None] * vt[:r], None, r, _kept(s, r), fallback=fallback)

    if gram is None:
        return plain()
    xtx, xty = gram.xtx, gram.xty
    if gram.bias:  # centre: the best bias for any W' is mean(Y) - mean(X) W', so fit W' to centred data
        rows = max(float(xtx[k, k]), 1.0)
        sx, sy = xtx[:k, k], xty[k]
        g = xtx[:k, :k] - np.outer(sx, sx) / rows
        c = xty[:k] - np.outer(sx, sy) / rows
    else:
        g, c = xtx, xty
    # Inputs constant over the calibration data (all zero, or one row repeated) leave no covariance to whiten
    # by: centred, it is rounding noise, and its Cholesky factor fails or means nothing.
    spread = float(np.mean(np.diag(g)))
    if not spread > 1e-10 * float(np.mean(np.diag(xtx[:k, :k]))):
        return plain("the layer's inputs are constant on the calibration data (zero input covariance): plain SVD")
    lam = damping * max(spread, 1e-12)
    g = g + lam * np.eye(k)
    try:
        target = np.linalg.solve(g, c + lam * w)  # W*: the full-rank fit to the original outputs
        lower = np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        return plain("the layer's input covariance on the calibration data is singular: plain SVD")
    uw, sw, vtw = np.linalg.svd(lower.T @ target, full_matrices=False)
    r = rank if rank is not None else rank_for_energy(sw, energy)
    root = np.sqrt(sw[:r])
    a = np.linalg.solve(lower.T, uw[:, :r] * root)  # L^-T U_r S_r^1/2
    b = root[:, None] * vtw[:r]
    new_bias = None
    plain_w = (u[:, :r] * s[:r]) @ vt[:r]
    if gram.bias:
        new_bias = (sy - sx @ (a @ b)) / rows
        old = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64).reshape(n)
        error = gram.error(np.vstack([a @ b, new_bias]))
        plain = gram.error(np.vstack([plain_w, old]))
    else:
        error, plain = gram.error(a @ b), gram.error(plain_w)
    return LowRank(a, b, new_bias, r, _kept(sw, r), error, plain)


def _kept(singular: np.ndarray, r: int) -> float:
    sq = np.square(singular)
    total = float(sq.sum())
    return float(sq[:r].sum() / total) if total > 0 else 1.0


class Factorize:
    """MatMul/Gemm weights as two thin MatMuls (truncated SVD; data-aware with calibration data)."""

    name = "factorize"

    def __init__(self, config: FactorizeConfig | None = None, calibration: Dataset | None = None, threads: int = 1,
                 timer=None):
        """`timer(op_type, k, n, r, rows, trans_b, threads) -> (original_s, factored_s)` replaces the
        onnxruntime measurement (tests); the default is `measure_layer`."""
        self.config = config = config or FactorizeConfig(rank_ratio=0.5)
        check_config(config, calibration)
        self.calibration = calibration
        self.threads = threads
        self.timer = timer or measure_layer
        self._timings: dict = {}

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        config = self.config
        model, report = begin_pass(model, self.name, asdict(config))
        records = {r.name: r for r in find_tensors(model)}
        pairs = factored_pairs(model, records)
        sites, skipped = select_layers(model, records, SUPPORTED_OPS, config, self._judge(records, pairs))
        for decision in skipped:
            count = _count(records.get(decision.weight))
            report.layers.append(FactorizedLayer(decision.node, decision.op_type, decision.weight, "kept", decision.reason,
                                                 decision.bytes_before, decision.bytes_after,
                                                 params_before=count, params_after=count))
        units: dict[str, list] = {}
        for site in sites:
            units.setdefault(site.weight, []).append(site)
        for weight, group in list(units.items()):
            reason = _tied_reason(records[weight], group)
            if reason:
                for site in group:
                    report.layers.append(self._kept(site, records[weight], reason))
                del units[weight]
        if not units:
            report.notes.append(_nothing_to_factorize(pairs))
            return model, report
        self._owners = initializer_owners(model)
        self._records = records
        self._names = Names(model)
        self._rows = _layer_rows(model)
        self._main_outputs = {name for node in model.graph.node for name in node.output}
        original = None
        if self.calibration is not None:  # the teacher: the model before any layer is factorized
            original = onnx.ModelProto()
            original.CopyFrom(model)
        for weight, group in units.items():
            report.layers.extend(self._factorize(model, original, weight, group))
        drop_unused_initializers(model)
        done = [layer for layer in report.layers if layer.rank is not None]
        report.changed = bool(done)
        self._notes(report, done, original is not None)
        return model, report

    # ---- selection ---------------------------------------------------------------------

    def _judge(self, records, pairs):
        config = self.config

        def judge(node, record, constants):
            if record.dtype != "float":
                return f"weight is {record.dtype}: only float32 weights are factorized"
            if node.input[0] in records:
                return f"both {node.op_type} operands are constant"
            if len(record.shape) != 2:
                return f"{node.op_type} weight of rank {len(record.shape)}: only 2-D weights are factorized"
            if node.op_type == "Gemm" and attr(node, "transA", 0):
                return "Gemm with transA=1"
            if node.op_type == "Gemm" and float(attr(node, "alpha", 1.0)) == 0.0:
                return "Gemm with alpha=0"
            if node.output[0] in pairs:
                return pairs[node.output[0]]
            if config.rank_ratio is not None and config.require_saving:
                k, n = _k_n(node, record.shape)
                r = rank_for_ratio(k, n, config.rank_ratio)
                if r * (k + n) >= k * n:
                    return _no_saving(r, k, n)
            return None

        return judge

    def _kept(self, site, record, reason) -> FactorizedLayer:
        count = _count(record)
        return FactorizedLayer(site.name, site.node.op_type, site.weight, "kept", reason, record.nbytes, record.nbytes,
                               params_before=count, params_after=count)

    # ---- one weight ----------------------------------------------------------------------

    def _factorize(self, model, original, weight, group) -> list[FactorizedLayer]:
        config = self.config
        record, site = self._records[weight], group[0]
        layer = _describe(site, self._owners, self._records, self._main_outputs)
        w = _matrix(layer, self._owners).astype(np.float64)
        k, n = w.shape
        rank = rank_for_ratio(k, n, config.rank_ratio) if config.rank_ratio is not None else None
        timing = None
        if rank is not None:
            timing, reason = self._latency(site, layer, k, n, rank)
            if reason:
                return [self._with_timing(self._kept(s, record, reason), timing) for s in group]
        gram, plain = None, ""
        if original is not None:
            if len(group) > 1:
                plain = f"tied weight read by {len(group)} layers: factorized from the weight alone"
            elif layer.reason:
                plain = layer.reason
            else:
                gram = teacher_gram(self.calibration, original, model, layer, layer, layer.bias is not None, self.threads)
        factors = low_rank(w, rank, config.energy, gram, _read_bias(layer, self._owners) if gram is not None else None,
                           config.damping)
        r = factors.rank
        if rank is None:  # --energy: the rank is known only now
            if config.require_saving and r * (k + n) >= k * n:
                return [self._kept(s, record, f"--energy {config.energy} needs {_no_saving(r, k, n)}") for s in group]
            timing, reason = self._latency(site, layer, k, n, r)
            if reason:
                return [self._with_timing(self._kept(s, record, reason), timing) for s in group]
        if factors.fallback:
            gram, plain = None, factors.fallback
        why = [f"keeps {factors.kept_energy:.2%} of the {'output' if gram is not None else 'weight'} energy "
               f"(squared singular values{' of the whitened weight' if gram is not None else ''})"]
        if factors.error is not None:
            why.append(f"layer output error {factors.error:.2%} on the calibration data (plain SVD {factors.plain_error:.2%})")
        if plain:
            why.append(f"not data-aware: {plain}")
        if timing:
            why.append(f"timed alone at {timing['rows']} row(s): {timing['original']:.1f} us -> {timing['factored']:.1f} us")
        self._write(site.graph, layer, group, factors)
        params = r * (k + n)
        action = f"rank {r}/{min(k, n)}: [{k}x{r}] @ [{r}x{n}]"
        decisions = [FactorizedLayer(site.name, site.node.op_type, weight, action, "; ".join(why), record.nbytes,
                                     params * 4, r, min(k, n), k * n, params, factors.error, factors.plain_error, timing)]
        for other in group[1:]:
            decisions.append(FactorizedLayer(other.name, other.node.op_type, weight, action + " (tied: shared factors)",
                                             f"shares the factors of {site.name}", 0, 0, r, min(k, n), 0, 0))
        return decisions

    def _latency(self, site, layer, k, n, r):
        """(timing, reason to keep the layer) from timing it alone, original vs factored (cached per shape)."""
        if not self.config.check_latency:
            return None, ""
        rows = self._rows.get(site.node.input[0], 1) if layer.main_graph else 1
        key = (layer.op_type, k, n, r, rows, layer.transposed)
        if key not in self._timings:
            self._timings[key] = self.timer(layer.op_type, k, n, r, rows, layer.transposed, self.threads)
        before, after = self._timings[key]
        timing = {"original": before * 1e6, "factored": after * 1e6, "rows": rows}
        if after > before:
            return timing, (f"factored layer measured slower: {after * 1e6:.1f} us vs {before * 1e6:.1f} us "
                            f"at {rows} row(s) (--allow-slower factorizes it anyway)")
        return timing, ""

    @staticmethod
    def _with_timing(decision: FactorizedLayer, timing) -> FactorizedLayer:
        decision.latency_us = timing
        return decision

    def _write(self, graph, layer, group, factors: LowRank) -> None:
        """A and B as initializers in the graph that owns the weight; a MatMul X @ A before each reader."""
        names = self._names
        owner = self._owners[layer.weight][0]
        a_name, b_name = names(layer.weight + "_A"), names(layer.weight + "_B")
        b = factors.b / layer.alpha
        if layer.transposed:
            b = b.T
        owner.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(factors.a, dtype=np.float32), a_name),
                                  numpy_helper.from_array(np.ascontiguousarray(b, dtype=np.float32), b_name)])
        if factors.bias is not None:
            old = self._owners[layer.bias][1]
            value = (factors.bias / layer.bias_scale).astype(np.float32).reshape(tuple(old.dims))
            old.CopyFrom(numpy_helper.from_array(value, old.name))
        for site in group:
            where = site.graph
            first = names(site.name + "/lowrank")
            between = names(site.node.output[0] + "_lowrank")
            new = helper.make_node("MatMul", [site.node.input[0], a_name], [between], name=first)
            site.node.input[0] = between
            site.node.input[1] = b_name
            position = next(i for i, node in enumerate(where.node) if node.output and node.output[0] == site.node.output[0])
            where.node.insert(position, new)

    def _notes(self, report, done, data_aware) -> None:
        config = self.config
        if not done:
            report.notes.append("no layer factorized: " + ("every candidate was kept (see each layer's reason)"
                                                          if report.layers else "no MatMul/Gemm weight"))
        else:
            before = sum(layer.params_before for layer in done)
            after = sum(layer.params_after for layer in done)
            rank = f"rank ratio {config.rank_ratio}" if config.rank_ratio is not None else f"energy {config.energy}"
            report.notes.append(f"{len(done)} layer(s) factorized ({rank}): {before} -> {after} parameters in them "
                                f"({after / max(before, 1):.1%})")
        if data_aware and done:
            fitted = [layer for layer in done if layer.output_error is not None]
            if fitted:
                report.notes.append(
                    f"data-aware: {len(fitted)} layer(s) fitted in graph order to the original model's outputs on "
                    f"{self.calibration.samples} calibration sample(s) (SVD of the weight whitened by the Cholesky "
                    f"factor of X^T X, damping {config.damping}); mean layer output error "
                    f"{np.mean([layer.output_error for layer in fitted]):.2%} (plain SVD "
                    f"{np.mean([layer.plain_svd_error for layer in fitted]):.2%})")
        if config.check_latency and self._timings:
            report.notes.append(
                f"latency gate: {len(self._timings)} distinct layer shape(s) timed alone in onnxruntime ({self.threads} "
                "thread(s), the rows each layer sees at batch 1), original and factored runs interleaved, median of "
                "the per-pair ratios; a layer is factorized only where the factored pair was not slower")


# ---- helpers -------------------------------------------------------------------------------


def _k_n(node, shape) -> tuple[int, int]:
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return int(shape[1]), int(shape[0])
    return int(shape[0]), int(shape[1])


def _count(record) -> int:
    return int(np.prod(record.shape)) if record is not None and record.shape else 0


def _no_saving(r: int, k: int, n: int) -> str:
    return (f"rank {r} of {min(k, n)}: {r * (k + n)} parameters in the factors, not fewer than the weight's {k * n} "
            f"(a {k}x{n} weight saves only below rank {(k * n - 1) // (k + n)})")


def _tied_reason(record, group) -> str:
    """Why a weight read by several nodes cannot be factorized once for all of them, or ''."""
    readers = record.consumers
    if len(readers) > len(group):
        others = [f"{c.node} ({c.op_type})" for c in readers
                  if not any(c.node == s.name or c.node.endswith("/" + s.name) for s in group)]
        return (f"weight also read by {', '.join(others) or 'another input'}, which is not factorized: it would still "
                "need the full weight")
    if len(group) > 1:
        layouts = {(s.node.op_type, int(attr(s.node, "transB", 0)), float(attr(s.node, "alpha", 1.0))) for s in group}
        if len(layouts) > 1:
            return "tied weight read in different layouts (MatMul / Gemm transB / alpha): one pair of factors cannot serve all"
    return ""


def factored_pairs(model: onnx.ModelProto, records) -> dict[str, str]:
    """Output name -> reason, for both halves of X @ A @ B already in the model (A [K, r], B [r, N], r < min(K, N)).

    Such a pair is what this pass writes (or a bottleneck the model has): factorizing its halves again would
    only cut rank further, so running the pass twice changes nothing more."""
    found = {}
    for graph in iter_graphs(model.graph):
        producers = {o: node for node in graph.node for o in node.output}
        readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        outputs = {o.name for o in graph.output}
        for node in graph.node:
            if node.op_type not in SUPPORTED_OPS or len(node.input) < 2 or node.input[1] not in records:
                continue
            first = producers.get(node.input[0])
            if first is None or first.op_type != "MatMul" or len(first.input) < 2 or first.input[1] not in records:
                continue
            if readers.get(first.output[0], 0) != 1 or first.output[0] in outputs:
                continue
            a_shape, b_shape = records[first.input[1]].shape, records[node.input[1]].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or (node.op_type == "Gemm" and attr(node, "transA", 0)):
                continue
            k, r = a_shape
            _, n = _k_n(node, b_shape)
            if r < min(k, n):
                text = f"already factorized: {first.output[0]} = X @ {first.input[1]} [{k}x{r}] feeds {node.input[1]}"
                found[first.output[0]] = text + " (first half)"
                found[node.output[0]] = text + " (second half)"
    return found


def _nothing_to_factorize(pairs) -> str:
    if pairs:
        return "model is already factorized (X @ A @ B pairs): nothing more to factorize"
    return "no MatMul/Gemm weight to factorize"


def _layer_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rows it holds at batch 1: the product of all but its last dimension, unknown ones 1."""
    return {name: int(np.prod([d if d else 1 for d in dims[:-1]]))
            for name, dims in output_shapes(model).items() if len(dims) >= 2}


def _layer_model(op_type: str, k: int, n: int, r: int | None, rows: int, trans_b: bool) -> onnx.ModelProto:
    """One layer alone, [rows, K] -> [rows, N]: the original op, or (r given) MatMul [K, r] then the op on [r, N]."""
    rng = np.random.default_rng(0)
    inits, nodes, current, inner = [], [], "x", k
    if r is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal((k, r)).astype(np.float32), "a"))
        nodes.append(helper.make_node("MatMul", ["x", "a"], ["t"]))
        current, inner = "t", r
    shape = (n, inner) if trans_b else (inner, n)
    inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w"))
    if op_type == "Gemm":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        nodes.append(helper.make_node("Gemm", [current, "w", "c"], ["y"], transB=int(trans_b)))
    else:
        nodes.append(helper.make_node("MatMul", [current, "w"], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure_layer(op_type: str, k: int, n: int, r: int, rows: int, trans_b: bool = False, threads: int = 1,
                  budget_s: float = LATENCY_BUDGET_S) -> tuple[float, float]:
    """Median seconds per run of the layer alone (original, factored) in onnxruntime, at `rows` rows.

    Cheap: two tiny sessions per distinct shape, about `budget_s` of runs. Robust to a busy machine:
    the two run alternately, and the factored time is the original's median times the median of the
    per-pair ratios, so a slowdown that hits both (another process, frequency scaling) cancels out."""
    from onnxshrink.runtime import make_session

    sessions = [make_session(_layer_model(op_type, k, n, None, rows, trans_b), threads),
                make_session(_layer_model(op_type, k, n, r, rows, trans_b), threads)]
    feed = {"x": np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)}
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times = ([], [])
    start = time.perf_counter()
    while len(times[0]) < LATENCY_MAX_RUNS and (len(times[0]) < LATENCY_MIN_RUNS or time.perf_counter() - start < budget_s):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    original = statistics.median(times[0])
    ratio = statistics.median(b / max(a, 1e-12) for a, b in zip(*times))
    return original, original * ratio
