"""Built-in data sources. A data source is a plain function returning an `ArrayDataset`:

    source(**args) -> ArrayDataset

Both built-ins need no download: scikit-learn ships the digits inside its package, and
`synthetic` makes a seeded, learnable classification problem of any size for scale tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """Features `x` (float32, N x ...) and integer labels `y` (N,)."""

    x: np.ndarray
    y: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


def digits(image: bool = False) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1797 examples, 10 classes), pixels scaled to [0, 1].

    image: true gives (1, 8, 8) examples instead of 64 features.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return ArrayDataset(x=x, y=bunch.target.astype(np.int64))


def synthetic(samples: int = 4096, features: int = 64, classes: int = 10, seed: int = 0, noise: float = 0.5) -> ArrayDataset:
    """Gaussian clusters around random class centers: learnable, seeded, any size."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=samples)
    x = centers[y] + noise * rng.normal(size=(samples, features)).astype(np.float32)
    return ArrayDataset(x=x.astype(np.float32), y=y.astype(np.int64))


def split(dataset: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded, stratification-free train/validation split."""
    order = np.random.default_rng(seed).permutation(len(dataset.y))
    n_val = max(1, int(round(len(order) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return ArrayDataset(dataset.x[train], dataset.y[train]), ArrayDataset(dataset.x[val], dataset.y[val])
