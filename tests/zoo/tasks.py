"""The zoo's task builders: one function per task, named by ``_target_`` in
``tests/zoo_conf/task/<name>.yaml``; the yaml's other keys and ``seed`` are its keyword arguments.

The image and sequence tasks use scikit-learn's digits with the very splits of ``digits_mlp``
(`experiments.digits.digits_mlp`, 1,077 / 360 / 360 images), shaped as a model of that family
takes them: ``(1, 8, 8)`` images, or 8 rows of 8 pixels as a sequence. ``zoo_tied`` predicts a
pixel's intensity from the 8 pixels before it, ``zoo_minilm`` is the ``minilm`` task with the
encoder cut to its first layers.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Any

import numpy as np
import torch

from experiments import Split, Task, TrainConfig
from experiments.digits import digits_mlp
from tests.zoo.models import (
    MobileNet,
    RecurrentClassifier,
    ResNet,
    TiedNextToken,
    TransformerClassifier,
)

#: Token values of a digits pixel: intensities 0..16.
PIXEL_VOCAB = 17


def _digits(
    shape: tuple[int, ...], *, seed: int, val_fraction: float, test_fraction: float
) -> tuple[Split, Split, Split]:
    """``digits_mlp``'s splits (pixels scaled to [0, 1]) with each image reshaped to ``shape``."""
    task = digits_mlp(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return tuple(
        Split(s.x.reshape(-1, *shape).contiguous(), s.y) for s in (task.train, task.val, task.test)
    )


def _digits_task(
    name: str,
    build_model,
    shape: tuple[int, ...],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    train: dict[str, Any] | None,
    default_train: dict[str, Any],
) -> Task:
    splits = _digits(shape, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        build_model=build_model,
        train_config=TrainConfig(**(train or default_train)),
    )


def zoo_resnet(
    *,
    name: str = "zoo_resnet",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    width: int = 16,
    train: dict[str, Any] | None = None,
) -> Task:
    """Digits as ``(1, 8, 8)`` images and a ResNet-style CNN (`ResNet`)."""
    return _digits_task(
        name,
        partial(ResNet, 1, 10, width=width),
        (1, 8, 8),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train=train,
        default_train={"epochs": 6, "lr": 0.003},
    )


def zoo_mobilenet(
    *,
    name: str = "zoo_mobilenet",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    widths: tuple[int, ...] = (16, 32, 64),
    strides: tuple[int, ...] = (1, 2),
    train: dict[str, Any] | None = None,
) -> Task:
    """Digits as ``(1, 8, 8)`` images and a depthwise-separable CNN (`MobileNet`)."""
    return _digits_task(
        name,
        partial(MobileNet, 1, 10, widths=tuple(widths), strides=tuple(strides)),
        (1, 8, 8),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train=train,
        default_train={"epochs": 12, "lr": 0.005},
    )


def zoo_transformer(
    *,
    name: str = "zoo_transformer",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    d_model: int = 32,
    nhead: int = 4,
    dim_feedforward: int = 64,
    num_layers: int = 2,
    dropout: float = 0.1,
    train: dict[str, Any] | None = None,
) -> Task:
    """Digits as 8 tokens (rows) of 8 features and torch's ``nn.TransformerEncoder``
    (`TransformerClassifier`)."""
    model = partial(
        TransformerClassifier,
        8,
        8,
        10,
        d_model=d_model,
        nhead=nhead,
        dim_feedforward=dim_feedforward,
        num_layers=num_layers,
        dropout=dropout,
    )
    return _digits_task(
        name,
        model,
        (8, 8),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train=train,
        default_train={"epochs": 15, "lr": 0.003},
    )


def zoo_lstm(
    *,
    name: str = "zoo_lstm",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    hidden: int = 48,
    num_layers: int = 2,
    train: dict[str, Any] | None = None,
) -> Task:
    """Digits as 8 steps (rows) of 8 features and a 2-layer ``nn.LSTM`` classifier."""
    model = partial(RecurrentClassifier, 8, 10, cell="lstm", hidden=hidden, num_layers=num_layers)
    return _rows_task(name, model, seed, val_fraction, test_fraction, train, lr=0.01)


def zoo_gru(
    *,
    name: str = "zoo_gru",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    hidden: int = 32,
    train: dict[str, Any] | None = None,
) -> Task:
    """Digits as 8 steps (rows) of 8 features and a bidirectional 1-layer ``nn.GRU`` classifier."""
    model = partial(
        RecurrentClassifier, 8, 10, cell="gru", hidden=hidden, num_layers=1, bidirectional=True
    )
    return _rows_task(name, model, seed, val_fraction, test_fraction, train, lr=0.005)


def digits_cnn1d() -> Task:
    """Digits' 64 pixels as a 1-D signal through MNIST-1D's CNN (three Conv1d and a Linear
    head), untrained: one epoch if a test trains it."""
    from experiments.models import ConvNet1d

    digits = digits_mlp(seed=0)
    return Task(
        name="digits_cnn1d",
        train=digits.train,
        val=digits.val,
        test=digits.test,
        num_classes=10,
        build_model=partial(ConvNet1d, 64, 10),
        train_config=TrainConfig(epochs=1),
    )


def _rows_task(name, model, seed, val_fraction, test_fraction, train, *, lr: float) -> Task:
    """A digits task whose inputs are 8 rows of 8 pixels (a sequence model's 8 steps)."""
    return _digits_task(
        name,
        model,
        (8, 8),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        train=train,
        default_train={"epochs": 15, "lr": lr},
    )


def zoo_tied(
    *,
    name: str = "zoo_tied",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    context: int = 8,
    positions_per_image: int = 4,
    dim: int = 24,
    train: dict[str, Any] | None = None,
) -> Task:
    """Next pixel intensity on digits with an embedding tied to the output layer (`TiedNextToken`).

    Tokens are pixel intensities 0..16. A sample is ``context`` pixels in row-major order and
    the intensity of the pixel after them (17 classes). ``positions_per_image`` positions are
    drawn (seeded) from each image of ``digits_mlp``'s splits, so no image is in two splits.
    """
    if not 1 <= context < 64:
        raise ValueError(
            f"The 'context' parameter of task {name!r} must be an int in [1, 63]. "
            f"Got {context!r} instead."
        )
    images = _digits((64,), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    rng = np.random.default_rng(seed)
    splits = [_next_pixel(s, rng, context=context, per_image=positions_per_image) for s in images]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=PIXEL_VOCAB,
        build_model=partial(TiedNextToken, PIXEL_VOCAB, dim=dim),
        train_config=TrainConfig(**(train or {"epochs": 10, "lr": 0.003})),
    )


def _next_pixel(split: Split, rng: np.random.Generator, *, context: int, per_image: int) -> Split:
    pixels = torch.round(split.x * (PIXEL_VOCAB - 1)).long()  # back to the intensities 0..16
    rows = np.repeat(np.arange(len(pixels)), per_image)
    ends = torch.from_numpy(rng.integers(context, pixels.shape[1], size=len(rows)))
    rows = torch.from_numpy(rows)
    window = ends[:, None] - context + torch.arange(context)
    return Split(pixels[rows[:, None], window], pixels[rows, ends])


def zoo_minilm(
    *,
    name: str = "zoo_minilm",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_length: int = 32,
    layers: int = 1,
    trim_vocabulary: bool = True,
    train: dict[str, Any] | None = None,
) -> Task:
    """The ``minilm`` task (`experiments.minilm.minilm`) with the encoder cut to its first
    ``layers`` transformer layers; the targets are that cut model's own embeddings, so the
    baseline scores 1.0 and is not trained (``epochs`` 0). With ``trim_vocabulary`` the token
    table keeps only the rows of the tokens the sentences use (ids renumbered, ``[PAD]`` stays
    0): the same BERT structure, 1.9M parameters instead of 13.7M, so tests run fast."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from experiments._training import predict_outputs
    from experiments.minilm import minilm

    task = minilm(
        name=name,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_length=max_length,
        train=train or {"epochs": 0},
    )
    splits = [task.train.in_memory, task.val.in_memory, task.test.in_memory]
    vocabulary = None
    if trim_vocabulary:
        used = torch.unique(torch.cat([s.x.flatten() for s in splits] + [torch.zeros(1).long()]))
        vocabulary = tuple(used.tolist())  # sorted, [PAD] = 0 first
        splits = [dataclasses.replace(s, x=torch.searchsorted(used, s.x)) for s in splits]
    build = partial(cut_encoder, layers=layers, vocabulary=vocabulary)
    model = build()
    splits = [dataclasses.replace(s, y=predict_outputs(model, s.x).contiguous()) for s in splits]
    return dataclasses.replace(
        task, train=splits[0], val=splits[1], test=splits[2], build_model=build
    )


def cut_encoder(*, layers: int = 1, vocabulary: tuple[int, ...] | None = None) -> torch.nn.Module:
    """all-MiniLM-L6-v2 (`experiments.minilm.load_encoder`) keeping its first ``layers`` layers
    (and, given ``vocabulary``, only those token rows, renumbered in that order)."""
    from experiments.minilm import load_encoder

    encoder = load_encoder()
    bert = encoder.bert
    if not 1 <= layers <= len(bert.encoder.layer):
        raise ValueError(
            f"The 'layers' parameter must be an int in [1, {len(bert.encoder.layer)}]. "
            f"Got {layers!r} instead."
        )
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    if vocabulary is not None:
        table = bert.embeddings.word_embeddings
        rows = table.weight.detach()[torch.tensor(vocabulary)]
        bert.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(rows, freeze=True)
        bert.config.vocab_size = len(vocabulary)
    return encoder
