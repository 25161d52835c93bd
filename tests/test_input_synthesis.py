"""Inputs that run on models nobody tuned for (issue 16, items 1 and 2).

Symbolic image sizes are probed, or read from the model's metadata; token inputs get a sentence's length and
ids over the vocabulary; a model no synthesized input runs still gets its output written, flagged "not
validated" (exit 6); calibration data serves validation on samples the calibrating passes never saw.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import invoke, make_mlp, save_model
from onnxshrink import api
from onnxshrink import data as data_mod
from onnxshrink.data import input_specs
from onnxshrink.errors import EXIT_NOT_VALIDATED, InputsUnavailable
from onnxshrink.passes.quantize_static import StaticQuantizeConfig
from onnxshrink.validate import ValidateConfig


def _model(nodes, inputs, outputs, inits, metadata=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def strided_detector(metadata=None) -> onnx.ModelProto:
    """x [batch, 3, height, width] through two stride-32 branches (a 48x48 patch Conv, a 3x3 Conv then a 48x48
    MaxPool), concatenated on channels: as a detector head's Concat, it cannot run below 64 x 64 (1 x 1 was
    synthesized before and onnxruntime refused it)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 48, 48)) * 0.02).astype(np.float32), "patch.w"),
             numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv.w")]
    nodes = [
        helper.make_node("Conv", ["x", "patch.w"], ["a"], name="patch", kernel_shape=[48, 48], strides=[32, 32]),
        helper.make_node("Conv", ["x", "conv.w"], ["b0"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["b0"], ["b"], name="pool", kernel_shape=[48, 48], strides=[32, 32]),
        helper.make_node("Concat", ["a", "b"], ["y"], name="head", axis=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, "h", "w"])], inits, metadata)


