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
VERSION = (3, 0)  # major, minor: what a pack using zstd is written as (3.0: the graph record may be zstd)
COLUMNS_VERSION = (3, 1)  # a pack holding a `zstd-columns` tensor (which a 3.0 reader refuses by its encoding code)
LZMA_GRAPH_VERSION = (2, 0)  # what a pack whose graph record is LZMA is written as: every reader since 2.0 reads it
READS = (1, 2, 3)  # the major versions this reader reads (1.x: tensor descriptions in JSON); it refuses others
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
    major: int = VERSION[0]  # the file's format version: how a tensor record's description reads
    # kind, length, body and stored CRC, where the reader deferred the CRC check to the caller (read_records'
    # `deferred`); None: checked before the record was handed out
    unchecked: memoryview | None = None

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")

    def check_crc(self) -> None:
        """Raise the reader's checksum error if this record's CRC was deferred and does not match."""
        if self.unchecked is not None:
            _check_crc(self.unchecked, self.offset)


class Writer:
    """Appends records to an open binary file; `close()` writes the END record that marks a whole file."""

    def __init__(self, stream: BinaryIO, version: tuple[int, int] = VERSION):
        self.stream = stream
        self.records = 0
        self.bytes_written = 0
        self._write(PREAMBLE.pack(MAGIC, *version))

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


def read_records(data: memoryview | bytes, deferred: frozenset = frozenset()) -> Iterator[Record]:
    """Yield every record after checking the preamble, each record's CRC, and that the file ends with END.

    A record's CRC is checked before its body is handed out, so a caller never parses altered bytes, except for
    the kinds in `deferred`: their records come with the check left to the caller (`Record.check_crc`). A caller
    defers only records whose content it verifies by a stronger check of its own and whose parser is bounded on
    any bytes, as it must be anyway: a CRC is no defence against a crafted file (packing.unpack_model's tensors,
    each decoded into bytes whose SHA-256 prefix is checked, skip a pass over most of the file).
    """
    data = memoryview(data)
    return _records(lambda offset, length: data[offset : offset + length], len(data), deferred)


def read_file_records(stream: BinaryIO) -> Iterator[Record]:
    """The same records and checks, read from an open file one record at a time (memory: the largest record)."""
    size = os.fstat(stream.fileno()).st_size

    def read_at(offset: int, length: int) -> memoryview:
        stream.seek(offset)
        return memoryview(stream.read(length))

    return _records(read_at, size)


def _records(read_at, size: int, deferred: frozenset = frozenset()) -> Iterator[Record]:
    head = read_at(0, PREAMBLE.size)
    if size < PREAMBLE.size or bytes(head[: len(MAGIC)]) != MAGIC:
        raise CorruptPack("not an onnxshrink pack (no ONNXSHRK magic)")
    _, major, minor = PREAMBLE.unpack_from(head, 0)
    if major not in READS:
        names = [f"{m}.x" for m in READS]
        readable = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise CorruptPack(f"pack format version {major}.{minor}; this onnxshrink reads versions {readable}")
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
        later = kind in deferred
        if not later:
            _check_crc(whole, offset)
        record = Record(kind, whole[RECORD_HEAD.size : end - offset], offset, major, whole if later else None)
        del whole
        count += 1
        offset = end + CRC.size
        if kind == END:
            expected = parse_json(record).get("records")
            if type(expected) is not int:
                raise CorruptPack(f"the end record at byte {record.offset} has no record count")
            if expected != count:
                raise CorruptPack(f"record count mismatch: end record says {expected}, file has {count}")
            if offset != size:
                raise CorruptPack(f"{size - offset} unexpected byte(s) after the end record")
            return
        yield record


def _check_crc(whole: memoryview, offset: int) -> None:
    """`whole`: a record's head, body and stored CRC."""
    (stored,) = CRC.unpack_from(whole, len(whole) - CRC.size)
    if zlib.crc32(whole[: len(whole) - CRC.size]) != stored:
        raise CorruptPack(f"checksum mismatch in the record at byte {offset}: the file is corrupted")


MAX_JSON_BYTES = 1 << 16  # header, end record, 1.x description: a few hundred bytes each when written


def parse_json(record: Record) -> dict:
    """A JSON record body as a dict. Size and nesting are bounded (a crafted record could otherwise take memory
    or overflow the parser's stack); the caller still checks the type of every field it reads."""
    if len(record.body) > MAX_JSON_BYTES:
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} holds {len(record.body)} bytes of JSON, "
                          f"more than the {MAX_JSON_BYTES} a pack writes")
    try:
        value = json.loads(bytes(record.body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} is not valid JSON") from exc
    except RecursionError as exc:
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} nests its JSON too deeply") from exc
    if not isinstance(value, dict):
        raise CorruptPack(f"{record.kind_name} record at byte {record.offset} is not a JSON object")
    return value


