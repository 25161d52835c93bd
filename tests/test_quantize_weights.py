"""--mode weights --qdq: int8 weights behind DequantizeLinear, activations float, for runtimes other than onnxruntime CPU.

The default folded form of --mode weights is tested in test_quantize_folded.py."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from conftest import SAMPLES, invoke, make_mlp, save_model
from onnxshrink.passes.quantize_weights import SLOW_ON_ORT, QuantizeWeightsOnly, WeightsOnlyConfig

QDQ = WeightsOnlyConfig(qdq=True)
from onnxshrink.runtime import make_session


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


def dequantized(model, dq_node):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale, zero = (inits[n] for n in dq_node.input)
    axis = next((a.i for a in dq_node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)


def test_matmul_weights_become_int8_behind_dequantize():
    model = make_mlp((64, 96, 80, 10), seed=1)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized, report = QuantizeWeightsOnly(QDQ)(model)
    counts = ops(quantized)
    assert counts["DequantizeLinear"] == 3 and counts["MatMul"] == 3
    assert "MatMulInteger" not in counts and "QuantizeLinear" not in counts
    producers = {o: n for n in quantized.graph.node for o in n.output}
    for node in (n for n in quantized.graph.node if n.op_type == "MatMul"):
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q = next(t for t in quantized.graph.initializer if t.name == dq.input[0])
        assert q.data_type == TensorProto.INT8
        original = originals[node.input[1].removesuffix("_int8_dq")]
        restored = dequantized(quantized, dq)
        scale = np.abs(original).max(axis=0) / 127
        assert np.all(np.abs(restored - original) <= scale / 2 + 1e-7)  # round to nearest, per output column
    assert SLOW_ON_ORT in report.notes
    onnx.checker.check_model(quantized, full_check=True)
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # the input model is untouched


def test_conv_and_gemm_channel_axes(tmp_path):
    from onnx import helper

    rng = np.random.default_rng(2)
    w_conv = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w_gemm = rng.standard_normal((10, 16 * 6 * 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_conv"], ["c"], name="conv"),
         helper.make_node("Flatten", ["c"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "w_gemm"], ["y"], name="fc", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(w_conv, "w_conv"), numpy_helper.from_array(w_gemm, "w_gemm")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantized, report = QuantizeWeightsOnly(QDQ)(model)
    axes = {n.input[0]: next(a.i for a in n.attribute if a.name == "axis") for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"w_conv_int8": 0, "w_gemm_int8": 0}  # Conv M and Gemm transB=1 N are both axis 0
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = make_session(model, optimize=False).run(None, {"x": x})[0]
    produced = make_session(quantized, optimize=False).run(None, {"x": x})[0]
    cos = np.sum(expected * produced, 1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(produced, axis=1))
    assert np.all(cos > 0.999)


def test_tied_weight_has_one_dequantize():
    from onnx import helper

    w = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="a"), helper.make_node("MatMul", ["a", "w"], ["y"], name="b")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized, report = QuantizeWeightsOnly(QDQ)(model)
    assert ops(quantized)["DequantizeLinear"] == 1
    matmuls = [n for n in quantized.graph.node if n.op_type == "MatMul"]
    assert matmuls[0].input[1] == matmuls[1].input[1]
    assert [layer.action for layer in report.layers] == ["int8 weight-only per-channel", "int8 weight-only (shared)"]


def test_twice_changes_nothing_more():
    once, _ = QuantizeWeightsOnly(QDQ)(make_mlp(seed=4))
    twice, report = QuantizeWeightsOnly(QDQ)(once)
    assert not report.changed
    assert "model is already quantized: nothing to do" in report.notes
    assert twice.graph == once.graph


def test_cli_weights_mode_on_sample_model(tmp_path, runner):
    source = SAMPLES / "digits_cnn.onnx"
    output = tmp_path / "cnn.w8.onnx"
    result = invoke(runner, "quantize", source, "--mode", "weights", "--qdq", "-o", output, "--json",
                    "--data", SAMPLES / "digits_cnn.eval.npz", "--labels", "labels", "--max-accuracy-drop", "0.01")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passes"][0]["name"] == "quantize-weights"
    assert SLOW_ON_ORT in report["passes"][0]["notes"]
    assert report["size"]["ratio"] < 0.5
    assert json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}["onnxshrink.options"])["mode"] == "WeightsOnly"
    onnx.checker.check_model(str(output), full_check=True)


def test_calibration_with_dynamic_or_weights_mode_is_a_usage_error(tmp_path, runner):
    model = save_model(make_mlp(), tmp_path / "m.onnx")
    for mode in ("dynamic", "weights"):
        result = invoke(runner, "quantize", model, "--mode", mode, "--calibration", SAMPLES / "digits_mlp.calib.npz")
        assert result.exit_code == 2
        assert f"--calibration is not used by --mode {mode}" in result.stderr
    assert not (tmp_path / "m.int8.onnx").exists()
