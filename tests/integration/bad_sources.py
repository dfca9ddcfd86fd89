"""Data sources that return the wrong thing, for the bad-input tests."""

import numpy as np

from training.data import ArrayDataset


def float64_features() -> ArrayDataset:
    return ArrayDataset(x=np.zeros((10, 4), dtype=np.float64), y=np.zeros(10, dtype=np.int64))


def fixed_64_features_model(input_shape, num_classes):
    """A user model that ignores input_shape and expects 64 features, as hand-written models often do."""
    import torch

    return torch.nn.Linear(64, num_classes)
