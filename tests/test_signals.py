"""A closed terminal (SIGHUP) is cleaned up as SIGTERM and Ctrl-C are: staging removed, exit 129, one line.

A run under nohup (SIGHUP ignored before it started) keeps ignoring it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, default_signals, make_mlp, save_model, tree

# The real entry point, with api._validate made to stop once the output is staged: the test reads "staged" from
# stdout (no timing involved), then signals. `time.sleep` is only the wait itself.
STOP_AT_VALIDATE = """
import sys, time
import onnxshrink.api as target
real = target._validate
def stop(*args, **kwargs):
    print("staged", flush=True)
    time.sleep(600)
    return real(*args, **kwargs)
target._validate = stop
from onnxshrink.cli import main
sys.argv = ["onnxshrink", *sys.argv[1:]]
main()
"""


@pytest.fixture
def work(tmp_path):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    return tmp_path


def _start(work, ignore_hangup: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}

    def before_exec():  # as nohup does: SIGHUP ignored before the program starts
        default_signals()
        if ignore_hangup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-c", STOP_AT_VALIDATE, "quantize", "mlp.onnx", "-o", "out.onnx"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=before_exec)


def _staged(process, work, before) -> list[str]:
    assert process.stdout.readline() == "staged\n", process.stderr.read()
    staged = [name for name in tree(work) if name not in before]
    assert staged and all(name.startswith(".onnxshrink-out.") for name in staged), staged
    return staged


def test_sighup_removes_the_staging_and_exits_129(work):
    before = tree(work)
    process = _start(work)
    try:
        _staged(process, work, before)
        process.send_signal(signal.SIGHUP)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 129 == 128 + signal.SIGHUP, stderr
    assert stdout == "" and stderr.splitlines() == ["terminated (SIGHUP); no output was written"]
    assert tree(work) == before


def test_sighup_stays_ignored_under_nohup(work):
    """SIGHUP ignored from the start: the run goes on through it; a SIGTERM afterwards still cleans up (143)."""
    before = tree(work)
    process = _start(work, ignore_hangup=True)
    try:
        staged = _staged(process, work, before)
        process.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):  # still running, its staging in place
            process.wait(timeout=2)
        assert all(name in tree(work) for name in staged)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == ["terminated (SIGTERM); no output was written"]
    assert tree(work) == before


def test_a_closed_terminal_exits_129_and_leaves_no_staging(work):
    """The real hangup: the run's terminal (a pty) closes under it. Writing there then fails (EIO), which made the
    exit 1 after the cleanup; the message goes nowhere, the code is 129."""
    import pty
    import select

    before = tree(work)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        try:
            default_signals()
            os.chdir(work)
            os.environ.update(PYTHONPATH=str(ROOT), NO_COLOR="1")
            os.execv(sys.executable, [sys.executable, "-c", STOP_AT_VALIDATE, "quantize", "mlp.onnx", "-o", "out.onnx"])
        finally:
            os._exit(99)
    seen = b""
    try:
        while b"staged" not in seen:
            ready, _, _ = select.select([terminal], [], [], 60)
            assert ready, seen
            seen += os.read(terminal, 4096)
        assert any(name.startswith(".onnxshrink-out.") for name in tree(work))
    finally:
        os.close(terminal)  # the terminal goes away: the kernel sends SIGHUP
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129
    assert tree(work) == before
