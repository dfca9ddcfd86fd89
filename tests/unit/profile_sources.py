"""Data sources and models that cannot run together, for the profile's failure tests."""

from __future__ import annotations

from training.data import ArrayDataset, digits


def digits_missing_a_feature() -> ArrayDataset:
    """The digits with the last pixel dropped: 63 features where a digits model takes 64."""
    full = digits()
    return ArrayDataset(x=full.x[:, :63].copy(), y=full.y)


def fixed_64_features_mlp(input_shape, num_classes):
    """A user model that ignores input_shape and expects 64 features, as hand-written models often do."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, num_classes))
