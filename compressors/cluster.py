"""Weight sharing: the weights of each tensor share a few values found by k-means (the "trained
quantization" of Deep Compression, Han et al., 2016).

Each weight tensor's values are clustered by 1-D k-means into at most ``2^bits`` shared values;
each weight keeps only the index (code) of its cluster. Fine-tuning then trains the shared values
(the centroids), not the weights: a centroid's gradient is the sum of the gradients of the
weights that share it, and the codes never change. The packed file stores the codes in ``bits``
bits each (fewer once entropy-coded) plus a small codebook per tensor (`compressors.packing`).

Zeros (weights that an earlier ``prune`` removed, or that are exactly zero) are kept apart: they
are never clustered but get a fixed value 0 that is not trained, and which counts as one of the
``2^bits`` values. So a pruned tensor keeps exactly its zeros (and the file its sparse layout),
and its nonzero weights share ``2^bits - 1`` trained values (a tensor without zeros: ``2^bits``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compressors._base import CompressionContext, Compressor
from compressors._params import Integer, Options
from compressors._targets import targets
from compressors.packing import Codes
from compressors.quant import half_biases

#: Where k-means starts (Han et al. 2016 compared the three and found ``linear`` best).
INITS = ("linear", "density", "random")


class SharedWeights(nn.Module):
    """Parametrization that gives each weight the shared value of its cluster.

    Its value is ``codebook[codes]``, where ``codebook = [0, *centroids]``: code 0 is the fixed,
    untrained zero (pruned weights), code ``i >= 1`` is the trained ``centroids[i - 1]``. The
    weight it is given is not read, except that a weight that has become zero (a mask that
    changed after clustering, e.g. gradual pruning) gives zero. That weight is frozen
    (`WeightClustering.compress`); where something makes it require gradients again (the
    ``taylor`` importance of a later pruner), it gets the gradient of its shared value.

    Attributes:
        centroids: The shared values (an ``nn.Parameter``, trained by fine-tuning unless the
            tensor itself is frozen, such as a pretrained embedding table).
        codes: Index of each weight's value in the codebook (a buffer, int32, the tensor's shape).
    """

    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor, *, trainable: bool) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids, requires_grad=trainable)
        self.register_buffer("codes", codes.to(torch.int32))

    def codebook(self) -> torch.Tensor:
        """The values codes index: 0, then the centroids."""
        return torch.cat([self.centroids.new_zeros(1), self.centroids])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        trained = self.centroids.requires_grad or weight.requires_grad
        if trained or not isinstance(weight, nn.Parameter):
            return self._shared(weight)
        # Frozen centroids and a frozen parameter (a pretrained embedding table) give the same
        # values until either changes in place: look them up once, not in every forward pass.
        key = (
            id(weight),
            weight.data_ptr(),
            weight._version,
            self.centroids.data_ptr(),
            self.centroids._version,
        )
        if getattr(self, "_frozen_key", None) != key:
            self._frozen_key, self._frozen = key, self._shared(weight)
        return self._frozen

    def packed(self, value: torch.Tensor) -> Codes:
        """The codes of ``value`` (a value of this parametrization) and the codebook, for the
        packed file."""
        codes = torch.where(value != 0, self.codes, 0).to(torch.int64)
        return Codes(codes, "codebook", {"codebook": self.codebook().detach()})

    def _shared(self, weight: torch.Tensor) -> torch.Tensor:
        values = self.codebook().index_select(0, self.codes.flatten()).view(self.codes.shape)
        if weight.requires_grad and torch.is_grad_enabled():  # gradient straight to the weight
            values = values + (weight - weight.detach())  # (value unchanged)
        return values.masked_fill_(weight == 0, 0.0)

    def extra_repr(self) -> str:
        return f"values={self.centroids.numel()}, shape={tuple(self.codes.shape)}"


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    *,
    init: str = "linear",
    iters: int = 30,
    generator: torch.Generator | None = None,
    skip_zeros: bool = False,
) -> torch.Tensor:
    """Centroids (ascending, distinct, at most ``k``, float64) of 1-D k-means over ``values``.

    Lloyd's iterations on the sorted values: in 1-D each cluster is a run of the sorted values
    between the midpoints of successive centroids, so an iteration is a binary search of the
    ``k - 1`` midpoints and differences of prefix sums (float64). They stop after ``iters`` or
    when no value changes cluster. A cluster left empty keeps its centroid. Where ``values``
    has at most ``k`` distinct values, those are the centroids.

    Up to `EXACT_UP_TO` values, the points are the values themselves, sorted (exact). Beyond,
    they are the means of the values in each of `HISTOGRAM_BINS` equal bins between the
    smallest and largest value, weighted by their counts (`_histogram`: two passes in chunks,
    no sort and no copy of ``values``): the same iterations, exact but for the values of the
    bin a midpoint falls in, which all go to one side (a bin is 1/65536 of the range).

    Args:
        values: The values to cluster (any shape).
        k: Number of clusters.
        init: ``linear`` (evenly spaced between the smallest and largest value), ``density``
            (evenly spaced quantiles) or ``random`` (``k`` distinct values - beyond
            `EXACT_UP_TO` values, bin means - drawn with ``generator``).
        iters: Lloyd iterations at most.
        generator: Seeds the ``random`` initialisation.
        skip_zeros: Cluster only the nonzero values.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {INITS}")
    flat = values.detach().reshape(-1)
    if flat.numel() > EXACT_UP_TO and flat.is_floating_point():
        points = _histogram(flat, HISTOGRAM_BINS, skip_zeros=skip_zeros)
        if points is not None and len(points[0]) > k:
            return _kmeans_weighted(*points, k, init=init, iters=iters, generator=generator)
    if skip_zeros:
        flat = flat[flat != 0]
    return _kmeans_sorted(flat, k, init=init, iters=iters, generator=generator)


