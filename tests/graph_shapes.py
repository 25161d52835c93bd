"""Small models in the shapes real exports come in, for the robustness matrix (tests/test_graph_shapes.py) and
the table in docs/ROBUSTNESS.md (bench/shapes_table.py). Each builder returns a checked model and a feed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N = 32, 48  # 6 KiB weights: above the 1 KiB that stays float


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=(), ir=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = ir
    return model


def _w(rng, k=K, n=N):
    """Random weights whose singular values decay as trained ones do (a flat spectrum has no low-rank part)."""
    u, _, vt = np.linalg.svd(rng.standard_normal((k, n)), full_matrices=False)
    return ((u * 0.8 ** np.arange(min(k, n))) @ vt).astype(np.float32)


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def mlp(opset=17, ir=8):
    """input -> MatMul+Add -> Relu -> MatMul+Add -> logits, weights as initializers."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_w(rng), "w0"), numpy_helper.from_array(_w(rng, N, 16), "w1"),
             numpy_helper.from_array(_x(rng, N) * 0.1, "b0"), numpy_helper.from_array(_x(rng, 16) * 0.1, "b1")]
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["m0"], name="fc0/MatMul"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0/Add"),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu"),
             helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="fc1/MatMul"),
             helper.make_node("Add", ["m1", "b1"], ["logits"], name="fc1/Add")]
    model = _model(nodes, [_value("input", ["batch", K])], [_value("logits", ["batch", 16])], inits, opset=opset, ir=ir)
    return model, {"input": _x(rng, 8, K)}


def old_opset():
    return mlp(opset=11, ir=6)


def newest_opset():
    return mlp(opset=21, ir=10)


def custom_domain():
    """A custom-domain op between the layers: the checker accepts it, onnxruntime has no kernel for it."""
    model, feed = mlp()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model, feed


