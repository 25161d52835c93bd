"""prune's memory-saving structure (issue 15 item 5): the X^T X it holds from its one capture run are one per
distinct layer input, stored as upper triangles, gathered without joining a batch's chunks, and released as soon as
their layers are pruned. Each saving must leave the statistics, and so the pruned model, unchanged."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import runtime
from onnxshrink.algorithms.reconstruct import Gram, PackedGram
from onnxshrink.data import Dataset
from onnxshrink.passes import prune as prune_pass
from onnxshrink.passes import prune_common
from onnxshrink.passes.common import initializer_owners, select_layers
from onnxshrink.passes.prune import Prune, PruneConfig
from onnxshrink.weights import find_tensors

K = 16  # 1 KiB weights: smaller ones are left alone as tiny


def _attention_like_model():
    """h = Relu(x); q, k, v = h Wq, h Wk, h Wv (one input, three layers); y = (q + k + v) Wo."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(K, K)).astype(np.float32), name)
               for name in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             *(helper.make_node("MatMul", ["h", f"w{n}"], [n], name=f"mm_{n}") for n in "qkv"),
             helper.make_node("Add", ["q", "k"], ["qk"], name="add1"),
             helper.make_node("Add", ["qk", "v"], ["s"], name="add2"),
             helper.make_node("MatMul", ["s", "wo"], ["y"], name="mm_o"),
             helper.make_node("Identity", ["attention_mask"], ["m"], name="keep_mask")]
    graph = helper.make_graph(nodes, "attention_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K]),
                               helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "s"])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(batches=(6, 5), seq=4, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for rows in batches:
        mask = (rng.random((rows, seq)) < 0.6).astype(np.int64)
        mask[:2] = 0  # sentences of padding only: a chunk made of them alone must still leave their rows out
        mask[-1, 0] = 1
        out.append({"x": rng.normal(size=(rows, seq, K)).astype(np.float32), "attention_mask": mask})
    return Dataset(out, None, sum(batches), False, [], {"x": 0, "attention_mask": 0})


def _layers(model):
    records = {r.name: r for r in find_tensors(model)}
    sites, _ = select_layers(model, records, prune_common.SUPPORTED_OPS, PruneConfig(), lambda *a: None)
    owners = initializer_owners(model)
    outputs = {o for node in model.graph.node for o in node.output}
    return [prune_common.describe(site, owners, records, outputs) for site in sites]


def test_packed_gram_holds_the_same_numbers_as_a_full_one_in_half_the_memory():
    rng = np.random.default_rng(4)
    full, packed = Gram(33), PackedGram(33)
    for rows in (50, 7, 1):
        x = rng.normal(size=(rows, 33)).astype(np.float32)
        full.add(x)
        packed.add(x)
    assert np.array_equal(packed.xtx, full.xtx)  # bit for bit, both triangles
    assert np.array_equal(packed.input_norms(), full.input_norms())
    assert packed.rows == full.rows == 58
    assert packed.upper.nbytes < 0.52 * full.xtx.nbytes


def test_layer_rows_of_a_chunked_batch_equal_the_joined_batch_rows(monkeypatch):
    """The rows each batch gives, chunked or not, are the joined batch's real-token rows exactly: the Grams (and
    the pruned weights) do not depend on how a batch was split."""
    model, data = _attention_like_model(), _data()
    layers = _layers(model)

    def gathered():
        return [[(key, x.copy(), weights) for key, x, weights in batch]
                for batch in prune_common.layer_rows(data, model, layers)]

    def joined():
        out = []
        for batch, values in prune_common.capture(data, model, sorted({layer.x for layer in layers})):
            seen = {}
            for layer in layers:
                value = values.get(layer.x, batch.get(layer.x))
                keep = prune_common.token_rows(batch, value, layer)
                x = prune_common.unfold(layer, value)
                x = x if keep is None else x[keep]
                weights = prune_common.row_weights(np.shape(value), layer, x, keep)
                seen.setdefault(prune_common.input_key(layer), (x, weights))
            out.append([(key, x, weights) for key, (x, weights) in seen.items()])
        return out

    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 0)  # never split
    expected = joined()
    assert [[key for key, _, _ in batch] for batch in expected] == [[key for key, _, _ in batch] for batch in gathered()]
    runs = []
    original_run = runtime.Capture._run

    def counted(self, feed, rows):
        runs.append(rows)
        return original_run(self, feed, rows)

    monkeypatch.setattr(runtime.Capture, "_run", counted)
    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 2 * 4 * 2 * K * 4)  # two captured inputs, two rows a run
    chunked = gathered()
    assert max(r or 0 for r in runs) < 6 and len(runs) > len(data.batches), runs  # the batches did run in chunks
    assert len(chunked) == len(expected) == 2
    for got, want in zip(chunked, expected):
        assert len(got) == 2  # two distinct inputs: h (q, k and v) and s
        for (key, x, weights), (key0, x0, weights0) in zip(got, want):
            assert key == key0 and x.dtype == x0.dtype and np.array_equal(x, x0)
            assert weights is not None and np.array_equal(weights, weights0)  # tokens: the same weights
    assert sum(x.shape[0] for x in ({key: x for key, x, _ in batch}[("h", False, "None", K)] for batch in chunked)) == \
        int(sum(b["attention_mask"].sum() for b in data.batches))


