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
        self.candidates = []  # what _task_aim reads

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
    monkeypatch.setattr(compress_search, "FROZEN_STEPS", 0)  # the bisection alone (held steps: the test below)
    search = _FakeSearch()
    start = (_candidate(passing, prices), "start recipe", None)
    best = _refine_plan(search, prices, (), start, passing, "layer", failing, budget)
    assert best[3] == path[narrowest] and best[0].passed and best[0].size < start[0].size
    low, high = path.index(passing), path.index(failing)
    assert search.tried and all(low < path.index(a) < high for a in search.tried)  # only between the rungs
    assert len(search.tried) < high - low - 1  # bisected, not walked
    assert "narrowest passing" in search.notes[-1]


def _big_item_prices() -> Prices:
    """A big item (a word table: most of the weights) whose 4 -> 3 bit step is the frontier's cheapest per bit but
    alone past the budget, beside four small layers that could still go narrower."""
    big = LayerPrice("table", 10000, {3: 0.0135, 4: 0.002, 5: 0.0005, 8: 0.0}, True, drift=0.002, rows=100,
                     tensor="table.weight")
    small = [LayerPrice(f"l{i}", 1000, {3: 0.003, 4: 0.001, 5: 0.0004, 6: 0.0001, 8: 0.0}, True, drift=0.001)
             for i in range(4)]
    return Prices([big, *small])


def test_a_failed_step_of_a_big_item_is_held_and_the_rest_of_the_frontier_goes_on(monkeypatch):
    prices, budget = _big_item_prices(), 0.0095
    path = frontier(prices)
    step = next(i for i in range(1, len(path)) if path[i]["table"] == 3)
    passing, failing = path[step - 1], path[step]  # nothing between them: the table's step is one frontier step
    assert passing["table"] == 4 and all(passing[f"l{i}"] == 4 for i in range(4))
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget, drift_scale=1.0))
    search = _FakeSearch()
    start = (_candidate(passing, prices, drift_scale=1.0), "start", None)
    best = _refine_plan(search, prices, (), start, passing, "layer", failing, budget)
    assert best[3]["table"] == 4 and best[0].passed and best[0].size < start[0].size
    assert any(best[3][f"l{i}"] == 3 for i in range(4))  # a small layer went narrower, the table held at 4
    assert all(a["table"] == 4 for a in search.tried)
    assert "held where the whole model failed" in search.notes[-1]

    search = _FakeSearch()  # no failed rung: the table's step, 1.8x the budget as scaled, is held without a candidate
    again = _refine_plan(search, prices, (), start, passing, "layer", None, budget)
    assert again[3] == best[3] and all(a["table"] == 4 for a in search.tried)
    assert "1 of those steps predicted to fail and not tried" in search.notes[-1]

    monkeypatch.setattr(compress_search, "FROZEN_STEPS", 0)  # without holding: stuck at the passing rung
    search = _FakeSearch()
    assert _refine_plan(search, prices, (), start, passing, "layer", failing, budget)[3] == passing
    assert not search.tried


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


