"""Pricing and clustering a large model hold what they use (issue 15, item 5): each capture chunk's X^T X let go
once its layers are priced, the sensitivity weights kept as indices, the model's own graph made overridable for
the session instead of a copy, long rows binned and rounded in slices, and freed heap pages handed back."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from conftest import build_model, float_value, make_mlp, save_model
from onnxshrink import compress_plan, memory, runtime
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
