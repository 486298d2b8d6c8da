"""The `Task` a trial works on: fixed splits, a model builder and the baseline's training recipe."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from experiments._data import Adapters, Data, Split, WorkloadError, as_data
from experiments._layout import CLASS_LAST, in_model_layout
from experiments._objectives import (
    OUTPUTS,
    LossFn,
    ScoreFn,
    accuracy,
    bce_loss,
    ce_loss,
    cosine_loss,
    label_accuracy,
    mean_cosine,
    neighbour_agreement,
    r2_score,
    regression_loss,
)

__all__ = ["Split", "Task", "TrainConfig", "cv_folds"]


@dataclass(frozen=True)
class TrainConfig:
    """How the baseline is trained (fine-tuning takes its settings from the search space).

    Attributes:
        epochs: Passes over the training split, >= 0 (0 keeps a pretrained model as it is).
        batch_size: Samples per step, >= 1.
        lr: The optimizer's learning rate, finite and > 0.
        weight_decay: The optimizer's weight decay, finite and >= 0.

    Raises:
        WorkloadError: For a value out of its range (a `ValueError`; ``squeeze`` reports it
            as a config error of ``task.train.<key>``, exit 2, before anything is created).
    """

    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=0, owner="TrainConfig (task.train)")
        check_int("batch_size", self.batch_size, low=1, owner="TrainConfig (task.train)")
        check_real("lr", self.lr, low=0.0, low_open=True, owner="TrainConfig (task.train)")
        check_real("weight_decay", self.weight_decay, low=0.0, owner="TrainConfig (task.train)")


def check_int(name: str, value: Any, *, low: int, owner: str) -> None:
    """Raise `WorkloadError` unless ``value`` is an int >= ``low`` (sklearn-style message:
    ``The 'epochs' parameter of TrainConfig (task.train) must be an int in [0, inf). Got -1
    instead.``)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise WorkloadError(
            f"The {name!r} parameter of {owner} must be an int in [{low}, inf). "
            f"Got {value!r} instead."
        )


