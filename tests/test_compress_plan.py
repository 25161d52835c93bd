"""compress's plan: per-layer codebook prices from one capture, the greedy frontier, and the planned candidates."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, make_mlp, save_model
from onnxshrink import compress_plan
from onnxshrink.compress_plan import LayerPrice, Prices, average_bits, frontier, ladder, layer_errors, price_layers
from onnxshrink.compress_search import (CompressConfig, compress, planned_recipe, run_recipe, search_formats)
from onnxshrink.validate import Thresholds


def test_layer_error_falls_with_bits_and_follows_the_input_energy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    errors = layer_errors(w, None)
    widths = sorted(errors)
    assert all(errors[a] >= errors[b] for a, b in zip(widths, widths[1:]))
    assert errors[8] < errors[3] / 10
    # Inputs never seen (zero energy) cannot show a weight's error at the output.
    h = np.zeros((16, 16))
    h[0, 0] = 1.0
    only_first = layer_errors(w, h)
    w_flat = w.copy()
    w_flat[0] = 0.5  # one value on the only input seen: a codebook holds it exactly
    assert layer_errors(w_flat, h)[3] < 1e-3 * only_first[3]
    assert only_first[3] < errors[3]  # the codebook is weighted towards the inputs that carry energy


def _prices(*errors_by_layer, weights=100) -> Prices:
    return Prices([LayerPrice(f"l{i}", weights, dict(errors), True) for i, errors in enumerate(errors_by_layer)])


def test_frontier_narrows_the_cheap_layer_first_one_step_at_a_time():
    robust = {3: 0.01, 4: 0.005, 8: 0.0}
    fragile = {3: 0.5, 4: 0.2, 8: 0.0}
    prices = _prices(fragile, robust)
    path = frontier(prices)
    assert path[0] == {"l0": 8, "l1": 8} and path[-1] == {"l0": 3, "l1": 3}
    for before, after in zip(path, path[1:]):
        assert sum(before[n] != after[n] for n in before) == 1  # one layer, one width narrower
        assert average_bits(after, prices) < average_bits(before, prices)
    assert path[1] == {"l0": 8, "l1": 4} and path[2] == {"l0": 8, "l1": 3}  # the robust layer goes first, all the way


def test_ladder_meets_each_average_width_and_descends():
    prices = _prices({3: 0.3, 4: 0.1, 5: 0.05, 6: 0.02, 8: 0.0}, {3: 0.02, 4: 0.01, 5: 0.004, 6: 0.001, 8: 0.0},
                     {3: 0.1, 4: 0.03, 5: 0.01, 6: 0.005, 8: 0.0})
    rungs = ladder(prices, (3.0, 4.0, 5.0, 6.0))
    averages = [average_bits(r, prices) for r in rungs]
    assert averages == sorted(averages, reverse=True) and len(set(averages)) == len(averages)
    assert averages[0] >= 6.0 and min(averages) == 3.0
    assert all(any(abs(a - t) < 0.7 and a >= t - 1e-9 for a in averages) for t in (4.0, 5.0, 6.0))


def _mixed_model(tmp_path):
    """x -> MatMul(w0) -> Relu -> MatMul(w1): input feature 0 carries almost all of the energy of w0's input."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((12, 24)).astype(np.float32)
    w1 = rng.standard_normal((24, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="second")]
    model = build_model(nodes, [float_value("x", ["n", 12])], [float_value("y", ["n", 6])],
                        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    x = rng.standard_normal((32, 12)).astype(np.float32) * np.array([30.0] + [0.01] * 11, np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    return save_model(model, tmp_path / "m.onnx"), tmp_path / "cal.npz", w0


def test_prices_come_from_the_captured_inputs(tmp_path):
    path, cal, w0 = _mixed_model(tmp_path)
    prices = price_layers(path, cal, measure=False)  # the layer-local proxy, not scaled to the model's drift
    assert [layer.node for layer in prices.layers] == ["first", "second"] and prices.runs == 1
    first = prices.layers[0]
    assert first.data_aware and first.weights == w0.size
    h = np.zeros((12, 12))
    h[0, 0] = 1.0  # near what the calibration data shows: feature 0 dominates
    assert abs(first.errors[3] - layer_errors(w0.astype(np.float64), h)[3]) < 0.5 * first.errors[3]
    blind = price_layers(path, None)
    assert not blind.layers[0].data_aware and blind.layers[0].reason == "no calibration data"
    assert blind.layers[0].errors[3] == layer_errors(w0.astype(np.float64), None)[3]


def test_a_grouped_conv_is_priced_by_its_weight_error(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=4, pads=[1, 1, 1, 1])
    model = build_model([node], [float_value("x", [1, 4, 8, 8])], [float_value("y", [1, 4, 8, 8])],
                        [numpy_helper.from_array(w, "w")])
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    prices = price_layers(save_model(model, tmp_path / "dw.onnx"), tmp_path / "cal.npz")
    (layer,) = prices.layers
    assert not layer.data_aware and "group 1" in layer.reason and prices.runs == 0


def test_planned_recipe_gives_each_layer_its_width(tmp_path):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    allocation = {"fc0/MatMul": 6, "fc1/MatMul": 3, "fc2/MatMul": 3}
    recipe = planned_recipe(allocation, CompressConfig(), large=False)
    (spec,) = recipe.passes
    assert spec.name == "cluster" and spec.options["bits"] == 3 and len(spec.layers) == 1
    run = run_recipe(path, recipe, tmp_path / "out.onnx")
    assert run.layer_bits == allocation


def test_large_search_drops_formats_no_narrower_than_the_plan():
    every = search_formats("cal.npz", None, large=True)
    planned = search_formats("cal.npz", None, large=True, planned_bits=4.5)
    assert "int8" in every and "cluster5" in every
    assert planned == [f for f in every if f in ("gptq4", "cluster4", "cluster3", "cluster2")]
    assert search_formats("cal.npz", None, large=False, planned_bits=4.5) == search_formats("cal.npz", None, large=False)
    chosen = ("int8", "cluster4")
    assert search_formats("cal.npz", chosen, large=True, planned_bits=4.5) == ["int8", "cluster4"]


def test_codebook_formats_no_wider_than_a_failed_uniform_plan_are_skipped():
    every = search_formats("cal.npz", None, large=True)
    after = search_formats("cal.npz", None, large=True, failed_width=3)
    assert "cluster3" in every and "cluster2" in every
    assert after == [f for f in every if f not in ("cluster3", "cluster2")]  # gptq4 and wider codebooks stay
    small = search_formats("cal.npz", None, large=False, failed_width=4)
    assert "cluster4" in search_formats("cal.npz", None, large=False) and "cluster4" not in small
    assert search_formats("cal.npz", ("cluster4",), large=False, failed_width=4) == ["cluster4"]  # asked for


def test_search_validates_planned_codebooks_before_the_uniform_formats(tmp_path, monkeypatch):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((16, 32)).astype(np.float32))
    calls = []
    original = compress_plan.price_layers
    monkeypatch.setattr(compress_plan, "price_layers", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = CompressConfig(thresholds=Thresholds(min_cosine=0.99), calibration=str(tmp_path / "cal.npz"),
                            time_budget_s=None, max_candidates=6, refine=False)
    report = compress(path, tmp_path / "out.shrink", config)
    phases = [c.phase for c in report.candidates]
    assert calls == [1] and phases[0] == "lossless" and phases[1] == "planned"
    assert phases.index("uniform") > max(i for i, p in enumerate(phases) if p == "planned")
    planned = [c for c in report.candidates if c.phase == "planned"]
    assert all("bits per weight" in c.recipe for c in planned) and len(planned) <= 3
    # .onnx output: zeros and narrow codebooks are not what it stores, so nothing is planned
    plain = compress(path, tmp_path / "out.onnx", config)
    assert "planned" not in [c.phase for c in plain.candidates]


def test_no_plan_when_the_layers_and_tables_hold_little_of_the_model(tmp_path):
    rng = np.random.default_rng(4)
    table = rng.standard_normal((500, 16)).astype(np.float32)  # 8000 weights in an embedding table
    w = rng.standard_normal((16, 4)).astype(np.float32)  # 64 in the only layer
    big = rng.standard_normal((40000, 4)).astype(np.float32)  # 160000 in a constant that no pass codes
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["p"], name="proj"),
             helper.make_node("Add", ["p", "big"], ["y"])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")]
    ids = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])]
    embedded = save_model(build_model(nodes[:2], ids, [float_value("p", ["n", 4])], inits), tmp_path / "emb.onnx")
    # the table counts: a model whose tables are its bulk gets a plan (MiniLM: the word table is half of it)
    planned = price_layers(embedded, None, min_share=compress_plan.MIN_LAYER_SHARE)
    assert [layer.node for layer in planned.layers] == ["proj", "embed"] and not planned.notes
    model = build_model(nodes, ids, [float_value("y", [40000, 4])], inits + [numpy_helper.from_array(big, "big")])
    path = save_model(model, tmp_path / "bulk.onnx")
    skipped = price_layers(path, None, min_share=compress_plan.MIN_LAYER_SHARE)
    assert skipped.layers == [] and "5% of the float weights" in skipped.notes[0]
    assert [layer.node for layer in price_layers(path, None).layers] == ["proj", "embed"]
