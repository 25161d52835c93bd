"""Embedding tables (Gather data) in every quantize mode and in cluster.

A tiny encoder-like graph: ids -> Gather(E [1000, 64]) + position table -> LayerNorm -> MatMul/Relu/MatMul
-> residual Add -> LayerNorm. The checks: the graph written (ops, dtypes), numerics in onnxruntime against
the int8/4-bit rounding of the table, the tied table (also read by an output projection) stored once,
the size, and that a second run changes nothing more. Which form is fastest is measured in
bench/embedding_forms.py, not here.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model
from onnxshrink.data import Dataset
from onnxshrink.passes.folded_weights import FOLDED, constant_nodes_left
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
from onnxshrink.passes.quantize_embeddings import PER_ROW, dequantize_rows_blockwise, quantize_rows_blockwise
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig
from onnxshrink.runtime import make_session, optimized_graph

VOCAB, WIDTH, SEQ, HIDDEN = 1000, 64, 16, 256
MODES = ["dynamic", "weights", "static", "blockwise4"]


def encoder(tied: str | None = None, seed: int = 0) -> onnx.ModelProto:
    """tied: None, "transpose" (logits = h @ Transpose(E)) or "gemm" (Gemm(h, E, transB=1))."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((VOCAB, WIDTH)) * rng.uniform(0.01, 0.2, (VOCAB, 1))).astype(np.float32)
    inits = [numpy_helper.from_array(table, "embeddings.word"),
             numpy_helper.from_array((rng.standard_normal((SEQ, WIDTH)) * 0.02).astype(np.float32), "embeddings.position"),
             numpy_helper.from_array(np.ones(WIDTH, np.float32), "ln0.gamma"),
             numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln0.beta"),
             numpy_helper.from_array((rng.standard_normal((WIDTH, HIDDEN)) / 8).astype(np.float32), "fc1.weight"),
             numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), "fc1.bias"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, WIDTH)) / 16).astype(np.float32), "fc2.weight"),
             numpy_helper.from_array(np.ones(WIDTH, np.float32), "ln1.gamma"),
             numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln1.beta")]
    nodes = [helper.make_node("Gather", ["embeddings.word", "ids"], ["word"], name="embeddings/Gather", axis=0),
             helper.make_node("Add", ["word", "embeddings.position"], ["embedded"], name="embeddings/Add"),
             helper.make_node("LayerNormalization", ["embedded", "ln0.gamma", "ln0.beta"], ["h0"], name="ln0", axis=-1),
             helper.make_node("MatMul", ["h0", "fc1.weight"], ["fc1"], name="fc1/MatMul"),
             helper.make_node("Add", ["fc1", "fc1.bias"], ["fc1b"], name="fc1/Add"),
             helper.make_node("Relu", ["fc1b"], ["act"], name="relu"),
             helper.make_node("MatMul", ["act", "fc2.weight"], ["fc2"], name="fc2/MatMul"),
             helper.make_node("Add", ["fc2", "h0"], ["res"], name="residual"),
             helper.make_node("LayerNormalization", ["res", "ln1.gamma", "ln1.beta"], ["hidden"], name="ln1", axis=-1)]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", SEQ, WIDTH])]
    if tied == "transpose":
        nodes += [helper.make_node("Transpose", ["embeddings.word"], ["word_t"], name="head/Transpose", perm=[1, 0]),
                  helper.make_node("MatMul", ["hidden", "word_t"], ["logits"], name="head/MatMul")]
    elif tied == "gemm":
        nodes += [helper.make_node("Reshape", ["hidden", "flat_shape"], ["flat"], name="head/Reshape"),
                  helper.make_node("Gemm", ["flat", "embeddings.word"], ["logits"], name="head/Gemm", transB=1)]
        inits.append(numpy_helper.from_array(np.array([-1, WIDTH], np.int64), "flat_shape"))
    if tied:
        shape = ["batch", SEQ, VOCAB] if tied == "transpose" else ["rows", VOCAB]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", SEQ])
    return build_model(nodes, [ids], outputs, inits)


def ids(batch=4, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ), dtype=np.int64)


def quantize(model, mode):
    if mode == "dynamic":
        return QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    if mode == "weights":
        return QuantizeWeightsOnly()(model)
    if mode == "static":
        return QuantizeStatic(StaticQuantizeConfig(integer_min_macs=0), Dataset([{"ids": ids(8, 2)}], None, 8, False, []))(model)
    return QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=32))(model)