def never_runs() -> onnx.ModelProto:
    """An image model whose fixed Reshape fits no input size: pooled [batch, 64] into [5, 5]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w"),
             numpy_helper.from_array(rng.standard_normal((4, 64)).astype(np.float32), "fc.w"),
             numpy_helper.from_array(np.array([5, 5], np.int64), "shape")]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c"], ["m"], name="gap", axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "fc.w"], ["f"], name="fc"),
        helper.make_node("Reshape", ["f", "shape"], ["y"], name="fixed"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])], inits)


VOCAB = 1000


def token_model() -> onnx.ModelProto:
    """A BERT-like encoder's front: ids (through a Cast) index a 1000-row embedding, token types a 2-row one,
    the mask weights the mean over the sequence."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, 16)).astype(np.float32), "word_embeddings"),
             numpy_helper.from_array(rng.standard_normal((2, 16)).astype(np.float32), "type_embeddings"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "head.w"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["word_embeddings", "ids32"], ["words"]),
        helper.make_node("Gather", ["type_embeddings", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head.w"], ["logits"], name="head"),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    return _model(nodes, ints, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)


def _json(result) -> dict:
    return json.loads(result.stdout)


def test_symbolic_image_size_is_probed_and_validated(tmp_path, runner):
    path = save_model(strided_detector(), tmp_path / "det.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "det.int8.onnx", "--json")
    assert result.exit_code == 0, result.output
    validation = _json(result)["validation"]
    assert validation["validated"] is True
    assert validation["input_shapes"] == {"x": [16, 3, 64, 64]}  # 32 fails (no 48 x 48 patch fits): 64 is the smallest
    assert validation["input_shape_sources"] == {"x": "probe"}
    assert validation["validation_data"] == "synthetic"
    assert any("x [16, 3, 64, 64] (probe)" in note for note in validation["notes"])
    assert (tmp_path / "det.int8.onnx").is_file()


def test_probe_is_the_text_report_too(tmp_path, runner):
    path = save_model(strided_detector(), tmp_path / "det.onnx")
    result = invoke(runner, "validate", path, path)
    assert result.exit_code == 0, result.output
    assert "synthesized input sizes: x [16, 3, 64, 64] (probe)" in result.stdout


def test_metadata_imgsz_sizes_the_input(tmp_path):
    # ultralytics writes imgsz as "[640, 640]"; a height unlike the width shows which is which.
    path = save_model(strided_detector({"imgsz": "[96, 128]"}), tmp_path / "det.onnx")
    report = api.validate(path, path, ValidateConfig(latency=False))
    assert report.input_shapes == {"x": [16, 3, 96, 128]}
    assert report.input_shape_sources == {"x": "metadata"}


def test_shape_overrides_metadata_and_probe(tmp_path, runner):
    for metadata in (None, {"imgsz": "[96, 128]"}):
        path = save_model(strided_detector(metadata), tmp_path / "det.onnx")
        result = invoke(runner, "validate", path, path, "--shape", "x=2,3,160,128", "--json")
        assert result.exit_code == 0, result.output
        assert _json(result)["input_shapes"] == {"x": [2, 3, 160, 128]}
        assert _json(result)["input_shape_sources"] == {"x": "--shape"}


def test_token_inputs_get_a_sentence_and_the_vocabulary():
    model = token_model()
    dataset = data_mod.synthesize(input_specs(model), model=model)
    batch = dataset.batches[0]
    ids = batch["input_ids"]
    assert ids.shape == (16, 128) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() <= VOCAB - 1
    assert ids.max() > 900 and ids.min() < 100 and len(np.unique(ids)) > 700  # spread over 0..999, not 0 or 1
    assert (batch["attention_mask"] == 1).all() and batch["attention_mask"].shape == (16, 128)
    assert (batch["token_type_ids"] == 0).all()
    assert dataset.shape_sources == {"input_ids": "token length", "attention_mask": "token length",
                                     "token_type_ids": "token length"}


def test_token_model_validates_at_length_128(tmp_path, runner):
    path = save_model(token_model(), tmp_path / "enc.onnx")
    result = invoke(runner, "validate", path, path, "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert report["input_shapes"]["input_ids"] == [16, 128]
    assert report["latency_ms"]["batch"] == 1
    assert any("input_ids ids spread over 0..999 (the rows of embedding 'word_embeddings')" in n for n in report["notes"])
    result = invoke(runner, "validate", path, path, "--shape", "input_ids=2,16", "--shape", "attention_mask=2,16",
                    "--shape", "token_type_ids=2,16", "--json")
    assert _json(result)["input_shapes"]["input_ids"] == [2, 16]


def test_position_table_shorter_than_128_is_probed_down(tmp_path):
    """Positions 0..L-1 index a 40-row table: 128 cannot run, so the longest length that does (32) is used."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 8)).astype(np.float32), "positions"),
             numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["positions", "position_ids"], ["p"]),
             helper.make_node("MatMul", ["p", "w"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 2])], inits)
    path = save_model(model, tmp_path / "pos.onnx")
    report = api.validate(path, path, ValidateConfig(latency=False))
    assert report.input_shapes == {"position_ids": [16, 32]}
    assert report.input_shape_sources == {"position_ids": "probe"}


@pytest.mark.parametrize("args", [(), ("--mode", "weights")])
def test_no_synthesizable_input_writes_the_output_not_validated(tmp_path, runner, args):
    path = save_model(never_runs(), tmp_path / "odd.onnx")
    out = tmp_path / "odd.int8.onnx"
    result = invoke(runner, "quantize", path, "-o", out, *args, "--json")
    assert result.exit_code == EXIT_NOT_VALIDATED == 6, result.output
    assert out.is_file() and not (tmp_path / "odd.int8.failed.onnx").exists()
    report = _json(result)
    assert report["output"] == str(out)
    assert report["validation"]["validated"] is False and report["validation"]["passed"] is False
    assert report["validation"]["reason"].startswith("no synthesized input runs the model: x [1, 3, S, S] failed for every S of 32, 64, 128")
    assert "give --data, --calibration, or sizes with --shape" in report["validation"]["reason"]
    assert "Traceback" not in result.output
    text = invoke(runner, "quantize", path, "-o", out, "--force", *args)
    assert text.exit_code == 6 and "validation NOT RUN: no synthesized input runs the model" in text.stdout
    # `validate` exists to measure: without inputs it cannot, and says so (exit 3, one line).
    result = invoke(runner, "validate", path, out)
    assert result.exit_code == 3 and result.stderr.startswith("error: no synthesized input runs the model")


def test_no_synthesizable_input_with_no_validate_exits_0(tmp_path, runner):
    path = save_model(never_runs(), tmp_path / "odd.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "q.onnx", "--no-validate")
    assert result.exit_code == 0, result.output


def test_holdout_split_rule():
    assert data_mod.MIN_HOLDOUT == 4 and data_mod.MIN_CALIBRATION == 4

    def split(count):
        x = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
        dataset = data_mod.Dataset([{"input": x}], None, count, False, [], {"input": 0})
        return data_mod.split_holdout(dataset, [data_mod.InputSpec("input", np.dtype(np.float32), ["batch", 2])])

    calibrating, held, rows = split(128)
    assert rows == range(96, 128) and calibrating.samples == 96 and held.samples == 32
    assert held.batches[0]["input"][0, 0] == 192.0  # sample 96
    assert split(8)[2] == range(4, 8)
    assert split(7) is None


def _calibration_spy(monkeypatch) -> list:
    """The datasets the calibrating passes receive."""
    seen = []
    original = api._calibration_data

    def spy(*args, **kwargs):
        dataset = original(*args, **kwargs)
        seen.append(dataset)
        return dataset

    monkeypatch.setattr(api, "_calibration_data", spy)
    return seen


def test_calibration_validates_on_held_out_samples(tmp_path, monkeypatch):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    x = np.random.default_rng(4).standard_normal((40, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", input=x)
    seen = _calibration_spy(monkeypatch)
    report = api.quantize(path, tmp_path / "q.onnx", StaticQuantizeConfig(), calibration=tmp_path / "cal.npz",
                          validation=ValidateConfig(latency=False))
    validation = report.validation
    assert validation.synthetic_inputs is False and validation.samples == 10
    assert validation.validation_data == f"held-out calibration samples 30..39 of {tmp_path / 'cal.npz'}"
    assert any("samples 0..29 only" in note for note in validation.notes)
    calibrated = np.concatenate([b["input"] for b in seen[0].batches])
    assert np.array_equal(calibrated, x[:30])  # the calibrating pass never saw samples 30..39
    # With --data the data judges, and every calibration sample calibrates.
    np.savez(tmp_path / "eval.npz", input=x[:5])
    report = api.quantize(path, tmp_path / "q2.onnx", StaticQuantizeConfig(), calibration=tmp_path / "cal.npz",
                          validation=ValidateConfig(data=str(tmp_path / "eval.npz"), latency=False))
    assert len(np.concatenate([b["input"] for b in seen[1].batches])) == 40
    assert report.validation.validation_data == str(tmp_path / "eval.npz")


def test_calibration_held_out_through_the_cli(tmp_path, runner):
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "cal.npz", input=np.random.default_rng(5).standard_normal((128, 32)).astype(np.float32))
    result = invoke(runner, "quantize", path, "-o", tmp_path / "q.onnx", "--calibration", tmp_path / "cal.npz", "--json")
    assert result.exit_code == 0, result.output
    validation = _json(result)["validation"]
    assert validation["validation_data"].startswith("held-out calibration samples 96..127 of ")
    assert validation["samples"] == 32 and validation["synthetic_inputs"] is False


def test_too_few_calibration_samples_validate_on_synthetic_inputs_of_their_shape(tmp_path, monkeypatch):
    path = save_model(strided_detector(), tmp_path / "det.onnx")
    x = np.random.default_rng(6).standard_normal((5, 3, 96, 96)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    seen = _calibration_spy(monkeypatch)
    report = api.quantize(path, tmp_path / "q.onnx", StaticQuantizeConfig(), calibration=tmp_path / "cal.npz",
                          validation=ValidateConfig(latency=False))
    assert seen[0].samples == 5  # nothing held out: all five calibrate
    validation = report.validation
    assert validation.synthetic_inputs is True and validation.validation_data == "synthetic"
    assert validation.input_shapes == {"x": [16, 3, 96, 96]} and validation.input_shape_sources == {"x": "calibration"}
    assert any("too few to hold any out" in note for note in validation.notes)


def test_probe_raises_inputs_unavailable_in_the_library(tmp_path):
    path = save_model(never_runs(), tmp_path / "odd.onnx")
    with pytest.raises(InputsUnavailable, match=r"x \[1, 3, S, S\] failed for every S of 32, .*, 640 \(at 640: Reshape node .fixed.: "):
        api.validate(path, path, ValidateConfig(latency=False))


def framed_audio(rank: int = 2) -> onnx.ModelProto:
    """Audio [batch, samples] (or [batch, 1, samples]) framed by a 400-wide, stride-160 Conv (25 ms windows at
    16 kHz, as a filterbank front end): it cannot run on fewer than 400 samples (1 was synthesized before)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 1, 400)) * 0.05).astype(np.float32), "frames.w"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Conv", ["x3" if rank == 2 else "x", "frames.w"], ["y"], name="frames",
                              kernel_shape=[400], strides=[160])]
    if rank == 2:
        nodes.insert(0, helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"]))
    shape = ["batch", "samples"] if rank == 2 else ["batch", 1, "samples"]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, "frames"])], inits)


