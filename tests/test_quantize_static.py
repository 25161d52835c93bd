"""Static int8 quantization (QDQ with calibrated activations): the graph written, its numerics, the
calibrators, and what onnxruntime really runs.

The key assertion is on `optimized_op_counts`: every layer the pass quantized runs as an integer
kernel (QLinearConv, QGemm, QLinearMatMul) in the graph onnxruntime executes, with no float
Conv/Gemm/MatMul left for it. QDQ that onnxruntime does not fuse is correct but slower than fp32.
Speed itself is measured in bench/static_speed.py, not here.
"""

from __future__ import annotations

import tempfile
import tracemalloc
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, build_model, float_value, make_mlp, save_model
from onnxshrink.calibrate import BINS, RangeStats, calibrate
from onnxshrink.data import Dataset, input_specs, load_npz
from onnxshrink.passes import quantize_static as qs
from onnxshrink.passes.folded_weights import FOLDED
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.passes.smooth_quant import SmoothQuant
from onnxshrink.runtime import make_session, optimized_op_counts

INTEGER = {"QLinearConv", "com.microsoft.QLinearConv", "com.microsoft.QGemm", "QLinearMatMul",
           "com.microsoft.MatMulIntegerToFloat"}
FLOAT = {"Conv", "Gemm", "MatMul", "com.microsoft.FusedConv", "com.microsoft.FusedGemm", "com.microsoft.FusedMatMul",
         "com.microsoft.nchwc.Conv"}
CALIBRATORS = ["minmax", "percentile", "entropy", "mse"]


# ---- builders and helpers -------------------------------------------------------------------


def make_cnn(seed=0, in_channels=4, relu_then_pool=True) -> onnx.ModelProto:
    """Conv(4->8) Relu MaxPool Conv(8->8) Relu Flatten Gemm(transB) Relu Gemm: every layer quantizable."""
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rng.standard_normal(shape) * (scale if scale is not None else np.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(value.astype(np.float32), name)

    pool = [helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])]
    if not relu_then_pool:
        pool = [helper.make_node("MaxPool", ["c1"], ["m1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
                helper.make_node("Relu", ["m1"], ["p1"], name="relu1")]
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1/Conv", pads=[1, 1, 1, 1]),
             *pool,
             helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], name="fc1/Gemm", transB=1),
             helper.make_node("Relu", ["g1"], ["h1"], name="relu3"),
             helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2/Gemm", transB=1)]
    inits = [tensor("conv1.weight", 8, in_channels, 3, 3), tensor("conv1.bias", 8, scale=0.1),
             tensor("conv2.weight", 8, 8, 3, 3), tensor("conv2.bias", 8, scale=0.1),
             tensor("fc1.weight", 16, 128), tensor("fc1.bias", 16, scale=0.1),
             tensor("fc2.weight", 10, 16), tensor("fc2.bias", 10, scale=0.1)]
    return build_model(nodes, [float_value("input", ["batch", in_channels, 8, 8])], [float_value("logits", ["batch", 10])], inits)


def dataset(x, batch=16) -> Dataset:
    return Dataset([{"input": x[i:i + batch]} for i in range(0, len(x), batch)], None, len(x), False, [])


def images(n=64, channels=4, seed=1):
    return np.random.default_rng(seed).random((n, channels, 8, 8)).astype(np.float32)


def quantize(model, x, **config):
    """Integer kernels everywhere unless asked: these tiny layers would otherwise all get the folded form."""
    return QuantizeStatic(StaticQuantizeConfig(**{"integer_min_macs": 0, **config}), dataset(x))(model)


def written(model, tmp_path, name="q.onnx"):
    """Save, run the full checker on the file, and check onnxruntime loads it."""
    path = save_model(model, tmp_path / name)
    onnx.checker.check_model(str(path), full_check=True)
    make_session(path)
    return path


def inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def producers(model) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def quantized_layers(report) -> list[str]:
    return [d.node for d in report.layers if d.action.startswith("int8")]


def kept_float(report) -> dict[str, str]:
    return {d.node: d.reason for d in report.layers if d.action == "kept float"}


def kernels(counts: Counter, kinds) -> int:
    return sum(v for k, v in counts.items() if k in kinds)


def assert_fused(path, report, float_layers=0):
    """THE key check: each quantized layer is an integer kernel in the graph onnxruntime runs."""
    counts = optimized_op_counts(path)
    assert kernels(counts, INTEGER) == len(quantized_layers(report)) > 0, counts
    assert kernels(counts, FLOAT) == float_layers, counts
    return counts


def assert_close(reference, produced, cosine=0.999):
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = produced.reshape(len(produced), -1).astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() > cosine and cos.min() > cosine - 0.01, (cos.mean(), cos.min())
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def outputs(path_or_model, x, optimize):
    return make_session(path_or_model, optimize=optimize).run(None, {"input": x})[0]


# ---- the written graph ----------------------------------------------------------------------


