"""SparseGPT-style OBS pruning on plain arrays (algorithms/sparsegpt.py) and as prune's --method sparsegpt."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.algorithms.reconstruct import MAX_TOKEN_WEIGHT, Gram, refit, token_weights
from onnxshrink.algorithms.sparsegpt import output_error, refit_kept, sparsegpt, teacher_weights


def _correlated(rng, rows=512, k=64, mix=1.0):
    """Inputs whose features share a common low-rank part, as a transformer's hidden states do."""
    return rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) * mix + rng.normal(size=(rows, k))


def test_exact_zero_count_and_nm_pattern():
    rng = np.random.default_rng(0)
    x, w = _correlated(rng, k=40), rng.normal(size=(40, 12))
    h = x.T @ x
    pruned = sparsegpt(w, h, zeros=271, block=16)
    assert int(np.sum(pruned == 0)) == 271
    nm = sparsegpt(w, h, nm=(2, 4), block=16)
    assert np.all(np.sum(nm.reshape(10, 4, 12) != 0, axis=1) == 2)


def test_row_zero_removal_is_the_obs_update():
    """Pruning only input 0 is one OBS step per output: dw = -w_q / [H^-1]_qq * H^-1[:, q], exactly."""
    rng = np.random.default_rng(1)
    x, w = _correlated(rng, rows=60, k=6), rng.normal(size=(6, 3))
    h = x.T @ x
    mask = np.zeros(w.shape, dtype=bool)
    mask[0, [0, 2]] = True
    got = sparsegpt(w, h, mask=mask, damp=1e-12)
    hinv = np.linalg.inv(h)
    expected = w.copy()
    for j in (0, 2):
        expected[:, j] -= w[0, j] / hinv[0, 0] * hinv[:, 0]
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert np.all(got[mask] == 0)


