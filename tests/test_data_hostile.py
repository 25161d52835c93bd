"""Hostile and degenerate data files (issue 18, items 4, 12 and 13): non-finite values, all-zero data,
.npz members that lie about their size, zip bombs, and model inputs with a dimension fixed at 0.

Every refusal is exit 3 with one `error:` line naming the file, and the folder exactly as it was.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, build_model, float_value, invoke, make_mlp, save_model, tree
from onnx import helper

from onnxshrink.data import Dataset, input_specs, load_npz
from onnxshrink.errors import EXIT_INPUT
from onnxshrink.passes.factorize import Factorize, FactorizeConfig, low_rank
from onnxshrink.algorithms.reconstruct import Gram


def error_line(result, code: int = EXIT_INPUT) -> str:
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}"
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    (tmp_path / "out.onnx").write_bytes(b"an existing output the user wants to keep\n")
    return tmp_path


def samples(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)


# ---------------------------------------------------------------- non-finite data (item 4)

CALIBRATION = "calibration data"
EVALUATION = "evaluation data"
COMMANDS = {  # command line (data file as {d}) and the role its message names
    "quantize_static": (["quantize", "{m}", "--mode", "static", "--calibration", "{d}"], CALIBRATION),
    "quantize_gptq": (["quantize", "{m}", "--bits", "4", "--algorithm", "gptq", "--calibration", "{d}"], CALIBRATION),
    "prune": (["prune", "{m}", "--sparsity", "0.5", "--calibration", "{d}"], CALIBRATION),
    "cluster": (["cluster", "{m}", "--calibration", "{d}"], CALIBRATION),
    "factorize": (["factorize", "{m}", "--rank-ratio", "0.5", "--calibration", "{d}"], CALIBRATION),
    "compress": (["compress", "{m}", "--calibration", "{d}", "--min-cosine", "0.99"], EVALUATION),
    "validate": (["validate", "{m}", "{m}", "--data", "{d}"], EVALUATION),
    "sensitivity": (["sensitivity", "{m}", "--calibration", "{d}"], CALIBRATION),
}
WRITES = {"quantize_static", "quantize_gptq", "prune", "cluster", "factorize", "compress"}


def run_command(runner, work: Path, command: str, data: Path):
    args, _ = COMMANDS[command]
    args = [a.format(m=work / "mlp.onnx", d=data) for a in args]
    if command in WRITES:
        args += ["-o", work / "out.onnx", "--force"]
    return invoke(runner, *args)


@pytest.mark.parametrize("command", COMMANDS)
def test_nan_data_is_refused_by_every_command(runner, work, command):
    """One NaN used to give 1,182 NaN weights (gptq), "output error nan%" (cluster), nothing pruned: all exit 0."""
    x = samples()
    x[17, 3] = np.nan
    np.savez(work / "cal.npz", input=x)
    before = tree(work)
    line = error_line(run_command(runner, work, command, work / "cal.npz"))
    role = COMMANDS[command][1]
    assert line == f"error: {work / 'cal.npz'}: input 'input' has a non-finite value (nan) in sample 17; {role} must be finite"
    assert tree(work) == before


@pytest.mark.parametrize("command", ["prune", "factorize"])
def test_inf_data_is_refused(runner, work, command):
    """An Inf used to end prune and factorize with exit 70 (LinAlgError)."""
    x = samples()
    x[5, 0] = -np.inf
    np.savez(work / "cal.npz", input=x)
    before = tree(work)
    line = error_line(run_command(runner, work, command, work / "cal.npz"))
    assert "input 'input' has a non-finite value (-inf) in sample 5; calibration data must be finite" in line
    assert tree(work) == before


def test_float64_overflowing_float32_is_refused(work):
    """Finite in the file, infinite once converted to the model's float32: the model would see the Inf."""
    x = samples().astype(np.float64)
    x[9, 1] = 1e300
    np.savez(work / "cal.npz", input=x)
    with pytest.raises(Exception, match=r"non-finite value \(inf after conversion from float64 to float32\) in sample 9"):
        load_npz(work / "cal.npz", input_specs(make_mlp()))


