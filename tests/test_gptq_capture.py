"""GPTQ's layer inputs captured segment by segment (passes/gptq_capture.py) against a run of the whole model per
wave: the same codes, each node run about once, and padding tokens left out of the Hessians."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model, float_value
from onnxshrink.data import input_specs, load_npz
from onnxshrink.passes import quantize_blockwise as qb
from onnxshrink.passes.gptq_capture import SegmentCapture
from onnxshrink.runtime import capture_activations, make_session

D, FFN, BLOCKS = 64, 128, 2


def encoder(seed=0) -> onnx.ModelProto:
    """Two transformer blocks (attention with a padding mask, residuals, a ReLU FFN) over x [batch, seq, 64]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="mask/Cast"),
             helper.make_node("Unsqueeze", ["mask_f", "axis1"], ["mask_3d"], name="mask/Unsqueeze"),
             helper.make_node("Sub", ["one", "mask_3d"], ["mask_inv"], name="mask/Sub"),
             helper.make_node("Mul", ["mask_inv", "neg_big"], ["mask_bias"], name="mask/Mul")]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg_big"),
             numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")]
    x = "x"
    for b in range(BLOCKS):
        p = f"b{b}"
        for name, shape in (("q", (D, D)), ("k", (D, D)), ("v", (D, D)), ("o", (D, D)), ("f1", (D, FFN)), ("f2", (FFN, D))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32),
                                                 f"{p}.{name}.weight"))
        nodes += [helper.make_node("MatMul", [x, f"{p}.{n}.weight"], [f"{p}_{n}"], name=f"{p}/{n}/MatMul") for n in "qkv"]
        nodes += [helper.make_node("Transpose", [f"{p}_k"], [f"{p}_kt"], perm=[0, 2, 1], name=f"{p}/Transpose"),
                  helper.make_node("MatMul", [f"{p}_q", f"{p}_kt"], [f"{p}_s"], name=f"{p}/scores"),
                  helper.make_node("Mul", [f"{p}_s", "scale"], [f"{p}_s2"], name=f"{p}/scale"),
                  helper.make_node("Add", [f"{p}_s2", "mask_bias"], [f"{p}_s3"], name=f"{p}/mask"),
                  helper.make_node("Softmax", [f"{p}_s3"], [f"{p}_p"], axis=-1, name=f"{p}/Softmax"),
                  helper.make_node("MatMul", [f"{p}_p", f"{p}_v"], [f"{p}_ctx"], name=f"{p}/context"),
                  helper.make_node("MatMul", [f"{p}_ctx", f"{p}.o.weight"], [f"{p}_o"], name=f"{p}/o/MatMul"),
                  helper.make_node("Add", [f"{p}_o", x], [f"{p}_r"], name=f"{p}/residual1"),
                  helper.make_node("MatMul", [f"{p}_r", f"{p}.f1.weight"], [f"{p}_h"], name=f"{p}/f1/MatMul"),
                  helper.make_node("Relu", [f"{p}_h"], [f"{p}_a"], name=f"{p}/Relu"),
                  helper.make_node("MatMul", [f"{p}_a", f"{p}.f2.weight"], [f"{p}_f"], name=f"{p}/f2/MatMul"),
                  helper.make_node("Add", [f"{p}_f", f"{p}_r"], [f"{p}_out"], name=f"{p}/residual2")]
        x = f"{p}_out"
    nodes.append(helper.make_node("Identity", [x], ["hidden"], name="out"))
    return build_model(nodes, [float_value("x", ["batch", "seq", D]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
                       [float_value("hidden", ["batch", "seq", D])], inits)


def calibration(tmp_path, seed=1, samples=40, seq=12, name="cal.npz"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, seq, D)).astype(np.float32)
    lengths = rng.integers(3, seq + 1, samples)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return x, mask


def dataset(model, tmp_path, x, mask, name="cal.npz"):
    np.savez(tmp_path / name, x=x, attention_mask=mask)
    return load_npz(tmp_path / name, input_specs(model))


class WholeModelCapture:
    """The old way: every wave runs the whole model from its inputs."""

    def __init__(self, model, batches, threads=1):
        self.model, self.batches, self.threads = model, batches, threads

    def capture(self, names):
        inputs = {i.name for i in self.model.graph.input}
        wanted = [n for n in names if n not in inputs]
        return list(zip(self.batches, capture_activations(self.model, wanted, self.batches, self.threads)))

    def invalidate(self, outputs):
        pass


def quantized_tensors(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if "_q4" in t.name}


def run_gptq(model, data):
    return qb.QuantizeBlockwise(qb.BlockwiseConfig(bits=4, block_size=32, algorithm="gptq", integer_below=0), data)(model)


def test_segments_give_the_codes_of_whole_model_runs(tmp_path, monkeypatch):
    model = encoder()
    data = dataset(model, tmp_path, *calibration(tmp_path))
    made = []

    class Recording(SegmentCapture):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(qb, "SegmentCapture", Recording)
    ours, report = run_gptq(model, data)
    monkeypatch.setattr(qb, "SegmentCapture", WholeModelCapture)
    theirs, _ = run_gptq(model, data)
    mine, reference = quantized_tensors(ours), quantized_tensors(theirs)
    assert len(mine) == 2 * 6 * BLOCKS  # codes and scales of every layer
    assert mine.keys() == reference.keys()
    for name in mine:
        assert np.array_equal(mine[name], reference[name]), name
    assert any(f"{6 * BLOCKS} layer(s) in {4 * BLOCKS} wave(s)" in note for note in report.notes), report.notes
    capture = made[0]
    assert capture.runs == 4 * BLOCKS - 1  # one session per wave; the first wave reads the graph input itself
    # Each node of the rewritten model ran at most once (q, k and v's wave runs nothing new but their producers).
    assert capture.nodes_run <= len(ours.graph.node)
    feed = {"x": np.zeros((1, 4, D), np.float32), "attention_mask": np.ones((1, 4), np.int64)}
    make_session(ours).run(None, feed)


def test_capture_after_a_rewrite_sees_the_rewritten_layer(tmp_path):
    """A kept tensor downstream of a rewritten layer is recomputed; one upstream is reused."""
    model = encoder(seed=3)
    x, mask = calibration(tmp_path, seed=4)
    batches = dataset(model, tmp_path, x, mask).batches
    capture = SegmentCapture(model, batches)
    capture.capture(["b0_ctx"])
    weight = next(t for t in model.graph.initializer if t.name == "b0.v.weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(0.5), weight.name))
    capture.invalidate({"b0_v"})
    ours = capture.capture(["b0_r", "b0_ctx"])
    reference = list(capture_activations(model, ["b0_r", "b0_ctx"], batches))
    for (_, values), expected in zip(ours, reference):
        for name in ("b0_r", "b0_ctx"):
            np.testing.assert_array_equal(values[name], expected[name])


def test_padding_positions_do_not_change_the_codes(tmp_path):
    """Padded tokens' inputs are left out of every Hessian: changing them changes no code."""
    model = encoder(seed=5)
    x, mask = calibration(tmp_path, seed=6)
    noisy = x.copy()
    noisy[mask == 0] = np.random.default_rng(7).standard_normal((int((mask == 0).sum()), D)) * 10
    assert (mask == 0).any()
    a, _ = run_gptq(model, dataset(model, tmp_path, x, mask, "a.npz"))
    b, _ = run_gptq(model, dataset(model, tmp_path, noisy, mask, "b.npz"))
    first, second = quantized_tensors(a), quantized_tensors(b)
    assert all(np.array_equal(first[name], second[name]) for name in first)