def test_cnn_graph_written(tmp_path):
    model = make_cnn()
    x = images()
    result, report = quantize(model, x)
    written(result, tmp_path)
    assert report.changed and sorted(quantized_layers(report)) == ["conv1/Conv", "conv2/Conv", "fc1/Gemm", "fc2/Gemm"]
    values, made = inits(result), producers(result)
    assert not {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"} & set(values)  # float weights gone
    ops = Counter(n.op_type for n in result.graph.node)
    assert ops["Conv"] == 2 and ops["Gemm"] == 2 and ops["Relu"] == 3 and ops["MaxPool"] == 1

    for node in (n for n in result.graph.node if n.op_type in ("Conv", "Gemm")):
        x_dq, w_dq, b_dq = (made[name] for name in node.input)
        assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}
        assert made[x_dq.input[0]].op_type == "QuantizeLinear"
        x_scale, x_zero = values[x_dq.input[1]], values[x_dq.input[2]]
        assert x_zero.dtype == np.uint8 and x_scale.dtype == np.float32 and x_scale.shape == ()
        w_q, w_scale, w_zero = (values[name] for name in w_dq.input)
        assert w_q.dtype == np.int8 and np.abs(w_q.astype(int)).max() == 127 and np.all(w_zero == 0)
        channels = w_q.shape[0]  # Conv [M, C, kh, kw] and Gemm transB=1 [N, K]: channels on axis 0
        assert w_scale.shape == (channels,) and helper.get_attribute_value(w_dq.attribute[0]) == 0
        b_q, b_scale, b_zero = (values[name] for name in b_dq.input)
        assert b_q.dtype == np.int32 and b_zero.dtype == np.int32 and np.all(b_zero == 0)
        np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)  # int32 bias in the accumulator's scale
        original = inits(model)[node.name.split("/")[0] + ".bias"]
        np.testing.assert_allclose(b_q * b_scale, original, atol=float(b_scale.max()))
        weight = inits(model)[node.name.split("/")[0] + ".weight"]
        scale = w_scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        np.testing.assert_allclose(w_q * scale, weight, atol=float(w_scale.max()) / 2 + 1e-7)

    # The quantized tensor after a layer is its Relu's output, zero point 0 (so the Relu is a no-op onnxruntime drops).
    for relu in (n for n in result.graph.node if n.op_type == "Relu"):
        (q,) = [n for n in result.graph.node if relu.output[0] in n.input]
        assert q.op_type == "QuantizeLinear" and values[q.input[2]] == 0
    # MaxPool and Flatten reuse their input's scale: exact, and onnxruntime runs them on uint8.
    for op in ("MaxPool", "Flatten"):
        node = next(n for n in result.graph.node if n.op_type == op)
        dq_in = made[node.input[0]]
        (q_out,) = [n for n in result.graph.node if node.output[0] in n.input]
        assert dq_in.op_type == "DequantizeLinear" and q_out.op_type == "QuantizeLinear"
        assert list(q_out.input[1:]) == list(dq_in.input[1:])
    # The last Gemm feeds no quantized layer: it keeps a float output (QGemm writes float itself).
    assert made["logits"].op_type == "Gemm"


def test_matmul_add_becomes_one_gemm(tmp_path):
    model = make_mlp(seed=2)  # MatMul + Add per layer
    x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    result, report = quantize(model, x)
    path = written(result, tmp_path)
    ops = Counter(n.op_type for n in result.graph.node)
    assert ops["Gemm"] == 3 and ops["MatMul"] == 0 and ops["Add"] == 0
    assert all("Gemm" in d.reason for d in report.layers)
    for node in (n for n in result.graph.node if n.op_type == "Gemm"):
        w_dq = producers(result)[node.input[1]]
        assert helper.get_attribute_value(w_dq.attribute[0]) == 1  # [K, N] weight: channels on axis 1
    counts = assert_fused(path, report)
    assert counts == Counter({"QuantizeLinear": 1, "com.microsoft.QGemm": 3})
    assert_close(outputs(model, x, False), outputs(path, x, False))


# ---- numerics and what onnxruntime runs -------------------------------------------------------


CONFIGS = {"per_channel": {}, "per_tensor": {"per_channel": False}, "asymmetric": {"symmetric": False}}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("kind", ["cnn", "mlp_matmul", "mlp_gemm"])
def test_numerics_and_integer_kernels(tmp_path, kind, config):
    if kind == "cnn":
        model, x = make_cnn(seed=4), images(seed=5)
    else:
        model = make_mlp(seed=4, use_gemm=kind == "mlp_gemm")
        x = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float32)
    result, report = quantize(model, x, **CONFIGS[config])
    path = written(result, tmp_path)
    assert_fused(path, report)
    reference = outputs(model, x, False)
    for optimize in (False, True):  # the graph as written (reference QDQ ops) and as onnxruntime fuses it
        produced = outputs(path, x, optimize)
        assert_close(reference, produced)
        assert np.mean(np.argmax(reference, -1) == np.argmax(produced, -1)) >= 0.9