def test_nan_beyond_the_samples_used_is_not_read(runner, work):
    x = samples()
    x[17, 3] = np.nan
    np.savez(work / "cal.npz", input=x)
    result = invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", work / "cal.npz", "--samples", "10")
    assert result.exit_code == 0, result.output


def test_nan_in_an_input_without_batch_axis_names_its_index(work):
    model = build_model([helper.make_node("Mul", ["x", "scale"], ["y"])],
                        [float_value("x", ["batch", 4]), float_value("scale", [2, 4])], [float_value("y", ["batch", 4])])
    scale = np.ones((2, 4), np.float32)
    scale[1, 2] = np.nan
    np.savez(work / "d.npz", x=np.ones((6, 4), np.float32), scale=scale)
    with pytest.raises(Exception, match=r"input 'scale' has a non-finite value \(nan\) at index \[1, 2\]"):
        load_npz(work / "d.npz", input_specs(model))


def two_input_model() -> onnx.ModelProto:
    return build_model([helper.make_node("Add", ["a", "b"], ["y"])],
                       [float_value("a", ["batch", 4]), float_value("b", ["batch", 4])], [float_value("y", ["batch", 4])])


def test_all_zero_data_is_refused(runner, work):
    """Every input all zeros measures nothing: static ranges, importances and Hessians of zeros (policy: refused)."""
    np.savez(work / "cal.npz", input=np.zeros((16, 32), np.float32))
    before = tree(work)
    line = error_line(run_command(runner, work, "quantize_static", work / "cal.npz"))
    assert line == (f"error: {work / 'cal.npz'}: every input is all zeros (input); calibration data of zeros measures "
                    "nothing: give real samples")
    assert tree(work) == before


def test_one_all_zero_input_is_accepted(runner, tmp_path):
    """Real models have inputs that are legitimately all zero (BERT's token_type_ids, a recurrent state)."""
    save_model(two_input_model(), tmp_path / "add.onnx")
    np.savez(tmp_path / "d.npz", a=np.ones((8, 4), np.float32), b=np.zeros((8, 4), np.float32))
    result = invoke(runner, "validate", tmp_path / "add.onnx", tmp_path / "add.onnx", "--data", tmp_path / "d.npz")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- factorize on constant layer inputs (item 4)


@pytest.mark.parametrize("value", [0.0, 1.0, 3.7])
def test_low_rank_falls_back_to_plain_svd_on_constant_inputs(value):
    """Centred, the covariance of constant inputs is rounding noise: Cholesky failed (LinAlgError, exit 70)."""
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((48, 10)), rng.standard_normal(10)
    x = np.full((200, 48), value) * rng.standard_normal(48)
    gram = Gram(48, 10, bias=True)
    gram.add(x, x @ w + bias)
    factors = low_rank(w, 5, None, gram, bias)
    plain = low_rank(w, 5)
    assert "constant on the calibration data" in factors.fallback and "plain SVD" in factors.fallback
    np.testing.assert_allclose(factors.a @ factors.b, plain.a @ plain.b)
    assert factors.bias is None and factors.error is None


def test_factorize_with_constant_calibration_says_plain_svd():
    """The sample MLP on one sample repeated: was exit 70 ("Matrix is not positive definite")."""
    model = onnx.load(str(SAMPLES / "digits_mlp.onnx"))
    row = np.load(SAMPLES / "digits_mlp.calib.npz")["input"][:1]
    dataset = Dataset([{"input": np.repeat(row, 16, axis=0)}], None, 16, False, [])
    _, report = Factorize(FactorizeConfig(rank_ratio=0.5, check_latency=False), dataset)(model)
    done = [layer for layer in report.layers if layer.rank is not None]
    assert done and all("not data-aware: the layer's inputs are constant on the calibration data" in layer.reason
                        for layer in done)
    assert all(layer.output_error is None for layer in done)


