"""Scratch folders in the system temp directory (onnxshrink-ort-, -profile-, -static-) that a SIGKILL left behind
are swept at the next run's first scratch folder: a day old and their process gone; nothing else is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import ROOT, make_mlp
from onnxshrink import scratch
from onnxshrink.latency_guard import profile
from onnxshrink.passes.quantize_static import _runtime_graph
from onnxshrink.runtime import optimized_graph

DAY = 24 * 3600


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _scratch(parent, name: str, age: float, owner: int | None = None):
    folder = parent / name
    folder.mkdir()
    (folder / "optimized.onnx").write_bytes(b"x" * 100)
    if owner is not None:
        (folder / scratch.OWNER_FILE).write_text(f"{owner}\n")
    then = time.time() - age
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))
    return folder


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """The system temp directory, made this test's own folder; the once-per-process sweep made to run again."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setitem(scratch._swept, "done", False)
    return tmp_path


def test_sweep_removes_only_stale_scratch_whose_process_is_gone(tmp_root):
    dead = _dead_pid()
    stale = [_scratch(tmp_root, "onnxshrink-ort-k2j4x9_q", 2 * DAY, dead),
             _scratch(tmp_root, "onnxshrink-profile-abcd1234", 2 * DAY),  # no owner file (SIGKILL before it): age
             _scratch(tmp_root, "onnxshrink-static-zz99yy88", 2 * DAY, dead)]
    kept = [_scratch(tmp_root, "onnxshrink-ort-aaaaaaaa", 2 * DAY, os.getpid()),  # old, but its process runs
            _scratch(tmp_root, "onnxshrink-ort-bbbbbbbb", DAY - 600, dead),  # process gone, not a day old
            _scratch(tmp_root, "onnxshrink-other-cccccccc", 2 * DAY),  # not a scratch kind
            _scratch(tmp_root, "onnxshrink-ort-ABCD1234", 2 * DAY),  # tempfile never uses capitals
            _scratch(tmp_root, "my-onnxshrink-ort-dddddddd", 2 * DAY)]
    busy = _scratch(tmp_root, "onnxshrink-ort-eeeeeeee", 2 * DAY, dead)
    os.utime(busy / "optimized.onnx")  # written just now
    kept.append(busy)
    (tmp_root / "onnxshrink-ort-ffffffff").write_bytes(b"a file")  # a file of that name: not a folder it makes
    (tmp_root / "onnxshrink-ort-gggggggg").symlink_to(stale[0])  # a link: never followed, never removed
    os.utime(tmp_root / "onnxshrink-ort-ffffffff", (time.time() - 2 * DAY,) * 2)

    removed = scratch.sweep_stale_scratch()
    assert sorted(removed) == sorted(stale)
    assert not any(path.exists() for path in stale)
    assert all(path.is_dir() for path in kept)
    assert (tmp_root / "onnxshrink-ort-ffffffff").is_file() and (tmp_root / "onnxshrink-ort-gggggggg").is_symlink()


def _run_optimized_graph(model):
    optimized_graph(model)


def _run_profile(model):
    profile(model, {"input": np.zeros((1, 32), np.float32)}, runs=1)


def _run_static_graph(model):
    _runtime_graph(model, 1)


@pytest.mark.parametrize("use", [_run_optimized_graph, _run_profile, _run_static_graph],
                         ids=["runtime-ort", "latency-profile", "static-graph"])
def test_every_scratch_user_sweeps_and_leaves_nothing(tmp_root, use):
    stale = _scratch(tmp_root, "onnxshrink-ort-k2j4x9_q", 2 * DAY, _dead_pid())
    use(make_mlp())
    assert not stale.exists()
    assert list(tmp_root.iterdir()) == []  # its own folder removed too


def test_a_killed_run_leaves_a_folder_the_next_run_sweeps_once_stale(tmp_root):
    """SIGKILL inside a scratch folder: the folder stays (nothing can run), names its dead process, and goes at the
    next sweep once a day old."""
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from onnxshrink.scratch import scratch_dir\n"
              "with scratch_dir('ort') as folder:\n"
              "    print(folder, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "TMPDIR": str(tmp_root)}
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    left = tmp_root / os.path.basename(result.stdout.strip())
    assert left.is_dir() and (left / scratch.OWNER_FILE).read_text().strip().isdigit()
    assert scratch.sweep_stale_scratch() == []  # fresh: kept
    then = time.time() - 2 * DAY
    for path in [*left.iterdir(), left]:
        os.utime(path, (then, then))
    assert scratch.sweep_stale_scratch() == [left] and not left.exists()
