"""cluster: weight sharing (uint8 indices into float codebooks), its numerics in onnxruntime, what it skips, and pack."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, assert_bad_option, build_model, count_captures, float_value, invoke, make_mlp, save_model
from onnxshrink import api, session as packed_session
from onnxshrink.algorithms import codebook
from onnxshrink.data import load_npz, input_specs
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.runtime import make_session, optimized_op_counts

MLP = SAMPLES / "digits_mlp.onnx"


def ops(model):
    return Counter(n.op_type for g in [model.graph] for n in g.node)


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def decoded_weights(model) -> dict[str, np.ndarray]:
    """Consumer input name -> the weight the clustered graph decodes, computed in numpy from its initializers."""
    values = inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for gather in (n for n in model.graph.node if n.op_type == "Gather"):
        index = producers[gather.input[1]]
        offsets = 0
        if index.op_type == "Add":
            offsets = values[index.input[1]]
            index = producers[index.input[0]]
        idx = values[index.input[0]].astype(np.int64) + offsets
        data = producers.get(gather.input[0])
        book = values[data.input[0]].reshape(-1) if data is not None else values[gather.input[0]]
        out[gather.output[0]] = book[idx]
        for mul in (n for n in model.graph.node if n.op_type == "Mul" and n.input[0] == gather.output[0]):
            cast = producers[mul.input[1]]  # a table's row scales, a layer's channel scales: fp16 behind a Cast
            out[mul.output[0]] = out.pop(gather.output[0]) * values[cast.input[0]].astype(np.float32)
    return out


def with_weights(model, decoded) -> onnx.ModelProto:
    """The original model with each clustered weight replaced by its decoded value (the numpy reference)."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for init in reference.graph.initializer:
        if init.name + "_decoded" in decoded:
            init.CopyFrom(numpy_helper.from_array(decoded[init.name + "_decoded"].astype(np.float32), init.name))
    return reference


def run(model, feed, optimize=True):
    return make_session(model, optimize=optimize).run(None, feed)[0]


def conv_gemm_model(seed=3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w_conv = (rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32)
    b_conv = (rng.standard_normal(16) / 10).astype(np.float32)
    w_gemm = (rng.standard_normal((10, 16 * 6 * 6)) / 24).astype(np.float32)
    b_gemm = (rng.standard_normal(10) / 10).astype(np.float32)
    return build_model(
        [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1, alpha=0.5)],
        [float_value("x", ["n", 4, 8, 8])], [float_value("y", ["n", 10])],
        [numpy_helper.from_array(a, n) for n, a in
         (("conv.weight", w_conv), ("conv.bias", b_conv), ("fc.weight", w_gemm), ("fc.bias", b_gemm))])


# ---- the k-means itself -------------------------------------------------------------------

def test_kmeans_matches_brute_force_lloyd_and_beats_uniform_rounding():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1, 3000))
    books = codebook.fit(values, 8)
    ours = np.mean((values - codebook.decode(codebook.assign(values, books), books)) ** 2)
    best = np.inf
    for seed in range(10):  # plain Lloyd from random starts, one weight at a time
        c = np.sort(np.random.default_rng(seed).choice(values[0], 8, replace=False))
        for _ in range(200):
            nearest = np.argmin(np.abs(values[0][:, None] - c[None]), axis=1)
            c = np.array([values[0][nearest == j].mean() if np.any(nearest == j) else c[j] for j in range(8)])
        best = min(best, np.mean((values[0] - c[np.argmin(np.abs(values[0][:, None] - c[None]), axis=1)]) ** 2))
    assert ours <= best * 1.001
    assert ours < 0.5 * codebook.uniform_mse(values, 8)
    assert np.all(np.diff(books[0]) >= 0)


def test_kmeans_rows_weights_zeros_and_long_rows():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 500))
    values[rng.random(values.shape) < 0.4] = 0.0
    books = codebook.fit(values, 4, reserve_zero=True)
    idx = codebook.assign(values, books, reserve_zero=True)
    assert np.all(books[:, 0] == 0) and np.all((idx == 0) == (values == 0))
    # one row at a time gives the same codebooks as all rows at once
    for r in range(6):
        np.testing.assert_allclose(codebook.fit(values[r:r + 1], 4, reserve_zero=True), books[r:r + 1], rtol=1e-9)
    # weights pull centroids towards the heavily weighted values
    row = np.concatenate([np.full(100, -1.0), np.full(100, 1.0), np.linspace(2, 3, 100)])[None]
    weights = np.concatenate([np.ones(200), np.full(100, 50.0)])[None]
    assert codebook.fit(row, 2, weights)[0, 1] == pytest.approx(2.5) and codebook.fit(row, 2)[0, 1] == pytest.approx(1.75)
    # long rows are fitted on a histogram: still close to uniform-quantile optimum and fast
    big = rng.standard_normal((1, 300_000))
    big_books = codebook.fit(big, 16)
    assert np.mean((big - codebook.decode(codebook.assign(big, big_books), big_books)) ** 2) < 0.0100


