"""The one way to get a sweep's task and its trained baseline, on the configured device.

Every command (`sweep`, `run`, `report`, `sensitivity`) and every bench calls `load_workload`:
it checks the config (`plan_sweep`), builds the task, lets the caller check the model before
anything is trained, sets torch's threads (``threads``, `search.run.threads`), then loads the
cached baseline or trains it on ``device`` (``cuda`` with ``device=cuda``, or ``auto`` and a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from search._errors import ConfigError
from search.config.device import training_device
from search.config.plan import SweepPlan, plan_sweep

if TYPE_CHECKING:
    from experiments import Baseline, Task

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
    """
    plan = plan if plan is not None else plan_sweep(cfg, connect=connect)
    task = task if task is not None else build_task(plan)
    if check is not None:
        check(task)
    set_workload_threads(plan, task, recorded=recorded_threads)
    device = training_device(cfg)
    baseline = load_baseline(task, plan.task_kwargs, cfg, device=device, progress=progress)
    return Workload(plan, task, baseline, device)


def build_task(plan: SweepPlan) -> Task:
    """The task of ``plan``; a task that refuses its own settings (a metric with no direction,
    say) is a config error (exit 2, before any work)."""
    from experiments import WorkloadError

    try:
        return plan.task_builder(**plan.task_kwargs)
    except WorkloadError as err:
        raise ConfigError(str(err)) from err


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


def set_workload_threads(plan: SweepPlan, task: Task, *, recorded: int | None = None) -> int:
    """Set torch's threads of this process from ``threads`` (auto, a count or null; see
    `search.run.threads`) for the trials' batch size when the space fixes it, else the
    baseline's, and return the count. The workers sharing this machine's cores are those a
    sweep started (`WORKERS_ENV` in each), else ``search.n_jobs`` (a sweep's parent process)."""
    from search.run.threads import set_threads
    from search.run.workers import WORKERS_ENV

    cfg = plan.cfg
    batch_size = cfg.space.get("finetune", {}).get("batch_size")
    if not isinstance(batch_size, int):
        batch_size = task.train_config.batch_size
    workers = int(os.environ.get(WORKERS_ENV, plan.n_jobs))
    choice = set_threads(
        cfg.threads,
        task,
        batch_size=batch_size,
        workers=workers,
        model=task.build_model(),
        recorded=recorded,
    )
    return choice.threads


def load_baseline(
    task: Task,
    task_config: Mapping[str, Any],
    cfg: DictConfig,
    *,
    device: str | None,
    progress: Progress | None = None,
) -> Baseline:
    """The baseline of ``task`` for ``task_config`` (cached under ``cfg.cache_dir``, seeded by
    ``cfg.seed``), trained on ``device`` if absent."""
    from experiments import load_or_train_baseline

    return load_or_train_baseline(
        task,
        config=task_config,
        cache_dir=cfg.cache_dir,
        seed=int(cfg.seed),
        device=device,
        progress=progress,
        checkpoint=cfg.get("checkpoint"),
    )


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
