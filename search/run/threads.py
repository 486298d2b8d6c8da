"""How many torch threads a sweep trains and measures with (``threads`` in the config).

``threads: auto`` (the default) chooses per process, before the baseline is trained:

- one thread when the model's training batch (forward and backward) costs less than
  `MIN_PARALLEL_FLOPS`, or when this process's share of the cores (the cores it may run on over
  the workers of this machine) is one: a small model's operations are too short to share, and
  torch's waiting threads steal the cores other processes (other workers, other users) need;
- otherwise a short probe: a few training steps with one thread and with the share, taken in
  turn; the share is chosen only if it is at least `MIN_SPEEDUP` times faster in every round,
  so a busy machine keeps one thread.

An integer fixes the count; ``null`` keeps torch's own default (every core, which spins
threads that compete with other processes), divided among this machine's workers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from experiments import Task
from experiments.metrics import count_flops

logger = logging.getLogger(__name__)

#: Training FLOPs per batch below which one thread is used without probing. The built-in small
#: tasks (digits MLP, MNIST-1D CNN) need ~2e7; measured on the 2-core machine this project runs
#: on, two threads were slower than one up to 2.6e10 FLOPs per batch whenever another process
#: was busy (1.1-16x slower), so the threshold only keeps probes away from models whose
#: operations are far too short to share.
MIN_PARALLEL_FLOPS = 1e9
#: How much faster (wall time of a training step) several threads must be to be chosen.
MIN_SPEEDUP = 1.3
#: Rounds of the probe (each times one step with one thread and one with the share, in turn).
PROBE_ROUNDS = 3
#: A probe stops after this many seconds of steps (a very large model gets fewer rounds).
PROBE_SECONDS = 6.0


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
    setting: int | str | None, task: Task, *, batch_size: int, workers: int, model: nn.Module
) -> ThreadChoice:
    """Set torch's intra-op threads for this process from the config's ``threads`` and return
    the choice (logged).

    Args:
        setting: ``auto``, a positive integer, or None (torch's default shared among workers).
        task: The task (its training split and loss feed the probe).
        batch_size: Training batch size the choice is made for.
        workers: Worker processes on this machine sharing its cores.
        model: A model of the task's architecture; the probe trains it (pass a throwaway).
    """
    if isinstance(setting, int):
        choice = ThreadChoice(setting, "fixed by threads")
    elif setting is None:
        share = max(1, usable_cores() // workers)
        choice = ThreadChoice(
            torch.get_num_threads() if workers == 1 else share, "torch's default (threads: null)"
        )
    elif setting == "auto":
        choice = choose_threads(task, model=model, batch_size=batch_size, workers=workers)
    else:
        raise ValueError(f"threads must be 'auto', a positive int or None. Got {setting!r}.")
    torch.set_num_threads(choice.threads)
    logger.info("torch threads: %d (%s)", choice.threads, choice.reason)
    return choice


def choose_threads(
    task: Task,
    *,
    model: nn.Module,
    batch_size: int,
    workers: int,
    cores: int | None = None,
) -> ThreadChoice:
    """The rule of ``threads: auto`` (see the module docstring); probes only large models."""
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
    times = probe(task, model=model, batch_size=batch_size, candidates=(1, share))
    ratios = [one / many for one, many in zip(times[1], times[share], strict=True)]
    faster = min(ratios)
    if faster >= MIN_SPEEDUP:
        return ThreadChoice(
            share, f"auto: {share} threads were >= {faster:.2f}x faster than 1 in a probe"
        )
    return ThreadChoice(
        1,
        f"auto: {share} threads were not {MIN_SPEEDUP}x faster than 1 in a probe "
        f"(at worst {faster:.2f}x)",
    )


def probe(
    task: Task, *, model: nn.Module, batch_size: int, candidates: tuple[int, ...]
) -> dict[int, list[float]]:
    """Seconds of one training step of ``model`` with each thread count in ``candidates``,
    taken in turn (the order alternates by round), after one warm-up step each; at most
    `PROBE_ROUNDS` rounds and about `PROBE_SECONDS` seconds."""
    before = torch.get_num_threads()
    batch = task.train.calibration(samples=batch_size, batch_size=batch_size)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        loss = task.loss(task.train.forward(model, batch.inputs), batch.targets, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[int, list[float]] = {n: [] for n in candidates}
    deadline = time.monotonic() + PROBE_SECONDS
    try:
        for n in candidates:
            torch.set_num_threads(n)
            step()  # warm-up: first-call allocations, the thread pool's start
        for rnd in range(PROBE_ROUNDS):
            for n in candidates if rnd % 2 == 0 else candidates[::-1]:
                torch.set_num_threads(n)
                times[n].append(step())
            if time.monotonic() > deadline:
                break
    finally:
        torch.set_num_threads(before)
        model.eval()
    return times
