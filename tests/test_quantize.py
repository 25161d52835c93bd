"""Dynamic int8 quantization: the graph it writes, its numerics, and what onnxruntime really runs.

The key assertion is on `optimized_op_counts`: every layer the pass quantized must
run as an integer kernel in onnxruntime's optimized graph, with no float
MatMul/Gemm left for it. A pass that writes a correct but unfused graph is slower
than the float model and fails here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import float_value as _float, build_model as _model, SAMPLES, invoke, make_mlp, save_model
from onnxshrink import __version__
from onnxshrink.api import INTEGER_KERNELS
from onnxshrink.data import DEFAULT_BATCH
from onnxshrink.passes.folded_weights import FOLDED
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic, quantize_int8
from onnxshrink.runtime import make_session, optimized_op_counts

FLOAT_KERNELS = ("MatMul", "Gemm", "com.microsoft.FusedMatMul", "com.microsoft.FusedGemm")
LAYERS = ["fc0/MatMul", "fc1/MatMul", "fc2/MatMul"]


# ---- builders and helpers -----------------------------------------------------------




def make_tied(seed=5) -> onnx.ModelProto:
    """x -> MatMul(W) -> Relu -> MatMul(W) -> MatMul(head): one initializer read by two MatMuls."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    head = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    return _model(
        [
            helper.make_node("MatMul", ["input", "shared.weight"], ["a"], name="first/MatMul"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "shared.weight"], ["b"], name="second/MatMul"),
            helper.make_node("MatMul", ["b", "head.weight"], ["logits"], name="head/MatMul"),
        ],
        [_float("input", ["batch", 32])], [_float("logits", ["batch", 16])],
        [numpy_helper.from_array(w, "shared.weight"), numpy_helper.from_array(head, "head.weight")],
    )


def make_constant_weights(seed=6) -> onnx.ModelProto:
    """MLP whose weights live in Constant nodes, as some exporters write them."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((32, 48)) / 6).astype(np.float32)
    w1 = (rng.standard_normal((48, 10)) / 7).astype(np.float32)
    return _model(
        [
            helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(w0, "v0"), name="const0"),
            helper.make_node("MatMul", ["input", "w0"], ["h"], name="fc0/MatMul"),
            helper.make_node("Relu", ["h"], ["r"], name="relu0"),
            helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "v1"), name="const1"),
            helper.make_node("MatMul", ["r", "w1"], ["logits"], name="fc1/MatMul"),
        ],
        [_float("input", ["batch", 32])], [_float("logits", ["batch", 10])],
    )


def make_cnn(seed=7) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(transB=1): the Conv must stay float, the Gemm is quantized."""
    rng = np.random.default_rng(seed)
    conv_w = (rng.standard_normal((16, 2, 3, 3)) / 4).astype(np.float32)
    conv_b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    fc_w = (rng.standard_normal((10, 16 * 6 * 6)) / 24).astype(np.float32)
    fc_b = (rng.standard_normal(10) * 0.1).astype(np.float32)
    return _model(
        [
            helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv/Conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
            helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc/Gemm", transB=1),
        ],
        [_float("input", ["batch", 2, 6, 6])], [_float("logits", ["batch", 10])],
        [numpy_helper.from_array(a, n) for n, a in
         (("conv.weight", conv_w), ("conv.bias", conv_b), ("fc.weight", fc_w), ("fc.bias", fc_b))],
    )


