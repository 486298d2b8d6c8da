"""Checking a sweep's whole config before any work: `plan_sweep` returns a `SweepPlan` or raises
`ConfigError` naming the bad key, the value and what is allowed.

Nothing here imports torch at module level, and the checks run cheapest first: the config's keys and
values (`search.config.schema`), the objectives, directions, constraints, sampler, pruner and early
stop, then the storage and tracking URLs; a mistake there is reported before torch is imported.
The space comes next (its compressors declare their parameters' constraints, and importing them
imports torch), with its warm-start recipes (`search.config.warm_start`), then the task (its
builder's module, searched beside the ``--config-dir`` folders and in the current directory when
it is not importable as it is: `search.config.modules`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig, ListConfig, OmegaConf

from search._errors import ConfigError
from search.config.blocks import resolve_auto
from search.config.constraints import check_constraints, check_score_bound
from search.config.early_stop import check_early_stop, make_pruner
from search.config.fidelity import Fidelity, check_fidelity
from search.config.metrics import METRICS, batch_metrics, default_directions
from search.config.modules import import_target
from search.config.schema import check_file_name, check_schema
from search.config.score import DEFAULT_SCORE, Score
from search.config.storage import check_storage, check_tracking_uri
from search.config.warm_start import WarmStarts, check_warm_start

if TYPE_CHECKING:
    from experiments import Task
    from search.config.space import SearchSpace

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
}
#: Defaults of ours, before ``search.sampler_options``. TPE: conditional spaces (a method's
#: parameters exist only when it is chosen) need ``group``, which needs ``multivariate``. GP
#: models only the parameters every trial has and samples the others at random, which it would
#: otherwise warn about at every trial of a space whose pipeline is a choice.
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "tpe": {"multivariate": True, "group": True},
    "gp": {"warn_independent_sampling": False},
}
#: Keyword arguments that are not options: ours to set (``seed``), deprecated in Optuna 5
#: (``constraints_func``: samplers read the constraints trials record with ``set_constraint``),
#: or objects and functions a YAML value cannot be.
_NOT_OPTIONS = {
    *("self", "seed", "constraints_func", "gamma", "weights", "independent_sampler"),
    *("mutation", "crossover", "elite_population_selection_strategy"),
    *("child_generation_strategy", "after_trial_strategy"),
}
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class SweepPlan:
    """A fully validated sweep; building it touches no file, database or network.

    The direction of ``val_acc`` is the task's metric's, known once the task is built:
    `plan_sweep` assumes higher-is-better, and `SweepPlan.for_task` settles it (the sweep and
    its workers call it before a study is created or joined).

    Attributes:
        directions: The Optuna direction of each objective: ``search.directions``, or when it is
            null each objective's own (`search.config.metrics.default_directions`).
        explicit_directions: Whether ``search.directions`` was given (not null).
        fidelity: The budget in epochs and the screening (`search.config.fidelity`); None
            when neither ``search.n_epochs`` nor ``search.screen_epochs`` is set.
        score: Which way the task's score (``val_acc``) goes, once `for_task` has settled it.
    """

    cfg: DictConfig
    space: SearchSpace
    task_builder: Callable[..., Task]
    task_kwargs: dict[str, Any]
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    study_name: str
    storage: str
    n_trials: int
    n_jobs: int
    constraints: dict[str, float]
    fingerprint: str
    warm_start: WarmStarts = WarmStarts()
    explicit_directions: bool = True
    score: Score = DEFAULT_SCORE
    fidelity: Fidelity | None = None

    def for_task(self, task: Task) -> SweepPlan:
        """This plan with the direction of ``task``'s score: ``val_acc`` is maximized when its
        metric is better higher, minimized when it is better lower (an error such as MSE).

        Raises:
            ConfigError: If ``search.directions`` was given and asks the other way for
                ``val_acc`` (exit 2, before anything is created).
        """
        score = Score.of_task(task)
        if score.higher_is_better and _at_most_one(task.metric):
            metric = getattr(task.metric, "__name__", type(task.metric).__name__)
            check_score_bound(self.constraints, task=task.name, metric=metric)
        if self.explicit_directions:
            directions = self.directions
            if "val_acc" in self.objectives:
                i = self.objectives.index("val_acc")
                if directions[i] != score.direction:
                    metric = getattr(task.metric, "__name__", type(task.metric).__name__)
                    allowed = [score.direction if k == i else d for k, d in enumerate(directions)]
                    raise ConfigError(
                        f"The 'search.directions' config value {list(directions)} asks to "
                        f"{directions[i]} val_acc, but task {task.name!r} scores val_acc with "
                        f"{metric}, where {score.better}. Allowed: search.directions="
                        f"[{','.join(allowed)}], or search.directions=null (each objective's "
                        "own direction, val_acc's the task's)."
                    )
        else:
            directions = default_directions(
                self.objectives, score_higher_is_better=score.higher_is_better
            )
        fidelity = self.fidelity and dataclasses.replace(self.fidelity, directions=directions)
        return dataclasses.replace(
            self,
            directions=directions,
            score=score,
            fidelity=fidelity,
            fingerprint=_fingerprint(self.cfg, self.constraints, directions),
        )


def _at_most_one(metric: Any) -> bool:
    """Whether ``metric`` is one of squeeze's scores that are at most 1."""
    from experiments import accuracy, mean_cosine, neighbour_agreement, r2_score

    return metric in (accuracy, mean_cosine, neighbour_agreement, r2_score)


