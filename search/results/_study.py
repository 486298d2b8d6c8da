"""Read a stored study back: the study itself, the config it ran with, the threads a trial used.

Shared by `search.results.reuse` (export, run), `search.results.explain` and
`search.results.report`, which import it rather than each other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search._errors import ConfigError
from search.config.storage import mask_url, open_storage
from search.run.trial import THREADS_ATTR


def load_study(cfg: DictConfig, study_name: str) -> optuna.Study:
    """The study ``study_name`` in ``search.storage``; a `ConfigError` lists those there."""
    storage = open_storage(str(cfg.search.storage))
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        raise ConfigError(
            f"No study {study_name!r} in search.storage {mask_url(cfg.search.storage)}. "
            f"Studies there: {', '.join(names) or 'none'}."
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def study_config(cfg: DictConfig, study: optuna.Study) -> DictConfig:
    """The config the study ran with: its local copy, else the parent MLflow run's artifact;
    with ``threads`` fixed to the torch threads the study started with, when recorded (so that
    a report or an explanation computes as its trials did)."""
    local = Path(cfg.output_dir) / study.study_name / "config.yaml"
    if local.exists():
        study_cfg = OmegaConf.load(local)
    else:
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id is None:
            raise ConfigError(f"Study {study.study_name!r} has no recorded config to export from.")
        with tempfile.TemporaryDirectory() as tmp:
            client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
            study_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    if THREADS_ATTR in study.user_attrs:
        study_cfg.threads = int(study.user_attrs[THREADS_ATTR])
    return study_cfg


def trial_threads(
    cfg: DictConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial
) -> int | None:
    """The torch threads ``trial`` ran with: its own record, else its study's (the count the
    study started with, or the ``torch.threads`` param of its parent MLflow run, for studies
    from before trials recorded it); None if nothing says."""
    for attrs in (trial.user_attrs, study.user_attrs):
        if THREADS_ATTR in attrs:
            return int(attrs[THREADS_ATTR])
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id is None:
        return None
    try:
        params = MlflowClient(tracking_uri=str(cfg.tracking.uri)).get_run(run_id).data.params
    except MlflowException:
        return None
    value = params.get("torch.threads")
    return int(value) if value is not None else None
