"""training/data.py: the packaged digits are scikit-learn's digits, value for value."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from training.data import digits


def test_packaged_digits_equal_scikit_learns():
    bunch = load_digits()
    packaged = digits()
    np.testing.assert_array_equal(packaged.x, (bunch.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(packaged.y, bunch.target.astype(np.int64))
    assert packaged.x.dtype == np.float32 and packaged.y.dtype == np.int64
    assert digits(image=True).x.shape == (1797, 1, 8, 8)
