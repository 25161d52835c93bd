#!/usr/bin/env python3
"""Regenerate the sample ONNX models shipped with onnxshrink.

Trains two small classifiers on scikit-learn's bundled "digits" data set
(1797 8x8 grey-scale images of handwritten digits, 10 classes; it ships inside
the scikit-learn package, so nothing is downloaded) and writes:

* ``digits_mlp.onnx``       MLP 64-256-128-10 (MatMul + Add per layer, ReLU)
* ``digits_cnn.onnx``       small CNN (Conv-Relu, Conv-Relu, MaxPool, Flatten,
                            Gemm-Relu, Gemm)
* ``digits_mlp.calib.npz``  ``input`` float32 [200, 64] from the training split
* ``digits_mlp.eval.npz``   ``input`` float32 [N, 64], ``labels`` int64 [N]
* ``digits_cnn.calib.npz``  ``input`` float32 [200, 1, 8, 8]
* ``digits_cnn.eval.npz``   ``input`` float32 [N, 1, 8, 8], ``labels`` int64 [N]

Training is plain NumPy (mini-batch Adam, hand-written forward/backward
passes), fully seeded and single-threaded, so reruns give the same weights.
The ONNX graphs are built node by node with ``onnx.helper`` from the trained
weights, in the layout a PyTorch export has.

After writing, every model is checked with ``onnx.checker`` (full check),
run in onnxruntime on the held-out split, and compared with the NumPy
reference forward pass. The script exits non-zero if any held-out accuracy,
measured from the ONNX model in onnxruntime, is below 0.93.

Usage::

    python sample_models/generate.py [--out DIR]
"""

from __future__ import annotations

import os

# Single-threaded BLAS before NumPy is imported: reruns must give the same
# weights bit for bit, and the thread count can change summation order.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SEED = 20240517
N_EVAL = 450
N_CALIB = 200
MIN_ACCURACY = 0.93
OPSET = 17
IR_VERSION = 8
PRODUCER = "onnxshrink-sample-models"

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# data


