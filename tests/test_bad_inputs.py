"""Every bad input through the CLI: one `error:` line on stderr, the documented exit code, no traceback,
and the user's files (input model, data, existing output) unchanged byte for byte, nothing left behind.

docs/ROBUSTNESS.md lists each case with the message the tool prints; this file checks every row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, UNWRITABLE_OUTPUTS, invoke, make_mlp, save_model, tree, unwritable_output

import onnxshrink
from onnxshrink.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_USAGE

# Cheap validation: the tiny models run in microseconds, so this only bounds the work.
FAST = ("--samples", "4")


# ---------------------------------------------------------------- helpers




def error_line(result, code: int, as_json: bool = False) -> str:
    """Assert a clean failure: the exit code, one `error:` line on stderr and nothing else, no traceback; stdout
    empty, or under --json exactly the error document, saying what the stderr line says."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    if as_json:
        document = json.loads(result.stdout)
        assert document["error"] == {"code": code, "message": lines[0].removeprefix("error: ")}
        assert document["onnxshrink_version"] == onnxshrink.__version__
    else:
        assert result.stdout == ""
    return lines[0]


@pytest.fixture(autouse=True)
def _nothing_on_real_fds(capfd):
    """onnxruntime logs and Python warnings bypass the CliRunner: nothing may reach the real stdout/stderr."""
    yield
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), f"stray output: {out!r} {err!r}"


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a good model, good data and an existing output the user cares about."""
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "good.npz", input=rng.standard_normal((8, 32)).astype(np.float32), labels=np.arange(8) % 10)
    (tmp_path / "out.onnx").write_bytes(b"an existing output the user wants to keep\n")
    return tmp_path


# ---------------------------------------------------------------- bad model files


def make_bad_model(work: Path, kind: str) -> Path:
    """Write one kind of bad model file into `work` and return its path."""
    mlp = (work / "mlp.onnx").read_bytes()
    path = work / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "device":
        return Path("/dev/null")  # stands for pipes and /dev/zero too, which would block or never end
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif kind == "text":
        path = work / "notes.txt"
        path.write_text("this is a text file, not a model\n")
    elif kind == "png":
        path = work / "picture.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    elif kind == "ort":
        path = work / "model.ort"
        path.write_bytes(b"\x1c\x00\x00\x00ORTM" + bytes(256))
    elif kind.startswith("truncated"):
        path.write_bytes(mlp[: int(len(mlp) * float(kind.split("_")[1]))])
    elif kind == "empty_graph":
        graph = onnx.helper.make_graph(
            [], "empty",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        )
        save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    elif kind.startswith("external_"):
        onnx.save_model(make_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
        data = work / (path.name + ".data")
        if kind == "external_missing":
            data.unlink()
        elif kind == "external_truncated":
            data.write_bytes(data.read_bytes()[:64])
        elif kind == "external_symlink":
            data.rename(work / "real.data")
            data.symlink_to("real.data")
        else:
            key, value = {
                "external_outside": ("location", "../elsewhere.data"),
                "external_absolute": ("location", "/etc/hostname"),
                "external_offset": ("offset", "-5"),
                "external_length": ("length", str(10**9)),
            }[kind]
            model = onnx.load(str(path), load_external_data=False)
            entry = next(e for e in model.graph.initializer[0].external_data if e.key == key)
            entry.value = value
            onnx.save(model, str(path))
    elif kind == "invalid":
        model = make_mlp()
        model.graph.node[0].op_type = "NoSuchOp"
        save_model(model, path)
    elif kind == "non_utf8_name":
        # One flipped bit in a node name: protobuf hands it back as bytes, the checker and onnxruntime accept it.
        path.write_bytes(mlp.replace(b"fc0/MatMul", b"fc0/Mat\xcdul", 1))
    else:
        raise ValueError(kind)
    return path


BAD_MODELS = {
    "missing": "no such file",
    "directory": "is a directory, not a model file",
    "empty": "file is empty, not an ONNX model",
    "random": "not an ONNX model or corrupted",
    "text": "not an ONNX model or corrupted",
    "png": "not an ONNX model or corrupted",
    "ort": "is an ORT-format model (.ort)",
    "truncated_0.01": "not an ONNX model or corrupted",
    "truncated_0.3": "not an ONNX model or corrupted",
    "truncated_0.5": "not an ONNX model or corrupted",
    "truncated_0.9": "not an ONNX model or corrupted",
    "truncated_0.999": "not an ONNX model or corrupted",
    "empty_graph": "the graph has no nodes",
    "external_missing": "external data file 'external_missing.onnx.data' is missing",
    "external_truncated": "external data file 'external_truncated.onnx.data' is truncated",
    "external_outside": "external data path '../elsewhere.data' points outside the model's directory",
    "external_absolute": "external data path '/etc/hostname' points outside the model's directory",
    "external_symlink": "external data file 'external_symlink.onnx.data' is a symbolic link",
    "external_offset": "cannot read external data (External data offset must be non-negative",
    "external_length": "external data file 'external_length.onnx.data' is truncated",
    "invalid": "invalid ONNX model",
    "non_utf8_name": "corrupted: model.graph.node.name is not valid UTF-8 (b'fc0/Mat\\xcdul')",
    "device": "/dev/null: not a regular file",
}


@pytest.mark.parametrize("kind", BAD_MODELS)
@pytest.mark.parametrize("command", ["inspect", "validate-original", "validate-candidate", "quantize"])
def test_bad_model(runner, work, kind, command):
    bad = make_bad_model(work, kind)
    good = work / "mlp.onnx"
    args = {
        "inspect": ["inspect", bad],
        "validate-original": ["validate", bad, good, *FAST],
        "validate-candidate": ["validate", good, bad, *FAST],
        # --force: even then a bad input must not touch the existing output.
        "quantize": ["quantize", bad, "-o", work / "out.onnx", "--force", *FAST],
    }[command]
    before = tree(work)
    line = error_line(invoke(runner, *args), EXIT_INPUT)
    assert BAD_MODELS[kind] in line
    assert str(bad) in line
    assert tree(work) == before


@pytest.mark.parametrize("kind", ["random", "truncated_0.5", "external_missing", "ort"])
def test_bad_model_json(runner, work, kind):
    """Under --json an error is stdout's one document (no half report), and still one line on stderr."""
    bad = make_bad_model(work, kind)
    for args in (["inspect", bad, "--json"], ["quantize", bad, "-o", work / "new.onnx", "--json"]):
        error_line(invoke(runner, *args), EXIT_INPUT, as_json=True)
    assert not (work / "new.onnx").exists()


