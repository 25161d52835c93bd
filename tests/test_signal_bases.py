"""Signal-processing bases (an STFT as a Conv, a DCT as a MatMul) stay float in every pass: rounding one leaks loud
frequencies into the quiet bins of a spectrogram (algorithms/sinusoids.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_model
from onnxshrink.algorithms.sinusoids import sinusoid_bank
from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic
from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig


def stft_basis(n_fft: int = 128, imaginary: bool = False) -> np.ndarray:
    """[n_fft / 2 + 1, n_fft]: Hann-windowed cosines (or sines), as torch.stft's Conv exports hold them."""
    t = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    wave = np.sin if imaginary else np.cos
    return window[None, :] * wave(2 * np.pi * k * t[None, :] / n_fft)


def dct_basis(inputs: int = 40, outputs: int = 13) -> np.ndarray:
    """[outputs, inputs]: DCT-II rows, as an MFCC's MatMul holds them (transposed)."""
    n, k = np.arange(inputs), np.arange(outputs)
    return np.cos(np.pi / inputs * (n[None, :] + 0.5) * k[:, None])


@pytest.mark.parametrize("bank", [stft_basis(), stft_basis(imaginary=True), stft_basis(400), dct_basis()])
def test_fourier_and_cosine_bases_are_found(bank):
    found = sinusoid_bank(bank)
    assert found is not None and found.endswith(f"sinusoids of {bank.shape[1]} taps")


def test_learned_filters_are_not_bases():
    rng = np.random.default_rng(0)
    assert sinusoid_bank(rng.standard_normal((64, 512))) is None  # a learned layer's columns
    assert sinusoid_bank(np.cumsum(rng.standard_normal((64, 32)), axis=1)) is None  # smooth, red-noise filters
    t = np.arange(64)
    gaussians = np.exp(-0.5 * ((t[None, :] - 32) / np.linspace(2, 12, 16)[:, None]) ** 2)
    assert sinusoid_bank(gaussians) is None  # smoothing filters all peak at DC: not spread over the band
    one_tone = np.tile(np.cos(2 * np.pi * 0.1 * t), (16, 1))
    assert sinusoid_bank(one_tone) is None  # one frequency sixteen times: not a transform
    assert sinusoid_bank(stft_basis(8)) is None  # too few taps to tell
    assert sinusoid_bank(np.zeros((32, 128))) is None


def front_end(basis: np.ndarray) -> onnx.ModelProto:
    """x [batch, 1, samples] -> Conv(basis) -> power -> MatMul(a learned [bins, 16] matrix) -> y."""
    bins, taps = basis.shape
    mix = np.abs(np.random.default_rng(1).standard_normal((bins, 16))) / bins
    nodes = [helper.make_node("Conv", ["x", "basis"], ["spec"], name="stft", strides=[taps // 4]),
             helper.make_node("Mul", ["spec", "spec"], ["power"], name="square"),
             helper.make_node("Transpose", ["power"], ["frames"], name="frames", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["frames", "mix"], ["y"], name="mel")]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "frames", 16])],
        [numpy_helper.from_array(basis[:, None, :].astype(np.float32), "basis"),
         numpy_helper.from_array(mix.astype(np.float32), "mix")])


@pytest.mark.parametrize("make", [lambda: Cluster(ClusterConfig(bits=4)),
                                  lambda: Prune(PruneConfig(sparsity=0.5)),
                                  lambda: QuantizeDynamic(QuantizeConfig(integer_min_macs=0)),
                                  lambda: QuantizeWeightsOnly(WeightsOnlyConfig())])
def test_every_pass_keeps_an_stft_basis_float_and_compresses_the_rest(make):
    model = front_end(stft_basis(256))
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result, report = make()(model)
    decisions = {layer.node: layer for layer in report.layers}
    assert decisions["stft"].action in ("kept", "kept float")
    assert decisions["stft"].reason.startswith("signal-processing basis (129 sinusoids of 256 taps")
    assert decisions["mel"].action not in ("kept", "kept float")
    after = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert np.array_equal(after["basis"], before["basis"])


@pytest.mark.parametrize("make", [lambda: QuantizeBlockwise(BlockwiseConfig(bits=4, block_size=16)),
                                  lambda: QuantizeDynamic(QuantizeConfig(integer_min_macs=0))])
def test_a_dct_matmul_stays_float(make):
    dct = dct_basis().T.astype(np.float32)  # [40 mel bands, 13 coefficients]
    model = build_model(
        [helper.make_node("MatMul", ["logmel", "dct"], ["mfcc"], name="dct")],
        [helper.make_tensor_value_info("logmel", TensorProto.FLOAT, ["batch", 40])],
        [helper.make_tensor_value_info("mfcc", TensorProto.FLOAT, ["batch", 13])],
        [numpy_helper.from_array(dct, "dct")])
    _, report = make()(model)
    (decision,) = [layer for layer in report.layers if layer.node == "dct"]
    assert decision.reason.startswith("signal-processing basis (13 sinusoids of 40 taps")


def test_compress_plan_does_not_price_a_basis_the_passes_keep(tmp_path):
    from onnxshrink import compress_plan

    path = tmp_path / "front_end.onnx"
    onnx.save(front_end(stft_basis(256)), str(path))
    prices = compress_plan.price_layers(path, None, bits=(4,))
    assert [layer.node for layer in prices.layers] == ["mel"]


def test_inspect_says_a_basis_is_not_worth_compressing(tmp_path):
    from onnxshrink.info import inspect_model

    path = tmp_path / "front_end.onnx"
    onnx.save(front_end(stft_basis(256)), str(path))
    records = {t.name: t for t in inspect_model(path).tensors}
    assert not records["basis"].compressible
    assert records["basis"].reason == "signal-processing basis (129 sinusoids of 256 taps, a Fourier or cosine transform)"
    assert records["mix"].compressible
