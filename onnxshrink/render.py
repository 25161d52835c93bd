"""Rich rendering of reports. The only rich user besides cli.py; it reads reports, never models.

By default a command answers in a few lines that end with its headline (how much smaller, how accurate, how fast,
against the original model); the per-layer, per-output and per-candidate tables are for `--verbose`."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from onnxshrink.report import CommandReport, ModelInfo, ValidationReport, latency_slower


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def _note(console: Console, note: str) -> None:
    """A report's note: `warning: ...` and `no change: ...` keep their own word, the rest are notes."""
    for word in ("warning:", "no change:"):
        if note.startswith(word):
            console.print(f"[yellow]{word}[/]{escape(note[len(word):])}", highlight=False)
            return
    console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return escape("[" + ", ".join("?" if d is None else str(d) for d in shape) + "]")


# ---- the headline: units people think in -----------------------------------------------------------------------

def times_smaller(before: float | None, after: float | None, against: str = "") -> str | None:
    """`18.1x smaller than the original (199.0 KiB → 11.0 KiB)`, or `1.02x larger ...`: read without arithmetic."""
    if not before or not after:
        return None
    sizes = f"({human_bytes(before)} → {human_bytes(after)})"
    if after < before:
        return f"{before / after:.1f}x smaller{against} {sizes}"
    if after > before:
        return f"{after / before:.2f}x larger{against} {sizes}"
    return f"same size{against.replace(' than ', ' as ')} {sizes}"


def _drift_words(report: ValidationReport) -> str | None:
    """Without labels: the worst output's cosine and top-1 agreement, on how many samples of what."""
    if not report.outputs:
        return None
    cosine = min((d.cosine for d in report.outputs.values() if d.cosine is not None), default=None)
    agree = [d.top1_agreement for d in report.outputs.values() if d.top1_agreement is not None]
    parts = [f"cosine {cosine:.6g}" if cosine is not None else None,
             f"top-1 agreement {min(agree):.1%}" if agree else None]
    source = "synthetic" if report.synthetic_inputs else "given"
    return ", ".join(p for p in parts if p) + f" ({report.samples} {source} samples)"


def validation_words(report: ValidationReport | None) -> list[str]:
    """Accuracy (or drift) and latency of a validated candidate, as headline parts."""
    if report is None or not getattr(report, "validated", True):
        return []
    parts = []
    if report.accuracy:
        acc = report.accuracy
        points = (acc["candidate"] - acc["original"]) * 100
        sign = "−" if round(points, 1) < 0 else "+"  # a minus sign, not a hyphen
        parts.append(f"accuracy {acc['original']:.2%} → {acc['candidate']:.2%} ({sign}{abs(points):.1f} pt, "
                     f"{report.samples} held-out samples)")
    else:
        drift = _drift_words(report)
        if drift:
            parts.append(drift)
    lat = report.latency_ms
    if lat and lat.get("ratio") is not None:
        noise = " (noise)" if lat["ratio"] > 1 and latency_slower(lat) is False else ""
        parts.append(f"latency {lat['ratio']:.2f}x{noise}")
    return parts


def headline(output: str | None, before, after, validation: ValidationReport | None = None,
             against: str = "") -> str:
    """The last line of a command: what was written and how it compares (`against` names the reference)."""
    size = times_smaller(before, after, against)
    parts = ([f"wrote [bold]{escape(output)}[/]"] if output else []) + \
            ([escape(size)] if size else []) + [escape(p) for p in validation_words(validation)]
    return " · ".join(parts)


def _fits(console: Console, table: Table) -> Table:
    """Detail tables without vertical rules, so their text columns get the width an 80-column terminal has."""
    table.box = box.SIMPLE_HEAD
    table.pad_edge = False
    table.collapse_padding = True
    table.expand = False
    return table


