"""Loading and saving models without ever losing the user's work.

Loading refuses anything that is not a usable ONNX model with a one-line reason.
Saving is atomic: files are written under temporary names in the output's
directory, checked, then renamed into place; the input is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxshrink.codec.container import MAGIC as PACK_MAGIC
from onnxshrink.errors import ModelLoadError, OutputError, UnsupportedModelError
from onnxshrink.runtime import IN_MEMORY_LOCATION, InMemoryModel, make_session
from onnxshrink.protos import all_tensor_protos as _all_tensor_protos
from onnxshrink.protos import iter_graphs  # noqa: F401  (passes import it from here)
from onnxshrink.weights import tensor_nbytes

# Protobuf refuses to serialize a single message over 2 GiB; leave headroom.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
ORT_FORMAT_IDENTIFIER = b"ORTM"


def load(path: str | os.PathLike, for_rewrite: bool = False, with_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise ModelLoadError saying why not.

    A model that fails the full checker but runs in onnxruntime loads (validate can
    run it), unless `for_rewrite`: nothing written from it could pass the checker
    every output must pass, so that is an UnsupportedModelError. Without `with_data`, external tensors
    stay references (their files are still checked): enough for inspect and validate, at no memory cost.
    """
    path = Path(path)
    _check_readable_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 0:
        raise ModelLoadError(f"{path}: file is empty, not an ONNX model")
    if head[4:8] == ORT_FORMAT_IDENTIFIER:
        raise ModelLoadError(f"{path}: is an ORT-format model (.ort); onnxshrink needs the original .onnx file")
    if head == PACK_MAGIC:
        return _load_pack(path, for_rewrite)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model or corrupted ({first_line(exc)})") from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or graph)")
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: the graph has no nodes")
    _check_text(model, path)
    _load_external_data(model, path, read=with_data)
    _check_loadable(model, path, for_rewrite)
    return model


