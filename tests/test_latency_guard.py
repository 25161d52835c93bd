"""quantize's latency guard (issue 16 item 3): the layers measured slower than float move to the folded form until
the model is no slower. The measurement is injected (FakeMeasure), so what counts as slower is decided here, never
by the machine's timing; one end-to-end test runs the real measurement and asserts only the structure."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import make_mlp, save_model
from onnxshrink import api
from onnxshrink.data import Dataset
from onnxshrink.errors import InputsUnavailable
from onnxshrink.latency_guard import GuardConfig, _schedule, charge_layers
from onnxshrink.passes.folded_weights import FOLD_REQUESTED, FOLDED, folded_source
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.runtime import make_session
from onnxshrink.validate import Thresholds, ValidateConfig

LAYERS = ("fc0/MatMul", "fc1/MatMul", "fc2/MatMul", "fc3/MatMul")


class FakeMeasure:
    """The candidate is slower (1.5x at every batch) while a layer of `slow` runs a quantized kernel; the profile
    gives each quantized layer `excess[layer]` microseconds more than the original's. In dynamic mode a layer runs
    a quantized kernel when its MatMul node is gone (the integer form replaces it; folded and float keep it)."""

    def __init__(self, slow, excess, batches=(1, 8)):
        self.slow, self.excess, self.batches = set(slow), dict(excess), batches
        self.timed = []  # the quantized layers of each candidate timed
        self.profiled = []  # the batch of each profile

    def latency(self, candidate: onnx.ModelProto) -> dict:
        quantized = self.quantized(candidate)
        self.timed.append(quantized)
        p50 = 1.5 if quantized & self.slow else 0.9
        return {b: {"original": {"p50": 1.0, "p90": 1.01}, "candidate": {"p50": p50, "p90": p50 + 0.01},
                    "ratio": p50, "runs": 10, "batch": b, "threads": 1} for b in self.batches}

    def layer_times(self, model: onnx.ModelProto, batch: int, weights: dict) -> dict:
        self.profiled.append(batch)
        quantized = self.quantized(model)
        return {layer: 10.0 + (self.excess.get(layer, 0.0) if layer in quantized else 0.0) for layer in weights}

    @staticmethod
    def quantized(model: onnx.ModelProto) -> set:
        present = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
        return {layer for layer in LAYERS if layer not in present}


@pytest.fixture
def mlp(tmp_path):
    return save_model(make_mlp((32, 64, 64, 64, 10)), tmp_path / "m.onnx")


def dynamic() -> QuantizeConfig:
    return QuantizeConfig(integer_min_macs=0)  # integer kernels on every layer of the tiny MLP


def actions(report) -> dict:
    return {d.node: d for d in report.passes[0].layers}


@pytest.mark.parametrize("slow, moved", [({"fc2/MatMul"}, ["fc2/MatMul"]),
                                         ({"fc2/MatMul", "fc1/MatMul"}, ["fc2/MatMul", "fc1/MatMul"])])
def test_the_slowest_layers_move_one_by_one_until_no_slower(mlp, tmp_path, slow, moved):
    fake = FakeMeasure(slow, {"fc2/MatMul": 30.0, "fc1/MatMul": 20.0, "fc0/MatMul": 5.0})
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert [e["node"] for e in guard["layers"]] == moved  # slowest excess first, no more than needed
    assert guard["attempts"] == len(moved) and guard["slower_before"] and not guard["slower_after"]
    assert guard["stopped"].startswith("no slower than the original after moving")
    assert guard["ranked"] == 3 and fake.profiled == [1, 1]  # original and candidate, once
    layers = actions(report)
    for node in LAYERS[:3]:
        if node in moved:
            assert layers[node].action == FOLDED
            assert layers[node].reason.startswith("latency guard: moved to folded (int8 storage, float kernel)")
            assert "us slower than the float original's at batch 1" in layers[node].reason
        else:
            assert layers[node].action.startswith("int8 per-channel")
    # The written model runs in onnxruntime, the moved layers as float MatMuls over int8 weights (Cast, Mul).
    written = onnx.load(str(tmp_path / "q.onnx"))
    nodes = {n.name: n for n in written.graph.node}
    for node in moved:
        assert nodes[node].op_type == "MatMul" and folded_source(written.graph, nodes[node].input[1])
    assert sum(n.op_type == "MatMulInteger" for n in written.graph.node) == 4 - len(moved)
    make_session(written).run(None, {"input": np.zeros((2, 32), np.float32)})
    assert any(note.startswith("latency guard: slower than the original (1.50x at batch 1, 1.50x at batch 8)")
               for note in report.notes)


def test_the_json_lists_what_moved(mlp, tmp_path):
    fake = FakeMeasure({"fc0/MatMul"}, {"fc0/MatMul": 12.0})
    document = json.loads(api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=lambda o: fake).to_json())
    guard = document["latency_guard"]
    assert guard["batches"] == [1, 8] and set(guard["before"]) == {"1", "8"}
    assert guard["before"]["8"]["slower"] and not guard["after"]["8"]["slower"]
    assert guard["layers"] == [{"node": "fc0/MatMul", "batch": 1, "candidate_us": 22.0, "original_us": 10.0,
                                "excess_us": 12.0, "to": "folded", "reason": guard["layers"][0]["reason"]}]
    assert "12 us slower" in guard["layers"][0]["reason"]
    jsonschema = pytest.importorskip("jsonschema")
    from test_schemas import schema

    jsonschema.validate(document, schema("command"))


def test_no_slower_moves_nothing_and_profiles_nothing(mlp, tmp_path):
    fake = FakeMeasure(set(), {"fc0/MatMul": 50.0})
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=lambda original: fake)
    assert report.latency_guard["layers"] == [] and report.latency_guard["attempts"] == 0
    assert fake.profiled == [] and len(fake.timed) == 1
    assert report.latency_guard["form"] == "first" and report.latency_guard["forms"] == []  # one timed pair, no form
    assert all(d.action.startswith("int8 per-channel") for d in report.passes[0].layers)


def test_allow_slower_keeps_the_first_result(mlp, tmp_path):
    fake = FakeMeasure(set(LAYERS), {"fc0/MatMul": 50.0})
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), allow_slower=True, latency_guard=lambda original: fake)
    assert report.latency_guard is None and fake.timed == []
    assert all(d.action.startswith("int8 per-channel") for d in report.passes[0].layers)
    assert not any("latency guard" in note for note in report.notes)


def test_a_layer_the_accuracy_fallback_kept_float_stays_float(tmp_path):
    from test_fallback import SENSITIVE, sensitive_mlp

    model = save_model(sensitive_mlp(), tmp_path / "s.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", input=rng.standard_normal((32, 16)).astype(np.float32))
    validation = ValidateConfig(data=str(tmp_path / "eval.npz"), thresholds=Thresholds(min_cosine=0.99))
    # Every layer measures slower quantized, the fallback's float one most of all: it is no candidate.
    fake = FakeMeasure({"fc0/MatMul", "fc2/MatMul"}, {SENSITIVE: 90.0, "fc2/MatMul": 20.0, "fc0/MatMul": 10.0})
    report = api.quantize(model, tmp_path / "q.onnx", QuantizeConfig(integer_min_macs=0, per_channel=False, activation_error_bound=0),
                          validation=validation, latency_guard=lambda original: fake)
    assert [d["node"] for d in report.fallback["layers"]] == [SENSITIVE]
    layers = actions(report)
    assert layers[SENSITIVE].action == "kept float" and layers[SENSITIVE].reason.startswith("accuracy fallback")
    assert [e["node"] for e in report.latency_guard["layers"]] == ["fc2/MatMul", "fc0/MatMul"]
    assert layers["fc0/MatMul"].action == layers["fc2/MatMul"].action == FOLDED
    written = onnx.load(str(tmp_path / "q.onnx"))
    sensitive = next(n for n in written.graph.node if n.name == SENSITIVE)
    assert sensitive.input[1] == "fc1.weight"  # the float original, not an int8 copy
    assert report.validation.passed


@pytest.mark.parametrize("why, kwargs", [
    ("validation is off", {"run_validation": False}),
    ("latency measurement is off", {"validation": ValidateConfig(latency=False)}),
])
def test_the_guard_says_why_it_did_not_run(mlp, tmp_path, why, kwargs):
    fake = FakeMeasure(set(LAYERS), {})
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=lambda original: fake, **kwargs)
    assert report.latency_guard is None and fake.timed == []
    assert f"latency guard did not run: {why}" in " ".join(report.notes)


def test_no_inputs_that_run_means_no_guard(mlp, tmp_path):
    def unavailable(original):
        raise InputsUnavailable("Concat node 'head': shapes differ")

    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=unavailable)
    assert report.latency_guard is None
    assert "latency guard did not run: no input runs the model (Concat node 'head': shapes differ)" in report.notes


def test_external_data_models_are_not_guarded(tmp_path):
    model = make_mlp((32, 64, 64, 64, 10))
    onnx.save(model, str(tmp_path / "x.onnx"), save_as_external_data=True, location="x.onnx.data", size_threshold=0)
    fake = FakeMeasure(set(LAYERS), {})
    report = api.quantize(tmp_path / "x.onnx", tmp_path / "q.onnx", dynamic(), latency_guard=lambda original: fake)
    assert report.latency_guard is None and fake.timed == []
    assert any(note.startswith("latency guard did not run: the model keeps its weights in external data")
               for note in report.notes)


def test_end_to_end_with_the_real_measurement(mlp, tmp_path):
    """onnxruntime's timer and profiler: only the structure is asserted (which layers move depends on the CPU)."""
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=GuardConfig(budget_s=0.05, profile_runs=3))
    guard = report.latency_guard
    assert guard["batches"] == [1, 8] and set(guard["before"]) == set(guard["after"]) == {1, 8}
    assert guard["stopped"] and guard["attempts"] <= GuardConfig().max_attempts
    for entry in guard["layers"]:
        assert entry["to"] in ("folded", "float") and actions(report)[entry["node"]].reason == entry["reason"]
    assert guard["slower_before"] or guard["layers"] == []
    make_session(onnx.load(str(tmp_path / "q.onnx"))).run(None, {"input": np.zeros((1, 32), np.float32)})
    assert any(note.startswith("latency guard") for note in report.notes)


