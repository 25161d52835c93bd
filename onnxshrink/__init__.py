"""onnxshrink: make ONNX models smaller and faster, and prove with onnxruntime how far they drifted."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxshrink.api import cluster, factorize, flush_denormals, inspect, load, pack, prune, quantize, save, sensitivity, session, unpack, validate  # noqa: E402
from onnxshrink.compress_search import compress  # noqa: E402

__all__ = ["__version__", "cluster", "compress", "factorize", "flush_denormals", "inspect", "load", "pack", "prune", "quantize", "save", "sensitivity", "session", "unpack", "validate"]
