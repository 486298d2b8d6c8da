"""``search.warm_start: predicted``: the first trials spread along the front that allocate's
sensitivity table and knapsack predict, before any fine-tuning."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from search import ConfigError, compose_config, run_sweep
from search.config.plan import plan_sweep
from search.config.storage import open_storage
from search.run.budget import WARM_START_ATTR
from search.run.predicted_front import Prediction, predicted_front, spread
from tests.conftest import sweep_overrides


def _table(seed: int) -> dict[str, np.ndarray]:
    """A table of 6 tensors x 5 settings: fewer bytes cost more loss."""
    rng = np.random.default_rng(seed)
    size = rng.integers(1000, 5000, size=(6, 1))
    fractions = np.array([1.0, 0.5, 0.25, 0.12, 0.05])
    loss = rng.uniform(0.0, 0.1, size=(6, 1)) * np.array([0.0, 0.1, 0.4, 1.5, 6.0])
    return {
        "bytes": np.ceil(size * fractions).astype(np.int64),
        "sensitivity": loss,
        "reference": np.array([0.2, 2.3]),
    }


def _front(table: dict[str, np.ndarray]) -> list[Prediction]:
    packed = int(table["bytes"][:, 0].sum()) + 500
    ratios = np.geomspace(1.5, 30.0, 16)
    return predicted_front(table, packed=packed, fixed=500, ratios=ratios, slack=0.01)


def test_predicted_front_is_deterministic_and_spread_along_it():
    first, again = _front(_table(0)), _front(_table(0))
    assert first == again
    chosen = spread(first, 4)
    assert chosen == spread(again, 4) and len(chosen) == 4
    sizes = [p.bytes for p in chosen]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # distinct, ordered
    losses = [p.loss for p in chosen]
    assert losses == sorted(losses) and len(set(losses)) == 4  # none dominated by another
    front_sizes = sorted({p.bytes for p in first})
    assert sizes[0] == front_sizes[-1] and sizes[-1] == front_sizes[0]  # from end to end


def test_spread_keeps_the_non_dominated_only():
    points = [Prediction(2.0, 0.3, 1000), Prediction(3.0, 0.5, 1200), Prediction(4.0, 0.6, 500)]
    assert spread(points, 5) == [points[0], points[2]]  # 1200 bytes at more loss: dominated


def test_predicted_is_refused_for_a_space_without_allocate(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path, cache_dir, "search.warm_start=predicted", "space.pipeline=[structured,quant]"
    )
    with pytest.raises(ConfigError, match=r"warm_start=predicted.*true, false, predicted"):
        plan_sweep(compose_config(overrides), connect=False)
    bad = sweep_overrides(tmp_path, cache_dir, "search.warm_start=maybe")
    with pytest.raises(ConfigError, match=r"warm_start.*predicted"):
        plan_sweep(compose_config(bad), connect=False)


@pytest.mark.slow
def test_predicted_warm_starts_run_first_and_once(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.warm_start=predicted",
        "space.finetune.epochs=1",
        "search.sampler=tpe",
        space="default",
    )
    run_sweep(compose_config([*overrides, "search.n_trials=3"]))
    run_sweep(compose_config([*overrides, "search.n_trials=6"]))
    storage = open_storage(f"{tmp_path}/optuna.journal")
    trials = optuna.load_study(study_name="digits_mlp", storage=storage).trials
    warm = [t for t in trials if t.user_attrs.get(WARM_START_ATTR)]
    assert [t.number for t in warm] == [0, 1, 2, 3, 4]  # the default space's 5, once each
    assert all(t.params["structured.amount"] == 0.0 for t in warm)
    ratios = [t.params["allocate.ratio"] for t in warm]
    assert ratios == sorted(ratios) and len(set(ratios)) == 5  # spread along the front
    sizes = [t.values[1] for t in warm]
    assert sizes == sorted(sizes, reverse=True)
