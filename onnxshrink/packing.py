"""pack / unpack: the graph kept as ONNX, each weight's bytes entropy-coded (Deep Compression's last stage).

Every tensor is restored bit for bit: the coding is lossless and each tensor carries a
SHA-256 of its bytes, checked on decode, on top of the container's per-record CRCs.
How a tensor is coded is chosen per tensor from the symbol counts (docs/FORMAT.md):

- `planes`  the bytes of each element split into byte planes, one Huffman stream per plane
            (float exponents code well, mantissa bytes barely; int8 weights are one plane)
- `nibbles` each byte split into its two 4-bit halves (int4/uint4, MatMulNBits weights)
- `sparse`  the positions of the elements that differ from the most common one (zero after
            pruning) as Huffman-coded gaps, and those elements coded as `planes` or `nibbles`
- `sparse-nibbles`  the same with 4-bit values as the elements (pruned, then 4-bit quantized weights)
"""

from __future__ import annotations

import hashlib
import lzma
import math
import posixpath
import queue
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx
import zstandard

from onnxshrink.codec import container, huffman
from onnxshrink.errors import ModelLoadError
from onnxshrink.protos import iter_graphs
from onnxshrink.report import JsonReport

MIN_CODED_BYTES = 256  # smaller tensors stay inside the graph record, which is LZMA-compressed
RECORD_FRAMING = container.RECORD_HEAD.size + container.CRC.size  # bytes every record costs besides its body
LZMA_SAMPLE = 65536  # bytes per sample when estimating LZMA on a large tensor
WHOLE_GRAPH_CHECK = 2 << 20  # models up to this size are also LZMA-compressed whole (about 1 s), kept if smaller
GAP_ESCAPE = 255  # gap symbol meaning "255 background elements, no element follows"
FORMAT_NAME = "onnxshrink-pack"
PACKED_INT4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
# Element types packed several to a byte in raw_data (as onnx packs them), by bits per element.
PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)}
# Reading: a protobuf holds at most 2 GiB, so a graph record decodes to at most this many bytes (the header
# names the exact count, `graph_bytes`, in packs written since it was added), and a pack without external data
# restores at most this many tensor bytes. Every size a record declares is checked against these and the graph
# before anything is allocated for it.
MAX_GRAPH_BYTES = 1 << 31
# Writing: tensors that LZMA codes better stay in the graph record, but not past this many bytes (protobuf
# refuses to serialize 2 GiB; the half left is room for the rest of the graph): the largest then get records.
GRAPH_RECORD_LIMIT = 1 << 30
TYPED_FIELDS = (  # TensorProto's typed data fields: a tensor the graph left to a record has none, nor raw_data
    "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
# The graph record: a raw LZMA2 stream (no .xz container: the record's CRC covers it), 8 MiB dictionary,
# or (format 3.0) one zstd frame that states its content size. zstd decodes 20-50 times faster (LZMA: 15-20 MB/s
# on this 2-core Xeon, the load time of a pack whose graph holds tensors); LZMA is often a few % smaller.
GRAPH_CODEC = "lzma2-raw-8m"
GRAPH_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME, "dict_size": 8 << 20}]
ZSTD_CODEC = "zstd"
GRAPH_CODECS = (GRAPH_CODEC, ZSTD_CODEC)
ZSTD_LEVEL = 19
ZSTD_MAX_WINDOW = 1 << 27  # a reader refuses frames that need a larger window (level 19 uses 8 MiB)
# favor="load" (the default) keeps the zstd graph record of a graph of at least ZSTD_GRAPH_MIN bytes unless LZMA's
# saves more than this fraction of the pack; a smaller graph, or favor="size", keeps the smaller of the two.
ZSTD_SLACK = 0.005
ZSTD_GRAPH_MIN = 1 << 20  # LZMA decodes less than this in under 0.1 s: not worth a larger pack
FAVORS = ("load", "size")
# `zstd-planes` tensors: byte planes, then zstd, tried on tensors of at least this many bytes at these levels. It
# finds what order-0 Huffman codes cannot (repeated rows of a rarely-trained output layer) and decodes at ~1 GB/s.
ZSTD_PLANES_MIN = 64 << 10
ZSTD_PLANES_LEVELS = (3, 9)
# `zstd-columns` (format 3.1): tried on the tensors of at least ZSTD_PLANES_MIN bytes that LZMA would keep in the
# graph record (structured ones: an STFT basis of sines), their elements column by column (the matrix of the first
# dimension by the others, transposed), byte planes, zstd, at this level (9 above COLUMNS_HIGH_MAX bytes), each
# with the previous record's content as a prefix where that is smaller (a sine basis after its cosines).
COLUMNS_LEVEL = 19
COLUMNS_HIGH_MAX = 8 << 20


@dataclass
class PackedTensor:
    name: str
    dtype: str
    encoding: str
    symbols: int
    entropy_bits: float  # order-0 entropy of its coded streams, bits per symbol
    coded_bits: float  # payload bits per symbol actually spent (tables not included)
    bytes_before: int
    bytes_after: int  # its record: description, tables of its own, payload


@dataclass
class PackReport(JsonReport):
    command: str
    input: str
    output: str | None
    tensors: list = field(default_factory=list)  # PackedTensor
    totals: dict = field(default_factory=dict)
    size: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


@dataclass
class _Stream:
    symbols: np.ndarray | None  # uint8; None once planned when streaming (rebuilt from the tensor to write it)
    alphabet: int
    category: tuple
    counts: np.ndarray = None
    table_id: int | None = None  # shared table record; None: its own table, inline
    table_share_bits: int = 0  # its part of the shared table's cost
    own: huffman.Table | None = None  # the stream's own code: priced when choosing, written unless shared
    size: int = 0  # how many symbols

    def __post_init__(self):
        self.counts = np.bincount(self.symbols, minlength=self.alphabet)
        self.own = huffman.Table.from_counts(self.counts)
        self.size = len(self.symbols)


@dataclass
class _Plan:
    index: int
    tensor: onnx.TensorProto
    encoding: str
    streams: list
    meta: dict
    in_graph_bytes: int = 0  # what LZMA would spend on it in the graph record (_size_in_graph)
    sha256: bytes = b""  # of its data bytes, whole: the streamed check compares each decoded tensor with it
    frame: bytes | None = None  # `zstd-planes`: its one zstd frame (None once planned when streaming)
    frame_size: int = 0
    frame_level: int = 0
    planes_entropy: float = 0.0  # `zstd-planes`: order-0 entropy of its byte planes, bits, for the report
    content: bytes | None = None  # `zstd-columns`: what its frame codes (the next record's prefix, if it uses one)

    def forget_symbols(self) -> None:
        """Keep what choosing tables needs (counts, codes, sizes), not the symbols: a tensor's worth of memory."""
        for s in self.streams:
            s.symbols = None
        self.frame = self.content = None


@dataclass
class PackManifest:
    """What a streamed pack's check compares the file with: the graph record's model and each coded tensor's digest."""

    graph: bytes  # the serialized model the graph record holds
    tensors: list  # (index, SHA-256 of its bytes) in record order


def tensor_protos(model: onnx.ModelProto, initializers: list | None = None) -> list[onnx.TensorProto]:
    """Every tensor that can hold weights, in one fixed order (pack and unpack walk the same graph).

    `initializers`, when given, gets the positions that are graph initializers (of any scope)."""
    found = []

    def walk(graph: onnx.GraphProto) -> None:
        if initializers is not None:
            initializers.extend(range(len(found), len(found) + len(graph.initializer)))
        found.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    found.append(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    found.extend(attr.tensors)
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    found.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub)

    walk(model.graph)
    return found


