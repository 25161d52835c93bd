"""Tiny model builders shared by the tests. Every model is built in code with a seeded generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def make_mlp(widths=(32, 64, 48, 10), seed=0, use_gemm=False, opset=17, batch="batch") -> onnx.ModelProto:
    """MLP with MatMul+Add (or Gemm transB=1) and Relu between layers, as real exports have."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        out = f"h{i}" if i < len(widths) - 2 else "logits"
        pre = f"pre{i}" if i < len(widths) - 2 else out
        if use_gemm:
            inits += [numpy_helper.from_array(w.T.copy(), f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
            nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [pre], name=f"fc{i}/Gemm", transB=1))
        else:
            inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
            nodes.append(helper.make_node("MatMul", [current, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}/MatMul"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [pre], name=f"fc{i}/Add"))
        if out != pre:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        current = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, widths[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def float_value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def build_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """A checked opset-`opset` model from nodes, value infos and initializers."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    return save_model(make_mlp(), tmp_path / "mlp.onnx")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the CLI the way a user does, at a fixed terminal width."""
    from onnxshrink.cli import app

    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160", "NO_COLOR": "1"})
