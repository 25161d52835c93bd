"""onnxruntime sessions with the same options for every model, and what onnxruntime really runs."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.errors import ModelLoadError, UnsupportedModelError
from onnxshrink.codec.container import MAGIC as PACK_MAGIC
from onnxshrink.protos import iter_graphs
from onnxshrink.scratch import scratch_dir


def session_options(threads: int = 1, optimize: bool = True, optimized_path: str | None = None, prepack: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4  # fatal only: errors reach the user as one line, not as log noise
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@dataclass(frozen=True)
class InMemoryModel:
    """A model handed to onnxruntime as its graph's bytes without the large weights, and those weights as arrays
    (onnxruntime's external initializers, used in place, never copied into a protobuf). Why: serializing a
    decoded pack's weights and onnxruntime parsing them back cost 0.5 s of a 1.1 s MiniLM pack session."""

    graph: bytes
    weights: dict[str, np.ndarray] = field(default_factory=dict)


# Op domains stock onnxruntime (CPU) has kernels for; ops elsewhere need a custom-op library.
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training")


def _nodes(model: onnx.ModelProto):
    """Every node, subgraphs included, less those of the model's local functions' own domains (onnxruntime inlines them)."""
    local = {(f.domain, f.name) for f in model.functions}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if (node.domain, node.op_type) not in local:
                yield node


def make_session(model: str | os.PathLike | onnx.ModelProto | bytes | InMemoryModel, threads: int = 1, optimize: bool = True,
                 optimized_path: str | None = None, prepack: bool = True):
    """An onnxruntime CPU session; a model onnxruntime refuses is an unsupported model, not a crash.

    `model` is an ONNX file's path (onnxruntime reads its external data itself), a model in memory, or its
    serialized bytes, or an InMemoryModel (a decoded pack, from model.session_source). A pack's path is refused:
    this module never loads a file (model.load decodes packs, and asks this module whether onnxruntime
    accepts the result: loading here again once made reading a pack call itself 240 times).
    """
    import onnxruntime as ort

    in_memory = isinstance(model, (onnx.ModelProto, bytes, InMemoryModel))
    if not in_memory and _is_pack_path(model):
        raise TypeError(f"{model}: a pack must be decoded (model.load) before onnxruntime can run it")
    try:
        source = (model.SerializeToString() if isinstance(model, onnx.ModelProto) else model.graph
                  if isinstance(model, InMemoryModel) else model if in_memory else str(model))
    except Exception as exc:  # protobuf's EncodeError past 2 GiB
        raise UnsupportedModelError("the model is over 2 GiB: onnxruntime cannot load it from memory; "
                                    "save it with external data first") from exc
    options = session_options(threads, optimize, optimized_path, prepack)
    weights = []
    try:
        if isinstance(model, InMemoryModel) and model.weights:
            weights = [ort.OrtValue.ortvalue_from_numpy(array) for array in model.weights.values()]
            options.add_external_initializers(list(model.weights), weights)
        # No provider fallback: on some errors onnxruntime's fallback print()s a banner to stdout,
        # which would break `--json` and the one-line error.
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], enable_fallback=0)
        session._onnxshrink_weights = weights  # onnxruntime runs on these arrays: they live as long as the session
        return session
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # "Load model from /a/staging/path failed:" names a temporary file the user never sees.
        message = re.sub(r"Load model from .* failed:\s*", "", message)
        try:
            graph = (model if isinstance(model, onnx.ModelProto) else onnx.ModelProto.FromString(model)
                     if isinstance(model, bytes) else onnx.ModelProto.FromString(model.graph)
                     if isinstance(model, InMemoryModel) else onnx.load(str(model), load_external_data=False))
            custom = sorted({f"{n.domain}.{n.op_type}" for n in _nodes(graph) if n.domain not in KNOWN_DOMAINS})
        except Exception:  # the message stands without the hint
            custom = []
        hint = (f" (custom op {', '.join(custom[:3])}: onnxshrink runs every model it writes in stock onnxruntime, "
                "which has no kernel for it; `pack` needs none)") if custom else ""
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {message[:300]}{hint}") from exc


