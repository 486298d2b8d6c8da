"""L1-regularised sparse training: train the dense model with an L1 penalty before pruning.

The penalty ``strength * sum(|w|)`` over every trainable weight tensor (`compressors._targets`)
pushes unneeded weights towards zero, so the pruning that follows (``prune``, ``gradual``,
``structured``) removes weights that already carry little, and the network has learnt to do
without them (Han et al., 2015, train with L1/L2 regularisation before pruning).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from compressors._base import CompressionContext, Compressor, LossFn, cross_entropy
from compressors._params import Integer, Real
from compressors._targets import targets


def l1_loss(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    _teacher: torch.Tensor | None,
    *,
    weights: list[torch.Tensor],
    strength: float,
    base: LossFn = cross_entropy,
) -> torch.Tensor:
    """The task's loss ``base`` (cross-entropy) plus ``strength`` times the L1 norm of
    ``weights``."""
    penalty = sum(w.abs().sum() for w in weights)
    return base(outputs, targets, None) + strength * penalty


class SparseTraining(Compressor):
    """Train the dense model with an L1 penalty on its weights, before anything is removed.

    Params:
        strength: L1 coefficient (> 0); the penalty is summed over weights, so useful values are
            small (1e-5 .. 1e-3 for a 50k-weight network).
        epochs: Epochs of penalised training.
        lr: Adam learning rate of that training.
        batch_size: Mini-batch size of that training.
    """

    name = "sparse"
    stage = 0
    requires = frozenset({"fit"})
    params = {
        "strength": Real(0.0, math.inf, closed="neither", default=1e-4),
        "epochs": Integer(1, 10_000, default=5),
        "lr": Real(0.0, math.inf, closed="neither", default=1e-3),
        "batch_size": Integer(1, 1_000_000, default=64),
    }

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        weights = [t.latent for t in targets(model).values() if t.latent.requires_grad]
        ctx.fit(  # on the task's training split, the trial's device and seed
            model,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            loss_fn=partial(l1_loss, weights=weights, strength=self.strength, base=ctx.loss),
        )
        return model
