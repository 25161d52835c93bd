"""The entropy form of a codebook (cluster --codebook entropy, compress's planned candidates): evenly spaced values at
no more weighted error than k-means, kept only where their indices have the lower entropy (what pack's Huffman
coding spends), so the same error packs into fewer bytes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SAMPLES, assert_bad_option, on_one_grid, save_model
from onnxshrink import api, compress_plan
from onnxshrink.algorithms import codebook
from onnxshrink.compress_search import PLANNED_CODEBOOK, CompressConfig, planned_recipe
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig, table_codebook

MLP = SAMPLES / "digits_mlp.onnx"


def _entropy(idx: np.ndarray) -> float:
    counts = np.bincount(idx.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _sse(values, books, weights=None):
    decoded = codebook.decode(codebook.assign(values, books), books)
    return float(np.sum((np.ones_like(values) if weights is None else weights) * (values - decoded) ** 2))


@pytest.mark.parametrize("n", [5000, 300000])  # sorted values, and a long row fitted on its histogram
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_an_evenly_spaced_codebook_codes_fewer_bits_at_no_more_error(bits, n):
    values = np.random.default_rng(bits).standard_normal((1, n)) * 0.05
    kmeans = codebook.fit(values, 2 ** bits)
    grid = codebook.fit(values, 2 ** bits, form="entropy")
    assert kmeans.shape == (1, 2 ** bits) and grid.shape[0] == 1 and 2 ** bits < grid.shape[1] <= codebook.MAX_LEVELS
    assert on_one_grid(grid[0])
    assert _sse(values, grid) <= _sse(values, kmeans) * 1.001  # the histogram of a long row is an approximation
    gain = _entropy(codebook.assign(values, kmeans)) - _entropy(codebook.assign(values, grid))
    assert gain >= codebook.GRID_MIN_GAIN, gain


def test_the_error_bound_is_the_weighted_one():
    rng = np.random.default_rng(7)
    values = rng.standard_normal((1, 4000))
    weights = rng.uniform(0.2, 5.0, values.shape)  # input energies, as cluster weighs a layer's weights
    kmeans = codebook.fit(values, 16, weights)
    grid = codebook.fit(values, 16, weights, form="entropy")
    assert grid.shape[1] != 16
    assert _sse(values, grid, weights) <= _sse(values, kmeans, weights)
    # where the weight sits on the tails, k-means puts its entries there: no grid matches it with fewer bits
    tails = np.where(np.abs(values) > 1.5, 50.0, 1.0)
    assert np.array_equal(codebook.fit(values, 16, tails, form="entropy"), codebook.fit(values, 16, tails))


def test_k_means_is_kept_where_a_grid_cannot_do_better():
    rng = np.random.default_rng(3)
    # three far values: k-means gives the whole bulk one entry, which codes in almost no bits; no grid does better
    tail = np.concatenate([rng.standard_normal(20000) * 0.01, [40.0, -35.0, 25.0]])[None, :]
    assert np.array_equal(codebook.fit(tail, 16, form="entropy"), codebook.fit(tail, 16))
    # two values: k-means codes them exactly, nothing to gain
    two = np.repeat([[-1.0, 2.0]], 50, axis=0).reshape(1, -1)
    assert np.array_equal(codebook.fit(two, 4, form="entropy"), codebook.fit(two, 4))
    # one codebook a row: k-means
    rows = rng.standard_normal((4, 3000))
    assert np.array_equal(codebook.fit(rows, 16, form="entropy"), codebook.fit(rows, 16))
    with pytest.raises(ValueError, match="codebook form 'lattice'"):
        codebook.fit(rows, 16, form="lattice")


@pytest.mark.parametrize("n", [5000, 300000])
def test_pruned_zeros_keep_entry_zero_and_no_small_weight_rounds_to_it(n):
    rng = np.random.default_rng(9)
    sparse = np.where(rng.random((1, n)) < 0.5, 0.0, rng.standard_normal((1, n)) * 0.02)
    kmeans = codebook.fit(sparse, 16, reserve_zero=True)
    grid = codebook.fit(sparse, 16, reserve_zero=True, form="entropy")
    assert grid[0, 0] == 0.0 and grid.shape[1] > 16
    assert on_one_grid(grid[0, 1:], half=0.5)  # odd half-steps
    idx = codebook.assign(sparse, grid, reserve_zero=True)
    assert np.array_equal(idx == 0, sparse == 0)
    nonzero = sparse != 0
    errors = [np.sum((sparse - codebook.decode(codebook.assign(sparse, b, reserve_zero=True), b))[nonzero] ** 2)
              for b in (kmeans, grid)]
    assert errors[1] <= errors[0] * 1.001
    assert _entropy(idx) <= _entropy(codebook.assign(sparse, kmeans, reserve_zero=True)) - codebook.GRID_MIN_GAIN


def test_a_row_scaled_table_in_the_entropy_form_decodes_within_k_means_error():
    rng = np.random.default_rng(5)
    # rows as wide as a real table's (each row's peak is exactly 1 once scaled: narrow rows are all peaks)
    table = (rng.standard_normal((200, 256)) * rng.uniform(0.1, 2.0, (200, 1))).astype(np.float32)
    idx_k, books_k, scale_k, decoded_k = table_codebook(table, 16)
    idx_e, books_e, scale_e, decoded_e = table_codebook(table, 16, "layer", "entropy")
    assert np.array_equal(scale_k, scale_e) and books_e.shape[1] > 16 and idx_e.max() < books_e.shape[1] <= 256
    scaled = (table / scale_e).astype(np.float64)
    assert np.sum((scaled - codebook.decode(idx_e.reshape(1, -1), books_e).reshape(table.shape)) ** 2) \
        <= np.sum((scaled - codebook.decode(idx_k.reshape(1, -1), books_k).reshape(table.shape)) ** 2)
    assert _entropy(idx_e) < _entropy(idx_k)


def test_the_cluster_pass_writes_the_grid_and_the_pack_is_smaller(tmp_path):
    sizes, accuracy = {}, {}
    evaluation = np.load(SAMPLES / "digits_mlp.eval.npz")
    import onnxruntime as ort

    for form in ("kmeans", "entropy"):
        out = tmp_path / f"{form}.onnx"
        report = api.cluster(MLP, out, ClusterConfig(bits=3, codebook=form), run_validation=False)
        model = onnx.load(str(out))
        books = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_codebook")}
        big = books["fc2.weight_codebook"]
        if form == "entropy":
            assert big.size > 8 and np.allclose(np.diff(big), np.diff(big)[0], rtol=1e-4)
            assert any("entropy form" in note for note in report.passes[0].notes)
            assert any("evenly spaced values" in layer.reason for layer in report.passes[0].layers)
        else:
            assert big.size == 8
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": evaluation["input"]})[0]
        accuracy[form] = float(np.mean(np.argmax(logits, -1) == evaluation["labels"]))
        sizes[form] = api.pack(out, tmp_path / f"{form}.shrink").size["output"]
    assert sizes["entropy"] < sizes["kmeans"], sizes
    assert accuracy["entropy"] >= accuracy["kmeans"] - 0.02, accuracy


def test_a_bad_form_is_refused_by_the_library_and_the_cli(tmp_path, runner, monkeypatch):
    with pytest.raises(UsageError, match="--codebook 'fixed': choose kmeans"):
        Cluster(ClusterConfig(codebook="fixed"))
    monkeypatch.chdir(tmp_path)
    assert_bad_option(runner, tmp_path, "cluster", "--codebook", "fixed",
                      message="error: --codebook 'fixed': choose kmeans (2^bits values) or entropy")


def test_compress_plans_and_prices_in_the_entropy_form(tmp_path):
    model = onnx.load(str(MLP))
    path = save_model(model, tmp_path / "m.onnx")
    recipe = planned_recipe({"fc1/MatMul": 4, "fc2/MatMul": 3}, CompressConfig(), False)
    assert PLANNED_CODEBOOK == "entropy" and recipe.passes[0].options["codebook"] == "entropy"
    kmeans = compress_plan.price_layers(path, None, bits=(3, 4), form="kmeans")
    entropy = compress_plan.price_layers(path, None, bits=(3, 4), form="entropy")
    assert [layer.node for layer in kmeans.layers] == [layer.node for layer in entropy.layers]
    for a, b in zip(kmeans.layers, entropy.layers):  # no more error at any width (the weight error, without data)
        assert all(b.errors[w] <= a.errors[w] * 1.01 for w in (3, 4)), (a.errors, b.errors)


# ---- the plan: a table's two codings at each width are two steps of the frontier ------------------------------

TABLE_ROWS, TABLE_WIDTH = 400, 128


def _wide_table_model(tmp_path):
    """ids -> Gather(table [400, 128], rows as wide as a real table's) -> MatMul(w [128, 32]): the table is the bulk."""
    from onnx import TensorProto, helper

    from conftest import build_model, float_value

    rng = np.random.default_rng(13)
    table = (rng.standard_normal((TABLE_ROWS, TABLE_WIDTH)) * rng.uniform(0.1, 2.0, (TABLE_ROWS, 1))).astype(np.float32)
    w = rng.standard_normal((TABLE_WIDTH, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    model = build_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "t"])],
                        [float_value("y", ["n", "t", 32])],
                        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    np.savez(tmp_path / "cal.npz", ids=rng.integers(0, TABLE_ROWS, (8, 12)).astype(np.int64))
    return save_model(model, tmp_path / "table.onnx"), tmp_path / "cal.npz"