def make_if(seed=8) -> onnx.ModelProto:
    """If whose then-branch owns its weight and whose else-branch reads an outer-scope weight."""
    rng = np.random.default_rng(seed)
    inner = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    outer = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["input", "inner.weight"], ["then_out"], name="fc_then")], "then", [],
        [_float("then_out", None)], [numpy_helper.from_array(inner, "inner.weight")])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["input", "outer.weight"], ["else_out"], name="fc_else")], "else", [],
        [_float("else_out", None)])
    return _model(
        [helper.make_node("If", ["cond"], ["logits"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        [_float("input", ["batch", 32]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_float("logits", ["batch", 32])],
        [numpy_helper.from_array(outer, "outer.weight")],
    )


# These tiny models are below the size where onnxruntime's integer kernels pay, so by default every layer
# would get the folded form (test_quantize_folded.py); tests of the integer form ask for it everywhere.
INTEGER_EVERYWHERE = ("--integer-min-macs", "0")


def quantize_cli(runner, model_path, *args, output=None, integer=True):
    """Run `onnxshrink quantize ... --json`; returns (result, report dict or None, output path)."""
    output = Path(output) if output else Path(model_path).with_name(Path(model_path).stem + ".q.onnx")
    result = invoke(runner, "quantize", model_path, "-o", output, "--json", *args, *(INTEGER_EVERYWHERE if integer else ()))
    report = json.loads(result.stdout) if result.stdout.strip() else None
    return result, report, output


def assert_valid(path):
    """Every written model passes the full ONNX checker and loads in onnxruntime."""
    onnx.checker.check_model(str(path), full_check=True)
    make_session(path)


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def integer_kernels(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if k in INTEGER_KERNELS)


def float_kernels(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if k in FLOAT_KERNELS)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(path, feed, optimize):
    return make_session(path, optimize=optimize).run(None, feed)[0]


def run_batched(path, x):
    """Logits in validate's batches: dynamic quantization picks its activation scale per run."""
    session = make_session(path)
    return np.concatenate([session.run(None, {"input": x[i : i + DEFAULT_BATCH]})[0] for i in range(0, len(x), DEFAULT_BATCH)])


def assert_close(reference, produced):
    """int8 output vs float output: mean row cosine > 0.999, and no row far off."""
    cos = row_cosines(reference, produced)
    assert cos.mean() > 0.999 and cos.min() > 0.995, (cos.mean(), cos.min())


def int8_layers(report) -> list[str]:
    return [layer["node"] for layer in report["passes"][0]["layers"] if layer["action"].startswith("int8")]


def folded_layers(report) -> dict[str, str]:
    return {layer["node"]: layer["reason"] for layer in report["passes"][0]["layers"]
            if layer["action"].startswith(FOLDED)}


def float_layers(report) -> dict[str, str]:
    return {layer["node"]: layer["reason"] for layer in report["passes"][0]["layers"] if layer["action"] == "kept float"}


# ---- the written graph ----------------------------------------------------------------


@pytest.mark.parametrize("use_gemm", [False, True], ids=["matmul_add", "gemm_transB"])
def test_written_graph_is_integer_form(tmp_path, runner, use_gemm):
    model = make_mlp(seed=1, use_gemm=use_gemm)
    source = save_model(model, tmp_path / "mlp.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    assert_valid(output)

    written = onnx.load(str(output))
    ops = op_counts(written)
    assert ops["DynamicQuantizeLinear"] == 3 and ops["MatMulInteger"] == 3
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0
    assert ops["Relu"] == 2
    assert len(int8_layers(report)) == 3 and not float_layers(report)

    inits = initializers(written)
    original = initializers(model)
    for node in (n for n in written.graph.node if n.op_type == "MatMulInteger"):
        weight = inits[node.input[1]]
        assert weight.data_type == TensorProto.INT8
        assert inits[node.input[3]].data_type == TensorProto.INT8  # weight zero point
    for i in range(3):
        assert f"fc{i}.weight" not in inits  # float weights are gone, not kept alongside
        assert inits[f"fc{i}.bias"].data_type == TensorProto.FLOAT  # biases stay float
        np.testing.assert_array_equal(numpy_helper.to_array(inits[f"fc{i}.bias"]), numpy_helper.to_array(original[f"fc{i}.bias"]))
    int8_bytes = sum(numpy_helper.to_array(t).nbytes for t in inits.values() if t.data_type == TensorProto.INT8)
    float_weight_bytes = sum(numpy_helper.to_array(original[f"fc{i}.weight"]).nbytes for i in range(3))
    assert int8_bytes < float_weight_bytes / 3


@pytest.mark.parametrize("use_gemm", [False, True], ids=["matmul_add", "gemm_transB"])
def test_int8_weights_dequantize_to_the_originals(use_gemm):
    model = make_mlp(seed=2, use_gemm=use_gemm)
    quantized, report = QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    assert report.changed
    inits = initializers(quantized)
    original = initializers(model)
    layers = [n for n in quantized.graph.node if n.op_type == "MatMulInteger"]
    assert len(layers) == 3
    for i, node in enumerate(layers):
        q = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
        dql = next(n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLinear" and n.output[0] == node.input[0])
        scale_mul = next(n for n in quantized.graph.node if n.op_type == "Mul" and dql.output[1] in n.input)
        scale = numpy_helper.to_array(inits[next(name for name in scale_mul.input if name in inits)])
        w = numpy_helper.to_array(original[f"fc{i}.weight"])
        w = w.T if use_gemm else w  # Gemm transB=1 stores [N, K]; the int8 weight is [K, N]
        assert q.shape == w.shape
        assert np.all(np.abs(q) <= 127)
        np.testing.assert_allclose((q - zero) * scale, w, rtol=0, atol=float(np.max(scale)) / 2 + 1e-7)


CONFIGS = {
    "per_channel_symmetric": [],
    "per_tensor": ["--per-tensor"],
    "asymmetric": ["--asymmetric"],
}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("use_gemm", [False, True], ids=["matmul_add", "gemm_transB"])
def test_numerics_close_to_float(tmp_path, runner, use_gemm, config):
    source = save_model(make_mlp(seed=3, use_gemm=use_gemm), tmp_path / "mlp.onnx")
    result, report, output = quantize_cli(runner, source, *CONFIGS[config], "--no-validate")
    assert result.exit_code == 0, result.output
    assert_valid(output)
    x = np.random.default_rng(4).standard_normal((64, 32)).astype(np.float32)
    reference = run(source, {"input": x}, optimize=False)
    # the graph as written (reference ops) and as onnxruntime runs it after fusion
    for optimize in (False, True):
        produced = run(output, {"input": x}, optimize=optimize)
        assert_close(reference, produced)
        assert np.abs(reference - produced).max() < 0.1 * np.abs(reference).max()
        assert np.mean(np.argmax(reference, -1) == np.argmax(produced, -1)) >= 0.9


# ---- what onnxruntime really runs -----------------------------------------------------


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("use_gemm", [False, True], ids=["matmul_add", "gemm_transB"])
def test_onnxruntime_runs_integer_kernels(tmp_path, runner, use_gemm, config, opset):
    source = save_model(make_mlp(seed=5, use_gemm=use_gemm, opset=opset), tmp_path / "mlp.onnx")
    assert float_kernels(optimized_op_counts(source)) == 3  # the float model runs 3 float kernels

    result, report, output = quantize_cli(runner, source, *CONFIGS[config], "--no-validate")
    assert result.exit_code == 0, result.output
    assert_valid(output)
    counts = optimized_op_counts(output)
    assert float_kernels(counts) == 0, counts
    assert integer_kernels(counts) == len(int8_layers(report)) == 3, counts
    assert counts["MatMulInteger"] == 0, counts  # fused, not left as the reference op
    assert report["runtime"]["all_quantized_layers_fused"] is True
    assert report["runtime"]["float_kernels"] == {}


def test_conv_runs_float_from_int8_storage(tmp_path, runner):
    # Behaviour changed: Conv was left float; ConvInteger is still slower, so it gets the folded form.
    source = save_model(make_cnn(), tmp_path / "cnn.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    assert not float_layers(report)
    assert list(folded_layers(report)) == ["conv/Conv"] and "ConvInteger" in folded_layers(report)["conv/Conv"]
    assert sorted(int8_layers(report)) == ["conv/Conv", "fc/Gemm"]

    written = onnx.load(str(output))
    conv = next(n for n in written.graph.node if n.op_type == "Conv")
    assert conv.input[1] not in initializers(written)  # decoded from int8 by Cast, Mul
    assert "conv.weight" not in initializers(written)
    assert report["runtime"]["folded_layers"] == 1 and report["runtime"]["folded_decoding_left"] == 0
    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 1
    # onnxruntime may run the float Conv as Conv, FusedConv or (AVX2 and up) nchwc.Conv
    assert sum(v for k, v in counts.items() if k.endswith("Conv")) == 1, counts
    assert counts["Gemm"] == 0 and counts["MatMul"] == 0
    assert sum(v for k, v in report["runtime"]["float_kernels"].items() if k.endswith("Conv")) == 1


@pytest.mark.parametrize(
    "args, kept",
    [
        (["--exclude", "fc1/*"], ["fc1/MatMul"]),
        (["--exclude", "fc0/*", "--exclude", "fc2/MatMul"], ["fc0/MatMul", "fc2/MatMul"]),
        (["--keep-float", "first"], ["fc0/MatMul"]),
        (["--keep-float", "last"], ["fc2/MatMul"]),
        (["--keep-float", "both"], ["fc0/MatMul", "fc2/MatMul"]),
    ],
    ids=["exclude", "exclude_twice", "keep_first", "keep_last", "keep_both"],
)
def test_excluded_and_kept_layers_stay_float(tmp_path, runner, args, kept):
    model = make_mlp(seed=6)
    source = save_model(model, tmp_path / "mlp.onnx")
    result, report, output = quantize_cli(runner, source, *args)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    assert sorted(float_layers(report)) == kept
    assert sorted(int8_layers(report)) == sorted(set(LAYERS) - set(kept))
    reason_word = "exclude" if args[0] == "--exclude" else "keep-float"
    assert all(reason_word in reason for reason in float_layers(report).values())

    written = onnx.load(str(output))
    inits = initializers(written)
    matmuls = {n.name: n for n in written.graph.node if n.op_type == "MatMul"}
    assert sorted(matmuls) == kept
    for name in kept:  # the float weight is still there, bit for bit
        weight = matmuls[name].input[1]
        np.testing.assert_array_equal(numpy_helper.to_array(inits[weight]), numpy_helper.to_array(initializers(model)[weight]))

    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 3 - len(kept)
    assert float_kernels(counts) == len(kept)


def test_tied_weight_is_quantized_once_and_shared(tmp_path, runner):
    source = save_model(make_tied(), tmp_path / "tied.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    layers = {layer["node"]: layer for layer in report["passes"][0]["layers"]}
    assert sorted(layers) == ["first/MatMul", "head/MatMul", "second/MatMul"]
    assert "shared" in layers["second/MatMul"]["action"]
    assert layers["second/MatMul"]["bytes_before"] == 0  # counted once, on the first use

    written = onnx.load(str(output))
    first = next(n for n in written.graph.node if n.op_type == "MatMulInteger" and n.name.startswith("first"))
    second = next(n for n in written.graph.node if n.op_type == "MatMulInteger" and n.name.startswith("second"))
    assert first.input[1] == second.input[1] and first.input[3] == second.input[3]
    int8_weights = [t for t in written.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 2  # shared + head, not three
    assert "shared.weight" not in initializers(written)

    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 3 and float_kernels(counts) == 0
    x = np.random.default_rng(9).standard_normal((16, 32)).astype(np.float32)
    assert_close(run(source, {"input": x}, False), run(output, {"input": x}, False))


def test_weights_in_constant_nodes_are_quantized(tmp_path, runner):
    source = save_model(make_constant_weights(), tmp_path / "const.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    assert sorted(int8_layers(report)) == ["fc0/MatMul", "fc1/MatMul"]
    assert any("Constant" in note for note in report["passes"][0]["notes"])

    written = onnx.load(str(output))
    assert op_counts(written)["Constant"] == 0 and op_counts(written)["MatMulInteger"] == 2
    for node in (n for n in written.graph.node if n.op_type == "MatMulInteger"):
        assert initializers(written)[node.input[1]].data_type == TensorProto.INT8
    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 2 and float_kernels(counts) == 0
    x = np.random.default_rng(10).standard_normal((16, 32)).astype(np.float32)
    assert_close(run(source, {"input": x}, False), run(output, {"input": x}, False))


def test_weights_inside_if_branches_are_quantized(tmp_path, runner):
    source = save_model(make_if(), tmp_path / "if.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    assert sorted(int8_layers(report)) == ["fc_else", "fc_then"]
    x = np.random.default_rng(11).standard_normal((8, 32)).astype(np.float32)
    for cond in (True, False):
        feed = {"input": x, "cond": np.array(cond)}
        for optimize in (False, True):
            assert_close(run(source, feed, False), run(output, feed, optimize))
    # kernels inside the branches count: both layers run as integer kernels
    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 2 and float_kernels(counts) == 0, counts
    assert report["runtime"]["all_quantized_layers_fused"] is True


def test_gemm_with_computed_bias_and_beta_stays_float(tmp_path, runner):
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    model = _model(
        [
            helper.make_node("Relu", ["bias_in"], ["bias"], name="relu"),
            helper.make_node("Gemm", ["input", "fc.weight", "bias"], ["logits"], name="fc/Gemm", beta=2.0),
        ],
        [_float("input", ["batch", 32]), _float("bias_in", [16])], [_float("logits", ["batch", 16])],
        [numpy_helper.from_array(w, "fc.weight")],
    )
    source = save_model(model, tmp_path / "gemm.onnx")
    result, report, output = quantize_cli(runner, source)
    assert result.exit_code == 0, result.output
    # Behaviour changed: no integer form, but the weight is still stored int8 (folded, float kernel).
    assert "beta" in folded_layers(report)["fc/Gemm"]
    assert_valid(output)
    x = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    bias = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    expected = x @ w + 2.0 * np.maximum(bias, 0)
    np.testing.assert_allclose(run(output, {"input": x, "bias_in": bias}, True), expected, atol=0.05)


def test_gemm_alpha_beta_and_no_transpose_are_exact_in_form(tmp_path):
    rng = np.random.default_rng(13)
    w = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    model = _model(
        [helper.make_node("Gemm", ["input", "fc.weight", "fc.bias"], ["logits"], name="fc/Gemm", alpha=0.5, beta=2.0)],
        [_float("input", ["batch", 32])], [_float("logits", ["batch", 16])],
        [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")],
    )
    quantized, _ = QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    path = save_model(quantized, tmp_path / "q.onnx")
    assert_valid(path)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    expected = 0.5 * (x @ w) + 2.0 * b
    assert_close(expected, run(path, {"input": x}, False))
    assert integer_kernels(optimized_op_counts(path)) == 1


# ---- idempotence, metadata, outputs ---------------------------------------------------


def test_quantizing_twice_changes_nothing_more(tmp_path, runner):
    source = save_model(make_mlp(seed=14, use_gemm=True), tmp_path / "mlp.onnx")
    result, _, first = quantize_cli(runner, source, output=tmp_path / "once.onnx")
    assert result.exit_code == 0, result.output
    result, report, second = quantize_cli(runner, first, output=tmp_path / "twice.onnx")
    assert result.exit_code == 0, result.output
    assert_valid(second)
    assert report["passes"][0]["changed"] is False
    assert int8_layers(report) == []
    assert any("already quantized" in note for note in report["passes"][0]["notes"])

    once, twice = onnx.load(str(first)), onnx.load(str(second))
    assert [(n.op_type, list(n.input), list(n.output)) for n in once.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in twice.graph.node]
    assert {k: numpy_helper.to_array(v).tobytes() for k, v in initializers(once).items()} == \
           {k: numpy_helper.to_array(v).tobytes() for k, v in initializers(twice).items()}
    x = np.random.default_rng(15).standard_normal((8, 32)).astype(np.float32)
    np.testing.assert_array_equal(run(first, {"input": x}, True), run(second, {"input": x}, True))


def test_metadata_records_version_and_options(mlp_path, tmp_path, runner):
    result, _, output = quantize_cli(runner, mlp_path, "--exclude", "fc1/*", "--per-tensor", "--seed", "3")
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert meta["onnxshrink.version"] == __version__
    assert meta["onnxshrink.command"] == "quantize"
    options = json.loads(meta["onnxshrink.options"])
    assert options["exclude"] == ["fc1/*"]
    assert options["per_channel"] is False and options["symmetric"] is True
    assert options["keep_float"] is None and options["seed"] == 3
    assert options["op_types"] == ["MatMul", "Gemm", "Conv"] and options["integer_min_macs"] == 0


def test_default_output_name(tmp_path, runner):
    source = save_model(make_mlp(seed=16), tmp_path / "model.onnx")
    result = invoke(runner, "quantize", source, "--no-validate", *INTEGER_EVERYWHERE)
    assert result.exit_code == 0, result.output
    output = tmp_path / "model.int8.onnx"
    assert output.is_file()
    assert_valid(output)
    assert op_counts(onnx.load(str(output)))["MatMulInteger"] == 3
    # a second run refuses to replace it without --force
    before = output.read_bytes()
    result = invoke(runner, "quantize", source, "--no-validate", *INTEGER_EVERYWHERE)
    assert result.exit_code == 5
    assert output.read_bytes() == before


def test_failing_threshold_writes_failed_file_and_keeps_output(mlp_path, tmp_path, runner):
    output = tmp_path / "out.onnx"
    output.write_bytes(b"previous result")

    result, report, _ = quantize_cli(runner, mlp_path, "--force", "--max-drift", "0", output=output)
    assert result.exit_code == 1
    assert output.read_bytes() == b"previous result"
    failed = tmp_path / "out.failed.onnx"
    assert failed.is_file()
    assert_valid(failed)
    assert report["output"] == str(failed)
    assert report["validation"]["passed"] is False
    assert report["validation"]["checks"][0]["name"] == "max_drift[logits]"

    fresh = tmp_path / "fresh.onnx"
    result, _, _ = quantize_cli(runner, mlp_path, "--min-cosine", "1.5", output=fresh)
    assert result.exit_code == 1
    assert not fresh.exists() and (tmp_path / "fresh.failed.onnx").is_file()
    assert not list(tmp_path.glob(".*"))  # no staging directories left behind


def test_quantize_int8_bounds():
    rng = np.random.default_rng(17)
    w = rng.standard_normal((40, 12)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel must not divide by zero

    q, scale, zero = quantize_int8(w, per_channel=True, symmetric=True)
    assert q.dtype == np.int8 and scale.shape == (12,) and zero.shape == (12,)
    assert np.all(zero == 0) and np.all(np.abs(q) <= 127)
    assert np.all(q[:, 3] == 0) and np.isfinite(scale).all()
    np.testing.assert_allclose(q * scale, w, atol=float(scale.max()) / 2 + 1e-7, rtol=0)
    np.testing.assert_array_equal(np.abs(q).max(axis=0)[[0, 1, 2, 4]], 127)  # the full range is used

    q, scale, zero = quantize_int8(w, per_channel=False, symmetric=True)
    assert np.ndim(scale) == 0 and np.ndim(zero) == 0
    np.testing.assert_allclose(q * scale, w, atol=float(scale) / 2 + 1e-7, rtol=0)

    q, scale, zero = quantize_int8(w, per_channel=True, symmetric=False)
    restored = (q.astype(np.float32) - zero.astype(np.float32)) * scale
    np.testing.assert_allclose(restored, w, atol=float(scale.max()) + 1e-7, rtol=0)


# ---- end to end on the trained sample models --------------------------------------------


@pytest.mark.parametrize("name, max_ratio", [("digits_mlp", 0.5), ("digits_cnn", 1.0)])
def test_sample_models_end_to_end(tmp_path, runner, name, max_ratio):
    source = SAMPLES / f"{name}.onnx"
    data = SAMPLES / f"{name}.eval.npz"
    output = tmp_path / f"{name}.int8.onnx"
    result, report, _ = quantize_cli(runner, source, "--data", data, "--labels", "labels",
                                     "--max-accuracy-drop", "0.01", output=output)
    assert result.exit_code == 0, result.output
    assert_valid(output)
    validation = report["validation"]
    assert validation["passed"] is True and validation["synthetic_inputs"] is False
    with np.load(data) as arrays:
        x, labels = arrays["input"], arrays["labels"]
    assert validation["samples"] == len(labels)
    accuracy = {}
    for key, path in (("original", source), ("candidate", output)):
        accuracy[key] = float(np.mean(np.argmax(run_batched(path, x), -1) == labels))
        assert validation["accuracy"][key] == pytest.approx(accuracy[key], abs=1e-12)
    assert accuracy["original"] - accuracy["candidate"] <= 0.01
    assert report["size"]["ratio"] == pytest.approx(output.stat().st_size / source.stat().st_size)
    assert report["size"]["ratio"] < max_ratio
    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == len(int8_layers(report)) - len(folded_layers(report)) > 0  # the Conv is folded
    assert counts["MatMul"] == 0 and counts["Gemm"] == 0


def test_min_weights_keeps_small_layers_float(tmp_path, runner):
    # make_mlp((32, 64, 48, 10)): layers of 2048, 3072 and 480 weights (the last is tiny anyway).
    source = save_model(make_mlp(), tmp_path / "m.onnx")
    result, report, output = quantize_cli(runner, source, "--min-weights", "3000")
    assert result.exit_code == 0, result.output
    assert int8_layers(report) == ["fc1/MatMul"]
    assert float_layers(report)["fc0/MatMul"] == "small layer (2048 weights < --min-weights 3000)"
    counts = optimized_op_counts(output)
    assert integer_kernels(counts) == 1
    wrong = invoke(runner, "quantize", source, "--mode", "weights", "--min-weights", "10", "-o", tmp_path / "w.onnx")
    assert wrong.exit_code == 2 and "--min-weights applies to --mode dynamic only" in wrong.stderr


# ---- layers whose input dynamic int8 would damage ----------------------------------------------


def make_outlier_layer(outlier: float, seed=11) -> onnx.ModelProto:
    """x -> Mul(gain) -> MatMul(W) -> y, 64 -> 128. With outlier > 1, channel 3 of the MatMul's input reaches
    `outlier` times the others whatever the input (as massive activations do in BERT-like models), and W's row 3 is
    that much smaller, so the channel carries no more of the output than any other: per-tensor uint8 rounding of
    the input, whose step the outlier sets, then rounds every other channel to zero."""
    rng = np.random.default_rng(seed)
    gain = np.ones(64, np.float32)
    w = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    gain[3], w[3] = outlier, w[3] / outlier
    return _model(
        [helper.make_node("Mul", ["input", "gain"], ["scaled"], name="gain/Mul"),
         helper.make_node("MatMul", ["scaled", "fc.weight"], ["output"], name="fc/MatMul")],
        [_float("input", ["batch", 64])], [_float("output", ["batch", 128])],
        [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w, "fc.weight")],
    )


def test_outlier_input_layer_is_folded_with_its_reason(tmp_path, runner):
    source = save_model(make_outlier_layer(outlier=1000.0), tmp_path / "outlier.onnx")
    result, report, output = quantize_cli(runner, source, "--no-validate")
    assert result.exit_code == 0, result.output
    reason = folded_layers(report)["fc/MatMul"]
    assert reason.startswith("input spans") and "dynamic int8 of the input would lose" in reason, reason
    lost = float(reason.split("would lose ")[1].split("%")[0])
    assert lost > 50  # most of the row is rounded to zero, far past the 33% bound
    assert any(n.startswith("activation check on synthetic") and "1 of 1 layer(s) folded" in n
               for n in report["passes"][0]["notes"]), report["passes"][0]["notes"]
    written = onnx.load(str(output))
    assert op_counts(written)["MatMulInteger"] == 0 and op_counts(written)["DynamicQuantizeLinear"] == 0
    # Folded, the layer keeps its output; in the integer form (the check off) it would not.
    integer, _ = QuantizeDynamic(QuantizeConfig(integer_min_macs=0, activation_error_bound=0))(make_outlier_layer(1000.0))
    assert op_counts(integer)["MatMulInteger"] == 1
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    reference = run(source, {"input": x}, True)
    folded = row_cosines(reference, run(output, {"input": x}, True)).mean()
    produced = run(save_model(integer, tmp_path / "integer.onnx"), {"input": x}, True)
    lost = np.nan_to_num(row_cosines(reference, produced)).mean() if np.abs(produced).max() > 0 else 0.0
    assert folded > 0.98 and lost < 0.9, (folded, lost)


def test_layer_without_outliers_keeps_its_integer_kernel(tmp_path, runner):
    source = save_model(make_outlier_layer(outlier=1.0), tmp_path / "plain.onnx")
    result, report, output = quantize_cli(runner, source, "--no-validate")
    assert result.exit_code == 0, result.output
    assert int8_layers(report) == ["fc/MatMul"] and not folded_layers(report)
    assert any("0 of 1 layer(s) folded" in n for n in report["passes"][0]["notes"])
    assert op_counts(onnx.load(str(output)))["MatMulInteger"] == 1


def test_row_error_matches_dynamic_quantize_linear_in_onnxruntime():
    """The check's Q is what onnxruntime's DynamicQuantizeLinear + dequantization compute."""
    from onnxshrink.passes.quantize import dynamic_quantize_linear, row_error

    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32) * 3 + 0.5
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "dql", [_float("x", [16, 64])], [_float("y", [16, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = make_session(model, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(dynamic_quantize_linear(x), expected, rtol=0, atol=1e-6)
    assert np.all(row_error(x, np.eye(64, dtype=np.float32)) < 0.05)  # a plain Gaussian input loses little


def test_activation_check_skipped_with_a_note_where_it_cannot_run(tmp_path, runner):
    # A model whose weights live in external data: not run a second time to measure.
    model = make_outlier_layer(outlier=1000.0)
    source = tmp_path / "external.onnx"
    onnx.save(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True, location="external.data",
              size_threshold=0)
    result, report, _ = quantize_cli(runner, source, "--no-validate")
    assert result.exit_code == 0, result.output
    assert any(n.startswith("activation check not run: the model keeps its weights in external data")
               for n in report["passes"][0]["notes"]), report["passes"][0]["notes"]
    assert int8_layers(report) == ["fc/MatMul"]  # as before the check existed

    # Inputs the original cannot run: the layer keeps the integer form, and the note says why.
    def broken(model, session):
        raise RuntimeError("no inputs today")

    _, pass_report = QuantizeDynamic(QuantizeConfig(integer_min_macs=0), inputs=broken)(make_outlier_layer(1000.0))
    assert any(n.startswith("activation check not run: the original did not run on the inputs (no inputs today)")
               for n in pass_report.notes), pass_report.notes
    assert [d.node for d in pass_report.layers if d.action.startswith("int8")] == ["fc/MatMul"]

    # Turned off: no measurement, no note.
    _, pass_report = QuantizeDynamic(QuantizeConfig(integer_min_macs=0, activation_error_bound=0),
                                     inputs=broken)(make_outlier_layer(1000.0))
    assert not any("activation check" in n for n in pass_report.notes)