def test_first_conv_on_few_channels_stays_float_and_depthwise_is_quantized(tmp_path):
    rng = np.random.default_rng(6)
    w = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)  # noqa: E731
    model = build_model(
        [helper.make_node("Conv", ["input", "stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["ar"], name="relu0"),
         helper.make_node("Conv", ["ar", "dw"], ["b"], name="depthwise", pads=[1, 1, 1, 1], group=16),
         helper.make_node("Clip", ["b", "zero", "six"], ["br"], name="relu6"),
         helper.make_node("Conv", ["br", "pw"], ["out"], name="pointwise")],
        [float_value("input", ["batch", 3, 12, 12])], [float_value("out", ["batch", 16, 12, 12])],
        [w("stem", 16, 3, 3, 3), w("dw", 16, 1, 3, 3), w("pw", 16, 16, 1, 1),
         numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(6, np.float32), "six")])
    x = rng.random((32, 3, 12, 12)).astype(np.float32)
    result, report = quantize(model, x)
    assert sorted(quantized_layers(report)) == ["depthwise", "pointwise"]
    assert "3 input channel(s)" in kept_float(report)["stem"]
    path = written(result, tmp_path)
    counts = assert_fused(path, report, float_layers=1)  # the stem
    assert counts["Clip"] == 0 and counts["Relu"] == 0  # Relu fused into the float stem, Clip(0, 6) into the Q
    assert_close(outputs(model, x, False), outputs(path, x, True))


def test_depthwise_between_hard_swish_stays_float(tmp_path):
    # MobileNetV3 / PP-OCR blocks: hard-swish (x * HardSigmoid(x)) on both sides of the depthwise Conv.
    # Quantized, it costs a QuantizeLinear and a DequantizeLinear for little compute (measured: the PP-OCR
    # classifier ran 1.69x fp32 time with its depthwise Convs quantized, 1.14x with them float).
    rng = np.random.default_rng(9)
    w = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)  # noqa: E731
    model = build_model(
        [helper.make_node("Conv", ["input", "pw1"], ["a"], name="pw1"),
         helper.make_node("HardSigmoid", ["a"], ["ag"], name="hs1", alpha=1 / 6),
         helper.make_node("Mul", ["a", "ag"], ["ah"], name="swish1"),
         helper.make_node("Conv", ["ah", "dw"], ["b"], name="depthwise", pads=[1, 1, 1, 1], group=32),
         helper.make_node("HardSigmoid", ["b"], ["bg"], name="hs2", alpha=1 / 6),
         helper.make_node("Mul", ["b", "bg"], ["bh"], name="swish2"),
         helper.make_node("Conv", ["bh", "pw2"], ["out"], name="pw2")],
        [float_value("input", ["batch", 32, 10, 10])], [float_value("out", ["batch", 32, 10, 10])],
        [w("pw1", 32, 32, 1, 1), w("dw", 32, 1, 3, 3), w("pw2", 32, 32, 1, 1)])
    x = rng.standard_normal((16, 32, 10, 10)).astype(np.float32)
    result, report = quantize(model, x)
    assert "depthwise Conv between float ops" in kept_float(report)["depthwise"]
    assert sorted(quantized_layers(report)) == ["pw1", "pw2"]
    assert_close(outputs(model, x, False), outputs(written(result, tmp_path), x, True))


