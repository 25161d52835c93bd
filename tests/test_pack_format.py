"""The pack format: binary tensor descriptions (2.0), a zstd graph record (3.0), 1.0 packs (JSON descriptions) and
2.0 packs (LZMA graph) still read, malformed descriptions refused, and small models that pack smaller than LZMA on
the whole model."""

from __future__ import annotations

import io
import json
import lzma
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, save_model
from onnxshrink import api, packing
from onnxshrink.codec import container
from onnxshrink.packing import unpack_model


def skewed_codes(rng, shape, zeros=0.35) -> np.ndarray:
    """Cluster indices as a 16-entry codebook leaves them: a third 0 (pruned), the others skewed, differently
    in each layer."""
    weights = np.concatenate(([zeros], (1 - zeros) * rng.dirichlet(np.full(15, 0.5))))
    return rng.choice(16, size=shape, p=weights).astype(np.uint8)


def identity_model(tensors: list[onnx.TensorProto], constants: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """Each initializer (and each Constant node's tensor) passed to an output of its own."""
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in tensors]
    nodes += [helper.make_node("Constant", [], [c.name], value=c) for c in constants]
    outputs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, list(t.dims)) for t in tensors]
    outputs += [helper.make_tensor_value_info(c.name, c.data_type, list(c.dims)) for c in constants]
    return build_model(nodes, [], outputs, tensors)


def every_kind() -> onnx.ModelProto:
    """A tensor for each coding: planes of fp32 (k=4), fp16 (k=2) and int8, nibbles, sparse fp32 and uint8,
    sparse-nibbles, an fp32 Constant in float_data (whose planes share tables with the other fp32 planes), and
    576-byte uint8 tensors, worth a record now that a description is short."""
    rng = np.random.default_rng(0)
    pruned = rng.standard_normal((128, 64)).astype(np.float32)
    pruned[rng.random(pruned.shape) < 0.7] = 0
    mostly_zero = skewed_codes(rng, 4096)
    mostly_zero[rng.random(4096) < 0.6] = 0
    halves = np.minimum(rng.geometric(0.35, (2, 4096)) - 1, 15)
    mostly_88 = np.where(rng.random((2, 8192)) < 0.7, 8, rng.integers(0, 16, (2, 8192)))
    arrays = {
        "fp32": rng.standard_normal((64, 64)).astype(np.float32),
        "fp16": rng.standard_normal((64, 64)).astype(np.float16),
        "int8": np.clip(rng.standard_normal((64, 64)) * 20, -127, 127).astype(np.int8),
        "codes": (halves[0] | (halves[1] << 4)).astype(np.uint8),
        "pruned": pruned,
        "mostly_zero": mostly_zero,
        "q4": (mostly_88[0] | (mostly_88[1] << 4)).astype(np.uint8),
        **{f"small{i}": skewed_codes(rng, (24, 24)) for i in range(4)},
    }
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [64, 32], rng.standard_normal(64 * 32).astype(np.float32).tolist())
    return identity_model([numpy_helper.from_array(a, name) for name, a in arrays.items()], [typed])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    path = save_model(every_kind(), folder / "m.onnx")
    report = api.pack(path, folder / "m.shrink")
    return path, report, (folder / "m.shrink").read_bytes()


def tensor_records(pack: bytes):
    """(record, description, description length) of each tensor record."""
    for record in container.read_records(pack):
        if record.kind == container.TENSOR:
            meta, streams = container.split_meta(record)
            yield record, meta, len(record.body) - len(streams)


def as_version_1(pack: bytes) -> bytes:
    """The pack as the 1.0 writer laid it out: each description a u32-length-prefixed JSON object with its digest
    and background in hex. Everything else (header, graph, tables, streams) is the same in both versions."""
    out = io.BytesIO()
    writer = container.Writer(out)
    for record in container.read_records(pack):
        if record.kind != container.TENSOR:
            writer.record(record.kind, record.body)
            continue
        meta, streams = container.split_meta(record)
        meta["sha"] = meta["sha"].hex()
        if "bg" in meta:
            meta["bg"] = f"{meta['bg']:x}" if meta["enc"] == "sparse-nibbles" else meta["bg"].hex()
        text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        writer.record(container.TENSOR, container.JSON_LENGTH.pack(len(text)), text, streams)
    writer.close()
    data = bytearray(out.getvalue())
    container.PREAMBLE.pack_into(data, 0, container.MAGIC, 1, 0)
    return bytes(data)


