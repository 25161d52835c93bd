"""Loading a pack skips the CRC of its tensor records, which their SHA-256 digests cover (issue 15, item 6).

The CRC pass over the tensor records was a tenth of a session's CPU on a 436 MB model, and checked the same bytes
as the digest of what they decode to, a 64-bit check against a 32-bit one. Damage must still be named as damage:
a tensor record that fails to decode or to match its digest has its CRC read then, and a mismatch says
"checksum mismatch in the record at byte N", as an eager check did.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import packing
from onnxshrink.codec import container
from onnxshrink.codec.container import CorruptPack


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.1).astype(np.float32), f"w{i}")
               for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < 2 else "y"])
             for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def pack() -> bytes:
    out = io.BytesIO()
    packing.pack_model(_model(), out, packing.PackReport("pack", "m.onnx", "m.shrink"))
    return out.getvalue()


def _tensor_records(data: bytes) -> list[container.Record]:
    return [r for r in container.read_records(data) if r.kind == container.TENSOR]


def test_deferred_kinds_are_handed_out_unchecked_and_check_on_demand(pack):
    record = _tensor_records(pack)[0]
    damaged = bytearray(pack)
    damaged[record.offset + container.RECORD_HEAD.size + len(record.body) // 2] ^= 1
    with pytest.raises(CorruptPack, match=f"checksum mismatch in the record at byte {record.offset}:"):
        list(container.read_records(bytes(damaged)))  # eager by default
    deferred = [r for r in container.read_records(bytes(damaged), deferred=frozenset({container.TENSOR}))
                if r.offset == record.offset][0]
    with pytest.raises(CorruptPack, match=f"checksum mismatch in the record at byte {record.offset}:"):
        deferred.check_crc()
    for good in container.read_records(pack, deferred=frozenset({container.TENSOR})):
        good.check_crc()  # a sound record passes; an eagerly checked one has nothing left to check


def test_other_kinds_stay_eager_when_tensors_are_deferred(pack):
    graph = next(r for r in container.read_records(pack) if r.kind == container.GRAPH)
    damaged = bytearray(pack)
    damaged[graph.offset + container.RECORD_HEAD.size] ^= 1
    with pytest.raises(CorruptPack, match=f"checksum mismatch in the record at byte {graph.offset}:"):
        list(container.read_records(bytes(damaged), deferred=frozenset({container.TENSOR})))


def test_loading_a_sound_pack_computes_no_crc_over_tensor_records(pack, monkeypatch):
    tensor_lengths = {container.RECORD_HEAD.size + len(r.body) for r in _tensor_records(pack)}
    lengths = []
    real = zlib.crc32

    def counting(data, value=0):
        lengths.append(len(data))
        return real(data, value)

    monkeypatch.setattr(container.zlib, "crc32", counting)
    model = packing.unpack_model(pack)
    assert lengths and not tensor_lengths & set(lengths)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in _model().graph.initializer}


def _flips(record: container.Record) -> list[int]:
    """Byte positions across a record: its head (kind excluded), description and coded streams."""
    start = record.offset + 1  # the kind byte is left alone: another kind is checked eagerly anyway
    end = record.offset + container.RECORD_HEAD.size + len(record.body)
    return sorted(set(np.linspace(start, end - 1, 40).astype(int).tolist()))


def test_damage_in_a_tensor_record_is_still_named_a_checksum_mismatch(pack):
    """Whether the damage breaks the decoding (a description, a stream) or only the decoded bytes (digest),
    the load names the record by its CRC, as before."""
    for record in _tensor_records(pack):
        for position in _flips(record):
            damaged = bytearray(pack)
            damaged[position] ^= 0x10
            with pytest.raises(CorruptPack) as caught:
                packing.unpack_model(bytes(damaged))
            assert str(caught.value).startswith("checksum mismatch in the record at byte"), (position, caught.value)
            if position >= record.offset + container.RECORD_HEAD.size:  # a damaged length moves the record's end
                assert str(caught.value).startswith(f"checksum mismatch in the record at byte {record.offset}:")


def _stored_crc_flipped(data: bytes) -> tuple[bytes, container.Record]:
    """The pack with one tensor record's stored CRC altered, its body intact."""
    record = _tensor_records(data)[0]
    damaged = bytearray(data)
    damaged[record.offset + container.RECORD_HEAD.size + len(record.body)] ^= 0xFF
    return bytes(damaged), record


def test_every_crc_checks_what_loading_leaves_to_the_digests(pack):
    """A stored CRC that no longer matches an intact body loads (the digests hold), but the check of a file just
    written reads every CRC, as `unpack` and the streamed check will: such a file must not land."""
    damaged, record = _stored_crc_flipped(pack)
    assert len(packing.unpack_model(damaged).graph.initializer) == 3
    with pytest.raises(CorruptPack, match=f"checksum mismatch in the record at byte {record.offset}:"):
        packing.unpack_model(damaged, every_crc=True)


def test_packs_own_check_reads_every_crc(tmp_path, monkeypatch):
    from onnxshrink import api

    onnx.save(_model(), tmp_path / "m.onnx")
    calls = []
    real = packing.unpack_model
    monkeypatch.setattr(packing, "unpack_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    api.pack(tmp_path / "m.onnx", tmp_path / "m.shrink")
    assert calls and all(k.get("every_crc") for k in calls)