#: `kmeans_1d` clusters the values themselves up to this many, and a histogram of them beyond.
EXACT_UP_TO = 1 << 16
#: Bins of `kmeans_1d`'s histogram.
HISTOGRAM_BINS = 1 << 16
#: Values read at a time by `_histogram` and `assign` (1 MiB of float32: larger temporaries
#: cost their pages' faults each time, up to 1.7 ns a value).
_CHUNK = 1 << 18


def _kmeans_sorted(
    values: torch.Tensor, k: int, *, init: str, iters: int, generator: torch.Generator | None
) -> torch.Tensor:
    x = values.to(torch.float64).sort().values
    distinct = torch.unique_consecutive(x)
    if len(distinct) <= k:
        return distinct
    n = len(x)
    if init == "linear":
        c = torch.linspace(float(x[0]), float(x[-1]), k, dtype=torch.float64, device=x.device)
    elif init == "density":
        quantiles = ((torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) * n / k).long()
        c = torch.unique_consecutive(x[quantiles])
    else:
        c = _random_init(distinct, k, generator)
    prefix = torch.cat([x.new_zeros(1), x.cumsum(0)])
    return _lloyd(x, None, prefix, c, iters)


def _kmeans_weighted(
    points: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    k: int,
    *,
    init: str,
    iters: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`_kmeans_sorted` on ascending, distinct ``points``, each standing for ``counts`` values
    whose sum is ``sums`` (float64)."""
    cumulative = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    if init == "linear":
        c = torch.linspace(float(points[0]), float(points[-1]), k, dtype=torch.float64)
        c = c.to(points.device)
    elif init == "density":
        n = float(cumulative[-1])
        quantiles = (torch.arange(k, dtype=torch.float64, device=points.device) + 0.5) * n / k
        c = torch.unique_consecutive(
            points[torch.searchsorted(cumulative[1:], quantiles.floor(), right=True)]
        )
    else:
        c = _random_init(points, k, generator)
    return _lloyd(points, cumulative, torch.cat([sums.new_zeros(1), sums.cumsum(0)]), c, iters)


def _random_init(distinct: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the CPU (the generator's device): a seed draws the same on any device
    chosen = torch.randperm(len(distinct), generator=generator, device="cpu")[:k]
    return distinct[chosen.to(distinct.device)].sort().values


def _lloyd(
    points: torch.Tensor,
    cumulative: torch.Tensor | None,
    prefix: torch.Tensor,
    c: torch.Tensor,
    iters: int,
) -> torch.Tensor:
    """Lloyd's iterations from centroids ``c`` over ascending ``points``, with the cumulative
    counts (``None``: one value per point) and sums of the points before each."""
    ends = torch.tensor([len(points)], device=points.device)
    cuts = None
    for _ in range(iters):
        new = torch.searchsorted(points, (c[1:] + c[:-1]) / 2, right=True)
        if cuts is not None and torch.equal(new, cuts):
            break
        cuts = new
        hi = torch.cat([cuts, ends])
        lo = torch.cat([ends.new_zeros(1), cuts])
        counts = hi - lo if cumulative is None else cumulative[hi] - cumulative[lo]
        c = torch.where(counts > 0, (prefix[hi] - prefix[lo]) / counts.clamp(min=1), c)
    return c


def _histogram(
    flat: torch.Tensor, bins: int, *, skip_zeros: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(means, counts, sums)`` of the nonempty bins among ``bins`` equal ones between the
    smallest and largest of ``flat``'s values (nonzero ones with ``skip_zeros``), ascending;
    ``None`` where those values are fewer than two distinct ones."""
    lo, hi = math.inf, -math.inf
    for start in range(0, len(flat), _CHUNK):
        part = flat[start : start + _CHUNK]
        low, high = (float(v) for v in torch.aminmax(part))
        if skip_zeros and 0.0 in (low, high):  # (rare: all of the chunk's values on one side)
            part = part[part != 0]
            if not part.numel():
                continue
            low, high = (float(v) for v in torch.aminmax(part))
        lo, hi = min(lo, low), max(hi, high)
    if not lo < hi or not math.isfinite(hi - lo):
        return None
    scale = bins / (hi - lo)
    counts = torch.zeros(bins + 1, dtype=torch.float64, device=flat.device)
    sums = torch.zeros(bins + 1, dtype=torch.float64, device=flat.device)
    part_sums = torch.zeros(bins + 1, dtype=flat.dtype, device=flat.device)
    for start in range(0, len(flat), _CHUNK):
        part = flat[start : start + _CHUNK]
        index = (part - lo).mul_(scale).floor_().clamp_(0, bins - 1).int()
        if skip_zeros:
            index.masked_fill_(part == 0, bins)  # (zeros in a bin of their own, left out)
        counts += torch.bincount(index, minlength=bins + 1)
        sums += part_sums.zero_().index_add_(0, index, part)  # (a chunk's sums: float32 is
        # enough; the float64 total carries the rest)
    full = counts[:bins] > 0
    counts, sums = counts[:bins][full], sums[:bins][full]
    means, order = (sums / counts).sort()  # (in bin order but for rounding)
    return means, counts[order], sums[order]


def assign(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes (int32, ``weight``'s shape) of ``weight``'s values against ascending
    ``centroids``: 0 for a zero, ``i + 1`` for the nearest centroid ``i`` (ties to the lower),
    i.e. ``torch.bucketize(weight, midpoints) + 1`` exactly, in chunks.

    For float32 weights, a value's bin among uniform bins over the midpoints gives the number
    of midpoints below its bin, and a comparison with the few midpoints inside its bin (each
    the largest float32 not above the float64 midpoint, which a float32 value exceeds exactly
    when it exceeds the midpoint) the rest: a few vector operations per value, against a
    binary search each (186 ns per value over 255 midpoints here).
    """
    flat = weight.detach().reshape(-1)
    codes = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    mids = (centroids[1:] + centroids[:-1]) / 2
    if flat.dtype != torch.float32 or len(mids) == 0:
        mids = mids.to(torch.float64)
        for start in range(0, len(flat), _CHUNK):
            part = flat[start : start + _CHUNK]
            code = torch.bucketize(part.to(torch.float64), mids) + 1
            codes[start : start + _CHUNK] = torch.where(part != 0, code, 0)
        return codes.view(weight.shape)
    below = mids.to(torch.float32)
    below = torch.where(
        below.double() > mids, torch.nextafter(below, below.new_tensor(-math.inf)), below
    )
    bins = 8 * len(below)
    lo, hi = float(below[0]), float(below[-1])
    scale = bins / (hi - lo) if hi > lo else 0.0

    def bin_of(x: torch.Tensor) -> torch.Tensor:  # (monotone in x: the same operations for all)
        return (x - lo).mul_(scale).floor_().clamp_(0, bins - 1).int()

    where_mid = bin_of(below)
    first = torch.searchsorted(where_mid, torch.arange(bins, device=flat.device, dtype=torch.int32))
    first = first.int()  # (midpoints in the bins before)
    most = int(torch.bincount(where_mid).max())
    above = torch.cat([below, below.new_full((1,), math.inf)])
    for start in range(0, len(flat), _CHUNK):
        part = flat[start : start + _CHUNK]
        code = first.index_select(0, bin_of(part))
        for _ in range(most):
            code += above.index_select(0, code) < part
        codes[start : start + _CHUNK] = code.add_(1).mul_(part != 0)
    return codes.view(weight.shape)


def share_weights(
    weight: torch.Tensor,
    bits: int,
    *,
    init: str = "linear",
    iters: int = 30,
    generator: torch.Generator | None = None,
    trainable: bool = True,
) -> SharedWeights:
    """The parametrization that shares the values of ``weight`` (see `SharedWeights`): its zeros
    stay zero, its nonzero values are clustered into ``2^bits`` values, or ``2^bits - 1`` where
    zero is one of the tensor's values."""
    w = weight.detach()
    flat = w.reshape(-1)
    zeros = any(bool((flat[i : i + _CHUNK] == 0).any()) for i in range(0, len(flat), _CHUNK))
    k = 2**bits - (1 if zeros else 0)
    centroids = kmeans_1d(w, k, init=init, iters=iters, generator=generator, skip_zeros=True)
    codes = assign(w, centroids)  # nearest centroid; code 0 for zeros, i + 1 for centroid i
    centroids = centroids.to(w.dtype)
    tiny = torch.finfo(w.dtype).tiny
    centroids = torch.where(centroids == 0, tiny, centroids)  # a mean rounded to 0: not pruned
    return SharedWeights(centroids, codes, trainable=trainable)


class WeightClustering(Compressor):
    """Weight sharing by k-means (Deep Compression's trained quantization) on every weight tensor
    (`compressors._targets`: Linear and Conv weights, attention projections, recurrent weights,
    embedding tables), one codebook per tensor (a tied tensor: one for all its sites).

    Params:
        bits: At most ``2^bits`` distinct values per tensor, stored as ``bits``-bit codes plus a
            codebook; zero, where the tensor has zeros (pruned weights), is one of them and stays
            exactly zero.
        init: Where k-means starts: ``linear`` (evenly spaced over the weights' range, which keeps
            centroids for the few large weights; best in Han et al. 2016), ``density`` (evenly
            spaced quantiles) or ``random`` (distinct weights drawn with the trial's seed).
        iters: Lloyd iterations at most (fewer when the clusters stop changing).
        bias: ``fp16`` keeps the biases of clustered layers on float16 values (stored in 2
            bytes), ``fp32`` leaves them.
        embeddings: ``same`` clusters embedding tables like the other weights; ``float`` leaves
            them as they are.
    """

    name = "cluster"
    kind = "quantizer"
    stage = 2
    shrinks = True
    acts_on = (
        "shares a few k-means values among the weights of each Linear, Conv, attention, "
        "recurrent and embedding tensor"
    )
    params = {
        "bits": Integer(1, 8, default=4),
        "init": Options(INITS, default="linear"),
        "iters": Integer(1, 1000, default=30),
        "bias": Options(("fp16", "fp32"), default="fp16"),
        "embeddings": Options(("same", "float"), default="same"),
    }

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        skip = ("embedding",) if self.embeddings == "float" else ()
        return [n for n, t in targets(model).items() if t.kind not in skip]

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        generator = torch.Generator().manual_seed(ctx.seed)
        found = targets(model)
        owners: dict[int, nn.Module] = {}
        for name in self.claims(model):
            target = found[name]
            target.register(  # once, shared by every site of a tied tensor
                share_weights(
                    target.weight,
                    self.bits,
                    init=self.init,
                    iters=self.iters,
                    generator=generator,
                    trainable=target.latent.requires_grad,
                )
            )
            target.latent.requires_grad_(False)  # the centroids are trained, not the weights
            owners.update({id(site.module): site.module for site in target.sites})
        if self.bias == "fp16":
            half_biases(owners.values())
        return model
