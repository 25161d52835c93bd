"""Never slower by default: quantize measures what it wrote against the original and folds the layers that cost time.

An integer kernel does not always beat fp32: quantizing an activation at run time costs a few microseconds a
layer, MatMulNBits loses to fp32 on some shapes and row counts, a QDQ layer alone between float ops pays its Q/DQ.
The thresholds the passes use (integer_min_macs, integer_below) were measured on one CPU; this guard measures the
model itself, on the machine that runs the command:

1. time the candidate against the original, alternating runs (validate.measure_latency), at batch 1 and, when the
   batch dimension is symbolic, at batch 8; "slower" is report.latency_slower's rule (beyond the runs' p90 - p50
   spread and 2% of p50) or, since a shared machine's stalls widen that spread past any real difference, a sign
   test on the alternating pairs (the candidate slower in more pairs than chance allows, by 2% of p50); and by
   more than 50 us a run (min_difference_ms: below that, on models that fast, the
   difference is the timer's noise);
2. if it is slower at some batch, profile both models there (onnxruntime's profiler, per-node kernel times) and
   charge each node to the layer whose weight it reads (a fused node reads the layer's int8 / 4-bit weight, whose
   name starts with the original weight's), plus the quantizers that feed only that layer and the node right after
   it (DynamicQuantizeLinear, QuantizeLinear, DequantizeLinear, an unfused Relu);
3. rank the quantized layers by excess (candidate's time minus the original's for the same layer) and move them,
   slowest excess first, to the folded form (int8 storage, float kernel; passes/folded_weights.py), or to float
   where the model's opset cannot take it: the pass runs again with the layers in its config's `fold` globs, and
   the result is timed again. One layer per step for the first four, then the count doubles, until the candidate
   is no slower, every ranked layer has moved, `max_attempts` pass runs or `time_budget_s` are spent;
4. if it is still slower (or the profile blamed no single layer), whole-model forms, cheapest first (`forms`):
   every layer folded in the same mode (int8 storage, float kernels: the file stays small, the speed is fp32's),
   then, for static mode, the dynamic-mode result. The first that is no slower is returned: a later form costs
   more time and more accuracy risk, and between two forms that are both no slower the difference is mostly the
   timer's noise. Each form is judged first with the accuracy fallback's budget and held-out samples (`judge`)
   and dropped when it misses; a lossy form (dynamic) is not tried when there is nothing to judge it on.
   When nothing measured is no slower, the fastest model measured is returned (the first result included).

The QDQ chains of small Convs are why step 4 exists: on the PP-OCR classifier the slowdown is the Q/DQ pairs
between many small layers, not one kernel, and folding single layers out of the chain only adds Q/DQ around them.

Cost: one timed pair per batch (budget_s each, 1 s by default) when the model is no slower, which is the usual
case; otherwise two profiles per batch and one pass run plus one timed pair per step, and one pass run, one
held-out judgement and one timed pair per whole-model form. Layers the accuracy fallback kept float stay float
(the pass is run again with them excluded). The measurement is injectable (`measure`), so tests decide what is
slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxshrink.errors import InputsUnavailable
from onnxshrink.passes.common import glob_literal
from onnxshrink.passes.folded_weights import FOLD_REQUESTED, FOLDED
from onnxshrink.report import LATENCY_NOISE_FLOOR, latency_slower
from onnxshrink.runtime import make_session, session_options
from onnxshrink.scratch import scratch_dir

MOVABLE_OPS = ("MatMul", "Gemm", "Conv")  # what the passes' `fold` can rewrite
ONE_BY_ONE = 4  # steps that move one more layer each; after them the count moved doubles per step


@dataclass
class GuardConfig:
    budget_s: float = 1.0  # alternating timed runs per batch and step (validate.measure_latency's budget)
    large_batch: int = 8  # the second batch measured when the model's batch dimension is symbolic
    profile_runs: int = 10  # profiled runs per model and batch; the median time of each node counts
    max_attempts: int = 6  # pass runs after the first
    time_budget_s: float = 120.0  # no new step starts after this (a big model's pass can take a while)
    # A candidate slower by less than this a run is left alone, whatever the ratio: on models that fast (tens of
    # microseconds) the difference is the timer's noise and worth less than the smaller file.
    min_difference_ms: float = 0.05


@dataclass
class GuardSummary:
    """What the guard measured and moved, for the command's report (`latency_guard` in the JSON)."""

    batches: list = field(default_factory=list)
    before: dict = field(default_factory=dict)  # batch -> {"ratio", "original_ms", "candidate_ms", "slower"}
    after: dict = field(default_factory=dict)  # the same for the model returned
    slower_before: bool = False
    slower_after: bool = False
    layers: list = field(default_factory=list)  # {"node", "to", "batch", "excess_us", "candidate_us", "original_us", "reason"}
    ranked: int = 0  # quantized layers the profile found slower than their float originals
    attempts: int = 0  # pass runs after the first
    stopped: str = ""
    seconds: float = 0.0
    # Which model was returned: "first" (as the pass wrote it), "layers" (single layers moved), or a whole-model
    # form ("folded", "dynamic"); and each whole-model form tried:
    # {"form", "after", "slower", "accuracy", "drift", "outcome"} (see WholeForm).
    form: str = "first"
    forms: list = field(default_factory=list)


