"""Which layers of a sentence encoder cost the most when pruned one-shot (issue 15, item 2): prune one group of layers
(one kind in every block, or every layer of one block) with SparseGPT and judge the whole model on held-out sentences.

    .venv/bin/python bench/prune_layer_costs.py [--model minilm|mpnet] [--sparsity 0.5] [--groups kind block]
        [--calibration export|text|both] [--set field=value ...]
    .venv/bin/python bench/prune_layer_costs.py --kinds attention/self/query=0.8 ... [--sparsity 0.5]

With `--kinds KIND=FRACTION ...` it prunes the whole model once instead: each named kind of layer (in every block)
at its fraction, the other kinds at --sparsity, and prints the overall fraction of zeros with the cosine.

Each row: the group, how many weights it holds, and mean cosine of the mean-pooled embeddings against fp32 (worst
sentence in brackets) with only that group pruned (bench/deep_compression_real.py's data and metrics; the others stay
dense: `layer_sparsity` of the group, 0 elsewhere). Wall and CPU seconds of the whole run at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deep_compression_real as real  # noqa: E402
from embedding_metrics import row_cosines  # noqa: E402

from onnxshrink.passes.prune import Prune, PruneConfig  # noqa: E402


def layers(model) -> dict[str, int]:
    """MatMul node name -> weight count, for the 2-D constant weights."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def kind(name: str) -> str:
    """The layer's role with the block number taken out: `/model/encoder/layer.3/attention/self/query/MatMul` ->
    `attention/self/query`."""
    return re.sub(r"^.*?layer\.\d+/", "", name).rsplit("/", 1)[0]


def block(name: str) -> str:
    found = re.search(r"layer\.(\d+)/", name)
    return f"block {found[1]}" if found else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "mpnet"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--groups", nargs="+", default=["kind", "block"], choices=["kind", "block", "layer"])
    parser.add_argument("--calibration", default="export", choices=["export-padded", "export", "text", "both"])
    parser.add_argument("--set", nargs="*", default=[], help="PruneConfig field=value")
    parser.add_argument("--kinds", nargs="*", default=None, help="KIND=FRACTION: one whole-model run with these")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path, model, calibration, outputs, _, what = real.minilm(args.calibration, 0, args.model)
    reference = outputs(model, args.threads)
    sizes = layers(model)
    fields = {"method": "sparsegpt", "scope": "layer", **real.parse(args.set), "sparsity": 0.0}
    print(f"# {path.parent.parent.name}: {what}; {args.sparsity:g} of each group's weights, the rest dense; "
          f"{' '.join(f'{k}={v}' for k, v in fields.items() if k != 'sparsity')}")
    start, cpu = time.perf_counter(), time.process_time()
    if args.kinds is not None:
        fractions = {k: float(v) for k, v in (pair.split("=") for pair in args.kinds)}
        chosen = {n: fractions.get(kind(n), args.sparsity) for n in sizes}
        config = PruneConfig(**fields, layer_sparsity=chosen)
        pruned, _ = Prune(config, calibration, threads=args.threads)(model)
        cos = row_cosines(reference, outputs(pruned, args.threads))
        overall = sum(chosen[n] * sizes[n] for n in sizes) / sum(sizes.values())
        print(f"kinds {' '.join(args.kinds)}, others {args.sparsity:g}: {overall:.1%} zeros overall, "
              f"cosine {cos.mean():.4f} ({cos.min():.4f}), {time.perf_counter() - start:.0f} s wall, "
              f"{time.process_time() - cpu:.0f} s CPU", flush=True)
        return
    for grouping in args.groups:
        name_of = {"kind": kind, "block": block, "layer": lambda n: n}[grouping]
        groups: dict = {}
        for name in sizes:
            groups.setdefault(name_of(name), []).append(name)
        for group, names in groups.items():
            config = PruneConfig(**fields, layer_sparsity={n: args.sparsity for n in names})
            pruned, _ = Prune(config, calibration, threads=args.threads)(model)
            cos = row_cosines(reference, outputs(pruned, args.threads))
            print(f"{grouping:5s} {group:40s} {sum(sizes[n] for n in names) / sum(sizes.values()):6.1%} of weights: "
                  f"cosine {cos.mean():.4f} ({cos.min():.4f})", flush=True)
    children = os.times()
    print(f"# {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
          f"(load average {os.getloadavg()[0]:.1f}; children {children.children_user:.0f} s)")


if __name__ == "__main__":
    main()