def render_info(console: Console, info: ModelInfo, show_all: bool = False) -> None:
    console.print(f"[bold]{escape(info.path)}[/]  {human_bytes(info.file_bytes)}  IR {info.ir_version}  "
                  f"opsets {', '.join(f'{d} {v}' for d, v in info.opsets.items())}"
                  + (f"  producer {escape(info.producer)}" if info.producer else ""))
    io = Table(title="Inputs and outputs", title_justify="left")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind, items in (("input", info.inputs), ("output", info.outputs)):
        for item in items:
            io.add_row(kind, escape(item.name), item.dtype, _shape(item.shape))
    console.print(io)
    ops = Table(title=f"Operators ({info.node_count} nodes)", title_justify="left", min_width=28)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info.op_histogram.items():
        ops.add_row(escape(op), str(count))
    console.print(ops)
    tensors = Table(title="Constant tensors", title_justify="left")
    for col in ("name", "shape", "dtype", "bytes", "where", "consumers", "compress?"):
        tensors.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    shown = sorted(info.tensors, key=lambda t: -t.nbytes)
    limit = None if show_all else 40
    for t in shown[:limit]:
        consumers = ", ".join(f"{c.node} #{c.input_index} {c.role}" for c in t.consumers[:3])
        if len(t.consumers) > 3:
            consumers += f" +{len(t.consumers) - 3}"
        verdict = ("[green]yes[/] " if t.compressible else "[dim]no[/] ") + escape(t.reason)
        tensors.add_row(escape(t.name), _shape(t.shape), t.dtype, human_bytes(t.nbytes), escape(t.location), escape(consumers), verdict)
    console.print(tensors)
    if limit and len(shown) > limit:
        console.print(f"[dim]{len(shown) - limit} smaller tensors not shown (--all shows every tensor)[/]")
    tot = info.totals
    console.print(
        f"{tot['tensors']} tensors, {human_bytes(tot['tensor_bytes'])}, {tot['parameters']:,} parameters; "
        f"[bold]{tot['weights']} compressible weights, {human_bytes(tot['weight_bytes'])}[/]"
        f" ({tot['in_constant_nodes']} in Constant nodes, {tot['in_subgraphs']} in subgraphs, {tot['tied_weights']} tied)"
    )
    if tot.get("denormal_weights"):
        console.print(f"[yellow]note:[/] {tot['denormal_weights']:,} fp32 weights are denormal (nonzero, below 1.2e-38): "
                      "CPUs compute with them many times slower, and they are too small to matter: "
                      "`onnxshrink flush-denormals` zeroes them")


def _verdict(console: Console, report: ValidationReport) -> None:
    """The checks, the validation's notes and its one-word verdict: what every run shows, verbose or not."""
    if not getattr(report, "validated", True):  # nothing was measured: say so, and why, instead of figures
        console.print(f"validation [yellow]NOT RUN[/]: {escape(report.reason or '')}", highlight=False)
        return
    for check in report.checks:
        mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        if check.name == "task_check":
            console.print(f"  {mark} task check: {escape(check.detail or 'no output')}", highlight=False)
            continue
        if check.name.startswith("finite[") and check.detail:
            console.print(f"  {mark} {escape(check.detail)}", highlight=False)
            continue
        console.print(f"  {mark} {escape(check.name)}: {_num(check.value)} (threshold {check.threshold:g})")
    for note in report.notes:
        _note(console, note)
    if not report.checks:  # nothing was gated: PASSED would claim a judgement nobody asked for
        console.print("validation [yellow]not gated[/] (no thresholds given: the figures are not judged)", highlight=False)
    else:
        console.print(f"validation {'[green]PASSED[/]' if report.passed else '[red]FAILED[/]'}")


def _validation_tables(console: Console, report: ValidationReport) -> None:
    """--verbose: drift per output, then size, latency and accuracy side by side."""
    inputs = "synthetic inputs" if report.synthetic_inputs else "given data"
    table = _fits(console, Table(title=escape(f"Validation: {report.candidate} vs {report.original} ({report.samples} "
                                              f"samples, {inputs})"), title_justify="left"))
    for col in ("output", "max abs", "mean rel", "cosine", "cosine min", "top-1"):
        table.add_column(col, justify="left" if col == "output" else "right", overflow="fold")
    for name, d in report.outputs.items():
        table.add_row(escape(name), _num(d.max_abs), _num(d.mean_rel), _num(d.cosine, 6), _num(d.cosine_min, 6), _num(d.top1_agreement))
    console.print(table)
    summary = _fits(console, Table(show_header=True))
    for col in ("", "original", "candidate", "ratio"):
        summary.add_column(col, justify="left" if not col else "right")
    ratio = report.size["ratio"]
    summary.add_row("size", human_bytes(report.size["original"]), human_bytes(report.size["candidate"]), f"{ratio:.3f}")
    if report.latency_ms:
        lat = report.latency_ms
        summary.add_row(
            f"p50 ms (batch {lat['batch']}, {lat['threads']} thr.)",
            f"{lat['original']['p50']:.4g}", f"{lat['candidate']['p50']:.4g}",
            ("-" if lat["ratio"] is None else f"{lat['ratio']:.3f}")
            + (" (noise)" if (lat["ratio"] or 0) > 1 and latency_slower(lat) is False else ""))
        summary.add_row("p90 ms", f"{lat['original']['p90']:.4g}", f"{lat['candidate']['p90']:.4g}", "")
    if report.accuracy:
        acc = report.accuracy
        summary.add_row("accuracy", f"{acc['original']:.4f}", f"{acc['candidate']:.4f}", f"drop {acc['original'] - acc['candidate']:+.4f}")
    console.print(summary)


