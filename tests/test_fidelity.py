"""Multi-fidelity search: screened trials, promotions from their weights, the budget in epochs."""

from __future__ import annotations

import io

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from compressors import get_compressor
from search import ConfigError, compose_config, run_sweep
from search.cli import main
from search.config.fidelity import (
    EPOCHS_ATTR,
    FIDELITY_ATTR,
    PROMOTE_FROM_ATTR,
    WARM_START_ATTR,
    Fidelity,
    check_fidelity,
    front_trials,
    is_screened,
)
from search.config.plan import plan_sweep
from search.config.space import Recipe
from search.config.storage import open_storage
from search.results.reuse import export_trial
from search.run.budget import REPLACES_ATTR, Budget
from search.run.pareto import front_numbers
from search.run.progress import SweepProgress, fidelity_summary
from search.run.screening import Stage, fetch_screen, screen_file, trial_stage
from search.run.study import _enqueue_warm_starts
from search.run.trial import compress_recipe
from tests.conftest import sweep_overrides

X = optuna.distributions.FloatDistribution(0.0, 1.0)


class _Space:
    """The part of a search space `compress_recipe` uses: building the recipe's compressors."""

    def build(self, recipe: Recipe) -> list:
        return [get_compressor(n)(**recipe.compressors[n]) for n in recipe.pipeline]


def _recipe(epochs: int) -> Recipe:
    compressors = {"structured": {"amount": 0.5}, "quant": {"bits": 4}}  # new shapes, a grid
    finetune = {"epochs": epochs, "batch_size": 64, "lr": 3e-3, "schedule": "cosine"}
    return Recipe(tuple(compressors), compressors, finetune, {})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_promotion_continues_from_the_screened_weights(digits_task, digits_baseline, tmp_path):
    saved = tmp_path / "screen-0000.pt"
    args = (_Space(), digits_task, digits_baseline)
    screened, history = compress_recipe(
        _recipe(3), *args, seed=0, stage=Stage(fidelity="screen", stop_epoch=1, save_to=saved)
    )
    assert [s.epoch for s in history] == [0] and saved.exists()
    # Promoted with no epoch left to run, the same recipe ships exactly the screened model ...
    promoted, history = compress_recipe(
        _recipe(1), *args, seed=0, stage=Stage(start_epoch=1, load_from=saved)
    )
    assert history == []
    want, got = _state(screened), _state(promoted)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # ... which the same recipe from the baseline's weights does not.
    fresh = _state(compress_recipe(_recipe(0), *args, seed=0)[0])
    assert not all(torch.equal(want[k], fresh[k]) for k in want)
    # Its fine-tune goes on where the screen stopped: epochs 1 and 2 of the 3-epoch schedule.
    _, history = compress_recipe(
        _recipe(3), *args, seed=0, stage=Stage(start_epoch=1, load_from=saved)
    )
    assert [s.epoch for s in history] == [1, 2]


def test_the_rerun_of_a_promoted_trial_ships_the_same_model(digits_task, digits_baseline, tmp_path):
    """`squeeze run` of a promoted trial fine-tunes in the two parts its screen and its
    promotion ran (`Stage.split_at`): the same weights, where one part would differ."""
    saved = tmp_path / "screen-0007.pt"
    args = (_Space(), digits_task, digits_baseline)
    compress_recipe(_recipe(3), *args, seed=7, stage=Stage(stop_epoch=1, save_to=saved))
    promoted = _state(
        compress_recipe(_recipe(3), *args, seed=7, stage=Stage(start_epoch=1, load_from=saved))[0]
    )
    rerun, history = compress_recipe(_recipe(3), *args, seed=7, stage=Stage(split_at=1))
    assert [s.epoch for s in history] == [0, 1, 2]
    assert all(torch.equal(promoted[k], v) for k, v in _state(rerun).items())
    whole = _state(compress_recipe(_recipe(3), *args, seed=7)[0])  # one optimizer throughout
    assert not all(torch.equal(promoted[k], v) for k, v in whole.items())


