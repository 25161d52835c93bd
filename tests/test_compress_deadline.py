"""compress keeps its time budget: the sensitivity phase measures only what the search reads, and stops at the
deadline. A fake clock advances a fixed cost per onnxruntime session, so nothing here depends on real timing."""

from __future__ import annotations

import importlib
import shutil
import time

import pytest

from conftest import SAMPLES
from onnxshrink import compress_search, layer_sensitivity, runtime
from onnxshrink.compress_search import CompressConfig, compress
from onnxshrink.validate import Thresholds

SESSION_S = 10.0  # fake seconds per session built


@pytest.fixture
def clocked(tmp_path, monkeypatch):
    for suffix in ("onnx", "calib.npz", "eval.npz"):
        shutil.copy(SAMPLES / f"digits_mlp.{suffix}", tmp_path / f"digits_mlp.{suffix}")
    now = [0.0]
    monkeypatch.setattr(compress_search.time, "monotonic", lambda: now[0])
    sessions = {"sensitivity": 0}

    def counting(module, key=None):
        real = module.make_session

        def make(*args, **kwargs):
            now[0] += SESSION_S
            if key:
                sessions[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "make_session", make)

    counting(layer_sensitivity, "sensitivity")
    counting(importlib.import_module("onnxshrink.validate"))  # the package exports a function of that name
    counting(runtime)  # captures inside the passes
    return tmp_path, now, sessions


def _config(tmp_path, budget):
    return CompressConfig(thresholds=Thresholds(max_accuracy_drop=0.01), data=str(tmp_path / "digits_mlp.eval.npz"),
                          labels="labels", calibration=str(tmp_path / "digits_mlp.calib.npz"), time_budget_s=budget,
                          formats=("cluster4",), sparsities=(0.0, 0.8, 0.9), refine=False)


def test_sensitivity_measures_only_sparsity_0_9_of_each_layer(clocked):
    tmp_path, now, sessions = clocked
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, None))
    assert report.passed
    # the baseline, then one session per layer (three layers): no bit widths, no other sparsities
    assert sessions["sensitivity"] == 1 + 3


@pytest.mark.parametrize("budget", [40.0, 60.0, 90.0, 120.0])
def test_the_search_never_overruns_its_budget(clocked, budget):
    """Budgets that end in the sensitivity phase (it used to measure 3 layers x 5 settings, 160 fake seconds).
    Not covered: the first lossy candidate of the uniform phase is costed as the lossless one, which it exceeds."""
    tmp_path, now, sessions = clocked
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, budget))
    assert now[0] <= budget and report.seconds <= budget
    assert report.stopped == "time budget"


def test_a_candidate_that_would_overrun_is_stopped_at_the_deadline(tmp_path, monkeypatch):
    """The first lossy candidate is costed as the lossless copy before it; one that runs far longer (here a pass
    that would sleep a minute) is stopped when the budget's time is up, and the best so far stays the output."""
    if not compress_search.candidate_process.available():
        pytest.skip("candidates run in a child process only on Linux")
    for suffix in ("onnx", "calib.npz", "eval.npz"):
        shutil.copy(SAMPLES / f"digits_mlp.{suffix}", tmp_path / f"digits_mlp.{suffix}")
    real_step = compress_search._step

    def slow_step(*args, **kwargs):
        time.sleep(60)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(compress_search, "_step", slow_step)
    started = time.monotonic()
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, 8.0))
    assert time.monotonic() - started < 30  # not the minute the candidate would have taken
    assert report.stopped == "time budget" and report.passed
    stopped = report.candidates[-1]
    assert not stopped.passed and stopped.error.startswith("stopped at the time budget")
    assert report.candidates[0].best and (tmp_path / "out.shrink").exists()  # the lossless start, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the child's files went with the workdir
