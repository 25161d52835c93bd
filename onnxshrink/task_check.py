"""The user's own task check on a compressed model (each of compress's candidates, validate's candidate, the result of
quantize, prune, cluster, factorize and flush-denormals): a command (or, from the library, a function) that says
whether it still does the job: boxes found, text read, answers right.

Cosine on the judging data can pass a model whose task output broke (ddddocr's detector: 11.2x at cosine 0.9965 kept
60 of 66 boxes), and only the user knows what their task is. NNCF's `validation_fn`, Neural Compressor's `eval_func`
and Olive's user-script metrics answer the same need; here it is a command, so a pipeline can use a script in any
language. As with `git bisect run`, exit status 0 accepts the candidate and any other rejects it; the last line the
command prints is kept as its reason and shown in the report.

The command is split as a shell would split it (shlex) and run without a shell. `{model}` in it stands for the
candidate, a runnable .onnx file (a .shrink is unpacked for it: api.task_verdict), `{original}` for the input model;
without `{model}` the candidate's path is the last argument. Both paths are also in the environment, as
ONNXSHRINK_CANDIDATE and ONNXSHRINK_ORIGINAL.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onnxshrink.errors import UsageError
from onnxshrink.report import Check, drift_warning

MODEL, ORIGINAL = "{model}", "{original}"
DETAIL_CHARS = 200  # the reason kept from the command's last line
KILL_GRACE_S = 2.0  # after the deadline's SIGTERM, before SIGKILL (and after SIGKILL, the most it is waited for)
OUTPUT_TAIL = 65536  # bytes of the command's output read back for its last line
MIN_TIMEOUT_S = 0.5  # a check is started with at least this long to run


@dataclass
class Verdict:
    accepted: bool
    detail: str  # the command's last line of output (or why it could not say)
    seconds: float
    exit_code: int | None = None
    stopped: bool = False  # killed at the time budget's deadline: no verdict on the candidate


class CommandCheck:
    """A task check run as a command; accepted when it exits 0."""

    def __init__(self, command: str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise UsageError(f"--task-check {command!r}: {exc}") from None
        if not argv:
            raise UsageError("--task-check: the command is empty")
        if shutil.which(argv[0]) is None:
            raise UsageError(f"--task-check: {argv[0]!r} is not a program found on PATH, or not executable")
        if not any(MODEL in arg for arg in argv):
            argv.append(MODEL)
        self.command, self.argv = command, argv

    def __str__(self) -> str:
        return self.command

    def __call__(self, original: Path, candidate: Path, timeout: float | None = None) -> Verdict:
        argv = [arg.replace(MODEL, str(candidate)).replace(ORIGINAL, str(original)) for arg in self.argv]
        env = {**os.environ, "ONNXSHRINK_CANDIDATE": str(candidate), "ONNXSHRINK_ORIGINAL": str(original)}
        started = time.monotonic()
        # Output goes to a file, not a pipe: a pipe is read to its end, which a child that left the process group
        # and keeps the pipe open (a daemon the check started) would hold back for as long as it lives.
        with tempfile.TemporaryFile() as log:
            try:
                # Its own process group, so that at the deadline its children (a shell script's python) go with it.
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, **_own_group())
            except OSError as exc:
                return Verdict(False, f"could not run {argv[0]}: {exc.strerror or exc}", time.monotonic() - started)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(process)
                return Verdict(False, f"stopped at the time budget after {time.monotonic() - started:.0f} s",
                               time.monotonic() - started, stopped=True)
            log.seek(max(0, log.seek(0, os.SEEK_END) - OUTPUT_TAIL))
            output = log.read()
        lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
        detail = lines[-1][:DETAIL_CHARS] if lines else ""
        code = process.returncode
        if code != 0:
            detail = f"{detail} (exit {code})" if detail else f"exit {code}"
        return Verdict(code == 0, detail, time.monotonic() - started, exit_code=code)


class FunctionCheck:
    """A task check given as a function of (original, candidate) paths returning a bool, or (bool, reason).
    An exception it raises rejects the candidate, its first line the reason."""

    def __init__(self, function: Callable):
        self.function = function

    def __str__(self) -> str:
        return getattr(self.function, "__name__", "task check")

    def __call__(self, original: Path, candidate: Path, timeout: float | None = None) -> Verdict:
        started = time.monotonic()
        try:
            result = self.function(original, candidate)
        except Exception as exc:  # the candidate broke the user's code (a NaN, a missing output): not accepted
            message = str(exc).strip().splitlines()
            return Verdict(False, f"{type(exc).__name__}: {message[0] if message else ''}"[:DETAIL_CHARS],
                           time.monotonic() - started)
        accepted, detail = result if isinstance(result, tuple) else (result, "")
        return Verdict(bool(accepted), str(detail)[:DETAIL_CHARS], time.monotonic() - started,
                       exit_code=0 if accepted else 1)


def make_check(check) -> CommandCheck | FunctionCheck | None:
    """A check from what the caller gave: a command string, a function, or an existing check (None: none)."""
    if check is None or isinstance(check, (CommandCheck, FunctionCheck)):
        return check
    if isinstance(check, str):
        return CommandCheck(check)
    if callable(check):
        return FunctionCheck(check)
    raise UsageError(f"task check {check!r}: give a command (str) or a function of (original, candidate)")


def add_to_report(report, verdict: Verdict) -> None:
    """The verdict as one of a validation report's checks (its reason shown with it); a rejection fails the report.
    It is a quality gate: the drift warning, which speaks only when none was given, goes."""
    warning = drift_warning(report.outputs, report.checks, report.synthetic_inputs)
    report.checks.append(Check("task_check", 0.0, None if verdict.exit_code is None else float(verdict.exit_code),
                               verdict.accepted, verdict.detail))
    if warning is not None and warning in report.notes:
        report.notes.remove(warning)
    report.gated = True
    report.passed = report.passed and verdict.accepted


def task_rejected(report) -> bool:
    """Whether a validation report holds a task check that rejected its candidate."""
    return any(check.name == "task_check" and not check.passed for check in report.checks)


def _own_group() -> dict:
    """Popen arguments that start the check in a process group of its own: a new session on POSIX, a new process
    group on Windows (which has no killpg; `_stop_group` then stops the tree with taskkill)."""
    if hasattr(os, "killpg"):
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the check's process group, SIGKILL after KILL_GRACE_S; every wait bounded, so the search goes on
    even if the command cannot be reaped. Without process groups (Windows): taskkill /T ends the check's tree, and
    where there is no taskkill either, the check alone is killed."""
    if not hasattr(os, "killpg"):
        _stop_tree(process)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_tree(process: subprocess.Popen) -> None:
    taskkill = shutil.which("taskkill")
    if taskkill:
        try:
            subprocess.run([taskkill, "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=KILL_GRACE_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
