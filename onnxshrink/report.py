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
        """The document `--json` prints (and `sensitivity -o` writes): the report, plus the version that wrote it,
        so a pipeline's logs say which onnxshrink produced a verdict."""
        return json.dumps({**self.to_dict(), "onnxshrink_version": _version()}, indent=2, allow_nan=False)


def _version() -> str:
    from onnxshrink import __version__  # the package is loaded by the time a report is written

    return __version__


def error_json(code: int, message: str) -> str:
    """What `--json` prints instead of a report when a command fails: stdout is always one document."""
    return json.dumps({"error": {"code": code, "message": message}, "onnxshrink_version": _version()}, indent=2)


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
    detail: str | None = None  # what a check without a figure said (the task check's last line)


# Drift this large is a changed model, not rounding noise: said even when no threshold was given.
WARN_BELOW_COSINE = 0.99
WARN_BELOW_AGREEMENT = 0.99
# The quality gates: when one of them was given, the verdict speaks for the drift and no warning is added.
QUALITY_CHECKS = ("max_drift", "min_cosine", "min_agreement", "max_accuracy_drop", "task_check", "finite")
# A latency difference counts only above the runs' own spread, and never below this fraction of p50.
LATENCY_NOISE_FLOOR = 0.02


def drift_warning(outputs: dict, checks: list, synthetic: bool = False) -> str | None:
    """`warning: ... changed a lot` when some output's cosine or top-1 agreement is below 0.99 and no quality gate
    was given (with one, PASSED/FAILED already answers); None otherwise."""
    if any(check.name.split("[")[0] in QUALITY_CHECKS for check in checks):
        return None
    # `not >=`: a NaN (an output that became NaN) counts as changed.
    cosine = {name: d.cosine for name, d in outputs.items() if d.cosine is not None and not d.cosine >= WARN_BELOW_COSINE}
    agree = {name: d.top1_agreement for name, d in outputs.items()
             if d.top1_agreement is not None and not d.top1_agreement >= WARN_BELOW_AGREEMENT}
    if not cosine and not agree:
        return None
    parts = []
    if cosine:
        worst = min(cosine, key=cosine.get)
        parts.append(f"cosine {cosine[worst]:.4g}" + (f" ({worst})" if len(outputs) > 1 else ""))
    if agree:
        worst = min(agree, key=agree.get)
        parts.append(f"top-1 agreement {agree[worst]:.4g}" + (f" ({worst})" if len(outputs) > 1 else ""))
    inputs = " on synthetic inputs" if synthetic else ""
    return (f"warning: the candidate's outputs changed a lot{inputs}: {', '.join(parts)} (below "
            f"{WARN_BELOW_COSINE:g}), and no drift or accuracy threshold was given (--min-cosine, --min-agreement, "
            "--max-accuracy-drop)")


def latency_slower(latency: dict | None) -> bool | None:
    """Whether the candidate ran slower by more than the measured noise: its p50 exceeds the original's by more
    than the larger p90 - p50 spread of the two models, and by more than 2% of the original's p50.
    None without a latency measurement."""
    if not latency or not latency.get("original") or not latency.get("candidate"):
        return None
    original, candidate = latency["original"], latency["candidate"]
    if not original.get("p50"):
        return None
    spread = max(original["p90"] - original["p50"], candidate["p90"] - candidate["p50"], 0.0)
    noise = max(spread, LATENCY_NOISE_FLOOR * original["p50"])
    return candidate["p50"] - original["p50"] > noise


@dataclass
class ValidationReport(JsonReport):
    """`passed` is True when every given threshold held, and so also when none was given: `gated` says whether
    any was (a verdict without gates is "not gated", never PASSED)."""

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
    validated: bool = True  # False: no inputs the model runs on (nothing measured; `reason` says why)
    reason: str | None = None
    input_shape_sources: dict = field(default_factory=dict)  # input -> --shape, calibration, metadata, probe, ...
    validation_data: str | None = None  # "synthetic", the --data file, or "held-out calibration samples A..B of F"
    gated: bool = field(init=False)

    def __post_init__(self) -> None:
        self.gated = bool(self.checks)
        warning = drift_warning(self.outputs, self.checks, self.synthetic_inputs)
        if warning and warning not in self.notes:
            self.notes.append(warning)


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
    changed: bool = True  # False: the pass changed no weight (the output is still written: a copy of the input)
    fallback: dict | None = None  # quantize's accuracy fallback (fallback.FallbackSummary): layers kept float and why
    latency_guard: dict | None = None  # quantize's latency guard (latency_guard.GuardSummary): ratios, layers folded, why
