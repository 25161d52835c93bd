"""Run one compress candidate in a child process that can be stopped at a deadline.

A pass cannot be interrupted halfway (onnxruntime runs, least-squares solves), and its cost is only known once it
has run: on a 90 MB model the first lossy candidate, costed as the lossless copy before it, ran 40% past the time
budget. A forked child shares the parent's memory copy-on-write (no model is reloaded, nothing is pickled on the
way in) and is killed when its time is up; only its result comes back, through a pipe. Several children at once
are the local executor's workers (executors.LocalExecutor). Off Linux (no fork on Windows; fork in a threaded
process is unsafe on macOS, and spawn would re-import everything per candidate) the caller runs the work in its own
process, as before, and the budget is kept by estimates alone.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings

from onnxshrink import memory, model as model_io


class _Interrupted:
    """What a child sends when Ctrl-C (or SIGTERM's exception) stopped it: the parent raises the same exception."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class Child:
    """`work(cache, evict=False)` started in a forked child; `receiver` becomes readable when it has ended."""

    def __init__(self, work, cache: dict):
        memory.release()  # the child's RSS counts every page it inherits: freed ones first back to the system
        context = multiprocessing.get_context("fork")
        self.receiver, sender = context.Pipe(duplex=False)
        known = set(cache)
        self.process = context.Process(target=_child, args=(work, cache, known, sender), daemon=True)
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a threaded process (the progress heartbeat): the child only runs
            # passes and onnxruntime sessions it creates itself, never the heartbeat's locks.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.process.start()
        sender.close()  # the child holds the only writer: its exit ends the pipe

    def result(self) -> tuple:
        """(value, added cache entries, error text or None), once `receiver` is readable; re-raises the child's
        KeyboardInterrupt (Ctrl-C reaches the whole process group: the parent stops as it would alone)."""
        try:
            result = self.receiver.recv()
        except EOFError:  # it ended without a word: killed from outside, or out of memory
            self.process.join()
            return None, {}, f"the candidate's process ended without a result (exit code {self.process.exitcode})"
        finally:
            self.stop()
        if isinstance(result, _Interrupted):
            raise result.exc
        return result

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.receiver.close()


def run(work, cache: dict, seconds: float):
    """`work(cache, evict=False)` in a child, given at most `seconds`.

    Returns (value, added cache entries, error text or None), or None when the deadline stopped it (the child is
    killed; the files it left are in the search's work folder, which is removed at the end)."""
    child = Child(work, cache)
    try:
        if not child.receiver.poll(seconds):
            return None
        return child.result()
    finally:
        child.stop()


def _child(work, cache: dict, known: set, sender) -> None:
    try:
        try:
            value = work(cache, evict=False)
            result = (value, {key: entry for key, entry in cache.items() if key not in known}, None)
        except Exception as exc:  # recorded as a failed candidate, as in the parent
            result = (None, {}, f"{type(exc).__name__}: {model_io.first_line(exc)}")
        except KeyboardInterrupt as exc:
            result = _Interrupted(exc)
        try:
            sender.send(result)
        except Exception as exc:  # a result that cannot be pickled: a failed candidate, not a silent child
            sender.send((None, {}, f"the candidate's result could not be sent back ({model_io.first_line(exc)})"))
    finally:
        sender.close()
