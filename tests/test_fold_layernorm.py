"""Folding a LayerNormalization's scale and shift into the MatMuls that read it (compress does it first)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import SAMPLES, build_model, float_value
from onnxshrink.passes.fold_layernorm import fold_layernorm
from onnxshrink.runtime import make_session


def norm_model(readers="matmuls", bias=True, beta=True, seed=0) -> onnx.ModelProto:
    """LayerNorm -> two MatMuls (+ bias Adds), or with `readers` "residual" also read by an Add, or "shared" with the
    two MatMuls sharing one weight."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")]
    norm_inputs = ["x", "gamma"]
    if beta:
        inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta"))
        norm_inputs.append("beta")
    second = "w1" if readers == "shared" else "w2"
    nodes = [helper.make_node("LayerNormalization", norm_inputs, ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["m1"], name="fc1"),
             helper.make_node("MatMul", ["n", second], ["m2"], name="fc2")]
    if bias:
        inits += [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), name) for name in ("b1", "b2")]
        nodes += [helper.make_node("Add", ["m1", "b1"], ["y1"], name="add1"),
                  helper.make_node("Add", ["b2", "m2"], ["y2"], name="add2")]  # the bias may come first
    else:
        nodes += [helper.make_node("Identity", ["m1"], ["y1"]), helper.make_node("Identity", ["m2"], ["y2"])]
    outputs = [float_value("y1", ["n", 4, 8]), float_value("y2", ["n", 4, 8])]
    if readers == "residual":
        nodes.append(helper.make_node("Add", ["n", "x"], ["r"], name="residual"))
        outputs.append(float_value("r", ["n", 4, 16]))
    return build_model(nodes, [float_value("x", ["n", 4, 16])], outputs, inits)


def run(model, x):
    return make_session(model, optimize=False).run(None, {"x": x})


def test_scale_and_shift_go_into_the_weights_and_biases_exactly():
    model = norm_model()
    x = np.random.default_rng(1).standard_normal((3, 4, 16)).astype(np.float32)
    reference = run(model, x)
    assert fold_layernorm(model) == 1
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.all(inits["gamma"] == 1) and "beta" not in inits
    assert list(model.graph.node[0].input) == ["x", "gamma"]
    for got, want in zip(run(model, x), reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fold_layernorm(model) == 0  # folded already: nothing more


@pytest.mark.parametrize("readers, bias, beta, why", [
    ("residual", True, True, "the norm's output also feeds a residual Add, which needs the scaled values"),
    ("shared", True, True, "the two MatMuls share one weight"),
    ("matmuls", False, True, "no bias Add to take the shift"),
])
def test_left_alone_when_a_reader_cannot_take_the_scale_or_the_shift(readers, bias, beta, why):
    model = norm_model(readers, bias, beta)
    before = model.SerializeToString()
    assert fold_layernorm(model) == 0, why
    assert model.SerializeToString() == before


def test_without_shift_the_scale_folds_even_with_no_bias():
    model = norm_model("matmuls", bias=False, beta=False)
    x = np.random.default_rng(2).standard_normal((2, 4, 16)).astype(np.float32)
    reference = run(model, x)
    assert fold_layernorm(model) == 1
    for got, want in zip(run(model, x), reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sample_transformer_every_norm_folds_and_outputs_stay():
    model = onnx.load(str(SAMPLES / "digits_transformer.onnx"))
    x = np.load(SAMPLES / "digits_transformer.eval.npz")["input"]
    reference = make_session(model).run(None, {"input": x})[0]
    assert fold_layernorm(model) == sum(n.op_type == "LayerNormalization" for n in model.graph.node) == 5
    got = make_session(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got.argmax(-1), reference.argmax(-1))
