"""SmoothQuant before static int8 (passes/smooth_quant.py, algorithms/smoothing.py), and the static pass's
transformer fixes: MatMul outputs left float (MatMulIntegerToFloat), and the rows of a MatMul after a computed
Reshape counted from a real run.

Tiny graphs with the shape of a transformer block: a LayerNorm whose γ holds an outlier channel (what MiniLM's
norms look like), read by MatMuls and by a residual Add.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import build_model, float_value
from onnxshrink.algorithms.smoothing import (fake_quant_activation, fake_quant_weight, quantized_error, search_alpha,
                                             smoothing_scales)
from onnxshrink.data import Dataset
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.passes.smooth_quant import SmoothQuant
from onnxshrink.runtime import make_session, optimized_op_counts

WIDTH, HIDDEN, SEQ = 16, 32, 8


def dataset(x, batch=16) -> Dataset:
    return Dataset([{"input": x[i:i + batch]} for i in range(0, len(x), batch)], None, len(x), False, [])


def tokens(n=48, seed=1, outlier=None):
    x = np.random.default_rng(seed).standard_normal((n, SEQ, WIDTH)).astype(np.float32)
    if outlier is not None:
        x[..., outlier] *= 40.0
    return x


def block(seed=0, shared_gamma=False) -> onnx.ModelProto:
    """LayerNorm (γ[3] = 30) -> MatMul q, MatMul k (+ bias) -> Add -> Mul 0.5 -> MatMul out; Add(out, norm) residual."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(WIDTH, np.float32)
    gamma[3] = 30.0
    weights = {"wq": (WIDTH, HIDDEN), "wk": (WIDTH, HIDDEN), "wo": (HIDDEN, WIDTH)}
    inits = [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
             for name, shape in weights.items()]
    inits += [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.full(WIDTH, 0.1, np.float32), "beta"),
              numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), "bk"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("LayerNormalization", ["input", "gamma", "beta"], ["ln"], name="norm", axis=-1),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q/MatMul"),
             helper.make_node("MatMul", ["ln", "wk"], ["k0"], name="k/MatMul"),
             helper.make_node("Add", ["k0", "bk"], ["k"], name="k/Add"),
             helper.make_node("Add", ["q", "k"], ["h"], name="mix"),
             helper.make_node("Mul", ["h", "half"], ["g"], name="act/Mul"),
             helper.make_node("MatMul", ["g", "wo"], ["o"], name="out/MatMul"),
             helper.make_node("Add", ["o", "ln"], ["output"], name="residual")]
    if shared_gamma:  # a second norm reading the same γ: dividing γ would change it too
        nodes.append(helper.make_node("LayerNormalization", ["input", "gamma"], ["ln2"], name="norm2", axis=-1))
    outputs = [float_value("output", ["batch", SEQ, WIDTH])] + ([float_value("ln2", ["batch", SEQ, WIDTH])]
                                                                 if shared_gamma else [])
    return build_model(nodes, [float_value("input", ["batch", SEQ, WIDTH])], outputs, inits)


def run(model, x, optimize=False):
    return make_session(model, optimize=optimize).run(None, {"input": x})


