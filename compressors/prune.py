"""Unstructured pruning: zero the least important weights, keep them zero while fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from compressors._base import CompressionContext, Compressor
from compressors._codecs import Masked
from compressors._params import InvalidParameterError, Options, Real
from compressors._targets import targets
from compressors.importance import CRITERIA, weight_scores


class Mask(nn.Module):
    """Parametrization ``w -> w * mask``: pruned weights stay zero and receive no gradient. The
    mask is boolean (a quarter of float32's bytes: a BERT-base's masks took 440 MB as floats),
    applied by `torch.where` (``w * mask`` made a float copy of the mask first: two temporaries
    of the weight's size, where registering the masks of a 30 M-parameter MLP peaked at 1x its
    bytes above the scores; the pruned weights are +0.0 where a product left -0.0)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        bits = _BITS.get(weight.dtype)
        if (
            bits is not None
            and not (weight.requires_grad and torch.is_grad_enabled())
            and weight.device.type == self.mask.device.type == "cpu"
            and self.mask.shape in (weight.shape, ())
        ):
            # No gradient to pass: the weight's bits times the mask, as integers, by numpy
            # (the same values, +0.0 where pruned; `torch.where` took 3 times as long, a third
            # of packing a pruned 10 M MLP went to evaluating its masks; torch's product made
            # an integer copy of the mask first, numpy's casts it a buffer at a time).
            out = torch.empty_like(weight)
            np.multiply(
                weight.detach().view(bits).numpy(), self.mask.numpy(), out=out.view(bits).numpy()
            )
            return out
        return torch.where(self.mask, weight, 0.0)

    def packed_from(self, weight: torch.Tensor) -> Masked | None:
        """What a packed file stores of ``self(weight)``, from ``weight``: the weight and the
        mask, its nonzero values read through the mask without the product being made
        (`compressors._codecs.Masked`). None where ``weight`` is not a float32 tensor of the
        mask's shape on the CPU: then the caller evaluates the product."""
        if (
            weight.dtype != torch.float32
            or weight.shape != self.mask.shape
            or weight.device.type != "cpu"
            or self.mask.device.type != "cpu"
        ):
            return None
        weight = weight.detach().contiguous()
        return Masked(weight, self.mask, partial(self._product, weight))

    def _product(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self(weight)


#: The integer type of each floating type's bits (`Mask.forward` without a gradient).
_BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


#: A function of a tensor (or a chunk of it) giving its scores: `torch.abs` for magnitudes.
Key = Callable[[torch.Tensor], torch.Tensor]


def smallest_mask(scores: torch.Tensor, amount: float, *, key: Key | None = None) -> torch.Tensor:
    """Boolean keep-mask that drops exactly ``round(amount * numel)`` lowest-scoring entries
    (of equal scores, the first in order: what a stable sort drops); ``key``: see
    `smallest_masks`."""
    return smallest_masks([scores], amount, key=key)[0]


def smallest_masks(
    parts: list[torch.Tensor], amount: float, *, key: Key | None = None
) -> list[torch.Tensor]:
    """Boolean keep-masks of ``parts`` (read as one tensor, in order) that drop exactly
    ``round(amount * total)`` lowest-scoring entries, of equal scores the first in order (what a
    stable sort of them all drops). Found from the k-th smallest score (`kth_smallest`: two
    counting passes over the scores, no copy of them) rather than by sorting: a sort's int64
    indices took twice the scores' bytes again (global pruning of BERT-base: 7.2x the model's
    bytes at its peak), and a partitioned float copy of them all once again. With ``key``, the
    scores are ``key(part)``, computed a chunk (and for the masks a tensor) at a time: the
    magnitudes of the weights (``key=torch.abs``) without a copy of them all."""
    total = sum(p.numel() for p in parts)
    k = round(amount * total)
    if k == 0:
        return [torch.ones_like(p, dtype=torch.bool) for p in parts]

    def scored(p: torch.Tensor) -> torch.Tensor:
        return p.detach().flatten() if key is None else key(p.detach().flatten())

    found = kth_smallest(parts, k, key=key)
    if found is None:  # (on its device, as a sort: a sort ranks NaN last, a count does not)
        flat = torch.cat([scored(p) for p in parts])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False
        return [
            m.view(p.shape).to(p.device)
            for m, p in zip(keep.split([q.numel() for q in parts]), parts, strict=True)
        ]
    threshold, below = found
    remaining = k - below  # ties still to drop
    masks = []
    for p in parts:
        values = scored(p)
        keep = values > threshold
        tied = torch.nonzero(values == threshold).flatten()  # (few, as a rule)
        del values
        drop = min(remaining, len(tied))
        keep[tied[drop:]] = True
        remaining -= drop
        masks.append(keep.view(p.shape))
    return masks


#: Values `kth_smallest` reads at a time (4 MiB of float32).
_SELECT_CHUNK = 1 << 20
_HALF = 1 << 16  # (bins of each of the two counting passes: 16 bits of a float32's key each)


def kth_smallest(
    parts: list[torch.Tensor], k: int, *, key: Key | None = None
) -> tuple[float, int] | None:
    """``(value, below)``: the ``k``-th smallest value (1-based) of ``parts`` read as one
    tensor, and how many values are smaller, found by a radix select on float32 keys (the
    float's bits, ordered as the floats are): a count of the values by their keys' upper 16
    bits finds the bin holding the ``k``-th, a count of that bin's values by their lower 16
    bits the value itself. Exact for float32, float16 and bfloat16 scores on the CPU; each pass
    reads the scores a chunk at a time (temporaries of `_SELECT_CHUNK` values, no copy of
    all; ``key``: the scores are ``key`` of each chunk). None where it does not apply (another
    dtype or device, or a NaN among the scores:
    the caller sorts)."""
    if any(
        p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        for p in parts
    ):
        return None

    def keys():  # (int32, ordered as the floats: a negative float's other 31 bits flipped)
        for p in parts:
            flat = p.detach().flatten()
            for start in range(0, flat.numel(), _SELECT_CHUNK):
                chunk = flat[start : start + _SELECT_CHUNK].float()
                if key is not None:
                    chunk = key(chunk)
                if torch.isnan(chunk).any():
                    raise _NaN
                bits = chunk.view(torch.int32)
                yield torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    high = torch.zeros(_HALF, dtype=torch.int64, device="cpu")
    try:
        for bits in keys():
            high += torch.bincount((bits >> 16) + _HALF // 2, minlength=_HALF)
    except _NaN:
        return None
    counts = torch.cumsum(high, 0)
    upper = int(torch.searchsorted(counts, k))  # (the bin whose count reaches k)
    before = int(counts[upper - 1]) if upper else 0
    low = torch.zeros(_HALF, dtype=torch.int64, device="cpu")
    for bits in keys():
        inside = bits[(bits >> 16) == upper - _HALF // 2]
        low += torch.bincount(inside & 0xFFFF, minlength=_HALF)
    counts = torch.cumsum(low, 0)
    lower = int(torch.searchsorted(counts, k - before))
    found = ((upper - _HALF // 2) << 16) | lower
    bits = found ^ 0x7FFFFFFF if found < 0 else found
    below = before + (int(counts[lower - 1]) if lower else 0)
    return float(torch.tensor(bits, dtype=torch.int32, device="cpu").view(torch.float32)), below


class _NaN(Exception):
    """A NaN among the scores (`kth_smallest`)."""


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
        param = f"{self.name}.amount"
        if self.importance == "l1":  # |w| a chunk at a time (no copy of every weight's score)
            weights = {name: t.weight.detach() for name, t in found.items()}
            masks = keep_masks(weights, self.amount, self.scope, param=param, key=torch.abs)
        else:
            scores = weight_scores(self.importance, found, model, ctx)
            masks = keep_masks(scores, self.amount, self.scope, param=param)
        for name, keep in masks.items():  # (a mask of the weight's shape: no check needed)
            found[name].register(Mask(keep), unsafe=True)
        return model


def keep_masks(
    scores: Mapping[str, torch.Tensor],
    amount: float | Mapping[str, float],
    scope: str,
    *,
    param: str = "amount",
    key: Key | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks that drop the lowest-scoring ``amount`` of the weights (scored ``key(s)``
    of each ``s`` in ``scores`` where ``key`` is given: `smallest_masks`).

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
        return {n: smallest_mask(scores[n], a, key=key) for n, a in named.items()}
    if scope == "layer":
        return {n: smallest_mask(s, amount, key=key) for n, s in scores.items()}
    parts = list(scores.values())
    return dict(zip(scores, smallest_masks(parts, amount, key=key), strict=True))


def _tensor_name(name: str, scores: Mapping[str, torch.Tensor]) -> str:
    """``name`` if it names a tensor, else the ``weight`` of the layer it names."""
    return name if name in scores or f"{name}.weight" not in scores else f"{name}.weight"
