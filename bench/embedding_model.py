"""quantize on a BERT-sized encoder: the embedding tables float (before) vs quantized (after).

The model is generated, shaped like all-MiniLM-L6-v2: word embeddings [30522, 384], positions [512, 384],
token types [2, 384], LayerNorm, 6 encoder layers (12 heads, FFN 1536 with GELU), random weights (seed 0).
`--model PATH` measures an exported model instead (int64 inputs: *input_ids* random ids, *mask* ones,
*token_type* zeros). Reported for fp32, `quantize` (dynamic int8) and `quantize --bits 4`, each with the
embedding tables left float (embeddings=False, as before) and with the default: file size ratio, cosine of
mean-pooled outputs vs fp32 (random ids, 16 x seq 64, or `--data NPZ`'s inputs), session creation ms, latency ratio vs fp32 at batch 1
and 8 (seq 64, 1 thread, sessions alternating); then each "after" timed against its "before".

    .venv/bin/python bench/embedding_model.py [--model PATH [--data NPZ]] [--budget 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic  # noqa: E402
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402
from onnxshrink.validate import measure_latency  # noqa: E402

VOCAB, WIDTH, POSITIONS, LAYERS, HEADS, FFN = 30522, 384, 512, 6, 12, 1536


def encoder(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name, *shape, scale=None):
        return const(name, (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32))

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x, name):
        return node("LayerNormalization", [x, const(name + ".g", np.ones(WIDTH, np.float32)),
                                           const(name + ".b", np.zeros(WIDTH, np.float32))], name, axis=-1, epsilon=1e-12)

    def linear(x, name, k, n):
        return node("Add", [node("MatMul", [x, weight(name + ".w", k, n)], name + "/MatMul"),
                            weight(name + ".bias", n, scale=0.02)], name + "/Add")

    word = node("Gather", [weight("word_embeddings", VOCAB, WIDTH, scale=0.05), "input_ids"], "embeddings/word", axis=0)
    seq = node("Gather", [node("Shape", ["input_ids"], "shape"), const("one", np.array(1, np.int64))], "seq")
    positions = node("Range", [const("zero", np.array(0, np.int64)), seq, const("step", np.array(1, np.int64))],
                     "positions")
    pos = node("Gather", [weight("position_embeddings", POSITIONS, WIDTH, scale=0.02), positions], "embeddings/position",
               axis=0)
    kind = node("Gather", [weight("token_type_embeddings", 2, WIDTH, scale=0.02), "token_type_ids"], "embeddings/type",
                axis=0)
    h = layer_norm(node("Add", [node("Add", [word, pos], "embeddings/add0"), kind], "embeddings/add1"), "embeddings/ln")
    heads_shape = const("heads_shape", np.array([0, 0, HEADS, WIDTH // HEADS], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, WIDTH], np.int64))
    scale = const("attn_scale", np.array(1 / np.sqrt(WIDTH // HEADS), np.float32))
    half, root2 = const("half", np.array(0.5, np.float32)), const("root2", np.array(np.sqrt(2), np.float32))
    one = const("onef", np.array(1.0, np.float32))
    for i in range(LAYERS):
        p = f"layer{i}"
        q, k, v = (node("Reshape", [linear(h, f"{p}.{n}", WIDTH, WIDTH), heads_shape], f"{p}/{n}_heads") for n in "qkv")
        q = node("Transpose", [q], f"{p}/qT", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}/kT", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}/vT", perm=[0, 2, 1, 3])
        probs = node("Softmax", [node("Mul", [node("MatMul", [q, k], f"{p}/qk"), scale], f"{p}/scaled")], f"{p}/softmax",
                     axis=-1)
        context = node("Reshape", [node("Transpose", [node("MatMul", [probs, v], f"{p}/pv")], f"{p}/ctxT",
                                        perm=[0, 2, 1, 3]), merge_shape], f"{p}/ctx")
        h = layer_norm(node("Add", [linear(context, f"{p}.o", WIDTH, WIDTH), h], f"{p}/res1"), f"{p}/ln1")
        up = linear(h, f"{p}.up", WIDTH, FFN)
        erf = node("Erf", [node("Div", [up, root2], f"{p}/gelu_div")], f"{p}/gelu_erf")
        gelu = node("Mul", [node("Mul", [up, node("Add", [erf, one], f"{p}/gelu_add")], f"{p}/gelu_mul"), half],
                    f"{p}/gelu")
        h = layer_norm(node("Add", [linear(gelu, f"{p}.down", FFN, WIDTH), h], f"{p}/res2"), f"{p}/ln2")
    nodes[-1].output[0] = "last_hidden_state"
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "token_type_ids")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", WIDTH])
    model = helper.make_model(helper.make_graph(nodes, "encoder", ids, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        name = value.name
        if "mask" in name:
            feed[name] = np.ones((batch, seq), np.int64)
        elif "type" in name:
            feed[name] = np.zeros((batch, seq), np.int64)
        else:
            feed[name] = rng.integers(1000, VOCAB, (batch, seq), dtype=np.int64)
    return feed


def pooled(session, feed) -> np.ndarray:
    """Mean over the tokens the attention mask keeps (all of them without one)."""
    hidden = session.run(None, feed)[0]
    mask = feed.get("attention_mask", np.ones(hidden.shape[:2], np.int64))[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path, help="npz of the model's inputs (tokenized sentences) for the cosine")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of alternating runs per latency")
    args = parser.parse_args()
    import onnxruntime as ort

    model = onnx.load(str(args.model)) if args.model else encoder()
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {platform.machine()}, python "
          f"{platform.python_version()}; {'model ' + str(args.model) if args.model else 'generated MiniLM-shaped encoder'}"
          + (f", cosine on {args.data}" if args.data else ""))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "fp32.onnx"}
        onnx.save(model, str(paths["fp32"]))
        passes = {"int8, table fp32 (before)": QuantizeDynamic(QuantizeConfig(embeddings=False)),
                  "int8, table int8 (after)": QuantizeDynamic(QuantizeConfig()),
                  "int4, table fp32 (before)": QuantizeBlockwise(BlockwiseConfig(bits=4, embeddings=False)),
                  "int4, table int4 (after)": QuantizeBlockwise(BlockwiseConfig(bits=4))}
        for index, (label, transform) in enumerate(passes.items()):
            quantized, _ = transform(model)
            paths[label] = Path(tmp) / f"{index}.onnx"
            onnx.save(quantized, str(paths[label]))
        sessions, load_ms = {}, {}
        for label, path in paths.items():
            start = time.perf_counter()
            sessions[label] = make_session(str(path))
            load_ms[label] = (time.perf_counter() - start) * 1e3
        if args.data:
            with np.load(args.data) as arrays:
                evaluation = {value.name: arrays[value.name] for value in model.graph.input}
        else:
            evaluation = feeds(model, 16, 64, 1)
        reference = pooled(sessions["fp32"], evaluation)
        size = paths["fp32"].stat().st_size
        print(f"{'model':28} {'size':>6} {'cosine':>8} {'load ms':>8} {'b1':>6} {'b8':>6}")
        for label, path in paths.items():
            got = pooled(sessions[label], evaluation)
            cosine = float(np.mean(np.sum(got * reference, 1) / np.linalg.norm(got, axis=1)
                                   / np.linalg.norm(reference, axis=1)))
            ratios = []
            for batch in (1, 8):
                latency = measure_latency([sessions["fp32"], sessions[label]], feeds(model, batch, 64, 2), args.budget)
                ratios.append(latency["ratio"])
            print(f"{label:28} {path.stat().st_size / size:6.3f} {cosine:8.5f} {load_ms[label]:8.0f} "
                  f"{ratios[0]:6.2f} {ratios[1]:6.2f}")
        print("after / before, timed against each other (the table's own cost):")
        for bits in ("int8", "int4"):
            before, after = (next(label for label in paths if label.startswith(bits) and label.endswith(end))
                             for end in ("(before)", "(after)"))
            ratios = [measure_latency([sessions[before], sessions[after]], feeds(model, batch, 64, 2),
                                      args.budget)["ratio"] for batch in (1, 8)]
            print(f"{bits:28} {'':6} {'':8} {'':8} {ratios[0]:6.2f} {ratios[1]:6.2f}")


if __name__ == "__main__":
    main()
