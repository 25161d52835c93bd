"""Why 4-bit MatMulNBits can run slower than fp32, layer by layer: single layers of MiniLM's shapes in each form.

Each layer is `X [B, S, K] -> MatMul(W [K, N]) -> Add(bias)`, the shape of all-MiniLM-L6-v2's projections
(384x384 attention, 384x1536 FFN up, 1536x384 FFN down), run at M = B*S = 1, 64 and 512 rows (batch 1 at
sequence 1, batch 1 and batch 8 at sequence 64). Forms, every one written by onnxshrink itself:

- fp32: the float layer (the reference; every ratio is form / fp32 p50 latency);
- nbits L<level> b<block> [asym]: QuantizeBlockwise --bits 4 with that MatMulNBits accuracy_level and block size
  (level 0 = float32 activations, onnxruntime's MatMulNBitsQuantizer default; 4 = int8 activations inside the
  kernel), zero points written when asym;
- int8 dyn: QuantizeDynamic (per-channel int8 weights, DynamicQuantizeMatMul with integer kernels);
- int8 folded (Cast+Mul folded at load, fp32 kernel) is fp32's speed by construction and is not timed.

All sessions of one (shape, M) alternate in one loop (validate.measure_latency's, for n sessions), 1 onnxruntime thread; the
whole loop is repeated --repeats times and the median ratio printed, because the machine is shared and noisy.
With --model PATH (an encoder with int64 input_ids/attention_mask[/token_type_ids], e.g. the exported MiniLM) and
--wide (bench/embedding_model.py's generated encoder at width 768, FFN 3072, 4 layers, random weights) whole models
are timed at batch 1 and 8, sequence 64, against fp32 in the forms `--bits 4` wrote before (accuracy_level 4 and
MatMulNBits everywhere), as onnxruntime's MatMulNBitsQuantizer writes them (level 0), and as it writes them now.
--gptq CALIBRATION HELDOUT adds, for --model, the size and mean-pooled cosine / top-5 overlap vs fp32 of
`--algorithm gptq` forms (bench/embedding_metrics.py; minutes per form).

    .venv/bin/python bench/int4_speed.py [--budget 1.5] [--repeats 3] [--shapes 384x384,...]
        [--model model.onnx [--gptq calibration.npz heldout.npz]] [--wide] [--skip-layers]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic  # noqa: E402
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402

SHAPES = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768))
ROWS = ((1, 1), (1, 64), (8, 64))  # (batch, sequence): M = 1, 64, 512
# (label, accuracy_level, block_size, symmetric)
NBITS = (("nbits L0 b32", 0, 32, True), ("nbits L4 b32", 4, 32, True), ("nbits L0 b64", 0, 64, True),
         ("nbits L4 b64", 4, 64, True), ("nbits L0 b128", 0, 128, True), ("nbits L4 b128", 4, 128, True),
         ("nbits L4 b32 asym", 4, 32, False))


def layer_model(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"], name="layer/MatMul"),
             helper.make_node("Add", ["y0", "bias"], ["y"], name="layer/Add")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def forms(model: onnx.ModelProto, calibration=None, levels=None) -> list:
    """(label, model) for every form timed; `levels` limits the MatMulNBits forms to those labels."""
    out = []
    for label, level, block, symmetric in NBITS:
        if levels and label not in levels:
            continue
        config = BlockwiseConfig(bits=4, block_size=block, accuracy_level=level, symmetric=symmetric)
        out.append((label, QuantizeBlockwise(config)(model)[0]))
    out.append(("int8 dyn", QuantizeDynamic(QuantizeConfig(integer_min_macs=0))(model)[0]))
    return out


def ratios(sessions: list, feed: dict, budget: float, repeats: int) -> list[float]:
    """Median over repeats of each session's p50 / the first session's p50, all sessions alternating in one loop."""
    runs = []
    for _ in range(repeats):
        p50 = alternate(sessions, feed, budget)
        runs.append([p / p50[0] for p in p50])
    return [float(np.median([r[i] for r in runs])) for i in range(len(sessions))]


def alternate(sessions: list, feed: dict, budget: float) -> list[float]:
    """validate.measure_latency's loop for any number of sessions: warm up, alternate, p50 of each."""
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < 10 or (time.perf_counter() - start < budget and len(times[0]) < 2000):
        for i, session in enumerate(sessions):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def layer_table(budget: float, repeats: int, shapes=SHAPES) -> list[str]:
    lines = []
    header = None
    rng = np.random.default_rng(1)
    for k, n in shapes:
        model = layer_model(k, n)
        candidates = forms(model)
        labels = ["fp32"] + [label for label, _ in candidates]
        if header is None:
            header = "| layer K x N | M (batch x seq) | " + " | ".join(labels[1:]) + " |"
            lines += [header, "|" + "---|" * (len(labels) + 1)]
            print("\n".join(lines), flush=True)
        sessions = [make_session(model)] + [make_session(m) for _, m in candidates]
        for batch, seq in ROWS:
            feed = {"x": rng.standard_normal((batch, seq, k)).astype(np.float32)}
            r = ratios(sessions, feed, budget, repeats)
            best = min(range(1, len(r)), key=lambda i: r[i])
            cells = [f"**{v:.2f}**" if i == best else f"{v:.2f}" for i, v in enumerate(r)][1:]
            lines.append(f"| {k}x{n} | {batch * seq} ({batch}x{seq}) | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def model_feed(model: onnx.ModelProto, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    feed = {}
    for value in model.graph.input:
        if value.name == "input_ids":
            feed[value.name] = rng.integers(1000, 20000, (batch, seq), dtype=np.int64)
        elif value.name == "attention_mask":
            feed[value.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feed[value.name] = np.zeros((batch, seq), dtype=np.int64)
    return feed


MODEL_FORMS = (("before: level 4, MatMulNBits everywhere, block 32", {"accuracy_level": 4, "integer_below": 0}),
               ("level 0 (MatMulNBitsQuantizer's default), MatMulNBits everywhere", {"accuracy_level": 0, "integer_below": 0}),
               ("--bits 4 (default: level by rows, int8 integer mid-sized layers)", {}),
               ("--bits 4 --block-size 128", {"block_size": 128}))


GPTQ_FORMS = (("--bits 4", {}), ("--bits 4 --block-size 128", {"block_size": 128}),
              ("--block-size 128, tables in blocks of 64 (BlockwiseConfig.embedding_block_size)",
               {"block_size": 128, "embedding_block_size": 64}))


def wide_encoder() -> onnx.ModelProto:
    """bench/embedding_model.py's generated encoder at BERT-base width: 768, 12 heads, FFN 3072, 4 layers."""
    sys.path.insert(0, str(ROOT / "bench"))
    import embedding_model

    embedding_model.WIDTH, embedding_model.HEADS, embedding_model.FFN, embedding_model.LAYERS = 768, 12, 3072, 4
    return embedding_model.encoder(0)


def model_table(model: onnx.ModelProto, budget: float, repeats: int) -> list[str]:
    """fp32 vs --bits 4 (RTN) forms of a whole encoder at batch 1 and 8, seq 64: size and latency ratios."""
    candidates = [(label, QuantizeBlockwise(BlockwiseConfig(bits=4, **options))(model)[0]) for label, options in MODEL_FORMS]
    sessions = [make_session(model)] + [make_session(m) for _, m in candidates]
    lines = ["| model form | size vs fp32 | latency b1 | latency b8 |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = {}
    for batch in (1, 8):
        results[batch] = ratios(sessions, model_feed(model, batch, 64), budget, repeats)
    size = model.ByteSize()
    for i, (label, m) in enumerate(candidates, start=1):
        lines.append(f"| {label} | {m.ByteSize() / size:.3f} | {results[1][i]:.2f} | {results[8][i]:.2f} |")
        print(lines[-1], flush=True)
    return lines


def quality_table(path: Path, calibration: Path, heldout: Path, forms=GPTQ_FORMS) -> list[str]:
    """--algorithm gptq forms of an encoder vs fp32 on held-out sentences: size, mean-pooled cosine, top-5 overlap."""
    sys.path.insert(0, str(ROOT / "bench"))
    from embedding_metrics import embedding_quality, mean_pool

    from onnxshrink.data import input_specs, load_npz

    model = onnx.load(str(path))
    data = load_npz(calibration, input_specs(model), role="calibration data")
    feeds = dict(np.load(heldout))

    def pooled(session):
        rows = len(feeds["attention_mask"])
        return np.concatenate([mean_pool(session.run(None, {k: v[i:i + 50] for k, v in feeds.items()})[0],
                                         feeds["attention_mask"][i:i + 50]) for i in range(0, rows, 50)])

    reference = pooled(make_session(model))
    lines = ["| --algorithm gptq form | size vs fp32 | cosine | top-5 overlap |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, options in forms:
        quantized = QuantizeBlockwise(BlockwiseConfig(bits=4, algorithm="gptq", **options), calibration=data)(model)[0]
        quality = embedding_quality(reference, pooled(make_session(quantized)))
        lines.append(f"| {label} | {quantized.ByteSize() / model.ByteSize():.3f} | {quality['cosine']:.4f} | "
                     f"{quality['topk']:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of alternating runs per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, help="also time a whole encoder (int64 input_ids, attention_mask)")
    parser.add_argument("--shapes", help="layer shapes KxN,KxN (default: MiniLM's and a 768-wide encoder's)")
    parser.add_argument("--wide", action="store_true", help="also time a generated 768-wide encoder (random weights)")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--gptq", nargs=2, type=Path, metavar=("CALIBRATION", "HELDOUT"),
                        help="with --model: also GPTQ quality on these .npz (mean-pooled cosine; minutes per form)")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"latency / fp32 (p50, median of {args.repeats} alternating loops)\n")
    if not args.skip_layers:
        shapes = [tuple(int(d) for d in item.split("x")) for item in args.shapes.split(",")] if args.shapes else SHAPES
        layer_table(args.budget, args.repeats, shapes)
    if args.model:
        print()
        model_table(onnx.load(str(args.model)), args.budget, args.repeats)
        if args.gptq:
            print()
            quality_table(args.model, *args.gptq)
    if args.wide:
        print()
        model_table(wide_encoder(), args.budget, args.repeats)


if __name__ == "__main__":
    main()
