"""pack / unpack: lossless round trips of real and built models, the encodings chosen, and refusal of damaged packs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink import api
from onnxshrink.codec import container
from onnxshrink.errors import ModelLoadError, OutputError, UsageError
from onnxshrink.packing import decode_gaps, encode_gaps, unpack_model
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig
from tests.conftest import SAMPLES, build_model, float_value, invoke, make_mlp, save_model, tree


def serialized(path) -> bytes:
    return onnxshrink.load(path).SerializeToString()


def round_trip(tmp_path, model_path):
    """Pack and unpack; return the pack report and the unpacked path."""
    report = api.pack(model_path, tmp_path / "m.shrink")
    api.unpack(tmp_path / "m.shrink", tmp_path / "m.unpacked.onnx")
    return report, tmp_path / "m.unpacked.onnx"


def pruned_mlp(sparsity=0.8, seed=0) -> onnx.ModelProto:
    """An MLP whose weights are mostly exact zeros, as `prune` leaves them."""
    model = make_mlp((64, 256, 128, 10), seed=seed)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name.endswith("weight"):
            w = numpy_helper.to_array(init).copy()
            w[rng.random(w.shape) < sparsity] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


@pytest.mark.parametrize("sample", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("form", ["float", "int8", "int8-folded", "int4"])
def test_sample_models_round_trip_bit_for_bit(tmp_path, sample, form):
    source = SAMPLES / f"{sample}.onnx"
    if form.startswith("int8"):
        # "int8": integer kernels everywhere; "int8-folded": quantize's default on these small models (int8 + Cast + Mul)
        config = QuantizeConfig(integer_min_macs=0 if form == "int8" else QuantizeConfig().integer_min_macs)
        api.quantize(source, tmp_path / "q.onnx", config, run_validation=False)
        source = tmp_path / "q.onnx"
    elif form == "int4":
        api.quantize(source, tmp_path / "q.onnx", BlockwiseConfig(bits=4, block_size=32), run_validation=False)
        source = tmp_path / "q.onnx"
    report, unpacked = round_trip(tmp_path, source)
    assert serialized(unpacked) == serialized(source)
    assert report.size["output"] < report.size["original"]
    coded = report.tensors
    # The folded CNN's int8 weights code better with LZMA, in the graph record (the pack measures both).
    assert coded or (form, sample) == ("int8-folded", "digits_cnn"), "the largest weights must be entropy-coded"
    for t in coded:
        # Huffman spends at most 1 bit per symbol over the order-0 entropy, and never less than it.
        assert t.entropy_bits - 1e-9 <= t.coded_bits <= t.entropy_bits + 1.0


def test_int4_weights_are_coded_below_four_bits(tmp_path):
    api.quantize(SAMPLES / "digits_mlp.onnx", tmp_path / "q.onnx", BlockwiseConfig(bits=4, block_size=32), run_validation=False)
    report, _ = round_trip(tmp_path, tmp_path / "q.onnx")
    largest = max(report.tensors, key=lambda t: t.bytes_before)
    assert largest.dtype == "uint8"  # MatMulNBits packs two 4-bit codes per byte
    # As 4-bit symbols ("nibbles") or as bytes (pairs of codes, whose joint entropy is never above the sum).
    bits_per_weight = largest.coded_bits / (1 if largest.encoding == "nibbles" else 2)
    assert largest.encoding in ("nibbles", "planes") and bits_per_weight < 4.0


def test_independent_four_bit_codes_are_split_into_nibbles(tmp_path):
    rng = np.random.default_rng(3)
    halves = np.minimum(rng.geometric(0.35, (2, 4096)) - 1, 15).astype(np.uint8)
    packed = numpy_helper.from_array((halves[0] | (halves[1] << 4)).astype(np.uint8), "codes")
    model = build_model([helper.make_node("Identity", ["codes"], ["y"])], [],
                        [helper.make_tensor_value_info("y", TensorProto.UINT8, [4096])], [packed])
    report, unpacked = round_trip(tmp_path, save_model(model, tmp_path / "codes.onnx"))
    assert serialized(unpacked) == serialized(tmp_path / "codes.onnx")
    assert [t.encoding for t in report.tensors] == ["nibbles"]


def test_pruned_weights_are_coded_as_gaps_and_values(tmp_path):
    path = save_model(pruned_mlp(0.8), tmp_path / "pruned.onnx")
    dense = save_model(make_mlp((64, 256, 128, 10)), tmp_path / "dense.onnx")
    report, unpacked = round_trip(tmp_path, path)
    assert serialized(unpacked) == serialized(path)
    big = [t for t in report.tensors if t.bytes_before >= 16384]
    assert big and all(t.encoding == "sparse" for t in big)
    dense_report = api.pack(dense, tmp_path / "dense.shrink")
    # 80% zeros: well under half the bytes of the same model unpruned.
    assert report.size["output"] < 0.5 * dense_report.size["output"]


def test_pruned_then_4bit_weights_are_coded_as_sparse_nibbles(tmp_path):
    path = save_model(pruned_mlp(0.8), tmp_path / "pruned.onnx")
    api.quantize(path, tmp_path / "q4.onnx", BlockwiseConfig(bits=4, block_size=32), run_validation=False)
    report, unpacked = round_trip(tmp_path, tmp_path / "q4.onnx")
    assert serialized(unpacked) == serialized(tmp_path / "q4.onnx")
    largest = max(report.tensors, key=lambda t: t.bytes_before)
    assert largest.encoding == "sparse-nibbles"
    # 80% of the 4-bit codes are the zero code: well under half of the 4 bits each took.
    assert largest.bytes_after < 0.45 * largest.bytes_before


def test_library_load_and_session_run_a_pack_without_writing_a_file(tmp_path):
    source = SAMPLES / "digits_cnn.onnx"
    api.pack(source, tmp_path / "cnn.shrink")
    before = tree(tmp_path)
    model = onnxshrink.load(tmp_path / "cnn.shrink")
    assert model.SerializeToString() == onnxshrink.load(source).SerializeToString()
    x = np.load(SAMPLES / "digits_cnn.eval.npz")["input"][:8]
    packed = onnxshrink.session(tmp_path / "cnn.shrink").run(None, {"input": x})[0]
    original = onnxshrink.session(source).run(None, {"input": x})[0]
    np.testing.assert_array_equal(packed, original)
    import onnxruntime as ort

    custom = onnxshrink.session(tmp_path / "cnn.shrink", ort.SessionOptions(), ["CPUExecutionProvider"])
    np.testing.assert_array_equal(custom.run(None, {"input": x})[0], original)
    assert tree(tmp_path) == before


def test_subgraph_constant_and_shared_tensors_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    # Three unrelated matrices: copies of one (w * 2, w.T) LZMA codes best in the graph record, where pack leaves them.
    w, tw, w_else = rng.standard_normal((3, 32, 32)).astype(np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["tw"], value=numpy_helper.from_array(tw, "tw")),
         helper.make_node("MatMul", ["x", "tw"], ["then_out"])], "then", [], [float_value("then_out", [2, 32])])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["else_out"])], "else", [], [float_value("else_out", [2, 32])],
        [numpy_helper.from_array(w_else, "W_else_unused")])
    model = build_model(
        [helper.make_node("MatMul", ["x", "W"], ["a"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Add", ["a", "y"], ["out"])],
        [float_value("x", [2, 32]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [float_value("out", [2, 32])],
        [numpy_helper.from_array(w, "W")])
    path = save_model(model, tmp_path / "if.onnx")
    report, unpacked = round_trip(tmp_path, path)
    assert serialized(unpacked) == serialized(path)
    assert len(report.tensors) == 3  # W, the If body's Constant, and the body's initializer


def test_external_data_model_round_trips(tmp_path):
    model = make_mlp((64, 256, 128, 10))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    report, unpacked = round_trip(tmp_path, tmp_path / "ext.onnx")
    # The packed model decodes to exactly what was loaded; the unpacked file keeps its weights external too.
    assert onnxshrink.load(tmp_path / "m.shrink").SerializeToString() == serialized(tmp_path / "ext.onnx")
    assert (tmp_path / "m.unpacked.onnx.data").is_file()
    assert serialized(unpacked) == serialized(tmp_path / "ext.onnx")


def test_float_data_constants_are_coded_and_restored_into_float_data(tmp_path):
    """paddle2onnx writes weights as Constant nodes with typed float_data: they must be coded and come back as such."""
    rng = np.random.default_rng(4)
    values = rng.standard_normal(64 * 32).astype(np.float32)
    constant = helper.make_tensor("w", TensorProto.FLOAT, [64, 32], values.tolist())  # float_data, not raw_data
    assert not constant.HasField("raw_data") and len(constant.float_data) == 64 * 32
    model = build_model([helper.make_node("Constant", [], ["w"], value=constant), helper.make_node("MatMul", ["x", "w"], ["y"])],
                        [float_value("x", [2, 64])], [float_value("y", [2, 32])])
    path = save_model(model, tmp_path / "typed.onnx")
    report, unpacked = round_trip(tmp_path, path)
    assert serialized(unpacked) == serialized(path)
    assert [t.name for t in report.tensors] == ["w"] and report.size["output"] < 0.95 * report.size["original"]
    restored = onnxshrink.load(tmp_path / "m.shrink").graph.node[0].attribute[0].t
    assert not restored.HasField("raw_data") and list(restored.float_data) == list(constant.float_data)


def test_tiny_and_typed_field_tensors_stay_in_the_graph(tmp_path):
    model = build_model(
        [helper.make_node("Add", ["x", "b"], ["y"])], [float_value("x", [4])], [float_value("y", [4])],
        [helper.make_tensor("b", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])])
    path = save_model(model, tmp_path / "tiny.onnx")
    report, unpacked = round_trip(tmp_path, path)
    assert report.tensors == []
    assert serialized(unpacked) == serialized(path)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2000), max_size=60), st.integers(0, 700))
def test_gap_coding_round_trips(steps, tail):
    positions = np.cumsum(np.asarray(steps, dtype=np.int64) + 1) - 1 if steps else np.zeros(0, np.int64)
    symbols = encode_gaps(positions)
    assert symbols.dtype == np.uint8
    np.testing.assert_array_equal(decode_gaps(symbols), positions)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64, np.float64]),
       st.integers(16, 3000), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_random_tensors_of_every_dtype_round_trip(tmp_path_factory, dtype, size, zero_fraction, seed):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(size) * 20).astype(dtype)
    values[rng.random(size) < zero_fraction] = 0
    tensor = numpy_helper.from_array(values, "t")
    model = build_model([helper.make_node("Identity", ["t"], ["y"])], [],
                        [helper.make_tensor_value_info("y", tensor.data_type, [size])], [tensor])
    folder = tmp_path_factory.mktemp("dtype")
    path = save_model(model, folder / "m.onnx")
    _, unpacked = round_trip(folder, path)
    assert serialized(unpacked) == serialized(path)


# ---------------------------------------------------------------- damaged packs are refused

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    path = save_model(pruned_mlp(0.6), folder / "m.onnx")
    api.pack(path, folder / "m.shrink")
    return (folder / "m.shrink").read_bytes()


def record_ends(data: bytes) -> list[int]:
    ends = [container.PREAMBLE.size]
    try:
        for record in container.read_records(data):
            ends.append(record.offset + container.RECORD_HEAD.size + len(record.body) + container.CRC.size)
    finally:
        pass
    return ends


def test_truncation_at_every_record_boundary_is_refused(tmp_path, packed):
    ends = record_ends(packed)
    assert len(ends) >= 5  # preamble, header, graph, tables/tensors
    for cut in ends + [e - 1 for e in ends[1:]] + [len(packed) - 1]:
        with pytest.raises(container.CorruptPack):
            unpack_model(packed[:cut])


def test_random_bit_flips_are_all_refused(packed):
    rng = np.random.default_rng(7)
    for position in rng.integers(0, len(packed), 200):
        damaged = bytearray(packed)
        damaged[position] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(container.CorruptPack):
            unpack_model(bytes(damaged))


def test_wrong_version_and_foreign_files_are_named(packed):
    newer = bytearray(packed)
    newer[8:10] = (4).to_bytes(2, "little")
    with pytest.raises(container.CorruptPack, match="version 4"):
        unpack_model(bytes(newer))
    with pytest.raises(container.CorruptPack, match="not an onnxshrink pack"):
        unpack_model(b"PK\x03\x04 a zip file")
    with pytest.raises(container.CorruptPack, match="unexpected byte"):
        unpack_model(packed + b"\x00")


@pytest.mark.parametrize("command", ["unpack", "inspect", "validate"])
def test_cli_refuses_a_truncated_pack_in_one_line(runner, tmp_path, packed, command):
    bad = tmp_path / "bad.shrink"
    bad.write_bytes(packed[: len(packed) // 2])
    args = [command, bad] if command != "validate" else [command, bad, bad]
    before = tree(tmp_path)
    result = invoke(runner, *args)
    assert result.exit_code == 3, result.output
    assert "corrupted pack" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- the commands

def test_cli_pack_unpack_inspect_validate(runner, tmp_path):
    source = tmp_path / "mlp.onnx"
    shutil.copy(SAMPLES / "digits_mlp.onnx", source)
    result = invoke(runner, "pack", source, "-v")  # the per-tensor table is for --verbose (issue 17)
    assert result.exit_code == 0, result.output
    assert "fc1.weight" in result.output and "wrote" in result.output
    assert (tmp_path / "mlp.shrink").is_file()
    result = invoke(runner, "unpack", tmp_path / "mlp.shrink")
    assert result.exit_code == 0, result.output
    assert serialized(tmp_path / "mlp.unpacked.onnx") == serialized(source)
    result = invoke(runner, "inspect", tmp_path / "mlp.shrink", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["weights"] == 3
    result = invoke(runner, "validate", source, tmp_path / "mlp.shrink", "--json")
    assert result.exit_code == 0, result.output
    drift = json.loads(result.stdout)["outputs"]
    assert all(o["max_abs"] == 0.0 for o in drift.values())


def test_cli_pack_json_is_one_document(runner, tmp_path):
    source = save_model(pruned_mlp(0.7), tmp_path / "p.onnx")
    result = invoke(runner, "pack", source, "-o", tmp_path / "out.shrink", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["command"] == "pack" and document["size"]["ratio"] < 0.6
    assert {t["encoding"] for t in document["tensors"]} >= {"sparse"}


def test_pack_refuses_its_input_as_output_and_existing_files(runner, tmp_path):
    source = save_model(make_mlp(), tmp_path / "m.onnx")
    before = tree(tmp_path)
    result = invoke(runner, "pack", source, "-o", source)
    assert result.exit_code == 5 and "is the input model" in result.output
    assert tree(tmp_path) == before
    (tmp_path / "m.shrink").write_bytes(b"keep me")
    result = invoke(runner, "pack", source)
    assert result.exit_code == 5 and "already exists" in result.output
    assert (tmp_path / "m.shrink").read_bytes() == b"keep me"
    assert invoke(runner, "pack", source, "--force").exit_code == 0
    assert (tmp_path / "m.shrink").read_bytes().startswith(container.MAGIC)


def test_pack_of_a_pack_and_unpack_of_a_model_are_usage_errors(tmp_path):
    source = save_model(make_mlp(), tmp_path / "m.onnx")
    api.pack(source, tmp_path / "m.shrink")
    with pytest.raises(UsageError, match="already a pack"):
        api.pack(tmp_path / "m.shrink", tmp_path / "again.shrink")
    with pytest.raises(UsageError, match="is not a pack"):
        api.unpack(source, tmp_path / "x.onnx")
    with pytest.raises(ModelLoadError, match="no such file"):
        api.unpack(tmp_path / "missing.shrink")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    source = save_model(make_mlp(), tmp_path / "m.onnx")
    before = tree(tmp_path)

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(container.Writer, "record", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        api.pack(source, tmp_path / "m.shrink")
    assert tree(tmp_path) == before


def test_quantize_accepts_a_pack_as_input(tmp_path):
    source = SAMPLES / "digits_mlp.onnx"
    api.pack(source, tmp_path / "mlp.shrink")
    from_pack = api.quantize(tmp_path / "mlp.shrink", tmp_path / "a.onnx", QuantizeConfig(), run_validation=False)
    api.quantize(source, tmp_path / "b.onnx", QuantizeConfig(), run_validation=False)
    assert from_pack.output.endswith("a.onnx")
    a, b = onnxshrink.load(tmp_path / "a.onnx"), onnxshrink.load(tmp_path / "b.onnx")
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def _damaged_packs(folder, packed: bytes) -> None:
    (folder / "truncated.shrink").write_bytes(packed[: len(packed) // 2])
    flipped = bytearray(packed)
    flipped[len(packed) // 3] ^= 4
    (folder / "flipped.shrink").write_bytes(bytes(flipped))
    newer = bytearray(packed)
    newer[8] = 4
    (folder / "v4.shrink").write_bytes(bytes(newer))
    (folder / "cut_at_record.shrink").write_bytes(packed[:-17])


@pytest.mark.parametrize("args, code, message", [
    (["unpack", "truncated.shrink"], 3, "corrupted pack (truncated: the tensor record at byte"),
    (["unpack", "cut_at_record.shrink"], 3, "corrupted pack (truncated: the end record at byte"),
    (["inspect", "flipped.shrink"], 3, "corrupted pack (checksum mismatch in the record at byte"),
    (["validate", "m.onnx", "v4.shrink"], 3, "corrupted pack (pack format version 4.0; this onnxshrink reads versions 1.x, 2.x and 3.x)"),
    (["unpack", "m.onnx"], 2, "m.onnx: is not a pack (.shrink); nothing to unpack"),
    (["pack", "m.shrink"], 2, "m.shrink: is already a pack (.shrink); unpack it first"),
    (["pack", "m.onnx", "-o", "m.onnx"], 5, "output path is the input model"),
    (["pack", "m.onnx"], 5, "m.shrink: already exists (use --force to replace it)"),
])
def test_robustness_table_rows_for_packs(runner, tmp_path, monkeypatch, args, code, message):
    save_model(pruned_mlp(0.5), tmp_path / "m.onnx")
    api.pack(tmp_path / "m.onnx", tmp_path / "m.shrink")
    _damaged_packs(tmp_path, (tmp_path / "m.shrink").read_bytes())
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    result = invoke(runner, *args)
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_a_pipeline_is_measured_against_the_model_it_began_with(tmp_path):
    """prune -> cluster -> pack: each output records the first model's size, so pack's headline is the pipeline's
    ratio to the original, not to the clustered model it was given."""
    from onnxshrink import api, model as model_io
    from onnxshrink.passes.cluster import ClusterConfig
    from onnxshrink.passes.prune import PruneConfig

    original = SAMPLES / "digits_mlp.onnx"
    pruned, clustered, packed = tmp_path / "p.onnx", tmp_path / "c.onnx", tmp_path / "c.shrink"
    first = api.prune(original, pruned, PruneConfig(sparsity=0.8), run_validation=False)
    assert "pipeline_original" not in first.size  # its input is the original
    second = api.cluster(pruned, clustered, ClusterConfig(bits=4), run_validation=False)
    assert second.size["pipeline_original"] == original.stat().st_size != second.size["original"]
    assert model_io.original_size(model_io.load(clustered), clustered) == original.stat().st_size
    report = api.pack(clustered, packed)
    assert report.size["pipeline_original"] == original.stat().st_size
    from typer.testing import CliRunner

    result = invoke(CliRunner(), "pack", clustered, "-o", tmp_path / "again.shrink")
    assert result.exit_code == 0, result.output
    ratio = original.stat().st_size / (tmp_path / "again.shrink").stat().st_size
    assert f"{ratio:.1f}x smaller than the original" in result.output
