"""compress's plan prices a layer's bits as the pack stores them (the coded size of its indices), not at the width:
one codebook for a layer with outliers spends most entries on them, and its indices code in far fewer bits."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from conftest import make_mlp, save_model
from onnxshrink import api, compress_plan
from onnxshrink.algorithms import codebook
from onnxshrink.compress_plan import LayerPrice, Prices, coded_bits
from onnxshrink.passes.cluster import Cluster, ClusterConfig


def test_coded_bits_is_the_entropy_of_the_indices():
    assert abs(coded_bits(np.arange(16).repeat(10)) - 4.0) < 1e-12
    skewed = np.concatenate([np.zeros(900, np.int64), np.arange(1, 16).repeat(6)])
    assert coded_bits(skewed) < 1.0
    assert coded_bits(np.full(50, 7)) == 0.0


def test_over_256_used_entries_code_as_two_byte_planes():
    indices = np.arange(1000, 1300).repeat(3)  # 300 used entries, renumbered 0..299 as uint16
    ranks = np.arange(300).repeat(3)
    planes = codebook.entropy(np.bincount(ranks & 255)) + codebook.entropy(np.bincount(ranks >> 8))
    assert abs(coded_bits(indices) - planes) < 1e-12
    assert coded_bits(indices) > np.log2(300)  # the planes cost more than one 300-symbol alphabet would


def _outlier_mlp(widths=(32, 64, 48, 10)):
    """make_mlp whose middle layer has a few huge weights, as transformers' late FFN outputs do."""
    model = make_mlp(widths)
    for tensor in model.graph.initializer:
        if tensor.name == "fc1.weight":
            w = numpy_helper.to_array(tensor).copy()
            w[0, :4] = [40.0, -35.0, 30.0, -45.0]
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return model


def test_a_layer_with_outliers_is_priced_at_its_coded_bits(tmp_path):
    path = save_model(_outlier_mlp(), tmp_path / "mlp.onnx")
    prices = compress_plan.price_layers(path, None, measure=False)
    layers = {layer.node: layer for layer in prices.layers}
    outliers, plain = layers["fc1/MatMul"], layers["fc0/MatMul"]
    assert outliers.coded[4] < 2.5 < 3.5 < plain.coded[4] <= 4.0
    assert compress_plan.stored_bits(outliers, 4) == outliers.coded[4]
    assert outliers.channel_coded[4] > 3.0  # a codebook per channel spends its entries on that channel's weights
    assert compress_plan.average_bits({"fc0/MatMul": 4, "fc1/MatMul": 4, "fc2/MatMul": 4}, prices) < 4.0


def test_the_price_matches_what_the_pack_stores(tmp_path):
    """The pack codes the cluster pass's indices; the plan prices its own fit of them: they agree within a tenth."""
    model = _outlier_mlp((128, 256, 192, 64))  # tensors large enough to be coded, not left in the graph record
    path = save_model(model, tmp_path / "mlp.onnx")
    prices = compress_plan.price_layers(path, None, measure=False)
    clustered, _ = Cluster(ClusterConfig(bits=4))(model)
    save_model(clustered, tmp_path / "clustered.onnx")
    report = api.pack(tmp_path / "clustered.onnx", tmp_path / "clustered.onnxz")
    packed = {t.name: t for t in report.tensors}
    for layer in prices.layers:
        tensor = packed[layer.node.split("/")[0] + ".weight_idx"]
        assert abs(tensor.entropy_bits - layer.coded[4]) < 0.1 * max(layer.coded[4], 1.0), layer.node


def test_a_width_that_codes_no_smaller_is_stepped_over():
    errors = {3: 0.5, 4: 0.2, 5: 0.05, 6: 0.02, 8: 0.0}
    layer = LayerPrice("l0", 4096, dict(errors), True, coded={8: 3.0, 6: 3.0, 5: 2.9, 4: 2.0, 3: 1.9})
    path = compress_plan.frontier(Prices([layer]))
    assert [a["l0"] for a in path] == [8, 5, 4, 3]  # 6 bits saves nothing over 8: never a step of its own
    flat = LayerPrice("l0", 4096, dict(errors), True, coded={b: 3.0 for b in errors})
    assert compress_plan.frontier(Prices([flat])) == [{"l0": 8}]  # no width codes smaller: stays widest


def test_per_layer_rungs_priced_at_coded_bits_do_not_take_the_place_of_per_channel_ones():
    """PP-OCR's recogniser: 8-bit layer codebooks code in about 5 bits and are predicted lossless, so its per-layer
    rungs beat the per-channel ones on both counts, then fail on the model (0.9864 at 8 bits): 8.14x -> 6.91x.
    Predicted drift ranks rungs within a layout only, so each layout keeps its own."""
    flat = {3: 0.05, 4: 0.01, 5: 0.003, 6: 0.001, 8: 0.0}
    layers = [LayerPrice(f"l{i}", 4096, dict(flat), True, drift=flat[4], channel_errors={3: 0.02, 4: 0.004},
                         channels=16, coded={8: 4.5, 6: 3.9, 5: 3.4, 4: 2.9, 3: 2.2}, channel_coded={3: 2.9, 4: 3.8})
              for i in range(3)]
    prices = Prices(layers)
    rungs = [(a, per, compress_plan.average_bits(a, prices, per), compress_plan.predicted_drift(a, prices, per))
             for a, per in compress_plan.finalists(prices, None)]
    channel = [r for r in rungs if r[1] == "channel"]
    assert channel  # kept, though a per-layer rung beats each on bits and predicted drift
    assert all(any(o[1] == "layer" and o[2] <= r[2] and o[3] <= r[3] for o in rungs) for r in channel)
