"""Calibration that gives a layer fewer input rows than it has inputs is said in the report (prune and cluster):
the layer's X^T X is singular and the updates fit those rows (docs/prune.md, MiniLM: cosine grew with the data)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_mlp
from onnxshrink.data import Dataset
from onnxshrink.passes.cluster import Cluster, ClusterConfig
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.passes.prune_common import few_rows_note


def _data(samples: int) -> Dataset:
    x = np.random.default_rng(0).normal(size=(samples, 32)).astype(np.float32)
    return Dataset([{"input": x[: samples // 2]}, {"input": x[samples // 2:]}], None, samples, False, [])


def test_note_names_the_rows_and_the_widest_layer_only_when_short():
    assert few_rows_note([(32, 100), (64, 100)]) is None
    note = few_rows_note([(32, 40), (64, 40), (48, 40)])
    assert "40 input row(s)" in note and "2 layer(s)" in note and "up to 64" in note
    assert few_rows_note([(64, 0)]) is None  # nothing captured: nothing said


@pytest.mark.parametrize("method", ["sparsegpt", "refit"])
def test_prune_reports_too_few_rows_and_not_enough(method):
    model = make_mlp()  # layers of 32, 64 and 48 inputs
    _, short = Prune(PruneConfig(sparsity=0.5, method=method), _data(40))(model)
    _, enough = Prune(PruneConfig(sparsity=0.5, method=method), _data(96))(model)
    said = [note for note in short.notes if "X^T X is singular" in note]
    assert len(said) == 1 and "40 input row(s)" in said[0] and "2 layer(s)" in said[0]
    assert not any("X^T X is singular" in note for note in enough.notes)


def test_prune_without_weight_updates_says_nothing_of_rows():
    _, report = Prune(PruneConfig(sparsity=0.5, method="mask"), _data(40))(make_mlp())
    assert not any("X^T X is singular" in note for note in report.notes)


def test_cluster_reports_too_few_rows():
    model = make_mlp()
    _, short = Cluster(ClusterConfig(bits=4, rounding="gptq"), _data(40))(model)
    _, enough = Cluster(ClusterConfig(bits=4, rounding="gptq"), _data(96))(model)
    assert any("40 input row(s)" in note and "X^T X is singular" in note for note in short.notes)
    assert not any("X^T X is singular" in note for note in enough.notes)
