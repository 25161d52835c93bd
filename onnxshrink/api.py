"""The library API. Silent: it returns reports and raises OnnxShrinkError subclasses; it never prints."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import onnx

from onnxshrink import memory
from onnxshrink import model as model_io
from onnxshrink import streaming
from onnxshrink.errors import InputsUnavailable, ModelLoadError, OutputError, UsageError
from onnxshrink.info import inspect_model
from onnxshrink.data import MIN_CALIBRATION, MIN_HOLDOUT, input_specs, load_npz, split_holdout, trim_padding
from onnxshrink.passes.common import glob_literal, handed_over
from onnxshrink.passes.folded_weights import FOLDED, INTEGER_MIN_MACS, constant_nodes_left
from onnxshrink.passes.quantize import QuantizeConfig, QuantizeDynamic, inputs_for
from onnxshrink.passes.quantize_weights import QuantizeWeightsOnly, WeightsOnlyConfig
from onnxshrink.report import CommandReport, ModelInfo, ValidationReport, latency_slower
from onnxshrink.runtime import make_session, op_counts, optimized_graph, optimized_op_counts
from onnxshrink.task_check import MIN_TIMEOUT_S, Verdict, add_to_report, make_check, task_rejected
from onnxshrink.validate import ValidateConfig, not_validated
from onnxshrink.validate import validate as _validate

INTEGER_KERNELS = ("com.microsoft.MatMulIntegerToFloat", "com.microsoft.DynamicQuantizeMatMul", "MatMulInteger",
                   "com.microsoft.QGemm", "QLinearMatMul", "com.microsoft.MatMulNBits", "QLinearConv",
                   "com.microsoft.QLinearConv", "ConvInteger")
FUSED_KERNELS = ("com.microsoft.MatMulIntegerToFloat", "com.microsoft.DynamicQuantizeMatMul", "com.microsoft.QGemm",
                 "QLinearMatMul", "com.microsoft.MatMulNBits", "QLinearConv", "com.microsoft.QLinearConv")
# The NCHWc layout transformer (AVX2/AVX-512 CPUs) turns a float Conv into nchwc.Conv: still a float kernel.
FLOAT_KERNELS = ("MatMul", "Gemm", "Conv", "com.microsoft.FusedMatMul", "com.microsoft.FusedConv", "com.microsoft.FusedGemm",
                 "com.microsoft.nchwc.Conv")


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model (with external data) or raise ModelLoadError naming the problem."""
    return model_io.load(path)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write atomically; the file is checked with the ONNX full checker before it lands."""
    return model_io.save(model, path, force=force)


def session(path: str | os.PathLike, sess_options=None, providers=None, *, threads: int = 1):
    """An onnxruntime InferenceSession for a model file; a `.shrink` pack is decoded in memory, no file written.

    Without `sess_options`, the CPU session onnxshrink itself measures with (`threads` intra-op threads).
    """
    if sess_options is None and providers is None:  # a pack is decoded once, its weights handed over as arrays
        return make_session(model_io.session_source(path), threads)
    import onnxruntime as ort

    source = model_io.session_source(path, split_weights=False)  # a path, or a pack's bytes
    return ort.InferenceSession(source, sess_options, providers=providers or ["CPUExecutionProvider"])


def inspect(path: str | os.PathLike) -> ModelInfo:
    return inspect_model(path)


def validate(original: str | os.PathLike, candidate: str | os.PathLike, config: ValidateConfig | None = None, *,
             task_check=None) -> ValidationReport:
    """Compare two model files; with `task_check` (a command, or a function of the two paths: task_check.py) its
    verdict on them is one more check."""
    check = make_check(task_check)  # a bad command: a UsageError before anything runs
    report = _validate(original, candidate, config)
    if check is not None:
        add_to_report(report, task_verdict(check, Path(original), Path(candidate)))
    return report


def task_verdict(check, original: Path, candidate: Path, timeout: float | None = None,
                 scratch: Path | None = None) -> Verdict:
    """A task check's verdict (task_check.py) on two model files, each given to it as a runnable .onnx: a pack
    (.shrink) is unpacked into `scratch` (a temporary folder when None) and removed afterwards. `timeout` counts
    from the call, the unpacking included."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".task-check-") as folder:
        paths = []
        for role, path in (("original", Path(original)), ("candidate", Path(candidate))):
            if model_io.is_pack(path):
                unpacked = Path(folder) / f"{role}.onnx"
                unpack(path, unpacked, force=True)
                path = unpacked
            paths.append(path)
        left = None if timeout is None else max(timeout - (time.monotonic() - started), MIN_TIMEOUT_S)
        return check(paths[0], paths[1], timeout=left)


