"""Library-level model I/O: what `load` refuses, how `save` writes, external data, round trips, `prepare`.

Every model is built here, tiny, with a seeded generator; the whole file runs in a few seconds.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLES, UNWRITABLE_OUTPUTS, make_mlp, save_model, tree, unwritable_output
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import model as model_io
from onnxshrink.errors import ModelLoadError, OutputError, UnsupportedModelError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- helpers




def run(model: str | Path | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def mlp_feed(batch: int = 5, width: int = 32, seed: int = 1) -> dict:
    return {"input": np.random.default_rng(seed).standard_normal((batch, width)).astype(np.float32)}


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Write a copy with every tensor in one external data file (default `NAME.data`)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


def initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    got, want = initializer_values(a), initializer_values(b)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def set_external_entry(path: Path, key: str, value: str) -> None:
    """Edit one external-data entry of the first initializer, in place."""
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


# ---------------------------------------------------------------- load: good models


def test_load_returns_checked_model(mlp_path):
    model = model_io.load(mlp_path)
    assert isinstance(model, onnx.ModelProto)
    assert [n.op_type for n in model.graph.node][:2] == ["MatMul", "Add"]
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("name", ["digits_mlp.onnx", "digits_cnn.onnx"])
def test_load_sample_models(name):
    model = model_io.load(SAMPLES / name)
    assert len(model.graph.node) > 0


def test_load_accepts_str_path(mlp_path):
    assert model_io.load(str(mlp_path)).graph.name == "mlp"


# ---------------------------------------------------------------- load: refusals


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_directory.onnx").mkdir()
    files = {
        "missing": tmp_path / "missing.onnx",
        "directory": tmp_path / "a_directory.onnx",
        "empty": tmp_path / "empty.onnx",
        "random": tmp_path / "random.onnx",
        "text": tmp_path / "notes.txt",
        "png": tmp_path / "picture.png",
        "ort": tmp_path / "model.ort",
        "ort_renamed": tmp_path / "model_from_ort.onnx",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["text"].write_text("name,value\nlayer1,0.5\n")
    files["png"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    ort_bytes = b"\x1c\x00\x00\x00ORTM" + bytes(256)  # flatbuffer root offset, then the file identifier
    files["ort"].write_bytes(ort_bytes)
    files["ort_renamed"].write_bytes(ort_bytes)
    return files


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "file is empty"),
        ("random", "not an ONNX model"),
        ("text", "not an ONNX model"),
        ("png", "not an ONNX model"),
        ("ort", "ORT-format"),
        ("ort_renamed", "ORT-format"),
    ],
)
def test_load_refuses_non_models(tmp_path, kind, message):
    path = _bad_files(tmp_path)[kind]
    before = tree(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        model_io.load(path)
    text = str(info.value)
    assert message in text and str(path) in text
    assert "\n" not in text
    assert info.value.exit_code == 3
    assert tree(tmp_path) == before


def test_load_refuses_device_file():
    """A device or pipe is not a model file; /dev/null stands for both (a pipe could block the test)."""
    with pytest.raises(ModelLoadError, match="not a regular file"):
        model_io.load("/dev/null")


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_load_refuses_unreadable_file(tmp_path, mlp_path):
    mlp_path.chmod(0)
    try:
        with pytest.raises(ModelLoadError, match="permission denied"):
            model_io.load(mlp_path)
    finally:
        mlp_path.chmod(0o644)


def test_load_refuses_every_truncation(tmp_path):
    """Cut a real model after every byte: each prefix is refused (none crashes, none loads)."""
    data = make_mlp(widths=(4, 8, 3)).SerializeToString()
    path = tmp_path / "cut.onnx"
    for size in range(len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(ModelLoadError):
            model_io.load(path)
    path.write_bytes(data)
    model_io.load(path)


def test_load_refuses_empty_graph(tmp_path):
    graph = helper.make_graph(
        [], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    )
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "e.onnx")
    with pytest.raises(ModelLoadError, match="the graph has no nodes"):
        model_io.load(path)


def test_load_refuses_model_without_graph(tmp_path):
    model = onnx.ModelProto()
    model.ir_version = 8
    path = save_model(model, tmp_path / "nograph.onnx")
    with pytest.raises(ModelLoadError, match="no IR version or graph"):
        model_io.load(path)


def test_load_refuses_model_that_checker_and_onnxruntime_refuse(tmp_path, capfd):
    model = make_mlp()
    model.graph.node[0].op_type = "NoSuchOp"
    path = save_model(model, tmp_path / "bogus.onnx")
    with pytest.raises(ModelLoadError, match="invalid ONNX model .*onnxruntime refuses it too"):
        model_io.load(path)
    assert capfd.readouterr() == ("", "")  # onnxruntime neither prints nor logs


def test_load_full_check_catches_type_corruption(tmp_path):
    """A weight whose type was corrupted passes the plain checker; the full one (and onnxruntime) refuse it."""
    model = make_mlp(widths=(4, 8, 3))
    model.graph.initializer[0].data_type = TensorProto.BOOL
    path = save_model(model, tmp_path / "bool_weight.onnx")
    onnx.checker.check_model(onnx.load(str(path)))  # what load used to rely on
    with pytest.raises(ModelLoadError):
        model_io.load(path)


def test_load_onnxruntime_fallback_prints_nothing(tmp_path, capfd):
    """onnxruntime's provider fallback print()s a banner to stdout on some errors (an op type that is not UTF-8)."""
    data = make_mlp(widths=(4, 8, 3)).SerializeToString()
    path = tmp_path / "bad_utf8.onnx"
    path.write_bytes(data.replace(b'"\x03Add', b'"\x03\xc1dd', 1))  # 0xC1 is never valid in UTF-8
    with pytest.raises(ModelLoadError):
        model_io.load(path)
    assert capfd.readouterr() == ("", "")


