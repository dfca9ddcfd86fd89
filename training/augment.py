"""Training-time augmentations. Each is a function `(x, generator) -> x` on a float batch tensor;
the generator is seeded per rank and epoch, so a resumed run sees the same augmented data.

A user hook (`{name: hook, fn: mypkg.aug:flip}`) has the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.config import Augment, resolve_import_path
from training.models import _image_shape

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def gaussian_noise(std: float) -> AugmentFn:
    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)

    return apply


def random_shift(pixels: int) -> AugmentFn:
    """Shift each image by up to `pixels` along H and W, filling with zeros (image-like inputs)."""

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shape = x.shape
        images = x.reshape(shape[0], *_image_shape(tuple(shape[1:])))
        out = torch.zeros_like(images)
        h, w = images.shape[-2:]
        shifts = torch.randint(-pixels, pixels + 1, (shape[0], 2), generator=generator)
        for i, (dy, dx) in enumerate(shifts.tolist()):
            src = images[i, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            out[i, :, max(0, dy) : max(0, dy) + src.shape[-2], max(0, dx) : max(0, dx) + src.shape[-1]] = src
        return out.reshape(shape)

    return apply


def build_augmentation(specs: list[Augment]) -> AugmentFn | None:
    steps: list[AugmentFn] = []
    for spec in specs:
        if spec.name == "noise":
            steps.append(gaussian_noise(spec.std))
        elif spec.name == "shift":
            steps.append(random_shift(spec.pixels))
        else:
            steps.append(resolve_import_path(spec.fn))
    if not steps:
        return None

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, generator)
        return x

    return apply
