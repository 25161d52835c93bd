"""nncf.quantize (ModelType.TRANSFORMER) of an ONNX model; runs inside the cached NNCF venv, not the project's.

    nncf-venv/bin/python bench/transformer_nncf.py SRC.onnx DST.onnx CALIBRATION.npz

NNCF is a comparison point for bench/transformer_bench.py, never a dependency of onnxshrink: the bench installs it
(with the project's onnx and onnxruntime versions) into its own venv under the cache. Defaults otherwise: INT8 QDQ,
per-channel weights, NNCF's transformer patterns and SmoothQuant where its ONNX backend applies them.
"""

from __future__ import annotations

import logging
import sys

import nncf
import numpy as np
import onnx


def main() -> None:
    src, dst, calibration = sys.argv[1:4]
    logging.getLogger("nncf").setLevel(logging.WARNING)
    arrays = dict(np.load(calibration))
    count = len(next(iter(arrays.values())))
    items = [{key: value[i:i + 1] for key, value in arrays.items()} for i in range(count)]
    quantized = nncf.quantize(onnx.load(src), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=count)
    onnx.save(quantized, dst)


if __name__ == "__main__":
    main()
