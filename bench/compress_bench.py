"""`onnxshrink compress` (automatic mode) against every single fixed setting, on the sample models.

    python bench/compress_bench.py [--budget 5m] [--out docs/benchmarks-compress.md]
    python bench/compress_bench.py --budget none --auto-only --models "digits MLP" --out -   # a quick check

`--budget none` lets each search end on its own (the same candidates on any machine, however loaded); `--out -`
prints the table instead of writing the doc. The doc holds the real-model sections too (bench/compress_real.py): only
its first section, the sample models', is replaced.

For each sample model: the automatic search at --max-accuracy-drop 0.01, judged on the held-out eval
data, with a stated time budget, written as a .shrink; then every fixed setting of prune (sparsity
0..0.9, the default allocation, with reconstruction, dead units removed) x one weight format (dynamic int8, 4-bit RTN
block 32, 4-bit GPTQ block 32 and 128; and separately cluster 3/4/5 bits) + pack, each judged the same
way. Sizes are the whole packed file against the fp32 .onnx file.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from onnxshrink import api  # noqa: E402
from onnxshrink.compress_search import CompressConfig, PassSpec, Recipe, compress, parse_duration, run_recipe  # noqa: E402
from onnxshrink.passes.fold_layernorm import fold_layernorm  # noqa: E402
from onnxshrink.validate import Thresholds, ValidateConfig  # noqa: E402

SAMPLES = ROOT / "sample_models"
MODELS = {"digits MLP": "digits_mlp", "digits CNN": "digits_cnn", "digits transformer": "digits_transformer"}
SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
QUANTIZE = {
    "dynamic int8": {"mode": "dynamic"},
    "4-bit RTN b32": {"mode": "blockwise", "bits": 4, "block_size": 32},
    "4-bit GPTQ b32": {"mode": "blockwise", "bits": 4, "block_size": 32, "algorithm": "gptq"},
    "4-bit GPTQ b128": {"mode": "blockwise", "bits": 4, "block_size": 128, "algorithm": "gptq"},
}
CLUSTER = {f"cluster {b}-bit": {"bits": b, "other_floats": "int8"} for b in (5, 4, 3)}  # as compress clusters
DROP = 0.01


def best_fixed(name: str, formats: dict, pass_name: str, work: Path):
    """The smallest passing (size, setting, accuracy) over sparsity x format, and how many settings ran."""
    original, calib, data = (SAMPLES / f"{name}.{s}" for s in ("onnx", "calib.npz", "eval.npz"))
    judge = ValidateConfig(data=str(data), labels="labels", latency=False, thresholds=Thresholds(max_accuracy_drop=DROP))
    model, source = onnx.load(str(original)), original
    if fold_layernorm(model):  # as compress starts: norms folded into the MatMuls after them (exact)
        source = work / f"{name}.folded.onnx"
        onnx.save(model, str(source))
    best, tried = None, 0
    for label, options in formats.items():
        for sparsity in SPARSITIES:
            # Dead units are removed as compress removes them (and norms folded): exact, so every fixed setting gets it.
            prune = PassSpec("prune", {"sparsity": sparsity, "remove_dead_units": True})
            passes = ([prune] if sparsity else []) + [PassSpec(pass_name, dict(options))]
            target = work / f"fixed{tried}.shrink"
            run_recipe(source, Recipe(passes), target, calibration=calib, workdir=work)
            report = api.validate(original, target, judge)
            tried += 1
            size = target.stat().st_size
            if report.passed and (best is None or size < best[0]):
                best = (size, f"prune {sparsity:g} + {label} + pack", report.accuracy["candidate"])
    return best, tried


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-compress.md"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="titles from MODELS")
    parser.add_argument("--auto-only", action="store_true", help="the automatic search alone, no fixed settings")
    args = parser.parse_args()
    budget = None if args.budget == "none" else parse_duration(args.budget)
    rows, details = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for title, name in MODELS.items():
            if title not in args.models:
                continue
            model = SAMPLES / f"{name}.onnx"
            original = model.stat().st_size
            config = CompressConfig(thresholds=Thresholds(max_accuracy_drop=DROP), data=str(SAMPLES / f"{name}.eval.npz"),
                                    labels="labels", calibration=str(SAMPLES / f"{name}.calib.npz"), time_budget_s=budget)
            start, cpu = time.monotonic(), time.process_time()
            report = compress(model, work / f"{name}.shrink", config, force=True)
            seconds, cpu = time.monotonic() - start, time.process_time() - cpu
            acc = report.validation.accuracy
            if args.auto_only:
                planned = [c for c in report.candidates if c.phase == "planned"]
                print(f"{title}: auto {report.size['times_smaller']:.1f}x ({report.size['output']} B) acc "
                      f"{acc['candidate']:.4f} (fp32 {acc['original']:.4f}) in {seconds:.0f} s wall, {cpu:.0f} s CPU "
                      f"(this process), {len(report.candidates)} candidates ({report.stopped}); planned: "
                      + "; ".join(f"{c.times_smaller:.1f}x {'pass' if c.passed else 'FAIL'}" for c in planned if c.size)
                      + f"\n  {report.recipe_summary}", flush=True)
                continue
            fixed, tried = best_fixed(name, QUANTIZE, "quantize", work)
            clustered, tried_c = best_fixed(name, CLUSTER, "cluster", work)
            print(f"{title}: auto {report.size['times_smaller']:.1f}x acc {acc['candidate']:.4f} in {seconds:.0f}s; "
                  f"fixed {original / fixed[0]:.1f}x ({fixed[1]}); cluster {original / clustered[0]:.1f}x ({clustered[1]})",
                  flush=True)
            rows.append(f"| {title} ({acc['original']:.4f}) | **{report.size['times_smaller']:.1f}x** "
                        f"({report.size['output']} B) | {acc['candidate']:.4f} ({(acc['candidate'] - acc['original']) * 100:+.1f}) "
                        f"| {seconds:.0f} s of {budget or 0:g} s, {len(report.candidates)} candidates ({report.stopped}) "
                        f"| {original / fixed[0]:.1f}x: {fixed[1]}, {fixed[2]:.4f} ({tried} tried) "
                        f"| {original / clustered[0]:.1f}x: {clustered[1]}, {clustered[2]:.4f} ({tried_c} tried) |")
            details.append(f"**{title}**: {report.recipe_summary}; per layer: "
                           + "; ".join(f"`{layer.node}` {layer.sparsity:.1%} zeros, "
                                       + (f"{layer.bits}-bit codebook" if layer.bits else layer.format)
                                       for layer in report.layers))
    if args.auto_only:
        return
    text = "\n".join([
        "# `onnxshrink compress` on the sample models",
        "",
        f"Made by `python bench/compress_bench.py --budget {args.budget}` ({platform.processor() or platform.machine()}, "
        f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, 1 thread). Automatic mode at "
        f"`--max-accuracy-drop {DROP}`, judged on the held-out eval data (451 labelled samples), calibration on the "
        "200-sample calibration set; sizes are the whole `.shrink` file against the fp32 `.onnx` file. "
        "\"Best fixed\" is the smallest passing model over every setting tried of one prune sparsity (default "
        "allocation, with reconstruction) x one weight format + pack, judged the same way.",
        "",
        "| model (accuracy) | compress (auto) | accuracy (points) | time | best fixed prune + quantize + pack "
        "| best fixed prune + cluster + pack |",
        "| --- | ---: | --- | --- | --- | --- |",
        *rows,
        "",
        *[f"- {d}" for d in details],
        "",
    ])
    if args.out != "-":
        Path(args.out).write_text(replace_samples_section(Path(args.out), text))
    print(text)


def replace_samples_section(doc: Path, section: str) -> str:
    """The doc with its sample-model section (everything before the first `## ` heading) replaced by `section`:
    the real-model sections after it (bench/compress_real.py's) are kept as they are."""
    old = doc.read_text() if doc.exists() else ""
    at = old.find("\n## ")
    return section.rstrip("\n") + "\n" + (old[at:] if at >= 0 else "")


if __name__ == "__main__":
    main()
