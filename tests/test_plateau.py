"""The plateau stop (``search.plateau``): a fine-tune ends once its validation score stops
improving, and its trial is charged only the epochs it ran."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search import ConfigError, compose_config, run_sweep
from search.config.fidelity import EPOCHS_ATTR, EPOCHS_RUN_ATTR, Fidelity, Plateau
from search.config.plan import plan_sweep
from search.run.budget import Budget
from search.run.screening import WHOLE, Stage
from search.run.trial import compress_recipe
from tests.conftest import sweep_overrides
from tests.test_fidelity import _recipe, _Space


def test_the_plateau_stops_after_k_epochs_without_improvement():
    rule = Plateau(2)
    assert [rule(v) for v in [0.5, 0.6, 0.6, 0.7, 0.65, 0.7]] == [False] * 5 + [True]
    assert rule.stopped and rule.best == 0.7
    lower = Plateau(1, higher_is_better=False)  # an error such as MSE: smaller is better
    assert [lower(v) for v in [3.0, 2.0, 2.5]] == [False, False, True]
    off = Plateau(0)
    assert not any(off(v) for v in [0.9, 0.1, 0.1, 0.1]) and not off.stopped


def test_a_fine_tune_stops_after_the_epoch_that_says_so(digits_task, digits_baseline):
    args = (_Space(), digits_task, digits_baseline)
    _, history = compress_recipe(
        _recipe(4), *args, seed=0, stage=WHOLE, after_epoch=lambda stats: stats.epoch == 1
    )
    assert [s.epoch for s in history] == [0, 1]
    _, history = compress_recipe(_recipe(4), *args, seed=0, after_epoch=lambda stats: None)
    assert [s.epoch for s in history] == [0, 1, 2, 3]
    # The rerun of a promoted trial (two parts): a stop in the first part ends the fine-tune.
    _, history = compress_recipe(
        _recipe(4), *args, seed=0, stage=Stage(split_at=2), after_epoch=lambda s: s.epoch == 0
    )
    assert [s.epoch for s in history] == [0]


def test_epochs_a_plateau_left_unspent_buy_more_trials(tmp_path):
    path = str(tmp_path / "optuna.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    study = optuna.create_study(
        study_name="s", storage=storage, directions=["maximize", "minimize"]
    )
    fidelity = Fidelity(
        full_epochs=5, n_epochs=13, objectives=("val_acc", "size_bytes"),
        directions=("maximize", "minimize"), plateau=2,
    )  # fmt: skip
    budget = Budget(study=study, url=path, total=100, fidelity=fidelity)
    a, b = budget.claim(), budget.claim()  # two workers, each charged a whole fine-tune
    assert (a.user_attrs[EPOCHS_ATTR], b.user_attrs[EPOCHS_ATTR]) == (5, 5)
    assert budget.claim() is None  # 3 epochs left: no room for a third
    for attr in (EPOCHS_RUN_ATTR, EPOCHS_ATTR):  # a's fine-tune stopped after 2 epochs
        a.set_user_attr(attr, 2)
    study.tell(a, [0.9, 100.0])
    c = budget.claim()  # 13 - 2 - 5 = 6 left: room for another whole fine-tune
    assert c is not None and c.user_attrs[EPOCHS_ATTR] == 5
    for attr in (EPOCHS_RUN_ATTR, EPOCHS_ATTR):
        c.set_user_attr(attr, 3)
    study.tell(c, [0.8, 80.0])
    study.tell(b, [0.7, 50.0])  # b ran all 5
    assert budget.claim() is None  # 13 - 2 - 5 - 3 = 3 left
    assert fidelity.epochs_used(study.trials, set()) == 10
    assert sum(t.user_attrs[EPOCHS_ATTR] for t in study.trials) == 10
    # The same trials without the refund: 15 epochs, more than the budget would have allowed.
    plain = Fidelity(full_epochs=5, n_epochs=13)
    stripped = [optuna.trial.create_trial(values=[0.5, 1.0]) for _ in study.trials]
    assert plain.epochs_used(stripped, set()) == 15


@pytest.mark.parametrize("value", [-1, "two"])
def test_a_bad_plateau_is_refused_up_front(tmp_path, cache_dir, value):
    overrides = sweep_overrides(tmp_path, cache_dir, f"search.plateau={value}")
    with pytest.raises(ConfigError, match="search.plateau"):
        plan_sweep(compose_config(overrides), connect=False)


def test_the_export_of_a_stopped_fine_tune_stops_its_rerun_at_the_same_epoch():
    from omegaconf import OmegaConf

    from search.results.reuse import _split_at

    cfg = OmegaConf.create({"search": {"screen_epochs": 2}})
    plain = optuna.trial.create_trial(values=[0.9, 1.0], user_attrs={EPOCHS_RUN_ATTR: 4})
    assert _split_at(plain, cfg) == {"stop_after": 4}
    promoted = optuna.trial.create_trial(
        values=[0.9, 1.0], user_attrs={EPOCHS_RUN_ATTR: 5, "squeeze.promote_from": 3}
    )
    assert _split_at(promoted, cfg) == {"split_at": 2, "stop_after": 7}
    whole = optuna.trial.create_trial(values=[0.9, 1.0])
    assert _split_at(whole, cfg) == {}


@pytest.mark.slow
def test_a_sweep_charges_the_epochs_a_plateau_stop_ran(tmp_path, cache_dir):
    # A learning rate too small to move the score: every fine-tune stops after its 2nd epoch.
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=100",
        "search.n_epochs=8",
        "search.plateau=1",
        "space.finetune.epochs=4",
        "space.finetune.lr=1e-12",
    )
    result = run_sweep(compose_config(overrides))
    trials = result.trials
    # 4 epochs charged while each runs, 2 once it stopped: 3 trials fit in 8 epochs, not 2.
    assert len(trials) == 3 and (trials.state == "COMPLETE").all()
    assert list(trials.epochs) == [2, 2, 2]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for row in trials.itertuples():
        steps = [m.step for m in client.get_metric_history(row.mlflow_run_id, "train_loss")]
        assert steps == [0, 1]
        assert client.get_run(row.mlflow_run_id).data.tags[EPOCHS_RUN_ATTR] == "2"