def render_validation(console: Console, report: ValidationReport, verbose: bool = False) -> None:
    """`validate`: the verdict, then the headline (size, accuracy or drift, latency of the candidate vs the original)."""
    if verbose and getattr(report, "validated", True):
        _validation_tables(console, report)
    _verdict(console, report)
    if getattr(report, "validated", True):
        console.print(headline(None, report.size.get("original"), report.size.get("candidate"), report,
                               against=" than the original"), highlight=False)


_PER_LAYER_FIGURES = re.compile(r" \d+(\.\d+)?%| \d+/\d+")  # "pruned 71.7%", "removed 3/64 channels": grouped


def _is_change(action: str) -> bool:
    return not action.startswith("kept")


def pass_summary(pass_report) -> str:
    """One line per pass: how many layers changed into what, how many were kept (-v lists each with its reason)."""
    layers = pass_report.layers
    changed = [layer for layer in layers if _is_change(layer.action)]
    if not layers:
        return f"{pass_report.name}: no layers"
    actions = Counter(_PER_LAYER_FIGURES.sub("", layer.action) for layer in changed)
    shown = ", ".join(f"{action} x{count}" for action, count in actions.most_common(3))
    if len(actions) > 3:
        shown += f", {len(actions) - 3} other kinds"
    before = sum(layer.bytes_before for layer in changed if layer.bytes_before)
    after = sum(layer.bytes_after for layer in changed if layer.bytes_before)
    weights = f", weights {human_bytes(before)} → {human_bytes(after)}" if before else ""
    kept = len(layers) - len(changed)
    return (f"{pass_report.name}: {len(changed)} of {len(layers)} layers changed{weights}"
            + (f" ({shown})" if shown else "") + (f"; {kept} kept" if kept else ""))


def _layer_table(console: Console, pass_report) -> Table:
    """Each layer, what it became and why, in three columns (the reason under the action) that fit 80 columns."""
    table = _fits(console, Table(title=escape(pass_report.name), title_justify="left"))
    table.add_column("layer", overflow="fold", ratio=2)
    table.add_column("became (why)", overflow="fold", ratio=4)
    table.add_column("bytes", justify="right", no_wrap=True)
    for layer in pass_report.layers:
        size = f"{human_bytes(layer.bytes_before)} → {human_bytes(layer.bytes_after)}" if layer.bytes_before else ""
        action = escape(layer.action) + (f"\n[dim]{escape(layer.reason)}[/]" if layer.reason else "")
        style = "" if _is_change(layer.action) else "dim"
        table.add_row(escape(f"{layer.node} ({layer.op_type})" if layer.op_type else layer.node), action, size, style=style)
    return table


