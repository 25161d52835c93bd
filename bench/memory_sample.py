"""Where memory goes (issue 15, item 5): resident size sampled by phase, by process, and by how a session is made.

    python bench/memory_sample.py pass -- compress MODEL --recipe R.toml ...   # `onnxshrink ARGS` in this process:
                                                   # its peak, and the peak of each phase (the main thread's stack)
    python bench/memory_sample.py tree -- python bench/compress_real.py ...    # a command: each process's peak
    python bench/memory_sample.py sessions MODEL.onnx   # RSS an onnxruntime session adds, made from the file's
                                                        # path, from a ModelProto, from in-memory weights; and
                                                        # whether onnxruntime copies in-memory weights

Linux only (/proc). A thread reads /proc/self/statm (or every descendant's) every --every seconds.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
import time
import traceback

import numpy as np


def rss(pid: str | int = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


STAGES = ("compress_plan.py", "cluster.py", "prune.py", "quantize.py", "packing.py", "validate.py")


def sample_pass(args: list[str], every: float) -> None:
    from onnxshrink.cli import app

    main, samples, done = threading.main_thread().ident, [], threading.Event()

    def watch():
        while not done.is_set():
            frame = sys._current_frames().get(main)
            stack = [f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in traceback.extract_stack(frame)
                     if "onnxshrink" in f.filename] if frame else []
            samples.append((rss(), " < ".join(reversed(stack[-3:])), " ".join(stack)))
            time.sleep(every)

    threading.Thread(target=watch, daemon=True).start()
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
    done.set()
    peaks: dict = {}
    for value, where, _ in samples:
        peaks[where] = max(peaks.get(where, 0), value)
    print(f"peak RSS {max(v for v, _, _ in samples) / 1e9:.2f} GB; by stage (a module anywhere on the stack):")
    for module in STAGES:
        inside = [v for v, _, stack in samples if module in stack]
        if inside:
            print(f"  {max(inside) / 1e9:.2f} GB  {module}")
    print("the highest places:")
    for where, value in sorted(peaks.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {value / 1e9:.2f} GB  {where or '(outside onnxshrink)'}")


def sample_tree(command: list[str], every: float) -> None:
    child = subprocess.Popen(command)
    peaks: dict = {}
    started = time.monotonic()
    while child.poll() is None:
        parents: dict = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
        tree, grown = {child.pid}, True
        while grown:
            more = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= more
            grown = bool(more)
        for pid in tree:
            try:
                value = rss(pid)
                with open(f"/proc/{pid}/cmdline") as f:
                    name = f.read().replace("\0", " ")[:90]
            except OSError:
                continue
            if value > peaks.get(pid, (0,))[0]:
                peaks[pid] = (value, time.monotonic() - started, parents.get(pid), name)
        time.sleep(every)
    print(f"exit {child.returncode}; each process's peak RSS (pid, parent, at seconds, command):")
    for pid, (value, at, parent, name) in sorted(peaks.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"  {value / 1e9:.2f} GB  pid {pid} (parent {parent}) at {at:.0f} s  {name}")


def sample_sessions(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxshrink.memory import release
    from onnxshrink.runtime import _capture_model, make_session

    def added(make) -> float:
        gc.collect()
        release()
        before = rss()
        session = make()
        gc.collect()
        release()
        after = rss() - before
        del session
        return after / 1e9

    print(f"from the file's path: +{added(lambda: make_session(path)):.2f} GB")
    model = onnx.load(path)
    print(f"from a ModelProto: +{added(lambda: make_session(model)):.2f} GB")
    in_memory = _capture_model(model, [o.name for o in model.graph.output])
    del model
    print(f"from in-memory weights (beside the arrays themselves): +{added(lambda: make_session(in_memory)):.2f} GB")
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
                              [numpy_helper.from_array(w, "w")])
    small = _capture_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["y"])
    small.weights["w"] = np.array(small.weights["w"])  # writable
    session = make_session(small, optimize=False, prepack=False)
    x = np.ones((1, 4096), np.float32)
    first = session.run(None, {"x": x})[0]
    small.weights["w"][:] = 0
    copied = np.array_equal(first, session.run(None, {"x": x})[0])
    print(f"in-memory weights changed after the session is made: its output {'unchanged (copied)' if copied else 'changed (used in place)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["pass", "tree", "sessions"])
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.add_argument("--every", type=float, default=None, help="seconds between samples (pass 0.2, tree 1)")
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.mode == "pass":
        sample_pass(rest, args.every or 0.2)
    elif args.mode == "tree":
        sample_tree(rest, args.every or 1.0)
    else:
        sample_sessions(rest[0])


if __name__ == "__main__":
    main()
