"""Typer CLI: parse options -> config -> library call -> render. Domain errors become exit codes here only."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.29 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer depends on click itself
    from click import exceptions as click_exceptions
from rich.console import Console
from rich.markup import escape

from onnxshrink import __version__, api
from onnxshrink import data as data_mod
from onnxshrink.passes.common import glob_literal
from onnxshrink.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NOT_VALIDATED, EXIT_THRESHOLD, OnnxShrinkError, UsageError
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.passes.quantize_weights import WeightsOnlyConfig
from onnxshrink.progress import reporting
from onnxshrink.render import ProgressDisplay, render_command, render_info, render_pack, render_validation
from onnxshrink.task_check import task_rejected
from onnxshrink.validate import Thresholds, ValidateConfig

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process SIGTERM ended, unlike Ctrl-C's 130
EXIT_HANGUP = 128 + signal.SIGHUP  # 129: its terminal closed (an ssh session dropped, a terminal window shut)
_sigterm = {"received": False, "signal": signal.SIGTERM}
# Under --json stdout holds exactly one document: the report, or else the error. Reset by each invocation.
_json_out = {"wanted": False, "written": False}


def _wants_json(args) -> bool:
    """Whether the command line asks for --json (before a `--` that ends the options)."""
    args = list(sys.argv[1:] if args is None else args)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _json_error(code: int, message: str) -> None:
    """Under --json, the error as stdout's one document, unless a report was already printed there."""
    if _json_out["wanted"] and not _json_out["written"]:
        from onnxshrink.report import error_json

        sys.stdout.write(error_json(code, message) + "\n")
        sys.stdout.flush()
        _json_out["written"] = True


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a CI job's timeout, docker stop) or SIGHUP (its terminal closed), raised wherever the process
    is, as Ctrl-C's KeyboardInterrupt is: the same `finally` blocks then remove the staging files, and no
    `except Exception` can swallow it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum, frame) -> None:
    _sigterm.update(received=True, signal=signum)
    if signum == signal.SIGHUP:
        _off_a_closed_terminal()
    for handled in _HANDLED:  # a second signal must not cut the cleanup short (SIGKILL still can)
        signal.signal(handled, signal.SIG_IGN)
    raise Terminated(signum)


_HANDLED = (signal.SIGTERM, signal.SIGHUP)


def _off_a_closed_terminal() -> None:
    """After a hangup, writing to the terminal fails (EIO): a progress line or the final message would then raise
    in the middle of the cleanup, and the exit code would be 1. stdout/stderr on a closed terminal go to /dev/null
    (an empty write tells: it fails on a hung-up terminal only); a pipe or file, still readable, is kept."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def _termination(signum: int) -> tuple[str, int]:
    return (("terminated (SIGHUP)", EXIT_HANGUP) if signum == signal.SIGHUP
            else ("terminated (SIGTERM)", EXIT_TERMINATED))


def _interrupted(exc: BaseException) -> tuple[str, int]:
    """The word and exit code for Ctrl-C (130), SIGTERM (143) or SIGHUP (129): CI can tell a kill from a keyboard."""
    return _termination(exc.signum) if isinstance(exc, Terminated) else ("interrupted", EXIT_INTERRUPTED)


def _no_type(ctx=None) -> None:
    return None


class _FlagsWithoutType:
    """typer 0.29 prints `<bool>` beside every flag; a flag takes no value, so its help shows no type."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.display_type_rich = _no_type  # an instance attribute that only the help formatter reads
        return params


class _Command(_FlagsWithoutType, TyperCommand):
    """A command whose usage line reads `onnxshrink quantize [OPTIONS] MODEL`, not typer's `{model}`."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _OneLineErrors(_FlagsWithoutType, TyperGroup):
    """Click's own usage errors (unknown option, bad value, missing argument) as one `error:` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _json_out.update(wanted=_wants_json(args), written=False)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except click_exceptions.NoArgsIsHelpError as exc:
            sys.stderr.write(exc.ctx.get_help() + "\n")
            code = exc.exit_code
        except click_exceptions.ClickException as exc:
            where = getattr(getattr(exc, "ctx", None), "command_path", None)
            hint = f" (see '{where} --help')" if where else ""
            sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
            code = exc.exit_code
            _json_error(code, exc.format_message() + hint)
        except typer.Abort:
            sys.stderr.write("interrupted\n")
            code = EXIT_INTERRUPTED
        if code == EXIT_INTERRUPTED and _sigterm["received"]:  # SIGTERM/SIGHUP outside a command's edge: typer made it 130
            word, code = _termination(_sigterm["signal"])
            sys.stderr.write(word + "\n")
        if code:  # any failure not yet written as a document (an interrupt outside a command's edge)
            _json_error(code, {EXIT_INTERRUPTED: "interrupted", EXIT_TERMINATED: "terminated (SIGTERM)",
                               EXIT_HANGUP: "terminated (SIGHUP)"}.get(code, f"exit code {code}"))
        if standalone_mode:
            sys.exit(code)
        return code


# Shown under `onnxshrink --help` (the callback's docstring is not: `help=` below replaces it).
EXIT_CODES_HELP = ("Exit codes: 0 ok · 1 a threshold failed (or the task check) · 2 usage error · 3 unusable input (model or data) · "
                   "4 unsupported model · 5 cannot write the output · 6 written but not validated (no inputs the "
                   "model runs on: give --data, --calibration or --shape) · 70 internal error · "
                   "129 terminal closed (SIGHUP) · 130 interrupted (Ctrl-C) · 143 terminated (SIGTERM). "
                   "Under --json, stdout is one document: the report, or on a failure {\"error\": {\"code\", \"message\"}}.")

