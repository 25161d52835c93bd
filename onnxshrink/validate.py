"""Run the original and the candidate in onnxruntime on the same inputs and measure the drift.

Both models get identical session options and thread counts; latency runs alternate
between them so a noisy machine slows both alike and the ratio holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from onnxshrink import branch_coverage
from onnxshrink import data as data_mod
from onnxshrink import memory
from onnxshrink import model as model_io
from onnxshrink.errors import DataError, InputsUnavailable, ModelLoadError, UnsupportedModelError, UsageError
from onnxshrink.progress import step
from onnxshrink.report import Check, OutputDrift, ValidationReport
from onnxshrink.runtime import make_session, probe_runs, run_batches


@dataclass
class Thresholds:
    """Only the thresholds that are set apply. Ratios are candidate/original."""

    max_drift: float | None = None  # bound on max_abs of every output
    min_cosine: float | None = None
    min_agreement: float | None = None  # top-1 agreement of class-score outputs
    max_accuracy_drop: float | None = None  # absolute: 0.01 is one point
    max_latency_ratio: float | None = None


@dataclass
class ValidateConfig:
    data: str | None = None
    calibration: str | None = None  # without `data`: validate on this file's held-out samples (data.split_holdout)
    labels: str | None = None
    samples: int | None = None
    shapes: dict | None = None
    threads: int = 1
    seed: int = 0
    latency: bool = True
    latency_budget_s: float = 2.0
    thresholds: Thresholds | None = None


def validate(original: str | os.PathLike, candidate: str | os.PathLike, config: ValidateConfig | None = None) -> ValidationReport:
    """Compare two model files; the report's `passed` says whether every given threshold held."""
    config = config or ValidateConfig()
    thresholds = config.thresholds or Thresholds()
    # Only their signatures are read here (onnxruntime loads the weights itself).
    original_source, original_model = model_io.run_source(original)
    candidate_source, candidate_model = model_io.run_source(candidate)
    specs = data_mod.input_specs(original_model)
    candidate_specs = {s.name: s for s in data_mod.input_specs(candidate_model)}
    for spec in specs:
        other = candidate_specs.get(spec.name)
        if other is None or other.dtype != spec.dtype:
            raise DataError(f"candidate's inputs differ from the original's (input {spec.name!r})")
    if config.labels and not config.data:
        raise UsageError("--labels needs --data: labels are read from the data file")
    if thresholds.max_accuracy_drop is not None and not config.labels:
        raise UsageError("--max-accuracy-drop needs --data and --labels")
    step("validate: loading models", 0, 3)
    sessions = [_session(original, original_source, config.threads)]
    memory.release()  # what building a session freed: onnxruntime parses a file's weights twice over
    sessions.append(_session(candidate, candidate_source, config.threads))
    del original_source, candidate_source  # a pack's graph bytes (its weights live as long as its session)
    memory.release()
    dataset, origin = _dataset(config, specs, original_model, sessions[0])
    graph = original_model.graph  # no weights (with_data=False): kept to tell scores from states (non_score_outputs)
    del candidate_model
    try:
        step("validate: original model", 0, 3)
        reference = run_batches(sessions[0], dataset.batches)
    except ModelLoadError as exc:
        if not dataset.synthetic:
            raise
        shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in dataset.batches[0].items())
        raise InputsUnavailable(f"{exc} (synthesized inputs: {shapes}; symbolic dimensions that no metadata, token "
                                "rule or probe sized default to 1: give --data, or sizes with --shape NAME=D1,D2,...)") from exc
    dataset.notes.extend(branch_coverage.untaken_branches(original_model, dataset.batches, config.threads))
    step("validate: candidate model", 1, 3)
    produced = run_batches(sessions[1], dataset.batches)

    outputs, broken = {}, {}
    found = attention_mask(specs, dataset.batches, dataset.batch_axes)
    not_scores = non_score_outputs(graph, {name: array.ndim for name, array in reference.items()})
    not_scores |= state_outputs(reference, dataset.batches[0], dataset.batch_axes)
    masked = []
    for name, expected in reference.items():
        if name not in produced:
            raise DataError(f"candidate has no output {name!r}")
        mask = found[1] if found is not None and masks_output(found[1], expected) else None
        outputs[name] = compare_outputs(expected, produced[name], mask, scores=name not in not_scores)
        broken[name] = newly_nonfinite(expected, produced[name], mask)
        if mask is not None:
            masked.append(name)
    if masked:
        dataset.notes.append(mask_note(found, masked))

    accuracy = None
    if dataset.labels is not None:
        first = sessions[0].get_outputs()[0].name
        accuracy = {
            "original": task_accuracy(reference[first], dataset.labels),
            "candidate": task_accuracy(produced[first], dataset.labels),
            "output": first,
        }

    latency = None
    if config.latency:
        step("validate: latency", 2, 3)
        feed = latency_feed(dataset, specs)
        latency = measure_latency(sessions, feed, config.latency_budget_s, batch=feed_batch(feed, specs))
    size_original = model_io.file_size(original)
    size_candidate = model_io.file_size(candidate)
    size = {"original": size_original, "candidate": size_candidate, "ratio": size_candidate / size_original}
    checks = _checks(thresholds, outputs, accuracy, latency)
    checks += [Check(f"finite[{name}]", 0.0, fraction, False, f"{fraction:.3g} of output {name!r}'s values are NaN or "
                     "infinite where the original's are finite")
               for name, fraction in broken.items() if fraction > 0]
    return ValidationReport(
        passed=all(c.passed for c in checks),
        original=str(original),
        candidate=str(candidate),
        synthetic_inputs=dataset.synthetic,
        samples=dataset.samples,
        input_shapes=dataset.input_shapes(),
        size=size,
        outputs=outputs,
        accuracy=accuracy,
        latency_ms=latency,
        checks=checks,
        notes=list(dataset.notes),
        input_shape_sources=dict(dataset.shape_sources),
        validation_data=origin,
    )