def _frozen(number: int, values, *, fidelity=None, state=TrialState.COMPLETE, **attrs):
    attrs = {**attrs, **({FIDELITY_ATTR: fidelity} if fidelity else {})}
    return optuna.trial.create_trial(
        state=state,
        values=values if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions={"x": X},
        user_attrs=attrs,
    )


def test_screened_only_points_never_enter_the_front():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(_frozen(0, [0.99, 100.0], fidelity="screen"))  # dominates every full point
    study.add_trial(_frozen(1, [0.90, 500.0], fidelity="full", **{PROMOTE_FROM_ATTR: 0}))
    study.add_trial(_frozen(2, [0.80, 300.0], fidelity="full"))
    study.add_trial(_frozen(3, [0.70, 400.0], fidelity="full"))  # dominated by trial 2
    assert front_numbers(study) == [1, 2]
    assert sorted(t.number for t in study.best_trials) == [0]  # (Optuna's own front has it)
    plain = optuna.create_study(directions=["maximize", "minimize"])  # no screening: Optuna's
    plain.add_trial(_frozen(0, [0.9, 500.0]))
    plain.add_trial(_frozen(1, [0.8, 300.0]))
    assert [t.number for t in front_trials(plain)] == [0, 1]


def test_a_screened_point_is_promoted_when_no_other_screened_point_dominates_it():
    rule = Fidelity(
        full_epochs=10, screen_epochs=2, objectives=("val_acc", "size_bytes"),
        directions=("maximize", "minimize"),
    )  # fmt: skip
    trials = [
        _frozen(0, [0.90, 500.0], fidelity="screen"),
        _frozen(1, [0.80, 300.0], fidelity="screen"),
        _frozen(2, [0.85, 600.0], fidelity="screen"),  # dominated by 0
        _frozen(3, [0.70, 200.0], fidelity="screen"),
        _frozen(4, [0.95, 900.0], fidelity="full", **{PROMOTE_FROM_ATTR: 3}),  # 3 promoted
    ]
    for k, t in enumerate(trials):
        t.number = k
    assert [t.number for t in rule.promotable(trials, set())] == [0, 1]
    near = Fidelity(**{**rule.__dict__, "margin": 0.06})  # 0.85 + 0.06 is no longer dominated
    assert [t.number for t in near.promotable(trials, set())] == [0, 1, 2]
    assert [t.number for t in rule.promotable(trials, {4})] == [0, 1, 3]  # (4 was replaced)
    waits = Fidelity(**{**rule.__dict__, "promote_after": 5})  # 4 screens: none promoted yet
    assert waits.promotable(trials, set()) == []
    assert len(Fidelity(**{**rule.__dict__, "promote_after": 4}).promotable(trials, set())) == 2


def test_a_screened_point_below_the_promotion_floor_is_not_promoted():
    rule = Fidelity(
        full_epochs=10, screen_epochs=2, objectives=("val_acc", "size_bytes"),
        directions=("maximize", "minimize"), floor=0.1,
    )  # fmt: skip
    trials = [
        _frozen(0, [0.90, 500.0], fidelity="screen"),
        _frozen(1, [0.75, 300.0], fidelity="screen"),  # on the front, 0.15 below the baseline
        _frozen(2, [0.81, 400.0], fidelity="screen"),  # 0.09 below: promoted
    ]
    for k, t in enumerate(trials):
        t.number = k
    assert [t.number for t in rule.promotable(trials, set(), 0.9)] == [0, 2]
    assert [t.number for t in rule.promotable(trials, set())] == [0, 1, 2]  # (no baseline)
    off = Fidelity(**{**rule.__dict__, "floor": None})
    assert [t.number for t in off.promotable(trials, set(), 0.9)] == [0, 1, 2]
    error = Fidelity(**{**rule.__dict__, "directions": ("minimize", "minimize")})
    errors = [
        _frozen(0, [0.9, 100.0], fidelity="screen"),
        _frozen(1, [0.75, 300.0], fidelity="screen"),
    ]
    errors[0].number, errors[1].number = 0, 1
    assert [t.number for t in error.promotable(errors, set(), 0.7)] == [1]  # 0.9 - 0.09 > 0.7
    error_off = Fidelity(**{**error.__dict__, "floor": None})
    assert [t.number for t in error_off.promotable(errors, set(), 0.7)] == [0, 1]


