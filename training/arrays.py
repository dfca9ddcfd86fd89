"""Arrays of examples and the train/validation split, shared by in-memory and file data sources.

`ArrayDataset` is what a 'module:function' data source returns (documented as
training.data.ArrayDataset, which re-exports it); `validation_rows` decides, row by row, which
rows validate, for arrays (`split`) and for files streamed by Ray Data alike.

May import: numpy only.
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


def validation_rows(row_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for the rows held out for validation: a seeded coin flip per row id.

    The flip is a hash of (seed, row id) (splitmix64), not a draw from a generator, so it needs
    neither the row count nor the order: files streamed in chunks by Ray Data split exactly as the
    same rows in memory do (training/file_source.py).
    """
    z = row_ids.astype(np.uint64) + np.uint64((seed + 1) * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def split(dataset: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded, stratification-free train/validation split (`validation_rows` over row numbers)."""
    held_out = validation_rows(np.arange(len(dataset.y)), seed, val_fraction)
    if not held_out.any():
        held_out[0] = True  # a tiny data set still validates on one row
    return ArrayDataset(dataset.x[~held_out], dataset.y[~held_out]), ArrayDataset(dataset.x[held_out], dataset.y[held_out])
