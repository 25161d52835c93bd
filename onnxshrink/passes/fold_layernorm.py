"""Fold a LayerNormalization's scale and shift into the MatMuls that read its output.

Before:                                               After:
    X ──► LayerNorm(γ, β) ──► MatMul(W) ──► Add(b)        X ──► LayerNorm(1) ──► MatMul(diag(γ) W) ──► Add(b + β W)

Exact up to float rounding: γ scales each input row of W, and β through W is a constant the bias absorbs.
Why: once compress has pruned and clustered the weights, each norm's γ and β are two more small float
tensors (each with its decoding nodes) in a file of a few kilobytes; folded, the scale is a vector of ones
that LZMA stores in a few bytes and the shift is gone, while the weights that took them in are compressed
anyway. A norm is folded only when every reader is such a MatMul with a weight and a bias of its own.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.model import iter_graphs
from onnxshrink.passes.common import attr


def fold_layernorm(model: onnx.ModelProto) -> int:
    """Fold the scale and shift of every LayerNormalization whose readers allow it, in place; returns how many."""
    folded = 0
    for graph in iter_graphs(model.graph):
        inits = {t.name: t for t in graph.initializer}
        readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        public = {v.name for v in graph.output}
        for norm in graph.node:
            plan = _plan(norm, inits, readers, public)
            if plan is None:
                continue
            gamma, beta, layers = plan
            for matmul, add, bias_input in layers:
                weight = numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float64)
                if beta is not None:
                    bias_name = add.input[bias_input]
                    bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64) + beta @ weight
                    inits[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_name))
                inits[matmul.input[1]].CopyFrom(
                    numpy_helper.from_array((gamma[:, None] * weight).astype(np.float32), matmul.input[1]))
            inits[norm.input[1]].CopyFrom(numpy_helper.from_array(np.ones(gamma.shape, np.float32), norm.input[1]))
            if len(norm.input) > 2 and norm.input[2]:
                graph.initializer.remove(inits.pop(norm.input[2]))  # read by this norm only (_plan checked)
            del norm.input[2:]
            folded += 1
    return folded


def norm_parameters(norm, inits, readers, public) -> list[str] | None:
    """The names of γ (and β) of a LayerNormalization over the last axis that a per-channel factor can be folded
    into: initializers read by this node alone (rescaling them changes no other node), its output not a graph
    output. None for any other node. fold_layernorm and smooth_quant both fold into them."""
    if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.output) != 1:
        return None
    if attr(norm, "axis", -1) != -1 or norm.output[0] in public or len(norm.input) < 2:
        return None
    params = [name for name in norm.input[1:3] if name]
    if any(name not in inits or len(readers.get(name, [])) != 1 for name in params):
        return None  # a parameter computed at run time, or shared with another node
    return params


def _plan(norm, inits, readers, public):
    """(γ, β or None, [(MatMul, bias Add, the Add's bias input)]) when `norm` can be folded, else None."""
    params = norm_parameters(norm, inits, readers, public)
    if params is None:
        return None
    gamma = numpy_helper.to_array(inits[norm.input[1]]).astype(np.float64)
    beta = numpy_helper.to_array(inits[norm.input[2]]).astype(np.float64) if len(params) == 2 else None
    if gamma.ndim != 1 or (beta is not None and beta.shape != gamma.shape):
        return None
    if beta is not None and not np.any(beta):
        beta = None
    if np.all(gamma == 1) and beta is None and len(params) == 1:
        return None  # nothing to fold (folded already)
    layers = []
    for matmul in readers.get(norm.output[0], []):
        weight = matmul.input[1] if matmul.op_type == "MatMul" and len(matmul.input) == 2 else None
        if matmul.input[0] != norm.output[0] or weight not in inits or len(readers.get(weight, [])) != 1:
            return None
        tensor = inits[weight]
        if tensor.data_type != onnx.TensorProto.FLOAT or list(tensor.dims)[:1] != [gamma.size] or len(tensor.dims) != 2:
            return None
        add, bias_input = _bias_add(matmul, inits, readers, public, tensor.dims[1])
        if beta is not None and add is None:
            return None  # no bias of its own to take β
        layers.append((matmul, add, bias_input))
    return (gamma, beta, layers) if layers else None


def _bias_add(matmul, inits, readers, public, columns):
    """The Add right after `matmul` that adds a float [columns] initializer read by nothing else, and which input."""
    after = readers.get(matmul.output[0], [])
    if len(after) != 1 or after[0].op_type != "Add" or matmul.output[0] in public:
        return None, None
    add = after[0]
    for position, name in enumerate(add.input):
        tensor = inits.get(name)
        if (name != matmul.output[0] and tensor is not None and len(readers.get(name, [])) == 1
                and tensor.data_type == onnx.TensorProto.FLOAT and list(tensor.dims) == [columns]):
            return add, position
    return None, None
