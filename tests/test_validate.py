"""`onnxshrink validate` and the drift/accuracy arithmetic behind it.

Expected numbers are computed in the test (numpy, or onnxruntime run directly),
never copied from an earlier run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import invoke, make_mlp, save_model
from onnxshrink.data import DEFAULT_BATCH
from onnxshrink.errors import DataError
from onnxshrink.validate import Thresholds, _checks, compare_outputs, task_accuracy


def _ort_logits(path, x):
    """Logits from onnxruntime directly, in the batches validate uses."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i : i + DEFAULT_BATCH]})[0] for i in range(0, len(x), DEFAULT_BATCH)])


def _scaled_copy(model: onnx.ModelProto, weight: str, factor) -> onnx.ModelProto:
    """The same model with one weight initializer multiplied by `factor`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name == weight:
            tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * factor).astype(np.float32), weight))
    return copy


@pytest.fixture
def pair(tmp_path):
    """An MLP and a candidate whose middle weight is scaled by 1.5."""
    model = make_mlp(seed=11)
    original = save_model(model, tmp_path / "original.onnx")
    candidate = save_model(_scaled_copy(model, "fc1.weight", 1.5), tmp_path / "candidate.onnx")
    return original, candidate


def _validate_json(runner, *args):
    result = invoke(runner, "validate", *args, "--json")
    report = json.loads(result.stdout) if result.stdout.strip() else None
    return result, report


def test_identical_models_have_no_drift(mlp_path, tmp_path, runner):
    copy = tmp_path / "copy.onnx"
    shutil.copy(mlp_path, copy)
    result, report = _validate_json(runner, mlp_path, copy, "--max-drift", "0", "--min-cosine", "1", "--min-agreement", "1")
    assert result.exit_code == 0, result.output
    drift = report["outputs"]["logits"]
    assert drift["max_abs"] == 0.0
    assert drift["mean_rel"] == 0.0
    assert drift["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert drift["top1_agreement"] == 1.0
    assert report["passed"] is True
    assert report["size"]["ratio"] == 1.0
    assert all(c["passed"] for c in report["checks"]) and len(report["checks"]) == 3


def test_json_schema(pair, runner):
    original, candidate = pair
    result, report = _validate_json(runner, original, candidate, "--min-cosine", "0")
    assert result.exit_code == 0, result.output
    assert {"passed", "size", "outputs", "accuracy", "latency_ms", "checks", "synthetic_inputs"} <= set(report)
    assert set(report["size"]) == {"original", "candidate", "ratio"}
    assert report["size"]["original"] == original.stat().st_size
    assert report["size"]["candidate"] == candidate.stat().st_size
    assert report["size"]["ratio"] == pytest.approx(candidate.stat().st_size / original.stat().st_size)
    assert list(report["outputs"]) == ["logits"]
    assert {"max_abs", "mean_rel", "cosine", "top1_agreement"} <= set(report["outputs"]["logits"])
    assert report["accuracy"] is None
    latency = report["latency_ms"]
    assert {"original", "candidate", "ratio"} <= set(latency)
    for side in ("original", "candidate"):
        assert set(latency[side]) == {"p50", "p90"}
        assert 0 < latency[side]["p50"] <= latency[side]["p90"]
    assert latency["ratio"] == pytest.approx(latency["candidate"]["p50"] / latency["original"]["p50"])
    assert report["checks"] == [
        {"name": "min_cosine[logits]", "threshold": 0.0, "value": report["outputs"]["logits"]["cosine"], "passed": True}
    ]


def test_drift_thresholds_fail_and_pass(pair, runner):
    original, candidate = pair
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    assert not np.allclose(_ort_logits(original, x), _ort_logits(candidate, x))

    result, report = _validate_json(runner, original, candidate)
    assert result.exit_code == 0, result.output  # no thresholds: nothing to fail
    drift = report["outputs"]["logits"]
    assert drift["max_abs"] > 0 and drift["mean_rel"] > 0
    assert drift["cosine"] < 1 - 1e-6

    tight_drift = drift["max_abs"] / 2
    result, report = _validate_json(runner, original, candidate, "--max-drift", tight_drift)
    assert result.exit_code == 1
    assert report["passed"] is False
    assert report["checks"][0]["name"] == "max_drift[logits]"
    assert report["checks"][0]["passed"] is False
    assert report["checks"][0]["value"] == drift["max_abs"]

    tight_cosine = (1 + drift["cosine"]) / 2
    result, report = _validate_json(runner, original, candidate, "--min-cosine", tight_cosine)
    assert result.exit_code == 1 and report["passed"] is False

    result, report = _validate_json(runner, original, candidate, "--max-drift", drift["max_abs"] * 2,
                                    "--min-cosine", drift["cosine"] - 0.01)
    assert result.exit_code == 0, result.output
    assert report["passed"] is True and len(report["checks"]) == 2

    # human output too: exit code is the same without --json
    assert invoke(runner, "validate", original, candidate, "--max-drift", tight_drift).exit_code == 1


def _labelled_data(path, model_path, n=60, seed=3):
    """Inputs and labels that agree with the model most of the time (labels flipped every 4th row)."""
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    labels = np.argmax(_ort_logits(model_path, x), axis=-1).astype(np.int64)
    labels[::4] = (labels[::4] + 1) % 10
    np.savez(path, input=x, labels=labels)
    return x, labels


def test_accuracy_matches_numpy(pair, tmp_path, runner):
    original, candidate = pair
    data = tmp_path / "data.npz"
    x, labels = _labelled_data(data, original)
    expected = {name: float(np.mean(np.argmax(_ort_logits(p, x), axis=-1) == labels))
                for name, p in (("original", original), ("candidate", candidate))}

    result, report = _validate_json(runner, original, candidate, "--data", data, "--labels", "labels")
    assert result.exit_code == 0, result.output
    assert report["synthetic_inputs"] is False
    assert report["samples"] == len(x)
    assert report["accuracy"]["original"] == pytest.approx(expected["original"], abs=1e-12)
    assert report["accuracy"]["candidate"] == pytest.approx(expected["candidate"], abs=1e-12)
    assert report["accuracy"]["original"] == pytest.approx(0.75, abs=1e-12)  # by construction of the labels

    # the accuracy-drop check compares exactly that difference
    drop = expected["original"] - expected["candidate"]
    result, report = _validate_json(runner, original, candidate, "--data", data, "--labels", "labels",
                                    "--max-accuracy-drop", drop + 0.05)
    assert result.exit_code == 0, result.output
    check = report["checks"][0]
    assert check["name"] == "max_accuracy_drop" and check["value"] == pytest.approx(drop, abs=1e-12)

    result, report = _validate_json(runner, original, candidate, "--data", data, "--labels", "labels",
                                    "--max-accuracy-drop", drop - 0.01)
    assert result.exit_code == 1
    assert report["checks"][0]["passed"] is False


def test_samples_limits_the_data(pair, tmp_path, runner):
    original, candidate = pair
    data = tmp_path / "data.npz"
    x, labels = _labelled_data(data, original, n=50)
    result, report = _validate_json(runner, original, candidate, "--data", data, "--labels", "labels", "--samples", 10)
    assert result.exit_code == 0, result.output
    assert report["samples"] == 10
    expected = float(np.mean(np.argmax(_ort_logits(original, x[:10]), axis=-1) == labels[:10]))
    assert report["accuracy"]["original"] == pytest.approx(expected, abs=1e-12)

    result, report = _validate_json(runner, original, candidate, "--samples", 5)
    assert result.exit_code == 0, result.output
    assert report["samples"] == 5
    assert report["input_shapes"] == {"input": [5, 32]}


def test_accuracy_drop_without_labels_is_a_usage_error(pair, tmp_path, runner):
    original, candidate = pair
    result = invoke(runner, "validate", original, candidate, "--max-accuracy-drop", "0.01")
    assert result.exit_code == 2
    assert "--labels" in result.stderr

    data = tmp_path / "data.npz"
    _labelled_data(data, original)
    result = invoke(runner, "validate", original, candidate, "--data", data, "--max-accuracy-drop", "0.01")
    assert result.exit_code == 2
    result = invoke(runner, "validate", original, candidate, "--labels", "labels")
    assert result.exit_code == 2


def test_synthetic_inputs_are_flagged_and_seeded(pair, runner):
    original, candidate = pair
    _, first = _validate_json(runner, original, candidate, "--seed", "7")
    _, again = _validate_json(runner, original, candidate, "--seed", "7")
    _, other = _validate_json(runner, original, candidate, "--seed", "8")
    assert first["synthetic_inputs"] is True
    assert any("synthetic" in note for note in first["notes"])
    assert first["accuracy"] is None
    assert first["outputs"] == again["outputs"]
    assert first["outputs"]["logits"]["max_abs"] != other["outputs"]["logits"]["max_abs"]
    assert first["input_shapes"] == {"input": [16, 32]}  # 16 synthesized samples by default


def test_shape_override(pair, runner):
    original, candidate = pair
    result, report = _validate_json(runner, original, candidate, "--shape", "input=3,32")
    assert result.exit_code == 0, result.output
    assert report["input_shapes"] == {"input": [3, 32]}

    result = invoke(runner, "validate", original, candidate, "--shape", "nosuch=3,32")
    assert result.exit_code == 2
    result = invoke(runner, "validate", original, candidate, "--shape", "input=3,x")
    assert result.exit_code == 2


def test_nan_in_candidate_fails_cosine_check(pair, tmp_path, runner):
    original, _ = pair
    model = onnx.load(str(original))
    broken = _scaled_copy(model, "fc2.weight", np.nan)
    candidate = save_model(broken, tmp_path / "nan.onnx")
    result, report = _validate_json(runner, original, candidate, "--min-cosine", "0.5", "--max-drift", "1e9")
    assert result.exit_code == 1
    assert report["passed"] is False
    assert all(c["passed"] is False for c in report["checks"])
    assert report["outputs"]["logits"]["cosine"] is None  # NaN is not valid JSON: reported as null


# ---- unit tests of the arithmetic -------------------------------------------------


def test_compare_outputs_identical():
    a = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    drift = compare_outputs(a, a.copy())
    assert drift.max_abs == 0 and drift.mean_rel == 0
    assert drift.cosine == pytest.approx(1.0) and drift.cosine_min == pytest.approx(1.0)
    assert drift.top1_agreement == 1.0


def test_compare_outputs_known_values():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    drift = compare_outputs(a, b)
    diff = np.abs(a - b)
    assert drift.max_abs == pytest.approx(diff.max())
    assert drift.mean_rel == pytest.approx(diff.mean() / np.abs(a).mean())
    assert drift.cosine == pytest.approx(0.5)  # rows: orthogonal (0) and parallel (1)
    assert drift.cosine_min == pytest.approx(0.0)
    assert drift.top1_agreement == pytest.approx(0.5)

    assert compare_outputs(a, -a).cosine == pytest.approx(-1.0)
    zeros = np.zeros_like(a)
    assert compare_outputs(zeros, zeros).cosine == pytest.approx(1.0)
    assert compare_outputs(a, zeros).cosine == pytest.approx(0.0)


def test_compare_outputs_non_float_and_shapes():
    labels = np.array([1, 2, 3, 4], dtype=np.int64)
    drift = compare_outputs(labels, np.array([1, 2, 0, 4], dtype=np.int64))
    assert drift.exact_match == pytest.approx(0.75)
    assert drift.top1_agreement is None
    with pytest.raises(DataError):
        compare_outputs(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_candidate_fails_every_check(bad):
    a = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    b = a.copy()
    b[2, 3] = bad
    drift = compare_outputs(a, b)
    checks = _checks(Thresholds(max_drift=1e9, min_cosine=-1.0), {"y": drift}, None, None)
    assert [c.name for c in checks] == ["max_drift[y]", "min_cosine[y]"]
    assert not any(c.passed for c in checks)


def test_checks_pass_and_fail_at_the_threshold():
    a = np.random.default_rng(2).integers(-8, 8, (4, 6)).astype(np.float64)  # a + 0.25 is exact
    drift = compare_outputs(a, a + 0.25)
    ok = _checks(Thresholds(max_drift=0.25), {"y": drift}, None, None)
    assert ok[0].passed  # bound is inclusive
    bad = _checks(Thresholds(max_drift=0.2499), {"y": drift}, None, None)
    assert not bad[0].passed
    missing = _checks(Thresholds(max_accuracy_drop=0.01), {"y": drift}, None, None)
    assert missing[0].value is None and not missing[0].passed


def test_task_accuracy():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    assert task_accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert task_accuracy(scores, np.array([1, 0, 1])) == 1.0
    sequence = np.random.default_rng(3).standard_normal((2, 5, 4))
    labels = np.argmax(sequence, axis=-1)
    labels[0, 0] = (labels[0, 0] + 1) % 4
    assert task_accuracy(sequence, labels) == pytest.approx(9 / 10)
    with pytest.raises(DataError):
        task_accuracy(scores, np.array([1, 0]))
