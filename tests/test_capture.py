"""Activation capture in row chunks (runtime.Capture): bounded memory, the same values and statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import build_model, float_value
from onnxshrink import runtime
from onnxshrink.algorithms.reconstruct import Gram
from onnxshrink.calibrate import calibrate
from onnxshrink.data import Dataset
from onnxshrink.passes import prune_common

ROW_BYTES = (16 + 16 + 4) * 4  # h, r and y of one row, float32


def _model(batch="batch") -> onnx.ModelProto:
    """x [batch, 8] -> MatMul -> h [batch, 16] -> Relu -> r -> MatMul -> y [batch, 4]; s = b * 2 has no batch axis."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("Mul", ["b", "two"], ["s"]),
             helper.make_node("Add", ["y", "y"], ["out"])]
    return build_model(nodes, [float_value("x", [batch, 8])], [float_value("out", [batch, 4])], inits)


def _batches(rows=(10, 10, 7)) -> list[dict]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in rows]


def test_chunked_runs_respect_the_limit_and_give_the_same_values():
    model, batches = _model(), _batches()
    names = ["h", "r", "y"]
    capture = runtime.Capture(model, names)
    runs = list(capture.runs(batches, max_bytes=3 * ROW_BYTES))
    # a probe of 2 rows, then 3 rows per run: 10 = 2+3+3+2, 10 = 3+3+3+1, 7 = 3+3+1
    assert capture.rows_per_run == [2, 3, 3, 2, 3, 3, 3, 1, 3, 3, 1]
    assert all(sum(np.asarray(v).nbytes for v in values.values()) <= 3 * ROW_BYTES for _, values in runs)
    whole = list(runtime.capture_runs(model, names, batches, max_bytes=0))
    assert len(whole) == len(batches)
    for name in names:
        chunked = np.concatenate([values[name] for _, values in runs])
        np.testing.assert_array_equal(chunked, np.concatenate([values[name] for _, values in whole]))
    # each run's feed is the rows it ran on
    np.testing.assert_array_equal(np.concatenate([feed["x"] for feed, _ in runs]), np.concatenate([b["x"] for b in batches]))


def test_joined_batches_equal_unchunked_ones():
    model, batches = _model(), _batches()
    names = ["h", "y", "s"]
    joined = list(runtime.capture_activations(model, names, batches, max_bytes=2 * ROW_BYTES))
    whole = list(runtime.capture_activations(model, names, batches, max_bytes=0))
    assert len(joined) == len(whole) == len(batches)
    for got, expected in zip(joined, whole):
        assert list(got) == names
        for name in names:
            assert got[name].shape == expected[name].shape
            np.testing.assert_array_equal(got[name], expected[name])  # s, without a batch axis, is kept once


def test_a_batch_that_fits_runs_whole():
    model, batches = _model(), _batches()
    capture = runtime.Capture(model, ["h"])
    assert len(list(capture.runs(batches))) == len(batches)  # the default limit: one run per batch after the probe
    assert capture.rows_per_run == [2, 10, 10, 7]  # the probe's values are dropped, the batch reruns whole


@pytest.mark.parametrize("why", ["fixed batch", "batch axis elsewhere", "unequal rows"])
def test_no_split_where_rows_may_not_be_independent(why):
    model = _model(batch=10) if why == "fixed batch" else _model()
    batches = _batches((10, 10))
    axes = {"x": 1} if why == "batch axis elsewhere" else None
    if why == "unequal rows":  # a second input whose axis 0 has another length
        model.graph.input.append(float_value("z", ["n", 3]))
        batches = [dict(b, z=np.zeros((4, 3), np.float32)) for b in batches]
    capture = runtime.Capture(model, ["h"])
    assert len(list(capture.runs(batches, max_bytes=ROW_BYTES, batch_axes=axes))) == 2
    assert capture.rows_per_run == [None, None]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_ranges_equal_unchunked(monkeypatch, method):
    model, batches = _model(), _batches((32, 32, 9))
    names = ["h", "r", "y"]
    expected = calibrate(model, names, batches, method)
    runs = []
    real = runtime.Capture._run

    def counted(self, feed, rows):
        runs.append(rows)
        return real(self, feed, rows)

    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 5 * ROW_BYTES)
    monkeypatch.setattr(runtime.Capture, "_run", counted)
    assert calibrate(model, names, batches, method) == expected
    assert max(runs) == 5 and sum(runs) == 73


def test_gram_from_chunked_capture_equals_unchunked(monkeypatch):
    model = _model()
    data = Dataset(_batches((32, 17)), None, 49, False, [], {"x": 0})

    def gram():
        g = Gram(16)
        for batch, values in prune_common.capture(data, model, ["r"]):
            g.add(values["r"])
        return g.xtx

    expected = gram()
    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 4 * ROW_BYTES)
    np.testing.assert_allclose(gram(), expected, rtol=1e-12)
    grams = prune_common.teacher_grams(data, model, model, [_layer(model)], {"mm2": False})
    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 0)
    unchunked = prune_common.teacher_grams(data, model, model, [_layer(model)], {"mm2": False})
    np.testing.assert_allclose(grams["mm2"].xtx, unchunked["mm2"].xtx, rtol=1e-12)
    np.testing.assert_allclose(grams["mm2"].xty, unchunked["mm2"].xty, rtol=1e-12)


def _layer(model):
    return prune_common.Layer("mm2", "MatMul", "w2", "r", "y", True, (16, 4), 1.0, False, None, 1.0, None)


def test_capture_session_takes_only_the_needed_nodes_and_no_copy_of_the_weights():
    model = _model()
    big = np.ones((128, 128), np.float32)  # 64 KiB: handed over as an array
    model.graph.initializer.append(numpy_helper.from_array(big, "unused"))
    source = runtime._capture_model(model, ["h"])
    graph = onnx.ModelProto.FromString(source.graph)
    assert [n.op_type for n in graph.graph.node] == ["MatMul"]
    assert [t.name for t in graph.graph.initializer] == ["w1"] and not source.weights  # small weights stay inline
    source = runtime._capture_model(model, ["h", "unused"])
    assert set(source.weights) == {"unused"} and len(source.graph) < big.nbytes
    assert len(model.graph.output) == 1  # the model itself is left as it was


@pytest.mark.parametrize("names", [["x"], ["x", "h"]])
def test_a_graph_input_is_captured_from_its_feed(names):
    """A capture of the first layer's input alone has no node to run: onnxruntime refuses such a graph (GPTQ's
    whole-model capture of an encoder's first MatMul failed so), so a graph input's values are its feed."""
    model, batches = _model(), _batches()
    runs = list(runtime.capture_activations(model, names, batches, max_bytes=2 * ROW_BYTES))
    assert len(runs) == len(batches)
    for batch, values in zip(batches, runs):
        assert list(values) == names
        np.testing.assert_array_equal(values["x"], batch["x"])
        if "h" in values:
            np.testing.assert_allclose(values["h"], batch["x"] @ numpy_helper.to_array(model.graph.initializer[0]),
                                       rtol=1e-5, atol=1e-5)
