"""Export a sentence encoder (all-MiniLM-L6-v2, all-mpnet-base-v2) to ONNX and tokenize the benchmark sentences; runs
inside the export venv, not the project's.

    export-venv/bin/python bench/transformer_export.py MODEL_DIR SENTENCES OUT_DIR [--calibration 128] [--heldout 200]

Imports torch and transformers, which onnxshrink never depends on: bench/transformer_bench.py creates the cached venv
and calls this script, so the onnxshrink side reads only the files written here (numpy and onnxruntime suffice):

- model.onnx: token embeddings `last_hidden_state` [batch, sequence, hidden], dynamic batch and sequence axes;
- calibration.npz / heldout.npz: the tokenizer's inputs (BERT: input_ids, attention_mask, token_type_ids; MPNet has no
  token_type_ids), int64, padded to --max-length;
- torch_heldout.npz: torch's last_hidden_state on the held-out part, which the bench compares the export with;
- export.json: torch / transformers versions, opset, the split.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def read_sentences(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class Encoder(torch.nn.Module):
    """The bare encoder with positional inputs, so the exported graph has exactly the tokenizer's named inputs."""

    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("sentences", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    sentences = read_sentences(args.sentences)
    if len(sentences) < args.calibration + args.heldout:
        raise SystemExit(f"error: {len(sentences)} sentences, need {args.calibration + args.heldout}")
    random.Random(args.seed).shuffle(sentences)  # both parts cover every topic of the file
    parts = {"calibration": sentences[:args.calibration],
             "heldout": sentences[args.calibration:args.calibration + args.heldout]}

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # What the model reads, in the tokenizer's own order (MPNet's has no token_type_ids).
    inputs = [name for name in tokenizer.model_input_names if name in KNOWN_INPUTS]
    # Eager attention: the classic BERT pattern (MatMul, Div, Add mask, Softmax) that exporters wrote for years and that
    # onnxruntime's attention fusion and NNCF's transformer patterns know; SDPA adds an IsNaN/Where guard per layer.
    model = AutoModel.from_pretrained(args.model_dir, attn_implementation="eager").eval()
    encoder = Encoder(model, inputs).eval()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    truncated = {}
    for name, texts in parts.items():
        full = tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated[name] = sum(len(ids) > args.max_length for ids in full)
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="np")
        arrays = {key: np.asarray(encoded[key], dtype=np.int64) for key in inputs}
        np.savez(args.out_dir / f"{name}.npz", **arrays)
        (args.out_dir / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")

    heldout = dict(np.load(args.out_dir / "heldout.npz"))
    with torch.no_grad():
        hidden = encoder(*(torch.from_numpy(heldout[key]) for key in inputs)).numpy()
    np.savez(args.out_dir / "torch_heldout.npz", last_hidden_state=hidden.astype(np.float32))

    example = tuple(torch.from_numpy(heldout[key][:2]) for key in inputs)
    axes = {key: {0: "batch", 1: "sequence"} for key in inputs}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    # The TorchScript exporter: dynamic_axes gives symbolic batch and sequence dims without onnxscript.
    torch.onnx.export(encoder, example, str(args.out_dir / "model.onnx"), input_names=list(inputs),
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=args.opset,
                      do_constant_folding=True, dynamo=False)
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "opset": args.opset, "attention": "eager",
            "max_length": args.max_length, "seed": args.seed, "inputs": inputs,
            "model_type": model.config.model_type, "hidden_size": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "sentences": len(sentences),
            "calibration": args.calibration, "heldout": args.heldout, "truncated": truncated,
            "parameters": sum(p.numel() for p in model.parameters())}
    (args.out_dir / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
