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
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, invoke, make_mlp, save_model
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
        {"name": "min_cosine[logits]", "threshold": 0.0, "value": report["outputs"]["logits"]["cosine"], "passed": True,
         "detail": None}
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


# ---- padding: token outputs are judged on the real tokens only --------------------------------------------------

PAD, SEQ, CLASSES = 0, 6, 3


def _token_model(pad_row_scale: float = 1.0, mask_name: str = "attention_mask") -> onnx.ModelProto:
    """ids -> embedding Gather -> MatMul: per-token scores [batch, seq, 3] and their mean over all positions [batch, 3].
    `pad_row_scale` changes only the pad token's embedding row, so only padded positions of `tokens` move."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    table[PAD] *= pad_row_scale
    weight = rng.standard_normal((4, CLASSES)).astype(np.float32)
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", mask_name, "token_type_ids")]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="embed"),
        helper.make_node("MatMul", ["embedded", "weight"], ["scores"], name="head"),
        # The mask and segment inputs feed the graph (a Cast and Mul by zero) so they are real inputs.
        helper.make_node("Cast", [mask_name], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["token_type_ids"], ["type_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["mask_f", "type_f"], ["both"]),
        helper.make_node("Mul", ["both", "zero"], ["nothing"]),
        helper.make_node("Unsqueeze", ["nothing", "last"], ["nothing3"]),
        helper.make_node("Add", ["scores", "nothing3"], ["tokens"]),
        helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "weight"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"), numpy_helper.from_array(np.array([2]), "last")]
    return build_model(nodes, ints, [float_value("tokens", ["batch", "sequence", CLASSES]), float_value("pooled", ["batch", CLASSES])], inits)


def _token_data(path, mask_name: str = "attention_mask"):
    rng = np.random.default_rng(6)
    lengths = rng.integers(2, SEQ + 1, 12)
    lengths[0] = SEQ  # one sentence without padding
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 10, (12, SEQ)), PAD)
    np.savez(path, input_ids=ids, **{mask_name: mask}, token_type_ids=np.zeros_like(ids))
    return ids, mask


def test_validate_leaves_padding_out_of_token_drift(tmp_path, runner):
    original = save_model(_token_model(), tmp_path / "original.onnx")
    candidate = save_model(_token_model(pad_row_scale=-3.0), tmp_path / "candidate.onnx")
    ids, mask = _token_data(tmp_path / "data.npz")
    result, report = _validate_json(runner, original, candidate, "--data", str(tmp_path / "data.npz"),
                                    "--min-cosine", "0.9999")
    tokens, pooled = report["outputs"]["tokens"], report["outputs"]["pooled"]
    # Only padded positions moved: on the real tokens the models agree exactly.
    assert tokens["max_abs"] == 0 and tokens["cosine"] == pytest.approx(1.0) and tokens["top1_agreement"] == 1.0
    # The pooled output mixes padding in (its leading dims are not [batch, sequence]): judged whole, and it moved.
    assert pooled["max_abs"] > 0.1
    note = next(n for n in report["notes"] if "masked by attention_mask" in n)
    assert "tokens" in note and "pooled" not in note.split("masked")[0]
    assert f"{int((mask == 0).sum())} padding position(s) of {mask.size}" in note
    assert result.exit_code != 0  # pooled fails --min-cosine: the padding did change what a user reads there


def test_validate_without_a_mask_input_judges_every_position(tmp_path, runner):
    # The same 0/1 input under a name that does not say "mask" (token_type_ids is 0/1 and ids-shaped as well).
    original = save_model(_token_model(mask_name="segment"), tmp_path / "original.onnx")
    candidate = save_model(_token_model(pad_row_scale=-3.0, mask_name="segment"), tmp_path / "candidate.onnx")
    _token_data(tmp_path / "data.npz", mask_name="segment")
    _, report = _validate_json(runner, original, candidate, "--data", str(tmp_path / "data.npz"))
    assert report["outputs"]["tokens"]["max_abs"] > 0.1
    assert not any("masked by" in n for n in report["notes"])


def test_attention_mask_needs_name_shape_and_values():
    from onnxshrink.data import InputSpec
    from onnxshrink.validate import attention_mask

    def spec(name):
        return InputSpec(name, np.dtype(np.int64), ["batch", "sequence"])

    ids = np.ones((2, 4), np.int64)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    specs = [spec("input_ids"), spec("attention_mask"), spec("token_type_ids")]
    batches = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}] * 2
    name, joined = attention_mask(specs, batches)
    assert name == "attention_mask" and joined.shape == (4, 4) and joined.dtype == bool
    assert attention_mask(specs, [{**batches[0], "attention_mask": mask * 2}]) is None  # not 0/1
    assert attention_mask(specs, [{**batches[0], "attention_mask": mask[:, :3]}]) is None  # not the ids' shape
    assert attention_mask(specs[::2], batches) is None  # token_type_ids alone is no mask


def test_compare_outputs_with_a_mask():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4, 5))
    b = a.copy()
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    b[~mask] = -a[~mask] * 10  # padding only: nothing counts
    drift = compare_outputs(a, b, mask)
    assert drift.max_abs == 0 and drift.cosine == pytest.approx(1.0) and drift.cosine_min == pytest.approx(1.0)
    assert drift.top1_agreement == 1.0
    b[0, 1] += 1.0  # a real token moves: measured on the 6 real tokens of the 2 samples that have any
    drift = compare_outputs(a, b, mask)
    assert drift.max_abs == pytest.approx(1.0)
    assert drift.mean_rel == pytest.approx(5 / (6 * 5) / np.abs(a[mask]).mean())
    row = lambda x: np.where(mask[0][:, None], x[0], 0).ravel()  # noqa: E731
    expected = row(a) @ row(b) / np.linalg.norm(row(a)) / np.linalg.norm(row(b))
    assert drift.cosine_min == pytest.approx(expected) and drift.cosine == pytest.approx((expected + 1) / 2)
    # [batch, sequence] scores (a span start): argmax over the real tokens only.
    start = rng.standard_normal((3, 4))
    moved = start.copy()
    moved[0, 3] = 99.0  # a padded position wins the candidate's raw argmax
    assert compare_outputs(start, moved, mask).top1_agreement == 1.0
    with pytest.raises(DataError):
        compare_outputs(a, b, mask[:, :3])


def test_fallback_ranks_drift_on_real_tokens_only():
    # The accuracy fallback judges (and ranks layers) as validate does: padding positions are left out.
    from onnxshrink.fallback import relative_drift

    rng = np.random.default_rng(8)
    reference = {"tokens": rng.standard_normal((2, 4, 3)), "pooled": rng.standard_normal((2, 3))}
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    produced = {name: value.copy() for name, value in reference.items()}
    produced["tokens"][~mask] += 5.0
    assert relative_drift(reference, produced, mask) == 0.0
    assert relative_drift(reference, produced) > 0.5
