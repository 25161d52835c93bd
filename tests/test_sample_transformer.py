"""The sample transformer (sample_models/digits_transformer.onnx) through every weight pass.

A transformer has MatMuls of two activations (attention's Q @ K^T and P @ V) beside the
MatMuls with weight initializers. Weight passes must change only the latter: the attention
MatMuls keep their float inputs, and onnxruntime still runs them as float kernels.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxshrink
from conftest import SAMPLES
from onnxshrink import api
from onnxshrink.compress_search import CompressConfig, PassSpec, Recipe, compress
from onnxshrink.api import INTEGER_KERNELS
from onnxshrink.passes.cluster import ClusterConfig
from onnxshrink.passes.prune import PruneConfig
from onnxshrink.passes.folded_weights import FOLDED
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig
from onnxshrink.passes.quantize_static import StaticQuantizeConfig
from onnxshrink.runtime import make_session, optimized_op_counts

MODEL = SAMPLES / "digits_transformer.onnx"
CALIB = SAMPLES / "digits_transformer.calib.npz"
EVAL = SAMPLES / "digits_transformer.eval.npz"
ATTENTION = [f"layers.{i}.attn/MatMul_{kind}" for i in range(2) for kind in ("qk", "pv")]
WEIGHT_LAYERS = (["embed/MatMul"]
                 + [f"layers.{i}.{m}/MatMul" for i in range(2)
                    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")]
                 + ["head/MatMul"])
FLOAT_MATMULS = ("MatMul", "com.microsoft.FusedMatMul")


def accuracy(path) -> float:
    evaluation = np.load(EVAL)
    (logits,) = make_session(path).run(["logits"], {"input": evaluation["input"]})
    return float(np.mean(np.argmax(logits, -1) == evaluation["labels"]))


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes neither of whose inputs is an initializer."""
    constants = {t.name for t in model.graph.initializer}
    return sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and not constants.intersection(n.input))


def attention_nodes(model: onnx.ModelProto) -> dict[str, bytes]:
    """The attention MatMuls and the Transposes feeding them, serialized: inputs, outputs, attributes."""
    wanted = set(ATTENTION) | {f"layers.{i}.attn/Transpose_{x}" for i in range(2) for x in "qkv"}
    return {n.name: n.SerializeToString() for n in model.graph.node if n.name in wanted}


def actions(report) -> dict[str, str]:
    return {layer.node: layer.action for layer in report.passes[0].layers}


@pytest.fixture(scope="module")
def original():
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def base_accuracy():
    return accuracy(MODEL)


