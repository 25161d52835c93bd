"""Candidate evaluation behind one interface (executors.py): serial, local processes (--workers N) and Ray
(--executor ray) run the same jobs, report them in job order, stop them at their limit, and make compress choose
the same best model."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from conftest import invoke, make_mlp, save_model
from onnxshrink import candidate_process, executors
from onnxshrink.compress_search import CompressConfig, compress
from onnxshrink.errors import UsageError
from onnxshrink.validate import Thresholds

needs_fork = pytest.mark.skipif(not candidate_process.available(), reason="local workers fork: Linux only")


def _write(inputs, target, workdir, cache, evict, *, text, sleep=0.0, key=None):
    """A job: waits, then writes `text` (and the word in `inputs["word"]`) to its target; caches a file under `key`."""
    time.sleep(sleep)
    word = Path(inputs["word"]).read_text()
    Path(target).write_text(f"{word} {text}")
    if key is not None:
        cache[key] = (str(target), [], {})
    return text


def _fail(inputs, target, workdir, cache, evict):
    raise ValueError("cannot build this one")


def _interrupt(inputs, target, workdir, cache, evict):
    raise KeyboardInterrupt


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "word.txt").write_text("hello")
    return {"word": tmp_path / "word.txt"}


def _run(executor, jobs, cache=None, limits=None):
    """map() with an admit() that hands out `limits` in turn (None ends them), recording done() calls."""
    limits = list(limits) if limits is not None else [math.inf] * len(jobs)
    ended, started = [], []
    outcomes = executor.map(jobs, {} if cache is None else cache, lambda: limits.pop(0) if limits else None,
                            lambda index, outcome: ended.append(index), started.append)
    return outcomes, ended, started


@needs_fork
def test_local_workers_return_results_in_job_order_whatever_order_they_end_in(tmp_path, inputs):
    jobs = [executors.Job(partial(_write, text=str(n), sleep=s), tmp_path / f"out{n}.txt") for n, s in
            enumerate([0.6, 0.0, 0.3, 0.0])]
    cache: dict = {}
    jobs[1] = executors.Job(partial(_write, text="1", key="shared"), tmp_path / "out1.txt")
    outcomes, ended, started = _run(executors.LocalExecutor(inputs, tmp_path, workers=2), jobs, cache)
    assert [o.value for o in outcomes] == ["0", "1", "2", "3"]
    assert started == [0, 1, 2, 3] and sorted(ended) == [0, 1, 2, 3] and ended[0] != 0  # job 0 ended later
    assert (tmp_path / "out3.txt").read_text() == "hello 3"  # the parent's files, written in the children
    assert cache == {"shared": (str(tmp_path / "out1.txt"), [], {})}  # a child's cache entries come back


@needs_fork
def test_a_job_past_its_limit_is_stopped_and_admit_can_end_the_batch(tmp_path, inputs):
    jobs = [executors.Job(partial(_write, text="slow", sleep=30), tmp_path / "slow.txt"),
            executors.Job(partial(_write, text="fast"), tmp_path / "fast.txt"),
            executors.Job(partial(_write, text="never"), tmp_path / "never.txt")]
    begin = time.monotonic()
    outcomes, ended, started = _run(executors.LocalExecutor(inputs, tmp_path, workers=2), jobs, limits=[0.5, 10.0])
    assert time.monotonic() - begin < 20  # the 30 s job was killed at its half second
    assert outcomes[0].stopped and outcomes[0].value is None and outcomes[0].limit == 0.5
    assert outcomes[1].value == "fast" and not outcomes[1].stopped
    assert outcomes[2] is None and started == [0, 1]  # admit() said no: never started
    assert not (tmp_path / "never.txt").exists()


@pytest.mark.parametrize("kind", ["serial", pytest.param("local", marks=needs_fork)])
def test_a_failing_job_is_an_error_not_a_crash_and_an_interrupt_reaches_the_parent(tmp_path, inputs, kind):
    make = {"serial": lambda: executors.SerialExecutor(inputs, tmp_path),
            "local": lambda: executors.LocalExecutor(inputs, tmp_path, workers=2)}[kind]
    jobs = [executors.Job(_fail, tmp_path / "a"), executors.Job(partial(_write, text="ok"), tmp_path / "b")]
    outcomes, _, _ = _run(make(), jobs)
    assert outcomes[0].error == "ValueError: cannot build this one" and outcomes[1].value == "ok"
    with pytest.raises(KeyboardInterrupt):
        _run(make(), [executors.Job(_interrupt, tmp_path / "c")], limits=[5.0])


def test_default_workers_follow_cores_threads_and_memory(monkeypatch):
    monkeypatch.setattr(executors.candidate_process, "available", lambda: True)
    monkeypatch.setattr(executors, "cores", lambda: 16)
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (0.9, 0.5, 0.5))  # rounded down: all 16 idle
    monkeypatch.setattr(executors, "available_memory", lambda: 64 << 30)
    assert executors.default_workers(1 << 20) == executors.MAX_DEFAULT_WORKERS
    assert executors.default_workers(1 << 20, threads=4) == 4
    # a 400 MB model: 16 copies and the base per worker, 6.5 GB each: 20 GB holds 3 of them
    monkeypatch.setattr(executors, "available_memory", lambda: 20 << 30)
    assert executors.default_workers(400 << 20) == 3
    monkeypatch.setattr(executors, "available_memory", lambda: 1 << 30)
    assert executors.default_workers(400 << 20) == 1  # never none
    monkeypatch.setattr(executors, "available_memory", lambda: 64 << 30)
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (13.7, 9.0, 9.0))
    assert executors.default_workers(1 << 20) == 3  # a load of 13.7 on 16 cores: 3 counted idle
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (40.0, 9.0, 9.0))
    assert executors.default_workers(1 << 20) == 1
    monkeypatch.setattr(executors.candidate_process, "available", lambda: False)
    assert executors.default_workers(1 << 20) == 1


# ---- compress on every executor ----------------------------------------------------------------------------------

def _search(model: Path, out: Path, **extra):
    """Two formats (their walks in lockstep) and per-layer moves on the test MLP, within a candidate budget."""
    options = dict(thresholds=Thresholds(min_cosine=0.8), time_budget_s=None, max_candidates=11,
                   formats=("int8", "float"), sparsities=(0.0, 0.5, 0.8, 0.9))
    report = compress(model, out, CompressConfig(**{**options, **extra}))
    return report, [(c.index, c.phase, c.recipe, c.size, c.passed, c.best, c.cosine, c.error) for c in report.candidates]


def test_serial_workers_and_ray_choose_the_same_best_model(tmp_path):
    """The same seed and candidate budget: the same candidates, in the same order, and the same bytes on disk, whether
    one process builds them, two local workers, or Ray tasks that get the inputs through the object store (a local
    Ray instance the test starts, after the forking runs; the executor uses a connection it finds open)."""
    import ray as ray_module

    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    serial, serial_rows = _search(model, tmp_path / "serial.shrink", workers=1)
    local, local_rows = _search(model, tmp_path / "local.shrink", workers=2)
    ray_module.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        ray, ray_rows = _search(model, tmp_path / "ray.shrink", executor="ray", workers=2)
        assert ray_module.is_initialized()  # the test's own connection is left open
    finally:
        ray_module.shutdown()
    assert (serial.executor, serial.workers) == ("serial", 1)
    assert (local.executor, local.workers) == ("local", 2) and (ray.executor, ray.workers) == ("ray", 2)
    assert serial.stopped == local.stopped == ray.stopped == "candidate limit"
    phases = [c.phase for c in serial.candidates]
    assert phases.count("uniform") >= 4 and phases.count("per-layer") >= 4  # both phases ran batches of several
    assert local_rows == serial_rows and ray_rows == serial_rows
    assert serial.recipe == local.recipe == ray.recipe and serial.passed
    best = (tmp_path / "serial.shrink").read_bytes()
    assert (tmp_path / "local.shrink").read_bytes() == best and (tmp_path / "ray.shrink").read_bytes() == best


def test_ray_missing_is_one_line_with_the_install_hint(runner, tmp_path, monkeypatch):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"needs Ray, which is not installed: pip install 'onnxshrink\[ray\]'"):
        compress(tmp_path / "mlp.onnx", tmp_path / "x.shrink",
                 CompressConfig(thresholds=Thresholds(min_cosine=0.7), executor="ray"))
    result = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--executor", "ray", "-o", "out.shrink")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --executor ray needs Ray, which is not installed: "
                                     "pip install 'onnxshrink[ray]'")
    assert not (tmp_path / "out.shrink").exists()


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "Invalid value for '--workers'"),
    (["--executor", "cluster"], "--executor 'cluster': choose local or ray"),
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
])
def test_cli_bad_executor_options_are_one_line_exit_2(runner, tmp_path, monkeypatch, args, message):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", *args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@needs_fork
def test_cli_workers_are_recorded_in_the_report(runner, tmp_path, monkeypatch):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--max-candidates", "4", "--workers", "2",
                    "-o", "out.shrink", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["executor"] == "local" and report["workers"] == 2 and len(report["candidates"]) == 4
    text = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--max-candidates", "4", "--workers", "2",
                  "-o", "out.shrink", "--force")
    flat = " ".join(text.stdout.split())  # the summary line wraps at 80 columns
    assert text.exit_code == 0 and "4 candidate(s) (limit 4) in " in flat and ", 2 worker processes" in flat


def _huffman_parts(inputs, target, workdir, cache, evict):
    from onnxshrink.codec import huffman

    return huffman._in_parallel(lambda lo, hi: hi - lo, 1000)


@needs_fork
def test_a_worker_forked_after_the_parent_packed_can_pack_too(tmp_path, inputs):
    """The Huffman coder's thread pool, started in the parent (the lossless start packs), has no threads in a forked
    worker: a worker that packed through it waited forever (until the deadline) before the pool was forgotten at fork."""
    from onnxshrink.codec import huffman

    huffman._in_parallel(lambda lo, hi: hi - lo, 1000)  # the parent's pool, where there are two cores or more
    outcomes, _, _ = _run(executors.LocalExecutor(inputs, tmp_path, workers=2),
                          [executors.Job(_huffman_parts, tmp_path / "a")], limits=[60.0])
    assert not outcomes[0].stopped and sum(outcomes[0].value) == 1000
