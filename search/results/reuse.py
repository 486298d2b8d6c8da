"""Reuse a study's result: export a chosen trial as a Hydra experiment, rerun it, load it back.

- `export_trial` picks a point of a study's Pareto front and writes
  ``<config dir>/experiment/<name>.yaml`` (the last ``--config-dir``, else ``./conf`` of the
  current directory; never over an existing file unless asked): the study's task, its seed, and
  a space whose every value is the chosen trial's (no ranges), with a comment naming the study,
  the trial and its metrics;
- `export_onnx_trial` (``squeeze export --format onnx``) writes a chosen trial's model as an ONNX
  graph (`compressors.onnx_export`), checked in ONNX Runtime against the torch model on the
  validation split;
- `recommend` picks the point ``squeeze sweep`` recommends (the knee within
  `RECOMMEND_MAX_DROP` of the baseline: validation points, or percent of the baseline's value
  for a lower-is-better score, see `search.config.score`) and `next_commands` spells out the
  ``squeeze export`` and ``squeeze run`` commands for it;
- `run_experiment` (``squeeze run experiment=<name>``) reruns that recipe from the cached
  baseline with the trial's seed, evaluates the shipped file on validation and test (and its
  agreement with the baseline, with `search.results.explain`'s files under ``explain/``), exports it
  to ONNX (with the ``onnx`` extra) and checks it in ONNX Runtime, logs an MLflow run, and
  registers the model (the packed file, the ONNX graph, the config) in the MLflow Model Registry
  under an alias;
- `load_registered` loads a registered model back as a working torch model, from the packed file
  and the experiment's config only (no pickled code).
"""

from __future__ import annotations

import datetime
import logging
import math
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from compressors import load_packed, save_packed
from compressors.onnx_export import OnnxExportError
from experiments import DECISIONS, EpochStats, agreement_reference, evaluate
from search._errors import ConfigError
from search.config.compose import CONF_DIR, search_dirs, task_option, writable_config_dir
from search.config.fidelity import (
    EPOCHS_RUN_ATTR,
    PROMOTE_FROM_ATTR,
    REUSE_FROM_ATTR,
    front_trials,
)
from search.config.plan import missing_onnx_extra, plan_sweep
from search.config.score import Score
from search.config.storage import mask_url, masked_config, password_from_env
from search.results._study import load_study, study_config, trial_threads
from search.run.budget import seed_trial
from search.run.deploy import Deployed, OnnxMismatchError, deploy_onnx
from search.run.logs import Stages, Ticker
from search.run.measure import measure
from search.run.recommend import (  # noqa: F401 - re-exported
    RECOMMEND_MAX_DROP,
    Recommendation,
    front_points,
    knee_index,
    knee_trial,
    recommend,
)
from search.run.screening import Stage
from search.run.tracking import experiment_id
from search.run.trial import compress_recipe
from search.run.workload import build_task, load_workload

logger = logging.getLogger(__name__)

PICKS = ("recommended", "knee", "max-acc", "min-size")
#: Overrides that say where a study's results live and which baseline it compressed; the
#: commands `next_commands` prints repeat them (``search.storage``, ``tracking.*``, the baseline
#: cache, the trials' files, a pretrained ``checkpoint``).
_WHERE_KEYS = ("search.storage", "tracking.", "cache_dir", "output_dir", "checkpoint")
#: The first words of an exported experiment's header comment.
_EXPORTED = "Exported by `squeeze export`"
#: Artifact folder of a run's registered model: the packed file and the experiment's config.
MODEL_DIR = "model"