def test_the_plan_prices_a_tables_grid_as_a_step_between_two_widths(tmp_path):
    path, cal = _wide_table_model(tmp_path)
    kmeans = compress_plan.price_layers(path, cal, bits=(3, 4, 5), min_share=compress_plan.MIN_LAYER_SHARE)
    prices = compress_plan.price_layers(path, cal, bits=(3, 4, 5), min_share=compress_plan.MIN_LAYER_SHARE,
                                        form="entropy")
    assert sorted(kmeans.tables[0].errors) == [3, 4, 5]
    table = prices.tables[0]
    grids = sorted(key for key in table.errors if key != int(key))
    assert grids and set(grids) == set(table.savings) and all(key + compress_plan.GRID_STEP in (3, 4, 5) for key in grids)
    for key in grids:
        width = int(key + compress_plan.GRID_STEP)
        assert compress_plan.table_choice(key) == (width, "entropy") and compress_plan.table_choice(width) == (width, "kmeans")
        assert 0 < table.savings[key] < 1
        # its bits lie between its width's and the next narrower width's; its measured drift is no lower than k-means'
        assert compress_plan.stored_bits(table, width) > compress_plan.stored_bits(table, key)
        if width - 1 in table.errors:
            assert compress_plan.stored_bits(table, key) > compress_plan.stored_bits(table, width - 1)
        assert table.errors[key] >= table.errors[width]
    # the frontier walks the table's keys in order, every step saving bits
    path_keys = [allocation["embed"] for allocation in compress_plan.frontier(prices)]
    assert path_keys == sorted(path_keys, reverse=True) and any(k != int(k) for k in path_keys)
    bits = [compress_plan.average_bits(a, prices) for a in compress_plan.frontier(prices)]
    assert all(a > b for a, b in zip(bits, bits[1:]))
    key = grids[-1]
    assert "evenly spaced" in compress_plan.summary({"proj": 4, "embed": key}, prices)


