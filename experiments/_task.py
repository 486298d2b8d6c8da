"""The `Task` a trial works on: fixed splits, a model builder and the baseline's training recipe."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrainConfig:
    """How the baseline is trained (fine-tuning takes its settings from the search space)."""

    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Task:
    """A classification workload.

    Attributes:
        name: Task name, as selected by ``task=<name>``.
        train: Split the models are trained and fine-tuned on.
        val: Split the search optimises and selects on.
        test: Split reported only for the baseline and the Pareto points.
        num_classes: Number of classes.
        build_model: Returns a freshly initialised model of the baseline's architecture.
        train_config: How the baseline is trained.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    build_model: Callable[[], nn.Module]
    train_config: TrainConfig

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of real validation inputs, for FLOP counts and latency."""
        reps = -(-batch_size // len(self.val))
        return self.val.x.repeat(reps, *([1] * (self.val.x.dim() - 1)))[:batch_size]

    def split_sizes(self) -> dict[str, int]:
        """Number of samples in each split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def cv_folds(task: Task, folds: int, *, seed: int) -> list[Task]:
    """``folds`` copies of ``task`` whose train and validation splits are the stratified folds of
    its train + validation data (fold k validates on the k-th part); test stays untouched."""
    from sklearn.model_selection import StratifiedKFold

    x = torch.cat([task.train.x, task.val.x])
    y = torch.cat([task.train.y, task.val.y])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [
        dataclasses.replace(
            task, train=Split(x[fit_idx], y[fit_idx]), val=Split(x[val_idx], y[val_idx])
        )
        for fit_idx, val_idx in splitter.split(x.numpy(), y.numpy())
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
