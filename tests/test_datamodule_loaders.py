"""A LightningDataModule's loaders as a task's splits: ``dm.train_dataloader`` (a method of no
arguments) is called for each pass and its DataLoader iterated as it is."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments import Task, TrainConfig, check_workload, evaluate, fit


class DataModule:
    """The shape of Lightning's DataModule: loaders built by methods of no arguments."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
        self.calls = 0

    def train_dataloader(self) -> DataLoader:
        self.calls += 1
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def test_a_datamodules_loader_methods_are_splits():
    dm = DataModule()
    task = Task(
        name="dm",
        train=dm.train_dataloader,
        val=dm.val_dataloader,
        test=dm.val_dataloader,
        num_classes=3,
        build_model=lambda: nn.Linear(6, 3),
        train_config=TrainConfig(epochs=3, lr=0.05),
    )
    torch.manual_seed(0)
    model = task.build_model()
    check_workload(task, model)  # (before: "got an unexpected keyword argument 'batch_size'")
    calls = dm.calls
    fit(model, task.train, epochs=3, batch_size=4, lr=0.05, seed=0)
    assert dm.calls == calls + 3  # a fresh loader each epoch, as Lightning's trainer asks
    expected = (model(dm.x).argmax(1) == dm.y).float().mean().item()
    assert evaluate(model, task.val) == expected