def pick_trial(
    study: optuna.Study, pick: str, *, max_drop: float | None = None
) -> optuna.trial.FrozenTrial:
    """A trial of the study's Pareto front (feasible trials only), judged in the direction of
    the task's score (`Score.of_study`: lower is better for an error such as MSE).

    Args:
        study: A finished or running squeeze study.
        pick: ``recommended`` (what ``squeeze sweep`` recommends: the knee of the points
            within ``max_drop``, by default `RECOMMEND_MAX_DROP`, else the best-scoring point;
            `recommend`), ``knee`` (farthest from the line joining the front's ends, score
            against log size, both scaled to [0, 1]), ``max-acc`` (the best validation score: the
            lowest for a lower-is-better one), ``min-size``, or ``trial=N``. In a study whose
            objectives include a latency or a speed-up, ``recommended`` and ``knee`` weigh the
            score against it instead of size, among the points at least as fast as the baseline
            (`search.run.recommend`).
        max_drop: If given, only points at most this much worse than the baseline on
            validation are considered: in points of a higher-is-better score, in percent of
            the baseline's value of a lower-is-better one (`Score.drop`).
    """
    if pick.startswith("trial="):
        number = _trial_number(pick)
        trials = study.get_trials(deepcopy=False)
        if number >= len(trials) or trials[number].state != TrialState.COMPLETE:
            raise ConfigError(
                f"--pick {pick}: trial {number} is not a complete trial of the study."
            )
        return trials[number]
    if pick not in PICKS:
        raise ConfigError(f"Unknown --pick {pick!r}. Allowed: {', '.join(PICKS)}, trial=N.")
    score = Score.of_study(study)
    objectives = tuple(study.metric_names or ())
    front = [t for t in front_trials(study) if "metrics" in t.user_attrs]
    if pick == "recommended" and front:
        baseline = study.user_attrs["baseline"]["val_acc"]
        points = front_points(_numbers_and_metrics(front), objectives)
        points["val_drop"] = [score.drop(v, baseline) for v in points.val_acc]
        budget = RECOMMEND_MAX_DROP if max_drop is None else max_drop
        chosen = recommend(points, max_drop=budget, score=score, objectives=objectives).trial
        return next(t for t in front if t.number == chosen)
    if max_drop is not None:
        baseline = study.user_attrs["baseline"]["val_acc"]
        front = [t for t in front if score.drop(_metric(t, "val_acc"), baseline) <= max_drop]
    if not front:
        raise ConfigError(
            f"Study {study.study_name!r} has no front point"
            + (f" {score.within(max_drop)}." if max_drop is not None else ".")
        )
    if pick == "max-acc":
        return max(
            front,
            key=lambda t: (score.goodness(_metric(t, "val_acc")), -_metric(t, "size_bytes")),
        )
    if pick == "min-size":
        return min(
            front,
            key=lambda t: (_metric(t, "size_bytes"), -score.goodness(_metric(t, "val_acc"))),
        )
    return _knee(front, score, within_budget=max_drop is not None, objectives=objectives)


def _split_at(trial: optuna.trial.FrozenTrial, study_cfg: DictConfig) -> dict[str, int]:
    """``{"split_at": S}`` for a promoted trial (`search.run.screening.Stage.split_at`), and
    ``{"stop_after": E}`` for a fine-tune that stopped on a plateau (``search.plateau``) after
    epoch ``E - 1`` of its schedule: the rerun stops there too.

    Raises:
        ConfigError: For a trial that started from another trial's weights (``search.reuse``):
            its rerun from the baseline would ship another model.
    """
    if REUSE_FROM_ATTR in trial.user_attrs:
        source = int(trial.user_attrs[REUSE_FROM_ATTR])
        raise ConfigError(
            f"Trial {trial.number} cannot be exported: it started from trial {source}'s "
            f"fine-tuned weights (search.reuse=true), which `squeeze run` does not rerun, so a "
            f"rerun would not ship its model. Export trial {source} (--pick trial={source}), or "
            "another front trial that fine-tuned from the baseline, or rerun the sweep with "
            "search.reuse=false."
        )
    split = (
        {"split_at": int(study_cfg.search.screen_epochs)}
        if PROMOTE_FROM_ATTR in trial.user_attrs
        else {}
    )
    if EPOCHS_RUN_ATTR in trial.user_attrs:
        split["stop_after"] = split.get("split_at", 0) + int(trial.user_attrs[EPOCHS_RUN_ATTR])
    return split


