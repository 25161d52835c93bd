"""One codebook a layer, with and without channel scales, on a transformer's real layer inputs (issue 15, item 2).

    .venv/bin/python bench/codebook_layouts.py [--model minilm|mpnet] [--layers 0,3,4,5,11,17,22,23,35] [--bits 4]

For each chosen MatMul layer of the cached export (bench/transformer_export.py), X^T X of its input over the real
tokens (attention_mask) of the export's calibration sentences and, separately, of its held-out sentences, both
captured from the fp32 model. Each layout is fitted on the calibration statistics the way the cluster pass fits it
(k-means weighted by input energy, times scale^2 for a scaled column; nearest entry or GPTQ order with the given
damping) and judged by the relative output error tr(D^T H D) / tr(W^T H W) under both: the calibration figure is
what the pass sees, the held-out one what a user's sentences see. No refit and no propagation through the model
(each layer on the original's inputs): this compares layouts, not whole models (bench/deep_compression_real.py).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxshrink.algorithms import codebook  # noqa: E402
from onnxshrink.passes.cluster import ENERGY_FLOOR, _row_scales  # noqa: E402

BATCH = 32


def layers_of(model: onnx.ModelProto) -> list[tuple[str, str, np.ndarray]]:
    """(node name, input tensor, [K, N] weight) of every MatMul with an initializer weight, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    return [(node.name, node.input[0], numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
            for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in inits]


def input_grams(model: onnx.ModelProto, inputs: list[str], data: dict) -> dict[str, np.ndarray]:
    """X^T X of each tensor in `inputs` over the real tokens of `data` (float64)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors by name
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    grams = {name: 0.0 for name in inputs}
    for start in range(0, len(data["input_ids"]), BATCH):
        feed = {key: value[start:start + BATCH] for key, value in data.items()}
        real = feed["attention_mask"].reshape(-1).astype(bool)
        for name, value in zip(inputs, session.run(inputs, feed)):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)[real]
            grams[name] = grams[name] + x.T @ x
    return grams


def relative_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = q - w
    return float(np.einsum("ij,ij->", d, h @ d) / np.einsum("ij,ij->", w, h @ w))


def fitted(w: np.ndarray, h: np.ndarray, bits: int, scaled: bool, rounding: str, damp: float) -> np.ndarray:
    """The layer's weight as one codebook (optionally over fp16 channel scales) decodes it, fitted on `h`."""
    k, n = w.shape
    scale = _row_scales(w.T).reshape(-1).astype(np.float64) if scaled else np.ones(n)
    u = w / scale
    energy = np.diag(h) / max(float(np.diag(h).mean()), 1e-30)
    energy = energy + ENERGY_FLOOR * max(float(energy.mean()), 1e-30)
    weights = (energy[:, None] * np.square(scale)[None, :]).reshape(1, -1)
    books = codebook.fit(u.reshape(1, -1), 2 ** bits, weights)
    if rounding == "gptq":
        idx = codebook.gptq_assign(u, books, h, damp=damp)
    else:
        idx = codebook.assign(u.reshape(1, -1), books).reshape(k, n)
    return books[0][idx] * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--layers", default="0,3,4,5,11,17,22,23,35", help="MatMul layers by index in graph order")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--damping", default="0.01,0.1", help="GPTQ dampings (fractions of H's mean diagonal)")
    args = parser.parse_args()
    folder = Path(sorted(glob.glob(os.path.expanduser(f"~/.cache/onnxshrink/{args.model}/export-*/")))[0])
    model = onnx.load(str(folder / "model.onnx"))
    layers = layers_of(model)
    chosen = [layers[int(i)] for i in args.layers.split(",")]
    inputs = sorted({x for _, x, _ in chosen})
    grams = {part: input_grams(model, inputs, dict(np.load(folder / f"{part}.npz")))
             for part in ("calibration", "heldout")}
    layouts = [(scaled, "nearest", 0.0) for scaled in (False, True)]
    layouts += [(scaled, "gptq", float(d)) for scaled in (False, True) for d in args.damping.split(",")]
    names = [f"{'scaled' if s else 'one codebook'}, {r}{f' damp {d:g}' if r == 'gptq' else ''}" for s, r, d in layouts]
    print(f"# {args.model}, {args.bits} bits, {len(chosen)} layers; relative output error, calibration / held-out")
    results = []
    for name, x, w in chosen:
        h, held = grams["calibration"][x], grams["heldout"][x]
        row = [(relative_error(w, q, h), relative_error(w, q, held))
               for q in (fitted(w, h, args.bits, s, r, d) for s, r, d in layouts)]
        results.append(row)
        print(f"{name} [{w.shape[0]}x{w.shape[1]}]: " + "; ".join(f"{n} {a:.4f} / {b:.4f}" for n, (a, b) in zip(names, row)),
              flush=True)
    mean = np.mean(np.array(results), axis=0)
    for label, (a, b) in zip(names, mean):
        print(f"mean, {label}: {a:.4f} / {b:.4f}")


if __name__ == "__main__":
    main()