def _session(path, source, threads: int):
    """A session of what model.run_source gave; a pack onnxruntime refuses is judged as its ONNX file would be:
    run_source skipped the full checker, so its reason (a load error where both refuse) is asked for here."""
    try:
        return make_session(source, threads)
    except UnsupportedModelError:
        if model_io.is_pack(path):
            model_io.load(path)
        raise


def _dataset(config: ValidateConfig, specs: list, model, session) -> tuple[data_mod.Dataset, str]:
    """The inputs to judge on, and what they are: --data; else the held-out part of --calibration; else
    synthesized, sized by the model's metadata, token rules and a probe run in `session` (data.synthesize)."""
    if config.data:
        return data_mod.load_npz(config.data, specs, config.labels, config.samples, role="evaluation data"), str(config.data)
    reference = None
    notes = []
    if config.calibration:
        full = data_mod.load_npz(config.calibration, specs, role="calibration data")
        split = data_mod.split_holdout(full, specs)
        if split is not None:
            _, held, rows = split
            if config.samples and config.samples < held.samples:
                held = data_mod.take_samples(held, specs, 0, config.samples)
                rows = range(rows.start, rows.start + config.samples)
            origin = f"held-out calibration samples {rows.start}..{rows.stop - 1} of {config.calibration}"
            held.notes.append(f"validated on {origin}; the calibrating passes used samples 0..{split[2].start - 1} "
                              "only, so no sample both calibrated and judged")
            return held, origin
        reference = full.input_shapes()
        notes.append(f"{config.calibration} has {full.samples} sample(s), too few to hold any out for validation "
                     f"(at least {data_mod.MIN_HOLDOUT + data_mod.MIN_CALIBRATION} needed): calibrated on all of them, "
                     "validated on synthetic inputs of their shapes")
    dataset = data_mod.synthesize(specs, config.samples, config.seed, config.shapes, model=model,
                                  runs=probe_runs(session), reference_shapes=reference)
    dataset.notes.extend(notes)
    return dataset, "synthetic"


def not_validated(original, candidate, reason: str) -> ValidationReport:
    """The report of a validation that could not run: `validated` false, `passed` false (nothing was shown),
    and why. The command that wrote `candidate` still lands it (api: exit EXIT_NOT_VALIDATED at the CLI)."""
    size_original, size_candidate = model_io.file_size(original), model_io.file_size(candidate)
    return ValidationReport(
        passed=False, original=str(original), candidate=str(candidate), synthetic_inputs=True, samples=0,
        input_shapes={}, size={"original": size_original, "candidate": size_candidate,
                               "ratio": size_candidate / size_original},
        outputs={}, accuracy=None, latency_ms=None, checks=[],
        notes=[f"not validated: {reason}"], validated=False, reason=reason, validation_data=None,
    )


MASK_NOTE = "masked by attention_mask"


