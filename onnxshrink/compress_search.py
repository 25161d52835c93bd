"""`onnxshrink compress`: recipe-driven pipelines and the automatic search for the smallest valid model.

A recipe is an ordered list of passes (prune, quantize, cluster), each with its options and
per-layer rules (glob patterns on node names), read from TOML:

    [[passes]]
    name = "prune"
    sparsity = 0.85

    [[passes.layers]]
    match = "fc3*"          # node-name glob; a later rule overrides an earlier one
    sparsity = 0.5          # prune: sparsity or skip; cluster: bits or skip; quantize: skip

    [[passes]]
    name = "cluster"
    bits = 4

`run_recipe` chains the library calls (api.prune / api.quantize / api.cluster, unvalidated, into
temporary files), then packs when the output ends in `.shrink`. `compress` in automatic mode:

  1. the lossless form of the input (a pack, or the model itself for an `.onnx` output) is the first
     best, so a valid output exists from the start;
  2. each layer's pruning sensitivity is measured once (layer_sensitivity): it orders the per-layer moves; the
     phase is skipped or cut short when it would take more than FRAGILITY_SHARE of the time budget;
  3. for each weight format (cluster 2^bits codebooks, 4-bit GPTQ, dynamic int8) the highest sparsity
     that passes is found by bisection over a grid (accuracy falls with sparsity). A large model (LARGE_MODEL_BYTES,
     where one candidate costs minutes) tries the cheap, accurate formats first (int8 dynamic, then static), climbs
     a finer grid from sparsity 0 and stops at the first failure, and prunes one-shot (SparseGPT per layer);
  4. from the best of those, per-layer moves (one layer pruned further, or one layer one bit narrower)
     are tried greedily, the smallest passing one kept each round.

Every candidate is the whole model validated against the original on the judging data; a passing
candidate smaller than the best replaces the output atomically, so the file on disk is always the
best valid model so far. The clock is checked before each candidate, and one that would overrun the
time budget (estimated from the last ones) is not started; under a time budget a lossy candidate is built in
a child process that is stopped at the deadline (candidate_process.py), since a pass cannot be cut short. How many candidates fit in seconds depends on the
machine, and so does the result; a candidate budget (`max_candidates`) gives the same bytes everywhere, the
search being otherwise deterministic (seeded inputs, one onnxruntime thread by default). Independent candidates
(the formats' walks of step 3 in lockstep, the moves of one round of step 4) are batches that an executor
(executors.py: serial, local worker processes, Ray) may run side by side; they are recorded in batch order, so every
executor gives the same search.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pyproject installs it there)
    import tomli as tomllib

import numpy as np
from onnx import TensorProto, numpy_helper

from onnxshrink import api, candidate_process, executors, memory, task_check
from onnxshrink import model as model_io
from onnxshrink.errors import DataError, ModelLoadError, UsageError
from onnxshrink.passes.common import glob_literal
from onnxshrink.passes.fold_layernorm import fold_layernorm
from onnxshrink.report import JsonReport, ValidationReport
from onnxshrink.validate import Thresholds, ValidateConfig

PASSES = ("prune", "quantize", "cluster")
LAYER_OPS = ("MatMul", "Gemm", "Conv")
_STR_LIST = "list of strings"
# option -> type name; "number" accepts int and float, never bool.
PASS_OPTIONS = {
    "prune": {"sparsity": "number", "pattern": "string", "importance": "string", "scope": "string",
              "reconstruct": "boolean", "exclude": _STR_LIST, "keep_float": "string", "refit_steps": "integer",
              "remove_dead_units": "boolean", "method": "string", "capture_rounds": "integer"},
    "quantize": {"mode": "string", "bits": "integer", "block_size": "integer", "algorithm": "string",
                 "act_order": "boolean", "symmetric": "boolean", "per_channel": "boolean", "exclude": _STR_LIST,
                 "keep_float": "string", "min_weights": "integer"},
    "cluster": {"bits": "integer", "per": "string", "weighting": "string", "refit": "boolean", "exclude": _STR_LIST,
                "keep_float": "string", "min_weights": "integer", "float16": "boolean", "other_floats": "string",
                "rounding": "string", "capture_rounds": "integer", "embeddings": "boolean",
                "table_per": "string", "codebook": "string", "table_rows": "string", "channel_scales": "boolean",
                "outliers": "number"},
}
LAYER_OPTIONS = {"prune": {"sparsity": "number", "skip": "boolean"}, "quantize": {"skip": "boolean"},
                 "cluster": {"bits": "integer", "skip": "boolean", "codebook": "string", "per": "string",
                             "outliers": "number"}}
DEFAULT_SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95)
DEFAULT_TIME_BUDGET_S = 600.0
CACHED_STEPS = 8  # first-pass results a search keeps for reuse
# The planned candidates' codebooks (cluster's `codebook`): evenly spaced values where they pack smaller at k-means'
# error; prices are taken in the same form. MiniLM's 10-minute search at 0.99: 7.89x -> 8.13x (docs/benchmarks-compress.md).
PLANNED_CODEBOOK = "entropy"
# The planned tables' rows (cluster's `table_rows`): a vocabulary's rows the calibration never reads, coarser; the plan
# prices the tables the same way.
PLANNED_TABLE_ROWS = "frequency"
_STEP_NUMBERS = itertools.count()  # unique step file names within a work folder
FINAL_LATENCY_S = 1.0  # the final report's latency measurement
# Models at least this large (the input file) are searched the large-model way (_Search.large): on MiniLM (90 MB) a
# prune or cluster candidate costs minutes, so a 10-minute budget holds a handful of candidates, not hundreds.
LARGE_MODEL_BYTES = 16 << 20
# The large-model order: cheap formats that keep the most accuracy first (dynamic int8 is 9 s and cosine 0.991 on
# MiniLM; static int8 58 s and 0.998, yet it ran 446 s in a search on a loaded machine and was stopped at the
# deadline; 4-bit codebooks stop at 0.966-0.982, docs/benchmarks-cluster.md), wide codebooks before narrow ones.
LARGE_FORMAT_ORDER = ("int8", "int8static", "gptq4", "cluster6", "cluster5", "cluster4", "cluster3", "cluster2", "float")
# The sensitivity phase (one validation per layer) runs only when its estimate fits in this share of the budget: on
# MiniLM (36 layers) it would take the whole budget, and it only orders the per-layer moves.
FRAGILITY_SHARE = 0.2
LARGE_ONLY = ("int8static",)  # formats the search tries on large models alone
# A large model's sparsities: its first steps small, since one-shot pruning of MiniLM at 50% costs 0.07 cosine
# (docs/prune.md) while int8 leaves 0.008 of a 0.99 budget.
LARGE_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Progress = Callable[[str, int, int], None]


# ---- recipes ------------------------------------------------------------------------------------

@dataclass
class LayerRule:
    match: str  # glob on node names
    options: dict  # sparsity / bits / skip


@dataclass
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # LayerRule, later rules override earlier ones


@dataclass
class Recipe:
    passes: list = field(default_factory=list)  # PassSpec, in order
    # The calibration data a saved recipe was built with (REQUIREMENT_KEYS; calibration "" when none): replaying
    # it with other data (or none) builds another model, so that is refused unless the user allows it.
    requires: dict | None = None

    def summary(self) -> str:
        parts = []
        for spec in self.passes:
            opts = ", ".join(f"{k}={v}" for k, v in spec.options.items() if k != "exclude")
            rules = f", {len(spec.layers)} layer rule(s)" if spec.layers else ""
            parts.append(f"{spec.name}({opts}{rules})")
        return " -> ".join(parts) or "lossless"

    def to_dict(self) -> dict:
        return {**({"requires": dict(self.requires)} if self.requires is not None else {}), "passes": [{"name": s.name, **s.options, **({"layers": [{"match": r.match, **r.options} for r in s.layers]}
                                                             if s.layers else {})} for s in self.passes]}

    def to_toml(self) -> str:
        lines = ["# onnxshrink compress recipe: onnxshrink compress MODEL --recipe THIS_FILE", ""]
        if self.requires is not None:
            lines += ["# built with this calibration data; other data (or none) needs --allow-other-data", "[requires]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in self.requires.items()]
            lines.append("")
        for spec in self.passes:
            lines += ["[[passes]]", f"name = {_toml_value(spec.name)}"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in spec.options.items()]
            for rule in spec.layers:
                lines += ["", "[[passes.layers]]", f"match = {_toml_value(rule.match)}"]
                lines += [f"{key} = {_toml_value(value)}" for key, value in rule.options.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _type_ok(value, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_options(where: str, given: dict, allowed: dict) -> dict:
    for key, value in given.items():
        if key not in allowed:
            raise UsageError(f"{where}: unknown option {key!r} (choose from {', '.join(allowed)})")
        if not _type_ok(value, allowed[key]):
            raise UsageError(f"{where}: option {key!r} must be a {allowed[key]}, not {value!r}")
    return dict(given)


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    """A recipe from its TOML table; every problem is a one-line UsageError naming the bad key."""
    unknown = sorted(set(data) - {"passes", "requires"})
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r} (a recipe holds [[passes]] tables and [requires])")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes or not all(isinstance(p, dict) for p in passes):
        raise UsageError(f"{source}: no [[passes]] tables (each names a pass: {', '.join(PASSES)})")
    recipe = Recipe()
    if "requires" in data:
        requires = data["requires"]
        if not isinstance(requires, dict):
            raise UsageError(f"{source}: 'requires' must be a [requires] table")
        recipe.requires = _check_options(f"{source}: [requires]", requires, REQUIREMENT_KEYS)
        if "calibration" not in recipe.requires:
            raise UsageError(f"{source}: [requires] names no 'calibration' (the file's name, or \"\" for none)")
    for index, table in enumerate(passes):
        table = dict(table)
        name = table.pop("name", None)
        where = f"{source}: passes[{index}]"
        if name not in PASSES:
            raise UsageError(f"{where}: unknown pass {name!r} (choose {', '.join(PASSES)})")
        where = f"{where} ({name})"
        rules = table.pop("layers", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise UsageError(f"{where}: 'layers' must be [[passes.layers]] tables")
        spec = PassSpec(name, _check_options(where, table, PASS_OPTIONS[name]))
        for number, rule in enumerate(rules):
            rule = dict(rule)
            at = f"{where}.layers[{number}]"
            match = rule.pop("match", None)
            if not isinstance(match, str) or not match:
                raise UsageError(f"{at}: 'match' must be a glob string on node names (such as \"fc1*\"), not {match!r}")
            if not rule:
                raise UsageError(f"{at}: sets nothing (choose from {', '.join(LAYER_OPTIONS[name])})")
            spec.layers.append(LayerRule(match, _check_options(at, rule, LAYER_OPTIONS[name])))
        _check_values(where, spec)
        recipe.passes.append(spec)
    return recipe


def _check_values(where: str, spec: PassSpec) -> None:
    """Values the pass configs would refuse late (after earlier passes ran): refused up front."""
    options = spec.options
    if spec.name == "quantize":
        mode = _quantize_mode(options)
        if mode not in ("dynamic", "static", "blockwise"):
            raise UsageError(f"{where}: mode {mode!r}: choose dynamic (int8), static (int8, calibrated activations) "
                             "or blockwise (MatMulNBits)")
        bits = options.get("bits", 4 if mode == "blockwise" else 8)
        if (mode != "blockwise" and bits != 8) or bits not in (2, 4, 8):
            raise UsageError(f"{where}: bits {bits}: dynamic and static are 8-bit; blockwise takes 2, 4 or 8")
        if options.get("block_size", 32) not in (16, 32, 64, 128, 256):
            raise UsageError(f"{where}: block_size {options['block_size']}: choose 16, 32, 64, 128 or 256")
        if options.get("algorithm", "rtn") not in ("rtn", "gptq"):
            raise UsageError(f"{where}: algorithm {options['algorithm']!r}: choose rtn or gptq")
    for number, rule in enumerate(spec.layers):
        value = rule.options.get("sparsity")
        if value is not None and not 0.0 <= value <= 0.98:
            raise UsageError(f"{where}.layers[{number}]: sparsity {value}: must be between 0 and 0.98")
        bits = rule.options.get("bits")
        if bits is not None and not 1 <= bits <= 8:
            raise UsageError(f"{where}.layers[{number}]: bits {bits}: must be between 1 and 8")


REQUIREMENT_KEYS = {"calibration": "string", "calibration_samples": "integer", "calibration_sha256": "string"}


def data_requirements(calibration: str | os.PathLike | None) -> dict:
    """What a saved recipe records of its calibration data: the file's name, its sample count and SHA-256."""
    if not calibration:
        return {"calibration": ""}
    path = Path(calibration)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    found = {"calibration": path.name}
    samples = _sample_count(path)
    if samples is not None:
        found["calibration_samples"] = samples
    found["calibration_sha256"] = digest.hexdigest()
    return found


