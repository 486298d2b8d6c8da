"""Unstructured pruning: zero the least important weights, keep them zero while fine-tuning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compressors._base import CompressionContext, Compressor
from compressors._params import InvalidParameterError, Options, Real
from compressors._targets import targets
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
    """Unstructured pruning of every weight tensor (`compressors._targets`: Linear, Conv,
    attention projections, recurrent weights, embedding tables).

    Params:
        amount: Fraction of weights to zero. With ``scope='global'`` the least important weights
            across all tensors go; with ``scope='layer'`` each tensor loses that fraction, or the
            fraction a mapping ``{tensor or layer name: amount}`` gives it (tensors not named
            stay dense; a layer's name stands for its ``weight``).
        scope: ``global`` or ``layer``.
        importance: How weights are scored, one of `compressors.importance.CRITERIA`.
    """

    name = "prune"
    kind = "sparsity"
    stage = 2
    shrinks = True
    acts_on = "zeroes single weights of Linear, Conv, attention, recurrent and embedding tensors"
    params = {
        "amount": Real(0.0, 1.0, closed="left", default=0.5, per_layer=True),
        "scope": Options(("global", "layer"), default="global"),
        "importance": Options(CRITERIA, default="l1"),
    }

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"train"}) if self.importance == "taylor" else frozenset()

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        found = targets(model)
        if isinstance(self.amount, Mapping):
            return [n for n in (_tensor_name(k, found) for k in self.amount) if n in found]
        return list(found)

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        found = targets(model)
        scores = weight_scores(self.importance, found, model, ctx)
        masks = keep_masks(scores, self.amount, self.scope, param=f"{self.name}.amount")
        for name, keep in masks.items():
            found[name].register(Mask(keep))
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
        named = {_tensor_name(n, scores): a for n, a in amount.items()}
        unknown = sorted(n for n in named if n not in scores)
        if unknown:
            raise InvalidParameterError(
                f"The '{param}' parameter names unknown layers {unknown}. "
                f"Prunable tensors: {', '.join(scores)}."
            )
        return {n: smallest_mask(scores[n], a) for n, a in named.items()}
    if scope == "layer":
        return {n: smallest_mask(s, amount) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = smallest_mask(flat, amount).split([s.numel() for s in scores.values()])
    return {n: k.view_as(s) for (n, s), k in zip(scores.items(), keep, strict=True)}


def _tensor_name(name: str, scores: Mapping[str, torch.Tensor]) -> str:
    """``name`` if it names a tensor, else the ``weight`` of the layer it names."""
    return name if name in scores or f"{name}.weight" not in scores else f"{name}.weight"
