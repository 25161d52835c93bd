"""The onnx package's own backend test cases, as folders of model.onnx + test_data_set_*/{input,output}_*.pb, and
the check that every weight command survives each of them (issue 16 item 5).

The wheel ships `onnx/backend/test/data/{simple,pytorch-converted,pytorch-operator,light}`; the ~1,900 node cases
exist only as Python definitions (`onnx.backend.test.case.node`), which the package's own `cmd_tools.generate_data`
writes out. Both land once in ~/.cache/onnxshrink/onnx-backend-<onnx version>/ (built in a temporary folder, then
renamed, so concurrent test runs never see half a cache).

`light` models are shape-only stubs: each weight is `ConstantOfShape(<name>__SHAPE)` computed at run time, and the
wheel ships an expected output but no input; the input is made as onnx's runner makes it (`arange / n`).

Run `python tests/backend_cases.py` for the tally docs/ROBUSTNESS.md reports (every case x variant x command).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SHIPPED_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
KINDS = SHIPPED_KINDS + ("light", "node")
VARIANTS = ("shipped", "frozen")
CACHE = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink")) / f"onnx-backend-{onnx.__version__}"
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

# Each weight command, as a user types it (input and -o added by the harness). `static` gets --calibration built from
# the case's own inputs; pack is followed by unpack of what it wrote.
COMMANDS = {
    "quantize": ["quantize"],
    "quantize-static": ["quantize", "--mode", "static"],
    "quantize-bits4": ["quantize", "--bits", "4"],
    "prune": ["prune", "--sparsity", "0.5"],
    "cluster": ["cluster", "--bits", "4"],
    "factorize": ["factorize", "--rank-ratio", "0.5"],
    "pack": ["pack"],
    "flush-denormals": ["flush-denormals"],
}
SUFFIX = {"pack": ".shrink"}
DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5, 6}  # 70 (internal error) is documented too, but it is always a bug


# ---------------------------------------------------------------- materialise the cache


def materialise(root: Path = CACHE) -> Path:
    """The cache folder, built on first use: <root>/<kind>/<case>/model.onnx + test_data_set_*/."""
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for kind in SHIPPED_KINDS:
            shutil.copytree(DATA / kind, staging / kind)
        _write_light(staging / "light")
        _write_node(staging)
        counts = {kind: len(list((staging / kind).iterdir())) for kind in KINDS}
        (staging / ".complete").write_text("".join(f"{k} {n}\n" for k, n in counts.items()))
        try:
            os.rename(staging, root)
        except OSError:  # another process finished first: keep its copy
            if not (root / ".complete").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_light(folder: Path) -> None:
    """light_X.onnx -> light/X/model.onnx with onnx's runner's input (arange / n over the input's shape)."""
    for path in sorted((DATA / "light").glob("light_*.onnx")):
        name = path.stem[len("light_"):]
        case = folder / name
        data_set = case / "test_data_set_0"
        data_set.mkdir(parents=True)
        shutil.copy(path, case / "model.onnx")
        model = onnx.load(str(path))
        for j, value in enumerate(_free_inputs(model)):
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            array = (np.arange(n).reshape(shape) / n).astype(np.float32)
            (data_set / f"input_{j}.pb").write_bytes(numpy_helper.from_array(array, value.name).SerializeToString())
        for j in range(len(model.graph.output)):
            shutil.copy(path.with_name(f"{path.stem}_output_{j}.pb"), data_set / f"output_{j}.pb")


def _write_node(staging: Path) -> None:
    """The node cases through onnx's own writer (cmd_tools.generate_data), fed node cases instead of model cases."""
    from onnx.backend.test import cmd_tools
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
        saved = cmd_tools.model_test
        cmd_tools.model_test = types.SimpleNamespace(collect_testcases=lambda: cases)
        try:
            cmd_tools.generate_data(argparse.Namespace(output=str(staging)))
        finally:
            cmd_tools.model_test = saved


# ---------------------------------------------------------------- read a case


@dataclass
class Case:
    kind: str
    name: str
    folder: Path

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def cases(root: Path | None = None) -> list[Case]:
    root = materialise() if root is None else root
    found = []
    for kind in KINDS:
        for folder in sorted((root / kind).iterdir()):
            if (folder / "model.onnx").is_file():
                found.append(Case(kind, folder.name, folder))
    return found


def _free_inputs(model: onnx.ModelProto) -> list:
    """Graph inputs that are not initializers: the ones a test_data_set feeds, in order."""
    inits = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _read_value(path: Path, value_type: onnx.TypeProto):
    """One input_*.pb / output_*.pb as onnxruntime takes it: an array, a list of arrays, or None (empty optional)."""
    data = path.read_bytes()
    which = value_type.WhichOneof("value")
    if which == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if which == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if which == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def feeds(model: onnx.ModelProto, case: Case) -> list[dict]:
    """Each test_data_set's inputs, keyed by the model's free input names."""
    free = _free_inputs(model)
    result = []
    for data_set in sorted(case.folder.glob("test_data_set_*")):
        count = len(list(data_set.glob("input_*.pb")))
        result.append({free[j].name: _read_value(data_set / f"input_{j}.pb", free[j].type) for j in range(count)})
    return result


def is_tensor(value) -> bool:
    return isinstance(value, np.ndarray)


def variant_model(model: onnx.ModelProto, case_feeds: list[dict]) -> tuple[onnx.ModelProto, list[dict]]:
    """The `frozen` variant: initializers leave the graph inputs, and every fed tensor input but the first becomes an
    initializer holding test_data_set_0's value (node cases keep their weights as inputs), so the commands see
    weights they may change. Returns the model and the feeds that remain."""
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    graph = frozen.graph
    inits = {i.name for i in graph.initializer}
    first = case_feeds[0] if case_feeds else {}
    tensor_names = [n for n, v in first.items() if is_tensor(v)]
    freeze = set(tensor_names[1:])
    for name in freeze:
        graph.initializer.append(numpy_helper.from_array(np.asarray(first[name]), name))
    kept = [v for v in graph.input if v.name not in inits and v.name not in freeze]
    del graph.input[:]
    graph.input.extend(kept)
    if frozen.ir_version < 4:  # before IR 4 every initializer had to be a graph input
        frozen.ir_version = 4
    return frozen, [{n: v for n, v in f.items() if n not in freeze} for f in case_feeds]


# ---------------------------------------------------------------- run the commands


@dataclass
class Outcome:
    status: str  # "pass", "refused", "fail", "n/a"
    exit_code: int | None = None
    message: str = ""
    notes: list = field(default_factory=list)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ort_run(source, feeds_list: list[dict]):
    """Outputs of each data set in onnxruntime (optimizations on, one thread); raises what onnxruntime raises."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return [session.run(None, f) for f in feeds_list]


def _signature(outputs) -> list:
    """dtype and shape of every output (sequences: of every element), what a lossy command must keep."""
    def one(value):
        if isinstance(value, np.ndarray):
            return (str(value.dtype), tuple(value.shape))
        if isinstance(value, list):
            return ("seq", tuple(one(v) for v in value))
        return (type(value).__name__,)
    return [[one(v) for v in run] for run in outputs]


def calibration_npz(case_feeds: list[dict], path: Path) -> bool:
    """An .npz of the case's inputs (data set 0 as one sample batch); False when some input is not a finite tensor."""
    first = case_feeds[0] if case_feeds else {}
    if not first or not all(is_tensor(v) and v.dtype != object for v in first.values()):
        return False
    np.savez(path, **first)
    return True


def run_command(runner, case: Case, variant: str, command: str, work: Path, *, validate: bool = False,
                reference: dict | None = None) -> Outcome:
    """Run one command on one case variant through the CLI and judge it: a documented exit code, no traceback, the
    input byte-identical, and any output loadable by onnxruntime with the original's output dtypes and shapes on the
    case's own inputs. `reference` caches the original's prepared model per (case, variant)."""
    from onnxshrink.cli import app

    ref = reference if reference is not None else {}
    if "model" not in ref:
        ref.update(prepare(case, variant, work))
    if ref.get("skip"):
        return Outcome("n/a", message=ref["skip"])
    source: Path = ref["model"]
    before = _digest(source)
    output = work / f"{variant}.{command}{SUFFIX.get(command, '.onnx')}"
    args = [*COMMANDS[command], str(source), "-o", str(output), "--force"]
    if command == "quantize-static":
        if not ref["calibration"]:
            return Outcome("n/a", message="an input is not a tensor: no calibration .npz")
        args += ["--calibration", str(ref["calibration"])]
    if command not in ("pack",):
        args += [] if validate else ["--no-validate"]
    with no_tiny_weights(variant == "frozen"):
        result = runner.invoke(app, args, env={"COLUMNS": "160", "NO_COLOR": "1"})
    code = result.exit_code
    text = result.output
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    if crashed or "Traceback" in text:
        detail = "".join(traceback.format_exception(result.exception)) if crashed else text
        return Outcome("fail", code, "traceback: " + detail.strip().splitlines()[-1][:300])
    if _digest(source) != before:
        return Outcome("fail", code, "the input model changed")
    if code not in DOCUMENTED_EXITS:
        return Outcome("fail", code, "exit %s: %s" % (code, _error_line(result)))
    if code not in (0, 1, 6):
        if output.exists():
            return Outcome("fail", code, f"exit {code} but an output was written")
        return Outcome("refused", code, _error_line(result))
    if not output.exists():
        return Outcome("fail", code, f"exit {code} and no output written")
    written = output
    if command == "pack":
        unpacked = work / f"{variant}.unpacked.onnx"
        back = runner.invoke(app, ["unpack", str(output), "-o", str(unpacked), "--force"],
                             env={"COLUMNS": "160", "NO_COLOR": "1"})
        if back.exit_code != 0 or not unpacked.exists():
            return Outcome("fail", back.exit_code, "unpack: " + _error_line(back))
        if not _same_tensors(onnx.load(str(source)), onnx.load(str(unpacked))):
            return Outcome("fail", 0, "unpack: tensors differ from the packed model")
        written = unpacked
    notes = [] if command == "pack" or not _same_tensors(onnx.load(str(source)), onnx.load(str(written))) else ["unchanged"]
    if ref["signature"] is None:
        return Outcome("pass", code, notes=notes + ["output not run: " + ref["original_error"]])
    try:
        got = _signature(_ort_run(written, ref["feeds"]))
    except Exception as exc:  # onnxruntime's own errors: the output is broken
        return Outcome("fail", code, "onnxruntime: " + str(exc).strip().splitlines()[0][:300])
    if got != ref["signature"]:
        return Outcome("fail", code, f"outputs {got} != original {ref['signature']}")
    return Outcome("pass", code, notes=notes)


@contextlib.contextmanager
def no_tiny_weights(active: bool = True):
    """The backend cases' weights are a few bytes, which onnxshrink leaves alone (< 1 KiB: weights.TINY_BYTES).
    The frozen variant lowers that floor to 0 so each command rewrites every weight it would rewrite in a larger
    model of the same operators."""
    if not active:
        yield
        return
    from onnxshrink import weights
    from onnxshrink.passes import quantize_static

    saved = weights.TINY_BYTES, quantize_static.TINY_BYTES
    weights.TINY_BYTES = quantize_static.TINY_BYTES = 0
    try:
        yield
    finally:
        weights.TINY_BYTES, quantize_static.TINY_BYTES = saved


def prepare(case: Case, variant: str, work: Path) -> dict:
    """The model a command gets (shipped as is, or frozen) in `work`, its feeds, calibration .npz, and what
    onnxruntime makes of the original (None when it cannot run it: such outputs are not run either)."""
    model = onnx.load(str(case.folder / "model.onnx"))
    case_feeds = feeds(model, case)
    if variant == "frozen":
        frozen, case_feeds = variant_model(model, case_feeds)
        if frozen.graph.input == model.graph.input and len(frozen.graph.initializer) == len(model.graph.initializer):
            return {"model": None, "skip": "no weights to freeze: same as shipped"}
        model = frozen
    path = work / f"{variant}.model.onnx"
    onnx.save(model, str(path))
    npz = work / f"{variant}.calibration.npz"
    info = {"model": path, "feeds": case_feeds, "calibration": npz if calibration_npz(case_feeds, npz) else None,
            "signature": None, "original_error": ""}
    try:
        info["signature"] = _signature(_ort_run(path, case_feeds))
    except Exception as exc:
        info["original_error"] = "onnxruntime cannot run the original (" + str(exc).strip().splitlines()[0][:160] + ")"
    return info


def _same_tensors(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    def values(model):  # bytes for numbers; strings (object arrays) by value, their bytes are pointers
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n: (x.tolist() if x.dtype == object else (str(x.dtype), x.shape, x.tobytes())) for n, x in arrays.items()}
    return values(a) == values(b)


def _error_line(result) -> str:
    lines = [line for line in (result.stderr or result.output).strip().splitlines() if line.strip()]
    if len(lines) != 1:
        return f"({len(lines)} lines) " + " | ".join(lines)[:300]
    return lines[0][:300]


def check_case(runner, case: Case, work: Path, commands=tuple(COMMANDS), variants=VARIANTS,
               validate_commands=()) -> dict:
    """Every (variant, command) of one case -> Outcome, each command in its own sub-folder of `work`."""
    outcomes = {}
    for variant in variants:
        reference: dict = {}
        for command in commands:
            folder = work / variant / command
            folder.mkdir(parents=True, exist_ok=True)
            if "model" not in reference:
                reference.update(prepare(case, variant, work))
            outcomes[(variant, command)] = run_command(runner, case, variant, command, folder,
                                                       validate=command in validate_commands, reference=reference)
    return outcomes


# ---------------------------------------------------------------- the tally


def sample(all_cases: list[Case], every: int) -> list[Case]:
    """Every `every`-th case of each kind (all shipped model cases, node cases thinned): deterministic."""
    return [c for i, c in enumerate(all_cases) if c.kind != "node" or i % every == 0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--node-every", type=int, default=1, help="run every N-th node case only")
    parser.add_argument("--only", default="", help="comma-separated case ids (kind/name)")
    parser.add_argument("--log", default="", help="write one line per outcome here")
    args = parser.parse_args(argv)
    from typer.testing import CliRunner

    chosen = [c for c in cases() if c.kind in args.kinds.split(",")]
    if args.only:
        chosen = [c for c in chosen if c.id in args.only.split(",")]
    node_cases = [c for c in chosen if c.kind == "node"]
    chosen = [c for c in chosen if c.kind != "node"] + node_cases[::args.node_every]
    runner = CliRunner()
    tally: Counter = Counter()
    reasons: Counter = Counter()
    log = open(args.log, "w") if args.log else None
    start = time.monotonic()
    for i, case in enumerate(chosen):
        with tempfile.TemporaryDirectory(prefix="backend-") as tmp:
            try:
                outcomes = check_case(runner, case, Path(tmp))
            except Exception as exc:  # the harness itself: count, never stop the tally
                outcomes = {("shipped", "harness"): Outcome("fail", None, f"harness: {type(exc).__name__}: {exc}")}
        for (variant, command), outcome in outcomes.items():
            tally[(case.kind, variant, command, outcome.status)] += 1
            if outcome.status == "pass" and "unchanged" not in outcome.notes and command != "pack":
                tally[(case.kind, variant, command, "changed")] += 1
            if outcome.status in ("refused", "fail"):
                reasons[(outcome.status, command, _reason_key(outcome.message))] += 1
            if log:
                log.write(f"{case.id}\t{variant}\t{command}\t{outcome.status}\t{outcome.exit_code}\t{outcome.message}\t{';'.join(outcome.notes)}\n")
                log.flush()
        if i % 50 == 0:
            print(f"{i}/{len(chosen)} {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    print(f"{len(chosen)} cases in {time.monotonic() - start:.0f} s")
    statuses = ("pass", "changed", "refused", "fail", "n/a")
    print("| kind | variant | command | " + " | ".join(statuses) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in statuses) + " |")
    for kind in KINDS:
        for variant in VARIANTS:
            for command in COMMANDS:
                row = [tally[(kind, variant, command, s)] for s in statuses]
                if any(row):
                    print(f"| {kind} | {variant} | {command} | " + " | ".join(map(str, row)) + " |")
    print()
    for (status, command, reason), n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"{n}\t{status}\t{command}\t{reason}")
    return 0


def _reason_key(message: str) -> str:
    """A message with its case-specific names dropped, so that the same refusal counts once."""
    import re
    return re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|\b\d+(\.\d+)?\b", "…", message)[:160]


if __name__ == "__main__":
    sys.exit(main())
