"""Ctrl-C is never lost: not when Python swallows the ``KeyboardInterrupt`` (raised inside a
``__del__``, printed as "Exception ignored in ..."), not during the baseline, not in a trial,
not with several workers. Each interrupt is delivered from inside the process at a fixed
point, or once a trial is known to be running: no sleeps decide the moment."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from compressors import Compressor
from experiments.digits import digits_mlp
from search.config.storage import open_storage
from tests.conftest import sweep_overrides
from tests.test_interrupts import ROOT, _env, _wait_for
from tests.test_interrupts import _overrides as _blocking_overrides

#: Where the test-only code below sends its SIGINT: ``baseline`` (the 25th training forward of
#: the baseline) or ``compress`` (the first trial's compression).
BOMB_ENV = "SQUEEZE_TEST_BOMB"
_fired: list[bool] = []


class _Bomb:
    """Delivers SIGINT, once per process, while its ``__del__`` runs: Python runs the handler
    there, and the ``KeyboardInterrupt`` it raises is swallowed."""

    def __del__(self) -> None:
        if _fired:
            return
        _fired.append(True)
        signal.raise_signal(signal.SIGINT)
        for _ in range(100):  # the handler runs here, at the latest
            pass


class _BombedMLP(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.forwards = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and os.environ.get(BOMB_ENV) == "baseline":
            self.forwards += 1
            if self.forwards == 25:  # the second of the baseline's three epochs
                _Bomb()
        return self.inner(x)


def bombed_digits(**kwargs):
    """digits_mlp whose model sets off a `_Bomb` while the baseline trains."""
    task = digits_mlp(**kwargs)
    build = task.build_model
    return dataclasses.replace(task, build_model=lambda: _BombedMLP(build()))


class Bomber(Compressor):
    """A test-only compressor that sets off a `_Bomb` in the first trial's compression."""

    def compress(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        if os.environ.get(BOMB_ENV) == "compress":
            _Bomb()
        return model


Bomber.name = "bomber"


def _sweep(tmp_path, cache_dir, bomb: str):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        f"task._target_={__name__}.bombed_digits",
        "task.name=digits_bombed",
        "task.train.epochs=3",
        "space.pipeline=[bomber]",
        f"+space.bomber._target_={__name__}.Bomber",
        "search.n_trials=3",
        "search.warm_start=false",
    )
    command = [sys.executable, "-m", "search.cli", "sweep", "--quiet", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), BOMB_ENV: bomb}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)


def _study_trials(tmp_path, name: str):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    except KeyError:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("bomb", ["baseline", "compress"])
def test_a_ctrl_c_swallowed_in_a_del_still_stops_the_sweep(tmp_path, cache_dir, bomb):
    done = _sweep(tmp_path, cache_dir, bomb)
    assert "Exception ignored" in done.stderr and "KeyboardInterrupt" in done.stderr  # swallowed
    assert done.returncode == 130, done.stderr
    assert "squeeze: interrupted (rerun the same command to continue)" in done.stderr
    trials = _study_trials(tmp_path, "digits_bombed")
    if bomb == "baseline":
        assert trials == []  # no trial started
    else:
        [trial] = trials  # the remaining trials did not run
        assert trial.state == TrialState.FAIL and trial.user_attrs["fail_kind"] == "interrupted"


@pytest.mark.slow
def test_ctrl_c_with_two_workers_stops_them_all(tmp_path, cache_dir):
    command = [sys.executable, "-m", "search.cli", "sweep"]
    command += _blocking_overrides(tmp_path, cache_dir, "search.n_trials=3", "search.n_jobs=2")
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=_env(blocks=3),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(tmp_path / "blocked-0", process)  # a worker's trial is running
        os.killpg(process.pid, signal.SIGINT)  # as the terminal does: every process of the group
        _out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "squeeze: interrupted (rerun the same command to continue)" in err
    trials = _study_trials(tmp_path, "digits_mlp")
    states = [(t.state.name, t.user_attrs.get("fail_kind")) for t in trials]
    assert ("FAIL", "interrupted") in states, states  # the blocked trial
    assert all(state != "COMPLETE" for state, _ in states), states  # nothing ran on
    assert "Traceback" not in err, err
