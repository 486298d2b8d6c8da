"""The one way to get a sweep's task and its trained baseline, on the configured device.

Every command (`sweep`, `run`, `report`, `sensitivity`) and every bench calls `load_workload`:
it checks the config (`plan_sweep`), builds the task, lets the caller check the model before
anything is trained, sets torch's threads (``threads``, `search.run.threads`), then loads the
cached baseline or trains it on ``device`` (``cuda`` with ``device=cuda``, or ``auto`` and a GPU).

The task's model is built once before training: a caller that built (and checked) one passes it
on as ``fresh`` (`experiments.build_fresh`), and it is the model threads are chosen for and the
baseline is trained as (or loaded into). `check_memory` refuses a model a trial's copies would
not fit in this machine's memory, before the baseline is trained or copied.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from search._errors import ConfigError, SweepStopped
from search.config.device import training_device
from search.config.plan import SweepPlan, plan_sweep

if TYPE_CHECKING:
    from torch import nn

    from experiments import Baseline, FreshModel, Task

#: ``progress(stage, done, total)`` while a baseline is made (see `load_or_train_baseline`).
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Workload:
    """A checked sweep config, its task, and the task's trained baseline.

    Attributes:
        plan: The checked config (`plan_sweep`).
        task: Data splits and model builder.
        baseline: The cached trained baseline and its outputs on the training split.
        device: Where training runs: ``cuda``, or None for the CPU (models live on the CPU in
            between).
    """

    plan: SweepPlan
    task: Task
    baseline: Baseline
    device: str | None


def load_workload(
    cfg: DictConfig,
    *,
    plan: SweepPlan | None = None,
    connect: bool = True,
    task: Task | None = None,
    check: Callable[[Task], None] | None = None,
    progress: Progress | None = None,
    recorded_threads: int | None = None,
    fresh: FreshModel | None = None,
) -> Workload:
    """The task of ``cfg`` and its baseline, trained (on the configured device) if not cached.

    Args:
        cfg: A composed squeeze config.
        plan: ``cfg``'s plan when the caller has made it already.
        connect: Whether planning checks the storage and tracking connections.
        task: The task of ``plan`` when the caller has built (and checked) it already.
        check: Called with the built task before its baseline is loaded or trained (checks that
            must fail before any training: the space against the model, say).
        progress: Reports the baseline's training and teacher outputs when it is made.
        recorded_threads: The torch threads the study ran with, kept by ``threads: auto``
            (`set_workload_threads`).
        fresh: ``task``'s model built with ``cfg.seed`` by the caller (`experiments.build_fresh`,
            which `search.run.study.checked_task` checked): used for the threads and as the
            baseline's model instead of building others.
    """
    from experiments import build_fresh

    plan = plan if plan is not None else plan_sweep(cfg, connect=connect)
    task = task if task is not None else build_task(plan)
    if check is not None:
        check(task)
    if fresh is None:  # the one model built before training
        fresh = build_fresh(task, int(cfg.seed))
    set_workload_threads(plan, task, recorded=recorded_threads, model=fresh.model)
    device = training_device(cfg)
    baseline = load_baseline(
        task, plan.task_kwargs, cfg, device=device, progress=progress, fresh=fresh
    )
    return Workload(plan, task, baseline, device)


def build_task(plan: SweepPlan) -> Task:
    """The task of ``plan``; a task that refuses its own settings (a metric with no direction,
    say) is a config error (exit 2, before any work)."""
    from experiments import WorkloadError

    builder = plan.task_builder
    try:
        return builder(**plan.task_kwargs)
    except WorkloadError as err:
        raise ConfigError(str(err)) from err
    except Exception as err:  # the user's own code failed: where, and what it said
        frame = traceback.extract_tb(err.__traceback__)[-1]
        name = f"{builder.__module__}.{getattr(builder, '__qualname__', builder)}"
        raise ConfigError(
            f"task._target_ {name} raised {type(err).__name__}: {err} (at {frame.filename}:"
            f"{frame.lineno}, in {frame.name}); fix the task's function or its yaml's keys "
            f"({', '.join(sorted(plan.task_kwargs)) or 'none'})"
        ) from err


def check_task(task: Task, model: Any, cfg: DictConfig) -> None:
    """Refuse a workload whose data, model call, outputs, loss or metric do not work together
    (`experiments.check_workload`), or whose data the sweep cannot use as configured (K-fold
    needs it in memory), as a config error before any training."""
    from experiments import WorkloadError, check_workload, load_checkpoint

    checkpoint = cfg.get("checkpoint") or task.checkpoint
    try:
        if checkpoint is not None:  # the pretrained weights fit the model
            load_checkpoint(model, checkpoint)
        check_workload(task, model)
    except WorkloadError as err:
        raise ConfigError(str(err)) from err
    if cfg.search.get("cv_folds") and (task.train.in_memory is None or task.val.in_memory is None):
        raise ConfigError(
            f"search.cv_folds needs task {task.name!r}'s train and validation data held in "
            f"memory (a Split) to refold them; its data is a "
            f"{type(task.train.source).__name__}, read batch by batch. Use search.cv_folds=null."
        )


#: Validation samples whose baseline outputs `check_baseline` checks are finite.
CHECK_SAMPLES = 1024
#: How far above chance (1 / classes) a classifier's baseline accuracy must be, in standard
#: errors of a random guesser's accuracy on the validation split (at least `MIN_MARGIN`).
CHANCE_ERRORS = 3.0
MIN_MARGIN = 0.01


def check_baseline(task: Task, baseline: Baseline) -> None:
    """Refuse a baseline that is not worth compressing, before any trial: one whose scores or
    outputs on validation (in eval mode) are not finite, or a classifier scored by accuracy
    that does no better than chance (``1 / num_classes``, plus `CHANCE_ERRORS` standard errors
    of a random guesser's accuracy on the validation split).

    Raises:
        ConfigError: Naming the task, the metric, its value and what to change (exit 2; the
            baseline is cached by then, no trial has run).
    """
    import math

    import torch

    from experiments import accuracy

    fix = (
        f"Fix the task's model or its training (task.train: {task.train_config}), or give a "
        "trained checkpoint=."
    )
    for key in ("val_acc", "test_acc"):
        value = baseline.metrics.get(key)
        if value is not None and not math.isfinite(float(value)):
            raise ConfigError(
                f"The baseline of task {task.name!r} has {key}={value}: not a finite score, so "
                f"no trial can be compared with it; no trial was run. {fix}"
            )
    model = baseline.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in task.val.batches(256, limit=CHECK_SAMPLES):
                outputs = task.val.forward(model, batch.inputs)
                bad = int((~torch.isfinite(outputs)).sum())
                if bad:
                    raise ConfigError(
                        f"The baseline of task {task.name!r} outputs NaN or inf in eval mode on "
                        f"validation ({bad} of {outputs.numel()} values of a batch of "
                        f"{batch.rows}); no trial was run. {fix}"
                    )
    finally:
        model.train(was_training)
    value = baseline.metrics.get("val_acc")
    if task.outputs != "logits" or task.metric is not accuracy or value is None:
        return
    chance = 1.0 / max(int(task.num_classes), 1)
    n = len(task.val) if task.val.sized() else 0
    margin = max(MIN_MARGIN, CHANCE_ERRORS * math.sqrt(chance * (1 - chance) / n) if n else 0.02)
    if float(value) <= chance + margin:
        raise ConfigError(
            f"The baseline of task {task.name!r} has val_acc={float(value):.4f}: no better than "
            f"chance (1/{task.num_classes} classes = {chance:.4f}, + {margin:.4f}: "
            f"{CHANCE_ERRORS:g} standard errors of a random guess on {n or 'the'} validation "
            f"samples); compressing it means nothing, and no trial was run. {fix}"
        )


def set_workload_threads(
    plan: SweepPlan,
    task: Task,
    *,
    recorded: int | None = None,
    model: nn.Module | None = None,
) -> int:
    """Set torch's threads of this process from ``threads`` (auto, a count or null; see
    `search.run.threads`) for the trials' batch size when the space fixes it, else the
    baseline's, and return the count. The workers sharing this machine's cores are those a
    sweep started (`WORKERS_ENV` in each), else ``search.n_jobs`` (a sweep's parent process).
    ``model``: the task's model, already built (its FLOPs are counted; its state and mode are
    left as they were); None: one is built."""
    from search.run.threads import set_threads

    cfg = plan.cfg
    batch_size = cfg.space.get("finetune", {}).get("batch_size")
    if not isinstance(batch_size, int):
        batch_size = task.train_config.batch_size
    model = task.build_model() if model is None else model
    modes = {m: m.training for m in model.modules()}
    try:
        choice = set_threads(
            cfg.threads,
            task,
            batch_size=batch_size,
            workers=local_workers(plan),
            model=model,
            recorded=recorded,
        )
    finally:
        for module, training in modes.items():
            module.train(training)
    return choice.threads


def local_workers(plan: SweepPlan) -> int:
    """Workers sharing this machine: those a sweep started (`WORKERS_ENV` in each), else
    ``search.n_jobs``."""
    from search.run.workers import WORKERS_ENV

    return int(os.environ.get(WORKERS_ENV, plan.n_jobs))


#: Copies of a model's state a trial holds in this machine's memory, training on the CPU: the
#: cached baseline, the trial's copy, its gradients, Adam's two moments, and the shipped model
#: reloaded beside them. Training elsewhere (``cuda``), the host holds the baseline, the trial's
#: copy on its way there and the shipped model (the device's own memory is not checked).
TRIAL_COPIES = {"cpu": 6, "device": 3}


def available_memory_bytes() -> tuple[int, str] | None:
    """``(bytes, where it was read)``: memory available to new allocations without swapping
    (psutil's ``available``, else ``MemAvailable`` of /proc/meminfo); None where neither
    says."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available), "psutil.virtual_memory().available"
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return (int(found.group(1)) * 1024, "MemAvailable in /proc/meminfo") if found else None


def check_memory(
    task_name: str,
    model: nn.Module,
    *,
    device: str | None = None,
    workers: int = 1,
    available: tuple[int, str] | None = None,
) -> None:
    """Refuse a model whose trials would not fit in this machine's memory, before its baseline
    is trained or copied: the bytes of its parameters and buffers, times `TRIAL_COPIES`, times
    the ``workers`` sharing the machine, against the memory available.

    Args:
        task_name: The task, for the message.
        model: The task's model, built once.
        device: Where trials train (None: the CPU).
        workers: Trial processes on this machine (each holds its own copies).
        available: ``(bytes, source)``; None: read now (`available_memory_bytes`). Nothing is
            checked where it cannot be read.

    Raises:
        ConfigError: Naming the model's size, the memory needed and the memory available
            (exit 2).
    """
    available = available if available is not None else available_memory_bytes()
    if available is None:
        return
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied ones once
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(t.numel() for t in {id(p): p for p in model.parameters()}.values())
    copies = TRIAL_COPIES["cpu" if device is None or device == "cpu" else "device"]
    needed = size * copies * max(1, workers)
    free, source = available
    if needed > free:
        per = f" x {workers} workers (search.n_jobs)" if workers > 1 else ""
        raise ConfigError(
            f"Task {task_name!r}: its model has {params:,} parameters ({_gb(size)} of weights "
            f"and buffers); a trial holds about {copies} copies of them{per}, "
            f"{_gb(needed)}, but this machine has {_gb(free)} of memory available ({source}). "
            "Use a smaller model, fewer search.n_jobs, or a machine with more memory."
        )


def _gb(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def load_baseline(
    task: Task,
    task_config: Mapping[str, Any],
    cfg: DictConfig,
    *,
    device: str | None,
    progress: Progress | None = None,
    fresh: FreshModel | None = None,
) -> Baseline:
    """The baseline of ``task`` for ``task_config`` (cached under ``cfg.cache_dir``, seeded by
    ``cfg.seed``), trained on ``device`` if absent; ``fresh``: the task's model built with that
    seed already (`experiments.build_fresh`), trained or loaded instead of another."""
    from experiments import NonFiniteLossError, load_or_train_baseline

    try:
        return load_or_train_baseline(
            task,
            config=task_config,
            cache_dir=cfg.cache_dir,
            seed=int(cfg.seed),
            device=device,
            progress=progress,
            checkpoint=cfg.get("checkpoint"),
            fresh=fresh,
        )
    except NonFiniteLossError as err:  # the user's data or settings: say which, no traceback
        raise SweepStopped(
            f"the baseline of task {task.name!r} (seed {cfg.seed}) cannot be trained: {err}"
        ) from err


def baseline_file_size(baseline: Baseline) -> int:
    """Bytes of the baseline's packed fp32 file (what compression ratios are measured against),
    written once next to the cached baseline."""
    from compressors import save_packed
    from compressors.packing import MAGIC

    path = baseline.folder / "model.sqz"
    if not path.exists() or path.read_bytes()[: len(MAGIC)] != MAGIC:  # absent, or older format
        tmp = path.with_name(f"model.sqz.tmp-{os.getpid()}")
        try:
            save_packed(baseline.model, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.stat().st_size
