"""Gradual magnitude pruning: sparsity rises on a schedule during fine-tuning (Zhu & Gupta, 2017).

Pruning everything at once removes weights the network still leans on; raising sparsity in steps
lets fine-tuning recover between them. Before fine-tuning epoch ``e`` of ``E`` the target is
``amount * (1 - (1 - t)^3)`` with ``t = min(1, (e + 1) / (end * E))``: fast at first, while many
weights are redundant, then slower, reaching ``amount`` at a fraction ``end`` of fine-tuning; the
remaining epochs recover at the final sparsity. Each step recomputes the masks from the current
(masked) weights, so a pruned weight stays pruned.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from compressors._base import CompressionContext
from compressors._params import Real
from compressors._targets import targets
from compressors.importance import weight_scores
from compressors.prune import Mask, UnstructuredPruning, keep_masks


def cubic_schedule(amount: float, progress: float) -> float:
    """Sparsity at ``progress`` in [0, 1] of the pruning phase, reaching ``amount`` at 1."""
    progress = min(max(progress, 0.0), 1.0)
    return amount * (1.0 - (1.0 - progress) ** 3)


class GradualPruning(UnstructuredPruning):
    """Unstructured pruning whose sparsity rises during fine-tuning.

    Params (besides those of `UnstructuredPruning`, ``amount`` being the final sparsity):
        end: Fraction of the fine-tuning epochs after which the final sparsity is reached, in
            (0, 1].
    """

    name = "gradual"
    params = {**UnstructuredPruning.params, "end": Real(0.0, 1.0, closed="right", default=0.75)}

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        self._ctx = ctx
        for target in targets(model).values():
            target.register(Mask(target.weight.new_ones(())))
        return model

    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self._prune_to(model, (epoch + 1) / (self.end * epochs))

    def finalize(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        self._prune_to(model, 1.0)  # no-op if the schedule got there; all at once if 0 epochs
        return model

    def _prune_to(self, model: nn.Module, progress: float) -> None:
        if isinstance(self.amount, Mapping):
            amount = {n: cubic_schedule(a, progress) for n, a in self.amount.items()}
        else:
            amount = cubic_schedule(self.amount, progress)
        found = targets(model)
        scores = weight_scores(self.importance, found, model, self._ctx)
        masks = keep_masks(scores, amount, self.scope, param=f"{self.name}.amount")
        for name, keep in masks.items():
            mask = next(p for p in found[name].parametrizations() if isinstance(p, Mask))
            mask.mask = keep.to(mask.mask.dtype)
