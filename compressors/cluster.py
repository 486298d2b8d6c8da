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
        if weight.requires_grad:  # value unchanged; gradient straight through to the weight
            values = values + (weight - weight.detach())
        return torch.where(weight != 0, values, 0.0)

    def extra_repr(self) -> str:
        return f"values={self.centroids.numel()}, shape={tuple(self.codes.shape)}"


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    *,
    init: str = "linear",
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Centroids (ascending, distinct, at most ``k``) of 1-D k-means over ``values``.

    Lloyd's iterations on the sorted values: in 1-D each cluster is a run of the sorted values
    between the midpoints of successive centroids, so an iteration is a binary search of the
    ``k - 1`` midpoints and differences of prefix sums (float64) - exact, deterministic, and
    O(k log n) after one sort. They stop after ``iters`` or when no value changes cluster. A
    cluster left empty keeps its centroid. Where ``values`` has at most ``k`` distinct values,
    those are the centroids.

    Args:
        values: The values to cluster (any shape).
        k: Number of clusters.
        init: ``linear`` (evenly spaced between the smallest and largest value), ``density``
            (evenly spaced quantiles) or ``random`` (``k`` distinct values drawn with
            ``generator``).
        iters: Lloyd iterations at most.
        generator: Seeds the ``random`` initialisation.
    """
    x = values.detach().flatten().to(torch.float64).sort().values
    distinct = torch.unique_consecutive(x)
    if len(distinct) <= k:
        return distinct
    n = len(x)
    if init == "linear":
        c = torch.linspace(float(x[0]), float(x[-1]), k, dtype=torch.float64, device=x.device)
    elif init == "density":
        quantiles = ((torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) * n / k).long()
        c = torch.unique_consecutive(x[quantiles])
    elif init == "random":
        # drawn on the CPU (the generator's device): a seed draws the same on any device
        chosen = torch.randperm(len(distinct), generator=generator, device="cpu")[:k]
        c = distinct[chosen.to(x.device)].sort().values
    else:
        raise ValueError(f"unknown init {init!r}; known: {INITS}")
    prefix = torch.cat([x.new_zeros(1), x.cumsum(0)])
    ends = torch.tensor([n], device=x.device)
    cuts = None
    for _ in range(iters):
        new = torch.searchsorted(x, (c[1:] + c[:-1]) / 2, right=True)
        if cuts is not None and torch.equal(new, cuts):
            break
        cuts = new
        hi = torch.cat([cuts, ends])
        lo = torch.cat([ends.new_zeros(1), cuts])
        counts = hi - lo
        c = torch.where(counts > 0, (prefix[hi] - prefix[lo]) / counts.clamp(min=1), c)
    return c


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
    nonzero = w != 0
    k = 2**bits - (1 if not bool(nonzero.all()) else 0)
    centroids = kmeans_1d(w[nonzero], k, init=init, iters=iters, generator=generator)
    # Nearest centroid (ties to the lower one); code 0 for zeros, i + 1 for centroid i.
    codes = torch.bucketize(w.to(torch.float64), (centroids[1:] + centroids[:-1]) / 2) + 1
    codes = torch.where(nonzero, codes, 0)
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