def test_relu_before_maxpool_is_swapped_so_maxpool_stays_float_nchwc(tmp_path):
    # stem Conv on 1 channel stays float; its Relu -> MaxPool feeds a quantized Conv. onnxruntime would pull
    # the QuantizeLinear above MaxPool and run MaxPool on uint8 in NCHW (25x slower); MaxPool -> Relu stops it.
    model = make_cnn(seed=7, in_channels=1)
    x = images(channels=1, seed=8)
    result, report = quantize(model, x)
    assert "conv1/Conv" in kept_float(report)
    made = producers(result)
    pool = next(n for n in result.graph.node if n.op_type == "MaxPool")
    relu = next(n for n in result.graph.node if n.op_type == "Relu" and n.input[0] == pool.output[0])
    assert made[pool.input[0]].op_type == "Conv"
    assert [n.op_type for n in result.graph.node if relu.output[0] in n.input] == ["QuantizeLinear"]
    path = written(result, tmp_path)
    assert_fused(path, report, float_layers=1)
    # In the graph onnxruntime runs, MaxPool still reads float: the QuantizeLinear comes after it.
    with tempfile.TemporaryDirectory() as tmp:
        make_session(path, optimized_path=f"{tmp}/optimized.onnx")
        optimized = onnx.load(f"{tmp}/optimized.onnx")
    ran = producers(optimized)
    pools = [n for n in optimized.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1 and ran[pools[0].input[0]].op_type != "QuantizeLinear"
    quantize_linear = next(n for n in optimized.graph.node if n.op_type == "QuantizeLinear")
    assert ran[quantize_linear.input[0]].op_type in ("MaxPool", "ReorderOutput")
    # The rewrite is exact: same outputs as a model written with MaxPool -> Relu in the first place.
    assert_close(outputs(model, x, False), outputs(path, x, True))
    swapped_model = make_cnn(seed=7, in_channels=1, relu_then_pool=False)
    np.testing.assert_allclose(outputs(swapped_model, x, False), outputs(model, x, False), rtol=1e-5, atol=1e-5)


def test_3d_matmul_runs_as_integer_matmul_with_float_output(tmp_path):
    rng = np.random.default_rng(9)
    model = build_model(
        [helper.make_node("MatMul", ["input", "w1"], ["m1"], name="mm1"),
         helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
         helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
         helper.make_node("MatMul", ["r1", "w2"], ["logits"], name="mm2")],
        [float_value("input", ["batch", 5, 32])], [float_value("logits", ["batch", 5, 16])],
        [numpy_helper.from_array((rng.standard_normal((32, 48)) / 6).astype(np.float32), "w1"),
         numpy_helper.from_array((rng.standard_normal(48) * 0.1).astype(np.float32), "b1"),
         numpy_helper.from_array((rng.standard_normal((48, 16)) / 7).astype(np.float32), "w2")])
    x = rng.standard_normal((16, 5, 32)).astype(np.float32)
    result, report = quantize(model, x)
    path = written(result, tmp_path)
    assert sorted(quantized_layers(report)) == ["mm1", "mm2"]
    counts = assert_fused(path, report)
    # MatMul outputs stay float (MatMulIntegerToFloat): a uint8 output is where MiniLM lost most (smooth_quant tests)
    assert counts["com.microsoft.MatMulIntegerToFloat"] == 2 and counts["QuantizeLinear"] == 2
    assert_close(outputs(model, x, False), outputs(path, x, True))


def test_gemm_alpha_beta_no_transpose(tmp_path):
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    model = build_model(
        [helper.make_node("Gemm", ["input", "fc.weight", "fc.bias"], ["logits"], name="fc", alpha=0.5, beta=2.0)],
        [float_value("input", ["batch", 32])], [float_value("logits", ["batch", 16])],
        [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")])
    x = rng.standard_normal((32, 32)).astype(np.float32)
    result, report = quantize(model, x)
    path = written(result, tmp_path)
    assert_fused(path, report)
    assert_close(0.5 * (x @ w) + 2.0 * b, outputs(path, x, True))


def test_shared_weight_is_stored_once(tmp_path):
    rng = np.random.default_rng(11)
    model = build_model(
        [helper.make_node("MatMul", ["input", "shared"], ["a"], name="first"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "shared"], ["logits"], name="second")],
        [float_value("input", ["batch", 32])], [float_value("logits", ["batch", 32])],
        [numpy_helper.from_array((rng.standard_normal((32, 32)) / 6).astype(np.float32), "shared")])
    x = rng.standard_normal((32, 32)).astype(np.float32)
    result, report = quantize(model, x)
    path = written(result, tmp_path)
    int8 = [t for t in result.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1
    decisions = {d.node: d for d in report.layers}
    assert decisions["first"].bytes_before == 32 * 32 * 4 and decisions["second"].bytes_before == 0
    assert_fused(path, report)
    assert_close(outputs(model, x, False), outputs(path, x, True))


def test_bias_too_large_for_int32_widens_the_weight_scale(tmp_path):
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((16, 32)) * 1e-6).astype(np.float32)  # tiny weights: tiny scales
    b = np.full(16, 1e4, np.float32)
    model = build_model([helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", transB=1)],
                        [float_value("input", ["batch", 32])], [float_value("logits", ["batch", 16])],
                        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    x = rng.standard_normal((16, 32)).astype(np.float32)
    result, report = quantize(model, x)
    path = written(result, tmp_path)
    bias = next(v for k, v in inits(result).items() if v.dtype == np.int32 and v.any())
    assert np.abs(bias.astype(np.int64)).max() < 2**31 - 1
    np.testing.assert_allclose(outputs(path, x, True), x @ w.T + b, rtol=1e-3)


def test_opset_11_model_is_converted(tmp_path):
    model = make_mlp(seed=13, use_gemm=True, opset=11)
    x = np.random.default_rng(14).standard_normal((32, 32)).astype(np.float32)
    result, report = quantize(model, x)
    assert any("opset 11 to 13" in note for note in report.notes)
    path = written(result, tmp_path)
    assert_fused(path, report)


# ---- layers left float, and why -------------------------------------------------------------


def test_skipped_layers_have_reasons(tmp_path):
    rng = np.random.default_rng(15)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "inner"], ["then_out"], name="in_branch")], "then", [],
        [float_value("then_out", None)],
        [numpy_helper.from_array((rng.standard_normal((32, 32)) / 6).astype(np.float32), "inner")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["else_out"], name="pass")], "else", [],
                                    [float_value("else_out", None)])
    w = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) / 6).astype(np.float32), name)  # noqa: E731
    model = build_model(
        [helper.make_node("Gemm", ["input", "w0"], ["h0"], name="fc0", transB=1),
         helper.make_node("Relu", ["h0"], ["h"], name="relu"),
         helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Relu", ["bias_in"], ["bias"], name="make_bias"),
         helper.make_node("Gemm", ["branch", "w1", "bias"], ["g"], name="computed_bias"),
         helper.make_node("Gemm", ["g", "w2"], ["e"], name="excluded_one"),
         helper.make_node("Gemm", ["e", "w3"], ["logits"], name="last")],
        [float_value("input", ["batch", 32]), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         float_value("bias_in", [32])],
        [float_value("logits", ["batch", 32])],
        [w("w0", 32, 32), w("w1", 32, 32), w("w2", 32, 32), w("w3", 32, 32)])
    data = Dataset([{"input": rng.standard_normal((8, 32)).astype(np.float32), "cond": np.array(True),
                     "bias_in": rng.standard_normal(32).astype(np.float32)}], None, 8, False, [])
    result, report = QuantizeStatic(StaticQuantizeConfig(exclude=("excluded*",), keep_float="last", integer_min_macs=0), data)(model)
    reasons = kept_float(report)
    # The If branch's layer cannot be calibrated: it is stored int8 and runs a float kernel (the folded form).
    branch = next(layer for layer in report.layers if layer.node == "in_branch")
    assert branch.action == FOLDED and "If/Loop/Scan body" in branch.reason
    assert "computed" in reasons["computed_bias"]
    assert "excluded" in reasons["excluded_one"]
    assert "--keep-float" in reasons["last"]
    assert quantized_layers(report) == ["in_branch", "fc0"]  # the folded branch layer, then the calibrated one
    assert all(reason for reason in reasons.values())
    path = written(result, tmp_path)
    counts = optimized_op_counts(path)
    assert counts["com.microsoft.QGemm"] == 1


