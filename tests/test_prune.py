"""Pruning: the graph it writes, its numerics in onnxruntime, what it skips, N:M, reconstruction, the CLI.

Numerics are checked against numpy forward passes written here from the pruned initializers,
with onnxruntime optimizations off. No timing assertions.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper

from conftest import SAMPLES, build_model, float_value, invoke, make_mlp, save_model, tree
from test_fuzz_graphs import mlp_graphs, run_on_random_graph  # its hypothesis profile too: 12 examples, 400 under `make fuzz`
from onnxshrink import api
from onnxshrink.data import Dataset, input_specs, load_npz
from onnxshrink.errors import UsageError
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.prune_common import describe, unfold
from onnxshrink.algorithms.reconstruct import Gram, refit
from onnxshrink.runtime import capture_activations, make_session

MLP_WEIGHTS = ("fc0.weight", "fc1.weight", "fc2.weight")


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model, feeds):
    return make_session(model, optimize=False).run(None, feeds)[0]


def calibration(model, samples=64, seed=1):
    spec = input_specs(model)[0]
    shape = [samples] + [d for d in spec.shape[1:]]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return Dataset([{spec.name: x[:32]}, {spec.name: x[32:]}], None, samples, False, [])


def mlp_forward(values, x, layers=3, gemm=False):
    for i in range(layers):
        w = values[f"fc{i}.weight"]
        x = x @ (w.T if gemm else w) + values[f"fc{i}.bias"]
        if i < layers - 1:
            x = np.maximum(x, 0)
    return x


def sample(name):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    return model, load_npz(SAMPLES / f"{name}.calib.npz", input_specs(model)), np.load(SAMPLES / f"{name}.eval.npz")


def accuracy(model, evaluation):
    return float(np.mean(run(model, {"input": evaluation["input"]}).argmax(1) == evaluation["labels"]))


# ---- the graph ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "auto", "global"])
def test_sparsity_reached_per_layer_and_overall(scope):
    model = make_mlp()
    pruned, report = Prune(PruneConfig(sparsity=0.6, scope=scope))(model)
    before, after = inits(model), inits(pruned)
    zeros = {name: int(np.sum(after[name] == 0)) for name in MLP_WEIGHTS}
    total = sum(before[name].size for name in MLP_WEIGHTS)
    assert sum(zeros.values()) == round(0.6 * total)
    if scope == "layer":
        for name in MLP_WEIGHTS:
            assert zeros[name] == round(0.6 * before[name].size)
    for name in MLP_WEIGHTS:  # no layer emptied
        assert zeros[name] <= 0.98 * before[name].size
    # Ops, dtypes and shapes unchanged; the kept weights are the original ones (no data, no refit).
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
    for name in MLP_WEIGHTS:
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])
    assert report.changed and all(d.action.startswith("pruned") for d in report.layers)
    onnx.checker.check_model(pruned, full_check=True)


def test_magnitude_removes_the_smallest_weights():
    model = make_mlp()
    pruned, _ = Prune(PruneConfig(sparsity=0.5, scope="layer"))(model)
    for name in MLP_WEIGHTS:
        w, p = inits(model)[name], inits(pruned)[name]
        assert np.abs(w[p == 0]).max() <= np.abs(w[p != 0]).min()


def test_auto_scope_prunes_the_small_last_layer_less():
    model, data, _ = sample("digits_mlp")
    pruned, report = Prune(PruneConfig(sparsity=0.8, reconstruct=False), data)(model)
    fraction = {d.node: float(d.action.split()[1].rstrip("%")) for d in report.layers}
    assert fraction["fc3/MatMul"] < 80 < fraction["fc2/MatMul"]


# ---- numerics ----------------------------------------------------------------------------


@pytest.mark.parametrize("gemm", [False, True])
def test_onnxruntime_output_matches_numpy_of_the_masked_weights(gemm):
    model = make_mlp(use_gemm=gemm)
    pruned, _ = Prune(PruneConfig(sparsity=0.7))(model)
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    values = inits(pruned)
    expected = mlp_forward(values, x, gemm=gemm)
    np.testing.assert_allclose(run(pruned, {"input": x}), expected, rtol=1e-4, atol=1e-4)
    # ...and that is the original network with its smallest weights masked.
    original = inits(model)
    masked = {k: (original[k] * (values[k] != 0) if k in MLP_WEIGHTS else v) for k, v in values.items()}
    np.testing.assert_allclose(mlp_forward(masked, x, gemm=gemm), expected, rtol=1e-5, atol=1e-5)


def conv_model(group=1, pads=(1, 1, 1, 1), strides=(1, 1), alpha_gemm=False):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 6 // group, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["y"], name="conv", pads=list(pads), strides=list(strides),
                              group=group)]
    return build_model(nodes, [float_value("input", ["batch", 6, 7, 7])], [float_value("y", ["batch", 8, "h", "w"])],
                       [numpy_helper.from_array(w, "cw"), numpy_helper.from_array(b, "cb")])


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv_inputs_unfold_to_the_conv_output(strides):
    """The im2col rows times the [K, N] weight are the Conv's output: reconstruction sees the real layer."""
    model = conv_model(strides=strides)
    x = np.random.default_rng(5).standard_normal((2, 6, 7, 7)).astype(np.float32)
    site = type("Site", (), {"node": model.graph.node[0], "graph": model.graph, "name": "conv", "weight": "cw"})
    from onnxshrink.passes.common import initializer_owners
    from onnxshrink.weights import find_tensors

    layer = describe(site, initializer_owners(model), {r.name: r for r in find_tensors(model)}, {"y"})
    values = inits(model)
    rows = unfold(layer, x) @ values["cw"].reshape(8, -1).T + values["cb"]
    y = run(model, {"input": x})
    np.testing.assert_allclose(rows.reshape(2, y.shape[2], y.shape[3], 8).transpose(0, 3, 1, 2), y, rtol=1e-4, atol=1e-4)