@pytest.mark.parametrize("rank", [2, 3])
def test_signal_length_is_probed_up_to_what_a_wide_conv_needs(tmp_path, runner, rank):
    path = save_model(framed_audio(rank), tmp_path / "audio.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "audio.q.onnx", "--json")
    assert result.exit_code == 0, result.output  # was 6: x [16, 1] refused by the Conv
    validation = _json(result)["validation"]
    assert validation["validated"] is True
    length = 512  # the shortest of the probe lengths that is at least 400
    assert validation["input_shapes"] == {"x": [16, length] if rank == 2 else [16, 1, length]}
    assert validation["input_shape_sources"] == {"x": "probe"}


def test_a_signal_that_runs_at_length_1_keeps_it(tmp_path):
    """The probe starts at 1: a model that runs there is judged as before."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "samples"])
    path = save_model(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], []), tmp_path / "relu.onnx")
    report = api.validate(path, path, ValidateConfig(latency=False))
    assert report.input_shapes == {"x": [16, 1]} and report.input_shape_sources == {"x": "default"}


def recurrent_state() -> onnx.ModelProto:
    """silero VAD's signature: audio [?, ?] and a state [2, ?, 4] whose unnamed axis 1 is the batch (its first
    slice is concatenated with a per-sample feature of the audio, which needs the batches equal), a reflect Pad
    that needs 2+ samples, and the state handed back as stateN."""
    inits = [numpy_helper.from_array(np.array([0, 2, 0, 2], np.int64), "pads"),
             numpy_helper.from_array(np.array(0, np.int64), "zero")]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[1], keepdims=1),
        helper.make_node("Gather", ["state", "zero"], ["h"], axis=0),
        helper.make_node("Concat", ["h", "level"], ["output"], axis=1),
        helper.make_node("Relu", ["state"], ["stateN"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 5]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 4])]
    return _model(nodes, inputs, outputs, inits)


def test_recurrent_state_gets_the_batch_and_the_audio_a_length(tmp_path, runner):
    path = save_model(recurrent_state(), tmp_path / "vad.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "vad.q.onnx", "--json")
    assert result.exit_code == 0, result.output
    validation = _json(result)["validation"]
    assert validation["input_shapes"] == {"x": [16, 16], "state": [2, 16, 4]}  # state was [2, 1, 4]: Concat refused
    assert validation["input_shape_sources"]["x"] == "probe"


def test_named_state_batch_follows_the_runs():
    """A state whose batch axis is named as the audio's batch ([2, batch, 4]) takes each run's rows, no probe."""
    specs = [data_mod.InputSpec("x", np.dtype(np.float32), ["batch", 512]),
             data_mod.InputSpec("state", np.dtype(np.float32), [2, "batch", 4])]
    dataset = data_mod.synthesize(specs, 20, batch_size=8)
    assert [b["state"].shape for b in dataset.batches] == [(2, 8, 4), (2, 8, 4), (2, 4, 4)]
    assert dataset.batch_axes == {"x": 0, "state": 1}


def no_length_fits() -> onnx.ModelProto:
    """Audio reshaped into rows of 7: no probe length (none is a multiple of 7) runs it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 7])
    shape = numpy_helper.from_array(np.array([-1, 7], dtype=np.int64), "rows")
    return _model([helper.make_node("Reshape", ["x", "rows"], ["y"], name="rows7")], [x], [y], [shape])