def with_body(pack: bytes, record: container.Record, body: bytes) -> bytes:
    """`pack` with one record's body replaced and its CRC recomputed, so that only the parser can object."""
    head = container.RECORD_HEAD.pack(record.kind, len(body))
    end = record.offset + container.RECORD_HEAD.size + len(record.body) + container.CRC.size
    return pack[: record.offset] + head + body + container.CRC.pack(zlib.crc32(head + body)) + pack[end:]


def test_every_kind_of_tensor_has_a_short_binary_description(packed):
    path, report, pack = packed
    assert unpack_model(pack).SerializeToString() == onnx.load(str(path)).SerializeToString()
    assert {t.encoding for t in report.tensors} == {"planes", "nibbles", "sparse", "sparse-nibbles"}
    assert report.totals["shared_tables"] >= 1
    assert pack[8:12] == bytes([2, 0, 0, 0])  # format 2.0: a graph under 1 MiB keeps the smaller codec, LZMA
    assert container.parse_json(next(container.read_records(pack)))["graph_codec"] == "lzma2-raw-8m"
    descriptions = {report.tensors[n].name: (meta, length) for n, (_, meta, length) in enumerate(tensor_records(pack))}
    assert descriptions["typed"][0]["field"] == "float_data"
    assert {descriptions[name][0]["k"] for name in ("fp32", "fp16", "int8")} == {4, 2, 1}
    meta, length = descriptions["mostly_zero"]
    assert meta["enc"] == "sparse" and meta["k"] == 1 and length < 40  # JSON took about 150
    assert all(length <= 25 + 6 * len(meta["streams"]) for meta, length in descriptions.values())


def test_a_version_1_pack_still_unpacks_to_the_same_model(packed, tmp_path):
    path, _, pack = packed
    old = as_version_1(pack)
    assert old[8:12] == bytes([1, 0, 0, 0]) and len(old) > len(pack) + 80 * len(list(tensor_records(pack)))
    assert unpack_model(old).SerializeToString() == onnx.load(str(path)).SerializeToString()
    (tmp_path / "old.shrink").write_bytes(old)
    api.unpack(tmp_path / "old.shrink", tmp_path / "old.onnx")
    assert onnx.load(str(tmp_path / "old.onnx")).SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_a_damaged_version_1_description_is_refused(packed):
    old = as_version_1(packed[2])
    record = next(r for r in container.read_records(old) if r.kind == container.TENSOR)
    (length,) = container.JSON_LENGTH.unpack_from(record.body)
    text, streams = bytes(record.body[4 : 4 + length]), bytes(record.body[4 + length :])
    for broken, message in [(text.replace(b'"sha":"', b'"sha":"zz'), "invalid description"),
                            (text.replace(b'"i":', b'"j":'), "refers to no tensor"), (b"[1, 2]", "not a JSON object")]:
        body = container.JSON_LENGTH.pack(len(broken)) + broken + streams
        with pytest.raises(container.CorruptPack, match=f"tensor record at byte {record.offset} .*{message}"):
            unpack_model(with_body(old, record, body))


def test_other_major_versions_are_refused_by_name(packed):
    newer = bytearray(packed[2])
    newer[8:10] = (4).to_bytes(2, "little")
    with pytest.raises(container.CorruptPack, match=r"version 4\.0; this onnxshrink reads versions 1\.x, 2\.x and 3\.x"):
        unpack_model(bytes(newer))


def sparse_record(pack: bytes):
    return next((r, length) for r, meta, length in tensor_records(pack) if meta["enc"] == "sparse" and meta["k"] == 1)