def test_layers_reading_one_input_share_one_gram():
    model, data = _attention_like_model(), _data()
    config = PruneConfig(sparsity=0.5, method="sparsegpt", scope="layer")
    grams = Prune(config, data)._original_grams(model, _layers(model))
    assert grams["mm_q"] is grams["mm_k"] is grams["mm_v"]
    assert grams["mm_o"] is not grams["mm_q"]
    assert all(isinstance(gram, PackedGram) for gram in grams.values())


@pytest.mark.parametrize("scope", ["layer", "auto"])
def test_each_gram_is_released_once_its_layers_are_pruned(monkeypatch, scope):
    """While the last layer (mm_o) is pruned, the Gram that q, k and v shared is gone: prune holds no layer's X^T X
    past its turn."""
    model, data = _attention_like_model(), _data()
    alive: dict = {}
    original_grams = Prune._original_grams

    def tracked(self, model, layers):
        grams = original_grams(self, model, layers)
        alive.update({name: weakref.ref(gram) for name, gram in grams.items()})
        return grams

    seen = []
    original_sparsegpt = prune_pass.sparsegpt

    def watched(w, h, *args, **kwargs):
        gc.collect()
        seen.append(sorted(name for name, ref in alive.items() if ref() is not None))
        return original_sparsegpt(w, h, *args, **kwargs)

    monkeypatch.setattr(Prune, "_original_grams", tracked)
    monkeypatch.setattr(prune_pass, "sparsegpt", watched)
    pruned, report = Prune(PruneConfig(sparsity=0.5, method="sparsegpt", scope=scope), data)(model)
    assert report.changed and len(seen) == 4
    assert seen[0] == ["mm_k", "mm_o", "mm_q", "mm_v"]  # q's turn: everything captured is still to be used
    assert seen[-1] == ["mm_o"]  # o's turn: the shared q/k/v Gram has been released
    gc.collect()
    assert not any(ref() is not None for ref in alive.values())


def test_a_layer_input_without_the_batch_axis_counts_once_per_batch_as_when_joined(monkeypatch):
    """c = Relu(constant) feeds a layer whatever the batch: its rows are taken once per batch, chunked or not."""
    model = _attention_like_model()
    table = numpy_helper.from_array(np.random.default_rng(5).normal(size=(3, K)).astype(np.float32), "table")
    model.graph.initializer.extend([table, numpy_helper.from_array(
        np.random.default_rng(6).normal(size=(K, K)).astype(np.float32), "wc")])
    model.graph.node.extend([helper.make_node("Relu", ["table"], ["c"], name="relu_c"),
                             helper.make_node("MatMul", ["c", "wc"], ["yc"], name="mm_c")])
    model.graph.output.append(helper.make_tensor_value_info("yc", TensorProto.FLOAT, [3, K]))
    data = _data()
    layers = [layer for layer in _layers(model) if layer.name == "mm_c"]
    assert layers and layers[0].x == "c"
    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 3 * K * 4 + 1)  # the constant input alone fills a run
    chunked = [{key: x for key, x, _ in batch} for batch in prune_common.layer_rows(data, model, layers)]
    monkeypatch.setattr(runtime, "CAPTURE_BYTES", 0)
    whole = [{key: x for key, x, _ in batch} for batch in prune_common.layer_rows(data, model, layers)]
    expected = np.maximum(numpy_helper.to_array(table), 0)
    for got in (chunked, whole):
        assert len(got) == 2 and all(np.array_equal(next(iter(batch.values())), expected) for batch in got)
