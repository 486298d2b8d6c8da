"""Train and evaluate loops shared by the baseline, each trial's fine-tuning and the report."""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from experiments._data import (
    Batch,
    Data,
    WorkloadError,
    as_data,
    cat_rows,
    join_rows,
    leaves,
    model_device,
    to_device,
)
from experiments._objectives import CLASSIFIERS, LossFn, ScoreFn, accuracy, ce_loss, decided

__all__ = [
    "EpochStats",
    "LossFn",
    "NonFiniteLossError",
    "accuracy",
    "ce_loss",
    "evaluate",
    "fit",
    "model_device",
    "output_batches",
    "outputs_and_targets",
    "predict_outputs",
    "scores",
]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or infinite."""


class TrainStep(Protocol):
    """A user's training step: ``train_step(model, batch, loss, optimizer) -> loss``.

    ``batch`` is the `experiments.Batch` (inputs, targets, rows, raw); ``loss()`` computes the
    loss squeeze trains with on it (call it inside ``torch.autocast`` for mixed precision);
    the step backpropagates, steps ``optimizer`` (clipping gradients first, if it wants) and
    returns the loss (a tensor or a float) for the NaN check and the epoch's mean.
    """

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        loss: Callable[[], torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> torch.Tensor | float: ...


def seed_everything(seed: int) -> None:
    """Seed torch (its CUDA generators too), numpy's global generator and Python's `random`, as
    Lightning's ``seed_everything`` and Hugging Face's ``set_seed`` do: what a model or a
    dataset draws in training from the other two (a wav2vec 2.0 masks time steps with
    ``np.random``; many augmentations use `random`) is then the same in a rerun."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _nonfinite(value: float, epoch: int, step: int, batch: Batch) -> str:
    """What a `NonFiniteLossError` says: where, and whether the batch's data hold NaN or inf
    (a missing value in the user's data) or not (a learning rate too high, a loss that
    overflows)."""
    bad = sum(
        int((~torch.isfinite(leaf)).sum())
        for part in (batch.inputs, batch.targets)
        for leaf in leaves(part)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    )
    where = f"training loss became {value} in epoch {epoch}, batch {step}"
    if bad:
        return f"{where}: the batch's data hold {bad} NaN or infinite values; clean the data"
    return f"{where}, its data finite: lower the learning rate (train.lr), or check the loss"


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training produced."""

    epoch: int
    train_loss: float
    val_acc: float | None


def fit(
    model: nn.Module,
    train: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    loss_fn: LossFn = ce_loss,
    teacher_outputs: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    val: Any = None,
    seed: int = 0,
    before_epoch: Callable[[int, int], None] | None = None,
    after_epoch: Callable[[EpochStats], bool | None] | None = None,
    device: str | torch.device | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    train_step: TrainStep | None = None,
    start_epoch: int = 0,
    stop_epoch: int | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place with Adam, batch by batch from the task's training data.

    Args:
        model: The model; parametrizations on its weights (masks, quantizers) stay in force.
        train: Training data: a task's `Data`, or a `Split` (see `experiments._data`).
        epochs: Number of passes over ``train``; 0 trains nothing.
        batch_size: Mini-batch size (a user's own DataLoader keeps its own).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        schedule: ``constant`` learning rate, or ``cosine``: decayed to 0 along a half cosine
            over all steps, which lets weights on a quantization grid settle at the end.
        loss_fn: Loss of a batch, ``loss_fn(outputs, targets, teacher)``; receives the
            teacher's outputs on that very batch when a teacher is given.
        teacher_outputs: The teacher's outputs cached for an in-memory ``train`` (looked up by
            the batch's rows).
        teacher: The teacher model, run on each batch (data read batch by batch, perhaps
            augmented at random, has no cached outputs); used where ``teacher_outputs`` cannot be.
        val: If given, its score (`evaluate`) is measured after every epoch.
        seed: Seeds the order of the mini-batches.
        before_epoch: Called as ``before_epoch(epoch, epochs)`` before each epoch (a schedule,
            e.g. gradual pruning, changes the model here).
        after_epoch: Called with each epoch's `EpochStats` (early stopping raises here); when
            it returns True, training stops after that epoch (a plateau stop).
        device: Train on this device (e.g. ``cuda``), batch by batch from the CPU-held data;
            the model is moved back to the CPU when training ends. None trains where it is.
        optimizer: ``optimizer(params, lr=..., weight_decay=...)`` (``torch.optim.AdamW``,
            say); None: Adam.
        train_step: The user's training step (`TrainStep`): gradient clipping, mixed
            precision, several optimizer steps...; it gets squeeze's loss of the batch as a
            function (the task's loss, or distillation / L1 as the recipe has it), so the
            compressors' hooks still apply. None: backward and one optimizer step.
        start_epoch: Begin at this epoch of the ``epochs``-long schedule (the learning rate,
            ``before_epoch`` and the epochs' seeds as they are there): a continuation of a
            fine-tune stopped at ``stop_epoch`` (the optimizer's state starts afresh).
        stop_epoch: Stop before this epoch (None: ``epochs``): the first part of the schedule.

    Returns:
        One `EpochStats` per epoch.

    Raises:
        NonFiniteLossError: If the loss becomes NaN or infinite.
    """
    stop_epoch = epochs if stop_epoch is None else stop_epoch
    if not 0 <= start_epoch <= stop_epoch <= epochs:
        raise ValueError(
            "0 <= start_epoch <= stop_epoch <= epochs must hold, but got "
            f"(start_epoch={start_epoch}, stop_epoch={stop_epoch}, epochs={epochs})"
        )
    if start_epoch == stop_epoch:
        return []
    data = as_data(train)
    if device is not None:
        model.to(device)
    on = model_device(model)
    live_teacher = None
    if teacher is not None and (teacher_outputs is None or not data.deterministic):
        live_teacher = teacher if model_device(teacher) == on else copy.deepcopy(teacher).to(on)
        live_teacher.eval()
    optimizer = (optimizer or torch.optim.Adam)(
        model.parameters(), lr=lr, weight_decay=weight_decay
    )
    per_epoch = _steps_per_epoch(data, batch_size)
    scheduler = None
    if schedule == "cosine":  # over all steps; over epochs where the steps are not known
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * per_epoch if per_epoch else epochs
        )
        with warnings.catch_warnings():  # (stepped before the optimizer: the skipped epochs)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch * (per_epoch or 1)):
                scheduler.step()
    generator = torch.Generator().manual_seed(seed)
    history = []
    try:
        for epoch in range(start_epoch, stop_epoch):
            if before_epoch is not None:
                before_epoch(epoch, epochs)
            model.train()
            total, n = 0.0, 0
            # a factory is given a seed of its own per epoch
            for step, batch in enumerate(
                data.batches(
                    batch_size, shuffle=True, seed=seed + epoch, generator=generator, device=on
                )
            ):
                if live_teacher is not None:
                    with torch.no_grad():
                        soft = data.forward(live_teacher, batch.inputs)
                elif teacher_outputs is not None and batch.index is not None:
                    soft = teacher_outputs[batch.index].to(on)
                else:
                    soft = None

                def batch_loss(batch=batch, soft=soft) -> torch.Tensor:
                    return loss_fn(data.forward(model, batch.inputs), batch.targets, soft)

                if train_step is not None:
                    loss = train_step(model, batch, batch_loss, optimizer)
                    loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(loss)
                    if not math.isfinite(float(loss)):
                        raise NonFiniteLossError(_nonfinite(float(loss), epoch, step, batch))
                else:
                    loss = batch_loss()
                    if not math.isfinite(loss.item()):
                        raise NonFiniteLossError(_nonfinite(loss.item(), epoch, step, batch))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                if scheduler is not None and per_epoch:
                    scheduler.step()
                total += loss.item() * batch.rows
                n += batch.rows
            if scheduler is not None and not per_epoch:
                scheduler.step()
            val_acc = evaluate(model, val) if val is not None else None
            history.append(EpochStats(epoch=epoch, train_loss=total / max(n, 1), val_acc=val_acc))
            if after_epoch is not None and after_epoch(history[-1]) is True:
                break
    finally:
        if device is not None:
            model.to("cpu")
    model.eval()
    return history


