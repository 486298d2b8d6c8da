"""The everyday experience: Ctrl-C stops a sweep cleanly and a rerun continues it, interrupted
and lost trials run again without using the budget, the progress bar and the log lines share one
console, a spent study says so, and ``threads: auto`` picks one thread for small models."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from compressors import Compressor
from experiments import Split, Task, TrainConfig
from experiments.digits import digits_mlp
from experiments.models import MLP
from search import ConfigError, compose_config, plan_sweep, run_sweep
from search.cli import main
from search.config.storage import open_storage
from search.run.budget import (
    LOST_ATTR,
    REPLACES_ATTR,
    SEED_TRIAL_ATTR,
    WORKER_ATTR,
    Budget,
    budget_used,
    finished_in_budget,
    superseded,
)
from search.run.progress import SweepProgress
from search.run.threads import choose_threads
from tests.conftest import sweep_overrides

ROOT = Path(__file__).resolve().parents[1]
BLOCKS_ENV = "SQUEEZE_TEST_BLOCKS"


class Blocker(Compressor):
    """A test-only compressor that stands for a long trial: while fewer than
    ``$SQUEEZE_TEST_BLOCKS`` files ``blocked-<n>`` exist in the working folder, it creates the
    next one and waits in `compress` until the process is interrupted or killed; later attempts
    pass at once.

    It has no ``name`` in its body, so it is not registered next to the real methods.
    """

    def compress(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        blocks = int(os.environ.get(BLOCKS_ENV, "0"))
        done = len(list(Path.cwd().glob("blocked-*")))
        if done < blocks:
            Path(f"blocked-{done}").touch()
            while True:
                time.sleep(0.05)
        return model


Blocker.name = "blocker"


def _overrides(tmp_path, cache_dir, *extra):
    return sweep_overrides(
        tmp_path,
        cache_dir,
        "space.pipeline=[blocker]",
        f"+space.blocker._target_={__name__}.Blocker",
        *extra,
    )


def _env(blocks: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        BLOCKS_ENV: str(blocks),
    }


def _wait_for(path: Path, process: subprocess.Popen, *, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.1)


def _trials(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    return optuna.load_study(study_name="digits_mlp", storage=storage).trials


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("squeeze")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("squeeze.role") == "study"]
    children = {
        int(r.data.tags["squeeze.trial"]): r for r in runs if "squeeze.trial" in r.data.tags
    }
    return parents, children


@pytest.mark.slow  # (over 4.5 s on 2 cores: the slow lane runs it)
def test_ctrl_c_stops_a_sweep_cleanly_and_a_rerun_completes_its_budget(
    tmp_path, cache_dir, monkeypatch, capsys
):
    command = [sys.executable, "-m", "search.cli", "sweep", *_overrides(tmp_path, cache_dir)]
    command.append("search.n_trials=2")
    process = subprocess.Popen(  # a session of its own: Ctrl-C reaches its whole group
        command,
        cwd=tmp_path,
        env=_env(blocks=1),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(tmp_path / "blocked-0", process)  # trial 0 is running
        os.killpg(process.pid, signal.SIGINT)  # as the terminal does: sweep and MLflow writer
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    assert "MLflow write" not in err, err
    assert "squeeze: interrupted (rerun the same command to continue)" in err
    [trial] = _trials(tmp_path)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_kind"] == "interrupted"
    assert trial.user_attrs["fail_phase"] == "compress"
    parents, children = _runs(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert children[0].info.status == "KILLED"
    assert children[0].data.tags["squeeze.fail_kind"] == "interrupted"

    # The same command again, run in this process (saves starting a second interpreter).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(BLOCKS_ENV, "1")
    code = main([*command[3:], "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(2 complete, 0 failed, 0 pruned, 1 interrupted or lost and run again)" in out
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    rerun = trials[1]
    assert rerun.params == trials[0].params  # the same recipe, with the same seed
    assert rerun.user_attrs[REPLACES_ATTR] == 0 and rerun.user_attrs[SEED_TRIAL_ATTR] == 0
    assert finished_in_budget(trials) == 2 and superseded(trials) == {0}
    parents, children = _runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]  # the same parent run, reopened
    assert [children[n].info.status for n in (0, 1, 2)] == ["KILLED", "FINISHED", "FINISHED"]


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from search.cli import _catch_interrupts\n"
        "_catch_interrupts()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('first', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # during the clean-up\n"
        "    time.sleep(60)\n"
        "    print('not at once')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(0), capture_output=True, text=True
    )
    assert done.returncode == 130 and done.stdout == "first\n", done.stderr


def test_interrupted_and_lost_trials_run_again_without_using_the_budget(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    budget = Budget(study=study, url=str(tmp_path / "optuna.journal"), total=2, lost_retries=1)
    gone = f"{socket.gethostname()}:999999999:1"  # a worker of this machine whose process is gone

    first = budget.claim()
    value = first.suggest_float("x", 0, 1)
    first.set_user_attr("fail_kind", "interrupted")  # as a Ctrl-C leaves it
    study.tell(first, state=TrialState.FAIL)
    second = budget.claim()  # the same recipe, seeded like trial 0, in its place
    assert second.number == 1 and second.suggest_float("x", 0, 1) == value
    assert second.user_attrs[REPLACES_ATTR] == 0 and second.user_attrs[SEED_TRIAL_ATTR] == 0
    assert second.user_attrs[LOST_ATTR] == 0  # interruptions are not the recipe's fault

    second.set_user_attr(WORKER_ATTR, gone)  # its worker is killed: lost once (allowed once)
    third = budget.claim()
    assert study.trials[1].user_attrs["fail_kind"] == "worker_lost"
    assert third.number == 2 and third.suggest_float("x", 0, 1) == value
    assert third.user_attrs[LOST_ATTR] == 1 and third.user_attrs[SEED_TRIAL_ATTR] == 0

    third.set_user_attr(WORKER_ATTR, gone)  # lost again: past lost_retries, it counts
    fourth = budget.claim()
    trials = study.get_trials()
    assert superseded(trials) == {0, 1} and REPLACES_ATTR not in fourth.user_attrs
    assert budget_used(trials) == 2  # trial 2 (a failure of its recipe) and trial 3 (running)
    fourth.suggest_float("x", 0, 1)
    study.tell(fourth, 1.0)
    assert budget.claim() is None and not budget.has_work()
    assert finished_in_budget(study.get_trials()) == 2


def test_a_spent_study_says_there_is_nothing_to_run(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setenv(BLOCKS_ENV, "0")
    overrides = [*_overrides(tmp_path, cache_dir), "search.n_trials=1"]
    assert main(["sweep", "--quiet", *overrides]) == 0
    assert "nothing to run" not in capsys.readouterr().out
    assert main(["sweep", "--quiet", *overrides]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "study digits_mlp already has 1/1 finished trials; nothing to run — raise "
        "search.n_trials to continue" in out
    )
    assert len(_trials(tmp_path)) == 1


def test_log_lines_go_through_the_bar_s_console_while_it_is_live(capsys):
    screen = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)  # the terminal (captured), as the CLI logs
    kept = io.StringIO()
    capture = logging.StreamHandler(kept)  # not a terminal (a file, pytest's caplog): stays
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(capture)
    level, root.level = root.level, logging.INFO
    try:
        console = Console(file=screen, width=120, force_terminal=False)
        with SweepProgress(10, console=console, done=3) as progress:
            assert handler not in root.handlers
            logging.getLogger("search.test").info("a line while the bar is live")
            progress.stage("baseline epochs", 4, 40)
        logging.getLogger("search.test").info("a line after it")
    finally:
        root.removeHandler(handler)
        root.removeHandler(capture)
        root.level = level
    assert "a line while the bar is live" in kept.getvalue()
    assert "a line while the bar is live" in screen.getvalue()
    err = capsys.readouterr().err
    assert "a line while the bar is live" not in err
    assert err == "a line after it\n"  # the handler is back once the bar stopped
    shown = screen.getvalue()
    assert "3/10" in shown and "baseline epochs" in shown and "4/40" in shown
    assert "elapsed 0:00:0" in shown and "left" in shown


def test_auto_threads_picks_one_thread_for_small_models_and_shares_the_cores():
    task = digits_mlp(seed=0, hidden=[300, 100], train={"epochs": 1})
    choice = choose_threads(task, model=task.build_model(), batch_size=64, workers=1, cores=16)
    assert choice.threads == 1 and "below 1 GFLOP" in choice.reason
    # A model past the threshold: one thread when the cores are shared out one per worker, else
    # one thread per GFLOP of a training batch, at most the share; no clock is read.
    x = torch.randn(512, 1024)
    big = Task(
        name="big",
        train=Split(x, torch.randint(0, 10, (512,))),
        val=Split(x[:8], torch.zeros(8, dtype=torch.long)),
        test=Split(x[:8], torch.zeros(8, dtype=torch.long)),
        num_classes=10,
        build_model=lambda: MLP(1024, [1024, 1024], 10),
        train_config=TrainConfig(epochs=1),
    )
    model = big.build_model()
    shared = choose_threads(big, model=model, batch_size=256, workers=2, cores=2)
    assert shared.threads == 1 and "2 core(s) for 2 worker(s)" in shared.reason
    assert choose_threads(big, model=model, batch_size=256, workers=1, cores=2).threads == 2
    many = choose_threads(big, model=model, batch_size=256, workers=1, cores=64)
    assert many.threads == 3 and "one thread per 1 GFLOP" in many.reason  # 3.2 GFLOP a batch
    tiny = choose_threads(big, model=model, batch_size=128, workers=2, cores=64)
    assert tiny.threads == 1  # 1.6 GFLOP a batch: one thread, whatever the cores


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_a_study_records_its_trials_threads_and_a_resumed_auto_sweep_keeps_them(
    tmp_path, cache_dir
):
    threads = torch.get_num_threads()
    overrides = [o for o in sweep_overrides(tmp_path, cache_dir) if not o.startswith("threads")]
    try:
        run_sweep(compose_config([*overrides, "search.n_trials=1", "threads=2"]))
        run_sweep(compose_config([*overrides, "search.n_trials=2", "threads=auto"]))
    finally:
        torch.set_num_threads(threads)
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    assert study.user_attrs["threads"] == 2  # what auto alone picks for digits_mlp: 1
    assert [t.user_attrs["threads"] for t in study.trials] == [2, 2]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trials = [r for r in runs if "squeeze.trial" in r.data.tags]
    assert [r.data.params["torch.threads"] for r in trials] == ["2", "2"]


def test_threads_is_auto_by_default_and_takes_an_int():
    assert compose_config([]).threads == "auto"
    assert compose_config(["threads=3"]).threads == 3
    plan_sweep(compose_config(["threads=2"]), connect=False)
    with pytest.raises(ConfigError, match="The 'threads' config value must be null or 'auto' or"):
        plan_sweep(compose_config(["threads=fast"]), connect=False)
