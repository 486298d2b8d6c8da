"""MLflow through a real tracking server (``mlflow server`` on a PostgreSQL backend store) with
several workers, and passwords in storage URLs masked in everything written or printed."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from search import compose_config, run_sweep
from search.cli import main
from tests.conftest import study_runs, sweep_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path, pg_url):
    """``mlflow server`` on its own PostgreSQL schema, serving artifacts from ``tmp_path``."""
    schema = f"mlflow_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            str(mlflow) if mlflow.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            f"{pg_url}?options=-csearch_path%3D{schema}",
            "--artifacts-destination",
            str(tmp_path / "served-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


# Long: an `mlflow server` started on a new PostgreSQL schema and two spawned workers. The fast
# lane logs from several processes to one MLflow store in test_workers.py (a worker joining).
@pytest.mark.slow
def test_two_workers_log_to_a_tracking_server(tmp_path, cache_dir, tracking_server):
    overrides = [
        *sweep_overrides(tmp_path, cache_dir, "search.n_trials=4", "search.n_jobs=2"),
        f"tracking.uri={tracking_server}",
    ]
    result = run_sweep(compose_config(overrides))
    client, parents, children = study_runs(tracking_server, max_results=100)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert Counter(c.data.tags["squeeze.trial"] for c in children) == Counter("0123")
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        files = client.list_artifacts(child.info.run_id)
        assert [f.file_size for f in files] == [child.data.metrics["size_bytes"]]
    assert {f.path for f in client.list_artifacts(parents[0].info.run_id)} >= {"pareto.csv"}
    assert not result.front.empty
    # The same seen through the server's REST API, as any other client would see it.
    parent_id = parents[0].info.run_id
    with urllib.request.urlopen(
        f"{tracking_server}/api/2.0/mlflow/artifacts/list?run_id={parent_id}", timeout=30
    ) as response:
        listed = {f["path"] for f in json.load(response)["files"]}
    assert {"pareto.csv", "pareto.png", "trials.csv", "config.yaml"} <= listed
    with urllib.request.urlopen(
        f"{tracking_server}/api/2.0/mlflow/runs/get?run_id={parent_id}", timeout=30
    ) as response:
        tags = {t["key"]: t["value"] for t in json.load(response)["run"]["data"]["tags"]}
    assert tags["pareto_trials"] == ",".join(str(n) for n in result.front.trial)


def test_passwords_in_urls_are_masked_everywhere(tmp_path, cache_dir, pg_url, capsys, caplog):
    secret = "pw-" + uuid.uuid4().hex[:10]  # PostgreSQL here trusts local users: any password
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@")
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    caplog.set_level("INFO")
    try:
        code = main(
            [
                "sweep",
                *sweep_overrides(
                    tmp_path,
                    cache_dir,
                    "search.n_trials=1",
                    f"search.study_name={name}",
                    storage=with_password,
                ),
            ]
        )
        assert code == 0
        out = capsys.readouterr()
        assert secret not in out.out + out.err
        assert "postgres:***@" in caplog.text  # the URL is logged, masked
        assert secret not in caplog.text
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        experiment = client.get_experiment_by_name("squeeze")
        (parent,) = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`squeeze.role` = 'study'"
        )
        assert parent.data.params["search.storage"].startswith(
            "postgresql+psycopg2://postgres:***@"
        )
        for path in tmp_path.rglob("*"):  # MLflow's database, artifacts, config.yaml, CSVs
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)


def _files_holding(secret: str, *folders: Path) -> list[Path]:
    """Every file under ``folders`` whose bytes hold ``secret`` (databases and artifacts too)."""
    return [
        path
        for folder in folders
        for path in Path(folder).rglob("*")
        if path.is_file() and secret.encode() in path.read_bytes()
    ]


# Slow lane (a sweep, `squeeze export` and `squeeze run`: 6-8 s CPU); CI runs it (CI=true, its
# PostgreSQL must be reachable). The fast lane keeps test_passwords_in_urls_are_masked_everywhere
# (a sweep on a password URL: nothing printed, logged or written holds it) and test_secrets.py
# (the printed commands name the variable and a config's URL reads it from the environment).
@pytest.mark.slow
def test_a_password_is_written_nowhere_and_the_printed_commands_read_it_from_the_environment(
    tmp_path, cache_dir, pg_url, capsys, caplog, monkeypatch
):
    secret = "secretpw" + uuid.uuid4().hex[:8]  # PostgreSQL here trusts local users: any password
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@")
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)  # squeeze export writes ./conf/experiment/ here
    monkeypatch.delenv("SQUEEZE_DB_PASSWORD", raising=False)
    caplog.set_level("INFO")
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=1",
        f"search.study_name={name}",
        "space.pipeline=[prune]",
        storage=with_password,
    )
    try:
        assert main(["sweep", *overrides]) == 0
        out = capsys.readouterr().out
        assert "set SQUEEZE_DB_PASSWORD first" in out
        lines = [line.strip() for line in out.splitlines()]
        commands = [line for line in lines if line.startswith("squeeze ")]
        assert [c.split()[1] for c in commands] == ["export", "run"]
        for command in commands:
            assert "postgres:${oc.env:SQUEEZE_DB_PASSWORD}@" in command and secret not in command
        # Pasted without the variable: a clear error naming it, exit 2.
        assert main(shlex.split(commands[0])[1:]) == 2
        assert "reads the environment variable SQUEEZE_DB_PASSWORD" in capsys.readouterr().err
        # Pasted as printed, with the variable set, as a shell would pass them.
        monkeypatch.setenv("SQUEEZE_DB_PASSWORD", secret)
        for command in commands:
            assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
        printed = capsys.readouterr()
        assert "squeeze run" in printed.out and secret not in printed.out + printed.err
        exported = list((tmp_path / "conf" / "experiment").glob("*.yaml"))
        assert len(exported) == 1 and "${oc.env:SQUEEZE_DB_PASSWORD}" in exported[0].read_text()
        assert secret not in caplog.text and "secretpw" not in caplog.text
        # The trials, the runs, MLflow's database and artifacts, the exported yaml, the cache.
        assert (tmp_path / "trials" / "runs").is_dir() and (tmp_path / "mlflow.db").is_file()
        assert _files_holding("secretpw", tmp_path, cache_dir) == []
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)


@pytest.mark.slow
def test_a_tracking_server_url_with_credentials_works_and_they_are_written_nowhere(
    tmp_path, cache_dir, tracking_server, capsys, monkeypatch
):
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)  # (compose_config sets them)
    secret = "secretpw" + uuid.uuid4().hex[:8]
    with_credentials = tracking_server.replace("http://", f"http://squeeze:{secret}@")
    overrides = [
        *sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", "space.pipeline=[prune]"),
        f"tracking.uri={with_credentials}",
    ]
    assert main(["sweep", *overrides]) == 0, capsys.readouterr().err  # reached, not refused
    out = capsys.readouterr().out
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == secret  # where MLflow's client reads it
    assert f"tracking.uri={tracking_server}" in out and secret not in out
    assert "set MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD first" in out
    client = MlflowClient(tracking_server)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("squeeze").experiment_id],
        filter_string="tags.`squeeze.role` = 'study'",
    )
    assert parent.data.params["tracking.uri"] == tracking_server
    assert _files_holding("secretpw", tmp_path) == []  # artifacts served from tmp_path too
