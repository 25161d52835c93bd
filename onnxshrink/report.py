"""Report dataclasses. Everything a command decides is in its report; `to_json` is what `--json` prints."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (JSON has no NaN), tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _clean(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _clean(value.item())
    return value


class JsonReport:
    def to_dict(self) -> dict:
        return _clean(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


@dataclass
class TensorIO:
    name: str
    dtype: str
    shape: list  # ints for fixed dims, strings for symbolic, None for unknown


@dataclass
class ModelInfo(JsonReport):
    path: str
    file_bytes: int
    ir_version: int
    opsets: dict
    producer: str
    inputs: list
    outputs: list
    op_histogram: dict
    node_count: int
    tensors: list  # weights.TensorRecord
    totals: dict
    metadata: dict


@dataclass
class OutputDrift:
    max_abs: float
    mean_rel: float
    cosine: float
    cosine_min: float
    top1_agreement: float | None
    exact_match: float | None = None


@dataclass
class Check:
    name: str
    threshold: float
    value: float | None
    passed: bool


@dataclass
class ValidationReport(JsonReport):
    passed: bool
    original: str
    candidate: str
    synthetic_inputs: bool
    samples: int
    input_shapes: dict
    size: dict
    outputs: dict  # name -> OutputDrift
    accuracy: dict | None
    latency_ms: dict
    checks: list  # Check
    notes: list = field(default_factory=list)


@dataclass
class LayerDecision:
    node: str
    op_type: str
    weight: str
    action: str  # e.g. "int8 per-channel", "kept float"
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class PassReport(JsonReport):
    name: str
    options: dict
    layers: list = field(default_factory=list)  # LayerDecision
    notes: list = field(default_factory=list)
    changed: bool = False


@dataclass
class CommandReport(JsonReport):
    """What a model-writing command did: passes, output, and validation (nested)."""

    command: str
    input: str
    output: str | None
    passes: list  # PassReport
    size: dict
    runtime: dict | None = None  # what onnxruntime really runs (fused kernels)
    validation: ValidationReport | None = None
    notes: list = field(default_factory=list)
