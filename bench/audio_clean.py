"""An audio model and its compressed copy on clean and noisy test signals: does the front end survive clean audio?

    .venv/bin/python bench/audio_clean.py ORIGINAL.onnx CANDIDATE.(onnx|shrink) [...] [--scale 1.0] [--chunk 512]

validate synthesizes audio as tones 10-50 dB over noise (docs/commands.md, **Inputs**). Deployment audio can be far
cleaner (a TTS clip, a studio take), and a log-power spectrogram shows there what noise hides: a rounded STFT
basis leaks every loud frequency into the quiet bins. This feeds one second at 16 kHz of a 100-3100 Hz chirp and of
a 440 Hz tone, each at SNR 20, 40 and 60 dB and with no noise, to both models and prints the cosine of each output
(the outputs of all chunks together). Models with a recurrent state (an input `state`, `h` or `c` that an output
`stateN`, `hn` or `cn` returns: silero-vad) are streamed chunk by chunk, each model carrying its own state; an
integer scalar input (`sr`) gets 16000. `--scale` multiplies the signals (livekit's melspectrogram reads int16-range
floats: 32767); `--chunk` is the samples per run where the model's length axis is symbolic (default: one second).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxshrink  # noqa: E402

RATE = 16000
SNRS = (20.0, 40.0, 60.0, None)
STATES = {"state": "stateN", "h": "hn", "c": "cn"}


def signals(seed: int = 0) -> dict[str, np.ndarray]:
    t = np.arange(RATE) / RATE
    rng = np.random.default_rng(seed)
    clean = {"chirp": np.sin(2 * np.pi * (100 + 1500 * t) * t), "tone": np.sin(2 * np.pi * 440 * t)}
    out = {}
    for name, x in clean.items():
        x = 0.1 * x / np.sqrt(np.mean(x ** 2))
        for snr in SNRS:
            noise = 0.0 if snr is None else rng.standard_normal(RATE) * 0.1 * 10 ** (-snr / 20)
            out[f"{name}, {'clean' if snr is None else f'{snr:g} dB SNR'}"] = x + noise
    return out


def stream(session, signal: np.ndarray, chunk: int | None, scale: float) -> np.ndarray:
    """All outputs of all chunks, flattened and joined (a state output excluded)."""
    inputs = session.get_inputs()
    audio = next(i for i in inputs if i.type == "tensor(float)" and i.name not in STATES)
    fixed = audio.shape[-1] if isinstance(audio.shape[-1], int) else None
    size = fixed or chunk or len(signal)
    state = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in inputs if i.name in STATES}
    other = {i.name: np.array(RATE, dtype=np.int64) for i in inputs if i.type == "tensor(int64)" and not i.shape}
    names = [o.name for o in session.get_outputs()]
    values = []
    for start in range(0, len(signal) - size + 1, size):
        feed = {audio.name: (signal[start:start + size] * scale).astype(np.float32)[None, :], **state, **other}
        result = dict(zip(names, session.run(None, feed)))
        for name in state:
            state[name] = result.pop(STATES[name])
        values.extend(np.asarray(v, dtype=np.float64).ravel() for v in result.values())
    return np.concatenate(values)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path)
    parser.add_argument("candidates", type=Path, nargs="+")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=None)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(str(args.original), options, providers=["CPUExecutionProvider"])
    tests = signals()
    expected = {name: stream(reference, x, args.chunk, args.scale) for name, x in tests.items()}
    print(f"# {args.original.name}; cosine against the original, every output of every chunk; onnxruntime "
          f"{ort.__version__}")
    print("| candidate | " + " | ".join(tests) + " |")
    print("|---|" + "---:|" * len(tests))
    for path in args.candidates:
        session = onnxshrink.session(str(path))
        row = [cosine(expected[name], stream(session, x, args.chunk, args.scale)) for name, x in tests.items()]
        print(f"| {path.name} | " + " | ".join(f"{c:.4f}" for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