def test_first_removal_is_the_brute_force_best_single_weight():
    """The OBS saliency picks the weight whose removal (with the optimal update) costs least: brute force agrees."""
    rng = np.random.default_rng(2)
    x, w = _correlated(rng, rows=40, k=5), rng.normal(size=(5, 1))
    h = x.T @ x
    costs = []
    for q in range(5):  # exact: remove q, refit the other four by least squares
        keep = np.ones((5, 1), dtype=bool)
        keep[q] = False
        others = np.flatnonzero(keep[:, 0])
        best = np.zeros((5, 1))
        best[others, 0] = np.linalg.solve(h[np.ix_(others, others)], (h @ w)[others, 0])
        costs.append(output_error(w, best, h))
    # with row q first, SparseGPT's saliency of row q is the exact OBS one: permute each candidate to the front
    chosen = []
    for q in range(5):
        order = [q] + [i for i in range(5) if i != q]
        hq, wq = h[np.ix_(order, order)], w[order]
        mask = np.zeros((5, 1), dtype=bool)
        mask[0] = True
        chosen.append(output_error(wq, sparsegpt(wq, hq, mask=mask, damp=1e-12), hq))
    np.testing.assert_allclose(chosen, costs, rtol=1e-6)
    got = sparsegpt(w, h, zeros=1, damp=1e-12)
    assert list(np.flatnonzero(got[:, 0] == 0)) == [int(np.argmin(costs))]
    # the rows before it cannot move in SparseGPT; the refit of the kept weights reaches the brute-force optimum
    assert output_error(w, got, h) > min(costs) * 1.01
    np.testing.assert_allclose(output_error(w, refit_kept(w, got, h, damping=1e-12), h), min(costs), rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_beats_magnitude_with_least_squares_refit(sparsity):
    rng = np.random.default_rng(3)
    x, w = _correlated(rng), rng.normal(size=(64, 32))
    h = x.T @ x
    zeros = int(sparsity * w.size)
    gram = Gram(64, 32)
    gram.add(x, x @ w)
    keep = np.ones(w.shape, dtype=bool)
    keep.reshape(-1)[np.argsort(np.abs(w).reshape(-1), kind="stable")[:zeros]] = False
    magnitude = output_error(w, refit(w, keep, gram, damping=1e-6).weight, h)
    pruned = refit_kept(w, sparsegpt(w, h, zeros, block=16), h)
    assert int(np.sum(pruned == 0)) == zeros
    assert output_error(w, pruned, h) < 0.95 * magnitude


def test_teacher_weights_map_the_pruned_inputs_to_the_original_outputs():
    rng = np.random.default_rng(6)
    x0 = _correlated(rng, rows=200, k=12)
    x = x0 + 0.3 * rng.normal(size=x0.shape)  # upstream pruning changed the inputs
    w = rng.normal(size=(12, 5))
    expected = np.linalg.lstsq(x, x0 @ w, rcond=None)[0]
    np.testing.assert_allclose(teacher_weights(w, x.T @ x, x.T @ x0, damp=1e-12), expected, rtol=1e-6, atol=1e-8)


def test_pruning_twice_changes_nothing():
    rng = np.random.default_rng(4)
    x, w = _correlated(rng, k=32), rng.normal(size=(32, 8))
    h = x.T @ x
    once = sparsegpt(w, h, zeros=128)
    np.testing.assert_array_equal(sparsegpt(once, h, zeros=128), once)


def test_dead_inputs_do_not_break_the_factorisation():
    rng = np.random.default_rng(5)
    x, w = _correlated(rng, k=16), rng.normal(size=(16, 4))
    x[:, 3] = 0.0
    pruned = sparsegpt(w, x.T @ x, zeros=32)
    assert np.all(np.isfinite(pruned)) and int(np.sum(pruned == 0)) == 32


# ---- prune --method sparsegpt ------------------------------------------------------------------

import onnx  # noqa: E402
from onnx import helper, numpy_helper, TensorProto  # noqa: E402

from conftest import count_captures, make_mlp  # noqa: E402
from onnxshrink.data import Dataset  # noqa: E402
from onnxshrink.errors import UsageError  # noqa: E402
from onnxshrink.passes import prune as prune_module, prune_common  # noqa: E402
from onnxshrink.passes.prune import Prune, PruneConfig  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402


def _data(model, samples=96, seed=1, k=32):
    """Correlated inputs (shared low-rank part), in two batches."""
    x = _correlated(np.random.default_rng(seed), rows=samples, k=k).astype(np.float32)
    name = model.graph.input[0].name
    return Dataset([{name: x[: samples // 2]}, {name: x[samples // 2:]}], None, samples, False, [])


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("weight")}


def _drift(model, candidate, data):
    feed = data.batches[0]
    y0 = make_session(model, optimize=False).run(None, feed)[0]
    y = make_session(candidate, optimize=False).run(None, feed)[0]
    return float(np.linalg.norm(y - y0) / np.linalg.norm(y0))


@pytest.mark.parametrize("sequential", [True, False])
def test_sparsegpt_pass_reaches_the_sparsity_and_beats_the_plain_mask(sequential):
    model = make_mlp()
    data = _data(model)
    pruned, report = Prune(PruneConfig(sparsity=0.6, method="sparsegpt", sequential=sequential), data)(model)
    masked, _ = Prune(PruneConfig(sparsity=0.6, method="mask"), data)(model)
    before, after = _weights(model), _weights(pruned)
    zeros = sum(int(np.sum(w == 0)) for w in after.values())
    assert zeros == round(0.6 * sum(w.size for w in before.values()))
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    assert all(after[name].dtype == np.float32 for name in after)
    assert _drift(model, pruned, data) < 0.7 * _drift(model, masked, data)
    assert "OBS updates" in report.layers[0].reason and any("SparseGPT" in note for note in report.notes)
    again, second = Prune(PruneConfig(sparsity=0.6, method="sparsegpt", sequential=sequential), data)(pruned)
    assert not second.changed
    for name, w in _weights(again).items():
        np.testing.assert_array_equal(w, after[name])


def test_sparsegpt_pass_nm_pattern():
    model = make_mlp()
    pruned, _ = Prune(PruneConfig(sparsity=None, pattern="2:4", method="sparsegpt"), _data(model))(model)
    for name, w in _weights(pruned).items():
        k = w.shape[0] - w.shape[0] % 4
        assert np.all(np.sum(w[:k].reshape(-1, 4, w.shape[1]) != 0, axis=1) <= 2), name


def test_sparsegpt_needs_calibration_and_a_known_method():
    with pytest.raises(UsageError, match="--method sparsegpt needs calibration data"):
        Prune(PruneConfig(method="sparsegpt"))
    with pytest.raises(UsageError, match="--method must be one of"):
        Prune(PruneConfig(method="obs"), _data(make_mlp()))


def _fan_out(k=16):
    """x -> q, k, v (three MatMuls reading x) -> Add -> out MatMul: two waves of layers."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(k, k)).astype(np.float32), f"{n}.weight") for n in "qkvo"]
    nodes = [helper.make_node("MatMul", ["x", f"{n}.weight"], [n], name=n) for n in "qkv"]
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["s"]),
              helper.make_node("MatMul", ["s", "o.weight"], ["y"], name="o")]
    graph = helper.make_graph(nodes, "fan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_layers_sharing_an_input_are_captured_in_one_run(monkeypatch):
    model = _fan_out()
    calls = count_captures(monkeypatch, prune_module)
    allocation, real_rows = [], prune_module.layer_rows

    def counting_rows(dataset, model, layers, threads=1):
        allocation.append(sorted(layer.x for layer in layers))
        return real_rows(dataset, model, layers, threads)

    monkeypatch.setattr(prune_module, "layer_rows", counting_rows)
    Prune(PruneConfig(sparsity=0.5, method="sparsegpt", scope="layer", sequential=True), _data(model, k=16))(model)
    # one run for the allocation's statistics (prune_common.layer_rows), then per wave the pruned model and the
    # original side by side
    assert allocation == [["s", "x", "x", "x"]]
    assert calls == [["x", "x", "x"], ["x", "x", "x"], ["s"], ["s"]]


def test_capture_rounds_group_consecutive_depths():
    upstream = {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": {"a", "b", "c"}, "e": set()}
    assert prune_common.capture_rounds(upstream, 0) == {}
    assert prune_common.capture_rounds(upstream, 2) == {"a": 0, "e": 0, "b": 0, "c": 1, "d": 1}
    assert prune_common.capture_rounds(upstream, 9) == {"a": 0, "e": 0, "b": 1, "c": 2, "d": 3}


def test_cli_method_sparsegpt(runner, tmp_path):
    import shutil

    from conftest import SAMPLES, invoke

    for suffix in ("onnx", "calib.npz"):
        shutil.copy(SAMPLES / f"digits_mlp.{suffix}", tmp_path / f"digits_mlp.{suffix}")
    model = tmp_path / "digits_mlp.onnx"
    result = invoke(runner, "prune", model, "--sparsity", "0.5", "--method", "sparsegpt", "--calibration",
                    tmp_path / "digits_mlp.calib.npz", "-o", tmp_path / "p.onnx", "--min-cosine", "0.9")
    assert result.exit_code == 0, result.stdout
    assert "OBS updates" in result.stdout and (tmp_path / "p.onnx").exists()
    bad = invoke(runner, "prune", model, "--sparsity", "0.5", "--method", "sparsegpt", "-o", tmp_path / "q.onnx")
    assert bad.exit_code == 2 and "--method sparsegpt needs calibration data" in bad.output


def _masked_model(k=8):
    """x [b, s, k] -> MatMul; an attention_mask [b, s] input the graph declares (and reads through an Identity)."""
    w = np.random.default_rng(2).normal(size=(k, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Identity", ["attention_mask"], ["m"])],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k]),
                   helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", k]),
         helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "s"])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_padding_tokens_are_left_out_of_the_layer_statistics():
    from onnxshrink.passes.common import Site, initializer_owners
    from onnxshrink.weights import find_tensors

    model = _masked_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=np.int64)
    data = Dataset([{"x": x, "attention_mask": mask}], None, 2, False, [])
    owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
    layer = prune_common.describe(Site(model.graph, model.graph.node[0], "mm", "w"), owners, records,
                                  {"y", "m"})
    assert prune_common.token_rows(data.batches[0], x, layer).tolist() == (mask.reshape(-1) == 1).tolist()
    assert prune_common.token_rows({"x": x}, x, layer) is None  # no mask: every row counts
    assert prune_common.token_rows({"attention_mask": mask[:1]}, x, layer) is None  # not this activation's shape
    gram = prune_common.teacher_grams(data, model, model, [layer], {"mm": False})["mm"]
    real = x.reshape(-1, 8)[mask.reshape(-1) == 1].astype(np.float64)
    sentence = np.repeat([0, 1], 5)[mask.reshape(-1) == 1]
    real = real * token_weights(real, sentence)[:, None]  # tokens: each its sentence's median norm / its own
    np.testing.assert_allclose(gram.xtx, real.T @ real, rtol=1e-6)
    assert gram.rows == 7
    # the pruning pass's statistics leave the padding out as well
    hessian = Prune(PruneConfig(sparsity=0.5, method="sparsegpt", scope="layer"), data)._original_grams(
        model, [layer])["mm"]
    np.testing.assert_allclose(hessian.xtx, real.T @ real, rtol=1e-6)


def test_token_weights_count_each_token_relative_to_its_size():
    rows = np.ones((5, 4))
    rows[3] *= 10.0  # a "massive activation" token
    rows[4] *= 1e-6  # a near-empty one: up-weighted, but only so far
    weights = token_weights(rows)
    np.testing.assert_allclose(weights[:3], 1.0)
    np.testing.assert_allclose(weights[3], 0.1)
    assert weights[4] == MAX_TOKEN_WEIGHT
    np.testing.assert_allclose(token_weights(np.zeros((3, 4))), 1.0)  # nothing to scale by
    # per sentence: a sentence of larger tokens throughout is not down-weighted against another
    two = np.concatenate([np.ones((3, 4)), 5 * np.ones((3, 4))])
    np.testing.assert_allclose(token_weights(two, np.repeat([0, 1], 3)), 1.0)
    assert token_weights(two)[3:].max() < 1 < token_weights(two)[:3].min()  # as one sequence they would be
    # so weights do not depend on the batching: a sentence's rows weigh the same alone or batched with others
    np.testing.assert_allclose(token_weights(rows), token_weights(np.concatenate([two, rows]),
                                                                   np.repeat([0, 1, 2], [3, 3, 5]))[6:])


def test_massive_tokens_do_not_decide_the_fit_and_images_keep_equal_rows():
    """One token 50x the others: unweighted, it holds nearly all of X^T X; weighted, every token counts alike. A 2-D
    input (an MLP's samples) and a Conv's pixels keep equal weights."""
    from onnxshrink.passes.common import Site, initializer_owners
    from onnxshrink.weights import find_tensors

    model = _masked_model()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 6, 8)).astype(np.float32)
    x[0, 2] *= 50.0
    data = Dataset([{"x": x, "attention_mask": np.ones((1, 6), dtype=np.int64)}], None, 1, False, [])
    owners, records = initializer_owners(model), {r.name: r for r in find_tensors(model)}
    layer = prune_common.describe(Site(model.graph, model.graph.node[0], "mm", "w"), owners, records, {"y", "m"})
    gram = prune_common.teacher_grams(data, model, model, [layer], {"mm": False})["mm"]
    rows = x.reshape(-1, 8).astype(np.float64)
    massive = np.trace(np.outer(rows[2], rows[2])) / np.trace(rows.T @ rows)
    assert massive > 0.9  # unweighted
    weighted = rows * token_weights(rows)[:, None]
    assert np.trace(np.outer(weighted[2], weighted[2])) / np.trace(gram.xtx) < 0.3
    np.testing.assert_allclose(gram.xtx, weighted.T @ weighted, rtol=1e-6)
    assert prune_common.row_weights((6, 8), layer, rows) is None  # [samples, K]: every row once


def test_damped_kept_refit_generalises_where_calibration_has_fewer_rows_than_inputs():
    """48 rows for 64 inputs: X^T X is singular. The nearly undamped refit fits those rows (lower error on them) and
    loses on fresh rows of the same distribution; the default damping, towards the dense weights, does better."""
    rng = np.random.default_rng(11)
    mixing = rng.normal(size=(64, 64))
    x, fresh = (rng.normal(size=(n, 64)) @ mixing + rng.normal(size=(n, 64)) for n in (48, 4000))
    w = rng.normal(size=(64, 16))
    h, h_fresh = x.T @ x, fresh.T @ fresh
    pruned = sparsegpt(w, h, zeros=w.size // 2)
    loose, damped = refit_kept(w, pruned, h, damping=1e-6), refit_kept(w, pruned, h)
    assert np.array_equal(loose != 0, pruned != 0) and np.array_equal(damped != 0, pruned != 0)
    assert output_error(w, loose, h) < output_error(w, damped, h)  # on the calibration rows
    assert output_error(w, damped, h_fresh) < 0.9 * output_error(w, loose, h_fresh)


def test_kept_refit_leaves_an_unpruned_layer_and_its_own_result_unchanged():
    rng = np.random.default_rng(12)
    x, w = _correlated(rng, rows=200, k=24), rng.normal(size=(24, 8))
    h = x.T @ x
    np.testing.assert_allclose(refit_kept(w, w, h), w, atol=1e-9)  # nothing pruned: the dense weights are optimal
    once = refit_kept(w, sparsegpt(w, h, zeros=96), h)
    np.testing.assert_allclose(refit_kept(w, once, h), once, rtol=1e-6, atol=1e-9)


def test_kept_refit_damping_reaches_the_pass_and_is_checked():
    model = make_mlp()
    data = _data(model, samples=40)  # fewer rows than fc1's 64 inputs
    default, _ = Prune(PruneConfig(sparsity=0.5, method="sparsegpt"), data)(model)
    loose, _ = Prune(PruneConfig(sparsity=0.5, method="sparsegpt", kept_refit_damping=1e-6), data)(model)
    d, l = _weights(default), _weights(loose)
    assert any(not np.array_equal(d[name], l[name]) for name in d)
    with pytest.raises(UsageError, match="kept_refit_damping"):
        Prune(PruneConfig(sparsity=0.5, method="sparsegpt", kept_refit_damping=0.0), data)
