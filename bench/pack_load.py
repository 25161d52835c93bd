"""Pack time, pack size and load time of `.shrink` files against the plain ONNX file, and the graph record's
two codecs (LZMA, zstd) side by side, on MiniLM, MPNet and the real models `make bench-real` caches.

    python bench/pack_load.py [--models minilm,mpnet,real] [--repeat 3] [--out docs/benchmarks-pack.md]
    python bench/pack_load.py --profile MODEL.shrink [MODEL.onnx]   # where a session's CPU seconds go
    git archive REV onnxshrink | tar -x -C /tmp/base    # an older onnxshrink's source, then:
    python bench/pack_load.py --baseline /tmp/base [--models real]  # its packs against this one's
    python bench/pack_load.py --graph-tensors MODEL.shrink          # what its graph record holds, coded 3 ways

For each model: `pack` (default `favor="load"`) and `pack` with `favor="size"`, each timed (wall and CPU
seconds of this process, threads included) and sized; then `onnxshrink.session` of the ONNX file and of each
pack, alternating, `--repeat` times (best wall and its CPU): in this process after a first warm-up load
("warm"), and once in a fresh process ("cold": numba's cached kernels and zstandard are loaded then too).
The graph record is decoded and coded again both ways: its bytes, and the decode speed of each codec.
Models not cached are skipped. The section it writes replaces the previous one (between its markers).

`--baseline DIR` measures only `favor="load"` packs, each made by this onnxshrink and by the one whose package
sits in DIR (in a subprocess), and sessions of the ONNX file and both packs, alternating, all loaded by this
onnxshrink (it reads every older pack); it writes its own section, between the baseline markers.
"""

from __future__ import annotations

import argparse
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pack_bench import REAL, real_name  # noqa: E402
from real_models import cache_dir  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink import api, packing  # noqa: E402
from onnxshrink.codec import container  # noqa: E402

BEGIN, END = "<!-- pack_load: begin -->", "<!-- pack_load: end -->"
BASELINE_BEGIN, BASELINE_END = "<!-- pack_load baseline: begin -->", "<!-- pack_load baseline: end -->"
BASELINE_PACK = ("import sys, time; sys.path.insert(0, sys.argv[3]); from onnxshrink import api; "
                 "c = time.process_time(); api.pack(sys.argv[1], sys.argv[2], force=True); "
                 "print(time.process_time() - c)")
COLD = ("import sys, time, onnxshrink; t = time.perf_counter(); c = time.process_time(); "
        "onnxshrink.session(sys.argv[1]); print(time.perf_counter() - t, time.process_time() - c)")


def transformer(name: str) -> Path | None:
    """The lead's export of MiniLM or MPNet (bench/transformer export), if present."""
    found = sorted((Path.home() / ".cache" / "onnxshrink" / name).glob("export-*/model.onnx"))
    return found[-1] if found else None


