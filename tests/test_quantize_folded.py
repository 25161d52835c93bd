"""int8 storage, float compute: small layers' weights as int8 + Cast + Mul, which onnxruntime folds at load.

The checks: the decoding is exactly per-channel int8 rounding; onnxruntime folds it (the graph it runs
has no Cast/Mul on constants and the same float kernels as fp32); dynamic and static quantize give the
folded form to small layers and integer kernels to big ones; files are about 4x smaller in weight bytes;
accuracy on the sample eval sets holds. Speed is measured in bench/run.py, not here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import SAMPLES, invoke, make_mlp, save_model
from onnxshrink.data import input_specs, load_npz
from onnxshrink.passes.folded_weights import FOLDED, constant_nodes_left, decode, quantize_folded
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig
from onnxshrink.runtime import make_session, optimized_op_counts

INTEGER = {"com.microsoft.DynamicQuantizeMatMul", "com.microsoft.MatMulIntegerToFloat", "com.microsoft.QGemm",
           "QLinearMatMul", "com.microsoft.QLinearConv", "QLinearConv"}
SAMPLE_NAMES = ["digits_mlp", "digits_cnn", "digits_transformer"]


def actions(report) -> dict[str, str]:
    return {layer.node: layer.action for layer in report.layers}


def folded_weights(model) -> dict[str, np.ndarray]:
    """Decoded weight name -> what Cast + Mul computes from the file's int8 tensor and scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    decoded = {}
    for node in model.graph.node:
        if node.op_type == "Mul" and node.input[0] in producers and producers[node.input[0]].op_type == "Cast":
            q = inits[producers[node.input[0]].input[0]]
            assert q.dtype == np.int8
            decoded[node.output[0]] = q.astype(np.float32) * inits[node.input[1]]
    return decoded


def runtime_graph(model, tmp_path) -> onnx.ModelProto:
    target = tmp_path / "optimized.onnx"
    make_session(model, optimized_path=str(target))
    return onnx.load(str(target))


def weight_bytes(model, dtypes=(TensorProto.FLOAT, TensorProto.INT8)) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer
               if t.data_type in dtypes and len(t.dims) >= 2)


def accuracy(model, name) -> float:
    with np.load(SAMPLES / f"{name}.eval.npz") as arrays:
        x, labels = arrays["input"], arrays["labels"]
    logits = make_session(model).run(None, {"input": x})[0]
    return float(np.mean(np.argmax(logits, -1) == labels))


def quantize_sample(name, mode):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    if mode == "dynamic":
        return model, *QuantizeDynamic()(model)
    if mode == "weights":
        return model, *QuantizeWeightsOnly()(model)
    calibration = load_npz(SAMPLES / f"{name}.calib.npz", input_specs(model))
    return model, *QuantizeStatic(StaticQuantizeConfig(), calibration)(model)