def quantize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config: QuantizeConfig | WeightsOnlyConfig | object | None = None,
    *,
    calibration: str | os.PathLike | None = None,
    force: bool = False,
    validation: ValidateConfig | None = None,
    run_validation: bool = True,
    threads: int = 1,
    options: dict | None = None,
    fallback=True,
    allow_slower: bool = False,
    latency_guard=None,
    task_check=None,
) -> CommandReport:
    """Quantize a model file and validate the result against the original.

    The config's type picks the mode: QuantizeConfig (dynamic int8, the default),
    StaticQuantizeConfig (QDQ with calibrated activations; needs `calibration`),
    BlockwiseConfig (n-bit blockwise weights, MatMulNBits), WeightsOnlyConfig
    (weight-only QDQ for other runtimes). When validation thresholds fail, the result
    is written as `OUTPUT.failed.onnx`, any existing OUTPUT is left untouched, and the
    report's validation says why. `task_check` (a command, or a function of the two paths: task_check.py) is one
    more check of the result, as in `validate`: a rejection fails it the same way.

    Accuracy fallback (fallback.py; `fallback` True, a FallbackConfig, or False for none): when validation
    judges on real samples (`--data`, or the held-out part of `calibration`) and an accuracy budget is set
    (max_drift, min_cosine, min_agreement, max_accuracy_drop), the most sensitive layers are kept float one at
    a time until it holds. Static mode with held-out calibration samples and no budget aims at
    min_cosine 0.99 on every output (a validation threshold too); the other modes only with a budget given.

    Latency guard (latency_guard.py), after the fallback: the result is timed against the original (batch 1, and 8
    where the batch is symbolic); where it is slower beyond noise, the layers the profiler finds slower than their
    float originals move to the folded form (int8 storage, float kernels) until it is not; failing that, whole-model
    forms (every layer folded, then for static mode dynamic mode), each within the fallback's accuracy budget on its
    held-out samples, and the first no slower is written (else the fastest measured). `allow_slower` keeps
    the first result (validation still warns); `latency_guard` a GuardConfig, or a callable(original) -> measurement
    (tests inject one). It does not run without validation, latency measurement, or inputs that run the model,
    for external-data models, or in weight-only mode (its output is for other runtimes).
    """
    from onnxshrink.fallback import AccuracyFallback, FallbackConfig, budget_of, evaluation_data

    config = config if config is not None else QuantizeConfig()
    suffix = f"int{config.bits}" if hasattr(config, "bits") else "int8"
    fallback_config = fallback if isinstance(fallback, FallbackConfig) else FallbackConfig() if fallback else None
    if fallback_config is not None and run_validation:
        # A copy: the default budget below is added to it, never to the caller's object.
        validation = dataclasses.replace(validation or ValidateConfig(threads=threads))
    loop, default_budget, skipped, guard, guard_skipped = None, False, None, None, None

    def make_pass(model: onnx.ModelProto):
        nonlocal guard, guard_skipped
        first = choose_pass(model)
        guard_skipped = None if allow_slower else _guard_skipped(config, model, validation, run_validation)
        if allow_slower or guard_skipped:
            return first
        from onnxshrink.latency_guard import GuardConfig, LatencyGuard, measurement_for

        def kept():  # the layers the accuracy fallback kept float: every rebuild keeps them float
            return tuple(glob_literal(d["node"]) for d in loop.summary.layers) if loop is not None else ()

        def rebuild(fold, fresh):
            return _quantize_pass(_refine(config, kept(), fold), fresh, calibration, validation, run_validation, threads)(fresh)

        forms = _whole_forms(config, rebuild, kept, inputs_for(model, validation, calibration, threads))
        judge = _fallback_judge(loop)
        if callable(latency_guard) and not isinstance(latency_guard, GuardConfig):
            guard = LatencyGuard(first, rebuild, latency_guard, forms=forms, judge=judge)
        else:
            settings = latency_guard or GuardConfig()
            guard = LatencyGuard(first, rebuild, lambda original: measurement_for(
                original, validation, calibration, threads, settings), settings, forms=forms, judge=judge)
        return guard

    def choose_pass(model: onnx.ModelProto):
        nonlocal loop, default_budget, skipped

        def build(extra=()):
            return _quantize_pass(_refine(config, extra), model, calibration, validation, run_validation, threads)

        if fallback_config is None or not run_validation:
            return build()
        budget = budget_of(validation.thresholds)
        static = type(config).__name__ == "StaticQuantizeConfig"
        if budget is None and not (static and calibration is not None):
            return build()
        if budget is not None and budget.max_accuracy_drop is not None and not (validation.data and validation.labels):
            raise UsageError("--max-accuracy-drop needs --data and --labels")  # as validate says, before any work
        found = evaluation_data(model, validation, calibration)
        if found is None:  # judged on synthetic inputs at most: nothing real to fall back against
            if budget is not None:
                skipped = ("validation has no real samples to judge on (give --data, or --calibration with at least "
                           f"{MIN_HOLDOUT + MIN_CALIBRATION} samples, a quarter of them held out)")
            return build()
        if model_io.has_external_data(model):
            # The loop holds the model and its candidates in memory, and onnxruntime takes them serialized (< 2 GiB).
            skipped = "the model keeps its weights in external data (too large to hold its candidates in memory)"
            return build()
        if budget is None:
            from onnxshrink.fallback import DEFAULT_MIN_COSINE
            from onnxshrink.validate import Thresholds

            validation.thresholds = dataclasses.replace(validation.thresholds or Thresholds(), min_cosine=DEFAULT_MIN_COSINE)
            budget, default_budget = budget_of(validation.thresholds), True
        loop = AccuracyFallback(build, budget, *found, config=fallback_config, threads=threads)
        return loop

    report = _run_pass_command(
        "quantize", model_path, output, suffix, make_pass, force=force,
        validation=validation, run_validation=run_validation, threads=threads, calibration=calibration,
        options=options if options is not None else asdict(config), task_check=task_check,
    )
    if skipped:
        report.notes.append(f"accuracy fallback did not run: {skipped}")
    if loop is not None:
        report.fallback = asdict(loop.summary)
        if default_budget:
            report.notes.append(f"static mode with held-out calibration samples and no accuracy budget given: the budget "
                                f"is min_cosine {loop.budget.min_cosine:g} on every output (--min-cosine etc. set "
                                "another, --no-fallback none)")
    if guard_skipped:
        report.notes.append(f"latency guard did not run: {guard_skipped}")
    if guard is not None:
        if guard.note():
            report.notes.append(guard.note())
        if guard.skipped is None:
            report.latency_guard = asdict(guard.summary)
    return report