def test_synthesized_inputs_the_model_refuses_still_write_the_output(tmp_path, runner):
    """No signal length runs it. quantize needs no inputs, so its output lands, not validated (exit 6)."""
    path = save_model(no_length_fits(), tmp_path / "rows.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "rows.q.onnx", "--json")
    assert result.exit_code == 6, result.output
    assert (tmp_path / "rows.q.onnx").is_file()
    reason = _json(result)["validation"]["reason"]
    assert reason.startswith("no synthesized input runs the model: x [1, L] failed for every L of 1, 16, 64, 256")
    assert "Reshape node 'rows7'" in reason and "give --data, --calibration, or sizes with --shape" in reason


def test_reflect_pad_runs_at_a_probed_length(tmp_path, runner):
    """A reflect Pad of 2 refuses 1 sample (exit 6 before): the probe finds 16."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])
    pads = numpy_helper.from_array(np.array([0, 2, 0, 2], dtype=np.int64), "pads")
    graph = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], "pad", [x], [y], [pads])
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "pad.onnx")
    result = invoke(runner, "quantize", path, "-o", tmp_path / "pad.q.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert _json(result)["validation"]["input_shapes"] == {"x": [16, 16]}


def test_prune_calibrates_on_the_samples_validation_does_not_judge(tmp_path, monkeypatch):
    from onnxshrink.passes.prune import PruneConfig

    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    x = np.random.default_rng(7).standard_normal((20, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", input=x)
    seen = _calibration_spy(monkeypatch)
    report = api.prune(path, tmp_path / "p.onnx", PruneConfig(sparsity=0.5), calibration=tmp_path / "cal.npz",
                       validation=ValidateConfig(latency=False))
    assert report.validation.validation_data.startswith("held-out calibration samples 15..19 of ")
    assert all(np.array_equal(np.concatenate([b["input"] for b in d.batches]), x[:15]) for d in seen)
    # --no-validate: nothing is judged, so every sample calibrates.
    api.prune(path, tmp_path / "p2.onnx", PruneConfig(sparsity=0.5), calibration=tmp_path / "cal.npz", run_validation=False)
    assert seen[-1].samples == 20


def test_sensitivity_synthesizes_inputs_the_model_runs(tmp_path, runner):
    """`sensitivity` with no calibration sized every symbolic dimension 1: onnxruntime refused the detector's 1 x 1
    image (exit 3), and so did compress, whose sensitivity phase measures the same way (6 of 15 real models)."""
    path = save_model(strided_detector(), tmp_path / "det.onnx")
    result = invoke(runner, "sensitivity", path, "--sparsities", "0.5", "--bits", "4", "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    [patch] = report["layers"]  # the 3x3 Conv's 216 weights are too few to measure
    assert patch["node"] == "patch" and 0 < patch["drift"][0] < 10 and patch["bit_drift"][0] > 0
    assert "synthesized input sizes: x [16, 3, 64, 64] (probe)" in report["notes"]


def test_compress_of_a_symbolic_image_model_needs_no_data(tmp_path, runner):
    path = save_model(strided_detector(), tmp_path / "det.onnx")
    result = invoke(runner, "compress", path, "-o", tmp_path / "det.shrink", "--min-cosine", "0.9",
                    "--max-candidates", "3", "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert report["passed"] is True and report["validation"]["input_shapes"] == {"x": [16, 3, 64, 64]}
    assert not any(note.startswith("sensitivity phase skipped") for note in report["notes"])
    assert (tmp_path / "det.shrink").is_file()


def test_compress_goes_on_when_its_sensitivity_phase_cannot_run(tmp_path, runner, monkeypatch):
    """The phase only orders the per-layer moves: a model it cannot measure is still compressed, and a note says so."""
    from onnxshrink import api as api_mod
    from onnxshrink.errors import ModelLoadError

    def refuse(*args, **kwargs):
        raise ModelLoadError("onnxruntime failed to run the model on the given inputs: Pad node 'p': too short")

    monkeypatch.setattr(api_mod, "sensitivity", refuse)
    path = save_model(make_mlp(), tmp_path / "mlp.onnx")
    result = invoke(runner, "compress", path, "-o", tmp_path / "mlp.shrink", "--min-cosine", "0.9",
                    "--max-candidates", "3", "--json")
    assert result.exit_code == 0, result.output
    notes = _json(result)["notes"]
    assert any(note.startswith("sensitivity phase skipped: onnxruntime failed to run the model") for note in notes), notes


def _filter_bank(prune: bool) -> onnx.ModelProto:
    """Log power of 64-sample frames through a cosine basis of 16 frequencies (an STFT's real part, as audio
    front ends hold it); with `prune`, the basis's smallest fifth zeroed, as prune or a coarse codebook leaves it."""
    n = np.arange(64)
    basis = np.cos(2 * np.pi * np.outer(n, np.arange(1, 33, 2)) / 64).astype(np.float32)  # [64, 16]
    if prune:
        basis[np.abs(basis) < np.quantile(np.abs(basis), 0.2)] = 0.0
    inits = [numpy_helper.from_array(basis, "basis"), numpy_helper.from_array(np.array([-1, 64], np.int64), "frames"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "eps")]
    nodes = [helper.make_node("Reshape", ["x", "frames"], ["f"], name="frame"),
             helper.make_node("MatMul", ["f", "basis"], ["s"], name="stft"),
             helper.make_node("Mul", ["s", "s"], ["p"], name="power"),
             helper.make_node("Add", ["p", "eps"], ["q"], name="floor"),
             helper.make_node("Log", ["q"], ["y"], name="log")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], inits)


