"""The pack decoder's fast paths (issue 15 item 6): Huffman chunks decoded four at a time, byte planes decoded
straight into a tensor's final buffer, digests checked on a thread of their own, and a session's weights decoded
into the arrays onnxruntime runs on. Each must restore the same bytes as before and refuse what it refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxshrink import api, packing, runtime
from onnxshrink import model as model_io
from onnxshrink.cli import app
from onnxshrink.codec import container, huffman
from onnxshrink.errors import ModelLoadError
from test_pack_format import every_kind, tensor_records, with_body


def _payload(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    symbols = np.minimum(rng.geometric(0.08, count), 255).astype(np.uint8)  # skewed: codes of several lengths
    table = huffman.Table.from_counts(np.bincount(symbols, minlength=256))
    return symbols, table, huffman.encode_with(table, symbols)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_chunk_count_decodes_alike_in_four_lanes(monkeypatch, threads):
    """1 to 9 chunks of 2**16 symbols, the last one short: whole groups of four lanes, a partial group, a lone chunk,
    split across 1 to 3 threads."""
    monkeypatch.setattr(huffman, "_threads", lambda: threads)
    chunk = 1 << huffman.CHUNK_LOG
    for chunks in range(1, 10):
        symbols, table, payload = _payload(chunks * chunk - 5, seed=chunks)
        np.testing.assert_array_equal(huffman.decode_with(table, payload, symbols.size), symbols)


@pytest.mark.parametrize("bad_chunk", [0, 2, 3, 5])
def test_a_damaged_chunk_in_any_lane_is_refused_by_number(bad_chunk):
    chunk = 1 << huffman.CHUNK_LOG
    symbols, table, payload = _payload(6 * chunk)
    header = 1 + 4 * 5
    words = np.frombuffer(payload[1:header], "<u4").astype(np.int64)
    start = header + 8 * int(words[:bad_chunk].sum())
    end = header + 8 * int(words[: bad_chunk + 1].sum()) if bad_chunk < 5 else len(payload)
    damaged = payload[:start] + bytes(end - start) + payload[end:]
    with pytest.raises(huffman.CorruptStream, match=f"in chunk {bad_chunk}$"):
        huffman.decode_with(table, damaged, symbols.size)


def test_decode_with_fills_one_byte_plane_of_a_buffer_in_place():
    symbols, table, payload = _payload(3 * (1 << huffman.CHUNK_LOG) + 7)
    buffer = np.full(4 * symbols.size, 0xAB, np.uint8)
    plane = buffer.reshape(-1, 4)[:, 2]
    assert huffman.decode_with(table, payload, symbols.size, out=plane) is plane
    np.testing.assert_array_equal(buffer.reshape(-1, 4)[:, 2], symbols)
    assert (buffer.reshape(-1, 4)[:, [0, 1, 3]] == 0xAB).all()
    with pytest.raises(ValueError, match="writable 1-D uint8 array"):
        huffman.decode_with(table, payload, symbols.size, out=np.empty(symbols.size - 1, np.uint8))


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    model = every_kind()
    onnx.save(model, str(folder / "m.onnx"))
    api.pack(folder / "m.onnx", folder / "m.shrink")
    return model, (folder / "m.shrink").read_bytes()


def test_placed_tensors_decode_to_their_bytes_and_leave_the_graph_without_them(kinds):
    """Every encoding (planes of fp32, fp16, int8, nibbles, sparse, sparse-nibbles) decoded into caller-given buffers
    holds the bytes the plain decode puts in raw_data; float_data tensors are never placed."""
    model, pack = kinds
    placed = {}

    def place(decoded, index, tensor):
        placed[index] = np.full(packing.declared_bytes(tensor), 0x5A, np.uint8)
        return placed[index]

    with_arrays = packing.unpack_model(pack, place)
    plain = packing.unpack_model(pack)
    slots, plain_slots = packing.tensor_protos(with_arrays), packing.tensor_protos(plain)
    encodings = {meta["enc"] for _, meta, _ in tensor_records(pack)}
    assert {"planes", "nibbles", "sparse", "sparse-nibbles"} <= encodings and len(placed) >= 8
    for index, array in placed.items():
        assert array.tobytes() == plain_slots[index].raw_data and not slots[index].HasField("raw_data")
    assert all(not slots[i].float_data for i in placed)
    assert plain.SerializeToString() == model.SerializeToString()


def _damaged_digests(pack: bytes, how_many: int) -> tuple[bytes, list[int]]:
    """The pack with the SHA-256 prefix of its first `how_many` tensor records changed (CRCs recomputed)."""
    offsets = []
    for _ in range(how_many):
        record, meta, _ = next((r, m, n) for r, m, n in tensor_records(pack) if r.offset not in offsets)
        body = bytearray(record.body)
        at = bytes(body).index(meta["sha"])
        body[at] ^= 0xFF
        pack = with_body(pack, record, bytes(body))
        offsets.append(record.offset)
    return pack, offsets


@pytest.mark.parametrize("place", [None, lambda model, index, tensor: np.empty(packing.declared_bytes(tensor), np.uint8)])
def test_the_first_tensor_that_does_not_check_out_is_named_though_digests_are_checked_ahead(kinds, place):
    _, pack = kinds
    damaged, offsets = _damaged_digests(pack, 2)
    with pytest.raises(container.CorruptPack, match=f"tensor record at byte {min(offsets)} decodes to different"):
        packing.unpack_model(damaged, place)


def _mlp_pack(tmp_path):
    from conftest import make_mlp

    onnx.save(make_mlp(widths=(64, 256, 256, 10), seed=3), str(tmp_path / "mlp.onnx"))  # 64 KiB weights: arrays
    api.pack(tmp_path / "mlp.onnx", tmp_path / "mlp.shrink")
    return tmp_path / "mlp.shrink"


def test_a_session_decodes_weights_straight_into_the_arrays_onnxruntime_runs_on(tmp_path):
    path = _mlp_pack(tmp_path)
    original = onnx.load(str(tmp_path / "mlp.onnx"))
    source = model_io.session_source(path)
    assert isinstance(source, runtime.InMemoryModel) and source.weights
    for tensor in original.graph.initializer:
        if tensor.name in source.weights:
            array = source.weights[tensor.name]
            assert array.flags.owndata and array.flags.writeable  # decoded in place, not a view of bytes
            np.testing.assert_array_equal(array, onnx.numpy_helper.to_array(tensor))


def test_a_corrupted_weight_is_still_refused_with_exit_code_3(tmp_path):
    path = _mlp_pack(tmp_path)
    pack = path.read_bytes()
    record, meta, length = max(tensor_records(pack), key=lambda r: r[1]["n"])
    body = bytearray(record.body)
    body[length + len(body[length:]) // 2] ^= 0x10  # one payload bit, CRC recomputed: only the digest can tell
    (tmp_path / "bad.shrink").write_bytes(with_body(pack, record, bytes(body)))
    with pytest.raises(ModelLoadError, match="corrupted pack"):
        model_io.session_source(tmp_path / "bad.shrink")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "bad.shrink")])
    assert result.exit_code == 3, result.output


@pytest.mark.parametrize("count", [100, 1 << 14, 40_000, (1 << 16) + 1, 200_000, (4 << 16) - 1, 4 << 16, 3_000_000])
def test_short_streams_are_cut_into_chunks_enough_for_four_lanes(count):
    """A stream of fewer than four 2**16-symbol chunks used to be decoded one chain at a time, at about a third
    of the speed of four lanes (ddddocr common_det: most of its streams). Now it gets at least four chunks where it
    holds four of 2**12 symbols, never shorter ones, and decodes alike."""
    log = huffman.chunk_log(count)
    chunks = -(-count // (1 << log))
    assert huffman.LANE_CHUNK_LOG <= log <= huffman.CHUNK_LOG
    if count >= 4 << huffman.LANE_CHUNK_LOG:
        assert chunks >= 4
    if count >= 4 << huffman.CHUNK_LOG:
        assert log == huffman.CHUNK_LOG
    symbols, table, payload = _payload(count, seed=count % 97)
    assert payload[0] == log
    np.testing.assert_array_equal(huffman.decode_with(table, payload, count), symbols)


@pytest.mark.parametrize("n_items", range(1, 20))
def test_threads_take_whole_groups_of_lanes(monkeypatch, n_items):
    """Five chunks on two threads were split 2 + 3, and each thread ran its chunks one chain at a time."""
    monkeypatch.setattr(huffman, "_threads", lambda: 2)
    slices = huffman._in_parallel(lambda lo, hi: (lo, hi), n_items, grain=4)
    assert [lo for lo, _ in slices][0] == 0 and slices[-1][1] == n_items
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    assert all(lo % 4 == 0 for lo, _ in slices)