def _refine(config, exclude=(), fold=()):
    """The config with node-name globs added to its exclude (the accuracy fallback's float layers) and fold (the
    latency guard's folded ones)."""
    changes = {}
    if exclude:
        changes["exclude"] = tuple(config.exclude) + tuple(exclude)
    if fold:
        changes["fold"] = tuple(config.fold) + tuple(fold)
    return dataclasses.replace(config, **changes) if changes else config


def _whole_forms(config, rebuild, kept, dynamic_inputs=None) -> list:
    """The latency guard's whole-model forms for this mode, cheapest first: every layer folded (int8 storage, float
    kernels: near-lossless, fp32's speed), then, for static mode, dynamic mode (no Q/DQ pairs between layers), with
    dynamic mode's own activation check (`dynamic_inputs`: passes/quantize.inputs_for)."""
    from onnxshrink.latency_guard import WholeForm
    from onnxshrink.passes.quantize import SUPPORTED_OPS

    forms = [WholeForm("folded", lambda fresh: rebuild(("*",), fresh), "every layer folded (int8 storage, float kernels)")]
    if type(config).__name__ == "StaticQuantizeConfig":
        # The static default threshold becomes dynamic's (its integer kernel pays from smaller layers); one the
        # user set (0: integer kernels everywhere) carries over.
        macs = INTEGER_MIN_MACS["dynamic"] if config.integer_min_macs == INTEGER_MIN_MACS["static"] else config.integer_min_macs
        dynamic = QuantizeConfig(op_types=tuple(o for o in config.op_types if o in SUPPORTED_OPS),
                                 exclude=tuple(config.exclude), keep_float=config.keep_float, per_channel=config.per_channel,
                                 symmetric=config.symmetric, integer_min_macs=macs, embeddings=config.embeddings)
        forms.append(WholeForm("dynamic", lambda fresh: QuantizeDynamic(_refine(dynamic, kept()), inputs=dynamic_inputs)(fresh),
                               "dynamic mode (int8 weights, activations quantized at run time)", lossy=True))
    return forms


