"""Run every weight command on every graph shape of tests/graph_shapes.py and write the table into
docs/ROBUSTNESS.md (between its graph-shapes markers). tests/test_graph_shapes.py asserts the same matrix.

    python bench/shapes_table.py [--doc docs/ROBUSTNESS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from graph_shapes import COMMANDS, SHAPES  # noqa: E402
from onnxshrink.cli import app  # noqa: E402

START, END = "<!-- graph-shapes:start -->", "<!-- graph-shapes:end -->"


def run(shape: str, label: str, folder: Path) -> tuple[int, str, set]:
    """(exit code, cell text, reasons layers were left as they were)."""
    model, feed = SHAPES[shape]()
    source = folder / "model.onnx"
    onnx.save(model, str(source))
    np.savez(folder / "calib.npz", **feed)
    args = [a.format(out=str(folder / "out"), calib=str(folder / "calib.npz")) for a in COMMANDS[label]]
    args += ["--force"] + ([] if label == "pack" else ["--json"])
    result = CliRunner().invoke(app, [args[0], str(source), *args[1:]], env={"COLUMNS": "200", "NO_COLOR": "1"})
    if result.exit_code:
        return result.exit_code, f"**{result.exit_code}**", {result.stderr.strip().splitlines()[0]}
    if label == "pack":
        return 0, "0 · lossless", set()
    report = json.loads(result.stdout)
    layers = [layer for p in report["passes"] for layer in p["layers"]]
    changed = [layer for layer in layers if not layer["action"].startswith("kept")]
    reasons = {f"{layer['node']}: {layer['reason']}" for layer in layers if layer["action"].startswith("kept")}
    return 0, f"0 · {len(changed)}/{len(layers)}", reasons


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ROBUSTNESS.md"))
    args = parser.parse_args()
    rows, notes = [], []
    for shape in SHAPES:
        cells, reasons = [], {}
        for label in COMMANDS:
            with tempfile.TemporaryDirectory() as tmp:
                code, cell, why = run(shape, label, Path(tmp))
            cells.append(cell)
            for reason in why:
                reasons.setdefault(reason, []).append(label)
        rows.append(f"| {shape} | " + " | ".join(cells) + " |")
        for reason, labels in reasons.items():
            notes.append(f"- {shape}, {', '.join(labels)}: {reason}")
    text = "\n".join([
        START,
        f"Written by `python bench/shapes_table.py` (onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}); "
        "`tests/test_graph_shapes.py` asserts the same matrix: the exit code, the input unchanged byte for byte, "
        "nothing else written, a one-line error, or an output that runs in onnxruntime with the original's output "
        "shapes and types (cosine >= 0.8 to the original; a pack decodes to the same bytes). A cell is "
        "`exit · layers changed/layers seen`; every layer left as it was is listed below with the reason the "
        "command gave.",
        "",
        "| graph shape | " + " | ".join(f"`{label}`" for label in COMMANDS) + " |",
        "| --- |" + " --- |" * len(COMMANDS),
        *rows,
        "",
        "Layers left as they were, and errors:",
        "",
        *notes,
        END,
    ])
    doc = Path(args.doc)
    current = doc.read_text()
    if START in current:
        head, rest = current.split(START, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current = current.replace("## Not tested, and why", "## Graph shapes (every weight command)\n\n" + text + "\n\n## Not tested, and why")
    doc.write_text(current)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