def test_conv_pruned_with_reconstruction_runs_and_reaches_sparsity():
    model = conv_model()
    pruned, report = Prune(PruneConfig(sparsity=0.5, scope="layer"), calibration(model))(model)
    w = inits(pruned)["cw"]
    assert np.sum(w == 0) == round(0.5 * w.size)
    assert "after refit" in report.layers[0].reason
    x = calibration(model).batches[0]
    assert run(pruned, x).shape == run(model, x).shape


@pytest.mark.parametrize("removed", [0.15, 0.5, 0.85])  # columns solved directly, from G^-1, and both
def test_refit_solves_the_masked_least_squares_problem(removed):
    """Against a direct per-column lstsq on the kept rows (damping ~0)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((400, 12))
    w0 = rng.standard_normal((12, 5))
    y = x @ w0 + 0.1 * rng.standard_normal((400, 5))
    keep = rng.random((12, 5)) > removed
    gram = Gram(12, 5)
    gram.add(x[:150], y[:150])
    gram.add(x[150:], y[150:])
    result = refit(w0, keep, gram, damping=1e-12)
    for j in range(5):
        rows = keep[:, j]
        expected = np.linalg.lstsq(x[:, rows], y[:, j], rcond=None)[0]
        np.testing.assert_allclose(result.weight[rows, j], expected, rtol=1e-4, atol=1e-5)
        assert np.all(result.weight[~rows, j] == 0)
    assert result.error_after < result.error_before


def test_reconstruction_lowers_layer_error_on_the_sample_mlp():
    model, data, evaluation = sample("digits_mlp")
    refit_model, refit_report = Prune(PruneConfig(sparsity=0.8), data)(model)
    plain_model, _ = Prune(PruneConfig(sparsity=0.8, reconstruct=False), data)(model)
    names = [n.output[0] for n in model.graph.node if n.op_type == "Add"]
    feeds = [{"input": evaluation["input"]}]
    reference = next(capture_activations(model, names, feeds))
    errors = {}
    for label, candidate in (("refit", refit_model), ("plain", plain_model)):
        values = next(capture_activations(candidate, names, feeds))
        errors[label] = [np.linalg.norm(values[n] - reference[n]) / np.linalg.norm(reference[n]) for n in names]
    assert all(r < p for r, p in zip(errors["refit"], errors["plain"])), errors
    # Same overall sparsity, and the target: 80% within about a point of the original.
    assert accuracy(refit_model, evaluation) >= accuracy(model, evaluation) - 0.015
    assert accuracy(refit_model, evaluation) > accuracy(plain_model, evaluation)
    assert "after refit" in refit_report.layers[0].reason


# ---- N:M ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,gemm", [("2:4", False), ("1:4", True), ("3:8", False)])
def test_nm_groups_along_the_input_axis(pattern, gemm):
    n, m = map(int, pattern.split(":"))
    model = make_mlp(widths=(30, 64, 48, 10), use_gemm=gemm)  # K=30: a partial last group
    pruned, report = Prune(PruneConfig(sparsity=None, pattern=pattern))(model)
    for name in MLP_WEIGHTS:
        w = inits(pruned)[name]
        w = w.T if gemm else w  # [K, N]
        k = w.shape[0]
        for start in range(0, k, m):
            nonzero = np.count_nonzero(w[start:start + m], axis=0)
            assert nonzero.max() <= n
            assert nonzero.min() == min(n, k - start)  # N kept (the largest), not fewer
    assert all(d.action.endswith(pattern) for d in report.layers)


def test_nm_on_conv_runs_along_cin_kh_kw():
    model = conv_model()
    pruned, _ = Prune(PruneConfig(sparsity=None, pattern="2:4"), calibration(model))(model)
    w = inits(pruned)["cw"].reshape(8, -1)  # [Cout, Cin*kh*kw]
    for start in range(0, w.shape[1], 4):
        assert np.count_nonzero(w[:, start:start + 4], axis=1).max() <= 2


# ---- skipped layers -------------------------------------------------------------------------


def test_skips_tiny_excluded_and_kept_layers():
    model = make_mlp(widths=(32, 64, 48, 4))  # fc2: 48x4 floats, under 1 KiB
    pruned, report = Prune(PruneConfig(sparsity=0.5, exclude=("fc0*",)))(model)
    why = {d.node: (d.action, d.reason) for d in report.layers}
    assert why["fc0/MatMul"] == ("kept", "excluded (--exclude)")
    assert why["fc2/MatMul"][1].startswith("tiny")
    assert why["fc1/MatMul"][0].startswith("pruned")
    np.testing.assert_array_equal(inits(pruned)["fc0.weight"], inits(model)["fc0.weight"])
    _, kept = Prune(PruneConfig(sparsity=0.5, keep_float="both"))(make_mlp())
    assert [d.reason for d in kept.layers if d.action == "kept"] == ["--keep-float both"] * 2


def test_tied_weight_is_skipped_with_a_reason():
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "shared")
    nodes = [helper.make_node("MatMul", ["input", "shared"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "shared"], ["out"], name="second")]
    model = build_model(nodes, [float_value("input", ["batch", 32])], [float_value("out", ["batch", 32])], [w])
    pruned, report = Prune(PruneConfig(sparsity=0.5))(model)
    assert {d.action for d in report.layers} == {"kept"}
    assert all("shared by several layers" in d.reason for d in report.layers)
    assert not report.changed
    np.testing.assert_array_equal(inits(pruned)["shared"], inits(model)["shared"])


def test_unknown_layer_override_names_the_layers():
    with pytest.raises(UsageError, match="names no layer.*fc9"):
        Prune(PruneConfig(sparsity=0.5, layer_sparsity={"fc9": 0.5}))(make_mlp())


def test_layer_override_is_respected_and_the_total_still_hits_the_target():
    model = make_mlp()
    pruned, _ = Prune(PruneConfig(sparsity=0.5, layer_sparsity={"fc1/MatMul": 0.25}))(model)
    values = inits(pruned)
    assert np.sum(values["fc1.weight"] == 0) == round(0.25 * values["fc1.weight"].size)
    total = sum(values[n].size for n in MLP_WEIGHTS)
    assert sum(int(np.sum(values[n] == 0)) for n in MLP_WEIGHTS) == round(0.5 * total)


# ---- idempotence -------------------------------------------------------------------------


@pytest.mark.parametrize("with_data", [False, True])
def test_pruning_twice_changes_nothing_more(with_data):
    model = make_mlp()
    data = calibration(model) if with_data else None
    once, _ = Prune(PruneConfig(sparsity=0.5), data)(model)
    twice, report = Prune(PruneConfig(sparsity=0.5), data)(once)
    assert not report.changed
    for name, value in inits(once).items():
        np.testing.assert_array_equal(inits(twice)[name], value)
    nm_once, _ = Prune(PruneConfig(pattern="2:4"), data)(model)
    nm_twice, nm_report = Prune(PruneConfig(pattern="2:4"), data)(nm_once)
    assert not nm_report.changed


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_prune_end_to_end(runner, tmp_path):
    for suffix in ("onnx", "calib.npz", "eval.npz"):
        (tmp_path / f"digits_mlp.{suffix}").write_bytes((SAMPLES / f"digits_mlp.{suffix}").read_bytes())
    model = tmp_path / "digits_mlp.onnx"
    result = invoke(runner, "prune", model, "--sparsity", "0.8", "--calibration", tmp_path / "digits_mlp.calib.npz",
                    "--data", tmp_path / "digits_mlp.eval.npz", "--labels", "labels", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "prune"
    assert report["output"] == str(tmp_path / "digits_mlp.pruned.onnx")
    assert report["validation"]["accuracy"] is not None
    written = onnx.load(report["output"])
    onnx.checker.check_model(written, full_check=True)
    values = inits(written)
    weights = [values[n] for n in ("fc1.weight", "fc2.weight", "fc3.weight")]
    assert abs(sum(int(np.sum(w == 0)) for w in weights) / sum(w.size for w in weights) - 0.8) < 1e-4
    meta = {p.key: p.value for p in written.metadata_props}
    assert meta["onnxshrink.command"] == "prune" and json.loads(meta["onnxshrink.options"])["sparsity"] == 0.8
    # A threshold that fails: OUT.failed.onnx, exit 1, no OUT.
    failed = invoke(runner, "prune", model, "--sparsity", "0.95", "-o", tmp_path / "strict.onnx",
                    "--data", tmp_path / "digits_mlp.eval.npz", "--labels", "labels", "--max-accuracy-drop", "0.001")
    assert failed.exit_code == 1
    assert (tmp_path / "strict.failed.onnx").exists() and not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.5"], "--sparsity 1.5: must be between 0 and 0.98"),
    (["--sparsity", "-0.1"], "--sparsity -0.1: must be between 0 and 0.98"),
    ([], "--sparsity is required"),
    (["--pattern", "3:2"], "--pattern 3:2: N:M keeps N of every M weights, so 0 < N < M"),
    (["--pattern", "dense"], "--pattern 'dense': choose unstructured, channel or N:M"),
    (["--pattern", "2:4", "--sparsity", "0.5"], "--pattern 2:4 fixes the sparsity; drop --sparsity"),
    (["--sparsity", "0.5", "--layer-sparsity", "nope=0.5"], "--layer-sparsity names no layer of the model: nope"),
    (["--sparsity", "0.5", "--layer-sparsity", "fc0/MatMul"], "--layer-sparsity 'fc0/MatMul': expected NAME=F"),
    (["--sparsity", "0.5", "--importance", "activation"], "--importance activation needs calibration data"),
    (["--sparsity", "0.5", "--importance", "fisher"], "--importance must be magnitude or activation"),
    (["--sparsity", "0.5", "--scope", "net"], "--scope must be one of auto, layer, global"),
    (["--sparsity", "0.5", "--op-types", "Gather"], "--op-types: unsupported op type(s) Gather"),
    (["--sparsity", "0.5", "--storage", "sparse", "--pattern", "channel"], "--pattern channel removes channels and leaves none"),
])
def test_cli_bad_options_are_one_line_exit_2(runner, tmp_path, args, message):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    before = tree(tmp_path)
    result = invoke(runner, "prune", tmp_path / "mlp.onnx", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before


# ---- channels ------------------------------------------------------------------------------


def test_channel_pruning_shrinks_the_cnn_and_shapes_stay_valid():
    from onnxshrink.passes.prune_channels import PruneChannels

    model, data, evaluation = sample("digits_cnn")
    pruned, report = PruneChannels(PruneConfig(sparsity=0.5, pattern="channel"), data)(model)
    onnx.checker.check_model(pruned, full_check=True)
    values = inits(pruned)
    assert values["conv1.weight"].shape == (8, 1, 3, 3)
    assert values["conv2.weight"].shape == (16, 8, 3, 3)
    assert values["fc1.weight"].shape == (32, 16 * 4 * 4)  # Flatten: 16 channels x 4 x 4
    assert values["fc2.weight"].shape == (10, 32)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    assert any(shape == ["batch", 16, 4, 4] for shape in shapes.values())
    why = {d.node: d for d in report.layers}
    assert why["fc2/Gemm"].action == "kept" and "graph output" in why["fc2/Gemm"].reason
    assert run(pruned, {"input": evaluation["input"][:3]}).shape == (3, 10)
    assert accuracy(pruned, evaluation) >= accuracy(model, evaluation) - 0.03


def test_channel_pruning_equals_the_original_with_those_channels_zeroed():
    """Without data and with MatMul consumers, the removed channels' constant output is folded exactly."""
    from onnxshrink.passes.prune_channels import PruneChannels

    model = make_mlp(widths=(32, 64, 48, 10))
    pruned, _ = PruneChannels(PruneConfig(sparsity=0.5, pattern="channel"))(model)
    before, after = inits(model), inits(pruned)
    zeroed, rows = dict(before), slice(None)
    for name in ("fc0.weight", "fc1.weight"):
        w = before[name][rows]  # the inputs the upstream pruning left
        kept = [j for j in range(w.shape[1]) if any(np.array_equal(w[:, j], after[name][:, i]) for i in range(after[name].shape[1]))]
        assert len(kept) == w.shape[1] // 2
        mask = np.zeros(w.shape[1], dtype=bool)
        mask[kept] = True
        # A removed channel keeps only what its weights on removed upstream channels (constants) gave it.
        zeroed[name] = before[name].copy()
        zeroed[name][np.ix_(np.arange(w.shape[0]) if rows == slice(None) else np.array(rows), ~mask)] = 0
        rows = kept
    x = np.random.default_rng(8).standard_normal((6, 32)).astype(np.float32)
    np.testing.assert_allclose(run(pruned, {"input": x}), mlp_forward(zeroed, x), rtol=1e-4, atol=1e-4)