def test_layout_and_accuracy(original, base_accuracy):
    assert [(o.domain, o.version) for o in original.opset_import] == [("", 17)] and original.ir_version == 8
    dims = [d.dim_param or d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    assert original.graph.input[0].name == "input" and dims == ["batch", 8, 8]
    assert [o.name for o in original.graph.output] == ["logits"]
    assert activation_matmuls(original) == sorted(ATTENTION)
    assert len(attention_nodes(original)) == 10
    ops = Counter(n.op_type for n in original.graph.node)
    assert ops["MatMul"] == len(WEIGHT_LAYERS) + len(ATTENTION)
    assert ops["LayerNormalization"] == 5 and ops["Softmax"] == 2 and ops["Erf"] == 2
    assert base_accuracy >= 0.97  # 0.9800 (442/451) as generated


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4"])
def test_quantize_makes_integer_kernels_of_weight_matmuls_only(tmp_path, original, base_accuracy, mode):
    # integer_min_macs=0: integer kernels even where the layers are too small to gain from them (the default folds
    # them instead: test_default_quantize_keeps_fp32_speed below)
    config = {"dynamic": QuantizeConfig(integer_min_macs=0), "static": StaticQuantizeConfig(integer_min_macs=0),
              "int4": BlockwiseConfig(bits=4, block_size=32)}[mode]
    output = tmp_path / "q.onnx"
    report = api.quantize(MODEL, output, config, calibration=CALIB if mode == "static" else None,
                          run_validation=False)
    by_node = actions(report)
    assert {node for node, action in by_node.items() if action.startswith("int")} == set(WEIGHT_LAYERS)
    assert {node for node, action in by_node.items() if action == "kept float"} == set(ATTENTION)

    written = onnx.load(str(output))
    assert attention_nodes(written) == attention_nodes(original)  # untouched, inputs still float
    if mode == "dynamic":
        ops = Counter(n.op_type for n in written.graph.node)
        assert ops["MatMulInteger"] == len(WEIGHT_LAYERS) and ops["MatMul"] == len(ATTENTION)
    counts = optimized_op_counts(output)
    assert sum(v for k, v in counts.items() if k in INTEGER_KERNELS) == len(WEIGHT_LAYERS), counts
    assert counts["MatMulInteger"] == 0, counts  # fused, not the reference op
    assert sum(v for k, v in counts.items() if k in FLOAT_MATMULS) == len(ATTENTION), counts
    assert counts["Gemm"] == 0 and report.runtime["all_quantized_layers_fused"] is True
    assert accuracy(output) >= base_accuracy - (0.01 if mode != "int4" else 0.03)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_default_quantize_keeps_fp32_speed(tmp_path, original, base_accuracy, mode):
    """The layers are too small for integer kernels to pay at batch 1: int8 in the file, float kernels at run time."""
    config = QuantizeConfig() if mode == "dynamic" else StaticQuantizeConfig()
    output = tmp_path / "q.onnx"
    report = api.quantize(MODEL, output, config, calibration=CALIB if mode == "static" else None, run_validation=False)
    by_node = actions(report)
    assert {node for node, action in by_node.items() if action == FOLDED} == set(WEIGHT_LAYERS)
    assert report.runtime["folded_layers"] == len(WEIGHT_LAYERS) and report.runtime["folded_decoding_left"] == 0
    counts = optimized_op_counts(output)
    assert sum(v for k, v in counts.items() if k in INTEGER_KERNELS) == 0, counts
    assert counts == optimized_op_counts(MODEL)  # the graph onnxruntime runs is the original's
    assert output.stat().st_size < 0.5 * MODEL.stat().st_size
    assert accuracy(output) >= base_accuracy - 0.005


@pytest.mark.parametrize("command", ["prune", "cluster"])
def test_prune_and_cluster_leave_attention_matmuls_alone(tmp_path, original, base_accuracy, command):
    output = tmp_path / f"{command}.onnx"
    if command == "prune":
        report = api.prune(MODEL, output, PruneConfig(sparsity=0.5), calibration=CALIB, run_validation=False)
    else:
        report = api.cluster(MODEL, output, ClusterConfig(bits=4), calibration=CALIB, run_validation=False)
        assert report.runtime["codebook_decoding_left"] == 0
    by_node = actions(report)
    assert {node for node, action in by_node.items() if action == "kept"} == set(ATTENTION)
    assert all(by_node[node] != "kept" for node in WEIGHT_LAYERS)

    written = onnx.load(str(output))
    assert attention_nodes(written) == attention_nodes(original)
    counts = optimized_op_counts(output)
    assert not any(k in INTEGER_KERNELS for k in counts), counts  # float kernels, as the original runs
    if command == "prune":
        weights = [numpy_helper.to_array(t) for t in written.graph.initializer if t.name.endswith(".weight")
                   and t.dims and len(t.dims) == 2]
        zeros = sum(int(np.sum(w == 0)) for w in weights) / sum(w.size for w in weights)
        assert 0.45 <= zeros <= 0.55, zeros
    assert accuracy(output) >= base_accuracy - 0.03


@pytest.mark.parametrize("form", ["float", "cluster4"])
def test_pack_round_trips(tmp_path, form):
    source = MODEL
    if form == "cluster4":
        source = tmp_path / "c.onnx"
        api.cluster(MODEL, source, ClusterConfig(bits=4), run_validation=False)
    report = api.pack(source, tmp_path / "m.shrink")
    assert report.size["output"] < report.size["original"]
    api.unpack(tmp_path / "m.shrink", tmp_path / "back.onnx")
    assert onnx.load(str(tmp_path / "back.onnx")).SerializeToString() == onnx.load(str(source)).SerializeToString()


def test_compress_folds_the_norms_first_and_names_its_recipe_in_the_metadata(tmp_path, base_accuracy):
    recipe = Recipe([PassSpec("prune", {"sparsity": 0.5, "remove_dead_units": True}),
                     PassSpec("cluster", {"bits": 4, "other_floats": "int8"})])
    config = CompressConfig(calibration=str(CALIB), data=str(EVAL), labels="labels")
    report = compress(MODEL, tmp_path / "t.shrink", config, recipe=recipe)
    assert report.notes[0].startswith("5 LayerNormalization scale(s) and shift(s) folded")
    model = onnxshrink.load(report.output)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(norms) == 5 and all(len(n.input) == 2 and np.all(values[n.input[1]] == 1) for n in norms)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["onnxshrink.command"] == "compress"
    assert json.loads(metadata["onnxshrink.options"]) == {"passes": ["prune", "cluster"]}
    assert report.validation.accuracy["candidate"] >= base_accuracy - 0.03  # judged against the unfolded original
