"""Adapters for Hugging Face users: models, tokenized texts and files on disk, as a `Task` reads
them.

An optional extra (``pip install -e ".[hf]"``: transformers, datasets, torchmetrics, pillow);
``import experiments`` never needs it, each helper imports what it uses. Nothing here reaches the
network: models load from local folders (``local_files_only=True``) or are built from a config
with random weights, and `hf_dataset` reads local files only.

A task built from these helpers (`experiments.minilm_topics`, `experiments.digits_images`)::

    model = hf_model("path/to/bert", num_labels=30)                 # or config={...}
    train = hf_tokenized(texts, labels, "path/to/bert", max_length=64)
    Task(..., train=train, collate_fn=train.collate_fn, build_model=...)

    splits = hf_dataset("imagefolder", data_dir="path/to/tree")     # train/validation/test
    train = as_torch(splits["train"], image_transform(size=32, augment=True))
    val = as_torch(splits["validation"], image_transform(size=32))

Batches are then dicts (``input_ids``, ``attention_mask``, ``labels``; or ``pixel_values``,
``labels``), the model is called with the dict minus its ``labels``, and the ``logits`` of its
``ModelOutput`` are scored: squeeze's default adapters (`experiments._data`) do this.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

__all__ = [
    "HF_TASKS",
    "TokenizedTexts",
    "TorchStream",
    "TorchView",
    "as_torch",
    "hf_dataset",
    "hf_model",
    "hf_tokenized",
    "image_transform",
    "random_affine",
]

#: What `hf_model` builds for each ``task``: the ``transformers`` Auto class.
HF_TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
#: Builders of ``datasets.load_dataset`` that read local files (`hf_dataset`).
LOCAL_BUILDERS = ("csv", "json", "parquet", "text", "imagefolder", "audiofolder")


def _require(module: str) -> Any:
    """Import ``module`` of the ``hf`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f'experiments.hf needs {module!r}: pip install -e ".[hf]" (transformers, datasets, '
            "torchmetrics, pillow)"
        ) from None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers without its weight-loading progress bar and load report (a task's model is
    built many times in a sweep; a head the folder lacks is expected)."""
    logging = _require("transformers.utils.logging")
    was_enabled = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was_enabled:
            logging.enable_progress_bar()


def hf_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    config: Any = None,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    freeze_embeddings: bool = False,
    **config_overrides: Any,
) -> nn.Module:
    """A ``transformers`` model for ``task``, from a local folder or from a config.

    Args:
        name_or_path: A folder written by ``save_pretrained`` (or a model already in the local
            Hugging Face cache): its weights are loaded with ``local_files_only=True``; a head
            the folder lacks (a classifier for ``num_labels`` classes) starts at random.
        config: Instead of a folder: a ``PretrainedConfig``, or a mapping with its
            ``model_type`` (``{"model_type": "resnet", "hidden_sizes": [32, 64], ...}``); the
            model starts with random weights (seed torch first for a reproducible one).
        task: ``sequence-classification`` or ``image-classification`` (see `HF_TASKS`).
        num_labels: Number of classes of the classification head.
        freeze_embeddings: Whether the input embedding tables stay frozen while training (they
            are most of a small text model's weights, and a small training set touches few of
            their rows; compression still acts on them).
        **config_overrides: Config attributes to set (``hidden_dropout_prob=0.0``, ...).

    Returns:
        The model, in training mode as ``transformers`` returns it.

    Raises:
        ValueError: If ``task`` is unknown, or neither or both of ``name_or_path`` and
            ``config`` are given.
        OSError: If the folder holds no model (no download is tried).
    """
    if task not in HF_TASKS:
        raise ValueError(
            f"The 'task' parameter of hf_model must be one of {', '.join(map(repr, HF_TASKS))}. "
            f"Got {task!r} instead."
        )
    if (name_or_path is None) == (config is None):
        raise ValueError(
            "hf_model needs exactly one of 'name_or_path' (a local folder) and 'config' (a "
            f"PretrainedConfig or a mapping with 'model_type'); got name_or_path={name_or_path!r}"
            f" and config={type(config).__name__ if config is not None else None}"
        )
    transformers = _require("transformers")
    auto = getattr(transformers, HF_TASKS[task])
    overrides = dict(config_overrides)
    if num_labels is not None:
        overrides["num_labels"] = int(num_labels)
    if name_or_path is not None:
        try:
            with _quiet_loading():
                model = auto.from_pretrained(str(name_or_path), local_files_only=True, **overrides)
        except OSError as err:
            raise OSError(
                f"hf_model: no {task} model could be loaded from {str(name_or_path)!r} without "
                f"the network (local_files_only=True): {err}"
            ) from err
    else:
        if isinstance(config, Mapping):
            settings = dict(config)
            if "model_type" not in settings:
                raise ValueError(
                    "The 'config' parameter of hf_model, a mapping, must name its 'model_type' "
                    f"(e.g. 'bert', 'resnet', 'vit'). Got keys {sorted(settings)} instead."
                )
            config = transformers.AutoConfig.for_model(
                settings.pop("model_type"), **{**settings, **overrides}
            )
        else:
            config = copy.deepcopy(config)  # the caller's stays as it was
            for key, value in overrides.items():
                setattr(config, key, value)
        model = auto.from_config(config)
    if freeze_embeddings:
        embeddings = model.get_input_embeddings()
        owner = next(
            (m for m in model.modules() if embeddings in m.children() and m is not model), None
        )
        for table in (owner or embeddings).modules():
            if isinstance(table, nn.Embedding):
                table.weight.requires_grad_(False)
    return model


def _tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself, or the one saved in the local folder it names."""
    if isinstance(tokenizer, str | os.PathLike):
        transformers = _require("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return tokenizer


class TokenizedTexts(Dataset):
    """Texts tokenized once, as dict samples ``{input_ids, attention_mask, labels}`` of
    unpadded int64 tensors; `collate_fn` pads a batch to its longest sample.

    Attributes:
        encodings: Per key, one list of token ids per text.
        labels: The integer labels.
        collate_fn: Pads samples into a batch dict (``transformers.DataCollatorWithPadding``);
            give it to the task: ``Task(collate_fn=data.collate_fn)``.
    """

    def __init__(
        self,
        encodings: Mapping[str, Sequence[Sequence[int]]],
        labels: Sequence[int],
        collate_fn: Callable[[list[Any]], Any],
    ) -> None:
        self.encodings = dict(encodings)
        self.labels = [int(label) for label in labels]
        self.collate_fn = collate_fn
        for key, rows in self.encodings.items():
            if len(rows) != len(self.labels):
                raise ValueError(
                    f"hf_tokenized: {len(rows)} rows of {key!r} but {len(self.labels)} labels"
                )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {k: torch.tensor(v[index], dtype=torch.long) for k, v in self.encodings.items()}
        sample["labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return sample


def hf_tokenized(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Any,
    max_length: int,
    *,
    keys: Sequence[str] = ("input_ids", "attention_mask"),
) -> TokenizedTexts:
    """Tokenize ``texts`` once (truncated to ``max_length`` tokens) into a dataset of dicts.

    Args:
        texts: The texts.
        labels: One integer label per text.
        tokenizer: A ``transformers`` tokenizer, or a local folder holding one.
        max_length: Tokens per text at most, special tokens included.
        keys: The tokenizer's outputs kept in each sample (BERT's ``token_type_ids`` are all 0
            for single texts and left out by default).

    Returns:
        A `TokenizedTexts`; its ``collate_fn`` pads each batch to its longest text.
    """
    if len(texts) != len(labels):
        raise ValueError(f"hf_tokenized: {len(texts)} texts but {len(labels)} labels")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"The 'max_length' parameter of hf_tokenized must be an int >= 2. Got {max_length!r}"
            " instead."
        )
    transformers = _require("transformers")
    tokenizer = _tokenizer(tokenizer)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    missing = [k for k in keys if k not in encoded]
    if missing:
        raise ValueError(
            f"hf_tokenized: the tokenizer returns {sorted(encoded.keys())}, not {missing}"
        )
    collate = transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return TokenizedTexts({k: encoded[k] for k in keys}, labels, collate)


def hf_dataset(
    builder: str,
    *,
    data_dir: str | os.PathLike | None = None,
    data_files: Any = None,
    split: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    transform: Callable[[dict[str, list]], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """Local files through ``datasets.load_dataset``, readable by torch.

    Args:
        builder: One of `LOCAL_BUILDERS`: ``csv``, ``json``, ``parquet`` or ``text`` (with
            ``data_files``), ``imagefolder`` / ``audiofolder`` (with ``data_dir``: one folder
            per split, ``train`` / ``validation`` / ``test``, holding one folder per label).
        data_dir: The folder of files.
        data_files: The files (a path, a list, or ``{split: paths}``).
        split: One split (a ``datasets.Dataset``); None: every split (a ``DatasetDict``).
        cache_dir: Where ``datasets`` keeps its Arrow cache (default: its own).
        transform: Applied on access with ``with_transform``: a batch of columns in, tensors out
            (see `image_transform`); for a different one per split, leave it out and give each
            split its own with `as_torch`.
        **kwargs: Passed to ``load_dataset``.

    Returns:
        A ``datasets.Dataset`` or ``DatasetDict`` as loaded; `as_torch` makes a split a torch
        dataset of dict samples (batched by torch's default collate).

    Raises:
        ValueError: If ``builder`` is not a local builder, or no files are given.
    """
    if builder not in LOCAL_BUILDERS:
        raise ValueError(
            f"The 'builder' parameter of hf_dataset must be one of "
            f"{', '.join(map(repr, LOCAL_BUILDERS))} (local files only). Got {builder!r} instead."
        )
    if data_dir is None and data_files is None:
        raise ValueError(f"hf_dataset({builder!r}) needs data_dir or data_files")
    datasets = _require("datasets")
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split and stage, every time a task is built
    try:
        loaded = datasets.load_dataset(
            builder,
            data_dir=None if data_dir is None else str(data_dir),
            data_files=data_files,
            split=split,
            cache_dir=None if cache_dir is None else str(cache_dir),
            **kwargs,
        )
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return loaded if transform is None else loaded.with_transform(transform)


class TorchView(Dataset):
    """A ``datasets.Dataset`` as a map-style torch ``Dataset`` (datasets 5 no longer derives
    from torch's class, which squeeze's splits are recognised by).

    Reads go through the wrapped dataset's ``__getitems__``, so a ``with_transform`` function
    runs once per batch. Other attributes (``features``, ``with_transform``, ...) are the
    wrapped dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return self.dataset.__getitems__(list(indices))

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TorchStream(IterableDataset):
    """A ``datasets.IterableDataset`` (streamed, no length) as a torch ``IterableDataset``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        return iter(self.dataset)


def as_torch(dataset: Any, transform: Callable[[dict[str, list]], Any] | None = None) -> Any:
    """A Hugging Face dataset as squeeze reads a split.

    A map-style ``datasets.Dataset`` becomes a `TorchView` (``transform`` set with
    ``with_transform``: run on every read, so random augmentation draws anew each epoch); a
    streamed ``datasets.IterableDataset`` a `TorchStream` (``transform`` mapped over its
    batches, also on every pass). A torch dataset is returned as it is.
    """
    if isinstance(dataset, Dataset):
        return dataset
    if hasattr(dataset, "__len__"):
        return TorchView(dataset if transform is None else dataset.with_transform(transform))
    return TorchStream(dataset if transform is None else dataset.map(transform, batched=True))


def random_affine(
    images: torch.Tensor,
    *,
    degrees: float = 0.0,
    shift: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each image rotated, scaled and shifted at random (torch ops, no torchvision).

    Args:
        images: ``(batch, channels, height, width)`` floats.
        degrees: Rotation drawn uniformly in ``[-degrees, degrees]``.
        shift: Translation drawn uniformly in ``[-shift, shift]`` of the width and height.
        scale: Zoom drawn uniformly in ``[low, high]``.
        generator: Draws the transforms (torch's global generator if None).

    Returns:
        The transformed images (same shape; what moves in from outside is 0).
    """
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-degrees, degrees) * (math.pi / 180.0)
    zoom = uniform(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, 2.0 * uniform(-shift, shift)], dim=1),
            torch.stack([sin, cos, 2.0 * uniform(-shift, shift)], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def image_transform(
    *,
    size: int | None = None,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    augment: bool = False,
    degrees: float = 10.0,
    shift: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    image_key: str = "image",
    label_key: str = "label",
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """A ``with_transform`` function: PIL images to normalised ``pixel_values`` tensors.

    Each image becomes floats in [0, 1] (``(channels, height, width)``), is resized to
    ``size`` x ``size`` (bilinear), randomly rotated, zoomed and shifted when ``augment``
    (training only: a fresh draw on every read, so no two epochs see the same images), then
    normalised as ``(x - mean) / std``.

    Args:
        size: Side of the square images the model reads (None: as stored).
        mean: Per-channel (or one) mean subtracted.
        std: Per-channel (or one) standard deviation divided by.
        augment: Whether to apply `random_affine`.
        degrees: Rotation range of the augmentation.
        shift: Shift range of the augmentation, a fraction of the side.
        scale: Zoom range of the augmentation.
        image_key: The column holding the images.
        label_key: The column holding the labels (returned as ``labels``).

    Returns:
        ``transform(batch) -> {"pixel_values": list of tensors, "labels": list of ints}``.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = torch.stack([_to_tensor(image) for image in batch[image_key]])
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        if augment:
            images = random_affine(images, degrees=degrees, shift=shift, scale=scale)
        images = (images - mean_t) / std_t
        out: dict[str, Any] = {"pixel_values": list(images)}
        if label_key in batch:
            out["labels"] = list(batch[label_key])
        return out

    return transform


def _to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (or an array) as float32 ``(channels, height, width)`` in [0, 1]."""
    import numpy as np

    array = np.array(image)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()