def bn_cnn():
    """Conv -> BatchNorm -> LeakyRelu -> AveragePool -> strided Conv without bias -> Sigmoid -> Flatten -> MatMul."""
    rng = np.random.default_rng(11)

    def t(a, n):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)

    inits = [t(rng.standard_normal((32, 3, 3, 3)) * 0.3, "c1w"), t(rng.standard_normal(32) * 0.1, "c1b"),
             t(rng.random(32) + 0.5, "bn_s"), t(rng.standard_normal(32) * 0.1, "bn_b"),
             t(rng.standard_normal(32) * 0.1, "bn_m"), t(rng.random(32) + 0.5, "bn_v"),
             t(rng.standard_normal((32, 32, 3, 3)) * 0.1, "c2w"), t(rng.standard_normal((32 * 4 * 4, 10)) * 0.05, "fcw")]
    nodes = [helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"),
             helper.make_node("LeakyRelu", ["bn"], ["a1"], name="lrelu", alpha=0.1),
             helper.make_node("AveragePool", ["a1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "c2w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Sigmoid", ["c2"], ["a2"], name="sig"),
             helper.make_node("Flatten", ["a2"], ["f"], name="flat", axis=1),
             helper.make_node("MatMul", ["f", "fcw"], ["y"], name="fc")]
    return build_model(nodes, [float_value("x", ["n", 3, 16, 16])], [float_value("y", ["n", 10])], inits)


@pytest.mark.parametrize("with_data", [False, True])
def test_channel_pruning_through_batchnorm_pool_and_flatten(with_data):
    from onnxshrink.passes.prune_channels import PruneChannels

    model = bn_cnn()
    x = np.random.default_rng(12).standard_normal((16, 3, 16, 16)).astype(np.float32)
    data = Dataset([{"x": x[:8]}, {"x": x[8:]}], None, 16, False, []) if with_data else None
    pruned, report = PruneChannels(PruneConfig(sparsity=0.5, pattern="channel"), data)(model)
    onnx.checker.check_model(pruned, full_check=True)
    values = inits(pruned)
    assert values["c1w"].shape == (16, 3, 3, 3) and values["bn_s"].shape == (16,)
    assert values["c2w"].shape == (16, 16, 3, 3) and values["fcw"].shape == (16 * 4 * 4, 10)
    assert values[pruned.graph.node[4].input[2]].shape == (16,)  # conv2 got a bias: conv1's removed channels, folded
    assert run(pruned, {"x": x}).shape == (16, 10)
    # Nothing removed: the same function exactly; a Conv keeps a multiple of 16 channels, so 25% removes none.
    same, kept = PruneChannels(PruneConfig(sparsity=0.25, pattern="channel"))(model)
    np.testing.assert_allclose(run(same, {"x": x}), run(model, {"x": x}), rtol=1e-6, atol=1e-6)
    assert all("multiple of 16" in d.reason for d in kept.layers if d.node.startswith("conv"))


def test_channel_pruning_keeps_layers_it_cannot_follow():
    from onnxshrink.passes.prune_channels import PruneChannels

    rng = np.random.default_rng(9)
    w = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in range(4)]
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["a"], name="residual_src"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["b"], name="branch"),
             helper.make_node("Add", ["b", "a"], ["c"], name="residual_add"),
             helper.make_node("MatMul", ["c", "w2"], ["d"], name="into_concat"),
             helper.make_node("Concat", ["d", "c"], ["e"], name="concat", axis=1),
             helper.make_node("Reshape", ["e", "shape"], ["f"], name="reshape")]
    shape = numpy_helper.from_array(np.array([-1, 32], dtype=np.int64), "shape")
    model = build_model(nodes, [float_value("input", ["batch", 16])], [float_value("f", ["batch", 32])], w[:3] + [shape])
    _, report = PruneChannels(PruneConfig(sparsity=0.5, pattern="channel"))(model)
    why = {d.node: d.reason for d in report.layers}
    assert "read by 2 nodes" in why["residual_src"]
    assert "reaches Add" in why["branch"]
    assert "reaches Concat" in why["into_concat"]
    assert not report.changed