def render_command(console: Console, report: CommandReport, verbose: bool = False) -> None:
    """A transform: one line per pass (a table per pass with -v), notes, the verdict, then the headline."""
    first = [note for note in report.notes if note.startswith("no change:")]
    for note in first:  # a no-op run says so before anything else
        _note(console, note)
    for pass_report in report.passes:
        if verbose:
            console.print(_layer_table(console, pass_report))
        else:
            console.print(escape(pass_summary(pass_report)), highlight=False)
        for note in pass_report.notes:
            _note(console, note)
    if report.passes and not verbose:
        console.print("[dim](-v lists each layer and why)[/]", highlight=False)
    if report.runtime:
        rt = report.runtime
        if verbose:
            kernels = ", ".join(f"{k} x{v}" for k, v in rt["integer_kernels"].items()) or "none"
            left = ", ".join(f"{k} x{v}" for k, v in rt["float_kernels"].items()) or "none"
            console.print(escape(f"onnxruntime runs: integer kernels {kernels}; float MatMul/Gemm/Conv left {left}"))
        if not rt["all_quantized_layers_fused"]:
            console.print("[yellow]warning:[/] some quantized layers are not fused into integer kernels by onnxruntime")
    validation = report.validation
    if validation is not None:
        if verbose and getattr(validation, "validated", True):
            _validation_tables(console, validation)
        _verdict(console, validation)
    for note in report.notes:
        if note not in first:
            _note(console, note)
    if report.output:
        size = report.size or {}
        measured = validation is not None and getattr(validation, "validated", True)
        before, after = (validation.size["original"], validation.size["candidate"]) if measured else \
            (size.get("original"), size.get("output"))
        if report.command == "unpack":  # the same model again: its size is the news, not a ratio to the pack
            console.print(f"wrote [bold]{escape(report.output)}[/] ({human_bytes(after)}, restored from a "
                          f"{human_bytes(before)} pack)", highlight=False)
            return
        against = " than the original" if measured else " than the input"
        if not measured and size.get("pipeline_original"):  # recorded by the command that made the input
            before, against = size["pipeline_original"], " than the original"
        console.print(headline(report.output, before, after, validation, against), highlight=False)


def render_pack(console: Console, report, show_all: bool = False, verbose: bool = False) -> None:
    """Totals (bits per symbol against the entropy), then the headline; with -v or --all the per-tensor table."""
    if verbose or show_all:
        rows = sorted(report.tensors, key=lambda t: -t.bytes_before)
        shown = rows if show_all else rows[:40]
        table = _fits(console, Table(title="pack", title_justify="left"))
        for col in ("tensor", "coding", "symbols", "bits", "entropy", "bytes"):
            table.add_column(col, overflow="fold", justify="right" if col in ("symbols", "bits", "entropy") else "left")
        for t in shown:
            table.add_row(escape(t.name), f"{t.dtype} {t.encoding}", str(t.symbols), f"{t.coded_bits:.3f}",
                          f"{t.entropy_bits:.3f}", f"{human_bytes(t.bytes_before)} → {human_bytes(t.bytes_after)}")
        console.print(table)
        if len(rows) > len(shown):
            console.print(f"[dim]{len(rows) - len(shown)} smaller tensor(s) not shown (--all lists them)[/]")
    totals = report.totals
    if totals.get("coded_symbols"):
        console.print(f"coded {totals['coded_symbols']} symbols at {totals['coded_bits_per_symbol']:.3f} bits each "
                      f"(order-0 entropy {totals['entropy_bits_per_symbol']:.3f}); tensors "
                      f"{human_bytes(totals['tensor_bytes_before'])} → {human_bytes(totals['tensor_bytes_after'])}, "
                      f"graph {human_bytes(totals['graph_bytes'])}, shared tables {human_bytes(totals['shared_table_bytes'])}")
    for note in report.notes:
        _note(console, note)
    if report.output:
        first = report.size.get("pipeline_original")  # the model the pipeline began with, when recorded
        console.print(headline(report.output, first or report.size.get("original"), report.size.get("output"),
                               against=" than the original" if first else " than its input"),
                      highlight=False)


def _drift_cell(drift: float, agreement: float | None, verbose: bool) -> str:
    """Drift in 4-5 characters (`.012`, `1.35`): ten of them fit 100 columns; -v adds the top-1 agreement."""
    if drift != drift:
        text = "nan"
    elif drift >= 10:
        text = f"{drift:.0f}"
    elif drift >= 1:
        text = f"{drift:.2f}"
    else:
        text = f"{drift:.3f}".removeprefix("0")
    return text + (f" {agreement:.0%}" if verbose and agreement is not None else "")


