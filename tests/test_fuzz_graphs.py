"""Randomly built small graphs through every quantize mode: no internal error, and what is written is valid and runs.

A bounded budget runs in the suite; `HYPOTHESIS_PROFILE=long` (e.g. `make fuzz`) runs many more examples.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import api
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.passes import BlockwiseConfig, QuantizeConfig, StaticQuantizeConfig, WeightsOnlyConfig
from onnxshrink.runtime import make_session

settings.register_profile("suite", max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", None]


@st.composite
def mlp_graphs(draw):
    """A chain of MatMul(+Add) / Gemm layers with random widths, activations, tied and Constant-node weights."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    widths = draw(st.lists(st.sampled_from([4, 16, 33, 64, 96]), min_size=2, max_size=5))
    nodes, inits, current = [], [], "x"
    previous_weight = None
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        kind = draw(st.sampled_from(["matmul", "matmul_add", "gemm", "gemm_t", "constant"]))
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        name = f"w{i}"
        if draw(st.booleans()) and previous_weight is not None and previous_weight[1] == (k, n) and kind.startswith("matmul"):
            name = previous_weight[0]  # tie to the previous layer's weight
        elif kind == "constant":
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w, name)))
        elif kind == "gemm_t":
            inits.append(numpy_helper.from_array(w.T.copy(), name))
        else:
            inits.append(numpy_helper.from_array(w, name))
        out = f"h{i}"
        if kind.startswith("gemm"):
            bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")
            inits.append(bias)
            nodes.append(helper.make_node("Gemm", [current, name, f"b{i}"], [out], name=f"gemm{i}",
                                          transB=1 if kind == "gemm_t" else 0, alpha=draw(st.sampled_from([1.0, 0.5]))))
        else:
            nodes.append(helper.make_node("MatMul", [current, name], [out], name=f"mm{i}"))
            if kind == "matmul_add":
                inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
                nodes.append(helper.make_node("Add", [out, f"b{i}"], [out + "_b"], name=f"add{i}"))
                out += "_b"
        previous_weight = (name, (k, n)) if kind != "gemm_t" else None
        act = draw(st.sampled_from(ACTIVATIONS))
        if act:
            nodes.append(helper.make_node(act, [out], [out + "_a"], name=f"act{i}"))
            out += "_a"
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.sampled_from([13, 17])))])
    model.ir_version = 8
    return model, widths[0], seed


CONFIGS = {
    "dynamic": (QuantizeConfig, False),
    "static": (StaticQuantizeConfig, True),
    "weights": (WeightsOnlyConfig, False),
    "int4": (lambda: BlockwiseConfig(bits=4, block_size=16), False),
    "gptq": (lambda: BlockwiseConfig(bits=4, block_size=16, algorithm="gptq"), True),
}


def run_on_random_graph(tmp_path_factory, graph, command, full_check=True):
    """Save the graph and calibration data, run `command(source, output, calib)`; a documented refusal is fine,
    an internal error is not; a written model must pass the checker and run with outputs of the same shape."""
    model, width, seed = graph
    work = tmp_path_factory.mktemp("fuzz")
    source = work / "m.onnx"
    onnx.save(model, str(source))
    calib = work / "calib.npz"
    x = np.random.default_rng(seed).standard_normal((24, width)).astype(np.float32)
    np.savez(calib, x=x)
    try:
        report = command(source, work / "out.onnx", calib)
    except OnnxShrinkError as exc:
        assert exc.exit_code != 70, exc
        return None
    written = work / "out.onnx"
    onnx.checker.check_model(str(written), full_check=full_check)
    expected = make_session(source).run(None, {"x": x})[0]
    produced = make_session(written).run(None, {"x": x})[0]
    assert produced.shape == expected.shape and np.all(np.isfinite(produced))
    return report


@given(graph=mlp_graphs(), mode=st.sampled_from(sorted(CONFIGS)))
def test_random_graphs_quantize_cleanly(tmp_path_factory, graph, mode):
    factory, needs_data = CONFIGS[mode]
    report = run_on_random_graph(tmp_path_factory, graph, lambda source, output, calib: api.quantize(
        source, output, factory(), calibration=calib if needs_data else None, run_validation=False))
    assert report is None or report.runtime["all_quantized_layers_fused"] or mode == "weights", report.runtime
