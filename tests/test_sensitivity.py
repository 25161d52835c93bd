"""Sensitivity: per-layer output drift when each layer alone is pruned, and prune allocating from it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SAMPLES, invoke, make_mlp, save_model, tree
from onnxshrink.data import input_specs, load_npz
from onnxshrink.errors import UsageError
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.layer_sensitivity import SensitivityConfig, measure


def test_drift_grows_with_sparsity_and_skipped_layers_are_listed():
    model = make_mlp(widths=(32, 64, 48, 4))  # the last layer is tiny: not measured
    report = measure(model, None, SensitivityConfig(sparsities=(0.3, 0.6, 0.9)))
    assert [layer.node for layer in report.layers] == ["fc0/MatMul", "fc1/MatMul"]
    assert [d.node for d in report.skipped] == ["fc2/MatMul"]
    for layer in report.layers:
        assert layer.drift == sorted(layer.drift) and layer.drift[0] > 0
        assert all(0 <= a <= 1 for a in layer.agreement)
    assert report.synthetic_inputs and report.importance == "magnitude"
    data = json.loads(report.to_json())
    assert data["sparsities"] == [0.3, 0.6, 0.9] and len(data["layers"][0]["drift"]) == 3


def test_bad_grid_is_a_usage_error():
    with pytest.raises(UsageError, match="between 0 and 1"):
        measure(make_mlp(), None, SensitivityConfig(sparsities=(0.5, 1.0)))


def test_prune_allocates_from_measured_sensitivity():
    model = onnx.load(str(SAMPLES / "digits_mlp.onnx"))
    data = load_npz(SAMPLES / "digits_mlp.calib.npz", input_specs(model))
    report = measure(model, data, SensitivityConfig(sparsities=(0.5, 0.8, 0.95)))
    assert report.importance == "activation" and not report.synthetic_inputs
    pruned, prune_report = Prune(PruneConfig(sparsity=0.8, sensitivity=report.to_dict(), reconstruct=False), data)(model)
    assert any("measured sensitivity" in note for note in prune_report.notes)
    values = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    weights = [values[n] for n in ("fc1.weight", "fc2.weight", "fc3.weight")]
    assert sum(int(np.sum(w == 0)) for w in weights) == round(0.8 * sum(w.size for w in weights))


def test_cli_sensitivity_then_prune(runner, tmp_path):
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    result = invoke(runner, "sensitivity", model, "--sparsities", "0.5,0.9", "-o", tmp_path / "sens.json", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tmp_path / "sens.json").read_text())
    pruned = invoke(runner, "prune", model, "--sparsity", "0.6", "--sensitivity", tmp_path / "sens.json", "--no-validate")
    assert pruned.exit_code == 0, pruned.output
    assert (tmp_path / "mlp.pruned.onnx").exists()


@pytest.mark.parametrize("args,code,message", [
    (["--sparsities", "0.5,x"], 2, "--sparsities '0.5,x': expected comma-separated fractions"),
    (["--importance", "activation"], 2, "--importance activation needs calibration data"),
    (["--sparsities", "0.5,1.0"], 2, "--sparsities 0.5,1.0: each must be between 0 and 1 (exclusive)"),
])
def test_cli_sensitivity_bad_options(runner, tmp_path, args, code, message):
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    before = tree(tmp_path)
    result = invoke(runner, "sensitivity", model, *args)
    assert result.exit_code == code, result.output
    assert result.stderr.strip().startswith("error: ") and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_cli_prune_bad_sensitivity_file(runner, tmp_path):
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    (tmp_path / "bad.json").write_text("[1, 2]")
    before = tree(tmp_path)
    result = invoke(runner, "prune", model, "--sparsity", "0.5", "--sensitivity", tmp_path / "bad.json")
    assert result.exit_code == 3 and "not a sensitivity report" in result.stderr
    assert tree(tmp_path) == before


def test_bit_width_drift_grows_as_bits_shrink_and_matches_rounding_by_hand():
    model = make_mlp(widths=(32, 64, 48, 4))
    report = measure(model, None, SensitivityConfig(sparsities=(0.5,), bits=(2, 8, 4)))
    assert report.bits == [8, 4, 2]
    for layer in report.layers:
        assert len(layer.bit_drift) == 3 and layer.bit_drift == sorted(layer.bit_drift) and layer.bit_drift[0] > 0
    # The 8-bit drift of fc0 equals rounding its weight per output channel by hand and running the model.
    import onnxruntime as ort

    from onnxshrink.algorithms import gptq
    from onnxshrink.data import synthesize

    feed = synthesize(input_specs(model), seed=0).batches[0]
    reference = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    w = numpy_helper.to_array(edited.graph.initializer[0])
    rounded = gptq.rtn(w, 8, w.shape[0]).dequantize()
    edited.graph.initializer[0].CopyFrom(numpy_helper.from_array(rounded, edited.graph.initializer[0].name))
    by_hand = ort.InferenceSession(edited.SerializeToString()).run(None, feed)[0]
    expected = np.linalg.norm(by_hand - reference) / np.linalg.norm(reference)
    assert report.layers[0].bit_drift[0] == pytest.approx(expected, rel=1e-4)


def test_cli_quantize_keeps_the_layers_above_max_layer_drift_float(runner, tmp_path):
    sensitivity = tmp_path / "sens.json"
    result = invoke(runner, "sensitivity", SAMPLES / "digits_mlp.onnx", "--calibration", SAMPLES / "digits_mlp.calib.npz",
                    "--sparsities", "0.5", "--bits", "8,2", "-o", sensitivity)
    assert result.exit_code == 0, result.output
    layers = json.loads(sensitivity.read_text())["layers"]
    drifts = sorted(layer["bit_drift"][1] for layer in layers)
    threshold = (drifts[0] + drifts[1]) / 2  # every layer but the least sensitive one is above it
    result = invoke(runner, "quantize", SAMPLES / "digits_mlp.onnx", "--bits", "2", "--sensitivity", sensitivity,
                    "--max-layer-drift", threshold, "-o", tmp_path / "q.onnx", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    quantized = [d["node"] for d in report["passes"][0]["layers"] if d["action"].startswith("int")]
    least = min(layers, key=lambda layer: layer["bit_drift"][1])["node"]
    assert quantized == [least]
    assert any("--max-layer-drift" in note for note in report["notes"])


@pytest.mark.parametrize("args, message", [
    (["--sensitivity", "sens.json"], "--sensitivity and --max-layer-drift go together"),
    (["--max-layer-drift", "0.1"], "--sensitivity and --max-layer-drift go together"),
    (["--bits", "4", "--sensitivity", "sens.json", "--max-layer-drift", "0.1"], "has no 4-bit measurement"),
])
def test_cli_quantize_sensitivity_option_errors(runner, tmp_path, args, message):
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps({"sparsities": [0.5], "bits": [8], "layers": []}))
    source = save_model(make_mlp(), tmp_path / "m.onnx")
    before = tree(tmp_path)
    result = invoke(runner, "quantize", source, "-o", tmp_path / "q.onnx", *[a.replace("sens.json", str(sens)) for a in args])
    assert result.exit_code == 2 and message in result.output
    assert tree(tmp_path) == before
