"""The study driver: validate the config, prepare the baseline, run the trials, report the front.

`plan_sweep` checks the whole config and has no side effects; `run_sweep` creates the study,
the MLflow parent run and the baseline, runs the trials with `search.trial.run_trial`, and ends
with the Pareto front (`search.pareto`).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from compressors import load_packed, save_packed
from experiments import Baseline, Task, TrainConfig, cv_folds, load_or_train_baseline
from search import pareto
from search._errors import ConfigError
from search.pareto import SweepResult
from search.space import SearchSpace
from search.tracking import Tracker
from search.trial import METRICS, SweepContext, measure, run_trial

logger = logging.getLogger(__name__)

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
}
DIRECTIONS = ("maximize", "minimize")
#: States that use up the study's budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class SweepPlan:
    """A fully validated sweep; building it touches no file, database or network."""

    cfg: DictConfig
    space: SearchSpace
    task_builder: Callable[..., Task]
    task_kwargs: dict[str, Any]
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    study_name: str
    storage: str
    n_trials: int
    fingerprint: str


def plan_sweep(cfg: DictConfig) -> SweepPlan:
    """Check every part of ``cfg`` before any work; raise `ConfigError` naming the bad key."""
    space = SearchSpace.from_config(cfg.space)
    task_builder, task_kwargs = _check_task(cfg)
    search = cfg.search
    objectives, directions = tuple(search.objectives), tuple(search.directions)
    known = set(METRICS) | {f"latency_ms_b{b}" for b in cfg.measure.latency_batch_sizes}
    for name in objectives:
        if name not in known:
            raise ConfigError(
                f"Unknown objective {name!r} in search.objectives. "
                f"Available: {', '.join(sorted(known))}."
            )
    for direction in directions:
        if direction not in DIRECTIONS:
            raise ConfigError(
                f"Unknown direction {direction!r} in search.directions. "
                "Allowed: maximize, minimize."
            )
    if len(objectives) != len(directions) or not objectives:
        raise ConfigError(
            f"search.objectives {list(objectives)} and search.directions {list(directions)} "
            "must be non-empty lists of the same length (one direction per objective)."
        )
    if "latency_ms" in objectives and 1 not in cfg.measure.latency_batch_sizes:
        raise ConfigError("Objective 'latency_ms' needs 1 in measure.latency_batch_sizes.")
    folds = search.get("cv_folds")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool) or folds < 2):
        raise ConfigError(f"search.cv_folds must be null or an int >= 2. Got {folds!r} instead.")
    if not isinstance(search.n_trials, int) or search.n_trials < 1:
        raise ConfigError(f"search.n_trials must be an int >= 1. Got {search.n_trials!r} instead.")
    make_sampler(search.sampler, seed=0, options=search.sampler_options)
    storage = str(search.storage)
    _check_storage(storage)
    fingerprint = _fingerprint(cfg)
    return SweepPlan(
        cfg=cfg,
        space=space,
        task_builder=task_builder,
        task_kwargs=task_kwargs,
        objectives=objectives,
        directions=directions,
        study_name=str(search.study_name),
        storage=storage,
        n_trials=search.n_trials,
        fingerprint=fingerprint,
    )


def make_sampler(
    name: str, *, seed: int, options: Mapping[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in ``search.sampler``."""
    if name not in SAMPLERS:
        raise ConfigError(
            f"Unknown sampler {name!r} in search.sampler. Available: {', '.join(SAMPLERS)}."
        )
    kwargs: dict[str, Any] = {"seed": seed}
    if name == "tpe":  # conditional spaces (a method's params exist only when it is chosen)
        kwargs.update(multivariate=True, group=True)
    kwargs.update(
        OmegaConf.to_container(options) if isinstance(options, DictConfig) else options or {}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid search.sampler_options for sampler {name!r}: {err}") from None


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: a journal file for a plain path, else a database URL."""
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(storage))
    return optuna.storages.RDBStorage(storage)


def run_sweep(cfg: DictConfig, *, callbacks: Iterable[Callable] = ()) -> SweepResult:
    """Run (or continue) the study ``cfg`` describes, up to ``search.n_trials`` finished trials.

    Args:
        cfg: The composed config.
        callbacks: Optuna callbacks called after each trial (e.g. a progress bar).
    """
    plan = plan_sweep(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    study = optuna.create_study(
        study_name=plan.study_name,
        storage=open_storage(plan.storage),
        directions=list(plan.directions),
        load_if_exists=True,
    )
    _check_same_study(study, plan)
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    study.sampler = make_sampler(
        cfg.search.sampler, seed=cfg.seed + done, options=cfg.search.sampler_options
    )

    tracker = Tracker(
        cfg.tracking.uri, cfg.tracking.experiment, artifacts=cfg.tracking.get("artifacts")
    )
    try:
        return _run(study, plan, tracker, done=done, callbacks=callbacks)
    except BaseException:
        tracker.abort()  # the parent run ends KILLED; a rerun continues the study and reopens it
        raise
    finally:
        tracker.close()


def _run(
    study: optuna.Study,
    plan: SweepPlan,
    tracker: Tracker,
    *,
    done: int,
    callbacks: Iterable[Callable],
) -> SweepResult:
    cfg = plan.cfg
    task = plan.task_builder(**plan.task_kwargs)
    plan.space.check_outputs(task.outputs, task=task.name)  # e.g. kd.loss=kl needs logits
    baseline = load_or_train_baseline(
        task, config=plan.task_kwargs, cache_dir=cfg.cache_dir, seed=cfg.seed
    )
    baseline_size = _baseline_file_size(baseline)
    latency = tuple(cfg.measure.latency_batch_sizes), int(cfg.measure.latency_repeats)
    shipped = load_packed(baseline.folder / "model.sqz", task.build_model())
    baseline_metrics = {
        **{k: float(v) for k, v in baseline.metrics.items()},
        **{k: float(v) for k, v in measure(shipped, task, *latency).items()},
        "size_bytes": float(baseline_size),
        "fp32_bytes": float(4 * baseline.metrics["params"]),
    }
    config_file = Path(cfg.output_dir) / plan.study_name / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_file, resolve=True)
    parent_id = tracker.start_parent(
        run_id=study.user_attrs.get("mlflow_parent_run_id"),
        name=plan.study_name,
        params=_parent_params(cfg, task, baseline.key),
        metrics={f"baseline_{k}": v for k, v in baseline_metrics.items()},
        tags={"squeeze.study": plan.study_name, "squeeze.role": "study"},
        artifacts=[config_file],
    )
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    study.set_user_attr("fingerprint", plan.fingerprint)
    study.set_user_attr("baseline", baseline_metrics)

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
        folds=_cv_folds(cfg, plan, task),
    )
    remaining = plan.n_trials - done
    # Everything alive now (modules, baseline, clients) lives until the end: keep it out of the
    # garbage collector's full passes, which fine-tuning's many small objects trigger often
    # (they cost 4% of a sweep otherwise). Unfrozen when the study is reported.
    gc.freeze()
    try:
        if remaining > 0:
            study.optimize(
                partial(run_trial, ctx=ctx),
                n_trials=remaining,
                timeout=cfg.search.timeout,
                catch=(Exception,),
                callbacks=[MaxTrialsCallback(plan.n_trials, states=FINISHED), *callbacks],
            )
        else:
            logger.info("study %s already has %d finished trials", plan.study_name, done)
        return pareto.finish_study(study, ctx, baseline_metrics, parent_id)
    finally:
        gc.unfreeze()


def _cv_folds(cfg: DictConfig, plan: SweepPlan, task: Task) -> tuple:
    """(task, baseline) per fold when ``search.cv_folds`` is set; each baseline is cached."""
    folds = cfg.search.get("cv_folds")
    if not folds:
        return ()
    pairs = []
    for k, fold in enumerate(cv_folds(task, folds, seed=cfg.seed)):
        config = {**plan.task_kwargs, "cv_fold": f"{k}/{folds}"}
        baseline = load_or_train_baseline(
            fold, config=config, cache_dir=cfg.cache_dir, seed=cfg.seed
        )
        pairs.append((fold, baseline))
    return tuple(pairs)


def _baseline_file_size(baseline: Baseline) -> int:
    """Bytes of the baseline's packed fp32 file, written once next to the cached baseline."""
    path = baseline.folder / "model.sqz"
    if not path.exists():
        tmp = path.with_name(f"model.sqz.tmp-{os.getpid()}")
        save_packed(baseline.model, tmp)
        tmp.replace(path)
    return path.stat().st_size


def _check_task(cfg: DictConfig) -> tuple[Callable[..., Task], dict[str, Any]]:
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    target = task_cfg.pop("_target_", None)
    if target is None:
        raise ConfigError("task has no '_target_' naming the function that builds it.")
    try:
        builder = get_method(target)
    except Exception:  # noqa: BLE001 - Hydra raises several kinds here
        raise ConfigError(f"task._target_ {target!r} cannot be imported.") from None
    kwargs = {**task_cfg, "seed": cfg.seed}
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(builder).parameters if p != "seed"]
        raise ConfigError(
            f"Invalid key in task {task_cfg.get('name')!r}: {err}. Allowed: {', '.join(allowed)}."
        ) from None
    train = kwargs.get("train") or {}
    unknown = sorted(set(train) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in task.train. Allowed: "
            f"{', '.join(TrainConfig.__dataclass_fields__)}."
        )
    return builder, kwargs


