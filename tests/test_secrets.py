"""Passwords in URLs: masked in what is written, read from the environment in what is printed
to paste, and a tracking server's credentials moved to MLflow's own variables (fast checks; the
end-to-end ones are in test_tracking_server.py)."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from search import ConfigError, compose_config
from search.config.storage import (
    mask_url,
    masked_config,
    password_from_env,
    split_credentials,
)
from search.results.reuse import next_commands, password_variables

STORAGE = "search.storage=postgresql+psycopg2://ann:s3cret@db:5432/optuna"


def test_a_password_read_from_the_environment_is_not_masked():
    url = "postgresql://ann:${oc.env:SQUEEZE_DB_PASSWORD}@db/x"
    assert mask_url(url) == url
    assert mask_url("postgresql://ann:pw@db/x") == "postgresql://ann:***@db/x"


def test_printed_overrides_read_the_password_from_an_environment_variable():
    assert password_from_env(STORAGE) == (
        "search.storage=postgresql+psycopg2://ann:${oc.env:SQUEEZE_DB_PASSWORD}@db:5432/optuna",
        ["SQUEEZE_DB_PASSWORD"],
    )
    assert password_from_env("tracking.uri=postgresql://m:pw@db/mlflow") == (
        "tracking.uri=postgresql://m:${oc.env:SQUEEZE_TRACKING_PASSWORD}@db/mlflow",
        ["SQUEEZE_TRACKING_PASSWORD"],
    )
    assert password_from_env("tracking.uri=https://me:pw@mlflow.example.org") == (
        "tracking.uri=https://mlflow.example.org",
        ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
    )
    for same in ("cache_dir=x", "search.storage=optuna.journal", "tracking.uri=sqlite:///a.db"):
        assert password_from_env(same) == (same, [])


def test_the_next_commands_hold_no_password_and_name_the_variable(tmp_path):
    overrides = [STORAGE, "task=digits_mlp", f"output_dir={tmp_path}"]
    lines = next_commands("digits_mlp", 3, overrides=overrides)
    assert all("s3cret" not in line and "***" not in line for line in lines)
    assert all(
        "'search.storage=postgresql+psycopg2://ann:${oc.env:SQUEEZE_DB_PASSWORD}@" in line
        for line in lines
    )
    assert password_variables(overrides) == ["SQUEEZE_DB_PASSWORD"]
    assert password_variables(["task=digits_mlp"]) == []


def test_a_url_in_the_config_reads_the_environment_and_a_missing_variable_is_named(
    monkeypatch,
):
    override = "search.storage=postgresql://ann:${oc.env:SQUEEZE_DB_PASSWORD}@db/x"
    monkeypatch.setenv("SQUEEZE_DB_PASSWORD", "s3cret")
    cfg = compose_config([override])
    assert cfg.search.storage == "postgresql://ann:s3cret@db/x"
    assert "s3cret" not in OmegaConf.to_yaml(OmegaConf.create(masked_config(cfg)))
    monkeypatch.delenv("SQUEEZE_DB_PASSWORD")
    with pytest.raises(
        ConfigError,
        match="search.storage reads the environment variable "
        "SQUEEZE_DB_PASSWORD .* which is not set. Set it first",
    ):
        compose_config([override])


def test_a_tracking_servers_credentials_move_to_mlflows_variables(monkeypatch):
    assert split_credentials("http://me:p%40ss@host:5000/x") == (
        "http://host:5000/x",
        ("me", "p@ss"),
    )
    assert split_credentials("http://host:5000") == ("http://host:5000", None)
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    cfg = compose_config(["tracking.uri=http://me:pw@127.0.0.1:5000"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "me"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw"
