"""Targets with one item per sample (a detector's: one dict of boxes and labels per image, as
torchvision's and DETR's collate functions leave them) are joined over a split as one list."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from experiments import Task, TrainConfig, evaluate
from experiments._data import cat_rows


class Boxes(Dataset):
    """Images with a varying number of boxes each."""

    def __init__(self, count: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 1, 6, 6, generator=g)
        self.counts = torch.randint(1, 4, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int):
        n = int(self.counts[i])
        return self.images[i], {"labels": torch.full((n,), i), "boxes": torch.rand(n, 4)}


def _collate(samples):
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def test_a_detectors_targets_are_one_dict_per_sample_over_the_split():
    seen = {}

    def boxes_found(outputs, targets):  # a metric on the whole split, as the user writes it
        seen["targets"] = targets
        return float(sum(len(t["labels"]) for t in targets)) / len(targets)

    data = Boxes(23)
    task = Task(
        name="boxes",
        train=data,
        val=data,
        test=data,
        num_classes=4,
        outputs="values",
        collate_fn=_collate,
        build_model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 4)),
        train_config=TrainConfig(epochs=1, batch_size=5),
        eval_batch_size=5,
        loss=lambda outputs, targets, teacher: outputs.pow(2).mean(),
        metric=boxes_found,
        higher_is_better=True,
    )
    score = evaluate(task.build_model(), task.val)
    targets = seen["targets"]
    assert isinstance(targets, list) and len(targets) == 23  # one per image, in order
    assert [len(t["labels"]) for t in targets] == data.counts.tolist()
    assert all(int(t["labels"][0]) == i for i, t in enumerate(targets))
    assert score == float(data.counts.sum()) / 23


def test_a_batched_field_list_is_still_joined_field_by_field():
    """torch's default collate makes a list of batched fields of a tuple sample: those stay a
    structure (field i of every batch joined), as do lists of tensors of the batch's rows."""
    a = [torch.zeros(4, 2), torch.ones(4)]
    b = [torch.zeros(3, 2), torch.ones(3)]
    joined = cat_rows([a, b])
    assert isinstance(joined, list) and len(joined) == 2
    assert joined[0].shape == (7, 2) and joined[1].shape == (7,)
    ragged = [[torch.zeros(2), torch.zeros(5)], [torch.zeros(1)]]  # one tensor per sample
    assert [t.shape[0] for t in cat_rows(ragged)] == [2, 5, 1]


def test_a_task_without_a_test_split_is_refused_when_built():
    """test=None (a user with train and validation data only) is refused naming the split and
    why, before any training (it crashed after the baseline's training before)."""
    import pytest

    from experiments import Split, WorkloadError

    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    with pytest.raises(WorkloadError, match=r"task 'half' has no test split \(test=None\)"):
        Task(
            name="half",
            train=Split(x, y),
            val=Split(x, y),
            test=None,
            num_classes=2,
            build_model=lambda: nn.Linear(4, 2),
            train_config=TrainConfig(epochs=1),
        )
