"""factorize: low-rank X @ A @ B in place of MatMul/Gemm weights, its numerics in onnxruntime, what it skips, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, assert_bad_option, build_model, float_value, invoke, make_mlp, save_model
from onnxshrink import api
from onnxshrink.data import Dataset, input_specs, load_npz
from onnxshrink.errors import UsageError
from onnxshrink.passes.factorize import Factorize, FactorizeConfig, low_rank, measure_layer, rank_for_energy
from onnxshrink.runtime import capture_activations, make_session

MLP, CNN = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_cnn.onnx"
NO_TIMING = {"check_latency": False}


def config(**kwargs) -> FactorizeConfig:
    return FactorizeConfig(**{**NO_TIMING, **kwargs})


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def params(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def run(model, feed, optimize=True):
    return make_session(model, optimize=optimize).run(None, feed)[0]


def calibration(name: str) -> Dataset:
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    return load_npz(SAMPLES / f"{name}.calib.npz", input_specs(model))


def evaluation(name: str) -> dict:
    return {"input": np.load(SAMPLES / f"{name}.eval.npz")["input"]}


def by_node(report) -> dict:
    return {layer.node: layer for layer in report.layers}


# ---- the graph it writes and its parameters ------------------------------------------------------

def test_sample_mlp_parameters_drop_as_the_ranks_say():
    model = onnx.load(str(MLP))
    factored, report = Factorize(config(rank_ratio=0.5))(model)
    layers = by_node(report)
    # 64x256 -> rank 32, 256x128 -> rank 64, 128x10 -> rank 5: r * (K + N) each
    assert [(layers[n].rank, layers[n].params_before, layers[n].params_after) for n in ("fc1/MatMul", "fc2/MatMul", "fc3/MatMul")] \
        == [(32, 16384, 32 * 320), (64, 32768, 64 * 384), (5, 1280, 5 * 138)]
    assert params(model) == 50826 and params(factored) == 50826 - 50432 + 10240 + 24576 + 690
    assert ops(factored) == Counter({"MatMul": 6, "Add": 3, "Relu": 2})
    assert {"fc1.weight", "fc2.weight", "fc3.weight"}.isdisjoint(t.name for t in factored.graph.initializer)
    shapes = {t.name: list(t.dims) for t in factored.graph.initializer}
    assert shapes["fc2.weight_A"] == [256, 64] and shapes["fc2.weight_B"] == [64, 128]
    first = next(n for n in factored.graph.node if n.name == "fc2/MatMul/lowrank")
    second = next(n for n in factored.graph.node if n.name == "fc2/MatMul")
    assert first.input[1] == "fc2.weight_A" and second.input == [first.output[0], "fc2.weight_B"]
    assert all(t.data_type == TensorProto.FLOAT for t in factored.graph.initializer)
    onnx.checker.check_model(factored, full_check=True)
    x = evaluation("digits_mlp")["input"]
    np.testing.assert_allclose(run(factored, {"input": x}), run(factored, {"input": x}, optimize=False), rtol=1e-4, atol=1e-4)


def test_sample_cnn_gemm_keeps_its_attributes_and_convs():
    model = onnx.load(str(CNN))
    factored, report = Factorize(config(rank_ratio=0.5))(model)
    layers = by_node(report)
    assert (layers["fc1/Gemm"].rank, layers["fc1/Gemm"].params_after) == (32, 32 * (512 + 64))
    assert (layers["fc2/Gemm"].rank, layers["fc2/Gemm"].params_after) == (5, 5 * (64 + 10))
    assert "conv1/Conv" not in layers  # Conv is not a candidate at all
    assert params(factored) == params(model) - 32768 - 640 + 18432 + 370
    gemm = next(n for n in factored.graph.node if n.name == "fc1/Gemm")
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}["transB"] == 1
    shapes = {t.name: list(t.dims) for t in factored.graph.initializer}
    assert shapes["fc1.weight_A"] == [512, 32] and shapes["fc1.weight_B"] == [64, 32]  # transB=1: B stored [N, r]
    onnx.checker.check_model(factored, full_check=True)
    assert run(factored, evaluation("digits_cnn")).shape == (451, 10)


def test_only_where_it_saves_parameters():
    # ratio 0.9: 64x256 keeps 58 (18560 > 16384), 256x128 keeps 116 (44544 > 32768), 128x10 keeps 9 (1242 < 1280)
    _, report = Factorize(config(rank_ratio=0.9))(onnx.load(str(MLP)))
    layers = by_node(report)
    assert layers["fc3/MatMul"].rank == 9
    for name, (r, k, n) in {"fc1/MatMul": (58, 64, 256), "fc2/MatMul": (116, 256, 128)}.items():
        assert layers[name].action == "kept" and layers[name].rank is None
        assert layers[name].reason.startswith(f"rank {r} of {min(k, n)}: {r * (k + n)} parameters in the factors, not fewer")
        assert layers[name].params_before == layers[name].params_after == k * n


@pytest.mark.parametrize("data_aware", [False, True])
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_full_rank_reproduces_the_outputs(name, data_aware):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    factored, report = Factorize(config(rank_ratio=1.0, require_saving=False),
                                 calibration(name) if data_aware else None)(model)
    assert all(layer.rank == layer.full_rank for layer in report.layers)
    assert ops(factored)["MatMul"] == ops(model)["MatMul"] + len(report.layers)
    feed = evaluation(name)
    want = run(model, feed, optimize=False)
    got = run(factored, feed, optimize=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * np.abs(want).max())


def test_energy_picks_the_smallest_rank_reaching_it():
    model = onnx.load(str(MLP))
    _, report = Factorize(config(energy=0.9))(model)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in report.layers:
        s = np.linalg.svd(weights[layer.weight].astype(np.float64), compute_uv=False)
        share = np.cumsum(s ** 2) / np.sum(s ** 2)
        expected = int(np.argmax(share >= 0.9)) + 1
        k, n = weights[layer.weight].shape
        if expected * (k + n) < k * n:
            assert layer.rank == expected, layer
        else:
            assert layer.action == "kept" and layer.reason.startswith("--energy 0.9 needs rank")
    assert rank_for_energy(np.array([3.0, 2.0, 1.0]), 9 / 14) == 1 and rank_for_energy(np.array([3.0, 2.0, 1.0]), 0.92) == 2 \
        and rank_for_energy(np.array([3.0, 2.0, 1.0]), 0.93) == 3


def test_gemm_without_transb_with_alpha_beta_and_a_refit_bias_runs_what_numpy_computes():
    rng = np.random.default_rng(3)
    w, c = rng.standard_normal((48, 40)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    model = build_model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0)],
                        [float_value("x", ["n", 48])], [float_value("y", ["n", 40])],
                        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    x = np.maximum(rng.standard_normal((64, 48)), 0).astype(np.float32)  # non-centred inputs: the bias refit matters
    data = Dataset([{"x": x[:32]}, {"x": x[32:]}], None, 64, False, [])
    for dataset in (None, data):
        factored, report = Factorize(config(rank_ratio=0.25), dataset)(model)
        assert report.layers[0].rank == 10
        values = {t.name: numpy_helper.to_array(t) for t in factored.graph.initializer}
        expected = 0.5 * (x @ values["w_A"] @ values["w_B"]) + 2.0 * values["c"]
        np.testing.assert_allclose(run(factored, {"x": x}), expected, rtol=1e-4, atol=1e-4)
        if dataset is not None:
            assert not np.allclose(values["c"], c)  # refit
            assert report.layers[0].output_error < report.layers[0].plain_svd_error


# ---- data-aware vs plain -------------------------------------------------------------------------

@pytest.mark.parametrize("name, layer, output, others", [
    ("digits_mlp", "fc2/MatMul", "fc2/Add", ("fc1/*", "fc3/*")),
    ("digits_cnn", "fc1/Gemm", "fc1/Gemm", ("fc2/*",)),
])
def test_data_aware_beats_plain_svd_on_layer_output_error(name, layer, output, others):
    """One layer factorized at rank ratio 0.25, its output (bias included) compared with the original's on the
    real calibration data, and on the held-out evaluation data."""
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    target = next(n.output[0] for n in model.graph.node if n.name == output)
    plain, _ = Factorize(config(rank_ratio=0.25, exclude=others))(model)
    aware, report = Factorize(config(rank_ratio=0.25, exclude=others), calibration(name))(model)
    assert by_node(report)[layer].rank is not None
    for feed in (calibration(name).batches, [evaluation(name)]):
        outputs = [np.concatenate([v[target] for v in capture_activations(m, [target], feed)]) for m in (model, plain, aware)]
        error = [np.linalg.norm(y - outputs[0]) / np.linalg.norm(outputs[0]) for y in outputs[1:]]
        assert error[1] < 0.5 * error[0], error
    reported = by_node(report)[layer]
    assert reported.output_error < 0.5 * reported.plain_svd_error


def test_data_aware_keeps_more_accuracy_on_the_sample_mlp():
    model = onnx.load(str(MLP))
    labels = np.load(SAMPLES / "digits_mlp.eval.npz")["labels"]
    accuracy = []
    for dataset in (None, calibration("digits_mlp")):
        factored, _ = Factorize(config(rank_ratio=0.5, keep_float="last"), dataset)(model)
        accuracy.append(float(np.mean(run(factored, evaluation("digits_mlp")).argmax(1) == labels)))
    assert accuracy[1] >= 0.98 and accuracy[1] > accuracy[0], accuracy


def test_low_rank_is_the_best_rank_r_approximation_without_data():
    w = np.random.default_rng(0).standard_normal((30, 20))
    factors = low_rank(w, rank=6)
    u, s, vt = np.linalg.svd(w)
    assert np.isclose(np.linalg.norm(w - factors.a @ factors.b), np.sqrt(np.sum(s[6:] ** 2)))
    assert factors.a.shape == (30, 6) and factors.b.shape == (6, 20) and factors.rank == 6


# ---- what it skips, and why ---------------------------------------------------------------------

def test_twice_changes_nothing_more():
    once, _ = Factorize(config(rank_ratio=0.5))(make_mlp((64, 96, 80, 10), seed=2))
    twice, report = Factorize(config(rank_ratio=0.5))(once)
    assert not report.changed and twice.graph == once.graph
    assert "model is already factorized (X @ A @ B pairs): nothing more to factorize" in report.notes
    reasons = {layer.node: layer.reason for layer in report.layers}
    assert reasons.pop("fc2/MatMul") == "tiny (< 1 KiB)"  # its B is [5, 10]
    assert len(reasons) == 5 and all(reason.startswith("already factorized") for reason in reasons.values())


def test_excluded_keep_float_tiny_and_op_types_are_kept_with_reasons():
    model = make_mlp((64, 96, 80, 2), seed=5)  # fc2: 80 x 2 floats, 640 B
    _, report = Factorize(config(rank_ratio=0.25, exclude=("fc0*",)))(model)
    reasons = {layer.node: (layer.action, layer.reason) for layer in report.layers}
    assert reasons["fc0/MatMul"] == ("kept", "excluded (--exclude)")
    assert reasons["fc2/MatMul"] == ("kept", "tiny (< 1 KiB)")
    assert reasons["fc1/MatMul"][0].startswith("rank 20/80")
    _, report = Factorize(config(rank_ratio=0.25, op_types=("Gemm",)))(model)
    assert {layer.reason for layer in report.layers} == {"op type not selected (--op-types)"} and not report.changed
    _, report = Factorize(config(rank_ratio=0.25, keep_float="first"))(model)
    assert by_node(report)["fc0/MatMul"].reason == "--keep-float first" and by_node(report)["fc1/MatMul"].rank == 20


def test_tied_weight_is_factorized_once_and_shared():
    w = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32) / 8
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="a"), helper.make_node("MatMul", ["a", "w"], ["y"], name="b")],
        [float_value("x", ["n", 64])], [float_value("y", ["n", 64])], [numpy_helper.from_array(w, "w")])
    data = Dataset([{"x": np.random.default_rng(7).standard_normal((16, 64)).astype(np.float32)}], None, 16, False, [])
    factored, report = Factorize(config(rank_ratio=0.25), data)(model)
    assert [layer.rank for layer in report.layers] == [16, 16] and report.layers[1].action.endswith("(tied: shared factors)")
    assert "not data-aware: tied weight read by 2 layers" in report.layers[0].reason
    assert params(factored) == 16 * 128 and ops(factored)["MatMul"] == 4
    values = {t.name: numpy_helper.to_array(t) for t in factored.graph.initializer}
    x = data.batches[0]["x"]
    approx = values["w_A"] @ values["w_B"]
    np.testing.assert_allclose(run(factored, {"x": x}), x @ approx @ approx, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(factored, full_check=True)


def test_weight_also_read_by_another_op_or_in_another_layout_is_kept():
    w = np.random.default_rng(8).standard_normal((64, 64)).astype(np.float32)
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc"), helper.make_node("Transpose", ["w"], ["wt"], name="t"),
         helper.make_node("MatMul", ["a", "wt"], ["y"], name="fc_t")],
        [float_value("x", ["n", 64])], [float_value("y", ["n", 64])], [numpy_helper.from_array(w, "w")])
    factored, report = Factorize(config(rank_ratio=0.25))(model)
    assert not report.changed and factored.graph == model.graph
    assert by_node(report)["fc"].reason.startswith("weight also read by t (Transpose), which is not factorized")
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"), helper.make_node("Gemm", ["a", "w"], ["y"], name="gemm", transB=1)],
        [float_value("x", ["n", 64])], [float_value("y", ["n", 64])], [numpy_helper.from_array(w, "w")])
    _, report = Factorize(config(rank_ratio=0.25))(model)
    assert not report.changed and report.layers[0].reason.startswith("tied weight read in different layouts")


def test_unusable_weights_are_kept_with_reasons():
    rng = np.random.default_rng(9)
    bad = rng.standard_normal((64, 64)).astype(np.float32)
    bad[3, 4] = np.nan
    half = rng.standard_normal((64, 64)).astype(np.float16)
    model = build_model(
        [helper.make_node("MatMul", ["x", "bad"], ["a"], name="nan"),
         helper.make_node("Gemm", ["a", "w"], ["b"], name="transA", transA=1),
         helper.make_node("Cast", ["b"], ["bh"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["bh", "half"], ["y"], name="fp16")],
        [float_value("x", [64, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [64, 64])],
        [numpy_helper.from_array(bad, "bad"), numpy_helper.from_array(bad * 0 + 1, "w"), numpy_helper.from_array(half, "half")])
    factored, report = Factorize(config(rank_ratio=0.25))(model)
    reasons = {layer.node: layer.reason for layer in report.layers}
    assert reasons == {"nan": "weight holds NaN or infinite values", "transA": "Gemm with transA=1",
                       "fp16": "weight is float16: only float32 weights are factorized"}
    assert not report.changed and factored.graph == model.graph


def test_weights_in_constant_nodes_and_if_branches_are_factorized():
    rng = np.random.default_rng(10)
    inner, outer, const = (rng.standard_normal((3, 64, 64)) / 8).astype(np.float32)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["h", "inner"], ["t"], name="fc_then")], "then", [],
                                    [float_value("t", None)], [numpy_helper.from_array(inner, "inner")])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["h", "outer"], ["e"], name="fc_else")], "else", [],
                                    [float_value("e", None)])
    model = build_model(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(const, "c")),
         helper.make_node("MatMul", ["x", "c"], ["h"], name="fc_const"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        [float_value("x", ["n", 64]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [float_value("y", ["n", 64])], [numpy_helper.from_array(outer, "outer")])
    x = rng.standard_normal((8, 64)).astype(np.float32)
    data = Dataset([{"x": x, "cond": np.array(True)}], None, 8, False, [])
    factored, report = Factorize(config(rank_ratio=0.25), data)(model)
    layers = by_node(report)
    assert {name: layer.rank for name, layer in layers.items()} == {"fc_const": 16, "fc_then": 16, "fc_else": 16}
    assert layers["fc_const"].output_error is not None
    assert "not data-aware: inside an If/Loop/Scan body" in layers["fc_then"].reason
    assert "moved 1 Constant-node tensor(s) to initializers" in report.notes
    onnx.checker.check_model(factored, full_check=True)
    body = next(a.g for a in factored.graph.node[-1].attribute if a.name == "then_branch")
    assert {i.name for i in body.initializer} == {"inner_A", "inner_B"}
    values = {t.name: numpy_helper.to_array(t) for t in list(factored.graph.initializer) + list(body.initializer)}
    h = x @ values["c_A"] @ values["c_B"]
    for cond, name in ((True, "inner"), (False, "outer")):
        for optimize in (False, True):
            got = run(factored, {"x": x, "cond": np.array(cond)}, optimize)
            np.testing.assert_allclose(got, h @ values[name + "_A"] @ values[name + "_B"], rtol=1e-4, atol=1e-4)


# ---- the latency gate (a stand-in timer: no test depends on timing) -------------------------------

def test_layers_timed_slower_are_kept_and_rows_come_from_the_shapes():
    calls = []

    def timer(op_type, k, n, r, rows, trans_b, threads):
        calls.append((op_type, k, n, r, rows, trans_b))
        return (1e-6, 2e-6) if k == 64 else (2e-6, 1e-6)

    factored, report = Factorize(FactorizeConfig(rank_ratio=0.5), timer=timer)(onnx.load(str(MLP)))
    layers = by_node(report)
    assert layers["fc1/MatMul"].action == "kept"
    assert layers["fc1/MatMul"].reason == "factored layer measured slower: 2.0 us vs 1.0 us at 1 row(s) (--allow-slower factorizes it anyway)"
    assert layers["fc1/MatMul"].latency_us == {"original": 1.0, "factored": 2.0, "rows": 1}
    assert layers["fc2/MatMul"].rank == 64 and "timed alone at 1 row(s): 2.0 us -> 1.0 us" in layers["fc2/MatMul"].reason
    assert sorted(calls) == [("MatMul", 64, 256, 32, 1, False), ("MatMul", 128, 10, 5, 1, False), ("MatMul", 256, 128, 64, 1, False)]
    assert any(note.startswith("latency gate: 3 distinct layer shape(s)") for note in report.notes)
    # a fixed leading shape [2, 5, 64] gives 10 rows; a Gemm with transB is timed as one
    model = build_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [float_value("x", [2, 5, 64])],
                        [float_value("y", [2, 5, 64])], [numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")])
    calls.clear()
    Factorize(FactorizeConfig(rank_ratio=0.25), timer=timer)(model)
    assert calls == [("MatMul", 64, 64, 16, 10, False)]
    calls.clear()
    Factorize(FactorizeConfig(rank_ratio=0.25), timer=timer)(onnx.load(str(CNN)))
    assert ("Gemm", 512, 64, 16, 1, True) in calls


def test_measure_layer_runs_both_variants_in_onnxruntime():
    original, factored = measure_layer("Gemm", 96, 32, 8, 3, trans_b=True, budget_s=0.01)
    assert original > 0 and factored > 0


# ---- library and CLI ------------------------------------------------------------------------------

def test_library_refuses_bad_configs():
    with pytest.raises(UsageError, match="give one of them"):
        Factorize(FactorizeConfig(rank_ratio=0.5, energy=0.9))
    with pytest.raises(UsageError, match="a rank is required"):
        Factorize(FactorizeConfig())
    with pytest.raises(UsageError, match="--rank-ratio 0: must be greater than 0"):
        api.factorize(MLP, None, FactorizeConfig(rank_ratio=0))
    with pytest.raises(UsageError, match="damping -1"):
        Factorize(FactorizeConfig(rank_ratio=0.5, damping=-1))


def test_library_function_is_exported(tmp_path):
    import onnxshrink

    report = onnxshrink.factorize(MLP, tmp_path / "f.onnx", config(rank_ratio=0.25), run_validation=False)
    assert report.command == "factorize" and report.passes[0].changed and report.size["ratio"] < 0.4
    onnx.checker.check_model(str(tmp_path / "f.onnx"), full_check=True)


def test_cli_end_to_end_with_json_and_the_accuracy_gate(tmp_path, runner):
    output = tmp_path / "mlp.f.onnx"
    common = ("--calibration", SAMPLES / "digits_mlp.calib.npz", "--allow-slower",
              "--data", SAMPLES / "digits_mlp.eval.npz", "--labels", "labels", "--max-accuracy-drop", "0.01")
    result = invoke(runner, "factorize", MLP, "-o", output, "--json", "--rank-ratio", "0.5", "--keep-float", "last", *common)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "factorize" and report["validation"]["passed"]
    layers = {layer["node"]: layer for layer in report["passes"][0]["layers"]}
    assert (layers["fc2/MatMul"]["rank"], layers["fc2/MatMul"]["params_before"], layers["fc2/MatMul"]["params_after"]) == (64, 32768, 24576)
    assert layers["fc3/MatMul"]["action"] == "kept" and report["size"]["ratio"] < 0.75
    options = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}["onnxshrink.options"])
    assert options["rank_ratio"] == 0.5 and options["check_latency"] is False
    onnx.checker.check_model(str(output), full_check=True)
    # a rank too low for the accuracy budget: exit 1, the result beside it as .failed.onnx, output untouched
    before = output.read_bytes()
    result = invoke(runner, "factorize", MLP, "-o", output, "--force", "--rank-ratio", "0.1", *common)
    assert result.exit_code == 1, result.output
    assert output.read_bytes() == before and (tmp_path / "mlp.f.failed.onnx").is_file()
    # default output name
    source = save_model(onnx.load(str(MLP)), tmp_path / "m.onnx")
    assert invoke(runner, "factorize", source, "--energy", "0.9", "--no-validate").exit_code == 0
    assert (tmp_path / "m.factorized.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "error: --rank-ratio or --energy is required (such as --rank-ratio 0.5 or --energy 0.99)"),
    (["--rank-ratio", "0.5", "--energy", "0.9"], "error: --rank-ratio and --energy both choose the rank: give one of them"),
    (["--rank-ratio", "1.5"], "error: --rank-ratio 1.5: must be greater than 0 and at most 1"),
    (["--rank-ratio", "0"], "error: --rank-ratio 0.0: must be greater than 0 and at most 1"),
    (["--rank-ratio", "nan"], "error: --rank-ratio nan: must be greater than 0 and at most 1"),
    (["--energy", "0"], "error: --energy 0.0: must be greater than 0 and at most 1"),
    (["--energy", "1.01"], "error: --energy 1.01: must be greater than 0 and at most 1"),
    (["--rank-ratio", "half"], "error: Invalid value for '--rank-ratio'"),
    (["--rank-ratio", "0.5", "--op-types", "Conv"], "error: --op-types: unsupported op type(s) Conv (choose from MatMul, Gemm)"),
    (["--rank-ratio", "0.5", "--keep-float", "middle"], "error: --keep-float 'middle': choose first, last or both"),
    (["--rank-ratio", "0.5", "--calibration", "wrong.npz"], "error: wrong.npz: missing input 'input' (keys present: x)"),
    (["--rank-ratio", "0.5", "--calibration", "missing.npz"], "error: missing.npz: no such data file"),
])
def test_cli_bad_options_are_one_line_exit_2_or_3(tmp_path, runner, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_bad_option(runner, tmp_path, "factorize", *args, message=message)