def test_layer_onnxruntime_does_not_fuse_is_written_float(tmp_path, monkeypatch):
    # Pretend onnxruntime left fc2 unfused on the first rewrite: the pass writes the model again without it.
    real = qs._unfused_layers
    calls = []

    def first_call_fails(optimized, plan):
        calls.append(1)
        return ["fc2/Gemm"] if len(calls) == 1 else real(optimized, plan)

    monkeypatch.setattr(qs, "_unfused_layers", first_call_fails)
    model, x = make_cnn(seed=16), images(seed=17)
    result, report = quantize(model, x)
    assert len(calls) == 2
    assert "does not fuse" in kept_float(report)["fc2/Gemm"]
    assert sorted(quantized_layers(report)) == ["conv1/Conv", "conv2/Conv", "fc1/Gemm"]
    assert "fc2.weight" in inits(result)  # float again
    path = written(result, tmp_path)
    assert_fused(path, report, float_layers=1)
    assert_close(outputs(model, x, False), outputs(path, x, True))


def test_unfused_layers_are_detected_on_the_real_graph():
    # Weight-only QDQ (activations float again): onnxruntime runs DequantizeLinear + float Gemm; the check says so.
    model = make_mlp(seed=18)
    x = np.random.default_rng(19).standard_normal((16, 32)).astype(np.float32)
    result, _ = quantize(model, x)
    for node in result.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and inits(result).get(node.input[0]) is None:
            node.op_type = "Identity"
            del node.input[1:]

    gemms = [n for n in result.graph.node if n.op_type == "Gemm"]
    plan = SimpleNamespace(layers=[SimpleNamespace(site=SimpleNamespace(node=n, name=n.name)) for n in gemms],
                           weight_inputs={n.input[1]: n.name for n in gemms})
    assert len(gemms) == 3
    # fc0/fc1 run as DequantizeLinear + float Gemm; fc2 as MatMulNBits (weight-only, float math): none is fused.
    assert qs._unfused_layers(qs._runtime_graph(result, 1), plan) == ["fc0/MatMul", "fc1/MatMul", "fc2/MatMul"]


def test_float_layer_between_quantized_ones_is_reported(tmp_path):
    # onnxruntime quantizes a float Gemm/Conv between DequantizeLinear and QuantizeLinear itself (per-tensor).
    model, x = make_cnn(seed=30), images(seed=31)
    result, report = quantize(model, x, exclude=("fc1*",))
    assert "excluded" in kept_float(report)["fc1/Gemm"]
    assert any(note.startswith("fc1/Gemm: written float, but onnxruntime quantizes it") for note in report.notes)
    written(result, tmp_path)


# ---- idempotence and the input model ----------------------------------------------------------


def test_running_twice_changes_nothing_more(tmp_path):
    model, x = make_cnn(seed=20), images(seed=21)
    once, _ = quantize(model, x)
    twice, report = quantize(once, x)
    assert not report.changed and not report.layers
    assert any("already quantized" in note for note in report.notes)
    assert once.SerializeToString() == twice.SerializeToString()
    path = written(twice, tmp_path)
    np.testing.assert_array_equal(outputs(once, x, True), outputs(path, x, True))


def test_input_model_is_not_modified():
    model, x = make_cnn(seed=22), images(seed=23)
    before = model.SerializeToString()
    quantize(model, x)
    assert model.SerializeToString() == before


