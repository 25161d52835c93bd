"""`onnxshrink compress` on a real model (MiniLM, issue 15): wall time, peak RSS, what the search tried, and the
held-out quality a sentence-embedding user sees (mean-pooled cosine, top-5 neighbours; bench/embedding_metrics.py).

    python bench/compress_real.py [--budget 10m] [--min-cosine 0.99] [--out DIR]
    python bench/compress_real.py --model mpnet --budget 20m   # all-mpnet-base-v2 (another wheel; bench/transformer_export.py)
    python bench/compress_real.py --model det|rec      # ddddocr's detector / PP-OCR's recogniser (bench/conv_tasks.py;
                                                       # they render their images with Pillow: pip install -e '.[bench]')
    python bench/compress_real.py [--model det|rec] --task-check  # gated on the task too (compress --task-check):
                                                       # top-5 >= --min-top5 / boxes and scores kept (--max-score-change,
                                                       # --margin) / lines read as fp32, on sets the report does not use
    python bench/compress_real.py --model det --ort-int8   # onnxruntime's quantize_dynamic instead, same task metric
    python bench/compress_real.py --result DIR/compress.json     # measure an earlier run's pack again
    python bench/compress_real.py --recipe R.toml                 # one fixed candidate (recipe mode) instead
    python bench/compress_real.py --model rec --prices            # the plan's prices only: each layer's proxy
                                                                  # against its measured drift, each embedding
                                                                  # table's drift at each width, and the finalists
    python bench/compress_real.py --prices --at 4.38              # ... and the frontier's allocation of at least
                                                                  # 4.38 bits per weight as OUT/frontier-4.38.toml
                                                                  # (one codebook per layer; run it with --recipe)

The model is the cached export (bench/transformer_export.py makes it); nothing is downloaded. Run it with
`nice -n 10` on a shared machine, and say in the doc how busy the machine was: the search is bounded in seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conv_tasks  # noqa: E402
from embedding_metrics import pooled_embeddings, row_cosines, topk_overlap  # noqa: E402

ENCODERS = ("minilm", "mpnet")  # sentence encoders: the cached exports of bench/transformer_export.py


def embeddings(path: Path, held: dict) -> np.ndarray:
    import onnxshrink

    session = onnxshrink.session(path)
    return pooled_embeddings(session, held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["minilm", "mpnet", "det", "rec"], default="minilm",
                        help="mpnet: all-mpnet-base-v2 (measured as minilm); det: ddddocr common_det.onnx (boxes "
                        "kept); rec: PP-OCRv6 rec small (text read unchanged)")
    parser.add_argument("--export", default=None, help="minilm/mpnet: the export folder (default: the cached one)")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--min-cosine", default="0.99")
    parser.add_argument("--out", default="/tmp/compress-real")
    parser.add_argument("--result", help="an earlier run's compress.json: measure its pack, run nothing")
    parser.add_argument("--recipe", help="run this recipe (compress --recipe) instead of the search")
    parser.add_argument("--max-candidates", help="also stop after N candidates (compress --max-candidates): the same "
                        "candidates on any machine, however loaded")
    parser.add_argument("--task-check", action="store_true", help="gate the search on the task as well (compress "
                        "--task-check): det/rec boxes and scores kept / lines read as fp32 on a check set "
                        "(bench/conv_tasks.py); minilm/mpnet top-5 neighbours kept on CHECK_SENTENCES prose sentences of "
                        "bench/calibration_text.py (bench/embedding_check.py). The reported sets stay unseen")
    parser.add_argument("--min-top5", type=float, default=0.9, help="minilm/mpnet --task-check: the top-5 overlap to keep")
    parser.add_argument("--max-score-change", type=float, default=conv_tasks.DET_MAX_SCORE_CHANGE,
                        help="det --task-check: the largest score change of a kept box")
    parser.add_argument("--margin", type=float, default=0.0, help="det --task-check (and the held-out report): boxes "
                        "scoring within this of the 0.1 cut may come and go (bench/conv_tasks.det_score)")
    parser.add_argument("--ort-int8", action="store_true", help="det/rec: onnxruntime's quantize_dynamic (QInt8) instead")
    parser.add_argument("--prices", action="store_true", help="print compress's per-layer prices (layer-local proxy "
                        "and measured whole-model drift at 4 bits; a table's drift at each width) and the planned "
                        "finalists, run nothing else")
    parser.add_argument("--at", type=float, help="with --prices: also write the frontier's allocation of the fewest "
                        "bits per weight at or above this average as a recipe, OUT/frontier-AT.toml")
    args = parser.parse_args()
    if args.model not in ENCODERS:
        conv(args)
        return
    exports = sorted(glob.glob(os.path.expanduser(f"~/.cache/onnxshrink/{args.model}/export-*")))
    if not args.export and not exports:
        sys.exit(f"no {args.model} export cached: run bench/transformer_export.py (make bench-transformer) first")
    export = Path(args.export or exports[-1])
    if args.prices:
        print_prices({"model": export / "model.onnx", "calibration": export / "calibration.npz"}, float(args.min_cosine),
                     args.at, Path(args.out))
        return
    if args.result:
        result_path, wall, rss, cpu = Path(args.result), None, None, None
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result_path = out / "compress.json"
        command = [str(Path(sys.executable).parent / "onnxshrink"), "compress", str(export / "model.onnx"),
                   "--calibration", str(export / "calibration.npz"), "--data", str(export / "heldout.npz"),
                   "--min-cosine", args.min_cosine, "-o", str(out / "out.shrink"), "--force", "--json"]
        if args.task_check:
            command += ["--task-check", shlex.join([sys.executable, str(Path(__file__).resolve().parent / "embedding_check.py"),
                                                    str(check_sentences(out, args.model)), "{original}", "{model}",
                                                    "--min-top5", str(args.min_top5)])]
        wall, rss, cpu = run_compress(command, args, result_path)
    result = json.loads(result_path.read_text())
    held = dict(np.load(export / "heldout.npz"))
    reference = embeddings(export / "model.onnx", held)
    candidate = embeddings(Path(result["output"]), held)
    cosines = row_cosines(reference, candidate)
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s, peak RSS {rss / 1024:.2f} GB, load average {os.getloadavg()[0]:.1f}"
          if wall is not None else "(an earlier run)")
    budget = f" of {result['time_budget_s']:.0f} s" if result.get("time_budget_s") else ""
    lossless = result["size"].get("lossless")
    print(f"search {result['seconds']:.0f} s{budget}, stopped: {result['stopped']}; "
          f"{result['size']['times_smaller']:.2f}x smaller ({result['size']['output']} B)"
          + (f", lossless {result['size']['original'] / lossless:.2f}x" if lossless else ""))
    print(f"held-out: pooled cosine {cosines.mean():.4f} (worst {cosines.min():.4f}), top-5 "
          f"{topk_overlap(reference, candidate, 5):.3f}; compress's own check (token states, padding left out): "
          f"{min(o['cosine'] for o in result['validation']['outputs'].values()):.4f}")
    print_search(result)


CHECK_SENTENCES = 200


def check_sentences(out: Path, model_key: str = "minilm") -> Path:
    """The last CHECK_SENTENCES sentences of bench/calibration_text.py's prose (in neither the export's calibration
    nor its held-out set), as OUT/check-sentences.npz: what the top-5 task check judges on."""
    import calibration_text

    with np.load(calibration_text.build(model_key)) as data:
        arrays = {name: data[name][-CHECK_SENTENCES:] for name in data.files}
    np.savez(out / "check-sentences.npz", **arrays)
    return out / "check-sentences.npz"


def run_compress(command: list, args, result_path: Path) -> tuple[float, float, float]:
    """Run the compress command (JSON to result_path); its wall seconds, peak RSS in MB and CPU seconds (all its
    processes and threads: on a shared machine the steadier figure)."""
    command += ["--recipe", args.recipe] if args.recipe else ["--time-budget", args.budget]
    command += ["--max-candidates", args.max_candidates] if args.max_candidates and not args.recipe else []
    print(" ".join(command), file=sys.stderr)
    started = time.monotonic()
    with open(result_path, "wb") as stream:
        subprocess.run(command, stdout=stream, check=False)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - started, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def print_search(result: dict) -> None:
    print(f"recipe: {result['recipe_summary']}")
    for c in result["candidates"]:
        ratio = f"{c['times_smaller']:.2f}x" if c["times_smaller"] else "-"
        cosine = f"{c['cosine']:.4f}" if c["cosine"] is not None else "-"
        checked = c.get("task_check")
        task = f"  [task check: {c['task_check']['detail']}]" if checked else ""
        print(f"  {c['index']} {c['phase']:9} {c['seconds']:6.1f} s {ratio:>7} cos {cosine} "
              f"{'pass' if c['passed'] else 'FAIL'} {c['recipe']}{'  [' + c['error'] + ']' if c['error'] else ''}{task}")
    for note in result.get("notes", []):
        print(f"  note: {note}")


def conv(args) -> None:
    """det / rec: rendered calibration, judging and evaluation sets (bench/conv_tasks.py), then the task metric."""
    out = Path(args.out)
    data = conv_tasks.prepare(args.model, out)
    result_path = out / "compress.json"
    wall = rss = cpu = None
    if args.ort_int8:
        ort_int8(data, out, args.model)
        return
    if args.prices:
        print_prices(data, float(args.min_cosine), args.at, out)
        return
    if not args.result:
        command = [str(Path(sys.executable).parent / "onnxshrink"), "compress", str(data["model"]),
                   "--calibration", str(data["calibration"]), "--data", str(data["judging"]),
                   "--min-cosine", args.min_cosine, "-o", str(out / "out.shrink"), "--force", "--json"]
        if args.task_check:
            checker = Path(__file__).resolve().parent / "conv_tasks.py"
            command += ["--task-check", shlex.join([sys.executable, str(checker), args.model, str(data["check"]),
                                                    "{original}", "{model}", "--max-score-change",
                                                    str(args.max_score_change), "--margin", str(args.margin)])]
        wall, rss, cpu = run_compress(command, args, result_path)
    else:
        result_path = Path(args.result)
    result = json.loads(result_path.read_text())
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s, peak RSS {rss / 1024:.2f} GB, load average {os.getloadavg()[0]:.1f}"
          if wall is not None else "(an earlier run)")
    budget = f" of {result['time_budget_s']:.0f} s" if result.get("time_budget_s") else ""
    print(f"search {result['seconds']:.0f} s{budget}, stopped: {result['stopped']}; "
          f"{result['size']['times_smaller']:.2f}x smaller ({result['size']['output']} B), {len(result['candidates'])} "
          f"candidates; judging cosine {min(o['cosine'] for o in result['validation']['outputs'].values()):.4f}")
    if result.get("output"):
        print(f"task ({args.model}, held-out): {conv_tasks.task_metric(args.model, data['model'], Path(result['output']), data['evaluation'])['text']}")
        if args.model == "det" and args.margin > 0:
            print(f"task ({args.model}, held-out, margin {args.margin:g}): "
                  f"{conv_tasks.task_metric(args.model, data['model'], Path(result['output']), data['evaluation'], args.margin)['text']}")
    print_search(result)


def print_prices(data: dict, min_cosine: float, at: float | None = None, out: Path | None = None) -> None:
    """compress_plan's prices of each layer: the proxy tr(D^T H D)/tr(W^T H W) at 4 bits, the whole-model drift
    (1 - cosine on calibration samples) with that layer alone at 4 bits, per-channel errors, the bits a weight its
    4-bit indices code in, each table's drift at each width; then the finalists. The model is priced as compress
    prices it: LayerNorms folded first."""
    from onnxshrink import compress_plan as plan, compress_search
    from onnxshrink import model as model_io
    from onnxshrink.passes.fold_layernorm import fold_layernorm

    started = time.monotonic()
    source, model = data["model"], model_io.load(data["model"])
    if fold_layernorm(model):
        out.mkdir(parents=True, exist_ok=True)
        source = out / "priced.folded.onnx"
        model_io.save(model, source, force=True)
    del model
    prices = plan.price_layers(source, data["calibration"], min_share=plan.MIN_LAYER_SHARE,
                               form=compress_search.PLANNED_CODEBOOK, table_rows=compress_search.PLANNED_TABLE_ROWS)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"priced {len(prices.layers)} layers and tables in {time.monotonic() - started:.0f} s wall, "
          f"{usage.ru_utime + usage.ru_stime:.0f} s CPU, peak RSS {usage.ru_maxrss / 1024:.0f} MB, load average "
          f"{os.getloadavg()[0]:.1f}")
    for note in prices.notes:
        print(f"note: {note}")
    print(f"{'layer':24} {'weights':>9} {'proxy@4':>9} {'drift@4':>9} {'ratio':>7} {'channel@4':>10} {'coded@4':>8}")
    for layer in prices.tables:
        print(f"table {layer.tensor} ({layer.weights} weights, {layer.rows} rows): bits per weight with row scales, "
              "weight error, measured drift: " + "; ".join(
                  f"{b}: {plan.stored_bits(layer, b):.2f}, {(layer.proxy or layer.errors)[b]:.4f}, "
                  + (f"{layer.errors[b]:.5f}" if layer.proxy is not None else "-") for b in sorted(layer.errors)))
    for layer in prices.layers:
        if layer.table:
            continue
        proxy = (layer.proxy or layer.errors).get(plan.SENSITIVITY_BITS, 0.0)
        drift = layer.drift
        ratio = f"{drift / proxy:7.2f}" if drift is not None and proxy > 0 else "      -"
        channel = layer.channel_errors.get(plan.SENSITIVITY_BITS)
        print(f"{layer.node[:24]:24} {layer.weights:9d} {proxy:9.5f} "
              f"{(f'{drift:9.5f}' if drift is not None else '        -')} {ratio} "
              f"{(f'{channel:10.5f}' if channel is not None else '         -')} "
              f"{plan.stored_bits(layer, plan.SENSITIVITY_BITS):8.2f}")
    if prices.int8_drift is not None:
        print(f"other floats in int8: {prices.int8_elements} elements, drift {prices.int8_drift:.5f} "
              f"({prices.int8_drift / (8 * prices.int8_elements):.2e} per bit saved over fp16)")
    print(f"finalists at --min-cosine {min_cosine}:")
    for allocation, per in plan.finalists(prices, min_cosine):
        print(f"  {plan.summary(allocation, prices, per)}, {_stored_mb(allocation, prices, per):.2f} MiB coded: predicted drift "
              f"{plan.predicted_drift(allocation, prices, per):.4f}, marginal price "
              f"{plan.marginal_price(allocation, prices, per):.2e}/bit, other floats "
              f"{plan.other_floats(allocation, prices, per)}")
    if at is not None:
        from onnxshrink.compress_search import CompressConfig, planned_recipe

        fitting = [a for a in plan.frontier(prices) if plan.average_bits(a, prices) >= at - 1e-9]
        allocation = fitting[-1]
        recipe = planned_recipe(allocation, CompressConfig(calibration=str(data["calibration"])), True,
                                plan.other_floats(allocation, prices), "layer",
                                tuple(layer.node for layer in prices.tables))
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"frontier-{at}.toml"
        path.write_text(recipe.to_toml())
        print(f"frontier at >= {at} bits: {plan.summary(allocation, prices)}, {_stored_mb(allocation, prices, 'layer'):.2f} "
              f"MiB coded, predicted drift {plan.predicted_drift(allocation, prices):.4f} -> {path}")


def _stored_mb(allocation: dict, prices, per: str) -> float:
    """The priced weights' bytes at `allocation` (indices at their coded bits, row scales, per-channel codebooks):
    what the pack's Huffman coding of them approaches from above."""
    from onnxshrink import compress_plan as plan

    return sum(layer.weights * plan.stored_bits(layer, allocation[layer.node], per) for layer in prices.layers
               if layer.node in allocation) / 8 / 2**20


def ort_int8(data: dict, out: Path, model: str) -> None:
    """onnxruntime's dynamic int8 (the peer): size, wall time, task metric and the judging cosine, as above."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxshrink import api
    from onnxshrink.validate import Thresholds, ValidateConfig

    target = out / "ort-int8.onnx"
    started = time.monotonic()
    quantize_dynamic(str(data["model"]), str(target), weight_type=QuantType.QInt8)
    wall = time.monotonic() - started
    report = api.validate(data["model"], target, ValidateConfig(data=str(data["judging"]), latency=False,
                                                                  thresholds=Thresholds(min_cosine=0.99)))
    cosine = min(o.cosine for o in report.outputs.values())
    ratio = data["model"].stat().st_size / target.stat().st_size
    print(f"ort quantize_dynamic QInt8: {wall:.0f} s, {ratio:.2f}x smaller, judging cosine {cosine:.4f}; task: "
          f"{conv_tasks.task_metric(model, data['model'], target, data['evaluation'])['text']}")


if __name__ == "__main__":
    main()