# ---------------------------------------------------------------- tensor descriptions

DIGEST_BYTES = 8  # SHA-256 prefix per tensor (64 bits): the CRCs catch damage, this catches wrong decoding
ENCODINGS = ("planes", "nibbles", "sparse", "sparse-nibbles", "zstd-planes", "zstd-columns")  # encoding codes 0..5
VALUE_ENCODINGS = ("planes", "nibbles")  # how a `sparse` tensor's elements are coded, codes 0..1
FLOAT_DATA = 1  # flag: the values go back into the typed float_data field, not raw_data
JSON_LENGTH = struct.Struct("<I")  # 1.x: a u32-length-prefixed JSON description


def join_meta(meta: dict) -> bytes:
    """A tensor description as the 2.x binary struct (docs/FORMAT.md): about 25 bytes where JSON took 100-150,
    which decides whether small tensors are worth a record of their own."""
    out = bytearray()
    _put_varint(out, meta["i"])
    _put_varint(out, meta["n"])
    out.append(meta["k"])
    out.append(FLOAT_DATA if meta.get("field") == "float_data" else 0)
    if len(meta["sha"]) != DIGEST_BYTES:
        raise ValueError(f"a tensor digest is {DIGEST_BYTES} bytes, not {len(meta['sha'])}")
    out += meta["sha"]
    out.append(ENCODINGS.index(meta["enc"]))
    if meta["enc"] == "sparse":
        out += meta["bg"]
        _put_varint(out, meta["nnz"])
        out.append(VALUE_ENCODINGS.index(meta["vals"]))
    elif meta["enc"] == "sparse-nibbles":
        out.append(meta["bg"])
        _put_varint(out, meta["nnz"])
    elif meta["enc"] == "zstd-columns":
        _put_varint(out, meta["rows"])
        out.append(meta["prefix"])
    _put_varint(out, len(meta["streams"]))
    for stream in meta["streams"]:
        _put_varint(out, stream["c"])
        _put_varint(out, stream["b"])
        _put_varint(out, stream["t"] + 1 if "t" in stream else 0)
    length = bytearray()
    _put_varint(length, len(out))
    return bytes(length + out)


