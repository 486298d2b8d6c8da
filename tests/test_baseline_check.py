"""A baseline not worth compressing (NaN outputs in eval mode, or no better than chance) stops
the sweep after it is trained, before any trial: exit 2 and a message naming the metric."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

from search.cli import main
from search.config import modules
from tests.conftest import sweep_overrides

NAN_TASK = '''
import dataclasses

import torch
from torch import nn

from experiments.digits import digits_mlp


class NanInEval(nn.Module):
    """Trains as a small MLP; returns NaN in eval mode only."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        out = self.net(x)
        return out if self.training else out * torch.nan


def nan_in_eval(*, name="nan_in_eval", seed=0, train=None):
    task = digits_mlp(seed=seed, hidden=[16], train=train or {"epochs": 2})
    return dataclasses.replace(task, name=name, build_model=NanInEval)
'''


def _trials(tmp_path: Path, study: str) -> list:
    """The trials of ``study`` that ran or run (warm-start recipes wait, enqueued)."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
    )
    trials = optuna.load_study(study_name=study, storage=storage).trials
    return [t for t in trials if t.state != optuna.trial.TrialState.WAITING]


def test_a_baseline_no_better_than_chance_stops_the_sweep_before_any_trial(
    tmp_path, cache_dir, capsys
):
    overrides = sweep_overrides(tmp_path, cache_dir, "task.train.epochs=0", "search.n_trials=2")
    assert main(["sweep", "--quiet", *overrides]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "The baseline of task 'digits_mlp' has val_acc=0.1056: no better than chance" in err
    assert "(1/10 classes = 0.1000, + 0.0474: 3 standard errors" in err
    assert "no trial was run" in err and "task.train: TrainConfig(epochs=0" in err
    assert _trials(tmp_path, "digits_mlp") == []
    assert not (tmp_path / "trials").exists()


def test_a_baseline_with_nan_outputs_in_eval_mode_stops_the_sweep(
    tmp_path, cache_dir, capsys, monkeypatch
):
    user = tmp_path / "user"
    (user / "conf" / "task").mkdir(parents=True)
    (user / "nan_task.py").write_text(NAN_TASK)
    (user / "conf" / "task" / "nan_in_eval.yaml").write_text(
        "_target_: nan_task.nan_in_eval\nname: nan_in_eval\n"
    )
    monkeypatch.chdir(user)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        overrides = sweep_overrides(tmp_path, cache_dir, "task=nan_in_eval", "search.n_trials=2")
        assert main(["sweep", "--quiet", "--config-dir", "conf", *overrides]) == 2
    finally:
        sys.modules.pop("nan_task", None)
        modules.use_config_dirs(())
    err = " ".join(capsys.readouterr().err.split())
    assert "The baseline of task 'nan_in_eval' outputs NaN or inf in eval mode on validation" in err
    assert "no trial was run" in err
    assert _trials(tmp_path, "nan_in_eval") == []


def test_a_trained_baseline_passes(digits_baseline, digits_task):
    from search.run.workload import check_baseline

    assert digits_baseline.metrics["val_acc"] > 0.9
    check_baseline(digits_task, digits_baseline)  # no error