# ---- the passes' `fold` ---------------------------------------------------------------------------------


def _dataset(rows=16, width=32) -> Dataset:
    x = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    return Dataset(batches=[{"input": x}], labels=None, samples=rows, synthetic=False, notes=[])


@pytest.mark.parametrize("make", [
    lambda: QuantizeDynamic(QuantizeConfig(integer_min_macs=0, fold=("fc1*",))),
    lambda: QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0, fold=("fc1*",), smooth=False), _dataset()),
    lambda: QuantizeBlockwise(BlockwiseConfig(block_size=16, integer_below=0, fold=("fc1*",))),
], ids=["dynamic", "static", "bits4"])
def test_every_mode_folds_the_layers_its_config_names(make):
    model = make_mlp((32, 64, 64, 64, 10))
    result, report = make()(model)
    layers = {d.node: d for d in report.layers}
    assert layers["fc1/MatMul"].action == FOLDED and layers["fc1/MatMul"].reason == FOLD_REQUESTED
    assert all(not d.action.startswith(FOLDED) for name, d in layers.items() if name != "fc1/MatMul")
    fc1 = next(n for n in result.graph.node if n.name == "fc1/MatMul")
    assert fc1.op_type == "MatMul" and folded_source(result.graph, fc1.input[1])
    x = _dataset(4).batches[0]
    reference = make_session(model).run(None, x)[0]
    np.testing.assert_allclose(make_session(result).run(None, x)[0], reference, atol=0.2 * np.abs(reference).max())
    again, second = make()(result)  # a second run changes nothing more
    assert not second.changed


