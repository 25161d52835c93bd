"""Odd but valid models (issue 18, items 7, 8, 10): IR 3 with Constant nodes, weights holding NaN/Inf, and opsets
older than the ops a pass writes. Every rewriting command exits 0 with a reason for what it left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import float_value, invoke, make_mlp, tree
from onnxshrink.model import prepare
from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.passes.common import NONFINITE, raise_opset
from onnxshrink.passes.factorize import Factorize, FactorizeConfig
from onnxshrink.passes.flush_denormals import FlushDenormals
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.prune_channels import PruneChannels
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig

RNG = np.random.default_rng(18)


def _run(model: onnx.ModelProto, feed: dict) -> list:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


# ---- item 7: IR 3 ------------------------------------------------------------------------------------------------

def ir3_model() -> onnx.ModelProto:
    """IR 3, opset 8: the first weight and the bias in Constant nodes, the second weight an initializer listed
    as a graph input, as IR 3 requires (onnxruntime runs it as a constant and refuses a feed for it)."""
    w0, w1 = RNG.standard_normal((32, 48)).astype(np.float32), RNG.standard_normal((48, 16)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(w0)),
             helper.make_node("Constant", [], ["b0"], value=numpy_helper.from_array(np.ones(48, np.float32))),
             helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="bias0"),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu"),
             helper.make_node("MatMul", ["r0", "w1"], ["y"], name="fc1")]
    graph = helper.make_graph(nodes, "ir3", [float_value("x", [4, 32]), float_value("w1", [48, 16])],
                              [float_value("y", [4, 16])], [numpy_helper.from_array(w1, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def test_prepare_lifts_ir3_to_ir4_and_keeps_the_callers_inputs():
    model = ir3_model()
    feed = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    before = _run(model, feed)
    assert prepare(model) == 2
    assert model.ir_version == 4 and [v.name for v in model.graph.input] == ["x"]
    onnx.checker.check_model(model, full_check=True)  # IR 3 refused the moved Constants: not graph inputs
    np.testing.assert_array_equal(_run(model, feed)[0], before[0])


IR3_COMMANDS = [
    ["quantize"], ["quantize", "--bits", "4"], ["quantize", "--mode", "weights", "--qdq"],
    ["quantize", "--calibration", "{calib}"], ["prune", "--sparsity", "0.5"], ["prune", "--pattern", "channel", "--sparsity", "0.5"],
    ["cluster", "--bits", "4"], ["factorize", "--rank-ratio", "0.25", "--allow-slower"], ["flush-denormals"],
]


@pytest.mark.parametrize("args", IR3_COMMANDS, ids=lambda a: " ".join(a).replace("{calib}", "calib.npz"))
def test_every_rewriting_command_on_an_ir3_model_with_constants(runner, tmp_path, args):
    source = tmp_path / "ir3.onnx"
    onnx.save(ir3_model(), str(source))
    feed = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **feed)
    before = tree(tmp_path)
    out = tmp_path / "out.onnx"
    args = [a.format(calib=tmp_path / "calib.npz") for a in args]
    result = invoke(runner, args[0], source, *args[1:], "-o", out, "--no-validate")
    assert result.exit_code == 0, result.output  # was 70: "written model fails the ONNX checker: w0 in initializer ..."
    assert tree(tmp_path)[source.name] == before[source.name]
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert written.ir_version >= 4 and {v.name for v in written.graph.input} == {"x"}
    assert _run(written, feed)[0].shape == (4, 16)


def test_sensitivity_on_an_ir3_model(runner, tmp_path):
    source = tmp_path / "ir3.onnx"
    onnx.save(ir3_model(), str(source))
    result = invoke(runner, "sensitivity", source, "--sparsities", "0.5", "--bits", "8")
    assert result.exit_code == 0, result.output


# ---- item 8: NaN and Inf weights ----------------------------------------------------------------------------------

def nan_mlp() -> onnx.ModelProto:
    """The tests' MLP with one NaN and one Inf in fc0's weight: fc0 must be left bit for bit, fc1 and fc2 processed."""
    model = make_mlp()
    tensor = next(t for t in model.graph.initializer if t.name == "fc0.weight")
    w = numpy_helper.to_array(tensor).copy()
    w[0, 0], w[1, 1] = np.nan, np.inf
    tensor.CopyFrom(numpy_helper.from_array(w, "fc0.weight"))
    return model


NAN_PASSES = {
    "quantize": lambda: QuantizeDynamic(QuantizeConfig()),
    "quantize (integer kernels)": lambda: QuantizeDynamic(QuantizeConfig(integer_min_macs=0)),
    "quantize --bits 4": lambda: QuantizeBlockwise(BlockwiseConfig(bits=4)),
    "quantize --mode weights": lambda: QuantizeWeightsOnly(WeightsOnlyConfig()),
    "quantize --mode weights --qdq": lambda: QuantizeWeightsOnly(WeightsOnlyConfig(qdq=True)),
    "prune": lambda: Prune(PruneConfig(sparsity=0.5)),
    "prune --pattern 2:4": lambda: Prune(PruneConfig(pattern="2:4")),
    "prune --pattern channel": lambda: PruneChannels(PruneConfig(sparsity=0.5, pattern="channel")),
    "cluster": lambda: Cluster(ClusterConfig(bits=4)),
    "factorize": lambda: Factorize(FactorizeConfig(rank_ratio=0.25, check_latency=False)),
}


@pytest.mark.parametrize("label", NAN_PASSES)
def test_a_weight_with_nan_and_inf_is_left_as_it_is_with_the_reason(label):
    model = nan_mlp()
    result, report = NAN_PASSES[label]()(model)
    decisions = {d.node: d for d in report.layers}
    assert decisions["fc0/MatMul"].reason == NONFINITE and decisions["fc0/MatMul"].action.startswith("kept")
    fc0 = next(n for n in result.graph.node if n.name == "fc0/MatMul")
    assert fc0.input[1] == "fc0.weight"
    kept = next(t for t in result.graph.initializer if t.name == "fc0.weight")
    original = next(t for t in model.graph.initializer if t.name == "fc0.weight")
    assert kept.SerializeToString() == original.SerializeToString()  # bit for bit
    others = [d for name, d in decisions.items() if name != "fc0/MatMul" and not d.action.startswith("kept")]
    assert others, report.layers  # the finite layers were processed (fc2 feeds the output: no channel pruning)


def test_nan_weights_reason_through_the_cli(runner, tmp_path):
    source = tmp_path / "nan.onnx"
    onnx.save(nan_mlp(), str(source))
    result = invoke(runner, "quantize", source, "-o", tmp_path / "q.onnx", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    assert NONFINITE in result.stdout
    kept = {t.name: t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}["fc0.weight"]
    assert np.isnan(numpy_helper.to_array(kept)[0, 0]) and np.isinf(numpy_helper.to_array(kept)[1, 1])


def test_flush_denormals_leaves_a_nan_weight_alone():
    model = nan_mlp()
    tensor = next(t for t in model.graph.initializer if t.name == "fc0.weight")
    w = numpy_helper.to_array(tensor).copy()
    w[2, 2] = 1e-40
    tensor.CopyFrom(numpy_helper.from_array(w, "fc0.weight"))
    result, report = FlushDenormals()(model)
    assert [(d.node, d.reason) for d in report.layers] == [("fc0.weight", NONFINITE)] and not report.changed
    assert result.graph.initializer[0].SerializeToString() == model.graph.initializer[0].SerializeToString()


# ---- item 10: opsets older than what a pass writes ----------------------------------------------------------------

def conv_opset6() -> tuple[onnx.ModelProto, dict]:
    """Conv + Relu at opset 6, which onnxruntime runs; a broadcasting Mul (the folded int8 decoding) needs 7."""
    w = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [float_value("x", [1, 8, 12, 12])], [float_value("y", [1, 16, 12, 12])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(16, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 4
    onnx.checker.check_model(model, full_check=True)
    return model, {"x": RNG.standard_normal((1, 8, 12, 12)).astype(np.float32)}


def clip_opset9() -> onnx.ModelProto:
    """An opset-9 MLP with a Clip whose bounds are attributes: Clip-11 takes them as inputs, so 9 -> 11 is unsafe."""
    model = make_mlp(opset=9)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.CopyFrom(helper.make_node("Clip", list(relu.input), list(relu.output), name="clip", min=0.0, max=6.0))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset6_conv_quantize_raises_the_opset_where_nothing_changes_meaning(runner, tmp_path):
    model, feed = conv_opset6()
    source = tmp_path / "conv6.onnx"
    onnx.save(model, str(source))
    result = invoke(runner, "quantize", source, "-o", tmp_path / "q.onnx", "--no-validate", "--json")
    assert result.exit_code == 0, result.output  # was 4: "onnxruntime cannot load the model: ... Mul(6) ..."
    assert "opset 6 -> 7: the int8 decoding (Cast, broadcasting Mul) needs it" in result.stdout
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert written.opset_import[0].version == 7  # Conv and Relu are the same ops at 6 and 7
    assert any(t.data_type == TensorProto.INT8 for t in written.graph.initializer)
    a, b = _run(written, feed)[0].ravel(), _run(model, feed)[0].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_an_opset_too_old_keeps_layers_float_with_the_reason(runner, tmp_path):
    model, _ = conv_opset6()
    result, report = QuantizeWeightsOnly(WeightsOnlyConfig(qdq=True))(model)
    reason = report.layers[0].reason
    assert report.layers[0].action == "kept float" and not report.changed
    assert reason.startswith("per-axis DequantizeLinear needs opset 13; the model has opset 6") and "Conv" in reason
    assert result.opset_import[0].version == 6 and result.graph == model.graph
    source = tmp_path / "conv6.onnx"
    onnx.save(model, str(source))
    cli = invoke(runner, "quantize", source, "--mode", "weights", "--qdq", "-o", tmp_path / "q.onnx", "--no-validate")
    assert cli.exit_code == 0, cli.output


def test_integer_form_falls_back_to_folded_when_the_opset_cannot_be_raised():
    model = clip_opset9()
    result, report = QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    assert {d.action for d in report.layers} == {"int8 folded (float kernel)"}
    assert all("DynamicQuantizeLinear (the integer form) needs opset 11; the model has opset 9" in d.reason
               and "Clip" in d.reason for d in report.layers)
    assert result.opset_import[0].version == 9
    onnx.checker.check_model(result, full_check=True)
    x = {"input": RNG.standard_normal((2, 32)).astype(np.float32)}
    a, b = _run(result, x)[0].ravel(), _run(model, x)[0].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_raise_opset_refuses_when_an_op_changes_meaning():
    model = clip_opset9()
    assert raise_opset(model, 11, "X").endswith("raising it would change the meaning of its Clip node(s)")
    assert model.opset_import[0].version == 9
    assert raise_opset(model, 10, "X") is None and model.opset_import[0].version == 10  # Clip, MatMul, Add: same at 10
