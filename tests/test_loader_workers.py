"""A DataLoader set up as a GPU script sets it up (worker processes kept from pass to pass,
augmentation drawn in them, a random sampler) reads alike in a trial and in its rerun: kept
workers are started anew when a trial is seeded, and calibration samples are drawn alike."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from experiments import Task, TrainConfig, as_data, seed_everything


class _Noisy(Dataset):
    """Each read draws new noise from torch's generator (in a worker: the worker's)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        return torch.full((4,), float(i)) + torch.randn(4), i % 2


def _loader() -> DataLoader:
    data = _Noisy()
    return DataLoader(
        data, batch_size=8, num_workers=1, persistent_workers=True, sampler=RandomSampler(data)
    )


def _first(loader: DataLoader) -> torch.Tensor:
    return next(iter(loader))[0]


def test_a_seeded_pass_after_restarting_kept_workers_reads_as_a_new_process_would():
    fresh = _loader()
    seed_everything(3)
    expected = _first(fresh)
    used = _loader()
    for _ in range(2):  # passes of an earlier trial: its workers' generators moved on
        list(used)
    seed_everything(3)
    task = Task(
        name="w",
        train=used,
        val=used,
        test=used,
        num_classes=2,
        build_model=lambda: torch.nn.Linear(4, 2),
        train_config=TrainConfig(epochs=1),
    )
    task.rewind()
    assert torch.equal(_first(used), expected)
    seed_everything(3)  # (kept workers, not restarted: they draw on from where they were)
    assert not torch.equal(_first(used), expected)


def test_calibration_samples_are_the_same_whatever_ran_before_and_leave_the_callers_draws():
    loader = _loader()
    data = as_data(loader)
    first = data.calibration(samples=12, batch_size=8)
    list(loader)  # (a training pass between two trials' calibrations)
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.rand(3), np.random.rand(3)
    torch.manual_seed(5)
    np.random.seed(5)
    again = data.calibration(samples=12, batch_size=8)
    assert [b.rows for b in first] == [8, 4]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    after = torch.rand(3), np.random.rand(3)  # the caller's generators, as if not called
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_a_loader_with_its_own_generator_reads_each_trial_as_a_new_process_would():
    """DataLoader(shuffle=True, generator=torch.Generator().manual_seed(0)), as users write it:
    its order comes from its own generator, which moves on with every pass of every trial."""

    def build() -> DataLoader:
        numbers = TensorDataset(torch.arange(32), torch.arange(32) % 2)
        return DataLoader(
            numbers, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def ids(loader: DataLoader) -> list[int]:
        return next(iter(loader))[0].tolist()

    expected = ids(build())
    used = build()
    data = as_data(used)
    list(used), list(used)  # (two epochs of an earlier trial)
    assert ids(used) != expected
    data.rewind()
    assert ids(used) == expected
    moved = used.generator.get_state()
    calibrated = data.calibration(samples=8, batch_size=8)
    assert torch.equal(used.generator.get_state(), moved)  # its own draws go on as they were
    assert calibrated[0].inputs.tolist() == expected
