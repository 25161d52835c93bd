"""Progress of long steps, told to whoever asked: the library never prints, it calls `progress(phase, done, total)`.

A caller installs its callback around a library call, and the loops deep inside (a pass's layers, the runs of
`validate`, the layers of `sensitivity`) report through `step` without each constructor and helper on the way
taking a callback parameter:

    def show(phase: str, done: int, total: int) -> None:
        print(f"{phase} {done}/{total}")

    with onnxshrink.progress.reporting(show):
        onnxshrink.prune("model.onnx", config=PruneConfig(sparsity=0.8), calibration="calib.npz")

`done` counts finished units out of `total` (0 when the total is unknown). Without a callback `step` does nothing.
The callback lives in a context variable: a thread or task of its own sees none unless it copies the context.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

Progress = Callable[[str, int, int], None]

_current: ContextVar[Progress | None] = ContextVar("onnxshrink_progress", default=None)


@contextmanager
def reporting(progress: Progress | None) -> Iterator[None]:
    """Within the block, library steps report to `progress` (None: to nobody, also hiding an outer callback)."""
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)


def step(phase: str, done: int, total: int = 0) -> None:
    """Tell the installed callback, if any, that `done` of `total` units of `phase` are finished."""
    progress = _current.get()
    if progress is not None:
        progress(phase, int(done), int(total))
