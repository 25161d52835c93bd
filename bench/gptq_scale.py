"""How long 4-bit GPTQ takes on a real encoder, where the time goes, and what it buys: `--bits 4 --algorithm gptq`.

For each model (the exports bench/transformer_export.py writes under ~/.cache/onnxshrink/<model>/export-*/:
model.onnx, calibration.npz, heldout.npz) it runs onnxshrink's QuantizeBlockwise pass in this process, as
`onnxshrink quantize --bits 4 --algorithm gptq --calibration calibration.npz --no-validate` runs it, and prints:

- wall and CPU seconds of the pass, the process's peak RSS, and the seconds spent in each phase (capturing layer
  inputs with onnxruntime, X^T X accumulation, the GPTQ column loop with its factorization, the round-to-nearest
  comparison and writing the rest), timed by wrapping the functions the pass calls;
- size vs fp32 and quality vs fp32 on the held-out sentences (mean-pooled cosine, top-5 overlap;
  bench/embedding_metrics.py), for GPTQ and for round-to-nearest;
- latency ratio to fp32 (1 onnxruntime thread, batch 1 and 8, sequence 64, sessions alternating, median of
  --repeats loops) unless --no-latency.

--src DIR imports onnxshrink from DIR instead of this checkout (e.g. `git archive HEAD | tar -x -C /tmp/base` to time
the previous version against the same exports; --label names it in the table). Every run's rows are kept in
~/.cache/onnxshrink/gptq_scale.json (a row replaces an earlier one of the same model, algorithm, config and label);
--write renders all of them into docs/benchmarks-int4.md.

    .venv/bin/python bench/gptq_scale.py [--models minilm,mpnet] [--block-size 32] [--embedding-block-size 64]
        [--no-rtn] [--no-latency] [--src DIR --label NAME] [--write] [--render]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,mpnet")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--embedding-block-size", type=int, default=None)
    parser.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest comparison")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per latency loop")
    parser.add_argument("--src", default=None, help="import onnxshrink from this directory")
    parser.add_argument("--label", default="this tree", help="what code ran, for the row (e.g. 'HEAD' with --src)")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks-int4.md")
    parser.add_argument("--render", action="store_true", help="measure nothing: only render the stored rows")
    return parser.parse_args()


ARGS = parse()
sys.path.insert(0, str(HERE))
sys.path.insert(0, ARGS.src or str(ROOT))

import onnxruntime as ort  # noqa: E402

import onnxshrink  # noqa: E402
from embedding_metrics import embedding_quality, pooled_embeddings  # noqa: E402
from onnxshrink.algorithms import gptq as gptq_mod  # noqa: E402
from onnxshrink.data import input_specs, load_npz  # noqa: E402
from onnxshrink.model import load, save  # noqa: E402
from onnxshrink.passes import quantize_blockwise as qb  # noqa: E402

PHASES = defaultdict(float)


def timed(owner, name: str, phase: str) -> None:
    """Wrap owner.name so its CPU time (the process's: on a shared machine wall time is mostly waiting) adds to
    PHASES[phase] (generators: time until exhausted)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapper(*args, **kwargs):
        start = time.process_time()
        result = original(*args, **kwargs)
        if hasattr(result, "__next__"):
            def drain(gen=result, t=start):
                try:
                    yield from gen
                finally:
                    PHASES[phase] += time.process_time() - t
            return drain()
        PHASES[phase] += time.process_time() - start
        return result

    setattr(owner, name, wrapper)


def instrument() -> None:
    if hasattr(qb, "SegmentCapture"):
        timed(qb.SegmentCapture, "capture", "capture (onnxruntime)")
    timed(qb, "capture_activations", "capture (onnxruntime)")
    timed(gptq_mod.Hessian, "add", "X^T X")
    timed(gptq_mod.Hessian, "add_gram", "X^T X")
    timed(gptq_mod, "inverse_cholesky_upper", "factorization")
    timed(gptq_mod, "gptq", "GPTQ (incl. factorization)")
    timed(gptq_mod, "rtn", "RTN comparison")
    timed(qb, "hessian_error", "error report")
    timed(qb, "hessian_errors", "error report")
    timed(qb.QuantizeBlockwise, "_write", "writing")


def export_dir(model: str) -> Path:
    found = sorted(glob.glob(str(Path.home() / ".cache" / "onnxshrink" / model / "export-*" / "model.onnx")))
    if not found:
        raise SystemExit(f"no export of {model}: run `make bench-transformer MODEL={model}` (bench/transformer_export.py)")
    return Path(found[-1]).parent


def session(path: Path) -> ort.InferenceSession:
    return onnxshrink.session(path, threads=1)


def latency(fp32: Path, candidate: Path, held: dict, repeats: int, budget: float) -> dict:
    from int4_speed import ratios

    a, b = session(fp32), session(candidate)
    names = {i.name for i in a.get_inputs()}
    out = {}
    for batch in (1, 8):
        feed = {k: v[:batch] for k, v in held.items() if k in names}
        out[f"b{batch}"] = ratios([a, b], feed, budget, repeats)[1]
    return out


def reference_embeddings(path: Path, held: dict) -> np.ndarray:
    """fp32 embeddings of the held-out sentences, cached next to the export (they take a minute on MPNet)."""
    cache = path.parent / "fp32_heldout_pooled.npy"
    if cache.exists() and cache.stat().st_mtime >= path.stat().st_mtime:
        return np.load(cache)
    pooled = pooled_embeddings(session(path), held)
    np.save(cache, pooled)
    return pooled


def run_pass(path: Path, calibration: Path, algorithm: str, block: int, out: Path, table_block=None) -> dict:
    model = load(path)
    dataset = load_npz(calibration, input_specs(model), role="calibration data") if algorithm == "gptq" else None
    config = qb.BlockwiseConfig(bits=4, block_size=block, algorithm=algorithm, embedding_block_size=table_block)
    PHASES.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    model, report = qb.QuantizeBlockwise(config, dataset)(model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    save(model, out, force=True)
    return {"wall": wall, "cpu": cpu, "phases": dict(PHASES),
            "notes": [n for n in report.notes if n.startswith("gptq")]}


def measure(name: str, args) -> list[dict]:
    """One row per algorithm: the pass's times, size, quality (and latency) on this model's export."""
    directory = export_dir(name)
    path, calibration = directory / "model.onnx", directory / "calibration.npz"
    held = dict(np.load(directory / "heldout.npz"))
    reference = reference_embeddings(path, held)
    fp32_bytes = path.stat().st_size + sum(p.stat().st_size for p in directory.glob("*.data"))
    config = f"block {args.block_size}" + (f", tables {args.embedding_block_size}" if args.embedding_block_size else "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in ("gptq",) + (() if args.no_rtn else ("rtn",)):
            out = Path(tmp) / f"{algorithm}.onnx"
            row = {"model": name, "algorithm": algorithm, "config": config, "source": args.label,
                   "command": " ".join(["bench/gptq_scale.py"] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "load_before": os.getloadavg()[0]}
            row.update(run_pass(path, calibration, algorithm, args.block_size, out, args.embedding_block_size))
            row["load"] = os.getloadavg()[0]
            row["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row["size"] = sum(p.stat().st_size for p in Path(tmp).glob(f"{algorithm}.onnx*")) / fp32_bytes
            row.update(embedding_quality(reference, pooled_embeddings(session(out), held)))
            if not args.no_latency:
                row.update(latency(path, out, held, args.repeats, args.budget))
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
    return rows


def markdown(rows: list) -> str:
    lines = ["# 4-bit blockwise quantization at scale: GPTQ's time, quality and speed", "",
             "Written by `bench/gptq_scale.py --write` from every row it has stored (do not edit by hand). Each row: "
             "onnxshrink's QuantizeBlockwise pass run in one process as `onnxshrink quantize --bits 4 [--algorithm "
             "gptq --calibration calibration.npz] --no-validate` runs it, on the export's calibration.npz (128 "
             "sentences, sequence 64); quality on its 200 held-out sentences (mean-pooled cosine vs fp32, top-5 "
             "neighbour overlap). Latency: ratio to fp32 p50, 1 onnxruntime thread, batch 1 / 8 at sequence 64, "
             "sessions alternating, median of 3 loops. Peak RSS is the whole process's (fp32 embeddings included).", "",
             f"Machine: 2-core Xeon (AVX-512 VNNI/AMX) shared with other jobs, {platform.machine()}, onnxruntime "
             f"{ort.__version__}, numpy {np.__version__} (OpenBLAS); the load average (1 min) before and after each "
             "pass is in its row: timings under a load of 10 on 2 cores are several times an idle machine's.", "",
             "`code`: `this tree` is the segment capture (passes/gptq_capture.py), shared q/k/v Hessians, padding "
             "left out of X^T X and single-thread BLAS; `HEAD 6393ccb` is the tree before them, run with `--src` on "
             "the same export. Before them, `--bits 4 --algorithm gptq` on all-mpnet-base-v2 was killed after 900 s "
             "(docs/benchmarks-transformer-mpnet.md).", "",
             "| model | algorithm | config | code | wall s | CPU s | load | peak RSS MB | size vs fp32 | cosine | top-5 | b1 | b8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lat = [f"{row[k]:.2f}" if k in row else "-" for k in ("b1", "b8")]
        lines.append(f"| {row['model']} | {row['algorithm']} | {row['config']} | {row['source']} | {row['wall']:.0f} | "
                     f"{row['cpu']:.0f} | {row['load_before']:.1f}-{row['load']:.1f} | {row['rss_mb']:.0f} | "
                     f"{row['size']:.3f} | {row['cosine']:.4f} | {row['topk']:.3f} | {lat[0]} | {lat[1]} |")
    lines += ["", "Where GPTQ's seconds went (CPU seconds, summed over the functions the pass calls; the rest is selection, "
              "the int8 layers, embedding tables and packing; HEAD's capture is a generator closed only when collected, so its "
              "figure also holds the rest of its wave, X^T X and GPTQ: compare its CPU s column):", ""]
    for row in rows:
        if row["algorithm"] != "gptq":
            continue
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(row["phases"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {row['model']}, {row['config']}, {row['source']}: {phases}")
        lines += [f"  - {note}" for note in row["notes"]]
    lines += ["", "Commands:", ""]
    for command, date in dict.fromkeys((row["command"], row["date"][:10]) for row in rows):
        lines.append(f"- `.venv/bin/python {command}` ({date})")
    return "\n".join(lines) + "\n"


def main() -> None:
    instrument()
    rows = [] if ARGS.render else [row for name in ARGS.models.split(",") if name.strip()
                                   for row in measure(name.strip(), ARGS)]
    store = Path.home() / ".cache" / "onnxshrink" / "gptq_scale.json"
    stored = json.loads(store.read_text()) if store.exists() else []
    key = lambda row: (row["model"], row["algorithm"], row["config"], row["source"])  # noqa: E731
    fresh = {key(row) for row in rows}
    stored = [row for row in stored if key(row) not in fresh] + json.loads(json.dumps(rows, default=float))
    store.write_text(json.dumps(stored, indent=1))
    text = markdown(stored)
    print(text)
    if ARGS.write:
        (ROOT / "docs" / "benchmarks-int4.md").write_text(text)


if __name__ == "__main__":
    main()