def missing_onnx_extra() -> list[str]:
    """The modules of the ``onnx`` extra (ONNX export and ONNX Runtime) that are not installed."""
    return [m for m in ("onnx", "onnxruntime", "onnxscript") if find_spec(m) is None]


def plan_sweep(cfg: DictConfig, *, connect: bool = True) -> SweepPlan:
    """Check every part of ``cfg`` before any work; raise `ConfigError` naming the bad key.

    Args:
        cfg: The composed config.
        connect: Also check that the storage and tracking servers answer (nothing is created).
    """
    check_schema(cfg)
    search = cfg.search
    objectives = tuple(search.objectives)
    explicit = search.directions is not None
    directions = tuple(search.directions) if explicit else default_directions(objectives)
    known = set(METRICS) | set(batch_metrics(cfg.measure.latency_batch_sizes))
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
    if cfg.measure.runtime == "onnxruntime" and missing_onnx_extra():
        raise ConfigError(
            f"measure.runtime=onnxruntime needs {', '.join(missing_onnx_extra())}: "
            'pip install -e ".[onnx]" (or measure.runtime=torch).'
        )
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ConfigError(
            f"checkpoint={checkpoint!r} does not exist (a .safetensors file, a state dict saved "
            f"with torch.save, or a Hugging Face model folder; relative to {os.getcwd()})."
        )
    if "latency_ms" in objectives and 1 not in cfg.measure.latency_batch_sizes:
        raise ConfigError("Objective 'latency_ms' needs 1 in measure.latency_batch_sizes.")
    constraints = check_constraints(dict(search.constraints), known)
    _check_heartbeat(search)
    for key in ("output_dir", "cache_dir"):
        _check_folder(str(cfg[key]), key)
    make_sampler(search.sampler, seed=0, options=search.sampler_options)
    make_pruner(search.pruner, search.pruner_options)
    check_early_stop(
        pruner=search.pruner,
        enabled=search.early_stop.enabled,
        objectives=objectives,
    )
    n_jobs = workers_wanted(cfg)
    storage = str(search.storage)
    check_storage(storage, n_jobs=n_jobs, connect=connect)
    check_tracking_uri(str(cfg.tracking.uri), connect=connect)
    from search.config.space import SearchSpace  # imports the compressors, and so torch

    cfg = resolve_auto(cfg)  # round_to: auto -> the CPU's channel block in a latency sweep
    space = SearchSpace.from_config(cfg.space)
    warm_start = cfg.space.get("warm_start")
    warm_start = check_warm_start(
        OmegaConf.to_container(warm_start, resolve=True)
        if isinstance(warm_start, ListConfig)
        else warm_start,
        space,
    )
    if search.get("warm_start", True) == "predicted":
        from search.run.predicted_front import predicted_recipe

        predicted_recipe(space)  # refused before any work if the space has no allocate
    fidelity = check_fidelity(
        cfg, space.values("finetune").get("finetune.epochs"), objectives, directions
    )
    task_builder, task_kwargs = _check_task(cfg)
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
        n_jobs=n_jobs,
        constraints=constraints,
        fingerprint=_fingerprint(cfg, constraints, directions),
        warm_start=warm_start,
        explicit_directions=explicit,
        score=Score.of_direction(directions[objectives.index("val_acc")])
        if explicit and "val_acc" in objectives
        else Score(),
        fidelity=fidelity,
    )


def workers_wanted(cfg: DictConfig) -> int:
    """Worker processes on this machine: ``search.n_jobs`` on CPU, ``search.trials_per_gpu``
    per visible GPU with ``device=cuda`` (or ``auto`` when a GPU is present)."""
    from search.config.device import gpu_count, resolve_device

    if resolve_device(cfg.device) == "cuda":
        if gpu_count() == 0:
            raise ConfigError(
                "device='cuda' but torch sees no GPU (a CPU build of torch, or no CUDA device). "
                "Allowed here: device=cpu or device=auto."
            )
        return gpu_count() * int(cfg.search.trials_per_gpu)
    return int(cfg.search.n_jobs)