def test_with_a_budget_the_ladder_stops_at_its_first_pass_and_the_ratio_guides_the_rest(monkeypatch):
    """After a rung passes, the next narrower rung is not tried for its own sake: the refinement's probe, scaled by
    the passing rung's measured/predicted ratio, goes where the budget should end (MiniLM spent 130 s failing a
    rung that its ratio put at 1.5x the budget)."""
    from onnxshrink import compress_plan

    prices, budget = _measured_prices(), 0.01
    rungs = [(a, "layer") for a in compress_plan.ladder(prices)]
    monkeypatch.setattr(compress_plan, "price_layers", lambda *a, **k: prices)
    monkeypatch.setattr(compress_plan, "finalists", lambda *a, **k: rungs)
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget))
    search = _FakeSearch()
    search.pack, search.source, search.starts = True, "model.onnx", {}
    search.config = SimpleNamespace(formats=None, calibration="cal.npz", threads=1,
                                    thresholds=SimpleNamespace(min_cosine=1.0 - budget))
    search.tick = lambda *a, **k: None
    bits, _ = compress_search.plan_phase(search)
    first = rungs[(len(rungs) - 1) // 2][0]  # the ladder's bisection starts in its middle
    assert search.tried[0] == first
    narrower = [a for a, _ in rungs if average_bits(a, prices) < average_bits(first, prices)]
    assert narrower and not any(a in search.tried for a in narrower)  # only frontier probes after the pass
    path = frontier(prices)
    truth = [0.5 * predicted_drift(a, prices) <= budget for a in path]
    narrowest = path[max(i for i, ok in enumerate(truth) if ok)]
    assert bits == average_bits(narrowest, prices) and search.starts[compress_search.PLANNED][0].passed


def test_the_drift_ratio_scales_the_layers_and_takes_the_tables_as_measured():
    from onnxshrink.compress_search import _drift_ratio, _scaled_drift

    prices = _big_item_prices()
    allocation = {"table": 3, "l0": 4, "l1": 4, "l2": 5, "l3": 8}
    tables = predicted_drift(allocation, prices, tables=True)
    layers = predicted_drift(allocation, prices, tables=False)
    assert tables == 0.0135 and abs(layers - (0.001 + 0.001 + 0.0004)) < 1e-12
    assert abs(tables + layers - predicted_drift(allocation, prices)) < 1e-12
    judged = Candidate(0, "planned", "", 1, None, None, None, 1.0 - (tables + 0.5 * layers), True, True, 1.0)
    ratio = _drift_ratio(judged, allocation, prices, "layer")
    assert abs(ratio - 0.5) < 1e-9
    assert abs(_scaled_drift(allocation, prices, "layer", ratio) - (tables + 0.5 * layers)) < 1e-12


def test_a_task_check_stricter_than_the_budget_is_bisected_not_walked(monkeypatch):
    """A task check (compress --task-check) that rejects drift over an eighth of the cosine budget: the probes aim
    between the drifts it accepted and rejected, so the narrowest allocation it accepts is found in a few tries;
    aimed at the budget alone they walk down one frontier step at a time from the rejected end."""
    robust = {3: 0.004, 4: 0.001, 5: 0.0004, 6: 0.0001, 8: 0.0}
    prices = Prices([LayerPrice(f"l{i}", 1000, {b: e * (1 + i / 4) for b, e in robust.items()}, True,
                                drift=robust[4] * (1 + i / 4)) for i in range(12)])
    budget, task_limit = 0.01, 0.01 / 8
    path = frontier(prices)
    drift = [0.5 * predicted_drift(a, prices) for a in path]
    accepted_edge = max(i for i, d in enumerate(drift) if d <= task_limit)
    rejected = next(i for i, d in enumerate(drift) if d > budget) - 1  # within the budget, rejected by the check
    assert rejected - accepted_edge >= 12  # room to tell a bisection from a walk

    def judge(search, allocation, per, prices, tables):
        search.tried.append(allocation)
        d = 0.5 * predicted_drift(allocation, prices)
        candidate = _candidate(allocation, prices, 0.5, d <= task_limit)
        if d <= budget:
            candidate.task_check = {"accepted": d <= task_limit, "detail": "", "seconds": 0.0}
        search.candidates.append(candidate)
        return candidate, f"recipe {len(search.tried)}", None

    monkeypatch.setattr(compress_search, "_try_planned", judge)
    monkeypatch.setattr(compress_search, "FROZEN_STEPS", 0)
    counts = {}
    for with_check in (True, False):
        search = _FakeSearch()
        first = _candidate(path[2], prices)  # some drift, which sets the measured/predicted ratio
        first.task_check = {"accepted": True, "detail": "", "seconds": 0.0}
        failed = _candidate(path[rejected], prices, 0.5, False)
        failed.task_check = {"accepted": False, "detail": "", "seconds": 0.0}
        search.candidates += [first, failed] if with_check else []
        if not with_check:  # the same judge, but its rejections hidden from the aim: the walk of before
            monkeypatch.setattr(compress_search, "_task_aim", lambda search, budget: budget)
        best = _refine_plan(search, prices, (), (first, "start", None), path[2], "layer", path[rejected], budget)
        assert best[3] == path[accepted_edge] and best[0].passed
        counts[with_check] = len(search.tried)
    assert 2 * counts[True] < counts[False], counts  # measured: 6 tries against 20


def test_a_probe_that_fails_by_a_hair_rescales_the_next_one(monkeypatch):
    """The passing rung's ratio understates the drift near the edge (here the whole model drifts 0.7x the plan's
    prediction, the start measured 0.5x): each probe aimed with it fails just past the budget. Retaken from the
    failed probe, the ratio puts the next one at the edge; kept, the probes walk one frontier step at a time."""
    robust = {3: 0.004, 4: 0.001, 5: 0.0004, 6: 0.0001, 8: 0.0}
    prices = Prices([LayerPrice(f"l{i}", 1000, {b: e * (1 + i / 4) for b, e in robust.items()}, True,
                                drift=robust[4] * (1 + i / 4)) for i in range(40)])
    budget = 0.02
    path = frontier(prices)
    narrowest = max(i for i, a in enumerate(path) if 0.7 * predicted_drift(a, prices) <= budget)
    failing = next(i for i, a in enumerate(path) if 0.5 * predicted_drift(a, prices) > 2 * budget)
    monkeypatch.setattr(compress_search, "_try_planned", _judge(budget, drift_scale=0.7))
    monkeypatch.setattr(compress_search, "FROZEN_STEPS", 0)
    real = compress_search._drift_ratio
    counts = {}
    for retaken in (True, False):
        if not retaken:  # the ratio of passing candidates only: the walk of before
            monkeypatch.setattr(compress_search, "_drift_ratio",
                                lambda c, a, p, per: real(c, a, p, per) if c.passed else None)
        search = _FakeSearch()
        best = _refine_plan(search, prices, (), (_candidate(path[2], prices, 0.5), "start", None), path[2], "layer",
                            path[failing], budget)
        assert best[3] == path[narrowest] and best[0].passed
        counts[retaken] = len(search.tried)
    assert 2 * counts[True] < counts[False], counts  # measured: 3 tries against 11
