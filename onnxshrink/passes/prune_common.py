"""What the pruning passes share: their config and its checks, a layer's weight seen as the [K, N] matrix it
multiplies by, and the captures that feed a refit.

prune.py zeroes weights, prune_channels.py removes channels, and factorize.py and cluster.py refit layers the
same way: each reads a layer through `describe`/`matrix`/`read_bias`, refits it against `teacher_gram` (X from
the model as rewritten so far, Y the original model's outputs) and writes it back with `write`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink import memory
from onnxshrink.algorithms.reconstruct import DEFAULT_DAMPING, Gram, token_weights
from onnxshrink.algorithms.sparsegpt import KEPT_REFIT_DAMP
from onnxshrink.data import PADDING_MASKS
from onnxshrink.errors import UsageError
from onnxshrink.passes.common import attr, initializer_owners
from onnxshrink.runtime import Capture, capture_activations
from onnxshrink.scratch import scratch_dir
from onnxshrink.streaming import TensorStore

SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
PATTERNS = ("unstructured", "N:M", "channel")
IMPORTANCES = ("magnitude", "activation")
METHODS = ("sparsegpt", "refit", "mask")
SCOPES = ("auto", "layer", "global")
STORAGES = ("dense", "sparse")
MAX_LAYER_SPARSITY = 0.98


@dataclass
class PruneConfig:
    sparsity: float | None = 0.5  # overall fraction of zeros in the pruned weights (not used with N:M)
    pattern: str = "unstructured"  # "unstructured", "N:M" such as "2:4", or "channel"
    importance: str | None = None  # "magnitude" or "activation"; None: activation with data, else magnitude
    scope: str = "auto"
    reconstruct: bool = True  # update kept weights with calibration data (False: method "mask")
    # With calibration data, how kept weights are updated: "sparsegpt" (OBS updates from each layer's X^T X,
    # algorithms/sparsegpt.py), "refit" (least squares to the original's outputs, algorithms/reconstruct.py) or
    # "mask" (none). None: refit.
    method: str | None = None
    # sparsegpt: each layer's X^T X from the model with upstream layers already pruned, towards the original's
    # outputs (two runs per wave of layers); False: all from the original model in one run (measured better on
    # MiniLM and the sample CNN, worse on the sample MLP at 80-90%: README, prune)
    sequential: bool = False
    capture_rounds: int = 0  # sparsegpt, sequential: at most this many capture rounds (0: one per wave of layers)
    # sparsegpt: then refit each output's kept weights by least squares from X^T X alone, damped towards the dense
    # weights by kept_refit_damping * mean(diag H) (1e-6, nearly undamped, was the old way; MiniLM 50%: cosine
    # 0.932 at 1e-6, 0.941 at 0.1, docs/prune.md)
    kept_refit: bool = True
    kept_refit_damping: float = KEPT_REFIT_DAMP
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()
    keep_float: str | None = None  # "first", "last" or "both": left unpruned
    layer_sparsity: dict = field(default_factory=dict)  # node name -> fraction
    sensitivity: dict | None = None  # SensitivityReport.to_dict(): measured curves for scope auto
    storage: str = "dense"
    damping: float = DEFAULT_DAMPING
    refit_steps: int = 4  # with reconstruction: prune and refit in this many stages per layer
    remove_dead_units: bool = False  # then drop the units no weight reads any more (passes/dead_units.py): exact


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None for the other patterns; UsageError for a malformed or impossible N:M."""
    if pattern in ("unstructured", "channel"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern or "")
    if not match:
        raise UsageError(f"--pattern {pattern!r}: choose unstructured, channel or N:M (such as 2:4)")
    keep, group = int(match[1]), int(match[2])
    if not 0 < keep < group:
        raise UsageError(f"--pattern {pattern}: N:M keeps N of every M weights, so 0 < N < M (such as 2:4)")
    return keep, group