def read_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Read into a model loaded `with_data=False` from `path` its external tensors (decided late: a command
    that streams its weights never reads them all)."""
    _load_external_data(model, Path(path), read=True)


def _load_pack(path: Path, for_rewrite: bool) -> onnx.ModelProto:
    """Decode a `.shrink` file in memory; anything that does not check out is a load error naming why."""
    model = _decode_pack(path)
    # Serialized once: the checker reads these bytes, and so does onnxruntime if the checker refuses.
    _check_loadable(model, path, for_rewrite, serialized=_serialized(model))
    return model


def _decode_pack(path: Path, place=None) -> onnx.ModelProto:
    from onnxshrink.codec.container import CorruptPack
    from onnxshrink.packing import unpack_model

    try:
        return unpack_model(path.read_bytes(), place)
    except CorruptPack as exc:
        raise ModelLoadError(f"{path}: corrupted pack ({exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def session_source(path: str | os.PathLike, split_weights: bool = True) -> str | bytes | InMemoryModel:
    """What onnxruntime should load to run a model file: an ONNX file's path once `load` accepts it, or a pack
    decoded once, handed to onnxruntime without the full ONNX checker: serialized once (bytes), or with
    `split_weights` as its graph's bytes and its large main-graph weights as arrays (make_session's InMemoryModel),
    each coded weight decoded straight into its array (_WeightArrays).

    Why no checker for a pack that is only run: it protects nothing here. `load` hands every model the checker
    refuses to onnxruntime anyway (the fallback in _check_loadable), so onnxruntime, which resolves and
    type-checks the graph itself, is the judge of what runs; the checker only adds its reason to the error.
    Nor can the file prove it holds what `pack` once checked: its digests are written by whoever wrote the file.
    What guards the decoding (sizes bounded before allocation, digests, external locations) still runs.
    A pack onnxruntime refuses fails at make_session (UnsupportedModelError), one line.
    """
    path = Path(path)
    if not is_pack(path):
        load(path, with_data=False)
        return str(path)
    _check_readable_file(path)
    weights: dict = {}
    model = _decode_pack(path, _WeightArrays(weights) if split_weights else None)
    if split_weights:
        weights.update(_take_weights(model, taken=weights))  # large weights the graph record held
    data = _serialized(model)
    del model
    if data is None:
        raise ModelLoadError(f"{path}: decodes to a model over {EXTERNAL_DATA_THRESHOLD} bytes, more than one protobuf "
                             "onnxruntime can load from memory holds; unpack it to an ONNX file first")
    return InMemoryModel(data, weights) if weights else data


_ARRAY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.INT64}


MIN_ARRAY_BYTES = 65536  # smaller weights stay in the graph's bytes: an array each costs more than it saves


def _take_weights(model: onnx.ModelProto, min_bytes: int = MIN_ARRAY_BYTES, taken: dict | None = None) -> dict:
    """Move the main graph's large raw weights out of `model` into arrays; each tensor left in the graph is an
    external reference onnxruntime fills from its array (it checks the array's type and shape against it).
    Types numpy holds natively only, and no initializer that is also a graph input (a caller may feed it).
    `taken`: arrays already made (by _WeightArrays): their names are not taken again."""
    import numpy as np

    inputs = {value.name for value in model.graph.input}
    weights = {}
    for tensor in model.graph.initializer:
        if (tensor.data_type not in _ARRAY_TYPES or tensor.name in inputs or tensor.name in weights
                or (taken and tensor.name in taken)
                or tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data")):
            continue
        raw = tensor.raw_data
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        # A tensor left in the graph record was never measured against its dims: a mismatch stays for
        # onnxruntime to refuse (one line), as it would in the serialized model.
        if len(raw) < min_bytes or any(d < 0 for d in tensor.dims) or len(raw) != math.prod(tensor.dims) * dtype.itemsize:
            continue
        weights[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        _point_at_array(tensor)
    return weights


def _point_at_array(tensor: onnx.TensorProto) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=IN_MEMORY_LOCATION)


class _WeightArrays:
    """unpack_model's `place` for a session: each large coded main-graph weight that _take_weights would take is
    decoded straight into a new array of its type and shape (kept in `weights`), and its graph tensor points at
    it. Why: the bytes -> raw_data -> bytes -> array route copied a 90 MB model three times more."""

    def __init__(self, weights: dict):
        self.weights = weights
        self.inputs = None

    def __call__(self, model: onnx.ModelProto, index: int, tensor: onnx.TensorProto):
        import numpy as np

        # tensor_protos walks the main graph's initializers first: positions below their count are those.
        if index >= len(model.graph.initializer) or tensor.data_type not in _ARRAY_TYPES:
            return None
        if self.inputs is None:
            self.inputs = {value.name for value in model.graph.input}
        if tensor.name in self.inputs or tensor.name in self.weights:
            return None
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        size = math.prod(tensor.dims) * dtype.itemsize  # the record's size: the reader checked it against these
        if size < MIN_ARRAY_BYTES:
            return None
        array = np.empty(tuple(tensor.dims), dtype)
        self.weights[tensor.name] = array
        _point_at_array(tensor)
        return array.reshape(-1).view(np.uint8)


def is_pack(path: str | os.PathLike) -> bool:
    """Whether a file is a `.shrink` pack (by its magic, not its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(PACK_MAGIC)) == PACK_MAGIC
    except OSError:
        return False


def runnable(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> str | onnx.ModelProto:
    """What onnxruntime should load for a model file: an ONNX file's path (onnxruntime reads its weights itself,
    nothing is held here), or a pack decoded in memory (`model`, when the caller already loaded it)."""
    if not is_pack(path):
        return str(path)
    return model if model is not None else load(path)


def run_source(path: str | os.PathLike) -> tuple[str | bytes | InMemoryModel, onnx.ModelProto]:
    """What onnxruntime should load to run a model file (session_source), and the model without its large
    weights, for its signature and nodes. A pack is decoded once, its large weights straight into arrays, and an
    ONNX file's weights held in its graph are let go: validate of all-mpnet-base-v2 against its 6.6x pack peaked
    at 2.88 GB with both loaded whole (the pack serialized again for onnxruntime), 1.95 GB so
    (`python bench/memory_sample.py pass -- validate ...`)."""
    if not is_pack(path):
        model = load(path, with_data=False)
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_ARRAY_BYTES:
                _point_at_array(tensor)
        # parsed afresh: protobuf keeps a cleared field's bytes in the message's arena until the message is freed
        return str(path), onnx.ModelProto.FromString(model.SerializeToString())
    source = session_source(path)
    return source, onnx.ModelProto.FromString(source.graph if isinstance(source, InMemoryModel) else source)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensor_protos(model.graph)
    )


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file and the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    if not _may_reference_external_data(path):
        return total
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    seen = set()
    for location in _external_locations(model):
        data_file = path.parent / location
        if data_file not in seen and data_file.is_file():
            seen.add(data_file)
            total += data_file.stat().st_size
    return total


def file_has_external_data(path: str | os.PathLike) -> bool:
    """Whether a model file keeps tensors in external data files.

    A loaded model cannot say (loading pulls the data in and clears the references),
    so whoever wants to write a model "external like its input" asks the input file.
    """
    if not _may_reference_external_data(Path(path)):
        return False
    try:
        return has_external_data(onnx.load(str(path), load_external_data=False))
    except Exception:
        return False


ORIGINAL_BYTES = "onnxshrink.original_bytes"  # metadata: the file size of the model a pipeline of commands began with


def original_size(model: onnx.ModelProto, path: Path) -> int:
    """The size of the model this one was made from, across a pipeline (prune, cluster, pack): what an earlier
    onnxshrink command recorded in the metadata, else this file's own size (it is the original)."""
    for prop in model.metadata_props:
        if prop.key == ORIGINAL_BYTES and prop.value.isdigit() and int(prop.value) > 0:
            return int(prop.value)
    return file_size(path)


def stamp(model: onnx.ModelProto, command: str, options: dict, original_bytes: int | None = None) -> None:
    """Record the tool version, the options used and (`original_bytes`) the pipeline's first model's size in the
    model's metadata_props."""
    from onnxshrink import __version__

    entries = {
        "onnxshrink.version": __version__,
        "onnxshrink.command": command,
        "onnxshrink.options": json.dumps(options, sort_keys=True, default=str),
    }
    if original_bytes is not None:
        entries[ORIGINAL_BYTES] = str(int(original_bytes))
    set_metadata(model, entries)


def set_metadata(model: onnx.ModelProto, entries: dict) -> None:
    """Set these metadata_props keys (replacing any earlier value), keeping the others in order."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def check_output_path(output: Path, inputs: Iterable[Path], force: bool, *, with_data: bool = True) -> None:
    """Refuse an output that would overwrite an input (its model or data file), or an existing file without force.

    `with_data` (a command that writes ONNX): `OUT.data`, where its weights may go, is checked as OUT is. An
    existing one is refused without force even when this model will need none (it is not known yet, and a fresh
    OUT beside an earlier OUT.data reads as one model); with force it is replaced, or removed once OUT lands
    (`drop_stale_data`). Packs, JSON and recipes are one file: `with_data=False`.
    """
    output = Path(output)
    inputs = [Path(p) for p in inputs]
    data_file = output.with_name(output.name + ".data")
    for source in inputs:
        if _same_file(output, source):
            raise OutputError(f"{output}: output path is the input model; choose another -o")
        if with_data and _same_file(data_file, source):
            raise OutputError(f"{output}: its data file {data_file.name} is an input of this command; choose another -o")
    if output.exists() or data_file.exists():
        input_data = [source.parent / location for source in inputs for location in _input_locations(source)]
        if any(_same_file(output, d) for d in input_data):
            raise OutputError(f"{output}: is the input's external data file; choose another -o")
        if any(_same_file(data_file, d) for d in input_data):
            raise OutputError(f"{output}: its data file {data_file.name} is the input's external data file; choose another -o")
    if output.is_dir():
        raise OutputError(f"{output}: is a directory")
    if output.exists() and not output.is_file():
        raise OutputError(f"{output}: exists and is not a regular file")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to replace it)")
    if with_data and data_file.exists():
        if not data_file.is_file():
            raise OutputError(f"{data_file}: exists and is not a regular file")
        if not force:
            raise OutputError(f"{data_file}: already exists (use --force to replace it)")
    if not output.parent.exists():
        raise OutputError(f"{output.parent}: output directory does not exist")
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: is not a directory")
    _check_writable_dir(output.parent)


def save(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Write a model atomically and check it by path (full_check) before it replaces anything.

    Weights go to external data (`OUTPUT.data`, never the input's data file) when
    `external_data` is true, or when it is None and an input file keeps its weights
    external or the model is too big for one protobuf.
    """
    output = Path(output)
    inputs = [Path(p) for p in inputs]
    check_output_path(output, inputs, force)
    if external_data is None:
        external_data = (
            has_external_data(model)
            or any(file_has_external_data(p) for p in inputs)
            or _too_big_for_one_protobuf(model)
        )
    data_name = output.name + ".data"
    staging = staging_dir(output, ".tmp")
    try:
        staged_model = staging / output.name
        try:
            if external_data:
                onnx.save_model(
                    model,
                    str(staged_model),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_name,
                    size_threshold=1024,
                )
                # save_model converts the caller's tensors to external references; undo that.
                external_data_helper.load_external_data_for_model(model, str(staging))
            else:
                onnx.save_model(model, str(staged_model))
        except OSError as exc:
            raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
        try:
            if check:
                onnx.checker.check_model(str(staged_model), full_check=True)
        except Exception as exc:  # a bug in a pass, never the user's fault
            raise RuntimeError(f"written model fails the ONNX checker: {first_line(exc)}") from exc
        staged_data = staging / data_name
        wrote_data = staged_data.exists()
        if wrote_data:
            os.replace(staged_data, output.parent / data_name)
        os.replace(staged_model, output)
        if not wrote_data:
            drop_stale_data(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def default_output(model_path: str | os.PathLike, suffix: str | None, extension: str = ".onnx") -> Path:
    """`model.onnx` (or `model.shrink`) -> `model.<suffix>.onnx` next to the input; no suffix: `model<extension>`."""
    path = Path(model_path)
    stem = path.name
    for known in (".onnx", ".shrink"):
        if stem.endswith(known) and len(stem) > len(known):
            stem = stem[: -len(known)]
            break
    return path.with_name(f"{stem}.{suffix}{extension}" if suffix else f"{stem}{extension}")


def write_atomically(output: Path, write, check=None) -> None:
    """Write a file through `write(stream)` under a temporary name in the output's folder, run
    `check(staged_path)`, then rename it into place: a failure, Ctrl-C or SIGTERM never leaves a partial output."""
    output = Path(output)
    sweep_stale_staging(output.parent)
    try:
        handle, staged = tempfile.mkstemp(prefix=f"{STAGING_MARKER}{output.name}.", suffix=".tmp", dir=output.parent)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
    staged = Path(staged)
    try:
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
        except OSError as exc:
            raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc
        if check is not None:
            check(staged)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual permissions
        os.replace(staged, output)
    finally:
        staged.unlink(missing_ok=True)


# Staging files and folders beside an output are named `.onnxshrink-OUT.XXXXXXXX.SUFFIX` (XXXXXXXX: tempfile's
# random part), so that the sweep below can tell them from a user's files. Before this marker they were
# `.OUT.XXXXXXXX.SUFFIX` and `.onnxshrink.XXXXXXXX.recipe`: still recognised, the first only where OUT ends as
# onnxshrink's outputs do (a user's `.notes.20240101.tmp` has the same shape).
STAGING_MARKER = ".onnxshrink-"
STAGING_SUFFIXES = (".tmp", ".check", ".compress", ".recipe")
STALE_STAGING_S = 24 * 3600  # a live run touches its staging far more often than this
_RANDOM_PART = r"[a-z0-9_]{8}"
_STAGING_NAME = re.compile(
    rf"\.onnxshrink-.+\.{_RANDOM_PART}\.(?:tmp|check|compress|recipe)"
    rf"|\..+\.(?:onnx|shrink|json|toml)\.{_RANDOM_PART}\.(?:tmp|check|compress)"  # before the marker
    rf"|\.onnxshrink\.{_RANDOM_PART}\.recipe"  # before the marker
    rf"|\.onnxshrink-probe-{_RANDOM_PART}"  # _check_writable_dir's probe
)


def staging_dir(output: Path, suffix: str = ".tmp") -> Path:
    """A new folder beside `output` to write it in (`.onnxshrink-OUT.XXXXXXXX.SUFFIX`), after the stale staging
    a killed run left in that folder is swept."""
    output = Path(output)
    if suffix not in STAGING_SUFFIXES:
        raise ValueError(f"staging suffix {suffix!r} is not one the sweep recognises")
    sweep_stale_staging(output.parent)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_MARKER}{output.name}.", suffix=suffix, dir=output.parent))
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from exc


def is_staging_name(name: str) -> bool:
    """Whether a file name is exactly one onnxshrink gives its staging files and folders (new or old naming)."""
    return _STAGING_NAME.fullmatch(name) is not None


def sweep_stale_staging(directory: Path, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove the staging a run killed before its cleanup (kill -9, power loss) left in `directory`: entries
    named exactly as onnxshrink names them and unchanged for `max_age_s` (a folder: nor anything directly in it).
    Anything else, a user's file with a similar name or a symbolic link included, is left alone; so is whatever
    cannot be removed (the write goes on). Returns the paths removed."""
    cutoff = time.time() - max_age_s
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if is_staging_name(e.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_symlink():
                continue
            newest = entry.stat(follow_symlinks=False).st_mtime
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as children:
                    newest = max([newest] + [c.stat(follow_symlinks=False).st_mtime for c in children])
                if newest < cutoff:
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and newest < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def drop_stale_data(output: Path) -> None:
    """After OUT landed with no data file: an `OUT.data` beside it is an earlier output's (check_output_path lets
    one through only with force) and would read as this model's, so it goes."""
    output = Path(output)
    data_file = output.with_name(output.name + ".data")
    if data_file.is_file() and not data_file.is_symlink():
        data_file.unlink(missing_ok=True)


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        # A device or pipe: /dev/zero would be read forever, a pipe read twice.
        raise ModelLoadError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: permission denied")


def _check_writable_dir(directory: Path) -> None:
    """Create and remove a probe file: os.access says yes to root on read-only or virtual file systems."""
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{directory}: output directory is not writable")
    try:
        with tempfile.NamedTemporaryFile(prefix=".onnxshrink-probe-", dir=directory):
            pass
    except OSError as exc:
        raise OutputError(f"{directory}: output directory is not writable ({exc.strerror or exc})") from exc


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """The `location` of every external tensor; entries onnx cannot parse are skipped (load reports them)."""
    locations = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx warns about unknown keys; they are ignored either way
        for tensor in _all_tensor_protos(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                try:
                    locations.append(external_data_helper.ExternalDataInfo(tensor).location)
                except ValueError:
                    continue
    return locations


def _input_locations(path: Path) -> list[str]:
    """The external data files a model file references, so that no output is ever written over them."""
    if not _may_reference_external_data(path):
        return []
    try:
        return _external_locations(onnx.load(str(path), load_external_data=False))
    except Exception:
        return []


SCAN_CHUNK = 8 << 20  # bytes of a model file read at a time when looking for external data references


def _may_reference_external_data(path: Path) -> bool:
    """Whether a model file's bytes hold "location", the key every external data reference carries: without it no
    tensor points outside the file, and parsing a model with inline weights only to learn that held its size
    again in memory (MPNet: 436 MB, before each command's own load). A chance match in the weights only costs the
    parse; a file that cannot be read is parsed, as before. Read in chunks: a map of the file would count its pages
    in the resident set."""
    key, tail = b"location", b""
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(SCAN_CHUNK):
                if key in tail + chunk[:len(key) - 1] or key in chunk:
                    return True
                tail = (tail + chunk)[-(len(key) - 1):]
    except OSError:
        return True
    return False


def _check_text(message, path: Path, where: str = "model") -> None:
    """Refuse text fields that are not UTF-8 (a corrupted file).

    protobuf returns them as bytes instead of str, and neither the ONNX checker nor
    onnxruntime objects; every later string operation (names in reports) would crash.
    """
    for field in message.DESCRIPTOR.fields:
        # `is_repeated` is protobuf >= 5.28; `label` is gone in protobuf 7.
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if field.type == field.TYPE_STRING:
            values = getattr(message, field.name) if repeated else [getattr(message, field.name)]
            for value in values:
                if isinstance(value, bytes):
                    raise ModelLoadError(f"{path}: corrupted: {where}.{field.name} is not valid UTF-8 ({value[:60]!r})")
        elif field.type == field.TYPE_MESSAGE:
            if repeated:
                for item in getattr(message, field.name):
                    _check_text(item, path, f"{where}.{field.name}")
            elif message.HasField(field.name):
                _check_text(getattr(message, field.name), path, f"{where}.{field.name}")


def _load_external_data(model: onnx.ModelProto, path: Path, read: bool = True) -> None:
    """Check (and `read`) external tensors; every way this can fail is a ModelLoadError naming the file.

    onnx raises ValueError (bad offset/length), OSError, or its ValidationError (a data
    file that is a symbolic link), and warns on stderr about unknown keys: all contained here.
    """
    base = path.parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for tensor in _all_tensor_protos(model.graph):
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = external_data_helper.ExternalDataInfo(tensor)
                if (base / info.location).is_symlink():
                    raise ModelLoadError(
                        f"{path}: external data file {info.location!r} is a symbolic link, which onnx refuses to read; "
                        "put the real file next to the model"
                    )
                data_file = (base / info.location).resolve()
                if not data_file.is_relative_to(base.resolve()):
                    raise ModelLoadError(f"{path}: external data path {info.location!r} points outside the model's directory")
                if not data_file.is_file():
                    raise ModelLoadError(f"{path}: external data file {info.location!r} is missing")
                # Without a `length` key the tensor's dims and type say how many bytes it needs.
                needed = (info.offset or 0) + (info.length or tensor_nbytes(tensor))
                if data_file.stat().st_size < needed:
                    raise ModelLoadError(f"{path}: external data file {info.location!r} is truncated")
            if read:
                external_data_helper.load_external_data_for_model(model, str(base))
        except ModelLoadError:
            raise
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(f"{path}: cannot read external data ({first_line(exc)})") from exc


def full_check_error(model: onnx.ModelProto, path: str | os.PathLike, serialized: bytes | None = None) -> Exception | None:
    """The full ONNX checker's complaint about a loaded model (None when it passes).

    An ONNX file is checked by path: onnx then reads neither its weights nor a serialized copy
    (a model with 2.5 GB of external weights checks in a few MB); a pack is checked in memory, from
    `serialized` (the model's bytes, when the caller has them: serializing a model is as slow as checking it).
    """
    try:
        if not is_pack(path):
            onnx.checker.check_model(str(path), full_check=True)
        elif serialized is not None:
            onnx.checker.check_model(serialized, full_check=True)
        elif _too_big_for_one_protobuf(model):
            return None  # a pack this big has no single-protobuf form to check; its tensors were checked by digest
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return exc
    return None


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None over EXTERNAL_DATA_THRESHOLD (as _too_big_for_one_protobuf; past 2 GiB protobuf
    refuses to serialize). Cheaper than ByteSize() then SerializeToString(): each walks the whole model."""
    try:
        data = model.SerializeToString()
    except Exception:
        return None
    return data if len(data) <= EXTERNAL_DATA_THRESHOLD else None


def _too_big_for_one_protobuf(model: onnx.ModelProto) -> bool:
    """Over the protobuf limit, ByteSize() itself fails (EncodeError) on some protobuf builds: that is an answer."""
    try:
        return model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except Exception:
        return True


def _check_loadable(model: onnx.ModelProto, path: Path, for_rewrite: bool, serialized: bytes | None = None) -> None:
    """Require a passing ONNX checker, or failing that, a model onnxruntime accepts.

    The check is the full one (with strict shape inference) that `save` applies to
    what it writes: with a weaker check here, a corrupted input (a weight whose type
    or shape was flipped) loads and then fails at save time as an "internal error".
    """
    checker_error = full_check_error(model, path, serialized)
    if checker_error is None:
        return
    try:
        # A pack is asked about as the model it decoded to (never by path: that would decode it again).
        make_session(path if not is_pack(path) else serialized if serialized is not None else model)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: invalid ONNX model ({first_line(checker_error)}); onnxruntime refuses it too ({first_line(exc)})"
        ) from exc
    if for_rewrite:
        raise UnsupportedModelError(f"{path}: fails the full ONNX checker ({first_line(checker_error)}); fix the model first")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


_HANDED_OVER: set[int] = set()


@contextlib.contextmanager
def handed_over(model: onnx.ModelProto):
    """Within this block a pass rewrites `model` in place instead of copying it: for a caller that loaded
    the model only to transform it (the command API), so a model with gigabytes of weights is not held twice."""
    _HANDED_OVER.add(id(model))
    try:
        yield model
    finally:
        _HANDED_OVER.discard(id(model))


def claim_handed_over(model: onnx.ModelProto) -> bool:
    """Whether `model` was handed over (a pass may then rewrite it in place); the claim holds for one pass."""
    if id(model) not in _HANDED_OVER:
        return False
    _HANDED_OVER.discard(id(model))
    return True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line[:300]


def prepare(model: onnx.ModelProto) -> int:
    """Move tensors held in `Constant` nodes into initializers (of their own graph), so passes see them,
    and lift an IR 3 model to IR 4, so that every initializer (moved here or added by a pass) is valid.

    Returns how many were moved. Constants inside If/Loop/Scan bodies become that
    body's initializers, which keeps scoping exactly as it was.

    Why IR 4 rather than listing each new initializer as a graph input: IR 3 requires every initializer
    to be a graph input too, and onnxruntime runs such an IR 3 input as a constant (it refuses a feed for
    it). IR 4 only lifted that rule (and added bfloat16); under IR 4 an initializer listed as an input
    becomes an input the caller may override (no constant folding). So the main graph's initializers
    leave its input list as the IR goes to 4: the model keeps its meaning, its callers feed what they fed.
    """
    if 0 < model.ir_version < 4:
        initializers = {t.name for t in model.graph.initializer}
        inputs = [value for value in model.graph.input if value.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        model.ir_version = 4
    moved = 0
    for graph in iter_graphs(model.graph):
        kept = []
        for node in graph.node:
            value = None
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
                attr = node.attribute[0]
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    value = attr.t
            if value is None:
                kept.append(node)
                continue
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        if moved:
            del graph.node[:]
            graph.node.extend(kept)
    return moved