# ---------------------------------------------------------------- a dimension fixed at 0 (item 12)


def test_input_dim_fixed_at_zero_is_synthesized_as_zero(runner, tmp_path):
    """[4, 0] was synthesized as [4, 1], which onnxruntime refuses (exit 3); --shape x=4,0 worked."""
    model = build_model([helper.make_node("Identity", ["x"], ["y"])], [float_value("x", [4, 0])], [float_value("y", [4, 0])])
    save_model(model, tmp_path / "zero_dim.onnx")
    assert input_specs(model)[0].shape == [4, 0]
    result = invoke(runner, "validate", tmp_path / "zero_dim.onnx", tmp_path / "zero_dim.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_shapes"] == {"x": [4, 0]}


# ---------------------------------------------------------------- .npz members that lie (item 13)


def npy_bytes(shape, data: bytes, descr: str = "<f4") -> bytes:
    """A .npy file whose header declares `shape`, followed by `data` whatever its length."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue() + data


def write_npz(path: Path, members: dict, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


HUGE = (2**41, 32)  # 2^46 float32: 256 TiB; allocating it was a MemoryError (exit 70)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_used_member_whose_header_lies_is_refused_before_reading(runner, work, compression):
    x = samples(8)
    data = write_npz(work / "lies.npz", {"input.npy": npy_bytes(HUGE, x.tobytes())}, compression)
    before = tree(work)
    line = error_line(invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", data))
    assert line == (f"error: {data}: member 'input.npy': its header declares shape [{HUGE[0]}, 32] of float32 "
                    f"({HUGE[0] * 32 * 4} bytes) but the member holds {x.nbytes} bytes")
    assert tree(work) == before


def test_used_member_with_too_few_bytes_is_refused(runner, work):
    data = write_npz(work / "short.npz", {"input.npy": npy_bytes((8, 32), samples(4).tobytes())})
    line = error_line(invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", data))
    assert "its header declares shape [8, 32] of float32 (1024 bytes) but the member holds 512 bytes" in line


def test_unused_member_declaring_a_huge_size_is_skipped(runner, work):
    """Only the model's inputs and the labels are read: before, every member was (exit 70, MemoryError)."""
    data = write_npz(work / "extra.npz", {"input.npy": npy_bytes((8, 32), samples(8).tobytes()),
                                          "junk.npy": npy_bytes(HUGE, b"\0" * 64)})
    result = invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", data, "--json")
    assert result.exit_code == 0, result.output


def test_unused_zip_bomb_is_never_inflated(runner, work, monkeypatch):
    bomb = npy_bytes((64 << 20,), bytes(64 << 20), descr="|u1")  # 64 MiB of zeros, about 64 KiB deflated
    data = write_npz(work / "bomb.npz", {"input.npy": _npy(samples(8)), "bomb.npy": bomb}, zipfile.ZIP_DEFLATED)
    assert data.stat().st_size < 1 << 20
    opened = []
    original_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    result = invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert "input.npy" in opened and "bomb.npy" not in opened


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_used_member_whose_zip_size_lies_is_refused_before_inflating(runner, work):
    """A deflated member claiming ~4 GiB from a few KiB (more than deflate can produce): refused unread."""
    payload = _npy(samples(8))
    path = write_npz(work / "bomb.npz", {"input.npy": payload}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 24:central + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size in the zip directory
    path.write_bytes(bytes(raw))
    before = tree(work)
    line = error_line(invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", path))
    assert f"{path}: member 'input.npy' claims {0xFFFFFFF0} bytes inflated from" in line
    assert "more than deflate can produce" in line
    assert tree(work) == before


def test_pickled_member_stays_refused(runner, work):
    np.savez(work / "obj.npz", input=np.array([{"a": 1}] * 8, dtype=object))
    line = error_line(invoke(runner, "validate", work / "mlp.onnx", work / "mlp.onnx", "--data", work / "obj.npz"))
    assert "cannot read .npz data (Object arrays cannot be loaded when allow_pickle=False)" in line
