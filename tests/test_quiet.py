"""Quiet, with progress: one line per fact (not per trial), no third-party INFO chatter unless
``--verbose``, and a long job's progress at a bounded rate."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search import compose_config, plan_sweep
from search.config.storage import open_storage
from search.run.logs import OncePerRun, Ticker
from search.run.study import _enqueue_warm_starts
from tests.conftest import sweep_overrides

ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _ticks(total: int, *, every: float, step_s: float) -> list[str]:
    records: list[str] = []
    logger = logging.getLogger("tests.ticker")

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler, clock = _Keep(), _Clock()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ticker = Ticker(logger, "trial 3 epoch", every=every, clock=clock)
        for epoch in range(1, total + 1):
            clock.now += step_s
            ticker(epoch, total, "val 0.9500")
    finally:
        logger.removeHandler(handler)
    return records


def test_progress_lines_are_spread_bounded_and_end_with_the_last_step():
    lines = _ticks(100, every=0.0, step_s=1.0)
    assert len(lines) == Ticker.max_lines
    assert lines[0] == "trial 3 epoch 10/100 val 0.9500 (10 s)"
    assert lines[-1] == "trial 3 epoch 100/100 val 0.9500 (1 min 40 s)"
    few = _ticks(3, every=0.0, step_s=1.0)  # fewer steps than lines: one each
    assert [line.split()[3] for line in few] == ["1/3", "2/3", "3/3"]
    slow = _ticks(1000, every=30.0, step_s=1.0)  # one line per 30 s at most, still <= 10
    assert 1 <= len(slow) <= Ticker.max_lines and slow[-1].startswith("trial 3 epoch 1000/1000")
    assert _ticks(40, every=30.0, step_s=0.5) == []  # a 20 s job says nothing


def test_a_fact_marked_once_is_printed_once_per_handler():
    first, second = OncePerRun(), OncePerRun()
    record = logging.makeLogRecord(
        {"name": "compressors.structured", "msg": "keeping %s", "args": ("a",), "once": True}
    )
    other = logging.makeLogRecord({"name": "x", "msg": "keeping %s", "args": ("b",), "once": True})
    plain = logging.makeLogRecord({"name": "x", "msg": "trial done"})
    assert first.filter(record) and not first.filter(record) and first.filter(other)
    assert second.filter(record)  # another handler prints it too
    assert first.filter(plain) and first.filter(plain)  # unmarked lines are never dropped


def test_warm_start_says_once_which_recipes_wait_and_nothing_once_they_all_ran(
    tmp_path, cache_dir, caplog
):
    def plan(n_trials: int):
        overrides = [*sweep_overrides(tmp_path, cache_dir), f"search.n_trials={n_trials}"]
        return plan_sweep(compose_config(overrides), connect=False)

    small = plan(2)
    assert len(small.warm_start.recipes) == 4  # the wide space's
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(
        study_name="digits_mlp", storage=storage, directions=list(small.directions)
    )
    caplog.set_level(logging.INFO, logger="search.run.study")
    for _ in range(2):  # each run of the sweep: one line for the two that wait
        caplog.clear()
        _enqueue_warm_starts(study, small)
        waiting = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
        assert len(waiting) == 1 and "no room for 2 of the space's recipes" in waiting[0]
    caplog.clear()
    _enqueue_warm_starts(study, plan(4))  # room for all: the last two are enqueued
    assert len(study.trials) == 4
    _enqueue_warm_starts(study, plan(4))  # all of them ran or wait to run: nothing to say
    assert not [r for r in caplog.records if "no room" in r.getMessage()]


@pytest.mark.slow
def test_a_sweep_logs_each_fact_once_shows_epochs_and_no_onnx_chatter(tmp_path, cache_dir):
    """A real sweep through the command line, not on a terminal (a pipe), as a script runs it."""
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "space.pipeline=[structured]",
        "space.structured.amount='interval(0.3, 0.6)'",
        "space.finetune.epochs=3",
        "search.n_trials=3",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SQUEEZE_PROGRESS_S": "0"}
    command = [sys.executable, "-m", "search.cli"]
    done = subprocess.run(
        [*command, "sweep", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    err = " ".join(done.stderr.split())  # (rich folds log lines at 80 columns)
    assert err.count("keeping net.5 (Linear) whole") == 1, done.stderr
    assert err.count("torch threads:") == 1 and err.count("cached baseline") <= 1
    assert err.count("warm start: the budget has no room") <= 1
    epochs = re.findall(r"trial (\d+) epoch (\d)/3 val 0\.\d{4}", err)
    assert {t for t, _ in epochs} == {"0", "1", "2"}  # every trial's epochs, each at most once
    assert len(epochs) == len(set(epochs)) == 9

    export = [*command, "export", "--study", "digits_mlp", "--format", "onnx", *overrides[:5]]
    done = subprocess.run(export, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"onnxscript|onnx_ir|torch\.onnx", done.stderr), done.stderr
    done = subprocess.run(
        [*export, "--force", "--verbose"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"INFO\s+(onnxscript|onnx_ir)", done.stderr), done.stderr  # --verbose
