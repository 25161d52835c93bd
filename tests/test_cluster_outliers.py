"""cluster --outliers: the largest weights of each layer stored exactly beside its codebook (dense-and-sparse), in
the numerics (GPTQ rounding, refit), the graph (a ScatterND onnxruntime folds at load), pack and a second run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from conftest import invoke, make_mlp, save_model
from onnxshrink import session as packed_session
from onnxshrink.algorithms import codebook
from onnxshrink.algorithms.reconstruct import Gram
from onnxshrink.data import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig, check_config
from onnxshrink.runtime import make_session, optimized_op_counts

runner = CliRunner()


def heavy_tailed_layer(seed=0, k=64, n=24):
    """A layer whose weights have a few large ones (as a transformer's FFN outputs do), inputs correlated."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * 0.1
    w[rng.random((k, n)) < 0.01] *= 40.0
    x = rng.standard_normal((2000, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    return w, x


def output_error(w, q, x):
    return float(np.linalg.norm(x @ (q - w)) / np.linalg.norm(x @ w))


def test_gptq_keeps_the_chosen_weights_exact_and_lowers_the_output_error():
    w, x = heavy_tailed_layer()
    h = x.T @ x
    keep = np.abs(w) >= np.quantile(np.abs(w), 0.99)
    books = codebook.fit(w.reshape(1, -1), 8)
    plain = books[0][codebook.gptq_assign(w, books, h)]
    free_books = codebook.fit(w.reshape(1, -1), 8, np.where(keep, 0.0, 1.0).reshape(1, -1))
    idx, exact = codebook.gptq_assign(w, free_books, h, keep=keep)
    assert np.all(exact[~keep] == 0) and np.count_nonzero(exact[keep]) == keep.sum()
    q = np.where(keep, exact, free_books[0][idx])
    assert output_error(w, q, x) < 0.7 * output_error(w, plain, x)
    same = codebook.gptq_assign(w, books, h, keep=np.zeros_like(keep))  # nothing kept: the plain rounding
    np.testing.assert_array_equal(same[0], codebook.gptq_assign(w, books, h))


def test_refit_fits_the_codebook_around_the_exact_values():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 20))
    idx = rng.integers(0, 8, (20, 6))
    true = rng.standard_normal((1, 8))
    coded = rng.random((20, 6)) > 0.1
    exact = np.where(coded, 0.0, rng.standard_normal((20, 6)) * 5)
    gram = Gram(20, 6, bias=False)
    gram.add(x, x @ (np.where(coded, true[0][idx], 0.0) + exact))
    start = true + rng.standard_normal(true.shape) * 0.3
    result = codebook.refit(idx, start, gram, exact=exact, coded=coded)
    used = np.unique(idx[coded])
    np.testing.assert_allclose(result.codebooks[0, used], true[0, used], atol=1e-3)
    assert result.error_after < 1e-3 < result.error_before


def calibration_for(model, samples=64, seed=1):
    x = np.random.default_rng(seed).standard_normal((samples, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
    return Dataset([{"input": x[i:i + 16].astype(np.float32)} for i in range(0, samples, 16)], None, samples, True, [])


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_the_graph_scatters_fp16_outliers_that_onnxruntime_folds(rounding):
    model = make_mlp((300, 40, 10), seed=6)
    calibration = calibration_for(model)
    result, report = Cluster(ClusterConfig(bits=3, outliers=0.01, rounding=rounding), calibration)(model)
    onnx.checker.check_model(result, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    positions = inits["fc0.weight_outlier_positions"]
    values = inits["fc0.weight_outliers"]
    assert positions.dtype == np.uint32 and values.dtype == np.float16 and len(positions) == len(values) == 120
    assert sum(n.op_type == "ScatterND" for n in result.graph.node) == 2  # fc0 (300x40) and fc1 (40x10: 4 outliers)
    original = numpy_helper.to_array(model.graph.initializer[0])
    flat = original.reshape(-1)
    chosen = positions.reshape(-1)
    assert np.all(np.abs(flat[chosen]) >= np.quantile(np.abs(flat), 0.99))  # the largest weights
    assert "120 fp16 outliers" in report.layers[0].action
    assert "ScatterND" not in optimized_op_counts(result)  # folded into the weight at load
    x = calibration.batches[0]
    expected = make_session(model).run(None, x)[0]
    produced = make_session(result).run(None, x)[0]
    plain, _ = Cluster(ClusterConfig(bits=3, rounding=rounding), calibration)(model)
    without = make_session(plain).run(None, x)[0]
    assert np.linalg.norm(produced - expected) < np.linalg.norm(without - expected)


def test_a_pruned_layer_gets_no_outliers_and_tiny_layers_none():
    model = make_mlp((64, 32, 10), seed=2)
    w = model.graph.initializer[0]
    value = numpy_helper.to_array(w).copy()
    value[:, ::2] = 0.0  # pruned
    w.CopyFrom(numpy_helper.from_array(value, w.name))
    result, report = Cluster(ClusterConfig(bits=4, outliers=0.001))(model)
    actions = {d.node: d.action for d in report.layers}
    assert "outliers" not in actions["fc0/MatMul"]  # zeros kept at index 0 instead
    assert "outliers" not in actions["fc1/MatMul"]  # 320 weights x 0.1%: not one
    assert not any(n.op_type == "ScatterND" for n in result.graph.node)


def test_cli_outliers_pack_round_trip_and_a_second_run(tmp_path):
    source = save_model(make_mlp((300, 40, 10), seed=6), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    result = invoke(runner, "cluster", source, "-o", out, "--outliers", "0.01")
    assert result.exit_code == 0, result.output
    packed = tmp_path / "o.shrink"
    assert invoke(runner, "pack", out, "-o", packed).exit_code == 0
    x = {"input": np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)}
    np.testing.assert_array_equal(make_session(onnx.load(str(out))).run(None, x)[0],
                                  packed_session(str(packed)).run(None, x)[0])
    again = invoke(runner, "cluster", out, "-o", tmp_path / "o2.onnx")
    assert again.exit_code == 0 and "already clustered" in again.output


@pytest.mark.parametrize("value", [-0.01, 0.06, True])
def test_out_of_range_outliers_are_refused(value):
    with pytest.raises(UsageError, match="--outliers"):
        check_config(ClusterConfig(outliers=value), None)
