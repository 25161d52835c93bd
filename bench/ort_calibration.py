"""onnxruntime's calibration reader over an .npz, one sample per batch: how the benches feed `quantize_static`."""

from __future__ import annotations

import numpy as np


def npz_reader(path):
    """A CalibrationDataReader yielding each sample of the .npz (every key, axis 0 cut to one row) in turn."""
    from onnxruntime.quantization import CalibrationDataReader

    arrays = dict(np.load(path))
    count = len(next(iter(arrays.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{k: v[i:i + 1] for k, v in arrays.items()} for i in range(count)])

        def get_next(self):
            return next(self.rows, None)

    return Reader()