@dataclass
class WholeForm:
    """A whole-model alternative the guard tries when moving single layers leaves the model slower."""

    name: str  # "folded", "dynamic": the report's `form`
    build: object  # fresh copy of the original -> (model, PassReport)
    what: str  # words for the notes and reasons: "every layer folded (int8 storage, float kernels)"
    lossy: bool = False  # may miss the accuracy budget: not tried without held-out samples to judge it on


@dataclass
class _Best:
    worst: float  # the largest candidate / original ratio over the batches
    model: onnx.ModelProto
    report: object
    latency: dict
    moved: list
    form: str
    why: str = ""  # a whole-model form returned as the fastest though slower: why, for its layers' reasons


class LatencyGuard:
    """A quantize pass (or the accuracy fallback around it) wrapped in the guard; called like the pass.

    `first(model)` gives the candidate; `rebuild(fold, model)` runs the pass again on a fresh copy of the original
    with the node-name globs in `fold` folded; `measure(original)` gives the measurement (OrtMeasure, or a fake in
    tests), and raises InputsUnavailable when no input runs the model (then the guard only says so). `forms`: the
    whole-model forms (WholeForm) tried, in order, when single layers do not help; `judge(model) -> (passed,
    drift)`: the accuracy fallback's verdict on held-out samples, or None when nothing judges."""

    def __init__(self, first, rebuild, measure, config: GuardConfig | None = None, forms=(), judge=None):
        self.first = first
        self.rebuild = rebuild
        self.measure = measure
        self.config = config or GuardConfig()
        self.forms = list(forms)
        self.judge = judge
        self.summary = GuardSummary()
        self.skipped: str | None = None  # why the guard did not measure ("" when the pass changed nothing)

    def __call__(self, model: onnx.ModelProto):
        original = _copy(model)
        result, report = self.first(model)
        if not report.changed:  # nothing to measure (the command says it changed nothing)
            self.skipped = ""
            return result, report
        start = time.perf_counter()
        try:
            measure = self.measure(original)
        except InputsUnavailable as exc:
            self.skipped = f"no input runs the model ({exc})"
            return result, report
        summary, config = self.summary, self.config
        latency = measure.latency(result)
        summary.batches = sorted(latency)
        summary.before = summary.after = _ratios(latency, config.min_difference_ms)
        summary.slower_before = summary.slower_after = self._slower(latency)
        if not summary.slower_before:
            summary.stopped = "no slower than the original: nothing to move"
            summary.seconds = time.perf_counter() - start
            return result, report
        batch = max((b for b in latency if _slower_at(latency[b], config.min_difference_ms)), key=lambda b: latency[b]["ratio"] or 0.0)
        ranking = self._rank(measure, original, result, report, batch)
        summary.ranked = len(ranking)
        first_report = report
        best = _Best(_worst(latency), result, report, latency, [], "first")
        counts = _schedule(len(ranking))
        if len(counts) > config.max_attempts:  # the last step allowed moves every ranked layer
            counts = counts[: max(config.max_attempts - 1, 0)] + [len(ranking)] if config.max_attempts else []
            summary.stopped = f"step cap ({config.max_attempts} pass runs): the last one moved every ranked layer"
        for count in counts:
            if time.perf_counter() - start > config.time_budget_s:
                summary.stopped = f"time budget spent ({config.time_budget_s:g} s)"
                break
            moved = [entry["node"] for entry in ranking[:count]]
            summary.attempts += 1
            candidate, candidate_report = self.rebuild(tuple(glob_literal(n) for n in moved), _copy(original))
            _carry_over(first_report, candidate_report)
            timed = measure.latency(candidate)
            if not self._slower(timed):
                best = _Best(_worst(timed), candidate, candidate_report, timed, moved, "layers")
                summary.stopped = f"no slower than the original after moving {len(moved)} layer(s)"
                break
            if _worst(timed) < best.worst:
                best = _Best(_worst(timed), candidate, candidate_report, timed, moved, "layers")
        else:
            summary.stopped = summary.stopped or (
                "every layer measured slower than its float original was moved, and the model is still slower: the "
                "rest of the difference is outside the quantized layers" if ranking else
                "no quantized layer measured slower than its float original: the difference is outside them")
        if self._slower(best.latency) and self.forms:
            best = self._whole_forms(measure, original, first_report, best, start)
        elif best.moved and summary.stopped.startswith(("step cap", "time budget", "every layer")):
            summary.stopped += f"; the fastest model measured is the one returned ({len(best.moved)} layer(s) moved)"
        summary.form = best.form
        summary.after = _ratios(best.latency, config.min_difference_ms)
        summary.slower_after = self._slower(best.latency)
        summary.layers = self._annotate(best.report, [entry for entry in ranking if entry["node"] in best.moved])
        summary.seconds = time.perf_counter() - start
        return best.model, best.report

    def _whole_forms(self, measure, original, first_report, best: _Best, start: float) -> _Best:
        """Step 4: the whole-model forms, cheapest first; the first no slower (and within the accuracy budget) is
        returned, else the fastest model measured. `summary.forms` says what each one measured and why it was
        taken or not."""
        summary, config = self.summary, self.config
        layers_said = summary.stopped
        single = _say_ratios(best.latency)  # the best of the first result and the single-layer moves
        for form in self.forms:
            entry = {"form": form.name, "after": {}, "slower": None, "accuracy": "not judged", "drift": None,
                     "outcome": ""}
            summary.forms.append(entry)
            if time.perf_counter() - start > config.time_budget_s:
                entry["outcome"] = f"not tried: time budget spent ({config.time_budget_s:g} s)"
                continue
            if form.lossy and self.judge is None:
                entry["outcome"] = ("not tried: no accuracy budget and held-out samples to judge it on (it may "
                                    "lose accuracy; --calibration with held-out samples, or --data, give them)")
                continue
            summary.attempts += 1
            candidate, candidate_report = form.build(_copy(original))
            _carry_over(first_report, candidate_report)
            if _decisions(candidate_report) == _decisions(first_report):  # e.g. dynamic mode's Convs, folded already
                entry["outcome"] = "not tried: it writes the same layers as the first result"
                continue
            if self.judge is not None:
                passed, drift = self.judge(candidate)
                entry["accuracy"], entry["drift"] = ("passed" if passed else "failed"), float(drift)
                if not passed:
                    entry["outcome"] = f"rejected: misses the accuracy budget on the held-out samples (drift {drift:.4g})"
                    continue
            timed = measure.latency(candidate)
            entry["after"] = _ratios(timed, config.min_difference_ms)
            entry["slower"] = self._slower(timed)
            if not entry["slower"]:
                entry["outcome"] = "chosen: no slower than the original"
                why = (f"single layers left the model slower ({single}); {form.what} measured {_say_ratios(timed)}, "
                       "no slower than the original")
                _annotate_form(candidate_report, form.name, why)
                summary.stopped = f"{layers_said}; then whole model {form.name}: {why}"
                return _Best(_worst(timed), candidate, candidate_report, timed, [], form.name)
            entry["outcome"] = "still slower than the original"
            if _worst(timed) < best.worst:
                why = (f"nothing measured was no slower than the original; {form.what} was the fastest "
                       f"({_say_ratios(timed)}; single layers: {single})")
                best = _Best(_worst(timed), candidate, candidate_report, timed, [], form.name, why)
        tried = ", ".join(f"{e['form']} {e['outcome']}" for e in summary.forms)
        returned = {"first": "the first result", "layers": f"{len(best.moved)} layer(s) moved"}.get(
            best.form, f"whole model {best.form}")
        summary.stopped = (f"{layers_said}; then no whole-model form was no slower ({tried}); the fastest model "
                           f"measured is the one returned ({returned}: {_say_ratios(best.latency)})")
        for entry in summary.forms:
            if entry["form"] == best.form:
                entry["outcome"] += "; the fastest measured: returned"
        if best.form not in ("first", "layers"):
            _annotate_form(best.report, best.form, best.why)
        return best

    def _slower(self, latency: dict) -> bool:
        return any(_slower_at(v, self.config.min_difference_ms) for v in latency.values())

    def _rank(self, measure, original, result, report, batch: int) -> list[dict]:
        """The layers running quantized kernels whose profiled time exceeds their float original's, largest first."""
        layers = {d.node: d.weight for d in report.layers if _movable(d)}
        if not layers:
            return []
        before = measure.layer_times(original, batch, layers)
        after = measure.layer_times(result, batch, layers)
        ranking = [{"node": node, "batch": batch, "candidate_us": after.get(node, 0.0),
                    "original_us": before.get(node, 0.0)} for node in layers]
        for entry in ranking:
            entry["excess_us"] = entry["candidate_us"] - entry["original_us"]
        return sorted((e for e in ranking if e["excess_us"] > 0), key=lambda e: -e["excess_us"])

    def _annotate(self, report, moved: list[dict]) -> list[dict]:
        """Each moved layer's decision says where it went and what was measured."""
        decisions = {d.node: d for d in report.layers}
        entries = []
        for entry in moved:
            decision = decisions.get(entry["node"])
            folded = decision is not None and decision.action.startswith(FOLDED)
            measured = (f"its quantized kernel measured {entry['excess_us']:.3g} us slower than the float original's at "
                        f"batch {entry['batch']} ({entry['candidate_us']:.3g} vs {entry['original_us']:.3g} us a run)")
            where = "folded (int8 storage, float kernel)" if folded else "float"
            reason = f"latency guard: moved to {where}: {measured}"
            if decision is not None:
                if not folded and decision.reason:
                    reason += f"; {decision.reason}"
                decision.reason = reason
            entries.append({**entry, "to": "folded" if folded else "float", "reason": reason})
        return entries

    def note(self) -> str:
        """One line for the command's notes ("" when there is nothing to say)."""
        s = self.summary
        if self.skipped is not None:
            return f"latency guard did not run: {self.skipped}" if self.skipped else ""
        ratios = lambda table: ", ".join(f"{v['ratio']:.2f}x at batch {b}" for b, v in table.items() if v["ratio"])  # noqa: E731
        if not s.slower_before:
            return f"latency guard: no slower than the original ({ratios(s.before)}); nothing moved ({s.seconds:.1f} s)"
        names = ", ".join(e["node"] for e in s.layers[:5]) + (f" and {len(s.layers) - 5} more" if len(s.layers) > 5 else "")
        moved = f"moved {len(s.layers)} layer(s) to folded/float ({names})" if s.layers else "moved nothing"
        forms = "; ".join(f"{e['form']}: {e['outcome']}" for e in s.forms)
        if s.form not in ("first", "layers"):
            moved = f"returned the whole model {s.form} ({forms})"
        elif s.forms:
            moved += f"; whole-model forms: {forms}"
        verdict = "no slower now" if not s.slower_after else "still slower"
        return (f"latency guard: slower than the original ({ratios(s.before)}); {moved}: {ratios(s.after)}, {verdict}; "
                f"{s.stopped} ({s.attempts} pass run(s), {s.seconds:.1f} s; --allow-slower keeps the first result)")


