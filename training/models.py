"""Built-in models. A model builder is a plain function:

    builder(input_shape: tuple[int, ...], num_classes: int, **args) -> nn.Module

taking one example's shape (without the batch axis). User models follow the same signature and are
named in the config by import path (`model.builder: mypkg.models:resnet`); see
examples/custom_model/.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _flat_size(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: list[int] | tuple[int, ...] = (256, 256), dropout: float = 0.0
) -> nn.Module:
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_size(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an image-like input; a flat square input (e.g. 64 digits pixels) becomes (1, 8, 8)."""
    if len(input_shape) == 3:
        return tuple(int(s) for s in input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, int(input_shape[0]), int(input_shape[1]))
    side = math.isqrt(_flat_size(input_shape))
    if side * side != _flat_size(input_shape):
        raise ValueError(f"input shape {input_shape} is not image-like; the cnn needs (C, H, W), (H, W) or a square number of features")
    return (1, side, side)


class SmallCNN(nn.Module):
    """Conv blocks (conv3x3 -> BatchNorm -> ReLU), global average pooling, a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32)):
        super().__init__()
        self.image_shape = _image_shape(input_shape)
        blocks: list[nn.Module] = []
        in_channels = self.image_shape[0]
        for out_channels in channels:
            blocks += [nn.Conv2d(in_channels, int(out_channels), 3, padding=1), nn.BatchNorm2d(int(out_channels)), nn.ReLU()]
            in_channels = int(out_channels)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.features(x).mean(dim=(2, 3)))


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32)) -> nn.Module:
    return SmallCNN(input_shape, num_classes, channels)


class TransformerClassifier(nn.Module):
    """Splits the input into tokens of `token_size` features, adds learned positions, runs a
    TransformerEncoder and classifies the mean token. Image-like inputs use one row per token."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, dim: int = 64, depth: int = 2, heads: int = 4, token_size: int | None = None
    ):
        super().__init__()
        features = _flat_size(input_shape)
        self.token_size = int(token_size or (input_shape[-1] if len(input_shape) > 1 else _image_shape(input_shape)[-1]))
        if features % self.token_size:
            raise ValueError(f"{features} input features do not split into tokens of {self.token_size}; set model.args.token_size")
        self.tokens = features // self.token_size
        self.embed = nn.Linear(self.token_size, dim)
        self.position = nn.Parameter(torch.zeros(1, self.tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.token_size)
        h = self.encoder(self.embed(x) + self.position)
        return self.head(h.mean(dim=1))


def transformer(
    input_shape: tuple[int, ...], num_classes: int, dim: int = 64, depth: int = 2, heads: int = 4, token_size: int | None = None
) -> nn.Module:
    return TransformerClassifier(input_shape, num_classes, dim, depth, heads, token_size)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The configured model; `model.args` may not contradict the data's shape or class count."""
    from cluster.config import resolve_import_path

    builder = resolve_import_path(config.model.builder)
    args = dict(config.model.args)
    args.setdefault("num_classes", num_classes)
    return builder(input_shape=tuple(input_shape), **args)


def model_spec(config, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """What an artifact's manifest needs to rebuild the module without the config."""
    args = {k: v for k, v in config.model.args.items() if k != "num_classes"}
    return {
        "builder": config.model.builder,
        "args": args,
        "input_shape": list(input_shape),
        "num_classes": int(config.model.args.get("num_classes", num_classes)),
    }
