"""Progress everywhere (issue 17, item 7): a bar on a terminal, a heartbeat line on stderr off one (CI) at least every
30 s, nothing on stdout, one clock. Fake clocks: nothing here waits."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import numpy as np
import pytest

from conftest import invoke, make_mlp, save_model
from onnxshrink import render
from onnxshrink.progress import reporting, step
from onnxshrink.render import ProgressDisplay


class FakeClock:
    """Each reading advances by `tick` seconds (a long step between two reports), or stays put with tick 0."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(render, "CLOCK", fake)
    monkeypatch.setattr(render, "TICKER_S", None)  # the tests tick by hand
    return fake


def heartbeats(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("onnxshrink ")]


def test_library_steps_reach_only_the_installed_callback():
    seen = []
    step("nobody listens", 0, 1)  # no callback: nothing happens, nothing fails
    with reporting(lambda *args: seen.append(args)):
        step("prune: layers", 2, 5)
        with reporting(None):  # an inner loop can hide its steps from the outer bar
            step("inner", 0, 1)
    step("after", 1, 1)
    assert seen == [("prune: layers", 2, 5)]


def test_heartbeat_off_a_terminal_at_least_every_30_s(clock, capsys):
    display = ProgressDisplay("sensitivity")
    assert not display.terminal  # pytest's stderr is not a TTY, as in CI
    printed = []
    for done in range(0, 41):  # a report every 5 s for 200 s
        clock.now = 1000.0 + 5 * done
        display("sensitivity: fc1/MatMul", done, 40)
        printed += [clock.now - 1000.0] * len(heartbeats(capsys.readouterr().err))
    assert printed == [10, 40, 70, 100, 130, 160, 190]  # the first once past 10 s, then every 30 s, never more often
    assert capsys.readouterr().out == ""


def test_heartbeat_line_says_phase_count_and_elapsed(clock, capsys):
    display = ProgressDisplay("sensitivity")
    clock.now += 41
    display("sensitivity: fc2/MatMul", 3, 12)
    line, = heartbeats(capsys.readouterr().err)
    assert line == "onnxshrink sensitivity: fc2/MatMul 3/12 · 0:00:41 elapsed"


def test_a_silent_step_still_gets_a_heartbeat(clock, capsys):
    """One step that reports nothing for minutes (a big model's calibration): the ticker's clock readings print."""
    display = ProgressDisplay("quantize")
    display("quantize: calibrating activations", 0, 0)
    lines = []
    for second in range(1, 121):  # the ticker thread's once-a-second look, without waiting for it
        clock.now = 1000.0 + second
        display.tick()
        lines += heartbeats(capsys.readouterr().err)
    assert len(lines) == 4  # at 10, 40, 70, 100 s
    assert lines[-1] == "onnxshrink quantize: calibrating activations · 0:01:40 elapsed"


def test_one_clock_for_a_time_budget(clock, capsys):
    """compress reports seconds of its budget by its own clock, which started after the display's (model loading):
    the count and the elapsed time are then the same number, and it advances between reports."""
    display = ProgressDisplay("compress", unit=" s", budget_seconds=True)
    clock.now += 16  # the search's clock started 5 s after the display's
    display("lossless start (best 3.2x smaller)", 11, 120)
    assert display.count() == "11/120 s" and int(display.elapsed()) == 11
    first, = heartbeats(capsys.readouterr().err)
    assert first == "onnxshrink compress: lossless start (best 3.2x smaller) 11/120 s"  # one clock, said once
    clock.now += 20  # no report for 20 s: the count moves anyway
    assert display.count() == "31/120 s" and int(display.elapsed()) == 31
    clock.now += 10
    display.tick()
    line, = heartbeats(capsys.readouterr().err)
    assert line == "onnxshrink compress: lossless start (best 3.2x smaller) 41/120 s"


@pytest.fixture
def work(tmp_path, monkeypatch):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((32, 32)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args, phase", [
    (["sensitivity", "mlp.onnx", "--sparsities", "0.5", "--bits", "8"], "onnxshrink sensitivity: "),
    (["prune", "mlp.onnx", "--sparsity", "0.5", "--calibration", "calib.npz", "-o", "p.onnx"], "onnxshrink prune: layers "),
    (["cluster", "mlp.onnx", "--bits", "4", "--calibration", "calib.npz", "-o", "c.onnx"], "onnxshrink cluster: layers "),
    (["quantize", "mlp.onnx", "--calibration", "calib.npz", "--integer-min-macs", "0", "-o", "q.onnx"], "onnxshrink quantize: calibrating activations"),
    (["validate", "mlp.onnx", "mlp.onnx", "--samples", "4"], "onnxshrink validate: latency 2/3"),
], ids=["sensitivity", "prune", "cluster", "quantize_static", "validate"])
def test_cli_heartbeat_on_stderr_json_alone_on_stdout(work, runner, monkeypatch, args, phase):
    """Through the CLI off a terminal: each library step reads the clock, which moves 40 s a reading, so every
    step is a heartbeat; stdout is still exactly one JSON document."""
    monkeypatch.setattr(render, "CLOCK", FakeClock(tick=40.0))
    monkeypatch.setattr(render, "TICKER_S", None)
    result = invoke(runner, *args, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # one document, no progress in it
    lines = heartbeats(result.stderr)
    assert any(line.startswith(phase) for line in lines), result.stderr
    assert all("elapsed" in line for line in lines)


def test_compress_json_off_a_terminal_is_not_silent(work, runner, monkeypatch):
    """The issue's case: `compress --json` in CI wrote nothing until it finished. Now each candidate's report can be
    a heartbeat line, with the best ratio so far once there is one."""
    monkeypatch.setattr(render, "CLOCK", FakeClock(tick=40.0))
    monkeypatch.setattr(render, "TICKER_S", None)
    result = invoke(runner, "compress", "mlp.onnx", "-o", "k.shrink", "--calibration", "calib.npz", "--min-cosine",
                    "0.9", "--max-candidates", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["command"] == "compress"
    lines = heartbeats(result.stderr)
    assert lines and all(line.startswith("onnxshrink compress: ") and "candidates" in line for line in lines)
    assert any("best" in line for line in lines), lines


def test_quick_commands_stay_silent(work, runner):
    """Off a terminal, a command done within 10 s writes no heartbeat (the real clock: this run takes about 1 s)."""
    result = invoke(runner, "prune", "mlp.onnx", "--sparsity", "0.5", "-o", "p.onnx", "--no-validate", "--json")
    assert result.exit_code == 0 and heartbeats(result.stderr) == []


@pytest.mark.skipif(sys.platform == "win32", reason="pty")
def test_terminal_shows_a_bar_and_no_heartbeat(work):
    """stderr on a pseudo-terminal: rich draws its bar there (then clears it), no heartbeat lines; stdout a pipe."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "onnxshrink", "sensitivity", "mlp.onnx", "--sparsities", "0.5",
                             "--bits", "8", "--json"], stdout=subprocess.PIPE, stderr=secondary, env=env)
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(primary)
    assert proc.returncode == 0
    json.loads(out)
    text = seen.decode(errors="replace")
    assert "sensitivity: fc" in text and "━" in text, text  # the bar and its phase
    assert "onnxshrink sensitivity:" not in text  # no heartbeat on a terminal
