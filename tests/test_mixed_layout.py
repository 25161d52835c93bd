"""Each layer its own codebook layout: cluster's layer_per (a recipe's `per` rule), and compress's plan pricing
allocations in which a layer takes a codebook per channel only where one codebook a layer flattens it."""

from __future__ import annotations

import tomllib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import make_mlp, save_model
from onnxshrink import compress_plan
from onnxshrink.compress_plan import CHANNEL_KEY, LayerPrice, Prices
from onnxshrink.compress_search import CompressConfig, parse_recipe, planned_recipe, run_recipe
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.runtime import make_session


def _codebooks(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_codebook")}


def test_one_layer_per_channel_the_others_per_layer():
    model = make_mlp()
    clustered, report = Cluster(ClusterConfig(bits=3, layer_per={"fc1/MatMul": "channel"}))(model)
    books = _codebooks(clustered)
    assert books["fc1.weight_codebook"].shape == (48, 8)  # a codebook for each of fc1's 48 output channels
    assert books["fc0.weight_codebook"].shape == (8,) and books["fc2.weight_codebook"].shape == (8,)
    actions = {layer.node: layer.action for layer in report.layers}
    assert "per channel" in actions["fc1/MatMul"] and "per channel" not in actions["fc0/MatMul"]
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    before = make_session(model).run(None, {"input": x})[0]
    after = make_session(clustered).run(None, {"input": x})[0]
    assert after.shape == before.shape and np.corrcoef(after.ravel(), before.ravel())[0, 1] > 0.9


def test_a_layout_other_than_layer_or_channel_is_refused():
    with pytest.raises(UsageError, match="layer 'fc1/MatMul': per 'row'"):
        Cluster(ClusterConfig(layer_per={"fc1/MatMul": "row"}))


def test_a_recipe_rule_sets_a_layers_layout(tmp_path):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    text = ('[[passes]]\nname = "cluster"\nbits = 3\n\n[[passes.layers]]\nmatch = "fc2/*"\nper = "channel"\n')
    run_recipe(path, parse_recipe(tomllib.loads(text)), tmp_path / "out.onnx")
    books = _codebooks(onnx.load(tmp_path / "out.onnx"))
    assert books["fc2.weight_codebook"].shape == (10, 8) and books["fc1.weight_codebook"].shape == (8,)


def _prices() -> Prices:
    """Three alike layers, one of which one codebook a layer flattens (its channel codebooks cost it 0.06 bits)."""
    flat = {3: 0.04, 4: 0.01, 5: 0.003, 6: 0.001, 8: 0.0}
    channel = {3: 0.05, 4: 0.012}
    layers = [LayerPrice(f"l{i}", 4096, dict(flat), True, drift=flat[4], channel_errors=dict(channel), channels=16)
              for i in range(3)]
    layers[1].errors = {3: 0.9, 4: 0.3, 5: 0.05, 6: 0.02, 8: 0.0}
    layers[1].channel_errors = {3: 0.03, 4: 0.008}
    return Prices(layers)


def test_the_mixed_frontier_gives_channel_codebooks_to_the_flattened_layer_alone():
    prices = _prices()
    assert compress_plan.layouts(prices) == ("layer", "channel", "mixed")
    assert compress_plan.layer_choice(4 + CHANNEL_KEY, "mixed") == (4, "channel")
    assert compress_plan.layer_choice(4, "mixed") == (4, "layer")
    assert compress_plan.stored_bits(prices.layers[1], 4 + CHANNEL_KEY, "mixed") == \
        compress_plan.stored_bits(prices.layers[1], 4, "channel")
    path = compress_plan.frontier(prices, "mixed")
    assert compress_plan.layer_choice(path[-1]["l1"], "mixed") == (3, "layer")  # the frontier ends at the fewest bits
    at_four = next(a for a in path if compress_plan.average_bits(a, prices, "mixed") <= 4.1)
    assert [compress_plan.layer_choice(at_four[n], "mixed")[1] for n in ("l0", "l1", "l2")] == ["layer", "channel", "layer"]
    # at the same bits it beats both pure layouts
    drift = compress_plan.predicted_drift(at_four, prices, "mixed")
    for per in ("layer", "channel"):
        for allocation in compress_plan.frontier(prices, per):
            if compress_plan.average_bits(allocation, prices, per) <= compress_plan.average_bits(at_four, prices, "mixed"):
                assert compress_plan.predicted_drift(allocation, prices, per) > drift
    bits = compress_plan.layer_choice(at_four["l1"], "mixed")[0]
    assert f"{bits} bits per channel x1" in compress_plan.summary(at_four, prices, "mixed")
    assert "mixed" in {per for _, per in compress_plan.finalists(prices, None)}


def test_a_mixed_rung_in_one_layout_is_written_in_it():
    # one layer: each mixed rung is a pure one, and is validated once, in its layout
    prices = Prices([LayerPrice("l0", 4096, {3: 0.5, 4: 0.2, 5: 0.05, 6: 0.02, 8: 0.0}, True, drift=0.2,
                                channel_errors={3: 0.01, 4: 0.002}, channels=16)])
    assert "mixed" in compress_plan.layouts(prices)
    rungs = compress_plan.finalists(prices, None)
    assert "mixed" not in {per for _, per in rungs} and ({"l0": 4}, "channel") in rungs
    assert all(isinstance(a["l0"], int) for a, _ in rungs)
    assert len({(tuple(sorted(a.items())), per) for a, per in rungs}) == len(rungs)


def test_a_mixed_allocation_becomes_per_rules_on_the_channel_layers():
    allocation = {"fc0/MatMul": 4, "fc1/MatMul": 4 + CHANNEL_KEY, "fc2/MatMul": 3 + CHANNEL_KEY}
    spec = planned_recipe(allocation, CompressConfig(), False, "fp16", "mixed").passes[0]
    assert spec.options.get("per", "layer") == "layer" and spec.options["bits"] == 4
    rules = {rule.match: rule.options for rule in spec.layers}
    assert "fc0/MatMul" not in rules
    assert rules["fc1/MatMul"] == {"per": "channel"} and rules["fc2/MatMul"] == {"bits": 3, "per": "channel"}


def test_mixed_rungs_do_not_take_the_place_of_pure_ones():
    """Predicted drift ranks allocations within a layout, not across: a pure rung stays though a mixed one is
    predicted lower at fewer bits (PP-OCR's recogniser lost its passing per-channel rungs so)."""
    prices = _prices()
    rungs = [(a, per, compress_plan.average_bits(a, prices, per), compress_plan.predicted_drift(a, prices, per))
             for a, per in compress_plan.finalists(prices, None)]
    assert {per for _, per, _, _ in rungs} == {"layer", "channel", "mixed"}
    beaten = [r for r in rungs if r[1] != "mixed" and any(o[1] == "mixed" and o[2] <= r[2] and o[3] < r[3] for o in rungs)]
    assert beaten  # kept, though a mixed rung beats them on both counts
    order = sorted(rungs, key=lambda r: -r[2])
    assert [r[2] for r in rungs] == [r[2] for r in order]  # widest first
