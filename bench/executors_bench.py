"""compress with 1, 2, ... local workers (and Ray): wall time, CPU time, peak RSS, and whether the outputs are the
same bytes. Each run is its own process (`onnxshrink compress` through the library, with a candidate budget, no
clock), in alternating order, so that the load of a shared machine falls on every setting alike.

    python bench/executors_bench.py sample_models/digits_transformer.onnx \
        --calibration sample_models/digits_transformer.calib.npz --min-cosine 0.99 --max-candidates 24 --repeat 2
    python bench/executors_bench.py ~/.cache/onnxshrink/minilm/export-*/model.onnx \
        --calibration ~/.cache/onnxshrink/minilm/export-*/calibration.npz --min-cosine 0.99 --max-candidates 5 \
        --formats int8,int8static

Prints one JSON line per run and a summary table; the machine's load average is printed with each run. CPU time
counts the run's process and its children (the local workers); Ray's workers are not its children: not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from onnxshrink.compress_search import CompressConfig, compress
from onnxshrink.validate import Thresholds
args = json.loads(sys.argv[1])
config = CompressConfig(thresholds=Thresholds(min_cosine=args["min_cosine"]), calibration=args["calibration"],
                        time_budget_s=None, max_candidates=args["max_candidates"], workers=args["workers"],
                        executor=args["executor"], formats=tuple(args["formats"]) if args["formats"] else None)
if args["executor"] == "ray":
    import ray
    ray.init(num_cpus=args["workers"], include_dashboard=False, logging_level="ERROR", log_to_driver=False)
started = time.monotonic()
report = compress(args["model"], args["output"], config, force=True)
wall = time.monotonic() - started
own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": round(wall, 1), "cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime
                                                           + children.ru_stime, 1),
                  "peak_rss_mb": round(max(own.ru_maxrss, children.ru_maxrss) / 1024),
                  "candidates": len(report.candidates), "stopped": report.stopped,
                  "times_smaller": report.size["times_smaller"], "executor": report.executor, "workers": report.workers}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    parser.add_argument("--max-candidates", type=int, default=12)
    parser.add_argument("--workers", default="1,2", help="comma-separated local worker counts")
    parser.add_argument("--ray", action="store_true", help="also run --executor ray (a local instance, 2 CPUs)")
    parser.add_argument("--formats", default="", help="comma-separated formats (default: compress's own choice)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    settings = [("local", int(w)) for w in args.workers.split(",")] + ([("ray", 2)] if args.ray else [])
    rows: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(args.repeat):
            order = settings if round_number % 2 == 0 else settings[::-1]
            for executor, workers in order:
                output = Path(folder) / f"{executor}{workers}.shrink"
                job = {"model": args.model, "calibration": args.calibration, "min_cosine": args.min_cosine,
                       "max_candidates": args.max_candidates, "workers": workers, "executor": executor,
                       "formats": [f for f in args.formats.split(",") if f], "output": str(output)}
                load = os.getloadavg()
                done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{executor} x{workers} failed: {done.stderr.strip().splitlines()[-1:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result.update(setting=f"{executor} x{workers}", load=[round(x, 2) for x in load],
                              sha256=hashlib.sha256(output.read_bytes()).hexdigest()[:16])
                print(json.dumps(result), flush=True)
                rows.setdefault(result["setting"], []).append(result)
    print(f"\n{'setting':<10} {'wall s':>14} {'cpu s':>14} {'peak RSS MB':>12} {'cand.':>6}  output sha256")
    for setting, results in rows.items():
        walls = ", ".join(str(r["wall_s"]) for r in results)
        cpus = ", ".join(str(r["cpu_s"]) for r in results)
        print(f"{setting:<10} {walls:>14} {cpus:>14} {max(r['peak_rss_mb'] for r in results):>12} "
              f"{results[0]['candidates']:>6}  {' '.join(sorted({r['sha256'] for r in results}))}")
    same = len({r["sha256"] for results in rows.values() for r in results}) == 1
    print(f"same output bytes on every setting: {same}; {os.cpu_count()} cores; load averages per run above")


if __name__ == "__main__":
    main()