def _sample_count(path: Path) -> int | None:
    """The samples in an .npz (the longest axis 0 of its arrays), from the .npy headers alone."""
    lengths = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape = read(member)[0]
                if shape:
                    lengths.append(int(shape[0]))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return max(lengths) if lengths else None


def check_requirements(recipe: Recipe, calibration, source: str, allow_other_data: bool) -> str | None:
    """Refuse to replay a saved recipe with calibration data other than what it was built with (a different
    model would come out, with exit 0); with `allow_other_data`, a note saying so. None when the data match
    or the recipe records none (written by hand, or by an older onnxshrink)."""
    if recipe.requires is None:
        return None
    wanted, given = recipe.requires, data_requirements(calibration)
    if not wanted["calibration"]:
        if not given["calibration"]:
            return None
        problem = f"{source} was built without calibration data; --calibration {calibration} would build another model"
    elif not given["calibration"]:
        problem = (f"{source} was built with calibration data {wanted['calibration']} "
                   f"({_data_summary(wanted)}); without --calibration it builds a different model")
    elif wanted.get("calibration_sha256") in (None, given["calibration_sha256"]):
        return None
    else:
        problem = (f"{source} was built with calibration data {wanted['calibration']} ({_data_summary(wanted)}), "
                   f"not {Path(calibration).name} ({_data_summary(given)})")
    if not allow_other_data:
        raise UsageError(f"{problem}: give that data, or --allow-other-data to build with this")
    return f"warning: {problem} (--allow-other-data)"


def _data_summary(found: dict) -> str:
    samples = found.get("calibration_samples")
    return ", ".join(filter(None, [f"{samples} samples" if samples is not None else "",
                                   f"sha256 {found['calibration_sha256'][:12]}" if found.get("calibration_sha256") else ""]))


def _quantize_mode(options: dict) -> str:
    default = "dynamic" if options.get("bits", 8) == 8 and options.get("algorithm", "rtn") == "rtn" else "blockwise"
    return options.get("mode", default)


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the recipe ({model_io.first_line(exc)})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({model_io.first_line(exc)})") from None
    return parse_recipe(data, str(path))


# ---- running a recipe ---------------------------------------------------------------------------

@dataclass
class RecipeRun:
    output: str
    passes: list  # PassReport of each step
    layer_sparsity: dict  # node -> fraction of zeros after the prune step(s)
    layer_format: dict  # node -> what quantize/cluster did ("cluster 4-bit ...", "int8 per-channel", "kept")
    layer_bits: dict  # node -> codebook bits (cluster steps)
    sparsity: float = 0.0  # zeros / weights over the pruned layers


def layer_names(model) -> list[str]:
    """Names of MatMul/Gemm/Conv nodes, as the passes name them (node.name or OpType_index)."""
    names = []
    for graph in model_io.iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx"):
                names.append(node.name or f"{node.op_type}_{index}")
    return names


def table_gathers(model) -> list[str]:
    """Names of the main graph's Gathers (as the passes name them) that read a 2-D float initializer: an embedding
    table's codebook width is a cluster rule on its Gather (ClusterConfig.layer_bits), as a layer's is on its node."""
    tables = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    return [node.name or f"{node.op_type}_{index}" for index, node in enumerate(model.graph.node)
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input and node.input[0] in tables]


def _resolve(rules, key: str, names: list[str], where: str) -> dict:
    """node -> the value of `key` from the last rule matching it; a rule matching no layer is an error."""
    chosen = {}
    for rule in rules:
        hits = [n for n in names if fnmatch.fnmatchcase(n, rule.match)]
        if not hits:
            raise UsageError(f"{where}: layer rule {rule.match!r} matches no layer of the model "
                             f"(layers: {', '.join(names) or 'none'})")
        if key in rule.options:
            chosen.update({n: rule.options[key] for n in hits})
    return chosen


def _step(spec: PassSpec, where: str, current: Path, target: Path, calibration, threads: int) -> tuple[list, dict]:
    """Run one recipe pass from `current` into `target`; returns its pass report(s) and, for prune, each layer's
    (zeros, weights) as pruned, before any dead units are removed (what layer_sparsity needs to reproduce it)."""
    options = dict(spec.options)
    model = model_io.load(current)
    names = layer_names(model) + (table_gathers(model) if spec.name == "cluster" else [])
    del model
    skip = [r.match for r in spec.layers if r.options.get("skip")]
    _resolve(spec.layers, "skip", names, where)  # every rule must name a layer
    exclude = tuple(options.pop("exclude", ())) + tuple(skip)
    common = {"calibration": calibration, "force": True, "run_validation": False, "threads": threads}
    if spec.name == "prune":
        from onnxshrink.passes.prune import PruneConfig

        overrides = _resolve(spec.layers, "sparsity", names, where)
        remove_dead = bool(options.pop("remove_dead_units", False))
        config = PruneConfig(**{"sparsity": 0.5, **options}, exclude=exclude, layer_sparsity=overrides)
        reports = api.prune(current, target, config, **common).passes
        model = model_io.load(target)
        counts = _zero_counts(model, reports)
        if remove_dead:
            from onnxshrink.passes.common import handed_over
            from onnxshrink.passes.dead_units import RemoveDeadUnits

            with handed_over(model):
                model, dead = RemoveDeadUnits()(model)
            model_io.save(model, target, force=True)
            reports.append(dead)
        return reports, counts
    if spec.name == "quantize":
        mode = _quantize_mode(options)
        options.pop("mode", None)
        if mode == "dynamic":
            from onnxshrink.passes.quantize import QuantizeConfig

            options.pop("bits", None)
            return api.quantize(current, target, QuantizeConfig(**options, exclude=exclude), **common).passes, {}
        if mode == "static":
            from onnxshrink.passes.quantize_static import StaticQuantizeConfig

            if not calibration:
                raise UsageError(f"{where}: mode static needs calibration data (--calibration FILE.npz)")
            options.pop("bits", None)
            options.pop("min_weights", None)  # a dynamic/blockwise option
            return api.quantize(current, target, StaticQuantizeConfig(**options, exclude=exclude), **common).passes, {}
        from onnxshrink.passes.quantize_blockwise import BlockwiseConfig

        return api.quantize(current, target, BlockwiseConfig(**options, exclude=exclude), **common).passes, {}
    from onnxshrink.passes.cluster import ClusterConfig

    bits = _resolve(spec.layers, "bits", names, where)
    forms = _resolve(spec.layers, "codebook", names, where)
    layouts = _resolve(spec.layers, "per", names, where)
    outliers = _resolve(spec.layers, "outliers", names, where)
    default = options.pop("bits", 4)
    # One pass for every width (ClusterConfig.layer_bits): one capture of the calibration data, where a pass per
    # width captured it once per width (a 5-width plan of ddddocr's detector ran past a 10-minute budget).
    config = ClusterConfig(**options, bits=default, exclude=exclude,
                           layer_bits={name: width for name, width in bits.items() if width != default},
                           layer_codebook=forms, layer_per=layouts, layer_outliers=outliers)
    return api.cluster(current, target, config, **common).passes, {}


