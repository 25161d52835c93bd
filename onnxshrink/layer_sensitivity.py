"""How much each layer can be pruned or quantized: the model's output drift when that layer alone is changed.

For every prunable layer and every sparsity of a grid, the layer alone is pruned (importance as
prune would choose it, no refit, so the number shows the layer's own fragility) and the whole
model is run in onnxruntime on the calibration inputs. Drift is ||y - y0|| / ||y0|| over the
model's float outputs, y0 the original's; top-1 agreement is reported for class-score outputs.
Bit widths likewise: the layer's weights alone rounded to nearest on a symmetric grid (8 bits: one
scale per output channel, as dynamic int8; fewer: blocks of 32 along the input axis, as `--bits 4`).
`onnxshrink prune --sensitivity FILE.json` allocates its per-layer sparsities from these curves, and
`onnxshrink quantize --sensitivity FILE.json --max-layer-drift F` keeps the layers above F float.
Cost: one onnxruntime session and run per layer and sparsity or bit width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.algorithms import gptq
from onnxshrink.model import iter_graphs, prepare

from onnxshrink.data import Dataset, input_specs, synthesize
from onnxshrink.errors import DataError, UsageError
from onnxshrink.passes.prune import SUPPORTED_OPS, Prune, PruneConfig
from onnxshrink.progress import reporting, step
from onnxshrink.report import JsonReport
from onnxshrink.runtime import make_session, probe_runs, run_batches

DEFAULT_SPARSITIES = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_BITS = (8, 4, 3, 2)
BIT_BLOCK = 32


@dataclass
class SensitivityConfig:
    sparsities: tuple = DEFAULT_SPARSITIES
    importance: str | None = None  # as prune: activation with data, else magnitude
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()
    bits: tuple = DEFAULT_BITS


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    weight: str
    weights: int
    drift: list  # relative output error at each sparsity of the report's grid
    agreement: list  # top-1 agreement with the original (None when no output holds class scores)
    bit_drift: list = field(default_factory=list)  # relative output error at each bit width of the report's `bits`
    bit_agreement: list = field(default_factory=list)


@dataclass
class SensitivityReport(JsonReport):
    model: str
    samples: int
    synthetic_inputs: bool
    importance: str
    sparsities: list
    bits: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # LayerSensitivity, in graph order
    skipped: list = field(default_factory=list)  # LayerDecision of layers not measured
    notes: list = field(default_factory=list)


def measure(model: onnx.ModelProto, dataset: Dataset | None, config: SensitivityConfig | None = None,
            model_path: str = "", threads: int = 1, stop=None, shapes: dict | None = None) -> SensitivityReport:
    """`stop()`, asked before each layer's runs, ends the measurement when true (a caller's deadline): the layers
    not reached are left out of the report and a note says so."""
    config = config or SensitivityConfig()
    grid = sorted(float(s) for s in config.sparsities)
    if not grid or any(not 0.0 < s < 1.0 for s in grid):
        raise UsageError(f"--sparsities {','.join(map(str, config.sparsities))}: each must be between 0 and 1 (exclusive)")
    if config.importance == "activation" and dataset is None:
        raise UsageError("--importance activation needs calibration data (--calibration FILE.npz)")
    notes = []
    synthetic = dataset is None
    session = make_session(model, threads)
    if synthetic:  # sized as validate sizes them: metadata, token rules, then probe runs (symbolic sizes are not 1)
        dataset = synthesize(input_specs(model), seed=0, shape_overrides=shapes, model=model, runs=probe_runs(session))
        notes.append("no --calibration: drift measured on synthetic (seeded random) inputs and magnitude importance")
        notes.extend(note for note in dataset.notes if not note.startswith("inputs are synthetic"))  # sizes, fills
    baseline = run_batches(session, dataset.batches)
    base = Prune(PruneConfig(sparsity=0.0, importance=config.importance, reconstruct=False, op_types=config.op_types,
                             exclude=config.exclude, scope="layer"), None if synthetic else dataset, threads)
    with reporting(None):
        _, probe = base(model)
    measured = [d for d in probe.layers if d.action.startswith(("sparsity", "pruned"))]
    skipped = [d for d in probe.layers if d not in measured]
    bits = sorted({int(b) for b in config.bits}, reverse=True)
    if any(not 2 <= b <= 8 for b in bits):
        raise UsageError(f"--bits {','.join(map(str, config.bits))}: each must be between 2 and 8")
    report = SensitivityReport(model_path, dataset.samples, synthetic, base.importance, grid, bits, skipped=skipped,
                               notes=notes)
    names = [d.node for d in measured]
    runs, done = len(measured) * (len(grid) + len(bits)), 0
    for index, decision in enumerate(measured):
        if stop is not None and stop():
            notes.append(f"stopped at the deadline: {index} of {len(measured)} layer(s) measured")
            break
        drift, agreement = [], []
        for s in grid:
            step(f"sensitivity: {decision.node}", done, runs)
            done += 1
            overrides = {name: 0.0 for name in names if name != decision.node}
            config_s = PruneConfig(sparsity=s, importance=base.importance, reconstruct=False, scope="layer",
                                   op_types=config.op_types, exclude=config.exclude, layer_sparsity=overrides)
            with reporting(None):  # one bar: the inner pass's layers are not this loop's steps
                pruned, _ = Prune(config_s, None if synthetic else dataset, threads)(model)
            outputs = run_batches(make_session(pruned, threads), dataset.batches)
            d, a = _drift(baseline, outputs)
            drift.append(d)
            agreement.append(a)
        layer = LayerSensitivity(decision.node, decision.op_type, decision.weight, decision.bytes_before // 4, drift, agreement)
        for b in bits:
            step(f"sensitivity: {decision.node}", done, runs)
            done += 1
            d, a = _drift(baseline, run_batches(make_session(_rounded(model, decision, b), threads), dataset.batches))
            layer.bit_drift.append(d)
            layer.bit_agreement.append(a)
        report.layers.append(layer)
    notes.append(f"{len(report.layers) * (len(grid) + len(bits))} onnxruntime run(s) on {dataset.samples} sample(s)")
    return report


def _rounded(model: onnx.ModelProto, decision, bits: int) -> onnx.ModelProto:
    """A copy of the model whose one layer has its weights rounded to `bits` (fake quantization, still float)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prepare(copy)  # a weight held in a Constant node becomes an initializer, as the passes see it
    node, tensor = None, None
    for graph in iter_graphs(copy.graph):
        node = node or next((n for n in graph.node if n.name == decision.node), None)
        tensor = tensor or next((t for t in graph.initializer if t.name == decision.weight), None)
    w = numpy_helper.to_array(tensor)
    transposed = decision.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    # As [K, N]: K the input axis (MatMul rows; Conv's Cin*kh*kw), N the output channels.
    matrix = w.reshape(w.shape[0], -1) if decision.op_type == "Conv" or transposed else w
    matrix = matrix.T if (decision.op_type == "Conv" or transposed) else matrix
    block = matrix.shape[0] if bits == 8 else BIT_BLOCK
    rounded = gptq.rtn(matrix, bits, block, symmetric=True).dequantize()
    rounded = rounded.T if (decision.op_type == "Conv" or transposed) else rounded
    tensor.CopyFrom(numpy_helper.from_array(rounded.reshape(w.shape).astype(w.dtype), tensor.name))
    return copy


