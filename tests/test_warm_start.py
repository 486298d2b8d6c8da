"""Warm starts (a space's recipes run first, once per study) and the samplers: gp on several
objectives with a constraint, tpe with multivariate + group on a conditional space."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search import ConfigError, compose_config, run_sweep
from search.config.plan import SAMPLERS, make_sampler, plan_sweep
from search.config.storage import open_storage
from search.run.budget import WARM_START_ATTR, WORKER_ATTR
from tests.conftest import sweep_overrides

#: The default space's pipeline, as a choice of methods that are here to stay (a sampled trial
#: may pick either; the default space's warm-start recipes take the first).
PIPELINES = "space.pipeline=choice(structured+prune+quant+kd, prune+quant)"
#: Two recipes of the default space: 8 bits (51 KB on digits_mlp) and 4 bits (26 KB).
TWO_RECIPES = (
    "space.warm_start=[{pipeline: structured+prune+quant+kd, structured.amount: 0.0, "
    "prune.amount: 0.0, quant.bits: 8}, {pipeline: [structured, prune, quant, kd], "
    "structured: {amount: 0.0}, prune: {amount: 0.0}, quant: {bits: 4}}]"
)


def _sweep(tmp_path, cache_dir, *extra: str):
    overrides = sweep_overrides(tmp_path, cache_dir, "space.finetune.epochs=1", *extra)
    return run_sweep(compose_config(overrides))


def _trials(tmp_path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"{tmp_path}/optuna.journal")
    return optuna.load_study(study_name="digits_mlp", storage=storage).trials


def _runs(trials, recipe: dict) -> list[int]:
    """Numbers of the trials that ran with every value of ``recipe``."""
    return [t.number for t in trials if all(t.params.get(k) == v for k, v in recipe.items())]


def _warm(trials) -> list[int]:
    return [t.number for t in trials if t.user_attrs.get(WARM_START_ATTR)]


def test_warm_starts_run_first_and_once_across_a_resume(tmp_path, cache_dir):
    overrides = sweep_overrides(tmp_path, cache_dir, PIPELINES)
    plan = plan_sweep(compose_config(overrides), connect=False)
    recipes = [r.params for r in plan.warm_start.recipes]  # conf/space/wide.yaml's four
    assert len(recipes) == 4 and not plan.warm_start.left_out
    assert all(r["pipeline"] == "structured+prune+quant+kd" for r in recipes)

    _sweep(tmp_path, cache_dir, PIPELINES, "search.n_trials=3")  # room for three of them
    trials = _trials(tmp_path)
    assert _warm(trials) == [0, 1, 2]
    assert [_runs(trials, r) for r in recipes] == [[0], [1], [2], []]

    _sweep(tmp_path, cache_dir, PIPELINES, "search.n_trials=5")  # the 4th, then a sampled one
    _sweep(tmp_path, cache_dir, PIPELINES, "search.n_trials=5")  # nothing left to run
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert _warm(trials) == [0, 1, 2, 3]
    assert [_runs(trials, r) for r in recipes] == [[0], [1], [2], [3]]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("squeeze").experiment_id])
    tagged = [r.data.tags["squeeze.trial"] for r in runs if r.data.tags.get(WARM_START_ATTR)]
    assert sorted(tagged) == ["0", "1", "2", "3"]


# Long (two spawned workers). The fast lane's smaller form: the resume test above, where each
# recipe runs once across three runs of the same study.
@pytest.mark.slow
def test_two_workers_run_each_warm_start_once(tmp_path, cache_dir):
    _sweep(tmp_path, cache_dir, PIPELINES, "search.n_trials=3", "search.n_jobs=2", TWO_RECIPES)
    _sweep(tmp_path, cache_dir, PIPELINES, "search.n_trials=4", "search.n_jobs=2", TWO_RECIPES)
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert _warm(trials) == [0, 1]
    assert _runs(trials, {"quant.bits": 8, "prune.amount": 0.0, "structured.amount": 0.0}) == [0]
    assert _runs(trials, {"quant.bits": 4, "prune.amount": 0.0, "structured.amount": 0.0}) == [1]
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) >= 2  # the workers ran them


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            "{quant: {bitz: 8}}",
            r"Unknown parameter 'quant.bitz' in the warm-start recipe 1 \{quant: \{bitz: 8\}\} "
            r"of space 'digits_mlp'. Allowed: pipeline, finetune.<setting>, or "
            r"<compressor>.<parameter> with a compressor of .*kd, lowrank, prune, quant",
        ),
        (
            "{pipeline: prune+quant, prune: {amount: 1.5}}",
            r"The 'prune.amount' parameter of warm-start recipe 1 \{pipeline: prune\+quant, "
            r"prune: \{amount: 1.5\}\} of space 'digits_mlp' must be a float in \[0.0, 1.0\).*"
            r"Got 1.5 instead",
        ),
        ("{pipeline: quant+structured}", r"applies 'structured' after 'quant'"),
        (
            "{pipeline: prune+qaunt}",
            r"Unknown compressor 'qaunt' in the pipeline of warm-start recipe 1 .* Available: ",
        ),
        (
            "{pipeline: prune+quant, structured.amount: 0.5}",
            r"sets 'structured.amount', but its pipeline 'prune\+quant' does not use "
            r"'structured'",
        ),
        ("quant", r"The warm-start recipe 1 quant of space 'digits_mlp' must be a mapping"),
    ],
)
def test_a_recipe_no_space_could_run_is_a_config_error_naming_it(recipe, message):
    cfg = compose_config([f"space.warm_start=[{recipe}]"])
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg, connect=False)


def test_a_recipe_this_space_cannot_produce_is_left_out_with_the_reason():
    overrides = [
        "space=wide",
        "space.pipeline=[prune,quant]",  # as from the command line
        "space.quant.bits=int(interval(2, 6))",
        "space.warm_start=[{pipeline: prune+quant, quant.bits: 8}, {pipeline: quant}, "
        "{pipeline: prune+quant, prune.amount: 0.5, quant.bits: 4, quant.mode: qat}, "
        "{quant.mode: ptq}]",
    ]
    plan = plan_sweep(compose_config(overrides), connect=False)
    # A fixed pipeline is no parameter, nor a value the space fixes (quant.mode: qat).
    assert [r.params for r in plan.warm_start.recipes] == [{"prune.amount": 0.5, "quant.bits": 4}]
    first, second, fourth = plan.warm_start.left_out
    assert str(first) == (
        "warm-start recipe 1 {pipeline: prune+quant, quant.bits: 8} is left out: "
        "quant.bits=8 is outside this space's int(interval(2, 6))"
    )
    assert second.number == 2 and fourth.number == 4
    assert second.reason == "this space's pipeline is 'prune+quant', not 'quant'"
    assert fourth.reason == "this space fixes quant.mode='qat', the recipe sets 'ptq'"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.sampler=cmaes"], "Unknown sampler 'cmaes' .* Available: tpe, nsga2, random, gp"),
        (
            ["search.sampler=tpe", "+search.sampler_options.multivariat=true"],
            r"Unknown option\(s\) 'multivariat' in search.sampler_options for sampler 'tpe'. "
            r"Allowed: .*multivariate, group",
        ),
        (
            ["search.sampler=gp", "+search.sampler_options.population_size=4"],
            r"'population_size' .* sampler 'gp'. Allowed: n_startup_trials, ",
        ),
        (["search.warm_start=maybe"], r"'search.warm_start' config value must be true or false"),
    ],
)
def test_bad_sampler_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(compose_config(overrides), connect=False)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_with_our_defaults(name):
    sampler = make_sampler(name, seed=0)
    assert isinstance(sampler, SAMPLERS[name])
    tpe = make_sampler("tpe", seed=0, options={"multivariate": False})  # group drops with it
    assert isinstance(tpe, optuna.samplers.TPESampler)


def test_gp_runs_a_constrained_two_objective_study(tmp_path, cache_dir):
    result = _sweep(
        tmp_path,
        cache_dir,
        "search.n_trials=3",
        "space.pipeline=[structured,prune,quant,kd]",  # fixed: no 'pipeline' parameter
        "search.sampler=gp",
        "+search.sampler_options.n_startup_trials=2",  # the third trial is the GP's
        "search.constraints.size_kb=30",  # the 8-bit warm start (51 KB) breaks it
        TWO_RECIPES,
    )
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert _warm(trials) == [0, 1]
    assert all("constraints:size_kb" in t.system_attrs for t in trials)
    assert trials[0].constraints["size_kb"] > 0 and trials[1].constraints["size_kb"] <= 0
    assert 0 not in set(result.front.trial)
    assert set(result.front.trial) <= {t.number for t in trials if t.constraints["size_kb"] <= 0}


def test_tpe_multivariate_group_runs_a_conditional_space(tmp_path, cache_dir):
    _sweep(
        tmp_path,
        cache_dir,
        "search.n_trials=3",
        "search.warm_start=false",
        "search.sampler=tpe",
        "space.pipeline=choice(prune+quant, structured+quant+kd)",
        "+search.sampler_options={multivariate: true, group: true, n_startup_trials: 1}",
    )
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert not _warm(trials)
    for t in trials:  # only the chosen methods' parameters
        methods = t.params["pipeline"].split("+")
        assert {k.split(".")[0] for k in t.params} - {"pipeline", "finetune"} == set(methods)