def clock(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def graph_codecs(path: Path) -> dict:
    """The graph record of a pack: its codec, and its bytes under LZMA and zstd with their decode speeds."""
    records = container.read_records(path.read_bytes())
    header = container.parse_json(next(records))
    graph = packing._decode_graph(next(records), header).SerializeToString()
    row = {"codec": header["graph_codec"], "graph": len(graph)}
    lz = lzma.compress(graph, format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS)
    zs = zstandard.ZstdCompressor(level=packing.ZSTD_LEVEL).compress(graph)
    _, lz_s, _ = clock(lambda: lzma.decompress(lz, format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS))
    _, zs_s, _ = clock(lambda: zstandard.ZstdDecompressor().decompress(zs))
    row.update(lzma=len(lz), lzma_mbs=len(graph) / 1e6 / lz_s, zstd=len(zs), zstd_mbs=len(graph) / 1e6 / zs_s)
    return row


def session_times(paths: list[Path], repeat: int) -> list[dict]:
    for p in paths:  # warm-up: numba kernels, onnxruntime, page cache
        onnxshrink.session(p)
    best = [None] * len(paths)
    for _ in range(repeat):
        for i, p in enumerate(paths):
            _, wall, cpu = clock(lambda: onnxshrink.session(p))
            if best[i] is None or wall < best[i][0]:
                best[i] = (wall, cpu)
    cold = []
    for p in paths:
        out = subprocess.run([sys.executable, "-c", COLD, str(p)], check=True, capture_output=True, text=True,
                             cwd=ROOT).stdout.split()
        cold.append((float(out[0]), float(out[1])))
    return [{"wall": b[0], "cpu": b[1], "cold": c[0], "cold_cpu": c[1]} for b, c in zip(best, cold)]


def measure(name: str, source: Path, work: Path, repeat: int) -> dict:
    row = {"model": name, "onnx": source.stat().st_size}
    packs = {}
    for favor in ("load", "size"):
        out = work / f"{favor}.shrink"
        _, wall, cpu = clock(lambda: api.pack(source, out, force=True, favor=favor))
        packs[favor] = out
        row[favor] = {"size": out.stat().st_size, "pack_s": wall, "pack_cpu": cpu, **graph_codecs(out)}
    onnx_t, load_t, size_t = session_times([source, packs["load"], packs["size"]], repeat)
    row["onnx_load"], row["load"]["load"], row["size"]["load"] = onnx_t, load_t, size_t
    return row


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}" if n >= 1e6 else f"{n / 1e6:.3f}"


