"""Loading and saving models without ever losing the user's work.

Loading refuses anything that is not a usable ONNX model with a one-line reason.
Saving is atomic: files are written under temporary names in the output's
directory, checked, then renamed into place; the input is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxshrink.errors import ModelLoadError, OutputError

# Protobuf refuses to serialize a single message over 2 GiB; leave headroom.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
ORT_FORMAT_IDENTIFIER = b"ORTM"


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise ModelLoadError saying why not."""
    path = Path(path)
    _check_readable_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 0:
        raise ModelLoadError(f"{path}: file is empty, not an ONNX model")
    if head[4:8] == ORT_FORMAT_IDENTIFIER:
        raise ModelLoadError(f"{path}: is an ORT-format model (.ort); onnxshrink needs the original .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model or corrupted ({_first_line(exc)})") from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or graph)")
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: the graph has no nodes")
    _load_external_data(model, path)
    _check_loadable(model, path)
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensor_protos(model.graph)
    )


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file and the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    seen = set()
    for tensor in _all_tensor_protos(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = external_data_helper.ExternalDataInfo(tensor)
            data_file = path.parent / info.location
            if data_file not in seen and data_file.exists():
                seen.add(data_file)
                total += data_file.stat().st_size
    return total


def stamp(model: onnx.ModelProto, command: str, options: dict) -> None:
    """Record the tool version and the options used in the model's metadata_props."""
    from onnxshrink import __version__

    entries = {
        "onnxshrink.version": __version__,
        "onnxshrink.command": command,
        "onnxshrink.options": json.dumps(options, sort_keys=True, default=str),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def check_output_path(output: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an output that would overwrite an input, or an existing file without force."""
    for source in inputs:
        if _same_file(output, Path(source)):
            raise OutputError(f"{output}: output path is the input model; choose another -o")
    if output.is_dir():
        raise OutputError(f"{output}: is a directory")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to replace it)")
    if not output.parent.exists():
        raise OutputError(f"{output.parent}: output directory does not exist")
    if not os.access(output.parent, os.W_OK):
        raise OutputError(f"{output.parent}: output directory is not writable")


def save(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write a model atomically and check it by path (full_check) before it replaces anything.

    Weights go to external data (`OUTPUT.data`, never the input's data file) when
    `external_data` is true, or when it is None and the model is too big for one protobuf.
    """
    output = Path(output)
    check_output_path(output, [Path(p) for p in inputs], force)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if not has_external_data(model) else True
    data_name = output.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
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
            onnx.checker.check_model(str(staged_model), full_check=True)
        except Exception as exc:  # a bug in a pass, never the user's fault
            raise RuntimeError(f"internal error: written model fails the ONNX checker: {_first_line(exc)}") from exc
        staged_data = staging / data_name
        if staged_data.exists():
            os.replace(staged_data, output.parent / data_name)
        os.replace(staged_model, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def default_output(model_path: str | os.PathLike, suffix: str) -> Path:
    """`model.onnx` -> `model.<suffix>.onnx` next to the input."""
    path = Path(model_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.{suffix}.onnx")


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in If/Loop/Scan attributes, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def _all_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: permission denied")


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for tensor in _all_tensor_protos(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        data_file = (base / info.location).resolve()
        if not data_file.is_relative_to(base.resolve()):
            raise ModelLoadError(f"{path}: external data path {info.location!r} points outside the model's directory")
        if not data_file.is_file():
            raise ModelLoadError(f"{path}: external data file {info.location!r} is missing")
        needed = (info.offset or 0) + (info.length or 0)
        if info.length and data_file.stat().st_size < needed:
            raise ModelLoadError(f"{path}: external data file {info.location!r} is truncated")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read external data ({_first_line(exc)})") from exc


def _check_loadable(model: onnx.ModelProto, path: Path) -> None:
    """Require a passing ONNX checker, or failing that, a model onnxruntime accepts."""
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
        return
    except Exception as exc:
        checker_error = exc
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: invalid ONNX model ({_first_line(checker_error)}); onnxruntime refuses it too ({_first_line(exc)})"
        ) from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line[:300]


def prepare(model: onnx.ModelProto) -> int:
    """Move tensors held in `Constant` nodes into initializers (of their own graph), so passes see them.

    Returns how many were moved. Constants inside If/Loop/Scan bodies become that
    body's initializers, which keeps scoping exactly as it was.
    """
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