@pytest.mark.parametrize("per_column", [False, True])
def test_refit_recovers_codebook_values_and_bias_that_produced_the_outputs(per_column):
    from onnxshrink.algorithms.reconstruct import Gram

    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 20))
    idx = rng.integers(0, 8, (20, 6))
    true = rng.standard_normal((6 if per_column else 1, 8))
    true[:, 0] = 0.0  # the reserved zero entry
    w = codebook.decode(idx.T, true).T if per_column else true[0][idx]
    bias = rng.standard_normal(6)
    gram = Gram(20, 6, bias=True)
    gram.add(x, x @ w + bias)
    start = true + rng.standard_normal(true.shape) * 0.3
    start[:, 0] = 0.0
    result = codebook.refit(idx, start, gram, np.zeros(6), keep_zero=True)
    used = np.zeros_like(true, dtype=bool)
    for j in range(6):
        used[j if per_column else 0, idx[:, j]] = True
    np.testing.assert_allclose(result.codebooks[used], true[used], atol=1e-3)
    np.testing.assert_allclose(result.bias, bias, atol=1e-3)
    assert np.all(result.codebooks[:, 0] == 0) and result.error_after < 1e-3 < result.error_before


def test_refit_solves_for_values_that_the_channel_scales_multiply():
    from onnxshrink.algorithms.reconstruct import Gram

    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 20))
    idx = rng.integers(0, 8, (20, 6))
    true = rng.standard_normal((1, 8))
    scale = np.array([0.1, 0.5, 1.0, 2.0, 5.0, 20.0])
    gram = Gram(20, 6, bias=False)
    gram.add(x, x @ (true[0][idx] * scale))
    start = true + rng.standard_normal(true.shape) * 0.3
    result = codebook.refit(idx, start, gram, column_scale=scale)
    np.testing.assert_allclose(result.codebooks, true, atol=1e-3)
    assert result.error_after < 1e-3 < result.error_before
    unscaled = codebook.refit(idx, start, gram)  # the same values read as weights: a worse fit, found worse
    assert unscaled.error_before > result.error_before and unscaled.error_after > result.error_after


# ---- the graph it writes -----------------------------------------------------------------

def test_wide_layers_get_channel_scales_that_onnxruntime_decodes():
    model = make_mlp((300, 40, 10), seed=6)
    w = numpy_helper.to_array(model.graph.initializer[0])
    spread = np.geomspace(0.05, 5.0, w.shape[1]).astype(np.float32)  # output channels spanning 100x in scale
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w * spread, "fc0.weight"))
    errors = {}
    for scales in (None, False, True):
        clustered, report = Cluster(ClusterConfig(bits=4, channel_scales=scales))(model)
        values = inits(clustered)
        scaled = {name[:-len("_channel_scale")] for name in values if name.endswith("_channel_scale")}
        # by default only the layer of 256 inputs or more: a scale costs 16/K bits a weight
        assert scaled == ({"fc0.weight"} if scales is None else {"fc0.weight", "fc1.weight"} if scales else set())
        for name in scaled:
            assert values[name + "_channel_scale"].dtype == np.float16
            assert values[name + "_channel_scale"].shape == (1, numpy_helper.to_array(model.graph.initializer[
                [t.name for t in model.graph.initializer].index(name)]).shape[1])
        assert ("scale a channel" in report.layers[0].action) == (scales is not False)
        decoded = decoded_weights(clustered)["fc0.weight_decoded"]
        errors[scales] = float(np.mean(np.linalg.norm(decoded - w * spread, axis=0) / np.linalg.norm(w * spread, axis=0)))
        x = np.random.default_rng(7).standard_normal((8, 300)).astype(np.float32)
        reference = with_weights(model, decoded_weights(clustered))
        for optimize in (False, True):
            np.testing.assert_allclose(run(clustered, {"input": x}, optimize), run(reference, {"input": x}, False),
                                       rtol=1e-4, atol=1e-5)
        onnx.checker.check_model(clustered, full_check=True)
    # one codebook for channels 100x apart loses the small ones (their relative error); scaled, each keeps 16 levels
    assert errors[None] < 0.5 * errors[False], errors



@pytest.mark.parametrize("per", ["layer", "channel"])
def test_graph_written_per_layer_and_per_channel(per):
    model = make_mlp((64, 96, 80, 10), seed=1)
    clustered, report = Cluster(ClusterConfig(bits=3, per=per))(model)
    counts = ops(clustered)
    assert counts["Gather"] == 3 and counts["Cast"] == 3 and counts["MatMul"] == 3
    assert counts.get("Add", 0) == 3 + (3 if per == "channel" else 0) and counts.get("Reshape", 0) == (3 if per == "channel" else 0)
    values = inits(clustered)
    for name, shape in (("fc0.weight", (64, 96)), ("fc1.weight", (96, 80)), ("fc2.weight", (80, 10))):
        assert name not in values
        idx, book = values[name + "_idx"], values[name + "_codebook"]
        assert idx.dtype == np.uint8 and idx.shape == shape and idx.max() < 8
        assert book.dtype == np.float32 and book.shape == ((8,) if per == "layer" else (shape[1], 8))
    producers = {o: n for n in clustered.graph.node for o in n.output}
    for node in (n for n in clustered.graph.node if n.op_type == "MatMul"):
        assert producers[node.input[1]].op_type == "Gather"
    assert all(layer.action.startswith("codebook") for layer in report.layers)
    assert report.layers[0].bytes_after < report.layers[0].bytes_before / (3 if per == "layer" else 2)
    onnx.checker.check_model(clustered, full_check=True)
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT and len(model.graph.node) == 8  # input untouched


