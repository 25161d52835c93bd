"""bench/transformer_bench.py's doc upkeep: a subset run (`--only`) keeps the rows it does not rerun, from
results.json or, on a machine without it, from the doc itself, and carries the hand-written notes over."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "transformer_bench.py"
INFO = {"torch": "2", "transformers": "5", "opset": 17, "parameters": 22.7e6, "model_type": "bert", "layers": 6,
        "hidden_size": 384, "inputs": ["input_ids", "attention_mask"], "sentences": 395, "seed": 0,
        "calibration": 128, "heldout": 200, "max_length": 64}


def _bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("transformer_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("transformer_bench", module)  # its dataclasses look their module up by name
    spec.loader.exec_module(sys.modules["transformer_bench"])
    return sys.modules["transformer_bench"]


def _result(cosine, b1):
    return {"size": 0.25, "cosine": cosine, "min_cosine": cosine - 0.002, "topk": 0.95, "spearman": 0.998,
            "b1": b1, "b8": 0.4, "load": 0.2, "token_cosine": 0.998, "token_cosine_padded": 0.9}


def _run(bench, model, tmp_path, method_name, cosine, argv):
    method = next(m for m in bench.onnxshrink_methods("onnxshrink", model.key) if m.name == method_name)
    row = {"method": method, "run": {"wall": 12.0, "rss_mb": 900.0}, "result": _result(cosine, 0.4), "error": "",
           "date": "2026-12-06 04:00"}
    args = types.SimpleNamespace(note="", latency_budget=4.0, quick=False)
    judge = types.SimpleNamespace(fp32=tmp_path / "model.onnx", fp32_load=0.6)
    sys.argv = ["transformer_bench.py", *argv]
    saved = bench.save_results(tmp_path / "cache" / model.key / "results.json", model, args, [row], INFO, judge,
                               (1.0, 1.0, 1.0), [])
    bench.write_doc(model.doc, args, model, saved["rows"], INFO, 1e-4, 0.99999, judge, None, "", 60, (1.0, 1.0, 1.0),
                    [], tmp_path / "cache")


def test_subset_run_on_a_fresh_machine_keeps_the_doc_rows_it_did_not_rerun(tmp_path, monkeypatch):
    bench = _bench()
    (tmp_path / "model.onnx").write_bytes(b"0" * 1000)
    doc = tmp_path / "minilm.md"
    model = bench.Encoder("minilm", "all-MiniLM-L6-v2", (), "a wheel", doc)
    monkeypatch.setattr(bench, "MAIN_DOC", doc)
    monkeypatch.setattr(bench, "MODELS", {"minilm": model})
    argv = sys.argv
    try:
        # A first full run writes the doc; then results.json is lost (a fresh machine), and a run of one row follows.
        _run(bench, model, tmp_path, "onnxshrink quantize (dynamic)", 0.9935, ["--only", "dynamic"])
        first = doc.read_text()
        assert "| onnxshrink quantize (dynamic) | 0.250 | 0.9935 (0.992)" in first and "2026-12-06 04:00" in first
        doc.write_text(first + f"\n{bench.NOTES}\nA paragraph written by hand.\n")
        (tmp_path / "cache" / "minilm" / "results.json").unlink()
        _run(bench, model, tmp_path, "onnxshrink quantize --calibration (static)", 0.9985, ["--only", "(static)"])
    finally:
        sys.argv = argv
    text = doc.read_text()
    table = [line for line in text.splitlines() if line.startswith("| onnxshrink")]
    assert [line.split(" | ")[0] for line in table] == ["| onnxshrink quantize (dynamic)",
                                                        "| onnxshrink quantize --calibration (static)"]
    assert "| 0.9935 (0.992) |" in table[0] and "| 0.9985 (" in table[1]  # the kept row's figures, unchanged
    assert text.count("A paragraph written by hand.") == 1 and text.index(bench.NOTES) > text.index(table[1])
    saved = json.loads((tmp_path / "cache" / "minilm" / "results.json").read_text())
    assert {row["name"] for row in saved["rows"]} == {"onnxshrink quantize (dynamic)",
                                                      "onnxshrink quantize --calibration (static)"}