def table_of(model, name="embeddings.word") -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def per_row_int8(table: np.ndarray) -> np.ndarray:
    """The table as int8 with one scale per row decodes it (what every int8 mode must compute)."""
    scale = np.abs(table).max(axis=1, keepdims=True) / np.float32(127)
    return (np.clip(np.rint(table / scale), -127, 127) * scale).astype(np.float32)


def run(model, feed, optimize=True):
    return make_session(model, optimize=optimize).run(None, feed)


def decisions(report) -> dict[str, object]:
    return {layer.node: layer for layer in report.layers}


def dtypes(model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


# ---- the form written ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "weights", "static"])
def test_int8_modes_store_the_table_int8_per_row_and_decode_only_gathered_rows(mode):
    model = encoder()
    quantized, report = quantize(model, mode)
    decision = decisions(report)["embeddings/Gather"]
    assert decision.action == PER_ROW and decision.weight == "embeddings.word"
    assert decision.bytes_before == VOCAB * WIDTH * 4 and decision.bytes_after == VOCAB * WIDTH + VOCAB * 4
    types = dtypes(quantized)
    assert "embeddings.word" not in types
    q = next(t for t in quantized.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [VOCAB, WIDTH])
    gathers = [n for n in quantized.graph.node if n.op_type == "Gather"]
    assert {n.input[0] for n in gathers} == {q.name, q.name + "_scale"}
    assert list(next(t for t in quantized.graph.initializer if t.name == q.name + "_scale").dims) == [VOCAB, 1]
    # The graph onnxruntime runs gathers int8 rows: the table is never decoded whole.
    runtime = optimized_graph(quantized)
    assert not constant_nodes_left(runtime)
    constants = {t.name: t for t in runtime.graph.initializer}
    read = [constants[n.input[0]].data_type for n in runtime.graph.node if n.op_type == "Gather" and n.input[0] in constants]
    assert TensorProto.INT8 in read and TensorProto.FLOAT not in [constants[n.input[0]].data_type for n in runtime.graph.node
                                                                  if n.op_type == "Gather" and n.input[0] in constants
                                                                  and list(constants[n.input[0]].dims) == [VOCAB, WIDTH]]


@pytest.mark.parametrize("mode", ["dynamic", "weights"])
def test_int8_numerics_match_the_per_row_rounded_table(mode):
    model = encoder()
    quantized, _ = quantize(model, mode)
    feed = {"ids": ids()}
    # Only the table rounded: the word embeddings out of the quantized graph equal the rounded rows exactly.
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for tensor in rounded.graph.initializer:
        if tensor.name == "embeddings.word":
            tensor.CopyFrom(numpy_helper.from_array(per_row_int8(table_of(model)), tensor.name))
    for graph in (quantized.graph, rounded.graph):
        graph.output.append(helper.make_tensor_value_info("word", TensorProto.FLOAT, None))
    got, want = run(quantized, feed, optimize=False)[-1], run(rounded, feed, optimize=False)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # And within int8's error bound of the float table: half a step of each row's scale.
    step = np.abs(table_of(model)).max(axis=1) / 127
    assert np.all(np.abs(got - table_of(model)[feed["ids"]]) <= step[feed["ids"]][..., None] / 2 + 1e-7)


def test_blockwise_4bit_uses_gather_block_quantized_and_matches_numpy():
    model = encoder()
    quantized, report = QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=32, embedding_symmetric=True))(model)
    decision = decisions(report)["embeddings/Gather"]
    assert decision.action.startswith("int4 block 32 embedding") and "GatherBlockQuantized" in decision.action
    nodes = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    data = next(t for t in quantized.graph.initializer if t.name == nodes[0].input[0])
    assert data.data_type == TensorProto.UINT8 and list(data.dims) == [VOCAB, WIDTH // 2]
    assert decision.bytes_after == VOCAB * WIDTH // 2 + VOCAB * (WIDTH // 32) * 4
    codes, scales, zeros = quantize_rows_blockwise(table_of(model), 4, 32, True)
    reference = dequantize_rows_blockwise(codes, scales, zeros, 4, 32)
    # The grid of a block is its largest magnitude / 8 (MLAS's symmetric 4-bit): codes -8..7, so the far side
    # clips at 7/8 of it; no weight is off by more than one step.
    blocks = table_of(model).reshape(VOCAB, WIDTH // 32, 32)
    error = np.abs(reference.reshape(blocks.shape) - blocks)
    assert np.all(error <= np.abs(blocks).max(axis=2, keepdims=True) / 8 + 1e-7)
    feed = {"ids": ids()}
    quantized.graph.output.append(helper.make_tensor_value_info("word", TensorProto.FLOAT, None))
    for optimize in (False, True):
        np.testing.assert_allclose(run(quantized, feed, optimize)[-1], reference[feed["ids"]], rtol=1e-6, atol=1e-7)
    assert Counter(n.op_type for n in optimized_graph(quantized).graph.node)["GatherBlockQuantized"] == 1


def test_blockwise_asymmetric_writes_packed_zero_points():
    model = encoder()
    quantized, _ = QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=32, symmetric=False))(model)
    node = next(n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized")
    assert len(node.input) == 4
    codes, scales, zeros = quantize_rows_blockwise(table_of(model), 4, 32, False)
    reference = dequantize_rows_blockwise(codes, scales, zeros, 4, 32)
    feed = {"ids": ids()}
    quantized.graph.output.append(helper.make_tensor_value_info("word", TensorProto.FLOAT, None))
    np.testing.assert_allclose(run(quantized, feed)[-1], reference[feed["ids"]], rtol=1e-6, atol=1e-7)


def test_blockwise_width_not_a_multiple_of_the_block_falls_back_to_int8_per_row():
    model = encoder()
    quantized, report = QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=128))(model)
    decision = decisions(report)["embeddings/Gather"]
    assert decision.action == PER_ROW and "not a multiple of --block-size 128" in decision.reason
    assert not any(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node)