# ---- charging profiled nodes to layers ------------------------------------------------------------------


def test_nodes_are_charged_to_the_layer_whose_weight_they_read():
    """A quantizer feeding two layers splits between them; the node after a layer is its own; a fused node that
    reads an int8 copy (name starting with the weight's) counts for the layer; an unrelated node for none."""
    init = [helper.make_tensor(n, TensorProto.INT8, [1], [1]) for n in ("wa_int8", "wb_int8", "wab_int8")]
    nodes = [
        helper.make_node("LayerNormalization", ["x"], ["n"], name="norm"),
        helper.make_node("DynamicQuantizeLinear", ["n"], ["q", "s", "z"], name="dql"),
        helper.make_node("MatMulIntegerToFloat", ["q", "wa_int8", "s", "z"], ["a"], name="fused_a"),
        helper.make_node("MatMulIntegerToFloat", ["q", "wb_int8", "s", "z"], ["b"], name="fused_b"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Add", ["ra", "b"], ["y"], name="add"),
        helper.make_node("MatMul", ["y", "wab_int8"], ["out"], name="wab_matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])], init)
    times = {"norm": 7.0, "dql": 4.0, "fused_a": 10.0, "fused_b": 20.0, "relu_a": 1.0, "add": 3.0, "wab_matmul": 5.0}
    charged = charge_layers(helper.make_model(graph), times, {"A": "wa", "B": "wb", "AB": "wab"})
    # relu_a follows fused_a; dql feeds A and B; norm feeds only dql (second round); add feeds only AB's MatMul.
    assert charged == {"A": 10.0 + 1.0 + 2.0 + 3.5, "B": 20.0 + 2.0 + 3.5, "AB": 5.0 + 3.0}


def test_the_schedule_moves_one_layer_a_step_then_doubles():
    assert _schedule(0) == [] and _schedule(1) == [1] and _schedule(3) == [1, 2, 3]
    assert _schedule(10) == [1, 2, 3, 4, 8, 10] and _schedule(8) == [1, 2, 3, 4, 8]


# ---- whole-model forms: when single layers do not help ---------------------------------------------------


class FormMeasure(FakeMeasure):
    """Times by the form a candidate has: "first" (a quantized kernel on some layer: static QDQ, or dynamic
    mode's first result), "folded" (every layer a float MatMul over int8 weights), "dynamic" (static mode's
    dynamic-mode result: DynamicQuantizeLinear present). Single layers moved change nothing: the slowdown is the
    chain's, as on the PP-OCR classifier."""

    def __init__(self, ratios, excess=None, batches=(1, 8)):
        super().__init__(set(), excess or {}, batches)
        self.ratios = ratios
        self.forms = []  # the form of each candidate timed

    def latency(self, candidate: onnx.ModelProto) -> dict:
        form = self.form(candidate)
        self.forms.append(form)
        p50 = self.ratios[form]
        return {b: {"original": {"p50": 1.0, "p90": 1.01}, "candidate": {"p50": p50, "p90": p50 + 0.01},
                    "ratio": p50, "runs": 10, "batch": b, "threads": 1} for b in self.batches}

    def layer_times(self, model: onnx.ModelProto, batch: int, weights: dict) -> dict:
        self.profiled.append(batch)
        return {layer: 10.0 + (self.excess.get(layer, 0.0) if self.form(model) != "folded" else 0.0) for layer in weights}

    @staticmethod
    def form(model: onnx.ModelProto) -> str:
        ops = {n.op_type for n in model.graph.node}
        if "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops:
            return "dynamic" if StaticSeen.static else "first"
        if "QuantizeLinear" in ops or "MatMulInteger" in ops:
            return "first"
        return "folded"


class StaticSeen:
    static = False  # whether the test quantizes in static mode (then dynamic mode's integer layers are a form)


@pytest.fixture
def static_mode():
    StaticSeen.static = True
    yield
    StaticSeen.static = False


@pytest.fixture
def calibrated(tmp_path):
    """An MLP and a calibration file with held-out samples (the accuracy fallback judges forms on them)."""
    model = save_model(make_mlp((32, 64, 64, 64, 10)), tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", input=np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32))
    return model, tmp_path / "cal.npz"


def static() -> StaticQuantizeConfig:
    return StaticQuantizeConfig(integer_min_macs=0, smooth=False)


def test_single_layers_failing_the_whole_model_folded_is_returned(mlp, tmp_path):
    fake = FormMeasure({"first": 1.5, "folded": 0.98}, {"fc2/MatMul": 30.0, "fc1/MatMul": 20.0})
    report = api.quantize(mlp, tmp_path / "q.onnx", dynamic(), latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert fake.forms == ["first", "first", "first", "folded"]  # the first, two single-layer steps, the form
    assert guard["form"] == "folded" and guard["attempts"] == 3 and guard["layers"] == []
    assert guard["slower_before"] and not guard["slower_after"] and guard["after"][1]["ratio"] == 0.98
    assert [(f["form"], f["outcome"], f["accuracy"]) for f in guard["forms"]] == [
        ("folded", "chosen: no slower than the original", "not judged")]  # no budget: near-lossless, not judged
    assert "then whole model folded: single layers left the model slower (1.50x at batch 1" in guard["stopped"]
    for decision in report.passes[0].layers:
        assert decision.action == FOLDED
        assert decision.reason.startswith("latency guard: whole model folded: single layers left the model slower")
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert all(folded_source(written.graph, n.input[1]) for n in written.graph.node if n.op_type == "MatMul")
    assert not any(n.op_type == "MatMulInteger" for n in written.graph.node)
    assert any(note.startswith("latency guard: slower than the original (1.50x at batch 1, 1.50x at batch 8); "
                               "returned the whole model folded") for note in report.notes)


def test_static_mode_folded_still_slower_then_dynamic(calibrated, tmp_path, static_mode):
    model, cal = calibrated
    fake = FormMeasure({"first": 1.5, "folded": 1.2, "dynamic": 0.9})
    report = api.quantize(model, tmp_path / "q.onnx", static(), calibration=cal, latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert report.fallback["met"]  # the budget the forms are judged with (min_cosine 0.99 on held-out samples)
    assert guard["ranked"] == 0 and fake.forms == ["first", "folded", "dynamic"]  # no layer to blame: forms
    assert guard["form"] == "dynamic" and not guard["slower_after"] and guard["attempts"] == 2
    folded, dyn = guard["forms"]
    assert folded["outcome"] == "still slower than the original" and folded["slower"] and folded["accuracy"] == "passed"
    assert dyn["outcome"] == "chosen: no slower than the original" and dyn["accuracy"] == "passed"
    assert 0 <= dyn["drift"] < 0.1
    assert report.passes[0].name == "quantize-dynamic"
    quantized = [d for d in report.passes[0].layers if d.action.startswith("int")]
    assert quantized and all(d.reason.startswith("latency guard: whole model dynamic: ") for d in quantized)
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert any(n.op_type == "DynamicQuantizeLinear" for n in written.graph.node)
    assert report.validation.passed


def test_static_mode_without_held_out_samples_never_tries_dynamic(calibrated, tmp_path, static_mode):
    model, cal = calibrated
    fake = FormMeasure({"first": 1.5, "folded": 1.2, "dynamic": 0.9})
    report = api.quantize(model, tmp_path / "q.onnx", static(), calibration=cal, fallback=False,
                          latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert fake.forms == ["first", "folded"] and guard["form"] == "folded"  # the fastest measured
    assert guard["forms"][1]["outcome"].startswith("not tried: no accuracy budget and held-out samples")
    assert guard["slower_after"] and "the fastest model measured is the one returned (whole model folded" in guard["stopped"]


@pytest.mark.parametrize("ratios, returned", [({"first": 1.5, "folded": 1.3, "dynamic": 1.4}, "folded"),
                                              ({"first": 1.1, "folded": 1.3, "dynamic": 1.2}, "first")])
def test_nothing_no_slower_keeps_the_fastest_measured_and_says_so(calibrated, tmp_path, static_mode, ratios, returned):
    model, cal = calibrated
    fake = FormMeasure(ratios)
    report = api.quantize(model, tmp_path / "q.onnx", static(), calibration=cal, latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert guard["form"] == returned and guard["slower_after"]
    assert guard["after"][1]["ratio"] == min(ratios.values())
    assert "then no whole-model form was no slower" in guard["stopped"]
    assert "the fastest model measured is the one returned" in guard["stopped"]
    outcomes = {f["form"]: f["outcome"] for f in guard["forms"]}
    assert outcomes["folded"].endswith("; the fastest measured: returned") == (returned == "folded")
    layers = [d for d in report.passes[0].layers if d.action.startswith("int")]
    said = [d.reason.startswith("latency guard: whole model folded: nothing measured was no slower") for d in layers]
    assert all(said) if returned == "folded" else not any(said)
    note = next(n for n in report.notes if n.startswith("latency guard: slower"))
    assert "still slower" in note
    jsonschema = pytest.importorskip("jsonschema")
    from test_schemas import schema

    jsonschema.validate(json.loads(report.to_json()), schema("command"))


def test_a_form_that_misses_the_accuracy_budget_is_never_returned(mlp):
    """The guard alone, with a judge that fails dynamic mode: it is rejected before it is timed."""
    from onnxshrink.latency_guard import LatencyGuard, WholeForm

    model = onnx.load(str(mlp))
    fake = FormMeasure({"first": 1.5, "folded": 1.2, "dynamic": 0.5})
    StaticSeen.static = True
    try:
        first = QuantizeStatic(static(), _dataset())
        forms = [WholeForm("folded", QuantizeStatic(dataclasses.replace(static(), fold=("*",)), _dataset()), "folded"),
                 WholeForm("dynamic", QuantizeDynamic(dynamic()), "dynamic", lossy=True)]
        judge = lambda m: (FormMeasure.form(m) != "dynamic", 0.3 if FormMeasure.form(m) == "dynamic" else 0.01)  # noqa: E731
        guard = LatencyGuard(first, lambda fold, fresh: first(fresh), lambda original: fake, forms=forms, judge=judge)
        _, report = guard(model)
    finally:
        StaticSeen.static = False
    assert fake.forms == ["first", "folded"]  # dynamic judged, rejected, never timed
    assert guard.summary.forms[1]["outcome"] == "rejected: misses the accuracy budget on the held-out samples (drift 0.3)"
    assert guard.summary.form == "folded" and guard.summary.forms[1]["accuracy"] == "failed"


def test_a_form_that_writes_what_the_first_result_wrote_is_not_timed_again(mlp, tmp_path):
    """Dynamic mode at its default threshold folds every layer of the tiny MLP already: folding them all is no
    new model, so the guard does not time it again and keeps the first result."""
    fake = FormMeasure({"first": 1.5, "folded": 1.5})
    report = api.quantize(mlp, tmp_path / "q.onnx", QuantizeConfig(), latency_guard=lambda original: fake)
    guard = report.latency_guard
    assert fake.forms == ["folded"] and guard["form"] == "first" and guard["slower_after"]
    assert guard["forms"][0]["outcome"] == "not tried: it writes the same layers as the first result"
