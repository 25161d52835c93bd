"""Every file a command writes: OUT.data guarded as OUT is, SIGTERM cleaned up as Ctrl-C, stale staging swept.

Issue 18, items 5 and 9 (docs/ROBUSTNESS.md, "Outputs, signals and staging files").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

from conftest import ROOT, default_signals, invoke, make_mlp, save_model, tree
from onnxshrink import api, model as model_io

FAST = ("--no-validate",)
DAY = 24 * 3600


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with an inline model, a model with external data, and packs of both; paths as a user types them."""
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    onnx.save_model(make_mlp(seed=1), str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    api.pack(tmp_path / "mlp.onnx", tmp_path / "mlp.shrink")
    api.pack(tmp_path / "ext.onnx", tmp_path / "ext.shrink")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- item 5: an existing OUT.data ----------------------------------------------------------------

# Every command that writes ONNX, streamed (ext) or in memory, with and without a data file of its own.
WRITERS = {
    "quantize streamed": ("quantize", "ext.onnx", *FAST),
    "quantize in memory, no data file": ("quantize", "mlp.onnx", *FAST),
    "prune streamed": ("prune", "ext.onnx", "--sparsity", "0.5", *FAST),
    "cluster": ("cluster", "mlp.onnx", *FAST),
    "factorize": ("factorize", "mlp.onnx", "--rank-ratio", "0.5", "--allow-slower", *FAST),
    "flush-denormals": ("flush-denormals", "mlp.onnx", *FAST),
    "unpack streamed": ("unpack", "ext.shrink"),
    "unpack in memory": ("unpack", "mlp.shrink"),
    "compress to .onnx": ("compress", "mlp.onnx", "--min-cosine", "0.99", "--max-candidates", "1"),
}


@pytest.mark.parametrize("args", WRITERS.values(), ids=WRITERS.keys())
def test_an_existing_data_file_is_refused_without_force(runner, work, args):
    (work / "q.onnx.data").write_bytes(b"the user's own file")
    before = tree(work)
    line = one_error_line(invoke(runner, *args, "-o", "q.onnx"), 5)
    assert line == "error: q.onnx.data: already exists (use --force to replace it)"
    assert tree(work) == before


@pytest.mark.parametrize("source", ["ext.onnx", "mlp.onnx"])
def test_force_replaces_the_data_file_or_removes_one_the_model_no_longer_has(runner, work, source):
    """With --force, OUT.data belongs to the output: replaced by the new weights, or removed when the new model keeps
    them inline (a fresh q.onnx beside an earlier q.onnx.data would read as one model)."""
    (work / "q.onnx.data").write_bytes(b"an earlier output's weights")
    result = invoke(runner, "quantize", source, "-o", "q.onnx", "--force", *FAST)
    assert result.exit_code == 0, result.output
    if source == "ext.onnx":
        assert (work / "q.onnx.data").read_bytes() != b"an earlier output's weights"
    else:
        assert not (work / "q.onnx.data").exists()
    api.session("q.onnx")  # loads and runs, with whatever data file it names
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]


def test_unpack_force_removes_a_stale_data_file(runner, work):
    (work / "u.onnx.data").write_bytes(b"stale")
    assert invoke(runner, "unpack", "mlp.shrink", "-o", "u.onnx", "--force").exit_code == 0
    assert not (work / "u.onnx.data").exists() and api.load("u.onnx") is not None


def test_single_file_outputs_ignore_a_file_named_like_a_data_file(runner, work):
    """A pack or a JSON report is one file: `OUT.data` beside it is not theirs, and stays as it was."""
    (work / "p.shrink.data").write_bytes(b"unrelated")
    (work / "s.json.data").write_bytes(b"unrelated")
    assert invoke(runner, "pack", "mlp.onnx", "-o", "p.shrink").exit_code == 0
    assert invoke(runner, "sensitivity", "mlp.onnx", "--sparsities", "0.5", "--bits", "8", "-o", "s.json").exit_code == 0
    assert (work / "p.shrink.data").read_bytes() == b"unrelated" and (work / "s.json.data").read_bytes() == b"unrelated"


def test_a_data_file_that_is_an_input_or_not_a_file(runner, work):
    (work / "mlp.onnx").rename(work / "m.onnx.data")  # the input model itself is named like OUT's data file
    before = tree(work)
    line = one_error_line(invoke(runner, "quantize", "m.onnx.data", "-o", "m.onnx", "--force", *FAST), 5)
    assert line == "error: m.onnx: its data file m.onnx.data is an input of this command; choose another -o"
    (work / "d.onnx.data").mkdir()
    line = one_error_line(invoke(runner, "quantize", "ext.onnx", "-o", "d.onnx", "--force", *FAST), 5)
    assert line == "error: d.onnx.data: exists and is not a regular file"
    assert tree(work) == {**before, "d.onnx.data": "dir"}


# ---- item 9: SIGTERM ------------------------------------------------------------------------------