def tensor_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """The bytes a tensor record codes: `raw_data`, or the values of a float tensor stored in the typed
    `float_data` field (as exporters such as paddle2onnx write Constant nodes), little-endian fp32."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.float_data):
        return np.asarray(tensor.float_data, dtype="<f4").tobytes()
    return None


def declared_bytes(tensor: onnx.TensorProto, float_data: bool = False) -> int | None:
    """The bytes a tensor's data takes by its dims and type, as raw_data (or as little-endian fp32 when its values
    go to `float_data`); None for a type of no fixed size (strings, unknown types). A tensor record must decode to
    exactly this: a pack cannot make a [64, 64] tensor hold 134 M floats, nor allocate for them."""
    if any(d < 0 for d in tensor.dims):
        return None
    count = math.prod(tensor.dims)
    if float_data:
        return 4 * count if tensor.data_type == onnx.TensorProto.FLOAT else None
    bits = PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return -(-count * bits // 8)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    return None if dtype.kind in "OSUV" else count * dtype.itemsize


def element_size(tensor: onnx.TensorProto) -> int:
    if tensor.data_type in PACKED_INT4:
        return 1  # two values per byte: the nibbles encoding splits them
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 1


def pack_model(model: onnx.ModelProto, stream, report: PackReport, *, external_data: bool = False,
               source=None, favor: str = "load") -> PackManifest:
    """Write `model` as a pack to the binary `stream`, filling `report` with what each tensor cost.

    `external_data` records that the model kept its weights in a data file, so unpack writes one too.
    With `source` (an ExternalTensors), `model` was loaded without its external data: each tensor is read
    from its data file twice, once to plan its coding and once to write it, never all at once; the file is
    the same, byte for byte, as from the model loaded whole.
    `favor` = "load" codes the graph record with zstd unless LZMA saves more than ZSTD_SLACK of the pack;
    "size" keeps whichever is smaller.
    """
    if favor not in FAVORS:
        raise ValueError(f"favor must be one of {', '.join(FAVORS)}, not {favor!r}")
    protos = tensor_protos(model)
    read = source.read if source is not None else tensor_bytes
    plans, with_bytes, data_bytes = [], 0, 0
    for index, tensor in enumerate(protos):
        data = read(tensor)
        if data is None:
            continue
        with_bytes += 1
        data_bytes += len(data)
        raw_field = tensor.HasField("raw_data") or _external(tensor)
        # Only a tensor whose bytes match its dims and type gets a record: a reader refuses any other.
        if len(data) >= MIN_CODED_BYTES and len(data) == declared_bytes(tensor, float_data=not raw_field):
            plan = _plan(index, tensor, data, raw_field=raw_field)
            plan.in_graph_bytes = _size_in_graph(data)
            if source is not None:
                plan.forget_symbols()
            plans.append(plan)
        del data
    candidates = list(plans)
    # A record must beat what LZMA would spend on the tensor inside the graph; shared tables make small ones pay.
    # Dropping tensors can leave a shared table to fewer of them, or to none: choose again until all still pay.
    tables = _assign_tables([s for p in plans for s in p.streams])
    while plans:
        paying = [p for p in plans if _record_bits(p, tables) < 8 * p.in_graph_bytes]
        tables = _assign_tables([s for p in paying for s in p.streams])
        if len(paying) == len(plans):
            break
        plans = paying
    in_graph = data_bytes - sum(p.meta["n"] for p in plans)
    if in_graph > GRAPH_RECORD_LIMIT:  # one protobuf cannot hold them all: the largest get records anyway
        chosen = {p.index for p in plans}
        for plan in sorted((p for p in candidates if p.index not in chosen), key=lambda p: -p.meta["n"]):
            if in_graph <= GRAPH_RECORD_LIMIT:
                break
            plans.append(plan)
            in_graph -= plan.meta["n"]
        plans.sort(key=lambda p: p.index)
        tables = _assign_tables([s for p in plans for s in p.streams])
    chosen = {p.index for p in plans}
    held = [p for p in candidates if p.index not in chosen and p.meta["n"] >= ZSTD_PLANES_MIN]
    del candidates  # the plans of tensors left in the graph: a tensor's worth of memory each

    graph_model = _graph_model(model, plans, source)
    graph_bytes = lzma.compress(graph_model, format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS)
    layout_size, slack_taken = len(graph_bytes) + _records_bytes(plans, tables), 0
    # The large tensors LZMA keeps in the graph decode at 15-40 MB/s there. Coded as records of their own (zstd on
    # their columns where that codes them best, which decodes at about 1 GB/s), all of them together: LZMA on the
    # graph also finds what they share (a sine basis and its cosines), which only the whole layout's size shows.
    if held:
        fast_plans = sorted(plans + _columns_plans(held, plans, read, source is not None), key=lambda p: p.index)
        fast_tables = _assign_tables([s for p in fast_plans for s in p.streams])
        fast_graph = _graph_model(model, fast_plans, source)
        fast_bytes = lzma.compress(fast_graph, format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS)
        fast_size = len(fast_bytes) + _records_bytes(fast_plans, fast_tables)
        slack = ZSTD_SLACK * fast_size if favor == "load" else 0
        if fast_size <= layout_size + slack:
            plans, graph_model, graph_bytes = fast_plans, fast_graph, fast_bytes
            layout_size, slack_taken = fast_size, slack
        del fast_plans, fast_graph, fast_bytes
        tables = _assign_tables([s for p in plans for s in p.streams])  # the kept layout's (both set table ids)
    del held
    # Records were chosen tensor by tensor, against LZMA on each tensor alone; on the whole graph LZMA also finds
    # what tensors share (tied copies), so on a small model keeping every tensor in the graph can be smaller.
    # Not for external-data models: their streamed pack cannot afford it and must write what this path writes.
    if (plans and source is None and not external_data and model.ByteSize() <= WHOLE_GRAPH_CHECK
            and data_bytes <= GRAPH_RECORD_LIMIT):
        whole_model = model.SerializeToString()
        whole_bytes = lzma.compress(whole_model, format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS)
        if len(whole_bytes) + slack_taken <= layout_size:  # favor=load took the fast layout within its slack: beat that
            plans, tables, graph_model, graph_bytes = [], [], whole_model, whole_bytes
    rest = sum(_record_bits(p, tables) for p in plans) // 8 + sum(len(t.to_bytes()) + RECORD_FRAMING for t in tables)
    codec, graph_bytes = _graph_codec(graph_model, graph_bytes, rest, favor)

    if any(p.encoding == "zstd-columns" for p in plans):
        version = container.COLUMNS_VERSION
    elif codec == ZSTD_CODEC or any(p.encoding == "zstd-planes" for p in plans):
        version = container.VERSION
    else:
        version = container.LZMA_GRAPH_VERSION
    writer = container.Writer(stream, version)
    header = {"format": FORMAT_NAME, "producer": _producer(), "tensors": len(plans), "tables": len(tables),
              "graph_codec": codec, "graph_bytes": len(graph_model)}
    if external_data:
        header["external_data"] = True
    writer.json_record(container.HEADER, header)
    graph_size = writer.record(container.GRAPH, graph_bytes)
    table_size = sum(writer.record(container.TABLE, t.to_bytes()) for t in tables)
    previous = None  # the content of the record before, when it was `zstd-columns`: the next one's prefix
    for plan in plans:
        if plan.encoding in ("zstd-planes", "zstd-columns"):
            if plan.encoding == "zstd-columns":
                if plan.frame is None:
                    _rebuild_columns(plan, read(plan.tensor), previous)
                previous = plan.content
            else:
                previous = None
                if plan.frame is None:
                    _rebuild_frame(plan, read(plan.tensor))
            plan.meta["streams"][0]["b"] = len(plan.frame)
            size = writer.record(container.TENSOR, container.join_meta(plan.meta), plan.frame)
            if source is not None:
                plan.forget_symbols()
            else:
                plan.frame = plan.content = None
            report.tensors.append(PackedTensor(
                plan.tensor.name, _dtype_name(plan.tensor.data_type), plan.encoding, plan.meta["n"],
                plan.planes_entropy / plan.meta["n"], 8 * plan.frame_size / plan.meta["n"], plan.meta["n"], size))
            continue
        previous = None
        if plan.streams[0].symbols is None:
            _rebuild_symbols(plan, read(plan.tensor))
        parts, payload_bits, entropy = [], 0, 0.0
        for s, descriptor in zip(plan.streams, plan.meta["streams"]):
            table = s.own if s.table_id is None else tables[s.table_id]
            payload = huffman.encode_with(table, s.symbols)
            payload_bits += 8 * len(payload)
            data = (table.to_bytes() + payload) if s.table_id is None else payload
            entropy += huffman.entropy_bits(s.counts)
            descriptor["b"] = len(data)
            if s.table_id is not None:
                descriptor["t"] = s.table_id
            parts.append(data)
        size = writer.record(container.TENSOR, container.join_meta(plan.meta), *parts)
        del parts
        if source is not None:
            plan.forget_symbols()
        symbols = sum(s.size for s in plan.streams)
        report.tensors.append(PackedTensor(
            plan.tensor.name, _dtype_name(plan.tensor.data_type), plan.encoding, symbols,
            entropy / symbols if symbols else 0.0, payload_bits / symbols if symbols else 0.0,
            plan.meta["n"], size,
        ))
    writer.close()
    coded = report.tensors
    report.totals = {
        "tensors": len(report.tensors),
        "tensors_left_in_graph": with_bytes - len(plans),
        "tensor_bytes_before": sum(t.bytes_before for t in report.tensors),
        "tensor_bytes_after": sum(t.bytes_after for t in report.tensors),
        "graph_bytes": graph_size,
        "shared_table_bytes": table_size,
        "shared_tables": len(tables),
        "coded_symbols": sum(t.symbols for t in coded),
        "entropy_bits_per_symbol": _mean_bits(coded, "entropy_bits"),
        "coded_bits_per_symbol": _mean_bits(coded, "coded_bits"),
        "file_bytes": writer.bytes_written,
    }
    return PackManifest(graph_model, [(plan.index, plan.sha256) for plan in plans])


def _graph_model(model: onnx.ModelProto, plans: list, source) -> bytes:
    """The serialized model the graph record holds: `model` without the data of the tensors `plans` code."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    stripped_protos = tensor_protos(stripped)
    for plan in plans:
        stripped_protos[plan.index].ClearField(plan.meta.get("field", "raw_data"))
    if source is not None:  # as loading the external data would leave them: inline, or cleared when coded
        source.inline(stripped, {plan.index for plan in plans})
    return stripped.SerializeToString()


