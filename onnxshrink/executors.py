"""How a search's candidate evaluations run: one after another, in local processes, or on a Ray cluster.

Every executor has one method, `map(jobs, admit, done)`, and the same contract, so that the search does all its
bookkeeping (candidate numbers, the best so far, the output file) in the parent, in job order, whichever runs them:

- a job is `function(inputs, target, workdir, cache, evict)`: it reads the files named in `inputs` (role -> path,
  shared by every job of the search), writes `target` and returns a picklable value;
- `admit()` is asked in the parent before each job starts: None leaves it and every later job unstarted (the budget
  is spent), else the seconds it may run (math.inf: no limit); a job still running then is stopped, as a pass
  cannot be cut short from inside;
- `done(index, outcome)` is called in the parent as each job ends, in any order;
- `map` returns one Outcome per job, None for the jobs never started (always the last ones: jobs start in order).

SerialExecutor is the search as it was: in the search's own process, or under a deadline in a forked child
(candidate_process). LocalExecutor forks up to N children at once (Linux; each a copy-on-write view of the parent,
so nothing is pickled on the way in). RayExecutor ships the input files' bytes once through Ray's object store and
gets each candidate's bytes back, so its workers need no shared filesystem: a multi-node cluster works as one machine.
"""

from __future__ import annotations

import math
import multiprocessing.connection
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onnxshrink import candidate_process
from onnxshrink import model as model_io
from onnxshrink.errors import UsageError

RAY_HINT = "pip install 'onnxshrink[ray]'"
# What one worker holds besides its model copies (onnxruntime, numpy, the interpreter), and how many copies of the
# model a candidate's build and validation keep at once (MiniLM, 90 MB: 1.2-1.4 GB peak per process, issue 15).
WORKER_BASE_BYTES = 300 << 20
MODEL_COPIES = 16
MAX_DEFAULT_WORKERS = 8


@dataclass
class Job:
    function: Callable  # (inputs, target, workdir, cache, evict) -> value
    target: Path  # where the candidate's file must be, in the parent, once the job is done
    label: str = ""


@dataclass
class Outcome:
    value: object = None  # what the function returned; None when it failed or was stopped
    added: dict | None = None  # cache entries it added (files in the search's work folder)
    error: str | None = None
    seconds: float = 0.0
    stopped: bool = False  # stopped at its time limit
    limit: float = math.inf  # the seconds it was given


Admit = Callable[[], "float | None"]
Done = Callable[[int, Outcome], None]
Started = Callable[[int], None]


def cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the kernel says a new process could use without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def idle_cores() -> int:
    """Cores not busy with other work: the cores less the 1-minute load average (rounded down)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores()
    return cores() - int(load)


def default_workers(model_bytes: int, threads: int = 1) -> int:
    """Local workers when none are asked for: one per `threads` idle cores (on a busy machine a second worker only
    adds CPU time: the digits transformer on 2 cores at a load of 14-16 took about 25% more CPU time with two, and
    no less wall time; bench/executors_bench.py), as many as memory holds (each worker builds and validates its own copy of the model:
    MODEL_COPIES times its size, plus WORKER_BASE_BYTES), at most MAX_DEFAULT_WORKERS. One where processes cannot
    be forked (the serial search)."""
    if not candidate_process.available():
        return 1
    count = max(idle_cores() // max(threads, 1), 1)
    memory = available_memory()
    if memory is not None:
        count = min(count, max(int(memory // (WORKER_BASE_BYTES + MODEL_COPIES * model_bytes)), 1))
    return max(min(count, MAX_DEFAULT_WORKERS), 1)


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {model_io.first_line(exc)}"


class SerialExecutor:
    """One job at a time: in this process, or in a forked child when it has a time limit (the search as it was)."""

    name = "serial"
    workers = 1

    def __init__(self, inputs: dict, workdir: Path):
        self.inputs, self.workdir = inputs, Path(workdir)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, jobs: list, cache: dict, admit: Admit, done: Done, started: Started | None = None) -> list:
        outcomes: list = [None] * len(jobs)
        for index, job in enumerate(jobs):
            limit = admit()
            if limit is None:
                break
            if started:
                started(index)
            begin = time.monotonic()
            work = _bind(job, self.inputs, self.workdir)
            if math.isfinite(limit) and candidate_process.available():
                result = candidate_process.run(work, dict(cache), limit)
                if result is None:
                    outcome = Outcome(stopped=True, limit=limit)
                else:
                    value, added, error = result
                    cache.update(added)
                    outcome = Outcome(value, added, error)
            else:
                try:
                    outcome = Outcome(work(cache, evict=True))
                except Exception as exc:  # a candidate the passes cannot build: recorded as failed
                    outcome = Outcome(error=_failure(exc))
            outcome.seconds, outcome.limit = time.monotonic() - begin, limit
            outcomes[index] = outcome
            done(index, outcome)
        return outcomes


def _bind(job: Job, inputs: dict, workdir: Path):
    def work(cache, evict=False):
        return job.function(inputs, job.target, workdir, cache, evict)

    return work


class _Pool:
    """Up to `workers` jobs in flight; each started when a slot frees and admit() allows it, stopped at its limit."""

    name = "pool"

    def __init__(self, workers: int):
        self.workers = max(int(workers), 1)

    # A backend: _start(job, cache) -> handle; _ready(handles, timeout) -> handles done; _collect(handle, cache) ->
    # Outcome; _stop(handle).
    def map(self, jobs: list, cache: dict, admit: Admit, done: Done, started: Started | None = None) -> list:
        outcomes: list = [None] * len(jobs)
        running: dict = {}  # handle -> (index, start time, limit)
        following, closed = 0, False
        try:
            while True:
                while not closed and following < len(jobs) and len(running) < self.workers:
                    limit = admit()
                    if limit is None:
                        closed = True
                        break
                    if started:
                        started(following)
                    running[self._start(jobs[following], cache)] = (following, time.monotonic(), limit)
                    following += 1
                if not running:
                    return outcomes
                now = time.monotonic()
                wait = min(begin + limit - now for _, begin, limit in running.values())
                ready = self._ready(list(running), None if math.isinf(wait) else max(wait, 0.0))
                now = time.monotonic()
                for handle in list(running):
                    index, begin, limit = running[handle]
                    if handle in ready:
                        outcome = self._collect(handle, jobs[index], cache)
                    elif now - begin >= limit:
                        self._stop(handle)
                        outcome = Outcome(stopped=True)
                    else:
                        continue
                    del running[handle]
                    outcome.seconds, outcome.limit = now - begin, limit
                    outcomes[index] = outcome
                    done(index, outcome)
        finally:
            for handle in running:  # an interrupt (or a job that raised it): nothing is left running
                self._stop(handle)


class LocalExecutor(_Pool):
    """Up to `workers` forked children at once (candidate_process), each stopped at its time limit. A child's
    cache entries are added to the search's as it ends, so children started later reuse them; none is evicted
    while a batch runs (a running child may still read it): the search evicts after the batch."""

    name = "local"

    def __init__(self, inputs: dict, workdir: Path, workers: int):
        super().__init__(workers)
        self.inputs, self.workdir = inputs, Path(workdir)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _start(self, job: Job, cache: dict):
        return candidate_process.Child(_bind(job, self.inputs, self.workdir), cache)

    def _ready(self, handles: list, timeout: float | None) -> list:
        ready = multiprocessing.connection.wait([h.receiver for h in handles], timeout)
        return [h for h in handles if h.receiver in ready]

    def _collect(self, handle, job: Job, cache: dict) -> Outcome:
        value, added, error = handle.result()
        cache.update(added)
        return Outcome(value, added, error)

    def _stop(self, handle) -> None:
        handle.stop()


def _ray_task(function, layout: list, target_name: str, *blobs):
    """On a Ray worker: the input files written to a fresh folder from the object store's bytes, the job run there
    (with no cache: the search's step files are on another machine), and the candidate's bytes sent back."""
    folder = Path(tempfile.mkdtemp(prefix="onnxshrink-ray-"))
    try:
        inputs = {}
        for number, ((roles, name), blob) in enumerate(zip(layout, blobs)):
            path = folder / "inputs" / str(number) / name
            path.parent.mkdir(parents=True)
            path.write_bytes(blob)
            inputs.update({role: path for role in roles})
        target = folder / target_name
        try:
            value = function(inputs, target, folder, {}, False)
        except Exception as exc:
            return None, None, _failure(exc)
        return value, (target.read_bytes() if target.exists() else None), None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RayExecutor(_Pool):
    """Jobs as Ray tasks (each asking for `threads` CPUs), up to `workers` at once (default: the cluster's CPUs over
    `threads`). Connects to `address` (or RAY_ADDRESS) when given, else starts a local Ray instance; a connection the
    caller opened is used and left open."""

    name = "ray"

    def __init__(self, inputs: dict, workdir: Path, workers: int | None = None, address: str | None = None,
                 threads: int = 1):
        super().__init__(workers or 1)
        self.inputs, self.workdir, self.threads = inputs, Path(workdir), max(int(threads), 1)
        self.requested, self.address = workers, address or os.environ.get("RAY_ADDRESS") or None
        self.ray = import_ray()
        self.owned = False
        self.shipped = None  # (layout, refs): the input files, in the object store once per search

    def __enter__(self):
        ray = self.ray
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            except Exception as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise UsageError(f"--executor ray: cannot connect to {where} ({model_io.first_line(exc)})") from None
            self.owned = True
        if self.requested is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            self.workers = max(int(cpus // self.threads), 1)
        self.remote = ray.remote(_ray_task).options(num_cpus=self.threads, max_retries=0)
        return self

    def __exit__(self, *exc) -> None:
        self.shipped = None
        if self.owned:
            self.ray.shutdown()

    def _ship(self):
        """Each distinct input file once into the object store: (roles, file name) and its reference."""
        if self.shipped is None:
            by_path: dict = {}
            for role, path in self.inputs.items():
                if path is not None:
                    by_path.setdefault(Path(path).resolve(), []).append(role)
            for path in by_path:
                if model_io.file_has_external_data(path):
                    raise UsageError(f"--executor ray: {path.name} keeps its weights in external data files, which "
                                     "are not shipped to Ray workers; use --executor local")
            layout = [(tuple(roles), path.name) for path, roles in by_path.items()]
            self.shipped = (layout, [self.ray.put(path.read_bytes()) for path in by_path])
        return self.shipped

    def _start(self, job: Job, cache: dict):
        layout, refs = self._ship()
        return self.remote.remote(job.function, layout, Path(job.target).name, *refs)

    def _ready(self, handles: list, timeout: float | None) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def _collect(self, handle, job: Job, cache: dict) -> Outcome:
        try:
            value, data, error = self.ray.get(handle)
        except Exception as exc:  # the worker died (out of memory, node lost) or Ray could not run the task
            return Outcome(error=f"the candidate's Ray task failed ({_failure(exc)})")
        if data is not None:
            Path(job.target).write_bytes(data)
        return Outcome(value, {}, error)

    def _stop(self, handle) -> None:
        try:
            self.ray.cancel(handle, force=True)
        except Exception:  # already finished, or the worker is gone: nothing left to stop
            pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def make_executor(kind: str, inputs: dict, workdir: Path, workers: int | None, *, model_bytes: int, threads: int = 1,
                  address: str | None = None):
    """The executor `kind` ("local" or "ray") asks for; local with one worker is the serial search."""
    if kind == "ray":
        return RayExecutor(inputs, workdir, workers, address, threads)
    if kind != "local":
        raise UsageError(f"--executor {kind!r}: choose local or ray")
    if address is not None:
        raise UsageError("--ray-address needs --executor ray")
    count = workers if workers is not None else default_workers(model_bytes, threads)
    if count <= 1 or not candidate_process.available():
        return SerialExecutor(inputs, workdir)
    return LocalExecutor(inputs, workdir, count)