def test_load_refuses_text_that_is_not_utf8(tmp_path, mlp_path):
    """protobuf returns a non-UTF-8 name as bytes; the checker and onnxruntime accept it, later code would crash."""
    path = tmp_path / "bad_name.onnx"
    path.write_bytes(mlp_path.read_bytes().replace(b"fc1/Add", b"fc1/\xffdd", 1))
    with pytest.raises(ModelLoadError, match=r"model.graph.node.name is not valid UTF-8 \(b'fc1/\\xffdd'\)"):
        model_io.load(path)


def test_load_bit_flips_never_crash(tmp_path, capfd):
    """Flip 1-3 random bits, 400 times: a ModelLoadError/UnsupportedModelError, or a model that is usable."""
    data = make_mlp(widths=(4, 8, 3)).SerializeToString()
    rng = np.random.default_rng(2024)
    path = tmp_path / "flipped.onnx"
    loaded = refused = 0
    for _ in range(400):
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        try:
            model = model_io.load(path)
        except (ModelLoadError, UnsupportedModelError) as exc:
            assert "\n" not in str(exc)
            refused += 1
            continue
        loaded += 1
        assert len(model.graph.node) > 0
        assert all(isinstance(n.name, str) and isinstance(n.op_type, str) for n in model.graph.node)
    assert loaded and refused  # both outcomes really happen with this seed
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------- external data


