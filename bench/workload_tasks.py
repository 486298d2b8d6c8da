"""Task builders for `bench/workloads.py`: the same digits data in memory and through torch's
data types, and a training split of several GB on disk read batch by batch.

Named by ``_target_: workload_tasks.<builder>`` in the config folder the bench writes (the bench
folder is put on ``sys.path``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from experiments import Split, Task, TrainConfig
from experiments.digits import digits_mlp


def _digits(seed: int, hidden: list[int], train: dict | None) -> Task:
    return digits_mlp(seed=seed, hidden=hidden, train=train or {"epochs": 40})


def _same_digits(name: str, seed: int, hidden, train, wrap) -> Task:
    """digits_mlp's task with each split given as ``wrap(split)``."""
    task = _digits(seed, list(hidden), train)
    splits = [wrap(s.in_memory) for s in (task.train, task.val, task.test)]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        build_model=task.build_model,
        train_config=task.train_config,
    )


def digits_memory(*, name="digits_memory", seed=0, hidden=(300, 100), train=None) -> Task:
    """digits_mlp itself: in-memory `Split`s."""
    return _same_digits(name, seed, hidden, train, lambda split: split)


class PerSample(Dataset):
    """A user's map-style dataset: one ``(x, y)`` sample per ``__getitem__`` (collated by
    torch's DataLoader)."""

    def __init__(self, split: Split) -> None:
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def digits_tensor_dataset(*, name="digits_tensor_dataset", seed=0, hidden=(300, 100), train=None):
    """The same data as `TensorDataset`s through torch's DataLoader."""
    return _same_digits(name, seed, hidden, train, lambda s: TensorDataset(s.x, s.y))


def digits_per_sample(*, name="digits_per_sample", seed=0, hidden=(300, 100), train=None):
    """The same data as a per-sample `Dataset` through torch's DataLoader."""
    return _same_digits(name, seed, hidden, train, PerSample)


# ----------------------------------------------------------------------------- several GB on disk

#: Features of a sample of the large task (float32): 4 KB a sample.
FEATURES = 1024


def write_large(path: Path, samples: int, *, seed: int = 0, chunk: int = 16_384) -> None:
    """Write ``samples`` rows of a 10-class Gaussian-blobs problem as float32 features followed
    by an int64 label file, chunk by chunk (never the whole array in memory)."""
    if path.exists() and path.with_suffix(".labels").exists():
        return
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, FEATURES)).astype(np.float32)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f, open(path.with_suffix(".labels.tmp"), "wb") as g:
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            labels = rng.integers(0, 10, size=n)
            rows = centres[labels] * 0.3 + rng.normal(size=(n, FEATURES)).astype(np.float32)
            f.write(rows.astype(np.float32).tobytes())
            g.write(labels.astype(np.int64).tobytes())
    os.replace(path.with_suffix(".labels.tmp"), path.with_suffix(".labels"))
    os.replace(tmp, path)


class OnDisk:
    """A loader factory reading contiguous blocks of rows from the file with plain reads (no
    memory map: the pages read are not kept in this process), in a seeded order of blocks."""

    def __init__(self, path: Path, first: int, count: int) -> None:
        self.path, self.first, self.count = path, first, count

    def __call__(self, *, batch_size: int, shuffle: bool, seed: int):
        starts = np.arange(self.first, self.first + self.count, batch_size)
        if shuffle:
            np.random.default_rng(seed).shuffle(starts)
        row = FEATURES * 4
        with open(self.path, "rb") as f, open(self.path.with_suffix(".labels"), "rb") as g:
            for start in starts:
                n = int(min(batch_size, self.first + self.count - start))
                f.seek(int(start) * row)
                x = torch.from_numpy(np.frombuffer(f.read(n * row), np.float32).reshape(n, -1))
                g.seek(int(start) * 8)
                y = torch.from_numpy(np.frombuffer(g.read(n * 8), np.int64).copy())
                yield x, y


def large_on_disk(*, name="large_on_disk", seed=0, path="", samples=1_000_000, train=None):
    """A blobs task whose training split is ``samples`` x 4 KB on disk (4 GB at a million),
    read batch by batch; validation and test are 4,096 rows each after it."""
    file = Path(path)
    write_large(file, samples + 8192, seed=seed)
    return Task(
        name=name,
        train=OnDisk(file, 0, samples),
        val=OnDisk(file, samples, 4096),
        test=OnDisk(file, samples + 4096, 4096),
        num_classes=10,
        build_model=lambda: nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 10)),
        train_config=TrainConfig(**(train or {"epochs": 1, "batch_size": 512, "lr": 1e-3})),
        eval_batch_size=1024,
    )