def export_trial(
    cfg: DictConfig,
    study_name: str,
    *,
    pick: str = "recommended",
    max_drop: float | None = None,
    name: str | None = None,
    conf_dir: Path | None = None,
    force: bool = False,
    config_dirs: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> Path:
    """Write the picked trial of ``study_name`` as ``<conf_dir>/experiment/<name>.yaml``; return
    the path.

    Args:
        cfg: A config naming the study's storage and tracking.
        study_name: The study.
        pick: See `pick_trial`.
        max_drop: See `pick_trial`.
        name: The experiment's name (default ``<study>-t<trial>``).
        conf_dir: The config folder to write into; by default ``./conf`` of the current
            directory (`search.config.compose.writable_config_dir`), never the installed package.
        force: Overwrite an existing file of that name.
        config_dirs: The ``--config-dir`` folders, repeated in the header's rerun command.
        overrides: The command's overrides; those saying where results live are repeated
            there too.

    Raises:
        ConfigError: If the file exists and ``force`` is not set (nothing is written).
    """
    study = load_study(cfg, study_name)
    trial = pick_trial(study, pick, max_drop=max_drop)
    study_cfg = study_config(cfg, study)
    space = OmegaConf.to_container(study_cfg.space, resolve=True)
    fixed = _fixed_space(space, trial)
    name = name or f"{study_name}-t{trial.number}"
    metrics = trial.user_attrs["metrics"]
    threads = trial_threads(cfg, study, trial)
    experiment = {
        "defaults": [
            {"override /task": task_option(study_cfg.task, config_dirs)},
            {"override /space": str(space.get("name", "default"))},
        ],
        "task": OmegaConf.to_container(study_cfg.task, resolve=True),
        "seed": int(study_cfg.seed),
        # the trial's torch threads: float reductions, and so its exact results, depend on them
        **({"threads": threads} if threads is not None else {}),
        "space": fixed,
        "run": {
            "name": name,
            "study": study_name,
            "trial": trial.number,
            "seed_trial": seed_trial(trial),  # a retry is seeded like the trial it retries
            # a promoted trial fine-tuned in two parts: its screen's epochs, then the rest
            **_split_at(trial, study_cfg),
            "expected": {k: float(metrics[k]) for k in ("val_acc", "size_bytes")},
        },
    }
    baseline = study.user_attrs.get("baseline", {})
    ratio = baseline.get("size_bytes", math.nan) / metrics["size_bytes"]
    header = (
        "# @package _global_\n"
        f"# {_EXPORTED} on {datetime.date.today()} from study '{study_name}', "
        f"trial {trial.number} (--pick {pick}):\n"
        f"#   val_acc {metrics['val_acc']:.4f}, {metrics['size_bytes'] / 1000:.2f} KB packed "
        f"({ratio:.1f}x the baseline's fp32 file), latency {metrics.get('latency_ms', 0):.3f} ms"
        "\n"
        f"# Rerun it: {run_command(name, config_dirs=config_dirs, overrides=overrides)}\n"
        + "".join(f"#   (with {v} set)\n" for v in password_variables(overrides))
    )
    path = (conf_dir if conf_dir is not None else writable_config_dir()) / "experiment"
    path = path / f"{name}.yaml"
    if path.exists() and not force:
        raise ConfigError(
            f"{path} already exists; squeeze export leaves it as it is. Overwrite it with "
            "--force, or choose another name with --name."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(experiment)))
    return path


@dataclass(frozen=True)
class OnnxResult:
    """What `export_onnx_trial` wrote: the picked trial, its graph and its packed file's bytes."""

    trial: int
    deployed: Deployed
    packed_bytes: int