def attention_mask(specs: list, batches: list[dict], batch_axes: dict | None = None) -> tuple[str, np.ndarray] | None:
    """(name, [samples, sequence] bool) of the input that marks padding, joined over the batches; None without one.

    A padded position's output is whatever the model computes for a token nobody reads: a compressed model may move
    it freely, so drift that counts it judges noise (and a padded batch of short sentences is mostly padding). The
    input must say so by its name (`attention_mask`, `input_mask`: token_type_ids is 0/1 and ids-shaped too) and look
    the part: integer or bool, rank 2, the shape of another integer rank-2 input (the token ids), values 0 and 1 only,
    its samples along axis 0 (as the outputs it is matched with are joined).
    """
    if not batches:
        return None
    first = batches[0]
    for spec in specs:
        if "mask" not in spec.name.lower() or spec.name not in first or (batch_axes or {}).get(spec.name, 0) != 0:
            continue
        value = first[spec.name]
        if value.ndim != 2 or value.dtype.kind not in "iub":
            continue
        if not any(other != spec.name and array.ndim == 2 and array.dtype.kind in "iu" and array.shape == value.shape
                   for other, array in first.items()):
            continue
        parts = [np.asarray(batch[spec.name]) for batch in batches if spec.name in batch]
        if len(parts) != len(batches) or len({p.shape[1] for p in parts}) != 1:
            continue
        joined = np.concatenate(parts, axis=0)
        if not np.all((joined == 0) | (joined == 1)):
            continue
        return spec.name, joined.astype(bool)
    return None


def masks_output(mask: np.ndarray, output: np.ndarray) -> bool:
    """Whether an output's leading dims are [batch, sequence] of the mask (token states, token logits)."""
    return output.ndim >= 2 and tuple(output.shape[:2]) == tuple(mask.shape)


def mask_note(found: tuple[str, np.ndarray], names: list[str]) -> str:
    name, mask = found
    padding = int(mask.size - np.count_nonzero(mask))
    return (f"drift of {', '.join(names)} {MASK_NOTE} input {name!r}: {padding} padding position(s) of {mask.size} "
            "left out of max_abs, mean_rel, cosine and agreement")


def state_outputs(reference: dict, batch: dict, batch_axes: dict) -> set[str]:
    """Outputs that are a recurrent state handed back (silero's stateN for state [2, batch, 128], an LSTM's hn for
    h): shaped as a float input whose samples are not along axis 0 (the rank and every axis but the first match),
    of rank 3 or more or named after it (a fixed-batch classifier's [1, 10] logits beside [1, 10] features are
    not). Their last axis is hidden units, not classes: top-1 agreement over it means nothing."""
    states = {name: array for name, array in batch.items()
              if array.dtype.kind == "f" and array.ndim >= 2 and batch_axes.get(name) != 0}
    return {out for out, output in reference.items()
            if any(output.ndim == s.ndim and output.shape[1:] == s.shape[1:] and (s.ndim >= 3 or out.startswith(name))
                   for name, s in states.items())}


# Ops that only move values around: the output is what fed them.
_RESHAPING = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast"}
# Ops whose output is a representation (a hidden state, a pooled embedding), never scores over classes.
_NORMALIZING = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                "SkipSimplifiedLayerNormalization", "RMSNormalization", "LpNormalization", "GroupNormalization",
                "InstanceNormalization", "Tanh"}


def non_score_outputs(graph, ranks: dict) -> set[str]:
    """Outputs whose last axis is not classes, told by what makes them: a normalization (MiniLM's
    last_hidden_state comes from LayerNormalization; exported in pieces, an Add of a Mul whose ancestry within six
    nodes holds ReduceMean and Sqrt), a pooler's Tanh, or a rank-3 Concat (a detector's rows [batch, anchors,
    box + scores] join coordinates and class scores: argmax over them decides nothing; a rank-2 Concat of class
    scores stays scores). `ranks`: each output's rank as run. Shape alone cannot tell these from token logits."""
    producer = {out: node for node in graph.node for out in node.output}

    def made_by(name: str):
        node = producer.get(name)
        while node is not None and node.op_type in _RESHAPING and node.input:
            node = producer.get(node.input[0])
        return node

    def decomposed_norm(node) -> bool:
        if node.op_type != "Add":
            return False
        seen, frontier = set(), [node]
        for _ in range(6):
            frontier = [producer[i] for n in frontier for i in n.input if i in producer]
            seen.update(n.op_type for n in frontier)
        return "ReduceMean" in seen and ("Sqrt" in seen or "Pow" in seen and "Div" in seen)

    found = set()
    for output in graph.output:
        node = made_by(output.name)
        if node is None:
            continue
        if node.op_type in _NORMALIZING or decomposed_norm(node) or (node.op_type == "Concat" and ranks.get(output.name) == 3):
            found.add(output.name)
    return found


