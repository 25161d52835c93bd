"""For CI: --json is one document on errors too, every report names its version, verdicts say whether anything
was gated, warnings fire only on real changes (drift, latency beyond noise), and no-op runs say so."""

from __future__ import annotations

import json
from signal import SIGHUP

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxshrink
from conftest import invoke, make_mlp, save_model, tree
from onnxshrink import api, cli
from onnxshrink.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_THRESHOLD, EXIT_USAGE
from onnxshrink.report import CommandReport, OutputDrift, PassReport, ValidationReport, drift_warning, latency_slower

FAST = ("--samples", "4")


@pytest.fixture
def work(tmp_path, monkeypatch):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    save_model(make_mlp(seed=1), tmp_path / "other.onnx")  # same signature, unrelated weights: a model that changed a lot
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_document(result, code: int) -> dict:
    """The failure under --json: the exit code, one `error:` line on stderr, and stdout exactly the error document."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    document = json.loads(result.stdout)  # raises on anything before or after the one document
    assert set(document) == {"error", "onnxshrink_version"} and document["error"]["code"] == code
    assert document["onnxshrink_version"] == onnxshrink.__version__
    return document


# ---------------------------------------------------------------- --json on errors


@pytest.mark.parametrize("command", [["inspect"], ["validate", "mlp.onnx"], ["quantize"], ["flush-denormals"], ["pack"]])
def test_json_missing_file_is_an_error_document(work, runner, command):
    result = invoke(runner, *command, "missing.onnx", "--json")
    document = error_document(result, EXIT_INPUT)
    assert document["error"]["message"] == "missing.onnx: no such file"
    assert result.stderr.strip() == "error: missing.onnx: no such file"


def test_without_json_stdout_stays_empty(work, runner):
    result = invoke(runner, "inspect", "missing.onnx")
    assert result.exit_code == EXIT_INPUT and result.stdout == ""


@pytest.mark.parametrize("args, says", [
    (["quantize", "mlp.onnx", "--bogus", "--json"], "No such option: --bogus"),
    (["quantize", "--json"], "Missing argument 'MODEL'"),
    (["quantize", "mlp.onnx", "--bits", "many", "--json"], "Invalid value for '--bits'"),
    (["quantize", "mlp.onnx", "--mode", "fast", "--json"], "--mode must be one of dynamic, static, weights"),
], ids=["unknown_option", "missing_argument", "bad_value", "domain_usage"])
def test_json_usage_error_is_an_error_document(work, runner, args, says):
    before = tree(work)
    document = error_document(invoke(runner, *args), EXIT_USAGE)
    assert says in document["error"]["message"]
    assert tree(work) == before


def test_json_internal_error_is_an_error_document(work, runner, monkeypatch):
    from onnxshrink.passes.flush_denormals import FlushDenormals

    def broken(self, model):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(FlushDenormals, "__call__", broken)
    document = error_document(invoke(runner, "flush-denormals", "mlp.onnx", "-o", "out.onnx", "--json"), EXIT_INTERNAL)
    assert document["error"]["message"] == "internal error: RuntimeError: boom"
    assert not (work / "out.onnx").exists()


@pytest.mark.parametrize("signal, code, word", [(KeyboardInterrupt, EXIT_INTERRUPTED, "interrupted"),
                                                (cli.Terminated, cli.EXIT_TERMINATED, "terminated (SIGTERM)"),
                                                (lambda: cli.Terminated(SIGHUP), 129, "terminated (SIGHUP)")])
def test_json_interrupt_is_an_error_document(work, runner, monkeypatch, signal, code, word):
    def stopped(*args, **kwargs):
        raise signal()

    monkeypatch.setattr(api, "inspect", stopped)
    document = error_document(invoke(runner, "inspect", "mlp.onnx", "--json"), code)
    assert document["error"]["message"] == f"{word}; no output was written"


def test_json_interrupted_compress_is_an_error_document(work, runner, monkeypatch):
    import onnxshrink.compress_search as search

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(search, "compress", stopped)
    document = error_document(invoke(runner, "compress", "mlp.onnx", "-o", "c.shrink", "--json"), EXIT_INTERRUPTED)
    assert document["error"]["message"] == "interrupted; c.shrink holds the best valid model found so far, if one was written"


def test_threshold_failure_prints_the_report_not_an_error(work, runner):
    result = invoke(runner, "validate", "mlp.onnx", "other.onnx", "--min-cosine", "0.999", *FAST, "--json")
    assert result.exit_code == EXIT_THRESHOLD
    report = json.loads(result.stdout)  # one document: the report whose verdict failed
    assert "error" not in report and report["passed"] is False and report["gated"] is True


# ---------------------------------------------------------------- the version in every report


@pytest.mark.parametrize("args", [
    ["inspect", "mlp.onnx"],
    ["validate", "mlp.onnx", "mlp.onnx", *FAST],
    ["flush-denormals", "mlp.onnx", "-o", "ftz.onnx", *FAST],
    ["pack", "mlp.onnx", "-o", "mlp.shrink"],
    ["sensitivity", "mlp.onnx", "--sparsities", "0.5", "--bits", "8", "-o", "sens.json"],
], ids=lambda args: args[0])
def test_every_json_report_names_the_version(work, runner, args):
    result = invoke(runner, *args, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["onnxshrink_version"] == onnxshrink.__version__
    if args[0] == "sensitivity":  # the file written with -o is the same document
        assert json.loads((work / "sens.json").read_text())["onnxshrink_version"] == onnxshrink.__version__
    if args[0] == "pack":
        result = invoke(runner, "unpack", "mlp.shrink", "-o", "back.onnx", "--json")
        assert json.loads(result.stdout)["onnxshrink_version"] == onnxshrink.__version__


# ---------------------------------------------------------------- gate words and drift warnings


def test_no_thresholds_is_not_gated_and_warns_on_large_drift(work, runner):
    result = invoke(runner, "validate", "mlp.onnx", "other.onnx", *FAST)
    assert result.exit_code == 0, result.output
    assert "PASSED" not in result.stdout
    assert "validation not gated (no thresholds given" in result.stdout
    warning = next(line for line in result.stdout.splitlines() if line.startswith("warning:"))
    assert "changed a lot on synthetic inputs: cosine " in warning and "top-1 agreement " in warning
    report = json.loads(invoke(runner, "validate", "mlp.onnx", "other.onnx", *FAST, "--json").stdout)
    assert report["gated"] is False and report["passed"] is True  # passed: no threshold failed (none was given)
    assert any(note.startswith("warning: the candidate's outputs changed a lot") for note in report["notes"])


def test_a_gate_replaces_the_warning(work, runner):
    result = invoke(runner, "validate", "mlp.onnx", "other.onnx", "--min-cosine", "-1", *FAST)
    assert result.exit_code == 0, result.output
    assert "validation PASSED" in result.stdout and "not gated" not in result.stdout
    assert "changed a lot" not in result.stdout  # the user stated a tolerance; the verdict answers it


def test_unchanged_model_gets_no_drift_warning(work, runner):
    report = json.loads(invoke(runner, "validate", "mlp.onnx", "mlp.onnx", *FAST, "--json").stdout)
    assert report["gated"] is False and not any("changed a lot" in note for note in report["notes"])


def drift(cosine=1.0, agreement=1.0) -> OutputDrift:
    return OutputDrift(max_abs=0.1, mean_rel=0.01, cosine=cosine, cosine_min=cosine, top1_agreement=agreement)


def test_drift_warning_thresholds():
    assert drift_warning({"y": drift(0.991, 0.99)}, []) is None  # at or above 0.99: rounding noise
    only_agreement = drift_warning({"y": drift(0.995, 0.75)}, [])
    assert "top-1 agreement 0.75" in only_agreement and "cosine" not in only_agreement.split(":")[1]
    both = drift_warning({"a": drift(0.999, None), "b": drift(0.917, 0.5)}, [])
    assert "cosine 0.917 (b)" in both and "top-1 agreement 0.5 (b)" in both  # the worst output is named
    assert drift_warning({"y": drift(float("nan"), None)}, []) is not None  # an output that became NaN
    latency_gate = ValidationReport(True, "o", "c", False, 4, {}, {}, {"y": drift(0.5)}, None, {},
                                    [_check("max_latency_ratio")])
    assert latency_gate.gated and any("changed a lot" in n for n in latency_gate.notes)  # latency says nothing of drift
    cosine_gate = ValidationReport(True, "o", "c", False, 4, {}, {}, {"y": drift(0.5)}, None, {}, [_check("min_cosine[y]")])
    assert cosine_gate.gated and cosine_gate.notes == []


def _check(name):
    from onnxshrink.report import Check

    return Check(name, 0.0, 0.0, True)


# ---------------------------------------------------------------- latency beyond noise (synthetic numbers, no timing)


def latency(original, candidate) -> dict:
    """p50, p90 in ms for each model."""
    return {"original": {"p50": original[0], "p90": original[1]}, "candidate": {"p50": candidate[0], "p90": candidate[1]},
            "ratio": candidate[0] / original[0], "runs": 100, "batch": 1, "threads": 1}


@pytest.mark.parametrize("original, candidate, slower", [
    ((1.0, 1.1), (1.004, 1.1), False),   # "1.00x slower": the old warning's case
    ((1.0, 1.3), (1.2, 1.5), False),     # 20% slower, but the runs spread 30%: within noise
    ((1.0, 1.3), (1.2, 1.25), False),    # the larger spread (original's) counts
    ((1.0, 1.05), (1.2, 1.3), True),     # 20% slower, spreads 5% and 10%
    ((1.0, 1.0), (1.015, 1.015), False),  # no spread measured: the 2% floor
    ((1.0, 1.0), (1.03, 1.03), True),
    ((1.0, 1.1), (0.8, 0.9), False),     # faster
], ids=["tiny", "within_spread", "larger_spread", "beyond_spread", "floor", "above_floor", "faster"])
def test_latency_slower_needs_more_than_noise(original, candidate, slower):
    assert latency_slower(latency(original, candidate)) is slower


def test_latency_note_only_beyond_noise():
    def advised(lat) -> list:
        validation = ValidationReport(True, "o", "c", False, 4, {}, {}, {"y": drift()}, None, lat, [])
        report = CommandReport("quantize", "in.onnx", "out.onnx", [], {}, validation=validation)
        api._advise_on_latency(report, PassReport("quantize-dynamic", {}))
        return report.notes

    assert advised(latency((1.0, 1.1), (1.004, 1.1))) == []
    assert advised(latency((1.0, 1.3), (1.2, 1.5))) == []
    (note,) = advised(latency((1.0, 1.05), (1.2, 1.3)))
    assert note.startswith("the output ran 1.20x slower than the original at batch 1 (p50 1.2 vs 1 ms")


def test_latency_within_noise_is_marked_in_the_table():
    from rich.console import Console

    from onnxshrink.render import render_validation

    console = Console(width=100, record=True, no_color=True)
    report = ValidationReport(True, "o.onnx", "c.onnx", False, 4, {}, {"original": 10, "candidate": 10, "ratio": 1.0},
                              {"y": drift()}, None, latency((1.0, 1.3), (1.2, 1.5)), [])
    render_validation(console, report, verbose=True)
    assert "1.200 (noise)" in console.export_text()  # the table
    render_validation(console, report)
    assert console.export_text().rstrip().endswith("latency 1.20x (noise)")  # the headline


# ---------------------------------------------------------------- no-op runs


def model_with_denormal(path):
    model = make_mlp()
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[0, 0] = np.finfo(np.float32).tiny / 4
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, model.graph.initializer[0].name))
    return save_model(model, path)


@pytest.mark.parametrize("args, why", [
    (["flush-denormals", "mlp.onnx"], "(no denormal weights: nothing to do)"),
    (["factorize", "mlp.onnx", "--rank-ratio", "1.0"], "(3 layer(s) kept, each for the reason listed with it)"),
    (["cluster", "mlp.onnx", "--op-types", "Conv"], "(3 layer(s): op type not selected (--op-types))"),
], ids=lambda a: a[0] if isinstance(a, list) else "")
def test_no_op_says_so_first_and_still_writes(work, runner, args, why):
    result = invoke(runner, *args, "-o", "out.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"no change: {args[0]} changed no weight {why}"), first
    assert (work / "out.onnx").exists()  # written all the same: a pipeline's next step finds its file
    out = onnx.load(str(work / "out.onnx"))
    assert [numpy_helper.to_array(t).tobytes() for t in out.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in make_mlp().graph.initializer]
    report = json.loads(invoke(runner, *args, "-o", "out.onnx", "--force", "--no-validate", "--json").stdout)
    assert report["changed"] is False and report["notes"][0].startswith("no change:")


def test_prune_already_at_sparsity_is_a_no_op(work, runner):
    prune = ("--sparsity", "0.5", "--scope", "layer", "--no-validate", "--json")
    first = json.loads(invoke(runner, "prune", "mlp.onnx", "-o", "p1.onnx", *prune).stdout)
    again = json.loads(invoke(runner, "prune", "p1.onnx", "-o", "p2.onnx", *prune).stdout)
    assert first["changed"] is True and not any(n.startswith("no change") for n in first["notes"])
    assert again["changed"] is False and again["notes"][0].startswith("no change: prune changed no weight (3 layer(s): ")


def test_a_real_change_says_no_such_thing(work, runner):
    model_with_denormal(work / "denormal.onnx")
    result = invoke(runner, "flush-denormals", "denormal.onnx", "-o", "out.onnx", "--no-validate")
    assert result.exit_code == 0, result.output
    assert "no change" not in result.stdout
    report = json.loads(invoke(runner, "flush-denormals", "denormal.onnx", "-o", "out.onnx", "-f", "--no-validate",
                               "--json").stdout)
    assert report["changed"] is True


# ---------------------------------------------------------------- help


def test_root_help_lists_the_exit_codes(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # rich wraps the epilog at the terminal width
    for code in ("0 ok", "1 a threshold failed", "2 usage error", "3 unusable input", "4 unsupported model",
                 "5 cannot write the output", "70 internal error", "130 interrupted", "143 terminated"):
        assert code in text, code


@pytest.mark.parametrize("command, choices", [
    ("quantize", ["[dynamic|static|weights]", "[rtn|gptq]", "[minmax|percentile|entropy|mse]", "[first|last|both]",
                  "[16|32|64|128|256]"]),
    ("prune", ["[unstructured|N:M|channel]", "[magnitude|activation]", "[auto|layer|global]", "[dense|sparse]"]),
    ("cluster", ["[layer|channel]", "[none|activation]", "[fp32|fp16|int8]", "[nearest|gptq]"]),
    ("sensitivity", ["[magnitude|activation]"]),
])
def test_help_lists_the_choices(runner, command, choices):
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for choice in choices:
        assert choice in result.stdout, choice