def _check_storage(storage: str) -> None:
    if "://" not in storage:
        return
    scheme = storage.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(
            f"Unsupported search.storage URL scheme {scheme!r}. Use a journal file path, "
            "sqlite:///file.db or postgresql+psycopg2://user@host/db."
        )


def _fingerprint(cfg: DictConfig) -> str:
    """Hash of what must not change while a study is continued."""
    parts = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "space": OmegaConf.to_container(cfg.space, resolve=True),
        "objectives": list(cfg.search.objectives),
        "directions": list(cfg.search.directions),
        "seed": cfg.seed,
    }
    if cfg.search.get("cv_folds"):
        parts["cv_folds"] = cfg.search.cv_folds
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_same_study(study: optuna.Study, plan: SweepPlan) -> None:
    previous = study.user_attrs.get("fingerprint")
    if previous is not None and previous != plan.fingerprint:
        raise ConfigError(
            f"Study {plan.study_name!r} in {plan.storage} was started with another task, space, "
            "objectives or seed. Continue it with the same config, or start a new study with "
            "search.study_name=<new name>."
        )


def _parent_params(cfg: DictConfig, task: Task, baseline_key: str) -> dict[str, Any]:
    flat = pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0]
    params = {k: v for k, v in flat.items()}
    params.update({f"data.{k}_size": v for k, v in task.split_sizes().items()})
    params.update({"baseline.key": baseline_key, "torch.threads": torch.get_num_threads()})
    return params