def top1_agreement(a: np.ndarray, b: np.ndarray, rows: np.ndarray | None = None) -> float | None:
    """Share of rows (the last axis) whose argmax agrees, counting only rows whose top value is unique in `a`:
    a tie's winner is an accident of order (all-zero ReLU rows, saturated scores), and any drift flips it. None
    when ties are most of the rows (`rows`: those that count at all): then argmax holds no answer to agree on."""
    top = np.max(a, axis=-1, keepdims=True)
    unique = np.sum(a == top, axis=-1) == 1
    if rows is not None:
        unique = unique[rows]
    total = unique.size
    if total == 0 or np.count_nonzero(unique) * 2 < total:
        return None
    agree = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
    return float(np.mean((agree[rows] if rows is not None else agree)[unique]))


def compare_outputs(expected: np.ndarray, actual: np.ndarray, mask: np.ndarray | None = None,
                    scores: bool = True) -> OutputDrift:
    """Drift of one output; mean_rel is mean|a-b| / mean|a| (robust to values near zero).

    With `mask` ([batch, sequence], true where a token is real; masks_output), the positions it clears count
    nowhere: their values are zeroed in both for the per-sample cosine and left out of every other figure.
    Top-1 agreement only where argmax can be an answer: float scores over 2+ classes on the last axis of a
    [batch, classes] or [batch, tokens, classes] output (rank 4 and up is a map: argmax over its width, or a
    spectrogram's bins, decides nothing), not mostly tied (top1_agreement), and `scores` true (false for a
    recurrent state, state_outputs, and for hidden states and detector rows, non_score_outputs).
    """
    if expected.shape != actual.shape:
        raise DataError(f"output shapes differ: original {list(expected.shape)}, candidate {list(actual.shape)}")
    if mask is not None and not masks_output(mask, expected):
        raise DataError(f"mask of shape {list(mask.shape)} does not cover output of shape {list(expected.shape)}")
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    exact = None
    if expected.dtype.kind not in "fc":
        chosen = (expected == actual) if keep is None else (expected == actual)[keep]
        exact = float(np.mean(chosen)) if chosen.size else 1.0
    a, b = padding_zeroed(expected, keep), padding_zeroed(actual, keep)
    kept_a, kept_b = (a, b) if keep is None else (a[keep], b[keep])
    if kept_a.size == 0:
        return OutputDrift(0.0, 0.0, 1.0, 1.0, None, exact)
    diff = np.abs(kept_a - kept_b)
    max_abs = float(np.max(diff))
    scale = float(np.mean(np.abs(kept_a)))
    mean_rel = float(np.mean(diff) / scale) if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cosines = sample_cosines(a, b, keep)
    top1 = None
    if scores and expected.dtype.kind == "f" and 2 <= a.ndim <= 3 and a.shape[-1] > 1:
        if keep is None:
            top1 = top1_agreement(a, b)
        elif a.ndim == 2:  # scores over the sequence itself (a span start): padding can never be the answer
            hidden = np.where(keep, 0.0, -np.inf)
            top1 = top1_agreement(a + hidden, b + hidden, keep.any(axis=1))
        else:  # per-token scores: the real tokens' labels
            top1 = top1_agreement(kept_a, kept_b)
    return OutputDrift(max_abs, mean_rel, float(np.mean(cosines)), float(np.min(cosines)), top1, exact)