def test_cli_channel_pruning_reports_latency(runner, tmp_path):
    for suffix in ("onnx", "calib.npz"):
        (tmp_path / f"digits_cnn.{suffix}").write_bytes((SAMPLES / f"digits_cnn.{suffix}").read_bytes())
    result = invoke(runner, "prune", tmp_path / "digits_cnn.onnx", "--pattern", "channel", "--sparsity", "0.5",
                    "--calibration", tmp_path / "digits_cnn.calib.npz", "--samples", "8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["latency_ms"]["ratio"] > 0
    assert report["size"]["ratio"] < 0.4


# ---- sparse storage --------------------------------------------------------------------------


def test_sparse_storage_loads_in_onnxruntime_and_matches_dense(runner, tmp_path):
    model = save_model(make_mlp(widths=(64, 128, 64, 10)), tmp_path / "mlp.onnx")
    for storage in ("dense", "sparse"):
        result = invoke(runner, "prune", model, "--sparsity", "0.8", "--scope", "layer", "--storage", storage,
                        "-o", tmp_path / f"{storage}.onnx", "--samples", "4", "--json")
        assert result.exit_code == 0, result.output
    sparse = onnx.load(str(tmp_path / "sparse.onnx"))
    assert {s.values.name for s in sparse.graph.sparse_initializer} == set(MLP_WEIGHTS)
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in sparse.graph.sparse_initializer)
    onnx.checker.check_model(sparse)
    x = np.random.default_rng(10).standard_normal((5, 64)).astype(np.float32)
    dense_out = make_session(tmp_path / "dense.onnx").run(None, {"input": x})[0]
    np.testing.assert_array_equal(make_session(tmp_path / "sparse.onnx").run(None, {"input": x})[0], dense_out)
    assert (tmp_path / "sparse.onnx").stat().st_size < 0.7 * (tmp_path / "dense.onnx").stat().st_size