def check_config(config: PruneConfig, calibration) -> None:
    """Contradictions and out-of-range values as UsageError, before any model is read."""
    nm = parse_nm(config.pattern)
    if config.importance not in (None, *IMPORTANCES):
        raise UsageError(f"--importance must be magnitude or activation, not {config.importance!r}")
    if config.scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {config.scope!r}")
    if config.storage not in STORAGES:
        raise UsageError(f"--storage must be dense or sparse, not {config.storage!r}")
    if config.storage == "sparse" and config.pattern == "channel":
        raise UsageError("--storage sparse stores zeros compactly; --pattern channel removes channels and leaves none")
    if config.keep_float not in (None, "first", "last", "both"):
        raise UsageError(f"--keep-float must be first, last or both, not {config.keep_float!r}")
    if config.method not in (None, *METHODS):
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {config.method!r}")
    if config.method in ("sparsegpt", "refit") and calibration is None:
        raise UsageError(f"--method {config.method} needs calibration data (--calibration FILE.npz)")
    if config.method in ("sparsegpt", "refit") and not config.reconstruct:
        raise UsageError(f"--method {config.method} updates the kept weights; --no-reconstruct asks for none "
                         "(use --method mask)")
    if config.importance == "activation" and calibration is None:
        raise UsageError("--importance activation needs calibration data (--calibration FILE.npz)")
    if nm is not None:  # the pattern fixes the sparsity at 1 - N/M; `sparsity` is not used
        if config.layer_sparsity:
            raise UsageError(f"--layer-sparsity cannot be combined with --pattern {config.pattern}")
    else:
        if config.sparsity is None:
            raise UsageError("--sparsity is required (a fraction of zeros, such as 0.8)")
        if not 0.0 <= config.sparsity <= MAX_LAYER_SPARSITY:
            raise UsageError(f"--sparsity {config.sparsity}: must be between 0 and {MAX_LAYER_SPARSITY}")
    for name, value in config.layer_sparsity.items():
        if not 0.0 <= value <= MAX_LAYER_SPARSITY:
            raise UsageError(f"--layer-sparsity {name}={value}: must be between 0 and {MAX_LAYER_SPARSITY}")
    unknown = set(config.op_types) - set(SUPPORTED_OPS)
    if unknown:
        raise UsageError(f"--op-types: unsupported op type(s) {', '.join(sorted(unknown))} (choose from MatMul, Gemm, Conv)")
    if not config.damping > 0:
        raise UsageError(f"damping {config.damping}: must be positive")
    if not config.kept_refit_damping > 0:
        raise UsageError(f"kept_refit_damping {config.kept_refit_damping}: must be positive")
    if not (isinstance(config.refit_steps, int) and config.refit_steps >= 1):
        raise UsageError(f"refit_steps {config.refit_steps}: must be a positive integer")


@dataclass
class Layer:
    """A prunable layer, read before any rewrite: how its weight maps to [K, N], and its bias."""

    name: str
    op_type: str
    weight: str
    x: str
    output: str
    main_graph: bool
    shape: tuple  # the initializer's shape
    alpha: float
    transposed: bool  # Gemm transB=1
    bias: str | None  # an initializer read by this layer only, [N]
    bias_scale: float  # Gemm beta
    conv: dict | None  # kernel, strides, pads, dilations when the inputs can be unfolded (2-D, group 1)
    reason: str = ""  # why data-aware steps do not apply

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def describe(site, owners, records, main_outputs) -> Layer:
    """A selected layer as a [K, N] matrix view: its weight's layout, its bias (an initializer only it reads), and
    why its inputs cannot be captured or unfolded, if so."""
    node = site.node
    shape = tuple(int(d) for d in owners[site.weight][1].dims)
    gemm, conv = node.op_type == "Gemm", node.op_type == "Conv"
    n = shape[0] if conv or (gemm and attr(node, "transB", 0)) else shape[1]
    bias, scale = None, 1.0
    if gemm or conv:
        candidate = node.input[2] if len(node.input) > 2 and node.input[2] else None
        scale = float(attr(node, "beta", 1.0)) if gemm else 1.0
    else:  # MatMul followed by an Add of a constant [N] vector
        consumers = [c for c in site.graph.node if node.output[0] in c.input]
        candidate = None
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            other = [i for i in consumers[0].input if i != node.output[0]]
            candidate = other[0] if len(other) == 1 else None
    if candidate in owners and candidate in records and records[candidate].dtype == "float" and \
            len(records[candidate].consumers) == 1 and int(np.prod(records[candidate].shape or [1])) == n and \
            records[candidate].shape[-1:] == [n] and scale != 0:
        bias = candidate
    reason, conv_info = "", None
    if node.output[0] not in main_outputs:
        reason = "inside an If/Loop/Scan body, whose inputs cannot be captured"
    elif conv:
        if len(shape) != 4 or attr(node, "group", 1) != 1 or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            reason = "only 2-D, group 1 Conv with explicit pads has its inputs unfolded"
        else:
            conv_info = {"kernel": shape[2:], "strides": list(attr(node, "strides", [1, 1])),
                         "pads": list(attr(node, "pads", [0, 0, 0, 0])), "dilations": list(attr(node, "dilations", [1, 1]))}
    return Layer(site.name, node.op_type, site.weight, node.input[0], node.output[0], not reason.startswith("inside"),
                 shape, float(attr(node, "alpha", 1.0)) if gemm else 1.0, bool(gemm and attr(node, "transB", 0)),
                 bias, scale, conv_info, reason)