app = typer.Typer(
    name="onnxshrink",
    cls=_OneLineErrors,
    help="Make ONNX models smaller and faster, and prove with onnxruntime how far they drifted.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---- shared option definitions: one declaration per option, grouped into help panels ------------------------------
WHAT, HOW, GATES, OUTPUT, RUN = "What to compress", "How", "Validation gates", "Output", "Run"

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX model file.", show_default=False)]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout; human output goes to stderr.", rich_help_panel=OUTPUT)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print the detail tables (each layer, output or candidate, and why); without it a short summary.", rich_help_panel=OUTPUT)]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output file.", rich_help_panel=OUTPUT)]
ShowAllOpt = Annotated[bool, typer.Option("--all", help="List every tensor, not only the 40 largest.", rich_help_panel=OUTPUT)]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="onnxruntime intra-op threads, the same for every model run.", rich_help_panel=RUN)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for synthesized inputs and any random choice.", rich_help_panel=RUN)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.", rich_help_panel=RUN)]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=1, show_default=False, help="Candidates evaluated at once, each in its own process holding a copy of the model (default: one per idle core, as many as memory holds; 1: one after another). Every count chooses the same model.", rich_help_panel=RUN)]
ExecutorOpt = Annotated[str, typer.Option("--executor", metavar="[local|ray]", help="Where candidates run: local processes, or a Ray cluster (the optional extra named ray; the model and data are sent through Ray, no shared filesystem needed).", rich_help_panel=RUN)]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="--executor ray: the cluster to connect to (default RAY_ADDRESS, else a local Ray instance).", rich_help_panel=RUN)]

NoValidateOpt = Annotated[bool, typer.Option("--no-validate", help="Skip the comparison against the original.", rich_help_panel=GATES)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help=".npz whose keys are the model's input names (batch along axis 0).", rich_help_panel=GATES)]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="Key of an integer labels array in --data; enables task accuracy.", rich_help_panel=GATES)]
TaskCheckOpt = Annotated[Optional[str], typer.Option("--task-check", metavar="CMD", help="Your own check of the task (boxes found, text read) on the result: a command that exits 0 to accept it; a rejection fails validation as a threshold does (OUTPUT.failed.onnx, exit 1). {model} in CMD is the result (a runnable .onnx), {original} the input; without {model} the result's path is appended.", rich_help_panel=GATES)]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", min=1, help="Use only the first N samples (default: all; 16 when synthesized).", rich_help_panel=GATES)]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--shape", help="Shape for synthesized inputs, NAME=D1,D2,... (repeatable).", rich_help_panel=GATES)]
MaxDriftOpt = Annotated[Optional[float], typer.Option("--max-drift", help="Fail (exit 1) if any output's max abs error exceeds this.", rich_help_panel=GATES)]
MinCosineOpt = Annotated[Optional[float], typer.Option("--min-cosine", help="Fail if any output's mean cosine similarity is below this.", rich_help_panel=GATES)]
MinAgreeOpt = Annotated[Optional[float], typer.Option("--min-agreement", help="Fail if top-1 agreement of class-score outputs is below this.", rich_help_panel=GATES)]
MaxAccDropOpt = Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Fail if accuracy drops by more than this (absolute; 0.01 = 1 point). Needs --labels.", rich_help_panel=GATES)]
MaxLatOpt = Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Fail if candidate/original p50 latency exceeds this.", rich_help_panel=GATES)]


def _output_opt(help: str):
    """--output/-o with the command's own default named in its help."""
    return Annotated[Optional[Path], typer.Option("--output", "-o", help=help, rich_help_panel=OUTPUT)]


def _calibration_opt(help: str):
    return Annotated[Optional[Path], typer.Option("--calibration", help=f".npz of representative inputs: {help}", rich_help_panel=HOW)]


def _op_types_opt(default: str, verb: str = ""):
    return Annotated[Optional[str], typer.Option("--op-types", help=f"Comma-separated op types{verb} (default {default}).", rich_help_panel=WHAT)]


def _exclude_opt(what: str):
    return Annotated[Optional[list[str]], typer.Option("--exclude", help=f"Glob on node names to {what} (repeatable).", rich_help_panel=WHAT)]


def _keep_float_opt(help: str):
    return Annotated[Optional[str], typer.Option("--keep-float", metavar="[first|last|both]", help=help, rich_help_panel=WHAT)]


def _examples(*examples: str) -> str:
    """A command's help epilog: 2-3 runnable examples, `COMMAND  # what it shows`, each comment on its own line and
    long commands continued with a backslash, so they read (and paste) at 80 columns. No rich markup: `[` is eaten."""
    lines = ["Examples:"]
    for example in examples:
        command, _, comment = example.partition("  # ")
        if comment:
            lines.append(f"# {comment.strip()}")
        chunks: list = []  # an option with its value stays on one line
        for word in command.split():
            if chunks and not word.startswith("-") and chunks[-1].startswith("-") and " " not in chunks[-1]:
                chunks[-1] += " " + word
            else:
                chunks.append(word)
        line = ""
        for chunk in chunks:
            if line and len(line) + 1 + len(chunk) > 74:
                lines.append(line + " \\")
                line = "    " + chunk
            else:
                line = f"{line} {chunk}" if line else chunk
        lines.append(line)
    return "\n".join(lines)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"onnxshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Make ONNX models smaller and faster, and prove with onnxruntime how far they drifted (exit codes: EXIT_CODES_HELP)."""


def _consoles(as_json: bool) -> Console:
    """Human output: stdout normally, stderr under --json so stdout holds only the JSON document."""
    console = Console(stderr=as_json)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 160  # logs and pipes: wide enough for the tables, never folded at 80 (unless COLUMNS says)
    return console


def _edge(func):
    """Turn every failure into a one-line message and a documented exit code (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        _json_out["wanted"] = _json_out["wanted"] or bool(kwargs.get("as_json"))
        err = Console(stderr=True, soft_wrap=True)
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except OnnxShrinkError as exc:
            if debug:
                traceback.print_exc()
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            _json_error(exc.exit_code, str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            word, code = _interrupted(exc)
            err.print(f"[red]{word}[/]; no output was written", highlight=False)
            _json_error(code, f"{word}; no output was written")
            raise typer.Exit(code) from None
        except Exception as exc:
            if debug:
                traceback.print_exc()
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            err.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(line)} (rerun with --debug for the traceback)", highlight=False)
            _json_error(EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {line}")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


@contextlib.contextmanager
def _progress(command: str):
    """The library's progress reports, shown on stderr while the block runs: a bar on a terminal, else a heartbeat."""
    with ProgressDisplay(command) as display, reporting(display):
        yield display


