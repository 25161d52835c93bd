"""How the cost of each command grows with the model: the sample transformer, all-MiniLM-L6-v2 and all-mpnet-base-v2
(issue 15, "Evidence": cost against model size, measured at two or more sizes).

    python bench/cost_scaling.py [--models sample,minilm,mpnet] [--commands static,gptq4,prune,cluster,pack]
                                 [--limit 1800] [--out docs/benchmarks-cost.md] [--keep]

Each command runs as its own child process (`.venv/bin/onnxshrink ... --no-validate`, so only the pass is timed),
fitted on the model's calibration file: the sample transformer's `sample_models/digits_transformer.calib.npz`, the
transformer exports' 128 calibration sentences (bench/transformer_bench.py caches them; models not cached are
skipped). Wall and CPU seconds (user + system of the child and its threads, from `os.wait4`: the steadier figure on
a shared machine) and peak RSS (transformer_bench.run_child). The table gives each command's CPU seconds per million weights and the exponent k
of CPU ∝ weights^k between consecutive sizes: k ≈ 1 is linear in the weights; k > 1 is what grows faster (a layer's
d x d Hessian, its d^3 factorization). The section it writes replaces the previous one (between its markers);
with `--keep` the previous section's rows of the (command, model) pairs this run does not measure stay, marked
as kept (rerun one command after changing it, and the others' figures remain).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from transformer_bench import cache_root, run_child  # noqa: E402

BEGIN = "<!-- cost scaling: written by bench/cost_scaling.py -->"
END = "<!-- end of cost scaling -->"
COMMANDS = {
    "inspect": "inspect",  # the baseline: start, imports and reading the model, no pass
    "static": "quantize --calibration {cal}",
    "gptq4": "quantize --bits 4 --algorithm gptq --calibration {cal}",
    "prune": "prune --sparsity 0.5 --method sparsegpt --scope layer --calibration {cal}",
    "cluster": "cluster --bits 4 --calibration {cal}",
    "pack": "pack",
}


def models() -> dict:
    """name -> (model, calibration), for the models present on this machine."""
    found = {"sample": (ROOT / "sample_models" / "digits_transformer.onnx",
                        ROOT / "sample_models" / "digits_transformer.calib.npz")}
    for key in ("minilm", "mpnet"):
        exports = sorted((cache_root() / key).glob("export-*/model.onnx"), key=lambda p: p.stat().st_mtime)
        if exports:
            found[key] = (exports[-1], exports[-1].with_name("calibration.npz"))
    return found


def weights(path: Path) -> tuple[int, int, int]:
    """(float weights in all, the largest layer's input width, layers with 2-D weights): what costs scale with."""
    model = onnx.load(str(path), load_external_data=False)
    total, widest, layers = 0, 0, 0
    for tensor in model.graph.initializer:
        count = math.prod(tensor.dims)
        if tensor.data_type == onnx.TensorProto.FLOAT:
            total += count
            if len(tensor.dims) == 2:
                layers += 1
                widest = max(widest, min(tensor.dims))
    return total, widest, layers


def net(row: dict, rows: list[dict]) -> float | None:
    """The command's CPU seconds past `inspect` of the same model (start, imports, reading it): the pass's own."""
    base = [r["cpu"] for r in rows if r["command"] == "inspect" and r["model"] == row["model"] and r["rc"] == 0]
    return None if not base or row["command"] == "inspect" else max(row["cpu"] - base[0], 0.01)


MIN_TIMED = 1.0  # CPU seconds past start-up below which a pass is too short to fit an exponent to


def exponent(rows: list[dict], command: str) -> list[str]:
    """k of (net) CPU ∝ weights^k between each pair of consecutive sizes that both finished, where both passes
    took MIN_TIMED or more past start-up (a sample model's pass is start-up noise)."""
    done = [(r, net(r, rows) or r["cpu"]) for r in rows if r["command"] == command and r["rc"] == 0]
    return [f"{a['model']}→{b['model']} {math.log(cb / ca) / math.log(b['weights'] / a['weights']):.2f}"
            if min(ca, cb) >= MIN_TIMED else f"{a['model']}→{b['model']} - (under {MIN_TIMED:g} s past start-up)"
            for (a, ca), (b, cb) in zip(done, done[1:])]


def section(rows: list[dict], sizes: dict, load: str) -> str:
    import onnxruntime

    order = {name: index for index, name in enumerate(COMMANDS)}
    models_order = {name: index for index, name in enumerate(sizes)}
    rows = sorted(rows, key=lambda r: (order.get(r["command"], len(order)), models_order.get(r["model"], len(sizes))))
    kept = [f"{r['command']} {r['model']}" for r in rows if r.get("kept")]

    lines = [BEGIN, "", "## How the cost grows with the model (issue 15)", "",
             f"`python bench/cost_scaling.py` on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, numpy "
             f"{np.__version__}; load average {load} while it ran (other jobs shared the cores: CPU seconds, not wall "
             "seconds, are the comparable figure). Each command alone, `--no-validate`, fitted on the model's "
             "calibration file." + (f" Rows marked * are kept from the previous run of this script (`--keep`): "
                                    f"{', '.join(kept)}." if kept else ""), "",
             "| model | float weights | widest layer input | 2-D weights |", "|---|---:|---:|---:|"]
    for name, (total, widest, layers) in sizes.items():
        lines.append(f"| {name} | {total / 1e6:.2f} M | {widest} | {layers} |")
    lines += ["", "| command | model | wall s | CPU s | CPU s past `inspect` | per M weights | peak RSS MB | exit |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        exit_ = ("killed at the limit" if r["timed_out"] else str(r["rc"])) + (" *" if r.get("kept") else "")
        own = net(r, rows)
        past, per_weight = ("-", "-") if own is None else (f"{own:.1f}", f"{own / (r['weights'] / 1e6):.2f}")
        lines.append(f"| `{r['shown']}` | {r['model']} | {r['wall']:.1f} | {r['cpu']:.1f} | {past} | {per_weight} | "
                     f"{r['rss_mb']:.0f} | {exit_} |")
    lines += ["", "Exponent k of CPU seconds (past `inspect`) ∝ float weights^k between consecutive sizes:", ""]
    for command in dict.fromkeys(r["command"] for r in rows if r["command"] != "inspect"):
        ks = exponent(rows, command)
        lines.append(f"- `{command}`: {', '.join(ks) if ks else 'fewer than two sizes finished'}")
    return "\n".join(lines + ["", END, ""])


def previous_rows(doc: Path, sizes: dict) -> list[dict]:
    """The rows of the section `doc` holds now, as `section` wrote them (for --keep)."""
    text = doc.read_text() if doc.is_file() else ""
    if BEGIN not in text or END not in text:
        return []
    shown = {"onnxshrink " + template.format(cal="cal.npz"): command for command, template in COMMANDS.items()}
    rows = []
    for line in text[text.index(BEGIN):text.index(END)].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0].strip("`") not in shown or cells[1] not in sizes:
            continue
        exit_ = cells[7].rstrip(" *")
        rows.append({"command": shown[cells[0].strip("`")], "model": cells[1], "shown": cells[0].strip("`"),
                     "wall": float(cells[2]), "cpu": float(cells[3]), "rss_mb": float(cells[6]),
                     "rc": int(exit_) if exit_.lstrip("-").isdigit() else -9, "timed_out": not exit_.lstrip("-").isdigit(),
                     "weights": sizes[cells[1]][0], "kept": True})
    return rows


def write(doc: Path, text: str) -> None:
    """The section in place of the previous one (the text around it stays where it is), or appended."""
    old = doc.read_text() if doc.is_file() else "# What each command costs\n\n"
    if BEGIN in old and END in old:
        doc.write_text(old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):])
    else:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sample,minilm,mpnet")
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds before a command is killed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-cost.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the previous section's rows of the (command, model) pairs this run does not measure")
    args = parser.parse_args()
    shrink = str(Path(sys.executable).with_name("onnxshrink"))
    present = models()
    chosen = [m for m in args.models.split(",") if m in present]
    sizes = {m: weights(present[m][0]) for m in present if m in chosen or args.keep}  # --keep: the kept rows' too
    rows, loads = [], []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-cost-") as tmp:
        for command in args.commands.split(","):
            for model in chosen:
                src, cal = present[model]
                shown = "onnxshrink " + COMMANDS[command].format(cal="cal.npz")
                out = Path(tmp) / f"{model}.{command}{'.shrink' if command == 'pack' else '.onnx'}"
                argv = [shrink, *COMMANDS[command].format(cal=cal).split(), str(src), "-o", str(out), "--force"]
                if command == "inspect":
                    argv = [shrink, "inspect", str(src)]
                elif command != "pack":
                    argv.append("--no-validate")
                loads.append(os.getloadavg()[0])
                result = run_child(argv, args.limit, Path(tmp) / f"{model}.{command}.log")
                loads.append(os.getloadavg()[0])
                result.update(command=command, model=model, shown=shown, weights=sizes[model][0])
                print(f"{command:8s} {model:7s} wall {result['wall']:7.1f} s  CPU {result['cpu']:7.1f} s  "
                      f"RSS {result['rss_mb']:6.0f} MB  rc {result['rc']}  {result['tail'] if result['rc'] else ''}",
                      file=sys.stderr, flush=True)
                rows.append(result)
                out.unlink(missing_ok=True)
                # after every row: a run stopped part way still leaves what it measured
                done = {(r["command"], r["model"]) for r in rows}
                kept = [r for r in previous_rows(args.out, sizes) if (r["command"], r["model"]) not in done] if args.keep else []
                write(args.out, section(rows + kept, sizes, f"{min(loads):.1f}-{max(loads):.1f}"))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
