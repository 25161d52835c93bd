"""Model inputs for validation and calibration: from an .npz file, or synthesized from the signature.

Data is a list of batches (dicts of input name -> array) so that models with a fixed
batch size and inputs without a batch axis (scalars, recurrent state) run unchanged.

An .npz is untrusted: only the members the model needs are read, each one's declared size
(its .npy header) is checked against what the zip says it holds before anything is allocated,
and non-finite values are refused, since one NaN silently ruins calibration and drift alike.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxshrink.errors import DataError, InputsUnavailable, UsageError

DEFAULT_BATCH = 32
DEFAULT_SYNTHETIC_SAMPLES = 16
# Symbolic dimensions other than the batch axis take this size unless --shape says otherwise.
DEFAULT_SYMBOLIC_DIM = 1
# Image inputs (rank 4, 1 or 3 channels) with a symbolic height or width: the smallest of these that runs.
PROBE_SIZES = (32, 64, 128, 224, 256, 320, 416, 512, 640)
# Token inputs (input_ids, attention_mask, ...): a realistic sentence length, or the longest shorter one that runs.
TOKEN_LENGTH = 128
TOKEN_LENGTHS = (128, 64, 32, 16, 8, 4, 2, 1)
# Signal inputs (float, rank 2 or 3, a symbolic batch: audio [batch, samples], [batch, channels, samples]) with a
# symbolic length: the shortest of these that runs (an STFT's reflect Pad or a wide Conv refuses 1 sample).
SIGNAL_LENGTHS = (1, 16, 64, 256, 512, 1024, 1600, 4000, 16000)
# Calibration data that also serves validation keeps its last quarter (at least MIN_HOLDOUT samples) out of the
# calibrating passes; with fewer than MIN_HOLDOUT + MIN_CALIBRATION samples nothing is held out.
MIN_HOLDOUT = 4
MIN_CALIBRATION = 4
NPY_MAGIC = b"\x93NUMPY"
DEFLATE_MAX_RATIO = 1032  # deflate never expands more than this (zlib's documented limit): beyond it the zip lies
READ_CHUNK = 16 << 20  # bytes read (and checked) at a time


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list  # int for fixed dims, str for symbolic, None for unknown

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and not isinstance(self.shape[0], int)


@dataclass
class Dataset:
    batches: list  # list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    samples: int
    synthetic: bool
    notes: list
    batch_axes: dict = field(default_factory=dict)  # input name -> axis holding the samples (absent: passed whole)
    shape_sources: dict = field(default_factory=dict)  # synthesized: input name -> where its sizes came from (SOURCES)

    def input_shapes(self) -> dict:
        return {name: list(array.shape) for name, array in self.batches[0].items()}


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that no initializer provides."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(f"input {value.name!r} is not a tensor (sequences and maps are not supported)")
        dims = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value >= 0:  # a fixed 0 is a real size (onnxruntime checks it)
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(value.name, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), dims))
    return specs


def parse_shape_overrides(items: list[str] | None) -> dict[str, list[int]]:
    """`["input=1,3,224,224"]` -> {"input": [1, 3, 224, 224]}."""
    overrides = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            overrides[name] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--shape {item!r}: expected NAME=D1,D2,... with integer dimensions") from None
    return overrides


def load_npz(
    path: str | Path,
    specs: list[InputSpec],
    labels_key: str | None = None,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    role: str = "data",
) -> Dataset:
    """Read inputs (keys = input names, batch along axis 0) and optional labels from an .npz.

    `role` names the data in messages ("calibration data", "evaluation data")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    # Check the magic first: on other files np.load guesses "pickle" and says so, which misleads.
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: not an .npz archive (a single .npy array?); save inputs with numpy.savez")
    if not magic.startswith(b"PK"):
        raise DataError(f"{path}: not an .npz archive (expected a zip file written by numpy.savez)")
    notes = []
    feeds = {}
    labels = None
    converted = {}  # input name -> the dtype the file stored, when it was converted
    try:
        with zipfile.ZipFile(path) as archive:
            members = _npz_members(archive)
            present = ", ".join(sorted(members)) or "none"
            for spec in specs:
                if spec.name not in members:
                    raise DataError(f"{path}: missing input {spec.name!r} (keys present: {present})")
            size = path.stat().st_size
            for spec in specs:  # one member at a time: read, checked, converted; unused members never opened
                array = _read_member(archive, members[spec.name], spec.name, path, size)
                stored = array.dtype
                feeds[spec.name] = _conform(array, spec, path, notes)
                if feeds[spec.name].dtype != stored:
                    converted[spec.name] = stored
                del array
            if labels_key is not None:
                if labels_key not in members:
                    raise DataError(f"{path}: no labels array {labels_key!r} (keys present: {present})")
                labels = _read_member(archive, members[labels_key], labels_key, path, size)
    except DataError:
        raise
    except MemoryError as exc:
        raise DataError(f"{path}: cannot read .npz data (its arrays do not fit in memory)") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise DataError(f"{path}: cannot read .npz data ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc

    if labels is not None:
        if labels.dtype.kind not in "iub":
            raise DataError(f"{path}: labels {labels_key!r} must be integers, got {labels.dtype}")
        if labels.ndim == 0:
            raise DataError(f"{path}: labels {labels_key!r} is a scalar; expected one label per sample")

    count = max((a.shape[0] for a in feeds.values() if a.ndim > 0), default=1)
    if count == 0:
        raise DataError(f"{path}: the inputs hold no samples (axis 0 has length 0)")
    if labels is not None and labels.shape[0] != count:
        raise DataError(f"{path}: labels {labels_key!r} have {labels.shape[0]} rows but the inputs have {count}")
    if samples is not None and samples < count:
        count = samples
        feeds = {k: (a[:count] if a.ndim > 0 and a.shape[0] >= count else a) for k, a in feeds.items()}
        labels = labels[:count] if labels is not None else None
    axes = batch_axes(feeds, specs, count)
    _check_values(feeds, axes, converted, path, role)
    return Dataset(_split(feeds, specs, count, batch_size, notes, axes), labels, count, False, notes, axes)


def _npz_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Key -> zip member, as numpy names them: `x.npy` is key `x`; a member named exactly as the key wins."""
    members = {}
    for info in archive.infolist():
        if not info.is_dir() and info.filename.endswith(".npy"):
            members.setdefault(info.filename[:-4], info)
    for info in archive.infolist():
        if not info.is_dir() and not info.filename.endswith(".npy"):
            members[info.filename] = info
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path, file_size: int) -> np.ndarray:
    """One .npy member, its sizes checked before any allocation.

    The zip directory's sizes must fit the file (stored bytes) and deflate's ratio (inflated bytes), and the
    .npy header's shape x itemsize must equal the inflated size less the header: a lie in any of them, a
    member claiming terabytes in a few bytes, is refused before it is read or inflated.
    """
    where = f"{path}: member {info.filename!r}"
    if info.flag_bits & 0x1:
        raise DataError(f"{where} is encrypted")
    if info.header_offset + info.compress_size > file_size:
        raise DataError(f"{where} claims {info.compress_size} stored bytes, more than the file holds "
                        "(truncated or corrupted)")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # bzip2, lzma: no useful ratio bound
        raise DataError(f"{where} uses zip compression method {info.compress_type}; numpy.savez and savez_compressed "
                        "write stored or deflated members only")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise DataError(f"{where} is stored uncompressed but claims {info.file_size} bytes in {info.compress_size}")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise DataError(f"{where} claims {info.file_size} bytes inflated from {info.compress_size}, more than deflate "
                        "can produce (a zip bomb?)")
    with archive.open(info) as stream:
        magic = stream.read(8)
        if not magic.startswith(NPY_MAGIC) or len(magic) < 8:
            raise DataError(f"{path}: member {key!r} is not a .npy array")
        version = (magic[6], magic[7])
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DataError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        count = math.prod(int(d) for d in shape)
        declared = count * dtype.itemsize
        held = info.file_size - stream.tell()
        if declared != held:
            raise DataError(f"{where}: its header declares shape {list(shape)} of {dtype} ({declared} bytes) but the "
                            f"member holds {held} bytes")
        array = np.empty(count, dtype)
        if declared:
            view = memoryview(array.view(np.uint8))
            done = 0
            while done < declared:
                chunk = stream.read(min(READ_CHUNK, declared - done))
                if not chunk:
                    raise DataError(f"{where} ends after {done} of its {declared} bytes (truncated or corrupted)")
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
        stream.read(1)  # at the end: zipfile checks the CRC
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _check_values(feeds: dict, axes: dict, converted: dict, path: Path, role: str) -> None:
    """Refuse NaN/Inf (naming the input and sample) and data whose every input is all zeros.

    Scanned in slices of samples, so no copy of an input is made. One all-zero input is fine (BERT's
    token_type_ids, a recurrent state's initial zeros); all of them zero carries nothing to measure.
    """
    nonzero = False
    for name, array in feeds.items():
        axis = axes.get(name)
        rows = np.moveaxis(array, axis, 0) if axis is not None else array.reshape(1, *array.shape)
        per_row = max(1, math.prod(rows.shape[1:]))
        step = max(1, (READ_CHUNK // max(array.itemsize, 1)) // per_row)
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step]
            nonzero = nonzero or bool(np.any(part))
            if array.dtype.kind not in "fc":
                continue
            finite = np.isfinite(part)
            if finite.all():
                continue
            flat = finite.reshape(part.shape[0], -1)
            row = int(np.argmin(flat.all(axis=1)))
            column = int(np.argmin(flat[row]))
            value = part[row].reshape(-1)[column]
            what = "nan" if np.isnan(value) else ("inf" if value.real > 0 else "-inf")
            if name in converted:
                what += f" after conversion from {converted[name]} to {array.dtype}"
            where = (f"in sample {start + row}" if axis is not None
                     else f"at index {list(int(i) for i in np.unravel_index(column, array.shape))}")
            raise DataError(f"{path}: input {name!r} has a non-finite value ({what}) {where}; {role} must be finite")
    if feeds and not nonzero and any(a.size for a in feeds.values()):
        raise DataError(f"{path}: every input is all zeros ({', '.join(feeds)}); {role} of zeros measures nothing: "
                        "give real samples")


def synthesize(
    specs: list[InputSpec],
    samples: int | None = None,
    seed: int = 0,
    shape_overrides: dict[str, list[int]] | None = None,
    batch_size: int = DEFAULT_BATCH,
    *,
    model: onnx.ModelProto | None = None,
    runs=None,
    reference_shapes: dict[str, list[int]] | None = None,
) -> Dataset:
    """Seeded random inputs from the signature; drift on these is not accuracy.

    With `model`, symbolic sizes come from its metadata and token inputs get realistic values
    (plan_inputs); with `runs` (a batch -> error message or None), image sizes and signal lengths are probed until the
    model runs. Without them every symbolic dimension other than the batch is 1.
    """
    rng = np.random.default_rng(seed)
    samples = samples or DEFAULT_SYNTHETIC_SAMPLES
    overrides = shape_overrides or {}
    plan = plan_inputs(specs, model, overrides, reference_shapes)
    if runs is not None:
        _probe(plan, specs, runs, seed)
    any_dynamic = any(BATCH in plan.dims[s.name] for s in specs)
    notes = ["inputs are synthetic (seeded random): drift measured on them is not task accuracy"]
    batches = []
    count = -(-samples // batch_size) if any_dynamic else samples
    remaining = samples
    for _ in range(count):
        rows = min(batch_size, remaining) if any_dynamic else 1
        remaining -= rows
        batches.append(plan.batch(specs, rows, rng))
    dataset = Dataset(batches, None, samples, True, notes)
    dataset.batch_axes = {s.name: plan.dims[s.name].index(BATCH) for s in specs if BATCH in plan.dims[s.name]}
    dataset.shape_sources = {s.name: plan.source(s.name) for s in specs}
    notes.extend(plan.notes(specs, dataset.input_shapes()))
    return dataset


# Where a synthesized input's sizes came from, most specific first (the report's input_shape_sources).
SOURCES = ("--shape", "calibration", "metadata", "probe", "token length", "default", "signature")
BATCH = "<batch>"  # a dims entry: the axis that takes the samples of a run


@dataclass
class Fill:
    """How an input's values are made: random, token ids below `high`, all ones, zeros, positions 0..L-1,
    tones: a signal of a few sinusoids over a little noise (`_tones`), or rate: the sample rate SAMPLE_RATE."""

    kind: str = "random"  # random | ids | ones | zeros | positions | tones | rate
    high: int | None = None
    table: str | None = None  # the embedding table whose rows bound the ids


@dataclass
class InputPlan:
    """Each input's dims (ints, BATCH, or a key into `sizes`), each size's source, and each input's fill."""

    dims: dict
    sizes: dict = field(default_factory=dict)  # key (a dim_param, or (input, axis) when unnamed) -> int
    sources: dict = field(default_factory=dict)  # key -> one of SOURCES
    fills: dict = field(default_factory=dict)  # input name -> Fill (absent: random)
    image_keys: list = field(default_factory=list)  # keys to probe at image sizes
    length_keys: list = field(default_factory=list)  # keys to probe at SIGNAL_LENGTHS
    state_axes: list = field(default_factory=list)  # (input, axis): a state's unnamed axis that may be the batch
    token_keys: list = field(default_factory=list)  # keys at the token length
    whole: dict = field(default_factory=dict)  # input name -> "--shape" when the whole shape was given

    def shape(self, name: str, rows: int) -> list[int]:
        return [rows if d == BATCH else (d if isinstance(d, int) else self.sizes[d]) for d in self.dims[name]]

    def source(self, name: str) -> str:
        if name in self.whole:
            return self.whole[name]
        found = {self.sources[d] for d in self.dims[name] if d != BATCH and not isinstance(d, int)}
        return next((s for s in SOURCES if s in found), "signature")

    def batch(self, specs: list[InputSpec], rows: int, rng: np.random.Generator) -> dict:
        return {s.name: _values(rng, s, self.shape(s.name, rows), self.fills.get(s.name)) for s in specs}

    def notes(self, specs: list[InputSpec], shapes: dict) -> list[str]:
        told = [f"{s.name} {shapes[s.name]} ({self.source(s.name)})" for s in specs if self.source(s.name) != "signature"]
        notes = [f"synthesized input sizes: {', '.join(told)}"] if told else []
        tokens = []
        signals = [spec.name for spec in specs if getattr(self.fills.get(spec.name), "kind", None) == "tones"]
        rates = [spec.name for spec in specs if getattr(self.fills.get(spec.name), "kind", None) == "rate"]
        if signals:
            notes.append(f"signal inputs: {', '.join(signals)} a few sinusoids over noise along the length axis (white "
                         "noise alone has a flat spectrum, which hides a filter bank's lost frequency selectivity)")
        if rates:
            notes.append(f"sample rate inputs: {', '.join(rates)} {SAMPLE_RATE} (by name; give --data for another rate)")
        for spec in specs:
            fill = self.fills.get(spec.name)
            if fill is None or fill.kind in ("tones", "rate"):
                continue
            if fill.kind == "ids":
                tokens.append(f"{spec.name} ids spread over 0..{fill.high - 1} (the rows of embedding {fill.table!r})"
                              if fill.high else f"{spec.name} ids 0 or 1 (no embedding table found)")
            else:
                tokens.append(f"{spec.name} {'0..L-1' if fill.kind == 'positions' else fill.kind}")
        if tokens:
            notes.append("token inputs: " + ", ".join(tokens))
        return notes


def plan_inputs(specs: list[InputSpec], model: onnx.ModelProto | None = None, overrides: dict | None = None,
                reference_shapes: dict | None = None) -> InputPlan:
    """Give every symbolic dimension a size, in this order: --shape, the calibration file's shapes, the model's
    metadata (`imgsz`), the token length for token inputs, a probe for image and signal inputs (left to `_probe`),
    else 1.

    A named dimension (`height`) takes one size wherever it appears; an unnamed one is its input's own.
    """
    overrides = overrides or {}
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise UsageError(f"--shape names unknown input(s): {', '.join(sorted(unknown))}")
    plan = InputPlan({})
    for spec in specs:
        if spec.name in overrides and len(overrides[spec.name]) != len(spec.shape):
            raise UsageError(f"--shape {spec.name}: model input has rank {len(spec.shape)}, got "
                             f"{len(overrides[spec.name])} dims")

    def key(spec, axis):
        d = spec.shape[axis]
        return d if isinstance(d, str) else (spec.name, axis)

    def known(k, size, source):
        if k not in plan.sizes:
            plan.sizes[k], plan.sources[k] = int(size), source

    for spec in specs:  # --shape: the whole input, and its named dims wherever else they appear
        if spec.name in overrides:
            plan.dims[spec.name] = list(overrides[spec.name])
            plan.whole[spec.name] = "--shape"
            for axis, d in enumerate(spec.shape):
                if axis > 0 and isinstance(d, str):
                    known(d, overrides[spec.name][axis], "--shape")
    for spec in specs:
        ref = (reference_shapes or {}).get(spec.name)
        if spec.name not in overrides and ref is not None and len(ref) == len(spec.shape):
            for axis, d in enumerate(spec.shape):
                if axis > 0 and not isinstance(d, int):
                    known(key(spec, axis), ref[axis], "calibration")
    fills = token_fills(model, specs) if model is not None else {}
    plan.fills = fills
    imgsz = metadata_image_size(model) if model is not None else None
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    for spec in specs:
        if spec.name in overrides:
            continue
        state = bool(spec.shape) and isinstance(spec.shape[0], int)  # a fixed axis 0: the batch, if any, is elsewhere
        plan.dims[spec.name] = [BATCH if (axis == 0 or state and d in batch_names) and not isinstance(d, int)
                                else (d if isinstance(d, int) else key(spec, axis)) for axis, d in enumerate(spec.shape)]
        symbolic = [axis for axis, d in enumerate(plan.dims[spec.name]) if d != BATCH and not isinstance(d, int)]
        if state and spec.dtype.kind == "f" and len(symbolic) == 1 and BATCH not in plan.dims[spec.name]:
            plan.state_axes.append((spec.name, symbolic[0]))
        image = image_axes(spec)
        for axis, d in enumerate(spec.shape):
            if axis == 0 or isinstance(d, int) or plan.dims[spec.name][axis] == BATCH:
                continue
            k = key(spec, axis)
            if image is not None and axis in image:
                if imgsz is not None:
                    known(k, imgsz[image.index(axis)], "metadata")
                elif k not in plan.sizes:
                    plan.image_keys.append(k)
                    known(k, DEFAULT_SYMBOLIC_DIM, "default")  # until probed
            elif spec.name in fills and axis == 1 and k not in plan.sizes:
                plan.token_keys.append(k)
                known(k, TOKEN_LENGTH, "token length")
            elif axis == signal_axis(spec) and k not in plan.sizes:
                plan.length_keys.append(k)
                known(k, DEFAULT_SYMBOLIC_DIM, "default")  # until probed
    for spec in specs:  # audio: a signal with its samples on the last axis (sized by --shape or not)
        if signal_axis(spec) == len(spec.shape) - 1 and spec.name not in fills:
            fills[spec.name] = Fill("tones")
        elif is_sample_rate(spec) and spec.name not in fills:
            fills[spec.name] = Fill("rate")
    for spec in specs:  # what no rule sized: 1
        for d in plan.dims[spec.name]:
            if d != BATCH and not isinstance(d, int):
                known(d, DEFAULT_SYMBOLIC_DIM, "default")
    return plan


def _probe(plan: InputPlan, specs: list[InputSpec], runs, seed: int) -> None:
    """Image sizes: the smallest of PROBE_SIZES at which one sample runs with every output non-empty. Signal
    lengths: the shortest of SIGNAL_LENGTHS that runs. Token lengths: TOKEN_LENGTH, or the longest shorter one
    that runs. Raises InputsUnavailable when no image size or no signal length runs."""
    rng = np.random.default_rng(seed)
    if plan.image_keys:
        _probe_sizes(plan, specs, runs, rng, plan.image_keys, PROBE_SIZES, "S")
    lengths = [k for k in plan.length_keys if plan.sources.get(k) == "default"]
    if lengths:
        _probe_sizes(plan, specs, runs, rng, lengths, SIGNAL_LENGTHS, "L")
    _probe_state_batch(plan, specs, runs, rng)
    pending = [k for k in plan.token_keys if plan.sources.get(k) == "token length"]
    if pending:
        for length in TOKEN_LENGTHS:
            for k in pending:
                plan.sizes[k] = length
            if runs(plan.batch(specs, 1, rng)) is None:
                if length != TOKEN_LENGTH:
                    for k in pending:
                        plan.sources[k] = "probe"
                return
        for k in pending:  # none runs: validation reports the model's own error at the usual length
            plan.sizes[k] = TOKEN_LENGTH


def _probe_state_batch(plan: InputPlan, specs: list[InputSpec], runs, rng: np.random.Generator) -> None:
    """A recurrent state whose batch axis is unnamed (silero: state [2, ?, 128] beside input [?, ?]): when a run
    of 2 samples fails with that axis at 1, it is taken as the batch if the run then succeeds."""
    if not plan.state_axes or not any(BATCH in dims for dims in plan.dims.values()):
        return
    if runs(plan.batch(specs, 2, rng)) is None:
        return
    before = {name: list(plan.dims[name]) for name, _ in plan.state_axes}
    for name, axis in plan.state_axes:
        plan.dims[name][axis] = BATCH
    if runs(plan.batch(specs, 2, rng)) is not None:
        plan.dims.update(before)


def _probe_sizes(plan, specs, runs, rng, keys: list, sizes: tuple, letter: str) -> None:
    """Give the symbolic dims `keys` the first of `sizes` at which one sample runs (recorded as probed unless it is
    the default size); none running is InputsUnavailable, naming the last failure."""
    errors = []
    for size in sizes:
        for k in keys:
            plan.sizes[k] = size
        error = runs(plan.batch(specs, 1, rng))
        if error is None:
            if size != DEFAULT_SYMBOLIC_DIM:
                for k in keys:
                    plan.sources[k] = "probe"
            return
        errors.append((size, error))
    shapes = ", ".join(f"{s.name} [{', '.join(_probe_text(d, keys, letter) for d in plan.dims[s.name])}]" for s in specs)
    raise InputsUnavailable(
        f"no synthesized input runs the model: {shapes} failed for every {letter} of {', '.join(map(str, sizes))} "
        f"(at {errors[-1][0]}: {errors[-1][1]}); give --data, --calibration, or sizes with --shape NAME=D1,D2,...")


def _probe_text(d, probed: list, letter: str = "S") -> str:
    return "1" if d == BATCH else (letter if d in probed else str(d))


def signal_axis(spec: InputSpec) -> int | None:
    """The length axis of a signal-like input (audio [batch, samples], [batch, channels, samples]): float, rank 2
    or 3, a symbolic batch at axis 0, and this axis the last symbolic one after it. A recurrent state
    ([2, batch, 128]) has a fixed axis 0 and is not one."""
    shape = spec.shape
    if len(shape) not in (2, 3) or spec.dtype.kind != "f" or isinstance(shape[0], int):
        return None
    symbolic = [axis for axis in range(1, len(shape)) if not isinstance(shape[axis], int)]
    return symbolic[-1] if symbolic else None


def image_axes(spec: InputSpec) -> tuple[int, int] | None:
    """(H axis, W axis) of an image-like input: rank 4, 1 or 3 fixed channels at axis 1 (NCHW) or 3 (NHWC),
    and a symbolic height or width."""
    shape = spec.shape
    if len(shape) != 4 or spec.dtype.kind not in "fu":
        return None
    if shape[1] in (1, 3) and not all(isinstance(d, int) for d in shape[2:]):
        return (2, 3)
    if shape[3] in (1, 3) and not all(isinstance(d, int) for d in shape[1:3]):
        return (1, 2)
    return None


def metadata_image_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) from an `imgsz` metadata entry, as ultralytics writes it (`[640, 640]`, or one number)."""
    for prop in model.metadata_props:
        if prop.key == "imgsz":
            numbers = [int(n) for n in re.findall(r"\d+", prop.value)]
            if len(numbers) == 1 and numbers[0] > 0:
                return (numbers[0], numbers[0])
            if len(numbers) == 2 and min(numbers) > 0:
                return (numbers[0], numbers[1])
    return None


PASS_THROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")


def token_fills(model: onnx.ModelProto, specs: list[InputSpec]) -> dict[str, Fill]:
    """Token inputs (integer, rank 2) and their values, recognised by name and by use; others are left out.

    An input whose values index the rows of a rank-2 table (a Gather, maybe behind Cast/Reshape) is token
    ids, spread over the table's rows. By name: `*mask*` all ones, `token_type*`/`segment*` zeros,
    `position*` 0..L-1; `input_ids` without a table found gets ids 0 or 1 (the valid range is unknown).
    """
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    users = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            users.setdefault(name, []).append((node, index))
    fills = {}
    for spec in specs:
        if spec.dtype.kind not in "iu" or len(spec.shape) != 2:
            continue
        lower = spec.name.lower()
        if "mask" in lower:
            fills[spec.name] = Fill("ones")
        elif "token_type" in lower or "segment" in lower:
            fills[spec.name] = Fill("zeros")
        elif "position" in lower:
            fills[spec.name] = Fill("positions")
        else:
            table = _embedding_table(spec.name, users, tables)
            if table is not None:
                fills[spec.name] = Fill("ids", tables[table][0], table)
            elif "input_ids" in lower or lower in ("ids", "tokens"):
                fills[spec.name] = Fill("ids")
    return fills


def _embedding_table(name: str, users: dict, tables: dict) -> str | None:
    """The rank-2 table whose rows `name` indexes through Gather (after Cast/Reshape/...), if any."""
    frontier, seen = [name], set()
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        for node, index in users.get(value, ()):
            if node.op_type == "Gather" and index == 1 and node.input[0] in tables and len(tables[node.input[0]]) == 2 \
                    and not any(a.name == "axis" and a.i != 0 for a in node.attribute):
                return node.input[0]
            if node.op_type in PASS_THROUGH and index == 0:
                frontier.extend(node.output)
    return None


def _values(rng: np.random.Generator, spec: InputSpec, shape: list[int], fill: Fill | None) -> np.ndarray:
    if fill is None or fill.kind == "random" or (fill.kind == "ids" and not fill.high):
        return _random(rng, spec.dtype, shape)
    if fill.kind == "ids":
        return rng.integers(0, fill.high, shape).astype(spec.dtype)
    if fill.kind == "ones":
        return np.ones(shape, spec.dtype)
    if fill.kind == "zeros":
        return np.zeros(shape, spec.dtype)
    if fill.kind == "tones":
        return _tones(rng, shape).astype(spec.dtype)
    if fill.kind == "rate":
        return np.full(shape, SAMPLE_RATE, dtype=spec.dtype)
    return np.broadcast_to(np.arange(shape[-1] if shape else 1, dtype=spec.dtype), shape).copy()  # positions


TONES = (1, 4)  # sinusoids in a synthesized signal, at least and at most
TONE_SNR_DB = (10.0, 50.0)  # a synthesized signal's tones over its noise, least and most (log-uniform noise RMS)
SAMPLE_RATE = 16000  # a sample rate input's synthesized value: speech models' rate (silero-vad takes 8000 or 16000)
SAMPLE_RATE_NAMES = re.compile(r"^(sr|sample_?rate|sampling_?rate|fs)$", re.IGNORECASE)


def is_sample_rate(spec: InputSpec) -> bool:
    """A sample rate input, by name: an integer or float scalar (or one element) called sr, sample_rate, ..."""
    return (spec.dtype.kind in "iuf" and len(spec.shape) <= 1 and all(d in (1, None) or isinstance(d, str) for d in spec.shape)
            and bool(SAMPLE_RATE_NAMES.match(spec.name)))


def _tones(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    """Signals along the last axis, RMS about 1 as standard normal noise: each row 1-4 sinusoids (frequencies
    log-uniform from 0.002 to 0.45 cycles a sample, random phases and levels) over white noise 10-50 dB under
    them. Real audio is mostly narrowband; white noise alone spreads its energy evenly, so a filter bank that lost
    its frequency selectivity (an STFT basis pruned or coded coarsely) still returns about the right energy per
    band and passes a cosine check it fails on speech or a tone."""
    length = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    t = np.arange(length)
    out = np.empty((rows, length))
    for row in range(rows):
        count = int(rng.integers(TONES[0], TONES[1] + 1))
        freqs = np.exp(rng.uniform(np.log(0.002), np.log(0.45), count))
        levels = rng.uniform(0.2, 1.0, count)
        signal = (levels[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + rng.uniform(0, 2 * np.pi, count)[:, None])).sum(0)
        signal /= max(float(np.sqrt(np.mean(signal ** 2))), 1e-12)
        noise = rng.standard_normal(length) * 10 ** (-rng.uniform(*TONE_SNR_DB) / 20)
        out[row] = (signal + noise) / np.sqrt(1 + np.mean(noise ** 2))
    return out.reshape(shape)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 2, shape).astype(dtype)
    raise DataError(f"cannot synthesize inputs of type {dtype}; give --data")


def split_holdout(dataset: Dataset, specs: list[InputSpec]) -> tuple[Dataset, Dataset, range] | None:
    """(calibrating samples, held-out samples, the held-out rows): the last quarter, at least MIN_HOLDOUT samples,
    is kept for validation so that no sample both calibrates and judges. None when there are too few samples to
    leave MIN_CALIBRATION to calibrate, or no input carries samples."""
    count = sum(_rows(batch, dataset.batch_axes) for batch in dataset.batches) if dataset.batch_axes else 0
    held = max(MIN_HOLDOUT, count // 4)
    if count - held < MIN_CALIBRATION:
        return None
    start = count - held
    return take_samples(dataset, specs, 0, start), take_samples(dataset, specs, start, count), range(start, count)


PADDING_MASKS = ("attention_mask",)  # [batch, sequence] inputs whose zeros mark padding tokens


def trim_padding(dataset: Dataset, specs: list[InputSpec]) -> Dataset:
    """The same samples, ordered by their real length, each run cut to its longest real sequence: for the passes
    whose statistics leave padding out (prune_common.token_rows), which still paid onnxruntime to compute it.

    Why: text calibration is padded to one length, and MiniLM's export is four fifths padding (10452 of 12800
    positions); a transformer's cost grows with the sequence, so each capture ran about 4x the real tokens.
    With an attention mask a real token never reads a padded one, so its activations do not change.

    Only right padding is cut (every mask row ones, then zeros), and only when the mask's sequence dimension is
    symbolic and every input that carries it has it at axis 1 beside a batch axis 0 (input_ids, token_type_ids):
    anything else, labels, or nothing to cut returns the dataset as it is. The runs keep their sizes."""
    spec = {s.name: s for s in specs}
    axes = dataset.batch_axes
    mask_name = next((name for name in PADDING_MASKS if name in spec and axes.get(name) == 0
                      and len(spec[name].shape) == 2 and isinstance(spec[name].shape[1], str)), None)
    if mask_name is None or dataset.labels is not None or not dataset.batches:
        return dataset
    sequence = spec[mask_name].shape[1]
    cut = [s.name for s in specs if sequence in s.shape]
    if any(spec[name].shape.index(sequence) != 1 or spec[name].shape.count(sequence) != 1 for name in cut):
        return dataset
    if any(axes.get(name) != 0 for name in dataset.batches[0]) or len({b[mask_name].shape[1] for b in dataset.batches}) != 1:
        return dataset  # an input passed whole, or with its samples on another axis: left as given
    mask = np.concatenate([b[mask_name] for b in dataset.batches], axis=0)
    if not np.isin(mask, (0, 1)).all():
        return dataset
    lengths = np.count_nonzero(mask, axis=1)
    width = mask.shape[1]
    if lengths.min() < 1 or lengths.min() == width \
            or not np.array_equal(mask != 0, np.arange(width)[None, :] < lengths[:, None]):
        return dataset
    joined = {name: np.concatenate([b[name] for b in dataset.batches], axis=0) for name in dataset.batches[0]}
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for size in [_rows(b, axes) for b in dataset.batches]:
        rows = order[start:start + size]
        start += size
        longest = int(lengths[rows].max())
        batches.append({name: np.ascontiguousarray(value[rows][:, :longest] if name in cut else value[rows])
                        for name, value in joined.items()})
    return Dataset(batches, None, dataset.samples, dataset.synthetic, list(dataset.notes), dict(axes),
                   dict(dataset.shape_sources))


def take_samples(dataset: Dataset, specs: list[InputSpec], start: int, stop: int) -> Dataset:
    """Samples start..stop-1 of a dataset, cut into runs as load_npz does; inputs without samples passed whole."""
    axes = dataset.batch_axes
    feeds = {}
    for name, first in dataset.batches[0].items():
        if name in axes:
            joined = np.concatenate([b[name] for b in dataset.batches], axis=axes[name])
            feeds[name] = np.take(joined, np.arange(start, stop), axis=axes[name])
        else:
            feeds[name] = first
    labels = dataset.labels[start:stop] if dataset.labels is not None else None
    notes = list(dataset.notes)
    batches = _split(feeds, specs, stop - start, DEFAULT_BATCH, notes, axes)
    return Dataset(batches, labels, stop - start, dataset.synthetic, notes, dict(axes))


def _rows(batch: dict, axes: dict) -> int:
    name = next(iter(axes))
    return int(batch[name].shape[axes[name]])


def _conform(array: np.ndarray, spec: InputSpec, path: Path, notes: list) -> np.ndarray:
    if array.ndim != len(spec.shape):
        raise DataError(
            f"{path}: input {spec.name!r} has shape {list(array.shape)}, model expects rank {len(spec.shape)} {_shape_text(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if axis > 0 and isinstance(want, int) and got != want:
            raise DataError(
                f"{path}: input {spec.name!r} has shape {list(array.shape)}, model expects {_shape_text(spec.shape)}"
            )
    if array.dtype.kind == "V":  # numpy.savez writes ml_dtypes arrays (bfloat16, float8, int4) as raw records
        raise DataError(f"{path}: input {spec.name!r} is stored as raw {array.dtype.itemsize}-byte records ({array.dtype.str}), "
                        "as numpy.savez writes bfloat16, float8 or int4 arrays, which cannot be read back as numbers; "
                        "save it as float32")
    if array.dtype != spec.dtype:
        same_kind = (array.dtype.kind == "f") == (spec.dtype.kind == "f") and array.dtype.kind != "b" and spec.dtype.kind != "b"
        if not same_kind:
            raise DataError(f"{path}: input {spec.name!r} is {array.dtype}, model expects {spec.dtype}")
        notes.append(f"input {spec.name!r} converted from {array.dtype} to {spec.dtype}")
        with np.errstate(over="ignore"):  # a value out of range becomes inf, which _check_values names
            array = array.astype(spec.dtype)
    return array


def batch_axes(feeds: dict, specs: list[InputSpec], count: int) -> dict[str, int]:
    """The axis along which each input carries the samples.

    Axis 0 when its length is the sample count; otherwise a symbolic axis named like
    another input's batch axis (or unnamed) of that length: recurrent state often
    carries the batch elsewhere (silero VAD: state [2, batch, 128]). Inputs with
    neither (a scalar sample rate) are passed whole to every run.
    """
    batch_names = {s.shape[0] for s in specs if s.shape and not isinstance(s.shape[0], int)}
    axes = {}
    for spec in specs:
        array = feeds[spec.name]
        if array.ndim > 0 and array.shape[0] == count:
            axes[spec.name] = 0
            continue
        for axis in range(1, min(array.ndim, len(spec.shape))):
            if not isinstance(spec.shape[axis], int) and spec.shape[axis] in batch_names and array.shape[axis] == count:
                axes[spec.name] = axis
                break
    return axes


def _split(feeds: dict, specs: list[InputSpec], count: int, batch_size: int, notes: list, axes: dict) -> list[dict]:
    """Cut batched inputs along their batch axis into runs; pass the others whole to each run."""
    static = {s.shape[0] for s in specs
              if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 and axes.get(s.name) == 0}
    step = min(static) if static else min(batch_size, count)
    if static and count % step:
        notes.append(f"model has a fixed batch of {step}: the last {count % step} sample(s) are not used")
    batches = []
    for start in range(0, count - (count % step if static else 0), step):
        rows = np.arange(start, min(start + step, count))
        batches.append({n: (np.take(a, rows, axis=axes[n]) if n in axes else a) for n, a in feeds.items()})
    if not batches:
        raise DataError(f"data has {count} sample(s), fewer than the model's fixed batch of {step}")
    return batches


def _shape_text(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
