"""Canonical, length-limited Huffman coding of uint8/uint16 symbol arrays, fast enough to pack whole models.

Why this shape:
- Codes are canonical, so a table is just its code lengths (a few bytes to a few hundred on the wire).
- Lengths come from package-merge under the shortest limit from 12 to 16 bits that costs at most 0.2% more than
  16 bits, so decoding is one lookup in a 2**limit-entry table that stays in cache, four symbols per 64-bit refill.
- A payload is split into independent chunks of 2**16 symbols whose sizes lead the payload, so encode and
  decode run chunks on all cores (the numba kernels release the GIL), four chunks at a time on each; a stream of
  fewer than four such chunks gets shorter ones (`chunk_log`), so that it still fills the decoder's four lanes.
- Bits are packed LSB-first (codes stored bit-reversed), as in deflate: the decoder peeks with a mask.

The numba kernels are compiled (and cached on disk) on first use only, so importing this module is cheap.

Payload of `encode_with` (`count` symbols, chunks of 2**log symbols):
    u8 log | (chunks - 1) x u32 LE word count of each non-final chunk | non-final chunks, whole 64-bit words |
    final chunk, whole bytes. Padding bits are zero.
Stream of `encode`: u8 dtype code (1 = uint8, 2 = uint16) | varint count | [table | payload] when count > 0.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

__all__ = [
    "CorruptStream", "Table", "encode_with", "decode_with", "encode", "decode", "entropy_bits", "histogram",
    "DEFAULT_MAX_LENGTH", "MAX_CODE_LENGTH",
]

DEFAULT_MAX_LENGTH = 12     # the shortest limit tried: a 16 KiB decode table, which fits L1 cache
MAX_CODE_LENGTH = 16        # enough for any alphabet of 65536 symbols; four codes always fit a 64-bit window
MAX_ALPHABET = 1 << 16
CHUNK_LOG = 16              # symbols per independent chunk: 2**16 (fewer in a short stream: chunk_log)
LANE_CHUNK_LOG = 12         # the shortest chunk a short stream is cut into, so that it fills the decoder's lanes
_MIN_CHUNK_LOG, _MAX_CHUNK_LOG = 6, 24
THREADED_SYMBOLS = 1 << 18  # a shorter stream decodes on the calling thread alone
_INVALID = 0x80                 # flag in a decode-table entry whose bit pattern is no code
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.uint16): 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class CorruptStream(ValueError):
    """A table or payload that no encoder of this module could have written."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers: varints, bit reversal, argument checks


def _put_varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CorruptStream("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


_REVERSED_BYTES = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=np.uint32)


def _reverse_bits(values: np.ndarray, width: int) -> np.ndarray:
    """The low `width` (<= 16) bits of each value, mirrored: canonical codes are MSB-first, the stream LSB-first."""
    values = values.astype(np.uint32)
    mirrored16 = (_REVERSED_BYTES[values & 0xFF] << 8) | _REVERSED_BYTES[(values >> 8) & 0xFF]
    return mirrored16 >> (16 - width)


def _as_symbols(symbols) -> np.ndarray:
    symbols = np.asarray(symbols)
    if symbols.dtype not in _DTYPE_CODES:
        raise ValueError(f"symbols must be uint8 or uint16, not {symbols.dtype}")
    if symbols.ndim != 1:
        raise ValueError(f"symbols must be 1-D, not shape {symbols.shape}")
    return np.ascontiguousarray(symbols)


def _as_buffer(data) -> memoryview:
    view = memoryview(data)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# ----------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, eq=False)