def _annotate_form(report, form: str, why: str) -> None:
    """Every quantized layer of a whole-model form says the guard chose it, and why (its own reason after)."""
    for decision in report.layers:
        if decision.action.startswith("int"):
            own = decision.reason if decision.reason and decision.reason != FOLD_REQUESTED else ""
            decision.reason = f"latency guard: whole model {form}: {why}" + (f"; {own}" if own else "")
    report.notes.append(f"latency guard: whole model {form}: {why}")


def _decisions(report) -> list:
    return [(d.node, d.action) for d in report.layers]


def _say_ratios(latency: dict) -> str:
    return ", ".join(f"{v['ratio']:.2f}x at batch {b}" for b, v in sorted(latency.items()) if v.get("ratio"))


def _carry_over(first, rebuilt) -> None:
    """The rebuild excludes the layers the accuracy fallback kept float: they keep the fallback's reason (not
    "excluded"), and the fallback's note stays."""
    kept = {d.node: d.reason for d in first.layers if d.action == "kept float"}
    for decision in rebuilt.layers:
        if decision.action == "kept float" and decision.reason == "excluded (--exclude)" and decision.node in kept:
            decision.reason = kept[decision.node]
    rebuilt.notes.extend(n for n in first.notes if n.startswith("accuracy fallback") and n not in rebuilt.notes)