def test_bad_model_debug_shows_traceback(runner, work):
    bad = make_bad_model(work, "random")
    result = invoke(runner, "inspect", bad, "--debug")
    assert result.exit_code == EXIT_INPUT
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_truncated_model_at_many_points(runner, work):
    """Cut the model at 25 points spread over its length: every prefix is exit 3, never a crash."""
    data = (work / "mlp.onnx").read_bytes()
    bad = work / "cut.onnx"
    for size in np.linspace(1, len(data) - 1, 25).astype(int):
        bad.write_bytes(data[:size])
        line = error_line(invoke(runner, "inspect", bad), EXIT_INPUT)
        assert "cut.onnx" in line


def _flips(data: bytes, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        yield bytes(flipped)


def _clean_exit(result, allowed: set[int]) -> None:
    assert result.exit_code in allowed, f"exit {result.exit_code}: {result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code not in (0, 1):
        error_line(result, result.exit_code)


def test_bit_flipped_model_inspect_and_validate(runner, work):
    """Flipped bits: either a clean exit 3/4, or a model that loads and is inspected/validated normally."""
    original = make_mlp(widths=(4, 8, 3))
    good = save_model(original, work / "small.onnx")
    bad = work / "flipped.onnx"
    codes = set()
    for data in _flips(original.SerializeToString(), 60, seed=11):
        bad.write_bytes(data)
        result = invoke(runner, "inspect", bad)
        _clean_exit(result, {0, 3, 4})
        codes.add(result.exit_code)
        _clean_exit(invoke(runner, "validate", good, bad, *FAST), {0, 3, 4})
    assert {0, 3} <= codes  # both outcomes are exercised with this seed


def test_bit_flipped_model_quantize(runner, work):
    """quantize on flipped bits: a clean 0/3/4, never a crash; the existing output is never touched."""
    original = make_mlp(widths=(4, 8, 3))
    bad = work / "flipped.onnx"
    kept = (work / "out.onnx").read_bytes()
    codes = set()
    for data in _flips(original.SerializeToString(), 40, seed=5):
        bad.write_bytes(data)
        result = invoke(runner, "quantize", bad, "-o", work / "q.onnx", "--force", "--no-validate")
        _clean_exit(result, {0, 3, 4})
        codes.add(result.exit_code)
        assert (work / "out.onnx").read_bytes() == kept
    assert {0, 3} <= codes


def test_quantize_model_failing_full_checker_is_unsupported(runner, work):
    model = make_mlp()
    model.graph.name = ""  # the checker requires a graph name; onnxruntime does not care
    bad = save_model(model, work / "noname.onnx")
    before = tree(work)
    error_line(invoke(runner, "quantize", bad, "-o", work / "q.onnx", "--no-validate"), 4)
    assert tree(work) == before


def test_onnxruntime_refusal_is_one_line(work):
    """A model the ONNX checker accepts but onnxruntime cannot initialize (a bias with 3 values declared scalar)."""
    model = make_mlp()
    del model.graph.initializer[-1].dims[:]
    save_model(model, work / "scalar_bias.onnx")
    command = [sys.executable, "-m", "onnxshrink", "validate", str(work / "mlp.onnx"), str(work / "scalar_bias.onnx"), *FAST]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 4
    assert len(done.stderr.splitlines()) == 1, done.stderr


# ---------------------------------------------------------------- outputs


def test_output_is_the_input(runner, work):
    model = work / "mlp.onnx"
    (work / "link.onnx").symlink_to("mlp.onnx")
    before = tree(work)
    for output in (model, work / "." / "mlp.onnx"):
        line = error_line(invoke(runner, "quantize", model, "-o", output, "--force", "--no-validate"), EXIT_OUTPUT)
        assert "output path is the input model" in line
    line = error_line(invoke(runner, "quantize", work / "link.onnx", "-o", model, "--force", "--no-validate"), EXIT_OUTPUT)
    assert "output path is the input model" in line
    assert tree(work) == before


def test_existing_output_without_force(runner, work):
    before = tree(work)
    line = error_line(invoke(runner, "quantize", work / "mlp.onnx", "-o", work / "out.onnx", *FAST), EXIT_OUTPUT)
    assert "already exists (use --force to replace it)" in line
    # The default output name is protected the same way.
    (work / "mlp.int8.onnx").write_bytes(b"an earlier result\n")
    before = tree(work)
    line = error_line(invoke(runner, "quantize", work / "mlp.onnx", *FAST), EXIT_OUTPUT)
    assert "mlp.int8.onnx: already exists" in line
    assert tree(work) == before


def test_existing_output_with_force_is_replaced(runner, work):
    result = invoke(runner, "quantize", work / "mlp.onnx", "-o", work / "out.onnx", "--force", *FAST)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize(
    "where, message", UNWRITABLE_OUTPUTS + [("proc_self", "/proc/self: output directory is not writable")]
)
def test_unwritable_output(runner, work, where, message):
    output = unwritable_output(work, where)
    before = tree(work)
    line = error_line(invoke(runner, "quantize", work / "mlp.onnx", "-o", output, "--force", *FAST), EXIT_OUTPUT)
    assert message in line
    assert tree(work) == before


def test_read_only_directory(runner, work):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:
            (locked / "probe").write_bytes(b"")
            (locked / "probe").unlink()
            pytest.skip("this user (root) writes into 0555 directories; /proc and /sys cases cover read-only")
        except PermissionError:
            pass
        line = error_line(invoke(runner, "quantize", work / "mlp.onnx", "-o", locked / "q.onnx", *FAST), EXIT_OUTPUT)
        assert "not writable" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_disk_full(runner, work, monkeypatch):
    """ENOSPC while writing: exit 5, the existing output and the input untouched, no temporary files."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    before = tree(work)
    line = error_line(invoke(runner, "quantize", work / "mlp.onnx", "-o", work / "out.onnx", "--force", *FAST), EXIT_OUTPUT)
    assert line == f"error: {work / 'out.onnx'}: cannot write (No space left on device)"  # the user's path, not a temporary one
    assert tree(work) == before


def test_interrupted(runner, work, monkeypatch):
    from onnxshrink.passes import quantize as quantize_pass

    def interrupt(self, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_pass.QuantizeDynamic, "__call__", interrupt)
    before = tree(work)
    result = invoke(runner, "quantize", work / "mlp.onnx", "-o", work / "out.onnx", "--force", *FAST)
    assert result.exit_code == EXIT_INTERRUPTED
    assert "Traceback" not in result.output
    assert result.stderr.strip() == "interrupted; no output was written"
    assert tree(work) == before


def test_internal_error_is_one_line(runner, work, monkeypatch):
    from onnxshrink.passes import quantize as quantize_pass

    def boom(self, model):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(quantize_pass.QuantizeDynamic, "__call__", boom)
    before = tree(work)
    result = invoke(runner, "quantize", work / "mlp.onnx", "-o", work / "out.onnx", "--force", *FAST)
    assert result.exit_code == EXIT_INTERNAL
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: ValueError: first line"), lines
    assert tree(work) == before


# ---------------------------------------------------------------- external data through the CLI


def _external_model(work: Path, name: str, location: str | None = None) -> Path:
    path = work / name
    onnx.save_model(make_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or name + ".data", size_threshold=0)
    return path


def test_external_data_inspect_and_validate(runner, work):
    model = _external_model(work, "ext.onnx")
    before = tree(work)
    result = invoke(runner, "inspect", model, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["file_bytes"] == model.stat().st_size + (work / "ext.onnx.data").stat().st_size
    result = invoke(runner, "validate", work / "mlp.onnx", model, "--max-drift", "0", *FAST, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    assert tree(work) == before


def test_quantize_output_data_never_overwrites_input_data(runner, work):
    """`a.onnx` keeps its weights in `b.onnx.data`: writing `-o b.onnx` must not clobber them, even with --force."""
    model = _external_model(work, "a.onnx", location="b.onnx.data")
    (work / "b.onnx").write_bytes(b"an older b.onnx\n")
    before = tree(work)
    line = error_line(invoke(runner, "quantize", model, "-o", work / "b.onnx", "--force", *FAST), EXIT_OUTPUT)
    assert "is the input's external data file" in line
    assert tree(work) == before


def test_quantize_output_is_the_input_data_file(runner, work):
    model = _external_model(work, "ext.onnx")
    before = tree(work)
    line = error_line(invoke(runner, "quantize", model, "-o", work / "ext.onnx.data", "--force", *FAST), EXIT_OUTPUT)
    assert "ext.onnx.data: is the input's external data file; choose another -o" in line
    assert tree(work) == before


def test_quantize_external_data_model(runner, work):
    model = _external_model(work, "ext.onnx")
    before = tree(work)
    result = invoke(runner, "quantize", model, "-o", work / "q.onnx", *FAST)
    assert result.exit_code == 0, result.output
    after = tree(work)
    assert {k: v for k, v in after.items() if k in before} == before  # input model and data untouched
    onnx.checker.check_model(str(work / "q.onnx"), full_check=True)


def test_quantize_keeps_external_data_external(runner, work):
    model = _external_model(work, "ext.onnx")
    result = invoke(runner, "quantize", model, "-o", work / "q.onnx", *FAST)
    assert result.exit_code == 0, result.output
    assert (work / "q.onnx.data").is_file()


# ---------------------------------------------------------------- bad data (.npz)


def make_bad_data(work: Path, kind: str) -> Path:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    path = work / f"{kind}.npz"
    if kind == "missing_file":
        return path
    arrays = {
        "missing_key": {"images": x, "labels": np.arange(8)},
        "wrong_rank": {"input": x.reshape(8, 4, 8), "labels": np.arange(8)},
        "wrong_shape": {"input": x[:, :31], "labels": np.arange(8)},
        "int_data": {"input": (x * 10).astype(np.int64), "labels": np.arange(8)},
        "bool_data": {"input": x > 0, "labels": np.arange(8)},
        "labels_missing": {"input": x},
        "labels_length": {"input": x, "labels": np.arange(5)},
        "labels_float": {"input": x, "labels": np.linspace(0, 1, 8)},
        "labels_scalar": {"input": x, "labels": np.int64(3)},
        "no_samples": {"input": x[:0], "labels": np.arange(0)},
        "object_array": {"input": np.array([{"a": 1}] * 8, dtype=object), "labels": np.arange(8)},
    }
    if kind in arrays:
        np.savez(path, **arrays[kind])
    elif kind == "text":
        path.write_text("input,labels\n0.1,3\n")
    elif kind == "npy":
        path = work / "single.npy"
        np.save(path, x)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.savez(path, input=x, labels=np.arange(8))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "corrupted":
        np.savez(path, input=x, labels=np.arange(8))
        data = bytearray(path.read_bytes())
        data[200] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "zip_not_npy":
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("input", b"raw bytes, not an array")
    else:
        raise ValueError(kind)
    return path


BAD_DATA = {
    "missing_file": "no such data file",
    "missing_key": "missing input 'input' (keys present: images, labels)",
    "wrong_rank": "input 'input' has shape [8, 4, 8], model expects rank 2 [batch, 32]",
    "wrong_shape": "input 'input' has shape [8, 31], model expects [batch, 32]",
    "int_data": "input 'input' is int64, model expects float32",
    "bool_data": "input 'input' is bool, model expects float32",
    "labels_missing": "no labels array 'labels' (keys present: input)",
    "labels_length": "labels 'labels' have 5 rows but the inputs have 8",
    "labels_float": "labels 'labels' must be integers, got float64",
    "labels_scalar": "labels 'labels' is a scalar",
    "no_samples": "the inputs hold no samples",
    "object_array": "cannot read .npz data (Object arrays cannot be loaded when allow_pickle=False)",
    "text": "not an .npz archive",
    "npy": "not an .npz archive (a single .npy array?)",
    "empty": "not an .npz archive",
    "truncated": "cannot read .npz data",
    "corrupted": "cannot read .npz data",
    "zip_not_npy": "member 'input' is not a .npy array",
}


@pytest.mark.parametrize("kind", BAD_DATA)
@pytest.mark.parametrize("command", ["validate", "quantize"])
def test_bad_data(runner, work, kind, command):
    data = make_bad_data(work, kind)
    model = work / "mlp.onnx"
    common = ["--data", data, "--labels", "labels"]
    args = {
        "validate": ["validate", model, model, *common],
        "quantize": ["quantize", model, "-o", work / "out.onnx", "--force", *common],
    }[command]
    before = tree(work)
    line = error_line(invoke(runner, *args), EXIT_INPUT)
    assert BAD_DATA[kind] in line
    assert tree(work) == before


def test_good_data_passes(runner, work):
    """The fixture's own data works, so the failures above are about the data, not the setup."""
    model = work / "mlp.onnx"
    result = invoke(runner, "validate", model, model, "--data", work / "good.npz", "--labels", "labels", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 8


# ---------------------------------------------------------------- usage errors


def test_usage_errors_exit_2(runner, work):
    model = work / "mlp.onnx"
    before = tree(work)
    for args in (
        ["quantize", model, "--bogus"],
        ["quantize", model, "--threads", "0"],
        ["quantize"],
        ["quantize", model, "--keep-float", "middle"],
        ["quantize", model, "--op-types", "Add"],
        ["validate", model, model, "--labels", "labels"],
        ["validate", model, model, "--max-accuracy-drop", "0.01"],
        ["validate", model, model, "--shape", "nonsense"],
    ):
        result = invoke(runner, *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "Traceback" not in result.output
    assert tree(work) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "{m}", "{m}", "--labels", "labels"], "--labels needs --data: labels are read from the data file"),
        (["validate", "{m}", "{m}", "--max-accuracy-drop", "0.01"], "--max-accuracy-drop needs --data and --labels"),
        (["quantize", "{m}", "--keep-float", "middle"], "--keep-float must be one of first, last, both, not 'middle'"),
        (["quantize", "{m}", "--op-types", "Add"], "--op-types: unsupported op type(s) Add (choose from MatMul, Gemm, Conv)"),
        (["validate", "{m}", "{m}", "--shape", "nonsense"], "--shape 'nonsense': expected NAME=D1,D2,... with integer dimensions"),
        (["quantize", "{m}", "--bits", "3"], "--bits 3: onnxruntime runs 2-, 4- and 8-bit weights only (MatMulNBits); for 3-bit storage use `onnxshrink cluster --bits 3` (codebooks that run as fast as fp32)"),
        (["quantize", "{m}", "--bits", "4", "--block-size", "7"], "--block-size must be one of 16, 32, 64, 128, 256, not 7"),
        (["quantize", "{m}", "--algorithm", "gptq"], "--algorithm gptq needs --calibration FILE.npz"),
        (["quantize", "{m}", "--mode", "static"], "--mode static needs --calibration FILE.npz"),
        (["quantize", "{m}", "--bits", "4", "--mode", "static"], "--bits 4 quantizes weights blockwise (MatMulNBits); it cannot be combined with --mode static"),
        (['quantize', '{m}', '--mode', 'fast'], "--mode must be one of dynamic, static, weights, not 'fast'"),
        (['quantize', '{m}', '--mode', 'static', '--calibration', 'x.npz', '--calibrator', 'bogus'], "--calibrator must be one of minmax, percentile, entropy, mse, not 'bogus'"),
        (["quantize", "{m}", "--mode", "weights", "--min-weights", "5"], "--min-weights applies to --mode dynamic only"),
    ],
)
def test_usage_errors_from_the_tool_are_one_line(runner, work, args, message):
    before = tree(work)
    line = error_line(invoke(runner, *(a.format(m=work / "mlp.onnx") for a in args)), EXIT_USAGE)
    assert line == f"error: {message}"
    assert tree(work) == before


