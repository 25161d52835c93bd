"""Hostile packs: files with valid CRCs whose declared sizes, JSON and graph lie (issue 18, items 2, 3, 6, 11).

Each crafted pack is written with the container's own Writer, so every record's CRC is right and only the
reader's checks stand between the file and an allocation, a traceback or a model written outside its folder.
Bombs declare sizes far past any memory (2^40 elements and more): unfixed code fails at once with a
MemoryError, never by swapping, and the fixed reader refuses them before allocating anything.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import tracemalloc

import numpy as np
import onnx
import pytest
import zstandard
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from conftest import build_model, invoke, save_model, tree
from onnxshrink import api, packing
from onnxshrink.codec import container, huffman
from onnxshrink.codec.container import CorruptPack
from onnxshrink.errors import ModelLoadError
from onnxshrink.packing import unpack_model
from test_pack_format import as_lzma_2_0, as_version_1, as_zstd_3_0, every_kind

FAST_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": 8 << 20}]  # decodable with GRAPH_FILTERS


# ---------------------------------------------------------------- crafting packs

def slot_model(dims=(64, 64), data_type=TensorProto.FLOAT, location=None) -> onnx.ModelProto:
    """A graph whose one initializer `w` has no data (a record is to fill it), or external data at `location`."""
    w = TensorProto(name="w", data_type=data_type, dims=list(dims))
    if location is not None:
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", data_type, list(dims))], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def craft(model=None, tensors=(), *, header=None, graph=None, end=None, codec=packing.GRAPH_CODEC) -> bytes:
    """A pack with valid CRCs: the header (overridden by `header`), the graph record (`model`, coded with `codec`,
    or the raw body `graph`), tensor records from (description, streams) pairs, and an end record (or the body `end`)."""
    out = io.BytesIO()
    writer = container.Writer(out)
    fields = {"format": packing.FORMAT_NAME, "producer": "test", "tensors": len(tensors), "tables": 0,
              "graph_codec": codec}
    if model is not None:
        fields["graph_bytes"] = model.ByteSize()
        graph = (zstandard.ZstdCompressor(level=1).compress(model.SerializeToString()) if codec == packing.ZSTD_CODEC
                 else lzma.compress(model.SerializeToString(), format=lzma.FORMAT_RAW, filters=FAST_LZMA))
    fields.update(header or {})
    writer.json_record(container.HEADER, {k: v for k, v in fields.items() if v is not None})
    writer.record(container.GRAPH, graph)
    for meta, streams in tensors:
        writer.record(container.TENSOR, container.join_meta(meta), *streams)
    if end is None:
        writer.close()
    else:
        writer.record(container.END, end)
    return out.getvalue()


def coded(symbols, alphabet=256) -> tuple[dict, bytes]:
    """A stream with its own table, as pack writes one: its description entry and its bytes."""
    symbols = np.asarray(symbols, np.uint8)
    table = huffman.Table.from_counts(np.bincount(symbols, minlength=alphabet))
    data = table.to_bytes() + huffman.encode_with(table, symbols)
    return {"c": len(symbols), "b": len(data)}, data


def all_background(n: int, k: int = 4) -> tuple[dict, list]:
    """A `sparse` record of `n` bytes, every element the zero background: a few dozen bytes for any `n`."""
    streams = [coded([]) for _ in range(k + 1)]
    meta = {"i": 0, "n": n, "k": k, "sha": bytes(8), "enc": "sparse", "bg": bytes(k), "nnz": 0, "vals": "planes",
            "streams": [entry for entry, _ in streams]}
    return meta, [data for _, data in streams]


def refused(data: bytes, match: str) -> str:
    with pytest.raises(CorruptPack, match=match) as error:
        unpack_model(data)
    assert "\n" not in str(error.value)
    return str(error.value)


def traced_peak(work) -> int:
    """Peak bytes Python and numpy allocated while `work()` ran (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        work()
    except (CorruptPack, ModelLoadError):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A real pack with every encoding, shared tables and a float_data Constant, and the model it holds."""
    folder = tmp_path_factory.mktemp("hostile")
    path = save_model(every_kind(), folder / "m.onnx")
    api.pack(path, folder / "m.shrink")
    return onnx.load(str(path)), (folder / "m.shrink").read_bytes()


# ---------------------------------------------------------------- item 2: declared sizes

def test_a_record_larger_than_its_graph_tensor_is_refused_before_allocating():
    """297 bytes once made a [64, 64] tensor of 134 M floats; a declared 4 TiB exited 70 (MemoryError)."""
    refused(craft(slot_model(), [all_background(4 << 40)]),
            r"tensor record at byte \d+ declares 4398046511104 bytes; "
            r"tensor 'w' of the graph \(float \[64, 64\]\) holds 16384")
    half_gib = craft(slot_model(), [all_background(1 << 29)])
    assert traced_peak(lambda: unpack_model(half_gib)) < 16 << 20  # LZMA's 8 MiB dictionary; was 512 MiB more


def test_sizes_follow_the_graph_tensor_type_packed_and_float_data():
    def slot(data_type, dims):
        return TensorProto(name="t", data_type=data_type, dims=dims)

    assert packing.declared_bytes(slot(TensorProto.INT4, [63])) == 32
    assert packing.declared_bytes(slot(TensorProto.UINT2, [5])) == 2
    assert packing.declared_bytes(slot(TensorProto.FLOAT6E2M3, [3])) == 3
    assert packing.declared_bytes(slot(TensorProto.FLOAT16, [3, 5])) == 30
    assert packing.declared_bytes(slot(TensorProto.FLOAT, [7]), float_data=True) == 28
    assert packing.declared_bytes(slot(TensorProto.INT8, [7]), float_data=True) is None
    assert packing.declared_bytes(slot(TensorProto.STRING, [2])) is None
    assert packing.declared_bytes(slot(TensorProto.FLOAT, [-1, 4])) is None
    assert packing.declared_bytes(slot(TensorProto.FLOAT, [-2, -3])) is None
    refused(craft(slot_model((63,), TensorProto.INT4), [all_background(64, k=1)]),
            r"declares 64 bytes; tensor 'w' of the graph \(int4 \[63\]\) holds 32")
    refused(craft(slot_model((2, 2), TensorProto.STRING), [all_background(8, k=1)]),
            r"declares 8 bytes; tensor 'w' of the graph \(string \[2, 2\]\) holds None")


def test_a_float_data_record_of_the_wrong_size_is_refused(kinds):
    """The float_data path turned every declared float into a Python float (24 bytes each) before any check."""
    _, pack = kinds
    record = next(r for r in container.read_records(pack)
                  if r.kind == container.TENSOR and container.split_meta(r)[0].get("field") == "float_data")
    meta, streams = container.split_meta(record)
    meta["n"] *= 2
    meta["streams"] = [{**s, "c": s["c"] * 2} for s in meta["streams"]]
    body = container.join_meta(meta) + bytes(streams)
    refused(replace_record(pack, record, body),
            rf"declares {meta['n']} bytes; tensor 'typed' of the graph \(float \[64, 32\]\) holds {meta['n'] // 2}")


def test_stream_counts_must_follow_from_the_description(kinds):
    _, pack = kinds
    record = next(r for r in container.read_records(pack)
                  if r.kind == container.TENSOR and container.split_meta(r)[0]["enc"] == "planes")
    meta, streams = container.split_meta(record)
    meta["streams"][0]["c"] += 1
    refused(replace_record(pack, record, container.join_meta(meta) + bytes(streams)),
            rf"has {len(meta['streams'])} stream\(s\) of .* symbols, not what {meta['n']} bytes coded as planes take")
    meta["streams"][0]["c"] -= 1
    meta["streams"][0]["b"] += 1
    refused(replace_record(pack, record, container.join_meta(meta) + bytes(streams)), "streams do not fill it")


def test_a_pack_without_external_data_restores_at_most_2_gib():
    """The graph may declare any dims; an all-background record codes any size in a few bytes. A pack of one
    protobuf cannot restore more than 2 GiB: refused before the 4 TiB are allocated (was exit 70)."""
    refused(craft(slot_model((1 << 40,)), [all_background(4 << 40)]),
            r"the tensors pass 2147483648 bytes, more than a pack without external data can restore")


def test_a_tensor_beyond_memory_in_an_external_pack_is_refused_not_a_crash():
    """External packs restore tensors of any size their graph declares; 2^60 bytes fit in no memory (exit 70)."""
    refused(craft(slot_model((1 << 58,)), [all_background(1 << 60)], header={"external_data": True}),
            r"its 1152921504606846976 bytes do not fit in memory")


def test_the_graph_record_decodes_to_no_more_than_its_header_declares():
    """A 469 KB record once reached 3.1 GiB: the output is bounded by `graph_bytes`, checked as it decodes."""
    model = slot_model()
    model.doc_string = "a" * (64 << 20)
    bomb = lzma.compress(model.SerializeToString(), format=lzma.FORMAT_RAW, filters=FAST_LZMA)
    declared = slot_model().ByteSize()
    pack = craft(graph=bomb, header={"graph_bytes": declared})
    refused(pack, f"the graph record decodes to more than the {declared} bytes its header declares")
    assert traced_peak(lambda: unpack_model(pack)) < 16 << 20  # was 64 MiB more
    refused(craft(graph=bomb, header={"graph_bytes": (64 << 20) + 1000}), "decodes to .* bytes, not the")


def test_a_pack_without_graph_bytes_is_bounded_by_what_one_protobuf_holds(monkeypatch, kinds):
    """Packs written before `graph_bytes` (LZMA graphs) still read; their graph is bounded by protobuf's 2 GiB."""
    model, pack = kinds
    header_record = next(container.read_records(pack))
    header = container.parse_json(header_record)
    assert header["graph_bytes"] > 0
    del header["graph_bytes"]
    old = replace_record(pack, header_record, json.dumps(header).encode())
    assert unpack_model(old).SerializeToString() == model.SerializeToString()
    monkeypatch.setattr(packing, "MAX_GRAPH_BYTES", 1 << 20)
    bomb = lzma.compress(b"\0" * (4 << 20), format=lzma.FORMAT_RAW, filters=FAST_LZMA)
    refused(craft(graph=bomb), "the graph record decodes to more than what one protobuf holds")


def zstd_frame(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


def test_a_zstd_graph_record_round_trips_and_its_stated_size_is_checked_before_allocating(tmp_path):
    """zstandard allocates whatever size a frame states (and ignores max_output_size then): a 300-byte frame
    stating 1 GiB of zeros would take 1 GiB. The stated size must be the header's, itself at most 2 GiB."""
    model = slot_model()
    model.graph.initializer[0].raw_data = bytes(64 * 64 * 4)
    assert unpack_model(craft(model, codec="zstd")).SerializeToString() == model.SerializeToString()
    bomb = zstd_frame(bytes(1 << 30))
    assert len(bomb) < 64 << 10
    pack = craft(graph=bomb, codec="zstd", header={"graph_bytes": model.ByteSize()})
    refused(pack, f"the graph record's zstd frame states 1073741824 bytes, not the {model.ByteSize()} its header")
    assert traced_peak(lambda: unpack_model(pack)) < 16 << 20


@pytest.mark.parametrize("damage, message", [
    (lambda frame, _: frame[:-5], "does not decode \\(zstd: "),  # truncated: the frame ends early
    (lambda frame, _: frame + b"\0\0\0\0", "does not decode \\(zstd: .*unused data"),
    (lambda _, data: zstd_frame(data, content_size=False), "zstd frame states no size, not the \\d+ its header"),
    (lambda _, data: zstd_frame(data + b"\0"), "zstd frame states \\d+ bytes, not the \\d+ its header"),
    (lambda frame, _: b"\x29\xb5" + frame[2:], "the graph record is not a zstd frame"),
    (lambda frame, _: b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + frame, "not the \\d+ its header"),
    (lambda _, data: lzma.compress(data, format=lzma.FORMAT_RAW, filters=FAST_LZMA), "not a zstd frame"),
])
def test_a_damaged_zstd_graph_record_is_refused_in_one_line(damage, message):
    model = slot_model()
    data = model.SerializeToString()
    refused(craft(graph=damage(zstd_frame(data), data), codec="zstd", header={"graph_bytes": len(data)}), message)


def wide_window_frame(data: bytes) -> bytes:
    """A valid zstd frame of `data` (one raw block) whose header asks for a 2 GiB window: magic, frame header
    descriptor 0x80 (4-byte content size, not single-segment), window descriptor 0xA8 (2^31), the size, the block."""
    block = (len(data) << 3 | 1).to_bytes(3, "little")  # raw block, the last
    return b"\x28\xb5\x2f\xfd" + bytes([0x80, 0xA8]) + len(data).to_bytes(4, "little") + block + data


def test_a_zstd_graph_needs_graph_bytes_and_a_bounded_window():
    data = slot_model().SerializeToString()
    refused(craft(graph=zstd_frame(data), codec="zstd"), "names the zstd graph codec without 'graph_bytes'")
    frame = wide_window_frame(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data  # a frame zstd reads, given the memory
    refused(craft(graph=frame, codec="zstd", header={"graph_bytes": len(data)}),
            "the graph record's zstd frame needs a 2147483648-byte window")


def test_cli_refuses_a_zstd_bomb_with_exit_3_and_writes_nothing(runner, tmp_path):
    (tmp_path / "bomb.shrink").write_bytes(craft(graph=zstd_frame(bytes(1 << 28)), codec="zstd",
                                                 header={"graph_bytes": slot_model().ByteSize()}))
    before = tree(tmp_path)
    for args in (["unpack", "bomb.shrink", "-o", "out.onnx"], ["inspect", "bomb.shrink"]):
        result = invoke(runner, *[tmp_path / a if a.endswith(("shrink", "onnx")) else a for a in args])
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith(f"error: {tmp_path / 'bomb.shrink'}: corrupted pack (the graph record's zstd")
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert tree(tmp_path) == before


@pytest.mark.parametrize("field, value", [("graph_bytes", -1), ("graph_bytes", "63"), ("graph_bytes", 1 << 40),
                                          ("tensors", "1"), ("tables", None), ("tables", True),
                                          ("external_data", "yes"), ("graph_codec", ["x"])])
def test_header_fields_of_the_wrong_type_are_refused(field, value):
    refused(craft(slot_model(), header={field: value}), f"header('s '{field}' is| names graph codec)")  # None: absent


def test_cli_refuses_bombs_with_exit_3_and_writes_nothing(runner, tmp_path):
    (tmp_path / "bomb.shrink").write_bytes(craft(slot_model(), [all_background(4 << 40)]))
    before = tree(tmp_path)
    for args in (["unpack", "bomb.shrink", "-o", "out.onnx"], ["inspect", "bomb.shrink"]):
        result = invoke(runner, *[tmp_path / a if a.endswith(("shrink", "onnx")) else a for a in args])
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith(f"error: {tmp_path / 'bomb.shrink'}: corrupted pack (tensor record at byte")
        assert "declares 4398046511104 bytes" in result.stderr and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- item 6: framing JSON

@pytest.mark.parametrize("end, message", [
    (b"", "end record at byte \\d+ is not valid JSON"),
    (b"[1]", "end record at byte \\d+ is not a JSON object"),
    (b"[" * 30000 + b"]" * 30000, "end record at byte \\d+ nests its JSON too deeply"),
    (b" " * (70 << 10) + b"{}", "holds 71682 bytes of JSON, more than the 65536 a pack writes"),
    (b'{"records": "3"}', "the end record at byte \\d+ has no record count"),
    (b'{"records": true}', "the end record at byte \\d+ has no record count"),
])
def test_a_malformed_end_record_is_refused(end, message):
    """Were JSONDecodeError, AttributeError and RecursionError: exit 70."""
    refused(craft(slot_model(), end=end), message)


def test_deeply_nested_json_in_the_header_is_refused():
    deep = json.dumps({"producer": 1})[:-1] + ', "x": ' + "[" * 30000 + "]" * 30000 + "}"
    refused(replace_header(craft(slot_model()), deep.encode()), "header record at byte 12 nests its JSON too deeply")


def test_a_version_1_description_is_type_checked(kinds):
    _, pack = kinds
    old = as_version_1(pack)
    record = next(r for r in container.read_records(old)
                  if r.kind == container.TENSOR and b'"enc":"sparse"' in bytes(r.body))
    (length,) = container.JSON_LENGTH.unpack_from(record.body)
    text, streams = json.loads(bytes(record.body[4 : 4 + length])), bytes(record.body[4 + length :])
    deep = json.dumps(text)[:-1].encode() + b',"deep":' + b"[" * 30000 + b"]" * 30000 + b"}"
    for key, value in [("n", "4096"), ("k", 0), ("nnz", 1 << 40), ("streams", {"c": 1}), ("streams", [[1]]),
                       ("vals", ["planes"]), ("enc", 2), ("bg", 0), ("field", "int64_data"), ("sha", 12),
                       ("streams", [{"c": -1, "b": 0}]), ("n", 1.5), ("k", True), ("deep", None)]:
        changed = deep if key == "deep" else json.dumps({**text, key: value}).encode()
        body = container.JSON_LENGTH.pack(len(changed)) + changed + streams
        with pytest.raises(CorruptPack, match=f"tensor record at byte {record.offset} ") as error:
            unpack_model(replace_record(old, record, body))
        assert "\n" not in str(error.value), key


# ---------------------------------------------------------------- item 11: external data outside the folder

OUTSIDE = ["../../x.bin", "/etc/passwd", "sub/../../x.bin", "..\\x.bin", "C:\\x.bin", "", "."]


@pytest.mark.parametrize("location", OUTSIDE)
def test_a_streamed_unpack_refuses_external_data_outside_the_folder(tmp_path, location):
    """unpack of a pack that kept its weights external wrote such a model and exited 0."""
    pack = tmp_path / "p.shrink"
    pack.write_bytes(craft(slot_model(location=location), header={"external_data": True}))
    before = tree(tmp_path)
    message = f"p.shrink: corrupted pack (the graph's tensor 'w' keeps its data at {location!r}, outside the model's"
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        api.unpack(pack, tmp_path / "out.onnx")
    assert tree(tmp_path) == before


def test_in_memory_unpack_and_inspect_refuse_external_data_outside_the_folder(runner, tmp_path):
    (tmp_path / "p.shrink").write_bytes(craft(slot_model(location="../../x.bin")))
    before = tree(tmp_path)
    with pytest.raises(ModelLoadError, match=r"keeps its data at '\.\./\.\./x\.bin', outside the model's folder"):
        onnxshrink.load(tmp_path / "p.shrink")
    for args in (["unpack", tmp_path / "p.shrink", "-o", tmp_path / "out.onnx"], ["inspect", tmp_path / "p.shrink"]):
        result = invoke(runner, *args)
        assert result.exit_code == 3 and "keeps its data at '../../x.bin', outside the model's folder" in result.stderr
    assert tree(tmp_path) == before


def test_a_location_inside_the_folder_still_decodes():
    model = unpack_model(craft(slot_model(location="sub/../w.bin")))
    assert model.graph.initializer[0].external_data[0].value == "sub/../w.bin"


# ---------------------------------------------------------------- item 3: graphs that would pass 2 GiB

def tiled_model(tensors=3) -> onnx.ModelProto:
    """Tensors of one random 1 KiB row repeated 64 times: LZMA codes them far better than Huffman can."""
    rng = np.random.default_rng(5)
    arrays = [np.tile(rng.standard_normal(256).astype(np.float32), (64, 1)) for _ in range(tensors)]
    inits = [numpy_helper.from_array(a, f"t{i}") for i, a in enumerate(arrays)]
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in inits]
    outputs = [helper.make_tensor_value_info(t.name + "_out", TensorProto.FLOAT, [64, 256]) for t in inits]
    return build_model(nodes, [], outputs, inits)


def graph_bytes(pack: bytes) -> int:
    records = container.read_records(pack)
    header = container.parse_json(next(records))
    assert packing._decode_graph(next(records), header).ByteSize() == header["graph_bytes"]
    return header["graph_bytes"]


@pytest.mark.parametrize("external", [False, True], ids=["in-memory", "streamed"])
def test_tensors_lzma_codes_better_get_records_when_the_graph_would_pass_the_limit(tmp_path, monkeypatch, external):
    """A 2.3 GB model of such tensors exited 70 (EncodeError: the graph record passed 2 GiB). The limit is made
    small here: the largest tensors get records until the graph record is below it, and the pack round-trips."""
    model = tiled_model()
    expected = [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="m.onnx.data", size_threshold=0)
    monkeypatch.setattr(packing, "ZSTD_PLANES_MIN", 1 << 40)  # zstd-planes codes tiles about as well as LZMA
    report = api.pack(path, tmp_path / "all_in_graph.shrink")
    assert report.tensors == [] and graph_bytes((tmp_path / "all_in_graph.shrink").read_bytes()) > 3 * 65536
    monkeypatch.setattr(packing, "GRAPH_RECORD_LIMIT", 100_000)
    report = api.pack(path, tmp_path / "m.shrink")
    assert len(report.tensors) == 2  # 3 x 64 KiB: two must leave the graph to bring it under 100 KB
    assert graph_bytes((tmp_path / "m.shrink").read_bytes()) < 100_000
    api.unpack(tmp_path / "m.shrink", tmp_path / "back.onnx")
    back = onnxshrink.load(tmp_path / "back.onnx")
    assert [numpy_helper.to_array(t).tobytes() for t in back.graph.initializer] == expected


# ---------------------------------------------------------------- the fuzzer: edits, then CRCs recomputed

FUZZ_VARIANTS = int(os.environ.get("PACK_FUZZ_VARIANTS", "200"))  # `make fuzz` runs 5000


def replace_record(pack: bytes, record: container.Record, body: bytes) -> bytes:
    """`pack` with one record's body replaced and its CRC recomputed."""
    return rebuild([(r.kind, body if r.offset == record.offset else bytes(r.body)) for r in all_records(pack)],
                   pack[:container.PREAMBLE.size])


def replace_header(pack: bytes, body: bytes) -> bytes:
    records = all_records(pack)
    rest = [(r.kind, bytes(r.body)) for r in records[1:]]
    return rebuild([(records[0].kind, body)] + rest, pack[:container.PREAMBLE.size])


def all_records(pack: bytes) -> list[container.Record]:
    """Every record, the end record included (read_records checks it and yields the others)."""
    records = list(container.read_records(pack))
    last = records[-1]
    offset = last.offset + container.RECORD_HEAD.size + len(last.body) + container.CRC.size
    kind, length = container.RECORD_HEAD.unpack_from(pack, offset)
    end = container.Record(kind, memoryview(pack)[offset + container.RECORD_HEAD.size:][:length], offset)
    return records + [end]


def rebuild(records: list[tuple[int, bytes]], preamble: bytes) -> bytes:
    """Records framed again, each with a fresh CRC: only the parser can object to what they hold."""
    out = io.BytesIO()
    writer = container.Writer(out)
    for kind, body in records:
        writer.record(kind, body)
    data = out.getvalue()
    return preamble + data[container.PREAMBLE.size:]


JSON_VALUES = [0, 1, -1, 2, 255, 1 << 31, 1 << 40, 1 << 64, 1.5, True, False, None, "", "1", "x" * 50, [], [1], {},
               {"a": 1}, "planes", "sparse", "float_data", "00" * 8]


def mutate(rng: np.random.Generator, pack: bytes) -> bytes:
    """One random edit of a record's contents or of the record sequence, CRCs recomputed."""
    preamble = pack[:container.PREAMBLE.size]
    records = [(r.kind, bytes(r.body)) for r in all_records(pack)]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    where = int(rng.integers(len(records)))
    kind, body = records[where]
    edit = pick(["json", "graph", "description", "varint", "truncate", "bytes", "duplicate", "drop", "swap", "kind"])
    if edit == "json" and kind in (container.HEADER, container.END):
        value = json.loads(body)
        value[pick(sorted(value) + ["records", "graph_bytes", "external_data"])] = pick(JSON_VALUES)
        body = json.dumps(value).encode()
    elif edit == "json" and kind == container.TENSOR and preamble[8] == 1:
        (length,) = container.JSON_LENGTH.unpack_from(body)
        text = json.loads(body[4 : 4 + length])
        key = pick(sorted(text))
        if key == "streams" and text["streams"] and rng.random() < 0.7:
            text["streams"][int(rng.integers(len(text["streams"])))][pick(["c", "b", "t"])] = pick(JSON_VALUES)
        else:
            text[key] = pick(JSON_VALUES)
        changed = json.dumps(text).encode()
        body = container.JSON_LENGTH.pack(len(changed)) + changed + body[4 + length:]
    elif edit == "graph" and kind == container.GRAPH:
        header = json.loads(records[0][1])
        model = packing._decode_graph(container.Record(kind, memoryview(body), 0), header)
        tensor = pick(packing.tensor_protos(model))
        change = pick(["dims", "type", "external", "raw"])
        if change == "dims" and len(tensor.dims):
            tensor.dims[int(rng.integers(len(tensor.dims)))] = pick([0, 1, 2, 63, 4096, 1 << 20, 1 << 40, -1])
        elif change == "type":
            tensor.data_type = pick([0, 1, 2, 3, 8, 10, 16, 21, 22, 25, 99])
        elif change == "external":
            tensor.data_location = TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=pick(OUTSIDE + ["w.bin"]))
        else:
            tensor.raw_data = b"\0" * 4
        serialized = model.SerializeToString()
        if header["graph_codec"] == packing.ZSTD_CODEC:
            body = zstandard.ZstdCompressor(level=1).compress(serialized)
        else:
            body = lzma.compress(serialized, format=lzma.FORMAT_RAW, filters=FAST_LZMA)
        if rng.random() < 0.8:  # keep the header's size right, mostly: the edit then reaches the tensor checks
            header["graph_bytes"] = len(serialized)
            records[0] = (records[0][0], json.dumps(header).encode())
    elif edit == "description" and kind == container.TENSOR and preamble[8] in (2, 3):
        record = container.Record(kind, memoryview(body), 0)
        meta, streams = container.split_meta(record)
        key = pick(["i", "n", "k", "nnz", "c", "b", "t", "enc", "field"])
        number = pick([0, 1, 2, 3, 8, 255, 4096, 1 << 20, 1 << 40, 1 << 60, (1 << 64) - 1])
        if key in ("c", "b", "t"):
            meta["streams"][int(rng.integers(len(meta["streams"])))][key] = number
        elif key == "enc":
            meta["enc"] = pick(container.ENCODINGS)
            meta.setdefault("bg", 0 if meta["enc"] == "sparse-nibbles" else bytes(meta["k"]))
            meta.setdefault("nnz", 0)
            meta.setdefault("vals", "planes")
            if meta["enc"] == "sparse-nibbles":
                meta["bg"] = 0
            elif meta["enc"] == "sparse" and not isinstance(meta["bg"], bytes):
                meta["bg"] = bytes(meta["k"])
        elif key == "field":
            if meta.pop("field", None) is None:
                meta["field"] = "float_data"
        elif key == "k":
            meta["k"] = pick([1, 2, 3, 4, 8, 255])
        else:
            meta[key] = number
        try:
            body = container.join_meta(meta) + bytes(streams)
        except (ValueError, KeyError, TypeError, OverflowError):
            return mutate(rng, pack)  # not writable as a 2.x description: try another edit
    elif edit == "varint" and kind == container.TENSOR and len(body) > 2:
        position = int(rng.integers(min(len(body), 40)))
        body = body[:position] + bytes([pick([0x00, 0x7F, 0x80, 0xFF])]) + body[position + 1:]
    elif edit == "truncate" and body:
        body = body[: int(rng.integers(len(body)))]
    elif edit == "bytes" and body:
        position = int(rng.integers(len(body)))
        body = body[:position] + bytes([int(rng.integers(256))]) + body[position + 1:]
    elif edit == "duplicate":
        records.insert(where, (kind, body))
    elif edit == "drop" and len(records) > 1:
        del records[where]
        return rebuild(records, preamble)
    elif edit == "swap":
        other = int(rng.integers(len(records)))
        records[where], records[other] = records[other], records[where]
        return rebuild(records, preamble)
    elif edit == "kind":
        kind = pick([container.HEADER, container.GRAPH, container.TABLE, container.TENSOR, container.END, 7])
    else:
        return mutate(rng, pack)
    records[where] = (kind, body)
    return rebuild(records, preamble)


def check_decoded(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """What a decoded pack may be: the packed tensors' bytes (digests matched), no more of them than were packed,
    nothing external outside the folder. (Edits of the graph record itself, a dim of a tensor it holds, decode:
    loading then refuses what the checker and onnxruntime refuse.)"""
    def data(m):
        return sum(len(t.raw_data) + 4 * len(t.float_data) for t in packing.tensor_protos(m))

    assert data(model) <= data(original) + 4
    for tensor in packing.tensor_protos(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            assert packing._inside_folder(tensor.external_data[0].value)


def test_fuzzed_packs_are_refused_or_decode_to_a_sound_model(kinds):
    """Random edits of record contents and order, each with its CRC recomputed (bit flips alone never get past
    the CRC): CorruptPack with a one-line reason, or a model that checks out; never another exception, never an
    allocation far beyond the file's declared sizes (the model holds about 150 KB of tensors)."""
    model, pack = kinds
    outcomes = fuzz(np.random.default_rng(18), [pack, as_version_1(pack), as_zstd_3_0(pack)], FUZZ_VARIANTS, model)
    assert outcomes["refused"] > FUZZ_VARIANTS // 2 and outcomes["decoded"] > 0, outcomes


def fuzz(rng: np.random.Generator, bases: list, variants: int, model: onnx.ModelProto) -> dict:
    """Unpack `variants` mutations of the packs in `bases` (in turn): each is refused in one line or decodes to a
    sound model, within 24 MiB of allocations. Counts of each outcome."""
    outcomes = {"refused": 0, "decoded": 0}
    tracemalloc.start()
    try:
        for n in range(variants):
            variant = mutate(rng, bases[n % len(bases)])
            tracemalloc.reset_peak()
            try:
                decoded = unpack_model(variant)
            except CorruptPack as exc:
                assert "\n" not in str(exc) and str(exc), n
                outcomes["refused"] += 1
            else:
                check_decoded(decoded, model)
                outcomes["decoded"] += 1
            assert tracemalloc.get_traced_memory()[1] < 24 << 20, n
    finally:
        tracemalloc.stop()
    return outcomes


def test_fuzzed_packs_exit_3_on_the_command_line(runner, tmp_path, kinds):
    _, pack = kinds
    rng = np.random.default_rng(11)
    shown = 0
    while shown < 3:
        variant = mutate(rng, pack)
        try:
            unpack_model(variant)
            continue
        except CorruptPack:
            pass
        bad = tmp_path / f"bad{shown}.shrink"
        bad.write_bytes(variant)
        before = tree(tmp_path)
        result = invoke(runner, "unpack", bad, "-o", tmp_path / "out.onnx")
        assert result.exit_code == 3 and result.stderr.startswith(f"error: {bad}: corrupted pack ("), result.output
        assert len(result.stderr.strip().splitlines()) == 1 and tree(tmp_path) == before
        shown += 1
