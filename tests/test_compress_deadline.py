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


def _config(tmp_path, budget, **extra):
    return CompressConfig(**extra, thresholds=Thresholds(max_accuracy_drop=0.01), data=str(tmp_path / "digits_mlp.eval.npz"),
                          labels="labels", calibration=str(tmp_path / "digits_mlp.calib.npz"), time_budget_s=budget,
                          formats=("cluster4",), sparsities=(0.0, 0.8, 0.9), refine=False)


def test_sensitivity_measures_only_sparsity_0_9_of_each_layer(clocked):
    tmp_path, now, sessions = clocked
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, None))
    assert report.passed
    # the baseline, then one session per layer (three layers): no bit widths, no other sparsities
    assert sessions["sensitivity"] == 1 + 3


@pytest.mark.parametrize("budget", [40.0, 60.0, 90.0, 120.0])
def test_the_search_never_overruns_its_budget(clocked, budget, monkeypatch):
    """Budgets that end in the sensitivity phase (it used to measure 3 layers x 5 settings, 160 fake seconds).
    Not covered: the first lossy candidate of the uniform phase is costed as the lossless one, which it exceeds."""
    tmp_path, now, sessions = clocked
    monkeypatch.setattr(compress_search, "FRAGILITY_SHARE", 100.0)  # the phase runs whatever its estimate
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, budget))
    assert now[0] <= budget and report.seconds <= budget
    assert report.stopped == "time budget"


def test_a_large_models_sensitivity_phase_is_skipped_when_it_would_take_too_much_of_the_budget(clocked):
    """4 runs (baseline + 3 layers) of about one lossless candidate each (two fake sessions, 20 s) against a
    120 s budget: 80 s is more than FRAGILITY_SHARE of it, so the phase does not start and the candidates get the time."""
    tmp_path, now, sessions = clocked
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, 120.0, large=True))
    assert sessions["sensitivity"] == 0
    assert any(note.startswith("sensitivity phase skipped: 4 runs of about 20 s") for note in report.notes)
    assert [c.phase for c in report.candidates][:2] == ["lossless", "uniform"]
    assert now[0] <= 120.0 and report.passed


def test_the_sensitivity_phase_stops_when_its_measured_layers_say_the_rest_would_not_fit(clocked):
    """Not a large model: the phase starts, and after its first layer (20 fake s: a capture session and a run
    session) the other 2 would take 40 s more, past FRAGILITY_SHARE of 120 s (24 s): it stops there."""
    tmp_path, now, sessions = clocked
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, 120.0))
    assert sessions["sensitivity"] == 1 + 1
    assert any(note.startswith("sensitivity phase stopped after 1 layer(s): the other 2 would take 40 s more")
               for note in report.notes), report.notes
    assert now[0] <= 120.0 and report.passed


def test_a_large_models_first_lossy_candidate_is_not_costed_as_the_lossless_pack(clocked, monkeypatch):
    """The lossless start costs a pack (50 fake s here) and a validation (20 s). A large model's first lossy candidate
    is costed as the validation alone, since it runs in a child stopped at the deadline: 70 + 20 + 21 <= 120 starts
    it, where 70 + 70 + 21 would not; the next is costed as before, and does not fit."""
    if not compress_search.candidate_process.available():
        pytest.skip("candidates run in a child process only on Linux")
    tmp_path, now, sessions = clocked
    real_pack = compress_search.api.pack

    def slow_pack(*args, **kwargs):
        now[0] += 50.0
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(compress_search.api, "pack", slow_pack)
    report = compress(tmp_path / "digits_mlp.onnx", tmp_path / "out.shrink", _config(tmp_path, 120.0, large=True))
    assert [c.phase for c in report.candidates] == ["lossless", "uniform"]
    assert report.stopped == "time budget" and report.passed
    small = compress(tmp_path / "digits_mlp.onnx", tmp_path / "small.shrink", _config(tmp_path, 120.0, large=False))
    assert [c.phase for c in small.candidates] == ["lossless"]  # costed as the lossless pack: not started


def test_every_worker_is_stopped_at_the_deadline(tmp_path, monkeypatch):
    """Two local workers start a batch of two candidates (two formats' first steps, in lockstep) that would each
    run for a minute: both are stopped when the budget's time is up, recorded as such, and the output keeps the
    lossless start."""
    if not compress_search.candidate_process.available():
        pytest.skip("local workers fork: Linux only")
    from conftest import make_mlp, save_model

    model = save_model(make_mlp(), tmp_path / "mlp.onnx")

    def endless(*args, **kwargs):  # runs in the workers (forked after the patch)
        time.sleep(60)

    monkeypatch.setattr(compress_search, "run_recipe", endless)
    config = CompressConfig(thresholds=Thresholds(min_cosine=0.8), time_budget_s=10.0, workers=2,
                            formats=("int8", "float"), sparsities=(0.0, 0.5), refine=False)
    report = compress(model, tmp_path / "out.shrink", config)
    assert [c.phase for c in report.candidates] == ["lossless", "uniform", "uniform"]
    assert all(c.error.startswith("stopped at the time budget") and not c.passed for c in report.candidates[1:])
    assert report.stopped == "time budget" and report.passed and (report.executor, report.workers) == ("local", 2)
    assert report.size["output"] == report.size["lossless"]