def _steps_per_epoch(data: Data, batch_size: int) -> int | None:
    """Optimizer steps in one epoch, where known without reading the data."""
    if isinstance(data.source, torch.utils.data.DataLoader):
        try:
            return len(data.source)
        except TypeError:
            return None
    return math.ceil(len(data) / batch_size) if data.sized() else None


@torch.no_grad()
def predict_outputs(model: nn.Module, data: Any, *, batch_size: int | None = None) -> torch.Tensor:
    """Scored outputs (logits, embeddings or values) of ``model`` on ``data`` (a task's `Data`,
    a `Split`, or a tensor of inputs), in evaluation mode, on the CPU (computed batch by batch
    on the model's device)."""
    model.eval()
    if isinstance(data, torch.Tensor):
        batch_size = batch_size or 1024
        device = model_device(model)
        return torch.cat(
            [
                model(data[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(data), batch_size)
            ]
        )
    data = as_data(data)
    batch_size = batch_size or data.eval_batch_size
    outputs = [data.forward(model, b.inputs).cpu() for b in data.batches(batch_size)]
    if not outputs:
        raise WorkloadError("the split has no samples")
    return join_rows(outputs)


@torch.no_grad()
def agreement_reference(model: nn.Module, data: Any, outputs: str) -> torch.Tensor:
    """What a model's agreement with ``model`` on ``data`` is measured against: its decisions
    for ``logits`` and ``multilabel`` (`experiments.decided`: top-1 classes, int32, one after
    another, at every position of per-position logits whose target is not `IGNORE_INDEX`; each
    label's yes/no; computed batch by batch, the logits never held whole), its embeddings for
    ``embeddings``."""
    if outputs not in CLASSIFIERS:
        return predict_outputs(model, data)
    data = as_data(data)
    passes = _pass(model, data, data.eval_batch_size)
    return torch.cat([decided(out, target, outputs) for out, target in passes])


def evaluate(model: nn.Module, split: Any, *, batch_size: int | None = None) -> float:
    """The split's score of ``model``: its metric over the whole split (top-1 accuracy by
    default; a ``torchmetrics.Metric`` is accumulated batch by batch, a plain function gets the
    whole split's outputs)."""
    return scores(model, split, batch_size=batch_size)["acc"]


@torch.no_grad()
def scores(
    model: nn.Module,
    split: Any,
    extra: Mapping[str, ScoreFn] | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The split's score under key ``acc`` and each ``extra`` score, from one pass over it.

    A ``torchmetrics.Metric`` (anything with ``update`` / ``compute`` / ``reset`` and
    ``clone``), the score or an extra one, is updated batch by batch on a fresh copy; plain
    functions get the outputs and targets of the whole split (never a mean of per-batch
    scores), which are held only when one needs them.
    """
    data = as_data(split)
    every = {"acc": data.score, **(extra or {})}
    streamed = {name: fresh(fn) for name, fn in every.items() if is_streaming_metric(fn)}
    whole = {name: fn for name, fn in every.items() if name not in streamed}
    outputs, targets = [], []
    for out, target in _pass(model, data, batch_size or data.eval_batch_size):
        for metric in streamed.values():
            metric.update(out, target)
        if whole:
            outputs.append(out)
            targets.append(target)
    result = {name: _float(metric.compute()) for name, metric in streamed.items()}
    if whole:
        everything, truth = _joined(outputs, targets)
        result.update({name: _float(fn(everything, truth)) for name, fn in whole.items()})
    return {name: result[name] for name in every}


def fresh(metric: Any) -> Any:
    """A reset copy of a streaming metric (the task's own is never updated)."""
    metric = metric.clone()
    metric.reset()
    return metric


@torch.no_grad()
def output_batches(
    model: nn.Module, split: Any, *, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(outputs, targets)`` of each batch of ``split``, on the CPU, in order: for analyses
    that never hold the whole split's outputs (a language model's logits)."""
    data = as_data(split)
    yield from _pass(model, data, batch_size or data.eval_batch_size)


@torch.no_grad()
def paired_output_batches(
    reference: nn.Module, model: nn.Module, split: Any, *, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """``(reference's outputs, model's outputs, targets)`` of each batch of ``split``, on the
    CPU, in order, both models run on the very same batch of one pass (a DataLoader that
    keeps its workers serves one pass at a time; augmented data is the same for both)."""
    data = as_data(split)
    reference.eval()
    model.eval()
    for batch in data.batches(batch_size or data.eval_batch_size):
        yield (
            data.forward(reference, batch.inputs).detach().cpu(),
            data.forward(model, batch.inputs).detach().cpu(),
            to_device(batch.targets, "cpu"),
        )


@torch.no_grad()
def outputs_and_targets(
    model: nn.Module, split: Any, *, batch_size: int | None = None
) -> tuple[torch.Tensor, Any]:
    """The scored outputs of ``model`` on the whole split and the split's targets (None where
    its batches carry none), both on the CPU, from one pass."""
    data = as_data(split)
    pairs = list(_pass(model, data, batch_size or data.eval_batch_size))
    return _joined([o for o, _ in pairs], [t for _, t in pairs])


def _pass(model: nn.Module, data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(outputs, targets)`` of each batch, on the CPU, the model in evaluation mode."""
    model.eval()
    for batch in data.batches(batch_size):
        yield data.forward(model, batch.inputs).detach().cpu(), to_device(batch.targets, "cpu")


def _joined(outputs: list[torch.Tensor], targets: list[Any]) -> tuple[torch.Tensor, Any]:
    if not outputs:
        raise WorkloadError("the split has no samples")
    return join_rows(outputs), None if targets[0] is None else cat_rows(targets)


def is_streaming_metric(metric: Any) -> bool:
    """Whether ``metric`` accumulates over batches (a ``torchmetrics.Metric``)."""
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)
