"""Rewriting a model whose weights live in external data without ever holding them all in memory.

A pass reads weights and adds new tensors through a TensorStore. The plain store works on
tensors held in the model (the in-memory path). The StreamingStore reads an external weight
from the input's data file only when the pass asks for it, and writes every tensor the pass
adds straight to the output's data file, so the model in memory is its graph plus the one
weight being rewritten. Both paths run the same pass code, so they write the same tensors.

    input.onnx (graph) + input.onnx.data ──read one weight──► pass ──append──► staged .data
    after the pass: unchanged external tensors copied in chunks; the graph written last

quantize and prune (without calibration) run through write_pass; pack reads its tensors through
ExternalTensors instead (packing.pack_model: one read to plan each tensor, one to write it).
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from onnxshrink import model as model_io
from onnxshrink.errors import ModelLoadError, OutputError
from onnxshrink.protos import INLINE_LIMIT, set_external

# Where each tensor starts in a data file we write: 1 MiB and larger at onnxruntime's allocation
# granularity (64 KiB), so it can map them; smaller ones at 16 bytes (any numpy view is aligned).
LARGE_TENSOR = 1 << 20
LARGE_ALIGN = 64 << 10
SMALL_ALIGN = 16
COPY_CHUNK = 16 << 20


class TensorStore:
    """Where a pass reads weights and puts the tensors it adds: the model itself (the in-memory path)."""

    streaming = False

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def add(self, graph: onnx.GraphProto, array: np.ndarray, name: str) -> None:
        graph.initializer.append(numpy_helper.from_array(array, name))

    def replace(self, tensor: onnx.TensorProto, array: np.ndarray) -> None:
        """Give an existing tensor new values (same name and place in the graph)."""
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


class StreamingStore(TensorStore):
    """Reads external weights from `source_dir` on demand; writes added tensors to `sink` as they come.

    Tensors written here carry a location token unique to this run until `finish` names the real data
    file, so they are never confused with the input's tensors, whatever its data file is called.
    """

    streaming = True

    def __init__(self, source_dir: Path, sink: BinaryIO):
        self.source_dir = Path(source_dir)
        self.sink = sink
        self.token = f".onnxshrink-staged-{uuid.uuid4().hex}"

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return super().read(tensor)
        location, offset, length = _external_entry(tensor)
        if location == self.token:
            raise RuntimeError(f"{tensor.name}: reading back a tensor this run wrote")
        shape = tuple(int(d) for d in tensor.dims)
        dtype = _raw_dtype(tensor.data_type)
        try:  # an input that cannot be read is the input's problem, not the output's (write_pass catches OSError)
            with open(self.source_dir / location, "rb") as f:
                f.seek(offset)
                if dtype is None:  # int4, bfloat16, strings...: let onnx decode the raw bytes
                    copy = onnx.TensorProto()
                    copy.CopyFrom(tensor)
                    copy.ClearField("external_data")
                    copy.data_location = onnx.TensorProto.DEFAULT
                    copy.raw_data = f.read(length)
                    return numpy_helper.to_array(copy)
                array = np.empty(shape, dtype=dtype)
                if array.nbytes != length:
                    raise ModelLoadError(f"{tensor.name}: external data length {length} does not match its shape {list(shape)}")
                read = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        except OSError as exc:
            raise ModelLoadError(f"{location}: cannot read external data of {tensor.name!r} ({exc.strerror or exc})") from exc
        if read != length:
            raise ModelLoadError(f"{tensor.name}: external data file {location!r} is truncated")
        return array

    def add(self, graph: onnx.GraphProto, array: np.ndarray, name: str) -> None:
        tensor = numpy_helper.from_array(array, name)
        self._externalize(tensor)
        graph.initializer.append(tensor)

    def replace(self, tensor: onnx.TensorProto, array: np.ndarray) -> None:
        # Written out from a tensor of its own: bytes set in the model's tensor would stay in the model's
        # protobuf arena (upb frees nothing before the whole message), a weight's worth per weight replaced.
        fresh = numpy_helper.from_array(array, tensor.name)
        self._externalize(fresh)
        tensor.CopyFrom(fresh)

    def finish(self, model: onnx.ModelProto, location: str) -> None:
        """Give every tensor its place in the output's data file `location`: those added are there already;
        unchanged external tensors are copied in chunks; inline ones as big as model.save would move are moved."""
        for tensor in _every_tensor(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                source, offset, length = _external_entry(tensor)
                if source != self.token:
                    start = self._align(length)
                    _copy_range(self.source_dir / source, offset, length, self.sink)
                    set_external(tensor, self.token, start, length)
            else:
                self._externalize(tensor)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location

    def _externalize(self, tensor: onnx.TensorProto) -> None:
        if not tensor.HasField("raw_data") or sys.getsizeof(tensor.raw_data) < INLINE_LIMIT:
            return
        data = tensor.raw_data
        start = self._align(len(data))
        self.sink.write(data)
        del data
        tensor.ClearField("raw_data")
        set_external(tensor, self.token, start, self.sink.tell() - start)

    def _align(self, length: int) -> int:
        """Pad the sink to where a tensor of `length` bytes starts; returns that offset."""
        alignment = LARGE_ALIGN if length >= LARGE_TENSOR else SMALL_ALIGN
        position = self.sink.tell()
        pad = -position % alignment
        if pad:
            self.sink.write(b"\0" * pad)
        return position + pad


class ExternalTensors:
    """The bytes of a model's tensors for `pack` when the model was loaded without its external data: each
    external tensor read from its file when asked (exactly what onnx's loader would put in raw_data), so
    packing holds one tensor at a time, not the model."""

    def __init__(self, base_dir: str | os.PathLike):
        self.base_dir = str(base_dir)

    def read(self, tensor: onnx.TensorProto) -> bytes | None:
        from onnxshrink.packing import tensor_bytes

        if not external_data_helper.uses_external_data(tensor):
            return tensor_bytes(tensor)
        try:
            reader = getattr(external_data_helper, "_read_external_data_bytes", None)
            if reader is not None:
                return reader(tensor, self.base_dir)
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            external_data_helper.load_external_data_for_tensor(copy, self.base_dir)
            return copy.raw_data
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(f"tensor {tensor.name!r}: cannot read its external data ({model_io.first_line(exc)})") from exc

    def inline(self, model: onnx.ModelProto, coded: set[int]) -> None:
        """Make `model` (the pack's graph record) what loading its external data would have made it: the
        tensors at the positions `coded` (packing.tensor_protos order, raw_data taken out) no longer external,
        every other external tensor that onnx loads read back into raw_data."""
        from onnxshrink.packing import tensor_protos

        for index, tensor in enumerate(tensor_protos(model)):
            if index in coded and external_data_helper.uses_external_data(tensor):
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
        for tensor in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, self.base_dir)


def packs_streamed(model: onnx.ModelProto) -> bool:
    """Pack a model loaded without its data by streaming it when its weights are external, unless a sparse
    tensor is (onnx's loader leaves those external, and so does the in-memory pack: kept on that path)."""
    if not model_io.has_external_data(model):
        return False
    sparse = [s for g in model_io.iter_graphs(model.graph) for s in g.sparse_initializer]
    for g in model_io.iter_graphs(model.graph):
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.SPARSE_TENSOR:
                    sparse.append(attribute.sparse_tensor)
                sparse.extend(attribute.sparse_tensors)
    return not any(external_data_helper.uses_external_data(t) for s in sparse for t in (s.values, s.indices))


NOTE = ("weights streamed: read from the input's data file one tensor at a time and written straight to the output's "
        "(memory: the graph plus one weight, not the model); onnxruntime then loaded the output once to count the "
        "kernels it runs, and validation (unless --no-validate) runs both models in onnxruntime, which holds their weights")


def streams(model: onnx.ModelProto, transform) -> bool:
    """Take the streaming path when the input (loaded with_data=False) keeps weights in external data and the
    pass can stream: the same result, with memory bounded by the largest weight instead of the model."""
    return bool(getattr(transform, "streams", False)) and model_io.has_external_data(model)


def write_pass(model: onnx.ModelProto, model_path: str | os.PathLike, transform, staged: Path, *,
               edit=None, check: bool = True):
    """Run `transform` on `model` (loaded with_data=False from model_path), its weights streamed from
    the input's data files; write the result to `staged` and `staged.name + ".data"` beside it.

    `edit(result)` runs before anything is written (the command's metadata stamp). Returns
    (result, pass report); the result holds external references only, not the weights.
    """

    staged = Path(staged)
    data_path = staged.with_name(staged.name + ".data")
    try:
        with open(data_path, "wb") as sink:
            store = StreamingStore(Path(model_path).parent, sink)
            transform.tensors = store
            try:
                with model_io.handed_over(model):
                    result, report = transform(model)
            finally:
                transform.tensors = TensorStore()
            if edit is not None:
                edit(result)
            store.finish(result, data_path.name)
            written = sink.tell()
        if written == 0:
            data_path.unlink()
        onnx.save_model(result, str(staged))
    except OSError as exc:
        raise OutputError(f"{staged}: cannot write ({exc.strerror or exc})") from exc
    if check:
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as exc:  # a bug in a pass, never the user's fault
            raise RuntimeError(f"written model fails the ONNX checker: {model_io.first_line(exc)}") from exc
    return result, report


def move_into_place(staged: Path, final: Path, inputs, force: bool) -> Path:
    """Rename a model written by write_pass (and its data file) to `final` in the same directory.

    A different name means a different data file name: only the graph is rewritten to say so.
    """
    staged, final = Path(staged), Path(final)
    model_io.check_output_path(final, inputs, force)
    data, final_data = staged.with_name(staged.name + ".data"), final.with_name(final.name + ".data")
    if data.exists() and final.name != staged.name:
        graph = onnx.load(str(staged), load_external_data=False)
        for tensor in _every_tensor(graph.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = final_data.name
        onnx.save_model(graph, str(staged))
    wrote_data = data.exists()
    if wrote_data:
        os.replace(data, final_data)
    os.replace(staged, final)
    if not wrote_data:
        model_io.drop_stale_data(final)
    return final


def _every_tensor(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold data, in every scope: initializers, sparse ones, attribute tensors."""
    for g in model_io.iter_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors


def _external_entry(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor; a missing length means the tensor's size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: onnx warns, and ignores them as we do
        info = external_data_helper.ExternalDataInfo(tensor)
    from onnxshrink.weights import tensor_nbytes

    return info.location, int(info.offset or 0), int(info.length or tensor_nbytes(tensor))


def _copy_range(path: Path, offset: int, length: int, sink: BinaryIO) -> None:
    """Copy `length` bytes of a file from `offset` to the sink, COPY_CHUNK at a time."""
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, COPY_CHUNK))
            if not chunk:
                raise ValueError(f"external data file {path.name!r} is truncated")
            sink.write(chunk)
            left -= len(chunk)


_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2",
    onnx.TensorProto.INT8: "i1", onnx.TensorProto.UINT8: "u1", onnx.TensorProto.INT16: "<i2",
    onnx.TensorProto.UINT16: "<u2", onnx.TensorProto.INT32: "<i4", onnx.TensorProto.UINT32: "<u4",
    onnx.TensorProto.INT64: "<i8", onnx.TensorProto.UINT64: "<u8", onnx.TensorProto.BOOL: "?",
}


def _raw_dtype(data_type: int):
    """numpy dtype of a tensor's little-endian raw bytes, or None where onnx must decode them."""
    code = _RAW_DTYPES.get(data_type)
    return np.dtype(code) if code and sys.byteorder == "little" else None

