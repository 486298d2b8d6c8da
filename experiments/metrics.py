"""Measurements of a model as shipped: nonzero parameters, FLOPs and CPU latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def nonzero_params(model: nn.Module) -> int:
    """Number of nonzero entries in the model's parameters."""
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


@torch.no_grad()
def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``inputs``, as counted by torch's ``FlopCounterMode``.

    Dense kernels do the same work for zero and nonzero weights, so unstructured sparsity does
    not lower this count; only smaller layers do.
    """
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs)
    return int(counter.get_total_flops())


@torch.no_grad()
def latency_ms(
    model: nn.Module, inputs: torch.Tensor, *, repeats: int = 30, warmup: int = 5
) -> float:
    """Median wall time of one forward pass in milliseconds, after ``warmup`` untimed passes."""
    model.eval()
    for _ in range(warmup):
        model(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