def split_meta(record: Record) -> tuple[dict, memoryview]:
    """A tensor record's body: its description, then its coded streams. The description is a dict with the
    keys of docs/FORMAT.md: `sha` as bytes, `bg` as bytes (`sparse`) or an int (`sparse-nibbles`)."""
    if record.major == 1:
        return _split_json_meta(record)
    where = f"tensor record at byte {record.offset}"
    fields = _Fields(record.body, where)
    length = fields.varint()
    end = fields.pos + length
    if end > len(record.body):
        raise CorruptPack(f"{where} has a truncated description")
    fields = _Fields(record.body[:end], where, fields.pos)
    meta = {"i": fields.varint(), "n": fields.varint(), "k": fields.byte()}
    flags = fields.byte()
    if flags & ~FLOAT_DATA:
        raise CorruptPack(f"{where} has unknown description flags {flags:#x}")
    if flags & FLOAT_DATA:
        meta["field"] = "float_data"
    meta["sha"] = fields.take(DIGEST_BYTES)
    meta["enc"] = fields.code(ENCODINGS, "encoding")
    k, n = meta["k"], meta["n"]
    if k == 0 or n % k:
        raise CorruptPack(f"{where} describes {n} bytes in elements of {k}")
    if meta["enc"] == "sparse":
        meta["bg"] = fields.take(k)
        meta["nnz"] = fields.listed(n // k)
        meta["vals"] = fields.code(VALUE_ENCODINGS, "value encoding")
    elif meta["enc"] == "sparse-nibbles":
        meta["bg"] = fields.byte()
        if meta["bg"] > 15:
            raise CorruptPack(f"{where} has a background nibble of {meta['bg']}")
        meta["nnz"] = fields.listed(2 * n)
    elif meta["enc"] == "zstd-columns":
        meta["rows"] = fields.varint()
        if not meta["rows"] or (n // k) % meta["rows"]:
            raise CorruptPack(f"{where} lays {n // k} elements out in {meta['rows']} rows")
        meta["prefix"] = fields.byte()
        if meta["prefix"] > 1:
            raise CorruptPack(f"{where} has unknown prefix code {meta['prefix']}")
    meta["streams"] = []
    for _ in range(fields.varint()):  # an absurd count runs out of description bytes
        stream = {"c": fields.varint(), "b": fields.varint()}
        table = fields.varint()
        if table:
            stream["t"] = table - 1
        meta["streams"].append(stream)
    # Description bytes after the streams' entries are skipped: room for fields a later 2.x minor version adds.
    return meta, record.body[end:]


class _Fields:
    """Reads a binary description's fields in order; running past its end is a CorruptPack naming the record."""

    def __init__(self, data: memoryview, where: str, pos: int = 0):
        self.data, self.where, self.pos = data, where, pos

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise CorruptPack(f"{self.where} has a truncated description")
        self.pos += count
        return bytes(self.data[self.pos - count : self.pos])

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
        raise CorruptPack(f"{self.where} has an overlong number in its description")

    def listed(self, elements: int) -> int:
        """How many of `elements` differ from the background: no more than there are."""
        count = self.varint()
        if count > elements:
            raise CorruptPack(f"{self.where} lists {count} of {elements} elements")
        return count

    def code(self, names: tuple, what: str) -> str:
        code = self.byte()
        if code >= len(names):
            raise CorruptPack(f"{self.where} has unknown {what} code {code}")
        return names[code]


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"a description field cannot be negative ({value})")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _split_json_meta(record: Record) -> tuple[dict, memoryview]:
    """A 1.x tensor record: a u32-length-prefixed JSON description, with `sha` and `bg` in hex."""
    body = record.body
    if len(body) < JSON_LENGTH.size:
        raise CorruptPack(f"tensor record at byte {record.offset} is too short")
    (length,) = JSON_LENGTH.unpack_from(body, 0)
    if JSON_LENGTH.size + length > len(body):
        raise CorruptPack(f"tensor record at byte {record.offset} has a bad description length")
    text = parse_json(Record(record.kind, body[JSON_LENGTH.size : JSON_LENGTH.size + length], record.offset))
    try:
        meta = _json_meta(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptPack(f"tensor record at byte {record.offset} has an invalid description ({exc})") from exc
    return meta, body[JSON_LENGTH.size + length :]


def _json_meta(text: dict) -> dict:
    """A 1.x JSON description as the dict split_meta returns for 2.x, every field's type and range checked as
    the binary reader checks them: past this point a description of either version is trusted to be well formed."""
    def number(value, name) -> int:
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} is {value!r:.40}, not a count")
        return value

    def code(value, names, name) -> str:
        if value not in names:  # a str among the names; any other JSON value is not
            raise ValueError(f"unknown {name} {value!r:.40}")
        return value

    # `i` as written: the reader refuses an index that names no tensor of the graph, whatever its type.
    meta = {"i": text.get("i"), "n": number(text["n"], "n"), "k": number(text["k"], "k")}
    k, n = meta["k"], meta["n"]
    if not 0 < k < 256 or n % k:
        raise ValueError(f"{n} bytes in elements of {k}")
    if "field" in text:
        if text["field"] != "float_data":
            raise ValueError(f"unknown field {text['field']!r:.40}")
        meta["field"] = "float_data"
    if not isinstance(text["sha"], str):
        raise TypeError("sha is not a string")
    meta["sha"] = bytes.fromhex(text["sha"])
    if len(meta["sha"]) != DIGEST_BYTES:
        raise ValueError(f"a digest of {len(meta['sha'])} bytes")
    meta["enc"] = code(text["enc"], ENCODINGS[:-1], "encoding")  # no 1.x writer knew `zstd-columns`
    if meta["enc"] in ("sparse", "sparse-nibbles"):
        if not isinstance(text["bg"], str):
            raise TypeError("bg is not a string")
        elements = n // k if meta["enc"] == "sparse" else 2 * n
        meta["nnz"] = number(text["nnz"], "nnz")
        if meta["nnz"] > elements:
            raise ValueError(f"lists {meta['nnz']} of {elements} elements")
    if meta["enc"] == "sparse":
        meta["bg"] = bytes.fromhex(text["bg"])
        if len(meta["bg"]) != k:
            raise ValueError(f"a background of {len(meta['bg'])} bytes in elements of {k}")
        meta["vals"] = code(text["vals"], VALUE_ENCODINGS, "value encoding")
    elif meta["enc"] == "sparse-nibbles":
        meta["bg"] = int(text["bg"], 16)
        if not 0 <= meta["bg"] <= 15:
            raise ValueError(f"a background nibble of {meta['bg']}")
    if not isinstance(text["streams"], list):
        raise TypeError("streams is not a list")
    meta["streams"] = []
    for entry in text["streams"]:
        if not isinstance(entry, dict):
            raise TypeError("a stream entry is not an object")
        stream = {"c": number(entry["c"], "c"), "b": number(entry["b"], "b")}
        if "t" in entry:
            stream["t"] = number(entry["t"], "t")
        meta["streams"].append(stream)
    return meta