def check_real(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    owner: str,
) -> None:
    """Raise `WorkloadError` unless ``value`` is a finite number in the given interval."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise WorkloadError(
            f"The {name!r} parameter of {owner} must be a finite float in {interval}. "
            f"Got {value!r} instead."
        )


def check_fractions(val_fraction: Any, test_fraction: Any, *, task: str) -> None:
    """Raise `WorkloadError` unless both fractions are in (0, 1) and leave training samples
    (their sum < 1)."""
    owner = f"task {task!r}"
    check_real("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, owner=owner)
    check_real("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, owner=owner)
    if val_fraction + test_fraction >= 1.0:
        raise WorkloadError(
            f"The 'val_fraction' and 'test_fraction' parameters of {owner} must sum to less "
            f"than 1 (the rest is the training split). Got {val_fraction!r} + "
            f"{test_fraction!r} = {val_fraction + test_fraction:g} instead."
        )


def check_sizes(name: str, sizes: Any, *, task: str) -> None:
    """Raise `WorkloadError` unless ``sizes`` is a list of ints >= 1 (layer widths)."""
    if isinstance(sizes, str) or not isinstance(sizes, Sequence):
        raise WorkloadError(
            f"The {name!r} parameter of task {task!r} must be a list of ints in [1, inf). "
            f"Got {sizes!r} instead."
        )
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise WorkloadError(
                f"The {name!r} parameter of task {task!r} must be a list of ints in [1, inf). "
                f"Got {list(sizes)!r} instead."
            )


@dataclass(frozen=True)
class Task:
    """A workload: what the model is, what it reads, what it is trained for and scored by.

    Attributes:
        name: Task name, as selected by ``task=<name>``.
        train: Split the models are trained and fine-tuned on: a `Split` held in memory, a
            torch ``Dataset`` (map-style or iterable), a ``DataLoader``, or a factory
            ``loader(batch_size=..., shuffle=..., seed=...)`` (see `experiments._data`).
        val: Split the search optimises and selects on (the same kinds).
        test: Split reported only for the baseline and the Pareto points.
        num_classes: Number of classes (of labels for ``multilabel``; the output width for
            ``embeddings`` and ``values``).
        build_model: Returns a model of the baseline's architecture (freshly initialised, or
            with pretrained weights for a pretrained baseline).
        train_config: How the baseline is trained (``epochs=0`` keeps a pretrained model as is).
        outputs: What the model outputs, one of `OUTPUTS`: class ``logits``, ``multilabel``
            logits (a yes/no per label: ``(batch, num_classes)`` against multi-hot targets),
            ``embeddings`` compared by cosine, or ``values`` (regression).
        loss: The training loss ``loss(outputs, targets, teacher)``: cross-entropy for
            ``logits``, binary cross-entropy for ``multilabel``, mean squared error for
            ``values`` by default.
        extra_scores: More scores ``{name: score(outputs, targets)}``, logged as
            ``val_<name>`` next to the split's own score (e.g. a retrieval check).
        inputs: ``inputs(batch)``: the model's call (a tensor, a tuple of positional arguments
            or a dict of keyword arguments); default: a dict without its ``labels``, or all but
            the last element of a tuple.
        targets: ``targets(batch)``; default: a dict's ``labels``, or a tuple's last element.
        output: Which output is scored: None (a tensor, the first of a tuple, ``.logits`` of a
            ``ModelOutput``), a key, attribute name or position, or a function.
        collate_fn: Collates a dataset's samples into batches (torch's default if None).
        metric: The score (``val_acc`` / ``test_acc``): ``metric(outputs, targets) -> float``
            on the whole split's outputs, or a ``torchmetrics.Metric`` accumulated over batches;
            None: the `Split`'s own ``score`` where it names one, else accuracy (``logits``),
            label accuracy (``multilabel``), mean cosine (``embeddings``) or R² (``values``).
        higher_is_better: The metric's direction; None: the metric's own
            ``higher_is_better`` (torchmetrics), else known for squeeze's scores.
        eval_batch_size: Batch size of evaluation passes (None: 1024 for in-memory data, else
            the training batch size).
        optimizer: ``optimizer(params, lr=..., weight_decay=...)`` for the baseline and every
            fine-tuning (``torch.optim.AdamW``, say); None: Adam.
        train_step: The user's training step (`experiments.TrainStep`: gradient clipping,
            mixed precision, ...), given squeeze's loss of each batch; None: backward and step.
        checkpoint: A pretrained baseline: a safetensors file, a ``weights_only`` state dict or
            a Hugging Face model folder, loaded into ``build_model()``'s model, evaluated and not
            trained (the top-level ``checkpoint=`` of the config, if set, wins).
        class_axis: Where the class axis of ``logits`` is, counting the batch as 0: -1 (last,
            as Hugging Face's token classifiers return them) or 1 and up (torch's dense
            classifiers: a segmentation model's ``(batch, classes, height, width)``, as
            ``nn.CrossEntropyLoss`` and torchmetrics take them). squeeze's own loss, score,
            agreement and analyses read the logits class-last; ``loss``, ``metric`` and
            ``extra_scores`` given here receive them as the model returns them.
    """

    name: str
    train: Any
    val: Any
    test: Any
    num_classes: int
    build_model: Callable[[], nn.Module]
    train_config: TrainConfig
    outputs: str = "logits"
    loss: LossFn | None = None
    extra_scores: Mapping[str, ScoreFn] = field(default_factory=dict)
    inputs: Callable[[Any], Any] | None = None
    targets: Callable[[Any], Any] | None = None
    output: str | int | Callable[[Any], Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    metric: Any = None
    higher_is_better: bool | None = None
    eval_batch_size: int | None = None
    optimizer: Callable[..., Any] | None = None
    train_step: Callable[..., Any] | None = None
    checkpoint: str | None = None
    class_axis: int = CLASS_LAST

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUTS:
            raise WorkloadError(
                f"The 'outputs' parameter of task {self.name!r} must be one of "
                f"{', '.join(map(repr, OUTPUTS))}. Got {self.outputs!r} instead."
            )
        axis = self.class_axis
        _check_class_axis(self, axis)
        adapters = Adapters(self.inputs, self.targets, self.output, self.collate_fn, axis)
        metric = self.metric
        if metric is None:
            own = _source(self.val)
            named = isinstance(own, Split) and own.score is not accuracy  # (not the default)
            metric = own.score if named else DEFAULT_METRICS[self.outputs]
        metric = _yours(metric, axis, kind="metric")
        batch = self.eval_batch_size or (
            1024 if isinstance(_source(self.val), Split) else self.train_config.batch_size
        )
        for name in ("train", "val", "test"):
            if getattr(self, name) is None:
                raise WorkloadError(
                    f"task {self.name!r} has no {name} split ({name}=None): squeeze trains on "
                    "train, chooses on val and reports test, data the search never sees. Give "
                    "all three (a part of your training data held out, if you have no other)."
                )
            data = as_data(_source(getattr(self, name)), adapters, metric, batch)
            object.__setattr__(self, name, data)
        if self.loss is None:
            object.__setattr__(self, "loss", DEFAULT_LOSSES[self.outputs])
        else:
            object.__setattr__(self, "loss", _yours(self.loss, axis, kind="loss"))
        extra = {k: _yours(v, axis, kind="score") for k, v in self.extra_scores.items()}
        object.__setattr__(self, "extra_scores", extra)
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "higher_is_better", metric_direction(metric, self))

    def example_inputs(self, batch_size: int = 1) -> Any:
        """The model's inputs for a batch of real validation samples (repeated when validation
        has fewer), for tracing, FLOP counts and latency: a tensor, a tuple or a dict."""
        return self.val.first_inputs(batch_size)

    def example_batch(self, batch_size: int = 1) -> tuple[Any, int]:
        """``(inputs, samples)``: `example_inputs` and the samples they hold (``batch_size``,
        unless a batch's inputs cannot be cut or repeated by rows: a graph batch's nodes and
        edges; `Data.first_batch`), for figures per sample."""
        return self.val.first_batch(batch_size)

    def training(self) -> dict[str, Any]:
        """The task's own training choices, as `experiments.fit`'s keyword arguments."""
        return {"optimizer": self.optimizer, "train_step": self.train_step}

    def rewind(self) -> None:
        """`Data.rewind` of every split: a seeded pass then reads as in a new process."""
        for data in (self.train, self.val, self.test):
            data.rewind()

    def split_sizes(self) -> dict[str, int]:
        """Number of samples in each split (-1 where it is not known without reading it)."""
        return {
            name: len(data) if data.sized() else -1
            for name, data in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def _check_class_axis(task: Task, axis: Any) -> None:
    """``class_axis`` is -1 or an axis after the batch's; only logits have one."""
    if (
        isinstance(axis, bool)
        or not isinstance(axis, int | np.integer)
        or (axis < 1 and axis != -1)
    ):
        raise WorkloadError(
            f"The 'class_axis' parameter of task {task.name!r} must be -1 (the class axis last) "
            f"or an int >= 1 (1: a segmentation model's (batch, classes, height, width)). Got "
            f"{axis!r} instead."
        )
    if axis != CLASS_LAST and task.outputs != "logits":
        raise WorkloadError(
            f"The 'class_axis' parameter of task {task.name!r} is {axis}, but only "
            f"outputs='logits' have a class axis (this task's outputs are {task.outputs!r}). "
            "Leave it at -1."
        )


