"""compress: recipes (parse, run, write back), the automatic search, and the CLI's edges."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import invoke, make_mlp, save_model, tree
from onnxshrink import api, compress_search
from onnxshrink.compress_search import (FORMATS, CompressConfig, compress, format_pass, load_recipe, parse_duration,
                                        parse_recipe, run_recipe)
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import ClusterConfig
from onnxshrink.passes.prune import PruneConfig
from onnxshrink.validate import Thresholds, ValidateConfig

RECIPE = """
[[passes]]
name = "prune"
sparsity = 0.8

[[passes.layers]]
match = "fc3*"
sparsity = 0.5

[[passes]]
name = "cluster"
bits = 4
"""


def tensors(path) -> dict:
    model = api.load(path)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _config(calib, data, **extra) -> CompressConfig:
    options = {"thresholds": Thresholds(max_accuracy_drop=0.01), "data": str(data), "labels": "labels",
               "calibration": str(calib), "time_budget_s": 120, "formats": ("cluster4",), "sparsities": (0.0, 0.8, 0.9),
               "refine": False}
    return CompressConfig(**{**options, **extra})


# ---- recipes ------------------------------------------------------------------------------------

def test_recipe_parses_and_writes_back_the_same(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    recipe = load_recipe(path)
    assert [p.name for p in recipe.passes] == ["prune", "cluster"]
    assert recipe.passes[0].options == {"sparsity": 0.8}
    assert recipe.passes[0].layers[0].match == "fc3*" and recipe.passes[0].layers[0].options == {"sparsity": 0.5}
    again = parse_recipe(__import__("tomllib").loads(recipe.to_toml()))
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize("text,message", [
    ('[[passes]]\nname = "shrinkwrap"\n', "passes[0]: unknown pass 'shrinkwrap' (choose prune, quantize, cluster)"),
    ('[[passes]]\nname = "prune"\nspars = 0.5\n', "passes[0] (prune): unknown option 'spars'"),
    ('[[passes]]\nname = "prune"\nsparsity = "high"\n', "passes[0] (prune): option 'sparsity' must be a number, not 'high'"),
    ('[[passes]]\nname = "cluster"\n[[passes.layers]]\nmatch = 3\nbits = 3\n',
     "passes[0] (cluster).layers[0]: 'match' must be a glob string on node names"),
    ('[[passes]]\nname = "cluster"\n[[passes.layers]]\nmatch = "fc1*"\nsparsity = 0.5\n',
     "passes[0] (cluster).layers[0]: unknown option 'sparsity' (choose from bits, skip, codebook, per, outliers)"),
    ('[[passes]]\nname = "quantize"\nbits = 3\n', "passes[0] (quantize): bits 3"),
    ('speed = 1\n[[passes]]\nname = "prune"\n', "unknown key 'speed'"),
    ('passes = 3\n', "no [[passes]] tables"),
    ('[[passes]\n', "not valid TOML"),
])
def test_bad_recipes_are_one_line_usage_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_run_recipe_equals_the_commands_run_by_hand(digits, tmp_path):
    model, calib, _ = digits
    recipe = parse_recipe(__import__("tomllib").loads(RECIPE))
    run = run_recipe(model, recipe, tmp_path / "r.onnx", calibration=calib)
    api.prune(model, tmp_path / "p.onnx", PruneConfig(sparsity=0.8, layer_sparsity={"fc3/MatMul": 0.5}), calibration=calib,
              run_validation=False)
    api.cluster(tmp_path / "p.onnx", tmp_path / "c.onnx", ClusterConfig(bits=4), calibration=calib, run_validation=False)
    ours, theirs = tensors(tmp_path / "r.onnx"), tensors(tmp_path / "c.onnx")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert run.layer_sparsity["fc3/MatMul"] == pytest.approx(0.5, abs=1e-3)
    assert set(run.layer_bits.values()) == {4}
    # A .shrink output is the same model, packed.
    run_recipe(model, recipe, tmp_path / "r.shrink", calibration=calib)
    packed = tensors(tmp_path / "r.shrink")
    assert all(np.array_equal(packed[k], theirs[k]) for k in theirs)


def test_per_layer_bits_and_skip(digits, tmp_path):
    model, calib, _ = digits
    text = RECIPE + '\n[[passes.layers]]\nmatch = "fc1/*"\nbits = 3\n\n[[passes.layers]]\nmatch = "fc3/*"\nskip = true\n'
    run = run_recipe(model, parse_recipe(__import__("tomllib").loads(text)), tmp_path / "r.onnx", calibration=calib)
    assert run.layer_bits == {"fc1/MatMul": 3, "fc2/MatMul": 4}
    assert run.layer_format["fc3/MatMul"] == "float"
    # A rule that names no layer is refused with the layer names.
    bad = parse_recipe(__import__("tomllib").loads(RECIPE.replace("fc3*", "conv*")))
    with pytest.raises(UsageError, match="recipe passes\\[0\\] \\(prune\\): layer rule 'conv\\*' matches no layer of the model"):
        run_recipe(model, bad, tmp_path / "x.onnx", calibration=calib)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1h", 3600), ("600", 600), ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


# ---- the automatic search -----------------------------------------------------------------------

def test_automatic_mode_finds_a_smaller_valid_model_and_its_recipe_reproduces_it(digits, tmp_path):
    model, calib, data = digits
    out, saved = tmp_path / "out.shrink", tmp_path / "chosen.toml"
    report = compress(model, out, _config(calib, data, time_budget_s=None), save_recipe=saved)  # not load-dependent
    assert report.passed and out.exists()
    lossless = report.size["lossless"]
    assert report.size["output"] < lossless / 5
    assert [c.phase for c in report.candidates][:2] == ["lossless", "uniform"] and len(report.candidates) >= 3
    assert all(c.size and c.seconds >= 0 for c in report.candidates)
    assert {layer.node for layer in report.layers} == {"fc1/MatMul", "fc2/MatMul", "fc3/MatMul"}
    assert all(layer.bits == 4 and 0.1 < layer.sparsity < 0.99 for layer in report.layers)
    # Judged independently: the output passes the threshold on the eval data.
    check = api.validate(model, out, ValidateConfig(data=str(data), labels="labels", latency=False,
                                                    thresholds=Thresholds(max_accuracy_drop=0.01)))
    assert check.passed
    assert json.loads(report.to_json())["candidates"][0]["phase"] == "lossless"
    # The saved recipe, run again, writes the same model.
    again = compress(model, tmp_path / "again.shrink", CompressConfig(calibration=str(calib)), recipe=saved)
    assert again.mode == "recipe"
    first, second = tensors(out), tensors(tmp_path / "again.shrink")
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert out.read_bytes() == (tmp_path / "again.shrink").read_bytes()  # metadata and all: bit for bit
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # The recipe records its calibration data; replaying it without that data, or with other data, is refused.
    requires = load_recipe(saved).requires
    with np.load(calib) as arrays:
        assert requires["calibration"] == calib.name and requires["calibration_samples"] == len(arrays["input"])
    assert len(requires["calibration_sha256"]) == 64
    with pytest.raises(UsageError, match="built with calibration data digits_mlp.calib.npz .*without --calibration"):
        compress(model, tmp_path / "none.shrink", CompressConfig(), recipe=saved)
    other = tmp_path / "other.npz"
    with np.load(calib) as arrays:
        np.savez(other, **{k: v[:64] for k, v in arrays.items()})
    with pytest.raises(UsageError, match="not other.npz \\(64 samples"):
        compress(model, tmp_path / "other.shrink", CompressConfig(calibration=str(other)), recipe=saved)
    assert not (tmp_path / "none.shrink").exists() and not (tmp_path / "other.shrink").exists()
    allowed = compress(model, tmp_path / "other.shrink", CompressConfig(calibration=str(other)), recipe=saved,
                       allow_other_data=True)
    assert allowed.notes[0].startswith("warning: ") and "--allow-other-data" in allowed.notes[0]
    assert (tmp_path / "other.shrink").read_bytes() != out.read_bytes()  # what the check is for


def test_a_recipe_built_without_calibration_refuses_some(tmp_path):
    recipe = parse_recipe({"requires": {"calibration": ""}, "passes": [{"name": "prune", "sparsity": 0.5}]})
    assert compress_search.check_requirements(recipe, None, "r.toml", False) is None
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.zeros((3, 4), np.float32))
    with pytest.raises(UsageError, match="r.toml was built without calibration data"):
        compress_search.check_requirements(recipe, calib, "r.toml", False)
    assert "warning" in compress_search.check_requirements(recipe, calib, "r.toml", True)
    assert compress_search.check_requirements(parse_recipe({"passes": [{"name": "prune"}]}), calib, "r.toml", False) is None
    assert "[requires]" in recipe.to_toml() and parse_recipe({**recipe.to_dict()}).requires == {"calibration": ""}
    with pytest.raises(UsageError, match="names no 'calibration'"):
        parse_recipe({"requires": {"calibration_samples": 3}, "passes": [{"name": "prune"}]})


def test_refinement_moves_one_layer_at_a_time(digits, tmp_path):
    model, calib, data = digits
    report = compress(model, tmp_path / "out.shrink", _config(calib, data, sparsities=(0.0, 0.8), refine=True,
                                                              max_candidates=6, time_budget_s=None))
    moves = [c for c in report.candidates if c.phase == "per-layer"]
    assert len(report.candidates) == 6 and report.stopped == "candidate limit"
    assert moves and all(c.recipe.startswith("base + ") for c in moves)
    assert report.size["output"] == min(c.size for c in report.candidates if c.passed)


def test_interrupted_search_leaves_the_best_so_far_or_nothing(digits, tmp_path, monkeypatch):
    model, calib, data = digits
    real, calls = api.validate, tmp_path / "calls.txt"  # a file: candidates may run in child processes

    def flaky(*args, **kwargs):
        with calls.open("a") as log:
            log.write(".")
        if len(calls.read_text()) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_search.api, "validate", flaky)
    out = tmp_path / "out.shrink"
    with pytest.raises(KeyboardInterrupt):
        compress(model, out, _config(calib, data, time_budget_s=None))
    monkeypatch.setattr(compress_search.api, "validate", real)
    assert out.exists()  # the lossless pack and the first passing candidate were written whole
    assert api.validate(model, out, ValidateConfig(data=str(data), labels="labels", latency=False,
                                                   thresholds=Thresholds(max_accuracy_drop=0.01))).passed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    calls.unlink()


def test_impossible_thresholds_write_nothing(digits, tmp_path):
    model, calib, data = digits
    report = compress(model, tmp_path / "out.shrink", _config(calib, data, thresholds=Thresholds(min_cosine=1.5)))
    assert not report.passed and not (tmp_path / "out.shrink").exists()
    assert "cannot be met" in report.notes[0]


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_recipe_and_auto_end_to_end(runner, digits, tmp_path):
    model, calib, data = digits
    (tmp_path / "r.toml").write_text(RECIPE)
    result = invoke(runner, "compress", model, "--recipe", tmp_path / "r.toml", "-o", tmp_path / "r.shrink",
                    "--calibration", calib, "--data", data, "--labels", "labels", "--max-accuracy-drop", "0.05", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "recipe" and report["passed"] and report["size"]["times_smaller"] > 10
    assert report["recipe"]["passes"][0]["name"] == "prune"
    auto = invoke(runner, "compress", model, "--calibration", calib, "--data", data, "--labels", "labels",
                  "--max-accuracy-drop", "0.01", "--time-budget", "6s", "--json")
    assert auto.exit_code == 0, auto.output
    report = json.loads(auto.stdout)
    assert report["output"] == str(tmp_path / "digits_mlp.compressed.shrink") and report["passed"]
    assert report["size"]["output"] <= report["size"]["lossless"]


BAD_RECIPES = {
    "unknown.toml": '[[passes]]\nname = "shrinkwrap"\n',
    "option.toml": '[[passes]]\nname = "prune"\nspars = 0.5\n',
    "type.toml": '[[passes]]\nname = "prune"\nsparsity = "high"\n',
    "match.toml": '[[passes]]\nname = "cluster"\n[[passes.layers]]\nmatch = 3\nbits = 3\n',
    "nolayer.toml": '[[passes]]\nname = "cluster"\n[[passes.layers]]\nmatch = "conv*"\nbits = 3\n',
    "syntax.toml": "[[passes]\n",
}


@pytest.mark.parametrize("args,code,message", [
    ([], 2, "automatic mode needs a budget: --max-accuracy-drop, --min-cosine, --max-drift or --task-check"),
    (["--min-cosine", "0.99", "--time-budget", "soon"], 2, "--time-budget 'soon': expected a positive duration"),
    (["--min-cosine", "0.99", "--time-budget", "0s"], 2, "--time-budget '0s': expected a positive duration"),
    (["--recipe", "missing.toml"], 3, "missing.toml: no such recipe file"),
    (["--max-accuracy-drop", "0.01"], 2, "--max-accuracy-drop needs --labels"),
    (["--recipe", "unknown.toml"], 2, "unknown.toml: passes[0]: unknown pass 'shrinkwrap' (choose prune, quantize, cluster)"),
    (["--recipe", "option.toml"], 2, "option.toml: passes[0] (prune): unknown option 'spars' (choose from sparsity, "),
    (["--recipe", "type.toml"], 2, "type.toml: passes[0] (prune): option 'sparsity' must be a number, not 'high'"),
    (["--recipe", "match.toml"], 2, "match.toml: passes[0] (cluster).layers[0]: 'match' must be a glob string on node names"),
    (["--recipe", "nolayer.toml"], 2, "recipe passes[0] (cluster): layer rule 'conv*' matches no layer of the model "
                                      "(layers: fc0/MatMul, fc1/MatMul, fc2/MatMul)"),
    (["--recipe", "syntax.toml"], 2, "syntax.toml: not valid TOML (Expected ']]' at the end of an array declaration"),
    (["--min-cosine", "0.99", "-o", "out.shrink"], 5, "out.shrink: already exists (use --force to replace it)"),
])
def test_cli_bad_inputs_are_one_line(runner, tmp_path, monkeypatch, args, code, message):
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    for name, text in BAD_RECIPES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "out.shrink").write_bytes(b"keep me")
    before = tree(tmp_path)
    result = invoke(runner, "compress", "mlp.onnx", *args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before


def test_cli_bad_recipe_is_one_line_exit_2(runner, tmp_path):
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "prune"\nsparsity = true\n')
    before = tree(tmp_path)
    result = invoke(runner, "compress", model, "--recipe", tmp_path / "r.toml")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error: ") and "option 'sparsity' must be a number, not True" in result.stderr
    assert tree(tmp_path) == before
    assert onnx.load(model) is not None


def test_codebooks_round_gptq_way_when_the_budget_is_on_outputs_alone(digits):
    calib = str(digits[1])
    outputs = CompressConfig(thresholds=Thresholds(min_cosine=0.999), calibration=calib)
    assert format_pass("cluster3", outputs).options == {"bits": 3, "other_floats": "int8", "rounding": "gptq",
                                                        "channel_scales": False}
    assert "rounding" not in format_pass("gptq4", outputs).options  # a quantize format: no codebook
    labels = CompressConfig(thresholds=Thresholds(max_accuracy_drop=0.01), labels="labels", calibration=calib)
    assert "rounding" not in format_pass("cluster3", labels).options  # nearest rounding found smaller models there
    no_data = CompressConfig(thresholds=Thresholds(min_cosine=0.999))
    assert "rounding" not in format_pass("cluster3", no_data).options  # GPTQ needs calibration data
    assert "rounding" not in FORMATS["cluster3"].options  # the table itself is left alone


# ---- reproducible budgets and signals (issue 18, items 14 and 9) ---------------------------------------

def test_a_candidate_budget_gives_the_same_bytes_and_stops_there(runner, tmp_path, monkeypatch):
    """--time-budget makes the result depend on the machine's speed; --max-candidates does not: two runs, the same
    file, and the report says how many candidates were tried and why the search stopped."""
    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    reports = []
    for name in ("a.shrink", "b.shrink"):
        result = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--max-candidates", "3", "-o", name, "--json")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert (tmp_path / "a.shrink").read_bytes() == (tmp_path / "b.shrink").read_bytes()
    report = reports[0]
    assert len(report["candidates"]) == 3 and report["stopped"] == "candidate limit"
    assert report["max_candidates"] == 3 and report["time_budget_s"] is None  # no clock unless --time-budget is given
    assert report["size"]["output"] < report["size"]["lossless"]  # a compressed candidate, not only the lossless start
    assert "candidate limit: 3 candidate(s) (limit 3)" in invoke(
        runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--max-candidates", "3", "-o", "c.shrink").stdout


def test_a_time_budget_given_with_a_candidate_budget_still_stops_the_search(tmp_path):
    model = save_model(make_mlp(), tmp_path / "mlp.onnx")
    config = CompressConfig(thresholds=Thresholds(min_cosine=0.7), time_budget_s=1e-9, max_candidates=50)
    report = compress(model, tmp_path / "out.shrink", config)
    assert report.stopped == "time budget" and len(report.candidates) == 1  # the lossless start, then the clock
    assert report.time_budget_s == 1e-9 and report.max_candidates == 50
    with pytest.raises(UsageError, match="--max-candidates 0: must be at least 1"):
        compress(model, tmp_path / "x.shrink", CompressConfig(thresholds=Thresholds(min_cosine=0.7), max_candidates=0))


def test_sigterm_during_the_search_exits_143_and_keeps_the_best_so_far(runner, tmp_path, monkeypatch):
    from onnxshrink.cli import Terminated

    save_model(make_mlp(), tmp_path / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    real, calls = api.validate, []

    def killed(*args, **kwargs):  # what the SIGTERM handler raises, in the second validation
        calls.append(1)
        if len(calls) == 2:
            raise Terminated
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_search.api, "validate", killed)
    result = invoke(runner, "compress", "mlp.onnx", "--min-cosine", "0.7", "--max-candidates", "5", "-o", "out.shrink")
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1] == ("terminated (SIGTERM); out.shrink holds the best valid model found "
                                                      "so far, if one was written")
    assert (tmp_path / "out.shrink").exists()  # the lossless start, whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the search's work folder removed


def test_recipe_mode_never_writes_its_failed_result_over_an_input(runner, tmp_path, monkeypatch):
    """-o m.onnx sends a result failing the thresholds to m.failed.onnx: when that is the input, refused up front
    (before: exit 1, the input overwritten by the failed result)."""
    save_model(make_mlp(), tmp_path / "m.failed.onnx")
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "prune"\nsparsity = 0.9\n')
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    result = invoke(runner, "compress", "m.failed.onnx", "--recipe", "r.toml", "--min-cosine", "0.9999", "-o", "m.onnx")
    assert result.exit_code == 5, result.output
    assert result.stderr.strip() == "error: m.failed.onnx: output path is the input model; choose another -o"
    assert tree(tmp_path) == before


# ---- the large-model search ---------------------------------------------------------------------

def test_a_large_model_tries_cheap_formats_first_and_prunes_one_shot():
    config = CompressConfig(calibration="cal.npz", thresholds=Thresholds(min_cosine=0.99))
    order = compress_search.search_formats("cal.npz", None, large=True)
    assert order[:4] == ["int8", "int8static", "gptq4", "cluster6"] and order.index("cluster5") < order.index("cluster4")
    small = compress_search.search_formats("cal.npz", None, large=False)
    assert "int8static" not in small and small == [f for f in compress_search.available_formats("cal.npz")
                                                    if f != "int8static"]
    assert compress_search.search_formats("cal.npz", ("int8static",), large=False) == ["int8static"]  # asked for
    assert "int8static" not in compress_search.search_formats(None, None, large=True)  # needs calibration
    prune, cluster = compress_search.uniform_passes("cluster4", 0.5, config, large=True)
    assert prune.options == {"sparsity": 0.5, "remove_dead_units": True, "method": "sparsegpt", "scope": "layer"}
    assert cluster.options["capture_rounds"] == compress_search.LARGE_CAPTURE_ROUNDS
    # small models keep the passes' defaults; without calibration there is nothing to prune one-shot from
    small = compress_search.uniform_passes("cluster4", 0.5, config, large=False)
    assert small[0].options == {"sparsity": 0.5, "remove_dead_units": True} and "capture_rounds" not in small[1].options
    bare = compress_search.uniform_passes("int8", 0.5, CompressConfig(), large=True)
    assert bare[0].options == {"sparsity": 0.5, "remove_dead_units": True}
    assert [p.name for p in compress_search.uniform_passes("int8", 0.0, config, large=True)] == ["quantize"]


def test_a_large_model_climbs_the_sparsity_grid_from_zero_and_stops_at_the_first_failure(digits, tmp_path):
    """large=True on the sample MLP: int8 alone first (not 75% zeros, the bisection's first point), then upwards;
    the first failing sparsity ends that format and the next format starts again from 0."""
    model, calib, data = digits
    config = _config(calib, data, large=True, formats=("cluster4", "int8"), sparsities=(0.0, 0.5, 0.97, 0.98),
                     time_budget_s=None)
    report = compress(model, tmp_path / "out.shrink", config)
    uniform = [c for c in report.candidates if c.phase == "uniform"]
    # the formats' walks advance in lockstep (one step of each per batch of candidates): int8's first, then cluster4's
    assert [c.recipe.split(" -> ")[-1].split("(")[0] for c in uniform] == ["quantize", "cluster"] * 3
    assert uniform[0].recipe == "quantize(mode=dynamic)" and uniform[0].passed
    assert "method=sparsegpt, scope=layer" in uniform[2].recipe and "sparsity=0.5" in uniform[2].recipe
    assert [c.passed for c in uniform] == [True, True, True, True, False, False]  # 97% zeros fails, 98% not tried
    assert report.passed and any(note.startswith("large model") for note in report.notes)
