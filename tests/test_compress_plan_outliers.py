"""compress's plan offers each layer its largest weights stored exactly (cluster's layer_outliers), priced like its
other options and chosen where they cost less error per bit than a wider codebook."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import build_model, float_value, make_mlp, save_model
from onnxshrink.compress_plan import (OUTLIER_FRACTION, OUTLIER_KEY, LayerPrice, Prices, frontier, layer_choice,
                                      layout_errors, outlier_bits, price_layers, stored_bits, summary)
from onnxshrink.compress_search import CompressConfig, planned_recipe, run_recipe
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig, check_config


def _heavy_tailed_model(tmp_path):
    """x -> MatMul(tail) -> Relu -> MatMul(plain): the first weight has a few weights 40x the rest."""
    rng = np.random.default_rng(4)
    tail = rng.standard_normal((64, 48)) * 0.1
    tail[rng.random(tail.shape) < 0.005] *= 40.0
    plain = rng.standard_normal((48, 8)) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "tail"], ["h"], name="tail"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "plain"], ["y"], name="plain")]
    model = build_model(nodes, [float_value("x", ["n", 64])], [float_value("y", ["n", 8])],
                        [numpy_helper.from_array(tail.astype(np.float32), "tail"),
                         numpy_helper.from_array(plain.astype(np.float32), "plain")])
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    return save_model(model, tmp_path / "m.onnx"), tmp_path / "cal.npz"


def test_outliers_are_priced_lower_in_error_and_higher_in_bits_than_the_same_width(tmp_path):
    path, cal = _heavy_tailed_model(tmp_path)
    prices = price_layers(path, cal, measure=False)
    tail = next(layer for layer in prices.layers if layer.node == "tail")
    assert set(tail.outlier_errors) == {3, 4, 5}
    for bits in (3, 4):
        assert tail.outlier_errors[bits] < 0.5 * tail.errors[bits]  # the codebook no longer spans the few far weights
        key = bits + OUTLIER_KEY
        assert layer_choice(key, "mixed") == (bits, "outliers")
        assert layout_errors(tail, "mixed")[key] == tail.outlier_errors[bits]
        assert stored_bits(tail, key, "mixed") == pytest.approx(tail.outlier_coded[bits])
        assert tail.outlier_coded[bits] >= outlier_bits(tail.weights)  # the exact values and positions are paid for
    assert layout_errors(tail, "layer") == tail.errors  # the per-layer layout offers none: only "mixed" does


def test_a_layer_with_exact_zeros_is_offered_no_outliers(tmp_path):
    path, cal = _heavy_tailed_model(tmp_path)
    model = __import__("onnx").load(path)
    value = numpy_helper.to_array(model.graph.initializer[0]).copy()
    value[::2] = 0.0  # pruned: the pass keeps its zeros at index 0 and stores no outliers, so none is priced
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(value, "tail"))
    prices = price_layers(save_model(model, tmp_path / "pruned.onnx"), cal, measure=False)
    assert next(layer for layer in prices.layers if layer.node == "tail").outlier_errors == {}


def test_the_mixed_frontier_takes_outliers_where_they_cost_less_per_bit():
    # a layer whose error halves with outliers for 0.15 bits, where its next width costs a whole bit more
    cheap = LayerPrice("a", 1000, {3: 0.4, 4: 0.2, 5: 0.18, 8: 0.0}, True, coded={3: 3.0, 4: 4.0, 5: 5.0, 8: 8.0},
                       outlier_errors={3: 0.05, 4: 0.01}, outlier_coded={3: 3.15, 4: 4.15})
    other = LayerPrice("b", 1000, {3: 0.4, 4: 0.2, 5: 0.1, 8: 0.0}, True, coded={3: 3.0, 4: 4.0, 5: 5.0, 8: 8.0})
    prices = Prices([cheap, other])
    path = frontier(prices, "mixed")
    assert path[0] == {"a": 8, "b": 8}
    assert any(layer_choice(allocation["a"], "mixed")[1] == "outliers" for allocation in path)
    assert all(layer_choice(allocation["b"], "mixed")[1] == "layer" for allocation in path)  # none offered to b
    chosen = next(a for a in path if layer_choice(a["a"], "mixed")[1] == "outliers")
    assert f"+ {OUTLIER_FRACTION:.1%} outliers" in summary(chosen, prices, "mixed")


def test_planned_recipe_writes_an_outliers_rule_that_the_pass_follows(tmp_path):
    path = save_model(make_mlp((300, 40, 10), seed=6), tmp_path / "mlp.onnx")
    allocation = {"fc0/MatMul": 4 + OUTLIER_KEY, "fc1/MatMul": 4}
    recipe = planned_recipe(allocation, CompressConfig(), large=False, per="mixed")
    (spec,) = recipe.passes
    assert [(rule.match, rule.options) for rule in spec.layers] == [("fc0/MatMul", {"outliers": OUTLIER_FRACTION})]
    run = run_recipe(path, recipe, tmp_path / "out.onnx")
    assert run.layer_bits == {"fc0/MatMul": 4, "fc1/MatMul": 4}
    import onnx

    out = onnx.load(tmp_path / "out.onnx")
    names = {t.name for t in out.graph.initializer}
    assert "fc0.weight_outlier_positions" in names and "fc1.weight_outlier_positions" not in names
    assert sum(n.op_type == "ScatterND" for n in out.graph.node) == 1
    assert recipe.to_toml().count("outliers = 0.005") == 1  # --save-recipe replays it


def test_the_pass_gives_outliers_only_to_the_named_layers():
    model = make_mlp((300, 40, 10), seed=6)
    result, report = Cluster(ClusterConfig(bits=3, layer_outliers={"fc1/MatMul": 0.05}))(model)
    actions = {d.node: d.action for d in report.layers}
    assert "outliers" not in actions["fc0/MatMul"] and "20 fp16 outliers" in actions["fc1/MatMul"]
    with pytest.raises(UsageError, match="outliers 0.5"):
        check_config(ClusterConfig(layer_outliers={"fc1/MatMul": 0.5}), None)
