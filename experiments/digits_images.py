"""Task ``digits_images``: image files on disk, read with ``datasets``, into a ``transformers`` CNN.

scikit-learn's 1,797 8x8 digits are written once as PNG files into an image-folder tree,
``<data_dir>/digits_png/{train,validation,test}/<label>/<i>.png`` (a stratified 60/20/20 split
with seed 0: the files are the dataset as a user would have it, so its split is fixed and the
task's seed seeds training only). They are read back through ``datasets``' ``imagefolder``
builder (`experiments.hf.hf_dataset`) and turned into tensors on access: upscaled to ``size`` x
``size``, randomly rotated, zoomed and shifted in training only, normalised. The model is a small
``ResNetForImageClassification`` built from its config with random weights; batches are dicts
``{pixel_values, labels}`` and its ``ModelOutput``'s ``logits`` are scored.

Needs the ``hf`` extra (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from experiments._data import WorkloadError
from experiments._task import Task, TrainConfig, check_int, check_sizes
from experiments.hf import as_torch, hf_dataset, hf_model, image_transform

logger = logging.getLogger(__name__)

#: The split folders of the tree, as ``imagefolder`` names its splits.
SPLITS = ("train", "validation", "test")
#: Mean and standard deviation of the digits' pixels in [0, 1], for normalising.
PIXEL_MEAN, PIXEL_STD = 0.305, 0.376


def write_digits_png(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the digits as PNG files into ``root`` once (atomically: a tree is complete or
    absent), and return ``root``.

    The tree is ``root/<split>/<label>/<index>.png`` for the splits in `SPLITS`: 8x8 grayscale
    images whose 0..16 intensities are scaled to 0..255; ``index`` is the image's row in
    ``sklearn.datasets.load_digits()``. An existing tree is kept as it is.
    """
    root = Path(root)
    if root.is_dir():
        return root
    from PIL import Image

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(pixels))
    rest, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(
        rest, test_size=0.25, stratify=digits.target[rest], random_state=seed
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, rows in zip(SPLITS, (train, val, test), strict=True):
            for i in rows:
                folder = staging / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i]).save(folder / f"{i}.png")
        try:
            staging.rename(root)  # atomic; another process may have won the race
        except OSError:
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %d digit images to %s", len(pixels), root)
    return root


def tiny_resnet(
    *,
    num_labels: int = 10,
    embedding_size: int = 16,
    hidden_sizes: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] | None = None,
) -> nn.Module:
    """A small ``ResNetForImageClassification`` for 1-channel images, random weights."""
    return hf_model(
        config={
            "model_type": "resnet",
            "num_channels": 1,
            "embedding_size": embedding_size,
            "hidden_sizes": list(hidden_sizes),
            "depths": list(depths or [1] * len(hidden_sizes)),
            "layer_type": "basic",
            "downsample_in_first_stage": False,
        },
        task="image-classification",
        num_labels=num_labels,
    )


def digits_images(
    *,
    name: str = "digits_images",
    seed: int = 0,
    data_dir: str | None = None,
    size: int = 32,
    embedding_size: int = 16,
    hidden_sizes: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] | None = None,
    augment: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> Task:
    """Build the digits-as-files task.

    Args:
        name: Task name.
        seed: Unused by the data (the files' split is fixed); seeds training through squeeze.
        data_dir: Folder of generated data: the PNG tree is ``<data_dir>/digits_png`` and the
            ``datasets`` cache ``<data_dir>/hf_datasets`` (default: ``.squeeze/cache/data``).
        size: Side the 8x8 images are upscaled to (bilinear) before the model.
        embedding_size: Channels of the ResNet's stem.
        hidden_sizes: Channels of its stages (each after the first halves the resolution).
        depths: Basic blocks per stage (default: one each).
        augment: Training augmentation: ``degrees``, ``shift`` (fraction of the side), ``scale``
            (a ``[low, high]`` zoom); ``{}`` for none.
        train: Baseline training (default ``{"epochs": 15, "lr": 0.003}``).
    """
    del seed  # the split on disk is fixed; squeeze seeds the model and the batches
    settings = {"degrees": 10.0, "shift": 0.1, "scale": (0.9, 1.1)}
    unknown = sorted(set(augment or {}) - set(settings))
    if unknown:  # checked before any file is written
        raise WorkloadError(
            f"Unknown key {unknown[0]!r} in the 'augment' parameter of task {name!r}. "
            f"Allowed: {', '.join(settings)}."
        )
    check_int("size", size, low=1, owner=f"task {name!r}")
    check_int("embedding_size", embedding_size, low=1, owner=f"task {name!r}")
    check_sizes("hidden_sizes", hidden_sizes, task=name)
    if depths is not None:
        check_sizes("depths", depths, task=name)
    train_config = TrainConfig(**(train or {"epochs": 15, "lr": 0.003}))
    folder = Path(data_dir) if data_dir is not None else Path(".squeeze/cache/data")
    root = write_digits_png(folder / "digits_png")
    splits = hf_dataset("imagefolder", data_dir=root, cache_dir=folder / "hf_datasets")
    settings.update({k: tuple(v) if k == "scale" else v for k, v in (augment or {}).items()})
    normalise = {"size": size, "mean": PIXEL_MEAN, "std": PIXEL_STD}
    augmented = image_transform(augment=bool(augment is None or augment), **normalise, **settings)
    plain = image_transform(**normalise)
    return Task(
        name=name,
        train=as_torch(splits["train"], augmented),
        val=as_torch(splits["validation"], plain),
        test=as_torch(splits["test"], plain),
        num_classes=10,
        build_model=partial(
            tiny_resnet,
            embedding_size=embedding_size,
            hidden_sizes=tuple(hidden_sizes),
            depths=None if depths is None else tuple(depths),
        ),
        train_config=train_config,
        eval_batch_size=512,
    )
