"""Top-1 agreement only where argmax is an answer: 2+ classes on the last axis, not mostly ties, not a recurrent
state handed back (silero VAD warned "top-1 agreement 0" on its stateN and its [batch, 1] probability)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_mlp, save_model
from onnxshrink import api
from onnxshrink.validate import ValidateConfig, compare_outputs, state_outputs, top1_agreement
from test_input_synthesis import recurrent_state


def test_class_scores_keep_their_agreement():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 10))
    b = a.copy()
    b[:16] = -b[:16]  # a quarter of the rows flip their winner
    agreement = compare_outputs(a, b).top1_agreement
    assert agreement == pytest.approx(np.mean(np.argmax(a, -1) == np.argmax(b, -1))) and agreement < 0.8


def test_one_column_has_no_top1():
    probability = np.random.default_rng(1).random((16, 1))
    assert compare_outputs(probability, probability * 0.5).top1_agreement is None


def test_rows_mostly_tied_have_no_top1():
    """All-zero rows (a ReLU state at rest): the original's argmax is 0 by order alone; any drift moves it."""
    a = np.zeros((16, 8))
    a[:4, 3] = 1.0  # 4 rows of 16 have a unique winner
    b = a + np.random.default_rng(2).random(a.shape) * 1e-3
    assert compare_outputs(a, b).top1_agreement is None
    assert top1_agreement(a, b) is None


def test_a_few_tied_rows_are_left_out_of_the_agreement():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 5))
    a[:3] = 0.0  # tied rows: whatever the candidate does there is not counted
    b = a.copy()
    b[:3] = rng.standard_normal((3, 5))
    b[3] = -a[3]  # one real row flips: 6 of 7 untied rows agree
    assert compare_outputs(a, b).top1_agreement == pytest.approx(6 / 7)


def test_state_outputs_are_the_ones_shaped_as_a_state_input():
    batch = {"x": np.zeros((16, 512), np.float32), "state": np.zeros((2, 16, 128), np.float32),
             "features": np.zeros((16, 10), np.float32)}
    reference = {"stateN": np.zeros((2, 16, 128)), "output": np.zeros((16, 1)), "logits": np.zeros((16, 10))}
    # logits are shaped as `features`, but `features` carries its samples along axis 0: an input, not a state
    assert state_outputs(reference, batch, {"x": 0, "state": 1, "features": 0}) == {"stateN"}
    assert compare_outputs(reference["stateN"] + 1, reference["stateN"], scores=False).top1_agreement is None
    # a fixed batch of 1, passed whole: [1, 10] logits beside [1, 10] features are scores; `hn` beside `h` a state
    whole = {"features": np.zeros((1, 10), np.float32), "h": np.zeros((1, 128), np.float32)}
    outputs = {"logits": np.zeros((1, 10)), "hn": np.zeros((1, 128))}
    assert state_outputs(outputs, whole, {}) == {"hn"}


