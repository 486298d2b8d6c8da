"""Low-rank factorisation's SVD: randomized where the kept rank is small, as accurate as the
full SVD's truncation within a tolerance, seeded apart from the global random state, and the
rank by ``ratio`` taken from the layer's shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressors import CompressionContext, get_compressor
from compressors.lowrank import (
    LowRank,
    choose_rank,
    randomized,
    singular_values,
    truncated_svd,
)


def _low_rank_plus_noise(m: int, n: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
    return signal + noise * torch.randn(m, n, generator=g)


def _error(matrix: torch.Tensor, u, s, vh) -> float:
    return float(torch.linalg.matrix_norm(matrix - (u * s) @ vh))


@pytest.mark.parametrize(("rank", "noise"), [(8, 0.1), (20, 0.5), (60, 1.0)])
def test_the_randomized_factors_reconstruct_within_one_percent_of_the_full_svds(rank, noise):
    matrix = _low_rank_plus_noise(600, 400, 20, noise)
    assert randomized(tuple(matrix.shape), rank)  # (the path under test)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = _error(matrix, u[:, :rank], s[:rank], vh[:rank])
    ur, sr, vhr = truncated_svd(matrix, rank, seed=3)
    assert ur.shape == (600, rank) and sr.shape == (rank,) and vhr.shape == (rank, 400)
    assert _error(matrix, ur, sr, vhr) <= 1.01 * best
    signal = min(rank, 20)  # (the signal's singular values, found; the noise's, approximated)
    assert torch.allclose(sr[:signal], s[:signal], rtol=0.01)


def test_a_flat_spectrum_is_approximated_within_two_percent_too():
    """Random init weights have no low-rank structure: the sketch's hardest case."""
    matrix = torch.empty(512, 512).uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = _error(matrix, u[:, :64], s[:64], vh[:64])
    assert _error(matrix, *truncated_svd(matrix, 64)) <= 1.02 * best


def test_a_large_rank_takes_the_full_svd_exactly():
    matrix = _low_rank_plus_noise(60, 40, 5, 0.3)
    assert not randomized((60, 40), 40)
    u, s, vh = truncated_svd(matrix, 40)
    assert torch.allclose((u * s) @ vh, matrix, atol=1e-4)


def test_the_randomized_svd_is_seeded_and_leaves_the_global_random_state():
    matrix = _low_rank_plus_noise(300, 200, 10, 0.2)
    state = torch.random.get_rng_state()
    first, again = truncated_svd(matrix, 10, seed=7), truncated_svd(matrix, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(("keep", "rank_by"), [(0.1, "ratio"), (0.5, "ratio"), (0.6, "energy")])
def test_each_layer_gets_the_rank_its_singular_values_give(keep, rank_by):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 300), nn.Linear(300, 5))
    weights = {i: model[i].weight.detach().clone() for i in (0, 2)}
    out = get_compressor("lowrank")(keep=keep, rank_by=rank_by).compress(
        model, CompressionContext()
    )
    for i, weight in weights.items():
        rank = choose_rank(torch.linalg.svdvals(weight), keep, rank_by)
        m, n = weight.shape
        if rank * (m + n) < m * n:
            assert isinstance(out[i], LowRank) and out[i].rank == rank
        else:
            assert isinstance(out[i], nn.Linear)  # (no pair would be smaller)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (128, 128), (1, 50)])
def test_singular_values_from_the_gram_matrix_are_svdvals(shape):
    matrix = _low_rank_plus_noise(*shape, rank=min(shape), noise=0.5, seed=2)
    expected = torch.linalg.svdvals(matrix)
    found = singular_values(matrix)
    assert found.shape == expected.shape
    assert torch.allclose(found.float(), expected, atol=1e-4 * float(expected[0]))
    for keep in (0.3, 0.6, 0.9, 0.99):
        assert choose_rank(found, keep, "energy") == choose_rank(expected, keep, "energy")
