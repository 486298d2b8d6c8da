"""Train and evaluate loops shared by the baseline, each trial's fine-tuning and the report."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from experiments._objectives import LossFn, ScoreFn, accuracy, ce_loss
from experiments._task import Split

__all__ = [
    "EpochStats",
    "LossFn",
    "NonFiniteLossError",
    "accuracy",
    "ce_loss",
    "evaluate",
    "fit",
    "predict_outputs",
    "scores",
]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or infinite."""


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training produced."""

    epoch: int
    train_loss: float
    val_acc: float | None


def fit(
    model: nn.Module,
    train: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    loss_fn: LossFn = ce_loss,
    teacher_outputs: torch.Tensor | None = None,
    val: Split | None = None,
    seed: int = 0,
    before_epoch: Callable[[int, int], None] | None = None,
    after_epoch: Callable[[EpochStats], None] | None = None,
    device: str | torch.device | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place with Adam.

    Args:
        model: The model; parametrizations on its weights (masks, quantizers) stay in force.
        train: Training split.
        epochs: Number of passes over ``train``; 0 trains nothing.
        batch_size: Mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        schedule: ``constant`` learning rate, or ``cosine``: decayed to 0 along a half cosine
            over all steps, which lets weights on a quantization grid settle at the end.
        loss_fn: Loss of a batch; receives the teacher's outputs on that batch when given.
        teacher_outputs: The teacher's outputs aligned with ``train`` (for distillation).
        val: If given, its score (`evaluate`) is measured after every epoch.
        seed: Seeds the order of the mini-batches.
        before_epoch: Called as ``before_epoch(epoch, epochs)`` before each epoch (a schedule,
            e.g. gradual pruning, changes the model here).
        after_epoch: Called with each epoch's `EpochStats` (early stopping raises here).
        device: Train on this device (e.g. ``cuda``), batch by batch from the CPU-held splits;
            the model is moved back to the CPU when training ends. None trains where it is.

    Returns:
        One `EpochStats` per epoch.

    Raises:
        NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    if epochs == 0:
        return []
    if device is not None:
        model.to(device)
    on = model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        if schedule == "cosine"
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    history = []
    n = len(train)
    try:
        for epoch in range(epochs):
            if before_epoch is not None:
                before_epoch(epoch, epochs)
            model.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                teacher = None if teacher_outputs is None else teacher_outputs[idx].to(on)
                loss = loss_fn(model(train.x[idx].to(on)), train.y[idx].to(on), teacher)
                if not math.isfinite(loss.item()):
                    raise NonFiniteLossError(f"training loss became {loss.item()} in epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.item() * len(idx)
            val_acc = evaluate(model, val) if val is not None else None
            history.append(EpochStats(epoch=epoch, train_loss=total / n, val_acc=val_acc))
            if after_epoch is not None:
                after_epoch(history[-1])
    finally:
        if device is not None:
            model.to("cpu")
    model.eval()
    return history


@torch.no_grad()
def predict_outputs(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Outputs (logits, or embeddings) of ``model`` on ``x``, in evaluation mode, on the CPU
    (computed batch by batch on the model's device)."""
    model.eval()
    device = model_device(model)
    return torch.cat(
        [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    )


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def evaluate(model: nn.Module, split: Split) -> float:
    """The split's score of ``model``: top-1 accuracy, or the score the split defines (e.g. the
    mean cosine similarity to reference embeddings)."""
    return split.score(predict_outputs(model, split.x), split.y)


def scores(
    model: nn.Module, split: Split, extra: Mapping[str, ScoreFn] | None = None
) -> dict[str, float]:
    """The split's score under key ``acc`` and each ``extra`` score, from one pass over it."""
    outputs = predict_outputs(model, split.x)
    return {
        "acc": split.score(outputs, split.y),
        **{name: fn(outputs, split.y) for name, fn in (extra or {}).items()},
    }