def export_onnx_trial(
    cfg: DictConfig,
    study_name: str,
    *,
    pick: str = "recommended",
    max_drop: float | None = None,
    out: Path | None = None,
    force: bool = False,
) -> OnnxResult:
    """Write the picked trial's model as an ONNX graph (default ``./<study>-t<N>.onnx``),
    checked in ONNX Runtime against the torch model on the validation split.

    The trial's packed file is read from ``output_dir`` or, for a trial another machine ran,
    from its MLflow run.

    Raises:
        ConfigError: If the file exists and ``force`` is not set, or the onnx extra is missing.
        search.run.deploy.OnnxMismatchError: If ONNX Runtime's outputs are not the model's.
    """
    from search.run.pareto import trial_packed_file

    if missing_onnx_extra():
        raise ConfigError(
            f"squeeze export --format onnx needs {', '.join(missing_onnx_extra())}: "
            'pip install -e ".[onnx]".'
        )
    study = load_study(cfg, study_name)
    trial = pick_trial(study, pick, max_drop=max_drop)
    out = Path(out or f"{study_name}-t{trial.number}.onnx")
    if out.exists() and not force:
        raise ConfigError(
            f"{out} already exists; squeeze export leaves it as it is. Overwrite it with "
            "--force, or choose another path with --output."
        )
    task = load_workload(study_config(cfg, study)).task
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    with tempfile.TemporaryDirectory() as tmp:
        packed = trial_packed_file(
            Path(cfg.output_dir),
            study_name,
            trial.number,
            trial.user_attrs.get("mlflow_run_id"),
            client,
            Path(tmp),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        deployed = deploy_onnx(packed, task, out)
        return OnnxResult(trial.number, deployed, packed.stat().st_size)


@dataclass(frozen=True)
class RunResult:
    """What `run_experiment` produced."""

    metrics: dict[str, float]
    expected: dict[str, float]
    run_id: str
    model_name: str
    version: str
    path: Path


def run_experiment(
    cfg: DictConfig, *, alias: str = "champion", config_dirs: Sequence[str | Path] = ()
) -> RunResult:
    """Rerun the exported recipe ``cfg`` holds (``squeeze run experiment=<name>``).

    The recipe is applied to the cached baseline with the exported trial's seed and torch
    threads (``threads``, which `export_trial` writes), so on CPU the size and the validation
    metrics equal the trial's. The shipped file is evaluated on validation and test,
    logged to an MLflow run, and registered as model ``<experiment name>`` with ``alias``.
    ``config_dirs`` (the ``--config-dir`` folders) only serve the message listing the exported
    experiments when ``cfg`` holds none.
    """
    if cfg.get("run") is None:
        exported = _exported(search_dirs(config_dirs))
        raise ConfigError(
            "squeeze run needs an exported experiment: squeeze run experiment=<name> "
            "(in conf/experiment/ of this directory, of --config-dir or of the project: "
            f"{', '.join(exported) or 'none yet; see squeeze export'})."
        )
    plan = plan_sweep(cfg)
    try:
        recipe = plan.space.sample(optuna.trial.FixedTrial({}))
    except ValueError as err:  # a value left as a range: FixedTrial has nothing to give it
        raise ConfigError(f"The experiment's space is not fixed ({err}).") from None
    onnx = not missing_onnx_extra()
    step = Ticker(logger, "run:")  # a long run shows its steps, its epochs, its explanation
    steps = 7 if onnx else 6
    workload = load_workload(cfg, plan=plan, progress=Stages(logger, "run:"))
    task, baseline = workload.task, workload.baseline
    step(1, steps, "baseline ready")
    epochs = Ticker(logger, "run: fine-tune epoch")

    stop_after = cfg.run.get("stop_after")  # (a fine-tune that stopped on a plateau)

    def after_epoch(stats: EpochStats) -> bool:
        val = "" if stats.val_acc is None else f"val {stats.val_acc:.4f}"
        epochs(stats.epoch + 1, recipe.finetune["epochs"], val)
        return stop_after is not None and stats.epoch + 1 >= int(stop_after)

    model, _ = compress_recipe(
        recipe,
        plan.space,
        task,
        baseline,
        seed=int(cfg.seed) + int(cfg.run.get("seed_trial", cfg.run.trial)),
        after_epoch=after_epoch,
        device=workload.device,
        stage=Stage(split_at=cfg.run.get("split_at")),
    )
    step(2, steps, "compressed and fine-tuned")
    folder = Path(cfg.output_dir) / "runs" / str(cfg.run.name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.sqz"
    size = save_packed(model, path, like=baseline.model)
    OmegaConf.save(OmegaConf.create(masked_config(cfg)), folder / "config.yaml")  # no password
    shipped = load_packed(path, task.build_model())
    step(3, steps, "packed")
    val_reference = (  # for val_agreement (a regression has no decisions to agree on)
        agreement_reference(baseline.model, task.val, task.outputs)
        if task.outputs in DECISIONS
        else None
    )
    metrics = {
        "size_bytes": float(size),
        **{
            k: float(v)
            for k, v in measure(shipped, task, (1,), 10, reference_outputs=val_reference).items()
        },
        "test_acc": evaluate(shipped, task.test),
    }
    step(4, steps, "measured")
    if onnx:
        try:
            metrics.update(deploy_onnx(path, task, folder / "model.onnx").metrics)
            step(5, steps, "exported to ONNX")
        except (OnnxExportError, OnnxMismatchError) as err:  # model.sqz is still shipped
            (folder / "model.onnx").unlink(missing_ok=True)
            logger.warning("ONNX not exported, model.sqz is logged alone: %s", err)
    else:
        logger.warning('ONNX not exported (pip install -e ".[onnx]" to ship model.onnx too)')

    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    exp_id = experiment_id(client, str(cfg.tracking.uri), str(cfg.tracking.mlflow_experiment))
    run = client.create_run(
        exp_id,
        run_name=f"run-{cfg.run.name}",
        tags={
            "squeeze.role": "run",
            "squeeze.study": cfg.run.study,
            "squeeze.trial": cfg.run.trial,
        },
    )
    run_id = run.info.run_id
    for key, value in recipe.params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(folder), MODEL_DIR)
    # What compression changed, logged beside the model under explain/
    from search.results.explain import explain_model, write_explanation

    explanation = explain_model(path, task, baseline, name=str(cfg.run.name))
    explain_dir = Path(cfg.output_dir) / "runs" / f"{cfg.run.name}-explain"
    write_explanation(explanation, explain_dir)
    step(steps - 1, steps, "explained")
    client.log_artifacts(run_id, str(explain_dir), "explain")
    client.set_terminated(run_id, "FINISHED")
    model_name = str(cfg.run.name)
    try:
        client.create_registered_model(model_name)
    except MlflowException:
        pass  # already registered: this run adds a version
    version = client.create_model_version(
        model_name, f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id
    ).version
    client.set_registered_model_alias(model_name, alias, version)
    step(steps, steps, "logged and registered")
    expected = {k: float(v) for k, v in cfg.run.expected.items()}
    return RunResult(metrics, expected, run_id, model_name, str(version), path)


def load_registered(name: str, *, alias: str = "champion", tracking_uri: str | None = None):
    """The registered model ``name@alias`` as a working torch model (``eval`` mode).

    Reads the version's packed file and config; builds the task's architecture from the config's
    ``_target_`` and loads the file into it. Nothing is unpickled. A task of one's own needs its
    module importable: installed, on ``PYTHONPATH``, or in the current directory (or the parent
    folder of a config folder this process composed with, `search.config.modules`).

    Raises:
        ConfigError: If there is no such model or alias (it names the registered models), or
            the task's module cannot be imported (it names the module and how to make it
            importable).

    Example:
        >>> from search import load_registered
        >>> model = load_registered("digits_mlp-best", tracking_uri="sqlite:///mlflow.db")
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        models = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise ConfigError(
            f"No registered model {name!r} with alias @{alias} in tracking URI "
            f"{mask_url(client.tracking_uri)}. Registered models there: "
            f"{', '.join(models) or 'none'}; `squeeze run experiment=<name>` registers one."
        ) from None  # (MLflow's own traceback says no more)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(version.run_id, MODEL_DIR, tmp))
        cfg = OmegaConf.load(folder / "config.yaml")
        plan = plan_sweep(cfg, connect=False)  # (its module: search.config.modules)
        task = build_task(plan)
        return load_packed(folder / "model.sqz", task.build_model())


def _exported(dirs: Sequence[Path]) -> list[str]:
    """Names of the experiments `export_trial` wrote into ``conf/experiment/`` or ``dirs``."""
    names = set()
    for folder in (CONF_DIR, *dirs):
        for path in (Path(folder) / "experiment").glob("*.yaml"):
            if _EXPORTED in path.read_text(encoding="utf-8", errors="replace")[:500]:
                names.add(path.stem)
    return sorted(names)


def _metric(trial: optuna.trial.FrozenTrial, key: str) -> float:
    return float(trial.user_attrs["metrics"][key])


def _numbers_and_metrics(front: list[optuna.trial.FrozenTrial]) -> dict[int, dict]:
    return {t.number: t.user_attrs["metrics"] for t in front}


def _knee(
    front: list[optuna.trial.FrozenTrial],
    score: Score,
    *,
    within_budget: bool,
    objectives: Sequence[str] = (),
) -> optuna.trial.FrozenTrial:
    points = front_points(_numbers_and_metrics(front), objectives)
    chosen = knee_trial(points, score, within_budget=within_budget, objectives=objectives)
    return next(t for t in front if t.number == chosen)


def next_commands(
    study_name: str,
    trial: int,
    *,
    config_dirs: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> list[str]:
    """The ``squeeze export`` and ``squeeze run`` command lines for ``trial`` of ``study_name``,
    with the ``--config-dir`` folders and the overrides that say where the study's results live
    (storage, tracking, cache and output folders; a password is read from an environment
    variable, `password_variables`)."""
    export = ["export", "--study", study_name, "--pick", f"trial={trial}"]
    return [
        _command_line(export, config_dirs, overrides),
        run_command(f"{study_name}-t{trial}", config_dirs=config_dirs, overrides=overrides),
    ]


def run_command(
    experiment: str, *, config_dirs: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> str:
    """The ``squeeze run experiment=<experiment>`` command line, as `next_commands` writes it."""
    return _command_line(["run", f"experiment={experiment}"], config_dirs, overrides)


def password_variables(overrides: Sequence[str]) -> list[str]:
    """The environment variables the commands `next_commands` and `run_command` print for
    ``overrides`` read a password from (`search.config.storage.password_from_env`): they hold
    ``${oc.env:VAR}`` instead of a password, to be set before the commands are pasted."""
    found: list[str] = []
    for override in overrides:
        if override.lstrip("+~").startswith(_WHERE_KEYS):
            found += [v for v in password_from_env(override)[1] if v not in found]
    return found


def _command_line(
    words: list[str], config_dirs: Sequence[str | Path], overrides: Sequence[str]
) -> str:
    """The command, with the overrides saying where results live; a password in a URL is read
    from an environment variable (`password_variables`): the line can be pasted as it is."""
    dirs = [arg for d in config_dirs for arg in ("--config-dir", str(d))]
    where = [password_from_env(o)[0] for o in overrides if o.lstrip("+~").startswith(_WHERE_KEYS)]
    return mask_url(shlex.join(["squeeze", *words, *dirs, *where]))


def _trial_number(pick: str) -> int:
    try:
        return int(pick.removeprefix("trial="))
    except ValueError:
        raise ConfigError(f"--pick {pick!r}: expected trial=<number>.") from None


def _fixed_space(space: dict[str, Any], trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The study's space with the trial's pipeline and every value fixed to the trial's."""
    params = trial.params
    pipeline = params.get("pipeline")
    pipeline = pipeline.split("+") if pipeline else list(_pipeline_list(space["pipeline"]))
    fixed: dict[str, Any] = {"pipeline": pipeline}
    for section in [*pipeline, "finetune"]:
        entry = dict(space.get(section) or {})
        for key, value in list(entry.items()):
            entry[key] = _fix(f"{section}.{key}", value, params)
        fixed[section] = entry
    return fixed


def _fix(name: str, value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _fix(f"{name}.{k}", v, params) for k, v in value.items()}
    return params.get(name, value)


def _pipeline_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return value
    return [p.strip() for p in str(value).split("+")]
