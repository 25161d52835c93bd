"""The `.shrink` container: a preamble and a sequence of checksummed records (docs/FORMAT.md).

Knows nothing of ONNX or Huffman codes: it frames byte strings so that a truncated
file, a flipped bit or a foreign file is refused with the reason, never misread.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

MAGIC = b"ONNXSHRK"
VERSION = (1, 0)  # major, minor: a reader refuses another major version
PREAMBLE = struct.Struct("<8sHH")
RECORD_HEAD = struct.Struct("<BQ")  # kind, body length
CRC = struct.Struct("<I")

HEADER, GRAPH, TABLE, TENSOR, END = 1, 2, 3, 4, 255
KIND_NAMES = {HEADER: "header", GRAPH: "graph", TABLE: "table", TENSOR: "tensor", END: "end"}


class CorruptPack(ValueError):
    """A .shrink file that cannot be trusted: truncated, altered, foreign, or from another format version."""


@dataclass
class Record:
    kind: int
    body: memoryview
    offset: int  # where the record starts in the file, for error messages

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")


class Writer:
    """Appends records to an open binary file; `close()` writes the END record that marks a whole file."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.records = 0
        self.bytes_written = 0
        self._write(PREAMBLE.pack(MAGIC, *VERSION))

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.bytes_written += len(data)

    def record(self, kind: int, *parts: bytes) -> int:
        """Write one record whose body is the concatenation of `parts`; returns its size in bytes."""
        length = sum(len(p) for p in parts)
        head = RECORD_HEAD.pack(kind, length)
        crc = zlib.crc32(head)
        for part in parts:
            crc = zlib.crc32(part, crc)
        self._write(head)
        for part in parts:
            self._write(part)
        self._write(CRC.pack(crc))
        self.records += 1
        return RECORD_HEAD.size + length + CRC.size

    def json_record(self, kind: int, value: dict) -> int:
        return self.record(kind, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())

    def close(self) -> None:
        self.json_record(END, {"records": self.records + 1})


def read_records(data: memoryview | bytes) -> Iterator[Record]:
    """Yield every record after checking the preamble, each record's CRC, and that the file ends with END.

    A record's CRC is checked before its body is handed out, so a caller never parses altered bytes.
    """
    data = memoryview(data)
    return _records(lambda offset, length: data[offset : offset + length], len(data))


def read_file_records(stream: BinaryIO) -> Iterator[Record]:
    """The same records and checks, read from an open file one record at a time (memory: the largest record)."""
    size = os.fstat(stream.fileno()).st_size

    def read_at(offset: int, length: int) -> memoryview:
        stream.seek(offset)
        return memoryview(stream.read(length))

    return _records(read_at, size)


def _records(read_at, size: int) -> Iterator[Record]:
    head = read_at(0, PREAMBLE.size)
    if size < PREAMBLE.size or bytes(head[: len(MAGIC)]) != MAGIC:
        raise CorruptPack("not an onnxshrink pack (no ONNXSHRK magic)")
    _, major, minor = PREAMBLE.unpack_from(head, 0)
    if major != VERSION[0]:
        raise CorruptPack(f"pack format version {major}.{minor}; this onnxshrink reads version {VERSION[0]}.x")
    offset, count = PREAMBLE.size, 0
    while True:
        if offset == size:
            raise CorruptPack(f"truncated: ends after {count} record(s) without the end record")
        if offset + RECORD_HEAD.size > size:
            raise CorruptPack(f"truncated inside a record header at byte {offset}")
        kind, length = RECORD_HEAD.unpack_from(read_at(offset, RECORD_HEAD.size), 0)
        end = offset + RECORD_HEAD.size + length
        if end + CRC.size > size:
            raise CorruptPack(f"truncated: the {KIND_NAMES.get(kind, 'unknown')} record at byte {offset} needs {length} bytes")
        whole = read_at(offset, end + CRC.size - offset)
        (stored,) = CRC.unpack_from(whole, end - offset)
        if zlib.crc32(whole[: end - offset]) != stored:
            raise CorruptPack(f"checksum mismatch in the record at byte {offset}: the file is corrupted")
        record = Record(kind, whole[RECORD_HEAD.size : end - offset], offset)
        del whole
        count += 1
        offset = end + CRC.size
        if kind == END:
            expected = json.loads(bytes(record.body)).get("records")
            if expected != count:
                raise CorruptPack(f"record count mismatch: end record says {expected}, file has {count}")
            if offset != size:
                raise CorruptPack(f"{size - offset} unexpected byte(s) after the end record")
            return
        yield record


def parse_json(record: Record) -> dict:
    try:
        value = json.loads(bytes(record.body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} is not a JSON object")
    return value


META_LENGTH = struct.Struct("<I")


def split_meta(record: Record) -> tuple[dict, memoryview]:
    """A tensor record's body: a length-prefixed JSON description, then its coded streams."""
    body = record.body
    if len(body) < META_LENGTH.size:
        raise CorruptPack(f"tensor record at byte {record.offset} is too short")
    (length,) = META_LENGTH.unpack_from(body, 0)
    if META_LENGTH.size + length > len(body):
        raise CorruptPack(f"tensor record at byte {record.offset} has a bad description length")
    meta = parse_json(Record(record.kind, body[META_LENGTH.size : META_LENGTH.size + length], record.offset))
    return meta, body[META_LENGTH.size + length :]


def join_meta(meta: dict) -> bytes:
    text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return META_LENGTH.pack(len(text)) + text