# ---- every mode: numerics, size, twice --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_keeps_the_outputs_close_and_shrinks_the_table(mode):
    model = encoder()
    quantized, report = quantize(model, mode)
    feed = {"ids": ids()}
    want, got = run(model, feed)[0], run(quantized, feed)[0]
    cosine = np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got)
    assert cosine > (0.99 if mode == "blockwise4" else 0.999)
    before, after = model.ByteSize(), quantized.ByteSize()
    # The table is 256 KB of the model's 390 KB: stored int8 (or 4-bit), the whole file drops below 0.3x.
    assert after < before * (0.2 if mode == "blockwise4" else 0.3), (after, before)
    again, second = quantize(quantized, mode)
    assert again.SerializeToString() == quantized.SerializeToString() or (
        {t.name: t.SerializeToString() for t in again.graph.initializer}
        == {t.name: t.SerializeToString() for t in quantized.graph.initializer})
    assert not any(d.node == "embeddings/Gather" and d.action != "kept float" for d in second.layers)


def test_embeddings_off_leaves_the_table_float():
    quantized, report = QuantizeDynamic(QuantizeConfig(embeddings=False))(encoder())
    assert dtypes(quantized)["embeddings.word"] == TensorProto.FLOAT
    assert "embeddings/Gather" not in decisions(report)


def test_excluded_gather_stays_float_with_the_reason():
    quantized, report = QuantizeDynamic(QuantizeConfig(exclude=("embeddings/*",)))(encoder())
    decision = decisions(report)["embeddings/Gather"]
    assert decision.action == "kept float" and decision.reason == "excluded (--exclude)"
    assert dtypes(quantized)["embeddings.word"] == TensorProto.FLOAT


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_lookups_that_are_not_embeddings_are_left_alone_with_reasons(mode):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "constant_lookup"),
             numpy_helper.from_array(np.array([1, 5], np.int64), "fixed_ids"),
             numpy_helper.from_array(rng.standard_normal((4, 32)).astype(np.float32), "tiny_table")]
    nodes = [helper.make_node("Gather", ["constant_lookup", "fixed_ids"], ["picked"], name="fixed", axis=0),
             helper.make_node("Gather", ["tiny_table", "ids"], ["types"], name="types", axis=0),
             helper.make_node("Add", ["types", "picked"], ["out"], name="add")]
    model = build_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 32])], inits)
    calibration = Dataset([{"ids": np.array([0, 3])}], None, 2, False, [])
    quantized, report = (QuantizeDynamic()(model) if mode == "dynamic" else
                         QuantizeStatic(StaticQuantizeConfig(), calibration)(model))
    by_node = decisions(report)
    # Constant indices: onnxruntime folds that lookup at load (a codebook's decoding looks the same): not a layer.
    assert "fixed" not in by_node and dtypes(quantized)["constant_lookup"] == TensorProto.FLOAT
    assert by_node["types"].action == "kept float" and by_node["types"].reason == "tiny (< 1 KiB)"
    assert not report.changed