def newly_nonfinite(expected: np.ndarray, actual: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The fraction of an output's values (the real positions, with `mask`) that are NaN or infinite in the candidate
    where the original's are finite: a broken model, whatever the thresholds (a NaN weight, a scale that underflowed)."""
    if expected.dtype.kind != "f" or expected.shape != actual.shape or expected.size == 0:
        return 0.0
    bad = np.isfinite(expected) & ~np.isfinite(actual)
    if mask is not None:
        keep = np.asarray(mask, dtype=bool).reshape(mask.shape + (1,) * (expected.ndim - mask.ndim))
        keep = np.broadcast_to(keep, expected.shape)
        return float(np.count_nonzero(bad & keep)) / max(int(np.count_nonzero(keep)), 1)
    return float(np.count_nonzero(bad)) / expected.size


def padding_zeroed(output: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """A float64 copy of an output, the positions `keep` ([batch, sequence] bool, masks_output) clears set to 0."""
    a = output.astype(np.float64)
    if keep is not None:
        a = np.where(keep.reshape(keep.shape + (1,) * (a.ndim - 2)), a, 0.0)
    return a


def sample_cosines(a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The per-sample cosines validate judges by (samples along axis 0; an output of rank 0 or 1 is one row), of
    outputs already `padding_zeroed`; with `keep`, a sample that is all padding is left out (ones(1) if none is left)."""
    rows_a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    cosines = _row_cosines(rows_a, b.reshape(rows_a.shape))
    if keep is not None:
        cosines = cosines[keep.any(axis=1)]  # a sample that is all padding has nothing to judge
        cosines = cosines if cosines.size else np.ones(1)
    return cosines


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dots / (norm_a * norm_b)
    both_zero = (norm_a == 0) & (norm_b == 0)
    cos = np.where(both_zero, 1.0, cos)
    cos = np.where(((norm_a == 0) ^ (norm_b == 0)), 0.0, cos)
    return np.clip(cos, -1.0, 1.0)


def task_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """mean(argmax(scores over the last axis) == labels), a fraction."""
    predicted = np.argmax(scores, axis=-1)
    if predicted.shape != labels.shape:
        raise DataError(
            f"labels have shape {list(labels.shape)} but argmax of output 0 has shape {list(predicted.shape)}"
        )
    return float(np.mean(predicted == labels))


def latency_feed(dataset: data_mod.Dataset, specs: list[data_mod.InputSpec]) -> dict:
    """One sample (batch 1) where the batch axis is dynamic; the model's fixed batch otherwise."""
    first = dataset.batches[0]
    if not any(s.dynamic_batch for s in specs):
        return first
    axes = dataset.batch_axes or {s.name: 0 for s in specs if s.dynamic_batch and first[s.name].ndim > 0}
    return {n: (np.take(a, [0], axis=axes[n]) if n in axes else a) for n, a in first.items()}


def feed_batch(feed: dict, specs: list[data_mod.InputSpec]) -> int:
    """The batch a feed runs: axis 0 of the first input with a dynamic batch, else of the first input with axes.

    Not the largest axis 0: a recurrent state [2, batch, 128] would say 2.
    """
    ranked = [s for s in specs if s.name in feed and feed[s.name].ndim > 0]
    chosen = next((s for s in ranked if s.dynamic_batch), ranked[0] if ranked else None)
    return int(feed[chosen.name].shape[0]) if chosen is not None else 1


def measure_latency(sessions: list, feed: dict, budget_s: float = 2.0, warmup: int = 3, min_runs: int = 10, max_runs: int = 500,
                    batch: int | None = None) -> dict:
    """Warm up, then alternate runs of each session until the time budget or max_runs; p50/p90 in ms."""
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    times = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs or time.perf_counter() - start < budget_s):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1000.0)
    summary = [{"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))} for t in times]
    if batch is None:
        batch = max((a.shape[0] for a in feed.values() if a.ndim > 0), default=1)
    return {
        "original": summary[0],
        "candidate": summary[1],
        "ratio": summary[1]["p50"] / summary[0]["p50"] if summary[0]["p50"] > 0 else None,
        "runs": len(times[0]),
        "batch": int(batch),
        "threads": sessions[0].get_session_options().intra_op_num_threads,
    }


def _checks(thresholds: Thresholds, outputs: dict, accuracy: dict | None, latency: dict | None) -> list[Check]:
    checks = []

    def add(name: str, threshold: float, value: float | None, ok) -> None:
        passed = value is not None and np.isfinite(value) and ok(value)
        checks.append(Check(name, threshold, value, bool(passed)))

    for name, drift in outputs.items():
        if thresholds.max_drift is not None:
            add(f"max_drift[{name}]", thresholds.max_drift, drift.max_abs, lambda v: v <= thresholds.max_drift)
        if thresholds.min_cosine is not None:
            add(f"min_cosine[{name}]", thresholds.min_cosine, drift.cosine, lambda v: v >= thresholds.min_cosine)
        if thresholds.min_agreement is not None and drift.top1_agreement is not None:
            add(f"min_agreement[{name}]", thresholds.min_agreement, drift.top1_agreement, lambda v: v >= thresholds.min_agreement)
    if thresholds.min_agreement is not None and not any(d.top1_agreement is not None for d in outputs.values()):
        checks.append(Check("min_agreement", thresholds.min_agreement, None, False))
    if thresholds.max_accuracy_drop is not None:
        drop = None if accuracy is None else accuracy["original"] - accuracy["candidate"]
        add("max_accuracy_drop", thresholds.max_accuracy_drop, drop, lambda v: v <= thresholds.max_accuracy_drop)
    if thresholds.max_latency_ratio is not None:
        ratio = None if latency is None else latency["ratio"]
        add("max_latency_ratio", thresholds.max_latency_ratio, ratio, lambda v: v <= thresholds.max_latency_ratio)
    return checks