def resolved_method(config: PruneConfig, calibration) -> str:
    """The weight update a config asks for: mask without calibration data or with reconstruct off."""
    if calibration is None or not config.reconstruct:
        return "mask"
    return config.method or "refit"


def input_size(layer: Layer) -> int:
    """K: the rows of the layer's [K, N] weight (Conv: Cin * kh * kw)."""
    if layer.op_type == "Conv":
        return int(np.prod(layer.shape[1:]))
    return layer.shape[1] if layer.transposed else layer.shape[0]


def matrix(layer: Layer, owners, read=numpy_helper.to_array) -> np.ndarray:
    """The weight as the layer multiplies by it, [K, N] float32 (Gemm alpha folded in; the refit works in float64).
    `read` gets the array of a tensor (a streaming store reads it from the data file)."""
    w = read(owners[layer.weight][1]).astype(np.float32)
    if layer.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    if layer.transposed:
        w = w.T
    return w * layer.alpha


def read_bias(layer: Layer, owners) -> np.ndarray | None:
    """The bias as the layer adds it, [N] float64 (Gemm beta folded in), or None."""
    if layer.bias is None or layer.bias not in owners:
        return None
    return numpy_helper.to_array(owners[layer.bias][1]).astype(np.float64).reshape(-1) * layer.bias_scale


def write(layer: Layer, w: np.ndarray, bias: np.ndarray | None, owners, store=None) -> None:
    """Put a [K, N] matrix (and bias) back in the initializers, in their original layout (through `store`: a
    streaming one writes the weight to the output's data file)."""
    if layer.op_type == "Conv":
        raw = w.T.reshape(layer.shape)
    else:
        raw = (w.T if layer.transposed else w) / np.float32(layer.alpha)
    tensor = owners[layer.weight][1]
    (store or TensorStore()).replace(tensor, np.ascontiguousarray(raw, dtype=np.float32))
    del raw
    if bias is not None:
        old = owners[layer.bias][1]
        value = (bias / layer.bias_scale).astype(np.float32).reshape(tuple(old.dims))
        old.CopyFrom(numpy_helper.from_array(value, old.name))