def _emit(as_json: bool, report, render) -> None:
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
        _json_out["written"] = True
    render(_consoles(as_json), report)


def _exit_for_validation(report) -> None:
    """A written model's exit code: 1 when the task check rejected it, 6 when validation could not run (the output
    landed, nothing was measured), 1 when a threshold failed (written as OUTPUT.failed.onnx), else 0."""
    if report.validation is not None and task_rejected(report.validation):
        raise typer.Exit(EXIT_THRESHOLD)
    if report.validation is not None and not report.validation.validated:
        raise typer.Exit(EXIT_NOT_VALIDATED)
    if report.validation is not None and not report.validation.passed:
        raise typer.Exit(EXIT_THRESHOLD)


def _op_types(op_types: Optional[str]) -> dict:
    """--op-types as the config keyword it sets: {} keeps the pass's own default."""
    types = tuple(t.strip() for t in op_types.split(",") if t.strip()) if op_types else ()
    return {"op_types": types} if types else {}


def _rewrite(command: str, run, config, calibration, threads: int, seed: int, verbose: bool, as_json: bool,
             **recorded) -> None:
    """The tail prune, cluster and factorize share: the resolved configuration (what the written model records,
    not the raw flags), the library call `run(options)` under the progress display, the report, the exit code."""
    options = {**asdict(config), **recorded, "calibration": str(calibration) if calibration else None,
               "threads": threads, "seed": seed}
    with _progress(command):
        report = run(options)
    _emit(as_json, report, lambda console, r: render_command(console, r, verbose))
    _exit_for_validation(report)


def _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio):
    return ValidateConfig(
        data=str(data) if data else None,
        labels=labels,
        samples=samples,
        shapes=data_mod.parse_shape_overrides(shape),
        threads=threads,
        seed=seed,
        thresholds=Thresholds(max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio),
    )


@app.command("inspect", cls=_Command, epilog=_examples(
    "onnxshrink inspect model.onnx                  # the 40 largest tensors; --all lists every one",
    "onnxshrink inspect model.onnx --json | jq .totals"))
