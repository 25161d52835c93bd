"""Rich rendering of reports. The only rich user besides cli.py; it reads reports, never models."""

from __future__ import annotations

import sys
import threading
import time

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


def render_validation(console: Console, report: ValidationReport) -> None:
    if not getattr(report, "validated", True):  # nothing was measured: say so, and why, instead of a table
        console.print(f"validation [yellow]NOT RUN[/]: {escape(report.reason or '')}", highlight=False)
        return
    inputs = "synthetic inputs" if report.synthetic_inputs else "given data"
    table = Table(title=escape(f"Validation: {report.candidate} vs {report.original} ({report.samples} samples, {inputs})"), title_justify="left")
    for col in ("output", "max abs", "mean rel", "cosine", "cosine min", "top-1 agree"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for name, d in report.outputs.items():
        table.add_row(escape(name), _num(d.max_abs), _num(d.mean_rel), _num(d.cosine, 6), _num(d.cosine_min, 6), _num(d.top1_agreement))
    console.print(table)
    summary = Table(show_header=True)
    for col in ("", "original", "candidate", "ratio"):
        summary.add_column(col, justify="left" if not col else "right")
    ratio = report.size["ratio"]
    smaller = f" ({1 / ratio:.1f}x smaller)" if ratio and ratio < 1 else ""  # the headline a user looks for
    summary.add_row("size", human_bytes(report.size["original"]), human_bytes(report.size["candidate"]), f"{ratio:.3f}{smaller}")
    if report.latency_ms:
        lat = report.latency_ms
        summary.add_row(
            f"latency p50 (batch {lat['batch']}, {lat['threads']} thread{'s' if lat['threads'] != 1 else ''})",
            f"{lat['original']['p50']:.4g} ms", f"{lat['candidate']['p50']:.4g} ms",
            ("-" if lat["ratio"] is None else f"{lat['ratio']:.3f}")
            + (" (noise)" if (lat["ratio"] or 0) > 1 and latency_slower(lat) is False else ""))
        summary.add_row("latency p90", f"{lat['original']['p90']:.4g} ms", f"{lat['candidate']['p90']:.4g} ms", "")
    if report.accuracy:
        acc = report.accuracy
        summary.add_row("accuracy", f"{acc['original']:.4f}", f"{acc['candidate']:.4f}", f"drop {acc['original'] - acc['candidate']:+.4f}")
    console.print(summary)
    for check in report.checks:
        mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {escape(check.name)}: {_num(check.value)} (threshold {check.threshold:g})")
    for note in report.notes:
        _note(console, note)
    if not report.checks:  # nothing was gated: PASSED would claim a judgement nobody asked for
        console.print("validation [yellow]not gated[/] (no thresholds given: the figures above are not judged)")
    else:
        console.print(f"validation {'[green]PASSED[/]' if report.passed else '[red]FAILED[/]'}")


def render_command(console: Console, report: CommandReport) -> None:
    first = [note for note in report.notes if note.startswith("no change:")]
    for note in first:  # a no-op run says so before anything else
        _note(console, note)
    for pass_report in report.passes:
        table = Table(title=escape(pass_report.name), title_justify="left")
        for col in ("node", "op", "weight", "action", "bytes", "why"):
            table.add_column(col, overflow="fold")
        for layer in pass_report.layers:
            size = f"{human_bytes(layer.bytes_before)} -> {human_bytes(layer.bytes_after)}" if layer.bytes_before else ""
            style = "" if layer.action.startswith(("int", "pruned", "codebook", "rank", "removed")) else "dim"
            table.add_row(escape(layer.node), layer.op_type, escape(layer.weight), escape(layer.action), size, escape(layer.reason), style=style)
        console.print(table)
        for note in pass_report.notes:
            _note(console, note)
    if report.runtime:
        rt = report.runtime
        kernels = ", ".join(f"{k} x{v}" for k, v in rt["integer_kernels"].items()) or "none"
        left = ", ".join(f"{k} x{v}" for k, v in rt["float_kernels"].items()) or "none"
        console.print(escape(f"onnxruntime runs: integer kernels {kernels}; float MatMul/Gemm/Conv left {left}"))
        if not rt["all_quantized_layers_fused"]:
            console.print("[yellow]warning:[/] some quantized layers are not fused into integer kernels by onnxruntime")
    if report.validation:
        render_validation(console, report.validation)
    for note in report.notes:
        if note not in first:
            _note(console, note)
    if report.output:
        console.print(f"wrote [bold]{escape(report.output)}[/] ({human_bytes(report.size['output'])}, {report.size['ratio']:.3f}x the input)")


def render_pack(console: Console, report, show_all: bool = False) -> None:
    """Per-tensor table of a pack (largest first), then totals: where the bytes went and how close to entropy."""
    rows = sorted(report.tensors, key=lambda t: -t.bytes_before)
    shown = rows if show_all else rows[:40]
    table = Table(title="pack", title_justify="left")
    for col in ("tensor", "dtype", "coding", "symbols", "entropy b/sym", "coded b/sym", "bytes"):
        table.add_column(col, overflow="fold", justify="right" if col in ("symbols", "entropy b/sym", "coded b/sym") else "left")
    for t in shown:
        table.add_row(escape(t.name), t.dtype, t.encoding, str(t.symbols), f"{t.entropy_bits:.3f}", f"{t.coded_bits:.3f}",
                      f"{human_bytes(t.bytes_before)} -> {human_bytes(t.bytes_after)}")
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"[dim]{len(rows) - len(shown)} smaller tensor(s) not shown (--all lists them)[/]")
    totals = report.totals
    if totals.get("coded_symbols"):
        console.print(f"coded {totals['coded_symbols']} symbols at {totals['coded_bits_per_symbol']:.3f} bits each "
                      f"(order-0 entropy {totals['entropy_bits_per_symbol']:.3f}); tensors "
                      f"{human_bytes(totals['tensor_bytes_before'])} -> {human_bytes(totals['tensor_bytes_after'])}, "
                      f"graph {human_bytes(totals['graph_bytes'])}, shared tables {human_bytes(totals['shared_table_bytes'])}")
    for note in report.notes:
        _note(console, note)
    if report.output:
        console.print(f"wrote [bold]{escape(report.output)}[/] ({human_bytes(report.size['output'])}, "
                      f"{report.size['ratio']:.3f}x the input, {1 / report.size['ratio']:.2f}x smaller)")