def _records_bytes(plans: list, tables: list) -> int:
    """What the tensor records (and their shares of the shared tables) of a layout cost, in bytes."""
    return sum(_record_bits(p, tables) for p in plans) // 8


def _graph_codec(graph_model: bytes, lzma_bytes: bytes, rest: int, favor: str) -> tuple[str, bytes]:
    """The graph record's codec and body: zstd, which loads 20-50 times faster, unless LZMA saves more than
    ZSTD_SLACK of the pack (`rest`: the bytes of its other records) - an STFT basis or a tiled tensor, which
    LZMA's larger match search codes far better - or, for a graph under ZSTD_GRAPH_MIN or favoring size,
    anything at all."""
    zstd_bytes = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(graph_model)
    slack = 0 if favor == "size" or len(graph_model) < ZSTD_GRAPH_MIN else ZSTD_SLACK * (rest + len(lzma_bytes))
    if len(zstd_bytes) <= len(lzma_bytes) + slack:
        return ZSTD_CODEC, zstd_bytes
    return GRAPH_CODEC, lzma_bytes


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _mean_bits(rows, key) -> float:
    symbols = sum(r.symbols for r in rows)
    return sum(getattr(r, key) * r.symbols for r in rows) / symbols if symbols else 0.0


def _producer() -> str:
    from onnxshrink import __version__

    return f"onnxshrink {__version__}"


def _dtype_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type {data_type}"


# ---------------------------------------------------------------- choosing an encoding per tensor

def _plan(index: int, tensor: onnx.TensorProto, data: bytes, raw_field: bool = True) -> _Plan:
    """The cheapest coding of one tensor's bytes (`raw_field`: they sit in raw_data, not float_data)."""
    sha256 = hashlib.sha256(data)
    raw = np.frombuffer(data, dtype=np.uint8)
    k = element_size(tensor)
    if len(raw) % k:
        k = 1
    meta = {"i": index, "n": len(raw), "k": k, "sha": sha256.digest()[: container.DIGEST_BYTES]}
    if not raw_field:
        meta["field"] = "float_data"
    candidates = [("planes", _planes(raw, k, "dense"))]
    if k == 1:
        candidates.append(("nibbles", _nibbles(raw, "dense")))
    for sparse in (_sparse(raw, k), _sparse_nibbles(raw) if k == 1 else None):
        if sparse is not None:
            candidates.append(sparse)
    best_name, best_streams = min(candidates, key=lambda c: _estimate(c[1]))
    meta["enc"] = best_name
    if best_name.startswith("sparse"):
        best_streams, extra = best_streams
        meta.update(extra)
    meta["streams"] = [{"c": s.size} for s in best_streams]
    plan = _Plan(index, tensor, best_name, best_streams, meta, sha256=sha256.digest())
    if len(raw) >= ZSTD_PLANES_MIN:
        _try_zstd_planes(plan, raw, k, candidates[0][1])
    return plan


def _zstd_planes(raw: np.ndarray, k: int, level: int) -> bytes:
    planes = raw.reshape(-1, k).T if k > 1 else raw
    return zstandard.ZstdCompressor(level=level).compress(planes.tobytes())


def _try_zstd_planes(plan: _Plan, raw: np.ndarray, k: int, plane_streams: list) -> None:
    """Code the tensor as `zstd-planes` where that is smaller than its Huffman coding (own tables; shared ones
    save at most a table, which small tensors, never tried here, need most)."""
    best = min(((_zstd_planes(raw, k, level), level) for level in ZSTD_PLANES_LEVELS), key=lambda f: len(f[0]))
    if 8 * len(best[0]) >= _estimate(plan.streams):
        return
    plan.encoding, plan.streams = "zstd-planes", []
    plan.frame, plan.frame_size, plan.frame_level = best[0], len(best[0]), best[1]
    plan.planes_entropy = sum(huffman.entropy_bits(s.counts) for s in plane_streams)
    for key in ("bg", "nnz", "vals"):
        plan.meta.pop(key, None)
    plan.meta["enc"], plan.meta["streams"] = "zstd-planes", [{"c": len(raw)}]


def _columns_content(raw: np.ndarray, k: int, rows: int) -> bytes:
    """A `zstd-columns` frame's content: the elements as a `rows` x (E / rows) matrix, column by column, as byte
    planes (byte 0 of every element, then byte 1, ...). An STFT basis (frequency by time) repeats along its columns:
    its window is symmetric, and cosines are even."""
    return np.ascontiguousarray(raw.reshape(rows, -1, k).transpose(2, 1, 0)).tobytes()