# Runs the real entry point with one library function made to stop and wait once the staging is written: the
# test reads "staged" from stdout (no timing involved), then signals. `time.sleep` is only the wait itself.
STOP_AT = """
import sys, time
import {module} as target
real = target.{function}
def stop(*args, **kwargs):
    print("staged", flush=True)
    time.sleep(600)
    return real(*args, **kwargs)
target.{function} = stop
from onnxshrink.cli import main
sys.argv = ["onnxshrink", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("stop_at,args,sig,code,word", [
    # quantize: the model is staged in `.onnxshrink-out.onnx.XXXXXXXX.check/` and about to be validated
    (("onnxshrink.api", "_validate"), ("quantize", "mlp.onnx", "-o", "out.onnx"), signal.SIGTERM, 143,
     "terminated (SIGTERM)"),
    (("onnxshrink.api", "_validate"), ("quantize", "mlp.onnx", "-o", "out.onnx"), signal.SIGINT, 130, "interrupted"),
    # pack: the file is staged as `.onnxshrink-out.shrink.XXXXXXXX.tmp` and being read back
    (("onnxshrink.packing", "unpack_model"), ("pack", "mlp.onnx", "-o", "out.shrink"), signal.SIGTERM, 143,
     "terminated (SIGTERM)"),
], ids=["quantize-SIGTERM", "quantize-SIGINT", "pack-SIGTERM"])
def test_a_signal_leaves_no_staging_files(work, stop_at, args, sig, code, word):
    before = tree(work)
    script = STOP_AT.format(module=stop_at[0], function=stop_at[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, *args], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        assert process.stdout.readline() == "staged\n", process.stderr.read()
        staged = [name for name in tree(work) if name not in before]
        assert staged and all(name.startswith(".onnxshrink-out.") for name in staged), staged
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stdout == "" and stderr.splitlines() == [f"{word}; no output was written"]
    assert tree(work) == before  # the staging folder or file gone, nothing else written


# ---- item 9: staging files a kill -9 left -----------------------------------------------------------

def _age(path, seconds: float) -> None:
    """Set a path's (and a folder's entries') modification time `seconds` in the past, links themselves."""
    then = time.time() - seconds
    for p in [*(path.iterdir() if path.is_dir() and not path.is_symlink() else ()), path]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_stale_staging_is_swept_at_the_next_write_and_nothing_else(runner, work):
    stale_dir = work / ".onnxshrink-out.onnx.k2j4x9_q.check"
    stale_dir.mkdir()
    (stale_dir / "out.onnx").write_bytes(b"x" * 1000)
    old_names = {  # the naming before the .onnxshrink- marker, and today's
        ".out.onnx.ab12cd34.tmp": "dir",
        ".out.onnx.zz99yy88.compress": "dir",
        ".onnxshrink.ab12cd34.recipe": "dir",
        ".out.shrink.q1w2e3r4.tmp": "file",
        ".onnxshrink-out.onnx.abcdefgh.tmp": "file",
        ".onnxshrink-probe-a1b2c3d4": "file",
    }
    for name, kind in old_names.items():
        if kind == "dir":
            (work / name).mkdir()
            (work / name / "out.onnx").write_bytes(b"partial")
        else:
            (work / name).write_bytes(b"partial")
    kept = {
        ".notes.20240101.tmp": "file",  # the old shape, but not an onnxshrink output's name
        "out.onnx.ab12cd34.tmp": "file",  # no leading dot
        ".onnxshrink-notes.txt": "file",  # the marker, not the shape
        ".out.onnx.abc.tmp": "file",  # random part of the wrong length
        ".out.onnx.ABCD1234.tmp": "file",  # tempfile never uses capitals
        ".onnxshrink-busy.onnx.a1b2c3d4.check": "busy dir",  # stale name, but a file in it changed just now
    }
    for name, kind in kept.items():
        if kind == "file":
            (work / name).write_bytes(b"the user's")
        else:
            (work / name).mkdir()
            (work / name / "busy.onnx").write_bytes(b"being written")
    (work / ".onnxshrink-link.onnx.a1b2c3d4.tmp").symlink_to("mlp.onnx")  # a link: never followed, never removed
    for name in [stale_dir.name, *old_names, *kept, ".onnxshrink-link.onnx.a1b2c3d4.tmp"]:
        _age(work / name, 2 * DAY)
    os.utime(work / ".onnxshrink-busy.onnx.a1b2c3d4.check" / "busy.onnx")  # touched now
    fresh = work / ".onnxshrink-other.onnx.a1b2c3d4.tmp"  # another run's, in progress
    fresh.write_bytes(b"live")
    before = tree(work)

    result = invoke(runner, "quantize", "mlp.onnx", "-o", "out.onnx", *FAST)
    assert result.exit_code == 0, result.output
    after = tree(work)
    gone = {name.split("/")[0] for name in set(before) - set(after)}
    assert gone == {stale_dir.name, *old_names}
    assert all(after[name] == before[name] for name in before if name.split("/")[0] not in gone)
    assert set(after) - set(before) == {"out.onnx"}
    assert (work / "mlp.onnx").is_file()  # the link's target


def test_sweep_at_write_atomically_and_its_age_limit(work):
    """Every staging creator sweeps (here pack's single staged file); a day old is kept, a day and a bit is not."""
    almost = work / ".onnxshrink-a.shrink.aaaaaaaa.tmp"
    over = work / ".onnxshrink-b.shrink.bbbbbbbb.tmp"
    for path, age in ((almost, DAY - 600), (over, DAY + 600)):
        path.write_bytes(b"partial")
        _age(path, age)
    api.pack(work / "mlp.onnx", work / "new.shrink")
    assert almost.exists() and not over.exists()
    assert model_io.sweep_stale_staging(work, max_age_s=0) == [almost] and not almost.exists()