def table(rows: list[dict], repeat: int) -> list[str]:
    load = os.getloadavg()
    lines = [
        BEGIN,
        "## Loading a pack: `onnxshrink.session` of the pack against the ONNX file",
        "",
        f"Produced by `python bench/pack_load.py` on {platform.machine()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}, zstandard "
        f"{zstandard.__version__}; load average {load[0]:.1f} / {load[1]:.1f} at the end of the run (other jobs "
        "shared the machine: the wall times are noisy, CPU seconds less so). `favor` is pack's option: `load` (the "
        "default) codes a graph record of 1 MiB or more with zstd -19 unless LZMA saves more than 0.5% of the pack; "
        "a smaller one, and `size`, keep the smaller codec. Tensors of 64 KiB or more are coded `zstd-planes` "
        "where that is smaller than their Huffman coding; those LZMA would keep in the graph record get records of "
        "their own (`zstd-columns` where that codes them best) unless that makes the pack more than 0.5% larger "
        f"(`size`: any larger). `session` is the best of {repeat} alternating calls in one process after a warm-up (wall, "
        "then CPU seconds); `cold` is one call in a fresh process (numba's cached kernels load then). `x` is the "
        "pack's warm wall time over the ONNX file's, `x CPU` the same for CPU seconds (steadier on a shared machine). "
        "The ONNX file is checked by path and loaded by path; a pack is decoded once and handed to onnxruntime as its "
        "graph's bytes plus its weights of 64 KiB or more as arrays (external initializers; each coded weight is "
        "decoded straight into its array, its SHA-256 checked on a thread of its own), without the full ONNX "
        "checker (onnxruntime judges what it runs; `onnxshrink.model.session_source`).",
        "",
        "| model | ONNX MB | favor | pack MB | pack s (CPU) | graph codec | session s (CPU) | x | x CPU | cold s | ONNX session s (CPU) | ONNX cold s |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        o = r["onnx_load"]
        for favor in ("load", "size"):
            p = r[favor]
            lines.append(
                f"| {r['model']} | {mb(r['onnx'])} | {favor} | {mb(p['size'])} | {p['pack_s']:.1f} ({p['pack_cpu']:.1f}) | "
                f"{p['codec']} | {p['load']['wall']:.3f} ({p['load']['cpu']:.3f}) | {p['load']['wall'] / o['wall']:.2f} | "
                f"{p['load']['cpu'] / o['cpu']:.2f} | "
                f"{p['load']['cold']:.2f} | {o['wall']:.3f} ({o['cpu']:.3f}) | {o['cold']:.2f} |")
    lines += [
        "",
        "The graph record (the ONNX graph with the coded tensors' bytes taken out: what stays is the structure, the "
        "small tensors and those LZMA codes better than Huffman), coded both ways (`favor=load` pack's graph):",
        "",
        "| model | graph MB | LZMA MB | LZMA decode MB/s | zstd -19 MB | zstd decode MB/s | zstd vs LZMA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            continue
        g = r["load"]
        lines.append(f"| {r['model']} | {mb(g['graph'])} | {mb(g['lzma'])} | {g['lzma_mbs']:.0f} | {mb(g['zstd'])} | "
                     f"{g['zstd_mbs']:.0f} | {g['zstd'] / g['lzma']:.3f} |")
    return lines + [END]


def against_baseline(name: str, source: Path, work: Path, baseline: Path, repeat: int) -> dict:
    """Sizes and sessions of this onnxshrink's `favor="load"` pack and the baseline's, with the ONNX file's."""
    ours, theirs = work / "ours.shrink", work / "baseline.shrink"
    _, _, cpu = clock(lambda: api.pack(source, ours, force=True))
    done = subprocess.run([sys.executable, "-c", BASELINE_PACK, str(source), str(theirs), str(baseline)], check=True,
                          capture_output=True, text=True, cwd=work)
    onnx_t, theirs_t, ours_t = session_times([source, theirs, ours], repeat)
    return {"model": name, "size": ours.stat().st_size, "baseline_size": theirs.stat().st_size, "pack_cpu": cpu,
            "baseline_pack_cpu": float(done.stdout.split()[-1]), "onnx": onnx_t, "ours": ours_t, "baseline": theirs_t,
            "version": ".".join(map(str, ours.read_bytes()[8:12:2]))}


def baseline_table(rows: list[dict], repeat: int) -> list[str]:
    load = os.getloadavg()
    lines = [
        BASELINE_BEGIN,
        f"Produced by `python bench/pack_load.py --baseline DIR` (DIR: the baseline's `onnxshrink` package) on "
        f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}, onnxruntime "
        f"{__import__('onnxruntime').__version__}; load average {load[0]:.1f} / {load[1]:.1f} at the end of the run. "
        f"`favor=load` packs of each model by the baseline and by this tree; `session` CPU seconds are the best of "
        f"{repeat} alternating calls (ONNX file, baseline pack, this pack) in one process after a warm-up, both packs "
        "loaded by this tree; `x CPU` is a pack's over the ONNX file's. `pack CPU s`: CPU seconds of the packing "
        "process, all its threads; `format`: the pack's version.",
        "",
        "| model | baseline pack B | pack B | size | format | pack CPU s (baseline) | ONNX session CPU s | "
        "baseline session CPU s | session CPU s | x CPU baseline | x CPU |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | | | |")
            continue
        o, b, p = r["onnx"]["cpu"], r["baseline"]["cpu"], r["ours"]["cpu"]
        mark = "**" if p / o <= 2 else ""  # the target: at most twice the ONNX file's
        lines.append(f"| {r['model']} | {r['baseline_size']} | {r['size']} | "
                     f"{100 * (r['size'] / r['baseline_size'] - 1):+.2f}% | {r['version']} | "
                     f"{r['pack_cpu']:.1f} ({r['baseline_pack_cpu']:.1f}) | {o:.4f} | {b:.4f} | {p:.4f} | "
                     f"{b / o:.2f} | {mark}{p / o:.2f}{mark} |")
    return lines + [BASELINE_END]


def write_section(out: Path, lines: list[str], begin: str = BEGIN, end: str = END) -> None:
    text = out.read_text() if out.exists() else ""
    section = "\n".join(lines) + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)


