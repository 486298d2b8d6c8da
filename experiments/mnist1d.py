"""Task ``mnist1d_cnn``: MNIST-1D generated offline and MNIST-1D's ~5k-parameter 1-D CNN."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from experiments._task import (
    Task,
    TrainConfig,
    check_int,
    check_real,
    to_split,
    train_val_split,
)
from experiments.models import ConvNet1d

logger = logging.getLogger(__name__)

_ARRAYS = ("x", "y", "x_test", "y_test")


def mnist1d_cnn(
    *,
    name: str = "mnist1d_cnn",
    seed: int = 0,
    val_fraction: float = 0.2,
    channels: int = 25,
    data_dir: str | None = None,
    train: dict[str, Any] | None = None,
) -> Task:
    """Build the MNIST-1D task.

    The generator's own 4,000 / 1,000 train/test split is kept, so the test split is MNIST-1D's
    test set; a stratified ``val_fraction`` of its train split becomes the validation split.

    Args:
        data_dir: Folder where the generated arrays are kept, so they are generated only once.

    Raises:
        WorkloadError: For ``val_fraction`` out of (0, 1), ``channels`` below 1 or a training
            setting out of its range (`TrainConfig`), before any data is generated.
    """
    owner = f"task {name!r}"
    check_real("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, owner=owner)
    check_int("channels", channels, low=1, owner=owner)
    train_config = TrainConfig(**(train or {"epochs": 60}))
    arrays = _load_or_generate(Path(data_dir) if data_dir else None)
    train_split, val_split = train_val_split(
        arrays["x"], arrays["y"], val_fraction=val_fraction, seed=seed
    )
    return Task(
        name=name,
        train=train_split,
        val=val_split,
        test=to_split(arrays["x_test"], arrays["y_test"]),
        num_classes=10,
        build_model=partial(ConvNet1d, arrays["x"].shape[1], 10, channels=channels),
        train_config=train_config,
    )


def _load_or_generate(data_dir: Path | None) -> dict[str, np.ndarray]:
    path = data_dir / "mnist1d.npz" if data_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in _ARRAYS}
    from mnist1d.data import get_dataset_args, make_dataset

    logger.info("generating MNIST-1D (offline, seed 42)")
    generated = make_dataset(get_dataset_args())
    arrays = {key: np.asarray(generated[key]) for key in _ARRAYS}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return arrays
