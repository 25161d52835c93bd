"""Loading a pack decodes it once, and every pack that `pack` wrote can be read back (issue 18, item 1).

A model that onnxruntime runs but the full ONNX checker refuses used to make reading its pack recurse:
model.load asked runtime.make_session about the pack's path, which loaded the pack again, about 240 times.
"""

from __future__ import annotations

import gc

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


def _pack_here(model, name: str) -> None:
    """`model` packed as NAME.shrink in the current folder, as `onnxshrink pack NAME.onnx` would write it."""
    with open(f"{name}.shrink", "wb") as stream:
        packing.pack_model(model, stream, packing.PackReport("pack", f"{name}.onnx", f"{name}.shrink"))


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

    def counting(data, place=None):
        calls.append(len(data))
        return real(data, place)

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
    monkeypatch.setattr(packing, "unpack_model", lambda data, place=None: calls.append(1) or real(data, place))
    _pack_here(model, "bad")
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


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = packing.unpack_model
    monkeypatch.setattr(packing, "unpack_model", lambda data, place=None: calls.append(1) or real(data, place))
    return calls


def test_a_packs_session_runs_as_its_onnx_file_after_one_decode(tmp_path, monkeypatch):
    """session() hands onnxruntime the pack's bytes (serialized once, no checker): the same outputs, bit for bit."""
    import onnxshrink
    from conftest import make_mlp

    monkeypatch.chdir(tmp_path)
    onnx.save(make_mlp(widths=(64, 256, 256, 10), seed=3), "mlp.onnx")  # 64 KiB weights: coded as records
    report = onnxshrink.pack("mlp.onnx", "mlp.shrink")
    assert any(t.encoding for t in report.tensors)  # the premise: weights were decoded from records
    calls = _count_decodes(monkeypatch)
    packed = onnxshrink.session("mlp.shrink")
    assert len(calls) == 1
    import onnxruntime as ort

    as_bytes = onnxshrink.session("mlp.shrink", sess_options=ort.SessionOptions())  # the serialized-once path
    assert len(calls) == 2
    gc.collect()  # the weights onnxruntime runs on must outlive session_source's locals
    plain = onnxshrink.session("mlp.onnx")
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    name = plain.get_inputs()[0].name
    want = plain.run(None, {name: x})
    for session in (packed, as_bytes):
        for got, expected in zip(session.run(None, {name: x}), want):
            assert np.array_equal(got, expected)
    assert model_io.session_source("mlp.onnx") == "mlp.onnx"


def test_session_source_hands_large_weights_over_as_arrays(tmp_path, monkeypatch):
    from conftest import make_mlp

    monkeypatch.chdir(tmp_path)
    original = make_mlp(widths=(64, 256, 256, 10), seed=3)
    onnx.save(original, "mlp.onnx")
    import onnxshrink

    onnxshrink.pack("mlp.onnx", "mlp.shrink")
    source = model_io.session_source("mlp.shrink")
    assert isinstance(source, runtime.InMemoryModel)
    big = {t.name: t for t in original.graph.initializer if len(t.raw_data) >= 65536}
    assert set(source.weights) == set(big) and big
    for name, tensor in big.items():
        assert np.array_equal(source.weights[name], onnx.numpy_helper.to_array(tensor))
    graph = onnx.ModelProto.FromString(source.graph)
    left = {t.name: t for t in graph.graph.initializer}
    assert all(left[n].data_location == TensorProto.EXTERNAL and not left[n].raw_data for n in big)
    assert all(left[t.name].raw_data == t.raw_data for t in original.graph.initializer if t.name not in big)
    whole = model_io.session_source("mlp.shrink", split_weights=False)
    assert whole == model_io.load("mlp.shrink").SerializeToString()


def test_a_weight_that_is_also_an_input_stays_in_the_graph():
    """A caller may feed an initializer listed as an input: onnxruntime must keep it overridable, so it stays."""
    model = onnx.ModelProto()
    weight = helper.make_tensor("W", TensorProto.FLOAT, [128, 128], np.ones(128 * 128, np.float32).tobytes(), raw=True)
    other = helper.make_tensor("V", TensorProto.FLOAT, [128, 128], np.ones(128 * 128, np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["W", "V"], ["Y"])], "g",
                              [helper.make_tensor_value_info("W", TensorProto.FLOAT, [128, 128])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [128, 128])], [weight, other])
    model.CopyFrom(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    taken = model_io._take_weights(model)
    assert list(taken) == ["V"]
    assert model.graph.initializer[0].raw_data == weight.raw_data


def _flipped_weight_model() -> onnx.ModelProto:
    """A weight whose shape was flipped (4x3 where 3x4 fits): the full checker refuses it, onnxruntime too."""
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    graph = helper.make_graph([node], "flipped", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_checker_still_refuses_a_broken_graph_inside_a_pack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _flipped_weight_model()
    _pack_here(model, "broken")
    calls = _count_decodes(monkeypatch)
    with pytest.raises(ModelLoadError, match="invalid ONNX model.*onnxruntime refuses it too"):
        model_io.load("broken.shrink")
    assert len(calls) == 1
    decoded = packing.unpack_model(open("broken.shrink", "rb").read())
    by_bytes = model_io.full_check_error(decoded, "broken.shrink", decoded.SerializeToString())
    by_model = model_io.full_check_error(decoded, "broken.shrink")
    assert by_bytes is not None and str(by_bytes) == str(by_model)


def test_a_pack_the_checker_refuses_is_still_refused_for_rewrite(mvn_pack):
    from onnxshrink.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="fails the full ONNX checker"):
        model_io.load(mvn_pack, for_rewrite=True)


def test_a_pack_onnxruntime_refuses_is_one_error_from_session(tmp_path, monkeypatch):
    """Without the checker in front, onnxruntime's refusal is still one domain error, after one decode."""
    import onnxshrink
    from onnxshrink.errors import UnsupportedModelError

    model = _mvn_model()
    model.graph.node[0].op_type = "NoSuchOp"
    monkeypatch.chdir(tmp_path)
    _pack_here(model, "bad")
    calls = _count_decodes(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="onnxruntime cannot load the model"):
        onnxshrink.session("bad.shrink")
    assert len(calls) == 1


def test_make_session_takes_serialized_bytes_never_as_a_path(mvn_pack):
    """Bytes are a model, not a file name (even bytes that begin like a pack's file)."""
    data = _mvn_model().SerializeToString()
    session = runtime.make_session(data)
    assert [i.name for i in session.get_inputs()] == ["X"]
    from onnxshrink.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        runtime.make_session(mvn_pack.read_bytes())


def test_a_weight_whose_bytes_do_not_fit_its_dims_is_left_for_onnxruntime_to_refuse(tmp_path, monkeypatch):
    """A tensor kept in the graph record was never measured against its dims: it must not become an array
    (reshape would fail with a traceback); onnxruntime refuses the model, one line."""
    import onnxshrink
    from onnxshrink.errors import OnnxShrinkError

    model = _flipped_weight_model()
    model.graph.initializer[0].raw_data = np.ones(128 * 128, np.float32).tobytes()  # 64 KiB, dims say 12 values
    del model.graph.initializer[0].float_data[:]
    assert model_io._take_weights(onnx.ModelProto.FromString(model.SerializeToString())) == {}
    monkeypatch.chdir(tmp_path)
    _pack_here(model, "odd")
    with pytest.raises(OnnxShrinkError):
        onnxshrink.session("odd.shrink")
