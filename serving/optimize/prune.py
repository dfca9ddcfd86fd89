"""Magnitude pruning, made permanent: zeros in the weights themselves, no masks left behind.

    result = prune_model(model, sparsity=0.5, structured=False)   # in place
    result.sparsity      # measured fraction of zeros over the pruned weights (>= the target)

Unstructured: global L1 magnitude over every Linear/Conv weight (and attention in-projections),
so layers with many small weights give up more of them. Structured: per layer, the output
neurons/channels with the smallest L1 norm lose their whole row and bias; the output layer is
left whole (pruning a row there would delete a class). `torch.nn.utils.prune` computes the masks
and `prune.remove` folds them into the weights, so the exported model and state dict carry the
zeros and nothing else.

Zeros alone buy no speed from dense kernels (ORT and torch multiply them like any number): they
buy compressibility now and speed once the zero rows are sliced out or a sparse kernel runs
them. A short fine-tune after pruning recovers accuracy (`fine_tune_pruned`, in process, the
zeros kept after every step; `apply_masks` puts them back after any other fine-tune).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from cluster.errors import EngineError

logger = logging.getLogger("tandem")

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class PruneResult:
    target: float
    structured: bool
    sparsity: float
    pruned_weights: int
    masks: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "structured": self.structured,
            "sparsity": round(self.sparsity, 6),
            "pruned_weights": self.pruned_weights,
        }


def prunable_weights(model: nn.Module, structured: bool) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, parameter name) of every weight pruning may touch.

    Structured pruning skips the last layer in registration order: the output layer, whose rows
    are the classes.
    """
    found: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            found.append((f"{name}.weight" if name else "weight", module, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and not structured and module.in_proj_weight is not None:
            found.append((f"{name}.in_proj_weight", module, "in_proj_weight"))
    if structured:
        found = found[:-1]
    if not found:
        raise EngineError(f"{type(model).__name__} has no Linear or Conv weights to prune; remove export.prune from the config")
    return found


def _at_least(sparsity: float, count: int) -> int:
    """How many of `count` to prune so the fraction reaches `sparsity` (torch rounds a float amount to nearest, which can fall short)."""
    return min(count, math.ceil(sparsity * count - 1e-9))


def _prune_unstructured(weights: list[tuple[str, nn.Module, str]], sparsity: float) -> None:
    total = sum(getattr(m, p).numel() for _, m, p in weights)
    prune.global_unstructured([(m, p) for _, m, p in weights], pruning_method=prune.L1Unstructured, amount=_at_least(sparsity, total))


def _prune_structured(weights: list[tuple[str, nn.Module, str]], sparsity: float) -> None:
    for _, module, param in weights:
        rows = getattr(module, param).shape[0]
        prune.ln_structured(module, param, amount=_at_least(sparsity, rows), n=1, dim=0)


def _zero_bias_of_dead_rows(weights: list[tuple[str, nn.Module, str]]) -> None:
    """A neuron whose weight row is zero still emits its bias; zero it so the neuron is gone.

    (A Conv followed by BatchNorm still emits BN's shift for a dead channel: a constant the next
    layer absorbs like a bias.)
    """
    for _, module, param in weights:
        bias = getattr(module, "bias", None)
        if bias is None:
            continue
        weight = getattr(module, param)
        alive = weight.detach().flatten(1).abs().sum(dim=1) != 0
        with torch.no_grad():
            bias.mul_(alive.to(bias.dtype))


def current_masks(weights: list[tuple[str, nn.Module, str]], structured: bool) -> dict[str, torch.Tensor]:
    """Parameter name -> keep-mask; structured pruning also masks the biases of dead rows."""
    masks = {}
    for name, module, param in weights:
        weight = getattr(module, param).detach()
        masks[name] = weight != 0
        bias = getattr(module, "bias", None)
        if structured and bias is not None:
            masks[name.rsplit(".", 1)[0] + ".bias" if "." in name else "bias"] = weight.flatten(1).abs().sum(dim=1) != 0
    return masks


def measured_sparsity(weights: list[tuple[str, nn.Module, str]]) -> float:
    total = sum(getattr(m, p).numel() for _, m, p in weights)
    zeros = sum(int((getattr(m, p).detach() == 0).sum()) for _, m, p in weights)
    return zeros / max(total, 1)


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float, structured: bool = False) -> PruneResult:
    """Prune `model` in place to `sparsity` and make it permanent; returns the measured result."""
    if not 0.0 <= sparsity < 1.0:
        raise EngineError(f"export.prune.sparsity: {sparsity} must be at least 0 and below 1 (1 would zero every weight)")
    weights = prunable_weights(model, structured)
    if structured:
        _prune_structured(weights, sparsity)
    else:
        _prune_unstructured(weights, sparsity)
    for _, module, param in weights:
        prune.remove(module, param)  # folds weight_orig * weight_mask into a plain `weight`
    if structured:
        _zero_bias_of_dead_rows(weights)
    return PruneResult(
        target=sparsity,
        structured=structured,
        sparsity=measured_sparsity(weights),
        pruned_weights=sum(getattr(m, p).numel() for _, m, p in weights),
        masks=current_masks(weights, structured),
    )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (after a fine-tune moved them); names as in PruneResult.masks."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise KeyError(f"pruning mask '{name}' matches no parameter of {type(model).__name__}; the model changed after pruning")
        parameters[name].mul_(mask.to(parameters[name].dtype))


def fine_tune_pruned(model: nn.Module, config: Any, masks: dict[str, torch.Tensor], x_train: Any, y_train: Any) -> nn.Module:
    """export.prune.fine_tune_epochs of plain torch training in this process, the zeros kept.

    The training split export already read (its parity and calibration data), the config's
    optimizer, learning rate, micro-batch and seed; `masks` are applied after every step, so the
    pruned weights stay zero while the others recover. In-process on purpose: export runs in one
    process on one machine, and a Ray Train run would cost more start-up than the fine-tune.
    """
    from training.ds_config import build_optimizer

    x, y = torch.as_tensor(x_train).float(), torch.as_tensor(y_train).long()
    generator = torch.Generator().manual_seed(config.training.seed)
    optimizer = build_optimizer(config, model.parameters())
    batch = config.data.batch_size
    model.train()
    for epoch in range(1, config.export.prune.fine_tune_epochs + 1):
        total = 0.0
        for rows in torch.randperm(len(y), generator=generator).split(batch):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                apply_masks(model, masks)
            total += loss.item() * len(rows)
        logger.info("[tandem] pruned model fine-tune epoch %d: train loss %.4f", epoch, total / len(y))
    model.eval()
    return model
