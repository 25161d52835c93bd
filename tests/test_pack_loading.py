"""Loading a pack decodes it once, and every pack that `pack` wrote can be read back (issue 18, item 1).

A model that onnxruntime runs but the full ONNX checker refuses used to make reading its pack recurse:
model.load asked runtime.make_session about the pack's path, which loaded the pack again, about 240 times.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnxshrink import model as model_io
from onnxshrink import packing, runtime
from onnxshrink.cli import app
from onnxshrink.errors import ModelLoadError
from test_imports import import_graph, reaches


def _mvn_model() -> onnx.ModelProto:
    """The onnx backend case test_mvn: onnxruntime runs it; the full checker's strict shape inference refuses
    the function body of MeanVarianceNormalization at opset 13."""
    node = helper.make_node("MeanVarianceNormalization", ["X"], ["Y"])
    graph = helper.make_graph([node], "test_mvn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 3, 3, 1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 3, 3, 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture
def mvn_pack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _mvn_model()
    with pytest.raises(Exception):
        onnx.checker.check_model(model, full_check=True)  # the premise: the checker refuses it
    onnx.save(model, "mvn.onnx")
    result = CliRunner().invoke(app, ["pack", "mvn.onnx"])
    assert result.exit_code == 0, result.output
    return tmp_path / "mvn.shrink"


def test_pack_the_checker_refuses_reads_back_with_every_command(mvn_pack):
    runner = CliRunner()
    for args in (["inspect", "mvn.shrink"], ["unpack", "mvn.shrink", "-o", "back.onnx"], ["validate", "mvn.onnx", "mvn.shrink"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    back, original = onnx.load("back.onnx"), onnx.load("mvn.onnx")
    assert back.graph.SerializeToString() == original.graph.SerializeToString()


def test_loading_a_pack_decodes_it_once(mvn_pack, monkeypatch):
    calls = []
    real = packing.unpack_model

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(packing, "unpack_model", counting)
    model = model_io.load(mvn_pack)
    assert len(calls) == 1
    session = runtime.make_session(model_io.runnable(mvn_pack, model))
    x = np.random.default_rng(0).standard_normal((3, 3, 3, 1)).astype(np.float32)
    (y,) = session.run(None, {"X": x})
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert len(calls) == 1  # runnable() reuses the decoded model


def test_a_pack_onnxruntime_refuses_too_is_one_load_error(tmp_path, monkeypatch):
    """The other side of the fallback: checker and onnxruntime both refuse; one error, one decode."""
    model = _mvn_model()
    model.graph.node[0].op_type = "NoSuchOp"
    monkeypatch.chdir(tmp_path)
    calls = []
    real = packing.unpack_model
    monkeypatch.setattr(packing, "unpack_model", lambda data: calls.append(1) or real(data))
    with open("bad.shrink", "wb") as stream:
        packing.pack_model(model, stream, packing.PackReport("pack", "bad.onnx", "bad.shrink"))
    with pytest.raises(ModelLoadError, match="onnxruntime refuses it too"):
        model_io.load("bad.shrink")
    assert len(calls) == 1


def test_runtime_never_loads_a_pack_path(mvn_pack):
    with pytest.raises(TypeError, match="decoded"):
        runtime.make_session(mvn_pack)


def test_a_model_too_big_to_measure_counts_as_too_big():
    """protobuf raises EncodeError from ByteSize() past 2 GiB on some builds: the size check must not fail then."""

    class Huge:
        def ByteSize(self):
            raise EncodeError("Failed to serialize proto")

    assert model_io._too_big_for_one_protobuf(Huge())
    assert not model_io._too_big_for_one_protobuf(_mvn_model())


def test_model_io_imports_run_one_way():
    """No module at the I/O floor or below sits in an import circle (the shape of the 240-fold recursion)."""
    graph = import_graph()
    floor = ["onnxshrink.model", "onnxshrink.runtime", "onnxshrink.packing", "onnxshrink.streaming",
             "onnxshrink.protos", "onnxshrink.weights", "onnxshrink.report", "onnxshrink.errors",
             "onnxshrink.codec.container", "onnxshrink.codec.huffman"]
    circular = [m for m in floor if reaches(graph, m, m)]
    assert circular == []
    assert not any(m.startswith("onnxshrink.passes") for m in graph["onnxshrink.streaming"])
    assert "onnxshrink.model" not in graph["onnxshrink.runtime"]
