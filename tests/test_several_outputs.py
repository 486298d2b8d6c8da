"""A model of two heads returning a dict, and a user's loss written for the whole dict: the check
before training says that the loss gets the scored output only, and how to give it both."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import Split, Task, TrainConfig, WorkloadError
from experiments._checks import check_workload


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.main = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return {"logits": self.main(h), "aux": self.aux(h)}


def _joint(outputs, targets, teacher):  # written for the model's dict
    return F.cross_entropy(outputs["logits"], targets[:, 0]) + F.cross_entropy(
        outputs["aux"], targets[:, 1]
    )


def _task(**kwargs) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    y = torch.stack([torch.randint(0, 3, (30,), generator=g), torch.randint(0, 2, (30,))], 1)
    split = Split(x, y)
    return Task(
        name="two_heads",
        train=split,
        val=split,
        test=split,
        num_classes=3,
        build_model=_TwoHeads,
        train_config=TrainConfig(epochs=1),
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": _joint},
        {
            "metric": lambda out, y: float((out["aux"].argmax(-1) == y[:, 1]).float().mean()),
            "higher_is_better": True,
        },
    ],
)
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # (the user's bug)
def test_a_loss_or_metric_of_the_whole_dict_is_told_it_gets_the_scored_output(kwargs):
    task = _task(**kwargs)
    with pytest.raises(WorkloadError) as refused:
        check_workload(task, task.build_model())
    message = str(refused.value)
    assert "The model returns dict(logits: float32[4, 3], aux: float32[4, 2]); the loss and " in (
        message
    )
    assert "get the scored output only (float32[4, 3])" in message
    assert "Task(output=lambda out: torch.cat([out['logits'], out['aux']], -1), " in message


def test_a_loss_of_one_output_that_fails_gets_no_such_sentence():
    task = _task(loss=lambda out, y, t: out.sum() + y)  # (a wrong loss of a model of one output)
    one = dataclasses.replace(task, build_model=lambda: nn.Linear(6, 3))
    with pytest.raises(WorkloadError) as refused:
        check_workload(one, one.build_model())
    assert "The model returns" not in str(refused.value)


def test_both_outputs_as_one_tensor_pass_the_check():
    def joint(out, y, teacher):
        return F.cross_entropy(out[:, :3], y[:, 0]) + F.cross_entropy(out[:, 3:], y[:, 1])

    task = _task(
        output=lambda out: torch.cat([out["logits"], out["aux"]], -1),
        outputs="values",
        loss=joint,
        metric=lambda out, y: float((out[:, :3].argmax(-1) == y[:, 0]).float().mean()),
        higher_is_better=True,
    )
    check_workload(task, task.build_model())