def _fallback_judge(loop):
    """The accuracy fallback's verdict (its budget, its held-out samples) on a model the latency guard would return;
    None without a fallback. Where the fallback's own result missed the budget, no worse than that result passes."""
    if loop is None:
        return None

    def judge(model: onnx.ModelProto) -> tuple[bool, float]:
        passed, drift = loop._judge(model)
        summary = loop.summary
        if not passed and not summary.met and summary.drift_after is not None:
            passed = drift <= summary.drift_after
        return passed, drift

    return judge


def _guard_skipped(config, model: onnx.ModelProto, validation: ValidateConfig | None, run_validation: bool) -> str | None:
    """Why the latency guard cannot run on this command, or None."""
    if not hasattr(config, "fold"):
        return "weight-only mode writes for runtimes with weight-only kernels, not for onnxruntime's speed"
    if not run_validation:
        return "validation is off (it measures on validation's inputs)"
    if validation is not None and not validation.latency:
        return "latency measurement is off"
    if model_io.has_external_data(model):
        return "the model keeps its weights in external data (too large to hold its candidates in memory)"
    return None


def _quantize_pass(config, model: onnx.ModelProto, calibration, validation, run_validation: bool, threads: int):
    """The pass a quantize config picks."""
    if isinstance(config, QuantizeConfig):
        return QuantizeDynamic(config, inputs=inputs_for(model, validation, calibration, threads))
    if isinstance(config, WeightsOnlyConfig):
        return QuantizeWeightsOnly(config)
    from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig
    from onnxshrink.passes.quantize_blockwise import BlockwiseConfig, QuantizeBlockwise

    # GPTQ's Hessians leave padding out, so its runs need not compute it; static ranges are read over every position
    dataset = _pass_data(model, calibration, validation, run_validation, trim=isinstance(config, BlockwiseConfig))
    if isinstance(config, StaticQuantizeConfig):
        if dataset is None:
            raise UsageError("static quantization needs calibration data (--calibration FILE.npz)")
        return QuantizeStatic(config, dataset, threads=threads)
    if isinstance(config, BlockwiseConfig):
        if config.algorithm == "gptq" and dataset is None:
            raise UsageError("--algorithm gptq needs calibration data (--calibration FILE.npz)")
        return QuantizeBlockwise(config, dataset, threads=threads)
    raise TypeError(f"not a quantize config: {type(config).__name__}")


def prune(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config=None,
    *,
    calibration: str | os.PathLike | None = None,
    force: bool = False,
    validation: ValidateConfig | None = None,
    run_validation: bool = True,
    threads: int = 1,
    options: dict | None = None,
    task_check=None,
) -> CommandReport:
    """Prune MatMul/Gemm/Conv weights (a PruneConfig) and validate the result against the original.

    With `calibration`, importance defaults to activation-weighted and each layer's kept weights
    are refit to the original model's outputs. `pattern="channel"` removes whole output channels.
    Threshold failures write `OUTPUT.failed.onnx`, as quantize does.
    """
    from onnxshrink.passes.prune import Prune, PruneConfig, check_config

    config = config if config is not None else PruneConfig()
    check_config(config, calibration)

    def make_pass(model: onnx.ModelProto):
        # channel pruning weighs channels by their norms over every position (prune_channels._feed_norms): kept whole
        dataset = _pass_data(model, calibration, validation, run_validation, trim=config.pattern != "channel")
        if config.pattern == "channel":
            from onnxshrink.passes.prune_channels import PruneChannels

            return PruneChannels(config, dataset, threads=threads)
        return Prune(config, dataset, threads=threads)

    return _run_pass_command(
        "prune", model_path, output, "pruned", make_pass, force=force,
        validation=validation, run_validation=run_validation, threads=threads, calibration=calibration,
        options=options if options is not None else asdict(config), full_check=config.storage != "sparse",
        task_check=task_check,
    )


def cluster(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config=None,
    *,
    calibration: str | os.PathLike | None = None,
    force: bool = False,
    validation: ValidateConfig | None = None,
    run_validation: bool = True,
    threads: int = 1,
    options: dict | None = None,
    task_check=None,
) -> CommandReport:
    """Weight sharing (a ClusterConfig): MatMul/Gemm/Conv weights as uint8 indices into 2^bits-value codebooks.

    With `calibration`, k-means is weighted by input energy and each layer's codebook (and bias) is refit
    to the original model's outputs. Threshold failures write `OUTPUT.failed.onnx`, as quantize does.
    The report's runtime says whether onnxruntime folded the decoding away (it runs float kernels).
    """
    from onnxshrink.passes.cluster import Cluster, ClusterConfig, check_config

    config = config if config is not None else ClusterConfig()
    check_config(config, calibration)

    def make_pass(model: onnx.ModelProto):
        dataset = _pass_data(model, calibration, validation, run_validation, trim=True)
        return Cluster(config, dataset, threads=threads)

    report = _run_pass_command(
        "cluster", model_path, output, f"cluster{config.bits}", make_pass, force=force,
        validation=validation, run_validation=run_validation, threads=threads, calibration=calibration,
        options=options if options is not None else asdict(config), task_check=task_check,
    )
    if report.passes[0].changed:
        _check_decoding_folded(report, model_path, threads)
    return report