def _movable(decision) -> bool:
    """A layer the pass gave a quantized kernel (integer, MatMulNBits, QDQ): folding it can change its speed."""
    return (decision.op_type in MOVABLE_OPS and bool(decision.node) and decision.action.startswith("int")
            and not decision.action.startswith(FOLDED) and "weight-only" not in decision.action)


def _schedule(n: int) -> list[int]:
    """How many ranked layers each step moves: 1, 2, 3, 4, then doubling, ending with all n."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k = k + 1 if k < ONE_BY_ONE else k * 2
    return counts + [n] if n else []


def _slower_at(timing: dict, floor_ms: float) -> bool:
    """Slower by more than `floor_ms` a run, and either by report.latency_slower's rule (beyond the runs' p90 - p50
    spread and 2% of p50) or, with alternating pairs, by 2% of p50 where the candidate ran slower in more pairs than
    chance allows (sign test, two standard deviations: n/2 + sqrt(n))."""
    if timing["candidate"]["p50"] - timing["original"]["p50"] <= floor_ms:
        return False
    if latency_slower(timing):
        return True
    pairs, slower = timing.get("pairs") or 0, timing.get("candidate_slower") or 0
    return (pairs >= 10 and slower > pairs / 2 + pairs ** 0.5
            and timing["candidate"]["p50"] > (1 + LATENCY_NOISE_FLOOR) * timing["original"]["p50"])


def _worst(latency: dict) -> float:
    return max((v.get("ratio") or 0.0 for v in latency.values()), default=0.0)


def _ratios(latency: dict, floor_ms: float) -> dict:
    return {b: {"ratio": v.get("ratio"), "original_ms": v["original"]["p50"], "candidate_ms": v["candidate"]["p50"],
                "slower": _slower_at(v, floor_ms)} for b, v in sorted(latency.items())}


# ---- the real measurement ---------------------------------------------------------------------------------


class OrtMeasure:
    """onnxruntime's measurement: alternating timed runs (validate.measure_latency) and per-node profiles."""

    def __init__(self, original: onnx.ModelProto, feeds: dict, threads: int = 1, config: GuardConfig | None = None):
        self.feeds = feeds  # batch -> inputs
        self.threads = threads
        self.config = config or GuardConfig()
        self._original = make_session(original, threads)

    def latency(self, candidate: onnx.ModelProto) -> dict:
        """batch -> measure_latency's dict (original vs candidate, p50/p90 ms, ratio), plus "pairs" and
        "candidate_slower" (in how many of the alternating pairs the candidate ran slower: _slower_at's sign test)."""
        session = make_session(candidate, self.threads)
        return {batch: timed_pairs(self._original, session, feed, self.config.budget_s, batch, self.threads)
                for batch, feed in self.feeds.items()}

    def layer_times(self, model: onnx.ModelProto, batch: int, weights: dict) -> dict:
        """layer node -> microseconds a run, from onnxruntime's profiler; `weights`: layer node -> original weight."""
        times, optimized = profile(model, self.feeds[batch], self.threads, self.config.profile_runs)
        return charge_layers(optimized, times, weights)


