"""`make bench-prune`: accuracy vs sparsity of onnxshrink prune on the sample models -> docs/prune.md.

Methods: magnitude (|w|, one sparsity per layer, no data), activation (|w| x input norm, per-layer
allocation from the output-error proxy, calibration data), activation + least-squares
reconstruction (the default of `onnxshrink prune --calibration`), and 2:4. Accuracy is measured
in onnxruntime on the held-out eval sets. Then channel pruning of the CNN: accuracy, parameters
and latency against the original at batch 1 and 32, one thread, runs alternating between the two
sessions (onnxshrink.validate.measure_latency) so the ratio holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxshrink.data import input_specs, load_npz
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.prune_channels import PruneChannels
from onnxshrink.runtime import make_session
from onnxshrink.validate import measure_latency
from real_models import with_hand_sections  # bench/, the script's own folder

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = {
    "magnitude": lambda s: (PruneConfig(sparsity=s, importance="magnitude", scope="layer"), False),
    "activation": lambda s: (PruneConfig(sparsity=s, importance="activation", reconstruct=False), True),
    "activation + reconstruction": lambda s: (PruneConfig(sparsity=s, method="refit"), True),
    "SparseGPT (OBS updates)": lambda s: (PruneConfig(sparsity=s, method="sparsegpt"), True),
    "SparseGPT, sequential": lambda s: (PruneConfig(sparsity=s, method="sparsegpt", sequential=True), True),
}


def accuracy(model, evaluation) -> float:
    logits = make_session(model).run(None, {"input": evaluation["input"]})[0]
    return float(np.mean(logits.argmax(1) == evaluation["labels"]))


def curves(lines: list[str]) -> None:
    for stem in ("digits_mlp", "digits_cnn"):
        model = onnx.load(str(ROOT / "sample_models" / f"{stem}.onnx"))
        calibration = load_npz(ROOT / "sample_models" / f"{stem}.calib.npz", input_specs(model))
        evaluation = np.load(ROOT / "sample_models" / f"{stem}.eval.npz")
        base = accuracy(model, evaluation)
        lines += [f"### `{stem}.onnx` (original accuracy {base:.4f})", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | time at 80% |",
                  "| --- |" + " --- |" * (len(SPARSITIES) + 1)]
        for method, make in METHODS.items():
            cells, took = [], ""
            for s in SPARSITIES:
                config, data = make(s)
                start = time.perf_counter()
                pruned, _ = Prune(config, calibration if data else None)(model)
                if s == 0.8:
                    took = f"{time.perf_counter() - start:.2f} s"
                value = accuracy(pruned, evaluation)
                cells.append(f"{value:.4f} ({(value - base) * 100:+.1f})")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {took} |")
        pruned, _ = Prune(PruneConfig(pattern="2:4"), calibration)(model)
        value = accuracy(pruned, evaluation)
        lines += ["", f"2:4 (50%, activation + reconstruction): {value:.4f} ({(value - base) * 100:+.1f} points).", ""]


def channels(lines: list[str], budget: float) -> None:
    stem = "digits_cnn"
    path = ROOT / "sample_models" / f"{stem}.onnx"
    model = onnx.load(str(path))
    calibration = load_npz(ROOT / "sample_models" / f"{stem}.calib.npz", input_specs(model))
    evaluation = np.load(ROOT / "sample_models" / f"{stem}.eval.npz")
    base = accuracy(model, evaluation)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    lines += ["### Channel pruning of `digits_cnn.onnx`", "",
              f"Original: accuracy {base:.4f}, {params} parameters. Latency p50 in ms, candidate / original.", "",
              "| channels removed | data | accuracy | parameters | batch 1 p50 (ratio) | batch 32 p50 (ratio) |",
              "| --- | --- | --- | --- | --- | --- |"]
    original = make_session(path)
    for fraction in (0.25, 0.5, 0.75):
        for data in (False, True):
            pruned, _ = PruneChannels(PruneConfig(sparsity=fraction, pattern="channel"), calibration if data else None)(model)
            candidate = make_session(pruned)
            cells = []
            for batch in (1, 32):
                feed = {"input": evaluation["input"][:batch]}
                latency = measure_latency([original, candidate], feed, budget_s=budget, max_runs=5000)
                cells.append(f"{latency['candidate']['p50']:.4f} vs {latency['original']['p50']:.4f} ({latency['ratio']:.2f})")
            value = accuracy(pruned, evaluation)
            count = sum(int(np.prod(t.dims)) for t in pruned.graph.initializer)
            lines.append(f"| {fraction:.0%} | {'calibration + refit' if data else 'none (magnitude)'} | "
                         f"{value:.4f} ({(value - base) * 100:+.1f}) | {count} ({count / params:.0%}) | {cells[0]} | {cells[1]} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "prune.md"))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of alternating latency runs per measurement")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = ["# Pruning: accuracy vs sparsity, and channel-pruning latency", "",
             f"Produced by `make bench-prune` (`python bench/prune_curves.py`) on {cpu}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
             f"numpy {np.__version__}; 1 onnxruntime thread. Accuracy on the held-out eval sets "
             "(`sample_models/*.eval.npz`, 451 images: one image is 0.22 points); calibration on "
             "`sample_models/*.calib.npz` (200 images). Cells: accuracy (change in points).", "",
             "Methods: **magnitude** zeroes the smallest |w| of each layer (the same fraction everywhere, no data); "
             "**activation** ranks |w| x input norm and allocates the sparsity per layer (scope auto), no refit; "
             "**activation + reconstruction** (the default with `--calibration`) also refits every layer's kept "
             "weights and bias by least squares to the original model's outputs, layer by layer; **SparseGPT** "
             "(`--method sparsegpt`) chooses each layer's zeros and updates the rest by OBS steps from X^T X of its "
             "inputs (one capture from the original model), then refits the kept weights from X^T X alone; **sequential** "
             "captures each wave of layers from the model with the layers above already pruned, towards the original's "
             "outputs.", ""]
    curves(lines)
    channels(lines, args.budget)
    out = Path(args.out)  # the hand-written sections (the real model, memory: issue 15) are kept as they are
    out.write_text(with_hand_sections("\n".join(lines) + "\n", out.read_text() if out.exists() else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