@pytest.mark.parametrize("per", ["layer", "channel"])
def test_numerics_equal_the_decoded_weights_in_onnxruntime(per):
    model = make_mlp((64, 96, 80, 10), seed=2)
    clustered, _ = Cluster(ClusterConfig(bits=4, per=per))(model)
    decoded = decoded_weights(clustered)
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    # pure numpy forward pass with the decoded weights
    values, h = inits(model), x
    for i in range(3):
        h = h @ decoded[f"fc{i}.weight_decoded"] + values[f"fc{i}.bias"]
        h = np.maximum(h, 0) if i < 2 else h
    for optimize in (False, True):
        np.testing.assert_allclose(run(clustered, {"input": x}, optimize), h, rtol=1e-4, atol=1e-5)
    # the decoded weights are a small codebook each: at most 16 distinct values per layer (or per column)
    w = decoded["fc1.weight_decoded"]
    assert len(np.unique(w)) <= 16 if per == "layer" else all(len(np.unique(w[:, j])) <= 16 for j in range(w.shape[1]))


@pytest.mark.parametrize("per", ["layer", "channel"])
def test_conv_and_gemm_with_alpha_run_the_decoded_weights(per):
    model = conv_gemm_model()
    clustered, report = Cluster(ClusterConfig(bits=4, per=per))(model)
    assert [layer.action.startswith("codebook") for layer in report.layers] == [True, True]
    if per == "channel":
        assert inits(clustered)["conv.weight_codebook"].shape == (16, 16)
        assert inits(clustered)["fc.weight_codebook"].shape == (10, 16)  # transB=1: channels along axis 0
    reference = with_weights(model, decoded_weights(clustered))
    x = np.random.default_rng(4).standard_normal((5, 4, 8, 8)).astype(np.float32)
    for optimize in (False, True):
        np.testing.assert_allclose(run(clustered, {"x": x}, optimize), run(reference, {"x": x}, False), rtol=1e-4, atol=1e-5)


def test_onnxruntime_folds_the_decoding_into_float_kernels():
    clustered, _ = Cluster(ClusterConfig(bits=4, per="channel"))(conv_gemm_model())
    counts = optimized_op_counts(clustered)
    assert not {"Gather", "Cast", "Reshape"} & set(counts), counts
    assert counts["Gemm"] + counts["com.microsoft.FusedGemm"] == 1
    assert sum(v for k, v in counts.items() if k.endswith("Conv")) == 1


# ---- what it skips, and why ----------------------------------------------------------------

def test_tiny_excluded_and_min_weights_are_kept_with_reasons():
    model = make_mlp((64, 96, 80, 2), seed=5)  # fc2: 80 x 2 floats, 640 B
    clustered, report = Cluster(ClusterConfig(exclude=("fc0*",), min_weights=7000))(model)
    reasons = {layer.node: (layer.action, layer.reason) for layer in report.layers}
    assert reasons["fc0/MatMul"] == ("kept", "excluded (--exclude)")
    assert reasons["fc2/MatMul"] == ("kept", "tiny (< 1 KiB)")
    assert reasons["fc1/MatMul"][0].startswith("codebook")
    _, report = Cluster(ClusterConfig(min_weights=7000))(model)
    assert {layer.node: layer.reason for layer in report.layers}["fc0/MatMul"] == "6144 weights, fewer than --min-weights 7000"
    values = inits(clustered)
    assert values["fc0.weight"].dtype == np.float32 and "fc1.weight" not in values


def test_tied_weight_is_clustered_once_and_shared():
    w = np.random.default_rng(6).standard_normal((32, 32)).astype(np.float32)
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="a"), helper.make_node("MatMul", ["a", "w"], ["y"], name="b")],
        [float_value("x", ["n", 32])], [float_value("y", ["n", 32])], [numpy_helper.from_array(w, "w")])
    clustered, report = Cluster()(model)
    assert ops(clustered)["Gather"] == 1
    matmuls = [n for n in clustered.graph.node if n.op_type == "MatMul"]
    assert matmuls[0].input[1] == matmuls[1].input[1] == "w_decoded"
    assert report.layers[1].action.endswith("(tied: clustered once)") and report.layers[1].bytes_before == 0
    x = np.random.default_rng(7).standard_normal((4, 32)).astype(np.float32)
    d = decoded_weights(clustered)["w_decoded"]
    np.testing.assert_allclose(run(clustered, {"x": x}), x @ d @ d, rtol=1e-4, atol=1e-4)


def test_weight_also_read_by_another_op_is_kept():
    w = np.random.default_rng(8).standard_normal((32, 32)).astype(np.float32)
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc"), helper.make_node("Transpose", ["w"], ["wt"], name="t"),
         helper.make_node("MatMul", ["a", "wt"], ["y"], name="fc_t")],
        [float_value("x", ["n", 32])], [float_value("y", ["n", 32])], [numpy_helper.from_array(w, "w")])
    clustered, report = Cluster()(model)
    assert not report.changed and "Gather" not in ops(clustered)
    layer = next(layer for layer in report.layers if layer.node == "fc")
    assert layer.action == "kept" and layer.reason.startswith("tied weight also read by t (Transpose), which is not clustered")


