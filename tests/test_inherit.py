"""Reuse between trials (``search.reuse``): a trial starts from a finished trial's fine-tuned
weights when its leading stages give the same layer shapes, and is charged the epochs it runs."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from compressors import get_compressor
from search import ConfigError, compose_config, run_sweep
from search.config.fidelity import REUSE_FROM_ATTR, Fidelity
from search.config.plan import plan_sweep
from search.config.space import Recipe
from search.results.reuse import export_trial
from search.run.inherit import ARCH_ATTR, WEIGHTS_ATTR, architecture, pick_source, plain
from search.run.progress import fidelity_summary
from search.run.screening import Stage
from search.run.trial import compress_recipe
from tests.conftest import sweep_overrides

X = optuna.distributions.FloatDistribution(0.0, 1.0)


class _Space:
    """The part of a search space `compress_recipe` uses: building the recipe's compressors."""

    def build(self, recipe: Recipe) -> list:
        return [get_compressor(n)(**recipe.compressors[n]) for n in recipe.pipeline]


def _recipe(epochs: int, *, amount: float = 0.5, bits: int = 4) -> Recipe:
    compressors = {"structured": {"amount": amount}, "quant": {"bits": bits}}
    finetune = {"epochs": epochs, "batch_size": 64, "lr": 3e-3, "schedule": "cosine"}
    return Recipe(tuple(compressors), compressors, finetune, {})


class _Lend:
    """An `Inheritance` stand-in with the choice made: the source's weights at ``path`` (the
    rest of `Inheritance` is a study's bookkeeping, run by the sweep test below)."""

    def __init__(self, path, epochs: int) -> None:
        self.path, self.epochs, self.shapes = path, epochs, []

    def __call__(self, model: torch.nn.Module) -> Stage:
        self.shapes.append(architecture(model))
        return Stage(load_from=self.path, reused_from=0, epochs=self.epochs)


def _latent(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in plain(model.state_dict()).items()}


def test_a_reusing_trial_starts_from_the_source_trials_weights(
    digits_task, digits_baseline, tmp_path
):
    saved = tmp_path / "tuned-0000.pt"
    args = (_Space(), digits_task, digits_baseline)
    # The source: 4 bits on half the neurons, 2 epochs from the baseline, weights kept.
    compress_recipe(_recipe(2), *args, seed=0, stage=Stage(save_to=saved))
    # The same shapes at 8 bits, reusing them with no epoch to run: its latent weights are the
    # source's fine-tuned ones (its own grids laid on them) ...
    lend = _Lend(saved, epochs=0)
    reused, history = compress_recipe(_recipe(5, bits=8), *args, seed=1, inherit=lend)
    assert history == []
    want, got = plain(torch.load(saved, weights_only=True)), _latent(reused)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # ... which the same recipe from the baseline's weights does not have.
    fresh = _latent(compress_recipe(_recipe(0, bits=8), *args, seed=1)[0])
    assert not all(torch.equal(want[k], fresh[k]) for k in want)
    # With search.reuse_epochs=2, it runs a 2-epoch schedule, not the recipe's 5 epochs.
    _, history = compress_recipe(_recipe(5, bits=8), *args, seed=1, inherit=_Lend(saved, 2))
    assert [s.epoch for s in history] == [0, 1]
    # Another structured amount leaves other shapes: the weights do not fit.
    other = _Lend(saved, epochs=0)
    with pytest.raises(RuntimeError):
        compress_recipe(_recipe(0, amount=0.25), *args, seed=1, inherit=other)
    assert other.shapes[0] != lend.shapes[0]


def _frozen(number: int, val: float, arch: str, **attrs) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        values=[val, 100.0],
        params={"x": 0.5},
        distributions={"x": X},
        user_attrs={ARCH_ATTR: arch, "metrics": {"val_acc": val}, **attrs},
    )
    trial.number = number
    return trial


