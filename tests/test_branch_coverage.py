"""validate says which If branches its inputs never ran (silero-vad: an 8 kHz and a 16 kHz network, chosen by `sr`);
the synthesized sample rate; compress prices the layers such branches hold."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import invoke, save_model
from onnxshrink.branch_coverage import untaken_branches


def _branch(name: str, seed: int) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32), f"{name}.w")
    return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.y"], name=f"{name}.mm")], name,
                             [], [helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, None)], [w])


def vad_like(constant_condition: bool = False) -> onnx.ModelProto:
    """y = x @ W16 if sr == 16000 else x @ W8; with `constant_condition`, the If tests two constants instead."""
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
             numpy_helper.from_array(np.array(8000, np.int64), "rate8k")]
    left = "rate8k" if constant_condition else "sr"
    nodes = [helper.make_node("Equal", [left, "rate16k"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["y"], name="rate", then_branch=_branch("k16", 0),
                              else_branch=_branch("k8", 1))]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                                             helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _batches(*rates):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    return [{"x": x, "sr": np.array(rate, np.int64)} for rate in rates]


def test_the_branch_no_run_took_is_named():
    [note] = untaken_branches(vad_like(), _batches(16000, 16000))
    assert note.startswith("warning: If node 'rate' ran only its then_branch on these inputs (condition 'is16k' true "
                           "in every run): its else_branch, 1 layer(s), was not validated")


def test_runs_that_take_both_branches_say_nothing():
    assert untaken_branches(vad_like(), _batches(16000, 8000)) == []


def test_a_condition_of_constants_is_not_a_coverage_gap():
    assert untaken_branches(vad_like(constant_condition=True), _batches(16000)) == []


def test_validate_reports_it(tmp_path, runner):
    path = save_model(vad_like(), tmp_path / "vad.onnx")
    data = tmp_path / "d16k.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32), sr=np.array(16000, np.int64))
    result = invoke(runner, "validate", path, path, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    import json

    notes = json.loads(result.stdout)["notes"]
    assert any("ran only its then_branch" in note and "its else_branch, 1 layer(s), was not validated" in note
               for note in notes), notes


def test_a_sample_rate_input_is_synthesized_as_16000(tmp_path, runner):
    """A synthesized `sr` was 0 or 1, a rate no model takes; now 16000, so silero-vad's 16 kHz network is the one
    judged and the warning names the 8 kHz one."""
    import json

    path = save_model(vad_like(), tmp_path / "vad.onnx")
    result = invoke(runner, "validate", path, path, "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert "sample rate inputs: sr 16000 (by name; give --data for another rate)" in notes
    assert any("ran only its then_branch" in note and "its else_branch, 1 layer(s)" in note for note in notes), notes


def test_sample_rate_names():
    from onnxshrink.data import InputSpec, is_sample_rate

    int64 = np.dtype(np.int64)
    assert all(is_sample_rate(InputSpec(name, int64, shape))
               for name, shape in (("sr", []), ("sample_rate", [1]), ("SamplingRate", []), ("fs", ["n"])))
    assert not any(is_sample_rate(InputSpec(name, dtype, shape)) for name, dtype, shape in
                   (("sr", int64, [2, 3]), ("srate_table", int64, []), ("sr", np.dtype(bool), []),
                    ("input", int64, [])))


def _constant_branch(name: str, seed: int) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((8, 64)).astype(np.float32), f"{name}.w")
    nodes = [helper.make_node("Constant", [], [f"{name}.w"], name=f"{name}.const", value=w),
             helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.y"], name=f"{name}.mm")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, None)])


def test_compress_prices_layers_whose_weights_are_constant_nodes_in_branches(tmp_path):
    """silero-vad.onnx holds its weights in Constant nodes inside its If: the plan saw none of them ("0% of the float
    weights") where the passes, which move Constants to initializers first, compress them all."""
    from onnxshrink import compress_plan

    model = vad_like()
    for node in model.graph.node:
        if node.op_type == "If":
            for attr in node.attribute:
                attr.g.CopyFrom(_constant_branch("k16" if attr.name == "then_branch" else "k8", len(attr.name)))
    path = save_model(model, tmp_path / "vad_constants.onnx")
    prices = compress_plan.price_layers(path, None, bits=(4,), min_share=compress_plan.MIN_LAYER_SHARE)
    assert sorted(layer.node for layer in prices.layers) == ["k16.mm", "k8.mm"], prices.notes
