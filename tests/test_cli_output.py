"""Short answers and help that teaches (issue 17): help panels and examples, no typer placeholders, a default output
of a few lines that ends with the headline, per-layer tables only with -v, and tables that fit the terminal."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from conftest import SAMPLES, make_mlp, save_model
from onnxshrink import cli

COMMANDS = ["inspect", "validate", "quantize", "prune", "cluster", "factorize", "compress", "sensitivity",
            "flush-denormals", "pack", "unpack"]
TRANSFORMS = ["quantize", "prune", "cluster", "factorize", "flush-denormals"]


def run(*args, columns: int = 80):
    """The CLI at a pinned terminal width (a pipe, as in CI: no colour, no progress bar)."""
    return CliRunner().invoke(cli.app, [str(a) for a in args], env={"COLUMNS": str(columns), "NO_COLOR": "1"})


def widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


@pytest.fixture
def work(tmp_path, monkeypatch):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", TRANSFORMS)
def test_options_are_grouped_into_panels(command):
    text = run(command, "--help").stdout
    for panel in ("What to compress", "How", "Validation gates", "Output", "Run"):
        if command == "flush-denormals" and panel in ("What to compress", "How"):
            continue  # it has no choices: every denormal weight is flushed
        assert f"─ {panel} " in text, panel
    assert "─ Options " in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_examples_and_has_no_placeholders(command):
    result = run(command, "--help", columns=200)
    assert result.exit_code == 0
    text = result.stdout
    examples = text.split("Examples:")[1].splitlines()
    assert len([line for line in examples if line.strip().startswith("onnxshrink ")]) >= 2, text
    # typer 0.29's `{model}`, `<bool>`; braces only where an option's help writes them (--task-check's {model})
    import typer

    written = sum((p.help or "").count("{") for p in typer.main.get_command(cli.app).commands[command].params)
    assert "<bool>" not in text and text.split("Examples:")[0].count("{") == written, text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.split()[-1] in ("MODEL", "PACK", "CANDIDATE"), usage
    assert widest(run(command, "--help").stdout) <= 80


def test_root_help_has_exit_codes_and_no_placeholders():
    text = " ".join(run("--help").stdout.split())
    assert "Exit codes: 0 ok · 1 a threshold failed (or the task check) · 2 usage error" in text and "<bool>" not in text


def test_flag_help_still_parses_values(work):
    """The help fix only hides the type column: flags and options with values still parse as before."""
    result = run("prune", "mlp.onnx", "--sparsity", "0.5", "--no-reconstruct", "--no-validate", "-o", "p.onnx", "-f", "--json")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- short answers


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    for suffix in ("onnx", "eval.npz"):
        shutil.copy(SAMPLES / f"digits_transformer.{suffix}", folder / f"t.{suffix}")
    return folder


def test_quantize_answers_in_a_few_lines_ending_with_the_headline(transformer):
    result = run("quantize", transformer / "t.onnx", "-o", transformer / "q.onnx", "-f",
                 "--data", transformer / "t.eval.npz", "--labels", "labels")
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip().splitlines()
    assert len(lines) < 25, result.stdout  # was 212 at 80 columns, a table row per layer
    assert widest(result.stdout) <= 80
    start = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    summary = " ".join(" ".join(lines[start:]).split())  # the wrapped headline as one line
    assert len(lines) - start <= 3  # the headline is last, in at most 3 lines
    assert "x smaller than the original (114.1 KiB → " in summary, summary
    assert " · accuracy 98.00% → " in summary and " pt, 451 held-out samples)" in summary
    assert " · latency " in summary
    assert lines[0].startswith("quantize-dynamic: 14 of 18 layers changed"), lines[0]
    assert "kept float" not in result.stdout  # no per-layer rows


def test_verbose_shows_each_layer_within_80_columns(transformer):
    result = run("quantize", transformer / "t.onnx", "-o", transformer / "q.onnx", "-f",
                 "--data", transformer / "t.eval.npz", "--labels", "labels", "-v")
    assert result.exit_code == 0, result.output
    text = result.stdout
    words = " ".join(text.split())  # reasons wrap inside their column
    assert "became (why)" in text and "kept float" in text and "weight input is not a constant tensor" in words
    assert "layers.0.attn.q_proj/MatMul" in text and "top-1" in text  # the layer table, then the drift table
    assert widest(text) <= 80
    assert text.rstrip().splitlines()[-1].strip()  # still ends with the headline
    assert "wrote " in text.split("validation not gated")[-1]


@pytest.mark.parametrize("args", [
    ["validate", "mlp.onnx", "p.onnx", "--samples", "4"],
    ["pack", "p.onnx", "-o", "p.shrink", "-f"],
    ["compress", "mlp.onnx", "-o", "c.shrink", "-f", "--max-candidates", "2", "--min-cosine", "0.9", "--samples", "4"],
], ids=lambda a: a[0])
def test_other_commands_end_with_the_headline_and_verbose_fits(work, args):
    assert run("prune", "mlp.onnx", "--sparsity", "0.5", "-o", "p.onnx", "--no-validate").exit_code == 0
    short = run(*args)
    assert short.exit_code == 0, short.output
    lines = short.stdout.rstrip().splitlines()
    assert len(lines) <= 12, short.stdout
    assert re.search(r"\dx (smaller|larger) than (the original|its input) \(", " ".join(lines[-3:])), short.stdout
    verbose = run(*args, "-v")
    assert verbose.exit_code == 0 and len(verbose.stdout.splitlines()) > len(lines)
    assert widest(verbose.stdout) <= 80, verbose.stdout


def test_compress_lists_candidates_only_when_asked(work):
    args = ["compress", "mlp.onnx", "-o", "c.shrink", "-f", "--max-candidates", "2", "--min-cosine", "0.9", "--samples", "4"]
    short = " ".join(run(*args).stdout.split())  # the summary wraps at 80 columns where it names the workers
    assert "candidates (whole model" not in short and "2 candidate(s)" in short and "(-v or --json lists them)" in short
    assert "candidates (whole model validated" in run(*args, "-v").stdout


def test_sensitivity_table_is_readable_at_100_columns(work):
    result = run("sensitivity", "mlp.onnx", columns=100)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and widest(result.stdout) <= 100, result.stdout
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("fc1"))
    assert len(row.split()) == 2 + 6 + 4  # layer, weights, six sparsities, four bit widths: no cell cut
    assert "%" not in row  # agreement only with -v
    assert "%" in next(line for line in run("sensitivity", "mlp.onnx", "-v", columns=160).stdout.splitlines()
                       if line.strip().startswith("fc1"))


def test_headline_units():
    from onnxshrink.render import times_smaller, validation_words
    from onnxshrink.report import OutputDrift, ValidationReport

    assert times_smaller(204185, 11366, " than the original") == "18.0x smaller than the original (199.4 KiB → 11.1 KiB)"
    assert times_smaller(1000, 1100).startswith("1.10x larger (")
    drift = {"y": OutputDrift(max_abs=0.1, mean_rel=0.01, cosine=0.99, cosine_min=0.9, top1_agreement=0.975)}
    lat = {"batch": 1, "threads": 1, "ratio": 0.99, "original": {"p50": 1.0, "p90": 1.1}, "candidate": {"p50": 0.99, "p90": 1.1}}
    labelled = ValidationReport(True, "o", "c", False, 451, {}, {}, drift, {"original": 0.9867, "candidate": 0.9845}, lat, [])
    assert validation_words(labelled) == ["accuracy 98.67% → 98.45% (−0.2 pt, 451 held-out samples)", "latency 0.99x"]
    synthetic = ValidationReport(True, "o", "c", True, 16, {}, {}, drift, None, None, [])
    assert validation_words(synthetic) == ["cosine 0.99, top-1 agreement 97.5% (16 synthetic samples)"]
