"""compress's plan measures drift as validate does: padding positions of a token output count nowhere."""

import numpy as np

from onnxshrink.compress_plan import _drift


def _states(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 5, 4)).astype(np.float32)


def test_padding_positions_do_not_count():
    a = _states()
    mask = np.ones((3, 5), dtype=bool)
    mask[:, 3:] = False  # the last two positions are padding
    b = a.copy()
    b[:, 3:] = -b[:, 3:] * 7  # only padding moves
    assert _drift(a, b) > 0.1
    assert _drift(a, b, mask) == 0.0


def test_real_positions_still_count_and_match_an_unpadded_run():
    a = _states(1)
    b = a + np.random.default_rng(2).standard_normal(a.shape).astype(np.float32) * 0.3
    mask = np.ones((3, 5), dtype=bool)
    mask[:, 3:] = False
    masked = _drift(a, b, mask)
    assert masked > 0
    assert np.isclose(masked, _drift(a[:, :3], b[:, :3]))  # as if the padding had never been there


def test_a_sample_of_padding_only_is_left_out():
    a = _states(3)
    b = a.copy()
    b[1] = -b[1]
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    assert _drift(a, b, mask) == 0.0
    assert _drift(a, b, np.zeros((3, 5), dtype=bool)) == 0.0