class Table:
    """A canonical Huffman code for an alphabet of `len(lengths)` symbols; lengths[s] == 0: s has no code."""

    lengths: np.ndarray

    def __post_init__(self):
        given = np.asarray(self.lengths).reshape(-1)
        if given.size > MAX_ALPHABET:
            raise ValueError(f"alphabet of {given.size} symbols exceeds {MAX_ALPHABET}")
        if given.size and (given.dtype.kind not in "iu" or int(given.min()) < 0 or int(given.max()) > MAX_CODE_LENGTH):
            raise ValueError(f"code lengths must be integers in 0..{MAX_CODE_LENGTH}")
        lengths = given.astype(np.uint8)   # a copy, made read-only below
        if _kraft_sum(lengths) > 1 << MAX_CODE_LENGTH:
            raise ValueError("code lengths violate the Kraft inequality")
        lengths.flags.writeable = False
        object.__setattr__(self, "lengths", lengths)

    def __eq__(self, other):
        return isinstance(other, Table) and np.array_equal(self.lengths, other.lengths)

    def __hash__(self):
        return hash(self.lengths.tobytes())

    @property
    def alphabet(self) -> int:
        return int(self.lengths.size)

    @cached_property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @cached_property
    def _highest_symbol(self) -> int:
        present = np.flatnonzero(self.lengths)
        return int(present[-1]) if present.size else -1

    @classmethod
    def from_counts(cls, counts: np.ndarray, max_length: int | None = None) -> "Table":
        """Optimal code lengths no longer than `max_length` bits (package-merge); a lone symbol gets a 1-bit code.

        max_length None: the shortest limit from 12 to 16 bits that costs at most 0.2% more than 16 bits, since
        decoding slows as its 2**limit-entry table outgrows the cache. If more symbols occur than `max_length`
        bits can tell apart, the limit is raised to the least that can (at most 16 bits for 65536 symbols)."""
        counts = np.asarray(counts)
        if counts.ndim != 1 or counts.size > MAX_ALPHABET:
            raise ValueError(f"counts must be 1-D with at most {MAX_ALPHABET} entries")
        if counts.size and (counts.dtype.kind not in "iu" or int(counts.min()) < 0):
            raise ValueError("counts must be non-negative integers")
        if max_length is not None and not 1 <= max_length <= MAX_CODE_LENGTH:
            raise ValueError(f"max_length must be in 1..{MAX_CODE_LENGTH}")
        lengths = np.zeros(counts.size, dtype=np.uint8)
        present = np.flatnonzero(counts)
        if present.size == 1:
            lengths[present] = 1
        elif present.size > 1:
            weights = counts[present].astype(np.int64)
            least = math.ceil(math.log2(present.size))
            if max_length is not None:
                lengths[present] = _package_merge(weights, max(max_length, least))
            else:
                lengths[present] = _cheapest_short_code(weights, least)
        return cls(lengths)

    def cost_bits(self, counts: np.ndarray) -> int:
        """Payload bits (without chunk headers and padding) that symbols with these counts take."""
        counts = np.asarray(counts).astype(np.int64)
        lengths = np.zeros(max(counts.size, self.lengths.size), dtype=np.int64)
        lengths[: self.lengths.size] = self.lengths
        lengths = lengths[: counts.size]
        if np.any((counts > 0) & (lengths == 0)):
            raise ValueError("counts include symbols that have no code in this table")
        return int(np.dot(counts, lengths))

    # -- serialization: varint alphabet | u8 width | varint segments | (varint gap, varint run)* | packed lengths

    def to_bytes(self) -> bytes:
        """Lengths of runs between long zero gaps, bit-packed at the width of the longest code."""
        out = bytearray()
        _put_varint(self.alphabet, out)
        present = np.flatnonzero(self.lengths)
        if self.alphabet == 0:
            return bytes(out)
        width = int(self.max_length).bit_length()
        out.append(width)
        if width == 0:
            return bytes(out)
        gaps = np.diff(present) - 1
        breaks = np.flatnonzero(gaps * width > 24)    # a new segment costs about two varint bytes
        starts = present[np.concatenate(([0], breaks + 1))]
        ends = present[np.concatenate((breaks, [present.size - 1]))] + 1
        _put_varint(starts.size, out)
        previous_end = 0
        for start, end in zip(starts.tolist(), ends.tolist()):
            _put_varint(start - previous_end, out)
            _put_varint(end - start, out)
            previous_end = end
        values = np.concatenate([self.lengths[s:e] for s, e in zip(starts, ends)])
        bits = (values[:, None] >> np.arange(width, dtype=np.uint8)) & 1
        out += np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little").tobytes()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data) -> tuple["Table", int]:
        """(table, bytes consumed) from the front of `data`; CorruptStream for anything to_bytes cannot write."""
        data = _as_buffer(data)
        alphabet, pos = _get_varint(data, 0)
        if alphabet > MAX_ALPHABET:
            raise CorruptStream(f"alphabet of {alphabet} symbols exceeds {MAX_ALPHABET}")
        lengths = np.zeros(alphabet, dtype=np.uint8)
        if alphabet == 0:
            return cls(lengths), pos
        if pos >= len(data):
            raise CorruptStream("table truncated")
        width = data[pos]
        pos += 1
        if width > MAX_CODE_LENGTH.bit_length():
            raise CorruptStream(f"table length width {width} too large")
        if width == 0:
            return cls(lengths), pos
        segments, pos = _get_varint(data, pos)
        if not 1 <= segments <= alphabet:
            raise CorruptStream("bad segment count in table")
        spans, end = [], 0
        for _ in range(segments):
            gap, pos = _get_varint(data, pos)
            run, pos = _get_varint(data, pos)
            start, end = end + gap, end + gap + run
            if run == 0 or end > alphabet:
                raise CorruptStream("table segment outside the alphabet")
            spans.append((start, end))
        n_values = sum(e - s for s, e in spans)
        n_bytes = (n_values * width + 7) // 8
        if pos + n_bytes > len(data):
            raise CorruptStream("table truncated")
        bits = np.unpackbits(np.frombuffer(data[pos: pos + n_bytes], dtype=np.uint8), bitorder="little")
        values = bits[: n_values * width].reshape(n_values, width).astype(np.uint32) @ (1 << np.arange(width, dtype=np.uint32))
        if int(values.max()) > MAX_CODE_LENGTH:
            raise CorruptStream(f"code length above {MAX_CODE_LENGTH} bits")
        offset = 0
        for start, end in spans:
            lengths[start:end] = values[offset: offset + end - start]
            offset += end - start
        if _kraft_sum(lengths) > 1 << MAX_CODE_LENGTH:
            raise CorruptStream("code lengths violate the Kraft inequality")
        # Checked as __post_init__ checks a table (alphabet, lengths in range, Kraft): not twice per stream.
        lengths.flags.writeable = False
        table = object.__new__(cls)
        object.__setattr__(table, "lengths", lengths)
        return table, pos + n_bytes

    # -- derived arrays for the kernels, built once per table

    @cached_property
    def _canonical(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(symbols, lengths, left-aligned MSB-first code values at max_length bits), in canonical order."""
        present = np.flatnonzero(self.lengths)
        lengths = self.lengths[present].astype(np.int64)
        order = np.lexsort((present, lengths))
        symbols, lengths = present[order], lengths[order]
        spans = np.left_shift(1, self.max_length - lengths)
        return symbols, lengths, np.cumsum(spans) - spans

    def _encoder_arrays(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(codes, lengths) as uint64 indexed by every value `dtype` can hold; 0-length = no code."""
        size = 1 << (8 * dtype.itemsize)
        codes, lengths = np.zeros(size, np.uint64), np.zeros(size, np.uint64)
        symbols, code_lengths, starts = self._canonical
        keep = symbols < size
        codes[symbols[keep]] = _reverse_bits(starts[keep], self.max_length)
        lengths[symbols[keep]] = code_lengths[keep]
        return codes, lengths

    def _decode_table(self, dtype: np.dtype) -> np.ndarray:
        """2**max_length entries indexed by the next max_length stream bits: symbol << 8 | invalid flag | length.

        uint16 entries for uint8 output: half the cache, so a 14-bit table still fits L1."""
        cached = self._decode_tables.get(dtype.itemsize)
        if cached is not None:
            return cached
        width = self.max_length
        symbols, lengths, starts = self._canonical
        entry_type = np.uint16 if dtype.itemsize == 1 else np.uint32
        entries = ((symbols << 8) | lengths).astype(entry_type)
        by_prefix = np.full(1 << width, _INVALID | width, dtype=entry_type)
        spans = np.left_shift(1, width - lengths)
        by_prefix[: int(spans.sum())] = np.repeat(entries, spans)
        table = by_prefix[_reverse_bits(np.arange(1 << width), width)]
        self._decode_tables[dtype.itemsize] = table
        return table

    @cached_property
    def _decode_tables(self) -> dict:
        return {}


def _kraft_sum(lengths: np.ndarray) -> int:
    """Sum of 2**(16 - length) over coded symbols: at most 2**16 for a decodable prefix code."""
    coded = lengths[lengths > 0].astype(np.int64)
    return int(np.left_shift(1, MAX_CODE_LENGTH - np.minimum(coded, MAX_CODE_LENGTH)).sum())


def _package_merge(weights: np.ndarray, limit: int) -> np.ndarray:
    """Optimal code lengths <= limit for positive weights (len >= 2, <= 2**limit), vectorized package-merge.

    Level j's list merges the sorted leaves with pairs ("packages") of level j-1's list. The optimal code takes
    the first 2n-2 items of the last list; a package taken at level j takes its two items at level j-1, and a
    symbol's length is the number of levels at which its leaf is taken. Leaves taken are always the lightest."""
    n = weights.size
    order = np.argsort(weights, kind="stable")
    leaves = weights[order]
    leaf_positions = [np.arange(n)]
    items = leaves
    for _ in range(limit - 1):
        packages = items[0: items.size - 1: 2] + items[1: items.size: 2]
        leaf_at = np.arange(n) + np.searchsorted(packages, leaves, side="left")
        package_at = np.arange(packages.size) + np.searchsorted(leaves, packages, side="right")
        items = np.empty(n + packages.size, dtype=np.int64)
        items[leaf_at], items[package_at] = leaves, packages
        leaf_positions.append(leaf_at)
    leaves_taken = []
    taken = 2 * n - 2
    for positions in reversed(leaf_positions):
        leaves_here = int(np.searchsorted(positions, taken, side="left"))
        leaves_taken.append(leaves_here)
        taken = 2 * (taken - leaves_here)
    if taken != 0:
        raise AssertionError("package-merge did not resolve")  # unreachable for n <= 2**limit
    by_rank = len(leaves_taken) - np.searchsorted(np.sort(leaves_taken), np.arange(n), side="right")
    lengths = np.empty(n, dtype=np.uint8)
    lengths[order] = by_rank
    return lengths


def _cheapest_short_code(weights: np.ndarray, least: int) -> np.ndarray:
    """Lengths under the smallest limit in DEFAULT_MAX_LENGTH..16 that stays within 0.2% of the 16-bit cost."""
    longest = _package_merge(weights, MAX_CODE_LENGTH)
    budget = int(np.dot(weights, longest)) * 1.002
    for limit in range(max(DEFAULT_MAX_LENGTH, least), MAX_CODE_LENGTH):
        if int(longest.max()) <= limit:
            break
        lengths = _package_merge(weights, limit)
        if np.dot(weights, lengths) <= budget:
            return lengths
    return longest


def entropy_bits(counts) -> float:
    """Order-0 entropy of a whole stream with these symbol counts, in bits (a sum, not per symbol)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    return float(-(counts * np.log2(counts / total)).sum()) if total else 0.0


# ----------------------------------------------------------------------------------------------------------
# Kernels: plain Python here, compiled with numba on first use (see _kernels)


def _histogram_kernel(symbols, counts):
    """Four interleaved sub-histograms, so runs of one symbol do not serialize on one counter."""
    n = symbols.shape[0]
    quads = n - n % 4
    for i in range(0, quads, 4):
        counts[0, symbols[i]] += 1
        counts[1, symbols[i + 1]] += 1
        counts[2, symbols[i + 2]] += 1
        counts[3, symbols[i + 3]] += 1
    for i in range(quads, n):
        counts[0, symbols[i]] += 1


def _encode_kernel(symbols, codes, lengths, chunk_size, first_chunk, last_chunk, words, chunk_words, chunk_bits):
    """Chunk c goes to words[c * chunk_words:], LSB-first; returns the shortest code length used (0: no code)."""
    n = symbols.shape[0]
    shortest = np.uint64(64)
    for c in range(first_chunk, last_chunk):
        w = c * chunk_words
        acc = np.uint64(0)
        filled = np.uint64(0)
        for j in range(c * chunk_size, min(n, (c + 1) * chunk_size)):
            s = symbols[j]
            code = codes[s]
            length = lengths[s]
            shortest = min(shortest, length)
            acc |= code << filled
            filled += length
            if filled >= 64:
                words[w] = acc
                w += 1
                filled -= np.uint64(64)
                acc = code >> (length - filled)
        if filled > 0:
            words[w] = acc
        chunk_bits[c] = (w - c * chunk_words) * 64 + np.int64(filled)
    return shortest


def _decode_kernel(words, table, peek_bits, chunk_size, count, chunk_starts, chunk_ends, first_chunk, last_chunk,
                   out, status):
    """Decode chunks [first, last) from bit offsets chunk_starts into out; status[c]: 0 ok, 1 invalid code,
    2 chunk overrun or underrun, 3 nonzero padding. Never reads past chunk_ends[c] + 128 bits.

    Four chunks at a time, in lanes w, x, y, z: each lookup waits on the previous code's length (a chain of
    about ten cycles), so four independent chains keep the core busy (bench/codec_speed.py: 1.5-3x the symbols
    per second of one chain).
    The last symbols of each chunk, and the chunks of a group of fewer than four, finish one chain at a time."""
    mask = (np.uint64(1) << np.uint64(peek_bits)) - np.uint64(1)
    length_mask = 0x1F
    n_chunks = (count + chunk_size - 1) // chunk_size
    for c in range(first_chunk, last_chunk, 4):
        iw = stopw = posw = flagsw = 0
        endw = -1  # an absent lane: the four-lane loop does not start
        if c < last_chunk:
            iw = c * chunk_size
            stopw = min(count, iw + chunk_size)
            posw, endw = chunk_starts[c], chunk_ends[c]
        ix = stopx = posx = flagsx = 0
        endx = -1  # an absent lane: the four-lane loop does not start
        if c + 1 < last_chunk:
            ix = (c + 1) * chunk_size
            stopx = min(count, ix + chunk_size)
            posx, endx = chunk_starts[c + 1], chunk_ends[c + 1]
        iy = stopy = posy = flagsy = 0
        endy = -1  # an absent lane: the four-lane loop does not start
        if c + 2 < last_chunk:
            iy = (c + 2) * chunk_size
            stopy = min(count, iy + chunk_size)
            posy, endy = chunk_starts[c + 2], chunk_ends[c + 2]
        iz = stopz = posz = flagsz = 0
        endz = -1  # an absent lane: the four-lane loop does not start
        if c + 3 < last_chunk:
            iz = (c + 3) * chunk_size
            stopz = min(count, iz + chunk_size)
            posz, endz = chunk_starts[c + 3], chunk_ends[c + 3]
        while (iw + 4 <= stopw and posw <= endw and ix + 4 <= stopx and posx <= endx
               and iy + 4 <= stopy and posy <= endy and iz + 4 <= stopz and posz <= endz):
            shiftw = np.uint64(posw & 63)
            shiftx = np.uint64(posx & 63)
            shifty = np.uint64(posy & 63)
            shiftz = np.uint64(posz & 63)
            bitsw = ((words[posw >> 6] >> shiftw)
                     | ((words[(posw >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shiftw)))
            bitsx = ((words[posx >> 6] >> shiftx)
                     | ((words[(posx >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shiftx)))
            bitsy = ((words[posy >> 6] >> shifty)
                     | ((words[(posy >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shifty)))
            bitsz = ((words[posz >> 6] >> shiftz)
                     | ((words[(posz >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shiftz)))
            w0 = table[bitsw & mask]; x0 = table[bitsx & mask]; y0 = table[bitsy & mask]; z0 = table[bitsz & mask]
            bitsw >>= np.uint64(w0 & length_mask); bitsx >>= np.uint64(x0 & length_mask)
            bitsy >>= np.uint64(y0 & length_mask); bitsz >>= np.uint64(z0 & length_mask)
            w1 = table[bitsw & mask]; x1 = table[bitsx & mask]; y1 = table[bitsy & mask]; z1 = table[bitsz & mask]
            bitsw >>= np.uint64(w1 & length_mask); bitsx >>= np.uint64(x1 & length_mask)
            bitsy >>= np.uint64(y1 & length_mask); bitsz >>= np.uint64(z1 & length_mask)
            w2 = table[bitsw & mask]; x2 = table[bitsx & mask]; y2 = table[bitsy & mask]; z2 = table[bitsz & mask]
            bitsw >>= np.uint64(w2 & length_mask); bitsx >>= np.uint64(x2 & length_mask)
            bitsy >>= np.uint64(y2 & length_mask); bitsz >>= np.uint64(z2 & length_mask)
            w3 = table[bitsw & mask]; x3 = table[bitsx & mask]; y3 = table[bitsy & mask]; z3 = table[bitsz & mask]
            out[iw] = w0 >> 8; out[iw + 1] = w1 >> 8; out[iw + 2] = w2 >> 8; out[iw + 3] = w3 >> 8
            flagsw |= w0 | w1 | w2 | w3
            posw += np.int64((w0 & length_mask) + (w1 & length_mask) + (w2 & length_mask)
                             + (w3 & length_mask))
            iw += 4
            out[ix] = x0 >> 8; out[ix + 1] = x1 >> 8; out[ix + 2] = x2 >> 8; out[ix + 3] = x3 >> 8
            flagsx |= x0 | x1 | x2 | x3
            posx += np.int64((x0 & length_mask) + (x1 & length_mask) + (x2 & length_mask)
                             + (x3 & length_mask))
            ix += 4
            out[iy] = y0 >> 8; out[iy + 1] = y1 >> 8; out[iy + 2] = y2 >> 8; out[iy + 3] = y3 >> 8
            flagsy |= y0 | y1 | y2 | y3
            posy += np.int64((y0 & length_mask) + (y1 & length_mask) + (y2 & length_mask)
                             + (y3 & length_mask))
            iy += 4
            out[iz] = z0 >> 8; out[iz + 1] = z1 >> 8; out[iz + 2] = z2 >> 8; out[iz + 3] = z3 >> 8
            flagsz |= z0 | z1 | z2 | z3
            posz += np.int64((z0 & length_mask) + (z1 & length_mask) + (z2 & length_mask)
                             + (z3 & length_mask))
            iz += 4
        for lane in range(4):
            if c + lane >= last_chunk:
                break
            if lane == 0:
                i, stop, pos, end, flags = iw, stopw, posw, endw, flagsw
            elif lane == 1:
                i, stop, pos, end, flags = ix, stopx, posx, endx, flagsx
            elif lane == 2:
                i, stop, pos, end, flags = iy, stopy, posy, endy, flagsy
            else:
                i, stop, pos, end, flags = iz, stopz, posz, endz, flagsz
            chunk = c + lane
            while i + 4 <= stop and pos <= end:
                shift = np.uint64(pos & 63)
                bits = (words[pos >> 6] >> shift) | ((words[(pos >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shift))
                e0 = table[bits & mask]
                l0 = np.uint64(e0 & length_mask)
                bits >>= l0
                e1 = table[bits & mask]
                l1 = np.uint64(e1 & length_mask)
                bits >>= l1
                e2 = table[bits & mask]
                l2 = np.uint64(e2 & length_mask)
                bits >>= l2
                e3 = table[bits & mask]
                l3 = np.uint64(e3 & length_mask)
                out[i] = e0 >> 8
                out[i + 1] = e1 >> 8
                out[i + 2] = e2 >> 8
                out[i + 3] = e3 >> 8
                flags |= e0 | e1 | e2 | e3
                pos += np.int64(l0 + l1 + l2 + l3)
                i += 4
            while i < stop and pos <= end:
                shift = np.uint64(pos & 63)
                bits = (words[pos >> 6] >> shift) | ((words[(pos >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shift))
                e0 = table[bits & mask]
                out[i] = e0 >> 8
                flags |= e0
                pos += np.int64(e0 & length_mask)
                i += 1
            granule = 8 if chunk == n_chunks - 1 else 64
            padding = end - pos
            if flags & 0x80:
                status[chunk] = 1
            elif i < stop or padding < 0 or padding >= granule:
                status[chunk] = 2
            elif padding > 0:
                shift = np.uint64(pos & 63)
                bits = (words[pos >> 6] >> shift) | ((words[(pos >> 6) + 1] << np.uint64(1)) << (np.uint64(63) - shift))
                status[chunk] = 3 if bits & ((np.uint64(1) << np.uint64(padding)) - np.uint64(1)) else 0
            else:
                status[chunk] = 0


_compiled = None
_pool = None
_setup_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child (compress's candidate workers): the parent's pool threads are not there, and a map on the
    inherited pool would wait for them forever; the child starts its own."""
    global _pool, _setup_lock
    _pool, _setup_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _kernels() -> SimpleNamespace:
    """The numba-compiled kernels; numba is imported (and compiles or loads its disk cache) on first use only."""
    global _compiled
    with _setup_lock:
        if _compiled is None:
            import numba

            jit = numba.njit(cache=True, nogil=True)
            _compiled = SimpleNamespace(histogram=jit(_histogram_kernel), encode=jit(_encode_kernel),
                                        decode=jit(_decode_kernel))
    return _compiled


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _in_parallel(work, n_items: int, min_part: int = 1, grain: int = 1) -> list:
    """work(lo, hi) over contiguous slices of range(n_items), on every core; the kernels release the GIL.

    With `grain` > 1 (the decoder's four lanes) slices are whole grains, and with items enough for a grain per
    core, up to four slices per core: a core the machine lends to another job then holds up a quarter of its
    share, not all of it. The calling thread takes the first slice itself rather than waiting idle."""
    global _pool
    threads = _threads()
    parts = min(threads, n_items // min_part)
    if grain > 1:  # never split a group of lanes: two threads each running two chunks one chain at a time
        groups = -(-n_items // grain)
        parts = min(4 * threads, groups) if n_items >= grain * threads else min(threads, groups)
    if parts <= 1:
        return [work(0, n_items)]
    with _setup_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="huffman")
        pool = _pool
    bounds = [n_items * k // parts for k in range(parts + 1)]
    if grain > 1:
        bounds = [min(n_items, -(-b // grain) * grain) for b in bounds]
    rest = [pool.submit(work, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    first = work(bounds[0], bounds[1])
    return [first] + [future.result() for future in rest]


# ----------------------------------------------------------------------------------------------------------
# Public coding functions


def histogram(symbols: np.ndarray) -> np.ndarray:
    """int64 counts of each value, trimmed after the largest symbol present (bincount without the int64 copy)."""
    symbols = _as_symbols(symbols)
    size = 1 << (8 * symbols.itemsize)
    kernel = _kernels().histogram

    def count(lo, hi):
        counts = np.zeros((4, size), dtype=np.int64)
        kernel(symbols[lo:hi], counts)
        return counts.sum(axis=0)

    counts = sum(_in_parallel(count, symbols.size, min_part=1 << CHUNK_LOG))
    present = np.flatnonzero(counts)
    return counts[: present[-1] + 1] if present.size else counts[:0]


def chunk_log(count: int) -> int:
    """log2 of the symbols per chunk of a stream of `count` symbols: CHUNK_LOG, or shorter chunks, at least four,
    where a stream has fewer than four of 2**CHUNK_LOG: the decoder runs four chunks at a time in four lanes and a
    lone chunk at a third of that speed, and most streams of a conv net are shorter than 2**18 symbols (ddddocr's
    common_det). Never under 2**LANE_CHUNK_LOG symbols: each further chunk costs 4 bytes of chunk table and up to 7
    of padding, under 0.2% of a chunk's codes. Readers take any size the stream header names (6 to 24)."""
    if count >= 4 << CHUNK_LOG:
        return CHUNK_LOG
    return max(LANE_CHUNK_LOG, (count // 4).bit_length() - 1)


def encode_with(table: Table, symbols: np.ndarray) -> bytes:
    """The payload of `symbols` under `table` (no table, no count); ValueError if a symbol has no code."""
    symbols = _as_symbols(symbols)
    count = symbols.size
    if count == 0:
        return b""
    codes, lengths = table._encoder_arrays(symbols.dtype)
    log = chunk_log(count)
    chunk_size = 1 << log
    n_chunks = -(-count // chunk_size)
    chunk_words = (chunk_size * MAX_CODE_LENGTH) // 64 + 1
    words = np.empty(n_chunks * chunk_words, dtype=np.uint64)   # pages beyond what is written are never touched
    chunk_bits = np.zeros(n_chunks, dtype=np.int64)
    kernel = _kernels().encode
    shortest = min(_in_parallel(
        lambda lo, hi: kernel(symbols, codes, lengths, chunk_size, lo, hi, words, chunk_words, chunk_bits),
        n_chunks))
    if shortest == 0:
        missing = np.setdiff1d(np.unique(symbols), np.flatnonzero(lengths))
        raise ValueError(f"symbols without a code in the table: {missing[:8].tolist()}")
    used_words = -(-chunk_bits // 64)
    header = np.uint8(log).tobytes() + used_words[:-1].astype("<u4").tobytes()
    byte_view = words.view(np.uint8)
    parts = [header]
    for c in range(n_chunks - 1):
        parts.append(byte_view[8 * c * chunk_words: 8 * (c * chunk_words + used_words[c])])
    last = 8 * (n_chunks - 1) * chunk_words
    parts.append(byte_view[last: last + (int(chunk_bits[-1]) + 7) // 8])
    return b"".join(parts)


def decode_with(table: Table, payload, count: int, dtype=np.uint8, out: np.ndarray | None = None) -> np.ndarray:
    """Exactly `count` symbols of `dtype` from a payload of encode_with; CorruptStream if it cannot be one.

    `out`, a writable 1-D array of `count` elements of `dtype` (strided or not: one byte plane of a tensor's
    buffer), receives them in place of a new array: a pack's weights are decoded straight into their final
    buffer. On CorruptStream its contents are unspecified."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype must be uint8 or uint16, not {dtype}")
    if count < 0:
        raise ValueError("count must be non-negative")
    if out is not None and (out.dtype != dtype or out.shape != (count,) or not out.flags.writeable):
        raise ValueError(f"out must be a writable 1-D {dtype} array of {count} elements")
    data = _as_buffer(payload)
    if count == 0:
        if len(data):
            raise CorruptStream("payload bytes for zero symbols")
        return np.zeros(0, dtype=dtype) if out is None else out
    if table.max_length == 0:
        raise CorruptStream("symbols to decode but the table has no codes")
    if table.alphabet > 1 << (8 * dtype.itemsize) and table._highest_symbol >= 1 << (8 * dtype.itemsize):
        raise ValueError(f"table codes symbols that {dtype} cannot hold")
    if len(data) < 1 or not _MIN_CHUNK_LOG <= data[0] <= _MAX_CHUNK_LOG:
        raise CorruptStream("payload header missing or bad chunk size")
    chunk_size = 1 << data[0]
    n_chunks = -(-count // chunk_size)
    header = 1 + 4 * (n_chunks - 1)
    if len(data) <= header or count > 8 * len(data):
        raise CorruptStream("payload too short for its symbol count")
    data_bytes = len(data) - header
    if n_chunks == 1:  # most streams of a conv net: no chunk table to read
        starts, ends = np.zeros(1, np.int64), np.full(1, 8 * data_bytes, np.int64)
    else:
        chunk_words = np.frombuffer(data[1:header], dtype="<u4").astype(np.int64)
        final_bytes = data_bytes - 8 * int(chunk_words.sum())
        if np.any(chunk_words == 0) or final_bytes <= 0:
            raise CorruptStream("chunk sizes do not match the payload")
        starts = 64 * np.concatenate(([0], np.cumsum(chunk_words))).astype(np.int64)
        ends = np.append(starts[1:], starts[-1] + 8 * final_bytes)
    words = np.empty((data_bytes + 7) // 8 + 2, dtype=np.uint64)  # the kernel reads up to two words past the end
    words[-3:] = 0
    words.view(np.uint8)[:data_bytes] = np.frombuffer(data[header:], dtype=np.uint8)
    if out is None:
        out = np.empty(count, dtype=dtype)
    status = np.zeros(n_chunks, dtype=np.uint8)
    decode_table = table._decode_table(dtype)
    kernel = _kernels().decode
    if count < THREADED_SYMBOLS:  # a thread's hand-off costs what decoding a few thousand symbols does
        kernel(words, decode_table, table.max_length, chunk_size, count, starts, ends, 0, n_chunks, out, status)
    else:
        _in_parallel(lambda lo, hi: kernel(words, decode_table, table.max_length, chunk_size, count,
                                           starts, ends, lo, hi, out, status), n_chunks, grain=4)
    if status.any():
        reason = {1: "invalid code", 2: "chunk size mismatch", 3: "nonzero padding"}[int(status.max())]
        raise CorruptStream(f"payload corrupt: {reason} in chunk {int(np.flatnonzero(status)[0])}")
    return out


def encode(symbols: np.ndarray) -> bytes:
    """A self-contained stream: dtype, count, the table fitted to these symbols, and the payload."""
    symbols = _as_symbols(symbols)
    out = bytearray([_DTYPE_CODES[symbols.dtype]])
    _put_varint(symbols.size, out)
    if symbols.size:
        table = Table.from_counts(histogram(symbols))
        out += table.to_bytes()
        out += encode_with(table, symbols)
    return bytes(out)


def decode(stream) -> np.ndarray:
    """The array `encode` was given (same dtype and values); CorruptStream on truncation or garbage."""
    data = _as_buffer(stream)
    if len(data) < 1 or data[0] not in _CODE_DTYPES:
        raise CorruptStream("missing or unknown dtype code")
    dtype = _CODE_DTYPES[data[0]]
    count, pos = _get_varint(data, 1)
    if count == 0:
        if pos != len(data):
            raise CorruptStream("bytes after an empty stream")
        return np.zeros(0, dtype=dtype)
    table, used = Table.from_bytes(data[pos:])
    if table.alphabet > 1 << (8 * dtype.itemsize):
        raise CorruptStream(f"table alphabet {table.alphabet} too large for {dtype}")
    return decode_with(table, data[pos + used:], count, dtype)
