"""Pricing and clustering a large model hold what they use (issue 15, item 5): each capture chunk's X^T X let go
once its layers are priced, the sensitivity weights kept as indices, the model's own graph made overridable for
the session instead of a copy, long rows binned and rounded in slices, and freed heap pages handed back."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from conftest import build_model, float_value, make_mlp, save_model
from onnxshrink import compress_plan, memory, packing, runtime
from onnxshrink import data as data_mod
from onnxshrink import model as model_io
from onnxshrink.cli import app
from onnxshrink.algorithms import codebook
from onnxshrink.passes.common import Site, initializer_owners
from onnxshrink.passes.prune_common import describe
from onnxshrink.weights import find_tensors


def _calibrated_mlp(tmp_path):
    path = save_model(make_mlp((32, 64, 48, 10), seed=3), tmp_path / "mlp.onnx")
    x = np.random.default_rng(4).standard_normal((24, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", input=x)
    return path, tmp_path / "cal.npz"


def test_assign_in_slices_gives_the_same_indices(monkeypatch):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 101)).astype(np.float32)
    values[:, ::7] = 0.0
    books = np.sort(rng.standard_normal((3, 9)), axis=1)
    books[:, 0] = 0.0
    whole = codebook.assign(values, books, reserve_zero=True)
    monkeypatch.setattr(codebook, "SLICE", 10)  # 3 values a row at a time
    sliced = codebook.assign(values, books, reserve_zero=True)
    assert sliced.dtype == np.int64 and np.array_equal(sliced, whole)
    assert np.all(sliced[:, ::7] == 0) and np.all(sliced[values != 0] > 0)


def test_a_long_row_is_binned_in_slices_to_the_same_codebook(monkeypatch):
    values = np.random.default_rng(1).standard_normal((1, 4 * codebook.BINS + 999))
    whole = codebook.fit(values, 16, form="entropy")
    monkeypatch.setattr(codebook, "SLICE", 1000)
    sliced = codebook.fit(values, 16, form="entropy")
    assert sliced.shape == whole.shape and np.allclose(sliced, whole, rtol=1e-9, atol=1e-12)


def test_pricing_chunk_by_chunk_prices_as_one_capture(tmp_path, monkeypatch):
    path, cal = _calibrated_mlp(tmp_path)
    together = compress_plan.price_layers(path, cal)
    monkeypatch.setattr(compress_plan, "GRAM_ENTRIES", 1)  # a capture run per layer, each X^T X dropped after
    apart = compress_plan.price_layers(path, cal)
    assert together.runs == 1 and apart.runs == len(apart.layers) == 3
    for one, other in zip(together.layers, apart.layers):
        assert one.node == other.node and one.data_aware and other.data_aware
        assert one.drift is not None and abs(one.drift - other.drift) <= 1e-6 * max(one.drift, 1e-9)
        for bits in one.errors:
            assert abs(one.errors[bits] - other.errors[bits]) <= 1e-6 * max(one.errors[bits], 1e-12)


def test_the_sensitivity_session_overrides_the_models_own_weights_then_puts_its_inputs_back(tmp_path, monkeypatch):
    path, cal = _calibrated_mlp(tmp_path)
    loaded, seen = [], []
    real_load, real_session = compress_plan.model_io.load, runtime.make_session

    def load(p):
        loaded.append(real_load(p))
        return loaded[-1]

    def make_session(model, *args, **kwargs):
        if hasattr(model, "ByteSize"):  # a ModelProto (the captures hand over InMemoryModels)
            seen.append([value.name for value in model.graph.input])
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(compress_plan.model_io, "load", load)
    monkeypatch.setattr(runtime, "make_session", make_session)
    prices = compress_plan.price_layers(path, cal)
    assert all(layer.drift is not None for layer in prices.layers)
    weights = {"fc0.weight", "fc1.weight", "fc2.weight"}
    assert any(weights <= set(names) for names in seen)  # the weights were fed, not copied into a second model
    assert [value.name for value in loaded[0].graph.input] == ["input"]


def test_kept_indices_decode_to_the_priced_weight_in_the_initializers_layout():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 10)).astype(np.float32)  # Gemm transB: [N, K] stored
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1, alpha=0.5)
    model = build_model([node], [float_value("x", [2, 10])], [float_value("y", [2, 6])], [numpy_helper.from_array(w, "w")])
    owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
    layer = describe(Site(model.graph, node, "g", "w"), owners, records, {"y"})
    view = w.T.astype(np.float64) * 0.5  # the [K, N] matrix the layer multiplies by
    for per_channel in (False, True):
        _, kept = compress_plan._layer_errors(view, None, (4,), 4, per_channel=per_channel)
        idx, books, channel, shape = kept
        assert idx.dtype == np.uint8 and channel == per_channel and shape == view.shape
        decoded = codebook.decode(idx.astype(np.int64), books)
        matrix = decoded.T if per_channel else decoded.reshape(shape)
        value = compress_plan._Decoded(layer, *kept).value()
        assert value.dtype == np.float32 and value.shape == w.shape
        assert np.allclose(value, (matrix.T / 0.5).astype(np.float32))
        assert np.abs(value - w).max() < 0.5 * np.abs(w).max()  # near the weight it codes


def test_release_is_safe_to_call_anywhere():
    memory.release()
    memory.release()
    assert memory._trim is not None  # looked up once: glibc's function, or False where there is none


def test_validate_runs_a_pack_without_loading_it_whole(tmp_path, monkeypatch):
    """A pack is decoded once, its large weights straight into arrays for onnxruntime (model.session_source):
    neither loaded into a ModelProto nor serialized again; the report is the one its ONNX file gets."""
    import onnxshrink
    monkeypatch.chdir(tmp_path)
    save_model(make_mlp(widths=(64, 256, 256, 10), seed=3), tmp_path / "mlp.onnx")  # 64 KiB weights: records
    onnxshrink.pack("mlp.onnx", "mlp.shrink")
    loaded, decoded = [], []
    real_load, real_unpack = model_io.load, packing.unpack_model
    monkeypatch.setattr(model_io, "load", lambda path, *a, **k: loaded.append(str(path)) or real_load(path, *a, **k))
    monkeypatch.setattr(packing, "unpack_model", lambda data, place=None: decoded.append(1) or real_unpack(data, place))
    packed = onnxshrink.validate("mlp.onnx", "mlp.shrink")
    assert "mlp.shrink" not in loaded and loaded == ["mlp.onnx"]
    assert len(decoded) == 1
    plain = onnxshrink.validate("mlp.onnx", "mlp.onnx")
    assert packed.outputs == plain.outputs and packed.outputs  # the same figures: lossless, and equal
    assert packed.size["candidate"] == (tmp_path / "mlp.shrink").stat().st_size < plain.size["candidate"]


def test_run_source_lets_go_of_an_onnx_files_weights(tmp_path):
    """For its signature and nodes a model needs no weights: the large ones held in an ONNX file become
    references, the small ones (shapes, axes) stay, and onnxruntime reads the file itself."""
    path = save_model(make_mlp(widths=(64, 256, 256, 10), seed=3), tmp_path / "mlp.onnx")
    whole = model_io.load(path)
    source, light = model_io.run_source(path)
    assert source == str(path)
    sizes = {t.name: len(t.raw_data) for t in whole.graph.initializer}
    kept = {t.name: t for t in light.graph.initializer}
    assert set(kept) == set(sizes) and any(n >= model_io.MIN_ARRAY_BYTES for n in sizes.values())
    for name, size in sizes.items():
        assert (len(kept[name].raw_data) == 0) == (size >= model_io.MIN_ARRAY_BYTES)
        assert list(kept[name].dims) == list(next(t.dims for t in whole.graph.initializer if t.name == name))
    assert light.ByteSize() < whole.ByteSize() // 10
    assert data_mod.input_specs(light) == data_mod.input_specs(whole)
    assert list(light.graph.node) == list(whole.graph.node)


def test_a_pack_onnxruntime_refuses_fails_validate_as_its_onnx_file_does(tmp_path, monkeypatch):
    """validate skips the checker for a pack that runs; where onnxruntime refuses, the checker's reason is asked
    for, so the .shrink and the .onnx of one model fail with the same exit code."""
    model = make_mlp(seed=1)
    model.graph.node[0].op_type = "NoSuchOp"
    monkeypatch.chdir(tmp_path)
    save_model(make_mlp(seed=1), tmp_path / "good.onnx")
    onnx.save(model, "bad.onnx")
    with open("bad.shrink", "wb") as stream:
        packing.pack_model(model, stream, packing.PackReport("pack", "bad.onnx", "bad.shrink"))
    runner = CliRunner()
    codes = []
    for candidate in ("bad.onnx", "bad.shrink"):
        result = runner.invoke(app, ["validate", "good.onnx", candidate])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output and "NoSuchOp" in result.output
        codes.append(result.exit_code)
    assert codes[0] == codes[1] == 3


def test_a_pass_and_what_it_fitted_from_are_gone_before_the_output_is_loaded(tmp_path, monkeypatch):
    """cluster keeps the original and its captures (RoundCapture) for as long as the pass lives: on MPNet that put
    the output's onnxruntime check on top of them (2.63 GB); the command lets go of the pass first."""
    import gc
    import weakref

    from onnxshrink import api
    from onnxshrink.passes import cluster

    path, cal = _calibrated_mlp(tmp_path)
    passes, alive = [], []
    real_call, real_kernels = cluster.Cluster.__call__, api._runtime_kernels

    def call(self, model):
        passes.append(weakref.ref(self))
        return real_call(self, model)

    def kernels(*args, **kwargs):
        gc.collect()
        alive.append(any(ref() is not None for ref in passes))
        return real_kernels(*args, **kwargs)

    monkeypatch.setattr(cluster.Cluster, "__call__", call)
    monkeypatch.setattr(api, "_runtime_kernels", kernels)
    report = api.cluster(path, tmp_path / "out.onnx", cluster.ClusterConfig(bits=4), calibration=cal,
                         run_validation=False)
    assert report.passes[0].changed and passes and alive == [False]
