"""Workloads as users bring them (not as squeeze's own tasks are written): torch datasets with
random augmentation behind a DataLoader factory, an iterable dataset, dict batches into a Hugging
Face model that returns a ``ModelOutput``, a language model deciding per token (a GPT-2 with its
key/value cache), a model of two inputs, a regression task (scored by
R², and by MSE: a lower-is-better score), a multi-label classifier (a yes/no per tag), a
segmentation model whose logits put the classes on axis 1.

Each builder is named by ``_target_`` in ``tests/zoo_conf/task/wl_<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from experiments import Task, TrainConfig
from experiments.digits import digits_mlp


def _digits(seed: int) -> tuple[Any, Any, Any]:
    task = digits_mlp(seed=seed)
    return task.train.in_memory, task.val.in_memory, task.test.in_memory


class Pixels(Dataset):
    """Digits as ``(pixels, label)`` samples; with ``augment``, each read adds pixel noise and a
    random one-pixel shift (a fresh draw every time: no two epochs see the same images)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, augment: bool = False) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            image = x.reshape(8, 8)
            image = torch.roll(image, shifts=int(torch.randint(-1, 2, ())), dims=1)
            x = (image.reshape(64) + 0.05 * torch.randn(64)).clamp(0, 1)
        return x, self.y[i]


class Stream(IterableDataset):
    """Digits as a stream of ``(pixels, label)`` with no length."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


class SmallMLP(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 96, out: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU()
        )
        self.head = nn.Linear(hidden // 2, out)

    def forward(self, x):
        return self.head(self.body(x))


def _train(train: dict | None, default: dict) -> TrainConfig:
    return TrainConfig(**{**default, **(train or {})})


def wl_loader(*, name: str = "wl_loader", seed: int = 0, train: dict | None = None) -> Task:
    """Augmented training data through a DataLoader factory, plain datasets to evaluate."""
    tr, va, te = _digits(seed)
    augmented = Pixels(tr.x, tr.y, augment=True)

    def loader(*, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(augmented, batch_size=batch_size, shuffle=shuffle, generator=generator)

    return Task(
        name=name,
        train=loader,
        val=Pixels(va.x, va.y),
        test=Pixels(te.x, te.y),
        num_classes=10,
        build_model=SmallMLP,
        train_config=_train(train, {"epochs": 12, "lr": 3e-3}),
    )


def wl_iterable(*, name: str = "wl_iterable", seed: int = 0, train: dict | None = None) -> Task:
    """Every split an iterable dataset (no length, no shuffling)."""
    tr, va, te = _digits(seed)
    return Task(
        name=name,
        train=Stream(tr.x, tr.y),
        val=Stream(va.x, va.y),
        test=Stream(te.x, te.y),
        num_classes=10,
        build_model=SmallMLP,
        train_config=_train(train, {"epochs": 12, "lr": 3e-3}),
    )


class TwoInputs(nn.Module):
    """The left and right halves of a digit through two branches, joined."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(32, hidden), nn.ReLU())
        self.right = nn.Sequential(nn.Linear(32, hidden), nn.ReLU())
        self.head = nn.Linear(2 * hidden, 10)

    def forward(self, left, right):
        return self.head(torch.cat([self.left(left), self.right(right)], dim=1))


class Halves(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        image = x.reshape(-1, 8, 8)
        self.left = image[:, :, :4].reshape(-1, 32)
        self.right = image[:, :, 4:].reshape(-1, 32)
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.left[i], self.right[i], self.y[i]


def wl_two_inputs(*, name: str = "wl_two_inputs", seed: int = 0, train: dict | None = None):
    """``(left, right, label)`` tuples into ``model(left, right)``."""
    splits = [Halves(s.x, s.y) for s in _digits(seed)]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        build_model=TwoInputs,
        train_config=_train(train, {"epochs": 12, "lr": 3e-3}),
    )


class Tokens(Dataset):
    """Digits as token sequences: each pixel's intensity (0..16) a token id, as dicts."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.ids = (x * 16).round().long() + 1  # 0 stays the padding id
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.y[i],
        }


def tiny_bert(hidden: int = 32, heads: int = 4, layers: int = 1) -> nn.Module:
    """A Hugging Face BertForSequenceClassification from a small config, random init."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=18,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def wl_dict_bert(*, name: str = "wl_dict_bert", seed: int = 0, train: dict | None = None):
    """Dict batches (``input_ids``, ``attention_mask``, ``labels``) into a transformers model
    that returns a ``SequenceClassifierOutput`` (its ``logits`` are scored)."""
    splits = [Tokens(s.x, s.y) for s in _digits(seed)]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        build_model=tiny_bert,
        train_config=_train(train, {"epochs": 6, "lr": 2e-3, "batch_size": 32}),
    )


