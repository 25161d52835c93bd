"""compress --task-check: the user's own check of the task on each candidate that passes the thresholds."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import SAMPLES, invoke, tree
from onnxshrink import api
from onnxshrink.compress_search import CompressConfig, compress
from onnxshrink.errors import UsageError
from onnxshrink.passes import PruneConfig
from onnxshrink.task_check import CommandCheck, FunctionCheck, make_check
from onnxshrink.validate import Thresholds

PYTHON = sys.executable


def script(folder, name: str, body: str) -> str:
    path = folder / name
    path.write_text("import sys, os\n" + body)
    return f"{PYTHON} {path}"


def _config(calib, data, check, **extra) -> CompressConfig:
    options = {"thresholds": Thresholds(min_cosine=0.9), "data": str(data), "calibration": str(calib),
               "time_budget_s": None, "max_candidates": 4, "formats": ("cluster4",), "sparsities": (0.0, 0.8, 0.9),
               "refine": False, "workers": 1, "task_check": check}
    return CompressConfig(**{**options, **extra})


# ---- the check itself ---------------------------------------------------------------------------

def test_a_command_accepts_on_exit_0_and_keeps_its_last_line(tmp_path):
    check = CommandCheck(script(tmp_path, "ok.py", "print('loading'); print(' 66/66 boxes kept ')\n"))
    verdict = check(tmp_path / "orig.onnx", tmp_path / "cand.onnx")
    assert verdict.accepted and verdict.detail == "66/66 boxes kept" and verdict.exit_code == 0 and not verdict.stopped
    no = CommandCheck(script(tmp_path, "no.py", "print('3 boxes lost', file=sys.stderr); sys.exit(3)\n"))
    verdict = no(tmp_path / "orig.onnx", tmp_path / "cand.onnx")
    assert not verdict.accepted and verdict.detail == "3 boxes lost (exit 3)" and verdict.exit_code == 3


def test_placeholders_environment_and_the_appended_path(tmp_path):
    body = ("short = lambda p: p.replace(os.path.dirname(os.environ['ONNXSHRINK_CANDIDATE']), 'D')\n"
            "print('|'.join(short(a) for a in sys.argv[1:] + [os.environ['ONNXSHRINK_CANDIDATE'], "
            "os.environ['ONNXSHRINK_ORIGINAL']]))\n")
    named = CommandCheck(script(tmp_path, "args.py", body) + " --ref {original} m={model}")
    verdict = named(tmp_path / "a b.onnx", tmp_path / "c.onnx")
    assert verdict.detail == "--ref|D/a b.onnx|m=D/c.onnx|D/c.onnx|D/a b.onnx"  # one argument, spaces and all
    appended = CommandCheck(script(tmp_path, "args.py", body))
    assert appended(tmp_path / "o.onnx", tmp_path / "c.onnx").detail == "D/c.onnx|D/c.onnx|D/o.onnx"


def test_a_check_past_the_deadline_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child-alive"
    (tmp_path / "child.py").write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    body = f"import subprocess, time\nsubprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}])\ntime.sleep(30)\n"
    started = time.monotonic()
    verdict = CommandCheck(script(tmp_path, "slow.py", body))(tmp_path / "o.onnx", tmp_path / "c.onnx", timeout=0.5)
    assert verdict.stopped and not verdict.accepted and time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists()  # the grandchild went with the group


def test_a_child_that_leaves_the_group_holding_the_output_does_not_hold_the_verdict(tmp_path):
    """A daemon the check starts in a session of its own (out of reach of the group's signals) keeps the check's
    output open; the verdict still comes when the check itself exits, and at the deadline within the kill grace."""
    daemon = tmp_path / "daemon.py"
    daemon.write_text("import os, time\nos.setsid()\ntime.sleep(20)\n")
    spawn = f"import subprocess\nsubprocess.Popen([sys.executable, {str(daemon)!r}])\n"
    started = time.monotonic()
    verdict = CommandCheck(script(tmp_path, "quick.py", spawn + "print('2/2 lines read')\n"))(
        tmp_path / "o.onnx", tmp_path / "c.onnx", timeout=15)
    assert verdict.accepted and verdict.detail == "2/2 lines read" and time.monotonic() - started < 10
    started = time.monotonic()
    verdict = CommandCheck(script(tmp_path, "stuck.py", spawn + "import time\ntime.sleep(30)\n"))(
        tmp_path / "o.onnx", tmp_path / "c.onnx", timeout=0.5)
    assert verdict.stopped and time.monotonic() - started < 10


@pytest.mark.parametrize("taskkill", [True, False])
def test_without_process_groups_the_check_is_stopped_by_taskkill_or_alone(tmp_path, monkeypatch, taskkill):
    """Windows has no killpg: the deadline runs `taskkill /F /T /PID pid` where there is one, and kills the check
    itself in any case (here a stand-in taskkill that only records its arguments)."""
    monkeypatch.delattr(os, "killpg")
    record = tmp_path / "taskkill-args"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if taskkill:
        fake = bin_dir / "taskkill"
        fake.write_text(f"#!{PYTHON}\nimport sys\nopen({str(record)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + (os.pathsep + os.environ["PATH"] if taskkill else ""))
    pid_file = tmp_path / "pid"
    check = CommandCheck(script(tmp_path, "slow.py", f"import time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                                                     "time.sleep(30)\n"))
    started = time.monotonic()
    verdict = check(tmp_path / "o.onnx", tmp_path / "c.onnx", timeout=2)
    assert verdict.stopped and not verdict.accepted and time.monotonic() - started < 12
    if pid_file.exists():  # it started in time to say who it is: killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    assert record.exists() == taskkill
    if taskkill:
        words = record.read_text().split()
        assert words[:4] == ["/F", "/T", "/PID", words[3]] and int(words[3]) > 0


@pytest.mark.parametrize("command,message", [
    ("", "--task-check: the command is empty"),
    ("'unbalanced", "--task-check \"'unbalanced\": No closing quotation"),
    ("no-such-program-onnxshrink {model}", "--task-check: 'no-such-program-onnxshrink' is not a program found on PATH"),
])
def test_bad_commands_are_refused_up_front(command, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(")):
        make_check(command)


def test_a_function_check_and_its_exceptions(tmp_path):
    assert FunctionCheck(lambda original, candidate: (True, "fine"))(tmp_path, tmp_path).detail == "fine"
    assert not FunctionCheck(lambda original, candidate: False)(tmp_path, tmp_path).accepted

    def broken(original, candidate):
        raise ValueError("output 'boxes' is NaN\nmore")

    verdict = FunctionCheck(broken)(tmp_path, tmp_path)
    assert not verdict.accepted and verdict.detail == "ValueError: output 'boxes' is NaN"
    with pytest.raises(UsageError, match="give a command"):
        make_check(3)


# ---- in the search --------------------------------------------------------------------------------

def _predictions(path, images) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0].argmax(axis=1)


def test_the_search_keeps_only_what_the_check_accepts(digits, tmp_path):
    """A check stricter than the thresholds: every digit read as the original reads it. Candidates the thresholds
    passed and the check rejected are failed; the output is one it accepted, and says so."""
    model, calib, data = digits
    images = np.load(data)[onnx.load(str(model)).graph.input[0].name]
    reference = _predictions(model, images)
    seen = []

    def same_digits(original, candidate):
        assert candidate.suffix == ".onnx" and candidate.exists()  # a runnable file, whatever the output's form
        changed = int(np.sum(_predictions(candidate, images) != reference))
        seen.append(changed)
        return changed == 0, f"{changed} digit(s) read differently"

    report = compress(model, tmp_path / "out.shrink", _config(calib, data, same_digits, max_candidates=5,
                                                                sparsities=(0.0, 0.5, 0.8, 0.9, 0.95)))
    checked = [c for c in report.candidates if c.task_check is not None]
    assert len(checked) == len(seen) >= 2 and checked[0].phase == "lossless" and checked[0].task_check["accepted"]
    assert all(c.passed == c.task_check["accepted"] for c in checked)
    assert all(c.task_check is None and not c.passed for c in report.candidates if c not in checked)
    rejected = [c for c in checked if not c.task_check["accepted"]]
    assert rejected and all(c.cosine >= 0.9 for c in rejected)  # the thresholds alone would have kept them
    unpacked = tmp_path / "out.onnx"
    api.unpack(tmp_path / "out.shrink", unpacked)
    assert np.array_equal(_predictions(unpacked, images), reference)
    final = [c for c in report.validation.checks if c.name == "task_check"]
    assert report.passed and final and final[0].passed and final[0].detail == "0 digit(s) read differently"


def test_a_check_that_rejects_the_input_itself_stops_the_search(digits, tmp_path):
    model, calib, data = digits
    report = compress(model, tmp_path / "out.shrink", _config(calib, data, lambda o, c: (False, "no boxes at all")))
    assert not report.passed and report.stopped == "task check rejects the input model"
    assert len(report.candidates) == 1 and not (tmp_path / "out.shrink").exists()
    assert "rejected the lossless form of the model" in report.notes[-1] and "no boxes at all" in report.notes[-1]


def test_cli_task_check_accepts_and_reports(digits, runner, tmp_path):
    model, calib, data = digits
    check = script(tmp_path, "check.py", "import onnx\nm = onnx.load(sys.argv[-1])\n"
                                         "print(f'{len(m.graph.node)} nodes, reference {os.path.basename(sys.argv[1])}')\n")
    result = invoke(runner, "compress", model, "--calibration", calib, "--data", data, "--min-cosine", "0.9",
                    "--max-candidates", "3", "--workers", "1", "-o", tmp_path / "out.shrink",
                    "--task-check", check + " {original} {model}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    final = [c for c in report["validation"]["checks"] if c["name"] == "task_check"]
    assert final == [{"name": "task_check", "threshold": 0.0, "value": 0.0, "passed": True,
                      "detail": final[0]["detail"]}] and final[0]["detail"].endswith("reference digits_mlp.onnx")
    assert all(c["task_check"]["accepted"] for c in report["candidates"] if c["passed"])
    jsonschema = pytest.importorskip("jsonschema")  # the dev extra installs it
    schema = json.loads((SAMPLES.parent / "docs" / "schemas" / "compress.json").read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(report))  # the new keys are documented
    shown = invoke(runner, "compress", model, "--calibration", calib, "--data", data, "--min-cosine", "0.9",
                   "--max-candidates", "2", "--workers", "1", "-o", tmp_path / "out2.shrink", "--task-check", check)
    assert shown.exit_code == 0 and "pass task check: " in shown.stdout, shown.output


def test_cli_task_check_rejecting_everything_writes_nothing(digits, runner, tmp_path):
    model, calib, data = digits
    (tmp_path / "out.shrink").write_bytes(b"an earlier output")
    check = script(tmp_path, "never.py", "print('text unreadable'); sys.exit(1)\n")
    before = tree(tmp_path)
    result = invoke(runner, "compress", model, "--calibration", calib, "--data", data, "--min-cosine", "0.9",
                    "--max-candidates", "3", "-o", tmp_path / "out.shrink", "--force", "--task-check", check, "--json")
    assert result.exit_code == 1, result.output
    note = json.loads(result.stdout)["notes"][-1]
    assert "rejected the lossless form of the model" in note and "text unreadable (exit 1)" in note
    assert tree(tmp_path) == before and "Traceback" not in result.output


def test_cli_refuses_a_missing_program_in_one_line(digits, runner, tmp_path):
    model, calib, data = digits
    before = tree(tmp_path)
    result = invoke(runner, "compress", model, "--calibration", calib, "--min-cosine", "0.9",
                    "-o", tmp_path / "out.shrink", "--task-check", "no-such-program-onnxshrink --strict")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --task-check: 'no-such-program-onnxshrink' is not a program found on PATH, "
                                     "or not executable")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command,output", [
    (("compress", "--recipe", "{folder}/r.toml"), "out.shrink"),  # recipe mode: the check runs on its result
    (("cluster", "--bits", "4"), "out.onnx"),  # a rewriting command: the same gate
])
def test_a_rejection_writes_the_failed_output_and_leaves_the_existing_one(digits, runner, tmp_path, command, output):
    model, calib, data = digits
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "cluster"\nbits = 4\n')
    (tmp_path / output).write_bytes(b"an earlier output")
    never = script(tmp_path, "never.py", "print('4 of 10 digits read differently'); sys.exit(3)\n")
    args = [arg.replace("{folder}", str(tmp_path)) for arg in command]
    result = invoke(runner, args[0], model, *args[1:], "--calibration", calib, "--data", data, "--min-cosine", "0.5",
                    "-o", tmp_path / output, "--force", "--task-check", never)
    assert result.exit_code == 1, result.output
    assert "FAIL task check: 4 of 10 digits read differently (exit 3)" in result.stdout
    failed = output.replace("out.", "out.failed.")
    assert (tmp_path / output).read_bytes() == b"an earlier output" and (tmp_path / failed).exists()


# ---- validate ---------------------------------------------------------------------------------------

def test_validate_runs_the_check_on_a_pack_unpacked_for_it(digits, runner, tmp_path):
    model, calib, data = digits
    api.pack(model, tmp_path / "m.shrink")
    check = script(tmp_path, "runs.py", "import onnxruntime as ort\nfor p in sys.argv[1:]:\n"
                                        "    ort.InferenceSession(p, providers=['CPUExecutionProvider'])\n"
                                        "print('both run: ' + ' '.join(os.path.basename(p) for p in sys.argv[1:]))\n")
    result = invoke(runner, "validate", model, tmp_path / "m.shrink", "--data", data, "--min-cosine", "0.99",
                    "--task-check", check + " {original} {model}", "--json")
    assert result.exit_code == 0, result.output
    final = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "task_check"]
    assert final[0]["passed"] and final[0]["detail"] == "both run: digits_mlp.onnx candidate.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".task-check")]


def test_validate_fails_on_a_rejection_and_refuses_a_missing_program(digits, runner, tmp_path):
    model, calib, data = digits
    never = script(tmp_path, "never.py", "print('1 box lost'); sys.exit(1)\n")
    result = invoke(runner, "validate", model, model, "--data", data, "--task-check", never)
    assert result.exit_code == 1 and "FAIL task check: 1 box lost (exit 1)" in result.stdout, result.output
    pruned = tmp_path / "pruned.onnx"
    api.prune(model, pruned, PruneConfig(sparsity=0.9, scope="layer"))
    warned = json.loads(invoke(runner, "validate", model, pruned, "--json").stdout)["notes"]
    assert any(note.startswith("warning: the candidate's outputs changed a lot") for note in warned)
    gated = invoke(runner, "validate", model, pruned, "--task-check", never, "--json")
    assert not [n for n in json.loads(gated.stdout)["notes"] if n.startswith("warning:")]  # the check is the gate
    result = invoke(runner, "validate", model, model, "--task-check", "no-such-program-onnxshrink")
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: --task-check: 'no-such-program-onnxshrink'")


def test_a_check_still_running_at_the_deadline_on_the_lossless_start_ends_the_search(digits, tmp_path):
    """The check is stopped at the time budget's deadline, even on the lossless start: the search ends there with
    nothing written, and says the check did not finish (not that it rejected the model)."""
    model, calib, data = digits
    slow = script(tmp_path, "slow.py", "import time\ntime.sleep(120)\n")
    report = compress(model, tmp_path / "out.shrink", _config(calib, data, slow, time_budget_s=3.0, max_candidates=None))
    assert not report.passed and report.stopped == "time budget" and not (tmp_path / "out.shrink").exists()
    assert "did not finish on the lossless form" in report.notes[-1]
    assert report.candidates[0].task_check["detail"].startswith("stopped at the time budget")


# ---- the rewriting commands (quantize, prune, cluster, factorize, flush-denormals) ---------------------------------

RUNS = ("import onnxruntime as ort\nsession = ort.InferenceSession(sys.argv[-1], providers=['CPUExecutionProvider'])\n"
        "print(f'runs: {os.path.basename(sys.argv[-1])}, {len(session.get_outputs())} output(s)')\n")


@pytest.mark.parametrize("command,args", [
    ("quantize", ()),
    ("prune", ("--sparsity", "0.5")),
    ("cluster", ("--bits", "4")),
    ("factorize", ("--rank-ratio", "0.5", "--allow-slower")),
    ("flush-denormals", ()),
])
def test_each_rewriting_command_runs_the_check_on_its_result(digits, runner, tmp_path, command, args):
    model, calib, data = digits
    result = invoke(runner, command, model, *args, "--data", data, "-o", tmp_path / "out.onnx",
                    "--task-check", script(tmp_path, "runs.py", RUNS), "--json")
    assert result.exit_code == 0, result.output
    checks = [c for c in json.loads(result.stdout)["validation"]["checks"] if c["name"] == "task_check"]
    assert len(checks) == 1 and checks[0]["passed"] and checks[0]["detail"] == "runs: out.onnx, 1 output(s)"
    assert (tmp_path / "out.onnx").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_check_needs_validation_and_a_program_before_any_work(digits, runner, tmp_path):
    model, calib, data = digits
    before = tree(tmp_path)
    result = invoke(runner, "prune", model, "--sparsity", "0.5", "--no-validate", "-o", tmp_path / "out.onnx",
                    "--task-check", script(tmp_path, "runs.py", RUNS))
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --task-check is a check of validation's: drop --no-validate to run it"), result.output
    (tmp_path / "runs.py").unlink()
    missing = invoke(runner, "quantize", model, "-o", tmp_path / "out.onnx", "--task-check", "no-such-program-onnxshrink")
    assert missing.exit_code == 2 and missing.stderr.strip().startswith(
        "error: --task-check: 'no-such-program-onnxshrink' is not a program"), missing.output
    assert tree(tmp_path) == before and "Traceback" not in result.output + missing.output


def test_where_validation_finds_no_inputs_the_check_still_gates(digits, runner, tmp_path, monkeypatch):
    """Validation that cannot run lands the output unvalidated (exit 6); the user's check runs on it with its own
    data all the same, and its rejection fails the command like a threshold (exit 1, OUTPUT.failed.onnx)."""
    from onnxshrink.errors import InputsUnavailable

    def no_inputs(*args, **kwargs):
        raise InputsUnavailable("input 'x' has a shape no sample fits")

    monkeypatch.setattr(api, "_validate", no_inputs)
    model, calib, data = digits
    accepted = invoke(runner, "prune", model, "--sparsity", "0.5", "-o", tmp_path / "a.onnx",
                      "--task-check", script(tmp_path, "runs.py", RUNS))
    assert accepted.exit_code == 6 and (tmp_path / "a.onnx").exists(), accepted.output
    report = api.prune(model, tmp_path / "b.onnx", PruneConfig(sparsity=0.5, scope="layer"),
                       task_check=lambda original, candidate: (False, f"{candidate.name}: 3 boxes lost"))
    assert not report.validation.validated and not report.validation.passed
    assert report.output == str(tmp_path / "b.failed.onnx") and not (tmp_path / "b.onnx").exists()
    assert report.validation.checks[-1].detail == "b.onnx: 3 boxes lost"
    rejected = invoke(runner, "prune", model, "--sparsity", "0.5", "-o", tmp_path / "c.onnx",
                      "--task-check", script(tmp_path, "never.py", "sys.exit(1)\n"))
    assert rejected.exit_code == 1 and (tmp_path / "c.failed.onnx").exists() and not (tmp_path / "c.onnx").exists()