def _yours(fn: Any, axis: int, *, kind: str) -> Any:
    """The task's own loss or score taking the outputs in the model's layout; squeeze's own
    (which read them class-last) as they are."""
    if any(fn is own for own in (*_KNOWN_DIRECTIONS, *DEFAULT_LOSSES.values())):
        return fn  # (by identity: a torchmetrics Metric's == builds a new metric)
    return in_model_layout(fn, axis, kind=kind)


def _source(split: Any) -> Any:
    return split.source if isinstance(split, Data) else split


#: The metric of a task whose model outputs logits, embeddings or values, when it names none.
DEFAULT_METRICS: dict[str, ScoreFn] = {
    "logits": accuracy,
    "multilabel": label_accuracy,
    "embeddings": mean_cosine,
    "values": r2_score,
}
#: The loss of a task whose model outputs logits, embeddings or values, when it names none.
DEFAULT_LOSSES: dict[str, LossFn] = {
    "logits": ce_loss,
    "multilabel": bce_loss,
    "embeddings": cosine_loss,
    "values": regression_loss,
}
#: squeeze's own scores and their direction.
_KNOWN_DIRECTIONS = {
    accuracy: True,
    label_accuracy: True,
    mean_cosine: True,
    r2_score: True,
    neighbour_agreement: True,
}


