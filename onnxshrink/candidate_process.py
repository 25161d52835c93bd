"""Run one compress candidate in a child process that can be stopped at a deadline.

A pass cannot be interrupted halfway (onnxruntime runs, least-squares solves), and its cost is only known once it
has run: on a 90 MB model the first lossy candidate, costed as the lossless copy before it, ran 40% past the time
budget. A forked child shares the parent's memory copy-on-write (no model is reloaded, nothing is pickled on the
way in) and is killed when its time is up; only its result comes back, through a pipe. Off Linux (no fork on
Windows; fork in a threaded process is unsafe on macOS, and spawn would re-import everything per candidate) the
caller runs the work in its own process, as before, and the budget is kept by estimates alone.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings

from onnxshrink import model as model_io

INTERRUPTED = "interrupted"  # what a child sends when Ctrl-C stopped it


def available() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run(work, cache: dict, seconds: float):
    """`work(cache, evict=False)` -> (run, report) in a child, given at most `seconds`.

    Returns (run, report, added cache entries, error text or None), or None when the deadline stopped it (the
    child is killed; the files it left are in the search's work folder, which is removed at the end)."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    known = set(cache)
    child = context.Process(target=_child, args=(work, cache, known, sender), daemon=True)
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a threaded process (the progress heartbeat): the child only runs
        # passes and onnxruntime sessions it creates itself, never the heartbeat's locks.
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    sender.close()  # the child holds the only writer: its exit ends the pipe
    try:
        if not receiver.poll(seconds):
            return None
        try:
            result = receiver.recv()
        except EOFError:  # it ended without a word: killed from outside, or out of memory
            child.join()
            return None, None, {}, f"the candidate's process ended without a result (exit code {child.exitcode})"
        if result == INTERRUPTED:
            raise KeyboardInterrupt
        return result
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()


def _child(work, cache: dict, known: set, sender) -> None:
    try:
        try:
            run, report = work(cache, evict=False)
            result = (run, report, {key: value for key, value in cache.items() if key not in known}, None)
        except Exception as exc:  # recorded as a failed candidate, as in the parent
            result = (None, None, {}, f"{type(exc).__name__}: {model_io.first_line(exc)}")
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent stops as it would alone
            result = INTERRUPTED
        sender.send(result)
    finally:
        sender.close()
