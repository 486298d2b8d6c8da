"""How many torch threads a sweep trains and measures with (``threads`` in the config).

The thread count changes the order of floating-point reductions (convolutions especially), so
the same recipe and seed give bit-identical results only with the same count: each trial records
the count it ran with (user attribute ``threads``, MLflow param ``torch.threads``), `squeeze
export` writes it into the experiment (``threads: N``) and a study keeps the count it started
with (``threads: auto`` on a resumed sweep, ``squeeze worker``, ``report``, ``explain``).

``threads: auto`` (the default) decides by a rule that reads no clock, so that the choice does not
depend on how busy the machine is: with ``share`` the cores this process may run on divided among
the workers of this machine,

- one thread when the model's training batch (forward and backward) costs less than
  `MIN_PARALLEL_FLOPS`, or when the share is one core: a small model's operations are too short
  to share, and torch's waiting threads steal the cores other processes need;
- otherwise one thread per `MIN_PARALLEL_FLOPS` of a training batch, at most the share.

An integer fixes the count; ``null`` keeps torch's own default (every core, which spins
threads that compete with other processes), divided among this machine's workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from experiments import Task
from experiments.metrics import count_flops

logger = logging.getLogger(__name__)

#: Training FLOPs per batch below which one thread is used, and per thread above it. The
#: built-in small tasks (digits MLP, MNIST-1D CNN) need ~2e7; measured on the 2-core machine this
#: project runs on, two threads were slower than one up to 2.6e10 FLOPs per batch whenever
#: another process was busy (1.1-16x slower), so small models always get one thread.
MIN_PARALLEL_FLOPS = 1e9


@dataclass(frozen=True)
class ThreadChoice:
    """The torch threads of this process and why."""

    threads: int
    reason: str


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(
    setting: int | str | None,
    task: Task,
    *,
    batch_size: int,
    workers: int,
    model: nn.Module,
    recorded: int | None = None,
) -> ThreadChoice:
    """Set torch's intra-op threads for this process from the config's ``threads`` and return
    the choice (logged).

    Args:
        setting: ``auto``, a positive integer, or None (torch's default shared among workers).
        task: The task (its training split sizes the batch whose FLOPs are counted).
        batch_size: Training batch size the choice is made for.
        workers: Worker processes on this machine sharing its cores.
        model: A model of the task's architecture (its FLOPs are counted).
        recorded: The count the study ran with, if known: ``auto`` keeps it (a resumed sweep,
            a worker joining, a report), so that the study's results stay reproducible.
    """
    if isinstance(setting, int):
        choice = ThreadChoice(setting, "fixed by threads")
    elif setting == "auto" and recorded is not None:
        choice = ThreadChoice(int(recorded), "auto: the count the study started with")
    elif setting is None:
        share = max(1, usable_cores() // workers)
        choice = ThreadChoice(
            torch.get_num_threads() if workers == 1 else share, "torch's default (threads: null)"
        )
    elif setting == "auto":
        choice = choose_threads(task, model=model, batch_size=batch_size, workers=workers)
    else:
        raise ValueError(
            f"threads must be 'auto', a positive int or None. Got {setting!r} instead."
        )
    torch.set_num_threads(choice.threads)
    logger.info(
        "torch threads: %d (%s)", choice.threads, choice.reason, extra={"once": True}
    )  # (each worker says it too)
    return choice


def choose_threads(
    task: Task,
    *,
    model: nn.Module,
    batch_size: int,
    workers: int,
    cores: int | None = None,
) -> ThreadChoice:
    """The rule of ``threads: auto`` (see the module docstring); it reads no clock."""
    cores = usable_cores() if cores is None else cores
    share = max(1, cores // max(1, workers))
    batch = task.train.calibration(samples=batch_size, batch_size=batch_size)[0]
    flops = 3 * count_flops(model, batch.inputs)  # backward ~ twice the forward
    if flops < MIN_PARALLEL_FLOPS:
        return ThreadChoice(
            1,
            f"auto: {flops / 1e6:.0f} MFLOP per training batch of {batch.rows}, below "
            f"{MIN_PARALLEL_FLOPS / 1e9:g} GFLOP",
        )
    if share == 1:
        return ThreadChoice(1, f"auto: {cores} core(s) for {workers} worker(s)")
    threads = max(1, min(share, int(flops // MIN_PARALLEL_FLOPS)))
    return ThreadChoice(
        threads,
        f"auto: {flops / 1e9:.1f} GFLOP per training batch of {batch.rows}, one thread per "
        f"{MIN_PARALLEL_FLOPS / 1e9:g} GFLOP, at most the {share} core(s) of this worker",
    )