def run_recipe(model_path: str | os.PathLike, recipe: Recipe, output: str | os.PathLike, *,
               calibration: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
               threads: int = 1, cache: dict | None = None, evict: bool = True) -> RecipeRun:
    """Run the recipe's passes in order (unvalidated) and write OUTPUT (packed when it ends in .shrink).

    `cache` (key -> (file, reports)) lets a search reuse the first pass (prune, the slow one) of recipes that
    share it; it keeps the CACHED_STEPS latest, in `workdir` (unless `evict` is False: a candidate run in a child
    process adds to a copy, and the search evicts). Every other step file is removed on return.
    """
    model_path, output = Path(model_path), Path(output)
    parent = Path(workdir) if workdir is not None else output.parent
    scratch = model_io.staging_dir(parent / "recipe", ".recipe")
    try:
        current, reports, sparsity, counts = model_path, [], {}, {}
        for index, spec in enumerate(recipe.passes):
            where = f"recipe passes[{index}] ({spec.name})"
            key = json.dumps([spec.name, spec.options, [[r.match, r.options] for r in spec.layers]], sort_keys=True)
            shared = cache is not None and index == 0 and len(recipe.passes) > 1
            if shared and key in cache:
                current, produced, pruned = cache[key]
            else:
                # A name no other process picks: candidates built in forked children (each with its own copy of
                # the counter) share the work folder, and a cached step must not be overwritten by another's.
                target = (parent if shared else scratch) / f"step{index}.{spec.name}.{next(_STEP_NUMBERS)}.{uuid.uuid4().hex[:12]}.onnx"
                produced, pruned = _step(spec, where, current, target, calibration, threads)
                current = target
                if shared:
                    cache[key] = (target, produced, pruned)
                    if evict:
                        _evict(cache)
            reports += produced
            if spec.name == "prune":
                counts.update(pruned)
                sparsity.update({node: zeros / size for node, (zeros, size) in counts.items()})
        if recipe.passes:  # the metadata names the pipeline, not its last pass's options; the settings stay out of it
            # so that a saved recipe (every layer's exact setting) rebuilds the search's file byte for byte
            model = model_io.load(current)
            model_io.stamp(model, "compress", {"passes": [spec.name for spec in recipe.passes]})
            current = scratch / "stamped.onnx"
            model_io.save(model, current, force=True, check=False)  # checked by the pass that wrote it; metadata only
            del model
        if output.name.endswith(".shrink"):
            api.pack(current, output, force=True)
        else:
            _copy_model(current, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    formats, bits = {}, {}
    for report in reports:
        if report.name in ("prune", "remove-dead-units"):
            continue
        for decision in report.layers:
            if decision.action != "kept" and not decision.action.startswith("kept"):
                formats[decision.node] = decision.action
                if report.name == "cluster":
                    bits[decision.node] = int((report.options.get("layer_bits") or {}).get(decision.node,
                                                                                            report.options.get("bits", 0)))
            else:
                formats.setdefault(decision.node, "float")
    overall = sum(z for z, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1)
    return RecipeRun(str(output), reports, sparsity, formats, bits, overall)


def _evict(cache: dict) -> None:
    """Keep the CACHED_STEPS latest first-pass results; the older ones' files go."""
    while len(cache) > CACHED_STEPS:
        Path(cache.pop(next(iter(cache)))[0]).unlink(missing_ok=True)


def _zero_counts(model, reports) -> dict:
    """node -> (zeros, weights) of its pruned weight: zeros / weights is what layer_sparsity needs to reproduce
    the mask exactly."""
    tensors = {t.name: t for g in model_io.iter_graphs(model.graph) for t in g.initializer}
    fractions = {}
    for report in reports:
        for decision in report.layers:
            tensor = tensors.get(decision.weight)
            if tensor is not None and decision.action.startswith(("pruned", "sparsity")):
                array = numpy_helper.to_array(tensor)
                fractions[decision.node] = (int(np.sum(array == 0)), array.size)
    return fractions


def _copy_model(source: Path, output: Path) -> None:
    """Place a model at OUTPUT atomically, converting between .onnx and .shrink as OUTPUT's name says."""
    source, output = Path(source), Path(output)
    if output.name.endswith(".shrink") and not model_io.is_pack(source):
        api.pack(source, output, force=True)
    elif model_io.is_pack(source) != output.name.endswith(".shrink") or model_io.file_has_external_data(source):
        model_io.save(model_io.load(source), output, force=True)
    else:
        data = source.read_bytes()
        model_io.write_atomically(output, lambda stream: stream.write(data))
        if not output.name.endswith(".shrink"):
            model_io.drop_stale_data(output)  # an inline model: an earlier output's data file would read as its own


# ---- the automatic search -----------------------------------------------------------------------

@dataclass
class CompressConfig:
    thresholds: Thresholds | None = None
    data: str | None = None  # judging data (.npz); the calibration data when None
    labels: str | None = None
    samples: int | None = None
    shapes: dict | None = None  # input name -> dims of synthesized inputs (--shape), when no data is given
    calibration: str | None = None
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S  # None: no time limit (the search ends on its own)
    threads: int = 1
    seed: int = 0
    sparsities: tuple = DEFAULT_SPARSITIES
    formats: tuple | None = None  # names from FORMATS to try (None: every one available)
    refine: bool = True  # per-layer moves after the uniform settings
    # Stop after this many candidates, the lossless start included: the budget that gives the same bytes on every
    # machine. A time budget set as well applies as a safety limit: whichever comes first stops the search.
    max_candidates: int | None = None
    # The large-model search (LARGE_FORMAT_ORDER, sparsities tried upwards from 0, one-shot SparseGPT pruning,
    # captures per block): None decides by the input's size (LARGE_MODEL_BYTES).
    large: bool | None = None
    # How candidates are evaluated (executors.py): "local" processes, `workers` at a time (None: one per core, as many
    # as memory holds; 1: one after another, in this process), or "ray" (a cluster at `ray_address` or RAY_ADDRESS,
    # else a local instance). The same candidates give the same best model on every executor.
    workers: int | None = None
    executor: str = "local"
    ray_address: str | None = None
    # The user's own task check (task_check.py): a command, or from the library a function of (original, candidate)
    # paths. A candidate that passes the thresholds is kept only if the check accepts it.
    task_check: object = None


# name -> the quantize/cluster pass of that weight format (None: float weights). The cluster formats leave out
# cluster's channel scales: compress_plan prices the layouts without them (priced with them, MPNet's 20-minute
# search kept 5.06x where it keeps 6.58x: docs/benchmarks-compress.md, "Channel scales").
FORMATS = {
    "cluster4": PassSpec("cluster", {"bits": 4, "other_floats": "int8", "channel_scales": False}),
    "cluster3": PassSpec("cluster", {"bits": 3, "other_floats": "int8", "channel_scales": False}),
    "gptq4": PassSpec("quantize", {"mode": "blockwise", "bits": 4, "block_size": 128, "algorithm": "gptq"}),
    "cluster5": PassSpec("cluster", {"bits": 5, "other_floats": "int8", "channel_scales": False}),
    "cluster6": PassSpec("cluster", {"bits": 6, "other_floats": "int8", "channel_scales": False}),
    "int8": PassSpec("quantize", {"mode": "dynamic"}),
    # int8 with calibrated activations: on MiniLM cosine 0.998 and top-5 0.94 against dynamic's 0.991 and 0.88, room
    # that pruning can spend; 58 s there. Large models only (LARGE_ONLY): not measured in the sample-model search.
    "int8static": PassSpec("quantize", {"mode": "static"}),
    "cluster2": PassSpec("cluster", {"bits": 2, "other_floats": "int8", "channel_scales": False}),
    "float": None,
}


@dataclass
class Candidate:
    index: int
    phase: str  # "lossless", "uniform", "per-layer", "recipe"
    recipe: str  # summary
    size: int | None
    times_smaller: float | None
    accuracy: float | None
    max_abs: float | None
    cosine: float | None
    passed: bool
    best: bool  # became the best so far (written to the output)
    seconds: float
    error: str | None = None
    task_check: dict | None = None  # accepted, detail, seconds: the user's task check, run when the thresholds held


@dataclass
class LayerChoice:
    node: str
    sparsity: float  # fraction of zeros
    format: str  # what quantize/cluster wrote, or "float"
    bits: int | None  # cluster codebook bits


@dataclass
class CompressReport(JsonReport):
    command: str
    mode: str  # "auto" or "recipe"
    input: str
    output: str | None
    passed: bool
    size: dict  # original, output, ratio, times_smaller, lossless
    recipe: dict | None  # the chosen recipe, per layer (what --save-recipe writes)
    recipe_summary: str
    layers: list  # LayerChoice
    candidates: list  # Candidate
    validation: ValidationReport | None
    seconds: float
    time_budget_s: float | None
    stopped: str  # "search done", "time budget", "candidate limit", "recipe", "thresholds cannot be met",
    # "task check rejects the input model"
    notes: list = field(default_factory=list)
    max_candidates: int | None = None  # the candidate budget, when one was set (auto mode)
    executor: str | None = None  # "serial", "local" or "ray" (auto mode)
    workers: int | None = None  # candidates evaluated at once (auto mode)


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h', '1.5m' or plain seconds -> seconds; anything else a UsageError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise UsageError(f"--time-budget {text!r}: expected a positive duration such as 90s, 5m, 1h or 600")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


class _Search:
    def __init__(self, model_path: Path, output: Path, config: CompressConfig, workdir: Path, progress: Progress | None,
                 source: Path | None = None, layer_count: int = 0):
        self.model_path, self.output, self.config, self.workdir = model_path, output, config, workdir
        self.source = source or model_path  # what recipes start from: the input, its norms folded (exact)
        self.progress = progress or (lambda step, done, total: None)
        self.started = time.monotonic()
        self.candidates: list[Candidate] = []
        self.cache: dict = {}
        self.best: tuple | None = None  # (size, recipe, run, validation)
        self.stopped = "search done"
        self.out_of_time = False  # a candidate was stopped at the deadline
        self.costs: list[float] = []
        self.check_s: float | None = None  # the lossless candidate's validation, seconds
        self.starts: dict = {}  # format -> (candidate, recipe, run): its smallest passing uniform setting
        self.fragility: dict = {}  # escaped node name -> output drift when that layer alone is pruned hard
        self.predicted_to_fail: set = set()  # uniform formats the plan's prices rule out (_predicted_to_fail)
        self.pack = output.name.endswith(".shrink")
        self.original_size = model_io.file_size(model_path)
        self.layer_count = layer_count
        self.large = config.large if config.large is not None else self.original_size >= LARGE_MODEL_BYTES
        self.notes: list[str] = []
        data = config.data or config.calibration
        self.judging = ValidateConfig(data=data, labels=config.labels, samples=config.samples, shapes=config.shapes,
                                      threads=config.threads,
                                      seed=config.seed, latency=False, thresholds=config.thresholds)
        # The files every candidate reads (shipped as bytes to a Ray cluster), and how the candidates run.
        self.inputs = {"source": self.source, "model": model_path, "calibration": config.calibration, "data": data}
        self.executor = executors.SerialExecutor(self.inputs, workdir)
        self.task_check = task_check.make_check(config.task_check)
        self.verdicts: dict = {}  # candidate index -> its task check's Verdict

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def final_check_s(self) -> float:
        """What the final check costs: one validation, as the lossless candidate's took (its copy or pack left out:
        packing 90 MB of MiniLM took most of its 69 s, and counted in it left no time for a lossy candidate)."""
        if self.check_s is not None:
            return FINAL_LATENCY_S + self.check_s
        return FINAL_LATENCY_S + (self.costs[0] if self.costs else 0.0)

    def _seconds_left(self) -> float | None:
        """Seconds a candidate may run before the final check no longer fits the budget; None without a budget."""
        if self.config.time_budget_s is None:
            return None
        final_check = self.final_check_s()
        return max(self.config.time_budget_s - self.elapsed() - final_check, 0.0)

    def affordable(self) -> bool:
        """Whether one more candidate fits the candidate budget and (costed as the slowest of the last three) the
        time budget."""
        if self.config.max_candidates is not None and len(self.candidates) >= self.config.max_candidates:
            self.stopped = "candidate limit"
            return False
        return self._time_for_one()

    def _time_for_one(self) -> bool:
        if self.out_of_time:
            return False
        if self.config.time_budget_s is None:
            return True
        estimate = max(self.costs[-3:], default=0.0)
        if self.large and len(self.costs) == 1 and self.check_s is not None and candidate_process.available():
            # A large model's first lossy candidate: the lossless one's cost is mostly its pack of the float model
            # (MiniLM: 362 s with a 78 s validation on a loaded machine, which left it unstarted); it runs in a
            # child stopped at the deadline, so one validation's time left is enough to start it.
            estimate = self.check_s
        final_check = self.final_check_s()
        if self.elapsed() + estimate + final_check > self.config.time_budget_s:
            self.stopped = "time budget"
            return False
        return True

    def _admit(self) -> float | None:
        """Asked by the executor before each job of a batch starts: None when the time budget is spent, else the
        seconds the job may run before it is stopped (the final check must still fit)."""
        if not self._time_for_one():
            return None
        left = self._seconds_left()
        return math.inf if left is None else left

    def measure_fragility(self) -> None:
        """Each layer's output drift when it alone is pruned to 0.9, which orders the per-layer moves; only that
        is measured (no bit widths: nothing reads them), layer by layer until the deadline. Prune's own
        allocation is kept for the uniform settings: these curves are measured without the refit, and steering
        by them did worse (README, compress). Layers not reached keep no fragility (0: moved first)."""
        from onnxshrink.layer_sensitivity import SensitivityConfig

        last = [time.monotonic(), self.final_check_s() - FINAL_LATENCY_S]  # a layer costs about one validation
        budget = self.config.time_budget_s
        share = None if budget is None else FRAGILITY_SHARE * budget
        phase = {"start": time.monotonic(), "calls": 0, "layer": 0.0}  # calls of stop(); the slowest layer measured

        def stop() -> bool:  # before each layer: its runs cannot be stopped once started
            now = time.monotonic()
            if phase["calls"] >= 2:  # the first call comes before the baseline, the second after it
                phase["layer"] = max(phase["layer"], now - last[0])
            phase["calls"] += 1
            last[0], last[1] = now, max(last[1], now - last[0])  # the slowest layer so far (the first: with setup)
            if budget is None:
                return False
            measured = phase["calls"] - 2  # layers measured so far
            if measured >= 1:  # the rest of the layers, at the slowest one's cost, must fit in the phase's share
                rest = max(self.layer_count - measured, 0) * phase["layer"]
                if now - phase["start"] + rest > share:
                    self.notes.append(f"sensitivity phase stopped after {measured} layer(s): the other "
                                      f"{max(self.layer_count - measured, 0)} would take {rest:.0f} s more, past "
                                      f"{FRAGILITY_SHARE:.0%} of the time budget (unmeasured layers are moved first)")
                    return True
            final_check = self.final_check_s()
            return self.elapsed() + last[1] + final_check > budget

        config = self.config
        # A large model's layer costs about one lossless candidate (its runs, not fixed costs, dominate): when the
        # phase cannot fit in its share, it does not start. A small one is judged on its measured layers (stop()).
        if self.large and share is not None and (self.layer_count + 1) * last[1] > share:
            self.notes.append(f"sensitivity phase skipped: {self.layer_count + 1} runs of about {last[1]:.0f} s would "
                              f"take more than {FRAGILITY_SHARE:.0%} of the time budget (the per-layer moves go in "
                              "model order)")
            return
        if stop() or (config.time_budget_s is not None and  # the baseline and the first layer: two such runs
                      self.elapsed() + 2 * last[1] + FINAL_LATENCY_S + last[1] > config.time_budget_s):
            return
        try:
            sensitivity = api.sensitivity(self.source, config.calibration, SensitivityConfig(sparsities=(0.9,), bits=()),
                                          threads=config.threads, stop=stop, shapes=config.shapes)
        except (DataError, ModelLoadError) as exc:  # it only orders the moves: the search goes on without it
            self.notes.append(f"sensitivity phase skipped: {model_io.first_line(exc)} (the per-layer moves go in "
                              "model order)")
            return
        self.fragility = {glob_literal(layer.node): layer.drift[0] for layer in sensitivity.layers}

    def tick(self, step: str) -> None:
        """Report progress: seconds of the time budget, or candidates of the candidate budget when there is no time
        budget (the search ends on its own: the progress total is then the candidates so far)."""
        best = f" (best {self.original_size / self.best[0]:.1f}x smaller)" if self.best else ""
        if self.config.time_budget_s is not None:
            budget = int(math.ceil(self.config.time_budget_s))
            self.progress(f"{step}{best}", min(int(self.elapsed()), budget), budget)
        else:
            done = len(self.candidates)
            self.progress(f"{step}{best}", done, self.config.max_candidates or max(done, 1))

    def attempt(self, recipe: Recipe, phase: str, strict: bool = False, label: str | None = None) -> tuple[Candidate, RecipeRun | None]:
        """Build, validate, and keep one candidate (the caller checked affordable()). Unless `strict`, a candidate
        the passes cannot build is recorded as failed and the search goes on. A lossy one runs on the executor, so
        that under a time budget it is stopped at the deadline (candidate_process.py); the lossless start and a
        strict one run in this process."""
        if recipe.passes and not strict:
            left = self._seconds_left()
            entry = (recipe, phase, label, label or recipe.summary())
            return self._run_batch([entry], lambda: math.inf if left is None else left)[0][0]
        start = time.monotonic()
        target = self._target(len(self.candidates))
        run = report = error = None
        timings: dict = {}
        try:
            run, report = _build_and_judge(self.inputs, target, self.workdir, self.cache, recipe=recipe,
                                           threads=self.config.threads, judging=self.judging, timings=timings)
        except Exception as exc:
            if strict:
                raise
            error = f"{type(exc).__name__}: {model_io.first_line(exc)}"
        self.costs.append(time.monotonic() - start)
        if phase == "lossless" and "validate" in timings:
            self.check_s = timings["validate"]
        return self._record(recipe, phase, label, target, run, report, error, time.monotonic() - start)

    def evaluate(self, entries: list) -> tuple[list, bool]:
        """Build and judge a batch of independent candidates, (recipe, phase, label, progress text) each, on the
        executor. Each is recorded (numbered, kept if the best, copied to the output) in batch order as soon as the
        ones before it are, whatever order they end in: every executor then gives the same search. Under a time
        budget each job is stopped at the deadline (a pass cannot be cut short; candidate_process.py). Returns the
        (candidate, run) of the jobs that ran, in order, and whether all of them did."""
        complete = True
        if self.config.max_candidates is not None:
            room = max(self.config.max_candidates - len(self.candidates), 0)
            if room < len(entries):
                entries, complete = entries[:room], False
                self.stopped = "candidate limit"
        recorded, ran_all = self._run_batch(entries, self._admit)
        return recorded, complete and ran_all

    def _run_batch(self, entries: list, admit) -> tuple[list, bool]:
        first = len(self.candidates)
        jobs = [executors.Job(functools.partial(_build_and_judge, recipe=recipe, threads=self.config.threads,
                                                judging=self.judging), self._target(first + number), text)
                for number, (recipe, _, _, text) in enumerate(entries)]
        finished: dict = {}
        recorded: list = []

        def done(index: int, outcome: executors.Outcome) -> None:
            self.costs.append(outcome.seconds)  # in the order they end: estimates only
            if outcome.stopped:
                self.out_of_time, self.stopped = True, "time budget"
            finished[index] = outcome
            while len(recorded) in finished:
                number = len(recorded)
                recorded.append(self._record_outcome(entries[number], jobs[number], finished.pop(number)))

        outcomes = self.executor.map(jobs, self.cache, admit, done, lambda index: self.tick(jobs[index].label))
        _evict(self.cache)
        return recorded, None not in outcomes and not self.out_of_time

    def _target(self, index: int) -> Path:
        return self.workdir / f"candidate{index}{'.shrink' if self.pack else '.onnx'}"

    def _record_outcome(self, entry: tuple, job: executors.Job, outcome: executors.Outcome) -> tuple:
        recipe, phase, label, _ = entry
        run = report = None
        error = outcome.error
        if outcome.stopped:  # stopped at the deadline: nothing it built is kept
            error = f"stopped at the time budget ({outcome.limit:.0f} s were left for it)"
        elif outcome.value is not None:
            run, report = outcome.value
        return self._record(recipe, phase, label, job.target, run, report, error, outcome.seconds)

    def _record(self, recipe: Recipe, phase: str, label: str | None, target: Path, run, report, error,
                seconds: float) -> tuple[Candidate, RecipeRun | None]:
        """Number a built candidate, keep it when it passes and is the smallest so far (copied to the output)."""
        index = len(self.candidates)
        size = target.stat().st_size if target.exists() and error is None else None
        passed = report is not None and report.passed
        verdict = None
        if passed and self.task_check is not None:
            verdict = self.run_task_check(target)
            self.verdicts[index] = verdict
            passed, seconds = verdict.accepted, seconds + verdict.seconds
            if self.costs:  # a candidate costs its check too (the estimates of what still fits the budget)
                self.costs[-1] += verdict.seconds
            if verdict.stopped:
                self.out_of_time, self.stopped = True, "time budget"
        better = passed and (self.best is None or size < self.best[0])
        if better:
            _copy_model(target, self.output)
            self.best = (size, recipe, run, report)
        self.candidates.append(Candidate(
            index, phase, label or recipe.summary(), size, self.original_size / size if size else None,
            report.accuracy["candidate"] if report and report.accuracy else None,
            max((o.max_abs for o in report.outputs.values()), default=None) if report else None,
            min((o.cosine for o in report.outputs.values()), default=None) if report else None,
            passed, better, seconds, error,
            None if verdict is None else {"accepted": verdict.accepted, "detail": verdict.detail,
                                          "seconds": round(verdict.seconds, 3)}))
        target.unlink(missing_ok=True)
        return self.candidates[-1], run

    def run_task_check(self, target: Path) -> task_check.Verdict:
        """The user's task check on a built candidate that passed the thresholds: on a runnable .onnx (a pack is
        unpacked for it), stopped at the time budget's deadline."""
        left = self._seconds_left()
        return api.task_verdict(self.task_check, self.model_path, target, timeout=left, scratch=self.workdir)

    def uniform(self, formats: list[str]) -> None:
        """Per format, the highest passing sparsity on the grid, by bisection (accuracy falls with sparsity); a large
        model climbs the grid from 0 instead, stopping at the first failure: its first bisection point (75% zeros)
        costs minutes and fails (MiniLM), while the format alone is cheap and likely to pass. The formats' walks are
        independent: they advance in lockstep, one step of each per batch, so that workers run them side by side."""
        sparsities = self.config.sparsities
        if self.large and sparsities == DEFAULT_SPARSITIES:
            sparsities = LARGE_SPARSITIES
        grid = sorted(sparsities) if self.pack else [0.0]  # zeros buy nothing in an unpacked file
        walks = {name: (-1, len(grid)) for name in formats}  # format -> (highest passing, lowest failing) index
        while True:
            entries, points = [], []
            for name in formats:
                low, high = walks[name]
                passes = []
                while high - low > 1:
                    mid = low + 1 if self.large else (low + high) // 2
                    passes = uniform_passes(name, grid[mid], self.config, self.large)
                    if passes:
                        break
                    low = mid  # the float model unpruned: the lossless start
                walks[name] = (low, high)
                if passes:
                    entries.append((Recipe(passes), "uniform", None, f"{name}, sparsity {grid[mid]:g}"))
                    points.append((name, mid))
            if not entries:
                return
            results, complete = self.evaluate(entries)
            for (name, mid), (entry, (candidate, run)) in zip(points, zip(entries, results)):
                low, high = walks[name]
                walks[name] = (mid, high) if candidate.passed else (low, mid)
                if candidate.passed and (name not in self.starts or candidate.size < self.starts[name][0].size):
                    self.starts[name] = (candidate, entry[0], run)
            if not complete:
                return

    def refine(self) -> None:
        """Per-layer moves from each format's best uniform setting, the smallest first, while time remains."""
        for candidate, recipe, run in sorted(self.starts.values(), key=lambda start: start[0].size):
            if not self.affordable():
                return
            self.descend(candidate, recipe, run)

    def descend(self, start: Candidate, recipe: Recipe, run: RecipeRun) -> None:
        """Greedy per-layer moves: one layer sparser, or one layer's codebook a bit narrower. Of the moves that pass
        and shrink the file, the one saving the most bytes per unit of added output drift (1 - cosine) becomes the
        base of the next round (coarse moves first, finer ones when none passes). The output keeps the smallest.
        The moves of a tier are one batch (the executor may run them side by side)."""
        size, drift = start.size, 1.0 - (start.cosine or 1.0)
        while True:
            base = resolve(recipe, run)
            found = []
            for tier in (0, 1):
                # The least sensitive layers first: if the budget runs out, the likeliest moves were tried.
                moves = sorted(_moves(base, tier), key=lambda m: self.fragility.get(base.passes[m[0]].layers[m[1]].match, 0.0))
                entries = []
                for spec_index, rule_index, key, value in moves:
                    move = f"{base.passes[spec_index].layers[rule_index].match} {key} {value}"
                    entries.append((_with_rule(base, spec_index, rule_index, key, value), "per-layer", f"base + {move}",
                                    f"per layer: {move}"))
                results, complete = self.evaluate(entries)
                if not complete:
                    return
                found = [(candidate, entry[0], result) for entry, (candidate, result) in zip(entries, results)
                         if candidate.passed and candidate.size < size]
                if found:
                    break
            if not found:
                return
            step = max(found, key=lambda f: (size - f[0].size) / max(1.0 - (f[0].cosine or 1.0) - drift, 1e-6))
            size, recipe, run, drift = step[0].size, step[1], step[2], 1.0 - (step[0].cosine or 1.0)


def _build_and_judge(inputs: dict, target: Path, workdir: Path, cache: dict, evict: bool = True, *, recipe: Recipe,
                     threads: int, judging: ValidateConfig, timings: dict | None = None):
    """One candidate: the recipe's file at `target`, and its validation against the original (its seconds in
    `timings`, when given, for the caller's estimates). `inputs` names the files it reads (source, model,
    calibration, data): on a Ray worker they are local copies (executors.py)."""
    source, model_path, calibration = inputs["source"], inputs["model"], inputs.get("calibration")
    calibration = str(calibration) if calibration is not None else None
    if inputs.get("data") is not None:
        judging = dataclasses.replace(judging, data=str(inputs["data"]))
    if recipe.passes:
        run = run_recipe(source, recipe, target, calibration=calibration, workdir=workdir, threads=threads,
                         cache=cache, evict=evict)
    else:
        _copy_model(model_path, target)
        run = RecipeRun(str(target), [], {}, {}, {})
    started = time.monotonic()
    report = api.validate(model_path, target, judging)
    if timings is not None:
        timings["validate"] = time.monotonic() - started
    return run, report


def uniform_passes(name: str, sparsity: float, config: CompressConfig, large: bool = False) -> list[PassSpec]:
    """The passes of one uniform candidate: prune to `sparsity` (none at 0), then weight format `name`. A large
    model is pruned the one-shot way (SparseGPT per layer, scope layer: measured better on MiniLM than the refit
    and than scope auto, which needs a sensitivity run) and clustered with one capture per block (capture_rounds 6:
    about 2.5x less CPU than one per wave on MiniLM, docs/benchmarks-cluster.md)."""
    passes = []
    if sparsity > 0:
        options = {"sparsity": sparsity, "remove_dead_units": True}
        if large and config.calibration:
            options.update(method="sparsegpt", scope="layer")
        passes.append(PassSpec("prune", options))
    if FORMATS[name] is not None:
        spec = format_pass(name, config)
        if large and spec.name == "cluster" and config.calibration:
            spec.options["capture_rounds"] = LARGE_CAPTURE_ROUNDS
        passes.append(spec)
    return passes


LARGE_CAPTURE_ROUNDS = 6


def search_formats(calibration, chosen: tuple | None, large: bool, planned_bits: float | None = None,
                   failed_width: int | None = None) -> list[str]:
    """The formats the uniform phase tries, in order: FORMATS' order, or LARGE_FORMAT_ORDER for a large model. A large
    model whose planned codebooks passed at `planned_bits` per weight skips the uniform formats no narrower than that:
    they could only win with pruning, which the large search climbs to one minutes-long candidate at a time. When the
    plan's allocation of every layer at `failed_width` bits failed, the codebook formats that wide or narrower are
    skipped on any model: the widest of them is that very model (ddddocr's detector built it twice, 150 s of its
    600), and narrower codebooks or pruning only lose more."""
    formats = [f for f in available_formats(calibration) if chosen is None or f in chosen]
    if failed_width is not None and chosen is None:
        formats = [f for f in formats if not (f.startswith("cluster") and FORMAT_BITS.get(f, 32) <= failed_width)]
    if not large:
        formats = [f for f in formats if f not in LARGE_ONLY or (chosen is not None and f in chosen)]
    if large:
        formats.sort(key=lambda f: LARGE_FORMAT_ORDER.index(f) if f in LARGE_FORMAT_ORDER else len(LARGE_FORMAT_ORDER))
        if planned_bits is not None and chosen is None:
            formats = [f for f in formats if FORMAT_BITS.get(f, 32) < planned_bits]
    return formats


FORMAT_BITS = {"int8": 8, "int8static": 8, "gptq4": 4, "cluster6": 6, "cluster5": 5, "cluster4": 4, "cluster3": 3,
               "cluster2": 2, "float": 32}  # nominal bits per weight of each format
PLANNED = "planned"  # the key of the planned codebooks in the search's starts


def planned_recipe(allocation: dict, config: CompressConfig, large: bool, other_floats: str = "int8",
                   per: str = "layer", tables: tuple = ()) -> Recipe:
    """One cluster pass with each layer's planned width: the most common layer width as the default, rules for the
    rest; the other floats (biases, norms) in `other_floats` (compress_plan.other_floats prices int8 against fp16),
    one codebook `per` layer or per output channel, or in "mixed" each layer its own (a `per` rule on the layers
    keyed per channel: compress_plan.layer_choice; compress_plan.finalists). `tables` names the Gathers of the
    priced embedding tables in `allocation`: each gets its own width rule and the row-scaled codebook in either
    layout; a table not priced is not coded (it stays with the other floats)."""
    from onnxshrink.compress_plan import layer_choice, table_choice

    spec = format_pass("cluster4", config)
    spec.options["other_floats"] = other_floats
    spec.options["codebook"] = PLANNED_CODEBOOK
    if per == "channel":
        spec.options["per"] = per
    tables = [node for node in tables if node in allocation]
    if tables:
        spec.options["table_per"] = "layer"
        if config.calibration:
            spec.options["table_rows"] = PLANNED_TABLE_ROWS
    else:
        spec.options["embeddings"] = False
    if large and config.calibration:
        spec.options["capture_rounds"] = LARGE_CAPTURE_ROUNDS
    counts: dict = {}
    for node, key in allocation.items():
        if node not in tables:
            width = layer_choice(key, per)[0]
            counts[width] = counts.get(width, 0) + 1
    default = max(sorted(counts), key=lambda width: counts[width]) if counts else 4
    spec.options["bits"] = default
    rules = []
    for node, width in allocation.items():
        if node in tables:  # a table's key is its width and codebook form (compress_plan.table_choice)
            bits, form = table_choice(width)
            rules.append(LayerRule(glob_literal(node), {"bits": bits} if form == PLANNED_CODEBOOK else
                                   {"bits": bits, "codebook": form}))
        else:
            bits, layout = layer_choice(width, per)
            options = ({"bits": bits} if bits != default else {}) | ({"per": layout} if per == "mixed" and
                                                                     layout == "channel" else {})
            if options:
                rules.append(LayerRule(glob_literal(node), options))
    return Recipe([PassSpec("cluster", spec.options, rules)])


def plan_phase(search) -> tuple[float | None, int | None]:
    """Codebook widths per layer, planned before any whole-model candidate (compress_plan): each layer priced from
    one capture of the calibration data, then the frontier's allocations at a few average widths bisected on the
    whole model (about three candidates), then the frontier between the narrowest pass and the next rung
    (_refine_plan). The narrowest that passes becomes a start of the per-layer moves, and the uniform formats its
    prices rule out are noted in search.predicted_to_fail; its average bits are returned (None: nothing passed, or
    nothing planned: an .onnx output, or --formats given), with the width of the widest allocation that put every
    layer at one width and failed (None: no such allocation)."""
    from onnxshrink import compress_plan

    config = search.config
    # Formats the user chose are the only ones tried: the plan mixes codebook widths of its own
    if not search.pack or config.formats is not None or "cluster4" not in available_formats(config.calibration):
        return None, None
    if not search.affordable():
        return None, None
    search.tick("pricing each layer's codebook widths")
    started = time.monotonic()
    prices = compress_plan.price_layers(search.source, config.calibration, threads=config.threads,
                                        stop=lambda: not search.affordable(), min_share=compress_plan.MIN_LAYER_SHARE,
                                        form=PLANNED_CODEBOOK, table_rows=PLANNED_TABLE_ROWS)
    memory.release()  # the pricing's model, captures and session are gone before the candidates fork from here
    if not prices.layers:
        search.notes.extend(prices.notes)
        return None, None
    rungs = compress_plan.finalists(prices, getattr(config.thresholds, "min_cosine", None))
    tables = tuple(layer.node for layer in prices.tables)
    priced = f"{len(prices.layers) - len(tables)} layers" + (f" and {len(tables)} embedding table(s)" if tables else "")
    search.notes.append(f"planned codebooks: {priced} priced in {time.monotonic() - started:.0f} s "
                        f"({prices.runs} capture run(s) of {prices.samples} sample(s)); "
                        f"{len(rungs)} allocations from {compress_plan.average_bits(rungs[0][0], prices, rungs[0][1]):.1f} "
                        f"to {compress_plan.average_bits(rungs[-1][0], prices, rungs[-1][1]):.1f} bits per weight, bisected")
    measured = [layer for layer in prices.layers if layer.drift is not None and not layer.table]
    if measured:
        search.notes.append(f"planned codebooks: {len(measured)} layers' prices scaled to the model's measured drift "
                            f"at {compress_plan.SENSITIVITY_BITS} bits"
                            + "".join(f"; table {layer.tensor} measured at each width ("
                                      + ", ".join(f"{b} bits {e:.2g}" for b, e in sorted(layer.errors.items())) + ")"
                                      for layer in prices.tables if layer.proxy is not None)
                            + "; other floats in int8: drift "
                            + (f"{prices.int8_drift:.2g} for {prices.int8_elements} elements"
                               if prices.int8_drift is not None else "not measured"))
    search.notes.extend(prices.notes)
    # Each layout bisected on its own, the one reaching the fewest bits first: predicted drift ranks allocations
    # within a layout, not across them (PP-OCR's recogniser: every layer 4 bits per channel predicted 0.107, measured
    # 0.0098; 6.31 bits per layer predicted 0.018, measured 0.0137), so one bisection over both skipped the passing one.
    layouts: dict = {}
    for allocation, per in rungs:
        layouts.setdefault(per, []).append(allocation)
    # The mixed layout last: after a pure layout passes, only its rungs narrower than that pass are tried.
    order = sorted(layouts, key=lambda per: (per == "mixed", compress_plan.average_bits(layouts[per][-1], prices, per)))
    passed, passed_bits, failed_width = None, None, None
    budget = _drift_budget(config)
    passed_rung, failed_rungs = None, {}  # (allocation, layout) of the narrowest pass; layout -> narrowest failure
    for per in order:
        ladder = [a for a in layouts[per]
                  if passed_bits is None or compress_plan.average_bits(a, prices, per) < passed_bits]
        low, high = -1, len(ladder)
        while high - low > 1:
            if not search.affordable():
                break
            mid = (low + high) // 2
            allocation = ladder[mid]
            candidate, recipe, run = _try_planned(search, allocation, per, prices, tables)
            if candidate.passed:
                low = mid
                if passed is None or candidate.size < passed[0].size:
                    passed, passed_bits = (candidate, recipe, run), compress_plan.average_bits(allocation, prices, per)
                    passed_rung = (allocation, per)
                if budget is not None and compress_plan.measured(prices):
                    break  # its measured/predicted ratio now guides the probes below it (_refine_plan) better than
                    # the ladder's next rung: MiniLM's 4.00-bit rung, 1.5x the budget so scaled, cost 130 s to fail
            else:
                high = mid
                failed_rungs[per] = allocation  # the last failure of a layout is the rung next to its narrowest pass
                widths = set(allocation.values()) if per == "layer" else set()
                if len(widths) == 1:
                    failed_width = max(failed_width or 0, widths.pop())
    if passed is None:
        return None, failed_width
    allocation, per = passed_rung
    passed = _refine_plan(search, prices, tables, passed, allocation, per, failed_rungs.get(per), budget)
    passed_bits = compress_plan.average_bits(passed[3], prices, per)
    search.starts[PLANNED] = passed[:3]
    search.predicted_to_fail = _predicted_to_fail(search, prices, passed[0], passed[3], per, budget)
    return passed_bits, failed_width


UNIFORM_SLACK = 2.0  # a uniform codebook predicted over this many times the drift budget is not tried
MIN_DRIFT_RATIO = 0.05  # the layers' validated/predicted drift ratio is taken as at least this (_drift_ratio)
PROBE_SLACK = 1.25  # a next frontier step so scaled over this many times the budget counts as failed, untried
FROZEN_STEPS = 2  # frontier steps the refinement may hold back after the whole model failed them (_refine_plan)


def _drift_budget(config: CompressConfig) -> float | None:
    min_cosine = getattr(config.thresholds, "min_cosine", None)
    return None if min_cosine is None else 1.0 - min_cosine


def _try_planned(search, allocation: dict, per: str, prices, tables: tuple) -> tuple:
    """One planned allocation built and judged on the whole model: (candidate, recipe, run)."""
    from onnxshrink import compress_plan

    floats = compress_plan.other_floats(allocation, prices, per)
    label = f"planned codebooks, {compress_plan.summary(allocation, prices, per)}" + (
        ", other floats fp16" if floats == "fp16" else "")
    search.tick(label)
    recipe = planned_recipe(allocation, search.config, search.large, floats, per, tables)
    candidate, run = search.attempt(recipe, "planned", label=label)
    return candidate, recipe, run


def _drift_ratio(candidate: Candidate, allocation: dict, prices, per: str) -> float | None:
    """Validated over predicted drift of the layers of a judged planned candidate, the tables' share taken as
    priced (measured outright on the whole model, they need no scaling); None: no cosine, or no layer predicted.
    The plan's sum of single-layer drifts overstated MiniLM's whole model 1.6-2.4x, PP-OCR's recogniser's up to
    11x; MiniLM's word table at 3 bits was priced at 0.011 and the model measured 0.017 with it."""
    from onnxshrink import compress_plan

    layers = compress_plan.predicted_drift(allocation, prices, per, tables=False)
    if candidate.cosine is None or layers <= 0:
        return None
    tables = compress_plan.predicted_drift(allocation, prices, per, tables=True)
    return max(1.0 - candidate.cosine - tables, MIN_DRIFT_RATIO * layers) / layers


def _scaled_drift(allocation: dict, prices, per: str, ratio: float) -> float:
    """An allocation's predicted drift with its layers' share scaled by `ratio` (_drift_ratio)."""
    from onnxshrink import compress_plan

    return (compress_plan.predicted_drift(allocation, prices, per, tables=True)
            + ratio * compress_plan.predicted_drift(allocation, prices, per, tables=False))


def _refine_plan(search, prices, tables: tuple, passed: tuple, allocation: dict, per: str, failed: dict | None,
                 budget: float | None) -> tuple:
    """The frontier's allocations between the narrowest passing rung and the next narrower one (the failed rung
    of that layout, else the frontier's narrowest predicted within DRIFT_SLACK x the budget), bisected on the whole
    model: the ladder's rungs are half a bit apart (MiniLM: 4.50 passed at 7.82x, 8x is 4.38). The first probe is the
    narrowest whose prediction, scaled by the passing rung's validated/predicted ratio, fits the budget.

    When the bisection closes on a single failed step, that step's item is held where it is and the frontier goes
    on without it (up to FROZEN_STEPS times): a step that lowers a big item (MiniLM's word table, half the weights,
    4 -> 3 bits) saves more than the whole interval, so nothing lay between its two ends, and the layers' own
    narrower widths were never tried.

    With a task check (--task-check), a candidate within the budget may still be rejected: the check's own limit
    on drift lies lower, unknown. Probes then aim between the largest drift it accepted and the smallest it rejected
    (their geometric mean, _task_aim), so the frontier is bisected against the check too; aimed at the cosine budget
    alone they walked down from the rejected end one step at a time (ddddocr's detector: 11 probes at 3.11-3.13 bits
    per weight, all rejected, against a pass at 4.50).

    The ratio is retaken from each judged probe, failed ones too: taken at the passing rung alone, it understated
    the drift near the edge (MiniLM: from a pass at 5.04 bits, five probes at 4.20-4.24 bits each failed by a hair,
    0.9893-0.9899, one frontier step wider than the last). Returns (candidate, recipe, run, allocation) of the
    narrowest that passed."""
    from onnxshrink import compress_plan

    path = compress_plan.frontier(prices, per)
    if allocation not in path:
        return (*passed, allocation)
    low = path.index(allocation)
    limit = compress_plan.DRIFT_SLACK * budget if budget is not None and compress_plan.measured(prices) else None

    def end(path: list, low: int) -> int:  # the first allocation past `low` predicted over the limit
        return next((i for i in range(low + 1, len(path))
                     if compress_plan.predicted_drift(path[i], prices, per) > limit), len(path))

    if failed is not None and failed in path:
        high, failed_at_high = path.index(failed), True
    elif limit is not None:
        high, failed_at_high = end(path, low), False
    else:
        return (*passed, allocation)
    best = (*passed, allocation)
    ratio = _drift_ratio(passed[0], allocation, prices, per) if budget is not None else None
    tried, skipped, frozen = 0, 0, set()
    while search.affordable():
        if high - low <= 1:
            if not failed_at_high or limit is None or len(frozen) >= FROZEN_STEPS or high >= len(path):
                break
            frozen.update(node for node, b in path[high].items() if path[low].get(node) != b)
            path = path[:low + 1] + compress_plan.frontier(prices, per, path[low], frozenset(frozen))[1:]
            high, failed_at_high = end(path, low), False
            continue
        probe = (low + high) // 2
        if ratio is not None:
            aim = _task_aim(search, budget)
            fitting = [i for i in range(low + 1, high) if _scaled_drift(path[i], prices, per, ratio) <= aim]
            if not fitting and _scaled_drift(path[low + 1], prices, per, ratio) > PROBE_SLACK * budget:
                high, failed_at_high = low + 1, True  # predicted to fail even scaled: held untried
                skipped += 1
                continue
            probe = fitting[-1] if fitting else low + 1
        candidate, recipe, run = _try_planned(search, path[probe], per, prices, tables)
        tried += 1
        if candidate.passed:
            low = probe
            if candidate.size < best[0].size:
                best = (candidate, recipe, run, path[probe])
                ratio = _drift_ratio(candidate, path[probe], prices, per) if budget is not None else None
        else:
            high, failed_at_high = probe, True
            # the nearest measurement scales the next probe: a ratio taken at the passing end understates the drift
            # near the budget's edge, and the probes then fail by a hair one frontier step after another
            nearer = _drift_ratio(candidate, path[probe], prices, per) if budget is not None else None
            ratio = nearer if nearer is not None and ratio is not None else ratio
    if tried or frozen:
        held = (f" ({', '.join(sorted(frozen))} held where the whole model failed its next step"
                + (f", {skipped} of those steps predicted to fail and not tried" if skipped else "") + ")"
                if frozen else "")
        search.notes.append(f"planned codebooks: {tried} allocation(s) of the frontier between the narrowest passing "
                            f"rung and the next tried{held}; the narrowest passing: "
                            f"{compress_plan.summary(best[3], prices, per)}")
    return best


def _task_aim(search, budget: float) -> float:
    """The drift a frontier probe aims at: the budget, or with a task check that rejected a candidate within it, the
    geometric mean of the largest drift the check accepted and the smallest it rejected (a bisection in log drift,
    since the check's limit is not known), never above the budget."""
    accepted, rejected = [], []
    for candidate in search.candidates:
        if candidate.task_check is None or candidate.cosine is None or candidate.phase == "lossless":
            continue
        (accepted if candidate.task_check["accepted"] else rejected).append(max(1.0 - candidate.cosine, TASK_AIM_FLOOR))
    if not rejected:
        return budget
    return min(budget, math.sqrt(max(accepted, default=TASK_AIM_FLOOR) * min(rejected)))


TASK_AIM_FLOOR = 1e-6  # drifts below this count as this in _task_aim's geometric mean


def _predicted_to_fail(search, prices, candidate: Candidate, allocation: dict, per: str,
                       budget: float | None) -> set:
    """The uniform formats the plan's prices say fail the budget by a wide margin: each codebook width (GPTQ 4-bit
    as a 4-bit codebook on the layers) with every priced item at it, predicted drift scaled by the passing planned
    candidate's validated/predicted ratio (when that was per layer too), over UNIFORM_SLACK x the budget. MiniLM
    ran 4-bit GPTQ and codebooks (0.9825, 0.9743) in the last 4 minutes of its 10 and failed both; empty without a
    cosine budget or measured prices (the sample models: the uniform phase runs as before)."""
    from onnxshrink import compress_plan

    if budget is None or not compress_plan.measured(prices):
        return set()
    # Measured on per-channel codebooks, the ratio says nothing of the per-layer ones the uniform formats use
    # (PP-OCR's recogniser: 0.09 per channel at 4 bits, 0.76 per layer at 6.31; its per-channel rungs are predicted
    # below zero, under the per-layer 8-bit reference): the prediction as it is.
    # A mixed allocation's layers are mostly per layer (its channel codebooks are where one a layer flattens them).
    ratio = _drift_ratio(candidate, allocation, prices, per) if per != "channel" else 1.0
    if ratio is None:
        return set()
    skipped = set()
    for name in FORMATS:
        if not (name.startswith("cluster") or name == "gptq4"):
            continue
        width = FORMAT_BITS[name]
        uniform = {}
        for layer in prices.layers:
            if name == "gptq4" and layer.table:
                continue  # blockwise quantize leaves the tables to the other floats
            widths = sorted(compress_plan.layout_errors(layer, "layer"))
            uniform[layer.node] = min((b for b in widths if b >= width), default=widths[-1])
        predicted = _scaled_drift(uniform, prices, "layer", ratio)
        if predicted > UNIFORM_SLACK * budget:
            skipped.add(name)
    if skipped:
        search.notes.append(f"uniform formats predicted to fail (over {UNIFORM_SLACK:g}x the drift budget by the plan's "
                            f"prices): {', '.join(sorted(skipped, key=list(FORMATS).index))}"
                            " not tried")
    return skipped


def format_pass(name: str, config: CompressConfig) -> PassSpec:
    """The pass of weight format `name`. Codebook indices are rounded GPTQ's way when the budget is on the outputs
    alone (--min-cosine, --max-drift): it cuts their error 35-45%, and the search then found 4-11% smaller sample
    models; against labels (--max-accuracy-drop) nearest rounding found smaller ones (README, cluster)."""
    spec = FORMATS[name]
    options = dict(spec.options)
    on_outputs = getattr(config.thresholds, "max_accuracy_drop", None) is None
    if spec.name == "cluster" and config.calibration and on_outputs:
        options["rounding"] = "gptq"
    return PassSpec(spec.name, options)


def _moves(recipe: Recipe, tier: int) -> list:
    """(pass, rule, key, value) edits of one layer: tier 0 removes 30% of a layer's kept weights or one codebook
    bit, tier 1 removes 15% of its kept weights."""
    moves = []
    for spec_index, spec in enumerate(recipe.passes):
        for rule_index, rule in enumerate(spec.layers):
            s = rule.options.get("sparsity")
            if spec.name == "prune" and s is not None and s < 0.95:
                moves.append((spec_index, rule_index, "sparsity", round(min(0.95, 1 - (1 - s) * (0.7, 0.85)[tier]), 4)))
            bits = rule.options.get("bits")
            if spec.name == "cluster" and tier == 0 and bits is not None and bits > 2:
                moves.append((spec_index, rule_index, "bits", bits - 1))
    return moves


def _with_rule(recipe: Recipe, spec_index: int, rule_index: int, key: str, value) -> Recipe:
    passes = []
    for i, spec in enumerate(recipe.passes):
        rules = [LayerRule(r.match, dict(r.options)) for r in spec.layers]
        if i == spec_index:
            rules[rule_index].options[key] = value
        passes.append(PassSpec(spec.name, dict(spec.options), rules))
    return Recipe(passes)


def resolve(recipe: Recipe, run: RecipeRun) -> Recipe:
    """The recipe with every layer's realized choice written out (exact sparsity, bits): what --save-recipe
    writes, and the base the per-layer moves edit."""
    passes = []
    for spec in recipe.passes:
        options = dict(spec.options)
        rules = [LayerRule(r.match, dict(r.options)) for r in spec.layers]
        if spec.name == "prune" and run.layer_sparsity and options.get("pattern", "unstructured") == "unstructured":
            options["sparsity"] = round(run.sparsity, 4)
            rules = [r for r in rules if "sparsity" not in r.options]
            rules += [LayerRule(glob_literal(node), {"sparsity": value}) for node, value in run.layer_sparsity.items()]
        if spec.name == "cluster" and run.layer_bits:  # a rule's other options (a table's codebook form) stay
            rules = [LayerRule(r.match, {k: v for k, v in r.options.items() if k != "bits"}) for r in rules]
            rules = [r for r in rules if r.options]
            rules += [LayerRule(glob_literal(node), {"bits": bits}) for node, bits in run.layer_bits.items()]
        passes.append(PassSpec(spec.name, options, rules))
    return Recipe(passes)


def available_formats(calibration) -> list[str]:
    formats = []
    for name, spec in FORMATS.items():
        if spec is not None and spec.name == "cluster":
            try:
                importlib.import_module("onnxshrink.passes.cluster")  # lands with `onnxshrink cluster`
            except ImportError:
                continue
        if name in ("gptq4", "int8static") and calibration is None:
            continue
        formats.append(name)
    return formats


def compress(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    config: CompressConfig | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    save_recipe: str | os.PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
    allow_other_data: bool = False,
) -> CompressReport:
    """The smallest model within the thresholds (automatic), or the recipe's pipeline; OUTPUT is packed when it
    ends in .shrink. Automatic mode always keeps the best valid model so far at OUTPUT."""
    config = config or CompressConfig()
    config = dataclasses.replace(config, task_check=task_check.make_check(config.task_check))  # a bad one: exit 2 now
    model_path = Path(model_path)
    output = Path(output) if output is not None else model_io.default_output(model_path, "compressed", ".shrink")
    replayed = None
    if recipe is not None:
        source = str(recipe) if isinstance(recipe, (str, os.PathLike)) else "the recipe"
        recipe = load_recipe(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
        replayed = check_requirements(recipe, config.calibration, source, allow_other_data)
    thresholds = config.thresholds or Thresholds()
    if recipe is None and config.task_check is None and all(
            v is None for v in (thresholds.max_accuracy_drop, thresholds.min_cosine, thresholds.max_drift,
                                thresholds.min_agreement)):
        raise UsageError("automatic mode needs a budget: --max-accuracy-drop, --min-cosine, --max-drift or --task-check "
                         "(or give --recipe)")
    if config.time_budget_s is not None and not config.time_budget_s > 0:
        raise UsageError(f"time budget {config.time_budget_s}: must be positive")
    if config.max_candidates is not None and config.max_candidates < 1:
        raise UsageError(f"--max-candidates {config.max_candidates}: must be at least 1 (the lossless start)")
    if config.workers is not None and config.workers < 1:
        raise UsageError(f"--workers {config.workers}: must be at least 1")
    if config.executor not in ("local", "ray"):
        raise UsageError(f"--executor {config.executor!r}: choose local or ray")
    if config.ray_address is not None and config.executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    if config.executor == "ray" and recipe is None:
        executors.import_ray()  # not installed: the one-line hint before any work
    if config.labels and not (config.data or config.calibration):
        raise UsageError("--labels needs --data (or --calibration): labels are read from the data file")
    if thresholds.max_accuracy_drop is not None and not config.labels:
        raise UsageError("--max-accuracy-drop needs --labels (and --data holding them)")
    inputs = [model_path] + [Path(p) for p in (config.data, config.calibration) if p]
    model_io.check_output_path(output, inputs, force, with_data=not output.name.endswith(".shrink"))
    if save_recipe is not None:
        model_io.check_output_path(Path(save_recipe), inputs, force, with_data=False)
    if recipe is not None:  # where a result failing the thresholds goes: replaced without --force, never an input
        model_io.check_output_path(_failed_output(output), inputs, True, with_data=not output.name.endswith(".shrink"))
    model = model_io.load(model_path)  # unreadable input: exit 3 before anything runs
    workdir = model_io.staging_dir(output, ".compress")
    try:
        source, folded = None, fold_layernorm(model)
        if folded:
            source = workdir / "input.folded.onnx"
            # What the output is measured against: the input's size, not the folded copy's.
            model_io.set_metadata(model, {model_io.ORIGINAL_BYTES: str(model_io.original_size(model, model_path))})
            model_io.save(model, source, force=True)
        layer_count = len(layer_names(model))
        del model
        search = _Search(model_path, output, config, workdir, progress, source, layer_count)
        if recipe is not None:
            report = _recipe_mode(search, recipe)
        else:
            if config.executor == "ray":
                search.tick("starting Ray")
            executor = executors.make_executor(config.executor, search.inputs, workdir, config.workers,
                                               model_bytes=search.original_size, threads=config.threads,
                                               address=config.ray_address)
            with executor:
                search.executor = executor
                report = _auto_mode(search)
            report.executor, report.workers = executor.name, executor.workers
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if replayed:
        report.notes.insert(0, replayed)
    if folded:
        report.notes.insert(0, f"{folded} LayerNormalization scale(s) and shift(s) folded into the MatMuls that read "
                               "them before any pass (exact up to float rounding): fewer small tensors to store")
    if save_recipe is not None and report.recipe is not None and report.passed:
        text = resolve_dict_toml({**report.recipe, "requires": data_requirements(config.calibration)})
        model_io.write_atomically(Path(save_recipe), lambda stream: stream.write(text.encode()))
        report.notes.append(f"recipe written to {save_recipe}: onnxshrink compress {model_path} --recipe {save_recipe}")
    elif save_recipe is not None:
        report.notes.append(f"no recipe written to {save_recipe}: " + ("the lossless form was the smallest valid model"
                                                                        if report.passed else "no valid model was found"))
    return report


def _failed_output(output: Path) -> Path:
    """OUT.failed.shrink (or .onnx): where recipe mode writes a result that fails the thresholds."""
    stem = output.name.rsplit(".", 1)[0]
    return output.with_name(f"{stem}.failed{output.suffix}")


def resolve_dict_toml(recipe: dict) -> str:
    return parse_recipe(recipe).to_toml()


def _recipe_mode(search: _Search, recipe: Recipe) -> CompressReport:
    search.tick("recipe")
    config = search.config
    target = search.workdir / f"recipe{'.shrink' if search.pack else '.onnx'}"
    run = run_recipe(search.source, recipe, target, calibration=config.calibration, workdir=search.workdir,
                     threads=config.threads)
    search.tick("validate")
    final = _final_validation(search, target)
    if final.passed and search.task_check is not None:
        search.tick("task check")
        task_check.add_to_report(final, search.run_task_check(target))
    destination = search.output
    if not final.passed:
        destination = _failed_output(search.output)
    _copy_model(target, destination)
    final.candidate = str(destination)
    search.best = (target.stat().st_size, recipe, run, final)
    report = _report(search, "recipe", final, destination)
    report.stopped = "recipe"
    if not final.passed:
        report.notes.append(f"validation failed: result written to {destination} for inspection; {search.output} untouched")
    return report


def _auto_mode(search: _Search) -> CompressReport:
    config = search.config
    search.tick("lossless start")
    start, _ = search.attempt(Recipe([]), "lossless", strict=True)
    rejected = search.verdicts.get(start.index)
    if rejected is not None and not rejected.accepted:  # the thresholds held: the check refuses the model itself
        report = _report(search, "auto", None, None)
        if rejected.stopped:
            search.stopped = report.stopped = "time budget"
            report.notes.append(f"the task check ({search.task_check}) did not finish on the lossless form of the "
                                "model within the time budget; nothing written")
            return report
        search.stopped = report.stopped = "task check rejects the input model"
        report.notes.append(f"the task check ({search.task_check}) rejected the lossless form of the model, which "
                            f"decodes to the input itself: {rejected.detail or 'no output'}; no candidate can pass "
                            "it (check the command on the input model); nothing written")
        return report
    if not start.passed:
        search.stopped = "thresholds cannot be met"
        report = _report(search, "auto", None, None)
        report.notes.append("even the lossless form of the model fails the thresholds (it decodes to the same model): "
                            "they cannot be met; nothing written")
        return report
    planned_bits, failed_width = plan_phase(search)
    if search.pack:
        search.tick("sensitivity")
        search.measure_fragility()
    formats = search_formats(config.calibration, config.formats, search.large, planned_bits, failed_width)
    formats = [f for f in formats if f not in search.predicted_to_fail]
    if search.large and formats:
        search.notes.append(f"large model ({search.original_size / 2**20:.0f} MB): formats in the order "
                            f"{', '.join(formats)}, each from sparsity 0 upwards until one fails"
                            + (", pruned one-shot (SparseGPT, per layer)" if config.calibration else ""))
    elif search.large:
        search.notes.append(f"large model ({search.original_size / 2**20:.0f} MB): no uniform format left to try "
                            "(the planned codebooks passed below their widths, or failed at theirs)")
    search.uniform(formats)
    if config.refine:
        search.refine()
    search.tick("final check")
    final = _final_validation(search, search.output)
    best = next((c for c in reversed(search.candidates) if c.best), None)
    if best is not None and best.index in search.verdicts:  # the file checked when it was kept: the same bytes
        task_check.add_to_report(final, search.verdicts[best.index])
    report = _report(search, "auto", final, search.output)
    report.notes.extend(search.notes)
    if not search.pack:
        report.notes.append("an .onnx output holds every zero: sparsity was not searched (write a .shrink to gain from it)")
    return report


def _final_validation(search: _Search, path: Path) -> ValidationReport:
    config = dataclasses.replace(search.judging, latency=True, latency_budget_s=FINAL_LATENCY_S)
    return api.validate(search.model_path, path, config)


def _report(search: _Search, mode: str, final: ValidationReport | None, output: Path | None) -> CompressReport:
    original = model_io.file_size(search.model_path)
    lossless = next((c.size for c in search.candidates if c.phase == "lossless"), None)
    recipe, layers, summary = None, [], "lossless"
    if search.best is not None and search.best[1].passes:
        chosen = resolve(search.best[1], search.best[2])
        recipe, summary = chosen.to_dict(), search.best[1].summary()
        run = search.best[2]
        nodes = list(dict.fromkeys([*run.layer_sparsity, *run.layer_format]))
        layers = [LayerChoice(n, run.layer_sparsity.get(n, 0.0), run.layer_format.get(n, "float"), run.layer_bits.get(n))
                  for n in nodes]
    size = model_io.file_size(output) if output is not None and output.exists() else None
    return CompressReport(
        "compress", mode, str(search.model_path), str(output) if output else None,
        bool(final is not None and final.passed),
        {"original": original, "output": size, "ratio": size / original if size else None,
         "times_smaller": original / size if size else None, "lossless": lossless},
        recipe, summary, layers, search.candidates, final, search.elapsed(),
        search.config.time_budget_s if mode == "auto" else None, search.stopped,
        max_candidates=search.config.max_candidates if mode == "auto" else None)
