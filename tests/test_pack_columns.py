"""`zstd-columns` tensors (format 3.1): the large tensors LZMA would keep in the graph record (an STFT basis)
coded as zstd frames of their columns' byte planes, a sine basis with its cosines as the zstd prefix, so that
they decode at zstd's speed instead of LZMA's (issue 15 item 6); and a reader that refuses what does not
check out in one line, bounded on hostile bytes."""

from __future__ import annotations

import lzma
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zstandard
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from conftest import build_model, invoke, save_model, tree
from onnxshrink import api, packing
from onnxshrink.codec import container
from onnxshrink.codec.container import CorruptPack
from onnxshrink.packing import unpack_model
from test_pack_format import as_version_1, sines_model, tensor_records, with_body
from test_pack_hostile import fuzz


def stft_model(n: int = 256, window: int = 200) -> onnx.ModelProto:
    """An STFT front end as audio models export it: Conv weights [n/2 + 1, 1, n] of a zero-padded Hann window
    times cosines and (negated) sines. LZMA on the graph codes the pair in 17% of its bytes, order-0 Huffman in 83%."""
    pad = (n - window) // 2
    w = np.zeros(n)
    w[pad : pad + window] = np.hanning(window + 1)[:-1]
    k, t = np.arange(n // 2 + 1)[:, None], np.arange(n)
    real = (w * np.cos(2 * np.pi * k * t / n)).astype(np.float32)[:, None, :]
    imag = (-w * np.sin(2 * np.pi * k * t / n)).astype(np.float32)[:, None, :]
    tensors = [numpy_helper.from_array(real, "stft.real"), numpy_helper.from_array(imag, "stft.imag")]
    nodes = [helper.make_node("Conv", ["x", t.name], [t.name + "_out"]) for t in tensors]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1024])
    outputs = [helper.make_tensor_value_info(t.name + "_out", TensorProto.FLOAT, [1, n // 2 + 1, 1024 - n + 1])
               for t in tensors]
    return build_model(nodes, [x], outputs, tensors)


@pytest.fixture(scope="module")
def stft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("columns")
    path = save_model(stft_model(), folder / "stft.onnx")
    report = api.pack(path, folder / "stft.shrink")
    return path, report, (folder / "stft.shrink").read_bytes()


def columns_records(pack: bytes):
    return [(r, meta, length) for r, meta, length in tensor_records(pack) if meta["enc"] == "zstd-columns"]


def test_an_stft_basis_leaves_the_graph_as_columns_and_round_trips(stft, tmp_path):
    path, report, pack = stft
    model = onnx.load(str(path))
    coded = {t.name: t for t in report.tensors}
    assert coded["stft.real"].encoding == coded["stft.imag"].encoding == "zstd-columns"
    (_, real, _), (_, imag, _) = columns_records(pack)
    assert (real["rows"], real["prefix"], imag["rows"], imag["prefix"]) == (129, 0, 129, 1)
    assert coded["stft.imag"].bytes_after < 0.4 * coded["stft.real"].bytes_after  # the cosines are its prefix
    assert pack[8:12] == bytes([3, 0, 1, 0])
    whole = lzma.compress(model.SerializeToString(), format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS)
    assert len(pack) < len(whole)  # what the pack held before: no record, the whole model in LZMA
    assert unpack_model(pack).SerializeToString() == model.SerializeToString()
    api.unpack(path.with_suffix(".shrink"), tmp_path / "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == path.read_bytes()
    x = {"x": np.random.default_rng(0).standard_normal((1, 1, 1024)).astype(np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    got = onnxshrink.session(path.with_suffix(".shrink")).run(None, x)  # each weight decoded into its array
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_a_streamed_pack_writes_the_same_bytes(stft, tmp_path):
    path, _, pack = stft
    external = tmp_path / "m.onnx"
    onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    api.pack(external, tmp_path / "m.shrink")
    streamed = (tmp_path / "m.shrink").read_bytes()
    assert [bytes(r.body) for r, _, _ in tensor_records(streamed)] == [bytes(r.body) for r, _, _ in tensor_records(pack)]
    (tmp_path / "out").mkdir()
    api.unpack(tmp_path / "m.shrink", tmp_path / "out" / "u.onnx")
    back = onnx.load(str(tmp_path / "out" / "u.onnx"))
    assert [numpy_helper.to_array(t).tobytes() for t in back.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer]


def test_favor_load_takes_columns_within_the_slack_and_favor_size_only_when_smaller(tmp_path, monkeypatch):
    """A plain cosine basis (no window): zstd-columns is 17% larger than LZMA on it, so both favors keep the graph;
    with a slack of half the pack, favor=load takes the record and favor=size still does not."""
    path = save_model(sines_model(), tmp_path / "sines.onnx")
    for slack, favor, expected in ((packing.ZSTD_SLACK, "load", []), (0.5, "load", ["zstd-columns"]),
                                   (0.5, "size", [])):
        monkeypatch.setattr(packing, "ZSTD_SLACK", slack)
        report = api.pack(path, tmp_path / "s.shrink", force=True, favor=favor)
        assert [t.encoding for t in report.tensors] == expected, (slack, favor)
        assert api.load(tmp_path / "s.shrink").SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_a_tensor_lzma_codes_a_little_better_gets_a_record(tmp_path, monkeypatch):
    """ddddocr's `common_old`: LZMA coded its 2 MB LSTM weight 0.07% smaller than Huffman, so it stayed in the graph
    and took 0.13 s of a 0.2 s load at 15 MB/s. Any layout within the slack of the smaller one now takes the record."""
    rng = np.random.default_rng(5)
    weight = np.clip(rng.standard_normal((256, 512)) * 30, -127, 127).astype(np.int8)
    model = build_model([helper.make_node("Identity", ["w"], ["y"])], [],
                        [helper.make_tensor_value_info("y", TensorProto.INT8, [256, 512])],
                        [numpy_helper.from_array(weight, "w")])
    path = save_model(model, tmp_path / "m.onnx")
    assert [t.name for t in api.pack(path, tmp_path / "a.shrink").tensors] == ["w"]
    held = packing._size_in_graph
    monkeypatch.setattr(packing, "_size_in_graph", lambda data: held(data) // 2)  # LZMA "wins" by half
    report = api.pack(path, tmp_path / "b.shrink")
    assert [t.name for t in report.tensors] == ["w"]  # the whole layout's size shows otherwise
    assert (tmp_path / "b.shrink").stat().st_size <= (tmp_path / "a.shrink").stat().st_size * (1 + packing.ZSTD_SLACK)
    assert api.load(tmp_path / "b.shrink").SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------- hostile records

def with_description(pack: bytes, which: int, **changes) -> bytes:
    record, meta, length = columns_records(pack)[which]
    return with_body(pack, record, container.join_meta({**meta, **changes}) + bytes(record.body[length:]))


@pytest.mark.parametrize("which, changes, message", [
    (0, {"prefix": 1}, "takes a prefix, but the record before it is no zstd-columns record"),
    (0, {"rows": 0}, "lays 33024 elements out in 0 rows"),
    (1, {"rows": 7}, "lays 33024 elements out in 7 rows"),
    (1, {"rows": 1 << 40}, "lays 33024 elements out in 1099511627776 rows"),
    (1, {"prefix": 2}, "has unknown prefix code 2"),
    (1, {"prefix": 0}, "does not decode \\(zstd: "),  # coded with its prefix, read without
    (0, {"rows": 256}, "decodes to different bytes than were packed"),  # another layout: the digest catches it
])
def test_a_malformed_columns_description_is_refused_in_one_line(stft, which, changes, message):
    _, _, pack = stft
    offset = columns_records(pack)[which][0].offset
    with pytest.raises(CorruptPack, match=f"tensor record at byte {offset}.*{message}") as error:
        unpack_model(with_description(pack, which, **changes))
    assert "\n" not in str(error.value)


def test_a_prefixed_record_needs_its_prefix_right_before_it(stft):
    """The records in the other order: the sines first, whose prefix (the cosines' content) is not there yet."""
    _, _, pack = stft
    (real, _, _), (imag, _, _) = columns_records(pack)
    swapped = with_body(with_body(pack, real, bytes(imag.body)), imag, bytes(real.body))
    with pytest.raises(CorruptPack, match=f"byte {real.offset} takes a prefix, but the record before"):
        unpack_model(swapped)


def test_a_columns_frame_that_lies_about_its_size_is_refused_before_allocating(stft):
    _, _, pack = stft
    record, meta, length = columns_records(pack)[1]
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    crafted = with_body(pack, record, container.join_meta({**meta, "streams": [{"c": meta["n"], "b": len(bomb)}]})
                        + bomb)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptPack, match="zstd frame states 1073741824 bytes, not the 132096"):
            unpack_model(crafted)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_readers_that_do_not_know_columns_refuse_them_by_name(stft, monkeypatch, runner, tmp_path):
    """A 3.0 reader (five encodings) meets code 5; a 1.x JSON description never held `zstd-columns`."""
    _, _, pack = stft
    with pytest.raises(CorruptPack, match="invalid description \\(unknown encoding 'zstd-columns'\\)"):
        unpack_model(as_version_1(pack))
    monkeypatch.setattr(container, "ENCODINGS", container.ENCODINGS[:5])
    (tmp_path / "p.shrink").write_bytes(pack)
    before = tree(tmp_path)
    result = invoke(runner, "unpack", tmp_path / "p.shrink", "-o", tmp_path / "u.onnx")
    assert result.exit_code == 3 and "has unknown encoding code 5" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and tree(tmp_path) == before


def test_fuzzed_columns_packs_are_refused_or_decode_to_a_sound_model(stft):
    path, _, pack = stft
    model = onnx.load(str(path))
    outcomes = fuzz(np.random.default_rng(15), [pack], 60, model)
    assert outcomes["refused"] > 30, outcomes
