"""Model inputs for validation and calibration: from an .npz file, or synthesized from the signature.

Data is a list of batches (dicts of input name -> array) so that models with a fixed
batch size and inputs without a batch axis (scalars, recurrent state) run unchanged.

An .npz is untrusted: only the members the model needs are read, each one's declared size
(its .npy header) is checked against what the zip says it holds before anything is allocated,
and non-finite values are refused, since one NaN silently ruins calibration and drift alike.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxshrink.errors import DataError, UsageError

DEFAULT_BATCH = 32
DEFAULT_SYNTHETIC_SAMPLES = 16
# Symbolic dimensions other than the batch axis take this size unless --shape says otherwise.
DEFAULT_SYMBOLIC_DIM = 1
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
) -> Dataset:
    """Seeded random inputs from the signature; drift on these is not accuracy."""
    rng = np.random.default_rng(seed)
    samples = samples or DEFAULT_SYNTHETIC_SAMPLES
    overrides = shape_overrides or {}
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise UsageError(f"--shape names unknown input(s): {', '.join(sorted(unknown))}")
    any_dynamic = any(s.dynamic_batch and s.name not in overrides for s in specs)
    notes = ["inputs are synthetic (seeded random): drift measured on them is not task accuracy"]
    batches = []
    runs = -(-samples // batch_size) if any_dynamic else samples
    remaining = samples
    for _ in range(runs):
        rows = min(batch_size, remaining) if any_dynamic else 1
        remaining -= rows
        batch = {}
        for spec in specs:
            shape = overrides.get(spec.name) or [
                rows if (i == 0 and not isinstance(d, int)) else (d if isinstance(d, int) else DEFAULT_SYMBOLIC_DIM)
                for i, d in enumerate(spec.shape)
            ]
            if spec.name in overrides and len(shape) != len(spec.shape):
                raise UsageError(f"--shape {spec.name}: model input has rank {len(spec.shape)}, got {len(shape)} dims")
            batch[spec.name] = _random(rng, spec.dtype, shape)
        batches.append(batch)
    return Dataset(batches, None, samples, True, notes)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 2, shape).astype(dtype)
    raise DataError(f"cannot synthesize inputs of type {dtype}; give --data")


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
