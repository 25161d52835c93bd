"""Accuracy-aware fallback in quantize: the most sensitive layers kept float until a budget holds on held-out data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import invoke, make_mlp, save_model
from onnxshrink import api
from onnxshrink.fallback import FallbackConfig, restore_float
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.passes.quantize_static import StaticQuantizeConfig
from onnxshrink.runtime import make_session
from onnxshrink.validate import Thresholds, ValidateConfig

SENSITIVE = "fc1/MatMul"


def sensitive_mlp() -> onnx.ModelProto:
    """16 -> 32 -> 32 -> 8 MLP whose hidden channel 0 runs about 1000x the others' range, and fc1 reads it with
    weights 1000x smaller: the same function in float, but quantizing fc1's input per tensor (uint8 over
    [0, ~2500]) rounds every other channel to zero. fc1 is the one layer that must stay float."""
    model = make_mlp((16, 32, 32, 8), seed=1)
    tensors = {t.name: t for t in model.graph.initializer}
    w0, b0, w1 = (numpy_helper.to_array(tensors[n]).copy() for n in ("fc0.weight", "fc0.bias", "fc1.weight"))
    w0[:, 0] = np.abs(w0[:, 0]) * 1000
    b0[0] = 1000.0
    w1[0, :] /= 1000
    for name, array in (("fc0.weight", w0), ("fc0.bias", b0), ("fc1.weight", w1)):
        tensors[name].CopyFrom(numpy_helper.from_array(array, name))
    return model


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((64, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", input=rng.standard_normal((32, 16)).astype(np.float32))
    return save_model(sensitive_mlp(), tmp_path / "s.onnx"), tmp_path / "cal.npz", tmp_path / "eval.npz"


def static(**kw) -> StaticQuantizeConfig:
    # smooth=False: SmoothQuant (on by default) moves fc1's outlier channel into its weights, and fc1 would no
    # longer need to fall back (tests/test_smooth_quant.py covers that).
    return StaticQuantizeConfig(integer_min_macs=0, **{"smooth": False, **kw})  # integer kernels even on these tiny layers


def float_layers(path) -> set:
    """Names of the MatMul/Gemm nodes that read no DequantizeLinear output: float kernels with float inputs."""
    model = onnx.load(str(path))
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and not set(n.input) & dq}


def test_static_default_budget_keeps_exactly_the_sensitive_layer_float(files, tmp_path):
    model, cal, _ = files
    report = api.quantize(model, tmp_path / "out.onnx", static(), calibration=cal)
    assert report.validation.passed and report.output == str(tmp_path / "out.onnx")
    assert [layer["node"] for layer in report.fallback["layers"]] == [SENSITIVE]
    assert report.fallback["met"] and report.fallback["budget"] == {"min_cosine": 0.99}
    assert report.fallback["drift_after"] < report.fallback["drift_before"] / 10
    assert report.validation.outputs["logits"].cosine >= 0.99
    assert float_layers(report.output) == {SENSITIVE}
    decision = next(d for d in report.passes[0].layers if d.node == SENSITIVE)
    assert decision.action == "kept float" and "accuracy fallback" in decision.reason
    # Judged on held-out samples, never on the calibrating ones.
    assert report.fallback["data"].startswith("held-out calibration samples 48..63")
    assert any("min_cosine 0.99" in note for note in report.notes)


def test_no_fallback_keeps_todays_behaviour(files, tmp_path):
    model, cal, _ = files
    report = api.quantize(model, tmp_path / "out.onnx", static(), calibration=cal, fallback=False)
    assert report.fallback is None and report.validation.passed  # no default budget either
    assert report.validation.outputs["logits"].cosine < 0.5  # what the fallback repairs
    assert float_layers(report.output) == set()


def test_budget_already_met_moves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((64, 32)).astype(np.float32))
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    report = api.quantize(model, tmp_path / "out.onnx", static(), calibration=tmp_path / "cal.npz")
    assert report.fallback["met"] and report.fallback["layers"] == [] and report.fallback["attempts"] == 1
    assert report.fallback["ranked"] == 0 and float_layers(report.output) == set()
    assert all(d.action.startswith("int8") for d in report.passes[0].layers)


def test_impossible_budget_writes_the_best_model_as_failed_and_exits_1(files, tmp_path, runner):
    model, cal, _ = files
    out = tmp_path / "out.onnx"
    result = invoke(runner, "quantize", model, "--calibration", cal, "--no-smooth", "--max-drift", "0", "-o", out, "--json")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert not out.exists() and (tmp_path / "out.failed.onnx").exists()
    fallback = document["fallback"]
    assert not fallback["met"] and fallback["cap"] == 1 and "cap reached" in fallback["stopped"]
    # The best model tried: the sensitive layer, first in the ranking, is the one moved.
    assert [layer["node"] for layer in fallback["layers"]] == [SENSITIVE]
    assert any("still missed" in note for note in document["passes"][0]["notes"])


def test_max_fallback_zero_moves_nothing_and_says_so(files, tmp_path):
    model, cal, _ = files
    report = api.quantize(model, tmp_path / "out.onnx", static(), calibration=cal, fallback=FallbackConfig(max_layers=0))
    assert report.fallback["layers"] == [] and not report.fallback["met"] and "cap reached" in report.fallback["stopped"]
    assert not report.validation.passed and report.output.endswith("out.failed.onnx")


def test_explicit_budget_on_data_in_dynamic_mode_reruns_the_pass_without_the_layer(files, tmp_path):
    """No QDQ to restore in place: each candidate is measured by quantizing again with it excluded."""
    model, _, data = files
    validation = ValidateConfig(data=str(data), thresholds=Thresholds(min_cosine=0.99))
    report = api.quantize(model, tmp_path / "out.onnx", QuantizeConfig(integer_min_macs=0, activation_error_bound=0),  # else the activation check folds fc1 first
                          validation=validation)
    assert report.fallback["data"] == str(data) and report.fallback["met"], report.fallback
    assert [layer["node"] for layer in report.fallback["layers"]] == [SENSITIVE]
    assert report.validation.passed
    actions = {d.node: d.action for d in report.passes[0].layers}
    assert actions[SENSITIVE] == "kept float" and actions["fc0/MatMul"].startswith("int8")


def test_dynamic_without_budget_or_data_does_not_fall_back(files, tmp_path):
    model, _, _ = files
    report = api.quantize(model, tmp_path / "out.onnx", QuantizeConfig(integer_min_macs=0))
    assert report.fallback is None


def test_restore_float_rewires_one_layer_and_drops_its_unused_qdq(files, tmp_path):
    model, cal, _ = files
    # Without SmoothQuant the written weight is the original's int8 rounding, so the original itself comes back.
    config = static(**({"smooth": False} if "smooth" in StaticQuantizeConfig.__dataclass_fields__ else {}))
    report = api.quantize(model, tmp_path / "q.onnx", config, calibration=cal, fallback=False)
    quantized = onnx.load(report.output)
    original = numpy_helper.to_array(next(t for t in onnx.load(str(model)).graph.initializer if t.name == "fc1.weight"))
    restored = restore_float(quantized, SENSITIVE, original)
    node = next(n for n in restored.graph.node if n.name == SENSITIVE)
    weights = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    assert np.array_equal(weights[node.input[1]], original)  # the float weight itself, not its int8 rounding
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    # fc1's input Q/DQ (read by nothing else) and its weight and bias DQ are gone.
    assert count(restored, "QuantizeLinear") == count(quantized, "QuantizeLinear") - 1
    assert count(restored, "DequantizeLinear") == count(quantized, "DequantizeLinear") - 3
    make_session(restored).run(None, {"input": np.zeros((2, 16), np.float32)})
    assert restore_float(quantized, "no such node").SerializeToString() == quantized.SerializeToString()


def test_layers_reading_one_quantized_input_move_together(tmp_path):
    """Two layers read the outlier tensor (as query, key and value read one LayerNorm): restoring one alone
    leaves the other's error, so the unit measured and moved is the quantized input with all its layers."""
    rng = np.random.default_rng(2)
    w0 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    b0 = (rng.standard_normal(32) * 0.1).astype(np.float32)
    w0[:, 0], b0[0] = np.abs(w0[:, 0]) * 1000, 1000.0
    wa, wb = ((rng.standard_normal((32, 8)) / 6).astype(np.float32) for _ in range(2))
    wa[0] /= 1000
    wb[0] /= 1000
    from onnx import helper

    from conftest import build_model, float_value

    model = build_model(
        [helper.make_node("MatMul", ["input", "w0"], ["m0"], name="fc0"), helper.make_node("Add", ["m0", "b0"], ["p0"]),
         helper.make_node("Relu", ["p0"], ["h0"], name="relu"),
         helper.make_node("MatMul", ["h0", "wa"], ["a"], name="fca"), helper.make_node("MatMul", ["h0", "wb"], ["b"], name="fcb"),
         helper.make_node("Add", ["a", "b"], ["logits"], name="sum")],
        [float_value("input", ["batch", 16])], [float_value("logits", ["batch", 8])],
        [numpy_helper.from_array(a, n) for a, n in ((w0, "w0"), (b0, "b0"), (wa, "wa"), (wb, "wb"))])
    path = save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((64, 16)).astype(np.float32))
    report = api.quantize(path, tmp_path / "out.onnx", static(), calibration=tmp_path / "cal.npz")
    moved = {layer["node"]: layer["with"] for layer in report.fallback["layers"]}
    assert set(moved) == {"fca", "fcb"} and moved["fca"] == moved["fcb"], report.fallback
    assert report.fallback["met"] and report.fallback["cap"] == 2  # a quarter of 3 layers, at least the group
    assert float_layers(report.output) == {"fca", "fcb"}
    assert "fcb (same quantized input)" in next(d.reason for d in report.passes[0].layers if d.node == "fca")


