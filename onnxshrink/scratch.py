"""Scratch folders in the system temp directory (onnxruntime's optimized graphs, profiles), and the sweep of those
a killed run left behind.

`tempfile.TemporaryDirectory` removes its folder on return, on Ctrl-C and on SIGTERM, but not after a SIGKILL, an
OOM kill or a power loss: `onnxshrink-ort-XXXXXXXX/` then stays in /tmp with a model's optimized graph in it (as
big as the model). Each folder made here holds a file naming the process that made it; at a process's first
scratch folder, those that are a day old and whose process is gone are removed, as stale staging beside outputs
is (model.sweep_stale_staging).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

SCRATCH_KINDS = ("ort", "profile", "static", "teacher")
OWNER_FILE = ".onnxshrink-pid"  # the pid of the process using the folder
STALE_SCRATCH_S = 24 * 3600  # a live run touches its scratch far more often than this
_SCRATCH_NAME = re.compile(rf"onnxshrink-(?:{'|'.join(SCRATCH_KINDS)})-[a-z0-9_]{{8}}")
_swept = {"done": False}


@contextlib.contextmanager
def scratch_dir(kind: str) -> Iterator[str]:
    """A temporary folder `onnxshrink-KIND-XXXXXXXX` (removed on exit, as TemporaryDirectory's), after the stale
    ones are swept once per process."""
    if kind not in SCRATCH_KINDS:
        raise ValueError(f"scratch kind {kind!r} is not one the sweep recognises")
    if not _swept["done"]:
        _swept["done"] = True
        sweep_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"onnxshrink-{kind}-") as folder:
        with contextlib.suppress(OSError):
            Path(folder, OWNER_FILE).write_text(f"{os.getpid()}\n")
        yield folder


def is_scratch_name(name: str) -> bool:
    return _SCRATCH_NAME.fullmatch(name) is not None


def sweep_stale_scratch(directory: str | os.PathLike | None = None, max_age_s: float = STALE_SCRATCH_S) -> list[Path]:
    """Remove the scratch folders in `directory` (the system temp directory) that are stale: named exactly as
    scratch_dir names them, this user's, nothing in them changed for `max_age_s`, and their process gone (or no
    owner file: by age alone). A link, another user's folder, or one that cannot be removed is left alone.
    Returns the folders removed."""
    directory = Path(directory if directory is not None else tempfile.gettempdir())
    cutoff = time.time() - max_age_s
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if is_scratch_name(e.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                continue
            newest = info.st_mtime
            with os.scandir(entry.path) as children:
                newest = max([newest] + [c.stat(follow_symlinks=False).st_mtime for c in children])
            if newest >= cutoff or _owner_alive(Path(entry.path, OWNER_FILE)):
                continue
            shutil.rmtree(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _owner_alive(owner_file: Path) -> bool:
    """Whether the process named in a scratch folder's owner file still runs (a missing or unreadable file: no)."""
    try:
        pid = int(owner_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process by that number: alive
        return True
    except OSError:
        return False
    return True
