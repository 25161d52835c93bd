"""Entropy-form grids past 256 entries (a heavy-tailed weight: MiniLM's FFN output layers have weights 40-80 standard
deviations out), stored as uint8 indices into the entries used or as uint16 ordered by use."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, on_one_grid, save_model
from onnxshrink import api
from onnxshrink.algorithms import codebook
from onnxshrink.passes.cluster import Cluster, ClusterConfig, wide_grid_order

N = 128 * 128


def _few_outliers(rng, n: int = N, far: int = 12) -> np.ndarray:
    """A narrow bulk and a few weights 40-80 of its standard deviations out."""
    values = rng.standard_normal(n) * 0.02
    where = rng.choice(n, far, replace=False)
    values[where] = rng.choice([-1.0, 1.0], far) * rng.uniform(0.8, 1.6, far)
    return values


def _broad_tail(rng) -> np.ndarray:
    """A tenth of the weights 25x wider than the rest: a grid fine enough for the bulk uses hundreds of entries."""
    return np.where(rng.random(N) < 0.1, rng.standard_normal(N) * 0.5, rng.standard_normal(N) * 0.02)


def _entropy(idx) -> float:
    return codebook.entropy(np.bincount(np.asarray(idx).ravel()))


def test_a_heavy_tail_gets_a_grid_spanning_hundreds_of_steps_that_keeps_only_the_cells_used(monkeypatch):
    row = _few_outliers(np.random.default_rng(1), 200000, 50)[None, :]  # a long row: fitted on its histogram
    kmeans = codebook.fit(row, 64)
    grid = codebook.fit(row, 64, form="entropy")
    assert on_one_grid(grid[0])
    span = int(round((grid[0, -1] - grid[0, 0]) / np.diff(grid[0]).min())) + 1
    assert span > 256 and grid.shape[1] < span / 2  # the far weights' cells, not the empty ones between
    errors = [np.sum((row - codebook.decode(codebook.assign(row, books), books)) ** 2) for books in (kmeans, grid)]
    assert errors[1] <= errors[0]
    assert _entropy(codebook.assign(row, grid)) < _entropy(codebook.assign(row, kmeans)) - 1.0
    # the limit counts the entries kept, not the span: a limit under the span takes the same grid
    monkeypatch.setattr(codebook, "MAX_GRID_LEVELS", 256)
    assert np.array_equal(codebook.fit(row, 64, form="entropy"), grid)
    monkeypatch.setattr(codebook, "MAX_GRID_LEVELS", 32)  # too few for the bulk at k-means' error: k-means
    assert np.array_equal(codebook.fit(row, 64, form="entropy"), kmeans)


def test_a_far_outlier_costs_one_entry_not_an_array_over_the_span():
    """One weight 10^12 of the bulk's steps out: the grid holds the bulk's cells and that one, and counting them
    allocates nothing the size of the span (it raised MemoryError; compress on ddddocr's detector asked for an
    array of 6.7e14 entries in its pricing)."""
    rng = np.random.default_rng(5)
    row = np.concatenate([rng.standard_normal(5000) * 1e-3, [1e9]])[None, :]
    grid = codebook.fit(row, 16, form="entropy")
    assert grid.shape[1] <= codebook.MAX_GRID_LEVELS
    decoded = codebook.decode(codebook.assign(row, grid), grid)
    assert abs(decoded[0, -1] - 1e9) < 1.0 and np.max(np.abs(decoded[0, :-1] - row[0, :-1])) < 1e-3


def test_a_wide_codebook_keeps_only_its_used_entries_and_orders_them_by_use_past_256():
    rng = np.random.default_rng(2)
    books = np.sort(rng.standard_normal((1, 600)), axis=1)
    few = rng.choice(600, 100, replace=False)
    idx = few[rng.integers(0, 100, (40, 50))]
    compact, kept = wide_grid_order(idx, books)
    assert kept.shape == (1, 100) and np.all(np.diff(kept[0]) > 0) and compact.max() == 99
    assert np.array_equal(kept[0][compact], books[0][idx])  # the same weights
    many = rng.choice(600, 300, replace=False)
    idx = many[np.minimum(rng.geometric(0.004, (80, 90)) - 1, 299)]  # some entries far more used than others
    ordered, kept = wide_grid_order(idx, books)
    counts = np.bincount(ordered.ravel())
    assert kept.shape[1] == len(np.unique(idx)) > 256 and np.all(counts > 0) and np.all(np.diff(counts) <= 0)
    assert np.array_equal(kept[0][ordered], books[0][idx])
    narrow = np.sort(rng.standard_normal((1, 16)), axis=1)
    small = rng.integers(0, 4, (5, 5))
    assert wide_grid_order(small, narrow)[1] is narrow  # 256 entries or fewer: as they are


def _matmul_model(tmp_path, weight: np.ndarray, name: str):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = build_model(nodes, [float_value("x", ["n", 128])], [float_value("y", ["n", 128])],
                        [numpy_helper.from_array(weight.reshape(128, 128).astype(np.float32), "w")])
    return save_model(model, tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("kind", ["few", "broad"])
def test_the_cluster_pass_stores_a_wide_grid_that_runs_and_packs(tmp_path, kind):
    rng = np.random.default_rng(1)
    weight = _few_outliers(rng) if kind == "few" else _broad_tail(rng)
    path = _matmul_model(tmp_path, weight, kind)
    out = tmp_path / f"{kind}.clustered.onnx"
    report = api.cluster(path, out, ClusterConfig(bits=8, codebook="entropy"), run_validation=False)
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    idx, books = numpy_helper.to_array(inits["w_idx"]), numpy_helper.to_array(inits["w_codebook"])
    used = np.bincount(idx.astype(np.int64).ravel(), minlength=books.size)
    assert np.all(used > 0)  # no unused entry is stored
    if kind == "few":  # a dozen far weights: the entries used fit one byte, in value order
        assert inits["w_idx"].data_type == TensorProto.UINT8 and books.size <= 256 and np.all(np.diff(books) > 0)
        assert "uint8 indices" in report.passes[0].layers[0].action
    else:
        assert inits["w_idx"].data_type == TensorProto.UINT16 and books.size > 256 and np.all(np.diff(used) <= 0)
        assert "uint16 indices" in report.passes[0].layers[0].action
    x = rng.standard_normal((4, 128)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    expected = x @ books[idx.astype(np.int64)]
    assert np.allclose(session.run(None, {"x": x})[0], expected, atol=1e-5)
    assert np.abs(books[idx.astype(np.int64)] - weight.reshape(128, 128)).max() < 0.05  # the outliers kept
    api.pack(out, tmp_path / f"{kind}.shrink")
    api.unpack(tmp_path / f"{kind}.shrink", tmp_path / f"{kind}.back.onnx")
    back = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{kind}.back.onnx")).graph.initializer}
    assert np.array_equal(back["w_idx"], idx) and back["w_idx"].dtype == idx.dtype
    again, notes = Cluster(ClusterConfig(bits=4))(model)  # its decoding is recognised (uint16 indices too)
    assert not notes.changed and "model is already clustered (weights decoded from codebooks): nothing to cluster" \
        in notes.notes