# ---- a table tied to the output projection ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "weights", "static"])
@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_tied_table_is_stored_once_and_serves_both_readers(mode, tied):
    model = encoder(tied)
    quantized, report = quantize(model, mode)
    tables = [t for t in quantized.graph.initializer if VOCAB in t.dims and WIDTH in t.dims]
    assert len(tables) == 1 and tables[0].data_type == TensorProto.INT8, [(t.name, t.data_type) for t in tables]
    by_node = decisions(report)
    assert by_node["embeddings/Gather"].action == FOLDED
    projection = "head/Transpose" if tied == "transpose" else "head/Gemm"
    assert by_node[projection].action.startswith(FOLDED) and "stored once" in by_node[projection].action
    # onnxruntime folds the decoding at load: both readers use one float table, no Cast/Mul left per run.
    assert not constant_nodes_left(optimized_graph(quantized))
    feed = {"ids": ids()}
    want, got = run(model, feed), run(quantized, feed)
    for a, b in zip(want, got):
        assert np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
    again, _ = quantize(quantized, mode)
    assert sorted(t.name for t in again.graph.initializer) == sorted(t.name for t in quantized.graph.initializer)


# ---- cluster -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per", ["layer", "channel"])
@pytest.mark.parametrize("tied", [None, "gemm"])
def test_cluster_gives_the_table_a_codebook_folded_at_load(per, tied):
    from onnxshrink.passes.cluster import Cluster, ClusterConfig

    model = encoder(tied)
    clustered, report = Cluster(ClusterConfig(bits=4, per=per))(model)
    by_node = decisions(report)
    decision = by_node["embeddings/Gather"]
    # Per row, 16 fp32 values a row cost as much as a 64-wide row's indices; per layer, an fp16 scale a row.
    assert decision.action.startswith("codebook") and decision.bytes_after < decision.bytes_before / (
        3.8 if per == "layer" else 1.9)
    if tied:
        assert "tied: clustered once" in by_node["head/Gemm"].action
    indices = [t for t in clustered.graph.initializer if list(t.dims) == [VOCAB, WIDTH]]
    assert len(indices) == 1 and indices[0].data_type == TensorProto.UINT8
    # The decoding reads initializers only: onnxruntime folds it, and gathers from a float table as the original.
    runtime = optimized_graph(clustered)
    assert Counter(n.op_type for n in runtime.graph.node)["Gather"] == 1 and not constant_nodes_left(runtime)
    feed = {"ids": ids()}
    want, got = run(model, feed)[0], run(clustered, feed)[0]
    # 16 values for the table and for each MatMul weight (rows of the table span 20x in scale: per layer, they are
    # scaled to peak 1 first, or one set of values fits them badly: 0.98 before the row scales).
    assert np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got) > 0.99
    again, second = Cluster(ClusterConfig(bits=4, per=per))(clustered)
    assert not second.changed or all(not d.action.startswith("codebook") for d in second.layers)


@pytest.mark.parametrize("tied", [None, "gemm", "transpose"])
def test_prune_leaves_the_table_alone(tied):
    from onnxshrink.passes.prune import Prune
    from onnxshrink.passes.prune_common import PruneConfig

    model = encoder(tied)
    pruned, report = Prune(PruneConfig(sparsity=0.5))(model)
    assert np.array_equal(table_of(pruned), table_of(model))
    assert "embeddings/Gather" not in decisions(report)


# ---- through the command: external data (streamed), the report -----------------------------------------


