"""Tensor classification (onnxshrink.weights) and `onnxshrink inspect`.

Every model is built here with a seeded generator; expected values are computed
from the numpy arrays that went into the model, never copied from a run.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import float_value as _float, build_model as _model, invoke, save_model
from onnxshrink.weights import TINY_BYTES, find_tensors




def _records(model):
    return {r.name: r for r in find_tensors(model)}


def zoo_arrays(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "mm.weight": rng.standard_normal((32, 64)).astype(np.float32),       # 8 KiB MatMul weight
        "add.bias": rng.standard_normal(64).astype(np.float32),              # Add operand
        "gemm.weight": rng.standard_normal((16, 64)).astype(np.float32),     # 4 KiB Gemm weight (transB)
        "gemm.bias": rng.standard_normal(16).astype(np.float32),
        "reshape.shape": np.array([-1, 16], dtype=np.int64),
        "tiny.weight": rng.standard_normal((16, 8)).astype(np.float32),      # 512 B
        "q.weight": rng.integers(-127, 128, (8, 128)).astype(np.int8),       # 1 KiB, already int8
        "q.scale": (rng.random(128) * 0.01 + 0.001).astype(np.float32),
        "q.zero_point": np.zeros(128, dtype=np.int8),
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),  # 1152 B
        "conv.bias": rng.standard_normal(8).astype(np.float32),
    }


def make_zoo(seed=0) -> onnx.ModelProto:
    """One model with every kind of constant tensor the classifier must tell apart."""
    arrays = zoo_arrays(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "mm.weight"], ["mm"], name="mm/MatMul"),
        helper.make_node("Add", ["mm", "add.bias"], ["h"], name="mm/Add"),
        helper.make_node("Gemm", ["h", "gemm.weight", "gemm.bias"], ["g"], name="gemm/Gemm", transB=1),
        helper.make_node("Reshape", ["g", "reshape.shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "tiny.weight"], ["t"], name="tiny/MatMul"),
        helper.make_node("DequantizeLinear", ["q.weight", "q.scale", "q.zero_point"], ["q.deq"], name="q/DequantizeLinear", axis=1),
        helper.make_node("MatMul", ["t", "q.deq"], ["y"], name="q/MatMul"),
        helper.make_node("Conv", ["img", "conv.weight", "conv.bias"], ["c"], name="conv/Conv", pads=[1, 1, 1, 1]),
    ]
    return _model(
        nodes,
        [_float("x", ["batch", 32]), _float("img", ["batch", 4, 6, 6])],
        [_float("y", ["batch", 128]), _float("c", ["batch", 8, 6, 6])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )


def test_zoo_classification():
    records = _records(make_zoo())
    arrays = zoo_arrays()
    assert set(records) == set(arrays)

    for name in ("mm.weight", "gemm.weight", "conv.weight"):
        assert records[name].compressible, (name, records[name].reason)
        assert records[name].reason == "weight"
    expected_reasons = {
        "add.bias": "not a weight input",  # elementwise Add operand, whatever its size
        "gemm.bias": "bias",
        "conv.bias": "bias",
        "reshape.shape": "shape",
        "tiny.weight": "tiny",
        "q.weight": "already quantized",
        "q.scale": "quantization scale",
    }
    for name, reason in expected_reasons.items():
        assert not records[name].compressible, name
        assert reason in records[name].reason, (name, records[name].reason)
    assert not records["q.zero_point"].compressible

    for name, array in arrays.items():
        assert records[name].nbytes == array.nbytes, name
        assert records[name].shape == list(array.shape), name
        assert records[name].location == "initializer"
    assert records["reshape.shape"].dtype == "int64"
    assert records["q.weight"].dtype == "int8"

    consumers = {name: [(c.node, c.op_type, c.input_index, c.role) for c in r.consumers] for name, r in records.items()}
    assert consumers["mm.weight"] == [("mm/MatMul", "MatMul", 1, "weight")]
    assert consumers["gemm.bias"] == [("gemm/Gemm", "Gemm", 2, "bias")]
    assert consumers["q.weight"] == [("q/DequantizeLinear", "DequantizeLinear", 0, "quantized")]
    assert consumers["q.scale"] == [("q/DequantizeLinear", "DequantizeLinear", 1, "scale")]


@pytest.mark.parametrize("rows, compressible", [(16, True), (15, False)])
def test_tiny_threshold_is_one_kib(rows, compressible):
    w = np.random.default_rng(1).standard_normal((rows, 16)).astype(np.float32)
    assert (w.nbytes >= TINY_BYTES) == compressible
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_float("x", ["b", rows])], [_float("y", ["b", 16])], [numpy_helper.from_array(w, "w")])
    record = _records(model)["w"]
    assert record.compressible is compressible
    assert ("tiny" in record.reason) is (not compressible)


def test_unused_initializer_is_not_compressible():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    spare = rng.standard_normal((64, 64)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_float("x", ["b", 32])], [_float("y", ["b", 32])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(spare, "spare")])
    record = _records(model)["spare"]
    assert not record.compressible and record.reason == "unused"


def make_constant_model(seed=3) -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((32, 16)).astype(np.float32)
    model = _model(
        [
            helper.make_node("Constant", [], ["const.weight"], value=numpy_helper.from_array(w, "value")),
            helper.make_node("MatMul", ["x", "const.weight"], ["y"], name="const/MatMul"),
        ],
        [_float("x", ["b", 32])], [_float("y", ["b", 16])],
    )
    return model, w


def test_weight_in_constant_node_is_found():
    model, w = make_constant_model()
    records = _records(model)
    record = records["const.weight"]
    assert record.location == "constant"
    assert record.compressible and record.reason == "weight"
    assert record.nbytes == w.nbytes and record.shape == list(w.shape)
    assert [(c.node, c.input_index, c.role) for c in record.consumers] == [("const/MatMul", 1, "weight")]


def make_if_model(seed=4) -> tuple[onnx.ModelProto, dict]:
    """An If whose then-branch owns its weight and whose else-branch reads an outer initializer."""
    rng = np.random.default_rng(seed)
    arrays = {
        "inner.weight": (rng.standard_normal((32, 32)) / 6).astype(np.float32),
        "outer.weight": (rng.standard_normal((32, 32)) / 6).astype(np.float32),
    }
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "inner.weight"], ["then_out"], name="fc_then")], "then", [],
        [_float("then_out", None)], [numpy_helper.from_array(arrays["inner.weight"], "inner.weight")])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "outer.weight"], ["else_out"], name="fc_else")], "else", [],
        [_float("else_out", None)])
    model = _model(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        [_float("x", ["b", 32]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_float("y", ["b", 32])],
        [numpy_helper.from_array(arrays["outer.weight"], "outer.weight")],
    )
    return model, arrays


def test_weights_inside_if_branches_are_found():
    model, arrays = make_if_model()
    records = _records(model)
    assert set(records) == set(arrays)

    inner = records["inner.weight"]
    assert inner.location == "subgraph:branch/then_branch"
    assert [c.node for c in inner.consumers] == ["branch/then_branch/fc_then"]
    assert inner.compressible and inner.nbytes == arrays["inner.weight"].nbytes

    outer = records["outer.weight"]  # outer-scope initializer, read only from inside the else branch
    assert outer.location == "initializer"
    assert [(c.node, c.op_type, c.input_index, c.role) for c in outer.consumers] == [
        ("branch/else_branch/fc_else", "MatMul", 1, "weight")
    ]
    assert outer.compressible


def make_tied_model(seed=5) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> MatMul(W) -> Relu -> MatMul(W) -> MatMul(head): W is one initializer read by two MatMuls."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    head = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "shared.weight"], ["a"], name="first/MatMul"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "shared.weight"], ["b"], name="second/MatMul"),
            helper.make_node("MatMul", ["b", "head.weight"], ["y"], name="head/MatMul"),
        ],
        [_float("x", ["batch", 32])], [_float("y", ["batch", 16])],
        [numpy_helper.from_array(w, "shared.weight"), numpy_helper.from_array(head, "head.weight")],
    )
    return model, w


def test_weight_used_by_two_matmuls_is_tied():
    model, _ = make_tied_model()
    records = _records(model)
    shared = records["shared.weight"]
    assert shared.tied and shared.compressible
    assert sorted(c.node for c in shared.consumers) == ["first/MatMul", "second/MatMul"]
    assert not records["head.weight"].tied


def _expected_io(model, values):
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for v in values:
        if v.name in initializers:
            continue
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append({"name": v.name, "dtype": "float", "shape": dims})
    return out


def test_inspect_json_matches_the_model(tmp_path, runner):
    model = make_zoo()
    arrays = zoo_arrays()
    path = save_model(model, tmp_path / "zoo.onnx")

    result = invoke(runner, "inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # raises on anything but exactly one JSON document
    assert result.stdout.strip().startswith("{") and result.stdout.strip().endswith("}")

    assert info["inputs"] == _expected_io(model, model.graph.input)
    assert info["outputs"] == _expected_io(model, model.graph.output)
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["ir_version"] == model.ir_version
    assert info["file_bytes"] == os.path.getsize(path)
    histogram = Counter(n.op_type for n in model.graph.node)
    assert info["op_histogram"] == dict(histogram)
    assert info["node_count"] == len(model.graph.node)

    tensors = {t["name"]: t for t in info["tensors"]}
    assert set(tensors) == set(arrays)
    for name, array in arrays.items():
        assert tensors[name]["nbytes"] == array.nbytes
        assert tensors[name]["shape"] == list(array.shape)
    compressible = {"mm.weight", "gemm.weight", "conv.weight"}
    assert {n for n, t in tensors.items() if t["compressible"]} == compressible

    totals = info["totals"]
    assert totals["tensors"] == len(arrays)
    assert totals["tensor_bytes"] == sum(a.nbytes for a in arrays.values())
    assert totals["parameters"] == sum(a.size for a in arrays.values())
    assert totals["weights"] == len(compressible)
    assert totals["weight_bytes"] == sum(arrays[n].nbytes for n in compressible)
    assert totals["in_constant_nodes"] == 0 and totals["in_subgraphs"] == 0 and totals["tied_weights"] == 0


def test_inspect_json_reports_constants_subgraphs_and_ties(tmp_path, runner):
    constant_model, w = make_constant_model()
    result = invoke(runner, "inspect", save_model(constant_model, tmp_path / "const.onnx"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["totals"]["in_constant_nodes"] == 1
    assert info["totals"]["weight_bytes"] == w.nbytes
    assert info["tensors"][0]["location"] == "constant"
    assert info["op_histogram"] == {"Constant": 1, "MatMul": 1}

    if_model, arrays = make_if_model()
    result = invoke(runner, "inspect", save_model(if_model, tmp_path / "if.onnx"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["op_histogram"] == {"If": 1, "MatMul": 2}  # nodes inside the branches count too
    assert info["totals"]["in_subgraphs"] == 1
    assert info["totals"]["weights"] == 2
    assert info["totals"]["weight_bytes"] == sum(a.nbytes for a in arrays.values())
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["outer.weight"]["consumers"][0]["node"] == "branch/else_branch/fc_else"

    tied_model, _ = make_tied_model()
    result = invoke(runner, "inspect", save_model(tied_model, tmp_path / "tied.onnx"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["totals"]["tied_weights"] == 1
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["shared.weight"]["tied"] is True
    assert by_name["head.weight"]["tied"] is False


def test_inspect_human_output_and_mlp_totals(mlp_path, runner):
    model = onnx.load(str(mlp_path))
    result = invoke(runner, "inspect", mlp_path)
    assert result.exit_code == 0, result.output
    assert "fc0.weight" in result.stdout and "compressible" in result.stdout

    info = json.loads(invoke(runner, "inspect", mlp_path, "--json").stdout)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".weight")]
    assert info["totals"]["weights"] == len(weights)
    assert info["totals"]["weight_bytes"] == sum(w.nbytes for w in weights)
    assert info["totals"]["parameters"] == sum(numpy_helper.to_array(t).size for t in model.graph.initializer)


def test_inspect_missing_file_is_an_input_error(tmp_path, runner):
    result = invoke(runner, "inspect", tmp_path / "nope.onnx")
    assert result.exit_code == 3
    assert "no such file" in result.stderr