def _columns_frame(content: bytes, level: int, prefix: bytes | None) -> bytes:
    dictionary = None if prefix is None else zstandard.ZstdCompressionDict(
        prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(content)


def _plan_bits(plan: _Plan) -> int:
    """A planned coding's payload, own tables included (the description and framing are alike for all)."""
    return 8 * plan.frame_size if plan.encoding in ("zstd-planes", "zstd-columns") else _estimate(plan.streams)


def _columns_plans(held: list, plans: list, read, streamed: bool) -> list:
    """The tensors LZMA would keep in the graph, each coded as `zstd-columns` where that is smaller than its own
    planned coding: as it is laid out or column by column, and with the previous record's content as a zstd
    prefix where that record is `zstd-columns` too (records are written in tensor order)."""
    order = sorted(plans + held, key=lambda p: p.index)
    moving = {p.index for p in held}
    previous = None  # the content of the record before this one in file order, when it is `zstd-columns`
    for plan in order:
        if plan.index not in moving:
            previous = None
            continue
        data = read(plan.tensor)
        if data is None or hashlib.sha256(data).digest() != plan.sha256:
            raise ModelLoadError(f"tensor {plan.tensor.name!r}: its data changed while pack was reading it")
        raw, k = np.frombuffer(data, dtype=np.uint8), plan.meta["k"]
        level = COLUMNS_LEVEL if len(raw) <= COLUMNS_HIGH_MAX else ZSTD_PLANES_LEVELS[-1]
        elements, dims = len(raw) // k, list(plan.tensor.dims)
        layouts = {1}
        if len(dims) > 1 and 1 < dims[0] < elements and elements % dims[0] == 0:
            layouts.add(dims[0])
        best = None
        for rows in sorted(layouts):
            content = _columns_content(raw, k, rows)
            for prefix in (None, previous) if previous is not None else (None,):
                frame = _columns_frame(content, level, prefix)
                if best is None or len(frame) < len(best[0]):
                    best = (frame, rows, prefix is not None, content)
        del data, raw
        if 8 * len(best[0]) >= _plan_bits(plan):
            previous = None
            continue
        frame, rows, prefixed, content = best
        if plan.encoding != "zstd-planes":
            plan.planes_entropy = sum(huffman.entropy_bits(np.bincount(np.frombuffer(content, np.uint8)[
                j * elements : (j + 1) * elements], minlength=256)) for j in range(k))
        plan.encoding, plan.streams = "zstd-columns", []
        plan.frame, plan.frame_size, plan.frame_level, plan.content = frame, len(frame), level, content
        for key in ("bg", "nnz", "vals"):
            plan.meta.pop(key, None)
        plan.meta.update({"enc": "zstd-columns", "rows": rows, "prefix": int(prefixed),
                          "streams": [{"c": len(content)}]})
        previous = content
        if streamed:
            plan.forget_symbols()
    return held


def _rebuild_columns(plan: _Plan, data: bytes | None, previous: bytes | None) -> None:
    """A streamed pack's `zstd-columns` frame again, from the tensor read a second time (and the record before's
    content, when it is the prefix)."""
    if data is None or hashlib.sha256(data).digest() != plan.sha256:
        raise ModelLoadError(f"tensor {plan.tensor.name!r}: its data changed while pack was reading it")
    plan.content = _columns_content(np.frombuffer(data, dtype=np.uint8), plan.meta["k"], plan.meta["rows"])
    prefix = previous if plan.meta["prefix"] else None
    plan.frame = _columns_frame(plan.content, plan.frame_level, prefix)
    if len(plan.frame) != plan.frame_size:
        raise RuntimeError(f"tensor {plan.tensor.name!r}: its zstd frame differs from the planned one")


def _rebuild_frame(plan: _Plan, data: bytes | None) -> None:
    """A streamed pack's `zstd-planes` frame again, from the tensor read a second time (the same bytes)."""
    if data is None or hashlib.sha256(data).digest() != plan.sha256:
        raise ModelLoadError(f"tensor {plan.tensor.name!r}: its data changed while pack was reading it")
    plan.frame = _zstd_planes(np.frombuffer(data, dtype=np.uint8), plan.meta["k"], plan.frame_level)
    if len(plan.frame) != plan.frame_size:
        raise RuntimeError(f"tensor {plan.tensor.name!r}: its zstd frame differs from the planned one")


def _record_bits(plan: _Plan, tables: list) -> int:
    """What a tensor's record would cost, in bits, with the tables assigned to its streams: framing, description
    (holding the stream lengths these codes give), tables of its own, payloads, and its share of shared tables."""
    if plan.encoding in ("zstd-planes", "zstd-columns"):
        meta = {**plan.meta, "streams": [{"c": plan.meta["n"], "b": plan.frame_size}]}
        return 8 * (RECORD_FRAMING + plan.frame_size + len(container.join_meta(meta)))
    total, descriptors = 8 * RECORD_FRAMING, []
    for s in plan.streams:
        descriptor = {"c": s.size}
        if s.table_id is None:
            descriptor["b"] = len(s.own.to_bytes()) + _payload_bytes(s.own, s)
        else:
            descriptor["b"], descriptor["t"] = _payload_bytes(tables[s.table_id], s), s.table_id
            total += s.table_share_bits
        total += 8 * descriptor["b"]
        descriptors.append(descriptor)
    return total + 8 * len(container.join_meta({**plan.meta, "streams": descriptors}))


def _payload_bytes(table: huffman.Table, stream: _Stream) -> int:
    """The length of huffman.encode_with's payload of the stream under `table`: exact in one chunk, short of the
    word padding of each further chunk."""
    if not stream.size:
        return 0
    chunks = -(-stream.size // (1 << huffman.chunk_log(stream.size)))
    return 1 + 4 * (chunks - 1) + -(-table.cost_bits(stream.counts) // 8)


def _size_in_graph(data: bytes) -> int:
    """About what a tensor adds to the LZMA-compressed graph record: measured whole for small tensors, from
    four 64 KiB samples for large ones, each from the middle of one quarter. Structured matrices (an STFT basis
    of sines) compress far better with LZMA than with order-0 Huffman codes, so they stay in the graph.
    Not the tensor's first and last bytes: an embedding's edge rows (padding, unused tokens) compress twice as
    well as the rest, and sampling them kept MiniLM's 47 MB word embedding in the graph record, where LZMA
    coded it 8% larger than Huffman, took 30 s to pack and 3 s to load (at 15 MB/s)."""
    if len(data) <= 4 * LZMA_SAMPLE:
        return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS))
    starts = ((np.arange(4) + 0.5) * len(data) / 4 - LZMA_SAMPLE / 2).astype(int)
    sample = b"".join(data[i : i + LZMA_SAMPLE] for i in starts)
    return int(len(data) * len(lzma.compress(sample, format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS)) / len(sample))


def _planes(elements: np.ndarray, k: int, role: str) -> list[_Stream]:
    return [_Stream(p, 256, ("plane", role, k, i)) for i, p in enumerate(_plane_symbols(elements, k))]


def _nibbles(elements: np.ndarray, role: str) -> list[_Stream]:
    return [_Stream(_nibble_symbols(elements), 16, ("nibbles", role))]


def _plane_symbols(elements: np.ndarray, k: int) -> list[np.ndarray]:
    planes = elements.reshape(-1, k).T if k > 1 else elements.reshape(1, -1)
    return [np.ascontiguousarray(p) for p in planes]


def _nibble_symbols(elements: np.ndarray) -> np.ndarray:
    return np.concatenate([elements & 15, elements >> 4])


def _interleaved_nibbles(raw: np.ndarray) -> np.ndarray:
    nibbles = np.empty(2 * len(raw), np.uint8)
    nibbles[0::2], nibbles[1::2] = raw & 15, raw >> 4
    return nibbles


def _rebuild_symbols(plan: _Plan, data: bytes | None) -> None:
    """The chosen coding's symbols again, from the tensor's bytes read a second time (a streamed pack plans
    every tensor first and keeps only counts and codes): the same arrays `_plan` built."""
    if data is None or hashlib.sha256(data).digest() != plan.sha256:
        raise ModelLoadError(f"tensor {plan.tensor.name!r}: its data changed while pack was reading it")
    raw, meta, k = np.frombuffer(data, dtype=np.uint8), plan.meta, plan.meta["k"]
    if plan.encoding == "planes":
        arrays = _plane_symbols(raw, k)
    elif plan.encoding == "nibbles":
        arrays = [_nibble_symbols(raw)]
    elif plan.encoding == "sparse":
        view = raw.view(np.dtype(f"<u{k}"))
        background = np.frombuffer(meta["bg"], dtype=f"<u{k}")[0]
        positions = np.flatnonzero(view != background)
        kept = np.ascontiguousarray(view[positions]).view(np.uint8)
        values = [_nibble_symbols(kept)] if meta["vals"] == "nibbles" else _plane_symbols(kept, k)
        arrays = [encode_gaps(positions)] + values
    else:  # sparse-nibbles
        nibbles = _interleaved_nibbles(raw)
        positions = np.flatnonzero(nibbles != meta["bg"])
        arrays = [encode_gaps(positions), nibbles[positions]]
    if [len(a) for a in arrays] != [s.size for s in plan.streams]:
        raise RuntimeError(f"tensor {plan.tensor.name!r}: rebuilt streams differ from the planned ones")
    for s, symbols in zip(plan.streams, arrays):
        s.symbols = symbols


def _sparse(raw: np.ndarray, k: int):
    """Positions of the non-background elements as gaps, and those elements; None when not worth trying."""
    if k > 8:
        return None
    view = raw.view(np.dtype(f"<u{k}")) if k in (1, 2, 4, 8) else None
    if view is None:
        return None
    if k == 1:  # the most common byte: 0, or 0x88 for symmetric 4-bit weights
        counts = np.bincount(view, minlength=256)
        background = view.dtype.type(np.argmax(counts))
        frequency = counts[background]
    else:  # wider elements: pruned weights are zeros
        background = view.dtype.type(0)
        frequency = len(view) - np.count_nonzero(view)
    if frequency < 0.3 * len(view):  # a gap per element costs at least a bit: only for mostly-background tensors
        return None
    positions = np.flatnonzero(view != background)
    gaps = encode_gaps(positions)
    kept = np.ascontiguousarray(view[positions]).view(np.uint8)
    value_options = [("planes", _planes(kept, k, "sparse"))]
    if k == 1:
        value_options.append(("nibbles", _nibbles(kept, "sparse")))
    value_encoding, value_streams = min(value_options, key=lambda c: _estimate(c[1]))
    extra = {"bg": np.asarray(background).astype(f"<u{k}").tobytes(), "nnz": len(positions), "vals": value_encoding}
    return "sparse", ([_Stream(gaps, 256, ("gaps",))] + value_streams, extra)


def _sparse_nibbles(raw: np.ndarray):
    """Like `sparse`, with 4-bit values as the elements: pruned 4-bit weights are a zero code in half a byte."""
    nibbles = _interleaved_nibbles(raw)
    counts = np.bincount(nibbles, minlength=16)
    background = int(np.argmax(counts))
    if counts[background] < 0.3 * len(nibbles):
        return None
    positions = np.flatnonzero(nibbles != background)
    streams = [_Stream(encode_gaps(positions), 256, ("gaps",)), _Stream(nibbles[positions], 16, ("nibbles", "sparse"))]
    return "sparse-nibbles", (streams, {"bg": background, "nnz": len(positions)})


def _estimate(streams) -> int:
    """Bits a list of streams would cost with a table of its own each (the usual case)."""
    if isinstance(streams, tuple):
        streams = streams[0]
    total = 0
    for s in streams:
        if s.size:
            total += s.own.cost_bits(s.counts) + 8 * len(s.own.to_bytes())
    return total


def _assign_tables(streams: list[_Stream]) -> list[huffman.Table]:
    """Give small streams one table per category where that codes smaller than a table each."""
    tables: list[huffman.Table] = []
    by_category: dict[tuple, list[_Stream]] = {}
    for s in streams:
        s.table_id = None
        if s.size:
            by_category.setdefault(s.category, []).append(s)
    for members in by_category.values():
        if len(members) < 2:
            continue
        shared = huffman.Table.from_counts(sum(m.counts for m in members))
        joining = [m for m in members
                   if shared.cost_bits(m.counts) < m.own.cost_bits(m.counts) + 8 * len(m.own.to_bytes())]
        if len(joining) < 2:
            continue
        shared = huffman.Table.from_counts(sum(m.counts for m in joining))
        own_bits = sum(m.own.cost_bits(m.counts) + 8 * len(m.own.to_bytes()) for m in joining)
        shared_bits = sum(shared.cost_bits(m.counts) for m in joining) + 8 * (len(shared.to_bytes()) + RECORD_FRAMING)
        if shared_bits >= own_bits:
            continue
        table_id = len(tables)
        tables.append(shared)
        for m in joining:
            m.table_id = table_id
            m.table_share_bits = 8 * (len(shared.to_bytes()) + RECORD_FRAMING) // len(joining)
    return tables


def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> gap symbols: g<255 means skip g background elements then one element; 255 skips 255."""
    if not len(positions):
        return np.zeros(0, np.uint8)
    gaps = np.diff(positions, prepend=-1) - 1
    escapes = gaps // GAP_ESCAPE
    symbols = np.full(len(positions) + int(escapes.sum()), GAP_ESCAPE, np.uint8)
    symbols[np.cumsum(escapes + 1) - 1] = gaps % GAP_ESCAPE
    return symbols


def decode_gaps(symbols: np.ndarray) -> np.ndarray:
    is_element = symbols != GAP_ESCAPE
    advance = symbols.astype(np.int64) + is_element
    return (np.cumsum(advance) - 1)[is_element]


# ---------------------------------------------------------------- unpacking

def unpack_model(data: bytes | memoryview, place=None, every_crc: bool = False) -> onnx.ModelProto:
    """Rebuild the packed model in memory; CorruptPack (a ValueError) names anything that does not check out.

    `place(model, index, tensor)`, called for each coded tensor whose bytes go to `raw_data`, before it is
    decoded, may return a writable C-contiguous uint8 array of exactly its bytes: the tensor is decoded (and
    checked) there, and left without data in the model for the caller to point at that array (the session path
    hands such arrays to onnxruntime as they are: no bytes -> protobuf -> array copies). None: `raw_data`."""
    # tensor records skip their CRC: each decodes to bytes whose SHA-256 prefix is checked, a stronger check of
    # the same bytes; a damaged record's CRC is still read, to name the damage (_read_pack, _HashAhead).
    # `every_crc`: pack's check of the file it wrote, which `unpack` and the streamed check will read with every CRC
    records = container.read_records(data, deferred=frozenset() if every_crc else frozenset({container.TENSOR}))
    model, tensors = _read_pack(records, place, hash_ahead=True)[1:]
    protos = tensor_protos(model)
    for index, meta, data in tensors:
        if meta.get("placed"):
            continue
        if meta.get("field") == "float_data":
            protos[index].float_data.extend(np.frombuffer(data, dtype="<f4").tolist())
        else:
            protos[index].raw_data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        del data
    return model


def check_pack(path, manifest: PackManifest) -> None:
    """Decode a written pack record by record and compare it with what was packed (the streamed pack's check):
    the graph record must hold the packed graph, each tensor record decode to bytes whose whole SHA-256 is
    the source tensor's. Memory: one record and its tensor, never the model."""
    with open(path, "rb") as f:
        model, tensors = _read_pack(container.read_file_records(f))[1:]
        if model.SerializeToString() != manifest.graph:
            raise RuntimeError("the written pack's graph record does not decode to the packed graph")
        del model
        done = 0
        for index, meta, data in tensors:  # the decode computed each tensor's whole digest once: compare it
            if done >= len(manifest.tensors) or (index, meta["digest"]) != manifest.tensors[done]:
                raise RuntimeError(f"the written pack's tensor record {done} does not decode to the packed tensor")
            done += 1
            del data
    if done != len(manifest.tensors):
        raise RuntimeError(f"the written pack holds {done} tensor record(s), not {len(manifest.tensors)}")


def _read_pack(records, place=None, hash_ahead: bool = False):
    """(header, graph model, tensors) of a pack's records: tensors yields (index, description, bytes) one
    record at a time, each checked against its digest, and at the end checks the header's counts. The bytes are
    a uint8 array (or what `place` gave, see unpack_model: the description then has `placed` set); the
    description gains `digest`, the whole SHA-256 of the bytes.

    `hash_ahead` (a caller that keeps every tensor until the end anyway): each tensor is yielded decoded but not
    yet checked, and hashed on a thread of its own while the next records decode (SHA-256 is a fifth of a
    session's decoding, and hashlib releases the GIL); the generator ends, or raises the first mismatch in file
    order, only once every tensor has been checked.

    Nothing is allocated for a size the file declares before that size is checked: the graph record decodes to
    at most the bytes its header names, each tensor record must decode to the bytes its graph tensor's dims and
    type take, and each stream's symbol count must follow from those (docs/FORMAT.md, "Reading a pack")."""
    header = _check_header(container.parse_json(_expect(records, container.HEADER, "header")))
    model = _decode_graph(_expect(records, container.GRAPH, "graph"), header)
    _check_locations(model)
    slots = tensor_protos(model)
    budget = None if header.get("external_data") else MAX_GRAPH_BYTES  # one protobuf, when unpacked

    def tensors():
        hashing = _HashAhead() if hash_ahead else None
        try:
            yield from decoded(hashing)
            if hashing is not None:
                hashing.finish()
        except container.CorruptPack:
            if hashing is not None:
                hashing.finish()  # a tensor before this error that did not check out is the first thing wrong
            raise
        finally:
            if hashing is not None:
                hashing.close()

    def decoded(hashing):
        nonlocal budget
        tables, filled, chain = [], set(), {}
        record = None
        try:
            for record in records:
                if record.kind == container.TABLE:
                    tables.append(_table(record.body, record))
                elif record.kind == container.TENSOR:
                    meta, body = container.split_meta(record)
                    index = meta.get("i")
                    where = f"tensor record at byte {record.offset}"
                    if type(index) is not int or not 0 <= index < len(slots) or index in filled:
                        raise container.CorruptPack(f"{where} refers to no tensor of the graph")
                    slot = slots[index]
                    if not _takes_record(slot, meta):
                        raise container.CorruptPack(f"{where} does not fit tensor {index} of the graph")
                    expected = declared_bytes(slot, float_data=meta.get("field") == "float_data")
                    if meta["n"] != expected:
                        raise container.CorruptPack(
                            f"{where} declares {meta['n']} bytes; tensor {slot.name!r:.80} of the graph "
                            f"({_dtype_name(slot.data_type)} {list(slot.dims)!s:.80}) holds {expected}")
                    if budget is not None:
                        budget -= meta["n"]
                        if budget < 0:
                            raise container.CorruptPack(f"{where}: the tensors pass {MAX_GRAPH_BYTES} bytes, more than "
                                                        "a pack without external data can restore (one protobuf)")
                    _check_layout(meta, len(body), where)
                    filled.add(index)
                    out = place(model, index, slot) if place is not None and meta.get("field") != "float_data" else None
                    if out is not None:
                        if out.dtype != np.uint8 or out.shape != (meta["n"],) or not out.flags.c_contiguous:
                            raise ValueError(f"place gave {out.dtype} {out.shape}, not {meta['n']} contiguous bytes")
                        meta["placed"] = True
                    raw = _decode_tensor(meta, body, tables, record, out, check=hashing is None, chain=chain)
                    if hashing is not None:
                        hashing.submit(raw, meta, where, record)
                    yield index, meta, raw  # not kept here: one tensor at a time
                    del raw
                else:
                    raise container.CorruptPack(f"unexpected {record.kind_name} record at byte {record.offset}")
        except container.CorruptPack:
            if record is not None:  # this record, or the one before a broken record head: a deferred CRC, checked
                record.check_crc()  # now, names damage as such (its length may be what was damaged)
            raise
        if len(tables) != header["tables"] or len(filled) != header["tensors"]:
            raise container.CorruptPack(
                f"header promises {header['tensors']} tensor(s) and {header['tables']} table(s); "
                f"the file has {len(filled)} and {len(tables)}")

    return header, model, tensors()


class _HashAhead:
    """Checks decoded tensors against their digests on one thread of its own, in file order (see _read_pack)."""

    def __init__(self):
        self.jobs = queue.Queue(maxsize=4)  # decoding waits rather than keep more than a few tensors for their check
        self.failure: Exception | None = None  # CorruptPack, or whatever else stopped a check
        self.thread: threading.Thread | None = None

    def submit(self, raw: np.ndarray, meta: dict, where: str, record: container.Record) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="pack-digests", daemon=True)
            self.thread.start()
        self.jobs.put((raw, meta, where, record))

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.failure is None:
                try:
                    _checked(*job[:3])
                except container.CorruptPack as exc:
                    try:
                        job[3].check_crc()  # a deferred CRC names damage as such
                        self.failure = exc
                    except container.CorruptPack as damage:
                        self.failure = damage
                except Exception as exc:  # noqa: BLE001 - kept for finish(); the thread must go on taking jobs
                    self.failure = exc
            del job

    def close(self) -> None:
        """Stop the thread once it has checked what it was given."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def finish(self) -> None:
        """Wait for every check; the first tensor that did not check out is a CorruptPack raised here."""
        self.close()
        if self.failure is not None:
            raise self.failure


def _check_header(header: dict) -> dict:
    """The header's fields, each of the type and range a writer gives it (a crafted one may hold anything)."""
    if header.get("format") != FORMAT_NAME:
        raise container.CorruptPack(f"header names format {header.get('format')!r:.60}, not {FORMAT_NAME}")
    if header.get("graph_codec") not in GRAPH_CODECS:
        raise container.CorruptPack(f"header names graph codec {header.get('graph_codec')!r:.60}, "
                                    f"not one of {', '.join(GRAPH_CODECS)}")
    for key in ("tensors", "tables"):
        if type(header.get(key)) is not int or header[key] < 0:
            raise container.CorruptPack(f"header's {key!r} is {header.get(key)!r:.60}, not a count")
    if type(header.get("external_data", False)) is not bool:
        raise container.CorruptPack(f"header's 'external_data' is {header['external_data']!r:.60}, not true or false")
    size = header.get("graph_bytes")
    if size is not None and (type(size) is not int or not 0 < size <= MAX_GRAPH_BYTES):
        raise container.CorruptPack(f"header's 'graph_bytes' is {size!r:.60}, not a size up to {MAX_GRAPH_BYTES}")
    if size is None and header["graph_codec"] == ZSTD_CODEC:
        raise container.CorruptPack("header names the zstd graph codec without 'graph_bytes'")
    return header


def _decode_graph(record, header: dict) -> onnx.ModelProto:
    """The graph record's model. The output of either codec is bounded by the size the header declares (by 2 GiB,
    what one protobuf holds, in LZMA packs that predate it): a 469 KB record once decoded to 3.1 GiB before failing."""
    if header["graph_codec"] == ZSTD_CODEC:
        data = _unzstd_graph(record.body, header["graph_bytes"])
    else:
        data = _unlzma_graph(record.body, header.get("graph_bytes"))
    try:
        return onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf's DecodeError, or a RecursionError on absurd nesting
        raise container.CorruptPack(f"the graph record does not decode ({type(exc).__name__})") from exc


def _unzstd_graph(body, declared: int) -> bytes:
    return _unzstd(body, declared, "the graph record", "its header declares")


def _unzstd_planes(body, n: int, k: int, where: str, out: np.ndarray) -> np.ndarray:
    """A `zstd-planes` record's bytes: its frame decoded (exactly the `n` bytes checked against its graph
    tensor), then the byte planes interleaved back into elements, in `out`."""
    planes = np.frombuffer(_unzstd(body, n, where, "its description declares"), dtype=np.uint8).reshape(k, -1)
    elements = out.reshape(-1, k)
    for j in range(k):  # plane by plane: numpy copies a transposed (n/k, k) array k bytes at a time, 3x slower
        elements[:, j] = planes[j]
    return out


def _unzstd_columns(body, meta: dict, where: str, out: np.ndarray, prefix: bytes | None) -> bytes:
    """A `zstd-columns` record's bytes into `out`: its frame decoded (with `prefix` as zstd's raw-content dictionary
    when the record takes one), each byte plane's columns put back into rows. Returns the frame's content."""
    n, k, rows = meta["n"], meta["k"], meta["rows"]
    content = _unzstd(body, n, where, "its description declares", prefix)
    planes = np.frombuffer(content, dtype=np.uint8).reshape(k, -1, rows)
    elements = out.reshape(rows, -1, k)
    for j in range(k):
        elements[:, :, j] = planes[j].T
    return content


def _unzstd(body, declared: int, what: str, source: str, prefix: bytes | None = None) -> bytes:
    """One zstd frame of exactly `declared` bytes. zstandard allocates the size a frame states and ignores any
    bound it is given, so the frame's stated size is checked first: a frame that states none, or another size,
    or needs a window over ZSTD_MAX_WINDOW, is refused before anything is allocated."""
    try:
        stated = zstandard.frame_content_size(body)
        window = zstandard.get_frame_parameters(body).window_size
    except zstandard.ZstdError as exc:
        raise container.CorruptPack(f"{what} is not a zstd frame") from exc
    if stated != declared:
        raise container.CorruptPack(f"{what}'s zstd frame states {'no size' if stated < 0 else f'{stated} bytes'}"
                                    f", not the {declared} {source}")
    if window > ZSTD_MAX_WINDOW:
        raise container.CorruptPack(f"{what}'s zstd frame needs a {window}-byte window")
    try:
        dictionary = None if prefix is None else zstandard.ZstdCompressionDict(
            prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        data = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW, dict_data=dictionary).decompress(
            body, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise container.CorruptPack(f"{what} does not decode (zstd: {str(exc)[:80]})") from exc
    if len(data) != declared:
        raise container.CorruptPack(f"{what} decodes to {len(data)} bytes, not the {declared} {source}")
    return data


def _unlzma_graph(body, declared: int | None) -> bytes:
    """The raw LZMA2 stream, its output bounded by `declared` (by 2 GiB without it) and required to end there."""
    limit = MAX_GRAPH_BYTES if declared is None else declared
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=GRAPH_FILTERS)
    try:
        data = decoder.decompress(body, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise container.CorruptPack(f"the graph record does not decode ({type(exc).__name__})") from exc
    if len(data) > limit:
        bound = f"the {declared} bytes its header declares" if declared is not None else "what one protobuf holds"
        raise container.CorruptPack(f"the graph record decodes to more than {bound}")
    if not decoder.eof or decoder.unused_data or (declared is not None and len(data) != declared):
        raise container.CorruptPack(f"the graph record decodes to {len(data)} bytes"
                                    f"{' of an unfinished stream' if not decoder.eof else ''}"
                                    f"{', then more bytes' if decoder.unused_data else ''}"
                                    f"{f', not the {declared} its header declares' if declared is not None else ''}")
    return data


def _check_locations(model: onnx.ModelProto) -> None:
    """Refuse external data the graph record places outside the model's folder (an absolute path, `..`), as
    loading an ONNX file does: decoding never reads it, but unpack would write a model that points there."""
    for tensor in _every_tensor(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not _inside_folder(location):
            raise container.CorruptPack(f"the graph's tensor {tensor.name!r:.80} keeps its data at {location!r:.200}, "
                                        "outside the model's folder")


def _every_tensor(model: onnx.ModelProto):
    """tensor_protos, and the tensors of SPARSE_TENSORS attributes (which pack never codes)."""
    yield from tensor_protos(model)
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            for attr in node.attribute:
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def _inside_folder(location: str) -> bool:
    """Whether a relative location stays in its folder whatever the platform: no root, drive or `..` out."""
    path = location.replace("\\", "/")
    if not path or "\0" in path or path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return False
    normal = posixpath.normpath(path)
    return normal not in (".", "..") and not normal.startswith("../")


def _check_layout(meta: dict, body_length: int, where: str) -> None:
    """Each stream's symbol count follows from `n`, `k`, the encoding and `nnz` (a gap stream's within the
    escapes the element count allows), is at most 8 per byte of the stream (a Huffman code is at least a bit),
    and the streams' lengths fill the record: a description cannot make the decoder allocate for more."""
    n, k, streams = meta["n"], meta["k"], meta["streams"]
    counts = [s["c"] for s in streams]
    encoding = meta["enc"]
    if encoding in ("zstd-planes", "zstd-columns"):  # one frame of the n bytes: its stated size is checked when decoded
        if counts != [n] or streams[0]["b"] != body_length or "t" in streams[0]:
            raise container.CorruptPack(f"{where} has {len(counts)} stream(s) of {counts!s:.80} symbols in "
                                        f"{body_length} bytes, not one zstd frame of {n} bytes")
        return
    if encoding == "planes":
        fits = counts == [n // k] * k
    elif encoding == "nibbles":
        fits = counts == [2 * n]
    else:
        nnz = meta["nnz"]
        elements = n // k if encoding == "sparse" else 2 * n
        if encoding == "sparse-nibbles":
            values = [nnz]
        else:
            values = [2 * nnz * k] if meta["vals"] == "nibbles" else [nnz] * k
        fits = (len(counts) == 1 + len(values) and counts[1:] == values
                and nnz <= counts[0] <= nnz + (elements - nnz) // GAP_ESCAPE)
    if not fits:
        raise container.CorruptPack(f"{where} has {len(counts)} stream(s) of {counts!s:.80} symbols, "
                                    f"not what {n} bytes coded as {encoding} take")
    if sum(s["b"] for s in streams) != body_length:
        raise container.CorruptPack(f"{where}'s streams do not fill it: {sum(s['b'] for s in streams)} bytes "
                                    f"declared, {body_length} there")
    if any(s["c"] > 8 * s["b"] for s in streams):
        raise container.CorruptPack(f"{where} declares more symbols than its streams' bytes can code")


def _takes_record(slot: onnx.TensorProto, meta: dict) -> bool:
    """Whether the graph left this tensor's data to a record (pack cleared its only data field), in a field its
    type allows: a description whose index or field was altered would otherwise restore another model."""
    if slot.HasField("raw_data") or any(len(getattr(slot, name)) for name in TYPED_FIELDS):
        return False
    if slot.data_location == onnx.TensorProto.EXTERNAL:  # pack makes a tensor it codes internal
        return False
    return meta.get("field") != "float_data" or slot.data_type == onnx.TensorProto.FLOAT


def read_file_header(path) -> dict:
    """The header record of a pack file, read without the rest of the file."""
    with open(path, "rb") as f:
        return _check_header(container.parse_json(_expect(container.read_file_records(f), container.HEADER, "header")))




def unpack_external(path, staged) -> None:
    """Write a pack that kept its weights external as `staged` (the graph) and `staged.name + ".data"`, one
    tensor at a time: each record decoded, checked against its digest and appended to the data file, as
    model.save would lay the model out (initializers over INLINE_LIMIT external, the others in the graph).
    Memory: the graph and one tensor. CorruptPack names what does not check out."""
    from pathlib import Path

    from onnxshrink.protos import INLINE_LIMIT, set_external

    staged = Path(staged)
    data_path = staged.with_name(staged.name + ".data")
    small = sys.getsizeof(b"")
    with open(path, "rb") as f:
        model, tensors = _read_pack(container.read_file_records(f))[1:]  # header and graph checked: now write
        initializers: list[int] = []
        protos = tensor_protos(model, initializers)
        initializers = set(initializers)
        with open(data_path, "wb") as sink:

            def put(tensor, data) -> None:
                offset = sink.tell()
                sink.write(data)
                set_external(tensor, data_path.name, offset, len(data))

            for index, meta, data in tensors:
                tensor = protos[index]
                if meta.get("field") == "float_data":
                    tensor.float_data.extend(np.frombuffer(data, dtype="<f4").tolist())
                elif index in initializers and len(data) + small >= INLINE_LIMIT:
                    put(tensor, data)
                else:
                    tensor.raw_data = bytes(data)
                del data
            for index in sorted(initializers):  # those the graph record held (small, or coded better by LZMA)
                tensor = protos[index]
                if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= INLINE_LIMIT:
                    put(tensor, tensor.raw_data)
                    tensor.ClearField("raw_data")
            written = sink.tell()
    if not written:
        data_path.unlink()
    onnx.save_model(model, str(staged))


def _expect(records, kind: int, name: str):
    try:
        record = next(records)
    except StopIteration:
        raise container.CorruptPack(f"no {name} record") from None
    if record.kind != kind:
        raise container.CorruptPack(f"expected the {name} record at byte {record.offset}, found a {record.kind_name} record")
    return record


def _table(data, record) -> huffman.Table:
    try:
        table, used = huffman.Table.from_bytes(data)
    except huffman.CorruptStream as exc:
        raise container.CorruptPack(f"bad Huffman table in the record at byte {record.offset}: {exc}") from exc
    if used != len(data):
        raise container.CorruptPack(f"table record at byte {record.offset} has trailing bytes")
    return table


def _decode_tensor(meta: dict, body: memoryview, tables: list, record, out: np.ndarray | None = None,
                   check: bool = True, chain: dict | None = None) -> np.ndarray:
    """A tensor record's bytes as a uint8 array of `n` (into `out` when given: byte planes are decoded straight
    into their places, with no array per plane, no stacking and no copy to bytes), checked against its digest
    (unless `check` is False: the caller checks it, _HashAhead). `chain` carries the content of the previous
    tensor record, when it was `zstd-columns`, from one call to the next (a later record's zstd prefix)."""
    where = f"tensor record at byte {record.offset}"
    chain = {} if chain is None else chain
    previous, chain["content"] = chain.get("content"), None
    try:
        offset = 0
        encoding, k, n = meta["enc"], int(meta["k"]), int(meta["n"])
        if out is None:
            out = np.empty(n, np.uint8)
        if encoding == "zstd-columns":
            if meta["prefix"] and previous is None:
                raise container.CorruptPack(f"{where} takes a prefix, but the record before it is no "
                                            "zstd-columns record")
            chain["content"] = _unzstd_columns(body, meta, where, out, previous if meta["prefix"] else None)
            return _checked(out, meta, where) if check else out
        if encoding == "zstd-planes":
            _unzstd_planes(body, n, k, where, out)
            return _checked(out, meta, where) if check else out
        # planes: stream j fills byte j of every element, in place; other encodings decode their streams first
        targets = out.reshape(-1, k).T if encoding == "planes" else [None] * len(meta["streams"])
        streams = []
        for descriptor, target in zip(meta["streams"], targets):
            count, length = int(descriptor["c"]), int(descriptor["b"])
            data = body[offset : offset + length]
            if len(data) != length:
                raise container.CorruptPack(f"{where} is shorter than its streams")
            offset += length
            streams.append(_decode_stream(descriptor, data, count, tables, where, target))
        if offset != len(body):
            raise container.CorruptPack(f"{where} has trailing bytes")
        if encoding != "planes":
            _assemble(encoding, meta, streams, k, n, where, out)
    except container.CorruptPack:
        raise
    except huffman.CorruptStream as exc:
        raise container.CorruptPack(f"{where}: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as exc:
        raise container.CorruptPack(f"{where} has an invalid description ({type(exc).__name__}: {exc})") from exc
    except MemoryError as exc:  # a size the graph declares (checked), only larger than this machine's memory
        raise container.CorruptPack(f"{where}: its {meta['n']} bytes do not fit in memory") from exc
    return _checked(out, meta, where) if check else out


def _checked(raw: np.ndarray, meta: dict, where: str) -> np.ndarray:
    """The decoded bytes, once their length and SHA-256 prefix match the description; the whole digest is kept in
    `meta["digest"]` (check_pack compares it with the source tensor's: one hash of the bytes, not two)."""
    digest = hashlib.sha256(raw).digest() if len(raw) == meta["n"] else b""
    if digest[: container.DIGEST_BYTES] != meta["sha"]:
        raise container.CorruptPack(f"{where} decodes to different bytes than were packed")
    meta["digest"] = digest
    return raw


def _decode_stream(descriptor, data, count, tables, where, out=None) -> np.ndarray:
    table_id = descriptor.get("t")
    if table_id is None:
        table, used = huffman.Table.from_bytes(data)
        data = data[used:]
    elif isinstance(table_id, int) and 0 <= table_id < len(tables):
        table = tables[table_id]
    else:
        raise container.CorruptPack(f"{where} names a table that does not exist")
    return huffman.decode_with(table, data, count, out=out)


def _assemble(encoding, meta, streams, k, n, where, out: np.ndarray) -> None:
    """The elements of a `nibbles`, `sparse` or `sparse-nibbles` record, from its decoded streams, into `out`."""
    if encoding == "nibbles":
        _join_nibbles(streams[0], out)
        return
    if encoding == "sparse-nibbles":
        positions, background = decode_gaps(streams[0]), meta["bg"]
        nibbles = np.full(2 * n, background, np.uint8)
        if len(positions) != len(streams[1]) or (len(positions) and positions[-1] >= len(nibbles)) or background > 15:
            raise container.CorruptPack(f"{where}: sparse positions do not match its values")
        nibbles[positions] = streams[1]
        if nibbles.max(initial=0) > 15:
            raise container.CorruptPack(f"{where}: nibble values out of range")
        np.bitwise_or(nibbles[0::2], nibbles[1::2] << 4, out=out)
        return
    if encoding == "sparse":
        positions = decode_gaps(streams[0])
        if meta["vals"] == "nibbles":
            values = _join_nibbles(streams[1], np.empty(len(streams[1]) // 2, np.uint8))
        else:
            values = _join_planes(streams[1:], k)
        background = np.frombuffer(meta["bg"], dtype=f"<u{k}")
        elements = out.view(f"<u{k}")
        values = values.view(f"<u{k}")
        if len(positions) != len(values) or (len(positions) and positions[-1] >= len(elements)):
            raise container.CorruptPack(f"{where}: sparse positions do not match its values")
        elements[:] = background[0]
        elements[positions] = values
        return
    raise container.CorruptPack(f"{where} uses unknown encoding {encoding!r}")


def _join_planes(planes, k) -> np.ndarray:
    if len(planes) != k or len({len(p) for p in planes}) > 1:
        raise container.CorruptPack("byte planes of different lengths")
    return np.stack(planes, axis=1).reshape(-1) if k > 1 else planes[0]


def _join_nibbles(symbols: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Low halves, then high halves, into the bytes of `out`."""
    half = len(symbols) // 2
    if len(symbols) % 2 or len(out) != half or (len(symbols) and symbols.max() > 15):
        raise container.CorruptPack("nibble stream is malformed")
    return np.bitwise_or(symbols[:half], symbols[half:] << 4, out=out)
