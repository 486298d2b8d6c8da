"""A task whose training data is a DataLoader of the user's: squeeze reads it as it is, so the
sweep says that the recipe's ``finetune.batch_size`` (printed in every recipe) does not apply."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments import Task, TrainConfig


def loader_task(*, name: str = "own_loader", seed: int = 0, train: dict | None = None) -> Task:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g))
    return Task(
        name=name,
        train=DataLoader(data, batch_size=20, shuffle=True),
        val=data,
        test=data,
        num_classes=3,
        build_model=lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
        train_config=TrainConfig(epochs=1),
    )


def test_a_users_dataloader_is_said_to_keep_its_batch_size(tmp_path, cache_dir, caplog):
    from search import compose_config
    from search.config.plan import plan_sweep
    from search.run.study import _check_model
    from search.run.workload import build_task
    from tests.conftest import sweep_overrides

    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "own_loader.yaml").write_text(
        "_target_: tests.test_own_loader.loader_task\nname: own_loader\n"
    )
    overrides = ["task=own_loader", *sweep_overrides(tmp_path, cache_dir, space=None)]
    plan = plan_sweep(compose_config(overrides, config_dirs=[tmp_path / "conf"]))
    task = build_task(plan)
    assert task.train.own_loader == "a DataLoader (batch_size=20)"
    assert task.val.own_loader is None  # (a dataset: batched as squeeze asks)
    with caplog.at_level(logging.INFO, logger="search.run.study"):
        _check_model(plan, task, task.build_model())
    assert (
        "task 'own_loader': its training data is a DataLoader (batch_size=20), read as it is, "
        "with its own batch size and order: task.train.batch_size and the recipe's "
        "finetune.batch_size do not change it"
    ) in caplog.text