# A sparse uint8 tensor's description: length, i (1 byte), n (2), k, flags, sha (8), encoding at 14, background,
# nnz (2), value encoding at 18, then the streams' entries.
@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:12], "truncated description"),
    (lambda b: b"\xff\x7f" + b[1:], "truncated description"),  # a length past the record's end
    (lambda b: b[:1] + b"\x80" * 11 + b[12:], "overlong number"),
    (lambda b: b[:5] + b"\xf0" + b[6:], "unknown description flags"),
    (lambda b: b[:14] + b"\x09" + b[15:], "unknown encoding code 9"),
    (lambda b: b[:18] + b"\x05" + b[19:], "unknown value encoding code 5"),
    (lambda b: b[:4] + b"\x00" + b[5:], "elements of 0"),  # k
    (lambda b: b[:16] + b"\xff\x7f" + b[18:], "lists 16383 of 4096 elements"),  # nnz
    (lambda b: b[:1] + b"\x7f" + b[2:], "refers to no tensor of the graph"),  # i
])
def test_a_malformed_binary_description_is_refused_in_one_line(packed, damage, message):
    pack = packed[2]
    record, length = sparse_record(pack)
    body = bytes(record.body)
    assert body[14] == container.ENCODINGS.index("sparse") and body[18] in (0, 1) and 0x80 <= body[16] < 0x80 + 0x20
    with pytest.raises(container.CorruptPack, match=message) as refused:
        unpack_model(with_body(pack, record, damage(body)))
    assert f"at byte {record.offset}" in str(refused.value) and "\n" not in str(refused.value)


def test_every_single_bit_flip_of_a_description_is_refused(packed):
    """With the CRC recomputed, no altered description may crash the reader or restore another model."""
    path, _, pack = packed
    expected = onnx.load(str(path)).SerializeToString()
    record, length = sparse_record(pack)
    description, streams = bytes(record.body[:length]), bytes(record.body[length:])
    for position in range(length):
        for bit in range(8):
            changed = bytearray(description)
            changed[position] ^= 1 << bit
            try:
                model = unpack_model(with_body(pack, record, bytes(changed) + streams))
            except container.CorruptPack as exc:
                assert "\n" not in str(exc)
            else:
                assert model.SerializeToString() == expected, (position, bit)


def test_a_small_codebook_model_packs_smaller_than_lzma_on_the_whole_model(tmp_path):
    """24 cluster-index tensors of 32x32, each layer's skewed differently: with JSON descriptions pack coded half
    of them and lost to plain LZMA by 760 bytes; now each is worth a record, and they pay for the container
    (176 bytes: preamble, header, framing, end record) with room to spare."""
    rng = np.random.default_rng(2)
    model = identity_model([numpy_helper.from_array(skewed_codes(rng, (32, 32)), f"layer{i}.weight_idx") for i in range(24)])
    path = save_model(model, tmp_path / "codes.onnx")
    report = api.pack(path, tmp_path / "codes.shrink")
    assert len(report.tensors) == 24
    whole = lzma.compress(model.SerializeToString(), format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS)
    assert report.size["output"] < len(whole)


def test_tied_copies_stay_in_the_graph_when_that_is_smaller(tmp_path, monkeypatch):
    """Each copy alone codes better with Huffman; LZMA on the graph codes the copies for almost nothing."""
    codes = skewed_codes(np.random.default_rng(3), (64, 64))
    model = identity_model([numpy_helper.from_array(codes, f"tied{i}") for i in range(4)])
    path = save_model(model, tmp_path / "tied.onnx")
    report = api.pack(path, tmp_path / "tied.shrink")
    monkeypatch.setattr(packing, "WHOLE_GRAPH_CHECK", -1)
    per_tensor = api.pack(path, tmp_path / "records.shrink")
    assert per_tensor.tensors and not report.tensors
    assert report.size["output"] < per_tensor.size["output"]
    assert api.load(tmp_path / "tied.shrink").SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------- the graph record's codec (format 3.0)

def _with_graph_record(pack: bytes, version: tuple, codec: str, encode, declare_size: bool) -> bytes:
    """The pack rewritten with its graph record coded by `encode`, under format `version` and header `codec`."""
    out = io.BytesIO()
    records = container.read_records(pack)
    header = container.parse_json(next(records))
    graph = packing._decode_graph(next(records), header).SerializeToString()
    writer = container.Writer(out, version)
    writer.json_record(container.HEADER, {**header, "graph_codec": codec,
                                          **({"graph_bytes": len(graph)} if declare_size else {})})
    writer.record(container.GRAPH, encode(graph))
    for record in records:
        writer.record(record.kind, record.body)
    writer.close()
    return out.getvalue()


def as_lzma_2_0(pack: bytes) -> bytes:
    """The pack as the 2.0 writer laid it out: the same records, the graph record LZMA-coded."""
    return _with_graph_record(pack, (2, 0), "lzma2-raw-8m", declare_size=False, encode=lambda graph: lzma.compress(
        graph, format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS))


