"""The paths large tensors take (issue 22, real sizes) against the exact ones: the clipping
search of `make_grid` in row chunks, k-means on a histogram with codes from uniform bins, and
the truncated SVD from the Gram matrix."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from compressors import cluster, quant
from compressors.cluster import assign, kmeans_1d, share_weights
from compressors.lowrank import randomized, truncated_svd


def _whole_tensor_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The clipping search on the whole tensor at once (make_grid before the chunks)."""
    w = weight.flatten(1)
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best = torch.ones_like(amax)
    for ratio in quant.CLIP_RATIOS:
        scale = quant._fp16(amax * ratio / qmax)
        err = torch.div(w, scale[:, None]).round().clamp(-qmax, qmax) * scale[:, None]
        err = (err - w).pow(2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


@pytest.mark.parametrize("chunk", [1, 50, 1 << 20])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_chunked_clipping_search_gives_the_whole_tensors_scales(monkeypatch, chunk, bits):
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(37, 8, 3, 3, generator=g) * torch.rand(37, 1, 1, 1, generator=g)
    weight[weight.abs() < 0.2] = 0
    weight[5] = 0  # (a channel of zeros: scale 1)
    monkeypatch.setattr(quant, "_GRID_CHUNK", chunk)  # (1: a row per chunk, 72 values each)
    grid = quant.make_grid(weight, bits)
    assert torch.equal(grid.scale.flatten(), _whole_tensor_grid(weight, bits))
    assert grid.scale.shape == (37, 1, 1, 1)


def _values(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) * 0.05
    values[: n // 50] *= 8  # (a heavy tail, as trained weights have)
    return values[torch.randperm(n, generator=g)]


def _sse(values: torch.Tensor, centroids: torch.Tensor) -> float:
    x = values.double()
    codes = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
    return float((centroids[codes] - x).pow(2).sum())


@pytest.mark.parametrize("init", ["linear", "density"])
@pytest.mark.parametrize("k", [3, 16, 255])
def test_k_means_on_the_histogram_matches_the_exact_one(init, k):
    values = _values(300_000)
    assert values.numel() > cluster.EXACT_UP_TO  # (the path under test)
    found = kmeans_1d(values, k, init=init)
    exact = cluster._kmeans_sorted(values, k, init=init, iters=30, generator=None)
    assert found.shape == exact.shape and found.dtype == torch.float64
    assert bool((found[1:] > found[:-1]).all())
    spread = float(values.max() - values.min())  # (255 from quantiles: 4e-4 of it apart)
    assert torch.allclose(found, exact, rtol=0, atol=1e-3 * spread)
    assert _sse(values, found) <= 1.002 * _sse(values, exact)  # (measured: at most 1.0015)


def test_the_histograms_k_means_leaves_zeros_out_and_is_deterministic():
    values = _values(200_000, seed=1)
    values[values.abs() < 0.02] = 0
    runs = [
        kmeans_1d(values, 15, init="random", generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    kept = kmeans_1d(values, 15, skip_zeros=True)
    exact = cluster._kmeans_sorted(values[values != 0], 15, init="linear", iters=30, generator=None)
    assert torch.allclose(kept, exact, rtol=0, atol=2e-4 * float(values.max() - values.min()))
    assert _sse(values[values != 0], kept) <= 1.002 * _sse(values[values != 0], exact)


def test_a_large_tensor_of_few_distinct_values_gets_them_exactly():
    levels = torch.tensor([-0.5, -0.125, 0.25, 1.0])
    values = levels[torch.randint(0, 4, (100_000,), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(kmeans_1d(values, 8), levels.double())


def test_codes_are_bucketizes_exactly_even_at_midpoints_and_crowded_bins():
    g = torch.Generator().manual_seed(0)
    centroids = torch.cat(
        [
            torch.tensor([-3.0, -1e-7, 1e-7, 2e-7, 0.5]),
            torch.linspace(0.5001, 0.5002, 20),  # (many midpoints in one bin)
            torch.rand(30, generator=g) * 4 - 2,
        ]
    ).double()
    centroids = torch.unique(centroids)
    mids = (centroids[1:] + centroids[:-1]) / 2
    weight = torch.cat(
        [
            torch.randn(50_000, generator=g),
            mids.float(),  # (the float32 values nearest the midpoints, on either side)
            torch.nextafter(mids.float(), torch.tensor(-10.0)),
            torch.nextafter(mids.float(), torch.tensor(10.0)),
            torch.linspace(0.50005, 0.50015, 5_000),
            torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e30, -1e30]),
        ]
    ).view(-1, 8)
    codes = assign(weight, centroids)
    expected = torch.where(weight != 0, torch.bucketize(weight.double(), mids) + 1, 0)
    assert codes.dtype == torch.int32 and codes.shape == weight.shape
    assert torch.equal(codes.long(), expected)


def test_shared_weights_of_a_large_pruned_tensor_keep_its_zeros_and_nearest_values():
    weight = _values(120_000, seed=2).view(300, 400)
    weight[weight.abs() < 0.03] = 0
    shared = share_weights(weight, 3)
    assert shared.centroids.numel() == 7  # (zero is the eighth value)
    values = shared.codebook()[shared.codes.long()]
    assert torch.equal(values == 0, weight == 0)
    codebook = shared.codebook()[1:].double()
    nearest = (weight.double()[..., None] - codebook).abs().min(dim=-1).values
    assert torch.allclose(
        (values.double() - weight.double()).abs()[weight != 0], nearest[weight != 0]
    )


@pytest.mark.parametrize(("noise", "keep"), [(0.1, 0.5), (1e-3, 0.9), (1e-5, 0.9)])
def test_the_gram_path_reconstructs_as_well_as_the_full_svd(noise, keep):
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(300, 20, generator=g) @ torch.randn(20, 500, generator=g) / 20**0.5
    matrix = matrix + noise * torch.randn(300, 500, generator=g)
    rank = int(keep * 300)
    assert not randomized(tuple(matrix.shape), rank)  # (the path under test)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    best = torch.linalg.matrix_norm(matrix.double() - (u[:, :rank] * s[:rank]) @ vh[:rank])
    for m in (matrix, matrix.T):  # (wide and tall)
        ur, sr, vhr = truncated_svd(m, rank)
        assert ur.shape == (m.shape[0], rank) and vhr.shape == (rank, m.shape[1])
        assert ur.dtype == sr.dtype == vhr.dtype == torch.float32
        error = torch.linalg.matrix_norm(m.double() - ((ur * sr) @ vhr).double())
        assert error <= 1.05 * best + 1e-5 * float(s[0])


class _LargestAllocation(TorchDispatchMode):
    """Bytes of the largest tensor storage an operation creates while active (views of, and
    in-place writes into, existing tensors create none)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def test_large_tensors_are_read_in_chunks_with_no_temporary_of_their_size(monkeypatch):
    monkeypatch.setattr(quant, "_GRID_CHUNK", 1 << 14)
    monkeypatch.setattr(cluster, "_CHUNK", 1 << 14)
    weight = _values(1 << 20, seed=4).view(1024, 1024)
    weight[weight.abs() < 0.01] = 0
    tensor_bytes = weight.numel() * weight.element_size()  # 4 MiB
    with _LargestAllocation() as grid:
        quant.make_grid(weight, 4)
    assert grid.bytes <= (1 << 14) * 4  # (one chunk's buffer)
    with _LargestAllocation() as kmeans:
        kmeans_1d(weight, 15, skip_zeros=True)
    assert kmeans.bytes <= (cluster.HISTOGRAM_BINS + 1) * 8  # (the histogram's sums)
    with _LargestAllocation() as shared:
        share_weights(weight, 4)
    assert shared.bytes <= tensor_bytes  # (the codes, int32, are the tensor's size: no more)