def _is_pack_path(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PACK_MAGIC)) == PACK_MAGIC
    except OSError:
        return False


def run_session(session, names: list[str], feed: dict) -> list:
    """session.run, where inputs onnxruntime cannot run are a one-line ModelLoadError, not its traceback."""
    try:
        return session.run(names, feed)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime failed to run the model on the given inputs: {message[:300]}") from exc


def run_batches(session, batches: list[dict]) -> dict[str, np.ndarray]:
    """Run every batch and join each output along axis 0 (stacked when outputs are scalars)."""
    names = [o.name for o in session.get_outputs()]
    collected: dict[str, list] = {n: [] for n in names}
    for batch in batches:
        values = run_session(session, names, batch)
        for name, value in zip(names, values):
            collected[name].append(np.asarray(value))
    joined = {}
    for name, parts in collected.items():
        if len(parts) == 1:
            joined[name] = parts[0]
        elif all(p.ndim > 0 for p in parts) and len({p.shape[1:] for p in parts}) == 1:
            joined[name] = np.concatenate(parts, axis=0)
        else:
            joined[name] = np.stack([p.reshape(-1) for p in parts]) if len({p.size for p in parts}) == 1 else np.concatenate([p.reshape(-1) for p in parts])
    return joined


def probe_runs(session):
    """batch -> None when the session runs it with every output non-empty, else why not: what `data.synthesize`
    probes image sizes and signal lengths with, so that synthesized inputs run the model."""
    names = [o.name for o in session.get_outputs()]

    def run(batch: dict) -> str | None:
        try:
            values = session.run(names, batch)
        except Exception as exc:
            return short_error(exc)
        empty = [n for n, v in zip(names, values) if np.asarray(v).size == 0]
        return f"empty output(s) {', '.join(empty)}" if empty else None

    return run


def short_error(exc: Exception) -> str:
    """onnxruntime's run error without its source path and C++ signature: `Reshape node 'fixed': The input ...`."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    status = text.split("Status Message:", 1)[1].strip() if "Status Message:" in text else text
    status = re.sub(r"^\S+\.(?:h|cc|cpp):\d+\s+", "", status)  # /onnxruntime_src/.../reshape_helper.h:91
    status = re.sub(r"^[\w:~<>]+\([^)]*\)\s*", "", status)  # onnxruntime::ReshapeHelper::ReshapeHelper(...)
    return (f"{node[1]} node {node[2]!r}: " if node else "") + status[:200]


def optimized_op_counts(model: str | os.PathLike | onnx.ModelProto, threads: int = 1) -> Counter:
    """Op histogram of the graph onnxruntime actually executes after its fusions, subgraphs included."""
    return op_counts(optimized_graph(model, threads))


def optimized_graph(model: str | os.PathLike | onnx.ModelProto, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime executes after its fusions and constant folding (weights not loaded)."""
    with scratch_dir("ort") as tmp:
        target = Path(tmp) / "optimized.onnx"
        make_session(model, threads, optimize=True, optimized_path=str(target), prepack=_quantized(model))
        return onnx.load(str(target), load_external_data=False)


