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


def run_batches(session, batches: list[dict]) -> dict[str, np.ndarray]:
    """Run every batch and join each output along axis 0 (stacked when outputs are scalars)."""
    names = [o.name for o in session.get_outputs()]
    collected: dict[str, list] = {n: [] for n in names}
    for batch in batches:
        try:
            values = session.run(names, batch)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"onnxruntime failed to run the model on the given inputs: {message[:300]}") from exc
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


def capture_activations(model: onnx.ModelProto, names: list[str], batches: list[dict], threads: int = 1):
    """Yield, batch by batch, the values of the named intermediate float tensors (main graph only).

    The model is run with those tensors added as outputs and optimizations off, so
    the values are exactly what the unfused graph computes. One batch is in memory
    at a time: calibrators accumulate statistics instead of keeping activations.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(probe, threads, optimize=False)
    for batch in batches:
        values = session.run(list(names), batch)
        yield dict(zip(names, values))