def test_weights_inside_if_branches_are_clustered():
    rng = np.random.default_rng(9)
    inner, outer = (rng.standard_normal((2, 32, 32)) / 6).astype(np.float32)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "inner"], ["t"], name="fc_then")], "then", [],
                                    [float_value("t", None)], [numpy_helper.from_array(inner, "inner")])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "outer"], ["e"], name="fc_else")], "else", [],
                                    [float_value("e", None)])
    model = build_model([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
                        [float_value("x", ["n", 32]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                        [float_value("y", ["n", 32])], [numpy_helper.from_array(outer, "outer")])
    clustered, report = Cluster()(model)
    assert sorted(layer.node for layer in report.layers if layer.action.startswith("codebook")) == ["fc_else", "fc_then"]
    onnx.checker.check_model(clustered, full_check=True)
    body = next(a.g for a in clustered.graph.node[-1].attribute if a.name == "then_branch")
    assert {i.name for i in body.initializer} == {"inner_idx", "inner_codebook"}
    x = rng.standard_normal((4, 32)).astype(np.float32)
    books = {"inner": body.initializer, "outer": clustered.graph.initializer}
    for cond, name in ((True, "inner"), (False, "outer")):
        values = {t.name: numpy_helper.to_array(t) for t in books[name]}
        w = values[name + "_codebook"][values[name + "_idx"]]
        for optimize in (False, True):
            got = run(clustered, {"x": x, "cond": np.array(cond)}, optimize)
            np.testing.assert_allclose(got, x @ w, rtol=1e-4, atol=1e-5)
    assert not {"Gather", "Cast"} & set(optimized_op_counts(clustered))


@pytest.mark.parametrize("widths", [(32, 64, 48, 10), (300, 40, 10)])  # the second: channel scales on its first layer
def test_twice_changes_nothing_more_and_quantized_models_are_left_alone(tmp_path, widths):
    once, _ = Cluster()(make_mlp(widths, seed=10))
    twice, report = Cluster()(once)
    assert not report.changed and twice.graph == once.graph
    assert "model is already clustered (weights decoded from codebooks): nothing to cluster" in report.notes
    assert all(layer.reason == "already clustered: the weight is decoded from a codebook" for layer in report.layers)
    # the other passes name it too, not "weight input is not a constant tensor"
    requantized = api.quantize(save_model(once, tmp_path / "c.onnx"), tmp_path / "cq.onnx", QuantizeConfig(integer_min_macs=0),
                               run_validation=False)
    assert not requantized.passes[0].changed
    assert [layer.reason for layer in requantized.passes[0].layers] == \
        ["already clustered: the weight is decoded from a codebook"] * (len(widths) - 1)
    api.quantize(save_model(make_mlp(seed=10), tmp_path / "m.onnx"), tmp_path / "q.onnx", QuantizeConfig(integer_min_macs=0), run_validation=False)
    _, report = Cluster()(onnx.load(str(tmp_path / "q.onnx")))
    assert not report.changed and "model is already quantized: nothing to cluster" in report.notes


def test_pruned_zeros_stay_exactly_zero_at_index_zero():
    model = make_mlp((64, 96, 80, 10), seed=11)
    rng = np.random.default_rng(11)
    original = {}
    for init in model.graph.initializer:
        if init.name.endswith("weight"):
            w = numpy_helper.to_array(init).copy()
            w[rng.random(w.shape) < 0.7] = 0.0
            original[init.name] = w
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    for per in ("layer", "channel"):
        clustered, _ = Cluster(ClusterConfig(bits=2, per=per))(model)
        values, decoded = inits(clustered), decoded_weights(clustered)
        for name, w in original.items():
            assert np.array_equal(values[name + "_idx"] == 0, w == 0)
            assert np.all(decoded[name + "_decoded"][w == 0] == 0) and np.all(decoded[name + "_decoded"][w != 0] != 0)
            book = values[name + "_codebook"]
            assert np.all(book[..., 0] == 0)


# ---- data-aware: activation weighting and refit against the original ---------------------------------

def test_activation_weighting_and_refit_reduce_output_error_on_sample_mlp():
    model = onnx.load(str(MLP))
    calibration = load_npz(SAMPLES / "digits_mlp.calib.npz", input_specs(model))
    evaluation = np.load(SAMPLES / "digits_mlp.eval.npz")
    feed = {"input": evaluation["input"]}
    reference = run(model, feed, False)
    errors = {}
    for label, config, data in (("plain", ClusterConfig(bits=3), None),
                                ("weighted", ClusterConfig(bits=3, weighting="activation", refit=False,
                                                           rounding="nearest"), calibration),
                                ("refit", ClusterConfig(bits=3, rounding="nearest"), calibration)):
        clustered, report = Cluster(config, data)(model)
        errors[label] = np.linalg.norm(run(clustered, feed, False) - reference) / np.linalg.norm(reference)
        if label == "refit":
            assert all("after refit" in layer.reason for layer in report.layers)
            assert any("refit by least squares" in note for note in report.notes)
    # The refit to the original's outputs roughly halves the error; the weighting alone is a wash here (docs).
    assert errors["refit"] < 0.7 * min(errors["plain"], errors["weighted"]), errors


def test_gptq_rounding_lowers_output_error_and_keeps_pruned_zeros_alone():
    rng = np.random.default_rng(4)
    # Correlated inputs, as a layer's activations are: errors on some inputs can cancel on others.
    x = rng.standard_normal((512, 12)) @ rng.standard_normal((12, 48)) + 0.3 * rng.standard_normal((512, 48))
    w = rng.standard_normal((48, 24)) / 7
    w[rng.random(w.shape) < 0.4] = 0.0
    for per_column in (False, True):
        rows = w.T if per_column else w.reshape(1, -1)
        books = codebook.fit(rows, 8, reserve_zero=True)
        nearest = codebook.assign(rows, books, reserve_zero=True)
        nearest = nearest.T if per_column else nearest.reshape(w.shape)
        gptq = codebook.gptq_assign(w, books, x.T @ x, reserve_zero=True)
        assert np.array_equal(gptq == 0, w == 0)  # zeros, and only zeros, at entry 0

        def error(idx):
            q = codebook.decode(idx.T, books).T if per_column else books[0][idx]
            return np.linalg.norm(x @ (w - q)) / np.linalg.norm(x @ w)

        assert error(gptq) < 0.9 * error(nearest), (per_column, error(gptq), error(nearest))
        assert not np.array_equal(gptq, nearest)


def test_gptq_rounding_lowers_the_sample_models_output_error():
    for name in ("digits_mlp", "digits_cnn"):
        model = onnx.load(str(SAMPLES / f"{name}.onnx"))
        calibration = load_npz(SAMPLES / f"{name}.calib.npz", input_specs(model))
        feed = {"input": np.load(SAMPLES / f"{name}.eval.npz")["input"]}
        reference = run(model, feed, False)
        errors = {}
        for rounding in ("nearest", "gptq"):
            clustered, report = Cluster(ClusterConfig(bits=3, rounding=rounding), calibration)(model)
            errors[rounding] = np.linalg.norm(run(clustered, feed, False) - reference) / np.linalg.norm(reference)
            assert all(f"rounded to the {'GPTQ' if rounding == 'gptq' else 'nearest'}" in layer.reason
                       for layer in report.layers if layer.action.startswith("codebook"))
        assert errors["gptq"] < 0.8 * errors["nearest"], (name, errors)


def test_other_floats_int8_stores_biases_and_norms_in_int8_and_codebooks_in_fp16(tmp_path):
    source = SAMPLES / "digits_transformer.onnx"
    half = api.cluster(source, tmp_path / "h.onnx", ClusterConfig(bits=4, float16=True), run_validation=False)
    report = api.cluster(source, tmp_path / "i.onnx", ClusterConfig(bits=4, other_floats="int8"), run_validation=False)
    model = onnx.load(report.output)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert any(n.endswith("bias_int8") for n, t in types.items() if t == TensorProto.INT8)
    assert any("norm" in n for n, t in types.items() if t == TensorProto.INT8)  # LayerNorm parameters too
    assert all(types[n] == TensorProto.FLOAT16 for n in types if n.endswith("_codebook_fp16"))
    assert not any(n.endswith("_codebook") for n in types)  # every codebook went to fp16
    assert report.runtime["codebook_decoding_left"] == 0  # the Casts and Muls fold like the codebook decoding
    assert all(" x fp16" in layer.action for layer in report.passes[0].layers if layer.action.startswith("codebook"))
    note = next(n for n in report.passes[0].notes if n.startswith("--other-floats int8"))
    assert "as int8" in note
    x = np.load(SAMPLES / "digits_transformer.eval.npz")["input"][:64]
    reference = run(onnx.load(half.output), {"input": x})
    np.testing.assert_allclose(run(model, {"input": x}), reference, rtol=0.05, atol=0.05)
    packed = [api.pack(path, tmp_path / f"{name}.shrink").size["output"] for name, path in
              (("h", half.output), ("i", report.output))]
    assert packed[1] < packed[0] - 400  # int8 halves the fp16 bytes of ~1.2k bias and norm values
    again = api.cluster(report.output, tmp_path / "again.onnx", ClusterConfig(bits=4, other_floats="int8"),
                        run_validation=False)
    assert not again.passes[0].changed


def test_other_floats_int8_falls_back_to_fp16_where_one_scale_cannot_hold_the_tensor():
    wide = np.concatenate([np.full(63, 1e-2), [5.0]]).astype(np.float32)  # int8 with one scale zeroes the small ones
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"], name="add")],
        [float_value("x", ["n", 64])], [float_value("y", ["n", 64])],
        [numpy_helper.from_array((np.random.default_rng(0).standard_normal((64, 64)) / 8).astype(np.float32), "w"),
         numpy_helper.from_array(wide, "b")])
    clustered, report = Cluster(ClusterConfig(bits=4, other_floats="int8"))(model)
    types = {t.name: t.data_type for t in clustered.graph.initializer}
    assert types.get("b_fp16") == TensorProto.FLOAT16 and "b_int8" not in types
    assert "2 as fp16" in report.notes[-1] and "as int8" not in report.notes[-1]  # the bias and the codebook


def test_four_bits_keeps_sample_mlp_accuracy_within_one_point(tmp_path):
    evaluation = np.load(SAMPLES / "digits_mlp.eval.npz")
    labels, feed = evaluation["labels"], {"input": evaluation["input"]}
    base = np.mean(np.argmax(run(onnx.load(str(MLP)), feed), -1) == labels)
    for calibration in (None, SAMPLES / "digits_mlp.calib.npz"):
        out = tmp_path / "c.onnx"
        report = api.cluster(MLP, out, ClusterConfig(bits=4), calibration=calibration, force=True, run_validation=False)
        accuracy = np.mean(np.argmax(run(onnx.load(str(out)), feed), -1) == labels)
        assert accuracy >= base - 0.01, (calibration, accuracy, base)
        assert report.runtime["codebook_decoding_left"] == 0
        assert any("folds the codebook decoding" in note for note in report.notes)


def test_library_refuses_bad_configs():
    with pytest.raises(UsageError, match="--bits 9"):
        Cluster(ClusterConfig(bits=9))
    with pytest.raises(UsageError, match="needs calibration"):
        Cluster(ClusterConfig(weighting="activation"))
    with pytest.raises(UsageError, match="--per 'row'"):
        api.cluster(MLP, None, ClusterConfig(per="row"))


# ---- CLI and pack -------------------------------------------------------------------------------

def test_cli_end_to_end_with_json(tmp_path, runner):
    output = tmp_path / "mlp.c4.onnx"
    result = invoke(runner, "cluster", MLP, "-o", output, "--json", "--calibration", SAMPLES / "digits_mlp.calib.npz",
                    "--data", SAMPLES / "digits_mlp.eval.npz", "--labels", "labels", "--max-accuracy-drop", "0.01")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "cluster" and report["passes"][0]["name"] == "cluster"
    assert report["validation"]["passed"] and report["size"]["ratio"] < 0.3
    assert report["runtime"]["codebook_decoding_left"] == 0 and report["runtime"]["quantized_layers"] == 0
    options = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}["onnxshrink.options"])
    assert options["bits"] == 4 and options["calibration"].endswith("digits_mlp.calib.npz")
    onnx.checker.check_model(str(output), full_check=True)
    # default output name, and a second run that finds nothing to cluster
    source = save_model(onnx.load(str(MLP)), tmp_path / "m.onnx")
    assert invoke(runner, "cluster", source, "--bits", "2", "--no-validate").exit_code == 0
    result = invoke(runner, "cluster", tmp_path / "m.cluster2.onnx", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    assert "nothing to cluster" in " ".join(json.loads(result.stdout)["passes"][0]["notes"])


def test_channel_scales_flag_reaches_the_pass_and_the_pack_keeps_its_output(runner, tmp_path):
    source = save_model(make_mlp((300, 40, 10), seed=8), tmp_path / "wide.onnx")
    x = np.random.default_rng(9).standard_normal((4, 300)).astype(np.float32)
    for flag, scaled in (((), True), (("--no-channel-scales",), False)):
        output = tmp_path / f"out{int(scaled)}.onnx"
        result = invoke(runner, "cluster", source, "-o", output, "--no-validate", "--json", *flag)
        assert result.exit_code == 0, result.output
        clustered = onnx.load(str(output))
        assert any(t.name.endswith("_channel_scale") for t in clustered.graph.initializer) == scaled
        assert invoke(runner, "pack", output, "-o", tmp_path / f"out{int(scaled)}.shrink").exit_code == 0
        np.testing.assert_array_equal(packed_session(str(tmp_path / f"out{int(scaled)}.shrink")).run(None, {"input": x})[0],
                                      make_session(clustered).run(None, {"input": x})[0])


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "error: --bits 9: must be between 1 and 8"),
    (["--bits", "0"], "error: --bits 0: must be between 1 and 8"),
    (["--per", "row"], "error: --per 'row': choose layer"),
    (["--weighting", "activation"], "error: --weighting activation needs calibration data (--calibration FILE.npz)"),
    (["--weighting", "maybe"], "error: --weighting 'maybe': choose none or activation"),
    (["--op-types", "Gather"], "error: --op-types: unsupported op type(s) Gather"),
    (["--keep-float", "middle"], "error: --keep-float 'middle': choose first, last or both"),
    (["--other-floats", "fp8"], "error: --other-floats 'fp8': choose fp32, fp16 or int8"),
    (["--rounding", "gptq"], "error: --rounding gptq needs calibration data (--calibration FILE.npz)"),
    (["--rounding", "stochastic"], "error: --rounding 'stochastic': choose nearest or gptq"),
    (["--calibration", "wrong.npz"], "error: wrong.npz: missing input 'input' (keys present: x)"),
    (["--calibration", "missing.npz"], "error: missing.npz: no such data file"),
])
def test_cli_bad_options_are_one_line_exit_2_or_3(tmp_path, runner, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_bad_option(runner, tmp_path, "cluster", *args, message=message)


def test_pack_codes_indices_in_about_bits_per_weight_and_pruned_clustered_is_much_smaller(tmp_path):
    for bits in (2, 4):
        api.cluster(MLP, tmp_path / f"c{bits}.onnx", ClusterConfig(bits=bits), run_validation=False)
        report = api.pack(tmp_path / f"c{bits}.onnx", tmp_path / f"c{bits}.shrink")
        coded = {t.name: t for t in report.tensors}
        largest = coded["fc2.weight_idx"]
        assert largest.encoding == "planes" and largest.coded_bits <= bits + 0.05, largest
    model = onnx.load(str(MLP))
    for init in model.graph.initializer:
        if init.name.endswith("weight"):
            w = numpy_helper.to_array(init).copy()
            w[np.abs(w) < np.quantile(np.abs(w), 0.8)] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    pruned = save_model(model, tmp_path / "pruned.onnx")
    api.cluster(pruned, tmp_path / "pruned.c4.onnx", ClusterConfig(bits=4), run_validation=False)
    plain = api.pack(pruned, tmp_path / "pruned.shrink").size["output"]
    report = api.pack(tmp_path / "pruned.c4.onnx", tmp_path / "pruned.c4.shrink")
    assert {t.encoding for t in report.tensors if t.name.endswith("_idx")} == {"sparse"}
    assert report.size["output"] < 0.4 * plain, (report.size["output"], plain)


# ---- statistics captured a round of layers at a time ------------------------------------------------

def _two_waves(k=20, seed=5):
    """x -> q, v (two MatMuls reading x, q with a bias Add) -> Add -> Relu -> o: waves {q, v} then {o}."""
    rng = np.random.default_rng(seed)
    inits_ = [numpy_helper.from_array(rng.normal(size=(k, k)).astype(np.float32), f"{n}.weight") for n in "qvo"]
    inits_.append(numpy_helper.from_array(rng.normal(size=k).astype(np.float32), "q.bias"))
    return build_model(
        [helper.make_node("MatMul", ["x", "q.weight"], ["q0"], name="q"),
         helper.make_node("Add", ["q0", "q.bias"], ["q1"], name="q_add"),
         helper.make_node("MatMul", ["x", "v.weight"], ["v"], name="v"),
         helper.make_node("Add", ["q1", "v"], ["s"], name="s"), helper.make_node("Relu", ["s"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "o.weight"], ["y"], name="o")],
        [float_value("x", ["b", k])], [float_value("y", ["b", k])], inits_)


def _calibration(model, k=20, rows=40):
    x = np.random.default_rng(6).normal(size=(rows, k)).astype(np.float32)
    name = model.graph.input[0].name
    from onnxshrink.data import Dataset

    return Dataset([{name: x[: rows // 2]}, {name: x[rows // 2:]}], None, rows, False, [])


def test_one_run_per_wave_gives_the_statistics_of_one_run_per_layer():
    from onnxshrink.passes.common import initializer_owners, select_layers  # noqa: F401
    from onnxshrink.passes.prune_common import RoundCapture, describe, teacher_gram
    from onnxshrink.weights import find_tensors

    original = _two_waves()
    data = _calibration(original)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
    outputs = {o for n in model.graph.node for o in n.output}
    from onnxshrink.passes.common import Site

    layers = [describe(Site(model.graph, node, node.name, node.input[1]), owners, records, outputs)
              for node in model.graph.node if node.op_type == "MatMul"]
    biases = {layer.name: layer.bias is not None for layer in layers}
    assert biases == {"q": True, "v": False, "o": False}
    rounds = RoundCapture(data, original, model, layers, biases, rounds=0)
    per_layer = {}
    for layer in layers:
        expected = teacher_gram(data, original, model, layer, layer, biases[layer.name])
        got = rounds.of(layer)
        for field in ("xtx", "xty", "yty", "rows"):
            np.testing.assert_allclose(getattr(got, field), getattr(expected, field), rtol=1e-10, atol=1e-8)
        per_layer[layer.name] = got
        if layer.name in ("q", "v"):  # rewrite the layer as a pass would: o's inputs must see the change
            tensor = owners[layer.weight][1]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 0.5, tensor.name))
    assert rounds.runs == 2  # {q, v} in one run of each model, then {o}
    # o's inputs changed with q and v, so its X^T X is not the original's while its teacher outputs are
    plain = teacher_gram(data, original, original, layers[2], layers[2], False)
    assert not np.allclose(per_layer["o"].xtx, plain.xtx)
    # one round for all three: o sees q and v as they were when the round ran (the block approximation)
    block = RoundCapture(data, original, original, layers, biases, rounds=1)
    for layer in layers:
        got, expected = block.of(layer), teacher_gram(data, original, original, layer, layer, biases[layer.name])
        np.testing.assert_allclose(got.xtx, expected.xtx, rtol=1e-10)
    assert block.runs == 1


def _track_captures(monkeypatch, prune_common) -> tuple[list, list]:
    """prune_common.capture counted: ([captures open now], [most open at once])."""
    real, open_now, most = prune_common.capture, [0], [0]

    def tracked(*args, **kwargs):
        def run():
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            try:
                yield from real(*args, **kwargs)
            finally:
                open_now[0] -= 1
        return run()

    monkeypatch.setattr(prune_common, "capture", tracked)
    return open_now, most


def test_the_original_and_the_model_are_never_captured_at_once(monkeypatch, tmp_path):
    """Their sessions each hold the weights twice (our arrays, onnxruntime's copy): the original's teacher outputs
    wait on disk, in a private scratch folder that is gone afterwards, while the model runs."""
    import tempfile

    from onnxshrink.passes import prune_common

    model = _two_waves()
    data = _calibration(model)
    open_now, most = _track_captures(monkeypatch, prune_common)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clustered, report = Cluster(ClusterConfig(bits=3, capture_rounds=0), data)(model)
    assert report.changed and most[0] == 1 and open_now[0] == 0
    assert not list(tmp_path.glob("onnxshrink-teacher-*"))


def test_one_layers_teacher_statistics_capture_one_model_at_a_time(monkeypatch, tmp_path):
    """teacher_gram (factorize, prune_channels, prune's refit) spills the original's outputs as teacher_grams does:
    one capture session at a time, the same X^T X and X^T Y as both captured side by side."""
    import tempfile

    from onnxshrink.passes import prune_common
    from onnxshrink.passes.common import Site, initializer_owners
    from onnxshrink.weights import find_tensors

    original = _two_waves()
    data = _calibration(original)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    owners = initializer_owners(model)
    tensor = owners["q.weight"][1]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 0.5, tensor.name))  # o's inputs move
    records, outputs = {r.name: r for r in find_tensors(model)}, {o for n in model.graph.node for o in n.output}
    o = next(prune_common.describe(Site(model.graph, n, n.name, n.input[1]), owners, records, outputs)
             for n in model.graph.node if n.name == "o")
    w0 = prune_common.matrix(o, initializer_owners(original))
    expected = prune_common.Gram(prune_common.input_size(o), w0.shape[1])
    for (batch, now), (_, before) in zip(prune_common.capture(data, model, ["r"]), prune_common.capture(data, original, ["r"])):
        expected.add(now["r"], before["r"] @ w0)
    open_now, most = _track_captures(monkeypatch, prune_common)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = prune_common.teacher_gram(data, original, model, o, o, False)
    assert most[0] == 1 and open_now[0] == 0 and not list(tmp_path.glob("onnxshrink-teacher-*"))
    assert not np.allclose(got.xtx, prune_common.teacher_gram(data, original, original, o, o, False).xtx)
    for field in ("xtx", "xty", "yty", "rows"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


@pytest.mark.parametrize("rounds", [0, 1])
def test_cluster_captures_a_round_of_layers_per_run(monkeypatch, rounds):
    from onnxshrink.passes import prune_common

    model = _two_waves()
    data = _calibration(model)
    real = prune_common.capture
    calls = count_captures(monkeypatch, prune_common)
    clustered, report = Cluster(ClusterConfig(bits=3, capture_rounds=rounds), data)(model)
    monkeypatch.setattr(prune_common, "capture", real)
    per_layer, _ = Cluster(ClusterConfig(bits=3, capture_rounds=-1), data)(model)
    # the original, then the clustered model, once per round; in one round o fits its own outputs (it is below q and
    # v), so the original runs only as far as the teachers' input x
    assert calls == ([["x"], ["x"], ["r"], ["r"]] if rounds == 0 else [["x"], ["r", "x"]])
    assert all("after refit" in layer.reason for layer in report.layers)
    feed = data.batches[0]
    if rounds == 0:  # exactly the statistics of one capture per layer: the same model
        np.testing.assert_array_equal(run(clustered, feed, False), run(per_layer, feed, False))
    else:  # o was fitted to inputs from q and v unclustered: close to, not equal to, the wave's result
        reference = run(model, feed, False)
        errors = [np.linalg.norm(run(m, feed, False) - reference) / np.linalg.norm(reference) for m in (clustered, per_layer)]
        assert errors[0] < 1.5 * errors[1], errors


def test_uniform_mse_summed_in_slices_is_the_whole_arrays_error(monkeypatch):
    """The report's uniform error is summed over column slices (a word table at once in float64 took 100+ MB)."""
    values = np.random.default_rng(3).standard_normal((3, 5000)).astype(np.float32) * [[1.0], [0.01], [5.0]]
    wide = np.asarray(values, dtype=np.float64)
    lo, hi = wide.min(axis=1, keepdims=True), wide.max(axis=1, keepdims=True)
    step = (hi - lo) / 7
    expected = np.mean((wide - (lo + np.clip(np.rint((wide - lo) / step), 0, 7) * step)) ** 2)
    whole = codebook.uniform_mse(values, 8)
    monkeypatch.setattr(codebook, "UNIFORM_SLICE", 7)
    assert codebook.uniform_mse(values, 8) == pytest.approx(expected, rel=1e-12) and whole == pytest.approx(expected, rel=1e-12)
    assert codebook.uniform_mse(np.full((2, 9), 0.5, dtype=np.float32), 4) == 0.0
