"""compress's plan measured on the whole model: each layer's proxy scaled to the output drift it causes alone, and
the other floats (biases, norms) stored in int8 only where that is cheaper per bit than the next codebook step."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, make_mlp, save_model
from onnxshrink import compress_plan
from onnxshrink.compress_plan import LayerPrice, Prices, marginal_price, other_floats, price_layers
from onnxshrink.compress_search import CompressConfig, planned_recipe, run_recipe


def _branches(tmp_path, quiet_scale=0.01):
    """y = loud(x) + quiet_scale * quiet(x): two layers of the same shape and weight statistics, so the same
    layer-local price, but the quiet one hardly reaches the output. A bias Add gives the other floats."""
    rng = np.random.default_rng(5)
    wa = rng.standard_normal((16, 8)).astype(np.float32)
    wb = rng.standard_normal((16, 8)).astype(np.float32)
    bias = (rng.standard_normal(64) * 0.1 + 1.0).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="loud"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="quiet"),
             helper.make_node("Mul", ["b", "k"], ["bk"]), helper.make_node("Add", ["a", "bk"], ["s"]),
             helper.make_node("Reshape", ["s", "shape"], ["flat"]), helper.make_node("Add", ["flat", "bias"], ["y"])]
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
             numpy_helper.from_array(np.array(quiet_scale, np.float32), "k"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"), numpy_helper.from_array(bias, "bias")]
    model = build_model(nodes, [float_value("x", ["n", 8, 16])], [float_value("y", ["n", 64])], inits)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((4, 8, 16)).astype(np.float32))
    return save_model(model, tmp_path / "branches.onnx"), tmp_path / "cal.npz"


def test_prices_follow_the_drift_each_layer_causes_in_the_whole_model(tmp_path):
    path, cal = _branches(tmp_path)
    local = {layer.node: layer for layer in price_layers(path, cal, measure=False).layers}
    assert 0.3 < local["quiet"].errors[4] / local["loud"].errors[4] < 3  # alike to the layer-local proxy
    prices = price_layers(path, cal)
    measured = {layer.node: layer for layer in prices.layers}
    assert all(layer.drift is not None and layer.proxy is not None for layer in prices.layers)
    assert measured["quiet"].errors[4] < measured["loud"].errors[4] / 100  # scaled by a 0.01 gain, squared
    for layer in prices.layers:  # the curve keeps its shape: scaled, so the widths still rank the same
        ratios = [layer.errors[b] / layer.proxy[b] for b in layer.errors if layer.proxy[b] > 0]
        assert max(ratios) - min(ratios) < 1e-9 * max(ratios)
        assert abs(layer.errors[compress_plan.SENSITIVITY_BITS] - layer.drift) < 1e-12
    assert prices.int8_elements == 64 and prices.int8_drift is not None and prices.int8_drift > 0


def test_without_calibration_nothing_is_measured(tmp_path):
    path, _ = _branches(tmp_path)
    prices = price_layers(path, None)
    assert all(layer.drift is None and layer.proxy is None for layer in prices.layers)
    assert prices.int8_drift is None
    assert other_floats({layer.node: 8 for layer in prices.layers}, prices) == "int8"  # as the uniform formats


def _prices(int8_drift, int8_elements=100) -> Prices:
    layers = [LayerPrice("a", 1000, {3: 0.04, 4: 0.01, 8: 0.0}, True), LayerPrice("b", 1000, {3: 0.4, 4: 0.1, 8: 0.0}, True)]
    return Prices(layers, int8_elements=int8_elements, int8_drift=int8_drift)


def test_marginal_price_is_the_cheapest_next_step():
    prices = _prices(None)
    assert marginal_price({"a": 8, "b": 8}, prices) == 0.01 / (1000 * 4)
    assert marginal_price({"a": 4, "b": 8}, prices) == 0.1 / (1000 * 4)  # b to 4 bits, under a to 3 (3e-5)
    assert marginal_price({"a": 3, "b": 3}, prices) == np.inf


def test_other_floats_go_int8_only_where_that_is_cheaper_than_the_next_codebook_step():
    wide = {"a": 8, "b": 8}  # next codebook step: layer a to 4 bits, 2.5e-6 of drift per bit saved
    assert other_floats(wide, _prices(int8_drift=1e-3)) == "int8"  # 1.25e-6 per bit (8 bits x 100 elements)
    assert other_floats(wide, _prices(int8_drift=1e-2)) == "fp16"  # 1.25e-5 per bit: the codebook step is cheaper
    assert other_floats({"a": 4, "b": 8}, _prices(int8_drift=1e-2)) == "int8"  # now the next step costs 2.5e-5
    assert other_floats({"a": 3, "b": 3}, _prices(int8_drift=1.0)) == "int8"  # no codebook step left


def _initializer_types(path) -> dict:
    model = onnx.load(str(path))
    return {t.name: t.data_type for t in model.graph.initializer}


def test_planned_recipe_carries_the_other_floats_choice(tmp_path):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    allocation = {"fc0/MatMul": 6, "fc1/MatMul": 4, "fc2/MatMul": 4}
    stored = {}
    for floats in ("int8", "fp16"):
        recipe = planned_recipe(allocation, CompressConfig(), large=False, other_floats=floats)
        assert recipe.passes[0].options["other_floats"] == floats
        assert f'other_floats = "{floats}"' in recipe.to_toml()
        run = run_recipe(path, recipe, tmp_path / f"{floats}.onnx")
        assert run.layer_bits == allocation
        stored[floats] = _initializer_types(tmp_path / f"{floats}.onnx")
    biases = ["fc0.bias", "fc1.bias"]  # fc2.bias (10 values) is too small to be worth a Cast
    assert all(stored["int8"].get(b + "_int8") == TensorProto.INT8 for b in biases)
    assert all(stored["fp16"].get(b + "_fp16") == TensorProto.FLOAT16 for b in biases)
    assert not any(t == TensorProto.INT8 for t in stored["fp16"].values())


def test_search_labels_a_planned_finalist_that_keeps_fp16_floats(tmp_path, monkeypatch):
    from onnxshrink.compress_search import compress
    from onnxshrink.validate import Thresholds

    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((16, 32)).astype(np.float32))
    original = compress_plan.price_layers

    def pricey_int8(*args, **kwargs):  # int8 other floats priced far above any codebook step
        prices = original(*args, **kwargs)
        prices.int8_elements, prices.int8_drift = 1, 1e9
        return prices

    monkeypatch.setattr(compress_plan, "price_layers", pricey_int8)
    config = CompressConfig(thresholds=Thresholds(min_cosine=0.99), calibration=str(tmp_path / "cal.npz"),
                            time_budget_s=None, max_candidates=3, refine=False)
    report = compress(path, tmp_path / "out.shrink", config)
    planned = [c for c in report.candidates if c.phase == "planned"]
    assert planned and all(c.recipe.endswith("other floats fp16") or "3 bits x3" in c.recipe for c in planned)
    assert any("layers' prices scaled to the model's measured drift" in note for note in report.notes)


def test_rungs_predicted_far_over_the_drift_budget_are_not_validated():
    # measured prices: units of output drift; layer b is fragile
    layers = [LayerPrice("a", 1000, {3: 0.004, 4: 0.001, 8: 0.0}, True, drift=0.001),
              LayerPrice("b", 1000, {3: 0.4, 4: 0.1, 8: 0.0}, True, drift=0.1)]
    prices = Prices(layers)
    assert compress_plan.measured(prices)
    rungs = compress_plan.ladder(prices, (3.0, 4.0, 6.0))
    assert compress_plan.predicted_drift({"a": 4, "b": 8}, prices) == 0.001
    kept = compress_plan.within_drift(prices, rungs, budget=0.01)
    assert all(compress_plan.predicted_drift(r, prices) <= 0.04 for r in kept)
    assert kept[-1] == {"a": 3, "b": 8}  # the narrowest frontier point within 4 x the budget, though off the ladder
    assert kept[0] == rungs[0] and len(kept) < len(rungs)
    # nothing within the budget: the widest rung is still validated
    assert compress_plan.within_drift(prices, rungs, budget=1e-9) == rungs[:1]


def test_a_layer_with_small_output_channels_prices_lower_with_a_codebook_per_channel():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 8)) * np.array([1.0] * 4 + [0.001] * 4)  # half the channels 1000x smaller
    errors, _ = compress_plan._layer_errors(w, None, (3, 4), None)
    channel, _ = compress_plan._layer_errors(w, None, (3, 4), None, per_channel=True)
    assert channel[4] < errors[4] / 2 and channel[3] < errors[3]
    layer = LayerPrice("l", 256, errors, False, channel_errors=channel, channels=8)
    assert compress_plan.stored_bits(layer, 4) == 4
    assert compress_plan.stored_bits(layer, 4, "channel") == 4 + 16 * 16 * 8 / 256  # 16 fp16 entries a channel


def test_finalists_keep_only_rungs_no_other_of_their_layout_beats_on_bits_and_drift():
    flat = {3: 0.5, 4: 0.2, 5: 0.05, 6: 0.02, 8: 0.0}
    layers = [LayerPrice(f"l{i}", 4096, dict(flat), True, drift=flat[4], channel_errors={3: 0.01, 4: 0.002},
                         channels=16) for i in range(2)]
    prices = Prices(layers)
    rungs = compress_plan.finalists(prices, None)
    assert {"layer", "channel"} <= {per for _, per in rungs}
    bits = [compress_plan.average_bits(a, prices, per) for a, per in rungs]
    assert bits == sorted(bits, reverse=True)  # widest first
    for layout in {per for _, per in rungs}:
        drifts = [compress_plan.predicted_drift(a, prices, per) for a, per in rungs if per == layout]
        assert drifts == sorted(drifts)  # each layout's rungs: fewer bits, more drift
    unmeasured = Prices([LayerPrice(x.node, x.weights, x.errors, True, channel_errors=x.channel_errors,
                                    channels=x.channels) for x in layers])
    assert {per for _, per in compress_plan.finalists(unmeasured, None)} == {"layer"}  # as before the measurement
    recipe = planned_recipe({"fc0/MatMul": 4, "fc1/MatMul": 4, "fc2/MatMul": 3}, CompressConfig(), False, "fp16", "channel")
    assert recipe.passes[0].options["per"] == "channel"
