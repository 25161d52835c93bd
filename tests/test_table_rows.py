"""A vocabulary table's rows by whether the calibration data reads them (cluster --table-rows frequency, compress's
planned tables): the unread rows' scales make them use the codebook's middle, so they pack smaller."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_bad_option, build_model, float_value, save_model
from onnxshrink import api, compress_plan
from onnxshrink.compress_search import PLANNED_TABLE_ROWS, CompressConfig, planned_recipe, run_recipe
from onnxshrink.errors import UsageError
from onnxshrink.passes import table_rows
from onnxshrink.passes.cluster import Cluster, ClusterConfig, table_codebook

ROWS, WIDTH, READ = 2048, 48, 120


def _vocabulary_model(tmp_path):
    """ids -> Gather(table [2048, 48]) -> MatMul(w [48, 16]); the calibration ids read rows 0..119 only."""
    rng = np.random.default_rng(5)
    table = (rng.standard_normal((ROWS, WIDTH)) * rng.uniform(0.2, 2.0, (ROWS, 1))).astype(np.float32)
    w = rng.standard_normal((WIDTH, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    model = build_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "t"])],
                        [float_value("y", ["n", "t", 16])],
                        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    np.savez(tmp_path / "cal.npz", ids=rng.permutation(np.arange(160) % READ).reshape(16, 10).astype(np.int64))
    return save_model(model, tmp_path / "vocab.onnx"), tmp_path / "cal.npz", table


def _entropy(idx) -> float:
    counts = np.bincount(np.asarray(idx).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_rows_are_counted_on_real_tokens_with_negative_ids_wrapped():
    batch = {"ids": np.array([[5, 6, -1, 0], [5, 9, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    counts = table_rows.row_counts(["ids"], SimpleNamespace(batches=[batch]), 10)
    assert counts.tolist() == [0, 0, 0, 0, 0, 2, 1, 0, 0, 2]  # the padding's zeros are not row 0's reads
    assert table_rows.row_counts(["other"], SimpleNamespace(batches=[batch]), 10) is None  # ids the data lacks
    assert table_rows.row_counts(["ids"], None, 10) is None
    assert table_rows.row_steps(counts)[:, 0].tolist() == [table_rows.COLD_STEP] * 5 + [1, 1] + [table_rows.COLD_STEP] * 2 + [1]


def test_only_a_vocabulary_read_by_model_inputs_counts():
    gather = helper.make_node("Gather", ["table", "ids"], ["e"])
    inner = helper.make_node("Gather", ["table", "positions"], ["p"])
    tied = helper.make_node("MatMul", ["h", "table"], ["logits"])
    assert table_rows.vocabulary_ids([gather], {"ids"}, ROWS) == ["ids"]
    assert table_rows.vocabulary_ids([gather], {"ids"}, table_rows.VOCAB_ROWS - 1) is None  # positions, segments
    assert table_rows.vocabulary_ids([gather, inner], {"ids"}, ROWS) is None  # indices the model computes
    assert table_rows.vocabulary_ids([gather, tied], {"ids"}, ROWS) is None  # an output projection shares it
    columns = helper.make_node("Gather", ["table", "ids"], ["c"], axis=1)
    assert table_rows.vocabulary_ids([gather, columns], {"ids"}, ROWS) is None  # not a lookup of rows


def test_coarser_rows_use_fewer_codes_and_a_step_of_one_changes_nothing():
    rng = np.random.default_rng(2)
    table = (rng.standard_normal((ROWS, WIDTH)) * rng.uniform(0.2, 2.0, (ROWS, 1))).astype(np.float32)
    steps = np.where(np.arange(ROWS) < READ, 1.0, table_rows.COLD_STEP).astype(np.float32)[:, None]
    plain = table_codebook(table, 16, "layer", "entropy")
    same = table_codebook(table, 16, "layer", "entropy", np.ones_like(steps))
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))
    idx, books, scales, decoded = table_codebook(table, 16, "layer", "entropy", steps)
    peaks = np.max(np.abs(table), axis=1)
    assert np.allclose(scales[READ:, 0], (peaks[READ:] * table_rows.COLD_STEP).astype(np.float16), rtol=1e-3)
    assert _entropy(idx[READ:]) < _entropy(plain[0][READ:]) - 0.3
    error = np.mean((decoded - table) ** 2, axis=1) / np.mean(table ** 2, axis=1)
    before = np.mean((plain[3] - table) ** 2, axis=1) / np.mean(table ** 2, axis=1)
    assert np.mean(error[READ:]) > np.mean(before[READ:])  # the unread rows pay
    assert np.mean(error[:READ]) <= np.mean(before[:READ]) * 1.05  # the read ones do not


def test_the_pass_codes_the_unread_rows_coarser_and_the_pack_is_smaller(tmp_path):
    path, cal, table = _vocabulary_model(tmp_path)
    sizes, scales, reasons = {}, {}, {}
    for rows in ("uniform", "frequency"):
        out = tmp_path / f"{rows}.onnx"
        report = api.cluster(path, out, ClusterConfig(bits=4, codebook="entropy", table_rows=rows), calibration=cal,
                             run_validation=False)
        reasons[rows] = next(layer.reason for layer in report.passes[0].layers if layer.node == "embed")
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        scales[rows] = inits["table_row_scale"].astype(np.float32)[:, 0]
        sizes[rows] = api.pack(out, tmp_path / f"{rows}.shrink").size["output"]
    peaks = np.max(np.abs(table), axis=1)
    assert np.allclose(scales["uniform"], peaks, rtol=1e-3)
    assert np.allclose(scales["frequency"][:READ], peaks[:READ], rtol=1e-3)
    assert np.allclose(scales["frequency"][READ:], peaks[READ:] * table_rows.COLD_STEP, rtol=1e-3)
    assert sizes["frequency"] < 0.95 * sizes["uniform"], sizes
    assert f"the {ROWS - READ} of {ROWS} rows the calibration data never reads" in reasons["frequency"]
    assert "never reads" not in reasons["uniform"]


def test_frequency_needs_calibration_and_bad_values_are_refused(tmp_path, runner, monkeypatch):
    with pytest.raises(UsageError, match="--table-rows frequency needs calibration data"):
        Cluster(ClusterConfig(table_rows="frequency"))
    with pytest.raises(UsageError, match="--table-rows 'zipf': choose uniform"):
        Cluster(ClusterConfig(table_rows="zipf"))
    with pytest.raises(UsageError, match="--table-rows frequency needs the tables' row-scaled layout"):
        Cluster(ClusterConfig(table_rows="frequency", per="channel"), calibration=SimpleNamespace(batches=[]))
    Cluster(ClusterConfig(table_rows="frequency", per="channel", table_per="layer"),  # compress's planned layout
            calibration=SimpleNamespace(batches=[]))
    monkeypatch.chdir(tmp_path)
    assert_bad_option(runner, tmp_path, "cluster", "--table-rows", "zipf",
                      message="error: --table-rows 'zipf': choose uniform (every row alike) or frequency")


def test_compress_plans_and_prices_the_tables_rows_by_frequency(tmp_path):
    path, cal, table = _vocabulary_model(tmp_path)
    recipe = planned_recipe({"proj": 5, "embed": 4}, CompressConfig(calibration=str(cal)), False, "fp16",
                            tables=("embed",))
    assert PLANNED_TABLE_ROWS == "frequency" and recipe.passes[0].options["table_rows"] == "frequency"
    no_data = planned_recipe({"proj": 5, "embed": 4}, CompressConfig(), False, "fp16", tables=("embed",))
    assert "table_rows" not in no_data.passes[0].options  # nothing to count: the rows stay alike
    out = tmp_path / "planned.onnx"
    run_recipe(path, recipe, out, calibration=str(cal))
    scales = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}["table_row_scale"]
    assert np.allclose(scales.astype(np.float32)[READ:, 0], np.max(np.abs(table), axis=1)[READ:] * table_rows.COLD_STEP,
                       rtol=1e-3)
    # the plan prices the table as the pass codes it: the unread rows' error shows in its drift
    kwargs = dict(bits=(3, 4, 5), min_share=compress_plan.MIN_LAYER_SHARE, form="entropy", measure=False)
    uniform = compress_plan.price_layers(path, cal, **kwargs).tables[0]
    frequency = compress_plan.price_layers(path, cal, table_rows="frequency", **kwargs).tables[0]
    assert frequency.errors[4] > uniform.errors[4]