def _diabetes(seed: int) -> list[Any]:
    """scikit-learn's diabetes (442 patients, 10 features, standardised): train, validation and
    test datasets of 300, 71 and 71 patients (target: disease progression, standardised)."""
    data = load_diabetes()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)
    y = torch.tensor((data.target - data.target.mean()) / data.target.std(), dtype=torch.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    cuts = [0, 300, 371, len(y)]
    parts = [order[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    from torch.utils.data import TensorDataset

    return [TensorDataset(x[p], y[p, None]) for p in parts]


def wl_regression(*, name: str = "wl_regression", seed: int = 0, train: dict | None = None):
    """scikit-learn's diabetes (442 patients, 10 features): disease progression, R² scored."""
    splits = _diabetes(seed)
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=1,
        outputs="values",
        build_model=lambda: SmallMLP(features=10, hidden=64, out=1),
        train_config=_train(train, {"epochs": 40, "lr": 3e-3, "batch_size": 32}),
    )


def wl_regression_mse(
    *, name: str = "wl_regression_mse", seed: int = 0, train: dict | None = None
) -> Task:
    """`wl_regression` scored by torchmetrics' mean squared error: lower is better (its own
    ``higher_is_better`` is False), so the search minimizes ``val_acc``."""
    from torchmetrics.regression import MeanSquaredError

    task = wl_regression(name=name, seed=seed, train=train)
    return dataclasses.replace(task, metric=MeanSquaredError(), higher_is_better=None)


class Counting(Dataset):
    """Sequences of a counting language (a start token, then +1, +2 or +3 modulo `VOCAB`), as
    a language model's dict batches: ``input_ids`` and, at each position, the next token as
    its label (the last position's -100: nothing follows it)."""

    VOCAB, LENGTH = 24, 12

    def __init__(self, samples: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, self.VOCAB, (samples, 1), generator=g)
        step = torch.randint(1, 4, (samples, 1), generator=g)
        self.ids = (start + step * torch.arange(self.LENGTH + 1)) % self.VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i, 1:].clone()
        labels[-1] = -100
        return {"input_ids": self.ids[i, :-1], "labels": labels}


def tiny_gpt2(hidden: int = 32, heads: int = 4, layers: int = 2) -> nn.Module:
    """A Hugging Face GPT2LMHeadModel from a small config as users write one: its key/value
    cache on (the default), so its output holds a ``DynamicCache`` beside the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=Counting.VOCAB,
        n_positions=Counting.LENGTH,
        n_embd=hidden,
        n_head=heads,
        n_layer=layers,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def wl_tokens(*, name: str = "wl_tokens", seed: int = 0, train: dict | None = None) -> Task:
    """A decision per position: a language model's ``(batch, tokens, vocabulary)`` logits
    scored by the default loss and top-1 accuracy over positions (labels -100 left out)."""
    return Task(
        name=name,
        train=Counting(600, seed),
        val=Counting(120, seed + 1),
        test=Counting(120, seed + 2),
        num_classes=Counting.VOCAB,
        build_model=tiny_gpt2,
        train_config=_train(train, {"epochs": 6, "lr": 3e-3, "batch_size": 32}),
    )


#: `wl_multilabel`'s tags of a digit: even, above 4, prime, drawn with a loop.
TAGS = (
    lambda d: d % 2 == 0,
    lambda d: d > 4,
    lambda d: d in (2, 3, 5, 7),
    lambda d: d in (0, 6, 8, 9),
)


class Tagged(Pixels):
    """Digits as dict batches ``{"x": pixels, "labels": multi-hot tags}`` (`TAGS`), augmented
    as `Pixels`."""

    def __getitem__(self, i: int) -> dict:
        x, digit = super().__getitem__(i)
        return {"x": x, "labels": torch.tensor([float(tag(int(digit))) for tag in TAGS])}


def wl_multilabel(*, name: str = "wl_multilabel", seed: int = 0, train: dict | None = None):
    """A multi-label classifier: four yes/no tags per digit, from augmented dict batches
    (binary cross-entropy, per-label accuracy and agreement by default)."""
    tr, va, te = _digits(seed)
    return Task(
        name=name,
        train=Tagged(tr.x, tr.y, augment=True),
        val=Tagged(va.x, va.y),
        test=Tagged(te.x, te.y),
        num_classes=len(TAGS),
        outputs="multilabel",
        build_model=lambda: SmallMLP(out=len(TAGS)),
        train_config=_train(train, {"epochs": 12, "lr": 3e-3}),
    )


class Inked(Dataset):
    """Digits as a segmentation task: ``(image (1, 8, 8), mask (8, 8))``, each pixel labelled
    background (0), ink of a digit below 5 (1) or of one from 5 up (2), faint ink -100
    (ignored); with ``augment``, a random horizontal flip of both at every read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, augment: bool = False) -> None:
        self.images = x.reshape(-1, 1, 8, 8)
        ink = self.images[:, 0]
        classes = torch.where(y >= 5, 2, 1).reshape(-1, 1, 1)
        self.masks = torch.where(ink > 0.5, classes, 0)
        self.masks[(ink > 0.1) & (ink <= 0.5)] = -100
        self.augment = augment

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[i], self.masks[i]
        if self.augment and bool(torch.rand(()) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class TinySegNet(nn.Module):
    """Convolutions with BatchNorm to per-pixel logits ``(batch, 3, 8, 8)``: classes on axis 1,
    as torch's segmentation models return them."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def pixel_ce(outputs: torch.Tensor, targets: torch.Tensor, teacher: Any) -> torch.Tensor:
    """The user's own loss, on ``(batch, classes, height, width)`` logits as torch takes them."""
    assert outputs.shape[1] == 3, outputs.shape  # the model's layout, not squeeze's
    return nn.functional.cross_entropy(outputs, targets, ignore_index=-100)


def wl_segmentation(*, name: str = "wl_segmentation", seed: int = 0, train: dict | None = None):
    """Semantic segmentation: logits ``(batch, classes, 8, 8)`` (``class_axis=1``), the user's
    own channel-first loss and torchmetrics' mean IoU, augmented tuple batches."""
    from torchmetrics.classification import MulticlassJaccardIndex

    tr, va, te = _digits(seed)
    return Task(
        name=name,
        train=Inked(tr.x, tr.y, augment=True),
        val=Inked(va.x, va.y),
        test=Inked(te.x, te.y),
        num_classes=3,
        class_axis=1,
        build_model=TinySegNet,
        train_config=_train(train, {"epochs": 6, "lr": 3e-3}),
        loss=pixel_ce,
        metric=MulticlassJaccardIndex(num_classes=3, ignore_index=-100),
    )
