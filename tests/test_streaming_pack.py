"""Streaming pack and prune: a model whose weights live in external data is packed (and magnitude-pruned) one
tensor at a time, into the same bytes (the same masks) as the in-memory path, written atomically."""

from __future__ import annotations

import errno
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tree
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import api, packing, streaming
from onnxshrink.errors import ModelLoadError, OutputError
from onnxshrink.passes.prune import PruneConfig


def make_model() -> onnx.ModelProto:
    """Every kind of tensor pack treats differently: dense fp32 (planes), pruned fp32 (sparse), int8 (planes,
    one byte), 4-bit codes mostly 0x88 (sparse-nibbles), a bias too small for a record, a tiled matrix LZMA
    codes better (left in the graph), a Constant node's tensor in float_data, and an If body's initializer."""
    rng = np.random.default_rng(5)
    w0 = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    w1 = (rng.standard_normal((128, 64)) / 11).astype(np.float32)
    w1[rng.random(w1.shape) < 0.7] = 0.0
    q = np.clip(rng.standard_normal((64, 64)) * 25, -127, 127).astype(np.int8)
    halves = np.where(rng.random((2, 16384)) < 0.6, 8, rng.integers(0, 16, (2, 16384)))
    codes = (halves[0] | (halves[1] << 4)).astype(np.uint8)
    tiled = np.tile(np.sin(np.arange(128, dtype=np.float32) * 0.1), (64, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array((rng.standard_normal(128) / 10).astype(np.float32), "b0"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(q, "q"),
             numpy_helper.from_array(np.float32(0.02), "q_scale"), numpy_helper.from_array(codes, "codes"),
             numpy_helper.from_array(tiled, "tiled"), numpy_helper.from_array(np.array(True), "cond")]
    shift = helper.make_tensor("shift_value", TensorProto.FLOAT, [64], rng.standard_normal(64).astype(np.float32).tolist())
    table = helper.make_tensor("table_value", TensorProto.FLOAT, [1024], rng.standard_normal(1024).astype(np.float32).tolist())
    branch_w = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "branch_w")
    then_branch = helper.make_graph([helper.make_node("MatMul", ["y", "branch_w"], ["then_out"])], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["batch", 16])], [branch_w])
    else_w = numpy_helper.from_array(np.eye(64, 16, dtype=np.float32), "else_w")
    else_branch = helper.make_graph([helper.make_node("MatMul", ["y", "else_w"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["batch", 16])], [else_w])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0_bias"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="fc1"),
        helper.make_node("Constant", [], ["shift"], name="shift", value=shift),
        helper.make_node("Add", ["m1", "shift"], ["s1"], name="shift_add"),
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["wq"], name="dq"),
        helper.make_node("MatMul", ["s1", "wq"], ["y"], name="fc2"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Identity", ["codes"], ["codes_out"], name="codes_id"),
        helper.make_node("Identity", ["tiled"], ["tiled_out"], name="tiled_id"),
        helper.make_node("Constant", [], ["table"], name="table", value=table),
        helper.make_node("Identity", ["table"], ["table_out"], name="table_id"),
    ]
    graph = helper.make_graph(nodes, "streamed-pack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 16]),
                               helper.make_tensor_value_info("codes_out", TensorProto.UINT8, [16384]),
                               helper.make_tensor_value_info("tiled_out", TensorProto.FLOAT, [64, 128]),
                               helper.make_tensor_value_info("table_out", TensorProto.FLOAT, [1024])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save_external(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Every initializer (the If body's too) in `NAME.data`; the Constant's tensor stays in the graph."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    return path


@pytest.fixture
def external(tmp_path) -> Path:
    return save_external(make_model(), tmp_path / "in")


def in_memory_pack(monkeypatch, *args, **kwargs):
    """The same command with streaming turned off: the whole model loaded, as before streaming."""
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "packs_streamed", lambda model: False)
        return api.pack(*args, **kwargs)


class ReadProbe:
    """Counts the tensors a streamed pack reads from the data file and, at each read, how many read earlier are
    still alive. Each read is handed out as a memoryview of an array the probe watches: anything made from it
    (symbols, planes, views) keeps that array alive."""

    def __init__(self, monkeypatch):
        self.reads = 0
        self.most_alive = 0
        self._alive: list[weakref.ref] = []
        read = streaming.ExternalTensors.read
        probe = self

        def watched(source, tensor):
            probe.most_alive = max(probe.most_alive, sum(ref() is not None for ref in probe._alive))
            data = read(source, tensor)
            if data is None or not onnx.external_data_helper.uses_external_data(tensor):
                return data
            probe.reads += 1
            owner = np.frombuffer(data, np.uint8).copy()
            probe._alive.append(weakref.ref(owner))
            return memoryview(owner)

        monkeypatch.setattr(streaming.ExternalTensors, "read", watched)


def test_streamed_pack_is_the_in_memory_pack_byte_for_byte(external, tmp_path, monkeypatch):
    probe = ReadProbe(monkeypatch)
    report = api.pack(external, tmp_path / "streamed.shrink")
    coded = len(report.tensors)
    assert {t.encoding for t in report.tensors} >= {"planes", "sparse", "sparse-nibbles"}
    assert report.totals["tensors_left_in_graph"] > 0  # the tiled matrix, biases: read back into the graph record
    assert probe.reads >= 2 * coded  # planned, then read again to be written
    assert probe.most_alive == 0  # never two tensors' bytes at once
    reads = probe.reads
    memory_report = in_memory_pack(monkeypatch, external, tmp_path / "memory.shrink")
    assert probe.reads == reads  # the in-memory path loaded the model instead
    assert (tmp_path / "streamed.shrink").read_bytes() == (tmp_path / "memory.shrink").read_bytes()
    assert report.totals == memory_report.totals
    assert api.load(tmp_path / "streamed.shrink").SerializeToString() == api.load(external).SerializeToString()


def test_streamed_pack_leaves_inputs_alone_and_no_temporary_files(external, tmp_path):
    before = tree(external.parent)
    (tmp_path / "out").mkdir()
    api.pack(external, tmp_path / "out" / "m.shrink")
    assert tree(external.parent) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.shrink"]


def test_a_failing_streamed_check_leaves_the_existing_output_untouched(external, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.shrink").write_bytes(b"keep me")

    def wrong(path, manifest):
        manifest.tensors[0] = (manifest.tensors[0][0], b"0" * 32)
        return check(path, manifest)

    check = packing.check_pack
    monkeypatch.setattr(packing, "check_pack", wrong)
    with pytest.raises(RuntimeError, match="does not decode to the packed tensor"):
        api.pack(external, out / "m.shrink", force=True)
    assert (out / "m.shrink").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["m.shrink"]


def test_streamed_pack_write_error_is_an_output_error_and_leaves_nothing(external, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packing.container.Writer, "record", full)
    with pytest.raises(OutputError, match="No space left"):
        api.pack(external, out / "m.shrink")
    assert list(out.iterdir()) == []


def test_a_tensor_changed_between_the_two_passes_is_refused(external, tmp_path, monkeypatch):
    read, seen = streaming.ExternalTensors.read, set()

    def changing(source, tensor):
        data = read(source, tensor)
        if tensor.name == "w0" and tensor.name in seen:
            data = b"\1" + bytes(data[1:])
        seen.add(tensor.name)
        return data

    monkeypatch.setattr(streaming.ExternalTensors, "read", changing)
    with pytest.raises(ModelLoadError, match="changed while pack"):
        api.pack(external, tmp_path / "m.shrink")
    assert not (tmp_path / "m.shrink").exists()


def test_check_pack_reads_records_from_the_file_like_unpack(external, tmp_path):
    api.pack(external, tmp_path / "m.shrink")
    data = (tmp_path / "m.shrink").read_bytes()
    with open(tmp_path / "m.shrink", "rb") as f:
        from_file = [(r.kind, bytes(r.body), r.offset) for r in packing.container.read_file_records(f)]
    assert from_file == [(r.kind, bytes(r.body), r.offset) for r in packing.container.read_records(data)]
    (tmp_path / "cut.shrink").write_bytes(data[:-3])
    with open(tmp_path / "cut.shrink", "rb") as f, pytest.raises(packing.container.CorruptPack, match="truncated"):
        list(packing.container.read_file_records(f))


# ---------------------------------------------------------------- prune


def make_prunable() -> onnx.ModelProto:
    """MatMul+Add, Gemm with transB and alpha, and a Conv: the three ways prune sees a weight as [K, N]; one
    weight already has zeros (taken first, at no cost) and duplicated values (ties at the threshold)."""
    rng = np.random.default_rng(11)
    w0 = (rng.standard_normal((48, 64)) / 7).astype(np.float32)
    w0[:4] = 0.0
    w1 = np.round(rng.standard_normal((32, 64)) * 4).astype(np.float32) / 16  # [N, K] for transB; many ties
    conv = (rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array((rng.standard_normal(64) / 10).astype(np.float32), "b0"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(32, np.float32), "c1"),
             numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(np.array([1, 32], np.int64), "shape")]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0_bias"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "c1"], ["g1"], name="fc1", transB=1, alpha=0.5),
        helper.make_node("Conv", ["image", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "prunable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 48]),
                                                  helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("g1", TensorProto.FLOAT, ["batch", 32]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 16, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def weights_of(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def in_memory_prune(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "streams", lambda *a: False)
        return api.prune(*args, **kwargs)


@pytest.mark.parametrize("config", [
    PruneConfig(sparsity=0.5),
    PruneConfig(sparsity=0.8, scope="global"),
    PruneConfig(sparsity=0.3, scope="layer"),
    PruneConfig(sparsity=0.6, layer_sparsity={"conv": 0.25}),
    PruneConfig(pattern="2:4"),
], ids=["auto", "global", "layer", "override", "2:4"])
def test_streamed_prune_writes_the_in_memory_masks(tmp_path, monkeypatch, config):
    source = save_external(make_prunable(), tmp_path / "in")
    before = tree(source.parent)
    probe = StoreProbe(monkeypatch)
    streamed = api.prune(source, tmp_path / "streamed.onnx", config, run_validation=False)
    assert streaming.NOTE in streamed.notes and probe.reads >= 3
    assert probe.most_alive == 0  # one weight in memory at a time
    memory = in_memory_prune(monkeypatch, source, tmp_path / "memory.onnx", config, run_validation=False)
    assert streaming.NOTE not in memory.notes
    got, want = weights_of(tmp_path / "streamed.onnx"), weights_of(tmp_path / "memory.onnx")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert [(d.node, d.action, d.reason) for d in streamed.passes[0].layers] == \
        [(d.node, d.action, d.reason) for d in memory.passes[0].layers]
    assert streamed.passes[0].notes == memory.passes[0].notes
    assert tree(source.parent) == before


class StoreProbe:
    """At each weight a streamed pass reads, how many weights read earlier are still alive (should be none)."""

    def __init__(self, monkeypatch):
        self.reads = 0
        self.most_alive = 0
        self._alive: list[weakref.ref] = []
        read = streaming.StreamingStore.read
        probe = self

        def watched(store, tensor):
            probe.most_alive = max(probe.most_alive, sum(ref() is not None for ref in probe._alive))
            array = read(store, tensor)
            probe.reads += 1
            probe._alive.append(weakref.ref(array))
            return array

        monkeypatch.setattr(streaming.StreamingStore, "read", watched)


def test_streamed_prune_of_calibrated_or_sparse_runs_stay_in_memory():
    from onnxshrink.passes.prune import Prune

    assert Prune(PruneConfig(sparsity=0.5)).streams
    assert not Prune(PruneConfig(sparsity=0.5, storage="sparse")).streams
    assert not Prune(PruneConfig(sparsity=0.5, remove_dead_units=True)).streams
    assert not Prune(PruneConfig(sparsity=0.5, sensitivity={"sparsities": [0.5], "layers": []})).streams


@pytest.mark.parametrize("name", ["digits_cnn.onnx", "digits_transformer.onnx"])
def test_float_models_op_counts_are_read_without_prepacking_and_come_out_the_same(name, tmp_path, monkeypatch):
    from conftest import SAMPLES

    from onnxshrink import runtime

    path = SAMPLES / name
    assert not runtime._quantized(path)
    counts = runtime.optimized_op_counts(path)
    monkeypatch.setattr(runtime, "_quantized", lambda model: True)  # prepacking on, as before
    assert runtime.optimized_op_counts(path) == counts


# ---------------------------------------------------------------- unpack


def test_unpack_of_an_external_pack_writes_one_tensor_at_a_time(external, tmp_path, monkeypatch):
    from onnxshrink import model as model_io

    api.pack(external, tmp_path / "m.shrink")
    decode, alive, most = packing._decode_tensor, [], [0]

    def watched(*args, **kwargs):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        owner = np.frombuffer(decode(*args, **kwargs), np.uint8).copy()
        alive.append(weakref.ref(owner))
        return memoryview(owner)

    monkeypatch.setattr(packing, "_decode_tensor", watched)
    monkeypatch.setattr(api.model_io, "load", lambda *a, **k: pytest.fail("the pack was loaded whole"))
    before = tree(tmp_path)
    (tmp_path / "out").mkdir()
    api.unpack(tmp_path / "m.shrink", tmp_path / "out" / "u.onnx")
    monkeypatch.undo()
    assert len(alive) >= 5 and most[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["u.onnx", "u.onnx.data"]
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == before
    # What the in-memory unpack wrote (the whole model decoded, then model.save with external data).
    model_io.save(api.load(tmp_path / "m.shrink"), tmp_path / "whole.onnx", external_data=True)
    assert onnx.load(str(tmp_path / "out" / "u.onnx")).SerializeToString() == \
        onnx.load(str(tmp_path / "whole.onnx")).SerializeToString() == api.load(external).SerializeToString()
    graph = onnx.load(str(tmp_path / "out" / "u.onnx"), load_external_data=False)
    external_names = {t.name for t in graph.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    whole = onnx.load(str(tmp_path / "whole.onnx"), load_external_data=False)
    assert external_names == {t.name for t in whole.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def test_unpack_of_a_damaged_external_pack_leaves_the_existing_output_alone(external, tmp_path):
    from onnxshrink.errors import ModelLoadError

    api.pack(external, tmp_path / "m.shrink")
    data = bytearray((tmp_path / "m.shrink").read_bytes())
    data[-40] ^= 0xFF  # inside the last tensor record
    (tmp_path / "bad.shrink").write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    (out / "u.onnx").write_bytes(b"keep me")
    with pytest.raises(ModelLoadError, match="corrupted pack"):
        api.unpack(tmp_path / "bad.shrink", out / "u.onnx", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["u.onnx"] and (out / "u.onnx").read_bytes() == b"keep me"