def op_counts(optimized: onnx.ModelProto) -> Counter:
    counts = Counter()
    # Layers inside If/Loop/Scan bodies are fused there too; count them, or they look unfused.
    for graph in iter_graphs(optimized.graph):
        for node in graph.node:
            counts[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return counts


QUANTIZED_OPS = re.compile(r"Quant|Integer|^QLinear|^QGemm|NBits|^QAttention|^QEmbed")


def _quantized(model) -> bool:
    """Whether a model has quantized ops. A float model's op counts are read with prepacking off: it copies
    every MatMul/Conv weight into the kernels' layout, the whole model again in memory for a session that runs
    nothing (2.6 GB on the 2.58 GB pruned model, 0.07 GB without). A quantized one keeps it: without it,
    onnxruntime fuses DequantizeLinear-Conv-QuantizeLinear into no QLinearConv."""
    try:
        graph = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    except Exception:
        return True
    return any(QUANTIZED_OPS.search(node.op_type) for node in _nodes(graph))


CAPTURE_BYTES = 64 * 2**20  # captured values per onnxruntime run, past which a batch runs in row chunks
FIRST_ROWS = 2  # rows of the probe run that measures a batch layout's captured bytes per row (2: a Squeeze of
                # the batch axis, which a single row would trigger, is not taken)
IN_MEMORY_LOCATION = "onnxshrink-in-memory"  # names no file: onnxruntime takes these tensors' data from arrays
SPLIT_WEIGHT_BYTES = 65536  # larger initializers reach a capture session as arrays, not in the graph's bytes


class Capture:
    """A session that computes named intermediate float tensors of a model (main graph only): `runs(batches)`
    yields (feed, {name: value}) one onnxruntime run at a time.

    Memory stays bounded by design, whatever the model's and the batch's sizes:
    - the session holds only the nodes the names depend on, and gets the model's large weights as arrays: no
      copy of the model and no serialized one (onnxruntime 1.32 still copies the arrays, once);
    - a calibration batch whose captured values would pass `max_bytes` runs in row chunks along its batch axis,
      sized from the bytes per row that a probe of its first FIRST_ROWS rows measured (the probe is its first
      chunk; a batch that fits runs whole, as without a limit). Issue 15 item 5: MPNet's whole 32-sentence
      batch held 528 MB of captured values, and more again inside onnxruntime.
    A batch is split only when every input it feeds carries its samples on axis 0 (all of the same length, and
    `batch_axes`, a Dataset's, says so when given) and the model declares that axis non-fixed: rows are then
    independent, so statistics summed over the chunks equal the whole batch's up to summation order, and values
    joined from them are the same bytes. Optimizations are off: the values are what the unfused graph computes.
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], threads: int = 1):
        self.names = list(dict.fromkeys(names))
        self.free_batch_axis = _free_batch_axis(model)
        # a graph input is its feed: a session for it alone would have no node, which onnxruntime refuses
        fed = {value.name for value in model.graph.input} - {tensor.name for tensor in model.graph.initializer}
        self.fed = [name for name in self.names if name in fed]
        self.computed = [name for name in self.names if name not in fed]
        self.session = make_session(_capture_model(model, self.computed), threads, optimize=False) \
            if self.computed else None
        self.rows_per_run: list[int | None] = []  # rows of each onnxruntime run (None: a batch passed whole)
        self.batch = -1  # index of the batch the last run belonged to
        self.batch_rows: int | None = None  # its rows, when it may run in chunks

    def runs(self, batches, max_bytes: int | None = None, batch_axes: dict | None = None):
        """`max_bytes`: captured bytes per run past which a batch is split (None: CAPTURE_BYTES; 0: never)."""
        max_bytes = CAPTURE_BYTES if max_bytes is None else max_bytes
        per_row: dict = {}  # a batch layout (every input's shape past axis 0) -> captured bytes per row
        for index, batch in enumerate(batches):
            self.batch = index
            rows = _split_rows(batch, self.free_batch_axis, batch_axes) if max_bytes else None
            self.batch_rows = rows
            if rows is None:
                yield batch, self._run(batch, None)
                continue
            layout = tuple(sorted((name, np.shape(value)[1:], np.asarray(value).dtype.str) for name, value in batch.items()))
            start = 0
            if layout not in per_row:  # a probe of the first rows measures the bytes per row
                probe = min(FIRST_ROWS, rows)
                feed = {name: value[:probe] for name, value in batch.items()}
                values = self._run(feed, probe)
                per_row[layout] = _nbytes(values) / probe
                if probe < rows and per_row[layout] * rows <= max_bytes:
                    del values  # the whole batch fits: it runs as one, as without a limit
                else:
                    yield feed, values
                    del values
                    start = probe
            while start < rows:
                step = max(1, int(max_bytes // max(per_row[layout], 1.0)))
                stop = min(start + step, rows)
                feed = batch if (start, stop) == (0, rows) else {name: value[start:stop] for name, value in batch.items()}
                values = self._run(feed, stop - start)
                per_row[layout] = _nbytes(values) / (stop - start)
                yield feed, values
                del values
                start = stop

    def _run(self, feed: dict, rows: int | None) -> dict:
        values = dict(zip(self.computed, run_session(self.session, self.computed, feed))) if self.session else {}
        values.update({name: np.array(feed[name]) for name in self.fed})  # a copy, as onnxruntime's output is
        self.rows_per_run.append(rows)
        return {name: values[name] for name in self.names}


def _nbytes(values: dict) -> int:
    return sum(np.asarray(value).nbytes for value in values.values())


def capture_runs(model: onnx.ModelProto, names: list[str], batches, threads: int = 1,
                 max_bytes: int | None = None, batch_axes: dict | None = None):
    """Yield (feed, {name: value}) for each onnxruntime run (a batch, or a row chunk of one: Capture says when):
    for statistics that are sums over rows (min/max, histograms, X^T X), with one run's values in memory."""
    yield from Capture(model, names, threads).runs(batches, max_bytes, batch_axes)


def capture_activations(model: onnx.ModelProto, names: list[str], batches, threads: int = 1,
                        max_bytes: int | None = None, batch_axes: dict | None = None, join: bool = True):
    """Yield, batch by batch, the values of the named intermediate float tensors (main graph only).

    A batch runs in row chunks when its values would pass `max_bytes` (Capture); its values are then filled in
    chunk by chunk, so onnxruntime's copies and intermediates are one chunk's, and one batch's values are in
    memory. `join` False yields each run's values instead (a chunk's rows): all a statistic over rows needs."""
    capture = Capture(model, names, threads)
    joiner = None
    for _, values in capture.runs(batches, max_bytes, batch_axes):
        rows = capture.rows_per_run[-1]
        if not join or rows is None or rows == capture.batch_rows:
            yield values
            continue
        if joiner is None or joiner.batch != capture.batch:
            joiner = _BatchJoiner(capture.batch, capture.batch_rows)
        joiner.add(values, rows)
        del values
        if joiner.filled == joiner.rows:
            yield joiner.values()
            joiner = None


class _BatchJoiner:
    """A batch's values filled in from its row chunks, in arrays allocated once. A value whose axis 0 does not
    follow the chunk's rows (a shape, a constant) is the same in every chunk: the first chunk's is kept."""

    def __init__(self, batch: int, rows: int):
        self.batch, self.rows, self.filled, self.first_rows = batch, rows, 0, 0
        self.arrays: dict[str, np.ndarray] = {}  # along the batch axis
        self.whole: dict[str, np.ndarray] = {}  # without it
        self.names: list[str] = []

    def add(self, values: dict, rows: int) -> None:
        if self.filled == 0:
            self.names, self.first_rows = list(values), rows
        for name, value in values.items():
            value = np.asarray(value)
            if self.filled == 0:
                if value.ndim and value.shape[0] == rows:
                    self.arrays[name] = np.empty((self.rows, *value.shape[1:]), value.dtype)
                else:
                    self.whole[name] = value
            target = self.arrays.get(name)
            if target is None:
                continue
            if value.shape[1:] != target.shape[1:] or value.shape[0] != rows:
                # not along the batch axis after all: the first chunk's rows were its length by chance
                self.whole[name] = target[:self.first_rows].copy()
                del self.arrays[name]
                continue
            target[self.filled:self.filled + rows] = value
        self.filled += rows

    def values(self) -> dict:
        return {name: self.arrays[name] if name in self.arrays else self.whole[name] for name in self.names}


def _free_batch_axis(model: onnx.ModelProto) -> dict[str, bool]:
    """Graph input name -> whether its axis 0 is declared non-fixed (a name or nothing), for inputs of rank >= 1."""
    free = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else None
        if dims is None or not value.type.tensor_type.HasField("shape"):
            free[value.name] = True  # no shape declared: nothing fixes the batch
        elif len(dims):
            free[value.name] = not dims[0].HasField("dim_value")
        else:
            free[value.name] = False
    return free


def _split_rows(batch: dict, free_axis: dict[str, bool], batch_axes: dict | None) -> int | None:
    """The batch's rows when it may run in row chunks (Capture says when), else None."""
    lengths = set()
    for name, value in batch.items():
        shape = np.shape(value)
        if not shape or not free_axis.get(name, True) or (batch_axes is not None and batch_axes.get(name) != 0):
            return None
        lengths.add(shape[0])
    return lengths.pop() if len(lengths) == 1 and next(iter(lengths)) > 1 else None


def _capture_model(model: onnx.ModelProto, names: list[str]) -> InMemoryModel:
    """The part of `model` that computes `names` (its outputs), as a graph's bytes and its large weights as arrays:
    a copy of the nodes, never of the weights' bytes more than once. Every graph input stays, so a calibration
    batch feeds it unchanged."""
    graph = model.graph
    producers = {o: node for node in graph.node for o in node.output if o}
    needed, stack, keep = set(), list(names), set()
    while stack:
        name = stack.pop()
        if not name or name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(node.input)
        stack.extend(outer_names(node))
    out = without_graph(model)
    out.graph.name = graph.name
    out.graph.input.extend(graph.input)
    out.graph.node.extend(node for node in graph.node if id(node) in keep)
    inputs = {value.name for value in graph.input}
    weights = {}
    for tensor in graph.initializer:
        if tensor.name not in needed and tensor.name not in inputs:
            continue
        array = _weight_array(tensor) if tensor.name not in inputs else None
        if array is None:
            out.graph.initializer.append(tensor)
            continue
        weights[tensor.name] = array
        reference = out.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                              data_location=onnx.TensorProto.EXTERNAL)
        reference.external_data.add(key="location", value=IN_MEMORY_LOCATION)
    out.graph.sparse_initializer.extend(t for t in graph.sparse_initializer
                                        if t.values.name in needed or t.values.name in inputs)
    out.graph.value_info.extend(v for v in graph.value_info if v.name in needed)
    out.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return InMemoryModel(out.SerializeToString(), weights)


_ARRAY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.INT64}


def _weight_array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """A large raw initializer as an array onnxruntime can use in place (one copy of its bytes), else None."""
    if (tensor.data_type not in _ARRAY_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL
            or not tensor.HasField("raw_data") or any(d < 0 for d in tensor.dims)):
        return None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if count * dtype.itemsize < SPLIT_WEIGHT_BYTES:
        return None
    raw = tensor.raw_data
    if len(raw) != count * dtype.itemsize:
        return None  # left in the graph for onnxruntime to refuse, one line, as it would the model
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))


def without_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of all of `model` but its graph (opsets, functions, metadata): copying the graph would copy every
    weight, and a capture builds its own graph from the nodes it needs."""
    out = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name == "graph":
            continue
        if hasattr(value, "extend"):
            getattr(out, descriptor.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(out, descriptor.name).CopyFrom(value)
        else:
            setattr(out, descriptor.name, value)
    return out


def outer_names(node) -> set:
    """Names a node's subgraphs (If/Loop/Scan bodies) read (a superset of what they read from the enclosing scope)."""
    found = set()
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for sub in subgraphs:
            found.update(name for g in iter_graphs(sub) for inner in g.node for name in inner.input if name)
    return found
