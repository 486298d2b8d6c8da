"""Unstructured pruning: zero the least important weights, keep them zero while fine-tuning."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressors._base import CompressionContext, Compressor
from compressors._layers import weight_layers
from compressors._params import InvalidParameterError, Options, Real
from compressors.importance import CRITERIA, weight_scores


class Mask(nn.Module):
    """Parametrization ``w -> w * mask``: pruned weights stay zero and receive no gradient."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def smallest_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean keep-mask that drops exactly ``round(amount * numel)`` lowest-scoring entries."""
    flat = scores.flatten()
    k = round(amount * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view_as(scores)


class UnstructuredPruning(Compressor):
    """Unstructured pruning of every Linear / Conv weight.

    Params:
        amount: Fraction of weights to zero. With ``scope='global'`` the least important weights
            across all layers go; with ``scope='layer'`` each layer loses that fraction, or the
            fraction a mapping ``{layer name: amount}`` gives it (layers not named stay dense).
        scope: ``global`` or ``layer``.
        importance: How weights are scored, one of `compressors.importance.CRITERIA`.
    """

    name = "prune"
    kind = "sparsity"
    stage = 2
    params = {
        "amount": Real(0.0, 1.0, closed="left", default=0.5, per_layer=True),
        "scope": Options(("global", "layer"), default="global"),
        "importance": Options(CRITERIA, default="l1"),
    }

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"train"}) if self.importance == "taylor" else frozenset()

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        layers = weight_layers(model)
        scores = weight_scores(self.importance, layers, model, ctx)
        masks = keep_masks(scores, self.amount, self.scope, param=f"{self.name}.amount")
        for name, keep in masks.items():
            parametrize.register_parametrization(layers[name], "weight", Mask(keep))
        return model


def keep_masks(
    scores: Mapping[str, torch.Tensor],
    amount: float | Mapping[str, float],
    scope: str,
    *,
    param: str = "amount",
) -> dict[str, torch.Tensor]:
    """Keep-masks that drop the lowest-scoring ``amount`` of the weights.

    Args:
        scores: One score per weight, by layer name.
        amount: Fraction to drop, or ``{layer name: fraction}`` (layers not named stay dense).
        scope: ``global`` (one threshold over all layers) or ``layer`` (each layer alike).
        param: The parameter ``amount`` came from, for the error message.
    """
    if isinstance(amount, Mapping):
        unknown = sorted(set(amount) - set(scores))
        if unknown:
            raise InvalidParameterError(
                f"The '{param}' parameter names unknown layers {unknown}. "
                f"Prunable layers: {', '.join(scores)}."
            )
        return {n: smallest_mask(scores[n], a) for n, a in amount.items()}
    if scope == "layer":
        return {n: smallest_mask(s, amount) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = smallest_mask(flat, amount).split([s.numel() for s in scores.values()])
    return {n: k.view_as(s) for (n, s), k in zip(scores.items(), keep, strict=True)}
