"""Importance criteria: how much a weight (or a group of weights) matters.

The question of *what to score* is kept apart from *how to remove* (the pruners) and from *what
must shrink together* (torch-pruning's dependency graph), as in Torch-Pruning. Every pruner takes
an ``importance`` parameter naming one of `CRITERIA`:

- ``l1`` / ``l2``: magnitude (for single weights both rank alike);
- ``taylor``: first-order Taylor estimate of the loss change, ``|w * dL/dw|``, from gradients on
  a few training batches;
- ``random``: a control, seeded by the trial, to show that the criteria matter.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from compressors._base import CompressionContext
from compressors._device import model_device
from compressors._targets import Target

CRITERIA = ("l1", "l2", "taylor", "random")
#: Training samples whose loss gradients feed the Taylor criterion.
TAYLOR_SAMPLES = 512


def accumulate_gradients(model: nn.Module, ctx: CompressionContext) -> None:
    """Fill ``.grad`` of the model's parameters with the gradient of the task's loss
    (``ctx.loss``: cross-entropy for a classifier) on training data. Frozen parameters (a
    pretrained embedding table) get gradients too: they are scored like the others."""
    model.zero_grad(set_to_none=True)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        device = model_device(model)  # the batches go where the model is
        batches = ctx.train.calibration(
            samples=TAYLOR_SAMPLES, batch_size=TAYLOR_SAMPLES, device=device
        )
        total = sum(b.rows for b in batches)
        for b in batches:  # the mean loss over the samples
            loss = ctx.loss(ctx.train.forward(model, b.inputs), b.targets, None)
            (loss * (b.rows / total) if len(batches) > 1 else loss).backward()
    finally:
        for p in frozen:
            p.requires_grad_(False)


def weight_scores(
    criterion: str, targets: dict[str, Target], model: nn.Module, ctx: CompressionContext
) -> dict[str, torch.Tensor]:
    """One score per weight of each target tensor (higher = more important)."""
    if criterion == "taylor":
        accumulate_gradients(model, ctx)
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {}
    for name, target in targets.items():
        w = target.weight.detach()
        if criterion == "l1":
            scores[name] = w.abs()
        elif criterion == "l2":
            scores[name] = w.pow(2)
        elif criterion == "taylor":
            grad = target.latent.grad
            scores[name] = (w * grad).abs()
        else:
            # drawn on the CPU (the generator's): a seed draws the same on any device
            scores[name] = torch.rand(w.shape, generator=generator, device="cpu").to(w.device)
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
    return scores


def group_importance(criterion: str) -> tp.importance.Importance:
    """The torch-pruning importance that scores channel groups by ``criterion``."""
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.RandomImportance()
