"""`onnxshrink cluster` on the sample models: held-out accuracy per bit width and method, and packed sizes.

    python bench/cluster_bench.py [--out docs/benchmarks-cluster.md]

Accuracy: `cluster --bits B` (k-means on the weights alone) and `cluster --bits B --calibration
calib.npz` (k-means weighted by input energy, codebook values and biases refit to the original
model's layer outputs), per layer and per output channel, B = 2, 3, 4, 5, validated on the
held-out evaluation set. Sizes: the ONNX file and its `onnxshrink pack`, for float, dynamic int8,
4-bit codebooks, and the Deep Compression chain (prune 80% with calibration, then int8 or 4-bit
codebooks). Latency ratio: what `validate` measured (batch 1, 1 thread; onnxruntime folds the
codebook decoding at load, so it should be about 1).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink import api  # noqa: E402
from onnxshrink.passes.cluster import ClusterConfig  # noqa: E402
from onnxshrink.passes.prune import PruneConfig  # noqa: E402
from onnxshrink.passes.quantize import QuantizeConfig  # noqa: E402
from onnxshrink.validate import ValidateConfig  # noqa: E402
from real_models import with_hand_sections  # noqa: E402  (bench/, the script's own folder)

SAMPLES = ROOT / "sample_models"
MODELS = ("digits_mlp", "digits_cnn")
BITS = (2, 3, 4, 5)


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def accuracy_rows(work: Path) -> list[str]:
    rows = []
    for name in MODELS:
        source, calib = SAMPLES / f"{name}.onnx", SAMPLES / f"{name}.calib.npz"
        validation = ValidateConfig(data=str(SAMPLES / f"{name}.eval.npz"), labels="labels")
        for per in ("layer", "channel"):
            for bits in BITS:
                cells, latency = [], []
                for calibration in (None, calib):
                    start = time.perf_counter()
                    report = api.cluster(source, work / f"{name}.{per}.{bits}.onnx", ClusterConfig(bits=bits, per=per),
                                         calibration=calibration, force=True, validation=validation)
                    seconds = time.perf_counter() - start
                    acc = report.validation.accuracy
                    cells.append(f"{acc['candidate']:.4f} ({100 * (acc['candidate'] - acc['original']):+.1f})")
                    latency.append(f"{report.validation.latency_ms['ratio']:.2f}")
                    cells.append(f"{seconds:.1f}")
                base = report.validation.accuracy["original"]
                rows.append(f"| {name} ({base:.4f}) | {per} | {bits} | {' | '.join(cells)} | {' / '.join(latency)} | "
                            f"{report.size['ratio']:.3f} |")
                print(rows[-1], flush=True)
    return rows


def size_rows(work: Path) -> list[str]:
    rows = []
    for name in MODELS:
        source, calib = SAMPLES / f"{name}.onnx", SAMPLES / f"{name}.calib.npz"
        validation = ValidateConfig(data=str(SAMPLES / f"{name}.eval.npz"), labels="labels")
        forms = {"float": source}
        api.quantize(source, work / "int8.onnx", QuantizeConfig(), force=True, run_validation=False)
        forms["dynamic int8 (`quantize`)"] = work / "int8.onnx"
        api.cluster(source, work / "c4.onnx", ClusterConfig(bits=4), calibration=calib, force=True, run_validation=False)
        forms["4-bit codebooks (`cluster --calibration`)"] = work / "c4.onnx"
        api.prune(source, work / "p.onnx", PruneConfig(sparsity=0.8), calibration=calib, force=True, run_validation=False)
        forms["pruned 80% (`prune --calibration`)"] = work / "p.onnx"
        api.quantize(work / "p.onnx", work / "p.int8.onnx", QuantizeConfig(), force=True, run_validation=False)
        forms["pruned 80% + dynamic int8"] = work / "p.int8.onnx"
        for bits in (4, 2):
            api.cluster(work / "p.onnx", work / f"p.c{bits}.onnx", ClusterConfig(bits=bits), calibration=calib, force=True,
                        run_validation=False)
            forms[f"pruned 80% + {bits}-bit codebooks"] = work / f"p.c{bits}.onnx"
        for label, path in forms.items():
            packed = api.pack(path, work / "m.shrink", force=True)
            accuracy = api.validate(source, path, validation).accuracy["candidate"]
            idx = [t for t in packed.tensors if t.name.endswith("_idx")]
            bits = (sum(t.bytes_after for t in idx) * 8 / sum(t.bytes_before for t in idx)) if idx else None
            rows.append(f"| {name} | {label} | {accuracy:.4f} | {kib(packed.size['original'])} | "
                        f"{kib(packed.size['output'])} | {packed.size['output'] / source.stat().st_size:.3f} | "
                        f"{f'{bits:.2f}' if bits else '-'} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-cluster.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        work = Path(tmp)
        accuracy = accuracy_rows(work)
        sizes = size_rows(work)
    import onnxruntime

    lines = [
        "# cluster: weight sharing (codebooks) on the sample models",
        "",
        f"Produced by `python bench/cluster_bench.py` on {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"Python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}. Held-out accuracy on the 451 evaluation images (change in points); the same "
        "figures come from `onnxshrink cluster sample_models/MODEL.onnx --bits B [--per channel] "
        "[--calibration sample_models/MODEL.calib.npz] --data sample_models/MODEL.eval.npz --labels labels`.",
        "",
        "## Accuracy",
        "",
        "`weights only`: k-means fitted to the weight values. `with --calibration`: k-means weighted by each "
        "input's energy, then codebook values and biases refit by least squares to the original model's layer "
        "outputs, layer by layer. Seconds include validation. Latency: clustered / original p50 at batch 1 "
        "(onnxruntime folds the decoding at load; differences are noise).",
        "",
        "| model (fp32 accuracy) | codebook per | bits | weights only | s | with --calibration | s | latency ratio | size ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *accuracy,
        "",
        "## Sizes",
        "",
        "The ONNX file and its `onnxshrink pack`; `pack / fp32` is relative to the original ONNX file. "
        "`bits / index` is what the pack spends per clustered weight (its index records, tables included). "
        "Pruning is `prune --sparsity 0.8 --calibration` (activation importance, refit); every clustered form "
        "here used `--calibration`.",
        "",
        "| model | form | accuracy | ONNX | pack | pack / fp32 | bits / index |",
        "|---|---|---:|---:|---:|---:|---:|",
        *sizes,
        "",
    ]
    # the hand-written sections (the real models, issue 15) are kept as they are
    text = with_hand_sections("\n".join(lines), args.out.read_text() if args.out.exists() else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