def metric_direction(metric: Any, task: Task) -> bool:
    """Whether ``metric`` is higher-is-better: the task's ``higher_is_better``, else the
    metric's own attribute (torchmetrics), else known for squeeze's scores and for a `Split`'s
    ``score`` (documented as higher-is-better).

    Raises:
        WorkloadError: If the direction cannot be known.
    """
    if task.higher_is_better is not None:
        return bool(task.higher_is_better)
    own = getattr(metric, "higher_is_better", None)
    if isinstance(own, bool):
        return own
    if metric in _KNOWN_DIRECTIONS or task.metric is None:
        return True
    raise WorkloadError(
        f"The metric of task {task.name!r} ({getattr(metric, '__name__', type(metric).__name__)}) "
        "has no direction: set Task(higher_is_better=True) or False, or give a "
        "torchmetrics.Metric (its higher_is_better says it)."
    )


def cv_folds(task: Task, folds: int, *, seed: int) -> list[Task]:
    """``folds`` copies of ``task`` whose train and validation splits are the folds of its train +
    validation data (fold k validates on the k-th part; stratified by class for integer labels);
    test stays untouched."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if task.train.in_memory is None or task.val.in_memory is None:
        raise WorkloadError(
            f"search.cv_folds needs task {task.name!r}'s train and validation data held in "
            f"memory (a Split) to refold them; its data is a "
            f"{type(task.train.source).__name__}, read batch by batch. Use search.cv_folds=null."
        )
    x = torch.cat([task.train.x, task.val.x])
    y = torch.cat([task.train.y, task.val.y])
    labels = y.dim() == 1 and not y.is_floating_point()
    splitter = (StratifiedKFold if labels else KFold)(folds, shuffle=True, random_state=seed)
    return [
        dataclasses.replace(
            task,
            train=Split(x[fit_idx], y[fit_idx], task.train.score),
            val=Split(x[val_idx], y[val_idx], task.val.score),
        )
        for fit_idx, val_idx in splitter.split(x.numpy(), y.numpy() if labels else None)
    ]


def stratified_splits(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Split, Split, Split]:
    """Seeded, stratified train / validation / test splits of one labelled array."""
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    train, val = train_val_split(
        x_rest, y_rest, val_fraction=val_fraction / (1.0 - test_fraction), seed=seed
    )
    return train, val, to_split(x_test, y_test)


def train_val_split(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float, seed: int
) -> tuple[Split, Split]:
    """Seeded, stratified train / validation split."""
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=val_fraction, stratify=y, random_state=seed
    )
    return to_split(x_train, y_train), to_split(x_val, y_val)


def to_split(x: np.ndarray, y: np.ndarray) -> Split:
    """Wrap arrays as a `Split` of float32 inputs and int64 labels."""
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
