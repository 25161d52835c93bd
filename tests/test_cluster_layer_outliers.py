"""Outliers layer by layer: cluster's layer_outliers and a recipe rule's `outliers` store exactly the largest weights
of the layers named, and no others."""

from __future__ import annotations

import onnx
import pytest

from conftest import make_mlp, save_model
from onnxshrink.compress_search import parse_recipe, run_recipe
from onnxshrink.errors import UsageError
from onnxshrink.passes.cluster import Cluster, ClusterConfig, check_config


def test_the_pass_gives_outliers_only_to_the_named_layers():
    model = make_mlp((300, 40, 10), seed=6)
    result, report = Cluster(ClusterConfig(bits=3, layer_outliers={"fc1/MatMul": 0.05}))(model)
    actions = {d.node: d.action for d in report.layers}
    assert "outliers" not in actions["fc0/MatMul"] and "20 fp16 outliers" in actions["fc1/MatMul"]  # 5% of 400
    assert sum(n.op_type == "ScatterND" for n in result.graph.node) == 1
    _, overridden = Cluster(ClusterConfig(bits=3, outliers=0.01, layer_outliers={"fc0/MatMul": 0.0}))(model)
    actions = {d.node: d.action for d in overridden.layers}
    assert "outliers" not in actions["fc0/MatMul"] and "4 fp16 outliers" in actions["fc1/MatMul"]  # the rest: 1%


@pytest.mark.parametrize("value", [0.5, -0.01, True])
def test_out_of_range_layer_outliers_are_refused(value):
    with pytest.raises(UsageError, match="layer 'fc1/MatMul': outliers"):
        check_config(ClusterConfig(layer_outliers={"fc1/MatMul": value}), None)


def test_a_recipe_rule_sets_one_layers_outliers_and_saves_it(tmp_path):
    path = save_model(make_mlp((300, 40, 10), seed=6), tmp_path / "mlp.onnx")
    recipe = parse_recipe({"passes": [{"name": "cluster", "bits": 4,
                                       "layers": [{"match": "fc0/MatMul", "outliers": 0.005}]}]})
    run = run_recipe(path, recipe, tmp_path / "out.onnx")
    assert run.layer_bits == {"fc0/MatMul": 4, "fc1/MatMul": 4}
    names = {t.name for t in onnx.load(tmp_path / "out.onnx").graph.initializer}
    assert "fc0.weight_outlier_positions" in names and "fc1.weight_outlier_positions" not in names
    assert "outliers = 0.005" in recipe.to_toml()  # --save-recipe writes the rule back
    with pytest.raises(UsageError, match="outliers"):
        parse_recipe({"passes": [{"name": "cluster", "layers": [{"match": "fc0/MatMul", "outliers": "many"}]}]})