def test_sparse_storage_keeps_weights_dense_when_that_is_smaller():
    pruned, report = Prune(PruneConfig(sparsity=0.5, scope="layer", storage="sparse"))(make_mlp())
    assert not pruned.graph.sparse_initializer
    assert all("would not be smaller" in d.reason for d in report.layers)


# ---- random graphs -------------------------------------------------------------------------

FUZZ_CONFIGS = {
    "magnitude": (lambda: PruneConfig(sparsity=0.7), False),
    "activation+refit": (lambda: PruneConfig(sparsity=0.7), True),
    "2:4": (lambda: PruneConfig(pattern="2:4"), True),
    "channel": (lambda: PruneConfig(sparsity=0.5, pattern="channel"), False),
    "channel+refit": (lambda: PruneConfig(sparsity=0.5, pattern="channel"), True),
    "sparse": (lambda: PruneConfig(sparsity=0.9, storage="sparse"), False),
}


@given(graph=mlp_graphs(), mode=st.sampled_from(sorted(FUZZ_CONFIGS)))
def test_random_graphs_prune_cleanly(tmp_path_factory, graph, mode):
    """Tied, Constant-node, Gemm (alpha, transB) and tiny layers: a valid model that runs, or a documented refusal."""
    factory, needs_data = FUZZ_CONFIGS[mode]
    run_on_random_graph(tmp_path_factory, graph, lambda source, output, calib: api.prune(
        source, output, factory(), calibration=calib if needs_data else None, run_validation=False),
        full_check=mode != "sparse")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, float("inf")]), min_size=0, max_size=12),
                min_size=1, max_size=4), st.data())
def test_cheapest_weights_over_layers_match_a_full_sort(layers, data):
    """The allocation takes exactly `target` weights, and never a costlier one while a cheaper one is left."""
    from onnxshrink.passes.prune import _cheapest

    names = [f"l{i}" for i in range(len(layers))]
    costs = {n: np.sort(np.asarray(c, dtype=np.float64)) for n, c in zip(names, layers)}
    total = sum(len(c) for c in costs.values())
    target = data.draw(st.integers(0, total))
    counts = _cheapest(costs, names, target)
    assert sum(counts.values()) == target
    assert all(0 <= counts[n] <= len(costs[n]) for n in names)
    taken = [c for n in names for c in costs[n][: counts[n]]]
    left = [c for n in names for c in costs[n][counts[n]:]]
    if taken and left:
        assert max(taken) <= min(left)