def test_audio_inputs_are_tones_that_show_a_filter_bank_losing_selectivity():
    """White noise spreads its energy over every band, so a basis with its small values zeroed still gives about
    the right log power per band; a few tones over a little noise leave most bands near empty, where the lost
    selectivity shows."""
    import onnxruntime as ort

    model = _filter_bank(prune=False)
    specs = input_specs(model)
    plan = data_mod.plan_inputs(specs, model)
    assert plan.fills["x"].kind == "tones"
    dataset = data_mod.synthesize(specs, 16, seed=0, shape_overrides={"x": [1, 1024]}, model=model)
    assert any(note.startswith("signal inputs: x a few sinusoids over noise") for note in dataset.notes)
    tones = np.concatenate([batch["x"] for batch in dataset.batches])
    assert abs(float(np.sqrt(np.mean(tones ** 2))) - 1.0) < 0.1  # the level of the standard normal noise before
    spectra = np.abs(np.fft.rfft(tones, axis=1)) ** 2
    peak = np.sort(spectra, axis=1)[:, -12:].sum(axis=1) / spectra.sum(axis=1)  # 4 tones, a few bins each
    assert peak.min() > 0.8  # white noise: about 12 / 513 of its energy in any 12 bins

    def cosine(inputs):
        a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})[0]
                for m in (model, _filter_bank(prune=True)))
        return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))

    noise = np.random.default_rng(0).standard_normal(tones.shape).astype(np.float32)
    assert 1 - cosine(tones) > 3 * (1 - cosine(noise))  # 0.135 against 0.033 when written


