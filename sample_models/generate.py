#!/usr/bin/env python3
"""Regenerate the sample ONNX models shipped with onnxshrink.

Trains three small classifiers on scikit-learn's bundled "digits" data set
(1797 8x8 grey-scale images of handwritten digits, 10 classes; it ships inside
the scikit-learn package, so nothing is downloaded) and writes:

* ``digits_mlp.onnx``       MLP 64-256-128-10 (MatMul + Add per layer, ReLU)
* ``digits_cnn.onnx``       small CNN (Conv-Relu, Conv-Relu, MaxPool, Flatten,
                            Gemm-Relu, Gemm)
* ``digits_transformer.onnx`` transformer encoder: 8 row tokens of 8 pixels,
                            Linear 8->32 + position embedding, 2 pre-LayerNorm
                            blocks (4-head attention, GELU MLP 128), mean pool,
                            LayerNorm, Linear 32->10
* ``digits_mlp.calib.npz``  ``input`` float32 [200, 64] from the training split
* ``digits_mlp.eval.npz``   ``input`` float32 [N, 64], ``labels`` int64 [N]
* ``digits_cnn.calib.npz``  ``input`` float32 [200, 1, 8, 8]
* ``digits_cnn.eval.npz``   ``input`` float32 [N, 1, 8, 8], ``labels`` int64 [N]
* ``digits_transformer.calib.npz`` ``input`` float32 [200, 8, 8]
* ``digits_transformer.eval.npz``  ``input`` float32 [N, 8, 8], ``labels`` int64 [N]

Training is plain NumPy (mini-batch Adam, hand-written forward/backward
passes, attention and LayerNorm included), fully seeded and single-threaded,
so reruns give the same weights.
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
# Transformer: each image is a sequence of its 8 rows (tokens of 8 pixels);
#   Linear 8->32 + learned position embedding, 2 pre-LayerNorm encoder blocks
#   (4-head self-attention, MLP 32-128-32 with exact GELU), mean over tokens,
#   LayerNorm, Linear 32->10.


TF_TOKENS = 8      # rows of the image
TF_FEATURES = 8    # pixels per row
TF_DIM = 32
TF_HEADS = 4
TF_MLP = 128
TF_LAYERS = 2
LN_EPS = 1e-5
TF_PROJ = ("q_proj", "k_proj", "v_proj")


def xavier_uniform(rng, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=(fan_in, fan_out))  # [in, out]


def tf_init(rng):
    d, m = TF_DIM, TF_MLP
    params = {
        "embed.weight": xavier_uniform(rng, TF_FEATURES, d),
        "embed.bias": np.zeros(d),
        "pos_embed": rng.normal(0.0, 0.02, size=(1, TF_TOKENS, d)),
    }
    for layer in range(TF_LAYERS):
        pre = f"layers.{layer}."
        params[pre + "norm1.weight"], params[pre + "norm1.bias"] = np.ones(d), np.zeros(d)
        for proj in TF_PROJ + ("out_proj",):
            params[pre + f"attn.{proj}.weight"] = xavier_uniform(rng, d, d)
            params[pre + f"attn.{proj}.bias"] = np.zeros(d)
        params[pre + "norm2.weight"], params[pre + "norm2.bias"] = np.ones(d), np.zeros(d)
        params[pre + "mlp.fc1.weight"], params[pre + "mlp.fc1.bias"] = xavier_uniform(rng, d, m), np.zeros(m)
        params[pre + "mlp.fc2.weight"], params[pre + "mlp.fc2.bias"] = xavier_uniform(rng, m, d), np.zeros(d)
    params["norm.weight"], params["norm.bias"] = np.ones(d), np.zeros(d)
    params["head.weight"], params["head.bias"] = xavier_uniform(rng, d, 10), np.zeros(10)
    return params


def layer_norm(x, weight, bias):
    """LayerNormalization over the last axis (ONNX opset 17, epsilon 1e-5)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    return xhat * weight + bias, (xhat, rstd)


