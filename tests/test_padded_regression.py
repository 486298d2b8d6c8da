"""A regression per token whose labels a collate pads with -100 (as Hugging Face pads labels):
the default loss and R² leave the padding out, as the classifiers' defaults do, rather than
training the model to predict -100 there and scoring it for doing so."""

from __future__ import annotations

import torch
from torch import nn

from experiments import Task, TrainConfig, evaluate, r2_score, regression_loss


def test_the_default_regression_loss_and_r2_leave_out_labels_of_minus_100():
    outputs = torch.tensor([[1.0, 2.0, 5.0], [3.0, 0.0, 7.0]])
    targets = torch.tensor([[1.5, 2.0, -100.0], [2.0, -100.0, -100.0]])
    kept = targets != -100
    expected = ((outputs[kept] - targets[kept]) ** 2).mean()
    assert torch.isclose(regression_loss(outputs, targets, None), expected)
    a, p = targets[kept].double(), outputs[kept].double()
    r2 = 1 - ((a - p) ** 2).sum() / ((a - a.mean()) ** 2).sum()
    assert abs(r2_score(outputs, targets) - float(r2)) < 1e-9
    # no padding: as before (one R² per output column, averaged)
    full = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 5.0]])
    truth = torch.tensor([[1.0, 2.5], [2.5, 1.0], [3.0, 4.0]])
    cols = [
        1
        - ((truth[:, j] - full[:, j]) ** 2).sum() / ((truth[:, j] - truth[:, j].mean()) ** 2).sum()
        for j in range(2)
    ]
    assert abs(r2_score(full, truth) - float(sum(cols) / 2)) < 1e-6


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randn(int(n), 2, generator=g) for n in torch.randint(2, 9, (24,))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.items[i], "labels": self.items[i][:, 0]}  # the first feature


def _pad(samples: list[dict]) -> dict:
    n = max(len(s["labels"]) for s in samples)
    x = torch.zeros(len(samples), n, 2)
    y = torch.full((len(samples), n), -100.0)
    for i, s in enumerate(samples):
        x[i, : len(s["labels"])], y[i, : len(s["labels"])] = s["x"], s["labels"]
    return {"x": x, "labels": y}


class _First(nn.Module):
    """Returns each token's first feature: a perfect model, whatever it says at padding."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[..., 0]


def tokens_task(**kwargs) -> Task:
    """A per-token regression whose labels are padded with -100 (``kwargs``: more of the
    Task's fields)."""
    return Task(
        name="tokens",
        train=_Tokens(),
        val=_Tokens(),
        test=_Tokens(),
        num_classes=1,
        outputs="values",
        collate_fn=_pad,
        build_model=_First,
        train_config=TrainConfig(epochs=0, batch_size=8),
        eval_batch_size=8,
        **kwargs,
    )


def test_a_perfect_per_token_regressor_scores_r2_1_on_padded_batches():
    task = tokens_task()
    model = task.build_model()
    assert evaluate(model, task.val) == 1.0  # (was -0.75: the padding scored as -100)
    batch = next(iter(task.train.batches(8)))
    assert task.loss(model(**batch.inputs), batch.targets, None).item() == 0.0