def inits(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def cosine(a, b) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


# ---- numerics on plain arrays ----------------------------------------------------------------


def test_scales_follow_the_formula_and_leave_dead_channels_alone():
    x_max = np.array([4.0, 1.0, 0.0, 9.0])
    w_max = np.array([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(x_max, w_max, 0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0], rtol=1e-6)
    assert smoothing_scales(np.array([1e9]), np.array([1e-9]), 0.5)[0] == 1e3  # clipped


def test_fake_quantization_matches_the_int8_grid():
    w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    q = fake_quant_weight(w)
    assert np.allclose(q[:, 0] / (1.0 / 127), np.rint(q[:, 0] / (1.0 / 127)), atol=1e-4)
    x = np.linspace(-1.0, 3.0, 50, dtype=np.float32)
    assert np.abs(fake_quant_activation(x) - x).max() <= 4.0 / 255 / 2 + 1e-6
    assert np.all(fake_quant_activation(np.zeros(4, np.float32)) == 0)


def test_alpha_search_moves_an_outlier_channel_into_the_weights():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] *= 50.0
    w = rng.standard_normal((32, 24)).astype(np.float32)
    found = search_alpha(x, [w])
    assert found.alpha is not None and found.error < found.baseline / 4
    assert found.scales[5] == found.scales.max() > 1.0
    assert abs(found.baseline - quantized_error(x, [w], np.ones(32, np.float32))) < 1e-12
    assert set(found.errors) == {0.3, 0.4, 0.5, 0.6, 0.7, 0.8}


# ---- the pass ----------------------------------------------------------------------------------


def test_norm_takes_the_scale_and_residual_reads_it_back_exactly():
    model, x = block(), tokens()
    smoothed, report = SmoothQuant(calibration=dataset(x))(model)
    before, after = inits(model), inits(smoothed)
    assert report.changed
    s = before["gamma"] / after["gamma"]
    assert s[3] == s.max() > 1.0  # the outlier channel shrinks most
    np.testing.assert_allclose(after["beta"], before["beta"] / s, rtol=1e-5)
    for name in ("wq", "wk"):  # both readers of the norm get the same s
        np.testing.assert_allclose(after[name], before[name] * s[:, None], rtol=1e-5)
    residual = next(n for n in smoothed.graph.node if n.name == "residual")
    restore = next(n for n in smoothed.graph.node if n.output[0] == residual.input[1])
    assert restore.op_type == "Mul" and restore.input[0] == "ln"
    np.testing.assert_allclose(run(smoothed, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-4)
    assert model.graph.node[0].op_type == "LayerNormalization" and len(model.graph.node) == 8  # input untouched


def test_activation_without_a_norm_gets_a_mul_only_where_it_pays():
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((WIDTH, HIDDEN)) / 4).astype(np.float32), "w")
    model = build_model([helper.make_node("MatMul", ["input", "w"], ["output"], name="mm")],
                        [float_value("input", ["batch", SEQ, WIDTH])], [float_value("output", ["batch", SEQ, HIDDEN])], [w])
    x = tokens(outlier=2)
    smoothed, report = SmoothQuant(calibration=dataset(x))(model)
    mul = next(n for n in smoothed.graph.node if n.op_type == "Mul")
    matmul = next(n for n in smoothed.graph.node if n.op_type == "MatMul")
    assert mul.input[0] == "input" and matmul.input[0] == mul.output[0]
    np.testing.assert_allclose(run(smoothed, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-4)
    # Without outliers smoothing gains too little to pay for the Mul: the model is left as it is.
    plain, report = SmoothQuant(calibration=dataset(tokens()))(model)
    assert not report.changed and [n.op_type for n in plain.graph.node] == ["MatMul"]
    assert any("left as it is" in note for note in report.notes)


def test_shared_gamma_is_not_divided():
    model, x = block(shared_gamma=True), tokens()
    smoothed, _ = SmoothQuant(calibration=dataset(x))(model)
    np.testing.assert_array_equal(inits(smoothed)["gamma"], inits(model)["gamma"])
    for got, want in zip(run(smoothed, x), run(model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_static_quantization_with_smoothing_is_closer_to_fp32():
    model, x = block(), tokens(n=64)
    held = tokens(n=32, seed=7)
    reference = run(model, held)[0]
    errors = {}
    for smooth in (False, True):
        config = StaticQuantizeConfig(smooth=smooth, integer_min_macs=0)
        result, report = QuantizeStatic(config, dataset(x))(model)
        counts = optimized_op_counts(result)
        assert counts["com.microsoft.MatMulIntegerToFloat"] == 3, counts  # every layer an integer kernel
        assert not counts["MatMul"] and not counts["QLinearMatMul"]  # outputs stay float
        errors[smooth] = 1.0 - cosine(reference, run(result, held, optimize=True)[0])
        # The residual reads the norm's float output (through the restoring Mul when smoothed), not its uint8 copy.
        producers = {o: n for n in result.graph.node for o in n.output}
        residual = next(n for n in result.graph.node if n.name == "residual")
        source = producers[residual.input[1]]
        if smooth:
            assert source.op_type == "Mul"
            source = producers[source.input[0]]
        assert source.op_type == "LayerNormalization", source
        assert any(note.startswith("smooth-quant") for note in report.notes) == smooth
    assert errors[True] < errors[False] / 2, errors


# ---- the static pass's transformer fixes --------------------------------------------------------


def test_matmul_whose_float_output_onnxruntime_does_not_fuse_gets_a_quantized_one():
    """With static shapes onnxruntime turns MatMul + Add into a Gemm before its QDQ fusions, and that Gemm would
    stay float: the layer is written again with a uint8 output (QLinearMatMul) rather than left float."""
    rng = np.random.default_rng(5)
    model = build_model(
        [helper.make_node("MatMul", ["input", "w"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b"], ["output"], name="add")],
        [float_value("input", [4, SEQ, WIDTH])], [float_value("output", [4, SEQ, HIDDEN])],
        [numpy_helper.from_array((rng.standard_normal((WIDTH, HIDDEN)) / 4).astype(np.float32), "w"),
         numpy_helper.from_array(np.full(HIDDEN, 0.1, np.float32), "b")])
    x = tokens(n=16)
    result, report = QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0), dataset(x, batch=4))(model)
    assert [d.action for d in report.layers] == ["int8 static QDQ per-channel"]
    counts = optimized_op_counts(result)
    assert counts["QLinearMatMul"] == 1 and not counts["Gemm"] and not counts["MatMul"], counts
    assert cosine(run(model, x[:4])[0], run(result, x[:4], optimize=True)[0]) > 0.999


def test_rows_after_a_computed_reshape_are_counted_from_a_run():
    """Shape inference cannot see through Reshape(x, Concat(Shape(x)...)): the layer's 8 rows per sample would count
    as 1, and a layer big enough for an integer kernel would get the float one."""
    rng = np.random.default_rng(6)
    model = build_model(
        [helper.make_node("Shape", ["input"], ["shape"], name="shape"),
         helper.make_node("Slice", ["shape", "zero", "two"], ["lead"], name="lead"),
         helper.make_node("Concat", ["lead", "minus"], ["target"], name="target", axis=0),
         helper.make_node("Reshape", ["input", "target"], ["r"], name="reshape"),
         helper.make_node("MatMul", ["r", "w"], ["output"], name="mm")],
        [float_value("input", ["batch", "seq", WIDTH])], [float_value("output", ["batch", "seq", HIDDEN])],
        [numpy_helper.from_array((rng.standard_normal((WIDTH, HIDDEN)) / 4).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([2], np.int64), "two"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus")])
    weights = WIDTH * HIDDEN
    # Between one row's and eight rows' multiply-adds: integer only when the rows are known.
    config = StaticQuantizeConfig(integer_min_macs=4 * weights)
    result, report = QuantizeStatic(config, dataset(tokens(n=16)))(model)
    assert [d.action for d in report.layers] == ["int8 static QDQ per-channel"], report.layers
    assert Counter(n.op_type for n in result.graph.node)["QuantizeLinear"] == 1


def test_cli_smooths_by_default_and_no_smooth_turns_it_off(runner, tmp_path):
    import json

    from conftest import invoke, save_model

    source = save_model(block(), tmp_path / "block.onnx")
    np.savez(tmp_path / "cal.npz", input=tokens(n=32))
    notes = {}
    for flag in ((), ("--no-smooth",)):
        result = invoke(runner, "quantize", source, "--calibration", tmp_path / "cal.npz", "--integer-min-macs", "0",
                        "-o", tmp_path / "q.onnx", "--force", "--no-validate", "--json", *flag)
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        notes[flag] = [n for p in document["passes"] for n in p["notes"] if n.startswith("smooth-quant")]
    assert notes[()] and not notes[("--no-smooth",)]
