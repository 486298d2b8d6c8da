"""Several workers, one study: an exact total budget, lost workers, resumes, joining workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search import ConfigError, compose_config, run_sweep
from search.cli import main
from search.config.device import resolve_device
from search.config.plan import workers_wanted
from search.config.storage import open_storage
from search.run.budget import (
    REPLACES_ATTR,
    RETRY_OF_ATTR,
    WORKER_ATTR,
    Budget,
    fail_kind,
    seed_trial,
)
from search.run.workers import gpu_assignment
from tests.conftest import study_runs, sweep_overrides

ROOT = Path(__file__).resolve().parents[1]


def _runs(uri: str):
    return study_runs(uri)[1:]


def _pid(trial) -> int:
    return int(trial.user_attrs[WORKER_ATTR].split(":")[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_LOGGING_LEVEL": "WARNING"}


# Long: 40 trials in 4 spawned workers. The fast lane's smaller form: a worker from elsewhere
# joining a 4-trial sweep on PostgreSQL (below) and the lost-trial budget tests.
@pytest.mark.slow
def test_four_workers_on_postgresql_finish_exactly_the_budget(tmp_path, cache_dir, pg_url):
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=40",
        "search.n_jobs=4",
        f"search.study_name={name}",
        "search.sampler=random",
        "space.finetune.epochs=1",
        storage=pg_url,
        fresh_mlflow=True,  # the workers' parent creates the MLflow store, as a first sweep does
    )
    seen: list[int] = []
    try:
        result = run_sweep(
            compose_config(overrides), callbacks=[lambda s, t: seen.append(t.number)]
        )
        trials = optuna.load_study(study_name=name, storage=pg_url).trials
        assert len(trials) == 40
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert sorted(seen) == list(range(40))  # the workers' trials reach this process's callbacks
        pids = {_pid(t) for t in trials}
        assert len(pids) >= 2 and os.getpid() not in pids  # trials ran in the worker processes
        parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
        assert len(parents) == 1 and len(children) == 40
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
        assert sorted(int(c.data.tags["squeeze.trial"]) for c in children) == list(range(40))
        assert {c.info.status for c in children} == {"FINISHED"}
        assert set(result.trials.mlflow_run_id) == {c.info.run_id for c in children}
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_a_worker_from_elsewhere_joins_a_running_sweep(tmp_path, cache_dir, pg_url):
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=4",
        f"search.study_name={name}",
        "search.warm_start=false",  # (no enqueued trial waits without a worker)
        storage=pg_url,
    )
    joined: list[subprocess.Popen] = []

    def start_a_worker_and_wait_for_its_first_trial(study, trial):
        if joined:
            return
        joined.append(  # as on another machine
            subprocess.Popen(
                [sys.executable, "-m", "search.cli", "worker", "--quiet", *overrides],
                cwd=tmp_path,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        deadline = time.monotonic() + 120
        # (a trial the worker has just created may not carry its worker id yet: it is not ours)
        while all(
            WORKER_ATTR in t.user_attrs and _pid(t) == os.getpid()
            for t in study.get_trials(deepcopy=False)
        ):
            assert joined[0].poll() is None and time.monotonic() < deadline, "worker did not join"
            time.sleep(0.2)

    try:
        run_sweep(
            compose_config(overrides), callbacks=[start_a_worker_and_wait_for_its_first_trial]
        )
        out, err = joined[0].communicate(timeout=120)
        assert joined[0].returncode == 0, err
        trials = optuna.load_study(study_name=name, storage=pg_url).trials
        assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
        by_worker = Counter(_pid(t) for t in trials)
        elsewhere = len(trials) - by_worker[os.getpid()]
        assert by_worker[os.getpid()] >= 1 and elsewhere >= 1, by_worker
        assert f"worker ran {elsewhere} trial(s)" in out
        parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
        assert len(parents) == 1 and len(children) == 4
        assert [p.info.status for p in parents] == ["FINISHED"]
    finally:
        for process in joined:
            process.kill()
        optuna.delete_study(study_name=name, storage=pg_url)


def test_a_worker_without_its_study_exits_2_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["worker", "--quiet", "search.study_name=nowhere"]) == 2
    assert "No study 'nowhere'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def _wait_for_running_trial(journal: Path, pid: int, *, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists():
            try:
                study = optuna.load_study(
                    study_name="digits_mlp", storage=open_storage(str(journal))
                )
            except KeyError:
                study = None
            for t in study.get_trials(states=[TrialState.RUNNING]) if study else []:
                # (a trial is RUNNING in the journal a moment before its worker records itself)
                if WORKER_ATTR in t.user_attrs and _pid(t) == pid:
                    return t.number
        time.sleep(0.2)
    raise AssertionError(f"no trial of worker {pid} started within {timeout} s")


# Long: four sweep processes, trials of 80 epochs. The fast lane's smaller form: Ctrl-C and a
# rerun (test_interrupts.py), lost trials rerun without using the budget, and a trial without
# heartbeat on PostgreSQL (below).
@pytest.mark.slow
def test_kill_nine_a_worker_mid_trial_three_times_then_resume(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=5",
        "space.finetune.epochs=80",
        "search.retries=1",
        fresh_mlflow=True,  # the first sweep process creates the MLflow store
    )
    command = [sys.executable, "-m", "search.cli", "sweep", "--quiet", *overrides]
    journal = tmp_path / "optuna.journal"
    killed = []
    for _ in range(3):
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_env(),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            killed.append(_wait_for_running_trial(journal, process.pid))
            time.sleep(0.3)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the worker and its MLflow writer
            process.wait()
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    trials = optuna.load_study(study_name="digits_mlp", storage=open_storage(str(journal))).trials
    # A lost trial uses no budget: its recipe runs again, so all 5 trials of the budget complete
    # (before lost trials ran again for free, the study ended with 5 trials, 3 of them lost).
    assert len(trials) == 5 + len(killed)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5
    assert all(t.state.is_finished() for t in trials)  # nothing left RUNNING or WAITING
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert failed == killed
    assert all(trials[n].user_attrs["fail_kind"] == "worker_lost" for n in failed)
    retries = [t for t in trials if RETRY_OF_ATTR in t.user_attrs]
    assert retries  # a lost trial's recipe was tried again, within the budget
    for retry in retries:
        assert retry.params == trials[retry.user_attrs[RETRY_OF_ATTR]].params
        assert seed_trial(retry) == seed_trial(trials[retry.user_attrs[RETRY_OF_ATTR]])

    parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert [p.info.status for p in parents] == ["FINISHED"]  # one parent run, reused
    per_trial = Counter(c.data.tags["squeeze.trial"] for c in children)
    assert per_trial and max(per_trial.values()) == 1  # no trial has two child runs
    assert "RUNNING" not in {c.info.status for c in children}
    for child in children:
        if int(child.data.tags["squeeze.trial"]) in failed:
            assert child.info.status == "FAILED"
            assert child.data.tags["squeeze.fail_kind"] == "worker_lost"


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_budget_already_spent_runs_nothing_more(tmp_path, cache_dir, storage):
    url = f"sqlite:///{tmp_path}/optuna.db" if storage == "sqlite" else None
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", storage=url)
    run_sweep(compose_config(overrides))
    result = run_sweep(compose_config(overrides))
    assert len(result.trials) == 2


def test_a_trial_without_heartbeat_on_postgresql_fails_and_is_retried(pg_url):
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize"])
    try:
        with pytest.warns(UserWarning, match="Heartbeat"):  # (squeeze's loop silences it)
            lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        lost.set_user_attr(WORKER_ATTR, "another-machine:123:456")  # only its heartbeat tells
        storage.record_heartbeat(lost._trial_id)
        budget = Budget(study=study, url=pg_url, total=2, retries=1)
        time.sleep(3.5)  # past the grace period
        retry = budget.claim()
        trials = study.get_trials()
        assert trials[0].state == TrialState.FAIL and fail_kind(trials[0]) == "worker_lost"
        assert retry.number == 1 and retry.suggest_float("x", 0, 1) == lost.params["x"]
        assert retry.user_attrs[RETRY_OF_ATTR] == 0
        study.tell(retry, 1.0)
        # The lost trial uses no budget (its retry replaces it): one trial is left.
        last = budget.claim()
        assert last.number == 2 and REPLACES_ATTR not in last.user_attrs
        study.tell(last, last.suggest_float("x", 0, 1))
        assert budget.claim() is None  # 2 finished trials that count: the budget is spent
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)


def test_workers_are_pinned_to_gpus_and_auto_picks_cuda_only_when_present():
    assert gpu_assignment(4, gpus=2, trials_per_gpu=2) == [0, 0, 1, 1]
    assert gpu_assignment(3, gpus=2, trials_per_gpu=1) == [0, 1, 0]
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        gpu_assignment(2, gpus=0, trials_per_gpu=1)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert workers_wanted(compose_config(["search.n_jobs=3"])) == 3
    assert workers_wanted(compose_config(["device=auto", "search.n_jobs=3"])) == (
        torch.cuda.device_count() * 1 if torch.cuda.is_available() else 3
    )
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda' but torch sees no GPU"):
            workers_wanted(compose_config(["device=cuda"]))
