"""A user model and a user augmentation, plugged into Tandem by import path.

A model builder is any function `(input_shape, num_classes, **args) -> nn.Module`; an augmentation
hook is any function `(x: Tensor, generator: torch.Generator) -> Tensor`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """Linear stem, `blocks` residual blocks (LayerNorm -> Linear -> GELU -> Linear), linear head."""

    def __init__(self, features: int, num_classes: int, width: int, blocks: int):
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def residual_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 64, blocks: int = 2) -> nn.Module:
    return ResidualMLP(math.prod(input_shape), num_classes, width, blocks)


def random_contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale each example's pixels by a random factor in [0.8, 1.2]."""
    scale = 0.8 + 0.4 * torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator)
    return x * scale
