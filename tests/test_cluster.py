"""Weight sharing by k-means (``cluster``): few shared values per tensor, trained centroids and
fixed codes, pruned zeros kept, a small packed file that reloads exactly, one codebook per tied
tensor."""

from __future__ import annotations

import copy

import pytest
import torch

from compressors import (
    CompressionContext,
    InvalidParameterError,
    apply_pipeline,
    get_compressor,
    load_packed,
    save_packed,
    targets,
)
from compressors.cluster import SharedWeights, kmeans_1d
from compressors.packing import _read, plain_state
from experiments import evaluate, fit
from search import ConfigError, SearchSpace, compose_config
from tests.zoo.models import TiedNextToken


def _compress(model, *steps, seed=0):
    compressors = [get_compressor(name)(**params) for name, params in steps]
    return apply_pipeline(compressors, copy.deepcopy(model), CompressionContext(seed=seed))


def _weights(model) -> dict[str, torch.Tensor]:
    state, _ = plain_state(model)
    return {name: state[name] for name in targets(model)}


def _shared(model) -> dict[str, SharedWeights]:
    return {
        name: next(p for p in t.parametrizations() if isinstance(p, SharedWeights))
        for name, t in targets(model).items()
    }


def test_each_tensor_keeps_at_most_2_to_the_bits_values_while_fine_tuning_trains_centroids(
    digits_task, digits_baseline
):
    model = _compress(digits_baseline.model, ("cluster", {"bits": 3}))
    before = {n: (p.centroids.detach().clone(), p.codes.clone()) for n, p in _shared(model).items()}
    for name, w in _weights(model).items():
        assert 2 < len(torch.unique(w)) <= 8, name
    fit(model, digits_task.train, epochs=1, batch_size=64, lr=1e-3, seed=0)
    for name, w in _weights(model).items():
        assert len(torch.unique(w)) <= 8, name
    for name, p in _shared(model).items():
        centroids, codes = before[name]
        assert not torch.allclose(p.centroids, centroids), f"{name}: centroids did not move"
        assert torch.equal(p.codes, codes), f"{name}: codes changed"
        assert torch.equal(p.codebook()[p.codes.long()], _weights(model)[name])
    assert evaluate(model, digits_task.val) > 0.9


def test_a_centroid_gradient_is_the_sum_of_the_gradients_of_the_weights_sharing_it(
    digits_task, digits_baseline
):
    model = _compress(digits_baseline.model, ("cluster", {"bits": 2}))
    plain = copy.deepcopy(digits_baseline.model)
    with torch.no_grad():
        for name, w in _weights(model).items():
            plain.get_parameter(name).copy_(w)
    x, y = digits_task.train.x[:256], digits_task.train.y[:256]
    for m in (model, plain):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for name, p in _shared(model).items():
        grad = plain.get_parameter(name).grad
        summed = torch.zeros(len(p.centroids) + 1).index_add_(0, p.codes.flatten(), grad.flatten())
        torch.testing.assert_close(p.centroids.grad, summed[1:], rtol=1e-4, atol=1e-6)
        assert p.centroids.grad.abs().sum() > 0


def test_a_pruner_after_clustering_can_score_by_gradients(digits_task, digits_baseline):
    model = copy.deepcopy(digits_baseline.model)
    pipeline = [
        get_compressor("cluster")(bits=3),
        get_compressor("prune")(amount=0.5, importance="taylor"),
    ]
    apply_pipeline(pipeline, model, CompressionContext(train=digits_task.train))
    weights = _weights(model)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == round(0.5 * total)
    assert all(not t.latent.requires_grad for t in targets(model).values())  # still frozen


def test_pruned_zeros_stay_zero_and_the_file_stores_them_sparse(
    digits_task, digits_baseline, tmp_path
):
    pruned = _compress(digits_baseline.model, ("prune", {"amount": 0.8}))
    model = _compress(digits_baseline.model, ("prune", {"amount": 0.8}), ("cluster", {"bits": 4}))
    zeros = {n: w == 0 for n, w in _weights(pruned).items()}
    for stage in ("after clustering", "after fine-tuning"):
        for name, w in _weights(model).items():
            assert torch.equal(w == 0, zeros[name]), f"{name} {stage}"
            assert len(torch.unique(w)) <= 16, f"{name} {stage}"  # zero is one of the 16
        fit(model, digits_task.train, epochs=1, batch_size=64, lr=1e-3, seed=0)
    for name, p in _shared(model).items():
        assert torch.equal(p.packed(_weights(model)[name]).codes == 0, zeros[name])
    size = save_packed(model, tmp_path / "m.sqz", like=digits_baseline.model)
    dense = _compress(digits_baseline.model, ("cluster", {"bits": 4}))
    assert size < 0.5 * save_packed(dense, tmp_path / "dense.sqz", like=digits_baseline.model)
    state, meta, _ = _read(tmp_path / "m.sqz")
    for name, w in _weights(model).items():
        # sparse positions + codes of the nonzeros, or entropy-coded codes (zero: most frequent)
        assert meta["t"][name]["enc"] in ("bitmask", "gaps", "ans"), meta["t"][name]
        assert meta["t"][name]["decode"] == "codebook"
        assert torch.equal(state[name], w)


