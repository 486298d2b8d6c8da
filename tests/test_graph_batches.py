"""Batches whose inputs are not rows of samples: a graph network's batch (nodes, edges and the
graph each node belongs to, as PyTorch Geometric collates graphs) holds as many samples as it
has targets. It is neither cut nor repeated by rows; figures per sample divide by its graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments import Task, TrainConfig, check_workload
from experiments.metrics import count_flops
from search.run.measure import measure


def _graph(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = int(torch.randint(3, 9, (1,), generator=g))
    label = int(torch.randint(0, 2, (1,), generator=g))
    src = torch.arange(n)
    dst = (src + 1) % n if label else torch.zeros(n, dtype=torch.long)  # a ring or a star
    return torch.randn(n, 4, generator=g), torch.stack([src, dst]), label


def _collate(items):
    xs, edges, owner, offset = [], [], [], 0
    for i, (x, e, _) in enumerate(items):
        xs.append(x)
        edges.append(e + offset)
        owner.append(torch.full((len(x),), i))
        offset += len(x)
    labels = torch.tensor([y for *_, y in items])
    return {
        "x": torch.cat(xs),
        "edge_index": torch.cat(edges, 1),
        "batch": torch.cat(owner),
        "labels": labels,
    }


class _GCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.conv = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x, edge_index, batch):
        h = torch.relu(self.inp(x))
        src, dst = edge_index
        h = torch.relu(self.conv(torch.zeros_like(h).index_add_(0, dst, h[src])) + h)
        graphs = int(batch.max()) + 1
        pooled = torch.zeros(graphs, h.shape[1]).index_add_(0, batch, h)
        return self.head(pooled)


def _graphs(count: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [_graph(g) for _ in range(count)]


def _task(fixed_batch: int | None = None) -> Task:
    def split(count, seed):
        data = _graphs(count, seed)
        if fixed_batch:  # the user's DataLoader, its own batch size
            return DataLoader(data, batch_size=fixed_batch, collate_fn=_collate)
        return lambda batch_size=32, shuffle=False, seed=0: DataLoader(
            data, batch_size=batch_size, shuffle=shuffle, collate_fn=_collate
        )

    return Task(
        name="graphs",
        train=split(48, 1),
        val=split(20, 2),
        test=split(20, 3),
        num_classes=2,
        build_model=_GCN,
        train_config=TrainConfig(epochs=1, batch_size=8),
    )


@pytest.mark.parametrize("fixed_batch", [None, 8])
def test_a_graph_batch_counts_its_graphs_and_is_not_cut_by_rows(fixed_batch):
    task = _task(fixed_batch)
    check_workload(task, task.build_model())  # (raised IndexError: it cut nodes and edges as rows)
    batch = next(iter(task.val.batches(32, limit=4)))
    assert batch.rows == (fixed_batch or 4)  # graphs, not nodes; a whole batch where it can't cut
    assert batch.inputs["x"].shape[0] > batch.rows
    assert len(batch.targets) == batch.rows
    inputs, samples = task.example_batch(256)  # 20 graphs: never repeated by rows
    assert samples == (fixed_batch or 20)
    assert int(inputs["batch"].max()) + 1 == samples


def test_figures_per_sample_of_a_graph_batch_divide_by_its_graphs(caplog):
    task = _task(fixed_batch=5)
    model = task.build_model()
    inputs, samples = task.example_batch(1)
    assert samples == 5
    with caplog.at_level("INFO", logger="search.run.measure"):
        metrics = measure(model, task, (1, 16), latency_repeats=3, latency_budget_s=0.5)
    assert metrics["flops"] == pytest.approx(count_flops(model, inputs) / 5)
    assert metrics["latency_rows_b16"] == 5 and metrics["latency_rows"] == 5
    assert "a batch of the validation data held 5 samples" in caplog.text
    assert metrics["peak_memory_bytes"] > 0
