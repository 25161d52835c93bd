"""One-shot prune / cluster of a real model through the library, timed and judged on held-out data (issue 15, 1-2).

    .venv/bin/python bench/deep_compression_real.py cluster --set bits=4
    .venv/bin/python bench/deep_compression_real.py prune --set method=sparsegpt scope=layer sparsity=0.5
    .venv/bin/python bench/deep_compression_real.py cluster --model det --set bits=4
    .venv/bin/python bench/deep_compression_real.py prune --calibration text --sentences 1024 --set method=sparsegpt ...
    .venv/bin/python bench/deep_compression_real.py prune --sensitivity 0.25,0.5,0.75 --set method=sparsegpt sparsity=0.5

`--set field=value` sets a ClusterConfig / PruneConfig field (values parsed as Python literals when they parse).
Prints wall time, CPU time (all threads: steadier than wall time on a shared machine), peak RSS of the process
and the quality against the fp32 model:
- minilm (default; bench/transformer_export.py's cached export): mean cosine of mean-pooled sentence embeddings
  and top-5 neighbour overlap on the held-out sentences (bench/embedding_metrics.py), fitted on the export's 128
  calibration sentences (`--calibration export`), on the prose of bench/calibration_text.py (`text`: up to 1499
  sentences, 35k tokens; none of them held out), or on both, the first `--sentences N` of them. The sentences are
  batched by length (32 a batch) and each batch is cut to its longest sentence: padding is masked out of every real
  token, so the statistics of the real tokens are those of the 64-token padded batches, for a fraction of the runs;
- mpnet: the same for all-mpnet-base-v2 (`make bench-transformer MODEL=mpnet`'s export, 4x MiniLM's size);
- det (ddddocr 1.6.1's common_det.onnx, a YOLO-style detector, from the wheel bench/real_models.py caches):
  fitted on 8 seeded random images, judged on 8 others by the cosine of every output row (85 numbers per anchor:
  box, objectness, classes) and the largest change of the objectness*class score. Random images are no task
  accuracy; they show whether a method keeps the network's function on inputs it was not fitted on.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedding_metrics import pooled_embeddings, row_cosines, topk_overlap  # noqa: E402

from onnxshrink.data import Dataset, input_specs, load_npz  # noqa: E402
from onnxshrink.passes.cluster import Cluster, ClusterConfig  # noqa: E402
from onnxshrink.passes import prune_common  # noqa: E402
from onnxshrink.passes.prune import Prune, PruneConfig  # noqa: E402
from onnxshrink.runtime import make_session  # noqa: E402


def sentence_batches(arrays: dict, size: int = 32) -> Dataset:
    """Token arrays ([sentences, 64], with an attention_mask) as a Dataset of batches of similar length, each cut to
    its longest sentence (the model's sequence axis is dynamic; the padding cut is masked out of every real token)."""
    lengths = arrays["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), size):
        rows = np.sort(order[start:start + size])
        width = int(lengths[rows].max())
        batches.append({name: np.ascontiguousarray(value[rows, :width]) for name, value in arrays.items()})
    dataset = Dataset(batches, None, len(order), False, [])
    dataset.batch_axes = {name: 0 for name in arrays}
    return dataset


def calibration_sentences(folder: Path, model, source: str, count: int) -> Dataset:
    """The first `count` (0: all) sentences of the export's calibration set, of bench/calibration_text.py's, or of
    both (the export's first)."""
    if source == "none":  # the pass without data: no weighting, refit or GPTQ
        return None
    if source == "export-padded":  # the export's file as the CLI reads it: 64-token batches of 32
        data = load_npz(folder / "calibration.npz", input_specs(model), role="calibration data")
        return data
    parts = []
    if source in ("export", "both", "export+everyday"):
        parts.append(dict(np.load(folder / "calibration.npz")))
    if source in ("text", "both"):
        import calibration_text

        parts.append(dict(np.load(calibration_text.build(folder.parent.name))))
    if source in ("everyday", "export+everyday"):
        import calibration_text

        parts.append(dict(np.load(calibration_text.build(folder.parent.name, "everyday"))))
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if count:
        arrays = {name: value[:count] for name, value in arrays.items()}
    return sentence_batches(arrays)


def minilm(source: str = "export-padded", count: int = 0, key: str = "minilm"):
    path = Path(sorted(glob.glob(os.path.expanduser(f"~/.cache/onnxshrink/{key}/export-*/model.onnx")))[0])
    model = onnx.load(path)
    calibration = calibration_sentences(path.parent, model, source, count)
    held = dict(np.load(path.parent / "heldout.npz"))

    def outputs(candidate, threads):
        session = make_session(candidate, threads)
        return pooled_embeddings(session, held)

    def quality(reference, candidate):
        return (f"cosine {row_cosines(reference, candidate).mean():.4f} (worst {row_cosines(reference, candidate).min():.4f}), "
                f"top-5 {topk_overlap(reference, candidate, 5):.3f}")

    if calibration is None:
        return path, model, None, outputs, quality, f"no calibration data / {len(held['input_ids'])} held-out"
    tokens = sum(int(batch["attention_mask"].sum()) for batch in calibration.batches)
    return (path, model, calibration, outputs, quality,
            f"{calibration.samples} calibration sentences ({source}, {tokens} tokens) / {len(held['input_ids'])} held-out")


def det():
    import real_models

    path = real_models.wheel_dir("ddddocr") / "ddddocr" / "common_det.onnx"
    model = onnx.load(path)
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    images = rng.random((16, 3, 416, 416)).astype(np.float32)
    calibration = Dataset([{name: images[i:i + 1]} for i in range(8)], None, 8, True, [])

    def outputs(candidate, threads):
        session = make_session(candidate, threads)
        return np.concatenate([session.run(None, {name: images[i:i + 1]})[0] for i in range(8, 16)])

    def quality(reference, candidate):
        r, c = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
        score_r, score_c = r[:, 4:5] * r[:, 5:], c[:, 4:5] * c[:, 5:]
        return (f"row cosine {row_cosines(r, c).mean():.4f}, max score change {np.abs(score_r - score_c).max():.4f} "
                f"(max score {score_r.max():.3f}), box RMS change {np.sqrt(np.mean((r[:, :4] - c[:, :4]) ** 2)):.3f} px")

    return path, model, calibration, outputs, quality, "8 calibration / 8 held-out seeded random images"


def parse(pairs):
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["prune", "cluster"])
    parser.add_argument("--model", choices=["minilm", "mpnet", "det"], default="minilm")
    parser.add_argument("--calibration", choices=["export-padded", "export", "text", "both", "everyday",
                                                  "export+everyday", "none"], default="export-padded",
                        help="encoders: the export's calibration.npz as the CLI reads it (export-padded), the same "
                             "sentences batched by length (export), bench/calibration_text.py's prose (text), or both; "
                             "its everyday sentences (everyday), or the export's and those (export+everyday); "
                             "none: the pass without calibration data")
    parser.add_argument("--sentences", type=int, default=0, help="encoders: only the first N calibration sentences")
    parser.add_argument("--set", nargs="*", default=[], help="config field=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-padding", action="store_true",
                        help="fit padding tokens too (prune_common.PADDING_MASKS emptied): the statistics before issue 15")
    parser.add_argument("--sensitivity", default=None, metavar="S1,S2,...",
                        help="prune: first measure each layer's drift at these sparsities (onnxshrink sensitivity, no "
                             "bit widths) on the calibration data and give the curves to the pass (scope auto)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the pass to this file")
    parser.add_argument("--save", default=None, help="write the result model here (then `onnxshrink pack` it)")
    args = parser.parse_args()
    if args.keep_padding:
        prune_common.PADDING_MASKS = ()
    if args.model == "det":
        path, model, calibration, outputs, quality, what = det()
    else:
        path, model, calibration, outputs, quality, what = minilm(args.calibration, args.sentences, args.model)
    reference = outputs(model, args.threads)
    fields = parse(args.set)
    if args.sensitivity:
        from onnxshrink.layer_sensitivity import SensitivityConfig, measure

        start, cpu = time.perf_counter(), time.process_time()
        grid = tuple(float(v) for v in args.sensitivity.split(","))
        fields["sensitivity"] = measure(model, calibration, SensitivityConfig(sparsities=grid, bits=()),
                                        threads=args.threads).to_dict()
        print(f"# sensitivity at {args.sensitivity}: {time.perf_counter() - start:.0f} s wall, "
              f"{time.process_time() - cpu:.0f} s CPU", flush=True)
    config = ClusterConfig(**fields) if args.kind == "cluster" else PruneConfig(**fields)
    make = Cluster if args.kind == "cluster" else Prune
    print(f"# {platform.machine()} {os.cpu_count()} cores, onnxruntime {ort.__version__}, {path.name}, {what}")
    start, cpu = time.perf_counter(), time.process_time()
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        result, report = profiler.runcall(make(config, calibration, threads=args.threads), model)
        profiler.dump_stats(args.profile)
    else:
        result, report = make(config, calibration, threads=args.threads)(model)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    candidate = outputs(result, args.threads)
    if args.save:
        onnx.save(result, args.save)
    errors = [float(m) for layer in report.layers for m in re.findall(r"layer output error ([0-9.]+)%", layer.reason)[:1]]
    layer_errors = (f", layer output error mean {np.mean(errors):.1f}% max {np.max(errors):.1f}% ({len(errors)} layers)"
                    if errors else "")
    print(f"{args.kind} {' '.join(args.set)}{' keep-padding' if args.keep_padding else ''} [{what}]: {wall:6.1f} s wall, {cpu:6.1f} s CPU, peak RSS {rss:.0f} MB, "
          f"{quality(reference, candidate)}{layer_errors}", flush=True)


if __name__ == "__main__":
    main()