def render_sensitivity(console: Console, report) -> None:
    """One row per layer: output drift (and top-1 agreement) when that layer alone is pruned at each sparsity,
    then when it alone is rounded to each bit width."""
    table = Table(title=f"sensitivity: drift = relative output error with that layer alone pruned ({report.importance} "
                        "importance) or rounded to n bits", title_justify="left")
    table.add_column("node", overflow="fold")
    table.add_column("op")
    table.add_column("weights", justify="right")
    for s in report.sparsities:
        table.add_column(f"{s:.0%}", justify="right")
    for b in report.bits:
        table.add_column(f"{b}-bit", justify="right")
    for layer in report.layers:
        cells = [f"{d:.4f}" + (f" ({a:.0%})" if a is not None else "")
                 for d, a in zip(layer.drift + layer.bit_drift, layer.agreement + layer.bit_agreement)]
        table.add_row(escape(layer.node), layer.op_type, str(layer.weights), *cells)
    console.print(table)
    for decision in report.skipped:
        console.print(f"[dim]not measured: {escape(decision.node)} ({escape(decision.reason)})[/]")
    for note in report.notes:
        _note(console, note)


def render_compress(console: Console, report) -> None:
    """compress: the candidates tried, the chosen per-layer settings, then the final validation."""
    if report.candidates:
        table = Table(title="compress: candidates (whole model validated against the original)", title_justify="left")
        for col in ("#", "phase", "recipe", "size", "x smaller", "accuracy", "cosine", "passed", "s"):
            table.add_column(col, overflow="fold", justify="left" if col in ("phase", "recipe", "passed") else "right")
        for c in report.candidates:
            verdict = ("[green]best[/]" if c.best else "pass") if c.passed else ("[red]error[/]" if c.error else "fail")
            table.add_row(str(c.index), c.phase, escape(c.error or c.recipe), human_bytes(c.size), _num(c.times_smaller, 3),
                          _num(c.accuracy), _num(c.cosine, 6), verdict, f"{c.seconds:.1f}", style="" if c.passed else "dim")
        console.print(table)
    if report.layers:
        table = Table(title=escape(f"chosen: {report.recipe_summary}"), title_justify="left")
        for col in ("node", "sparsity", "weights as"):
            table.add_column(col, overflow="fold", justify="right" if col == "sparsity" else "left")
        for layer in report.layers:
            table.add_row(escape(layer.node), f"{layer.sparsity:.1%}", escape(layer.format))
        console.print(table)
    if report.validation:
        render_validation(console, report.validation)
    for note in report.notes:
        _note(console, note)
    budget = f" of a {report.time_budget_s:g} s budget" if report.time_budget_s else ""
    limit = f" (limit {report.max_candidates})" if getattr(report, "max_candidates", None) else ""
    console.print(f"{report.stopped}: {len(report.candidates)} candidate(s){limit} in {report.seconds:.1f} s{budget}")
    if report.output and report.size.get("output"):
        console.print(f"wrote [bold]{escape(report.output)}[/] ({human_bytes(report.size['output'])}, "
                      f"{report.size['times_smaller']:.1f}x smaller than the input)")


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
