"""How far each MatMul's input activation reaches past its typical value, on real tokens of the held-out sentences.

    python bench/activation_outliers.py [--model minilm|mpnet] [--sentences 32]

Reads the export that bench/transformer_bench.py cached (run it first). Why: one per-tensor uint8 scale (dynamic
int8's, and static int8's without smoothing) spends its 256 levels on the largest value, so an input whose max|x| is
1000x its median |x| keeps almost nothing of its typical values. Padding positions are left out (validate does too).

The last two columns are what the data-aware fits see (cluster, prune, factorize: each layer's X^T X): the share of
its trace held by the three largest inputs, and the largest real token's norm over the median token's. MPNet's
"massive activations" show there, and why those fits weight each token by its own size
(reconstruct.token_weights; docs/benchmarks-cluster.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from transformer_bench import cache_root  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpnet")
    parser.add_argument("--sentences", type=int, default=32)
    args = parser.parse_args()
    exports = sorted((cache_root() / args.model).glob("export-*/model.onnx"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise SystemExit(f"error: no export under {cache_root() / args.model}: run bench/transformer_bench.py --model {args.model}")
    folder = exports[-1].parent
    model = onnx.load(folder / "model.onnx")
    inits = {t.name for t in model.graph.initializer}
    reads = {n.name: n.input[0] for n in model.graph.node
             if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits}
    tensors = sorted(set(reads.values()))
    for name in tensors:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    heldout = {k: v[:args.sentences] for k, v in np.load(folder / "heldout.npz").items()}
    values = dict(zip(tensors, session.run(tensors, heldout)))
    real = heldout["attention_mask"].astype(bool)
    print(f"{folder / 'model.onnx'}: {args.sentences} held-out sentences, {int(real.sum())} real tokens\n")
    print("| MatMul | input max abs | median abs | max / median | top-3 inputs' share of X^T X | largest / median token norm |")
    print("|---|---:|---:|---:|---:|---:|")
    for node, tensor in reads.items():
        rows = values[tensor][real] if values[tensor].shape[:2] == real.shape else values[tensor]
        rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
        x = np.abs(rows)
        median = float(np.median(x))
        energy = np.sort(np.sum(rows * rows, axis=0))[::-1]
        norms = np.sqrt(np.sum(rows * rows, axis=1))
        print(f"| {node} | {x.max():.1f} | {median:.3f} | {x.max() / median if median > 0 else float('inf'):.0f} "
              f"| {energy[:3].sum() / energy.sum():.2f} | {norms.max() / np.median(norms):.1f} |")


if __name__ == "__main__":
    main()