def test_needs_calibration_data_and_known_calibrator():
    with pytest.raises(ValueError, match="calibration"):
        QuantizeStatic(StaticQuantizeConfig(), None)
    with pytest.raises(ValueError, match="calibrator"):
        QuantizeStatic(StaticQuantizeConfig(calibrator="kl"), dataset(images()))
    with pytest.raises(ValueError, match="op types"):
        QuantizeStatic(StaticQuantizeConfig(op_types=("LSTM",)), dataset(images()))


# ---- calibrators ------------------------------------------------------------------------------


def heavy_tailed(seed=24, one_signed=False):
    """Student-t (3 degrees of freedom: rare large values on both sides), in three batches whose range grows."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_t(3, 20000).astype(np.float32) * scale for scale in (0.5, 1.0, 2.0)]
    return [np.maximum(b, 0) for b in batches] if one_signed else batches


def rare_outliers(seed=32):
    """A million Normal(0, 1) values and two outliers (+30, -25): clipping them costs less than coarse steps."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(200_000).astype(np.float32) for _ in range(5)]
    batches[2][:2] = [30.0, -25.0]
    return batches


def stats_of(batches) -> RangeStats:
    stats = RangeStats()
    for batch in batches:
        stats.update(batch)
    return stats


def test_calibrator_ranges_on_data_with_outliers():
    batches = heavy_tailed()
    stats = stats_of(batches)
    everything = np.concatenate(batches)
    low_max, high_max = stats.minmax()
    assert (low_max, high_max) == (float(everything.min()), float(everything.max()))
    low, high = stats.percentile(99.99)
    assert low_max < low < 0 < high < high_max  # inside the min/max range, both tails cut
    np.testing.assert_allclose([low, high], np.percentile(everything, [0.005, 99.995]), atol=2 * stats.width)
    low, high = stats.entropy()
    assert low_max / 3 < low < -1 and 1 < high < high_max / 3, (low, high, low_max, high_max)
    # Rare outliers: entropy and mse clip them, keeping the bulk.
    rare = stats_of(rare_outliers())
    for method in ("entropy", "mse"):
        low, high = rare.range(method)
        assert -10 < low < -2 and 2 < high < 10, (method, low, high)
    # mse's range has a lower quantization error on the histogram than min/max's, on both data sets
    from onnxshrink.calibrate import _quantization_error
    for s in (stats, rare):
        values = np.concatenate([-(np.arange(BINS)[::-1] + 0.5), np.arange(BINS) + 0.5]) * s.width
        counts = np.concatenate([s.neg[::-1], s.pos]).astype(np.float64)
        assert _quantization_error(values, counts, *s.mse(), 256) < _quantization_error(values, counts, *s.minmax(), 256)
    # One-signed data (a Relu output with exact zeros): every method keeps low at exactly 0.
    relu_stats = stats_of(heavy_tailed(one_signed=True))
    for method in CALIBRATORS:
        low, high = relu_stats.range(method)
        assert low == 0.0 and 1.0 < high <= relu_stats.high, (method, low, high)


def test_histogram_rebinning_is_exact():
    batches = heavy_tailed(seed=25)
    first = RangeStats()
    first.update(batches[0])
    stats = stats_of(batches)
    assert stats.reach > first.reach  # the range grew: bins were merged
    everything = np.concatenate(batches).astype(np.float64)

    def binned(values):  # every value binned once at the final width
        return np.bincount(np.minimum((values / stats.width).astype(np.int64), BINS - 1), minlength=BINS)

    positive, negative = binned(everything[everything >= 0]), binned(-everything[everything < 0])
    np.testing.assert_array_equal(stats.pos, positive)
    np.testing.assert_array_equal(stats.neg, negative)
    assert stats.pos.sum() + stats.neg.sum() == everything.size


def test_non_finite_values_are_ignored():
    stats = RangeStats()
    stats.update(np.array([1.0, np.inf, -2.0, np.nan], np.float32))
    assert stats.minmax() == (-2.0, 1.0)
    assert stats.pos.sum() + stats.neg.sum() == 2


def test_calibrate_streams_batches_with_bounded_memory(monkeypatch):
    # 16 channels of 32x32 per sample: each batch's activations are ~1 MiB; 24 batches would be 24 MiB if kept.
    import weakref

    import onnxshrink.calibrate as calibrate_module

    rng = np.random.default_rng(26)
    model = build_model(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu")],
        [float_value("input", ["batch", 4, 32, 32])], [float_value("r", ["batch", 16, 32, 32])],
        [numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32), "w")])
    x = rng.random((8, 4, 32, 32)).astype(np.float32)
    real = calibrate_module.capture_activations
    alive_when_resumed = []

    def watched(*args, **kwargs):
        # When the calibrator asks for the next batch, it must hold none of the previous one's activations.
        previous = []
        for values in real(*args, **kwargs):
            alive_when_resumed.append(sum(ref() is not None for ref in previous))
            previous = [weakref.ref(v) for v in values.values()]
            yield values
            del values

    monkeypatch.setattr(calibrate_module, "capture_activations", watched)

    def peak(count):
        batches = ({"input": x} for _ in range(count))  # made lazily: consumed one at a time
        tracemalloc.start()
        ranges = calibrate(model, ["c", "r"], batches, "entropy")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, ranges

    small, _ = peak(3)
    large, ranges = peak(24)
    assert len(alive_when_resumed) == 27 and not any(alive_when_resumed)
    assert large < 1.3 * small + 256 * 1024, (small, large)  # statistics do not grow with the batch count
    assert ranges["r"][0] == 0.0 and ranges["c"][0] < 0 < ranges["c"][1]