# ---- the form ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((64, 48), 1), ((48, 64), 0), ((16, 8, 3, 3), 0)])
def test_decoding_is_per_channel_int8_rounding(shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w[(slice(None),) * axis + (3,)] = 0.0  # an all-zero channel keeps scale 1 and decodes to zeros
    q, scale = quantize_folded(w, axis)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    expected_scale = np.where(np.abs(moved).max(1) > 0, np.abs(moved).max(1) / 127, 1).astype(np.float32)
    channel_shape = [1] * w.ndim
    channel_shape[axis] = -1
    np.testing.assert_array_equal(np.asarray(scale).reshape(-1), expected_scale)
    np.testing.assert_array_equal(q, np.clip(np.rint(w / expected_scale.reshape(channel_shape)), -127, 127).astype(np.int8))
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    restored = decode(q, scale)
    assert restored.shape == w.shape
    assert np.all(np.abs(restored - w) <= expected_scale.reshape(channel_shape) / 2 + 1e-7)


def test_written_model_decodes_to_the_rounded_weights():
    model = make_mlp((32, 64, 48, 10), seed=1)
    quantized, report = QuantizeDynamic()(model)
    assert set(actions(report).values()) == {FOLDED}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    decoded = folded_weights(quantized)
    assert len(decoded) == 3
    for node in (n for n in quantized.graph.node if n.op_type == "MatMul"):
        source = originals[node.input[1].removesuffix("_int8_dq")]
        q, scale = quantize_folded(source, 1)
        np.testing.assert_array_equal(decoded[node.input[1]], decode(q, scale))
    # Run exactly as written (no optimization): outputs of the model with the rounded weights.
    x = np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for tensor in rounded.graph.initializer:
        if tensor.name.endswith(".weight"):
            q, scale = quantize_folded(numpy_helper.to_array(tensor), 1)
            tensor.CopyFrom(numpy_helper.from_array(decode(q, scale), tensor.name))
    np.testing.assert_allclose(make_session(quantized, optimize=False).run(None, {"input": x})[0],
                               make_session(rounded, optimize=False).run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(quantized, full_check=True)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("mode", ["dynamic", "static", "weights"])
def test_onnxruntime_folds_the_decoding_and_runs_the_fp32_kernels(tmp_path, name, mode):
    original, quantized, report = quantize_sample(name, mode)
    assert FOLDED in actions(report).values()
    written = runtime_graph(quantized, tmp_path)
    assert constant_nodes_left(written) == 0
    int8_sources = {t.name for t in quantized.graph.initializer if t.data_type == TensorProto.INT8}
    assert not any(set(n.input) & int8_sources for n in written.graph.node)  # nothing reads the int8 tensors
    counts, fp32 = optimized_op_counts(quantized), optimized_op_counts(original)
    if all(action in (FOLDED, "kept float") or action.startswith(FOLDED) for action in actions(report).values()):
        assert counts == fp32  # the very graph fp32 runs
    assert not INTEGER & set(counts) or mode == "static"


def test_unfolded_decoding_is_counted(tmp_path):
    quantized, _ = QuantizeDynamic()(make_mlp(seed=3))
    path = save_model(quantized, tmp_path / "q.onnx")
    as_written = tmp_path / "unoptimized.onnx"
    make_session(path, optimize=False, optimized_path=str(as_written))
    assert constant_nodes_left(onnx.load(str(as_written))) == 3  # 3 Casts of int8 initializers when nothing folds them


# ---- which layers get it ----------------------------------------------------------------------


def test_small_layers_fold_and_big_layers_get_integer_kernels():
    model = make_mlp((1024, 1024, 64, 10), seed=4)  # 1M, 64K and 640 multiply-adds per sample
    quantized, report = QuantizeDynamic()(model)
    assert actions(report) == {"fc0/MatMul": "int8 per-channel", "fc1/MatMul": FOLDED, "fc2/MatMul": FOLDED}
    reasons = {layer.node: layer.reason for layer in report.layers}
    assert "65536 multiply-adds per sample < 131072" in reasons["fc1/MatMul"]
    counts = optimized_op_counts(quantized)
    assert sum(v for k, v in counts.items() if k in INTEGER) == 1
    every, _ = QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    assert sum(v for k, v in optimized_op_counts(every).items() if k in INTEGER) == 3


def test_rows_of_a_3d_matmul_count():
    # 64 x 256 weights: 16K multiply-adds per row; with 16 rows per sample 256K, where the integer kernel pays.
    from onnx import helper

    from conftest import build_model, float_value

    w = np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["y"], name="fc")]
    for rows, expected in ((16, "int8 per-channel"), (2, FOLDED)):
        model = build_model(nodes, [float_value("input", ["batch", rows, 64])], [float_value("y", ["batch", rows, 256])],
                            [numpy_helper.from_array(w, "w")])
        assert actions(QuantizeDynamic()(model)[1])["fc"] == expected


def test_static_uses_the_calibration_batch_shapes():
    from onnx import helper

    from conftest import build_model, float_value
    from onnxshrink.data import Dataset

    w = (np.random.default_rng(6).standard_normal((64, 256)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["y"], name="fc")]
    model = build_model(nodes, [float_value("input", ["batch", "rows", 64])], [float_value("y", ["batch", "rows", 256])],
                        [numpy_helper.from_array(w, "w")])
    for rows, expected in ((32, "int8 static QDQ per-channel"), (4, FOLDED)):
        x = np.random.default_rng(7).standard_normal((8, rows, 64)).astype(np.float32)
        _, report = QuantizeStatic(StaticQuantizeConfig(), Dataset([{"input": x}], None, 8, False, []))(model)
        assert actions(report)["fc"] == expected


def test_min_weights_keeps_layers_fully_float():
    model = make_mlp((32, 64, 48, 10), seed=8)  # 2048, 3072 and 480 weights
    quantized, report = QuantizeDynamic(QuantizeConfig(min_weights=3000))(model)
    assert actions(report) == {"fc0/MatMul": "kept float", "fc1/MatMul": FOLDED, "fc2/MatMul": "kept float"}
    inits = {t.name: t for t in quantized.graph.initializer}
    assert inits["fc0.weight"].data_type == TensorProto.FLOAT and "fc1.weight" not in inits


