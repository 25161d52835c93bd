"""Outputs that become NaN or infinite: validate fails them whatever the thresholds, and cluster's channel scales no
longer make them (a channel whose peak fp16 cannot hold, as a DFT basis's sine at the Nyquist frequency)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import build_model, invoke, save_model
from onnxshrink import api
from onnxshrink.passes.cluster import Cluster, ClusterConfig, _row_scales
from onnxshrink.runtime import make_session
from onnxshrink.validate import newly_nonfinite

runner = CliRunner()


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    return build_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])


def basis(k: int = 256, n: int = 9) -> np.ndarray:
    """A sine basis [k, n] as an STFT's imaginary part holds it: row 0 (DC) exactly zero, the last (Nyquist)
    sin(pi t) over the frame, which float rounding leaves at about 1e-13, not 0."""
    t = np.arange(k)
    freqs = np.linspace(0, 0.5, n)
    w = np.sin(2 * np.pi * freqs[None, :] * t[:, None])
    w[:, 0] = 0.0
    w[:, -1] = np.sin(np.pi * t) * 1e-3  # float64 rounding of sin(pi t) is ~1e-13; 1e-16 x 1e3 keeps it tiny
    w[:, -1] = np.where(np.abs(w[:, -1]) > 0, w[:, -1], 1e-13)
    assert np.max(np.abs(w[:, -1])) < 6e-8  # under fp16's smallest subnormal
    return w


def test_row_scales_of_a_channel_fp16_cannot_hold_stay_finite_and_nonzero():
    table = np.array([[1e-13, -2e-13], [0.0, 0.0], [1e6, 3.0], [0.5, -0.25]], dtype=np.float64)
    scales = _row_scales(table).reshape(-1)
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)
    assert scales[0] == 1.0 and scales[1] == 1.0  # underflow and all-zero: no scale
    assert scales[2] == np.float32(np.finfo(np.float16).max)  # overflow: the largest fp16, not inf
    assert scales[3] == 0.5


def test_cluster_of_a_sine_basis_with_a_near_zero_channel_stays_finite(tmp_path):
    model = matmul_model(basis())
    result, report = Cluster(ClusterConfig(bits=8))(model)
    assert any(layer.action.startswith("codebook") and "scale a channel" in layer.action for layer in report.layers)
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    expected = make_session(model).run(None, {"x": x})[0]
    produced = make_session(result).run(None, {"x": x})[0]
    assert np.all(np.isfinite(produced))
    assert np.max(np.abs(produced - expected)) < 0.05 * np.max(np.abs(expected))


def test_newly_nonfinite_counts_only_values_the_original_had_finite():
    a = np.array([[1.0, np.inf, 2.0, 3.0]], dtype=np.float32)
    b = np.array([[np.nan, np.inf, 2.0, -np.inf]], dtype=np.float32)
    assert newly_nonfinite(a, b) == 0.5
    assert newly_nonfinite(a, a.copy()) == 0.0
    tokens = np.ones((1, 2, 3), dtype=np.float32)
    broken = tokens.copy()
    broken[0, 1] = np.nan  # only the padding position
    assert newly_nonfinite(tokens, broken, np.array([[True, False]])) == 0.0
    assert newly_nonfinite(tokens, broken) == 0.5


def test_validate_fails_a_candidate_whose_output_became_nan_even_without_thresholds(tmp_path):
    w = np.random.default_rng(1).standard_normal((8, 4))
    original = save_model(matmul_model(w), tmp_path / "a.onnx")
    bad = w.copy()
    bad[3, 2] = np.nan  # one output channel NaN for every input
    candidate = save_model(matmul_model(bad), tmp_path / "b.onnx")
    report = api.validate(original, candidate)
    assert not report.passed and report.gated
    (check,) = [c for c in report.checks if c.name == "finite[y]"]
    assert check.value == 0.25 and not check.passed
    result = invoke(runner, "validate", original, candidate)
    assert result.exit_code == 1
    assert "FAIL 0.25 of output 'y''s values are NaN or infinite where the original's are finite" in result.stdout
    assert "validation FAILED" in result.stdout
    assert "changed a lot" not in result.stdout  # the verdict already says it
    fine = invoke(runner, "validate", original, original)
    assert fine.exit_code == 0 and "finite[" not in fine.stdout and "not gated" in fine.stdout