def timed_pairs(original, candidate, feed: dict, budget_s: float, batch: int, threads: int, warmup: int = 3,
                min_pairs: int = 10, max_pairs: int = 500) -> dict:
    """validate.measure_latency's alternating runs, keeping each pair: a shared machine's stalls hit single runs
    (p90 13x p50 was seen), so the spread rule alone hides a steady 10%; the pairs' sign test does not."""
    for session in (original, candidate):
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list] = [[], []]
    start = time.perf_counter()
    while len(times[0]) < max_pairs and (len(times[0]) < min_pairs or time.perf_counter() - start < budget_s):
        for i, session in enumerate((original, candidate)):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1000.0)
    summary = [{"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))} for t in times]
    return {"original": summary[0], "candidate": summary[1],
            "ratio": summary[1]["p50"] / summary[0]["p50"] if summary[0]["p50"] > 0 else None,
            "runs": len(times[0]), "batch": int(batch), "threads": threads,
            "pairs": len(times[0]), "candidate_slower": int(sum(c > o for o, c in zip(*times)))}


def profile(model: onnx.ModelProto, feed: dict, threads: int = 1, runs: int = 10) -> tuple[dict, onnx.ModelProto]:
    """(node name -> median kernel microseconds over `runs` runs, the graph onnxruntime ran), from one session
    with profiling on whose optimized graph is saved too: the profile's names are that graph's."""
    import onnxruntime as ort

    with scratch_dir("profile") as folder:
        options = session_options(threads, True, os.path.join(folder, "optimized.onnx"))
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(2):  # warm-up, discarded below by taking runs from the end
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        path = session.end_profiling()
        with open(path) as handle:
            events = json.load(handle)
        optimized = onnx.load(os.path.join(folder, "optimized.onnx"), load_external_data=False)
    durations: dict[str, list] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            durations.setdefault(event["name"][: -len("_kernel_time")], []).append(float(event.get("dur", 0.0)))
    return {name: statistics.median(values[-runs:]) for name, values in durations.items()}, optimized


def charge_layers(optimized: onnx.ModelProto, times: dict, weights: dict) -> dict:
    """layer -> the time of the nodes charged to it in the graph onnxruntime ran (a node charged to k layers gives
    each 1/k): the nodes reading its weight (an initializer named as the original weight, or starting with its name
    and "_": the pass's int8/4-bit copies, their folded decoding); then a node whose computed inputs all come from
    them (DequantizeLinear, an unfused Relu); then, two rounds, a node whose outputs only charged nodes read
    (quantizers, and what feeds only them). The same rules on both models: what both run cancels. A node that reads no weight but names a layer (onnxruntime keeps a fused node's name) counts
    for that layer."""
    by_weight: dict[str, list] = {}
    for layer, weight in weights.items():
        by_weight.setdefault(weight, []).append(layer)
    ordered = sorted(by_weight, key=len, reverse=True)
    graph = optimized.graph
    constants = {t.name for t in graph.initializer}
    owner: dict[str, frozenset] = {}
    for index, node in enumerate(graph.node):
        key = node.name or f"#{index}"
        found = set()
        for name in node.input:
            if name in constants:
                weight = next((w for w in ordered if name == w or name.startswith(w + "_")), None)
                if weight is not None:
                    found.update(by_weight[weight])
        if not found:
            named = [layer for layer in weights if layer and layer in node.name]
            if named:
                found.add(max(named, key=len))
        if found:
            owner[key] = frozenset(found)
    keys = [node.name or f"#{index}" for index, node in enumerate(graph.node)]
    readers: dict[str, list] = {}
    producer: dict[str, str] = {}
    for key, node in zip(keys, graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(key)
        for name in node.output:
            producer[name] = key
    after = {}
    for key, node in zip(keys, graph.node):  # the node right after a charged one (DequantizeLinear, an unfused Relu)
        computed = [producer.get(i) for i in node.input if i and i not in constants]
        if key not in owner and computed and all(p is not None and p in owner for p in computed):
            after[key] = frozenset().union(*(owner[p] for p in computed))
    owner.update(after)
    outputs = {o.name for o in graph.output}
    for _ in range(2):  # quantizers feeding only charged nodes (DynamicQuantizeLinear, QuantizeLinear, a smoothing Mul)
        added = {}
        for key, node in zip(keys, graph.node):
            read = [r for o in node.output for r in readers.get(o, [])]
            if key not in owner and read and not any(o in outputs for o in node.output) and all(r in owner for r in read):
                added[key] = frozenset().union(*(owner[r] for r in read))
        if not added:
            break
        owner.update(added)
    charged = {layer: 0.0 for layer in weights}
    for key, layers in owner.items():
        for layer in layers:
            charged[layer] += times.get(key, 0.0) / len(layers)
    return charged


def measurement_for(model: onnx.ModelProto, validation, calibration, threads: int = 1,
                    config: GuardConfig | None = None) -> OrtMeasure:
    """An OrtMeasure on the inputs validation judges on (--data, held-out calibration samples, else synthesized as
    validate synthesizes them): one sample, and `large_batch` copies of it when the batch dimension is symbolic.
    Raises InputsUnavailable when the original does not run on them."""
    from onnxshrink import data as data_mod
    from onnxshrink.runtime import short_error
    from onnxshrink.validate import ValidateConfig, _dataset, feed_batch, latency_feed

    config = config or GuardConfig()
    validation = validation or ValidateConfig(threads=threads)
    if calibration is not None and not validation.data:
        validation = dataclasses.replace(validation, calibration=str(calibration))
    specs = data_mod.input_specs(model)
    session = make_session(model, threads)
    dataset, _ = _dataset(validation, specs, model, session)
    feed = latency_feed(dataset, specs)
    try:
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's run errors carry no common type
        raise InputsUnavailable(short_error(exc)) from exc
    feeds = {feed_batch(feed, specs): feed}
    dynamic = [s.name for s in specs if s.dynamic_batch and s.name in feed and feed[s.name].ndim > 0]
    if dynamic and config.large_batch not in feeds:
        axes = dataset.batch_axes or {name: 0 for name in dynamic}
        large = {n: (np.repeat(a, config.large_batch, axis=axes[n]) if n in axes else a) for n, a in feed.items()}
        try:
            session.run(None, large)
            feeds[config.large_batch] = large
        except Exception:  # noqa: BLE001 - a model that runs only at batch 1 is measured there alone
            pass
    return OrtMeasure(model, feeds, threads, config)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