@_edge
def inspect_command(
    model: ModelArg,
    show_all: ShowAllOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show inputs, outputs, opsets, operators and every constant tensor, classified as compressible or not."""
    info = api.inspect(model)
    _emit(as_json, info, lambda console, r: render_info(console, r, show_all))


@app.command("validate", cls=_Command, epilog=_examples(
    "onnxshrink validate model.onnx model.int8.onnx --data eval.npz --labels labels --max-accuracy-drop 0.01",
    "onnxshrink validate model.onnx model.shrink --min-cosine 0.999 --json > report.json",
    "onnxshrink validate model.onnx small.onnx --shape input=1,3,224,224 -v   # synthetic inputs, every output"))
@_edge
def validate_command(
    original: Annotated[Path, typer.Argument(metavar="ORIGINAL", help="The reference model.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(metavar="CANDIDATE", help="The compressed model to judge (.onnx or .shrink).", show_default=False)],
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: Annotated[Optional[str], typer.Option("--task-check", metavar="CMD", help="Your own check of the task (boxes found, text read): a command that exits 0 to accept the candidate; its verdict is one more check. {model} in CMD is the candidate (a runnable .onnx), {original} the reference; without {model} the candidate's path is appended.", rich_help_panel=GATES)] = None,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Run both models in onnxruntime on the same inputs; report drift, accuracy, latency and size. Exit 1 if a threshold fails."""
    config = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    with _progress("validate"):
        report = api.validate(original, candidate, config, task_check=task_check)
    _emit(as_json, report, lambda console, r: render_validation(console, r, verbose))
    if not report.passed:
        raise typer.Exit(EXIT_THRESHOLD)


@app.command("quantize", cls=_Command, epilog=_examples(
    "onnxshrink quantize model.onnx --data eval.npz --labels labels --max-accuracy-drop 0.01",
    "onnxshrink quantize model.onnx --calibration calib.npz -o model.static.onnx      # static int8 (QDQ)",
    "onnxshrink quantize model.onnx --bits 4 --algorithm gptq --calibration calib.npz  # 4-bit MatMulNBits"))
@_edge
def quantize_command(
    model: ModelArg,
    op_types: _op_types_opt("all the mode supports", " to quantize") = None,
    exclude: _exclude_opt("keep float") = None,
    keep_float: _keep_float_opt("Keep the first, last or both quantizable layers float.") = None,
    min_weights: Annotated[int, typer.Option("--min-weights", min=0, help="Dynamic mode: keep layers with fewer weights float (not even stored int8).", rich_help_panel=WHAT)] = 0,
    sensitivity_file: Annotated[Optional[Path], typer.Option("--sensitivity", help="JSON from `onnxshrink sensitivity -o`: with --max-layer-drift, keep its most sensitive layers float.", rich_help_panel=WHAT)] = None,
    max_layer_drift: Annotated[Optional[float], typer.Option("--max-layer-drift", min=0.0, help="Keep float every layer whose drift at this bit width in --sensitivity exceeds this.", rich_help_panel=WHAT)] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", metavar="[dynamic|static|weights]", help="dynamic (default; int8 weights, activations quantized at run time), static (calibrated QDQ; implied by --calibration), weights (weight-only QDQ for other runtimes).", rich_help_panel=HOW)] = None,
    bits: Annotated[int, typer.Option("--bits", min=2, max=8, help="Weight bits: 8, or 4 / 2 for blockwise MatMulNBits weights of MatMul/Gemm.", rich_help_panel=HOW)] = 8,
    block_size: Annotated[int, typer.Option("--block-size", metavar="[16|32|64|128|256]", help="Block size along K for --bits < 8.", rich_help_panel=HOW)] = 32,
    embedding_block_size: Annotated[Optional[int], typer.Option("--embedding-block-size", metavar="[16|32|64|128|256]", help="--bits < 8: block size along each embedding table row (GatherBlockQuantized); default --block-size. Smaller blocks keep tables more exact for a few bytes.", rich_help_panel=HOW)] = None,
    algorithm: Annotated[str, typer.Option("--algorithm", metavar="[rtn|gptq]", help="rtn (round to nearest) or gptq (data-aware rounding; needs --calibration).", rich_help_panel=HOW)] = "rtn",
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns in order of decreasing activation energy.", rich_help_panel=HOW)] = False,
    calibration: _calibration_opt("static scales or GPTQ.") = None,
    calibrator: Annotated[str, typer.Option("--calibrator", metavar="[minmax|percentile|entropy|mse]", help="Activation range for --mode static.", rich_help_panel=HOW)] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or one per tensor.", rich_help_panel=HOW)] = True,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Symmetric weights (zero point 0) or asymmetric.", rich_help_panel=HOW)] = True,
    integer_min_macs: Annotated[Optional[int], typer.Option("--integer-min-macs", min=0, help="Dynamic/static: layers with fewer multiply-adds per sample are stored int8 but run float kernels (onnxruntime folds the decoding at load), where an integer kernel would be slower than fp32. Default 131072 dynamic, 393216 static; 0: integer kernels everywhere.", rich_help_panel=HOW)] = None,
    smooth: Annotated[Optional[bool], typer.Option("--smooth/--no-smooth", help="Static mode: SmoothQuant, LayerNorm/activation outliers moved into the weights with alpha searched per layer on the calibration data (default on; applied only where it measures better).", rich_help_panel=HOW)] = None,
    qdq: Annotated[bool, typer.Option("--qdq", help="--mode weights: write DequantizeLinear (for runtimes with weight-only int8 kernels; onnxruntime CPU runs it slower than fp32) instead of the folded form.", rich_help_panel=HOW)] = False,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="No accuracy fallback: keep every layer quantized even when the accuracy budget fails on the held-out samples.", rich_help_panel=GATES)] = False,
    activation_error_bound: Annotated[float, typer.Option("--max-activation-error", min=0.0, help="Dynamic mode: a layer whose output would lose more than this fraction to int8 rounding of its input (measured per row on validation's inputs; activation outliers) is stored int8 with a float kernel instead. 0 turns the check off.", rich_help_panel=HOW)] = 1 / 3,
    allow_slower: Annotated[bool, typer.Option("--allow-slower", help="Keep the quantized model even where it runs slower than the original (a warning only); by default the layers measured slower move to int8 storage with float kernels.", rich_help_panel=GATES)] = False,
    max_fallback: Annotated[Optional[int], typer.Option("--max-fallback", min=0, help="Accuracy fallback: keep at most this many layers float to meet the budget (default a quarter of the quantized layers).", rich_help_panel=GATES)] = None,
    no_validate: NoValidateOpt = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: TaskCheckOpt = None,
    output: _output_opt("Output path (default MODEL.int8.onnx, MODEL.int4.onnx, ... next to the input).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Quantize weights (and activations) so onnxruntime runs integer kernels, then validate against the original."""
    config = _quantize_config(mode, bits, block_size, algorithm, act_order, calibration, calibrator, op_types, tuple(exclude or ()), keep_float, per_channel, symmetric)
    if embedding_block_size is not None:
        if not hasattr(config, "embedding_block_size"):
            raise UsageError("--embedding-block-size applies to --bits < 8 (blockwise) only")
        _choice("--embedding-block-size", embedding_block_size, (16, 32, 64, 128, 256))
        config.embedding_block_size = embedding_block_size
    if min_weights:
        if not isinstance(config, QuantizeConfig):
            raise UsageError("--min-weights applies to --mode dynamic only")
        config.min_weights = min_weights
    if isinstance(config, QuantizeConfig):
        config.activation_error_bound = activation_error_bound
    if integer_min_macs is not None:
        if not hasattr(config, "integer_min_macs"):
            raise UsageError("--integer-min-macs applies to --mode dynamic and static only")
        config.integer_min_macs = integer_min_macs
    if smooth is not None:
        if not hasattr(config, "smooth"):
            raise UsageError("--smooth/--no-smooth applies to --mode static only")
        config.smooth = smooth
    if qdq:
        if not hasattr(config, "qdq"):
            raise UsageError("--qdq applies to --mode weights only")
        config.qdq = True
    sensitive = _sensitive_layers(sensitivity_file, max_layer_drift, getattr(config, "bits", 8))
    config.exclude = tuple(config.exclude) + tuple(glob_literal(name) for name, _ in sensitive)
    # What the model records: the resolved configuration, not the raw flags.
    options = {"mode": type(config).__name__.removesuffix("Config"), **asdict(config),
               "calibration": str(calibration) if calibration else None, "threads": threads, "seed": seed}
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    from onnxshrink.fallback import FallbackConfig

    with _progress("quantize"):
        report = api.quantize(model, output, config, calibration=calibration, force=force, validation=validation,
                              run_validation=not no_validate, threads=threads, options=options,
                              fallback=False if no_fallback else FallbackConfig(max_layers=max_fallback),
                              allow_slower=allow_slower, task_check=task_check)
    if sensitive:
        listed = ", ".join(f"{name} ({drift:.4f})" for name, drift in sensitive)
        report.notes.append(f"kept float by --max-layer-drift {max_layer_drift:g} (drift at {getattr(config, 'bits', 8)} bits "
                            f"in {sensitivity_file}): {listed}")
    _emit(as_json, report, lambda console, r: render_command(console, r, verbose))
    _exit_for_validation(report)


def _sensitive_layers(path, max_drift, bits) -> list:
    if (path is None) != (max_drift is None):
        raise UsageError("--sensitivity and --max-layer-drift go together")
    if path is None:
        return []
    from onnxshrink.layer_sensitivity import layers_above, load_report

    return layers_above(load_report(path), bits, max_drift, str(path))


@app.command("prune", cls=_Command, epilog=_examples(
    "onnxshrink prune model.onnx --sparsity 0.8 --calibration calib.npz --data eval.npz --labels labels",
    "onnxshrink prune model.onnx --pattern 2:4 --calibration calib.npz --method sparsegpt",
    "onnxshrink prune model.onnx --sparsity 0.3 --pattern channel --remove-dead-units   # fewer parameters, faster"))
@_edge
def prune_command(
    model: ModelArg,
    op_types: _op_types_opt("MatMul,Gemm,Conv", " to prune") = None,
    exclude: _exclude_opt("leave unpruned") = None,
    keep_float: _keep_float_opt("Leave the first, last or both prunable layers unpruned.") = None,
    layer_sparsity: Annotated[Optional[list[str]], typer.Option("--layer-sparsity", help="NAME=F: this layer's sparsity, overriding the allocation (repeatable).", rich_help_panel=WHAT)] = None,
    sensitivity_file: Annotated[Optional[Path], typer.Option("--sensitivity", help="JSON from `onnxshrink sensitivity --json`: allocate per-layer sparsity from it.", rich_help_panel=WHAT)] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Overall fraction of zeros in the pruned weights, 0..0.98 (not with N:M).", rich_help_panel=HOW)] = None,
    pattern: Annotated[str, typer.Option("--pattern", metavar="[unstructured|N:M|channel]", help="unstructured, N:M (N non-zeros in every M weights along the input axis, such as 2:4), or channel (removes whole output channels: fewer parameters, faster).", rich_help_panel=HOW)] = "unstructured",
    importance: Annotated[Optional[str], typer.Option("--importance", metavar="[magnitude|activation]", help="magnitude (default without data) or activation (|w| x input norm; default with --calibration).", rich_help_panel=HOW)] = None,
    scope: Annotated[str, typer.Option("--scope", metavar="[auto|layer|global]", help="Per-layer allocation: auto (from measured sensitivity), layer (the same everywhere), global (one threshold).", rich_help_panel=HOW)] = "auto",
    calibration: _calibration_opt("activation importance and least-squares reconstruction.") = None,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct", help="With --calibration, update each layer's kept weights (--method); --no-reconstruct is --method mask.", rich_help_panel=HOW)] = True,
    method: Annotated[Optional[str], typer.Option("--method", metavar="[sparsegpt|refit|mask]", help="With --calibration: sparsegpt (OBS updates from each layer's X^T X, towards the original's outputs), refit (least squares to the original's outputs, in stages; the default) or mask (no update).", rich_help_panel=HOW)] = None,
    storage: Annotated[str, typer.Option("--storage", metavar="[dense|sparse]", help="dense (default) or sparse (pruned weights as ONNX sparse initializers: a smaller file, not a faster one).", rich_help_panel=HOW)] = "dense",
    remove_dead_units: Annotated[bool, typer.Option("--remove-dead-units", help="Then remove the units (channels) no pruned weight reads any more: smaller weights, the same outputs.", rich_help_panel=HOW)] = False,
    no_validate: NoValidateOpt = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: TaskCheckOpt = None,
    output: _output_opt("Output path (default MODEL.pruned.onnx next to the input).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Zero (or remove) weights by importance; with calibration data refit the rest to the original's outputs; then validate."""
    from onnxshrink.passes.prune import PruneConfig, parse_nm
    from onnxshrink.layer_sensitivity import load_report

    if parse_nm(pattern) is not None and sparsity is not None:
        raise UsageError(f"--pattern {pattern} fixes the sparsity; drop --sparsity")
    if parse_nm(pattern) is None and sparsity is None:
        raise UsageError("--sparsity is required (the fraction of zeros, such as 0.8)")
    overrides = {}
    for item in layer_sparsity or ():
        name, sep, value = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            overrides[name] = float(value)
        except ValueError:
            raise UsageError(f"--layer-sparsity {item!r}: expected NAME=F, such as fc1/MatMul=0.5") from None
    config = PruneConfig(sparsity=sparsity, pattern=pattern, importance=importance, scope=scope, reconstruct=reconstruct, method=method,
                         exclude=tuple(exclude or ()), keep_float=keep_float, layer_sparsity=overrides, storage=storage,
                         remove_dead_units=remove_dead_units,
                         sensitivity=load_report(sensitivity_file) if sensitivity_file else None, **_op_types(op_types))
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    _rewrite("prune", lambda options: api.prune(model, output, config, calibration=calibration, force=force,
                                                validation=validation, run_validation=not no_validate,
                                                threads=threads, options=options, task_check=task_check),
             config, calibration, threads, seed, verbose, as_json,
             sensitivity=str(sensitivity_file) if sensitivity_file else None)


@app.command("cluster", cls=_Command, epilog=_examples(
    "onnxshrink cluster model.onnx --bits 4 --calibration calib.npz --data eval.npz --labels labels",
    "onnxshrink cluster model.pruned.onnx --bits 4 --other-floats int8 -o small.onnx && onnxshrink pack small.onnx",
    "onnxshrink cluster model.onnx --bits 3 --per channel --rounding gptq --calibration calib.npz"))
@_edge
def cluster_command(
    model: ModelArg,
    op_types: _op_types_opt("MatMul,Gemm,Conv", " to cluster") = None,
    exclude: _exclude_opt("keep float") = None,
    keep_float: _keep_float_opt("Keep the first, last or both clusterable layers float.") = None,
    min_weights: Annotated[int, typer.Option("--min-weights", min=0, help="Keep layers with fewer weights float.", rich_help_panel=WHAT)] = 0,
    bits: Annotated[int, typer.Option("--bits", help="Codebook of 2^bits shared values per layer (1..8); indices stored as uint8.", rich_help_panel=HOW)] = 4,
    per: Annotated[str, typer.Option("--per", metavar="[layer|channel]", help="layer (one codebook per weight tensor) or channel (one per output channel).", rich_help_panel=HOW)] = "layer",
    weighting: Annotated[Optional[str], typer.Option("--weighting", metavar="[none|activation]", help="none, or activation (k-means weighted by input energy E(x^2); needs --calibration; the default with it).", rich_help_panel=HOW)] = None,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="With --calibration, refit codebook values and biases to the original model's layer outputs.", rich_help_panel=HOW)] = True,
    calibration: _calibration_opt("activation weighting and least-squares refit.") = None,
    rounding: Annotated[Optional[str], typer.Option("--rounding", metavar="[nearest|gptq]", help="nearest (default), or gptq: each input's rounding error folded into the inputs not yet rounded (needs --calibration).", rich_help_panel=HOW)] = None,
    capture_rounds: Annotated[int, typer.Option("--capture-rounds", min=-1, help="With --calibration: 0 one capture run per wave of layers (exact, the default); N at most N runs (faster; 6 is one per block on MiniLM); -1 one run per layer.", rich_help_panel=HOW)] = 0,
    channel_scales: Annotated[Optional[bool], typer.Option("--channel-scales/--no-channel-scales", help="One codebook per layer: divide each output channel by its peak first (an fp16 scale a channel, folded at load). Default: on for layers of 256 inputs or more, where the scales cost at most 1/16 bit a weight.", rich_help_panel=HOW)] = None,
    outliers: Annotated[float, typer.Option("--outliers", metavar="F", help="Store the fraction F (such as 0.005) of each layer's weights largest in magnitude exactly, as fp16 values at uint32 positions beside the codebook (dense-and-sparse; folded at load): the codebook then spans the rest. Default 0: none.", rich_help_panel=HOW)] = 0.0,
    codebook_form: Annotated[str, typer.Option("--codebook", metavar="[kmeans|entropy]", help="kmeans (default): 2^bits values fitted by k-means; entropy: evenly spaced values (up to 256) at no more error, where their indices take fewer bits once packed (one codebook a layer).", rich_help_panel=HOW)] = "kmeans",
    table_rows: Annotated[str, typer.Option("--table-rows", metavar="[uniform|frequency]", help="A vocabulary table's rows (a Gather of token ids): uniform (default), or frequency: with --calibration, the rows of tokens the calibration data never reads on a 3x coarser step, so they pack smaller (best with --codebook entropy).", rich_help_panel=HOW)] = "uniform",
    float16: Annotated[bool, typer.Option("--float16", help="Also store the float32 tensors left (biases, codebooks, norms, embeddings) as fp16, behind Casts onnxruntime folds (= --other-floats fp16).", rich_help_panel=HOW)] = False,
    other_floats: Annotated[str, typer.Option("--other-floats", metavar="[fp32|fp16|int8]", help="fp32, fp16, or int8: biases, norms and embeddings as int8 with one scale each (fp16 where that would change them by over 1%), codebooks as fp16.", rich_help_panel=HOW)] = "fp32",
    no_validate: NoValidateOpt = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: TaskCheckOpt = None,
    output: _output_opt("Output path (default MODEL.cluster4.onnx, ... next to the input).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Share weights (Deep Compression): uint8 indices into small float codebooks that onnxruntime folds at load; then validate."""
    from onnxshrink.passes.cluster import ClusterConfig

    config = ClusterConfig(bits=bits, per=per, weighting=weighting, refit=refit, exclude=tuple(exclude or ()),
                           keep_float=keep_float, min_weights=min_weights, float16=float16, other_floats=other_floats,
                           rounding=rounding, capture_rounds=capture_rounds, codebook=codebook_form,
                           table_rows=table_rows, channel_scales=channel_scales, outliers=outliers,
                           **_op_types(op_types))
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    _rewrite("cluster", lambda options: api.cluster(model, output, config, calibration=calibration, force=force,
                                                    validation=validation, run_validation=not no_validate,
                                                    threads=threads, options=options, task_check=task_check),
             config, calibration, threads, seed, verbose, as_json)


@app.command("factorize", cls=_Command, epilog=_examples(
    "onnxshrink factorize model.onnx --energy 0.99 --calibration calib.npz --data eval.npz --labels labels",
    "onnxshrink factorize model.onnx --rank-ratio 0.25 --op-types MatMul --exclude 'head*'"))
@_edge
def factorize_command(
    model: ModelArg,
    op_types: _op_types_opt("MatMul,Gemm", " to factorize") = None,
    exclude: _exclude_opt("leave as they are") = None,
    keep_float: _keep_float_opt("Leave the first, last or both factorizable layers as they are.") = None,
    rank_ratio: Annotated[Optional[float], typer.Option("--rank-ratio", help="Keep ceil(R x min(K, N)) of each [K, N] weight's rank, 0 < R <= 1 (a layer saves parameters only below K*N/(K+N)).", rich_help_panel=HOW)] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="Or: the smallest rank keeping this fraction of the squared singular values (of the output, with --calibration), such as 0.99.", rich_help_panel=HOW)] = None,
    calibration: _calibration_opt("minimise each layer's output error (SVD of the whitened weight), refit biases.") = None,
    allow_slower: Annotated[bool, typer.Option("--allow-slower", help="Factorize layers even where the two thin MatMuls timed slower than the one (small layers at batch 1).", rich_help_panel=HOW)] = False,
    no_validate: NoValidateOpt = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: TaskCheckOpt = None,
    output: _output_opt("Output path (default MODEL.factorized.onnx next to the input).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Low-rank factorization: each MatMul/Gemm weight W as two thin ones, X @ A @ B (truncated SVD; data-aware with --calibration); then validate."""
    from onnxshrink.passes.factorize import FactorizeConfig

    if rank_ratio is None and energy is None:
        raise UsageError("--rank-ratio or --energy is required (such as --rank-ratio 0.5 or --energy 0.99)")
    config = FactorizeConfig(rank_ratio=rank_ratio, energy=energy, exclude=tuple(exclude or ()), keep_float=keep_float,
                             check_latency=not allow_slower, **_op_types(op_types))
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    _rewrite("factorize", lambda options: api.factorize(model, output, config, calibration=calibration, force=force,
                                                        validation=validation, run_validation=not no_validate,
                                                        threads=threads, options=options, task_check=task_check),
             config, calibration, threads, seed, verbose, as_json)


@app.command("compress", cls=_Command, epilog=_examples(
    "onnxshrink compress model.onnx --calibration calib.npz --data eval.npz --labels labels --max-accuracy-drop 0.01",
    "onnxshrink compress model.onnx --calibration calib.npz --min-cosine 0.99 --max-candidates 20 --save-recipe r.toml",
    "onnxshrink compress model.onnx --recipe r.toml --calibration calib.npz -o model.shrink   # replay a search"))
@_edge
def compress_command(
    model: ModelArg,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe: passes in order with per-layer settings; runs it instead of searching.", rich_help_panel=HOW)] = None,
    allow_other_data: Annotated[bool, typer.Option("--allow-other-data", help="--recipe: build even though the recipe records other calibration data than --calibration gives (or none): the model will differ from the one the recipe was saved from.", rich_help_panel=HOW)] = False,
    calibration: _calibration_opt("reconstruction, GPTQ, codebook refits; judging data when --data is not given.") = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Stop searching after this long: 90s, 5m, 1h or seconds (default 10m, none with --max-candidates alone). The best valid model so far is always on disk. How far a search gets in seconds depends on the machine: for the same bytes everywhere use --max-candidates.", rich_help_panel=HOW)] = None,
    max_candidates: Annotated[Optional[int], typer.Option("--max-candidates", min=1, help="Stop after N candidates (the lossless start included): a budget that gives the same output on every machine. With --time-budget as well, whichever comes first stops the search.", rich_help_panel=HOW)] = None,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    task_check: Annotated[Optional[str], typer.Option("--task-check", metavar="CMD", help="Your own check of the task (boxes found, text read), run on each candidate that passes the thresholds: a command that exits 0 to accept it. {model} in CMD is the candidate (a runnable .onnx), {original} the input; without {model} the candidate's path is appended.", rich_help_panel=GATES)] = None,
    output: _output_opt("Output path: .shrink writes the packed file, .onnx the runnable model (default MODEL.compressed.shrink).") = None,
    save_recipe: Annotated[Optional[Path], typer.Option("--save-recipe", help="Write the chosen pipeline, per layer, as a TOML recipe.", rich_help_panel=OUTPUT)] = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Find the smallest model within an accuracy/drift budget (prune, quantize or cluster per layer, pack), or run a recipe."""
    from onnxshrink.compress_search import DEFAULT_TIME_BUDGET_S, CompressConfig, compress, parse_duration
    from onnxshrink.render import render_compress

    if time_budget is not None:
        seconds = parse_duration(time_budget)
    else:  # a candidate budget alone is the whole budget: a clock would make the result depend on the machine
        seconds = None if max_candidates is not None else DEFAULT_TIME_BUDGET_S
    config = CompressConfig(thresholds=Thresholds(max_drift, min_cosine, None, max_accuracy_drop, None),
                            data=str(data) if data else None, labels=labels, samples=samples,
                            shapes=data_mod.parse_shape_overrides(shape),
                            calibration=str(calibration) if calibration else None, time_budget_s=seconds,
                            max_candidates=max_candidates, threads=threads, seed=seed, workers=workers,
                            executor=executor, ray_address=ray_address, task_check=task_check)
    # One clock: with a time budget the search reports seconds of it, and the display shows those as its elapsed time.
    display = ProgressDisplay("compress", unit=" s" if seconds is not None else " candidates",
                              budget_seconds=seconds is not None and recipe is None)
    try:
        with display:
            # A replayed recipe has no budget to count against: its steps are shown with the elapsed time alone.
            report = compress(model, output, config, recipe=recipe, save_recipe=save_recipe, force=force,
                              progress=display if recipe is None else lambda phase, done, total: display(phase, 0, 0),
                              allow_other_data=allow_other_data)
    except KeyboardInterrupt as exc:
        from onnxshrink.model import default_output

        word, code = _interrupted(exc)
        written = output or default_output(model, "compressed", ".shrink")
        message = f"{written} holds the best valid model found so far, if one was written"
        Console(stderr=True).print(f"[red]{word}[/]; {escape(message)}", highlight=False)
        _json_error(code, f"{word}; {message}")
        raise typer.Exit(code) from None
    _emit(as_json, report, lambda console, r: render_compress(console, r, verbose))
    if not report.passed:
        raise typer.Exit(EXIT_THRESHOLD)


@app.command("sensitivity", cls=_Command, epilog=_examples(
    "onnxshrink sensitivity model.onnx --calibration calib.npz -o sens.json",
    "onnxshrink prune model.onnx --sparsity 0.8 --sensitivity sens.json          # allocate sparsity from it",
    "onnxshrink quantize model.onnx --bits 4 --sensitivity sens.json --max-layer-drift 0.05"))
@_edge
def sensitivity_command(
    model: ModelArg,
    op_types: _op_types_opt("MatMul,Gemm,Conv") = None,
    exclude: _exclude_opt("skip") = None,
    sparsities: Annotated[str, typer.Option("--sparsities", help="Comma-separated sparsities to try on each layer.", rich_help_panel=HOW)] = "0.25,0.5,0.7,0.8,0.9,0.95",
    bits: Annotated[str, typer.Option("--bits", help="Comma-separated bit widths (2-8) to round each layer to.", rich_help_panel=HOW)] = "8,4,3,2",
    importance: Annotated[Optional[str], typer.Option("--importance", metavar="[magnitude|activation]", help="magnitude or activation (default: activation with --calibration).", rich_help_panel=HOW)] = None,
    calibration: _calibration_opt("measure on it (without it: synthetic inputs, magnitude importance).") = None,
    shape: ShapeOpt = None,
    output: _output_opt("Also write the JSON report here (for prune --sensitivity).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    debug: DebugOpt = False,
) -> None:
    """Measure each layer's effect on the model's outputs when pruned alone at several sparsities, or rounded to n bits."""
    from onnxshrink.render import render_sensitivity
    from onnxshrink.layer_sensitivity import SensitivityConfig

    try:
        grid = tuple(float(s) for s in sparsities.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--sparsities {sparsities!r}: expected comma-separated fractions such as 0.5,0.8") from None
    try:
        widths = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"--bits {bits!r}: expected comma-separated integers such as 8,4") from None
    _choice("--importance", importance, (None, "magnitude", "activation"))
    config = SensitivityConfig(sparsities=grid, importance=importance, exclude=tuple(exclude or ()), bits=widths,
                               **_op_types(op_types))
    from onnxshrink import model as model_io

    if output is not None:
        model_io.check_output_path(output, [model], force, with_data=False)  # one JSON file
    with _progress("sensitivity"):
        report = api.sensitivity(model, calibration, config, threads=threads, shapes=data_mod.parse_shape_overrides(shape))
    if output is not None:
        model_io.write_atomically(output, lambda stream: stream.write((report.to_json() + "\n").encode()))
    _emit(as_json, report, lambda console, r: render_sensitivity(console, r, verbose))


def _choice(option: str, value, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(str(a) for a in allowed if a is not None)}, not {value!r}")


def _quantize_config(mode, bits, block_size, algorithm, act_order, calibration, calibrator, op_types, exclude, keep_float, per_channel, symmetric):
    """Options -> the config whose type picks the quantize mode; contradictions are usage errors."""
    _choice("--mode", mode, (None, "dynamic", "static", "weights"))
    _choice("--keep-float", keep_float, (None, "first", "last", "both"))
    _choice("--algorithm", algorithm, ("rtn", "gptq"))
    _choice("--calibrator", calibrator, ("minmax", "percentile", "entropy", "mse"))
    selected = _op_types(op_types)
    types = selected.get("op_types")
    common = {"exclude": exclude, "keep_float": keep_float, "symmetric": symmetric, **selected}
    if bits < 8 or algorithm == "gptq":
        if mode not in (None, "weights"):
            which = f"--bits {bits}" if bits < 8 else "--algorithm gptq"
            raise UsageError(f"{which} quantizes weights blockwise (MatMulNBits); it cannot be combined with --mode {mode}")
        _choice("--block-size", block_size, (16, 32, 64, 128, 256))
        # onnxruntime's MatMulNBits kernel exists for these widths only; others would run as slow weight-only QDQ.
        if bits not in (2, 4, 8):
            raise UsageError(f"--bits {bits}: onnxruntime runs 2-, 4- and 8-bit weights only (MatMulNBits); for {bits}-bit "
                             f"storage use `onnxshrink cluster --bits {bits}` (codebooks that run as fast as fp32)")
        if algorithm == "gptq" and calibration is None:
            raise UsageError("--algorithm gptq needs --calibration FILE.npz")
        from onnxshrink.passes.quantize_blockwise import BlockwiseConfig

        _check_types(types, ("MatMul", "Gemm"))
        return BlockwiseConfig(bits=bits, block_size=block_size, algorithm=algorithm, act_order=act_order, **common)
    mode = mode or ("static" if calibration is not None else "dynamic")
    if mode == "static":
        if calibration is None:
            raise UsageError("--mode static needs --calibration FILE.npz")
        from onnxshrink.passes.quantize_static import StaticQuantizeConfig

        _check_types(types, ("MatMul", "Gemm", "Conv"))
        return StaticQuantizeConfig(calibrator=calibrator, per_channel=per_channel, **common)
    if calibration is not None:
        raise UsageError(f"--calibration is not used by --mode {mode}")
    if mode == "weights":
        _check_types(types, ("MatMul", "Gemm", "Conv"))
        return WeightsOnlyConfig(per_channel=per_channel, **common)
    _check_types(types, ("MatMul", "Gemm", "Conv"))
    return QuantizeConfig(per_channel=per_channel, **common)


def _check_types(types, allowed) -> None:
    unknown = set(types or ()) - set(allowed)
    if unknown:
        raise UsageError(f"--op-types: unsupported op type(s) {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")


@app.command("flush-denormals", cls=_Command, epilog=_examples(
    "onnxshrink inspect model.onnx            # counts the denormal weights",
    "onnxshrink flush-denormals model.onnx --data eval.npz --labels labels --max-accuracy-drop 0"))
@_edge
def flush_denormals_command(
    model: ModelArg,
    no_validate: NoValidateOpt = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    task_check: TaskCheckOpt = None,
    output: _output_opt("Output path (default MODEL.ftz.onnx next to the input).") = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    debug: DebugOpt = False,
) -> None:
    """Zero denormal float weights (CPUs compute with them many times slower; `inspect` counts them), then validate."""
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    with _progress("flush-denormals"):
        report = api.flush_denormals(model, output, force=force, validation=validation, run_validation=not no_validate,
                                     threads=threads, task_check=task_check)
    _emit(as_json, report, lambda console, r: render_command(console, r, verbose))
    _exit_for_validation(report)


@app.command("pack", cls=_Command, epilog=_examples(
    "onnxshrink pack model.pruned.cluster4.onnx -o model.shrink",
    "onnxshrink validate model.onnx model.shrink --data eval.npz --labels labels   # size and accuracy vs the original",
    "onnxshrink pack model.onnx -v --all          # every tensor: coding, bits per symbol, bytes"))
@_edge
def pack_command(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX model file (float, quantized or pruned).", show_default=False)],
    output: _output_opt("Output path (default MODEL.shrink next to the input).") = None,
    favor: Annotated[str, typer.Option("--favor", metavar="[load|size]", help="load (default): a graph record of 1 MiB or more in zstd, which loads 20-50x faster than LZMA, unless LZMA saves over 0.5% of the pack, and the same 0.5% allowance gives large tensors LZMA would keep in the graph records of their own; size: whichever is smaller.", rich_help_panel=HOW)] = "load",
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    show_all: ShowAllOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a .shrink file: the graph as ONNX, every weight Huffman-coded losslessly (unpack restores it bit for bit)."""
    with _progress("pack"):
        report = api.pack(model, output, force=force, favor=favor)
    _emit(as_json, report, lambda console, r: render_pack(console, r, show_all, verbose))


@app.command("unpack", cls=_Command, epilog=_examples(
    "onnxshrink unpack model.shrink -o model.onnx",
    "onnxshrink unpack model.shrink --json | jq .size"))
@_edge
def unpack_command(
    pack_file: Annotated[Path, typer.Argument(metavar="PACK", help="A .shrink file written by `onnxshrink pack`.", show_default=False)],
    output: _output_opt("Output path (default MODEL.unpacked.onnx next to the input).") = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Restore the standard ONNX model from a .shrink file, identical in every tensor to the one packed."""
    with _progress("unpack"):
        report = api.unpack(pack_file, output, force=force)
    _emit(as_json, report, render_command)


def main() -> None:
    """Console entry point: Click usage errors exit 2, everything else goes through the command edge.

    SIGTERM and SIGHUP are handled as Ctrl-C is (staging files removed, nothing partial left), with exit codes 143
    and 129. A SIGHUP already ignored (nohup) stays ignored.
    """
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program): its own signal handling stands
        pass
    try:
        app()
    except KeyboardInterrupt as exc:
        word, code = _interrupted(exc)
        sys.stderr.write(word + "\n")
        _json_error(code, word)
        sys.exit(code)
