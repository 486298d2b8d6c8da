"""Low-rank factorisation by truncated SVD, and its packed files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressors import CompressionContext, get_compressor, load_packed, save_packed
from compressors.lowrank import LowRank, choose_rank, factorize
from experiments import evaluate, fit
from experiments.metrics import count_flops
from experiments.models import ConvNet1d


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(64, 300), nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.Conv2d(3, 8, 3, padding=1)],
    ids=["linear", "conv1d", "conv2d"],
)
def test_svd_at_full_rank_reproduces_the_layer(layer):
    torch.manual_seed(0)
    full = min(layer.weight.flatten(1).shape)
    pair = factorize(layer, full)
    shape = {nn.Linear: (5, 64), nn.Conv1d: (5, 25, 19), nn.Conv2d: (5, 3, 8, 8)}[type(layer)]
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-5)
    with torch.no_grad():  # and a truncated pair does not
        assert not torch.allclose(factorize(layer, max(1, full // 4))(x), layer(x), atol=1e-3)


def test_rank_by_ratio_and_by_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 0.5, "ratio") == 2
    assert choose_rank(s, 0.01, "ratio") == 1
    assert choose_rank(s, 0.7, "energy") == 1
    assert choose_rank(s, 0.9, "energy") == 2
    assert choose_rank(s, 1.0, "energy") == 4


def test_lowrank_shrinks_the_mlp_and_fine_tunes(digits_task, digits_baseline):
    model = copy.deepcopy(digits_baseline.model)
    before_params, before_flops = _params(model), count_flops(model, digits_task.example_inputs())
    lowrank = get_compressor("lowrank")(keep=0.1)
    model = lowrank.compress(model, CompressionContext())
    assert isinstance(model.net[1], LowRank) and model.net[1].rank == 7  # ceil(0.1 * 64)
    assert isinstance(model.net[3], LowRank) and model.net[3].rank == 10
    assert isinstance(model.net[5], nn.Linear)  # the output layer keeps its full rank
    assert _params(model) < 0.35 * before_params
    assert count_flops(model, digits_task.example_inputs()) < 0.35 * before_flops
    fit(model, digits_task.train, epochs=5, batch_size=64, lr=3e-3)
    assert evaluate(model, digits_task.val) > 0.9


def test_structured_lowrank_quantized_model_round_trips(digits_task, digits_baseline, tmp_path):
    steps = [("structured", {"amount": 0.5}), ("lowrank", {"keep": 0.3}), ("quant", {"bits": 4})]
    model = copy.deepcopy(digits_baseline.model)
    ctx = CompressionContext(example_inputs=digits_task.example_inputs(8))
    for name, params in steps:
        model = get_compressor(name)(**params).compress(model, ctx)
    size = save_packed(model, tmp_path / "m.sqz")
    shipped = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    assert isinstance(shipped.net[1], LowRank)
    assert shipped.net[1][0].weight.shape == model.net[1][0].weight.shape
    x = digits_task.val.x
    with torch.no_grad():
        assert torch.equal(shipped(x), model(x))
    assert size < save_packed(digits_baseline.model, tmp_path / "base.sqz") / 15


def test_lowrank_factorises_convolutions(tmp_path):
    torch.manual_seed(0)
    model = get_compressor("lowrank")(keep=0.3).compress(ConvNet1d(40, 10), CompressionContext())
    assert isinstance(model.features[2], LowRank)
    assert model.features[2][0].kernel_size == (3,) and model.features[2][1].kernel_size == (1,)
    save_packed(model, tmp_path / "cnn.sqz")
    shipped = load_packed(tmp_path / "cnn.sqz", ConvNet1d(40, 10))
    x = torch.randn(4, 40)
    with torch.no_grad():
        assert torch.equal(shipped(x), model(x))


def test_lowrank_pairs_run_on_int8_kernels(digits_task, digits_baseline, tmp_path):
    from compressors.runtime import Int8Linear

    model = copy.deepcopy(digits_baseline.model)
    for name, params in [("lowrank", {"keep": 0.3}), ("quant", {"bits": 8, "runtime": "int8"})]:
        model = get_compressor(name)(**params).compress(model, CompressionContext())
    save_packed(model, tmp_path / "m.sqz")
    shipped = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    assert isinstance(shipped.net[1], LowRank)
    assert isinstance(shipped.net[1][0], Int8Linear) and isinstance(shipped.net[1][1], Int8Linear)
    x = digits_task.val.x
    with torch.no_grad():
        assert (shipped(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.98
