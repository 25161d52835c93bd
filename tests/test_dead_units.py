"""Dead-unit removal after pruning, and cluster --float16: both are what took compress past 30x."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import SAMPLES, build_model, float_value, invoke, make_mlp, save_model
from onnx import helper
from onnxshrink import api
from onnxshrink.compress_search import PassSpec, Recipe, run_recipe
from onnxshrink.passes.cluster import ClusterConfig
from onnxshrink.passes.dead_units import RemoveDeadUnits
from onnxshrink.passes.prune import PruneConfig
from onnxshrink.runtime import make_session


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def outputs(model, x):
    return make_session(model, optimize=False).run(None, {"input": x})[0]


def with_weights(model, **arrays):
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name].astype(np.float32), tensor.name))
    return model


def test_unread_and_constant_units_go_and_the_outputs_stay_the_same():
    model = make_mlp((16, 24, 20, 6), seed=3)
    w = inits(model)
    w1, w0 = w["fc1.weight"].copy(), w["fc0.weight"].copy()
    w1[[2, 5, 7], :] = 0  # hidden units 2, 5, 7 of layer 0: nothing reads them
    w0[:, [9, 11]] = 0  # units 9, 11: no input reaches them, they output relu(bias), a constant
    model = with_weights(model, **{"fc1.weight": w1, "fc0.weight": w0})
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    expected = outputs(model, x)
    result, report = RemoveDeadUnits()(model)
    shapes = {n: a.shape for n, a in inits(result).items()}
    assert shapes["fc0.weight"] == (16, 19) and shapes["fc0.bias"] == (19,) and shapes["fc1.weight"] == (19, 20)
    assert report.changed and "removed 5/24 dead units" in report.layers[0].action
    np.testing.assert_allclose(outputs(result, x), expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(result, full_check=True)


def test_removal_cascades_until_nothing_is_dead():
    model = make_mlp((8, 12, 10, 4), seed=1)
    w = inits(model)
    w2, w1 = w["fc2.weight"].copy(), w["fc1.weight"].copy()
    w2[[0, 1], :] = 0  # units 0 and 1 of layer 1 are unread ...
    w1[:, 2:] = 0  # ... and every other unit of layer 1 is constant; so its input rows 3, 4 read only dead units:
    w1[[3, 4], :] = 0  # once layer 1's units go, units 3, 4 of layer 0 are unread too
    model = with_weights(model, **{"fc2.weight": w2, "fc1.weight": w1})
    x = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    expected = outputs(model, x)
    result, report = RemoveDeadUnits()(model)
    shapes = {n: a.shape for n, a in inits(result).items()}
    assert shapes["fc1.weight"][1] == 1  # everything dead but the one unit a layer must keep
    assert shapes["fc0.weight"] == (8, 10)
    np.testing.assert_allclose(outputs(result, x), expected, rtol=1e-5, atol=1e-5)


def test_a_model_with_nothing_dead_is_unchanged():
    model = make_mlp(seed=4)
    before = model.SerializeToString()
    result, report = RemoveDeadUnits()(model)
    assert not report.changed and report.notes == ["no dead units"]
    assert result.SerializeToString() == before


def test_conv_keeps_a_multiple_of_its_block_of_channels():
    rng = np.random.default_rng(5)
    c1 = rng.standard_normal((24, 1, 3, 3)).astype(np.float32)
    c2 = rng.standard_normal((8, 24, 3, 3)).astype(np.float32)
    c2[:, :20] = 0  # 20 of conv1's 24 channels are unread: 4 live ones
    t = numpy_helper.from_array
    nodes = [helper.make_node("Conv", ["input", "c1", "b1"], ["y1"], name="conv1"),
             helper.make_node("Relu", ["y1"], ["a1"], name="relu"),
             helper.make_node("Conv", ["a1", "c2"], ["y"], name="conv2")]
    model = build_model(nodes, [float_value("input", ["n", 1, 9, 9])], [float_value("y", ["n", 8, 5, 5])],
                        [t(c1, "c1"), t(rng.standard_normal(24).astype(np.float32), "b1"), t(c2, "c2")])
    x = rng.standard_normal((2, 1, 9, 9)).astype(np.float32)
    expected = outputs(model, x)
    result, _ = RemoveDeadUnits()(model)
    # 24 -> 16 (the block size above 16 channels), then 16 -> 8 (the block at 16 or fewer), never the 4 live ones
    assert inits(result)["c1"].shape == (8, 1, 3, 3)
    np.testing.assert_allclose(outputs(result, x), expected, rtol=1e-5, atol=1e-5)


def test_constant_channels_a_padded_conv_reads_stay():
    """At a padded Conv's borders a constant channel's contribution is not a constant: removing it would not be exact."""
    rng = np.random.default_rng(6)
    c1 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    c1[:3] = 0  # channels 0-2 output relu(bias) > 0 everywhere
    t = numpy_helper.from_array
    nodes = [helper.make_node("Conv", ["input", "c1", "b1"], ["y1"], name="conv1"),
             helper.make_node("Relu", ["y1"], ["a1"], name="relu"),
             helper.make_node("Conv", ["a1", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = build_model(nodes, [float_value("input", ["n", 1, 9, 9])], [float_value("y", ["n", 4, 7, 7])],
                        [t(c1, "c1"), t(np.full(8, 0.5, np.float32), "b1"),
                         t(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "c2")])
    result, report = RemoveDeadUnits()(model)
    assert not report.changed and inits(result)["c1"].shape == (8, 1, 3, 3)


def test_prune_option_removes_dead_units_of_the_sample_mlp_without_changing_it(tmp_path):
    calibration = SAMPLES / "digits_mlp.calib.npz"
    x = np.load(SAMPLES / "digits_mlp.eval.npz")["input"][:64]
    dense = api.prune(SAMPLES / "digits_mlp.onnx", tmp_path / "dense.onnx", PruneConfig(sparsity=0.85),
                      calibration=calibration, run_validation=False)
    slim = api.prune(SAMPLES / "digits_mlp.onnx", tmp_path / "slim.onnx", PruneConfig(sparsity=0.85, remove_dead_units=True),
                     calibration=calibration, run_validation=False)
    a, b = (onnx.load(r.output) for r in (dense, slim))
    assert sum(v.size for v in inits(b).values()) < 0.9 * sum(v.size for v in inits(a).values())
    np.testing.assert_allclose(outputs(b, x), outputs(a, x), rtol=1e-5, atol=1e-5)
    assert any("dead units" in layer.reason for layer in slim.passes[0].layers)


def test_recipe_records_sparsity_before_the_dead_units_go(tmp_path):
    """The search reproduces a prune from its per-layer zero fractions: they must be measured on the pruned
    weights as the prune left them, not after dead units shrank them."""
    model = SAMPLES / "digits_mlp.onnx"
    calibration = SAMPLES / "digits_mlp.calib.npz"
    plain = run_recipe(model, Recipe([PassSpec("prune", {"sparsity": 0.9})]), tmp_path / "a.onnx", calibration=calibration)
    slim = run_recipe(model, Recipe([PassSpec("prune", {"sparsity": 0.9, "remove_dead_units": True})]), tmp_path / "b.onnx",
                      calibration=calibration)
    assert slim.layer_sparsity == plain.layer_sparsity
    assert slim.sparsity == pytest.approx(0.9, abs=1e-3)
    shapes = {n: a.shape for n, a in inits(onnx.load(tmp_path / "b.onnx")).items()}
    assert shapes["fc1.weight"][1] < 256


def test_cluster_float16_halves_the_other_float_tensors_and_they_fold(tmp_path):
    report = api.cluster(SAMPLES / "digits_transformer.onnx", tmp_path / "c.onnx", ClusterConfig(bits=4, float16=True),
                         run_validation=False)
    model = onnx.load(report.output)
    halves = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    floats = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert any("bias" in name for name in halves)
    assert any("norm" in name for name in halves)  # LayerNorm parameters too
    for tensor in floats.values():  # left float32: tiny ones (scalars, 16-entry codebooks), or fp16 would blur them
        value = numpy_helper.to_array(tensor)
        blurred = np.linalg.norm(value.astype(np.float16).astype(np.float32) - value) > 1e-3 * np.linalg.norm(value)
        assert value.size < 32 or blurred, tensor.name  # the attention key biases: ~1e-5, softmax ignores them
    assert report.runtime["codebook_decoding_left"] == 0  # the Casts fold like the codebook decoding
    exact = api.cluster(SAMPLES / "digits_transformer.onnx", tmp_path / "e.onnx", ClusterConfig(bits=4), run_validation=False)
    # Packed, where the bytes count (in a plain .onnx the Cast nodes cost about what fp16 saves):
    packed = [api.pack(path, tmp_path / f"{name}.shrink").output for name, path in (("h", report.output), ("e", exact.output))]
    assert Path(packed[0]).stat().st_size < Path(packed[1]).stat().st_size - 1000
    x = np.load(SAMPLES / "digits_transformer.eval.npz")["input"][:64]
    np.testing.assert_allclose(outputs(model, x), outputs(onnx.load(exact.output), x), rtol=1e-2, atol=1e-2)
    again = api.cluster(report.output, tmp_path / "again.onnx", ClusterConfig(bits=4, float16=True), run_validation=False)
    assert not again.passes[0].changed  # nothing left to do


def test_cli_options(runner, tmp_path):
    source = save_model(make_mlp(seed=2), tmp_path / "m.onnx")
    result = invoke(runner, "cluster", source, "--float16", "-o", tmp_path / "o.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    assert "as fp16" in result.output
    result = invoke(runner, "prune", source, "--sparsity", "0.9", "--remove-dead-units", "-o", tmp_path / "p.onnx",
                    "--no-validate")
    assert result.exit_code == 0, result.output
