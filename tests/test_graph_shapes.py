"""Every weight command on every graph shape of tests/graph_shapes.py: the documented exit code, a one-line
error or a model that runs and stays close to the original, the input and the folder otherwise untouched.
docs/ROBUSTNESS.md's "Graph shapes" table is this matrix, written by bench/shapes_table.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import invoke, tree
from graph_shapes import COMMANDS, SHAPES, all_cases
from onnxshrink import api
from onnxshrink.errors import EXIT_UNSUPPORTED

CUSTOM = "custom-domain op (`com.example.FancyRelu`)"
# Exit codes other than 0; anything not listed must succeed.
EXPECTED_EXIT = {(CUSTOM, label): EXIT_UNSUPPORTED for label in COMMANDS if label != "pack"}
LOSSY_MIN_COSINE = 0.8  # prune at 50% on random weights is the loosest (a Loop applies its pruned weight 3 times)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not np.any(a) and not np.any(b):
        return 1.0
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def run_case(runner, folder, shape, label):
    model, feed = SHAPES[shape]()
    onnx.checker.check_model(model, full_check=True)
    source = folder / "model.onnx"
    onnx.save(model, str(source))
    np.savez(folder / "calib.npz", **feed)
    args = [a.format(out=str(folder / slug(label)), calib=str(folder / "calib.npz")) for a in COMMANDS[label]]
    before = tree(folder)
    result = invoke(runner, args[0], source, *args[1:])
    output = folder / args[args.index("-o") + 1].rsplit("/", 1)[-1]
    return model, feed, source, before, result, output


@pytest.mark.parametrize("shape,label", all_cases())
def test_every_command_on_every_graph_shape(runner, tmp_path, shape, label):
    model, feed, source, before, result, output = run_case(runner, tmp_path, shape, label)
    expected = EXPECTED_EXIT.get((shape, label), 0)
    assert result.exit_code == expected, result.output
    assert "Traceback" not in result.output
    after = tree(tmp_path)
    assert after[source.name] == before[source.name]  # the input, byte for byte
    if expected:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert after == before  # nothing written, nothing left behind
        return
    assert set(after) - set(before) == {output.name}  # the output, and no temporary file
    original = api.session(source).run(None, feed) if shape != CUSTOM else None
    candidate = api.session(output).run(None, feed) if shape != CUSTOM else None
    if label == "pack":
        assert api.load(output).SerializeToString() == onnx.load(str(source)).SerializeToString()
    if original is not None:
        for a, b in zip(original, candidate):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert cosine(a, b) >= (1.0 - 1e-6 if label == "pack" else LOSSY_MIN_COSINE)