@pytest.mark.parametrize("config", [QuantizeConfig(), BlockwiseConfig(bits=4)], ids=["dynamic", "blockwise4"])
def test_streamed_external_model_gets_the_same_table(tmp_path, config):
    from onnxshrink import api, streaming

    source = tmp_path / "encoder.onnx"
    onnx.save_model(encoder(), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="encoder.onnx.data", size_threshold=0)
    report = api.quantize(source, tmp_path / "q.onnx", config, run_validation=False)
    assert streaming.NOTE in report.notes  # the table read and written one tensor at a time, as the weights are
    decision = decisions(report.passes[0])["embeddings/Gather"]
    assert decision.action != "kept float" and decision.bytes_after < decision.bytes_before / 3.5
    assert report.runtime["all_quantized_layers_fused"]
    in_memory, _ = (QuantizeDynamic(config) if isinstance(config, QuantizeConfig) else QuantizeBlockwise(config))(encoder())
    feed = {"ids": ids()}
    np.testing.assert_allclose(make_session(str(tmp_path / "q.onnx")).run(None, feed)[0], run(in_memory, feed)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", ["transpose", "gemm"])
def test_blockwise_tied_table_shares_one_set_of_codes_between_gather_and_matmulnbits(tied):
    model = encoder(tied)
    quantized, report = quantize(model, "blockwise4")
    by_node = decisions(report)
    assert "codes shared" in by_node["embeddings/Gather"].action
    head = "head/MatMul" if tied == "transpose" else "head/Gemm"
    assert by_node[head].action == "int4 block 32 (rtn, table shared with the embedding Gather, stored once)"
    assert sum(1 for d in report.layers if d.node == head) == 1
    ops = Counter(n.op_type for n in quantized.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 3 and ops["Transpose"] == 0
    gather = next(n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized")
    head_node = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0])
    codes = next(t for t in quantized.graph.initializer if t.name == gather.input[0])
    assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == [VOCAB, WIDTH // 32, 16]
    assert not any(VOCAB in t.dims and t.name != codes.name and t.data_type != TensorProto.FLOAT
                   for t in quantized.graph.initializer if len(t.dims) > 1 and t.dims[1] == WIDTH)
    # Numerics: rows and logits from the rounded table (MatMulNBits at accuracy_level 4 quantizes x to int8).
    codes_, scales, zeros = quantize_rows_blockwise(table_of(model), 4, 32, True)
    reference = dequantize_rows_blockwise(codes_, scales, zeros, 4, 32)
    feed = {"ids": ids()}
    extra = onnx.ModelProto()
    extra.CopyFrom(quantized)
    extra.graph.output.append(helper.make_tensor_value_info("word", TensorProto.FLOAT, None))
    hidden, logits, word = run(extra, feed)
    np.testing.assert_allclose(word, reference[feed["ids"]], rtol=1e-6, atol=1e-7)
    expected = hidden.reshape(logits.shape[:-1] + (WIDTH,)) @ reference.T
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert head_node.domain == "com.microsoft"
    again, second = quantize(quantized, "blockwise4")
    assert sorted(t.name for t in again.graph.initializer) == sorted(t.name for t in quantized.graph.initializer)


def test_an_opset_too_old_for_the_decoding_leaves_the_table_float_with_the_reason():
    model = encoder()
    model.opset_import[0].version = 5  # Mul broadcasts from opset 7, and raising it would change the model's Add
    quantized, report = QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)
    decision = decisions(report)["embeddings/Gather"]
    assert decision.action == "kept float" and "needs opset 7" in decision.reason and "Add" in decision.reason
    assert dtypes(quantized)["embeddings.word"] == TensorProto.FLOAT


@pytest.mark.parametrize("mode", ["dynamic", "blockwise4"])
def test_a_model_of_embeddings_alone_is_already_quantized_the_second_time(mode):
    table = numpy_helper.from_array(np.random.default_rng(4).standard_normal((VOCAB, WIDTH)).astype(np.float32), "E")
    model = build_model([helper.make_node("Gather", ["E", "ids"], ["rows"], name="embed", axis=0)],
                        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", WIDTH])], [table])
    once, first = quantize(model, mode)
    assert first.changed and decisions(first)["embed"].action != "kept float"
    twice, second = quantize(once, mode)
    assert not second.changed and "model is already quantized: nothing to do" in second.notes
    assert twice.SerializeToString() == once.SerializeToString()


def test_cli_embedding_block_size_sets_the_tables_blocks(tmp_path):
    """--embedding-block-size reaches GatherBlockQuantized (the MatMuls keep --block-size); other modes refuse it."""
    from typer.testing import CliRunner

    from conftest import invoke

    source = tmp_path / "enc.onnx"
    onnx.save(encoder(), str(source))
    runner = CliRunner()
    result = invoke(runner, "quantize", source, "--bits", "4", "--block-size", "32", "--embedding-block-size", "16",
                    "-o", tmp_path / "q.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    written = onnx.load(str(tmp_path / "q.onnx"))
    gather = next(n for n in written.graph.node if n.op_type == "GatherBlockQuantized")
    assert next(a.i for a in gather.attribute if a.name == "block_size") == 16
    assert {a.i for n in written.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "block_size"} <= {32}
    refused = invoke(runner, "quantize", source, "--embedding-block-size", "16", "-o", tmp_path / "d.onnx")
    assert refused.exit_code == 2 and "applies to --bits < 8" in refused.output
    assert not (tmp_path / "d.onnx").exists()
