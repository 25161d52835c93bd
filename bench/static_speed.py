"""Static int8 (QDQ) vs fp32 in onnxruntime: latency at batch 1 and 32, held-out accuracy, kernels run.

`python bench/static_speed.py [--calibrator NAME] [--budget S]` prints a Markdown table; `bench/run.py`
can call `static_rows()` and add the rows to its own. Models: the two sample models with their
calibration/eval sets, and a bigger CNN (3 Conv 3x3 with 64 channels on 1x32x32: the digits images
upsampled 4x) whose convolutions are random and whose classifier is fitted by ridge regression on half of the
eval set (accuracy is on the other half), so that its held-out accuracy means something. Ratios come from the two sessions run
alternately in one process (validate.measure_latency), so they hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink.data import input_specs, load_npz  # noqa: E402
from onnxshrink.passes.quantize_static import QuantizeStatic, StaticQuantizeConfig  # noqa: E402
from onnxshrink.runtime import capture_activations, make_session, optimized_op_counts, run_batches  # noqa: E402
from onnxshrink.validate import measure_latency, task_accuracy  # noqa: E402

SAMPLES = ROOT / "sample_models"
HEADER = ["model", "calibrator", "fp32 acc", "static acc", "top-1 agree", "b1 fp32 µs", "b1 static µs", "b1 ratio",
          "b32 fp32 µs", "b32 static µs", "b32 ratio", "kernels onnxruntime runs (static)", "kept float", "tool s"]


def make_conv_net(channels=64, size=32, convs=3, classes=10, seed=0) -> onnx.ModelProto:
    """Conv3x3(1->C)-Relu-MaxPool, (Conv3x3(C->C)-Relu-MaxPool)*, Conv3x3-Relu, Flatten, Gemm; random convs."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, cin, side = "input", 1, size
    for i in range(convs):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(channels) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes += [helper.make_node("Conv", [current, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"],
                                   name=f"conv{i}/Conv", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}_out"], name=f"relu{i}")]
        current = f"relu{i}_out"
        if i < convs - 1:
            nodes.append(helper.make_node("MaxPool", [current], [f"pool{i}_out"], name=f"pool{i}", kernel_shape=[2, 2],
                                          strides=[2, 2]))
            current, side = f"pool{i}_out", side // 2
        cin = channels
    nodes.append(helper.make_node("Flatten", [current], ["features"], name="flatten", axis=1))
    inits += [numpy_helper.from_array(np.zeros((classes, channels * side * side), np.float32), "fc.weight"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc/Gemm", transB=1))
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fit_classifier(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, ridge: float = 1.0) -> onnx.ModelProto:
    """Set the final Gemm to the ridge-regression fit of one-hot labels on the Flatten features."""
    features = np.concatenate([v["features"] for v in capture_activations(model, ["features"],
                               [{"input": x[i:i + 50]} for i in range(0, len(x), 50)])]).astype(np.float64)
    mean = features.mean(axis=0)
    centered = features - mean
    targets = np.eye(int(labels.max()) + 1)[labels]
    # Dual form: fewer samples than features.
    weight = centered.T @ np.linalg.solve(centered @ centered.T + ridge * np.eye(len(x)), targets - targets.mean(axis=0))
    bias = targets.mean(axis=0) - mean @ weight
    fitted = onnx.ModelProto()
    fitted.CopyFrom(model)
    for tensor in fitted.graph.initializer:
        if tensor.name == "fc.weight":
            tensor.CopyFrom(numpy_helper.from_array(weight.T.astype(np.float32), "fc.weight"))
        elif tensor.name == "fc.bias":
            tensor.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "fc.bias"))
    return fitted


def bigger_cnn(workdir: Path) -> tuple[Path, Path, Path]:
    """The 3x64-channel CNN on digits upsampled to 32x32, with its calibration and eval sets."""
    calib = np.load(SAMPLES / "digits_cnn.calib.npz")
    evaluation = np.load(SAMPLES / "digits_cnn.eval.npz")
    up = lambda x: np.kron(x, np.ones((1, 1, 4, 4), np.float32))  # noqa: E731
    x_calib, x_eval = up(calib["input"]), up(evaluation["input"])
    # The calibration set has no labels: fit the classifier on the first half of the eval set,
    # measure accuracy on the other (held-out) half.
    half = len(x_eval) // 2
    model = fit_classifier(make_conv_net(), x_eval[:half], evaluation["labels"][:half])
    x_eval, eval_labels = x_eval[half:], evaluation["labels"][half:]
    paths = workdir / "cnn64x3.onnx", workdir / "cnn64x3.calib.npz", workdir / "cnn64x3.eval.npz"
    onnx.save(model, str(paths[0]))
    np.savez(paths[1], input=x_calib)
    np.savez(paths[2], input=x_eval, labels=eval_labels)
    return paths


def models(workdir: Path):
    yield "digits_mlp (sample)", SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_mlp.calib.npz", SAMPLES / "digits_mlp.eval.npz"
    yield "digits_cnn (sample)", SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_cnn.calib.npz", SAMPLES / "digits_cnn.eval.npz"
    yield ("cnn 3x64ch 1x32x32 (random convs, fitted head)", *bigger_cnn(workdir))


def measure_one(name, source, calib_path, eval_path, workdir: Path, calibrator="minmax", budget_s=2.0, threads=1) -> dict:
    """Quantize one model statically and measure it against fp32; returns one result dict."""
    model = onnx.load(str(source))
    specs = input_specs(model)
    calibration = load_npz(calib_path, specs)
    evaluation = load_npz(eval_path, specs, "labels")
    start = time.perf_counter()
    quantized, report = QuantizeStatic(StaticQuantizeConfig(calibrator=calibrator), calibration, threads)(model)
    tool_s = time.perf_counter() - start
    target = workdir / f"{Path(source).stem}.static.{calibrator}.onnx"
    onnx.save(quantized, str(target))
    sessions = [make_session(source, threads), make_session(target, threads)]
    first = sessions[0].get_outputs()[0].name
    reference = run_batches(sessions[0], evaluation.batches)[first]
    produced = run_batches(sessions[1], evaluation.batches)[first]
    whole = {k: np.concatenate([b[k] for b in evaluation.batches]) for k in evaluation.batches[0]}
    latency = {}
    for batch in (1, 32):
        feed = {k: v[:batch] for k, v in whole.items()}
        latency[batch] = measure_latency(sessions, feed, budget_s)
    kernels = Counter(optimized_op_counts(target, threads))
    return {
        "model": name, "calibrator": calibrator,
        "fp32_accuracy": task_accuracy(reference, evaluation.labels),
        "static_accuracy": task_accuracy(produced, evaluation.labels),
        "top1_agreement": float(np.mean(np.argmax(reference, -1) == np.argmax(produced, -1))),
        "latency": {b: {"fp32_us": r["original"]["p50"] * 1000, "static_us": r["candidate"]["p50"] * 1000,
                        "ratio": r["ratio"], "runs": r["runs"]} for b, r in latency.items()},
        "kernels": dict(kernels),
        "kept_float": {d.node: d.reason for d in report.layers if d.action == "kept float"},
        "tool_s": tool_s,
    }


def static_rows(workdir: Path, calibrator="minmax", budget_s=2.0) -> list[list[str]]:
    """Table rows (see HEADER) for every bench model; bench/run.py can call this."""
    rows = []
    for name, source, calib, evaluation in models(workdir):
        print(f"static: {name}", file=sys.stderr)
        r = measure_one(name, source, calib, evaluation, workdir, calibrator, budget_s)
        lat = r["latency"]
        rows.append([r["model"], r["calibrator"], f"{r['fp32_accuracy']:.4f}", f"{r['static_accuracy']:.4f}",
                     f"{r['top1_agreement']:.4f}", f"{lat[1]['fp32_us']:.1f}", f"{lat[1]['static_us']:.1f}",
                     f"{lat[1]['ratio']:.3f}", f"{lat[32]['fp32_us']:.1f}", f"{lat[32]['static_us']:.1f}",
                     f"{lat[32]['ratio']:.3f}", ", ".join(f"{k} {v}" for k, v in sorted(r["kernels"].items())),
                     "; ".join(f"{k}: {v.split(':')[0]}" for k, v in r["kept_float"].items()) or "-",
                     f"{r['tool_s']:.2f}"])
    return rows


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--calibrator", action="append", choices=["minmax", "percentile", "entropy", "mse"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of alternating runs per batch size")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for calibrator in args.calibrator or ["minmax"]:
            rows += static_rows(Path(tmp), calibrator, args.budget)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, 1 intra-op thread; ratio = static p50 / fp32 p50 (lower is faster)\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