def test_running_twice_changes_nothing_more():
    once, _ = QuantizeDynamic()(make_mlp(seed=9))
    twice, report = QuantizeDynamic()(once)
    assert not report.changed and "model is already quantized: nothing to do" in report.notes
    assert {layer.reason for layer in report.layers} == {"already int8 (folded form)"}
    assert twice.graph == once.graph


# ---- the sample models --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sample_models_fold_keep_accuracy_and_shrink(name, mode):
    original, quantized, report = quantize_sample(name, mode)
    decided = actions(report)
    # Every weight layer of these small models is below the integer kernels' crossover.
    assert all(a == FOLDED for node, a in decided.items() if a != "kept float"), decided
    assert sum(a == FOLDED for a in decided.values()) >= 3
    assert accuracy(quantized, name) >= accuracy(original, name) - 0.005
    folded_bytes = sum(layer.bytes_after for layer in report.layers if layer.action == FOLDED)
    float_bytes = sum(layer.bytes_before for layer in report.layers if layer.action == FOLDED)
    assert folded_bytes < float_bytes / 3.5  # int8 + one float scale per channel
    assert weight_bytes(quantized) < weight_bytes(original) / 3


def test_cli_report_counts_folded_layers_as_float_kernels(tmp_path, runner):
    output = tmp_path / "q.onnx"
    result = invoke(runner, "quantize", SAMPLES / "digits_transformer.onnx", "-o", output, "--json", "--no-validate")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runtime = report["runtime"]
    assert runtime["quantized_layers"] == 0 and runtime["all_quantized_layers_fused"] is True
    assert runtime["folded_layers"] == 14 and runtime["folded_decoding_left"] == 0
    assert not any("warning" in note for note in report["notes"])
    assert report["size"]["ratio"] < 0.45


def test_cli_options(tmp_path, runner):
    source = save_model(make_mlp(seed=10), tmp_path / "m.onnx")
    result = invoke(runner, "quantize", source, "--integer-min-macs", "0", "-o", tmp_path / "a.onnx", "--json", "--no-validate")
    assert result.exit_code == 0, result.output
    assert FOLDED not in {layer["action"] for layer in json.loads(result.stdout)["passes"][0]["layers"]}
    result = invoke(runner, "quantize", source, "--mode", "weights", "--integer-min-macs", "5", "-o", tmp_path / "b.onnx")
    assert result.exit_code == 2 and "--integer-min-macs applies to --mode dynamic and static only" in result.stderr
    result = invoke(runner, "quantize", source, "--qdq", "-o", tmp_path / "c.onnx")
    assert result.exit_code == 2 and "--qdq applies to --mode weights only" in result.stderr


def test_weights_mode_defaults_to_the_folded_form():
    model = make_mlp(seed=11)
    folded, report = QuantizeWeightsOnly()(model)
    assert set(actions(report).values()) == {FOLDED}
    assert "DequantizeLinear" not in {n.op_type for n in folded.graph.node}
    qdq, _ = QuantizeWeightsOnly(WeightsOnlyConfig(qdq=True))(model)
    assert sum(n.op_type == "DequantizeLinear" for n in qdq.graph.node) == 3


@pytest.mark.parametrize("shape", ["if_branches", "loop_body", "scan_body"])
def test_static_mode_stores_control_flow_body_layers_int8(tmp_path, shape):
    """Calibration cannot reach inside If/Loop/Scan bodies, but the folded form needs no activation ranges:
    static mode stores those weights int8, and onnxruntime still folds their decoding inside the body."""
    import graph_shapes

    from onnxshrink import api

    model, feed = getattr(graph_shapes, shape)()
    source = save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **feed)
    report = api.quantize(source, tmp_path / "q.onnx", StaticQuantizeConfig(), calibration=tmp_path / "calib.npz",
                          run_validation=False)
    layers = report.passes[0].layers
    assert layers and all(layer.action == FOLDED and "If/Loop/Scan body" in layer.reason for layer in layers)
    assert report.runtime["folded_decoding_left"] == 0
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert not [t for g in [written.graph] for t in g.initializer if t.data_type == TensorProto.FLOAT and t.dims == [32, 48]]
    expected, got = make_session(source).run(None, feed), make_session(tmp_path / "q.onnx").run(None, feed)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, atol=0.02)