def _count(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def render_sensitivity(console: Console, report, verbose: bool = False) -> None:
    """One row per layer: output drift when that layer alone is pruned at each sparsity, then rounded to n bits."""
    table = _fits(console, Table(title=f"drift (relative output error) with each layer alone pruned ({report.importance} "
                                       "importance) or rounded to n bits" + ("; top-1 agreement" if verbose else ""),
                                 title_justify="left"))
    table.add_column("layer", overflow="fold", min_width=12)
    table.add_column("weights", justify="right", no_wrap=True)
    for s in report.sparsities:
        table.add_column(f"{s:.0%}", justify="right", no_wrap=True)
    for b in report.bits:
        table.add_column(f"{b}-bit", justify="right", no_wrap=True)
    for layer in report.layers:
        cells = [_drift_cell(d, a, verbose) for d, a in zip(layer.drift + layer.bit_drift, layer.agreement + layer.bit_agreement)]
        table.add_row(escape(layer.node), _count(layer.weights), *cells)
    console.print(table)
    reasons: dict = {}
    for decision in report.skipped:
        reasons.setdefault(decision.reason, []).append(decision.node)
    for reason, nodes in reasons.items():  # one line per reason: -v names every layer
        names = nodes if verbose or len(nodes) <= 3 else nodes[:3] + [f"{len(nodes) - 3} more"]
        console.print(f"[dim]not measured ({escape(reason)}): {escape(', '.join(names))}[/]", highlight=False)
    for note in report.notes:
        _note(console, note)
    console.print(f"{len(report.layers)} layer(s) measured on {report.samples} sample(s)"
                  + ("" if verbose else " (-v adds each cell's top-1 agreement; --json or -o FILE the exact figures)"))


def render_compress(console: Console, report, verbose: bool = False) -> None:
    """compress: the winner (its recipe and verdict) and the headline; -v adds every candidate and each layer."""
    if verbose and report.candidates:
        table = _fits(console, Table(title="compress: candidates (whole model validated against the original)", title_justify="left"))
        for col in ("#", "phase", "recipe", "size", "x", "accuracy", "cosine", "", "s"):
            table.add_column(col, overflow="fold", justify="left" if col in ("phase", "recipe", "") else "right")
        for c in report.candidates:
            verdict = ("[green]best[/]" if c.best else "pass") if c.passed else ("[red]error[/]" if c.error else "fail")
            checked = c.task_check
            what = c.error or c.recipe + (f" (task check {'accepted' if checked['accepted'] else 'REJECTED'}: "
                                          f"{checked['detail']})" if checked else "")
            table.add_row(str(c.index), c.phase, escape(what), human_bytes(c.size), _num(c.times_smaller, 3),
                          _num(c.accuracy), _num(c.cosine, 6), verdict, f"{c.seconds:.1f}", style="" if c.passed else "dim")
        console.print(table)
    if verbose and report.layers:
        table = _fits(console, Table(title=escape(f"chosen: {report.recipe_summary}"), title_justify="left"))
        for col in ("layer", "sparsity", "weights as"):
            table.add_column(col, overflow="fold", justify="right" if col == "sparsity" else "left")
        for layer in report.layers:
            table.add_row(escape(layer.node), f"{layer.sparsity:.1%}", escape(layer.format))
        console.print(table)
    elif report.recipe_summary:
        console.print(f"chosen: {escape(report.recipe_summary)}", highlight=False)
    if report.validation:
        if verbose and getattr(report.validation, "validated", True):
            _validation_tables(console, report.validation)
        _verdict(console, report.validation)
    for note in report.notes:
        _note(console, note)
    budget = f" of a {report.time_budget_s:g} s budget" if report.time_budget_s else ""
    limit = f" (limit {report.max_candidates})" if getattr(report, "max_candidates", None) else ""
    listed = "" if verbose or not report.candidates else " (-v or --json lists them)"
    console.print(f"{report.stopped}: {len(report.candidates)} candidate(s){limit} in {report.seconds:.1f} s{budget}"
                  f"{_evaluated_on(report)}{listed}")
    if report.output and report.size.get("output"):
        console.print(headline(report.output, report.size.get("original"), report.size.get("output"), report.validation,
                               against=" than the original"), highlight=False)


def _evaluated_on(report) -> str:
    """Where candidates ran, when the search ran more than one at a time: a slow search is then not a serial one."""
    executor, workers = getattr(report, "executor", None), getattr(report, "workers", None)
    if executor == "ray":
        return f", on Ray ({workers} at a time)" if workers else ", on Ray"
    if executor == "local" and workers and workers > 1:
        return f", {workers} worker processes"
    return ""


# ---- progress ------------------------------------------------------------------------------------------------

CLOCK = time.monotonic  # the one clock of every progress display (tests swap in a fake one)
TICKER_S: float | None = 1.0  # how often a display looks at its clock between reports; None: only on reports
HEARTBEAT_FIRST_S = 10.0  # off a terminal: the first line once a command has run this long (quick runs, failures
# found while loading included, keep their one-line answers)
HEARTBEAT_S = 30.0  # then one line at least this often


def _clock_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """Shows what a long command is doing, on stderr only (stdout keeps the report or the one JSON document).

    On a terminal: a transient rich bar. Off one (CI logs, pipes): a heartbeat line, the first after
    HEARTBEAT_FIRST_S and then at least every HEARTBEAT_S, from a ticker thread, so a single step that reports
    nothing for minutes still shows the job is alive. Called as the library's `progress(phase, done, total)`.

    One clock: the elapsed time shown is this display's. With `budget_seconds`, `done` and `total` are seconds of a
    time budget measured by the caller's clock; the display then anchors its clock to the caller's (the earliest
    `now - done`), so `41/120 s` and the elapsed time are the same number and advance between reports.
    """

    def __init__(self, command: str, *, unit: str = "", budget_seconds: bool = False, console: Console | None = None):
        self.command, self.unit, self.budget_seconds = command, unit, budget_seconds
        self.console = console or Console(stderr=True)
        self.terminal = self.console.is_terminal
        self.clock = CLOCK
        self.started = self.clock()
        self.phase, self.done, self.total = "working", 0, 0  # until the library's first report
        self.lines = 0  # heartbeat lines written
        self._anchored = False  # whether `started` is the caller's budget clock yet
        self._next_line = self.started + HEARTBEAT_FIRST_S
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._bar = self._task = None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def count(self) -> str:
        """`done/total unit`; for a time budget, the seconds so far on the one clock."""
        if self.budget_seconds and self.total:
            return f"{min(int(self.elapsed()), self.total)}/{self.total}{self.unit}"
        return f"{self.done}/{self.total}{self.unit}" if self.total else ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            now = self.clock()
            if self.budget_seconds:  # the caller's clock started no later than now - done (done is truncated)
                self.started = now - done if not self._anchored else min(self.started, now - done)
                self._anchored = True
            self.phase, self.done, self.total = phase, int(done), int(total)
            self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Bring the display up to date with the clock: the bar's position, or a heartbeat line when one is due."""
        with self._lock:
            now = self.clock() if now is None else now
            if self.terminal:
                self._update_bar()
            elif now >= self._next_line:
                self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        count = self.count()
        clock = "" if self.budget_seconds and self.total else f" · {_clock_text(now - self.started)} elapsed"
        phase = self.phase.removeprefix(f"{self.command}: ")  # "sensitivity: fc1", not "sensitivity: sensitivity: fc1"
        sys.stderr.write(f"onnxshrink {self.command}: {phase}{' ' + count if count else ''}{clock}\n")
        sys.stderr.flush()
        self.lines += 1
        self._next_line = now + HEARTBEAT_S

    def _update_bar(self) -> None:
        completed = min(self.elapsed(), self.total) if self.budget_seconds else self.done
        total = self.total or None  # unknown: rich pulses the bar
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), _StatusColumn(self),
                                 console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(escape(self.phase), total=total, completed=completed)
        else:
            self._bar.update(self._task, description=escape(self.phase), total=total, completed=completed)

    def __enter__(self) -> "ProgressDisplay":
        if TICKER_S is not None:
            self._thread = threading.Thread(target=self._run, name="onnxshrink-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(TICKER_S):
            if self.terminal and self._bar is None:
                continue  # nothing reported yet: no bar for a command that turns out quick
            self.tick()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


class _StatusColumn(ProgressColumn):
    """`done/total` and the elapsed time, both read from the display's one clock."""

    def __init__(self, display: ProgressDisplay):
        super().__init__()
        self.display = display

    def render(self, task) -> Text:
        count = self.display.count()
        if self.display.budget_seconds and self.display.total:
            return Text(count)
        return Text(f"{count}  {_clock_text(self.display.elapsed())}".strip())
