"""Graph shapes found in real pretrained models (bench/real_models.py), rebuilt tiny in code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import save_model
from onnxshrink import api
from onnxshrink.data import input_specs, load_npz
from onnxshrink.validate import ValidateConfig, latency_feed


def make_state_model(batch_dim="batch") -> onnx.ModelProto:
    """Like silero VAD: input [batch, 8] and a recurrent state [2, batch, 4] whose batch is on axis 1.

    The output concatenates a MatMul of the input with the summed state along axis 1, so onnxruntime
    refuses a run where the two batch sizes differ. `batch_dim=None` leaves the batch dims unnamed,
    as silero_vad.onnx does.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["mm"], name="fc"),
        helper.make_node("ReduceSum", ["state", "axes"], ["summed"], name="sum", keepdims=0),
        helper.make_node("Concat", ["mm", "summed"], ["output"], name="cat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "state_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch_dim, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch_dim, 8])],
        [w, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch_dim", ["batch", None])
def test_latency_feed_cuts_state_batched_on_axis_1(tmp_path, batch_dim):
    model = make_state_model(batch_dim)
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(1)
    np.savez(data, input=rng.standard_normal((16, 8)).astype(np.float32),
             state=rng.standard_normal((2, 16, 4)).astype(np.float32))
    feed = latency_feed(load_npz(data, input_specs(model)), input_specs(model))
    assert feed["input"].shape == (1, 8)
    assert feed["state"].shape == (2, 1, 4)


@pytest.mark.parametrize("batch_dim", ["batch", None])
def test_validate_runs_latency_with_state_batched_on_axis_1(tmp_path, batch_dim):
    # silero_vad.onnx with --data: validation ran, then latency fed input [1, 512] with state [2, 16, 128]
    # and onnxruntime's error escaped as an internal error (exit 70).
    path = save_model(make_state_model(batch_dim), tmp_path / "state.onnx")
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(1)
    np.savez(data, input=rng.standard_normal((16, 8)).astype(np.float32),
             state=rng.standard_normal((2, 16, 4)).astype(np.float32))
    report = api.validate(path, path, ValidateConfig(data=str(data), latency_budget_s=0.05))
    assert report.passed
    assert report.latency_ms["batch"] == 1
    assert report.outputs["output"].max_abs == 0.0


@pytest.mark.parametrize("batch_dim", ["batch", None])
def test_runs_cut_state_batched_on_axis_1(tmp_path, batch_dim):
    # silero VAD with more than one run of samples: the state must be cut along its batch axis too,
    # or run 1 meets input [32, 8] with state [2, 70, 4].
    model = make_state_model(batch_dim)
    path = save_model(model, tmp_path / "state.onnx")
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(2)
    x = rng.standard_normal((70, 8)).astype(np.float32)
    state = rng.standard_normal((2, 70, 4)).astype(np.float32)
    np.savez(data, input=x, state=state)
    dataset = load_npz(data, input_specs(model))
    assert [b["state"].shape for b in dataset.batches] == [(2, 32, 4), (2, 32, 4), (2, 6, 4)]
    assert np.array_equal(np.concatenate([b["state"] for b in dataset.batches], axis=1), state)
    report = api.validate(path, path, ValidateConfig(data=str(data), latency=False))
    assert report.passed and report.samples == 70
    assert report.outputs["output"].max_abs == 0


def test_synthetic_inputs_that_do_not_fit_say_how_to_fix_it(tmp_path, runner):
    # silero VAD without --data: its unnamed sequence dim defaulted to 1 and a reflect Pad refused it. Signal
    # lengths are probed now (tests/test_input_synthesis.py); this model takes rows of 7, a length no probe tries.
    from conftest import invoke

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 7])
    rows = numpy_helper.from_array(np.array([-1, 7], dtype=np.int64), "rows")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "rows"], ["y"])], "rows", [x], [y], [rows])
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "rows.onnx")
    result = invoke(runner, "validate", path, path)
    assert result.exit_code == 3
    assert "give --data, --calibration, or sizes with --shape NAME=D1,D2,..." in result.stderr
    assert invoke(runner, "validate", path, path, "--shape", "x=4,63").exit_code == 0
