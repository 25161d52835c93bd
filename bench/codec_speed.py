"""Speed and size of the Huffman codec (onnxshrink.codec.huffman) on quantized-weight-like symbol streams.

Streams: 20 M int8-like Laplacian symbols (entropy about 4.5 bits), 20 M 4-bit symbols (alphabet 16) and
5 M int16-like Laplacian uint16 symbols. Encode is `encode` (histogram, table and payload), decode is `decode`.
MB/s counts the symbols' bytes (count * itemsize / 1e6), best of 3 after a warm-up. The first-call time is
numba compiling the kernels, measured on an empty cache directory so that it is the cost of a fresh install.

    .venv/bin/python bench/codec_speed.py
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="codec_speed_numba_")  # cold: compile time is seen
atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnxshrink.codec import huffman  # noqa: E402


def laplace_symbols(rng, count: int, scale: float, dtype, signed_dtype, bits: int | None = None) -> np.ndarray:
    """Rounded Laplacian values stored as two's complement, as quantized weights are; `bits`: clip to a nibble."""
    values = np.round(rng.laplace(0, scale, count))
    if bits is not None:
        values = np.clip(values, -(1 << (bits - 1)), (1 << (bits - 1)) - 1).astype(np.int64) & ((1 << bits) - 1)
        return values.astype(dtype)
    info = np.iinfo(signed_dtype)
    return np.clip(values, info.min, info.max).astype(signed_dtype).view(dtype)


def best_seconds(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import numba

    rng = np.random.default_rng(0)
    streams = [
        ("int8 Laplacian (uint8)", laplace_symbols(rng, 20_000_000, 4.0, np.uint8, np.int8)),
        ("4-bit (alphabet 16)", laplace_symbols(rng, 20_000_000, 2.0, np.uint8, np.int8, bits=4)),
        ("int16 Laplacian (uint16)", laplace_symbols(rng, 5_000_000, 300.0, np.uint16, np.int16)),
    ]
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}; "
          f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}\n")
    print("| stream | symbols | first call s | encode MB/s | decode MB/s | table bytes | max code bits "
          "| coded bits/sym | entropy bits/sym | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, symbols in streams:
        start = time.perf_counter()
        huffman.decode(huffman.encode(symbols[:1000]))
        first_call = time.perf_counter() - start
        stream = huffman.encode(symbols)
        assert np.array_equal(huffman.decode(stream), symbols)
        encode_s = best_seconds(lambda: huffman.encode(symbols))
        decode_s = best_seconds(lambda: huffman.decode(stream))
        counts = np.bincount(symbols)
        table = huffman.Table.from_counts(counts)
        entropy = huffman.entropy_bits(counts) / symbols.size
        coded = 8 * len(stream) / symbols.size
        print(f"| {name} | {symbols.size / 1e6:.0f} M | {first_call:.2f} | {symbols.nbytes / encode_s / 1e6:.0f} "
              f"| {symbols.nbytes / decode_s / 1e6:.0f} | {len(table.to_bytes())} | {table.max_length} "
              f"| {coded:.4f} | {entropy:.4f} | {coded / entropy:.4f} |")


if __name__ == "__main__":
    main()
