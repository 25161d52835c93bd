"""Folding BatchNormalization into the Conv before it (run before static quantization)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import save_model
from onnxshrink.data import load_npz, input_specs
from onnxshrink.passes.fold_batchnorm import fold_batchnorm
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.runtime import make_session, optimized_op_counts


def conv_bn_model(bias=True, shared_second_use=False, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c = 16
    inits = [numpy_helper.from_array(rng.standard_normal((c, 8, 3, 3)).astype(np.float32) * 0.2, "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.1, 3, c).astype(np.float32), "var")]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn", epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 8, 8])]
    if shared_second_use:  # the Conv output is read twice: folding would change the second reader
        nodes.append(helper.make_node("Identity", ["c"], ["c_copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("c_copy", TensorProto.FLOAT, ["n", c, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model, x):
    return make_session(model, optimize=False).run(None, {"x": x})


def test_fold_is_exact_and_removes_batchnorm():
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 8)).astype(np.float32)
    for bias in (True, False):
        model = conv_bn_model(bias)
        expected = run(model, x)[0]
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
        assert fold_batchnorm(folded) == 1
        ops = Counter(n.op_type for n in folded.graph.node)
        assert ops == {"Conv": 1, "Relu": 1}
        onnx.checker.check_model(folded, full_check=True)
        np.testing.assert_allclose(run(folded, x)[0], expected, rtol=1e-4, atol=1e-4)
        assert fold_batchnorm(folded) == 0  # twice changes nothing more


def test_conv_output_read_twice_is_not_folded():
    model = conv_bn_model(shared_second_use=True)
    assert fold_batchnorm(model) == 0
    assert Counter(n.op_type for n in model.graph.node)["BatchNormalization"] == 1


def test_static_quantization_of_conv_bn_runs_qlinearconv_without_batchnorm(tmp_path):
    model = conv_bn_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((16, 8, 8, 8)).astype(np.float32))
    quantized, report = QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0), load_npz(calib, input_specs(model)))(model)
    assert "folded 1 BatchNormalization node(s) into the Conv before them" in report.notes
    path = save_model(quantized, tmp_path / "q.onnx")
    counts = optimized_op_counts(path)
    assert counts.get("QLinearConv", 0) + counts.get("com.microsoft.QLinearConv", 0) == 1
    assert "BatchNormalization" not in counts