def factorize(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config=None,
    *,
    calibration: str | os.PathLike | None = None,
    force: bool = False,
    validation: ValidateConfig | None = None,
    run_validation: bool = True,
    threads: int = 1,
    options: dict | None = None,
    task_check=None,
) -> CommandReport:
    """Low-rank factorization (a FactorizeConfig; rank ratio 0.5 when None): MatMul/Gemm weights as X @ A @ B.

    With `calibration`, each layer's factors minimise its output error against the original model's
    (SVD of the whitened weight). Only where it saves parameters and, unless `check_latency=False`,
    where the factored layer timed no slower. Threshold failures write `OUTPUT.failed.onnx`, as quantize does.
    """
    from onnxshrink.passes.factorize import Factorize, FactorizeConfig, check_config

    config = config if config is not None else FactorizeConfig(rank_ratio=0.5)
    check_config(config, calibration)

    def make_pass(model: onnx.ModelProto):
        dataset = _pass_data(model, calibration, validation, run_validation)
        return Factorize(config, dataset, threads=threads)

    return _run_pass_command(
        "factorize", model_path, output, "factorized", make_pass, force=force,
        validation=validation, run_validation=run_validation, threads=threads, calibration=calibration,
        options=options if options is not None else asdict(config), task_check=task_check,
    )


def _check_decoding_folded(report: CommandReport, model_path, threads: int) -> None:
    """Codebook decoding reads initializers only, so onnxruntime should fold it at load: check its optimized graph."""
    decoding = ("Cast", "Gather", "Reshape", "Add", "Mul")  # Mul: --other-floats int8 scales
    before = optimized_op_counts(model_io.runnable(model_path), threads)
    after = optimized_op_counts(model_io.runnable(report.output), threads)
    left = sum(max(after[op] - before[op], 0) for op in decoding)
    report.runtime["codebook_decoding_left"] = left
    floats = ", ".join(f"{k} x{v}" for k, v in report.runtime["float_kernels"].items()) or "none"
    if left:
        report.notes.append(f"warning: onnxruntime left {left} decoding node(s) (Cast/Gather/...) in the graph it runs: "
                            "they decode weights on every run, slower than the original")
    else:
        report.notes.append(f"onnxruntime folds the codebook decoding (Cast, Gather) into float weights when it loads the "
                            f"model: it runs {floats} as the original does, with no decoding at run time")


def sensitivity(model_path: str | os.PathLike, calibration: str | os.PathLike | None = None, config=None, *, threads: int = 1,
                stop=None, shapes: dict | None = None):
    """Per-layer drift of the model's outputs when each layer alone is pruned at several sparsities; `shapes`
    sizes synthesized inputs (no calibration), as validate's --shape."""
    from onnxshrink.layer_sensitivity import SensitivityConfig, measure

    model = model_io.load(model_path)
    dataset = _calibration_data(model, calibration) if calibration is not None else None
    return measure(model, dataset, config or SensitivityConfig(), model_path=str(model_path), threads=threads, stop=stop,
                   shapes=shapes)


def flush_denormals(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    force: bool = False,
    validation: ValidateConfig | None = None,
    run_validation: bool = True,
    threads: int = 1,
    task_check=None,
) -> CommandReport:
    """Zero the denormal float weights (slow on CPUs, too small to matter), then validate: drift and latency."""
    from onnxshrink.passes.flush_denormals import FlushDenormals

    return _run_pass_command("flush-denormals", model_path, output, "ftz", lambda model: FlushDenormals(),
                             force=force, validation=validation, run_validation=run_validation, threads=threads,
                             options={}, task_check=task_check)


PACK_FULL_COMPARE_BYTES = 256 << 20  # above this, pack's check relies on the per-tensor digests alone (memory)