def test_the_source_is_the_best_kept_trial_of_the_same_shapes():
    trials = [
        _frozen(0, 0.90, "a", **{WEIGHTS_ATTR: True}),
        _frozen(1, 0.95, "a", **{WEIGHTS_ATTR: True}),
        _frozen(2, 0.99, "a", **{REUSE_FROM_ATTR: 1}),  # a reuse keeps no weights
        _frozen(3, 0.97, "b", **{WEIGHTS_ATTR: True}),  # other shapes
    ]
    assert pick_source(trials, "a", higher_is_better=True).number == 1
    assert pick_source(trials, "a", higher_is_better=False).number == 0  # (an error: MSE)
    assert pick_source(trials, "c", higher_is_better=True) is None
    cost = Fidelity(full_epochs=15, reuse_epochs=5)
    assert [cost.trial_cost(t) for t in trials] == [15, 15, 5, 15]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.reuse=sometimes", "'search.reuse' config value must be true or false"),
        ("search.reuse_epochs=2", "must be an int in \\[1, 1\\]"),  # the tests' 2-epoch space
        ("search.screen_epochs=1", "cannot be combined with search.screen_epochs=1"),
        ("search.cv_folds=3", "cannot be combined with search.cv_folds=3"),
    ],
)
def test_bad_reuse_settings_are_refused_up_front(tmp_path, cache_dir, override, message):
    overrides = sweep_overrides(tmp_path, cache_dir, "search.reuse=true", override)
    with pytest.raises(ConfigError, match=message):
        plan_sweep(compose_config(overrides), connect=False)


@pytest.mark.slow
def test_a_sweep_reuses_within_its_epochs_and_refuses_to_export_a_reuse(tmp_path, cache_dir):
    """The default space's warm starts: structured amounts 0, 0, 0.5, 0.5, 0.75. The second of
    each pair starts from the first's weights and runs 1 epoch; the budget of 8 epochs is then
    spent exactly (2 + 1 + 2 + 1 + 2) and no sixth trial fits."""
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=100",
        "search.n_epochs=8",
        "search.reuse=true",
        "search.reuse_epochs=1",
        space="default",
    )
    result = run_sweep(compose_config(overrides))
    trials = result.trials.set_index("trial")
    assert list(trials.index) == [0, 1, 2, 3, 4] and (trials.state == "COMPLETE").all()
    assert trials.reuse_from.dropna().astype(int).to_dict() == {1: 0, 3: 2}
    assert list(trials.epochs) == [2, 1, 2, 1, 2] and trials.epochs.sum() == 8
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for number, row in trials.iterrows():  # each ran the epochs it was charged
        steps = [m.step for m in client.get_metric_history(row.mlflow_run_id, "train_loss")]
        assert steps == list(range(row.epochs))
        tags = client.get_run(row.mlflow_run_id).data.tags
        assert tags.get(REUSE_FROM_ATTR) == (None if number in (0, 2, 4) else str(number - 1))
    # Only the sources' weights are kept: the reuses wrote none.
    folder = tmp_path / "trials" / "digits_mlp"
    assert sorted(p.name for p in folder.glob("tuned-*.pt")) == [
        "tuned-0000.pt",
        "tuned-0002.pt",
        "tuned-0004.pt",
    ]
    # A reused trial's rerun would start from the baseline: export says so and writes nothing.
    with pytest.raises(ConfigError, match="started from trial 0's fine-tuned weights"):
        export_trial(compose_config(overrides), "digits_mlp", pick="trial=1", conf_dir=tmp_path)
    assert not (tmp_path / "experiment").exists()


def test_the_summary_counts_reused_trials():
    trials = pd.DataFrame({"reuse_from": [None, 0, None, 2], "epochs": [15, 5, 15, 5]})
    summary = fidelity_summary(trials, OmegaConf.create({"n_epochs": 45}))
    assert summary == ", 2 from a finished trial's weights; 40 of 45 fine-tuning epochs"
