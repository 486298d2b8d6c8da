"""Task ``digits_mlp``: scikit-learn's 8x8 digits and an MLP shaped like LeNet-300-100."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from sklearn.datasets import load_digits

from experiments._task import Task, TrainConfig, check_fractions, check_sizes, stratified_splits
from experiments.models import MLP


def digits_mlp(
    *,
    name: str = "digits_mlp",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    hidden: Sequence[int] = (300, 100),
    train: dict[str, Any] | None = None,
) -> Task:
    """Build the digits task: 1,797 images of 64 pixels scaled to [0, 1], 10 classes.

    Raises:
        WorkloadError: For a fraction out of (0, 1), fractions summing to 1 or more, a layer
            width below 1 or a training setting out of its range (`TrainConfig`).
    """
    check_fractions(val_fraction, test_fraction, task=name)
    check_sizes("hidden", hidden, task=name)
    train_config = TrainConfig(**(train or {"epochs": 40}))
    data = load_digits()
    x = data.data.astype("float32") / 16.0
    train_split, val_split, test_split = stratified_splits(
        x, data.target, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Task(
        name=name,
        train=train_split,
        val=val_split,
        test=test_split,
        num_classes=10,
        build_model=partial(MLP, 64, list(hidden), 10),
        train_config=train_config,
    )
