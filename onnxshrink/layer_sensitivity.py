"""How much each layer can be pruned: the model's output drift when that layer alone is pruned.

For every prunable layer and every sparsity of a grid, the layer alone is pruned (importance as
prune would choose it, no refit, so the number shows the layer's own fragility) and the whole
model is run in onnxruntime on the calibration inputs. Drift is ||y - y0|| / ||y0|| over the
model's float outputs, y0 the original's; top-1 agreement is reported for class-score outputs.
`onnxshrink prune --sensitivity FILE.json` allocates its per-layer sparsities from these curves.
Cost: one onnxruntime session and run per layer and sparsity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.data import Dataset, input_specs, synthesize
from onnxshrink.errors import DataError, UsageError
from onnxshrink.passes.prune import SUPPORTED_OPS, Prune, PruneConfig
from onnxshrink.report import JsonReport
from onnxshrink.runtime import make_session, run_batches

DEFAULT_SPARSITIES = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class SensitivityConfig:
    sparsities: tuple = DEFAULT_SPARSITIES
    importance: str | None = None  # as prune: activation with data, else magnitude
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()


@dataclass
class LayerSensitivity:
    node: str
    op_type: str
    weight: str
    weights: int
    drift: list  # relative output error at each sparsity of the report's grid
    agreement: list  # top-1 agreement with the original (None when no output holds class scores)


@dataclass
class SensitivityReport(JsonReport):
    model: str
    samples: int
    synthetic_inputs: bool
    importance: str
    sparsities: list
    layers: list = field(default_factory=list)  # LayerSensitivity, in graph order
    skipped: list = field(default_factory=list)  # LayerDecision of layers not measured
    notes: list = field(default_factory=list)


def measure(model: onnx.ModelProto, dataset: Dataset | None, config: SensitivityConfig | None = None,
            model_path: str = "", threads: int = 1) -> SensitivityReport:
    config = config or SensitivityConfig()
    grid = sorted(float(s) for s in config.sparsities)
    if not grid or any(not 0.0 < s < 1.0 for s in grid):
        raise UsageError(f"--sparsities {','.join(map(str, config.sparsities))}: each must be between 0 and 1 (exclusive)")
    if config.importance == "activation" and dataset is None:
        raise UsageError("--importance activation needs calibration data (--calibration FILE.npz)")
    notes = []
    synthetic = dataset is None
    if synthetic:
        dataset = synthesize(input_specs(model), seed=0)
        notes.append("no --calibration: drift measured on synthetic (seeded random) inputs and magnitude importance")
    baseline = run_batches(make_session(model, threads), dataset.batches)
    base = Prune(PruneConfig(sparsity=0.0, importance=config.importance, reconstruct=False, op_types=config.op_types,
                             exclude=config.exclude, scope="layer"), None if synthetic else dataset, threads)
    _, probe = base(model)
    measured = [d for d in probe.layers if d.action.startswith(("sparsity", "pruned"))]
    skipped = [d for d in probe.layers if d not in measured]
    report = SensitivityReport(model_path, dataset.samples, synthetic, base.importance, grid, skipped=skipped, notes=notes)
    names = [d.node for d in measured]
    for decision in measured:
        drift, agreement = [], []
        for s in grid:
            overrides = {name: 0.0 for name in names if name != decision.node}
            config_s = PruneConfig(sparsity=s, importance=base.importance, reconstruct=False, scope="layer",
                                   op_types=config.op_types, exclude=config.exclude, layer_sparsity=overrides)
            pruned, _ = Prune(config_s, None if synthetic else dataset, threads)(model)
            outputs = run_batches(make_session(pruned, threads), dataset.batches)
            d, a = _drift(baseline, outputs)
            drift.append(d)
            agreement.append(a)
        report.layers.append(LayerSensitivity(decision.node, decision.op_type, decision.weight,
                                              decision.bytes_before // 4, drift, agreement))
    notes.append(f"{len(measured) * len(grid)} onnxruntime run(s) on {dataset.samples} sample(s)")
    return report


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