def symbolic_dims():
    """[batch, seq, K] input with both dims symbolic, as a transformer's."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_w(rng), "w0"), numpy_helper.from_array(_w(rng, N, K), "w1")]
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["m0"], name="up/MatMul"),
             helper.make_node("Relu", ["m0"], ["r0"], name="relu"),
             helper.make_node("MatMul", ["r0", "w1"], ["out"], name="down/MatMul")]
    model = _model(nodes, [_value("input", ["batch", "seq", K])], [_value("out", ["batch", "seq", K])], inits)
    return model, {"input": _x(rng, 2, 5, K)}


def fp16_weights():
    """The whole model in fp16 (weights, activations, output)."""
    rng = np.random.default_rng(3)
    h = TensorProto.FLOAT16
    inits = [numpy_helper.from_array(_w(rng).astype(np.float16), "w0"), numpy_helper.from_array(_w(rng, N, 16).astype(np.float16), "w1")]
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["m0"], name="fc0/MatMul"),
             helper.make_node("Relu", ["m0"], ["r0"], name="relu"),
             helper.make_node("MatMul", ["r0", "w1"], ["logits"], name="fc1/MatMul")]
    model = _model(nodes, [_value("input", ["batch", K], h)], [_value("logits", ["batch", 16], h)], inits)
    return model, {"input": _x(rng, 8, K).astype(np.float16)}


def bf16_weights():
    """bfloat16 weights cast to float32 before each MatMul, as exports of bf16 checkpoints have."""
    rng = np.random.default_rng(4)
    inits = []
    for name, w in (("w0", _w(rng)), ("w1", _w(rng, N, 16))):
        tensor = helper.make_tensor(name, TensorProto.BFLOAT16, w.shape, vals=(w.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
                                    raw=True)
        inits.append(tensor)
    nodes = [helper.make_node("Cast", ["w0"], ["w0f"], name="cast0", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["input", "w0f"], ["m0"], name="fc0/MatMul"),
             helper.make_node("Relu", ["m0"], ["r0"], name="relu"),
             helper.make_node("Cast", ["w1"], ["w1f"], name="cast1", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["r0", "w1f"], ["logits"], name="fc1/MatMul")]
    model = _model(nodes, [_value("input", ["batch", K])], [_value("logits", ["batch", 16])], inits)
    return model, {"input": _x(rng, 8, K)}


def constant_nodes():
    """Weights in Constant nodes instead of initializers."""
    model, feed = mlp()
    for name in ("w0", "w1"):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor))
        model.graph.initializer.remove(tensor)
    return model, feed


def tied_and_subgraph():
    """One weight read by two MatMuls of the main graph and by a MatMul inside an If branch."""
    rng = np.random.default_rng(5)
    shared = _w(rng, K, K)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["r", "shared"], ["t"], name="branch/MatMul")], "then", [],
                                    [_value("t", None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["r"], ["e"], name="skip")], "else", [], [_value("e", None)])
    nodes = [helper.make_node("MatMul", ["input", "shared"], ["a"], name="first/MatMul"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["b"], name="maybe", then_branch=then_branch, else_branch=else_branch),
             helper.make_node("MatMul", ["b", "shared"], ["out"], name="second/MatMul")]
    model = _model(nodes, [_value("input", ["batch", K]), _value("cond", [], TensorProto.BOOL)], [_value("out", ["batch", K])],
                   [numpy_helper.from_array(shared, "shared")])
    return model, {"input": _x(rng, 8, K), "cond": np.array(True)}


def if_branches():
    """Each If branch owns a weight (initializers of the subgraphs)."""
    rng = np.random.default_rng(6)
    branches = []
    for name in ("then", "else"):
        body = helper.make_graph([helper.make_node("MatMul", ["input", f"{name}.w"], [f"{name}_out"], name=f"{name}/MatMul")],
                                 name, [], [_value(f"{name}_out", None)], [numpy_helper.from_array(_w(rng), f"{name}.w")])
        branches.append(body)
    nodes = [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=branches[0], else_branch=branches[1])]
    model = _model(nodes, [_value("input", ["batch", K]), _value("cond", [], TensorProto.BOOL)], [_value("out", ["batch", N])])
    return model, {"input": _x(rng, 8, K), "cond": np.array(False)}


def loop_body():
    """A Loop applying a square weight (an initializer of its body) a given number of times."""
    rng = np.random.default_rng(7)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["state", "loop.w"], ["mm"], name="step/MatMul"),
         helper.make_node("Tanh", ["mm"], ["state_out"], name="step/Tanh")],
        "body", [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("state", None)],
        [_value("cond_out", [], TensorProto.BOOL), _value("state_out", None)],
        [numpy_helper.from_array(_w(rng, K, K), "loop.w")])
    nodes = [helper.make_node("Loop", ["trips", "", "input"], ["out"], name="loop", body=body)]
    model = _model(nodes, [_value("input", ["batch", K]), _value("trips", [], TensorProto.INT64)], [_value("out", ["batch", K])])
    return model, {"input": _x(rng, 8, K), "trips": np.array(3, dtype=np.int64)}


def scan_body():
    """A Scan over the sequence axis whose body multiplies each step by an outer-scope weight."""
    rng = np.random.default_rng(8)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "scan.w"], ["y_t"], name="step/MatMul"),
         helper.make_node("Identity", ["carry"], ["carry_out"], name="carry")],
        "body", [_value("carry", [1]), _value("x_t", ["batch", K])], [_value("carry_out", [1]), _value("y_t", ["batch", N])])
    nodes = [helper.make_node("Scan", ["init", "input"], ["final", "out"], name="scan", body=body, num_scan_inputs=1)]
    model = _model(nodes, [_value("init", [1]), _value("input", ["seq", "batch", K])], [_value("final", [1]), _value("out", ["seq", "batch", N])],
                   [numpy_helper.from_array(_w(rng), "scan.w")])
    return model, {"init": np.zeros(1, np.float32), "input": _x(rng, 4, 2, K)}


def shadowed_initializer():
    """An initializer that is also a graph input (IR 3 style): the caller may feed another value, so it is not a constant."""
    model, feed = mlp(ir=6, opset=11)
    model.graph.input.append(_value("w1", [N, 16]))
    return model, feed


SHAPES = {
    "MLP, opset 17 (the reference)": mlp,
    "opset 11, IR 6 (older export)": old_opset,
    "opset 21, IR 10 (newer export)": newest_opset,
    "custom-domain op (`com.example.FancyRelu`)": custom_domain,
    "symbolic batch and sequence dims": symbolic_dims,
    "fp16 model (weights and activations)": fp16_weights,
    "bf16 weights behind `Cast`": bf16_weights,
    "weights in `Constant` nodes": constant_nodes,
    "one weight tied across two MatMuls and an `If` branch": tied_and_subgraph,
    "weights inside `If` branches": if_branches,
    "weight inside a `Loop` body": loop_body,
    "outer-scope weight read in a `Scan` body": scan_body,
    "graph input shadowing an initializer": shadowed_initializer,
}

# (label, CLI arguments after the model; {out} is the output path, {calib} a calibration .npz of the feed)
COMMANDS = {
    "quantize": ["quantize", "-o", "{out}.onnx", "--no-validate"],
    "quantize --bits 4": ["quantize", "--bits", "4", "-o", "{out}.onnx", "--no-validate"],
    "quantize (static)": ["quantize", "--calibration", "{calib}", "-o", "{out}.onnx", "--no-validate"],
    "prune": ["prune", "--sparsity", "0.5", "-o", "{out}.onnx", "--no-validate"],
    "cluster": ["cluster", "--bits", "4", "-o", "{out}.onnx", "--no-validate"],
    "factorize": ["factorize", "--rank-ratio", "0.25", "--allow-slower", "-o", "{out}.onnx", "--no-validate"],
    "pack": ["pack", "-o", "{out}.shrink"],
}


def all_cases():
    return [(shape, command) for shape in SHAPES for command in COMMANDS]
