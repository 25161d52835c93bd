"""Tiny model builders shared by the tests. Every model is built in code with a seeded generator."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def make_mlp(widths=(32, 64, 48, 10), seed=0, use_gemm=False, opset=17, batch="batch") -> onnx.ModelProto:
    """MLP with MatMul+Add (or Gemm transB=1) and Relu between layers, as real exports have."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        out = f"h{i}" if i < len(widths) - 2 else "logits"
        pre = f"pre{i}" if i < len(widths) - 2 else out
        if use_gemm:
            inits += [numpy_helper.from_array(w.T.copy(), f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
            nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [pre], name=f"fc{i}/Gemm", transB=1))
        else:
            inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
            nodes.append(helper.make_node("MatMul", [current, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}/MatMul"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [pre], name=f"fc{i}/Add"))
        if out != pre:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        current = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, widths[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def float_value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def build_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """A checked opset-`opset` model from nodes, value infos and initializers."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    return save_model(make_mlp(), tmp_path / "mlp.onnx")


@pytest.fixture
def digits(tmp_path):
    """The digits MLP sample with its calibration and eval data, copied into the test's folder: (model, calib, eval)."""
    for suffix in ("onnx", "calib.npz", "eval.npz"):
        shutil.copy(SAMPLES / f"digits_mlp.{suffix}", tmp_path / f"digits_mlp.{suffix}")
    return tmp_path / "digits_mlp.onnx", tmp_path / "digits_mlp.calib.npz", tmp_path / "digits_mlp.eval.npz"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the CLI the way a user does, at a fixed terminal width."""
    from onnxshrink.cli import app

    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160", "NO_COLOR": "1"})


def assert_bad_option(runner: CliRunner, folder: Path, command: str, *args: str, message: str) -> None:
    """A bad option or data file: one line on stderr starting with `message`, exit 3 for data (.npz) and 2 for
    the rest, nothing on stdout, and the folder (input, an existing output, the data) exactly as it was."""
    source = folder / "mlp.onnx"
    onnx.save(make_mlp(), str(source))
    (folder / "out.onnx").write_bytes(b"keep me")
    np.savez(folder / "wrong.npz", x=np.zeros((4, 32), np.float32))
    before = tree(folder)
    result = invoke(runner, command, source, "-o", folder / "out.onnx", "--force", *args)
    assert result.exit_code == (3 if "npz" in " ".join(args) else 2), result.output
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output and result.stdout == "" and tree(folder) == before


def tree(directory: Path) -> dict[str, str]:
    """Everything under a directory, hidden entries included: a file's sha256, or what kind of entry it is.

    Any change, any leftover temporary file or folder shows as a difference.
    """
    entries = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            entries[str(p.relative_to(directory))] = "link -> " + os.readlink(p)
        elif p.is_dir():
            entries[str(p.relative_to(directory))] = "dir"
        elif p.is_file():
            entries[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            entries[str(p.relative_to(directory))] = "other"  # a FIFO: never read it
    return entries


# Output locations that cannot be written, and the message each must give. /proc and /sys refuse new
# files to everyone, root included (chmod 0555 does not stop root).
UNWRITABLE_OUTPUTS = [
    ("missing_dir", "output directory does not exist"),
    ("file_as_dir", "is not a directory"),
    ("is_dir", "is a directory"),
    ("fifo", "exists and is not a regular file"),
    ("proc", "output directory is not writable"),
    ("sys", "output directory is not writable"),
]


def unwritable_output(folder: Path, where: str) -> Path:
    """Set up one of UNWRITABLE_OUTPUTS (or "proc_self") in `folder` and return the output path to try."""
    (folder / "plain_file").write_bytes(b"x")
    (folder / "a_dir").mkdir()
    os.mkfifo(folder / "pipe.onnx")
    output = {
        "missing_dir": folder / "no" / "such" / "out.onnx",
        "file_as_dir": folder / "plain_file" / "out.onnx",
        "is_dir": folder / "a_dir",
        "fifo": folder / "pipe.onnx",
        "proc": Path("/proc/onnxshrink-test.onnx"),
        "sys": Path("/sys/onnxshrink-test.onnx"),
        "proc_self": Path("/proc/self/onnxshrink-test.onnx"),
    }[where]
    if where.startswith(("proc", "sys")) and not output.parent.is_dir():
        pytest.skip(f"{output.parent} is not mounted here")
    return output


def count_captures(monkeypatch, module) -> list:
    """Patch `module.capture` (prune_common's activation capture) to record the sorted tensor names of each run."""
    calls, real = [], module.capture

    def counting(dataset, model, names, threads=1):
        calls.append(sorted(names))
        return real(dataset, model, names, threads)

    monkeypatch.setattr(module, "capture", counting)
    return calls


def default_signals() -> None:
    """For a child the test will signal (a `preexec_fn`, or after a fork): SIGINT, SIGTERM and SIGHUP back to their
    defaults. A test run started in the background (`cmd &` ignores SIGINT) or under nohup (SIGHUP) hands its
    children those signals ignored, and Python keeps an ignored SIGINT ignored: the child would never see them."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def on_one_grid(books: np.ndarray, half: float = 0.0) -> bool:
    """Every entry a multiple of one step (offset by `half` a step): an evenly spaced codebook, perhaps with cells
    no value used left out."""
    step = np.diff(books).min()
    cells = books / step - half
    return bool(np.allclose(cells, np.round(cells), rtol=0, atol=1e-6))
