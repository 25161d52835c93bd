"""A larger calibration set for the sentence encoders, from English prose that ships with Python (issue 15, item 2).

    .venv/bin/python bench/calibration_text.py [--model minilm|mpnet]    # prints the .npz path (cached)

The exports of bench/transformer_export.py calibrate on 128 sentences of bench/sentences.txt: about 1500 real
tokens, fewer than the 1536 inputs of MiniLM's FFN output layer, so its X^T X is singular and the OBS updates of
SparseGPT / GPTQ fit those few tokens. This script adds no download: the sentences are cut from the reference
prose of Python's own `pydoc_data/topics.py` (the language reference, PSF licence; about 1400 sentences, 30k
tokens) plus the sentences of bench/sentences.txt that neither the export's calibration nor its held-out part
uses. Held-out sentences are never included (checked against the export's heldout.txt).

`--source everyday` takes bench/sentences_calibration.txt instead of the prose: 602 everyday sentences written
for calibration in a later session, of the kinds bench/sentences.txt holds (food, sport, weather, work, ...), with
any that shares 60% or more of its words with a held-out sentence left out.

The sentences are shuffled with a fixed seed, then tokenized by the model's own tokenizer in the export venv
(this same file run there with `--tokenize`; transformers lives only in that venv), padded to 64 tokens like the
export's. Output: `<cache>/<model>/calibration-text-<key>/calibration.npz` (+ calibration.txt, info.json), the key
a hash of this file, the sentences and the export; the sentences depend on the Python version that runs this
(info.json records it). bench/deep_compression_real.py --calibration text|both reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_LENGTH = 64
NEAR_COPY = 0.6  # an everyday sentence sharing this much of its words with a held-out one is left out


def pydoc_sentences() -> list[str]:
    """Prose sentences of the language reference shipped as pydoc_data.topics: grammar and code blocks left out."""
    import pydoc_data.topics as topics

    found = []
    for name in sorted(topics.topics):
        for paragraph in re.split(r"\n\s*\n", topics.topics[name]):
            if "::=" in paragraph or ">>>" in paragraph:
                continue
            text = " ".join(line.strip() for line in paragraph.split("\n"))
            text = text.replace("*", "").replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
                sentence = sentence.strip()
                if not 6 <= len(sentence.split()) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
                    continue
                if re.search(r"[_={}\[\]<>|\\#@$~^]", sentence):
                    continue  # code, not prose
                if sum(c.isalpha() or c == " " for c in sentence) < 0.9 * len(sentence):
                    continue
                found.append(sentence)
    return sorted(set(found))


def bench_sentences() -> list[str]:
    lines = (line.strip() for line in (HERE / "sentences.txt").read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def everyday_sentences() -> list[str]:
    lines = (line.strip() for line in (HERE / "sentences_calibration.txt").read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def words(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z']+", sentence.lower()))


def near_copy(sentence: str, held: list[set[str]], limit: float = NEAR_COPY) -> bool:
    """Whether `sentence` shares `limit` or more of its words (Jaccard) with one of the held-out sentences."""
    mine = words(sentence)
    return any(len(mine & other) >= limit * len(mine | other) for other in held)


def sentences(export: Path, seed: int = 0, source: str = "prose") -> list[str]:
    """The calibration text for an export, bench sentences unused by it added, none of its held-out ones: "prose"
    the pydoc reference prose, "everyday" bench/sentences_calibration.txt (and no near copy of a held-out one)."""
    held = set((export / "heldout.txt").read_text(encoding="utf-8").splitlines())
    used = set((export / "calibration.txt").read_text(encoding="utf-8").splitlines())
    extra = pydoc_sentences() if source == "prose" else everyday_sentences()
    text = [s for s in extra + [s for s in bench_sentences() if s not in used] if s not in held]
    if source == "everyday":
        held_words = [words(s) for s in held]
        text = [s for s in text if not near_copy(s, held_words)]
    text = sorted(set(text))
    random.Random(seed).shuffle(text)
    return text


def build(model_key: str = "minilm", source: str = "prose") -> Path:
    """The cached calibration .npz of a model's export (made once)."""
    import glob
    import os

    sys.path.insert(0, str(HERE))
    import transformer_bench as tb

    cache = tb.cache_root()
    export = Path(sorted(glob.glob(os.path.join(cache, model_key, "export-*", "model.onnx")))[0]).parent
    text = sentences(export, source=source)
    key = hashlib.sha256(b"".join([Path(__file__).read_bytes(), "\n".join(text).encode(), export.name.encode()]))
    out = cache / model_key / f"calibration-{'text' if source == 'prose' else source}-{key.hexdigest()[:12]}"
    if (out / "calibration.npz").is_file():
        return out / "calibration.npz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    info = json.loads((export / "export.json").read_text())
    folder = tb.model_dir(cache, tb.MODELS[model_key])
    python = cache / "export-venv" / "bin" / "python"
    subprocess.run([str(python), __file__, "--tokenize", str(folder), str(out / "calibration.txt"),
                    str(out / "calibration.npz"), "--inputs", ",".join(info["inputs"])], check=True)
    (out / "info.json").write_text(json.dumps({"sentences": len(text), "python": sys.version.split()[0],
                                               "export": export.name, "max_length": MAX_LENGTH}, indent=1) + "\n")
    return out / "calibration.npz"


def tokenize(model_dir: str, text_file: str, out: str, inputs: str) -> None:
    """Runs in the export venv: the model's tokenizer, padded like bench/transformer_export.py's."""
    import numpy as np
    from transformers import AutoTokenizer

    text = Path(text_file).read_text(encoding="utf-8").splitlines()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    np.savez(out, **{name: np.asarray(encoded[name], dtype=np.int64) for name in inputs.split(",")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "mpnet"])
    parser.add_argument("--source", default="prose", choices=["prose", "everyday"],
                        help="prose: Python's reference prose; everyday: bench/sentences_calibration.txt")
    parser.add_argument("--tokenize", nargs=3, metavar=("MODEL_DIR", "TEXT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default="input_ids,attention_mask", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenize:
        tokenize(*args.tokenize, args.inputs)
        return
    print(build(args.model, args.source))


if __name__ == "__main__":
    main()
