"""The workload check says, once, when a regression's targets hold -100: the default loss and R²
read them as padding (a per-token regression's) and leave them out, which a real target of -100
(-100 dBm) must not be; a task whose -100 values are real gives its own loss= and metric=."""

from __future__ import annotations

import logging

import torch

from experiments import Task, check_workload
from tests.test_padded_regression import tokens_task


def _tokens(**kwargs) -> Task:
    """`tests.test_padded_regression`'s per-token regression, padded with -100."""
    return tokens_task(**kwargs)


def _notes(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "experiments._checks" and "read as padding" in r.getMessage()
    ]


def _mse(outputs: torch.Tensor, targets: torch.Tensor, _teacher=None) -> torch.Tensor:
    return ((outputs - targets.reshape(outputs.shape)) ** 2).mean()


def _own_r2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return 1.0 - float(_mse(outputs, targets)) / float(targets.var().clamp_min(1e-12))


def test_the_check_says_once_that_a_regressions_targets_of_minus_100_are_padding(caplog):
    caplog.set_level(logging.INFO, logger="experiments._checks")
    task = _tokens()
    check_workload(task, task.build_model())
    (note,) = _notes(caplog)  # once, for train and val together
    assert "task 'tokens'" in note and "targets of -100 in its train and val data" in note
    assert "default loss (MSE) and R²" in note
    assert "Task(loss=..., metric=...)" in note

    caplog.clear()  # the task's own metric: the note names the loss only
    task = _tokens(metric=_own_r2, higher_is_better=True)
    check_workload(task, task.build_model())
    (note,) = _notes(caplog)
    assert "default loss (MSE);" in note and "Task(loss=...)" in note and "R²" not in note

    caplog.clear()  # its own loss and metric: nothing is read as padding
    task = _tokens(loss=_mse, metric=_own_r2, higher_is_better=True)
    check_workload(task, task.build_model())
    assert _notes(caplog) == []


def test_the_check_says_nothing_of_padding_without_targets_of_minus_100(caplog):
    from tests.test_score_name import r2_three

    caplog.set_level(logging.INFO, logger="experiments._checks")
    task = r2_three()  # (the default loss; no target is -100)
    check_workload(task, task.build_model())
    assert _notes(caplog) == []