def as_zstd_3_0(pack: bytes) -> bytes:
    """The pack with its graph record in zstd, as `favor=load` writes a graph of 1 MiB or more."""
    return _with_graph_record(pack, (3, 0), "zstd", declare_size=True,
                              encode=packing.zstandard.ZstdCompressor(level=19).compress)


def sines_model() -> onnx.ModelProto:
    """A DCT-like basis of cosines (as an STFT front end holds): LZMA codes it 12% smaller than zstd -19."""
    basis = np.cos(2 * np.pi * np.arange(128)[:, None] * np.arange(256) / 256).astype(np.float32)
    return identity_model([numpy_helper.from_array(basis, "basis")])


def test_a_2_0_pack_with_an_lzma_graph_still_loads(packed, tmp_path):
    """A small graph keeps LZMA: such packs are written as 2.0, byte for byte as the 2.0 writer wrote them."""
    path, _, pack = packed
    newer = as_zstd_3_0(pack)
    assert newer[8:12] == bytes([3, 0, 0, 0])
    assert unpack_model(newer).SerializeToString() == onnx.load(str(path)).SerializeToString()
    old = as_lzma_2_0(newer)
    assert old[8:12] == bytes([2, 0, 0, 0]) and old == pack
    assert unpack_model(old).SerializeToString() == onnx.load(str(path)).SerializeToString()
    (tmp_path / "old.shrink").write_bytes(old)
    api.unpack(tmp_path / "old.shrink", tmp_path / "old.onnx")
    assert onnx.load(str(tmp_path / "old.onnx")).SerializeToString() == onnx.load(str(path)).SerializeToString()


def header_and_version(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    return container.parse_json(next(container.read_records(data))), data[8:12]


def test_lzma_keeps_the_graph_where_it_saves_more_than_the_slack_and_favor_size_takes_the_smaller(tmp_path):
    """favor=load trades at most ZSTD_SLACK of the pack for a graph record that decodes 20-50x faster; a basis
    of cosines is 12% smaller in LZMA, so LZMA stays, written as 2.0 (readable by every reader since)."""
    path = save_model(sines_model(), tmp_path / "sines.onnx")
    sizes = {}
    for favor in ("load", "size"):
        report = api.pack(path, tmp_path / f"{favor}.shrink", favor=favor)
        header, version = header_and_version(tmp_path / f"{favor}.shrink")
        assert header["graph_codec"] == "lzma2-raw-8m" and version == bytes([2, 0, 0, 0]) and not report.tensors
        assert api.load(tmp_path / f"{favor}.shrink").SerializeToString() == onnx.load(str(path)).SerializeToString()
        sizes[favor] = report.size["output"]
    assert sizes["load"] == sizes["size"]


def test_favor_load_takes_zstd_within_the_slack_and_favor_size_does_not(tmp_path, monkeypatch):
    path = save_model(every_kind(), tmp_path / "m.onnx")
    monkeypatch.setattr(packing, "ZSTD_SLACK", 0.5)  # zstd whatever LZMA saves
    monkeypatch.setattr(packing, "ZSTD_GRAPH_MIN", 0)  # however small the graph
    api.pack(path, tmp_path / "load.shrink")
    header, version = header_and_version(tmp_path / "load.shrink")
    assert header["graph_codec"] == "zstd" and version == bytes([3, 0, 0, 0])
    report = api.pack(path, tmp_path / "size.shrink", favor="size")
    records = container.read_records((tmp_path / "size.shrink").read_bytes())
    header = container.parse_json(next(records))
    graph = packing._decode_graph(next(records), header).SerializeToString()
    lzma_size = len(lzma.compress(graph, format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS))
    zstd_size = len(packing.zstandard.ZstdCompressor(level=packing.ZSTD_LEVEL).compress(graph))
    assert header["graph_codec"] == ("zstd" if zstd_size <= lzma_size else "lzma2-raw-8m")
    assert report.totals["graph_bytes"] == min(lzma_size, zstd_size) + packing.RECORD_FRAMING
    assert api.load(tmp_path / "size.shrink").SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_cli_favor_option(runner, tmp_path):
    from conftest import invoke

    path = save_model(sines_model(), tmp_path / "sines.onnx")
    result = invoke(runner, "pack", path, "-o", tmp_path / "s.shrink", "--favor", "size")
    assert result.exit_code == 0, result.output
    assert header_and_version(tmp_path / "s.shrink")[0]["graph_codec"] == "lzma2-raw-8m"
    result = invoke(runner, "pack", path, "-o", tmp_path / "x.shrink", "--favor", "speed")
    assert result.exit_code == 2 and "favor must be one of load, size, not 'speed'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.shrink").exists()