def _drift(baseline: dict, outputs: dict) -> tuple[float, float | None]:
    errors, agreement = [], None
    for name, y0 in baseline.items():
        y0 = np.asarray(y0)
        if y0.dtype.kind != "f":
            continue
        y = np.asarray(outputs[name], dtype=np.float64)
        norm = float(np.linalg.norm(y0))
        errors.append(float(np.linalg.norm(y - y0)) / norm if norm > 0 else float(np.linalg.norm(y)))
        if agreement is None and y0.ndim == 2 and y0.shape[1] > 1:
            agreement = float(np.mean(np.argmax(y, axis=1) == np.argmax(y0, axis=1)))
    return (float(np.mean(errors)) if errors else 0.0), agreement


def load_report(path: str | Path) -> dict:
    """A sensitivity report written with --json / -o, as the dict PruneConfig.sensitivity takes."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such sensitivity file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a sensitivity report ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sparsities"), list) or not isinstance(data.get("layers"), list):
        raise DataError(f"{path}: not a sensitivity report (written by `onnxshrink sensitivity --json`)")
    return data


def layers_above(report: dict, bits: int, max_drift: float, where: str = "the report") -> list[tuple[str, float]]:
    """(node, drift) of the layers whose drift when rounded to `bits` exceeds `max_drift`, from a loaded report."""
    widths = report.get("bits") or []
    if bits not in widths:
        raise UsageError(f"{where} has no {bits}-bit measurement (it has: {', '.join(map(str, widths)) or 'none'}); "
                         f"rerun `onnxshrink sensitivity --bits {bits}`")
    column = widths.index(bits)
    found = []
    for layer in report["layers"]:
        drift = (layer.get("bit_drift") or [None] * len(widths))[column]
        if isinstance(drift, (int, float)) and drift > max_drift:
            found.append((layer["node"], float(drift)))
    return found
