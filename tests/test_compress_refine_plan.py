"""compress after a planned allocation passed: the frontier between it and the next rung is bisected, and the uniform
formats the plan's prices rule out are not tried (no whole-model candidates: a fake judge)."""

from __future__ import annotations

from types import SimpleNamespace

from onnxshrink import compress_search
from onnxshrink.compress_plan import LayerPrice, Prices, average_bits, frontier, predicted_drift
from onnxshrink.compress_search import Candidate, _predicted_to_fail, _refine_plan


def _measured_prices() -> Prices:
    """Four layers priced in units of output drift (measured): two robust, two fragile."""
    robust = {3: 0.004, 4: 0.001, 5: 0.0004, 6: 0.0001, 8: 0.0}
    fragile = {3: 0.4, 4: 0.1, 5: 0.02, 6: 0.005, 8: 0.0}
    return Prices([LayerPrice(f"l{i}", 1000, dict(errors), True, drift=errors[4])
                   for i, errors in enumerate((robust, fragile, robust, fragile))])


def _candidate(allocation, prices, drift_scale: float = 0.5, passed: bool = True) -> Candidate:
    cosine = 1.0 - drift_scale * predicted_drift(allocation, prices)
    size = int(100 * average_bits(allocation, prices))
    return Candidate(0, "planned", "", size, None, None, None, cosine, passed, passed, 1.0)


class _FakeSearch:
    def __init__(self, limit: int = 100):
        self.notes, self.limit, self.tried = [], limit, []

    def affordable(self) -> bool:
        return len(self.tried) < self.limit


def _judge(budget: float, drift_scale: float = 0.5):
    """A whole model whose drift is drift_scale x the plan's prediction (the plan overstates it, as on MiniLM)."""
    def try_planned(search, allocation, per, prices, tables):
        search.tried.append(allocation)
        passed = drift_scale * predicted_drift(allocation, prices) <= budget
        return _candidate(allocation, prices, drift_scale, passed), f"recipe {len(search.tried)}", None
    return try_planned


def test_the_frontier_between_a_passing_and_a_failing_rung_is_bisected_to_its_narrowest_pass(monkeypatch):
    prices, budget = _measured_prices(), 0.01
    path = frontier(prices)
    truth = [0.5 * predicted_drift(a, prices) <= budget for a in path]
    narrowest = max(i for i, ok in enumerate(truth) if ok)
    passing, failing = path[1], path[narrowest + 3]  # two rungs of the ladder around the true edge
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget))
    search = _FakeSearch()
    start = (_candidate(passing, prices), "start recipe", None)
    best = _refine_plan(search, prices, (), start, passing, "layer", failing, budget)
    assert best[3] == path[narrowest] and best[0].passed and best[0].size < start[0].size
    low, high = path.index(passing), path.index(failing)
    assert search.tried and all(low < path.index(a) < high for a in search.tried)  # only between the rungs
    assert len(search.tried) < high - low - 1  # bisected, not walked
    assert "narrowest passing" in search.notes[-1]


def test_without_a_failed_rung_the_frontier_is_refined_up_to_the_drift_slack(monkeypatch):
    prices, budget = _measured_prices(), 0.01
    path = frontier(prices)
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget))
    search = _FakeSearch()
    best = _refine_plan(search, prices, (), (_candidate(path[0], prices), "r", None), path[0], "layer", None, budget)
    assert 0.5 * predicted_drift(best[3], prices) <= budget and best[3] != path[0]
    assert all(predicted_drift(a, prices) <= 4 * budget for a in search.tried)


def test_refinement_stops_when_the_budget_does_and_keeps_the_passing_start(monkeypatch):
    prices, budget = _measured_prices(), 0.01
    path = frontier(prices)
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget))
    search = _FakeSearch(limit=0)
    start = (_candidate(path[1], prices), "start", None)
    best = _refine_plan(search, prices, (), start, path[1], "layer", path[-1], budget)
    assert best[:3] == start and best[3] == path[1] and not search.tried and not search.notes


def test_uniform_codebooks_the_prices_rule_out_are_skipped_and_kept_without_a_budget():
    prices, budget = _measured_prices(), 0.01
    passing = next(a for a in frontier(prices) if 0.5 * predicted_drift(a, prices) <= budget
                   and predicted_drift(a, prices) > 0)
    search = SimpleNamespace(notes=[])
    skipped = _predicted_to_fail(search, prices, _candidate(passing, prices), passing, "layer", budget)
    # every layer at 4 bits: 0.5 x 0.202 = 0.1 drift, 10x the budget; at 5 bits 0.0204, just over 2x; at 6 bits
    # 0.005, within it
    assert skipped == {"cluster5", "cluster4", "cluster3", "cluster2", "gptq4"}
    assert "not tried" in search.notes[0]
    # the sample models' behaviour: no cosine budget or unmeasured prices, the uniform phase runs as before
    assert _predicted_to_fail(search, prices, _candidate(passing, prices), passing, "layer", None) == set()
    unmeasured = Prices([LayerPrice(layer.node, layer.weights, layer.errors, True) for layer in prices.layers])
    assert _predicted_to_fail(search, unmeasured, _candidate(passing, prices), passing, "layer", budget) == set()


def test_a_per_channel_pass_does_not_scale_the_per_layer_predictions_of_the_uniform_formats():
    prices = _measured_prices()
    for layer in prices.layers:  # per-channel codebooks priced 100x cheaper than per layer (PP-OCR's folded Convs)
        layer.channel_errors, layer.channels = {b: e / 100 for b, e in layer.errors.items() if b in (3, 4)}, 4
    passing = {layer.node: 4 for layer in prices.layers}
    candidate = _candidate(passing, prices)
    candidate.cosine = 1.0 - 1e-5  # validated 0.005x the per-channel prediction (0.002): scaled, 4 bits would fit
    per_channel = _predicted_to_fail(SimpleNamespace(notes=[]), prices, candidate, passing, "channel", 0.01)
    assert {"cluster4", "cluster3"} <= per_channel  # every layer at 4 bits per layer: 0.2 predicted, as it is
