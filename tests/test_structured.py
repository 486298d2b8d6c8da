"""Structured pruning really removes channels; importance criteria are interchangeable plug-ins."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from compressors import CompressionContext, get_compressor, load_packed, save_packed
from compressors.importance import weight_scores
from compressors.packing import plain_state
from experiments import evaluate, fit
from experiments.metrics import count_flops
from experiments.models import ConvNet1d
from search import ConfigError, SearchSpace, compose_config


def _ctx(task, seed=0):
    return CompressionContext(train=task.train, example_inputs=task.example_inputs(), seed=seed)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "random"])
def test_structured_pruning_shrinks_the_mlp_and_its_flops(digits_task, digits_baseline, importance):
    model = copy.deepcopy(digits_baseline.model)
    pruned = get_compressor("structured")(amount=0.5, importance=importance).compress(
        model, _ctx(digits_task)
    )
    shapes = [tuple(p.shape) for p in pruned.parameters()]
    assert shapes == [(150, 64), (150,), (50, 150), (50,), (10, 50), (10,)]
    x = digits_task.example_inputs()
    assert count_flops(pruned, x) < 0.4 * count_flops(digits_baseline.model, x)
    assert pruned(digits_task.val.x).shape == (360, 10)


def test_structured_pruning_shrinks_a_cnn_and_the_file_reloads(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNet1d(40, 10), torch.randn(8, 40)
    pruned = get_compressor("structured")(amount=0.6).compress(
        copy.deepcopy(model), CompressionContext(example_inputs=x[:1])
    )
    assert [p.shape[0] for p in pruned.features.parameters() if p.dim() == 3] == [10, 10, 10]
    assert pruned.head.weight.shape == (10, 50)  # flattened features follow the channels
    size = save_packed(pruned, tmp_path / "small.sqz")
    assert size < 0.5 * save_packed(model, tmp_path / "full.sqz")
    assert torch.equal(load_packed(tmp_path / "small.sqz", ConvNet1d(40, 10))(x), pruned(x))


def test_structured_then_quantized_model_fine_tunes_and_round_trips(
    tmp_path, digits_task, digits_baseline
):
    model = copy.deepcopy(digits_baseline.model)
    model = get_compressor("structured")(amount=0.5).compress(model, _ctx(digits_task))
    model = get_compressor("quant")(bits=4).compress(model, _ctx(digits_task))
    fit(model, digits_task.train, epochs=3, batch_size=64, lr=1e-3)
    assert evaluate(model, digits_task.val) > 0.9
    save_packed(model, tmp_path / "m.sqz")
    reloaded = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    assert torch.equal(reloaded(digits_task.val.x), model(digits_task.val.x))


def test_taylor_importance_differs_from_magnitude_on_dead_inputs(digits_task, digits_baseline):
    """Pixels that are 0 in every image give their weights zero gradient: Taylor scores them 0
    whatever their size, magnitude does not."""
    model = copy.deepcopy(digits_baseline.model)
    layers = {"net.1": model.net[1]}
    dead = (digits_task.train.x[:512] == 0).all(dim=0)
    assert dead.sum() >= 3
    magnitude = weight_scores("l1", layers, model, _ctx(digits_task))["net.1"]
    taylor = weight_scores("taylor", layers, model, _ctx(digits_task))["net.1"]
    assert torch.all(taylor[:, dead] == 0)
    assert torch.all(magnitude[:, dead] > 0)
    assert all(p.grad is None for p in model.parameters())  # gradients are cleaned up
    pruned = {}
    for criterion in ("l1", "taylor"):
        m = get_compressor("prune")(amount=0.2, scope="layer", importance=criterion).compress(
            copy.deepcopy(digits_baseline.model), _ctx(digits_task)
        )
        pruned[criterion] = plain_state(m)[0]["net.1.weight"] == 0
    assert torch.all(pruned["taylor"][:, dead])
    assert not torch.equal(pruned["taylor"], pruned["l1"])


def test_random_importance_is_a_seeded_control(digits_task, digits_baseline):
    def mask(seed):
        m = get_compressor("prune")(amount=0.5, importance="random").compress(
            copy.deepcopy(digits_baseline.model), _ctx(digits_task, seed)
        )
        return plain_state(m)[0]["net.3.weight"] == 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


def test_shape_changing_methods_must_come_first():
    cfg = compose_config(["space.pipeline=[prune,structured]"])
    with pytest.raises(
        ConfigError, match="applies 'structured' after 'prune'.*changes layer shapes"
    ):
        SearchSpace.from_config(cfg.space)
    cfg = compose_config(["space.pipeline=[structured,quant,kd]"])
    recipe = SearchSpace.from_config(cfg.space).sample(optuna.create_study().ask())
    assert recipe.pipeline == ("structured", "quant", "kd")
