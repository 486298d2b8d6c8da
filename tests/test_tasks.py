"""The workloads: seeded stratified splits, baselines of the named sizes, and their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import evaluate, load_or_train_baseline
from experiments.digits import digits_mlp
from experiments.metrics import count_flops, latency_ms, nonzero_params
from experiments.mnist1d import mnist1d_cnn
from search import compose_config
from tests.conftest import DIGITS_CONFIG


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_digits_splits_are_disjoint_stratified_and_seeded(digits_task):
    sizes = digits_task.split_sizes()
    assert sizes == {"train": 1077, "val": 360, "test": 360}
    rows = [
        tuple(x.tolist())
        for s in (digits_task.train, digits_task.val, digits_task.test)
        for x in s.x
    ]
    assert len(set(rows)) >= 1797 - 20  # digits has a few duplicate images
    for split in (digits_task.val, digits_task.test):
        counts = np.bincount(split.y.numpy(), minlength=10)
        assert counts.min() >= 34 and counts.max() <= 38
    again = digits_mlp(seed=0)
    assert torch.equal(again.val.x, digits_task.val.x)
    assert not torch.equal(digits_mlp(seed=1).val.x, digits_task.val.x)


def test_digits_model_is_lenet_300_100_shaped(digits_task):
    model = digits_task.build_model()
    assert _n_params(model) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_digits_baseline_is_accurate_and_cached(digits_task, digits_baseline, cache_dir):
    assert digits_baseline.metrics["val_acc"] > 0.95
    assert digits_baseline.metrics["test_acc"] > 0.95
    again = load_or_train_baseline(
        digits_task,
        config=DIGITS_CONFIG,
        cache_dir=cache_dir,
        seed=0,
    )
    assert again.from_cache and again.key == digits_baseline.key
    assert torch.equal(again.teacher_outputs, digits_baseline.teacher_outputs)
    assert evaluate(again.model, digits_task.val) == digits_baseline.metrics["val_acc"]
    other = load_or_train_baseline(
        digits_task,
        config={"name": "digits_mlp", "train": {"epochs": 1}},
        cache_dir=cache_dir,
        seed=0,
    )
    assert not other.from_cache and other.key != digits_baseline.key


@pytest.mark.slow  # (200 epochs)
def test_mnist1d_cnn_baseline_reaches_the_published_cnn_figure_within_a_point(tmp_path):
    cfg = compose_config(["task=mnist1d_cnn", f"cache_dir={tmp_path}"]).task
    task = mnist1d_cnn(
        seed=0,
        val_fraction=cfg.val_fraction,
        channels=cfg.channels,
        data_dir=str(tmp_path / "data"),
        train=dict(cfg.train),
    )
    assert task.split_sizes() == {"train": 3200, "val": 800, "test": 1000}
    assert _n_params(task.build_model()) == 5210
    baseline = load_or_train_baseline(task, config=dict(cfg), cache_dir=tmp_path, seed=0)
    assert baseline.metrics["test_acc"] >= 0.925  # MNIST-1D's README: CNN 94% on 4,000 signals
    assert (tmp_path / "data" / "mnist1d.npz").exists()  # generated once, offline


def test_measurements(digits_task, digits_baseline):
    model = digits_baseline.model
    assert nonzero_params(model) == _n_params(model)
    x = digits_task.example_inputs(1)
    assert count_flops(model, x) == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    assert count_flops(model, digits_task.example_inputs(4)) == 4 * count_flops(model, x)
    assert latency_ms(model, x, repeats=3, warmup=1) > 0


@pytest.mark.parametrize("batch", [1, 7, 400])
def test_example_inputs_are_real_validation_rows(digits_task, batch):
    x = digits_task.example_inputs(batch)
    assert x.shape == (batch, 64)
    assert torch.equal(x[0], digits_task.val.x[0])