def pack(model_path: str | os.PathLike, output: str | os.PathLike | None = None, *, force: bool = False,
         favor: str = "load"):
    """Write a `.shrink` file: the graph as ONNX, every weight entropy-coded; read back and checked before it lands.

    `favor` = "load" (a zstd graph record of 1 MiB or more unless LZMA saves over 0.5% of the pack) or "size"."""
    from onnxshrink.packing import FAVORS, PackReport, check_pack, pack_model, unpack_model

    if favor not in FAVORS:
        raise UsageError(f"favor must be one of {', '.join(FAVORS)}, not {favor!r}")
    model_path = Path(model_path)
    if model_io.is_pack(model_path):
        raise UsageError(f"{model_path}: is already a pack (.shrink); unpack it first")
    output = Path(output) if output is not None else model_io.default_output(model_path, None, ".shrink")
    model_io.check_output_path(output, [model_path], force, with_data=False)  # a pack is one file
    model = model_io.load(model_path, with_data=False)
    external = model_io.has_external_data(model)  # asked before the data is read in (not the file parsed again)
    report = PackReport("pack", str(model_path), None)
    # External weights: planned, written and checked one tensor at a time, never all in memory (streaming.py).
    source = streaming.ExternalTensors(model_path.parent) if streaming.packs_streamed(model) else None
    if source is None:
        model_io.read_external_data(model, model_path)
    manifest = None

    def write(stream):
        nonlocal manifest
        manifest = pack_model(model, stream, report, external_data=external, source=source, favor=favor)

    def check(staged: Path):
        # Decode what was written: every coded tensor must match its SHA-256 (unpack_model checks), and a
        # model small enough to compare cheaply must serialize identically. A pack that lands unpacks exactly.
        if source is not None:
            check_pack(staged, manifest)
            return
        restored = unpack_model(staged.read_bytes(), every_crc=True)
        if size < PACK_FULL_COMPARE_BYTES and restored.SerializeToString() != model.SerializeToString():
            raise RuntimeError("the written pack does not decode to the packed model")

    size = model.ByteSize()
    model_io.write_atomically(output, write, check=check)
    report.output = str(output)
    size_in, size_out = model_io.file_size(model_path), output.stat().st_size
    report.size = {"original": size_in, "output": size_out, "ratio": size_out / size_in}
    first_size = model_io.original_size(model, model_path)
    if first_size != size_in:  # packing an earlier command's output: against the model the pipeline began with
        report.size["pipeline_original"] = first_size
    left = report.totals["tensors_left_in_graph"]
    if left:
        report.notes.append(f"{left} small tensor(s) left in the graph record (LZMA-compressed): a coded record would cost more")
    return report


def unpack(pack_path: str | os.PathLike, output: str | os.PathLike | None = None, *, force: bool = False) -> CommandReport:
    """Restore the standard ONNX model from a `.shrink` file, identical in every tensor to the one packed."""
    pack_path = Path(pack_path)
    if not model_io.is_pack(pack_path):
        model_io.load(pack_path)  # names what the file is instead (missing, empty, not ONNX)
        raise UsageError(f"{pack_path}: is not a pack (.shrink); nothing to unpack")
    output = Path(output) if output is not None else model_io.default_output(pack_path, "unpacked", ".onnx")
    model_io.check_output_path(output, [pack_path], force)
    from onnxshrink.codec.container import CorruptPack
    from onnxshrink.packing import read_file_header, unpack_external

    try:
        external = bool(read_file_header(pack_path).get("external_data"))  # laid out like the packed file
    except CorruptPack as exc:
        raise ModelLoadError(f"{pack_path}: corrupted pack ({exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{pack_path}: cannot read ({exc.strerror or exc})") from exc
    if external:  # weights in a data file: decoded and written one tensor at a time, never the model in memory
        staging = model_io.staging_dir(output, ".tmp")
        try:
            unpack_external(pack_path, staging / output.name)
            streaming.move_into_place(staging / output.name, output, [pack_path], force)
        except CorruptPack as exc:
            raise ModelLoadError(f"{pack_path}: corrupted pack ({exc})") from exc
        except OSError as exc:
            raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        model = model_io.load(pack_path)
        model_io.save(model, output, force=force, check=model_io.full_check_error(model, pack_path) is None)
    size_in, size_out = pack_path.stat().st_size, model_io.file_size(output)  # a pack is one file: not parsed as ONNX
    return CommandReport("unpack", str(pack_path), str(output), [], {"original": size_in, "output": size_out,
                                                                     "ratio": size_out / size_in})