def layer_norm_backward(dy, weight, cache):
    xhat, rstd = cache
    n = xhat.shape[-1]
    axes = tuple(range(dy.ndim - 1))
    dxhat = dy * weight
    dx = rstd / n * (n * dxhat - dxhat.sum(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def gelu(x):
    """Exact GELU, x * Phi(x), as PyTorch's nn.GELU() and its ONNX export (Erf) compute it."""
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def gelu_grad(x):
    from scipy.special import erf
    return 0.5 * (1.0 + erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def softmax_last(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def split_heads(t):
    """[B, T, D] -> [B, H, T, D/H]"""
    b, n, _ = t.shape
    return t.reshape(b, n, TF_HEADS, TF_DIM // TF_HEADS).transpose(0, 2, 1, 3)


def merge_heads(t):
    """[B, H, T, D/H] -> [B, T, D]"""
    b, _, n, _ = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, TF_DIM)


def linear_grads(grads, name, x, g):
    """Gradients of ``x @ W + b`` (any leading axes) with respect to W [in, out] and b."""
    grads[name + ".weight"] = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    grads[name + ".bias"] = g.reshape(-1, g.shape[-1]).sum(axis=0)


def tf_forward(params, x, cache=False):
    p = params
    scale = 1.0 / np.sqrt(TF_DIM // TF_HEADS)
    h = x @ p["embed.weight"] + p["embed.bias"] + p["pos_embed"]  # [B, T, D]
    layers = []
    for layer in range(TF_LAYERS):
        pre = f"layers.{layer}."
        c = {}
        a, c["ln1"] = layer_norm(h, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
        qh, kh, vh = (split_heads(a @ p[pre + f"attn.{n}.weight"] + p[pre + f"attn.{n}.bias"])
                      for n in TF_PROJ)
        prob = softmax_last((qh @ kh.transpose(0, 1, 3, 2)) * scale)  # [B, H, T, T]
        ctx = merge_heads(prob @ vh)
        h = h + ctx @ p[pre + "attn.out_proj.weight"] + p[pre + "attn.out_proj.bias"]
        a2, c["ln2"] = layer_norm(h, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
        u = a2 @ p[pre + "mlp.fc1.weight"] + p[pre + "mlp.fc1.bias"]
        gu = gelu(u)
        h = h + gu @ p[pre + "mlp.fc2.weight"] + p[pre + "mlp.fc2.bias"]
        c.update(a=a, qh=qh, kh=kh, vh=vh, prob=prob, ctx=ctx, a2=a2, u=u, gu=gu)
        layers.append(c)
    z, lnf = layer_norm(h.mean(axis=1), p["norm.weight"], p["norm.bias"])
    logits = z @ p["head.weight"] + p["head.bias"]
    if not cache:
        return logits
    return logits, dict(x=x, layers=layers, lnf=lnf, z=z)


def tf_forward_backward(params, x, y):
    p = params
    scale = 1.0 / np.sqrt(TF_DIM // TF_HEADS)
    logits, c = tf_forward(params, x, cache=True)
    loss, g = softmax_xent(logits, y)
    grads = {}
    linear_grads(grads, "head", c["z"], g)
    g, grads["norm.weight"], grads["norm.bias"] = layer_norm_backward(
        g @ p["head.weight"].T, p["norm.weight"], c["lnf"])
    dh = np.repeat(g[:, None, :] / TF_TOKENS, TF_TOKENS, axis=1)  # mean over tokens
    for layer in range(TF_LAYERS - 1, -1, -1):
        pre = f"layers.{layer}."
        lc = c["layers"][layer]
        # MLP branch of the residual
        linear_grads(grads, pre + "mlp.fc2", lc["gu"], dh)
        du = (dh @ p[pre + "mlp.fc2.weight"].T) * gelu_grad(lc["u"])
        linear_grads(grads, pre + "mlp.fc1", lc["a2"], du)
        dx, grads[pre + "norm2.weight"], grads[pre + "norm2.bias"] = layer_norm_backward(
            du @ p[pre + "mlp.fc1.weight"].T, p[pre + "norm2.weight"], lc["ln2"])
        dh = dh + dx
        # attention branch
        linear_grads(grads, pre + "attn.out_proj", lc["ctx"], dh)
        dctx = split_heads(dh @ p[pre + "attn.out_proj.weight"].T)
        prob = lc["prob"]
        dprob = dctx @ lc["vh"].transpose(0, 1, 3, 2)
        ds = prob * (dprob - (dprob * prob).sum(axis=-1, keepdims=True)) * scale
        da = 0.0
        for name, d in (("q_proj", ds @ lc["kh"]),
                        ("k_proj", ds.transpose(0, 1, 3, 2) @ lc["qh"]),
                        ("v_proj", prob.transpose(0, 1, 3, 2) @ dctx)):
            d = merge_heads(d)
            linear_grads(grads, pre + "attn." + name, lc["a"], d)
            da = da + d @ p[pre + f"attn.{name}.weight"].T
        dx, grads[pre + "norm1.weight"], grads[pre + "norm1.bias"] = layer_norm_backward(
            da, p[pre + "norm1.weight"], lc["ln1"])
        dh = dh + dx
    linear_grads(grads, "embed", c["x"], dh)
    grads["pos_embed"] = dh.sum(axis=0, keepdims=True)
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


def build_transformer_onnx(params):
    """The graph ``torch.onnx.export`` (opset 17) writes for a pre-LN encoder classifier.

    Linear layers are ``MatMul`` with an [in, out] weight initializer, then ``Add`` of the
    bias. Attention reshapes Q/K/V into heads; ``Q @ K^T`` and ``P @ V`` are MatMuls of two
    activations. GELU is the exact form (Div, Erf, Add, Mul, Mul).
    """
    from onnx import helper, numpy_helper

    d, heads, tokens = TF_DIM, TF_HEADS, TF_TOKENS
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    split_shape = const("attn.split_shape", [-1, tokens, heads, d // heads], np.int64)
    merge_shape = const("attn.merge_shape", [-1, tokens, d], np.int64)
    attn_scale = const("attn.scale", 1.0 / np.sqrt(d // heads))
    sqrt2 = const("gelu.sqrt2", np.sqrt(2.0))
    one = const("gelu.one", 1.0)
    half = const("gelu.half", 0.5)

    nodes = []

    def node(op, inputs, name, out=None, **attrs):
        out = out or f"/{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def linear(x, module, out=None):
        mm = node("MatMul", [x, f"{module}.weight"], f"{module}/MatMul")
        return node("Add", [mm, f"{module}.bias"], f"{module}/Add", out)

    def layer_norm_node(x, module):
        return node("LayerNormalization", [x, f"{module}.weight", f"{module}.bias"],
                    f"{module}/LayerNormalization", axis=-1, epsilon=LN_EPS)

    h = linear("input", "embed")
    h = node("Add", [h, "pos_embed"], "pos_embed/Add")
    for layer in range(TF_LAYERS):
        pre = f"layers.{layer}"
        a = layer_norm_node(h, f"{pre}.norm1")
        q, k, v = (node("Reshape", [linear(a, f"{pre}.attn.{proj}"), split_shape],
                        f"{pre}.attn.{proj}/Reshape") for proj in TF_PROJ)
        q = node("Transpose", [q], f"{pre}.attn/Transpose_q", perm=[0, 2, 1, 3])   # [B, H, T, dh]
        k = node("Transpose", [k], f"{pre}.attn/Transpose_k", perm=[0, 2, 3, 1])   # [B, H, dh, T]
        v = node("Transpose", [v], f"{pre}.attn/Transpose_v", perm=[0, 2, 1, 3])   # [B, H, T, dh]
        s = node("MatMul", [q, k], f"{pre}.attn/MatMul_qk")                        # [B, H, T, T]
        s = node("Mul", [s, attn_scale], f"{pre}.attn/Mul_scale")
        prob = node("Softmax", [s], f"{pre}.attn/Softmax", axis=-1)
        ctx = node("MatMul", [prob, v], f"{pre}.attn/MatMul_pv")                   # [B, H, T, dh]
        ctx = node("Transpose", [ctx], f"{pre}.attn/Transpose_ctx", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{pre}.attn/Reshape_ctx")       # [B, T, D]
        h = node("Add", [h, linear(ctx, f"{pre}.attn.out_proj")], f"{pre}/Add_attn")
        a = layer_norm_node(h, f"{pre}.norm2")
        u = linear(a, f"{pre}.mlp.fc1")
        erf = node("Erf", [node("Div", [u, sqrt2], f"{pre}.mlp.act/Div")], f"{pre}.mlp.act/Erf")
        g = node("Add", [erf, one], f"{pre}.mlp.act/Add")
        g = node("Mul", [node("Mul", [u, g], f"{pre}.mlp.act/Mul"), half], f"{pre}.mlp.act/Mul_1")
        h = node("Add", [h, linear(g, f"{pre}.mlp.fc2")], f"{pre}/Add_mlp")
    pooled = node("ReduceMean", [h], "pool/ReduceMean", axes=[1], keepdims=0)
    z = layer_norm_node(pooled, "norm")
    linear(z, "head", out="logits")
    graph = helper.make_graph(
        nodes, "digits_transformer",
        inputs=[_value_info("input", ["batch", tokens, TF_FEATURES])],
        outputs=[_value_info("logits", ["batch", 10])],
        initializer=inits,
    )
    return _finish_model(
        graph,
        "Transformer encoder classifier (8 row tokens, d=32, 2 pre-LN blocks, 4 heads, "
        "GELU MLP 128) trained on scikit-learn digits; input = 8x8 pixel values / 16, "
        "one token per row; output = class logits.")


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

    # ---- Transformer
    seq = lambda a: a.reshape(-1, TF_TOKENS, TF_FEATURES)  # noqa: E731
    rng = np.random.default_rng(SEED + 3)
    params = tf_init(rng)
    train_loop(params, tf_forward_backward, seq(d["x_train"]).astype(np.float64),
               d["y_train"], rng, epochs=60, batch=32, lr=2e-3, wd=1e-2, name="transformer")
    tf32 = {k: v.astype(np.float32) for k, v in params.items()}
    onnx.save(build_transformer_onnx(tf32), str(out / "digits_transformer.onnx"))
    save_npz(out / "digits_transformer.calib.npz", input=seq(d["x_calib"]))
    save_npz(out / "digits_transformer.eval.npz", input=seq(d["x_eval"]), labels=d["y_eval"])
    tf_ref = tf_forward(tf32, seq(d["x_eval"]))
    t_train = time.perf_counter() - t0

    # ---- verify what was written
    print("verifying (onnx.checker full_check + onnxruntime):")
    accs = {
        "digits_mlp": verify(out / "digits_mlp.onnx", out / "digits_mlp.eval.npz", mlp_ref),
        "digits_cnn": verify(out / "digits_cnn.onnx", out / "digits_cnn.eval.npz", cnn_ref),
        "digits_transformer": verify(out / "digits_transformer.onnx",
                                     out / "digits_transformer.eval.npz", tf_ref),
    }
    names = [f"{model}.{suffix}" for model in accs for suffix in ("onnx", "calib.npz", "eval.npz")]
    print("files:")
    for name in names:
        p = out / name
        print(f"  {name:30s} {p.stat().st_size:8d} B  sha256 {sha256(p)[:16]}")
    print(f"done in {time.perf_counter() - t0:.1f} s (training {t_train:.1f} s)")

    bad = {k: v for k, v in accs.items() if v < MIN_ACCURACY}
    if bad:
        print(f"FAIL: accuracy below {MIN_ACCURACY}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
