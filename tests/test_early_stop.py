"""Early stopping (Optuna pruners; Pareto dominance with several objectives), constraints and the
same metrics for the same seed."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search import compose_config, run_sweep
from search.config.constraints import constraint_values
from search.config.early_stop import dominates
from search.config.storage import mask_url, open_storage
from search.run.pareto import hypervolume
from tests.conftest import sweep_overrides


def _study(tmp_path):
    return optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )


def _children(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("squeeze")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, {
        int(r.data.tags["squeeze.trial"]): r for r in runs if "squeeze.trial" in r.data.tags
    }


def test_dominates_follows_each_direction():
    directions = ["maximize", "minimize"]
    assert dominates([0.9, 10.0], [0.8, 12.0], directions)
    assert dominates([0.9, 10.0], [0.9, 12.0], directions)
    assert not dominates([0.9, 10.0], [0.9, 10.0], directions)  # equal: not dominated
    assert not dominates([0.9, 13.0], [0.8, 12.0], directions)


def test_hypervolume_of_a_staircase():
    reference = (0.0, 100.0)
    assert hypervolume([], reference=reference) == 0.0
    assert hypervolume([(0.5, 50.0)], reference=reference) == pytest.approx(25.0)
    # (0.5, 50) and (0.8, 80): 30 * 0.5 + 20 * 0.8; a dominated point adds nothing
    points = [(0.5, 50.0), (0.8, 80.0), (0.4, 90.0)]
    assert hypervolume(points, reference=reference) == pytest.approx(31.0)
    assert hypervolume([(0.9, 120.0)], reference=reference) == 0.0  # beyond the reference


def test_constraint_values_are_upper_or_lower_bounds():
    metrics = {"size_bytes": 25_000.0, "val_acc": 0.9, "latency_ms": 0.2}
    values = constraint_values(metrics, {"size_kb": 30.0, "val_acc": 0.95, "latency_ms": 0.1})
    assert values == pytest.approx({"size_kb": -5.0, "val_acc": 0.05, "latency_ms": 0.1})
    assert constraint_values(metrics, {"flops": 1.0}) == {}  # not measured: left out
    speed = {"speedup": 1.5, "speedup_b256": 3.0}
    assert constraint_values(speed, {"speedup": 2.0, "speedup_b256": 2.0}) == pytest.approx(
        {"speedup": 0.5, "speedup_b256": -1.0}  # lower bounds: met at batch 256 only
    )


def test_mask_url_hides_passwords_only():
    assert mask_url("postgresql+psycopg2://ann:s3c:r%40t@db:5432/x") == (
        "postgresql+psycopg2://ann:***@db:5432/x"
    )
    assert (
        mask_url("see http://u:p@h:5000 and sqlite:///a.db")
        == "see http://u:***@h:5000 and sqlite:///a.db"
    )
    assert mask_url("postgresql://ann@db/x") == "postgresql://ann@db/x"


@pytest.mark.slow  # (over 4.5 s on 2 cores: the slow lane runs it)
def test_pareto_dominance_stops_trials_and_constraints_shape_the_front(tmp_path, cache_dir):
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=8",
            "search.sampler=random",
            "search.warm_start=false",  # eight random recipes, some dominated after an epoch
            "space.finetune.epochs=3",
            "search.early_stop.enabled=true",
            "search.early_stop.margin=0.0",
            "search.early_stop.min_epochs=1",
            "search.constraints.size_kb=15",
        )
    )
    result = run_sweep(cfg)
    trials = _study(tmp_path).trials
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    client, runs = _children(tmp_path)
    reasons = []
    for t in trials:
        run = runs[t.number]
        epochs = client.get_metric_history(run.info.run_id, "epoch_val_acc")
        if t.state == TrialState.PRUNED:
            assert run.info.status == "FINISHED" and run.data.tags["squeeze.state"] == "PRUNED"
            reasons.append(run.data.tags["squeeze.pruned"].split(":")[0])
            assert len(epochs) < 3
        else:
            assert len(epochs) == 3
            size_kb = t.user_attrs["metrics"]["size_bytes"] / 1000
            assert t.constraints == pytest.approx({"size_kb": size_kb - 15})
    assert set(reasons) <= {
        "infeasible before fine-tuning",
        "infeasible during fine-tuning",
        "dominated by the front after epoch 0",
    }
    assert "dominated by the front after epoch 0" in reasons
    assert not result.front.empty
    assert (result.front.size_bytes <= 15_000).all()  # only feasible trials form the front


def test_median_pruner_with_a_single_objective(tmp_path, cache_dir):
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=8",
            "search.sampler=random",
            "space.finetune.epochs=4",
            "search.objectives=[val_acc]",
            "search.directions=[maximize]",
            "search.pruner=median",
            "search.early_stop.min_epochs=1",
            "+search.pruner_options.n_startup_trials=2",
        )
    )
    run_sweep(cfg)
    trials = _study(tmp_path).trials
    assert TrialState.PRUNED in [t.state for t in trials]
    for t in trials:
        assert list(t.intermediate_values) == list(range(len(t.intermediate_values)))
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == 4


def timed(metric: str) -> bool:
    return metric.startswith(("latency", "speedup"))


def test_the_same_seed_gives_the_same_metrics(tmp_path, cache_dir):
    measured = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        run_sweep(compose_config(sweep_overrides(folder, cache_dir, "search.n_trials=2")))
        trials = _study(folder).trials
        measured.append(
            [
                (t.params, {k: v for k, v in t.user_attrs["metrics"].items() if not timed(k)})
                for t in trials
            ]
        )
    assert measured[0] == measured[1]