def test_load_external_data(tmp_path):
    original = make_mlp()
    path = save_external(original, tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").is_file()
    model = model_io.load(path)
    assert not model_io.has_external_data(model)  # the data is in memory now
    assert model_io.file_has_external_data(path)
    assert_same_weights(model, original)


def test_load_external_data_from_another_directory(tmp_path, monkeypatch):
    """Data paths are relative to the model, not to the working directory."""
    (tmp_path / "sub").mkdir()
    path = save_external(make_mlp(), tmp_path / "sub" / "ext.onnx")
    monkeypatch.chdir("/")
    model_io.load(path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "external data file 'ext.onnx.data' is missing"),
        ("truncated", "is truncated"),
        ("length", "is truncated"),
        ("no_length_truncated", "is truncated"),  # no `length` key: the dims say how many bytes are needed
        ("outside", "points outside the model's directory"),
        ("absolute", "points outside the model's directory"),
        ("symlink", "is a symbolic link"),
        ("negative_offset", "cannot read external data"),
        ("bad_offset", "cannot read external data"),
        ("directory", "is missing"),
    ],
)
def test_load_refuses_broken_external_data(tmp_path, breakage, message):
    path = save_external(make_mlp(), tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    if breakage == "missing":
        data.unlink()
    elif breakage == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    elif breakage == "length":
        set_external_entry(path, "length", str(10**9))
    elif breakage == "no_length_truncated":
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in [e for e in tensor.external_data if e.key == "length"]:
                tensor.external_data.remove(entry)
        onnx.save(model, str(path))
        data.write_bytes(data.read_bytes()[:-8])
    elif breakage == "outside":
        set_external_entry(path, "location", "../elsewhere.data")
    elif breakage == "absolute":
        set_external_entry(path, "location", "/etc/hostname")
    elif breakage == "symlink":
        data.rename(tmp_path / "real.data")
        data.symlink_to("real.data")
    elif breakage == "negative_offset":
        set_external_entry(path, "offset", "-5")
    elif breakage == "bad_offset":
        set_external_entry(path, "offset", "twelve")
    elif breakage == "directory":
        data.unlink()
        data.mkdir()
    before = tree(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        model_io.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert tree(tmp_path) == before


def test_load_external_data_unknown_key_is_quiet(tmp_path, capfd):
    path = save_external(make_mlp(), tmp_path / "ext.onnx")
    set_external_entry(path, "colour", "blue")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # onnx warns about unknown keys; load must keep that off stderr
        model_io.load(path)
        model_io.file_size(path)
    assert capfd.readouterr() == ("", "")


def test_file_size_counts_external_data(tmp_path, mlp_path):
    path = save_external(make_mlp(), tmp_path / "ext.onnx")
    expected = path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert model_io.file_size(path) == expected
    assert model_io.file_size(mlp_path) == mlp_path.stat().st_size


def test_a_model_with_inline_weights_is_not_parsed_again_to_find_data_files(tmp_path, mlp_path, monkeypatch):
    external = save_external(make_mlp(), tmp_path / "ext.onnx")
    parsed = []
    real_load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: parsed.append(a[0]) or real_load(*a, **k))
    assert model_io.file_size(mlp_path) == mlp_path.stat().st_size
    assert model_io._input_locations(mlp_path) == []
    assert not model_io.file_has_external_data(mlp_path)
    assert parsed == []  # no "location" in its bytes: nothing to find
    assert set(model_io._input_locations(external)) == {"ext.onnx.data"}  # one entry per tensor
    assert model_io.file_size(external) > external.stat().st_size and parsed == [str(external)] * 2
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert model_io.file_size(tmp_path / "empty.onnx") == 0
    monkeypatch.setattr(model_io, "SCAN_CHUNK", 3)  # "location" across chunk boundaries is still found
    assert model_io._input_locations(external) and model_io._may_reference_external_data(external)


# ---------------------------------------------------------------- save


def test_save_round_trip_is_identical(tmp_path, mlp_path):
    model = model_io.load(mlp_path)
    out = model_io.save(model, tmp_path / "out.onnx", inputs=[mlp_path])
    assert out == tmp_path / "out.onnx"
    assert model_io.load(out) == model
    feed = mlp_feed()
    for want, got in zip(run(mlp_path, feed), run(out, feed)):
        np.testing.assert_array_equal(want, got)
    assert not model_io.file_has_external_data(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx"]  # no temporaries left


@pytest.mark.parametrize("name, feed_shape", [("digits_mlp.onnx", (7, 64)), ("digits_cnn.onnx", (7, 1, 8, 8))])
def test_save_round_trip_sample_models(tmp_path, name, feed_shape):
    source = SAMPLES / name
    out = model_io.save(model_io.load(source), tmp_path / name, inputs=[source])
    feed = {"input": np.random.default_rng(0).random(feed_shape, dtype=np.float32)}
    for want, got in zip(run(source, feed), run(out, feed)):
        np.testing.assert_array_equal(want, got)


def test_save_keeps_external_data_external(tmp_path):
    """Input with external data -> output with its data in OUT.data; the input's data file is untouched."""
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    source = save_external(make_mlp(), src_dir / "model.onnx")
    before = tree(src_dir)
    model = model_io.load(source)
    out = model_io.save(model, out_dir / "small.onnx", inputs=[source])
    assert tree(src_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", "small.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"small.onnx.data"}
    feed = mlp_feed()
    for want, got in zip(run(source, feed), run(out, feed)):
        np.testing.assert_array_equal(want, got)
    # The caller's model still holds its data in memory, so it can be saved again or run.
    assert not model_io.has_external_data(model)
    model_io.save(model, out_dir / "again.onnx", external_data=False)
    for want, got in zip(run(source, feed), run(out_dir / "again.onnx", feed)):
        np.testing.assert_array_equal(want, got)


def test_save_external_data_on_request(tmp_path, mlp_path):
    out = model_io.save(model_io.load(mlp_path), tmp_path / "x.onnx", external_data=True)
    assert (tmp_path / "x.onnx.data").is_file()
    assert model_io.file_has_external_data(out)
    assert_same_weights(model_io.load(out), model_io.load(mlp_path))


def test_save_refuses_to_overwrite_input_data_file(tmp_path):
    """`a.onnx` whose data lives in `b.onnx.data`: writing `b.onnx` would clobber the input's weights."""
    source = save_external(make_mlp(), tmp_path / "a.onnx", location="b.onnx.data")
    (tmp_path / "b.onnx").write_bytes(b"an older b.onnx\n")
    before = tree(tmp_path)
    model = model_io.load(source)
    with pytest.raises(OutputError, match="is the input's external data file"):
        model_io.save(model, tmp_path / "b.onnx", inputs=[source], force=True)
    assert tree(tmp_path) == before
    model_io.load(source)


def test_save_refuses_to_write_over_input_data_file(tmp_path):
    source = save_external(make_mlp(), tmp_path / "m.onnx")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="m.onnx.data: is the input's external data file"):
        model_io.save(model_io.load(source), tmp_path / "m.onnx.data", inputs=[source], force=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink", "hardlink"])
def test_save_refuses_the_input_path(tmp_path, mlp_path, spelling):
    target = {
        "same": mlp_path,
        "dot": tmp_path / "." / "mlp.onnx",
        "symlink": tmp_path / "link.onnx",
        "hardlink": tmp_path / "hard.onnx",
    }[spelling]
    if spelling == "symlink":
        target.symlink_to(mlp_path)
    if spelling == "hardlink":
        os.link(mlp_path, target)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="output path is the input model") as info:
        model_io.save(model_io.load(mlp_path), target, inputs=[mlp_path], force=True)
    assert info.value.exit_code == 5
    assert tree(tmp_path) == before


def test_save_existing_output_needs_force(tmp_path, mlp_path):
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"precious bytes the user wrote\n")
    before = tree(tmp_path)
    model = model_io.load(mlp_path)
    with pytest.raises(OutputError, match="already exists"):
        model_io.save(model, existing, inputs=[mlp_path])
    assert tree(tmp_path) == before
    model_io.save(model, existing, inputs=[mlp_path], force=True)
    assert model_io.load(existing) == model