def _calibration_data(model: onnx.ModelProto, path: str | os.PathLike, hold_out: bool = False, trim: bool = False):
    """Calibration batches from an .npz whose keys are the model's input names.

    `hold_out`: validation will judge on this file's last samples (data.split_holdout), so the passes
    calibrate on the rest only; a file too small to split calibrates on all of it. `trim`: for passes whose
    statistics leave padding out, the samples ordered by length and each run cut to its real tokens
    (data.trim_padding): the same statistics, without computing the padding."""
    specs = input_specs(model)
    dataset = load_npz(path, specs, role="calibration data")
    split = split_holdout(dataset, specs) if hold_out else None
    dataset = split[0] if split is not None else dataset
    return trim_padding(dataset, specs) if trim else dataset


def _pass_data(model: onnx.ModelProto, calibration, validation: ValidateConfig | None, run_validation: bool,
               trim: bool = False):
    """The calibration batches a pass fits on (None without --calibration): the samples validation will not judge
    (`trim`: _calibration_data)."""
    if calibration is None:
        return None
    return _calibration_data(model, calibration, hold_out=_holds_out(validation, run_validation), trim=trim)


def _holds_out(validation: ValidateConfig | None, run_validation: bool) -> bool:
    """Whether validation will use held-out calibration samples: it runs and was given no --data."""
    return run_validation and (validation is None or not validation.data)


def _run_pass_command(command, model_path, output, suffix, make_pass, *, force, validation, run_validation, threads, options,
                      full_check=True, calibration=None, task_check=None):
    model_path = Path(model_path)
    output = Path(output) if output is not None else model_io.default_output(model_path, suffix)
    check = make_check(task_check)  # a bad command: a UsageError before anything runs
    if check is not None and not run_validation:
        raise UsageError("--task-check is a check of validation's: drop --no-validate to run it")
    model_io.check_output_path(output, [model_path], force)
    original = model_io.load(model_path, for_rewrite=True, with_data=False)
    external = model_io.has_external_data(original)  # the file keeps weights external (asked before reading them)
    first_size = model_io.original_size(original, model_path)  # the pipeline's first model (metadata), else this one
    transform = make_pass(original)
    # External weights and a pass that can stream: read one weight at a time, never the whole model (streaming.py).
    streamed = streaming.streams(original, transform)
    if not streamed:
        model_io.read_external_data(original, model_path)
        with handed_over(original):  # loaded for this pass alone: rewritten in place, not held twice
            result, pass_report = transform(original)
        model_io.stamp(result, command, options, first_size)
        del original, transform  # a pass may keep what it fitted from (cluster: the original and its captures)

    staging = model_io.staging_dir(output, ".check")
    try:
        if streamed:
            result, pass_report = streaming.write_pass(original, model_path, transform, staging / output.name,
                                                       edit=lambda m: model_io.stamp(m, command, options, first_size),
                                                       check=full_check)
            staged = staging / output.name
            del original, transform
        else:
            # full_check=False: sparse initializers feeding MatMul fail onnx's full check; onnxruntime loads them below.
            staged = model_io.save(result, staging / output.name, external_data=external, check=full_check)
            del result  # written: validation and the move below work from the file
        memory.release()  # the pass's freed arrays: the sessions below are built after them, not beside them
        report = CommandReport(command, str(model_path), None, [pass_report], {}, changed=pass_report.changed)
        if not pass_report.changed:
            report.notes.append(_no_change(command, pass_report))
        if streamed:
            report.notes.append(streaming.NOTE)
        report.runtime = _runtime_kernels(staged, threads, pass_report)
        if report.runtime.get("folded_decoding_left"):
            report.notes.append(f"warning: onnxruntime left {report.runtime['folded_decoding_left']} int8 decoding node(s) "
                                "(Cast/Mul) unfolded: they decode weights on every run")
        if run_validation:
            config = validation or ValidateConfig(threads=threads)
            if calibration is not None and not config.data:  # judged on the samples the passes held out
                config = dataclasses.replace(config, calibration=str(calibration))
            try:
                report.validation = _validate(model_path, staged, config)
            except InputsUnavailable as exc:  # the pass needed no inputs: its output lands, said to be unvalidated
                report.validation = not_validated(model_path, staged, str(exc))
            if check is not None:  # the user's own data: it runs even where validation found no inputs
                add_to_report(report.validation, task_verdict(check, model_path, staged))
            report.validation.candidate = str(output)
        _advise_on_latency(report, pass_report)
        passed = report.validation is None or report.validation.passed \
            or (not report.validation.validated and not task_rejected(report.validation))
        final = output if passed else output.with_name(_failed_name(output))
        if not passed:
            report.notes.append(f"validation failed: result written to {final} for inspection; {output} untouched")
        if streamed or external:
            # The graph and its data file (named after the graph), renamed; the graph says the new data file name.
            streaming.move_into_place(staged, final, [model_path], force or not passed)
        else:
            # Already written and checked: move it into place (atomic, same directory).
            model_io.check_output_path(final, [model_path], force or not passed)
            os.replace(staged, final)
            model_io.drop_stale_data(final)  # an earlier output's data file (replaced only with force)
        if report.validation is not None:
            report.validation.candidate = str(final)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
    except OutputError as exc:
        # Name the user's output, not the temporary folder it was being staged in.
        raise OutputError(str(exc).replace(str(staging / output.name), str(output))) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.output = str(final)
    size_in, size_out = model_io.file_size(model_path), model_io.file_size(final)
    report.size = {"original": size_in, "output": size_out, "ratio": size_out / size_in}
    if first_size != size_in:  # an earlier command's output: the ratio a pipeline's user thinks in
        report.size["pipeline_original"] = first_size
    return report