def load_split(seed: int = SEED):
    """Digits data, scaled to [0, 1], split into train / calib / eval.

    The split is stratified by class and made with a fixed NumPy generator,
    so it does not depend on scikit-learn's own splitting helpers. The
    calibration samples are a subset of the training split; the evaluation
    samples are held out from training entirely.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data.astype(np.float32) / np.float32(16.0)).astype(np.float32)
    y = digits.target.astype(np.int64)

    rng = np.random.default_rng(seed)
    n = len(y)
    eval_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(N_EVAL * len(idx) / n))
        eval_idx.append(idx[:k])
    eval_idx = np.sort(np.concatenate(eval_idx))
    train_mask = np.ones(n, dtype=bool)
    train_mask[eval_idx] = False
    train_idx = np.flatnonzero(train_mask)
    calib_idx = np.sort(rng.choice(train_idx, size=N_CALIB, replace=False))
    return {
        "x_train": x[train_idx],
        "y_train": y[train_idx],
        "x_calib": x[calib_idx],
        "x_eval": x[eval_idx],
        "y_eval": y[eval_idx],
    }


# --------------------------------------------------------------------------
# training helpers


def softmax_xent(logits: np.ndarray, y: np.ndarray):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    b = len(y)
    loss = float(-np.log(p[np.arange(b), y] + 1e-12).mean())
    g = p
    g[np.arange(b), y] -= 1.0
    return loss, g / b


class Adam:
    def __init__(self, params: dict, lr: float = 1e-3, weight_decay: float = 0.0,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.params = params
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict, lr: float | None = None):
        lr = self.lr if lr is None else lr
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, p in self.params.items():
            g = grads[k]
            if self.wd and p.ndim > 1:  # decoupled weight decay, weights only
                p -= lr * self.wd * p
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            p -= lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)


def he_uniform(rng, shape, fan_in):
    bound = np.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape)


def bias_init(rng, n, fan_in):
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=n)


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + np.cos(np.pi * step / total))


def train_loop(params, forward_backward, x, y, rng, epochs, batch, lr, wd, name):
    opt = Adam(params, lr=lr, weight_decay=wd)
    n = len(y)
    steps_per_epoch = (n + batch - 1) // batch
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses = []
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            loss, grads = forward_backward(params, x[idx], y[idx])
            opt.step(grads, lr=cosine_lr(lr, step, total))
            step += 1
            losses.append(loss)
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"  [{name}] epoch {epoch + 1:3d}/{epochs}  loss {np.mean(losses):.4f}")
    return params


# --------------------------------------------------------------------------
# MLP 64-256-128-10


MLP_SIZES = [64, 256, 128, 10]


def mlp_init(rng):
    params = {}
    for i, (fi, fo) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]), start=1):
        params[f"fc{i}.weight"] = he_uniform(rng, (fi, fo), fi)  # [in, out]
        params[f"fc{i}.bias"] = bias_init(rng, fo, fi)
    return params


def mlp_forward(params, x, cache=False):
    acts = [x]
    h = x
    n_layers = len(MLP_SIZES) - 1
    for i in range(1, n_layers + 1):
        h = h @ params[f"fc{i}.weight"] + params[f"fc{i}.bias"]
        if i < n_layers:
            h = np.maximum(h, 0.0)
        acts.append(h)
    return (h, acts) if cache else h


def mlp_forward_backward(params, x, y):
    logits, acts = mlp_forward(params, x, cache=True)
    loss, g = softmax_xent(logits, y)
    grads = {}
    n_layers = len(MLP_SIZES) - 1
    for i in range(n_layers, 0, -1):
        a_in = acts[i - 1]
        grads[f"fc{i}.weight"] = a_in.T @ g
        grads[f"fc{i}.bias"] = g.sum(axis=0)
        if i > 1:
            g = (g @ params[f"fc{i}.weight"].T) * (a_in > 0)
    return loss, grads


# --------------------------------------------------------------------------
# CNN: Conv(1->16,3x3,p1)+Relu, Conv(16->32,3x3,p1)+Relu, MaxPool 2x2,
#      Flatten, Gemm(512->64)+Relu, Gemm(64->10)


def im2col3x3(x):
    """[B, C, H, W] -> [B*H*W, C*9], pad 1, stride 1; column order (c, kh, kw)
    so that ``W.reshape(out, C*9)`` of an ONNX/PyTorch conv weight matches."""
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)],
                    axis=2)  # [B, C, 9, H, W]
    return cols.transpose(0, 3, 4, 1, 2).reshape(b * h * w, c * 9)


def col2im3x3(dcols, shape):
    b, c, h, w = shape
    d = dcols.reshape(b, h, w, c, 9).transpose(0, 3, 4, 1, 2)  # [B, C, 9, H, W]
    dxp = np.zeros((b, c, h + 2, w + 2), dtype=dcols.dtype)
    k = 0
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, k]
            k += 1
    return dxp[:, :, 1:h + 1, 1:w + 1]


def conv3x3(x, weight, bias):
    b, _, h, w = x.shape
    o = weight.shape[0]
    cols = im2col3x3(x)
    out = cols @ weight.reshape(o, -1).T + bias  # [B*H*W, O]
    return out.reshape(b, h, w, o).transpose(0, 3, 1, 2), cols


def conv3x3_backward(dout, cols, x_shape, weight):
    b, o, h, w = dout.shape
    d = dout.transpose(0, 2, 3, 1).reshape(b * h * w, o)
    dw = (d.T @ cols).reshape(weight.shape)
    db = d.sum(axis=0)
    dx = col2im3x3(d @ weight.reshape(o, -1), x_shape)
    return dx, dw, db


def maxpool2x2(x):
    b, c, h, w = x.shape
    win = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(b, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)
    out = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    return out, arg


def maxpool2x2_backward(dout, arg, x_shape):
    b, c, h, w = x_shape
    dwin = np.zeros((b, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], axis=-1)
    dwin = dwin.reshape(b, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return dwin.reshape(b, c, h, w)


def cnn_init(rng):
    return {
        "conv1.weight": he_uniform(rng, (16, 1, 3, 3), 1 * 9),
        "conv1.bias": bias_init(rng, 16, 1 * 9),
        "conv2.weight": he_uniform(rng, (32, 16, 3, 3), 16 * 9),
        "conv2.bias": bias_init(rng, 32, 16 * 9),
        "fc1.weight": he_uniform(rng, (64, 512), 512),  # [out, in], Gemm transB=1
        "fc1.bias": bias_init(rng, 64, 512),
        "fc2.weight": he_uniform(rng, (10, 64), 64),
        "fc2.bias": bias_init(rng, 10, 64),
    }


def cnn_forward(params, x, cache=False):
    c1, cols1 = conv3x3(x, params["conv1.weight"], params["conv1.bias"])
    r1 = np.maximum(c1, 0.0)
    c2, cols2 = conv3x3(r1, params["conv2.weight"], params["conv2.bias"])
    r2 = np.maximum(c2, 0.0)
    p, arg = maxpool2x2(r2)
    f = p.reshape(len(x), -1)  # ONNX Flatten(axis=1) of NCHW
    h = f @ params["fc1.weight"].T + params["fc1.bias"]
    r3 = np.maximum(h, 0.0)
    logits = r3 @ params["fc2.weight"].T + params["fc2.bias"]
    if not cache:
        return logits
    return logits, dict(x=x, cols1=cols1, r1=r1, cols2=cols2, r2=r2, arg=arg,
                        p_shape=p.shape, f=f, r3=r3)


def cnn_forward_backward(params, x, y):
    logits, c = cnn_forward(params, x, cache=True)
    loss, g = softmax_xent(logits, y)
    grads = {}
    grads["fc2.weight"] = g.T @ c["r3"]
    grads["fc2.bias"] = g.sum(axis=0)
    g = (g @ params["fc2.weight"]) * (c["r3"] > 0)
    grads["fc1.weight"] = g.T @ c["f"]
    grads["fc1.bias"] = g.sum(axis=0)
    g = (g @ params["fc1.weight"]).reshape(c["p_shape"])
    g = maxpool2x2_backward(g, c["arg"], c["r2"].shape) * (c["r2"] > 0)
    g, grads["conv2.weight"], grads["conv2.bias"] = conv3x3_backward(
        g, c["cols2"], c["r1"].shape, params["conv2.weight"])
    g = g * (c["r1"] > 0)
    _, grads["conv1.weight"], grads["conv1.bias"] = conv3x3_backward(
        g, c["cols1"], c["x"].shape, params["conv1.weight"])
    return loss, grads


# --------------------------------------------------------------------------
# ONNX graph construction


def _value_info(name, dims):
    from onnx import TensorProto, helper
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _finish_model(graph, doc):
    from onnx import helper
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    return model


def build_mlp_onnx(params):
    from onnx import helper, numpy_helper

    inits, nodes = [], []
    prev = "input"
    n_layers = len(MLP_SIZES) - 1
    for i in range(1, n_layers + 1):
        w, b = f"fc{i}.weight", f"fc{i}.bias"
        inits.append(numpy_helper.from_array(params[w].astype(np.float32), w))
        inits.append(numpy_helper.from_array(params[b].astype(np.float32), b))
        mm_out = f"/fc{i}/MatMul_output_0"
        add_out = "logits" if i == n_layers else f"/fc{i}/Add_output_0"
        nodes.append(helper.make_node("MatMul", [prev, w], [mm_out], name=f"fc{i}/MatMul"))
        nodes.append(helper.make_node("Add", [mm_out, b], [add_out], name=f"fc{i}/Add"))
        prev = add_out
        if i < n_layers:
            relu_out = f"/relu{i}/Relu_output_0"
            nodes.append(helper.make_node("Relu", [prev], [relu_out], name=f"relu{i}"))
            prev = relu_out
    graph = helper.make_graph(
        nodes, "digits_mlp",
        inputs=[_value_info("input", ["batch", 64])],
        outputs=[_value_info("logits", ["batch", 10])],
        initializer=inits,
    )
    return _finish_model(
        graph,
        "MLP 64-256-128-10 (ReLU) trained on scikit-learn digits; "
        "input = 8x8 pixel values / 16, flattened; output = class logits.")


def build_cnn_onnx(params):
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(params[k].astype(np.float32), k) for k in (
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    conv_attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                      dilations=[1, 1], group=1)
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"],
                         ["/conv1/Conv_output_0"], name="conv1/Conv", **conv_attrs),
        helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/relu1/Relu_output_0"],
                         name="relu1"),
        helper.make_node("Conv", ["/relu1/Relu_output_0", "conv2.weight", "conv2.bias"],
                         ["/conv2/Conv_output_0"], name="conv2/Conv", **conv_attrs),
        helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/relu2/Relu_output_0"],
                         name="relu2"),
        helper.make_node("MaxPool", ["/relu2/Relu_output_0"], ["/pool/MaxPool_output_0"],
                         name="pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2],
                         pads=[0, 0, 0, 0], ceil_mode=0),
        helper.make_node("Flatten", ["/pool/MaxPool_output_0"], ["/flatten/Flatten_output_0"],
                         name="flatten/Flatten", axis=1),
        helper.make_node("Gemm", ["/flatten/Flatten_output_0", "fc1.weight", "fc1.bias"],
                         ["/fc1/Gemm_output_0"], name="fc1/Gemm",
                         alpha=1.0, beta=1.0, transB=1),
        helper.make_node("Relu", ["/fc1/Gemm_output_0"], ["/relu3/Relu_output_0"],
                         name="relu3"),
        helper.make_node("Gemm", ["/relu3/Relu_output_0", "fc2.weight", "fc2.bias"],
                         ["logits"], name="fc2/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        inputs=[_value_info("input", ["batch", 1, 8, 8])],
        outputs=[_value_info("logits", ["batch", 10])],
        initializer=inits,
    )
    return _finish_model(
        graph,
        "CNN Conv16-Conv32-MaxPool-FC64-FC10 (ReLU) trained on scikit-learn digits; "
        "input = 1x8x8 pixel values / 16; output = class logits.")


# --------------------------------------------------------------------------
# output


def save_npz(path: Path, **arrays):
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def verify(model_path: Path, eval_path: Path, reference_logits: np.ndarray) -> float:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION, model.ir_version
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]

    data = np.load(eval_path)
    x, labels = data["input"], data["labels"]
    assert x.dtype == np.float32 and labels.dtype == np.int64

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (len(labels), 10), logits.shape
    # A batch of one must work too (symbolic batch dimension).
    (one,) = sess.run(["logits"], {"input": x[:1]})
    assert one.shape == (1, 10)

    diff = float(np.abs(logits - reference_logits).max())
    if diff > 1e-3:
        raise AssertionError(f"{model_path.name}: onnxruntime differs from the NumPy "
                             f"reference by {diff:.3g}")
    acc = float(np.mean(np.argmax(logits, axis=-1) == labels))
    print(f"  {model_path.name}: onnxruntime held-out accuracy {acc:.4f} "
          f"({int(round(acc * len(labels)))}/{len(labels)}), max |ort - numpy| {diff:.2e}")
    return acc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="output directory (default: the directory of this script)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    import onnx

    try:  # belt and braces: the env vars above already pin BLAS to one thread
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass

    t0 = time.perf_counter()
    d = load_split()
    print(f"digits split: train {len(d['y_train'])}, calib {len(d['x_calib'])} "
          f"(subset of train), eval {len(d['y_eval'])} (held out)")

    # ---- MLP
    rng = np.random.default_rng(SEED + 1)
    params = mlp_init(rng)
    train_loop(params, mlp_forward_backward, d["x_train"].astype(np.float64),
               d["y_train"], rng, epochs=60, batch=32, lr=2e-3, wd=1e-4, name="mlp")
    mlp32 = {k: v.astype(np.float32) for k, v in params.items()}
    onnx.save(build_mlp_onnx(mlp32), str(out / "digits_mlp.onnx"))
    save_npz(out / "digits_mlp.calib.npz", input=d["x_calib"])
    save_npz(out / "digits_mlp.eval.npz", input=d["x_eval"], labels=d["y_eval"])
    mlp_ref = mlp_forward(mlp32, d["x_eval"])

    # ---- CNN
    img = lambda a: a.reshape(-1, 1, 8, 8)  # noqa: E731
    rng = np.random.default_rng(SEED + 2)
    params = cnn_init(rng)
    train_loop(params, cnn_forward_backward, img(d["x_train"]).astype(np.float64),
               d["y_train"], rng, epochs=40, batch=32, lr=2e-3, wd=1e-4, name="cnn")
    cnn32 = {k: v.astype(np.float32) for k, v in params.items()}
    onnx.save(build_cnn_onnx(cnn32), str(out / "digits_cnn.onnx"))
    save_npz(out / "digits_cnn.calib.npz", input=img(d["x_calib"]))
    save_npz(out / "digits_cnn.eval.npz", input=img(d["x_eval"]), labels=d["y_eval"])
    cnn_ref = cnn_forward(cnn32, img(d["x_eval"]))
    t_train = time.perf_counter() - t0

    # ---- verify what was written
    print("verifying (onnx.checker full_check + onnxruntime):")
    accs = {
        "digits_mlp": verify(out / "digits_mlp.onnx", out / "digits_mlp.eval.npz", mlp_ref),
        "digits_cnn": verify(out / "digits_cnn.onnx", out / "digits_cnn.eval.npz", cnn_ref),
    }
    names = ["digits_mlp.onnx", "digits_mlp.calib.npz", "digits_mlp.eval.npz",
             "digits_cnn.onnx", "digits_cnn.calib.npz", "digits_cnn.eval.npz"]
    print("files:")
    for name in names:
        p = out / name
        print(f"  {name:22s} {p.stat().st_size:8d} B  sha256 {sha256(p)[:16]}")
    print(f"done in {time.perf_counter() - t0:.1f} s (training {t_train:.1f} s)")

    bad = {k: v for k, v in accs.items() if v < MIN_ACCURACY}
    if bad:
        print(f"FAIL: accuracy below {MIN_ACCURACY}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
