"""YAML search expressions become the right Optuna distributions; bad spaces fail up front."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search import ConfigError, SearchSpace, compose_config
from search.config.space import parse_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interval(0.1, 0.9)", FloatDistribution(0.1, 0.9)),
        ("int(interval(2, 8))", IntDistribution(2, 8)),
        ("tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 1e-1, log=True)),
        ("choice(global, layer)", CategoricalDistribution(["global", "layer"])),
        ("choice(2, 4, 8)", CategoricalDistribution([2, 4, 8])),
        ("range(2, 9)", IntDistribution(2, 8)),
        ("range(2, 9, 3)", IntDistribution(2, 8, step=3)),
        ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
        ("global", "global"),
        (0.5, 0.5),
    ],
)
def test_expressions(text, expected):
    assert parse_value("space.x", text) == expected


def _space(*overrides):
    """The wide space (every knob searched), changed by ``overrides``."""
    return SearchSpace.from_config(compose_config(["space=wide", *overrides]).space)


def test_wide_space_samples_every_parameter_in_range():
    space = _space()
    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(20):
        trial = study.ask()
        recipe = space.sample(trial)
        if recipe.pipeline[2] != "quant":  # the pipeline names the kind: any quantizer
            assert recipe.pipeline[2] in space.compressor_names
            study.tell(trial, [0.5, 1.0])
            continue
        assert recipe.pipeline == ("structured", "prune", "quant", "kd")
        assert 0.0 <= recipe.compressors["structured"]["amount"] <= 0.85
        assert 0.0 <= recipe.compressors["prune"]["amount"] <= 0.95
        assert recipe.compressors["prune"]["scope"] in ("global", "layer")
        assert isinstance(recipe.compressors["quant"]["bits"], int)
        assert 2 <= recipe.compressors["quant"]["bits"] <= 8
        assert 3e-4 <= recipe.finetune["lr"] <= 1e-2
        assert recipe.finetune["epochs"] == 15
        assert set(trial.params) == {
            "pipeline",
            "structured.amount",
            "prune.amount",
            "prune.scope",
            "quant.bits",
            "kd.temperature",
            "kd.alpha",
            "finetune.lr",
        }
        assert [type(c).__name__ for c in space.build(recipe)] == [
            "StructuredPruning",
            "UnstructuredPruning",
            "Quantization",
            "Distillation",
        ]
        study.tell(trial, [0.5, 1.0])


def test_the_default_space_searches_few_dimensions():
    space = SearchSpace.from_config(compose_config(["space=default"]).space)
    study = optuna.create_study(directions=["maximize", "minimize"])
    seen = set()
    for _ in range(30):
        trial = study.ask()
        recipe = space.sample(trial)
        seen.add(recipe.pipeline)
        assert recipe.pipeline[0] == "structured"
        assert 0.0 <= recipe.compressors["structured"]["amount"] <= 0.8
        method = recipe.pipeline[1]
        searched = {"pipeline", "structured.amount", "finetune.lr", *_searched(method)}
        assert set(trial.params) == searched
        if method == "allocate":
            assert 2.0 <= recipe.compressors["allocate"]["ratio"] <= 30.0
        else:
            assert 2 <= recipe.compressors[method]["bits"] <= 8
        assert 1e-3 <= recipe.finetune.pop("lr") <= 1e-2
        assert recipe.finetune == {"epochs": 15, "batch_size": 64, "schedule": "constant"}
        study.tell(trial, [0.5, 1.0])
    assert seen == {("structured", m) for m in ("allocate", "quant", "cluster")}


def _searched(method: str) -> set[str]:
    return {"allocate": {"allocate.ratio"}}.get(method, {f"{method}.bits"})


def test_command_line_overrides_change_the_space():
    space = _space(
        "space.prune.amount=interval(0.5, 0.98)",
        "space.quant.bits=4",
        "space.pipeline=[prune,quant]",
    )
    trial = optuna.create_study().ask()
    recipe = space.sample(trial)
    assert recipe.pipeline == ("prune", "quant")
    assert 0.5 <= recipe.compressors["prune"]["amount"] <= 0.98
    assert recipe.compressors["quant"]["bits"] == 4
    assert "quant.bits" not in trial.params and "kd.alpha" not in trial.params


def test_conditional_pipeline_samples_only_the_chosen_methods():
    space = _space(
        "space.pipeline=choice(prune, quant+kd, prune+quant, sparse+gradual, structured+lowrank+kd)"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        recipe = space.sample(trial)
        seen.add(recipe.pipeline)
        owners = {name.split(".")[0] for name in trial.params} - {"pipeline", "finetune"}
        assert owners == set(recipe.pipeline)
        study.tell(trial, 0.0)
    assert seen == {
        ("prune",),
        ("quant", "kd"),
        ("prune", "quant"),
        ("sparse", "gradual"),
        ("structured", "lowrank", "kd"),
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.prune.amount=1.5", r"'prune.amount' parameter of space 'wide' must be a float"),
        ("space.prune.amount=interval(0.5, 1.5)", r"Got 'interval\(0.5, 1.5\)' instead"),
        ("space.quant.bits=0", r"'quant.bits' .* must be an int in \[1, 8\] or 'ternary'. Got 0"),
        ("space.quant.bits=interval(2, 8)", r"Use int\(interval\(a, b\)\) for integers"),
        ("space.kd.temperature=0", r"'kd.temperature' .* Got 0"),
        ("space.kd.alpha=choice(0.5, 2.0)", r"'kd.alpha'"),
        ("space.finetune.lr=-1", r"'finetune.lr'"),
        (
            "space.pipeline=[prune,prun]",
            r"Unknown compressor 'prun' .* Available: .*gradual, kd, lowrank, prune, quant",
        ),
        ("space.pipeline=[quant,quant]", r"repeats a compressor"),
        ("space.pipeline=[prune,gradual]", r"both of kind 'sparsity'; use at most one"),
        (
            "space.pipeline=[quant,lowrank]",
            r"'lowrank' changes layer shapes, so it must come first",
        ),
        ("space.pipeline=[prune,sparse]", r"'sparse' trains the dense model before anything"),
        ("space.pipeline=[kd,quant]", r"'quant' constrains weights in place, so it must come"),
        (
            "space.pipeline=choice(prune+quant, quant+structured)",
            r"'quant\+structured' .* 'structured' changes layer shapes",
        ),
        ("space.quant.bits=choice(1, ternary, 3, binary)", r"'quant.bits' .* Got 'binary'"),
        ("space.quant.mode=choice(qat, gptq)", r"'quant.mode' .* one of 'qat', 'ptq'"),
        ("space.lowrank.keep=0", r"'lowrank.keep' .* a float in \(0.0, 1.0\]"),
        ("space.gradual.end=1.5", r"'gradual.end'"),
        ("space.sparse.strength=0", r"'sparse.strength' .* a float in \(0.0, inf\)"),
        (
            "+space.prune.amout=0.5",
            r"Unknown parameter 'prune.amout' .* Allowed: amount, importance, scope",
        ),
        (
            "space.prune.scope=choice(global, everywhere)",
            r"'prune.scope' .* one of 'global', 'layer'",
        ),
    ],
)
def test_bad_spaces_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        _space(override)


def test_malformed_expression_in_yaml_is_named():
    with pytest.raises(ConfigError, match=r"Malformed search expression for 'space.prune.amount'"):
        parse_value("space.prune.amount", "interval(0.1,")


def test_per_layer_amounts_are_searched_one_dimension_per_layer():
    space = SearchSpace.from_config(
        {
            "name": "per_layer",
            "pipeline": ["prune"],
            "prune": {
                "_target_": "compressors.prune.UnstructuredPruning",
                "amount": {
                    "net.1": "interval(0.5, 0.9)",
                    "net.3": "interval(0.1, 0.4)",
                    "net.5": 0,
                },
                "scope": "layer",
            },
        }
    )
    trial = optuna.create_study().ask()
    recipe = space.sample(trial)
    assert set(trial.params) == {"prune.amount.net.1", "prune.amount.net.3"}
    amounts = recipe.compressors["prune"]["amount"]
    assert 0.5 <= amounts["net.1"] <= 0.9 and 0.1 <= amounts["net.3"] <= 0.4
    assert amounts["net.5"] == 0
    assert space.build(recipe)[0].amount == amounts
    with pytest.raises(ConfigError, match=r"'prune.amount.net.1' .* Got 'interval\(0.5, 1.5\)'"):
        SearchSpace.from_config(
            {
                "pipeline": ["prune"],
                "prune": {
                    "_target_": "compressors.prune.UnstructuredPruning",
                    "amount": {"net.1": "interval(0.5, 1.5)"},
                },
            }
        )


def test_a_kind_in_the_pipeline_offers_every_compressor_of_that_kind():
    from compressors import available, get_compressor

    quantizers = [n for n in available() if get_compressor(n).kind == "quantizer"]
    sparsity = [n for n in available() if get_compressor(n).kind == "sparsity"]
    assert "quant" in quantizers and len(sparsity) >= 2
    space = SearchSpace.from_config(compose_config(["space.pipeline=[prune,quantizer]"]).space)
    assert space._pipeline == CategoricalDistribution([f"prune+{q}" for q in quantizers])
    cfg = compose_config(["space.pipeline=choice(sparsity+quantizer, quant)"])
    choices = SearchSpace.from_config(cfg.space)._pipeline.choices
    assert sorted(choices) == sorted([f"{s}+{q}" for s in sparsity for q in quantizers] + ["quant"])
    # every conf/compressor/<name>.yaml has an entry in the default space
    assert set(available()) <= set(compose_config([]).space)
    with pytest.raises(ConfigError, match=r"or a kind standing for each compressor of it: .*quan"):
        SearchSpace.from_config(compose_config(["space.pipeline=[quantiser]"]).space)