def test_only_samples_last_float_inputs_get_tones():
    specs = [data_mod.InputSpec("audio", np.dtype(np.float32), ["batch", 2, "samples"]),
             data_mod.InputSpec("features", np.dtype(np.float32), ["batch", "frames", 40]),
             data_mod.InputSpec("image", np.dtype(np.float32), ["batch", 3, "h", "w"]),
             data_mod.InputSpec("codes", np.dtype(np.int64), ["batch", "samples"])]
    plan = data_mod.plan_inputs(specs)
    assert {name: fill.kind for name, fill in plan.fills.items()} == {"audio": "tones"}


def _flattened_image() -> onnx.ModelProto:
    """x [batch, 1, h, w] flattened into a [48, 4] MatMul: it runs at h x w = 48 only, no square a probe tries."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((48, 64)).astype(np.float32), "fc.w"),
             numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "head.w")]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat", axis=1),
             helper.make_node("MatMul", ["f", "fc.w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "head.w"], ["y"], name="head")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)


def test_compress_takes_shape_where_no_probe_finds_one(tmp_path, runner):
    """compress's error said "give ... sizes with --shape", an option compress did not have."""
    path = save_model(_flattened_image(), tmp_path / "flat.onnx")
    result = invoke(runner, "compress", path, "-o", tmp_path / "flat.shrink", "--min-cosine", "0.9",
                    "--max-candidates", "3")
    assert result.exit_code == 3 and "--shape NAME=D1,D2,..." in result.output
    result = invoke(runner, "compress", path, "-o", tmp_path / "flat.shrink", "--min-cosine", "0.9",
                    "--max-candidates", "3", "--shape", "x=4,1,6,8", "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert report["validation"]["input_shapes"] == {"x": [4, 1, 6, 8]}
    assert report["validation"]["input_shape_sources"] == {"x": "--shape"}
    assert not any(note.startswith("sensitivity phase skipped") for note in report["notes"]), report["notes"]


def test_sensitivity_takes_shape(tmp_path, runner):
    path = save_model(_flattened_image(), tmp_path / "flat.onnx")
    result = invoke(runner, "sensitivity", path, "--sparsities", "0.5", "--bits", "4", "--shape", "x=4,1,6,8", "--json")
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert [layer["node"] for layer in report["layers"]] == ["fc", "head"]
    assert "synthesized input sizes: x [4, 1, 6, 8] (--shape)" in report["notes"]
