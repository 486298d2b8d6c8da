"""The study driver: validate the config, prepare the baseline, run the trials, report the front.

`search.config.plan.plan_sweep` checks the whole config first; `run_sweep`
creates the study, the MLflow parent run and the baseline, runs the trials with
`search.run.trial.run_trial` (in this process, or in ``search.n_jobs`` worker processes, see
`search.run.workers`), waits for the trials of workers on other machines, and ends with the Pareto
front (`search.run.pareto`). `run_worker` joins an existing study and runs trials until its total
budget (`search.run.budget`) is spent.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from torch.nn.modules.lazy import LazyModuleMixin

from compressors import load_packed
from compressors.onnx_export import OnnxExportError
from experiments import (
    DECISIONS,
    FreshModel,
    Task,
    agreement_reference,
    build_fresh,
    cv_folds,
)
from search._errors import ConfigError
from search.config.device import training_device
from search.config.early_stop import EarlyStop, make_pruner
from search.config.metrics import batch_suffix
from search.config.plan import SweepPlan, make_sampler, plan_sweep
from search.config.score import DIRECTION_ATTR, METRIC_ATTR
from search.config.storage import mask_url
from search.run import pareto
from search.run.budget import (
    WARM_START_ATTR,
    WORKER_ATTR,
    Budget,
    budget_lock,
    budget_used,
    superseded,
    worker_id,
)
from search.run.deploy import check_deployable, deploy_onnx
from search.run.interrupts import raise_if_interrupted
from search.run.loop import run_trials
from search.run.measure import measure
from search.run.pareto import SweepResult
from search.run.predicted_front import DEFAULT_COUNT, predicted_warm_starts
from search.run.study_store import (
    claim_study,
    load_study,
    name_objectives,
    open_study_storage,
    storage_retry_s,
)
from search.run.tracking import Tracker
from search.run.trial import THREADS_ATTR, SweepContext, baseline_on, run_trial
from search.run.workers import WORKERS_ENV, run_local_workers
from search.run.workload import (
    baseline_file_size,
    build_task,
    check_baseline,
    check_memory,
    check_task,
    load_baseline,
    load_workload,
    local_workers,
)

logger = logging.getLogger(__name__)

#: Finished states (each uses up one trial of the study's budget).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
#: Environment variable telling a worker process how many workers share this machine.


def run_sweep(
    cfg: DictConfig,
    *,
    callbacks: Iterable[Callable] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> SweepResult:
    """Run (or continue) the study ``cfg`` describes, up to ``search.n_trials`` finished trials.

    With ``search.n_jobs`` > 1 the trials run in that many worker processes; workers started
    with `run_worker` on other machines may join at any time. Either way the study ends with
    exactly ``search.n_trials`` finished trials; this function returns once they all finished.

    Args:
        cfg: The composed config.
        callbacks: Optuna callbacks called after each trial (e.g. a progress bar); with several
            workers, called in this process as their trials finish.
        progress: Called as ``progress(stage, done, total)`` while a baseline is trained
            (``baseline epochs``) and its teacher outputs are computed (``teacher outputs``).
    """
    plan = plan_sweep(cfg)
    task, fresh = checked_task(plan)  # a workload that cannot work is refused before anything
    plan = plan.for_task(task)  # val_acc's direction: the task's metric's
    storage = open_study_storage(plan)
    study = optuna.create_study(
        study_name=plan.study_name,
        storage=storage,
        directions=list(plan.directions),
        pruner=make_pruner(cfg.search.pruner, cfg.search.pruner_options),
        load_if_exists=True,
    )
    claim_study(study, plan)
    name_objectives(study, plan.objectives)
    if cfg.search.get("warm_start", True) is True:  # (predicted: once the baseline is there)
        _enqueue_warm_starts(study, plan)
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    study.sampler = make_sampler(
        cfg.search.sampler, seed=cfg.seed + done, options=cfg.search.sampler_options
    )
    logger.info("study %s in %s", plan.study_name, mask_url(plan.storage))

    tracker = Tracker(
        cfg.tracking.uri, cfg.tracking.mlflow_experiment, artifacts=cfg.tracking.get("artifacts")
    )
    try:
        return _run(
            study, plan, tracker, task=task, fresh=fresh, callbacks=callbacks, progress=progress
        )
    except BaseException:
        tracker.abort()  # the parent run ends KILLED; a rerun continues the study and reopens it
        raise
    finally:
        tracker.close()


def run_worker(cfg: DictConfig, *, callbacks: Iterable[Callable] = ()) -> int:
    """Join the study ``cfg`` names (started by `run_sweep`) and run its trials until the
    budget is spent; return how many trials this worker ran.

    Raises:
        ConfigError: If the storage holds no such study, or one started with another config.
    """
    plan = plan_sweep(cfg)
    task, fresh = checked_task(plan)
    plan = plan.for_task(task)  # val_acc's direction: the task's metric's
    study = load_study(plan)
    if WORKERS_ENV not in os.environ and plan.n_jobs > 1:  # this command starts the workers
        pids = run_local_workers(
            cfg, plan.n_jobs, study=study, target=run_worker, callbacks=callbacks
        )
        ran = [t for t in study.get_trials(deepcopy=False) if WORKER_ATTR in t.user_attrs]
        return sum(int(t.user_attrs[WORKER_ATTR].split(":")[1]) in pids for t in ran)
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    # Workers sample independently: each its own seed (a shared seed repeats the same recipes).
    seed = int(hashlib.sha256(f"{cfg.seed}:{done}:{worker_id()}".encode()).hexdigest()[:8], 16)
    study.sampler = make_sampler(cfg.search.sampler, seed=seed, options=cfg.search.sampler_options)
    tracker = Tracker(
        cfg.tracking.uri, cfg.tracking.mlflow_experiment, artifacts=cfg.tracking.get("artifacts")
    )
    try:
        tracker.join_parent(study.user_attrs["mlflow_parent_run_id"])
        ctx, _ = _prepare(
            plan, tracker, task=task, fresh=fresh, threads=study.user_attrs.get(THREADS_ATTR)
        )
        gc.freeze()
        try:
            return run_trials(
                _budget(study, plan),
                partial(run_trial, ctx=ctx),
                callbacks=callbacks,
                timeout=cfg.search.timeout,
            )
        finally:
            gc.unfreeze()
    finally:
        tracker.close()


def _run(
    study: optuna.Study,
    plan: SweepPlan,
    tracker: Tracker,
    *,
    task: Task,
    fresh: FreshModel | None = None,
    callbacks: Iterable[Callable],
    progress: Callable[[str, int, int], None] | None = None,
) -> SweepResult:
    cfg = plan.cfg
    ctx, baseline_metrics = _prepare(
        plan,
        tracker,
        task=task,
        fresh=fresh,
        threads=study.user_attrs.get(THREADS_ATTR),
        progress=progress,
    )
    config_file = Path(cfg.output_dir) / plan.study_name / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(_masked(cfg)), config_file)
    parent_id = tracker.start_parent(
        run_id=study.user_attrs.get("mlflow_parent_run_id"),
        name=plan.study_name,
        params=_parent_params(cfg, ctx.task, ctx.baseline.key),
        metrics={f"baseline_{k}": v for k, v in baseline_metrics.items()},
        tags={
            "squeeze.study": plan.study_name,
            "squeeze.role": "study",
            # val_acc / test_acc are the task's score, whatever it is: say which, in the UI
            "squeeze.score": f"{plan.score.name} ({plan.score.better})",
        },
        artifacts=[config_file],
    )
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    tracker.save_views(
        plan.study_name, plan.objectives, higher_is_better=plan.score.higher_is_better
    )
    study.set_user_attr("fingerprint", plan.fingerprint)
    study.set_user_attr(DIRECTION_ATTR, plan.score.direction)  # read by report and export
    study.set_user_attr(METRIC_ATTR, plan.score.name)  # what val_acc is (R2Score, accuracy...)
    study.set_user_attr("baseline", baseline_metrics)
    if THREADS_ATTR not in study.user_attrs:  # the count its trials reproduce with (run, report)
        study.set_user_attr(THREADS_ATTR, torch.get_num_threads())

    if cfg.search.get("warm_start", True) == "predicted":
        _enqueue_predicted(study, plan, ctx)
    budget = _budget(study, plan)
    # Everything alive now (modules, baseline, clients) lives until the end: keep it out of the
    # garbage collector's full passes, which fine-tuning's many small objects trigger often
    # (they cost 4% of a sweep otherwise). Unfrozen when the study is reported.
    gc.freeze()
    try:
        start, timeout = time.monotonic(), cfg.search.timeout
        while True:
            if plan.n_jobs == 1:
                run_trials(
                    budget,
                    partial(run_trial, ctx=ctx),
                    callbacks=callbacks,
                    timeout=None if timeout is None else timeout - (time.monotonic() - start),
                )
            else:
                tracker.wait()  # the parent run exists before the workers log children under it
                run_local_workers(
                    cfg, plan.n_jobs, study=study, target=run_worker, callbacks=callbacks
                )
            raise_if_interrupted()  # (swallowed in a worker loop's last trial)
            _wait_for_other_workers(budget)
            # A trial lost at the end (a worker killed after the others stopped claiming) is
            # run again here, so the study still ends with its whole budget.
            timed_out = timeout is not None and time.monotonic() - start >= timeout
            if timed_out or not budget.has_work():
                break
        return pareto.finish_study(study, ctx, baseline_metrics, parent_id)
    finally:
        gc.unfreeze()


def checked_task(plan: SweepPlan) -> tuple[Task, FreshModel | None]:
    """The task of ``plan`` and its model, built once (with the sweep's seed, as the baseline
    is: `experiments.build_fresh`) and checked before anything is created or trained: the
    space's settings suit what its model outputs (kd's KL needs logits), a trial's copies fit in
    this machine's memory (`check_memory`), the model takes the task's batches and its outputs
    can be scored (`check_task`), ONNX Runtime can time it if asked, and each pipeline of the
    space acts on the model (a warning when it compresses little of it).

    The checks leave the model's state and modes as built, so it goes on to be the baseline
    (`load_workload`'s ``fresh``); None instead where a check may have changed it (a lazy
    module's weights are made by its first forward).

    Raises:
        ConfigError: If any of these does not hold (exit 2, nothing created).
    """
    cfg = plan.cfg
    task = build_task(plan)
    plan.space.check_outputs(task.outputs, task=task.name)  # e.g. kd.loss=kl needs logits
    fresh = build_fresh(task, int(cfg.seed))
    model = fresh.model
    check_memory(task.name, model, device=training_device(cfg), workers=local_workers(plan))
    lazy = any(isinstance(m, LazyModuleMixin) for m in model.modules())
    with _unchanged(model):
        _check_model(plan, task, model)
    return task, None if lazy else fresh


@contextmanager
def _unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Give ``model`` its buffers' values (a norm's running statistics) and its modules' modes
    back after the block (checks that run it in training mode)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
        for module, training in modes.items():
            module.train(training)


def _check_model(plan: SweepPlan, task: Task, model: torch.nn.Module) -> None:
    cfg = plan.cfg
    check_task(task, model, cfg)  # the model takes the batches, its outputs can be scored
    own = task.train.own_loader
    if own is not None:  # (the recipe's finetune.batch_size would say otherwise)
        logger.info(
            "task %r: its training data is %s, read as it is, with its own batch size and "
            "order: task.train.batch_size and the recipe's finetune.batch_size do not change it",
            task.name,
            own,
        )
    example = task.example_inputs()
    if str(cfg.measure.runtime) == "onnxruntime":  # its graph is exported once, here
        try:
            check_deployable(task)
        except OnnxExportError as err:
            raise ConfigError(
                f"measure.runtime=onnxruntime: task {task.name!r}: {err}. Use "
                "measure.runtime=torch."
            ) from None
    _check_coverage(
        plan.space.check_model(model, task=task.name, example_inputs=example), task.name
    )


def _prepare(
    plan: SweepPlan,
    tracker: Tracker,
    *,
    task: Task | None = None,
    fresh: FreshModel | None = None,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[SweepContext, dict[str, float]]:
    """The task, the cached baseline (trained if absent) and what every trial shares;
    ``task`` and ``fresh``: the task and model `checked_task` built (else built and checked
    here); ``threads``: the torch threads the study started with (kept by ``threads: auto``)."""
    cfg = plan.cfg
    if task is None:
        task, fresh = checked_task(plan)
    workload = load_workload(
        cfg,
        plan=plan,
        task=task,
        fresh=fresh,
        progress=partial(_interruptible, progress),
        recorded_threads=threads,
    )
    task, baseline, device = workload.task, workload.baseline, workload.device
    check_baseline(task, baseline)  # a NaN or chance-level baseline: no trial (exit 2)
    baseline_size = baseline_file_size(baseline)
    latency = tuple(cfg.measure.latency_batch_sizes), int(cfg.measure.latency_repeats)
    budget_s = cfg.measure.get("latency_budget_s")
    budget_s = None if budget_s is None else float(budget_s)
    shipped = load_packed(baseline.folder / "model.sqz", task.build_model())
    _say_what_is_frozen(shipped)
    runtime = str(cfg.measure.runtime)
    nbits = cfg.measure.get("onnx_nbits_tolerance")
    deployed = None
    if runtime == "onnxruntime":  # the baseline's graph, once per process
        folder = Path(cfg.output_dir) / plan.study_name
        folder.mkdir(parents=True, exist_ok=True)
        deployed = deploy_onnx(
            baseline.folder / "model.sqz", task, folder / f"baseline-{os.getpid()}.onnx"
        )
    reference = deployed.module if deployed else shipped
    # the baseline's outputs on validation, for every trial's val_agreement (a regression has
    # no decisions to agree on)
    val_reference = (  # computed on the trials' device (the outputs come to the CPU)
        agreement_reference(baseline_on(baseline.model, device), task.val, task.outputs)
        if task.outputs in DECISIONS
        else None
    )
    baseline_metrics = {
        **{k: float(v) for k, v in baseline.metrics.items()},
        **{
            k: float(v)
            for k, v in measure(
                shipped,
                task,
                *latency,
                latency_budget_s=budget_s,
                timed=reference,
                reference_outputs=val_reference,
            ).items()
        },
        **(deployed.metrics if deployed else {}),
        **{f"speedup{batch_suffix(batch)}": 1.0 for batch in latency[0]},
        "size_bytes": float(baseline_size),
        "fp32_bytes": float(4 * baseline.metrics["params"]),
    }
    early = cfg.search.early_stop
    ctx = SweepContext(
        task=task,
        baseline=baseline,
        baseline_size=baseline_size,
        space=plan.space,
        objectives=plan.objectives,
        tracker=tracker,
        output_dir=Path(cfg.output_dir),
        seed=cfg.seed,
        latency_batch_sizes=latency[0],
        latency_repeats=latency[1],
        latency_budget_s=budget_s,
        reference=reference,
        runtime=runtime,
        nbits_tolerance=None if nbits is None else float(nbits),
        folds=_cv_folds(cfg, plan, task, progress),
        device=device,
        constraints=plan.constraints,
        early_stop=EarlyStop(
            pruner=cfg.search.pruner != "none",
            dominance=bool(early.enabled),
            margin=float(early.margin),
            min_epochs=int(early.min_epochs),
            objectives=plan.objectives,
            directions=plan.directions,
            constraints=plan.constraints,
            baseline_size=baseline_size,
            example_inputs=(example := task.example_batch(1))[0],
            example_samples=example[1],
        ),
        val_reference=val_reference,
        fidelity=plan.fidelity,
    )
    return ctx, baseline_metrics


#: A pipeline that compresses less of the model than this is warned about before training.
MIN_COVERAGE = 0.5


def _check_coverage(coverages: Mapping[str, float], task: str) -> None:
    for pipeline, fraction in coverages.items():
        if fraction < MIN_COVERAGE:
            logger.warning(
                "pipeline %s compresses only %.0f%% of the parameters of task %s's model "
                "(see `squeeze inspect task=%s` for which tensors each compressor acts on)",
                pipeline,
                100 * fraction,
                task,
                task,
            )


def _budget(study: optuna.Study, plan: SweepPlan) -> Budget:
    search = plan.cfg.search
    return Budget(
        study=study,
        url=plan.storage,
        total=plan.n_trials,
        retries=int(search.retries),
        retry_on=tuple(search.retry_on),
        lost_retries=int(search.lost_retries),
        retry_s=storage_retry_s(plan),
        fidelity=plan.fidelity,
    )


def _enqueue_warm_starts(study: optuna.Study, plan: SweepPlan) -> None:
    """Enqueue the space's warm-start recipes that the study has not run yet, in order, as far
    as its budget has room (the rest when ``search.n_trials`` grows): trials run enqueued
    recipes first, and each recipe once, however often the sweep is rerun and however many
    workers join."""
    left_out: dict[str, list[str]] = {}  # reason: recipe numbers
    for item in plan.warm_start.left_out:
        left_out.setdefault(item.reason, []).append(str(item.number))
    for reason, numbers in left_out.items():
        logger.warning(
            "warm start: recipe%s %s of space '%s' left out: %s",
            "s" if len(numbers) > 1 else "",
            ", ".join(numbers),
            plan.space.name,
            reason,
        )
    with budget_lock(plan.storage, plan.study_name, retry_s=storage_retry_s(plan)):
        trials = study.get_trials(deepcopy=False)
        count, room = len(trials), plan.n_trials - budget_used(trials)
        if plan.fidelity is not None:  # (and the epochs: search.n_epochs)
            room = min(room, plan.fidelity.new_candidates(trials, superseded(trials)))
        queued = [t.system_attrs.get("fixed_params") for t in trials]
        waiting = [r for r in plan.warm_start.recipes if r.params not in queued]
        for k, recipe in enumerate(plan.warm_start.recipes):
            if room <= 0:  # one line for all: the next run with a larger budget runs them
                left = [r for r in plan.warm_start.recipes[k:] if r in waiting]
                if left:
                    logger.info(
                        "warm start: the budget has no room for %d of the space's recipes "
                        "(yet): %s",
                        len(left),
                        "; ".join(r.text for r in left),
                    )
                break
            study.enqueue_trial(  # (skipped if a trial of the study was enqueued with them)
                recipe.params, user_attrs={WARM_START_ATTR: True}, skip_if_exists=True
            )
            trials = study.get_trials(deepcopy=False)
            if len(trials) > count:
                count, room = count + 1, room - 1
                if plan.fidelity is not None:  # (each charged as it will run: a screen, or a
                    # whole fine-tune with search.screen_warm_starts=false)
                    room = min(room, plan.fidelity.new_candidates(trials, superseded(trials)))
                logger.info("warm start: trial %d runs %s", count - 1, recipe.text)


def _enqueue_predicted(study: optuna.Study, plan: SweepPlan, ctx: SweepContext) -> None:
    """Enqueue recipes spread along the front that allocate's sensitivity table predicts
    (`search.run.predicted_front`), as many as the space's warm_start recipes, in place of
    them; once each per study, as `_enqueue_warm_starts` enqueues those."""
    count = len(plan.warm_start.recipes) + len(plan.warm_start.left_out) or DEFAULT_COUNT
    starts, chosen = predicted_warm_starts(ctx, count)
    for p in chosen:
        logger.info(
            "predicted front: allocate.ratio %.4g -> loss %.4g, %d bytes", p.ratio, p.loss, p.bytes
        )
    _enqueue_warm_starts(study, replace(plan, warm_start=starts))


def _wait_for_other_workers(budget: Budget, *, poll_s: float = 1.0) -> None:
    """Wait until no trial of the study runs (workers on other machines may still finish
    theirs); trials of lost workers are failed meanwhile."""
    while True:
        with budget_lock(budget.url, budget.study.study_name, retry_s=budget.retry_s):
            budget.fail_lost_trials()
            running = budget.study.get_trials(deepcopy=False, states=[TrialState.RUNNING])
        if not running:
            return
        logger.info("waiting for %d trial(s) of other workers", len(running))
        time.sleep(poll_s)


def _cv_folds(
    cfg: DictConfig,
    plan: SweepPlan,
    task: Task,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple:
    """(task, baseline) per fold when ``search.cv_folds`` is set; each baseline is cached."""
    folds = cfg.search.get("cv_folds")
    if not folds:
        return ()
    pairs = []
    for k, fold in enumerate(cv_folds(task, folds, seed=cfg.seed)):
        config = {**plan.task_kwargs, "cv_fold": f"{k}/{folds}"}
        baseline = load_baseline(
            fold,
            config,
            cfg,
            device=training_device(cfg),
            progress=progress and partial(_fold_stage, progress, f"fold {k + 1}/{folds} "),
        )
        pairs.append((fold, baseline))
    return tuple(pairs)


def _interruptible(
    progress: Callable[[str, int, int], None] | None, stage: str, done: int, total: int
) -> None:
    """Forward a stage's progress; each step is a safe point for a swallowed Ctrl-C."""
    raise_if_interrupted()
    if progress is not None:
        progress(stage, done, total)


def _fold_stage(progress: Callable[[str, int, int], None], prefix: str, stage: str, *args) -> None:
    progress(prefix + stage, *args)


def _masked(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, with the password of every URL in it masked."""

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return mask_url(value) if isinstance(value, str) else value

    return mask(OmegaConf.to_container(cfg, resolve=True))


def _parent_params(cfg: DictConfig, task: Task, baseline_key: str) -> dict[str, Any]:
    flat = pd.json_normalize(_masked(cfg), sep=".").iloc[0]
    params = {k: v for k, v in flat.items()}
    params.update({f"data.{k}_size": v for k, v in task.split_sizes().items()})
    params.update({"baseline.key": baseline_key, "torch.threads": torch.get_num_threads()})
    return params


def _say_what_is_frozen(model: torch.nn.Module) -> None:
    """Log the parameters the user froze (``requires_grad=False``): compression still acts on
    them, and fine-tuning, which trains what the user trains, recovers nothing in them."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        total = sum(1 for _ in model.parameters())
        logger.info(
            "%d of the model's %d parameter tensors are frozen (requires_grad=False: %s%s): "
            "compression acts on them too, and fine-tuning leaves them as compression left "
            "them; unfreeze them in the task's build_model for fine-tuning to adapt them",
            len(frozen),
            total,
            ", ".join(frozen[:3]),
            ", ..." if len(frozen) > 3 else "",
        )
