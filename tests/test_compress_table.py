"""compress's plan prices embedding tables with the layers: each table's codebook width measured on the whole model,
its fp16 row scales counted in the bits, and its width carried to the written graph on its own."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, save_model
from onnxshrink import compress_plan
from onnxshrink.compress_plan import average_bits, finalists, price_layers, stored_bits
from onnxshrink.compress_search import (CompressConfig, PassSpec, Recipe, _moves, _with_rule, compress, planned_recipe,
                                       resolve, run_recipe)
from onnxshrink.validate import Thresholds

ROWS, WIDTH = 500, 16


def _embedding_model(tmp_path):
    """ids -> Gather(table [500, 16]) -> MatMul(w [16, 64]) + bias: the table holds 89% of the weights."""
    rng = np.random.default_rng(11)
    table = (rng.standard_normal((ROWS, WIDTH)) * rng.uniform(0.1, 2.0, (ROWS, 1))).astype(np.float32)
    w = rng.standard_normal((WIDTH, 64)).astype(np.float32)
    bias = (rng.standard_normal(64) * 0.1 + 1.0).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["p"], name="proj"),
             helper.make_node("Add", ["p", "bias"], ["y"], name="bias_add")]
    model = build_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "t"])],
                        [float_value("y", ["n", "t", 64])],
                        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
                         numpy_helper.from_array(bias, "bias")])
    np.savez(tmp_path / "cal.npz", ids=rng.integers(0, ROWS, (8, 12)).astype(np.int64))
    return save_model(model, tmp_path / "emb.onnx"), tmp_path / "cal.npz"


def test_a_model_whose_table_is_the_bulk_gets_a_plan_that_prices_the_table(tmp_path):
    path, cal = _embedding_model(tmp_path)
    prices = price_layers(path, cal, min_share=compress_plan.MIN_LAYER_SHARE)
    assert [layer.node for layer in prices.layers] == ["proj", "embed"] and not prices.notes
    (table,) = prices.tables
    assert table.tensor == "table" and table.rows == ROWS and table.weights == ROWS * WIDTH
    assert sorted(table.errors) == list(compress_plan.BIT_CHOICES)
    # measured at every width (not a proxy curve scaled to one): the drift of the model with the table coded alone
    assert table.proxy is not None and table.drift == table.errors[compress_plan.SENSITIVITY_BITS]
    widths = sorted(table.errors)
    assert all(table.errors[a] >= table.errors[b] for a, b in zip(widths, widths[1:]))
    assert table.errors[3] > 10 * table.errors[8] > 0
    # the table is coded before the other floats are stored: the int8 price covers the bias alone
    assert prices.int8_elements == 64


def test_a_table_costs_its_row_scales_in_bits_and_bytes(tmp_path):
    path, _ = _embedding_model(tmp_path)
    prices = price_layers(path, None)  # no data: the table priced by its weight error, still an item
    table, layer = prices.tables[0], prices.layers[0]
    assert table.proxy is None and table.errors[3] > table.errors[8]
    scales = (16 * ROWS + 16 * 2 ** 4) / (ROWS * WIDTH)
    assert 3.0 < table.coded[4] <= 4.0  # its indices at their coded bits (compress_plan.coded_bits)
    assert abs(stored_bits(table, 4) - (table.coded[4] + scales)) < 1e-12
    assert stored_bits(table, 4, "channel") == stored_bits(table, 4)  # one layout whatever the layers'
    allocation = {"proj": 8, "embed": 4}
    expected = (layer.weights * layer.coded[8] + table.weights * (table.coded[4] + scales)) / (layer.weights + table.weights)
    assert abs(average_bits(allocation, prices) - expected) < 1e-12


def _codebook_sizes(path) -> dict:
    model = onnx.load(str(path))
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_the_planned_table_width_reaches_the_graph_apart_from_the_layers(tmp_path):
    path, cal = _embedding_model(tmp_path)
    for per in ("layer", "channel"):
        recipe = planned_recipe({"proj": 3, "embed": 5}, CompressConfig(calibration=str(cal)), False, "fp16", per,
                                tables=("embed",))
        (spec,) = recipe.passes
        assert spec.options["bits"] == 3 and [r.match for r in spec.layers] == ["embed"]
        run = run_recipe(path, recipe, tmp_path / f"out.{per}.onnx", calibration=str(cal))
        assert run.layer_bits == {"proj": 3, "embed": 5}
        sizes = _codebook_sizes(tmp_path / f"out.{per}.onnx")
        assert "table" not in sizes and sizes["table_idx"] == [ROWS, WIDTH]
        assert sizes["table_codebook_fp16"] == [32]  # 2^5 entries, one codebook (fp16 with the other floats)
        assert sizes["table_row_scale"] == [ROWS, 1]  # the row-scaled form in either layer layout
        assert sizes["w_codebook_fp16"] == ([8] if per == "layer" else [64, 8])


def test_without_a_priced_table_the_planned_recipe_leaves_tables_to_the_other_floats(tmp_path):
    path, cal = _embedding_model(tmp_path)
    recipe = planned_recipe({"proj": 5}, CompressConfig(calibration=str(cal)), False, "int8")
    assert recipe.passes[0].options["embeddings"] is False
    run_recipe(path, recipe, tmp_path / "out.onnx", calibration=str(cal))
    sizes = _codebook_sizes(tmp_path / "out.onnx")
    assert "table_idx" not in sizes and "table" not in sizes  # stored with the other floats (fp16: rows span 20x)
    assert sizes["table_fp16"] == [ROWS, WIDTH]


def test_the_search_validates_planned_finalists_with_the_table(tmp_path):
    path, cal = _embedding_model(tmp_path)
    prices = price_layers(path, cal, min_share=compress_plan.MIN_LAYER_SHARE)
    rungs = finalists(prices, 0.99)
    assert rungs and all("embed" in allocation for allocation, _ in rungs)
    config = CompressConfig(thresholds=Thresholds(min_cosine=0.99), calibration=str(cal), time_budget_s=None,
                            max_candidates=4, refine=False)
    report = compress(path, tmp_path / "out.shrink", config)
    planned = [c for c in report.candidates if c.phase == "planned"]
    assert planned and all("table" in c.recipe for c in planned)
    assert any("1 layers and 1 embedding table(s) priced" in note for note in report.notes)
    if report.recipe is not None and any(c.passed for c in planned):
        rules = {rule["match"]: rule for rule in report.recipe["passes"][0]["layers"]}
        assert "embed" in rules and "bits" in rules["embed"]


def test_a_resolved_recipe_names_the_table_and_replays(tmp_path):
    """The per-layer moves and --save-recipe write each clustered node's width as a rule, the table's Gather too:
    a rule on a Gather must resolve (it once matched "no layer of the model"), and lowering it is a move."""
    path, cal = _embedding_model(tmp_path)
    recipe = Recipe([PassSpec("cluster", {"bits": 4, "other_floats": "int8"})])
    run = run_recipe(path, recipe, tmp_path / "uniform.onnx")
    assert run.layer_bits == {"proj": 4, "embed": 4}
    resolved = resolve(recipe, run)
    assert {rule.match: rule.options for rule in resolved.passes[0].layers} == {"proj": {"bits": 4}, "embed": {"bits": 4}}
    moves = [(resolved.passes[0].layers[r].match, value) for _, r, key, value in _moves(resolved, 0) if key == "bits"]
    assert ("embed", 3) in moves
    narrower = _with_rule(resolved, 0, [r.match for r in resolved.passes[0].layers].index("embed"), "bits", 3)
    again = run_recipe(path, narrower, tmp_path / "narrower.onnx")
    assert again.layer_bits == {"proj": 4, "embed": 3}
    assert _codebook_sizes(tmp_path / "narrower.onnx")["table_codebook_fp16"] == [8]


def test_table_per_is_checked_and_keeps_tables_row_scaled_beside_per_channel_layers(tmp_path):
    from onnxshrink.errors import UsageError
    from onnxshrink.passes.cluster import ClusterConfig, check_config

    with pytest.raises(UsageError, match="table_per 'row'"):
        check_config(ClusterConfig(table_per="row"), None)
    path, _ = _embedding_model(tmp_path)
    for table_per, expected in ((None, [ROWS, 8]), ("layer", [8])):  # None: as --per (a codebook a row)
        options = {"bits": 3, "per": "channel", "other_floats": "fp16"}
        if table_per:
            options["table_per"] = table_per
        run_recipe(path, Recipe([PassSpec("cluster", options)]), tmp_path / f"t{table_per}.onnx")
        sizes = _codebook_sizes(tmp_path / f"t{table_per}.onnx")
        assert sizes["table_codebook_fp16"] == expected and ("table_row_scale" in sizes) == (table_per == "layer")

