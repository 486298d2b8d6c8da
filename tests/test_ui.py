"""``squeeze ui``: MLflow's UI opened on a study's runs table (saved views, the link), and the page
itself rendered in headless Chromium (`bench/mlflow_page.py`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from search import ConfigError
from search.cli import main
from search.results.ui import find_study, serve, server_base
from search.run.mlflow_views import VIEW_TAG_PREFIX, runs_url, view_key, view_state
from search.run.tracking import experiment_id
from tests.conftest import _empty_mlflow_db

ROOT = Path(__file__).resolve().parents[1]


def test_the_trials_view_lists_them_flat_with_the_metrics_that_matter():
    state = view_state("digits_mlp", ["val_acc", "latency_ms_b256"])
    columns = state["selectedColumns"]
    for metric in ("val_acc", "latency_ms_b256", "size_bytes", "compression_ratio", "speedup"):
        assert f"metrics.`{metric}`" in columns
    assert "tags.`pareto`" in columns and columns == state["columnOrder"]
    # Sorted by a metric, MLflow lists child runs flat (by start time it nests them, collapsed).
    assert state["orderByKey"] == "metrics.`val_acc`" and state["orderByAsc"] is False
    assert "tags.`squeeze.trial` LIKE '%'" in state["searchFilter"]  # the trials, not the study
    assert view_state("mse", ["val_acc"], higher_is_better=False)["orderByAsc"] is True
    front = view_state("digits_mlp", ["val_acc"], front=True)
    assert "tags.pareto = 'true'" in front["searchFilter"]


def test_the_link_opens_the_runs_tab_in_model_training_mode():
    url = runs_url("http://127.0.0.1:5000/", "7", "my study")
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    assert "workflowType=machine_learning" in url  # not the GenAI overview
    assert url.endswith("viewStateShareKey=my_study-trials")


def _store(tmp_path) -> tuple[MlflowClient, str, str]:
    shutil.copyfile(_empty_mlflow_db(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return client, uri, experiment_id(client, uri, "squeeze")


def _cfg(uri: str):
    return OmegaConf.create({"tracking": {"uri": uri, "mlflow_experiment": "squeeze"}})


def _study_runs(client, exp, study, *, pareto=(0,), trials=3, objectives="['val_acc', 'flops']"):
    parent = client.create_run(
        exp, run_name=study, tags={"squeeze.role": "study", "squeeze.study": study}
    ).info.run_id
    client.log_param(parent, "search.objectives", objectives)
    children = {}
    for n in range(trials):
        tags = {"mlflow.parentRunId": parent, "squeeze.study": study, "squeeze.trial": str(n)}
        if n in pareto:
            tags["pareto"] = "true"
        children[n] = client.create_run(exp, run_name=f"{study}-t{n:04d}", tags=tags).info.run_id
    return parent, children


def test_ui_saves_the_views_of_a_study_swept_before_them_and_their_filters_work(tmp_path):
    client, uri, exp = _store(tmp_path)
    _, children = _study_runs(client, exp, "old", pareto=(1,))
    _study_runs(client, exp, "other")
    runs = find_study(_cfg(uri), "old")
    assert runs.experiment_id == exp and runs.study == "old"
    tags = client.get_experiment(exp).tags
    views = {}
    for front in (False, True):
        envelope = json.loads(tags[VIEW_TAG_PREFIX + view_key("old", front=front)])
        assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
        views[front] = json.loads(envelope["state"])
    assert "metrics.`flops`" in views[False]["selectedColumns"]  # the study's objectives
    # MLflow's own search accepts the filters: the study's trials, not its parent or another study.
    found = client.search_runs([exp], filter_string=views[False]["searchFilter"])
    assert {r.info.run_id for r in found} == set(children.values())
    found = client.search_runs([exp], filter_string=views[True]["searchFilter"])
    assert [r.info.run_id for r in found] == [children[1]]


def test_ui_opens_the_latest_study_and_names_the_studies_there(tmp_path):
    client, uri, exp = _store(tmp_path)
    _study_runs(client, exp, "first")
    _study_runs(client, exp, "second")
    assert find_study(_cfg(uri)).study == "second"
    with pytest.raises(ConfigError, match="Studies there: second, first"):
        find_study(_cfg(uri), "thrid")
    with pytest.raises(ConfigError, match="'nope' is not in tracking.uri"):
        find_study(OmegaConf.create({"tracking": {"uri": uri, "mlflow_experiment": "nope"}}))


def test_ui_on_a_tracking_server_prints_its_links_and_starts_nothing(tmp_path, capsys):
    assert server_base("http://alice:secret@host:5000/") == "http://host:5000"
    assert server_base("sqlite:///mlflow.db") is None
    client, uri, exp = _store(tmp_path)
    _study_runs(client, exp, "s")
    # A tracking server serves the UI: the links point at it (nothing to start, no password shown).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("search.results.ui.server_base", lambda _: "http://host:5000")
        assert main(["ui", f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert f"http://host:5000/#/experiments/{exp}/runs?workflowType=machine_learning" in out
    assert "viewStateShareKey=s-front" in out


@pytest.mark.slow
def test_ui_says_when_its_port_is_taken(tmp_path):
    _, uri, _ = _store(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"is port {port} taken"):
            serve(uri, port=port, ready=lambda base: None, timeout=300)


@pytest.mark.slow
def test_the_first_mlflow_page_in_chromium_shows_the_runs_and_their_metrics(tmp_path, cache_dir):
    """README's quick start, then `squeeze ui`: rendered in headless Chromium, the first page is
    the runs table with every trial and the metric columns, not the GenAI overview, and the
    front's link shows only the front (`bench/mlflow_page.py`)."""
    if shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have chromium (apt-get install -y chromium)")
        pytest.skip("no chromium (apt-get install -y chromium)")
    overrides = [f"cache_dir={cache_dir}", "threads=1", "space.finetune.epochs=2"]
    done = subprocess.run(
        [sys.executable, "bench/mlflow_page.py", "--workdir", str(tmp_path), "--trials", "3"]
        + ["--control", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "page ok" in done.stdout
    # The check can fail: the experiment's plain link (what `mlflow ui` gave) is the GenAI page.
    assert "control: the plain experiment link fails the check" in done.stdout