def test_a_tables_planned_form_reaches_the_graph_and_survives_resolve(tmp_path):
    from onnxshrink.compress_search import resolve, run_recipe

    path, cal = _wide_table_model(tmp_path)
    sizes = {}
    for key in (4, 4 - compress_plan.GRID_STEP):
        recipe = planned_recipe({"proj": 5, "embed": key}, CompressConfig(calibration=str(cal)), False, "fp16",
                                tables=("embed",))
        (spec,) = recipe.passes
        table_rule = next(r for r in spec.layers if r.match == "embed")
        assert table_rule.options == ({"bits": 4, "codebook": "kmeans"} if key == 4 else {"bits": 4})
        out = tmp_path / f"out{key}.onnx"
        run = run_recipe(path, recipe, out, calibration=str(cal))
        books = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer}
        sizes[key] = books["table_codebook_fp16"][0]
        again = resolve(recipe, run)
        assert any(r.options.get("codebook") == "kmeans" for r in again.passes[0].layers) == (key == 4)
    assert sizes[4] == 16 and sizes[4 - compress_plan.GRID_STEP] > 16


def test_a_bad_layer_form_is_refused():
    with pytest.raises(UsageError, match="layer 'embed': codebook 'fixed'"):
        Cluster(ClusterConfig(layer_codebook={"embed": "fixed"}))


def test_a_tables_grid_that_saves_little_for_much_drift_is_stepped_over():
    """MPNet's 4-bit grid: 0.15 bits saved for 3x the drift. From 4 bits the table goes straight to 3 (the lower
    hull of its points); a layer still steps one width at a time."""
    from onnxshrink.compress_plan import LayerPrice, Prices, frontier, marginal_price

    table = LayerPrice("embed", 10000, {3: 0.0119, 3.5: 0.0119, 4: 0.0042, 5: 0.0006}, False, rows=100,
                       tensor="table", savings={3.5: 0.15})
    layer = LayerPrice("proj", 10000, {3: 0.02, 4: 0.004, 5: 0.001}, True)
    prices = Prices(layers=[layer, table])
    keys = [allocation["embed"] for allocation in frontier(prices)]
    assert 3.5 not in keys and keys[-1] == 3 and 4 in keys
    widths = [allocation["proj"] for allocation in frontier(prices)]
    assert widths == sorted(widths, reverse=True) and set(widths) == {3, 4, 5}
    # the going rate from the table at 4 bits is its step to 3 (0.0077 for about 1 bit), not the grid's
    rate = marginal_price({"proj": 3, "embed": 4}, prices)
    assert rate < (0.0119 - 0.0042) / (0.5 * 10000)
    # where the grid is cheap (MiniLM's: 0.0005 of drift for 0.11 bits), it is taken on the way
    cheap = LayerPrice("embed", 10000, {3: 0.011, 3.5: 0.0027, 4: 0.0022, 5: 0.0004}, False, rows=100,
                       tensor="table", savings={3.5: 0.11})
    assert 3.5 in [allocation["embed"] for allocation in frontier(Prices(layers=[layer, cheap]))]
