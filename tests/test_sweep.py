"""`squeeze sweep` end to end on digits_mlp: real Optuna storage, real MLflow, real files."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from search import ConfigError, compose_config, run_sweep
from search.cli import main
from search.config.storage import open_storage
from tests.conftest import study_runs, sweep_overrides


def _mlflow_runs(tmp_path):
    return study_runs(f"sqlite:///{tmp_path}/mlflow.db")


def _study(tmp_path, name="digits_mlp"):
    return optuna.load_study(study_name=name, storage=open_storage(f"{tmp_path}/optuna.journal"))


@pytest.fixture(scope="module")
def four_trials(tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        code = main(
            ["sweep", "--quiet", *sweep_overrides(tmp_path, cache_dir, "search.n_trials=4")]
        )
    assert code == 0
    return tmp_path


def test_study_has_four_finished_trials_with_run_ids(four_trials):
    trials = _study(four_trials).trials
    assert len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(len(t.values) == 2 for t in trials)
    assert all(t.user_attrs["mlflow_run_id"] for t in trials)


def test_mlflow_has_one_parent_and_a_child_per_trial(four_trials):
    client, parents, children = _mlflow_runs(four_trials)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_id for c in children} == {
        t.user_attrs["mlflow_run_id"] for t in _study(four_trials).trials
    }
    assert parent.data.metrics["baseline_val_acc"] > 0.9
    assert parent.data.metrics["baseline_test_acc"] > 0.9
    assert parent.data.params["data.train_size"] == "1077"
    assert parent.data.params["search.sampler"] == "gp"
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in (
            "val_acc",
            "size_bytes",
            "compression_ratio",
            "nonzero_params",
            "flops",
            "latency_ms",
            "latency_ms_b256",
            "speedup",
            "speedup_b256",
            "peak_memory_bytes",
        ):
            assert metric in child.data.metrics, metric
            assert f"baseline_{metric}" in parent.data.metrics or metric in ("compression_ratio",)
        assert child.data.metrics["speedup_b256"] > 0
        assert {"prune.amount", "quant.bits", "kd.alpha", "finetune.lr"} <= set(child.data.params)
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 2
        assert child.data.tags["squeeze.state"] == "COMPLETE"
    assert parent.data.metrics["baseline_speedup"] == 1.0


def test_the_sweep_saves_the_mlflow_views_that_list_its_trials(four_trials):
    import json

    from search.run.mlflow_views import VIEW_TAG_PREFIX, view_key

    client, _, children = _mlflow_runs(four_trials)
    experiment = client.get_experiment_by_name("squeeze")
    for front in (False, True):
        view = json.loads(experiment.tags[VIEW_TAG_PREFIX + view_key("digits_mlp", front=front)])
        state = json.loads(view["state"])
        found = client.search_runs([experiment.experiment_id], state["searchFilter"])
        tagged = {c.info.run_id for c in children if c.data.tags.get("pareto") == "true"}
        assert {r.info.run_id for r in found} == (
            tagged if front else {c.info.run_id for c in children}
        )


def test_each_child_size_is_the_size_of_its_model_artifact(four_trials):
    client, parents, children = _mlflow_runs(four_trials)
    baseline_size = parents[0].data.metrics["baseline_size_bytes"]
    for child in children:
        files = client.list_artifacts(child.info.run_id)
        assert len(files) == 1 and files[0].path.endswith(".sqz")
        assert files[0].file_size == child.data.metrics["size_bytes"]
        assert child.data.metrics["compression_ratio"] == pytest.approx(
            baseline_size / child.data.metrics["size_bytes"]
        )


def test_pareto_csv_and_plot_are_on_the_parent_and_the_front_is_tagged(four_trials, tmp_path):
    client, parents, children = _mlflow_runs(four_trials)
    parent_id = parents[0].info.run_id
    names = {f.path for f in client.list_artifacts(parent_id)}
    assert {"pareto.csv", "pareto.png", "trials.csv", "config.yaml"} <= names
    front = pd.read_csv(client.download_artifacts(parent_id, "pareto.csv", str(tmp_path)))
    best = {t.number for t in _study(four_trials).best_trials}
    assert set(front.trial) == best
    assert front.test_acc.between(0, 1).all()
    tagged = {c.info.run_id for c in children if c.data.tags.get("pareto") == "true"}
    assert tagged == set(front.mlflow_run_id)
    with_test = {c.info.run_id for c in children if "test_acc" in c.data.metrics}
    assert with_test == tagged  # test accuracy only for the front
    png = client.download_artifacts(parent_id, "pareto.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_second_sweep_reuses_the_baseline_and_continues_the_study(four_trials, cache_dir, capsys):
    tmp_path = four_trials
    cached = sorted(p.name for p in cache_dir.iterdir())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        code = main(
            ["sweep", "--quiet", *sweep_overrides(tmp_path, cache_dir, "search.n_trials=5")]
        )
    assert code == 0
    assert sorted(p.name for p in cache_dir.iterdir()) == cached  # no new baseline trained
    assert len(_study(tmp_path).trials) == 5
    _, parents, children = _mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 5
    out = capsys.readouterr().out
    assert "Pareto front of digits_mlp" in out and "baseline" in out


def test_continuing_with_another_space_is_refused(four_trials, cache_dir):
    cfg = compose_config(sweep_overrides(four_trials, cache_dir, "space.quant.bits=4"))
    with pytest.raises(ConfigError, match="was started with another space than this config"):
        run_sweep(cfg)


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path, cache_dir):
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=6",
            "search.sampler=random",
            "space.finetune.lr=choice(0.001, 1e30)",
            "space.pipeline=[prune]",
        )
    )
    result = run_sweep(cfg)
    states = [t.state for t in _study(tmp_path).trials]
    assert len(states) == 6
    assert TrialState.FAIL in states and TrialState.COMPLETE in states
    _, _, children = _mlflow_runs(tmp_path)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == states.count(TrialState.FAIL)
    assert all("NonFiniteLossError" in c.data.tags["squeeze.error"] for c in failed)
    assert set(result.front.state) == {"COMPLETE"}


def test_a_sweep_where_every_trial_fails_still_ends_cleanly(tmp_path, cache_dir):
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=2",
            "space.finetune.lr=1e30",
            # quantization grids bound the weights; pruning alone diverges
            "space.pipeline=[prune]",
        )
    )
    result = run_sweep(cfg)
    assert result.front.empty
    assert [t.state for t in _study(tmp_path).trials] == [TrialState.FAIL] * 2
    assert all(p.exists() for p in result.artifacts)


def test_nsga2_and_three_objectives(tmp_path, cache_dir):
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=3",
            "search.sampler=nsga2",
            "search.objectives=[val_acc,size_bytes,latency_ms]",
            "search.directions=[maximize,minimize,minimize]",
            "space.prune.amount=interval(0.5, 0.98)",
        )
    )
    result = run_sweep(cfg)
    trials = _study(tmp_path).trials
    assert all(len(t.values) == 3 for t in trials)
    assert all(0.5 <= t.params["prune.amount"] <= 0.98 for t in trials)
    assert not result.front.empty


def test_the_pipeline_is_searched_and_every_method_runs(tmp_path, cache_dir):
    pipelines = "sparse+prune+quant, structured+lowrank+quant+kd, gradual+quant, lowrank+quant"
    cfg = compose_config(
        sweep_overrides(
            tmp_path,
            cache_dir,
            "search.n_trials=8",
            "search.sampler=random",
            f"space.pipeline=choice({pipelines})",
            "space.sparse.epochs=1",
            "space.quant.bits=choice(1, ternary, 4)",
            "space.quant.mode=choice(qat, ptq)",
            "space.quant.runtime=choice(float, int8)",
            "search.objectives=[val_acc,size_bytes,latency_ms_b256]",
            "search.directions=[maximize,minimize,minimize]",
        )
    )
    result = run_sweep(cfg)
    trials = _study(tmp_path).trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["pipeline"] for t in trials}) >= 3
    for t in trials:
        chosen = set(t.params["pipeline"].split("+"))
        assert {name.split(".")[0] for name in t.params} - {"pipeline", "finetune"} <= chosen
        assert t.values[2] == t.user_attrs["metrics"]["latency_ms_b256"] > 0
        assert t.user_attrs["metrics"]["size_bytes"] < result.baseline["size_bytes"] / 4
    assert not result.front.empty


def test_an_interrupted_sweep_ends_its_parent_run_killed_and_resumes(tmp_path, cache_dir):
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=3")

    def interrupt(study, trial):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(compose_config(overrides), callbacks=[interrupt])
    _, parents, children = _mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    run_sweep(compose_config(overrides))
    _, parents, children = _mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3 and len(_study(tmp_path).trials) == 3


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_cross_validated_objective_is_the_mean_over_fold_baselines(tmp_path, cache_dir):
    from experiments import evaluate
    from search.config.plan import plan_sweep
    from search.run.trial import compress_recipe

    cfg = compose_config(
        sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", "search.cv_folds=3")
    )
    run_sweep(cfg)
    trials = _study(tmp_path).trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    folds = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(folds) >= 4  # the split's baseline and one per fold
    plan = plan_sweep(cfg)
    task = plan.task_builder(**plan.task_kwargs)
    from search.run.study import _cv_folds

    pairs = _cv_folds(cfg, plan, task)
    assert [len(t.val) for t, _ in pairs] == [479, 479, 479]  # 1,437 train + val samples
    for trial in trials:
        metrics = trial.user_attrs["metrics"]
        recipe = plan.space.sample(optuna.trial.FixedTrial(trial.params))
        scores = [
            evaluate(compress_recipe(recipe, plan.space, t, b, seed=trial.number)[0], t.val)
            for t, b in pairs
        ]
        assert metrics["val_acc"] == pytest.approx(sum(scores) / 3, abs=1e-9)
        assert trial.values[0] == metrics["val_acc"] != metrics["val_acc_split"]
