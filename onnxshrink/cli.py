"""Typer CLI: parse options -> config -> library call -> render. Domain errors become exit codes here only."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer depends on click itself
    from click import exceptions as click_exceptions
from rich.console import Console
from rich.markup import escape

from onnxshrink import __version__, api
from onnxshrink import data as data_mod
from onnxshrink.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_THRESHOLD, OnnxShrinkError, UsageError
from onnxshrink.passes.quantize import QuantizeConfig
from onnxshrink.render import render_command, render_info, render_validation
from onnxshrink.validate import Thresholds, ValidateConfig

class _OneLineErrors(TyperGroup):
    """Click's own usage errors (unknown option, bad value, missing argument) as one `error:` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
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
        except typer.Abort:
            sys.stderr.write("interrupted\n")
            code = EXIT_INTERRUPTED
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="onnxshrink",
    cls=_OneLineErrors,
    help="Make ONNX models smaller and faster, and prove with onnxruntime how far they drifted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout; human output goes to stderr.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="onnxruntime intra-op threads, the same for every model run.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for synthesized inputs and any random choice.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output file.")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help=".npz whose keys are the model's input names (batch along axis 0).")]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="Key of an integer labels array in --data; enables task accuracy.")]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", min=1, help="Use only the first N samples (default: all; 16 when synthesized).")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--shape", help="Shape for synthesized inputs, NAME=D1,D2,... (repeatable).")]
MaxDriftOpt = Annotated[Optional[float], typer.Option("--max-drift", help="Fail (exit 1) if any output's max abs error exceeds this.")]
MinCosineOpt = Annotated[Optional[float], typer.Option("--min-cosine", help="Fail if any output's mean cosine similarity is below this.")]
MinAgreeOpt = Annotated[Optional[float], typer.Option("--min-agreement", help="Fail if top-1 agreement of class-score outputs is below this.")]
MaxAccDropOpt = Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Fail if accuracy drops by more than this (absolute; 0.01 = 1 point). Needs --labels.")]
MaxLatOpt = Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Fail if candidate/original p50 latency exceeds this.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"onnxshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Make ONNX models smaller and faster, and prove with onnxruntime how far they drifted.

    Exit codes: 0 ok, 1 a threshold failed, 2 usage error, 3 unusable input,
    4 unsupported model, 5 cannot write the output, 70 internal error, 130 interrupted.
    """


def _consoles(as_json: bool) -> Console:
    """Human output: stdout normally, stderr under --json so stdout holds only the JSON document."""
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console.width = 160  # logs and pipes: wide enough for the tables, never folded at 80
    return console


def _edge(func):
    """Turn every failure into a one-line message and a documented exit code (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        err = Console(stderr=True, soft_wrap=True)
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except OnnxShrinkError as exc:
            if debug:
                traceback.print_exc()
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]; no output was written", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debug:
                traceback.print_exc()
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            err.print(f"[red]internal error:[/] {type(exc).__name__}: {escape(line)} (rerun with --debug for the traceback)", highlight=False)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _emit(as_json: bool, report, render) -> None:
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    render(_consoles(as_json), report)


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


@app.command("inspect")
@_edge
def inspect_command(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    show_all: Annotated[bool, typer.Option("--all", help="List every tensor, not only the 40 largest.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show inputs, outputs, opsets, operators and every constant tensor, classified as compressible or not."""
    info = api.inspect(model)
    _emit(as_json, info, lambda console, r: render_info(console, r, show_all))


@app.command("validate")
@_edge
def validate_command(
    original: Annotated[Path, typer.Argument(help="The reference model.")],
    candidate: Annotated[Path, typer.Argument(help="The compressed model to judge.")],
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run both models in onnxruntime on the same inputs; report drift, accuracy, latency and size. Exit 1 if a threshold fails."""
    config = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    report = api.validate(original, candidate, config)
    _emit(as_json, report, render_validation)
    if not report.passed:
        raise typer.Exit(EXIT_THRESHOLD)


@app.command("quantize")
@_edge
def quantize_command(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path (default MODEL.int8.onnx next to the input).")] = None,
    op_types: Annotated[str, typer.Option("--op-types", help="Comma-separated op types to quantize.")] = "MatMul,Gemm",
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob on node names to keep float (repeatable).")] = None,
    keep_float: Annotated[Optional[str], typer.Option("--keep-float", help="Keep the first, last or both quantizable layers float.")] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or one per tensor.")] = True,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Symmetric int8 weights (zero point 0) or asymmetric.")] = True,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the comparison against the original.")] = False,
    data: DataOpt = None,
    labels: LabelsOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    max_drift: MaxDriftOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreeOpt = None,
    max_accuracy_drop: MaxAccDropOpt = None,
    max_latency_ratio: MaxLatOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Quantize MatMul/Gemm weights to int8 with run-time activation quantization (integer kernels in onnxruntime), then validate."""
    if keep_float not in (None, "first", "last", "both"):
        raise UsageError(f"--keep-float must be first, last or both, not {keep_float!r}")
    types = tuple(t.strip() for t in op_types.split(",") if t.strip())
    unknown = set(types) - {"MatMul", "Gemm", "Conv"}
    if unknown:
        raise UsageError(f"--op-types: unsupported op type(s) {', '.join(sorted(unknown))} (choose from MatMul, Gemm, Conv)")
    config = QuantizeConfig(op_types=types, exclude=tuple(exclude or ()), keep_float=keep_float, per_channel=per_channel, symmetric=symmetric)
    validation = _validate_config(data, labels, samples, shape, threads, seed, max_drift, min_cosine, min_agreement, max_accuracy_drop, max_latency_ratio)
    options = {"op_types": list(types), "exclude": list(exclude or ()), "keep_float": keep_float, "per_channel": per_channel,
               "symmetric": symmetric, "threads": threads, "seed": seed, "mode": "dynamic"}
    report = api.quantize(model, output, config, force=force, validation=validation, run_validation=not no_validate, threads=threads, options=options)
    _emit(as_json, report, render_command)
    if report.validation is not None and not report.validation.passed:
        raise typer.Exit(EXIT_THRESHOLD)


def main() -> None:
    """Console entry point: Click usage errors exit 2, everything else goes through the command edge."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