@pytest.mark.parametrize("method", CALIBRATORS)
def test_calibrate_ranges_hold_zero(method):
    model = make_mlp(seed=27)
    x = np.random.default_rng(28).standard_normal((48, 32)).astype(np.float32)
    ranges = calibrate(model, ["input", "h0", "pre0"], dataset(x), method)
    for low, high in ranges.values():
        assert low <= 0.0 <= high and high > 0
    assert ranges["h0"][0] == 0.0  # Relu output
    minmax = calibrate(model, ["pre0"], dataset(x), "minmax")["pre0"]
    assert minmax[0] <= ranges["pre0"][0] and ranges["pre0"][1] <= minmax[1]


# ---- end to end on the trained sample models --------------------------------------------------


@pytest.mark.parametrize("calibrator", CALIBRATORS)
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_sample_models_keep_accuracy(tmp_path, name, calibrator):
    source = SAMPLES / f"{name}.onnx"
    model = onnx.load(str(source))
    calibration = load_npz(SAMPLES / f"{name}.calib.npz", input_specs(model))
    # Integer kernels everywhere: the calibrators matter for them (the default folds these small layers).
    result, report = QuantizeStatic(StaticQuantizeConfig(calibrator=calibrator, integer_min_macs=0), calibration)(model)
    path = written(result, tmp_path)
    assert_fused(path, report, float_layers=1 if name == "digits_cnn" else 0)  # digits_cnn: the 1-channel conv1
    with np.load(SAMPLES / f"{name}.eval.npz") as arrays:
        x, labels = arrays["input"], arrays["labels"]
    accuracy = {key: float(np.mean(np.argmax(outputs(p, x, True), -1) == labels)) for key, p in
                (("fp32", source), ("static", path))}
    assert accuracy["fp32"] - accuracy["static"] <= 0.01, accuracy
    assert path.stat().st_size < 0.4 * source.stat().st_size


# ---- SmoothQuant through an attention: the context's 1/s in the value projection --------------------