@pytest.mark.parametrize("where, message", UNWRITABLE_OUTPUTS)
def test_save_refuses_unwritable_outputs(tmp_path, mlp_path, where, message):
    output = unwritable_output(tmp_path, where)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match=message):
        model_io.save(model_io.load(mlp_path), output, inputs=[mlp_path], force=True)
    assert tree(tmp_path) == before
    assert not output.exists() or where in ("is_dir", "fifo")


def test_save_read_only_directory(tmp_path, mlp_path):
    """chmod-based read-only: root ignores the mode, so there the probe file must really be refused."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            pytest.skip("this user can write into a 0555 directory (root): see the /proc and /sys cases")
        except PermissionError:
            pass
        with pytest.raises(OutputError, match="not writable"):
            model_io.save(model_io.load(mlp_path), locked / "out.onnx", inputs=[mlp_path])
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_save_disk_full_leaves_existing_output(tmp_path, mlp_path, monkeypatch):
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"the previous result\n")
    before = tree(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    model = model_io.load(mlp_path)
    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(OutputError, match="No space left on device"):
        model_io.save(model, existing, inputs=[mlp_path], force=True)
    assert tree(tmp_path) == before


def test_save_checks_before_replacing(tmp_path, mlp_path):
    """A model the full checker refuses is a bug in a pass: nothing is written, the old output stays."""
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"the previous result\n")
    before = tree(tmp_path)
    model = model_io.load(mlp_path)
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(RuntimeError, match="written model fails the ONNX checker"):
        model_io.save(model, existing, inputs=[mlp_path], force=True)
    assert tree(tmp_path) == before


def test_save_interrupted_leaves_nothing(tmp_path, mlp_path, monkeypatch):
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"the previous result\n")
    before = tree(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    model = model_io.load(mlp_path)
    monkeypatch.setattr(onnx.checker, "check_model", interrupt)
    with pytest.raises(KeyboardInterrupt):
        model_io.save(model, existing, inputs=[mlp_path], force=True)
    assert tree(tmp_path) == before


def test_check_output_path_probe_leaves_nothing(tmp_path, mlp_path):
    model_io.check_output_path(tmp_path / "out.onnx", [mlp_path], force=False)
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]


def test_default_output():
    assert model_io.default_output(Path("dir/model.onnx"), "int8") == Path("dir/model.int8.onnx")
    assert model_io.default_output(Path("model"), "int8") == Path("model.int8.onnx")


def test_stamp_replaces_previous_entries(mlp_path):
    model = model_io.load(mlp_path)
    model.metadata_props.add(key="author", value="someone")
    model_io.stamp(model, "quantize", {"per_channel": True})
    model_io.stamp(model, "quantize", {"per_channel": False})
    props = {p.key: p.value for p in model.metadata_props}
    assert len(model.metadata_props) == 4
    assert props["author"] == "someone"
    assert props["onnxshrink.command"] == "quantize"
    assert props["onnxshrink.options"] == '{"per_channel": false}'


# ---------------------------------------------------------------- prepare: Constant nodes -> initializers


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=numpy_helper.from_array(array, name))


def make_if_model() -> onnx.ModelProto:
    """x[2,4] -> If(cond): then x@W_then, else x@W_else (weights in Constant nodes) -> + bias (a Constant)."""
    rng = np.random.default_rng(3)
    w_then = rng.standard_normal((4, 3)).astype(np.float32)
    w_else = rng.standard_normal((4, 3)).astype(np.float32)
    def branch(name, weight_name, weight):
        nodes = [_constant(weight_name, weight), helper.make_node("MatMul", ["x", weight_name], ["branch_out"], name=f"{name}/MatMul")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2, 3])])

    then_branch = branch("then_branch", "w_then", w_then)
    else_branch = branch("else_branch", "w_else", w_else)
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch),
        _constant("bias", np.arange(3, dtype=np.float32)),
        helper.make_node("Add", ["y", "bias"], ["z"], name="add"),
        # A Constant with another attribute than `value` stays a node.
        helper.make_node("Constant", [], ["scale"], name="scale/Constant", value_float=2.0),
        helper.make_node("Mul", ["z", "scale"], ["out"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_prepare_moves_constants_in_main_graph_and_if_branches():
    model = make_if_model()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert model_io.prepare(model) == 3
    main = model.graph
    branches = {a.name: a.g for a in main.node[0].attribute}
    then_branch, else_branch = branches["then_branch"], branches["else_branch"]
    assert [t.name for t in main.initializer] == ["bias"]
    assert [t.name for t in then_branch.initializer] == ["w_then"]  # stays in its own scope
    assert [t.name for t in else_branch.initializer] == ["w_else"]
    assert [n.op_type for n in then_branch.node] == ["MatMul"]
    assert [n.op_type for n in main.node] == ["If", "Add", "Constant", "Mul"]  # value_float Constant kept
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_array_equal(run(original, feed)[0], run(model, feed)[0])
    assert model_io.prepare(model) == 0  # idempotent


def test_prepare_then_save_round_trip(tmp_path):
    model = make_if_model()
    source = save_model(model, tmp_path / "if.onnx")
    loaded = model_io.load(source)
    model_io.prepare(loaded)
    out = model_io.save(loaded, tmp_path / "if.prepared.onnx", inputs=[source])
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_array_equal(run(source, feed)[0], run(out, feed)[0])


def test_prepare_moves_constant_weight_of_matmul():
    model = make_mlp(widths=(4, 8, 3))
    weight = model.graph.initializer[0]
    model.graph.node.insert(0, _constant(weight.name, numpy_helper.to_array(weight)))
    del model.graph.initializer[0]
    assert model_io.prepare(model) == 1
    assert "fc0.weight" in {t.name for t in model.graph.initializer}
    assert all(n.op_type != "Constant" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