def test_the_budget_reads_the_promotion_floor_against_the_studys_baseline(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("baseline", {"val_acc": 0.9, "size_bytes": 1000.0})
    cfg = compose_config(["search.screen_epochs=1", "search.promote_floor=0.1"])
    fidelity = check_fidelity(cfg, 5, ("val_acc", "size_bytes"), ("maximize", "minimize"))
    assert fidelity.floor == 0.1
    budget = Budget(study=study, url=str(tmp_path / "unused"), total=100, fidelity=fidelity)
    low = budget.claim()
    _run_claimed(budget, low, tmp_path, 0.7)  # alone on the screened front, below the floor
    assert PROMOTE_FROM_ATTR not in budget.claim().user_attrs
    high = budget.claim()
    _run_claimed(budget, high, tmp_path, 0.85)
    assert budget.claim().user_attrs[PROMOTE_FROM_ATTR] == high.number


def _run_claimed(budget: Budget, trial: optuna.Trial, folder, value: float) -> None:
    """What a worker does with a claimed trial, less the fine-tune: its stage, then its values."""
    trial_stage(trial, budget.fidelity, folder)
    x = trial.suggest_float("x", 0.0, 1.0)
    budget.study.tell(trial, [value, 100.0 * (1.0 + x)])


def _charged(study: optuna.Study) -> int:
    replaced = {
        int(t.user_attrs[REPLACES_ATTR]) for t in study.trials if REPLACES_ATTR in t.user_attrs
    }
    return sum(t.user_attrs[EPOCHS_ATTR] for t in study.trials if t.number not in replaced)


def test_the_epoch_budget_is_exact_with_two_workers_and_across_a_resume(tmp_path):
    path = str(tmp_path / "optuna.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    study = optuna.create_study(
        study_name="s", storage=storage, directions=["maximize", "minimize"]
    )
    fidelity = Fidelity(
        full_epochs=5, screen_epochs=1, n_epochs=14, objectives=("val_acc", "size_bytes"),
        directions=("maximize", "minimize"),
    )  # fmt: skip
    budget = Budget(study=study, url=path, total=100, fidelity=fidelity)
    # Two workers: each claims while the other's trial runs.
    a, b = budget.claim(), budget.claim()
    assert (a.user_attrs[EPOCHS_ATTR], b.user_attrs[EPOCHS_ATTR]) == (1, 1)  # two screens
    _run_claimed(budget, a, tmp_path, 0.9)
    c = budget.claim()  # a's screen is on the screened front: promoted, 4 epochs more
    assert c.user_attrs[PROMOTE_FROM_ATTR] == a.number and c.user_attrs[EPOCHS_ATTR] == 4
    assert trial_stage(c, fidelity, tmp_path).load_from == screen_file(tmp_path, a.number)
    study.tell(c, [0.95, 150.0])
    _run_claimed(budget, b, tmp_path, 0.1)  # dominated by a's screen: not promoted
    claimed = []
    while (trial := budget.claim()) is not None:
        claimed.append(trial)
        _run_claimed(budget, trial, tmp_path, 0.5 - 0.1 * len(claimed))
    assert _charged(study) <= 14 and fidelity.new_candidates(study.trials, set()) == 0
    first = _charged(study)
    # A worker interrupted in a promotion: its rerun continues the same screen, charged once.
    resumed = Budget(study=study, url=path, total=100, fidelity=Fidelity(**{
        **fidelity.__dict__, "n_epochs": 24}))  # fmt: skip
    trial = resumed.claim()
    while PROMOTE_FROM_ATTR not in trial.user_attrs:
        _run_claimed(resumed, trial, tmp_path, 0.99)  # best screen so far: promoted next
        trial = resumed.claim()
    trial.set_user_attr("fail_kind", "interrupted")
    study.tell(trial, state=TrialState.FAIL)
    rerun = resumed.claim()
    assert rerun.user_attrs[REPLACES_ATTR] == trial.number
    assert rerun.user_attrs[PROMOTE_FROM_ATTR] == trial.user_attrs[PROMOTE_FROM_ATTR]
    study.tell(rerun, [0.99, 120.0])
    while (trial := resumed.claim()) is not None:
        _run_claimed(resumed, trial, tmp_path, 0.2)
    assert first < _charged(study) <= 24
    assert fidelity.new_candidates(study.trials, {rerun.user_attrs[REPLACES_ATTR]}) == 0
    assert resumed.fidelity.epochs_used(study.trials, {rerun.user_attrs[REPLACES_ATTR]}) == (
        _charged(study)
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.screen_epochs=2", "must be an int in \\[0, 1\\]"),  # the tests' 2-epoch space
        ("search.n_epochs=1", "of at least space.finetune.epochs=2"),
        ("search.screen_epochs=-1", "'search.screen_epochs' config value must be an int"),
        ("search.promote_margin=2", "'search.promote_margin' config value must be a float"),
        ("search.promote_floor=2", "'search.promote_floor' config value must be null or a"),
    ],
)
def test_bad_fidelity_settings_are_refused_up_front(tmp_path, cache_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(compose_config(sweep_overrides(tmp_path, cache_dir, override)), connect=False)


def test_screening_needs_fixed_epochs(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path, cache_dir, "search.screen_epochs=1", "space.finetune.epochs=range(2,5)"
    )
    with pytest.raises(ConfigError, match="needs a fixed number of fine-tuning epochs"):
        plan_sweep(compose_config(overrides), connect=False)


@pytest.mark.slow
def test_a_screened_sweep_fronts_only_full_fine_tunes_within_its_epochs(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=100",
        "search.n_epochs=12",
        "search.screen_epochs=1",
        "space.finetune.epochs=3",
        "search.n_jobs=2",
    )
    result = run_sweep(compose_config(overrides))
    trials = result.trials
    assert trials.epochs.sum() <= 12 and (trials.state == "COMPLETE").all()
    assert set(trials.fidelity) == {"screen", "full"}
    full = trials[trials.fidelity == "full"]
    assert set(result.front.trial) <= set(full.trial) and not result.front.empty
    assert set(full.promote_from) <= set(trials[trials.fidelity == "screen"].trial)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for row in trials.itertuples():  # each ran the epochs it was charged, promotions from 1
        steps = [m.step for m in client.get_metric_history(row.mlflow_run_id, "train_loss")]
        assert steps == ([0] if row.fidelity == "screen" else [1, 2])
        tags = client.get_run(row.mlflow_run_id).data.tags
        assert tags[FIDELITY_ATTR] == row.fidelity
        assert (tags.get("pareto") == "true") == (row.trial in set(result.front.trial))
    # The report's front (its models' test scores) holds full fine-tunes only, too.
    assert main(["report", "--study", "digits_mlp", *overrides]) == 0
    report = tmp_path / "trials" / "digits_mlp" / "report"
    models = set(pd.read_csv(report / "metrics.csv").model)
    assert models == {"baseline", *(f"trial {n}" for n in result.front.trial)}
    assert set(pd.read_csv(report / "trials.csv").fidelity) == {"screen", "full"}
    # A worker on another machine lacks the screen's file: it comes from the screen's MLflow run.
    screened = int(full.promote_from.iloc[0])
    folder = tmp_path / "trials" / "digits_mlp"
    stage = Stage(load_from=screen_file(folder, screened), promoted_from=screened)
    saved = stage.load_from.read_bytes()
    stage.load_from.unlink()
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    fetch_screen(stage, study, client, tries=1)
    assert stage.load_from.read_bytes() == saved
    # Exported and rerun, a promoted trial fine-tunes in its two parts: the same model again.
    number = int(full.trial.iloc[0])
    conf = tmp_path / "conf"
    export_trial(
        compose_config(overrides), "digits_mlp", pick=f"trial={number}", name="p", conf_dir=conf
    )
    assert main(["run", "--config-dir", str(conf), "experiment=p", *overrides]) == 0
    version = client.get_model_version_by_alias("p", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    expected = study.trials[number].user_attrs["metrics"]
    assert metrics["val_acc"] == expected["val_acc"]
    assert metrics["size_bytes"] == expected["size_bytes"]


def test_the_bar_counts_epochs_with_an_epoch_budget():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(_frozen(0, [0.9, 500.0], fidelity="screen"))
    study.add_trial(_frozen(1, [0.95, 500.0], fidelity="full", **{PROMOTE_FROM_ATTR: 0}))
    study.add_trial(_frozen(2, None, fidelity="screen", state=TrialState.RUNNING))
    fidelity = Fidelity(full_epochs=5, screen_epochs=1, n_epochs=14)
    screen = io.StringIO()
    with SweepProgress(14, console=Console(file=screen, width=120), fidelity=fidelity) as bar:
        bar(study, study.trials[1])
    shown = screen.getvalue()
    assert "sweep epochs" in shown and "5/14" in shown and "front 1" in shown  # 1 + 4 finished


def test_the_summary_counts_screens_promotions_and_epochs():
    trials = pd.DataFrame(
        {"fidelity": ["screen", "full", "screen"], "promote_from": [None, 0, None]}
        | {"epochs": [1, 4, 1]}
    )
    text = fidelity_summary(trials, compose_config(["search.n_epochs=14"]).search)
    assert text == ", 2 screens (1 promoted); 6 of 14 fine-tuning epochs"
    assert fidelity_summary(pd.DataFrame({"trial": [0]}), compose_config([]).search) == ""


def _warm_start_budget(tmp_path, **fidelity) -> tuple[optuna.Study, Budget]:
    study = optuna.create_study(directions=["maximize", "minimize"])
    rule = Fidelity(
        **{"full_epochs": 5, "screen_epochs": 1, "n_epochs": 14, **fidelity},
        objectives=("val_acc", "size_bytes"), directions=("maximize", "minimize"),
    )  # fmt: skip
    return study, Budget(study=study, url=str(tmp_path / "unused"), total=100, fidelity=rule)


def test_a_warm_start_that_is_not_screened_runs_its_whole_fine_tune(tmp_path):
    """``search.screen_warm_starts=false``: a warm start is claimed and charged as a whole
    fine-tune, runs every epoch from the baseline's weights, and is a full-fidelity point
    (never screened, never promoted); the sampled trials after it are screened."""
    study, budget = _warm_start_budget(tmp_path, screen_warm_starts=False)
    study.enqueue_trial({"x": 0.5}, user_attrs={WARM_START_ATTR: True})
    warm = budget.claim()
    assert warm.user_attrs[EPOCHS_ATTR] == 5
    stage = trial_stage(warm, budget.fidelity, tmp_path)
    assert (stage.fidelity, stage.parts()) == ("full", [(0, None)])
    assert stage.save_to is None and stage.load_from is None and stage.promoted_from is None
    _run_claimed(budget, warm, tmp_path, 0.9)
    done = study.trials[warm.number]
    assert done.user_attrs[FIDELITY_ATTR] == "full" and PROMOTE_FROM_ATTR not in done.user_attrs
    assert not is_screened(done) and [t.number for t in front_trials(study)] == [warm.number]
    sampled = budget.claim()  # a sampled recipe: a screen, 1 epoch
    assert sampled.user_attrs[EPOCHS_ATTR] == 1 and WARM_START_ATTR not in sampled.user_attrs
    assert trial_stage(sampled, budget.fidelity, tmp_path).fidelity == "screen"
    _run_claimed(budget, sampled, tmp_path, 0.95)  # dominates the warm start's point
    assert budget.fidelity.promotable(study.trials, set()) == [study.trials[sampled.number]]
    # Screened, as today (the default), the same warm start is charged and run as a screen.
    study, budget = _warm_start_budget(tmp_path)
    study.enqueue_trial({"x": 0.5}, user_attrs={WARM_START_ATTR: True})
    warm = budget.claim()
    assert warm.user_attrs[EPOCHS_ATTR] == 1
    assert trial_stage(warm, budget.fidelity, tmp_path).fidelity == "screen"


def test_the_epoch_budget_is_exact_with_warm_starts_that_are_not_screened(tmp_path):
    """Whole warm starts (5 epochs each), then a screen and its promotion: exactly the 15
    epochs, however they are counted, and an interrupted warm start's rerun is charged once,
    as a whole fine-tune again."""
    study, budget = _warm_start_budget(tmp_path, screen_warm_starts=False, n_epochs=15)
    for x in (0.1, 0.2):
        study.enqueue_trial({"x": x}, user_attrs={WARM_START_ATTR: True})
    first = budget.claim()
    trial_stage(first, budget.fidelity, tmp_path)
    first.suggest_float("x", 0.0, 1.0)  # (its recipe: the warm start's 0.1)
    first.set_user_attr("fail_kind", "interrupted")
    study.tell(first, state=TrialState.FAIL)
    claimed = []
    while (trial := budget.claim()) is not None:
        claimed.append(trial)
        _run_claimed(budget, trial, tmp_path, 0.9 - 0.01 * len(claimed))
    done = [study.trials[t.number] for t in claimed]
    rerun = next(t for t in done if REPLACES_ATTR in t.user_attrs)
    assert rerun.user_attrs[REPLACES_ATTR] == first.number and rerun.params == {"x": 0.1}
    # The two warm starts whole, then one screen (its promotion fits in the 4 epochs left)
    kinds = [(t.user_attrs.get(WARM_START_ATTR, False), t.user_attrs[FIDELITY_ATTR]) for t in done]
    assert kinds == [(True, "full"), (True, "full"), (False, "screen"), (False, "full")]
    assert [t.user_attrs[EPOCHS_ATTR] for t in done] == [5, 5, 1, 4]
    assert done[3].user_attrs[PROMOTE_FROM_ATTR] == done[2].number
    assert _charged(study) == 15 == budget.fidelity.epochs_used(study.trials, {first.number})
    assert budget.fidelity.new_candidates(study.trials, {first.number}) == 0


@pytest.mark.parametrize(("screened", "enqueued", "left"), [("true", 4, 10), ("false", 2, 4)])
def test_warm_starts_are_enqueued_as_far_as_their_epochs_fit(
    tmp_path, cache_dir, screened, enqueued, left
):
    """The wide space's four warm starts under a 14-epoch budget of 5-epoch fine-tunes: four
    1-epoch screens fit (each with room for its promotion), two whole fine-tunes (10 epochs)."""
    overrides = sweep_overrides(
        tmp_path, cache_dir, "space.finetune.epochs=5", "search.screen_epochs=1",
        "search.n_epochs=14", f"search.screen_warm_starts={screened}",
    )  # fmt: skip
    plan = plan_sweep(compose_config(overrides), connect=False)
    assert len(plan.warm_start.recipes) == 4
    study = optuna.create_study(directions=["maximize", "minimize"])
    _enqueue_warm_starts(study, plan)
    assert [t.user_attrs.get(WARM_START_ATTR) for t in study.trials] == [True] * enqueued
    assert plan.fidelity.epochs_left(study.trials, set()) == left


def test_screen_warm_starts_changes_a_screening_studys_fingerprint(tmp_path, cache_dir):
    """A resumed screening study cannot change how its warm starts are charged; a study
    without screening keeps its fingerprint (the setting does nothing there)."""
    base = sweep_overrides(tmp_path, cache_dir, "space.finetune.epochs=5")

    def fingerprint(*extra: str) -> str:
        return plan_sweep(compose_config([*base, *extra]), connect=False).fingerprint

    screen = ("search.screen_epochs=1", "search.n_epochs=14")
    assert fingerprint(*screen) != fingerprint(*screen, "search.screen_warm_starts=false")
    assert fingerprint(*screen) == fingerprint(*screen, "search.screen_warm_starts=true")
    assert fingerprint() == fingerprint("search.screen_warm_starts=false")
    with pytest.raises(ConfigError, match="screen_warm_starts"):
        fingerprint(*screen, "search.screen_warm_starts=3")