def unfold(layer: Layer, x: np.ndarray) -> np.ndarray:
    """A layer's input as the rows its [K, N] weight multiplies: [rows, K] (Conv: im2col patches)."""
    x = np.asarray(x, dtype=np.float32)
    if layer.op_type != "Conv":
        return x.reshape(-1, input_size(layer))
    info = layer.conv
    (kh, kw), (sh, sw), (dh, dw) = info["kernel"], info["strides"], info["dilations"]
    top, left, bottom, right = info["pads"]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    b, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    patches = np.empty((b, ho, wo, c, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            patches[..., i, j] = window.transpose(0, 2, 3, 1)
    return patches.reshape(b * ho * wo, c * kh * kw)


def teacher_gram(dataset, original, model, layer, original_layer, bias: bool, threads: int = 1, columns=None) -> Gram:
    """X^T X and X^T Y of one layer: X from the model as rewritten so far, Y the original model's outputs, on the
    real tokens (token_rows: padding left out).

    `original_layer` describes the layer as it is in `original` (channel pruning changes its shape);
    `columns` picks the original outputs that the layer still computes."""
    owners = initializer_owners(original)
    original_w = matrix(original_layer, owners)
    original_b = read_bias(original_layer, owners) if bias else None
    if columns is not None:
        original_w = original_w[:, columns]
        original_b = original_b[columns] if original_b is not None else None
    gram = Gram(input_size(layer), original_w.shape[1], bias=bias)
    with scratch_dir("teacher") as spill:  # the original first, as in teacher_grams (_spill_teacher_outputs)
        spilled = _spilled(spill)
        _spill_teacher_outputs(dataset, original, [(0, original_layer, original_w)], threads, spilled)
        for batch_index, (batch, now) in enumerate(capture(dataset, model, [layer.x], threads)):
            value = now.get(layer.x, batch.get(layer.x))
            rows, x = token_rows(batch, value, layer), unfold(layer, value)
            x = x if rows is None else x[rows]
            y = np.load(spilled(batch_index, 0))
            weights = row_weights(np.shape(value), layer, x, rows)
            gram.add(x, y if original_b is None else y + original_b, weights=weights)
    return gram


def _spilled(spill) -> Callable[[int, int], Path]:
    """Where the teacher outputs of (batch, layer) wait in the scratch folder `spill`."""
    return lambda batch_index, index: Path(spill) / f"{batch_index}-{index}.npy"


def _spill_teacher_outputs(dataset, original, taught: list, threads: int, spilled) -> None:
    """One run of the original over the calibration data, each taught layer's outputs X0 W (its real tokens: padding
    left out, as every other statistic here leaves it) saved per batch, `taught` as (index, layer, W). Why on disk:
    a capture session on the original and one on the model at once held the weights four times over (our arrays
    and onnxruntime's copy, twice), 3.32 GB on MPNet's late cluster rounds, 3.64 GB in its factorize
    (bench/memory_sample.py pass)."""
    inputs = sorted({layer.x for _, layer, _ in taught})
    for batch_index, (batch, before) in enumerate(capture(dataset, original, inputs, threads)):
        for index, layer, w in taught:
            value0 = before.get(layer.x, batch.get(layer.x))
            rows, x0 = token_rows(batch, value0, layer), unfold(layer, value0)
            np.save(spilled(batch_index, index), (x0 if rows is None else x0[rows]) @ w)
        del before
    memory.release()


def capture(dataset, model, names, threads: int = 1):
    """(batch, {name: value}) for every calibration batch; graph inputs are read from the batch itself.

    Only the part of the graph that computes `names` runs: the layers of the first transformer block are captured
    at a sixth of a full run's cost on MiniLM. A large batch runs in row chunks (runtime.Capture), joined: one
    batch's values are in memory, onnxruntime's copies and intermediates are a chunk's."""
    graph_inputs = {i.name for i in model.graph.input}
    captured = sorted({n for n in names if n not in graph_inputs})
    batches = dataset.batches
    if not captured:
        return ((batch, {}) for batch in batches)
    return zip(batches, capture_activations(model, captured, batches, threads,
                                            batch_axes=getattr(dataset, "batch_axes", None)))


def input_key(layer: Layer) -> tuple:
    """What a layer's [rows, K] input rows depend on: layers with the same key (q, k and v) read the same rows."""
    return layer.x, layer.op_type == "Conv", str(layer.conv), input_size(layer)


def layer_rows(dataset, model, layers, threads: int = 1):
    """For each calibration batch, an iterator of (input_key, x, weights): x the [rows, K] float32 rows each
    distinct layer input gives its weight (`unfold`), padding tokens left out (`token_rows`), one key per input its
    layers share; weights each row's in the statistics (`row_weights`: None, every row counts once).

    The rows are the whole batch's, the same values in the same order as `capture` + `unfold` + `token_rows` of the
    joined batch, so statistics computed from them are the same bytes as before. What is held is less: a batch that
    runs in row chunks (runtime.Capture) keeps only each chunk's real-token rows, not the joined values of the
    whole batch (MPNet: 528 MB of captured values per 32-sentence batch, four fifths of them padding). A layer
    input without a padding mask keeps its chunks' values, joined and unfolded one layer input at a time."""
    first = {}
    for layer in layers:
        first.setdefault(input_key(layer), layer)
    names = sorted({layer.x for layer in first.values()})
    capture = Capture(model, names, threads)
    batches = dataset.batches
    pending = None
    for feed, values in capture.runs(batches, None, getattr(dataset, "batch_axes", None)):
        rows = capture.rows_per_run[-1]
        if rows is None or rows == capture.batch_rows:  # the whole batch in one run
            yield _whole_batch_rows(feed, values, first)
            continue
        if pending is None:
            pending = _ChunkedRows(batches[capture.batch], capture.batch_rows, first)
        pending.add(feed, values, rows)
        del values
        if pending.filled == pending.batch_rows:
            yield pending.rows()
            pending = None


def _whole_batch_rows(batch: dict, values: dict, first: dict):
    for key, layer in first.items():
        value = values.get(layer.x, batch.get(layer.x))
        keep = token_rows(batch, value, layer)
        x = unfold(layer, value)
        x = x if keep is None else x[keep]
        yield key, x, row_weights(np.shape(value), layer, x, keep)


class _ChunkedRows:
    """One batch's layer input rows gathered from its row chunks (`layer_rows`)."""

    def __init__(self, batch: dict, batch_rows: int, first: dict):
        self.batch, self.batch_rows, self.first, self.filled = batch, batch_rows, first, 0
        self.parts: dict = {key: [] for key in first}  # real-token rows [r, K], or raw chunk values (no mask)
        self.masked: dict = {}  # key -> the whole batch's real-token rows (None: every row counts)
        self.whole: dict = {}  # key -> a value not along the batch axis (the same in every chunk): the last
        self.shapes: dict = {}  # key -> one chunk's value shape (row_weights: tokens are the rows of a 3-D value)

    def add(self, feed: dict, values: dict, rows: int) -> None:
        for key, layer in self.first.items():
            value = np.asarray(values.get(layer.x, feed.get(layer.x)))
            self.shapes[key] = value.shape
            if key in self.whole or not value.ndim or value.shape[0] != rows:
                self.whole[key] = value  # as runtime's joiner keeps it
                continue
            if key not in self.masked:  # decided on the whole batch's mask, as for the joined batch
                shape = (self.batch_rows, *value.shape[1:])  # the joined value's: only its shape is read
                self.masked[key] = token_rows(self.batch, np.broadcast_to(np.float32(0), shape), layer)
            keep = self.masked[key]
            if keep is None:
                self.parts[key].append(value)
            else:
                per_sample = keep.size // self.batch_rows
                here = keep[self.filled * per_sample:(self.filled + rows) * per_sample]
                self.parts[key].append(unfold(layer, value)[here])
        self.filled += rows

    def rows(self):
        for key, layer in self.first.items():
            parts = self.parts.pop(key)
            if key in self.whole:
                value = self.whole.pop(key)
                keep = token_rows(self.batch, value, layer)
                x = unfold(layer, value)
                x = x if keep is None else x[keep]
                shape = np.shape(value)
            else:
                joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
                keep = self.masked.get(key)
                x = joined if keep is not None else unfold(layer, joined)
                shape = (self.batch_rows, *self.shapes[key][1:])  # the joined batch's value
                del joined
            del parts  # only this input's rows are held while its statistics are summed
            yield key, x, row_weights(shape, layer, x, keep)
            del x


def teacher_grams(dataset, original, model, layers, biases: dict, threads: int = 1, own: set = frozenset()) -> dict:
    """`teacher_gram` of several layers (same in `model` and `original`) from ONE run of each model over the
    calibration data: every layer's input is captured in the same session run, and layers reading the same
    tensor (q, k and v) share its X^T X. What a layer sees is exact when none of `layers` feeds another (a wave);
    otherwise a later layer sees the earlier ones as they are in `model` now (uncompressed). The layers named in
    `own` are fitted to their own function of the inputs they see (Y = X W, not the original's X0 W): a layer
    below another of the same run must not correct the upstream drift that the one above corrects already.

    The original runs first and its layers' outputs wait on disk, one file per batch and layer, while the model
    runs (_spill_teacher_outputs)."""
    owners = initializer_owners(original)
    teachers = {}
    for layer in layers:
        w = matrix(layer, owners)
        teachers[layer.name] = (w, read_bias(layer, owners) if biases.get(layer.name) else None)
    grams = {layer.name: Gram(input_size(layer), teachers[layer.name][0].shape[1], bias=bool(biases.get(layer.name)))
             for layer in layers}
    taught = [(index, layer, teachers[layer.name][0]) for index, layer in enumerate(layers) if layer.name not in own]
    with scratch_dir("teacher") as spill:  # private (0700), removed on return; swept if a killed run left it
        spilled = _spilled(spill)
        if taught:
            _spill_teacher_outputs(dataset, original, taught, threads, spilled)
        for batch_index, (batch, now) in enumerate(capture(dataset, model, sorted({layer.x for layer in layers}),
                                                           threads)):
            shared: dict = {}  # (input, bias) -> this batch's X^T X and row weights, once for all its readers
            for index, layer in enumerate(layers):
                value = now.get(layer.x, batch.get(layer.x))
                rows, x = token_rows(batch, value, layer), unfold(layer, value)
                if rows is not None:
                    x = x[rows]
                w, b = teachers[layer.name]
                y = x @ w if layer.name in own else np.load(spilled(batch_index, index))
                gram = grams[layer.name]
                key = (layer.x, gram.bias, layer.op_type, str(layer.conv))
                if key not in shared:
                    weights = row_weights(np.shape(value), layer, x, rows)
                    probe = Gram(gram.k, 0, bias=gram.bias)
                    probe.add(x, weights=weights)
                    shared[key] = (probe.xtx, weights)
                xtx, weights = shared[key]
                gram.add(x, y if b is None else y + b, xtx=xtx, weights=weights)
    return grams


def few_rows_note(shapes) -> str | None:
    """A report note when the calibration data gives some layer fewer input rows (tokens, pixels) than it has inputs,
    from (K, rows) pairs, else None. Its X^T X is then singular: the OBS updates, GPTQ rounding and refits fit those
    rows rather than the layer's function, and held-out accuracy grows with more data (docs/prune.md: MiniLM 50%
    pruned, 32/64/128 calibration sentences gave cosine 0.861/0.907/0.932)."""
    short = [(k, rows) for k, rows in shapes if 0 < rows < k]
    if not short:
        return None
    rows = min(r for _, r in short)
    return (f"calibration gives {rows} input row(s) (tokens or positions, padding left out) to {len(short)} layer(s) "
            f"with more inputs than that (up to {max(k for k, _ in short)}): their X^T X is singular and the weight "
            "updates fit those rows; more calibration data (several times the layer width) measured better")


def token_rows(batch: dict, value, layer) -> np.ndarray | None:
    """Which of a [batch, sequence, K] activation's rows are real tokens, when the batch has an attention mask of
    that [batch, sequence] shape (None: every row counts). A padded position's outputs are masked out of every
    real token's and of the model's users' results, so fitting a layer to them spends its accuracy on nothing;
    MiniLM's calibration sentences are four fifths padding."""
    if layer.op_type == "Conv" or value is None or np.ndim(value) != 3:
        return None
    mask = padding_mask(batch, np.shape(value)[:2])
    return None if mask is None else mask.reshape(-1)


def row_weights(shape, layer, x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray | None:
    """Each of `x`'s rows' weight in the layer's statistics (`reconstruct.token_weights`) when they are tokens: a
    MatMul or Gemm reading a [batch, sequence, K] input (`shape`, the input's), `keep` the rows of it that `x`
    holds (`token_rows`; None: all). None (equal weights) for an image's pixels and an MLP's samples: nothing
    downstream divides those by their own norm."""
    if layer.op_type == "Conv" or len(shape) != 3 or not len(x):
        return None
    batch, sequence = shape[:2]
    samples = np.repeat(np.arange(batch), sequence)
    return token_weights(x, samples if keep is None else samples[keep])


def padding_mask(batch: dict, shape) -> np.ndarray | None:
    """[batch, sequence] bool, True for real tokens, from the batch's attention mask of that shape (None: none)."""
    for name in PADDING_MASKS:
        mask = batch.get(name)
        if mask is not None and np.ndim(mask) == 2 and tuple(np.shape(mask)) == tuple(shape) \
                and np.isin(mask, (0, 1)).all() and mask.any():
            return np.asarray(mask) != 0
    return None


def upstream_layers(graph, layers) -> dict[str, set]:
    """For each layer, the names of the layers whose output reaches its input (main graph, in graph order, which
    ONNX keeps topological)."""
    by_output = {layer.output: layer.name for layer in layers}
    upstream: dict = {}
    for node in graph.node:
        names = frozenset().union(*(upstream.get(i, frozenset()) for i in node.input))
        for t in node.output:
            upstream[t] = names | {by_output[t]} if t in by_output else names
    return {layer.name: set(upstream.get(layer.x, frozenset())) for layer in layers}


def capture_rounds(upstream: dict, rounds: int) -> dict:
    """Layer name -> capture round when at most `rounds` are allowed ({} for no limit): a layer's depth is the
    longest chain of layers above it, and consecutive depths share a round (MiniLM, 6 rounds: one per block)."""
    if rounds <= 0:
        return {}
    depth: dict = {}
    order = sorted(upstream, key=lambda name: len(upstream[name]))  # every layer after all those above it
    for name in order:
        depth[name] = 1 + max((depth[other] for other in upstream[name] if other != name), default=-1)
    levels = max(depth.values(), default=0) + 1
    per = -(-levels // rounds)
    return {name: d // per for name, d in depth.items()}


class RoundCapture:
    """Teacher statistics (`teacher_grams`) of the layers a pass rewrites in graph order, captured a round at a
    time instead of one layer at a time: asked for a layer not captured yet, it runs the model as rewritten so
    far and the original once each for the layer's whole round, and keeps the others' Grams until they are asked
    for. A round is a wave (`rounds` 0: every pending layer with no pending layer upstream, so the statistics are
    exactly those of a capture per layer; MiniLM: q, k and v), or with `rounds` N > 0 up to N rounds of
    consecutive depths (one per transformer block on MiniLM with 6), whose later layers see the round's earlier
    ones uncompressed and are fitted to their own outputs (only the round's first layers correct the drift from
    the rounds before: fitted to the original's outputs too, they corrected it twice, MiniLM cosine 0.57);
    `rounds` -1 captures each layer alone (the old way, two runs per layer)."""

    def __init__(self, dataset, original, model, layers, biases: dict, rounds: int = 0, threads: int = 1):
        self.dataset, self.original, self.model, self.threads = dataset, original, model, threads
        self.layers, self.biases, self.rounds = list(layers), biases, rounds
        self.upstream = upstream_layers(model.graph, self.layers) if rounds >= 0 else {}
        self.round = capture_rounds(self.upstream, rounds) if rounds > 0 else {}
        self.done: set = set()
        self.grams: dict = {}
        self.runs = 0  # capture runs of each model (one per round)

    def of(self, layer) -> Gram:
        if layer.name not in self.grams:
            self._capture(layer)
        self.done.add(layer.name)
        return self.grams.pop(layer.name)

    def _capture(self, layer) -> None:
        pending = [other for other in self.layers if other.name not in self.done and other.name not in self.grams]
        if self.rounds < 0:
            wave = [layer]
        elif self.round:
            wave = [other for other in pending if self.round[other.name] == self.round[layer.name]]
        else:
            wave = [other for other in pending if not (self.upstream[other.name] - self.done - {other.name})]
        if not any(other.name == layer.name for other in wave):
            wave = [layer]
        names = {other.name for other in wave}
        own = {other.name for other in wave if (self.upstream.get(other.name, set()) - {other.name}) & names}
        self.grams.update(teacher_grams(self.dataset, self.original, self.model, wave, self.biases, self.threads, own))
        self.runs += 1
        memory.release()  # the round's sessions and activations are gone: their pages back to the system