def _negated_state(model: onnx.ModelProto) -> onnx.ModelProto:
    """The candidate: stateN = -Relu(state), every hidden unit's order reversed (top-1 agreement 0 before)."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    relu = next(n for n in candidate.graph.node if n.output[0] == "stateN")
    relu.output[0] = "relu_state"
    candidate.graph.node.append(helper.make_node("Neg", ["relu_state"], ["stateN"]))
    return candidate


def test_validation_reports_no_top1_for_a_recurrent_state(tmp_path):
    original = save_model(recurrent_state(), tmp_path / "vad.onnx")
    candidate = save_model(_negated_state(recurrent_state()), tmp_path / "vad.moved.onnx")
    report = api.validate(original, candidate, ValidateConfig(latency=False))
    assert report.input_shapes["state"] == [2, 16, 4]
    assert report.outputs["stateN"].top1_agreement is None
    assert report.outputs["stateN"].cosine < 0.99  # still judged, by cosine
    assert report.outputs["output"].top1_agreement is not None  # [batch, 5] scores: still counted
    warning = next(note for note in report.notes if note.startswith("warning:"))
    assert "cosine" in warning and "top-1" not in warning


def test_classifier_validation_keeps_top1(tmp_path):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    report = api.validate(path, path, ValidateConfig(latency=False))
    assert report.outputs["logits"].top1_agreement == 1.0


def test_maps_of_rank_4_have_no_top1():
    """A detector's probability map [batch, 1, H, W] or a mel spectrogram [time, 1, frames, bins]: argmax over the
    last axis picks a column, not a class (PP-OCR's detector and livekit's melspectrogram warned at 0.88-0.94)."""
    rng = np.random.default_rng(4)
    a = rng.random((4, 1, 8, 8))
    assert compare_outputs(a, a + rng.random(a.shape) * 0.1).top1_agreement is None
    tokens = rng.standard_normal((4, 6, 5))  # per-token scores, rank 3: counted
    assert compare_outputs(tokens, tokens).top1_agreement == 1.0


def _graph_ending(*ops_of_outputs) -> onnx.GraphProto:
    """x [2, 4, 8] through one node per (op, name) pair; the Concat/LayerNormalization/decomposed forms are built
    as real exporters write them."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 8])  # samples on axis 0: no state
    nodes, outputs, inits = [], [], [helper.make_tensor("g", onnx.TensorProto.FLOAT, [8], [1.0] * 8),
                                     helper.make_tensor("b", onnx.TensorProto.FLOAT, [8], [0.0] * 8),
                                     helper.make_tensor("w", onnx.TensorProto.FLOAT, [8, 8], np.random.default_rng(5).standard_normal(64).tolist())]
    for op, name in ops_of_outputs:
        if op == "LayerNormalization":
            nodes.append(helper.make_node(op, ["x", "g", "b"], [name + "_n"], axis=-1))
            nodes.append(helper.make_node("Identity", [name + "_n"], [name]))  # reshaping ops are looked through
        elif op == "decomposed":
            nodes += [helper.make_node("ReduceMean", ["x"], [name + "_m"], axes=[-1]),
                      helper.make_node("Sub", ["x", name + "_m"], [name + "_d"]),
                      helper.make_node("Mul", [name + "_d", name + "_d"], [name + "_s"]),
                      helper.make_node("ReduceMean", [name + "_s"], [name + "_v"], axes=[-1]),
                      helper.make_node("Sqrt", [name + "_v"], [name + "_r"]),
                      helper.make_node("Div", [name + "_d", name + "_r"], [name + "_q"]),
                      helper.make_node("Mul", [name + "_q", "g"], [name + "_y"]),
                      helper.make_node("Add", [name + "_y", "b"], [name])]
        elif op == "Concat":
            nodes += [helper.make_node("Sigmoid", ["x"], [name + "_p"]),
                      helper.make_node(op, ["x", name + "_p"], [name], axis=-1)]
        else:  # token logits: MatMul then a bias Add
            nodes += [helper.make_node("MatMul", ["x", "w"], [name + "_z"]),
                      helper.make_node("Add", [name + "_z", "b"], [name])]
        outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", 4, 16 if op == "Concat" else 8]))
    return helper.make_graph(nodes, "g", [x], outputs, inits)


def test_hidden_states_and_detector_rows_are_not_scores():
    """MiniLM's last_hidden_state (LayerNormalization) counted 'top-1 agreement' over 384 hidden units, and a
    YOLO-style detector's rows over box coordinates joined to scores: neither is a class."""
    from onnxshrink.validate import non_score_outputs

    graph = _graph_ending(("LayerNormalization", "last_hidden_state"), ("decomposed", "hidden_pieces"),
                          ("Concat", "detections"), ("logits", "token_logits"))
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), full_check=True)
    assert non_score_outputs(graph, {"detections": 2}) == {"last_hidden_state", "hidden_pieces"}  # class scores joined
    assert non_score_outputs(graph, {name: 3 for name in ('last_hidden_state', 'hidden_pieces', 'detections', 'token_logits')}) == {"last_hidden_state", "hidden_pieces", "detections"}


def test_validation_reports_no_top1_for_a_hidden_state(tmp_path):
    graph = _graph_ending(("LayerNormalization", "last_hidden_state"), ("logits", "token_logits"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    candidate.graph.initializer[0].CopyFrom(helper.make_tensor("g", onnx.TensorProto.FLOAT, [8], [1.0, -1.0] * 4))
    original = save_model(model, tmp_path / "encoder.onnx")
    changed = save_model(candidate, tmp_path / "encoder.changed.onnx")
    report = api.validate(original, changed, ValidateConfig(latency=False))
    assert report.outputs["last_hidden_state"].top1_agreement is None
    assert report.outputs["last_hidden_state"].cosine < 0.99  # still judged, by cosine
    assert report.outputs["token_logits"].top1_agreement == 1.0  # per-token scores: still counted