def attention_block(seed=0, tanh=False, value_reader=False) -> onnx.ModelProto:
    """x -> V = x Wv + bv (column 5 of Wv 40x: an outlier context channel) -> heads -> softmax(x xᵀ) V -> merged
    -> MatMul(Wo). `tanh`: a Tanh on the context before the heads merge; `value_reader`: V's biased output is a graph
    output too."""
    rng = np.random.default_rng(seed)
    width, heads = 16, 2
    wv = (rng.standard_normal((width, width)) / 4).astype(np.float32)
    wv[:, 5] *= 40.0
    tensors = {"wv": wv, "bv": (rng.standard_normal(width) * 0.1).astype(np.float32),
               "wo": (rng.standard_normal((width, 8)) / 4).astype(np.float32),
               "split": np.array([0, 0, heads, width // heads], np.int64), "merge": np.array([0, 0, width], np.int64)}
    nodes = [helper.make_node("MatMul", ["input", "wv"], ["v0"], name="v/MatMul"),
             helper.make_node("Add", ["bv", "v0"], ["v"], name="v/Add"),
             helper.make_node("Reshape", ["v", "split"], ["v4"], name="split"),
             helper.make_node("Transpose", ["v4"], ["vh"], name="heads", perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["input"], ["xt"], name="xt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["input", "xt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
             helper.make_node("Unsqueeze", ["p", "axis1"], ["p4"], name="p4"),
             helper.make_node("MatMul", ["p4", "vh"], ["mixed" if tanh else "ctx4"], name="mix"),
             *([helper.make_node("Tanh", ["mixed"], ["ctx4"], name="between")] if tanh else []),
             helper.make_node("Transpose", ["ctx4"], ["ctxt"], name="back", perm=[0, 2, 1, 3]),
             helper.make_node("Shape", ["ctxt"], ["ctx_shape"], name="shape"),  # reads the shape only (MPNet's)
             helper.make_node("Reshape", ["ctxt", "merge"], ["ctx"], name="merge"),
             helper.make_node("MatMul", ["ctx", "wo"], ["output"], name="o/MatMul")]
    tensors["axis1"] = np.array([1], np.int64)
    outputs = [float_value("output", ["batch", 8, 8]), helper.make_tensor_value_info("ctx_shape", TensorProto.INT64, [4])]
    outputs += [float_value("v", ["batch", 8, width])] if value_reader else []
    return build_model(nodes, [float_value("input", ["batch", 8, width])], outputs,
                       [numpy_helper.from_array(v, k) for k, v in tensors.items()])


def attention_tokens(n=32, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 8, 16)).astype(np.float32)


def test_attention_context_scale_folds_into_the_value_projection():
    model, x = attention_block(), attention_tokens()
    smoothed, report = SmoothQuant(calibration=dataset(x))(model)
    assert report.changed, report.notes
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]  # no Mul inserted
    before, after = inits(model), inits(smoothed)
    s = after["wo"][:, 0] / before["wo"][:, 0]  # row j of Wo times s_j ...
    np.testing.assert_allclose(after["wv"], before["wv"] / s[None, :], rtol=1e-5)  # ... column j of Wv over s_j
    np.testing.assert_allclose(after["bv"], before["bv"] / s, rtol=1e-5)
    assert s[5] == s.max() > 1.0  # the outlier channel moved most
    for got, want in zip(run_plain(smoothed, x), run_plain(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert any("value projection" in note for note in report.notes)
    # And the static pass still runs both projections as integer kernels.
    result, static_report = QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0), dataset(x))(model)
    assert sorted(quantized_layers(static_report)) == ["o/MatMul", "v/MatMul"]
    assert not any(n.op_type == "Mul" for n in result.graph.node)


@pytest.mark.parametrize("case", ["tanh between", "value read elsewhere"])
def test_attention_fold_needs_the_exact_head_layout(case):
    model = attention_block(tanh=True) if case == "tanh between" else attention_block(value_reader=True)
    x = attention_tokens()
    smoothed, _ = SmoothQuant(calibration=dataset(x))(model)
    np.testing.assert_array_equal(inits(smoothed)["wv"], inits(model)["wv"])  # never scaled
    for got, want in zip(run_plain(smoothed, x), run_plain(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def run_plain(model, x):
    return make_session(model, optimize=False).run(None, {"input": x})


# ---- embedding tables of a few rows stay float --------------------------------------------------------


def typed_encoder(seed=0) -> onnx.ModelProto:
    """word (200 x 160) and token-type (2 x 160, one channel 30x) tables gathered, summed, normed, one MatMul."""
    rng = np.random.default_rng(seed)
    types = (rng.standard_normal((2, 160)) * 0.02).astype(np.float32)
    types[:, 7] = 0.6
    tensors = {"word": (rng.standard_normal((200, 160)) * 0.05).astype(np.float32), "types": types,
               "gamma": np.ones(160, np.float32), "beta": np.zeros(160, np.float32),
               "w": (rng.standard_normal((160, 48)) / 12).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["we"], name="word/Gather"),
             helper.make_node("Gather", ["types", "token_type_ids"], ["te"], name="types/Gather"),
             helper.make_node("Add", ["we", "te"], ["e"], name="sum"),
             helper.make_node("LayerNormalization", ["e", "gamma", "beta"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["output"], name="fc/MatMul")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", 10]) for name in ("input_ids", "token_type_ids")]
    return build_model(nodes, inputs, [float_value("output", ["batch", 10, 48])],
                       [numpy_helper.from_array(v, k) for k, v in tensors.items()])


def test_few_row_embedding_table_stays_float_and_the_word_table_is_int8():
    rng = np.random.default_rng(9)
    feeds = [{"input_ids": rng.integers(0, 200, (8, 10)), "token_type_ids": rng.integers(0, 2, (8, 10))} for _ in range(2)]
    model = typed_encoder()
    result, report = QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0), Dataset(feeds, None, 16, False, []))(model)
    decisions = {d.node: d for d in report.layers}
    assert decisions["types/Gather"].action == "kept float" and "2-row table" in decisions["types/Gather"].reason
    assert decisions["word/Gather"].action != "kept float"
    stored = {t.name: t.data_type for t in result.graph.initializer}
    assert stored["types"] == TensorProto.FLOAT and TensorProto.INT8 in stored.values() and "word" not in stored
    np.testing.assert_array_equal(inits(result)["types"], inits(model)["types"])
    want = make_session(model, optimize=False).run(None, feeds[0])[0]
    got = make_session(result, optimize=True).run(None, feeds[0])[0]
    assert_close(want, got, cosine=0.999)


@pytest.mark.parametrize("mode", ["dynamic", "weights", "int4"])
def test_a_few_row_table_stays_float_in_every_mode_while_the_word_table_is_compressed(mode):
    """The rule lives in the embedding plan every pass shares, not in static mode alone."""
    from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
    from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
    from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig

    model = typed_encoder()
    quantizer = {"dynamic": lambda: QuantizeDynamic(QuantizeConfig()),
                 "weights": lambda: QuantizeWeightsOnly(WeightsOnlyConfig()),
                 "int4": lambda: QuantizeBlockwise(BlockwiseConfig(block_size=32))}[mode]()
    result, report = quantizer(model)
    decisions = {d.node: d for d in report.layers}
    assert decisions["types/Gather"].action == "kept float" and "2-row table" in decisions["types/Gather"].reason
    assert decisions["word/Gather"].action != "kept float"
    np.testing.assert_array_equal(inits(result)["types"], inits(model)["types"])
    assert "word" not in {t.name for t in result.graph.initializer if t.data_type == TensorProto.FLOAT}
