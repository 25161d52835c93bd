"""The Huffman codec on its own: round trips, tables, the length limit, size against entropy, corrupt input."""

from __future__ import annotations

import heapq
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from onnxshrink.codec import huffman
from onnxshrink.codec.huffman import CorruptStream, Table, decode, decode_with, encode, encode_with, entropy_bits

# Like the suite's profiles: few examples by default, many under HYPOTHESIS_PROFILE=long (make fuzz).
FEW = settings(max_examples=400 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 30, deadline=None,
               suppress_health_check=list(HealthCheck))


def make_symbols(seed: int, size: int, dtype, shape: str, alphabet: int) -> np.ndarray:
    """Seeded symbols of one of the shapes that quantized weights take."""
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        values = rng.integers(0, alphabet, size)
    elif shape == "geometric":
        values = rng.geometric(rng.uniform(0.05, 0.9), size) - 1
    else:  # Laplacian around zero, stored as two's complement like int8/int16 weights
        values = np.round(rng.laplace(0, rng.uniform(0.3, 40), size)).astype(np.int64)
    return (values % alphabet).astype(dtype)


@st.composite
def symbol_arrays(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    alphabet = draw(st.sampled_from([1, 2, 16, 256] + ([1000, 65536] if dtype is np.uint16 else [])))
    size = draw(st.sampled_from([0, 1, 2, 3, 5, 100, 4097, 70_000]))
    shape = draw(st.sampled_from(["uniform", "geometric", "laplace"]))
    return make_symbols(draw(st.integers(0, 2**16)), size, dtype, shape, alphabet)


def huffman_code(counts) -> tuple[int, int]:
    """(cost, longest code) of an unlimited optimal Huffman code, by the textbook heap construction."""
    heap = [(int(c), 0) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        (a, depth_a), (b, depth_b) = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, (a + b, max(depth_a, depth_b) + 1))
    return cost, heap[0][1]


@FEW
@given(symbol_arrays())
def test_stream_round_trip(symbols):
    out = decode(encode(symbols))
    assert out.dtype == symbols.dtype
    np.testing.assert_array_equal(out, symbols)


@FEW
@given(symbol_arrays())
def test_payload_round_trip_and_cost(symbols):
    counts = np.bincount(symbols, minlength=1)
    table = Table.from_counts(counts)
    payload = encode_with(table, symbols)
    np.testing.assert_array_equal(decode_with(table, payload, symbols.size, symbols.dtype), symbols)
    if 0 < symbols.size <= 1 << huffman.chunk_log(symbols.size):  # one chunk: no chunk table, no padding
        assert len(payload) == 1 + math.ceil(table.cost_bits(counts) / 8)


def test_edge_arrays_round_trip():
    cases = [np.zeros(0, np.uint8), np.zeros(0, np.uint16), np.array([7], np.uint8), np.array([65535], np.uint16),
             np.full(100_000, 200, np.uint8), np.arange(256, dtype=np.uint8).repeat(3),
             np.arange(65536, dtype=np.uint16)]
    for symbols in cases:
        out = decode(encode(symbols))
        assert out.dtype == symbols.dtype
        np.testing.assert_array_equal(out, symbols)
    assert encode_with(Table.from_counts(np.zeros(0, np.int64)), np.zeros(0, np.uint8)) == b""
    assert len(encode(np.full(100_000, 200, np.uint8))) < 100_000 // 8 + 40


def test_one_symbol_gets_one_bit():
    assert Table.from_counts(np.array([0, 0, 5])).lengths.tolist() == [0, 0, 1]
    assert Table.from_counts(np.array([3])).lengths.tolist() == [1]
    assert Table.from_counts(np.zeros(4, np.int64)).lengths.tolist() == [0, 0, 0, 0]


@FEW
@given(st.integers(0, 2**16), st.sampled_from([2, 3, 16, 256, 3000]), st.sampled_from([None, 1, 4, 8, 12, 16]))
def test_length_limit_and_optimality(seed, alphabet, max_length):
    rng = np.random.default_rng(seed)
    counts = (rng.geometric(0.05, alphabet) ** rng.uniform(1, 4)).astype(np.int64) * (rng.random(alphabet) < 0.9)
    counts[:2] += 1
    table = Table.from_counts(counts, max_length)
    present = int(np.count_nonzero(counts))
    limit = max(max_length or huffman.MAX_CODE_LENGTH, math.ceil(math.log2(present)))
    assert table.max_length <= limit
    assert np.array_equal(table.lengths > 0, counts > 0)
    assert huffman._kraft_sum(table.lengths) == 1 << huffman.MAX_CODE_LENGTH  # complete: no wasted code space
    optimal_cost, optimal_longest = huffman_code(counts)
    if max_length is not None and optimal_longest <= limit:
        assert table.cost_bits(counts) == optimal_cost
    if max_length is None:   # the limit that keeps the decode table small may cost up to 0.2%
        assert table.cost_bits(counts) <= 1.002 * Table.from_counts(counts, 16).cost_bits(counts)


@FEW
@given(st.integers(0, 2**16), st.sampled_from([1, 2, 16, 256, 700, 65536]), st.floats(0.0, 0.99))
def test_table_bytes_round_trip(seed, alphabet, sparsity):
    rng = np.random.default_rng(seed)
    counts = rng.geometric(0.1, alphabet) * (rng.random(alphabet) >= sparsity)
    table = Table.from_counts(counts)
    data = table.to_bytes()
    assert Table.from_bytes(data + b"tail") == (table, len(data))
    assert Table.from_bytes(memoryview(data)) == (table, len(data))


def test_small_tables_are_small():
    assert len(Table.from_counts(np.array([5, 1, 1, 9])).to_bytes()) <= 6
    assert len(Table.from_counts(np.ones(16, np.int64)).to_bytes()) <= 13
    sparse = np.zeros(65536, np.int64)
    sparse[[0, 1, 2, 65534, 65535]] = [9, 4, 1, 2, 3]   # int16 weights near zero, as uint16
    assert len(Table.from_counts(sparse).to_bytes()) <= 16


def test_size_within_two_percent_of_entropy_plus_table():
    rng = np.random.default_rng(0)
    symbols = np.clip(np.round(rng.laplace(0, 6, 1_000_000)), -128, 127).astype(np.int8).view(np.uint8)
    counts = np.bincount(symbols)
    table_bits = 8 * len(Table.from_counts(counts).to_bytes())
    assert 8 * len(encode(symbols)) <= 1.02 * (entropy_bits(counts) + table_bits)


def test_entropy_bits():
    assert entropy_bits(np.array([5, 5, 5, 5])) == pytest.approx(40.0)
    assert entropy_bits(np.array([0, 7])) == 0.0
    assert entropy_bits(np.zeros(0)) == 0.0


def test_bad_arguments_raise_value_error():
    table = Table.from_counts(np.array([1, 1]))
    with pytest.raises(ValueError, match="without a code"):
        encode_with(table, np.array([0, 1, 2], np.uint8))
    for bad in (np.array([1, 2], np.int8), np.zeros((2, 2), np.uint8), np.array([1.0])):
        with pytest.raises(ValueError):
            encode(bad)
    with pytest.raises(ValueError):
        Table(np.array([1, 1, 1]))   # Kraft sum 3/2
    with pytest.raises(ValueError):
        table.cost_bits(np.array([1, 1, 1]))


def test_kraft_violation_in_bytes_rejected():
    # alphabet 3 | width 1 | 1 segment: gap 0, run 3 | lengths 1, 1, 1 packed
    with pytest.raises(CorruptStream, match="Kraft"):
        Table.from_bytes(bytes([3, 1, 1, 0, 3, 0b111]))
    # alphabet 2 | width 5 | lengths 17, 1: longer than any code may be
    with pytest.raises(CorruptStream):
        Table.from_bytes(bytes([2, 5, 1, 0, 2, 17 | (1 << 5), 0]))


def test_truncated_tables_raise():
    table = Table.from_counts(np.random.default_rng(1).geometric(0.1, 300))
    data = table.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(CorruptStream):
            Table.from_bytes(data[:cut])


@pytest.mark.parametrize("size", [1, 1000, 150_000])
def test_truncated_or_padded_streams_raise(size):
    symbols = make_symbols(size, size, np.uint8, "laplace", 256)
    stream = encode(symbols)
    cuts = range(len(stream)) if len(stream) < 400 else [0, 1, 2, 5, 10, 100, len(stream) // 2, len(stream) - 1]
    for cut in cuts:
        with pytest.raises(CorruptStream):
            decode(stream[:cut])
    for extra in (b"\0", b"\1", b"\0" * 8):
        with pytest.raises(CorruptStream):
            decode(stream + extra)


@FEW
@given(st.integers(0, 2**16), st.sampled_from([np.uint8, np.uint16]), st.sampled_from([3, 500, 140_000]),
       st.data())
def test_bit_flips_raise_or_keep_length(seed, dtype, size, data):
    symbols = make_symbols(seed, size, dtype, "laplace", 256 if dtype is np.uint8 else 4000)
    stream = bytearray(encode(symbols))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(stream) - 1))
        stream[bit // 8] ^= 1 << (bit % 8)
    try:
        out = decode(bytes(stream))
    except ValueError:   # CorruptStream, or a flipped dtype code/count that no longer fits
        return
    assert out.ndim == 1 and out.dtype in (np.uint8, np.uint16)
    if bytes(stream[:1]) == encode(symbols)[:1]:
        assert out.dtype == dtype


def test_decode_with_checks_its_arguments():
    symbols = np.array([1, 2, 2, 3], np.uint8)
    table = Table.from_counts(np.bincount(symbols))
    payload = encode_with(table, symbols)
    np.testing.assert_array_equal(decode_with(table, memoryview(payload), 4), symbols)
    with pytest.raises(CorruptStream):
        decode_with(table, payload, 0)
    with pytest.raises(CorruptStream):
        decode_with(table, payload, 40)   # a few more would decode from the zero padding: not detectable
    with pytest.raises(CorruptStream):
        decode_with(Table.from_counts(np.zeros(4, np.int64)), payload, 4)
    assert decode_with(table, b"", 0, np.uint16).dtype == np.uint16