def make_sampler(
    name: str, *, seed: int, options: Mapping[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in ``search.sampler``, with our defaults (`SAMPLER_DEFAULTS`)
    and then ``options`` as keyword arguments.

    Constraints need no argument: TPE, NSGA-II and GP read those each trial records with
    ``trial.set_constraint`` (Optuna 5 deprecates ``constraints_func``); random ignores them.
    """
    if name not in SAMPLERS:
        raise ConfigError(
            f"Unknown sampler {name!r} in search.sampler. Available: {', '.join(SAMPLERS)}."
        )
    options = dict(
        OmegaConf.to_container(options) if isinstance(options, DictConfig) else options or {}
    )
    allowed = [p for p in inspect.signature(SAMPLERS[name]).parameters if p not in _NOT_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} in search.sampler_options for "
            f"sampler {name!r}. Allowed: {', '.join(allowed) or 'none'}."
        )
    kwargs: dict[str, Any] = {"seed": seed, **SAMPLER_DEFAULTS.get(name, {}), **options}
    if name == "tpe" and not kwargs["multivariate"] and "group" not in options:
        kwargs["group"] = False  # (our default group=True needs multivariate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid search.sampler_options for sampler {name!r}: {err}") from None


def _check_task(cfg: DictConfig) -> tuple[Callable[..., Task], dict[str, Any]]:
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    target = task_cfg.pop("_target_", None)
    if target is None:
        raise ConfigError("task has no '_target_' naming the function that builds it.")
    builder = import_target(target, key="task._target_")  # a user's module: search.config.modules
    kwargs = {**task_cfg, "seed": cfg.seed}
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(builder).parameters if p != "seed"]
        raise ConfigError(
            f"Invalid key in task {task_cfg.get('name')!r}: {err}. Allowed: {', '.join(allowed)}."
        ) from None
    if "name" in task_cfg:  # a folder of the baseline cache, and the default study name
        check_file_name(task_cfg["name"], "task.name")
    from experiments import TrainConfig, WorkloadError

    train = kwargs.get("train") or {}
    unknown = sorted(set(train) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {unknown} in task.train. Allowed: "
            f"{', '.join(TrainConfig.__dataclass_fields__)}."
        )
    if train:
        try:
            TrainConfig(**train)  # its ranges, before the builder reads or generates any data
        except WorkloadError as err:
            raise ConfigError(str(err)) from None
        except TypeError:
            raise ConfigError(
                f"task.train {train} has no 'epochs'. Allowed keys: "
                f"{', '.join(TrainConfig.__dataclass_fields__)} (epochs required)."
            ) from None
    return builder, kwargs


def _check_heartbeat(search: DictConfig) -> None:
    """A trial with no heartbeat for ``grace_period`` seconds is failed as lost: heartbeats
    must come more often than that, or every running trial is declared lost."""
    interval, grace = int(search.heartbeat_interval), int(search.grace_period)
    if interval >= grace:
        raise ConfigError(
            f"The 'search.heartbeat_interval' config value must be less than "
            f"search.grace_period ({grace} s): a running trial sends a heartbeat every "
            f"{interval} s and is failed as lost after {grace} s without one. Got {interval} "
            f"instead. Allowed: search.heartbeat_interval < search.grace_period (e.g. 10 and 60)."
        )


def _check_folder(path: str, key: str) -> None:
    """Refuse ``path`` (``output_dir``, ``cache_dir``) when it, or a folder it would be made
    in, exists and is not a folder (nothing is created here)."""
    folder = Path(path).expanduser()
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                what = "is" if part == folder else f"would be made inside {str(part)!r}, which is"
                raise ConfigError(
                    f"The '{key}' config value {path!r} {what} a file, not a folder. Allowed: a "
                    "folder, existing or not (it is created), outside any file."
                )
            return


def _fingerprint(
    cfg: DictConfig, constraints: Mapping[str, float], directions: tuple[str, ...]
) -> str:
    """Hash of what must not change while a study is continued (``directions``: as resolved,
    so that a study started with ``search.directions=[maximize, minimize]`` is continued with
    ``search.directions=null`` on a higher-is-better task, and the other way round)."""
    parts = _fingerprinted(cfg, constraints, directions)
    return _hash(parts)


def fingerprint_parts(plan: SweepPlan) -> dict[str, str]:
    """A hash of each part of ``plan``'s fingerprint (``task``, ``space``, ``objectives``, ...):
    kept with a study, they name what another config changed."""
    parts = _fingerprinted(plan.cfg, plan.constraints, plan.directions)
    return {name: _hash(value) for name, value in parts.items()}


def _fingerprinted(
    cfg: DictConfig, constraints: Mapping[str, float], directions: tuple[str, ...]
) -> dict[str, Any]:
    space = OmegaConf.to_container(cfg.space, resolve=True)
    space.pop("warm_start", None)  # recipes run once each, whenever the list is (see run_sweep)
    parts = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "space": space,
        "objectives": list(cfg.search.objectives),
        "directions": list(directions),
        "seed": cfg.seed,
    }
    if cfg.search.get("cv_folds"):
        parts["cv_folds"] = cfg.search.cv_folds
    if constraints:  # (studies without constraints keep the fingerprint they had before)
        parts["constraints"] = dict(sorted(constraints.items()))
    if cfg.search.get("screen_epochs"):  # a trial's charge and stage depend on it
        parts["screen_epochs"] = cfg.search.screen_epochs
        if cfg.search.get("screen_warm_starts", True) is False:  # (and a warm start's)
            parts["screen_warm_starts"] = False
    return parts


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