def test_a_4_bit_clustered_model_packs_small_and_reloads_exactly(
    digits_task, digits_baseline, tmp_path
):
    baseline_size = save_packed(digits_baseline.model, tmp_path / "base.sqz")
    model = _compress(digits_baseline.model, ("cluster", {"bits": 4}))
    size = save_packed(model, tmp_path / "m.sqz", like=digits_baseline.model)
    quant = _compress(digits_baseline.model, ("quant", {"bits": 4}))
    quant_size = save_packed(quant, tmp_path / "q.sqz", like=digits_baseline.model)
    assert size < baseline_size / 6, (size, baseline_size)
    assert size < quant_size * 1.15, (size, quant_size)  # codes of 4 bits, like quant's
    reloaded = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    x = digits_task.val.x
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    for name, w in _weights(model).items():
        assert torch.equal(reloaded.get_parameter(name), w)


def test_a_tied_tensor_shares_one_codebook(tmp_path):
    torch.manual_seed(0)
    model, tokens = TiedNextToken(40), torch.randint(0, 40, (8, 5))
    get_compressor("cluster")(bits=3).compress(model, CompressionContext())
    emb, head = model.emb.parametrizations.weight, model.head.parametrizations.weight
    assert emb.original is head.original and emb[0] is head[0]
    assert sum(isinstance(m, SharedWeights) for m in model.modules()) == 1 + 2  # tied + GRU
    model(tokens).sum().backward()
    assert torch.equal(model.emb.weight, model.head.weight)
    save_packed(model, tmp_path / "m.sqz")
    _, meta, tensors = _read(tmp_path / "m.sqz")
    assert [k for k in tensors if k.endswith(":codebook") and "rnn" not in k] == [
        "emb.weight:codebook"
    ]
    assert meta["tied"] == {"head.weight": "emb.weight"}
    reloaded = load_packed(tmp_path / "m.sqz", TiedNextToken(40))
    assert reloaded.head.weight is reloaded.emb.weight
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"bits": 9}, "cluster.bits"),
        ({"bits": 0}, "cluster.bits"),
        ({"bits": "4"}, "cluster.bits"),
        ({"init": "kmeans++"}, "cluster.init"),
        ({"iters": 0}, "cluster.iters"),
        ({"embeddings": 4}, "cluster.embeddings"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, name):
    with pytest.raises(InvalidParameterError, match=rf"'{name}' parameter"):
        get_compressor("cluster")(**params)


def test_a_space_offers_cluster_as_a_quantizer_and_never_with_quant():
    space = compose_config(["space.pipeline=[prune,quantizer]", "space.cluster.bits=3"]).space
    assert "prune+cluster" in SearchSpace.from_config(space)._pipeline.choices
    both = compose_config(["space.pipeline=[prune,cluster,quant]"]).space
    with pytest.raises(ConfigError, match="combines 'cluster' and 'quant'"):
        SearchSpace.from_config(both)


def test_k_means_is_deterministic_and_its_iterations_reduce_the_error():
    values = torch.randn(20_000, generator=torch.Generator().manual_seed(0))

    def error(centroids):
        codes = torch.bucketize(values.double(), (centroids[1:] + centroids[:-1]) / 2)
        return (centroids[codes] - values.double()).pow(2).mean().item()

    for init in ("linear", "density", "random"):
        runs = [
            kmeans_1d(values, 8, init=init, generator=torch.Generator().manual_seed(1))
            for _ in range(2)
        ]
        assert torch.equal(runs[0], runs[1])
        one = kmeans_1d(values, 8, init=init, iters=1, generator=torch.Generator().manual_seed(1))
        assert error(runs[0]) < error(one)
        assert error(runs[0]) < 0.0385  # Lloyd-Max for 8 levels of a unit Gaussian: 0.0345
    few = torch.tensor([0.5, -1.0, 0.5, 2.0])
    assert torch.equal(kmeans_1d(few, 8), torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
