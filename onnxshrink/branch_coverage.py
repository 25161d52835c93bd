"""Which branches of a model's `If` nodes the validation inputs ran.

A compressed model is judged on the outputs its inputs produce, and an `If` runs one branch per run: weights in a
branch no sample takes are compressed and never judged (silero-vad keeps its 8 kHz and 16 kHz networks in the two
branches of an `If` on its `sr` input). validate runs the part of the original that computes each top-level `If`
condition fed by the model's inputs, and says which branches held layers and were not taken.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxshrink.errors import ModelLoadError, UnsupportedModelError
from onnxshrink.protos import iter_graphs
from onnxshrink.runtime import make_session, run_session

WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN", "MatMulNBits",
                        "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DequantizeLinear"})


def untaken_branches(model: onnx.ModelProto, batches: list[dict], threads: int = 1) -> list[str]:
    """Warnings, one per branch of a top-level `If` whose condition depends on the inputs, that holds layers
    (WEIGHT_OPS nodes) and that no batch took. `model` needs no large weights: only the nodes and the small
    constants that compute the conditions are run (a condition that needs a large or external tensor, or a
    subgraph, is not checked)."""
    graph = model.graph
    inputs = {value.name for value in graph.input} - {tensor.name for tensor in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output if out}
    checked = []
    for node in graph.node:
        if node.op_type != "If" or not node.input or not node.input[0]:
            continue
        needed = _cone(node.input[0], producers)
        if needed is None or not needed & inputs:
            continue  # a condition fixed by constants leaves its other branch dead for every input
        branches = {attr.name: attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH}
        layers = {name: sum(n.op_type in WEIGHT_OPS for g in iter_graphs(body) for n in g.node)
                  for name, body in branches.items()}
        if any(layers.values()):
            checked.append((node, needed, layers))
    if not checked or not batches:
        return []
    conds = [node.input[0] for node, _, _ in checked]
    probe = _condition_model(model, conds, set().union(*(needed for _, needed, _ in checked)))
    if probe is None:
        return []
    taken: dict[str, set] = {name: set() for name in conds}
    try:
        session = make_session(probe.SerializeToString(), threads, optimize=False)
        feeds = [i.name for i in session.get_inputs()]
        for batch in batches:
            values = run_session(session, conds, {name: batch[name] for name in feeds if name in batch})
            for name, value in zip(conds, values):
                taken[name].update(bool(v) for v in np.asarray(value).reshape(-1)[:1])
    except (ModelLoadError, UnsupportedModelError):  # the whole original ran on these batches: not expected
        return []
    notes = []
    for node, _, layers in checked:
        seen = taken[node.input[0]]
        for branch, flag in (("then_branch", True), ("else_branch", False)):
            if flag not in seen and layers.get(branch):
                ran = "else_branch" if flag else "then_branch"
                notes.append(f"warning: If node {node.name or node.output[0]!r} ran only its {ran} on these inputs "
                             f"(condition {node.input[0]!r} {str(not flag).lower()} in every run): its {branch}, "
                             f"{layers[branch]} layer(s), was not validated; give --data that takes it")
    return notes


def _cone(name: str, producers: dict) -> set | None:
    """Names of the nodes' outputs and inputs that compute `name` (None when a node on the way has a subgraph)."""
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if not current or current in seen:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is None:
            continue
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            return None
        stack.extend(node.input)
    return seen


def _condition_model(model: onnx.ModelProto, conds: list[str], needed: set) -> onnx.ModelProto | None:
    """The original's nodes that compute `conds`, as their own model (every graph input kept), or None when a
    tensor they read is not in the graph's bytes."""
    graph = model.graph
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.graph.name = "conditions"
    out.graph.input.extend(value for value in graph.input if value.name in needed)
    out.graph.node.extend(node for node in graph.node if any(o in needed for o in node.output))
    for tensor in graph.initializer:
        if tensor.name in needed:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            out.graph.initializer.append(tensor)
    out.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None) for name in conds)
    return out
