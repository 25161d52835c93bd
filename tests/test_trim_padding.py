"""Calibration runs cut to their real tokens (data.trim_padding): the passes whose statistics leave padding out
(prune, cluster, GPTQ quantize, compress's plan) no longer pay onnxruntime to compute it, and fit the same layers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value, save_model
from onnxshrink import api, data
from onnxshrink.data import Dataset, InputSpec, trim_padding
from onnxshrink.passes.cluster import ClusterConfig
from onnxshrink.passes.prune_common import PruneConfig
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig

INT64 = np.dtype(np.int64)
NAMES = ("input_ids", "token_type_ids", "attention_mask")


def _specs(sequence="sequence", names=NAMES):
    return [InputSpec(name, INT64, ["batch", sequence]) for name in names]


def _padded(lengths, width=8, batch=2, left=False):
    rng = np.random.default_rng(0)
    positions = np.arange(width)[None, :]
    lengths = np.asarray(lengths)[:, None]
    mask = (positions >= width - lengths if left else positions < lengths).astype(np.int64)
    feeds = {"input_ids": rng.integers(1, 50, mask.shape) * mask, "token_type_ids": rng.integers(0, 2, mask.shape) * mask,
             "attention_mask": mask}
    batches = [{name: value[start:start + batch] for name, value in feeds.items()} for start in range(0, len(mask), batch)]
    return Dataset(batches, None, len(mask), False, [], {name: 0 for name in feeds}), feeds


def _tokens(batches):
    """Each sample's real tokens as (id, token type) pairs, in a canonical order."""
    return sorted(tuple(zip(ids[mask != 0], types[mask != 0])) for b in batches
                  for ids, types, mask in zip(b["input_ids"], b["token_type_ids"], b["attention_mask"]))


def test_runs_are_ordered_by_length_and_cut_to_their_real_tokens():
    dataset, feeds = _padded([5, 2, 7, 1, 3])
    trimmed = trim_padding(dataset, _specs())
    assert [len(b["input_ids"]) for b in trimmed.batches] == [2, 2, 1]  # the runs keep their sizes
    assert [b["attention_mask"].shape[1] for b in trimmed.batches] == [2, 5, 7]  # lengths 1, 2 | 3, 5 | 7
    assert all(b[name].shape == b["attention_mask"].shape for b in trimmed.batches for name in NAMES)
    assert _tokens(trimmed.batches) == _tokens([feeds])  # every sample kept whole, ids beside their token types
    assert trimmed.samples == 5 and trimmed.batch_axes == dataset.batch_axes
    assert dataset.batches[0]["input_ids"].shape == (2, 8)  # the given dataset is not changed


@pytest.mark.parametrize("case", ["left padding", "fixed length", "no mask", "labels", "nothing to cut", "a length 0",
                                  "not 0/1", "sequence without a batch", "sequence on another axis",
                                  "samples on another axis"])
def test_anything_but_right_padding_on_a_symbolic_sequence_is_left_as_it_is(case):
    dataset, _ = _padded([5, 2, 7, 1] if case != "nothing to cut" else [8, 8, 8], left=case == "left padding")
    specs = _specs(8 if case == "fixed length" else "sequence")
    if case == "no mask":
        specs = _specs(names=NAMES[:2])
        for batch in dataset.batches:
            del batch["attention_mask"]
        del dataset.batch_axes["attention_mask"]
    if case == "labels":
        dataset.labels = np.arange(4)
    if case == "a length 0":
        dataset.batches[0]["attention_mask"][0] = 0
    if case == "not 0/1":
        dataset.batches[0]["attention_mask"][0, 0] = 2
    if case == "sequence without a batch":  # positions [sequence] passed whole to every run
        specs.append(InputSpec("positions", INT64, ["sequence"]))
        for batch in dataset.batches:
            batch["positions"] = np.arange(8)
    if case == "sequence on another axis":
        specs.append(InputSpec("bias", np.dtype(np.float32), ["batch", 4, "sequence"]))
        dataset.batch_axes["bias"] = 0
        for batch in dataset.batches:
            batch["bias"] = np.zeros((len(batch["input_ids"]), 4, 8), np.float32)
    if case == "samples on another axis":  # a [4, batch] input: its samples are on axis 1
        specs.append(InputSpec("scales", np.dtype(np.float32), [4, "batch"]))
        dataset.batch_axes["scales"] = 1
        for batch in dataset.batches:
            batch["scales"] = np.zeros((4, len(batch["input_ids"])), np.float32)
    assert trim_padding(dataset, specs) is dataset


def _token_model(tmp_path):
    """ids -> Gather(table) -> MatMul -> Relu -> MatMul: each token on its own, so its padding changes nothing of
    its real tokens' values; the attention mask is an input (read by an Identity), as a transformer's is."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 24)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((24, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((48, 16)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
             helper.make_node("Identity", ["attention_mask"], ["m"], name="keep_mask")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
              for name in ("input_ids", "attention_mask")]
    model = build_model(nodes, inputs, [float_value("y", ["batch", "sequence", 16]),
                                        helper.make_tensor_value_info("m", TensorProto.INT64, ["batch", "sequence"])],
                        inits)
    lengths = rng.integers(2, 9, 40)[:, None]
    mask = (np.arange(32)[None, :] < lengths).astype(np.int64)
    np.savez(tmp_path / "cal.npz", input_ids=rng.integers(0, 64, mask.shape) * mask, attention_mask=mask)
    return save_model(model, tmp_path / "tokens.onnx"), tmp_path / "cal.npz"


@pytest.mark.parametrize("command", ["cluster", "prune", "quantize"])
def test_the_passes_fit_the_same_layers_on_their_real_tokens_alone(tmp_path, monkeypatch, command):
    path, calibration = _token_model(tmp_path)
    model = api.model_io.load(path)
    trimmed = api._calibration_data(model, calibration, trim=True)
    assert max(b["input_ids"].shape[1] for b in trimmed.batches) == 8  # the longest sentence, not the padded 32
    config = {"cluster": ClusterConfig(bits=4, rounding="gptq"), "prune": PruneConfig(sparsity=0.5),
              "quantize": BlockwiseConfig(bits=4, algorithm="gptq", block_size=16)}[command]
    run = {"cluster": api.cluster, "prune": api.prune, "quantize": api.quantize}[command]
    run(path, tmp_path / "cut.onnx", config, calibration=calibration, run_validation=False)
    monkeypatch.setattr(data, "PADDING_MASKS", ())  # no trimming: every run computes all 32 positions
    run(path, tmp_path / "whole.onnx", config, calibration=calibration, run_validation=False)
    with np.load(calibration) as arrays:
        feeds = {name: arrays[name] for name in arrays.files}
    cut, whole = (ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
                  for name in ("cut", "whole"))
    real = feeds["attention_mask"] != 0
    np.testing.assert_allclose(cut[real], whole[real], rtol=1e-3, atol=1e-3 * float(np.abs(whole[real]).max()))
