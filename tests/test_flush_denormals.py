"""flush-denormals: denormal fp32 weights become zero, nothing else changes, and inspect counts them first."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, invoke, save_model, tree
from onnxshrink.info import inspect_model
from onnxshrink.passes.flush_denormals import FlushDenormals

TINY32 = np.finfo(np.float32).tiny


def model_with_denormals() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    w[0, :4] = [TINY32 / 4, -TINY32 / 1000, 0.0, -0.0]  # two denormals, then +0 and -0
    half = rng.standard_normal(16).astype(np.float16)
    half[3] = np.float16(3e-6)  # an fp16 denormal: it matters once cast to fp32, so it stays
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((16, 16), TINY32 / 8, np.float32), "c")),
         helper.make_node("MatMul", ["x", "c"], ["then_out"])], "then", [], [float_value("then_out", [2, 16])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"])], "else", [], [float_value("else_out", [2, 16])])
    return build_model(
        [helper.make_node("MatMul", ["x", "W"], ["a"]),
         helper.make_node("Cast", ["H"], ["h32"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "h32"], ["b"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other),
         helper.make_node("Add", ["b", "y"], ["out"])],
        [float_value("x", [2, 16]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [float_value("out", [2, 16])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(half, "H")])


def test_denormals_become_zero_and_nothing_else_changes():
    model = model_with_denormals()
    result, report = FlushDenormals()(model)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    w0, w1 = before["W"], after["W"]
    assert w1[0, 0] == 0 and w1[0, 1] == 0
    assert np.signbit(w1[0, 3]) and w1[0, 3] == 0  # -0.0 is not a denormal: kept bit for bit
    assert np.array_equal(w0[:, 4:].view(np.uint32), w1[:, 4:].view(np.uint32))
    assert np.array_equal(before["H"].view(np.uint16), after["H"].view(np.uint16))
    body = next(a.g for a in result.graph.node[3].attribute if a.name == "then_branch")
    constant = numpy_helper.to_array(next(t for t in body.initializer if t.name == "c"))
    assert not np.any(constant)  # the If body's Constant node, moved to an initializer and flushed
    assert report.changed and sum(int(d.action.split()[1]) for d in report.layers) == 2 + 256
    onnx.checker.check_model(result, full_check=True)
    assert model.graph.initializer[0].raw_data != result.graph.initializer[0].raw_data  # the input is untouched


def test_running_twice_changes_nothing_more():
    once, _ = FlushDenormals()(model_with_denormals())
    twice, report = FlushDenormals()(once)
    assert not report.changed and report.notes == ["no denormal weights: nothing to do"]
    assert [t.raw_data for t in twice.graph.initializer] == [t.raw_data for t in once.graph.initializer]


def test_inspect_counts_them_and_the_cli_flushes_with_the_same_outputs(runner, tmp_path):
    source = save_model(model_with_denormals(), tmp_path / "m.onnx")
    assert inspect_model(source).totals["denormal_weights"] == 2  # Constant-node tensors are not initializers
    result = invoke(runner, "inspect", source)
    assert "denormal" in result.output and "flush-denormals" in result.output
    before = tree(tmp_path)
    result = invoke(runner, "flush-denormals", source, "--json", "--max-drift", "1e-6")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"].endswith("m.ftz.onnx") and report["validation"]["passed"]
    assert inspect_model(tmp_path / "m.ftz.onnx").totals["denormal_weights"] == 0
    assert tree(tmp_path)["m.onnx"] == before["m.onnx"]