def _advise_on_latency(report: CommandReport, pass_report) -> None:
    """Say so when the compressed model measured slower by more than the runs' noise (report.latency_slower),
    and what would help."""
    latency = report.validation.latency_ms if report.validation else None
    if not latency or not latency.get("ratio") or not latency_slower(latency):
        return
    text = (f"the output ran {latency['ratio']:.2f}x slower than the original at batch {latency['batch']} (p50 "
            f"{latency['candidate']['p50']:.3g} vs {latency['original']['p50']:.3g} ms, beyond the runs' p90 - p50 spread)")
    threshold = (pass_report.options or {}).get("integer_min_macs")
    if pass_report.name == "quantize-dynamic" and threshold is not None and threshold < INTEGER_MIN_MACS["dynamic"]:
        # Only when the user lowered it: at the default, small layers already run as float kernels.
        text += (f"; --integer-min-macs {threshold} gave small layers integer kernels, and quantizing their input at run "
                 f"time costs about 2 us a layer: the default ({INTEGER_MIN_MACS['dynamic']}) stores them int8 and runs "
                 "them as float kernels")
    if pass_report.name == "quantize-blockwise":
        text += "; MatMulNBits gains speed only on large layers (about 256 x 256 and up at batch 1): here it buys size"
    report.notes.append(text)


def _no_change(command: str, pass_report) -> str:
    """The first thing a no-op run says: nothing changed, why, and that the output is still written (a pipeline
    that reads OUTPUT next finds it; its weights are the input's)."""
    reasons = {}
    for layer in pass_report.layers:
        if layer.reason:
            reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
    if 0 < len(reasons) <= 2:
        why = "; ".join(f"{count} layer(s): {reason}" for reason, count in sorted(reasons.items(), key=lambda item: -item[1]))
    elif reasons:  # reasons with each layer's own numbers: the table (or the JSON's layers) has them
        why = f"{sum(reasons.values())} layer(s) kept, each for the reason listed with it"
    else:
        why = "; ".join(pass_report.notes[-1:]) or "nothing it applies to"
    return f"no change: {command} changed no weight ({why}); the output is written all the same, with the input's weights"


def _failed_name(output: Path) -> str:
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return f"{stem}.failed.onnx"


def _runtime_kernels(path: Path, threads: int, pass_report) -> dict:
    """Count what onnxruntime runs after its fusions: integer kernels vs float MatMul/Gemm/Conv left."""
    optimized = optimized_graph(model_io.runnable(path), threads)
    counts = op_counts(optimized)
    integer = {k: v for k, v in counts.items() if k in INTEGER_KERNELS}
    float_ops = {k: v for k, v in counts.items() if k in FLOAT_KERNELS}
    # Weight-only and folded layers are float kernels by design; every other quantized layer must become a fused kernel.
    quantized = sum(1 for layer in pass_report.layers if layer.action.startswith("int") and "weight-only" not in layer.action
                    and not layer.action.startswith(FOLDED))
    fused = sum(v for k, v in counts.items() if k in FUSED_KERNELS)
    runtime = {
        "integer_kernels": integer,
        "float_kernels": float_ops,
        "quantized_layers": quantized,
        "fused_layers": fused,
        "all_quantized_layers_fused": fused >= quantized,
    }
    folded = sum(1 for layer in pass_report.layers if layer.action == FOLDED)
    if folded:
        # int8 + Cast + Mul reads initializers only: onnxruntime must fold it at load, or it decodes on every run.
        runtime["folded_layers"] = folded
        runtime["folded_decoding_left"] = constant_nodes_left(optimized)
    return runtime