def test_click_usage_errors_are_one_line(runner, work):
    error_line(invoke(runner, "quantize", work / "mlp.onnx", "--bogus"), EXIT_USAGE)


# ---------------------------------------------------------------- the real program


@pytest.mark.parametrize(
    "args, code",
    [
        (["inspect", "{work}/random.onnx", "--json"], EXIT_INPUT),
        (["inspect", "{work}/invalid.onnx"], EXIT_INPUT),
        (["validate", "{work}/mlp.onnx", "{work}/mlp.onnx", "--data", "{work}/notes.npz"], EXIT_INPUT),
        (["quantize", "{work}/mlp.onnx", "-o", "{work}/out.onnx", "--json"], EXIT_OUTPUT),
    ],
)
def test_real_process_stderr_is_one_line(work, args, code):
    """As a subprocess: onnxruntime's C++ logging and Python warnings would show on the real stderr."""
    make_bad_model(work, "random")
    make_bad_model(work, "invalid")
    (work / "notes.npz").write_text("not data\n")
    before = tree(work)
    command = [sys.executable, "-m", "onnxshrink", *(a.format(work=work) for a in args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    if "--json" in args:  # the error as stdout's one document
        assert json.loads(done.stdout)["error"] == {"code": code, "message": lines[0].removeprefix("error: ")}
    else:
        assert done.stdout == ""
    assert tree(work) == before


# ---------------------------------------------------------------- --json on success


@pytest.mark.parametrize("command", ["inspect", "validate", "quantize"])
def test_json_stdout_is_exactly_one_document(runner, work, command):
    model = work / "mlp.onnx"
    args = {
        "inspect": ["inspect", model],
        "validate": ["validate", model, model, *FAST],
        "quantize": ["quantize", model, "-o", work / "q.onnx", *FAST],
    }[command]
    result = invoke(runner, *args, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # raises on anything before or after the one document
    assert isinstance(document, dict)


@pytest.mark.parametrize("mode_args", [["--mode", "static"], ["--bits", "4", "--algorithm", "gptq"]], ids=["static", "gptq"])
@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 32), np.float32)}, "missing input 'input' (keys present: x)"),
        ({"input": np.zeros((4, 5), np.float32)}, "has shape [4, 5], model expects"),
        ({"input": np.zeros((4, 32), np.int64)}, "is int64, model expects float32"),
    ],
    ids=["missing_key", "wrong_shape", "wrong_dtype"],
)
def test_bad_calibration_data(runner, work, mode_args, arrays, message):
    np.savez(work / "calib.npz", **arrays)
    before = tree(work)
    line = error_line(invoke(runner, "quantize", work / "mlp.onnx", *mode_args, "--calibration", work / "calib.npz",
                             "-o", work / "out.onnx", "--force", "--no-validate"), 3)
    assert message in line and "calib.npz" in line
    assert tree(work) == before