def test_accuracy_budget_without_labels_is_refused_before_any_work(files, tmp_path, monkeypatch):
    model, cal, _ = files
    from onnxshrink import fallback
    from onnxshrink.errors import UsageError

    monkeypatch.setattr(fallback.AccuracyFallback, "__call__", lambda self, m: pytest.fail("the loop ran"))

    with pytest.raises(UsageError, match="--max-accuracy-drop needs --data and --labels"):
        api.quantize(model, tmp_path / "out.onnx", static(), calibration=cal,
                     validation=ValidateConfig(thresholds=Thresholds(max_accuracy_drop=0.01)))
    assert not list(tmp_path.glob("out*"))


def test_a_budget_without_real_samples_says_the_fallback_did_not_run(files, tmp_path):
    model, _, _ = files
    validation = ValidateConfig(thresholds=Thresholds(min_cosine=0.5))
    report = api.quantize(model, tmp_path / "out.onnx", QuantizeConfig(integer_min_macs=0), validation=validation)
    assert report.fallback is None and report.validation.synthetic_inputs
    assert any(note.startswith("accuracy fallback did not run: validation has no real samples") for note in report.notes)


def test_a_smoothed_layer_is_restored_with_its_exact_float_weight():
    """SmoothQuant's form: LayerNorm(gamma / s) feeds the layer diag(s) W, rounded to int8. Restored, the layer gets
    W * s itself (the scale read from the two gammas), so the float model's outputs come back exactly."""
    from onnx import helper

    from conftest import build_model, float_value

    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    s = np.exp(rng.uniform(-2, 2, 16)).astype(np.float32)
    smoothed = w * s[:, None]
    w_scale = (np.abs(smoothed).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.rint(smoothed / w_scale), -127, 127).astype(np.int8)

    def graph(g, b, weight_nodes, weight, inits):
        return build_model(
            [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1), *weight_nodes,
             helper.make_node("MatMul", [weight[0], weight[1]], ["out"], name="mm")],
            [float_value("x", ["batch", 16])], [float_value("out", ["batch", 8])],
            [numpy_helper.from_array(g, "g"), numpy_helper.from_array(b, "b"), *inits])

    original = graph(gamma, beta, [], ("y", "w"), [numpy_helper.from_array(w, "w")])
    quantized = graph(gamma / s, beta / s, [
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["ydq"]),
        helper.make_node("DequantizeLinear", ["wq", "wsc", "wz"], ["wdq"], axis=1)], ("ydq", "wdq"), [
        numpy_helper.from_array(np.float32(0.05), "ys"), numpy_helper.from_array(np.uint8(128), "yz"),
        numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(w_scale, "wsc"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wz")])
    from onnxshrink.fallback import input_scale

    scale = input_scale(quantized, original, "y")
    np.testing.assert_allclose(scale, 1 / s, rtol=1e-5)
    restored = restore_float(quantized, "mm", w, scale)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in restored.graph.node)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    expected = make_session(original).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(restored).run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    # Without the scale, only the int8-rounded weight could come back.
    rounded = make_session(restore_float(quantized, "mm", w)).run(None, {"x": x})[0]
    assert np.abs(rounded - expected).max() > 1e-3


def test_cli_no_fallback_and_max_fallback(files, tmp_path, runner):
    model, cal, _ = files
    common = ("quantize", model, "--calibration", cal, "--integer-min-macs", "0", "--no-smooth", "--json")
    off = invoke(runner, *common, "--no-fallback", "-o", tmp_path / "off.onnx")
    assert off.exit_code == 0 and json.loads(off.stdout)["fallback"] is None, off.output
    capped = invoke(runner, *common, "--max-fallback", "0", "-o", tmp_path / "capped.onnx")
    assert capped.exit_code == 1 and json.loads(capped.stdout)["fallback"]["cap"] == 0
    on = invoke(runner, *common, "-o", tmp_path / "on.onnx")
    assert on.exit_code == 0 and [layer["node"] for layer in json.loads(on.stdout)["fallback"]["layers"]] == [SENSITIVE]


def test_a_quantized_tensor_before_a_smoothing_mul_is_found_upstream():
    """x quantized for a fused Relu output, then Mul(1/s) and quantized again for the layer: restoring the layer
    must release both, or x's rounding stays in its input."""
    from onnx import helper

    from conftest import build_model, float_value
    from onnxshrink.fallback import _quantized_upstream

    qdq = lambda t, out: [helper.make_node("QuantizeLinear", [t, "s", "z"], [t + "q"]),  # noqa: E731
                          helper.make_node("DequantizeLinear", [t + "q", "s", "z"], [out])]
    model = build_model(
        [*qdq("x", "xd"), helper.make_node("Mul", ["xd", "c"], ["m"]), *qdq("m", "md"),
         helper.make_node("MatMul", ["md", "w"], ["y"], name="mm")],
        [float_value("x", ["batch", 4])], [float_value("y", ["batch", 2])],
        [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z"),
         numpy_helper.from_array(np.ones(4, np.float32), "c"), numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    assert _quantized_upstream(model, "m") == {"x"}
    assert _quantized_upstream(model, "x") == set()
