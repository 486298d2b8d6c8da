"""Checks of a workload before any training: the model takes the task's batches, returns what can
be scored, and the loss and metric work on it.

Each failure is a `WorkloadError` naming the task, the split, the batch's structure and what was
tried, so that a user's own task is refused in seconds rather than after its baseline trained.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from experiments._data import (
    Data,
    WorkloadError,
    call_model,
    describe,
    leaves,
    model_device,
    to_device,
)
from experiments._objectives import IGNORE_INDEX, r2_score, regression_loss
from experiments._task import Task
from experiments._training import is_streaming_metric

logger = logging.getLogger(__name__)

#: Samples of each split the check runs the model on.
CHECK_ROWS = 4


def check_workload(task: Task, model: nn.Module) -> None:
    """Run ``model`` (a fresh, untrained one) on a few samples of the task's training and
    validation data, and check that the loss and the metric take its outputs.

    Raises:
        WorkloadError: If the data cannot be read, the model cannot take a batch, its output
            cannot be scored (not a tensor, one row per sample; for ``logits``, ``num_classes``
            wide), or the loss or the metric fail on it.
    """
    was_training = model.training
    model.eval()
    try:
        targets = {
            name: _check_split(task, model, name, getattr(task, name)) for name in ("train", "val")
        }
    finally:
        model.train(was_training)
    _note_padding(task, targets)


def _note_padding(task: Task, targets: Mapping[str, Any]) -> None:
    """Log once (INFO) that a regression's checked targets of `IGNORE_INDEX` (-100) are read as
    padding by the default loss and R² it uses: a real target of -100 (-100 dBm) would be left
    out of its training and its score without a word."""
    if task.outputs != "values":
        return
    defaults = [
        (what, option)
        for what, option, mine, default in (
            ("loss (MSE)", "loss=", task.loss, regression_loss),
            ("R²", "metric=", task.metric, r2_score),
        )
        if mine is default
    ]
    padded = [
        name
        for name, split_targets in targets.items()
        if isinstance(split_targets, torch.Tensor) and bool((split_targets == IGNORE_INDEX).any())
    ]
    if not defaults or not padded:
        return
    logger.info(
        "task %r: targets of %d in its %s data are read as padding (a per-token regression's, "
        "as a collate pads labels) and left out of the default %s; a task whose %d values are "
        "real targets (-100 dBm, say) should give its own Task(%s)",
        task.name,
        IGNORE_INDEX,
        " and ".join(padded),
        " and ".join(what for what, _ in defaults),
        IGNORE_INDEX,
        ", ".join(option + "..." for _, option in defaults),
    )


def _check_split(task: Task, model: nn.Module, name: str, data: Data) -> Any:
    """Check one split's first few samples (see `check_workload`); return their targets."""
    where = f"task {task.name!r}, {name} data"
    try:
        batch = next(iter(data.batches(CHECK_ROWS, limit=CHECK_ROWS)), None)
    except Exception as err:
        raise WorkloadError(
            f"{where}: reading a batch of {CHECK_ROWS} from {type(data.source).__name__} failed: "
            f"{type(err).__name__}: {err}. Check the split and Task(collate_fn=...)."
        ) from err
    if batch is None:
        raise WorkloadError(f"{where}: the split has no samples")
    call = _how_called(batch.inputs)
    try:
        with torch.no_grad():
            raw = data.forward(model, batch.inputs)
    except Exception as err:
        raise WorkloadError(
            f"{where}: the model cannot take a batch: {call} with inputs "
            f"{describe(batch.inputs)} (from a batch {describe(batch.raw)}) raised "
            f"{type(err).__name__}: {err}. {_fix_for(batch.inputs, model)}"
        ) from err
    output = raw
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        with torch.no_grad():
            everything = call_model(model, to_device(batch.inputs, model_device(model)))
        raise WorkloadError(
            f"{where}: the model's output {describe(everything)} has no float tensor to score "
            f"(picked: {describe(output)}). Name it with Task(output=...): a key, an attribute, "
            "a position or a function."
        )
    if output.dim() == 0 or output.shape[0] != batch.rows:
        raise WorkloadError(
            f"{where}: the scored output {describe(output)} does not have one row per sample "
            f"({batch.rows} in the batch)"
        )
    if task.outputs == "logits" and (output.dim() < 2 or output.shape[-1] != task.num_classes):
        if output.dim() > 2 and output.shape[1] == task.num_classes:
            raise WorkloadError(
                f"{where}: the model outputs {describe(output)}, the {task.num_classes} classes "
                "on axis 1, a decision per position after it (as a segmentation model's "
                "(batch, classes, height, width), which nn.CrossEntropyLoss and torchmetrics "
                "take), but squeeze reads the class axis last. Say Task(class_axis=1): squeeze "
                "then reads the logits class-last, and your loss and metric still get them as "
                "the model returns them."
            )
        raise WorkloadError(
            f"{where}: the model outputs {describe(output)} but the task has "
            f"num_classes={task.num_classes}: a classifier's logits must be (batch, "
            f"{task.num_classes}), or (batch, ..., {task.num_classes}) with a decision per "
            "position (a token classifier's, a language model's), the class axis last. Fix "
            "num_classes or the model's head, or pick the logits with Task(output=...)."
        )
    if task.outputs == "multilabel" and (output.dim() != 2 or output.shape[1] != task.num_classes):
        raise WorkloadError(
            f"{where}: the model outputs {describe(output)} but a multi-label classifier with "
            f"num_classes={task.num_classes} labels returns logits (batch, {task.num_classes}): "
            "one yes/no per label. Fix num_classes or the model's head, or pick the logits "
            "with Task(output=...)."
        )
    if batch.targets is None:
        raise WorkloadError(
            f"{where}: a batch {describe(batch.raw)} has no targets (a dict's 'labels', or a "
            "tuple's last element); say where they are with Task(targets=...)"
        )
    _check_targets(task, output, batch.targets, where)
    try:
        loss = task.loss(output, batch.targets, None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the loss returned {describe(loss)}, not a scalar tensor")
    except Exception as err:
        raise WorkloadError(
            f"{where}: the loss {_name(task.loss)} failed on outputs {describe(output)} and "
            f"targets {describe(batch.targets)}: {type(err).__name__}: {err}"
            f"{_several_outputs(model, batch.inputs, output)}"
        ) from err
    metric = task.metric
    try:
        # A few samples only test that the metric runs: what it warns of them (torchmetrics'
        # AUROC of a batch without negatives, say) says nothing of the split.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_streaming_metric(metric):
                probe = metric.clone()
                probe.reset()
                probe.update(output, batch.targets)
                probe.compute()
            else:
                float(metric(output, batch.targets))
    except Exception as err:
        raise WorkloadError(
            f"{where}: the metric {_name(metric)} failed on outputs {describe(output)} and "
            f"targets {describe(batch.targets)}: {type(err).__name__}: {err}"
            f"{_several_outputs(model, batch.inputs, output)}"
        ) from err
    return batch.targets


def _several_outputs(model: nn.Module, inputs: Any, output: torch.Tensor) -> str:
    """Where the model returns several float tensors (a dict of two heads, a tuple), a
    sentence saying that the loss and metric got the scored one only, and how to give them
    several; else nothing."""
    try:
        with torch.no_grad():
            everything = call_model(model, to_device(inputs, model_device(model)))
    except Exception:  # (it ran once already: nothing to add if it does not now)
        return ""
    if isinstance(everything, Mapping):
        named = [(f"out[{k!r}]", v) for k, v in everything.items()]
    elif isinstance(everything, tuple | list):
        named = [(f"out[{i}]", v) for i, v in enumerate(everything)]
    else:
        return ""
    floats = [n for n, v in named if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if len(floats) < 2:
        return ""
    return (
        f". The model returns {describe(everything)}; the loss and metric get the scored "
        f"output only ({describe(output)}). A loss or metric of several outputs gets them as "
        f"one tensor: Task(output=lambda out: torch.cat([{', '.join(floats[:2])}], -1), "
        "outputs='values'), split again inside your loss and metric"
    )


def _fix_for(inputs: Any, model: nn.Module) -> str:
    """What to do about inputs the model cannot take: float64 inputs (numpy's and pandas'
    default) of a float32 model are converted, else the batch is read otherwise."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    doubles = [
        t for t in leaves(inputs) if isinstance(t, torch.Tensor) and t.dtype == torch.float64
    ]
    if doubles and torch.float64 not in weights and weights:
        (dtype,) = weights if len(weights) == 1 else (torch.float32,)
        return (
            f"The inputs are float64 (numpy's and pandas' default) and the model's weights "
            f"{str(dtype).removeprefix('torch.')}: convert the data (x.astype('float32') in your "
            "dataset, or Task(inputs=lambda batch: batch[0].float()) for a tuple batch)."
        )
    return (
        "Say how a batch becomes the model's call with Task(inputs=...) (and its targets with "
        "Task(targets=...))."
    )


def _how_called(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return f"model(**{{{', '.join(map(str, inputs))}}})"
    if isinstance(inputs, tuple | list):
        return f"model(*{len(inputs)} positional arguments)"
    return "model(inputs)"


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _check_targets(task: Task, output: torch.Tensor, targets: Any, where: str) -> None:
    """Multi-hot targets belong to a ``multilabel`` task: under ``logits`` (one class per
    sample) its softmax, top-1 accuracy and agreement would score the wrong decisions; and a
    ``multilabel`` task's targets are one 0 / 1 per label."""
    if not isinstance(targets, torch.Tensor):
        return
    if task.outputs == "multilabel":
        if tuple(targets.shape) != tuple(output.shape):
            raise WorkloadError(
                f"{where}: a multi-label task's targets are one 0 / 1 per label, shaped as the "
                f"logits {describe(output)}; got {describe(targets)}"
            )
        return
    if task.outputs != "logits" or targets.shape != output.shape or output.dim() != 2:
        return
    if not targets.is_floating_point() or not bool(((targets == 0) | (targets == 1)).all()):
        return
    if bool((targets.sum(dim=1) == 1).all()):  # one-hot: one class per sample, as logits say
        return
    raise WorkloadError(
        f"{where}: the targets {describe(targets)} are multi-hot (rows with no or several 1s), "
        "but the task says outputs='logits' (one class per sample: softmax, top-1 accuracy, "
        "top-1 agreement). For one yes/no per label give Task(outputs='multilabel') "
        "(binary cross-entropy, per-label accuracy and agreement by default)."
    )
