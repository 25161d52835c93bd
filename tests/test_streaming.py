"""Streaming quantize (onnxshrink.streaming): a model whose weights live in external data is quantized one
weight at a time, with the same result as the in-memory path, written atomically, never loaded whole."""

from __future__ import annotations

import errno
import json
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import invoke, tree
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import api, streaming
from onnxshrink.errors import EXIT_OUTPUT, ModelLoadError
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig
from onnxshrink.validate import Thresholds, ValidateConfig

CONFIGS = {
    "int8": QuantizeConfig(),
    # The test model's layers are small enough for the folded form (int8 storage, float kernels); this one keeps
    # the integer kernels, so both ways of writing int8 are streamed.
    "int8-asym-per-tensor": QuantizeConfig(per_channel=False, symmetric=False, integer_min_macs=0),
    "int4": BlockwiseConfig(bits=4, block_size=32),
    "int8-blockwise-asym": BlockwiseConfig(bits=8, block_size=16, symmetric=False),
}


def make_model() -> onnx.ModelProto:
    """About 0.5 MB of weights: MatMul+Add, a Gemm with transB, alpha and beta (its bias is read, scaled and
    written), a weight two MatMuls share, and a Constant node whose tensor prepare() moves to an initializer."""
    rng = np.random.default_rng(3)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [weight("w0", 64, 512), weight("b0", 512), weight("w1", 128, 512), weight("c1", 128),
             weight("w2", 128, 128), weight("w3", 128, 16)]
    shift = numpy_helper.from_array(rng.standard_normal((128,)).astype(np.float32), "shift_value")
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
        helper.make_node("Add", ["m0", "b0"], ["a0"], name="fc0_bias"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "c1"], ["g1"], name="fc1", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Constant", [], ["shift"], name="shift", value=shift),
        helper.make_node("Add", ["g1", "shift"], ["s1"], name="shift_add"),
        helper.make_node("MatMul", ["s1", "w2"], ["m2"], name="fc2"),
        helper.make_node("MatMul", ["m2", "w2"], ["m3"], name="fc2_again"),
        helper.make_node("MatMul", ["m3", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "streamed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def external(tmp_path) -> Path:
    """The model with every initializer in `model.onnx.data` (the Constant's tensor stays in the graph)."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(make_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def tensors(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # with its external data
    return {t.name: numpy_helper.to_array(t) for g in _graphs(model) for t in g.initializer}


def _graphs(model):
    from onnxshrink.model import iter_graphs

    return list(iter_graphs(model.graph))


def in_memory(monkeypatch, *args, **kwargs):
    """The same command with streaming turned off: the in-memory path on the same input file."""
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "streams", lambda *a: False)
        return api.quantize(*args, **kwargs)


class Probe:
    """Watches a streaming run: weights read from disk still alive when the next is read, and tensors the
    pass added that hold their bytes in the graph (in memory) instead of in the output's data file."""

    def __init__(self, monkeypatch):
        self.reads = 0
        self.most_alive = 0  # weights read earlier and still referenced, at the moment the next one is read
        self.held_bytes = 0  # most bytes in memory in tensors the pass added, seen at any read or add
        self.models = []
        self._alive: list[weakref.ref] = []
        self._inline: set[str] = set()
        read, add = streaming.StreamingStore.read, streaming.StreamingStore.add
        probe = self

        def watched_read(store, tensor):
            probe._look()
            array = read(store, tensor)
            probe.reads += 1
            probe._alive.append(weakref.ref(array))
            return array

        def watched_add(store, graph, array, name):
            add(store, graph, array, name)
            probe._look()

        monkeypatch.setattr(streaming.StreamingStore, "read", watched_read)
        monkeypatch.setattr(streaming.StreamingStore, "add", watched_add)
        for module in ("onnxshrink.passes.quantize", "onnxshrink.passes.quantize_blockwise"):
            begin = __import__(module, fromlist=["begin_pass"]).begin_pass

            def watched_begin(model, name, options, begin=begin):
                copy, report = begin(model, name, options)
                probe.models.append(copy)
                probe._inline |= {t.name for g in _graphs(copy) for t in g.initializer if t.HasField("raw_data")}
                return copy, report

            monkeypatch.setattr(f"{module}.begin_pass", watched_begin)

    def _look(self):
        self.most_alive = max(self.most_alive, sum(1 for ref in self._alive if ref() is not None))
        for model in self.models:
            held = sum(len(t.raw_data) for g in _graphs(model) for t in g.initializer if t.name not in self._inline)
            self.held_bytes = max(self.held_bytes, held)


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_streamed_output_equals_in_memory_output(external, tmp_path, monkeypatch, mode):
    reads = []
    read = streaming.StreamingStore.read
    monkeypatch.setattr(streaming.StreamingStore, "read", lambda store, t: reads.append(t.name) or read(store, t))
    streamed = api.quantize(external, tmp_path / "streamed.onnx", CONFIGS[mode], run_validation=False)
    assert reads, "the streaming path was not taken"
    assert streaming.NOTE in streamed.notes
    memory = in_memory(monkeypatch, external, tmp_path / "memory.onnx", CONFIGS[mode], run_validation=False)
    assert streaming.NOTE not in memory.notes
    a, b = tensors(tmp_path / "streamed.onnx"), tensors(tmp_path / "memory.onnx")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    graph_a = onnx.load(str(tmp_path / "streamed.onnx"), load_external_data=False)
    graph_b = onnx.load(str(tmp_path / "memory.onnx"), load_external_data=False)
    assert [n.SerializeToString() for n in graph_a.graph.node] == [n.SerializeToString() for n in graph_b.graph.node]
    assert list(graph_a.metadata_props) == list(graph_b.metadata_props)
    assert [(layer.node, layer.action, layer.bytes_before, layer.bytes_after) for layer in streamed.passes[0].layers] == \
           [(layer.node, layer.action, layer.bytes_before, layer.bytes_after) for layer in memory.passes[0].layers]
    assert streamed.runtime == memory.runtime and streamed.runtime["all_quantized_layers_fused"]


def test_streamed_output_is_external_and_runs_in_onnxruntime(external, tmp_path, monkeypatch):
    import onnxruntime as ort

    out = tmp_path / "q.onnx"
    integer = QuantizeConfig(integer_min_macs=0)  # integer kernels, whatever the layer size
    api.quantize(external, out, integer, run_validation=False)
    in_memory(monkeypatch, external, tmp_path / "m.onnx", integer, run_validation=False)
    graph = onnx.load(str(out), load_external_data=False)
    external_tensors = [t for g in _graphs(graph) for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external_tensors and all(t.external_data[0].value == "q.onnx.data" for t in external_tensors)
    assert all(len(t.raw_data) < streaming.INLINE_LIMIT for g in _graphs(graph) for t in g.initializer)
    assert graph.graph.node[0].op_type == "DynamicQuantizeLinear"
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion can hide a difference
    got = ort.InferenceSession(str(out), plain).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), plain).run(None, {"x": x})[0]
    reference = ort.InferenceSession(str(external), plain).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()


def test_input_files_unchanged(external, tmp_path):
    before = tree(external.parent)
    api.quantize(external, tmp_path / "q8.onnx", run_validation=False)
    api.quantize(external, tmp_path / "q4.onnx", BlockwiseConfig(bits=4), run_validation=False)
    assert tree(external.parent) == before


def test_one_weight_in_memory_at_a_time(external, tmp_path, monkeypatch):
    """No weight read from disk outlives the next read, and no tensor the pass adds keeps its bytes in the graph;
    nothing reads every external tensor into the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("external data read whole")

    monkeypatch.setattr("onnxshrink.model.read_external_data", refuse)
    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", refuse)
    for name, config in CONFIGS.items():
        probe = Probe(monkeypatch)
        api.quantize(external, tmp_path / f"{name}.onnx", config, run_validation=False)
        assert probe.reads >= 4, name
        assert probe.most_alive == 0, name
        assert probe.held_bytes < streaming.INLINE_LIMIT * 8, name  # a few scales and zero points of < 1 KiB
        monkeypatch.undo()
        monkeypatch.setattr("onnxshrink.model.read_external_data", refuse)
        monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model", refuse)


def test_probe_catches_a_pass_that_keeps_weights(external, tmp_path, monkeypatch):
    """The probe above can fail: a store that keeps what it reads, or keeps new tensors in the graph, is caught."""
    kept = []
    read = streaming.StreamingStore.read
    monkeypatch.setattr(streaming.StreamingStore, "read", lambda store, t: kept.append(read(store, t)) or kept[-1])
    monkeypatch.setattr(streaming.StreamingStore, "add", streaming.TensorStore.add)
    probe = Probe(monkeypatch)
    api.quantize(external, tmp_path / "q.onnx", run_validation=False)
    assert probe.most_alive >= 3
    assert probe.held_bytes > 100_000


def test_existing_output_survives_a_failure(external, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    integer = QuantizeConfig(integer_min_macs=0)  # so that quantize_int8 runs for every layer
    api.quantize(external, out, integer, run_validation=False)
    before = tree(tmp_path)
    from onnxshrink.passes import quantize as quantize_pass

    calls = []
    real = quantize_pass.quantize_int8

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_pass, "quantize_int8", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        api.quantize(external, out, integer, force=True, run_validation=False)
    assert tree(tmp_path) == before  # the old output and its data intact, no temporary files left


def test_disk_full_is_one_line_exit_5(external, tmp_path, monkeypatch, runner):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"an older q.onnx\n")
    before = tree(tmp_path)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "_copy_range", full)
    result = invoke(runner, "quantize", external, "-o", out, "--force", "--no-validate")
    assert result.exit_code == EXIT_OUTPUT, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {out}: cannot write (No space left on device)"]
    assert tree(tmp_path) == before


def test_failed_validation_writes_failed_model_with_its_own_data(external, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    config = ValidateConfig(samples=4, latency=False, thresholds=Thresholds(max_drift=0.0))
    report = api.quantize(external, out, validation=config)
    assert not report.validation.passed
    failed = tmp_path / "q.failed.onnx"
    assert report.output == str(failed) and not out.exists() and not (tmp_path / "q.onnx.data").exists()
    graph = onnx.load(str(failed), load_external_data=False)
    assert {e.value for g in _graphs(graph) for t in g.initializer for e in t.external_data if e.key == "location"} == \
           {"q.failed.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.failed.onnx", "q.failed.onnx.data"]
    memory = in_memory(monkeypatch, external, tmp_path / "m.onnx", run_validation=False)
    assert memory.output
    a, b = tensors(failed), tensors(tmp_path / "m.onnx")
    assert all(a[name].tobytes() == b[name].tobytes() for name in b)


def test_cli_streams_and_says_so(external, tmp_path, runner):
    result = invoke(runner, "quantize", external, "-o", tmp_path / "q.onnx", "--bits", "4", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert streaming.NOTE in report["notes"]
    assert (tmp_path / "q.onnx.data").is_file()
    assert report["runtime"]["all_quantized_layers_fused"]


def test_gptq_and_single_file_models_take_the_in_memory_path(external, tmp_path):
    from onnxshrink.passes.quantize_blockwise import QuantizeBlockwise
    from onnxshrink.passes.quantize import QuantizeDynamic

    single = tmp_path / "single.onnx"
    onnx.save_model(make_model(), str(single))
    weightless = onnx.load(str(external), load_external_data=False)
    assert streaming.streams(weightless, QuantizeDynamic())
    assert streaming.streams(weightless, QuantizeBlockwise(BlockwiseConfig(bits=4)))
    assert not streaming.streams(onnx.load(str(single)), QuantizeDynamic())
    gptq = QuantizeBlockwise.__new__(QuantizeBlockwise)
    gptq.config = BlockwiseConfig(algorithm="gptq")
    assert not gptq.streams
    report = api.quantize(single, tmp_path / "q.onnx", run_validation=False)
    assert streaming.NOTE not in report.notes


def test_truncated_weight_is_a_load_error(external, tmp_path):
    """A length that disagrees with the tensor's shape: a one-line load error, not a reshape traceback."""
    graph = onnx.load(str(external), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.name == "w0")
    next(e for e in tensor.external_data if e.key == "length").value = str(64 * 512 * 4 - 4)
    onnx.save_model(graph, str(external))
    with pytest.raises(ModelLoadError, match="does not match its shape"):
        api.quantize(external, tmp_path / "q.onnx", run_validation=False)


def test_quantizing_the_output_again_changes_nothing(external, tmp_path):
    api.quantize(external, tmp_path / "q.onnx", run_validation=False)
    again = api.quantize(tmp_path / "q.onnx", tmp_path / "qq.onnx", run_validation=False)
    assert not again.passes[0].changed
    a, b = tensors(tmp_path / "q.onnx"), tensors(tmp_path / "qq.onnx")
    assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_an_unreadable_input_data_file_is_an_input_error(external, tmp_path, monkeypatch):
    """Streamed, the input's data file is read during the pass: failing to read it names the input (exit 3), not
    the output (exit 5), and leaves nothing behind."""
    real_open = open

    def refuse(path, mode="r", *args, **kwargs):
        if str(path).endswith(".data") and "r" in mode and Path(path).parent == external.parent:
            raise PermissionError(13, "Permission denied")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(streaming, "open", refuse, raising=False)
    before = tree(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot read external data .*Permission denied"):
        api.quantize(external, tmp_path / "q.onnx", run_validation=False)
    assert tree(tmp_path) == before
