"""A transformer-sized model (about 2.5 GB of fp32 weights in external data) for the scale benchmark.

    python bench/big_model.py [--gb 2.5] [--width 2048] [--out build/big/big.onnx]

Blocks of x + W_o((x W_q) * sigmoid(x W_k)) then x + W_2 relu(W_1 x + b_1): the weight shapes of a
transformer layer (d x d projections, d x 4d feed-forward) without attention's sequence axis, so it runs
on a [batch, d] input. Weights are seeded random, written tensor by tensor straight into the data file, so
generating it never holds more than one tensor in memory. Never committed: `make big-model` writes it
under build/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def external_tensor(name: str, array: np.ndarray, data, location: str) -> TensorProto:
    offset = data.tell()
    data.write(array.tobytes())
    tensor = TensorProto(name=name, dims=list(array.shape), data_type=TensorProto.FLOAT)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def build(out: Path, gb: float, width: int, seed: int = 0) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_block = 11 * width * width * 4
    blocks = max(1, round(gb * 1e9 / per_block))
    location = out.name + ".data"
    nodes, inits = [], []
    x = "x"
    with open(out.parent / location, "wb") as data:
        def weight(name, rows, cols):
            array = (rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(rows)))
            inits.append(external_tensor(name, array, data, location))
            return name

        for b in range(blocks):
            p = f"block{b}"
            q = weight(f"{p}.wq", width, width)
            k = weight(f"{p}.wk", width, width)
            o = weight(f"{p}.wo", width, width)
            up = weight(f"{p}.w1", width, 4 * width)
            down = weight(f"{p}.w2", 4 * width, width)
            inits.append(helper.make_tensor(f"{p}.b1", TensorProto.FLOAT, [4 * width], np.zeros(4 * width, np.float32)))
            nodes += [
                helper.make_node("MatMul", [x, q], [f"{p}.q"], name=f"{p}/q"),
                helper.make_node("MatMul", [x, k], [f"{p}.k"], name=f"{p}/k"),
                helper.make_node("Sigmoid", [f"{p}.k"], [f"{p}.gate"], name=f"{p}/gate"),
                helper.make_node("Mul", [f"{p}.q", f"{p}.gate"], [f"{p}.qk"], name=f"{p}/mix"),
                helper.make_node("MatMul", [f"{p}.qk", o], [f"{p}.o"], name=f"{p}/o"),
                helper.make_node("Add", [x, f"{p}.o"], [f"{p}.h"], name=f"{p}/residual1"),
                helper.make_node("MatMul", [f"{p}.h", up], [f"{p}.u"], name=f"{p}/up"),
                helper.make_node("Add", [f"{p}.u", f"{p}.b1"], [f"{p}.ub"], name=f"{p}/up_bias"),
                helper.make_node("Relu", [f"{p}.ub"], [f"{p}.r"], name=f"{p}/relu"),
                helper.make_node("MatMul", [f"{p}.r", down], [f"{p}.d"], name=f"{p}/down"),
                helper.make_node("Add", [f"{p}.h", f"{p}.d"], [f"{p}.out"], name=f"{p}/residual2"),
            ]
            x = f"{p}.out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(out))
    print(f"wrote {out} and {location}: {blocks} blocks of width {width}, {blocks * per_block / 1e9:.2f} GB of weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--out", default="build/big/big.onnx")
    args = parser.parse_args()
    build(Path(args.out), args.gb, args.width)


if __name__ == "__main__":
    main()
