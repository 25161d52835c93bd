"""Which form of an int8 (or 4-bit) embedding table onnxruntime CPU runs best: load time, run time, memory.

One Gather over a [30522, 384] table (all-MiniLM-L6-v2's word embeddings) with int64 ids [8, 128] and [1, 128].
Each form runs in its own process (so its resident memory is its own), 1 onnxruntime thread:

    fp32        Gather(E)                                              the original
    folded      Gather(Mul(Cast(Eq int8), s[V,1]))                     initializers only: folded to fp32 at load
    gather_dq   Cast(Gather(Eq int8)) * Gather(s[V,1])                 only the gathered rows are decoded
    gbq8        com.microsoft.GatherBlockQuantized uint8, bits 8, blocks of 128 along the row
    gbq4        com.microsoft.GatherBlockQuantized int4, blocks of 32 along the row
    gbq4u       the same codes as uint8 bits 4 (two per byte, zero point 8)

Reported: file bytes, session creation ms, median run ms, resident memory added by the session (MiB, RSS
after creation and the runs minus before), and max abs error vs fp32.

    .venv/bin/python bench/embedding_forms.py [--rows 30522] [--dim 384] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FORMS = ("fp32", "folded", "gather_dq", "gbq8", "gbq4", "gbq4u")


def build(form: str, rows: int, dim: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((rows, dim)) * 0.05).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", dim])
    inits, nodes = [], []
    amax = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    opsets = [helper.make_opsetid("", 17)]
    if form == "fp32":
        inits.append(numpy_helper.from_array(table, "E"))
        nodes.append(helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0))
    elif form == "folded":
        inits += [numpy_helper.from_array(q, "Eq"), numpy_helper.from_array(scale, "Es")]
        nodes += [helper.make_node("Cast", ["Eq"], ["Ef"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["Ef", "Es"], ["E"]),
                  helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0)]
    elif form == "gather_dq":
        inits += [numpy_helper.from_array(q, "Eq"), numpy_helper.from_array(scale, "Es")]
        nodes += [helper.make_node("Gather", ["Eq", "ids"], ["rows_q"], axis=0),
                  helper.make_node("Gather", ["Es", "ids"], ["rows_s"], axis=0),
                  helper.make_node("Cast", ["rows_q"], ["rows_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["rows_f", "rows_s"], ["emb"])]
    else:
        bits, block = (8, 128) if form == "gbq8" else (4, 32)
        kind = form
        blocks = table.reshape(rows, dim // block, block)
        if bits == 8:
            amax = np.abs(blocks).max(axis=2)
            s = np.where(amax > 0, amax / 127, 1).astype(np.float32)
            codes = (np.clip(np.rint(blocks / s[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, dim)
            data = numpy_helper.from_array(codes, "Eq")
        else:
            amax = np.abs(blocks).max(axis=2)
            s = np.where(amax > 0, amax / 7, 1).astype(np.float32)
            codes = np.clip(np.rint(blocks / s[..., None]), -8, 7).astype(np.int8).reshape(rows, dim)
            if kind == "gbq4u":
                u = (codes + 8).astype(np.uint8)
                data = numpy_helper.from_array((u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8), "Eq")
            else:
                data = helper.make_tensor("Eq", TensorProto.INT4, [rows, dim], codes.reshape(-1).tolist())
        inits += [data, numpy_helper.from_array(s, "Es")]
        nodes.append(helper.make_node("GatherBlockQuantized", ["Eq", "ids", "Es"], ["emb"], domain="com.microsoft",
                                      bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "embedding", [ids], [out], inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _rss_kib() -> int:
    """Resident memory now (ru_maxrss would carry the parent's peak across fork/exec)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def measure(path: str, rows: int, repeats: int) -> dict:
    """Run in a child process: its own RSS."""
    import onnxruntime as ort

    before = _rss_kib()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - start) * 1e3
    rng = np.random.default_rng(1)
    result = {"load_ms": load_ms}
    for batch in (1, 8):
        ids = rng.integers(0, rows, size=(batch, 128), dtype=np.int64)
        session.run(None, {"ids": ids})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            session.run(None, {"ids": ids})
            times.append(time.perf_counter() - t)
        result[f"run_ms_b{batch}"] = float(np.median(times) * 1e3)
    result["rss_mib"] = (_rss_kib() - before) / 1024
    ids = np.arange(0, rows, max(rows // 1000, 1), dtype=np.int64)[None, :]
    np.save(path + ".out.npy", session.run(None, {"ids": ids})[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30522)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.rows, args.repeats)))
        return
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"table [{args.rows}, {args.dim}], ids [batch, 128] int64, 1 thread")
    print(f"{'form':10} {'file MB':>8} {'load ms':>8} {'b1 ms':>7} {'b8 ms':>7} {'RSS MiB':>8} {'max err':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for form in FORMS:
            path = str(Path(tmp) / f"{form}.onnx")
            onnx.save(build(form, args.rows, args.dim), path)
            child = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--dim", str(args.dim),
                                    "--repeats", str(args.repeats), "--child", path], capture_output=True, text=True)
            if child.returncode:
                print(f"{form:10} failed: {child.stderr.strip().splitlines()[-1][:150]}")
                continue
            r = json.loads(child.stdout)
            out = np.load(path + ".out.npy")
            reference = out if reference is None else reference
            err = float(np.abs(out - reference).max())
            print(f"{form:10} {Path(path).stat().st_size / 1e6:8.1f} {r['load_ms']:8.1f} {r['run_ms_b1']:7.3f} "
                  f"{r['run_ms_b8']:7.3f} {r['rss_mib']:8.1f} {err:8.4f}")


if __name__ == "__main__":
    main()
