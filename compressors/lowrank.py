"""Low-rank factorisation: a layer becomes two thinner ones from its truncated SVD.

A Linear ``W`` (out x in) becomes ``Linear(in, r, bias=False)`` then ``Linear(r, out)`` with
weights ``sqrt(S_r) V_r^T`` and ``U_r sqrt(S_r)``. A Conv of kernel k is reshaped to
(out x in*k), factorised the same way, and becomes a Conv with r output channels and the original
kernel, stride and padding, followed by a 1x1 Conv. A Linear stored transposed (Hugging Face's
``Conv1D``, `compressors._targets.is_transposed_linear`) is factorised as the Linear it computes.
Layers where the pair would not hold fewer weights than the original are left alone. Fine-tuning
then recovers what truncation lost.

The pair answers for the layer it replaces: parents that read a layer's geometry (a
TensorFlow-style "same" padding reads a Conv's ``stride``, ``kernel_size`` and ``dilation``) get
the first factor's (which has the original kernel, stride, padding and dilation), and widths
(``in_features`` / ``out_features``, ``in_channels`` / ``out_channels``, ``nx`` / ``nf``) are the
original layer's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compressors._base import CompressionContext, Compressor
from compressors._params import Options, Real
from compressors._targets import is_transposed_linear, output_layer, weight_layers
from compressors.packing import Replacement, register_replacement

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


#: Attributes of a replaced layer the pair answers with its first factor's: its inputs and, for a
#: Conv, the geometry of its kernel (the second factor is a 1 x 1 Conv).
_FIRST_ATTRS = (
    "in_features",
    "in_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "padding_mode",
    "groups",
)
#: ... and with its second factor's: its outputs.
_SECOND_ATTRS = ("out_features", "out_channels")


@register_replacement
class LowRank(Replacement, nn.Sequential):
    """``first`` (down to ``rank`` features or channels), then ``second`` (up to the outputs).

    It also offers the ``weight`` and ``bias`` of the layer it replaces (the product of the two
    factors, laid out as the replaced layer's: ``(inputs, outputs)`` for a Linear stored
    transposed), for parents that read their children's weights instead of calling them: torch's
    ``nn.TransformerEncoderLayer`` fast path and ``nn.MultiheadAttention``'s ``out_proj``. Those
    parents then run the product as one dense layer, with the same outputs. Parents that read the
    replaced layer's geometry or widths get them too (`_FIRST_ATTRS`, `_SECOND_ATTRS`; ``nx`` and
    ``nf`` of a transposed Linear).
    """

    def __init__(self, first: nn.Module, second: nn.Module, *, transposed: bool = False) -> None:
        super().__init__(first, second)
        self.rank = first.weight.shape[0]
        self.transposed_weight = transposed
        if transposed:  # the widths of the Linear stored transposed it replaces
            self.nx, self.nf = first.in_features, second.out_features

    def __getattr__(self, name: str) -> Any:
        if name in _FIRST_ATTRS or name in _SECOND_ATTRS:
            factor = self._modules["0" if name in _FIRST_ATTRS else "1"]
            if hasattr(factor, name):
                return getattr(factor, name)
        return super().__getattr__(name)

    @property
    def weight(self) -> torch.Tensor:
        first, second = self[0].weight, self[1].weight
        product = second.flatten(1) @ first.flatten(1)  # (out, rank) @ (rank, in * k)
        if self.transposed_weight:
            return product.T
        return product.view(second.shape[0], *first.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias

    def spec(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def like(cls, original: nn.Module, spec: dict) -> LowRank:
        """The pair of rank ``spec["rank"]`` that replaces ``original``, made on its device with
        its dtype (its weights are set by the caller)."""
        rank, has_bias = spec.get("rank"), original.bias is not None
        weight = original.weight
        if not isinstance(original, nn.Linear | nn.modules.conv._ConvNd) and not (
            is_transposed_linear(original)
        ):
            raise ValueError(f"a low-rank pair replaces a Linear or a Conv, not {type(original)}")
        full = min(weight.shape[0], weight[0].numel())  # (rows, and inputs times kernel)
        if type(rank) is not int or not 1 <= rank <= full:
            raise ValueError(
                f"rank {rank!r} of a low-rank pair replacing a {tuple(weight.shape)} weight "
                f"must be an integer in 1..{full}"
            )
        where = {"device": weight.device, "dtype": weight.dtype}
        if is_transposed_linear(original):
            in_dim, out_dim = original.weight.shape
            first = nn.Linear(in_dim, rank, bias=False, **where)
            return cls(first, nn.Linear(rank, out_dim, bias=has_bias, **where), transposed=True)
        out_dim, in_dim = original.weight.shape[:2]  # the layer may have been pruned already
        if isinstance(original, nn.Linear):
            return cls(
                nn.Linear(in_dim, rank, bias=False, **where),
                nn.Linear(rank, out_dim, bias=has_bias, **where),
            )
        conv = _CONV[original.weight.dim() - 2]
        first = conv(
            in_dim,
            rank,
            original.kernel_size,
            stride=original.stride,
            padding=original.padding,
            dilation=original.dilation,
            bias=False,
            **where,
        )
        return cls(first, conv(rank, out_dim, 1, bias=has_bias, **where))


def choose_rank(singular_values: torch.Tensor, keep: float, rank_by: str) -> int:
    """The rank that keeps a fraction ``keep`` of the full rank (``ratio``) or of the squared
    singular values' sum (``energy``); at least 1."""
    if rank_by == "ratio":
        return _ratio_rank(keep, len(singular_values))
    energy = torch.cumsum(singular_values.pow(2), 0) / singular_values.pow(2).sum()
    return max(1, int(torch.searchsorted(energy, energy.new_tensor(keep - 1e-6))) + 1)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix``'s singular values, descending, as the square roots of the eigenvalues of its
    smaller Gram matrix (``A A^T``), in float64 (float32 on Apple's MPS, which has no float64):
    about 2.5x faster than `torch.linalg.svdvals` on 2048 x 2048 here, within 1e-5 of it."""
    a = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    a = a.to(torch.float32 if a.device.type == "mps" else torch.float64)
    return torch.linalg.eigvalsh(a @ a.T).flip(0).clamp_min(0).sqrt()


def _ratio_rank(keep: float, full: int) -> int:
    return max(1, math.ceil(keep * full))


#: Power iterations of the randomized SVD (Halko, Martinsson and Tropp 2011, algorithm 4.4):
#: with 4, the kept factors' reconstruction error was within 0.8% of the full SVD's on 2048 x
#: 2048 matrices (flat, decaying and low-rank-plus-noise spectra; 2.8% with 2).
NITER = 4
#: The randomized SVD is used where its sketch (rank plus `_oversample`) is at most this fraction
#: of the full rank; beyond, it took as long as the full SVD (2048 x 1024 at rank 512: 1.4 s each,
#: against 0.8 s and 1.2 s at rank 341).
RANDOMIZED_UP_TO = 0.5


def _oversample(rank: int) -> int:
    return max(10, rank // 10)


def randomized(shape: tuple[int, int], rank: int) -> bool:
    """Whether `truncated_svd` of a matrix of ``shape`` at ``rank`` is randomized."""
    return rank + _oversample(rank) <= RANDOMIZED_UP_TO * min(shape)


def truncated_svd(
    matrix: torch.Tensor, rank: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, Vh_r)``: the top ``rank`` singular triplets of ``matrix``, on its device (in
    float32 at least). Where ``rank`` is small against the matrix (`randomized`), a randomized
    SVD: a Gaussian sketch of ``rank`` + a few columns (drawn from its own generator seeded
    with ``seed``: the global random state is untouched), `NITER` power iterations, each
    re-orthonormalized, then the SVD of the small projected matrix; else the top ``rank``
    eigenvectors of the smaller Gram matrix (`_gram_svd`: in float32 where that is accurate,
    else float64; exact at full rank)."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    if not randomized(tuple(work.shape), rank):
        if work.device.type == "mps":  # (no float64 there)
            u, s, vh = torch.linalg.svd(work, full_matrices=False)
            return u[:, :rank], s[:rank], vh[:rank]
        return _gram_svd(work, rank)
    generator = torch.Generator(device=work.device).manual_seed(seed)
    sketch = rank + _oversample(rank)
    omega = torch.randn(
        work.shape[1], sketch, generator=generator, device=work.device, dtype=work.dtype
    )
    basis = torch.linalg.qr(work @ omega).Q
    for _ in range(NITER):
        basis = torch.linalg.qr(work @ torch.linalg.qr(work.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ work, full_matrices=False)
    return (basis @ u[:, :rank]), s[:rank], vh[:rank]


def _gram_svd(work: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`truncated_svd` from the eigenvectors of the smaller Gram matrix (``A A^T`` of the wide
    matrix ``A``): the top ``rank`` of them, ``U``, and ``U^T A`` (``S Vh``: the best
    reconstruction in their span). In float32 first (`_gram_factors`), kept where the spectrum
    at the cut is well above float32's rounding of the Gram matrix: its ``rank``-th eigenvalue
    at least `FLOAT32_GRAM_FLOOR` of the largest; else again in float64, the matrix read a
    block of columns at a time. A 2048 x 4096 matrix at rank 1024 (a 2-core AMD EPYC with
    AVX-512, one thread): 2.3 CPU-seconds in float64, 1.2 in float32 (the Gram matrix and
    LAPACK's ``ssyevr``); float32 alone lost up to 74x of the error on ill-conditioned tails,
    which the floor sends to float64 (`torch.linalg.svd`: 15-19 s wall at load 7)."""
    wide = work.shape[0] <= work.shape[1]
    a = work if wide else work.T
    found = None
    if a.dtype == torch.float32 and rank < a.shape[0]:  # (float64 at full rank: exact)
        found = _gram_factors(a, rank, torch.float32)
    if found is None:
        found = _gram_factors(a, rank, torch.float64)
    u, s, vh = (x.to(work.dtype) for x in found)
    return (u, s, vh) if wide else (vh.T, s, u.T)


#: The least ratio of the kept ``rank``-th to the largest eigenvalue of the Gram matrix (of
#: squared singular values: 1e-4 is a singular value 1% of the largest) at which `_gram_svd`
#: keeps its float32 factors. On 512 x 1024 and 1024 x 2048 matrices at ranks 0.5 and 0.9 of
#: full (random init, 1/sqrt(i), 1/i, i^-2 and exponential spectra, rank 20 plus noise), every
#: case at a ratio of 1.3e-4 or more reconstructed as float64 did to 6 digits; below, float32
#: lost 4e-5 (ratio 1.5e-5) up to 74x (8e-12) of the error.
FLOAT32_GRAM_FLOOR = 1e-4


def _gram_factors(
    a: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(U, S, Vh)`` of wide ``a`` at ``rank`` from its Gram matrix computed in ``dtype``
    (float64: a block of columns at a time, no float64 copy of ``a``); None where in float32
    the ``rank``-th eigenvalue is below `FLOAT32_GRAM_FLOOR` of the largest."""
    step = max(1, _GRAM_CHUNK // a.shape[0])  # (columns at a time)
    blocks = [slice(start, start + step) for start in range(0, a.shape[1], step)]
    if a.dtype == dtype:
        gram = _gram(a)
    else:
        gram = a.new_zeros((a.shape[0], a.shape[0]), dtype=dtype)
        for block in blocks:
            part = a[:, block].to(dtype)
            gram.addmm_(part, part.T)
    values, vectors = _top_eigenpairs(gram, rank)
    del gram
    checked = dtype == torch.float32 and a.device.type != "meta"  # (meta: shapes, no values)
    if checked and not values[-1] >= FLOAT32_GRAM_FLOOR * values[0]:
        return None
    if a.dtype == dtype:
        projected = vectors.T @ a
    else:
        projected = a.new_empty((rank, a.shape[1]), dtype=dtype)
        for block in blocks:
            projected[:, block] = vectors.T @ a[:, block].to(dtype)
    s = torch.linalg.vector_norm(projected, dim=1)
    vh = projected.div_(s.clamp_min(torch.finfo(dtype).tiny)[:, None])
    return vectors, s, vh


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T``; on the CPU in float32, its lower triangle only (what `_top_eigenpairs`
    reads there), by BLAS's ``ssyrk``: half the multiplications (2048 x 4096: 0.14 CPU-s
    against 0.33 s)."""
    if a.device.type != "cpu" or a.dtype != torch.float32:
        return a @ a.T
    from scipy.linalg.blas import ssyrk

    values = a.numpy()  # (a view; in Fortran order as given, so that BLAS copies nothing)
    if values.flags.f_contiguous:
        return torch.from_numpy(ssyrk(1.0, values, trans=0, lower=1))
    return torch.from_numpy(ssyrk(1.0, values.T, trans=1, lower=1))


def _top_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, vectors)``: symmetric ``gram``'s ``rank`` largest eigenvalues and their
    eigenvectors, largest first (``gram`` is overwritten; its lower triangle is read). On the
    CPU, LAPACK's ``syevr``
    computes only those, with a workspace of O(n) (``syevd``, torch's, of 2 n^2: 64 MiB for
    2048 x 2048)."""
    n = gram.shape[0]
    if gram.device.type != "cpu":
        values, vectors = torch.linalg.eigh(gram)
        return values[-rank:].flip(0), vectors[:, -rank:].flip(1)
    import scipy.linalg  # (here: most runs never factorise a large layer; startup stays short)

    values, vectors = scipy.linalg.eigh(
        gram.numpy(),
        subset_by_index=[n - rank, n - 1],
        driver="evr",
        overwrite_a=True,
        check_finite=False,
    )
    return torch.from_numpy(values).flip(0), torch.from_numpy(vectors).flip(1)


#: Values of the matrix `_gram_factors` reads in float64 at a time (8 MiB).
_GRAM_CHUNK = 1 << 20


def factorize(layer: nn.Module, rank: int, *, seed: int = 0) -> LowRank:
    """The rank-``rank`` truncated SVD of ``layer`` as a `LowRank` pair (exact at full rank),
    on the layer's device (`truncated_svd`: randomized, seeded with ``seed``, where the rank is
    small)."""
    u, s, vh = truncated_svd(_matrix(layer), rank, seed=seed)
    root = s.sqrt()
    pair = LowRank.like(layer, {"rank": rank})
    with torch.no_grad():
        pair[0].weight.copy_((root[:, None] * vh).view_as(pair[0].weight))
        pair[1].weight.copy_((u * root).view_as(pair[1].weight))
        if layer.bias is not None:
            pair[1].bias.copy_(layer.bias)
    return pair


class LowRankFactorization(Compressor):
    """Replace every Linear / Conv (groups=1) but the output layer by a truncated-SVD pair, where
    that saves weights.

    Params:
        keep: Fraction kept, in (0, 1]: of the full rank (``rank_by='ratio'``) or of the spectral
            energy, the sum of squared singular values (``rank_by='energy'``).
        rank_by: ``ratio`` or ``energy``.
    """

    name = "lowrank"
    stage = 1
    shrinks = True
    acts_on = (
        "factorises Linear (transposed ones too) and Conv layers (groups=1) other than the output "
        "layer, where a pair can hold fewer weights; recurrent, attention-projection and "
        "embedding tensors are not factorised"
    )
    params = {
        "keep": Real(0.0, 1.0, closed="right", default=0.5),
        "rank_by": Options(("ratio", "energy"), default="ratio"),
    }

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        return [f"{name}.weight" for name in _factorizable(model)]

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Each layer's rank from ``keep`` (by ``ratio``: from its shape, no SVD; by
        ``energy``: from its singular values, `singular_values`), then its truncated SVD only
        where the pair saves weights (`factorize`; randomized where the rank is small)."""
        layers = _factorizable(model)
        for name in list(layers):
            layer = layers.pop(name)  # (once replaced, only this name holds it: freed next turn)
            matrix = _matrix(layer)
            out_dim, in_dim = matrix.shape
            if self.rank_by == "ratio":
                rank = _ratio_rank(self.keep, min(out_dim, in_dim))
            else:
                rank = choose_rank(singular_values(matrix), self.keep, self.rank_by)
            if rank * (in_dim + out_dim) < in_dim * out_dim:
                model.set_submodule(name, factorize(layer, rank, seed=ctx.seed))
        return model


def _factorizable(model: nn.Module) -> dict[str, nn.Module]:
    """Layers a pair of rank 1 would make smaller: every Linear and Conv (groups=1) but the
    output layer, which keeps full rank (a thin classifier confuses classes)."""
    last = output_layer(model)
    return {
        name: layer
        for name, layer in weight_layers(model).items()
        if name != last
        and getattr(layer, "groups", 1) == 1
        and _matrix(layer).shape[0] * _matrix(layer).shape[1] > sum(_matrix(layer).shape)
    }


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as the (outputs x inputs * kernel) matrix it applies."""
    weight = layer.weight.detach()
    return weight.T if is_transposed_linear(layer) else weight.flatten(1)
