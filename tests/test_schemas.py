"""The JSON schemas in docs/schemas/ (issue 17, "CI story") hold for real `--json` output of every command, and are
strict enough that a renamed, missing or unexpected key fails: a pipeline that reads a key learns of a change here,
not in production."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")  # the dev extra installs it

from conftest import invoke, make_mlp, save_model  # noqa: E402

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def errors(name: str, document: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema(name))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """Real documents, through the CLI as a pipeline runs it: name -> (schema, document)."""
    from typer.testing import CliRunner

    work = tmp_path_factory.mktemp("schemas")
    save_model(make_mlp(), work / "mlp.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 32)).astype(np.float32)
    np.savez(work / "calib.npz", input=x[:32])
    np.savez(work / "eval.npz", input=x[32:], labels=rng.integers(0, 10, 16))
    runner = CliRunner()
    m, calib, data = str(work / "mlp.onnx"), str(work / "calib.npz"), str(work / "eval.npz")
    out = lambda name: str(work / name)  # noqa: E731
    fast = ("--samples", "8")
    runs = {
        "inspect": ("inspect", ["inspect", m], 0),
        "validate": ("validate", ["validate", m, m, "--data", data, "--labels", "labels", "--max-accuracy-drop", "0.01"], 0),
        "validate_failed": ("validate", ["validate", m, m, "--max-drift", "-1", *fast], 1),
        "quantize": ("command", ["quantize", m, "-o", out("q.onnx"), *fast], 0),
        "quantize_static": ("command", ["quantize", m, "--calibration", calib, "--integer-min-macs", "0", "-o", out("s.onnx")], 0),
        "quantize_int4": ("command", ["quantize", m, "--bits", "4", "--block-size", "16", "-o", out("b.onnx"), *fast], 0),
        "prune": ("command", ["prune", m, "--sparsity", "0.5", "--calibration", calib, "-o", out("p.onnx")], 0),
        "cluster": ("command", ["cluster", m, "--bits", "4", "-o", out("c.onnx"), *fast], 0),
        "factorize": ("command", ["factorize", m, "--rank-ratio", "0.25", "--allow-slower", "-o", out("f.onnx"), *fast], 0),
        "flush_denormals": ("command", ["flush-denormals", m, "-o", out("z.onnx"), "--no-validate"], 0),
        "pack": ("pack", ["pack", m, "-o", out("m.shrink")], 0),
        "unpack": ("command", ["unpack", out("m.shrink"), "-o", out("u.onnx")], 0),
        "sensitivity": ("sensitivity", ["sensitivity", m, "--calibration", calib, "--sparsities", "0.5", "--bits", "8"], 0),
        "compress": ("compress", ["compress", m, "-o", out("k.shrink"), "--calibration", calib, "--min-cosine", "0.9",
                                  "--max-candidates", "2"], 0),
        "error_input": ("error", ["inspect", out("missing.onnx")], 3),
        "error_usage": ("error", ["prune", m, "--bogus"], 2),
    }
    documents = {}
    for name, (kind, args, code) in runs.items():
        result = invoke(runner, *args, "--json")
        assert result.exit_code == code, (name, result.output)
        documents[name] = (kind, json.loads(result.stdout))
    return documents


def test_every_schema_is_a_valid_draft_2020_12_schema():
    names = sorted(p.stem for p in SCHEMAS.glob("*.json"))
    assert names == ["command", "compress", "error", "inspect", "pack", "sensitivity", "validate"]
    for name in names:
        assert schema(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema(name))


def test_real_outputs_match_their_schemas(outputs):
    failures = {name: errors(kind, document) for name, (kind, document) in outputs.items()}
    assert {name: e for name, e in failures.items() if e} == {}
    assert {kind for kind, _ in outputs.values()} == {p.stem for p in SCHEMAS.glob("*.json")}  # each schema used


def _rename(document: dict, path: tuple, new: str) -> dict:
    changed = copy.deepcopy(document)
    *parents, key = path
    target = changed
    for part in parents:
        target = target[part]
    target[new] = target.pop(key)
    return changed


def _drop(document: dict, path: tuple) -> dict:
    changed = copy.deepcopy(document)
    *parents, key = path
    target = changed
    for part in parents:
        target = target[part]
    del target[key]
    return changed


@pytest.mark.parametrize("name, path", [
    ("inspect", ("node_count",)),
    ("inspect", ("tensors", 0, "nbytes")),
    ("validate", ("passed",)),
    ("validate", ("outputs", "logits", "cosine")),
    ("validate", ("latency_ms", "original", "p50")),
    ("quantize", ("passes", 0, "layers", 0, "action")),
    ("quantize", ("validation", "gated")),
    ("quantize", ("changed",)),
    ("pack", ("size", "ratio")),
    ("sensitivity", ("layers", 0, "drift")),
    ("compress", ("candidates", 0, "times_smaller")),
    ("compress", ("validation", "checks", 0, "passed")),
    ("error_input", ("error", "code")),
    ("error_input", ("onnxshrink_version",)),
])
def test_a_renamed_or_missing_key_fails(outputs, name, path):
    kind, document = outputs[name]
    assert errors(kind, document) == []
    assert errors(kind, _rename(document, path, path[-1] + "_renamed")), f"renaming {path} went unnoticed"
    assert errors(kind, _drop(document, path)), f"dropping {path} went unnoticed"


@pytest.mark.parametrize("name", ["inspect", "validate", "quantize", "pack", "unpack", "sensitivity", "compress", "error_input"])
def test_an_unexpected_top_level_key_fails(outputs, name):
    kind, document = outputs[name]
    assert errors(kind, {**document, "surprise": 1})


def test_a_wrong_type_fails(outputs):
    kind, document = outputs["validate"]
    assert errors(kind, {**document, "samples": "16"})
    assert errors(kind, {**document, "passed": "yes"})