# ---------------------------------------------------------------- zstd-planes tensors (format 3.0)

def repeated_rows_model() -> onnx.ModelProto:
    """An output layer whose rows repeat (classes trained alike, as a recogniser's rare characters): zstd on the
    byte planes finds the repeats, which order-0 Huffman codes cannot; about 37% of the bytes, where LZMA takes 48%."""
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((48, 256)).astype(np.float32)[rng.integers(0, 48, 512)]
    rows[::3] += rng.standard_normal((len(rows[::3]), 256)).astype(np.float32)
    return identity_model([numpy_helper.from_array(rows, "classifier"),
                           numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "dense")])


@pytest.mark.parametrize("external", [False, True], ids=["in-memory", "streamed"])
def test_repeated_rows_are_coded_as_zstd_planes_and_round_trip(tmp_path, external):
    model = repeated_rows_model()
    expected = [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="m.onnx.data", size_threshold=0)
    report = api.pack(path, tmp_path / "m.shrink")
    coded = {t.name: t for t in report.tensors}
    assert coded["classifier"].encoding == "zstd-planes" and coded["dense"].encoding == "planes"
    assert coded["classifier"].bytes_after < 0.4 * coded["classifier"].bytes_before
    assert coded["classifier"].coded_bits < coded["classifier"].entropy_bits  # below what Huffman can reach
    assert (tmp_path / "m.shrink").read_bytes()[8:12] == bytes([3, 0, 0, 0])
    api.unpack(tmp_path / "m.shrink", tmp_path / "back.onnx")
    back = onnx.load(str(tmp_path / "back.onnx"))  # external data read from back.onnx.data where it was written
    assert [numpy_helper.to_array(t).tobytes() for t in back.graph.initializer] == expected


def zstd_planes_record(pack: bytes):
    return next((r, meta, length) for r, meta, length in tensor_records(pack) if meta["enc"] == "zstd-planes")


def test_a_zstd_planes_frame_that_lies_about_its_size_is_refused_before_allocating(tmp_path):
    import tracemalloc

    import zstandard

    path = save_model(repeated_rows_model(), tmp_path / "m.onnx")
    api.pack(path, tmp_path / "m.shrink")
    pack = (tmp_path / "m.shrink").read_bytes()
    record, meta, length = zstd_planes_record(pack)
    description, frame = bytes(record.body[:length]), bytes(record.body[length:])

    def with_frame(new: bytes) -> bytes:
        changed = container.join_meta({**meta, "streams": [{"c": meta["n"], "b": len(new)}]})
        return with_body(pack, record, changed + new)

    assert unpack_model(with_frame(frame)).SerializeToString() == onnx.load(str(path)).SerializeToString()
    where = f"tensor record at byte {record.offset}"
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    cases = [(bomb, "zstd frame states 1073741824 bytes, not the 524288 its description declares"),
             (frame[:-7], "does not decode \\(zstd: "),
             (frame + b"\0" * 3, "does not decode \\(zstd: .*unused data"),
             (zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(meta["n"])), "states no size"),
             (b"\0" * 16, "is not a zstd frame")]
    for new, message in cases:
        with pytest.raises(container.CorruptPack, match=f"{where}.*{message}") as error:
            unpack_model(with_frame(new))
        assert "\n" not in str(error.value)
    tracemalloc.start()
    try:
        with pytest.raises(container.CorruptPack):
            unpack_model(with_frame(bomb))
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    shared = container.join_meta({**meta, "streams": [{"c": meta["n"], "b": len(frame), "t": 0}]})
    with pytest.raises(container.CorruptPack, match=f"{where} has 1 stream.* not one zstd frame of 524288 bytes"):
        unpack_model(with_body(pack, record, shared + frame))
    assert description  # the record's own description was read back above