def graph_tensors(path: Path) -> None:
    """The tensors of 256 bytes or more that a pack's graph record holds (what LZMA decodes at load): shape, type,
    the ops that use them, distinct values, zeros, and their bytes raw, in LZMA, in zstd -19 and as Huffman byte
    planes (own tables), each tensor alone; then the graph record whole in LZMA and zstd -19."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    records = container.read_records(path.read_bytes())
    header = container.parse_json(next(records))
    model = packing._decode_graph(next(records), header)
    users: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    lz = lambda b: len(lzma.compress(b, format=lzma.FORMAT_RAW, filters=packing.GRAPH_FILTERS))  # noqa: E731
    zs = lambda b: len(zstandard.ZstdCompressor(level=packing.ZSTD_LEVEL).compress(b))  # noqa: E731
    print("| tensor | shape | type | used by | distinct | zeros | raw B | LZMA B | zstd -19 B | Huffman planes B |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for tensor in packing.tensor_protos(model):
        data = packing.tensor_bytes(tensor)
        if data is None or len(data) < packing.MIN_CODED_BYTES:
            continue
        values = numpy_helper.to_array(tensor)
        k = packing.element_size(tensor) if len(data) % packing.element_size(tensor) == 0 else 1
        huffman_bytes = packing._estimate(packing._planes(np.frombuffer(data, np.uint8), k, "dense")) // 8
        print(f"| {tensor.name} | {list(tensor.dims)} | {onnx.TensorProto.DataType.Name(tensor.data_type).lower()} | "
              f"{', '.join(sorted(users.get(tensor.name, {'(attribute)'})))} | {len(np.unique(values))} | "
              f"{np.mean(values == 0):.0%} | {len(data)} | {lz(data)} | {zs(data)} | {huffman_bytes} |")
    graph = model.SerializeToString()
    print(f"\n{path}: graph record {header['graph_codec']}, {len(graph)} B decoded; whole in LZMA {lz(graph)} B, "
          f"zstd -19 {zs(graph)} B; the pack {path.stat().st_size} B")


def profile(paths: list[str], repeat: int) -> None:
    """CPU seconds (all threads: the Huffman pool's and the digest thread's count too) of `onnxshrink.session` of
    each file, best of `repeat` after a warm-up, then the functions that took them (cProfile on CPU time, summed
    over `repeat` calls): what is left to win, and where a pack's load differs from its ONNX file's."""
    import cProfile
    import pstats

    for path in paths:
        onnxshrink.session(path)
        best = min(clock(lambda: onnxshrink.session(path))[2] for _ in range(repeat))
        profiler = cProfile.Profile(time.process_time)
        for _ in range(repeat):
            profiler.runcall(onnxshrink.session, path)
        print(f"{path}: session {best:.3f} CPU s (best of {repeat}); load average {os.getloadavg()[0]:.1f}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,mpnet,real")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-pack.md"))
    parser.add_argument("--profile", nargs="+", metavar="FILE", help="profile onnxshrink.session of these files instead")
    parser.add_argument("--baseline", metavar="DIR", help="compare with the onnxshrink package in DIR instead")
    parser.add_argument("--graph-tensors", metavar="FILE", help="list the tensors a pack's graph record holds instead")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.repeat)
        return
    if args.graph_tensors:
        graph_tensors(Path(args.graph_tensors))
        return
    wanted = args.models.split(",")
    models = [(name, transformer(name)) for name in ("minilm", "mpnet") if name in wanted]
    if "real" in wanted:
        models += [(real_name(p), cache_dir() / p) for p in REAL]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in models:
            if source is None or not source.is_file():
                continue
            work = Path(tmp) / name
            work.mkdir()
            try:
                if args.baseline:
                    rows.append(against_baseline(name, source, work, Path(args.baseline).resolve(), args.repeat))
                else:
                    rows.append(measure(name, source, work, args.repeat))
            except Exception as exc:  # a failure is a row, not an aborted benchmark
                rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], file=sys.stderr, flush=True)
    if args.baseline:
        write_section(Path(args.out), baseline_table(rows, args.repeat), BASELINE_BEGIN,
                      BASELINE_END)
    else:
        write_section(Path(args.out), table(rows, args.repeat))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
