"""Budget-driven allocation: each tensor's sparsity and bit width, chosen to fit a target size.

One search dimension (the target ``ratio``) replaces one per layer. For every compressible
tensor (`compressors._targets`) and every candidate setting (a sparsity from `SPARSITIES`, then a
bit width, or float32), the allocator knows

- its **cost**: the exact bytes the packed file spends on the tensor at that setting (the file's
  own encoder, `compressors.packing.tensor_bytes`), and
- its **sensitivity**: how much the task's loss rises on training data when that tensor alone is
  compressed so (``loss``: measured; ``fisher``: the second-order estimate
  ``1/2 sum F_i dw_i^2`` from the empirical Fisher diagonal, one backward pass over the data).

It then solves the multiple-choice knapsack exactly (one setting per tensor, least total
sensitivity, total bytes within the budget) with HiGHS (`scipy.optimize.milp`), applies the
chosen masks (`compressors.prune.Mask`) and grids (`compressors.quant.make_grid`), and the trial
fine-tunes as usual. The table is measured once per baseline and kept in the context's
``cache_dir`` (the trials and workers of a study share it). After fine-tuning, `finalize` checks
the packed size and, in the rare case the file would pass the target, prunes the least sensitive
weights until it does not. A target out of reach (below the smallest allocation: every tensor at
its most sparse and fewest bits, plus what is not compressed, such as biases, norms and the
header) ships that smallest allocation, with a warning: in a search, structured pruning and the
ratio are sampled independently, and such a trial is still the front's smallest point. Its
file is then what the smallest allocation packs to after fine-tuning (which changes the tensors
allocate does not compress, such as batch-norm statistics, and how well they pack), not held to
the size measured before.

The table also records the loss of the uncompressed model and of predictions that ignore the
input (uniform over the classes for a classifier; the mean output otherwise). When the predicted
loss of the chosen allocation (the model's plus each tensor's measured increase) reaches the
latter, allocate warns: the shipped model may be at chance unless fine-tuning recovers it.

As in HAWQ-V3 (mixed precision as an integer program) and NVIDIA Model Optimizer's AutoQuantize
(per-layer formats from sensitivity scores under an effective-bits budget), but with pruning and
quantization together and the budget in real bytes of the shipped file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressors._base import CompressionContext, Compressor, UnsupportedModelError
from compressors._params import Integer, InvalidParameterError, Options, Real
from compressors._quiet import native_stdout_silenced
from compressors._targets import Target, targets
from compressors.packing import packed_size, tensor_bytes
from compressors.prune import Mask, smallest_mask
from compressors.quant import half_biases, make_grid

logger = logging.getLogger(__name__)

#: Sparsities a tensor may get (each combined with every bit width and with float32).
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
#: Training samples the sensitivities are measured on.
SAMPLES = 1024
#: The allocator aims this far under the target (the header records changed layer shapes and
#: per-tensor layouts whose lengths vary by a few bytes).
SLACK = 0.01
_CACHE_VERSION = 3
#: An empirical Fisher diagonal whose largest entry is below this is flat: a model at its loss's
#: minimum (trained classifiers measured 3e-3 to 0.8; minilm, its own target, ~0).
FLAT_FISHER = 1e-9
#: Solves at most, each followed by packing the allocated model, to fit the file to the target.
CALIBRATIONS = 5
#: A file this close under the target (a fraction of it) ends the calibration.
CLOSE_ENOUGH = 0.02


@dataclass(frozen=True)
class Setting:
    """One candidate of a tensor: a sparsity, and a bit width (None: float32 values)."""

    sparsity: float
    bits: int | None

    def __str__(self) -> str:
        return f"{self.sparsity:g}/{'fp32' if self.bits is None else f'{self.bits}b'}"


class BudgetAllocation(Compressor):
    """Choose each tensor's sparsity and bit width to fit a size budget with the least loss.

    Params:
        ratio: Target compression ratio: the shipped file is at most the packed size of the
            model the allocator receives over ``ratio`` (the baseline's, when it comes first;
            after structured pruning the two ratios multiply, so each is its own dimension).
        min_bits: Fewest bits per weight a tensor may get (1 is binary, sign x scale).
        max_bits: Most bits per weight; float32 is also a candidate, for tensors worth it.
        max_sparsity: Largest fraction of a tensor's weights that may be pruned.
        sensitivity: ``loss`` (measured: one forward pass per tensor and setting; it ranked
            fine-tuned results best in ``bench/allocation.py``) or ``fisher`` (the empirical
            Fisher estimate of the loss increase, one backward pass: for large models).
        bias: ``fp16`` keeps the biases of compressed layers on float16 values, ``fp32`` not.
    """

    name = "allocate"
    kind = "allocator"  # its own: it prunes and quantizes, and is not offered where a quantizer is
    stage = 2
    shrinks = True
    acts_on = (
        "chooses a sparsity and a bit width for each Linear, Conv, attention, recurrent and "
        "embedding tensor"
    )
    requires = frozenset({"train"})
    params = {
        "ratio": Real(1.0, math.inf, closed="neither", default=8.0),
        "min_bits": Integer(1, 8, default=2),
        "max_bits": Integer(1, 8, default=8),
        "max_sparsity": Real(0.0, 1.0, closed="left", default=0.95),
        "sensitivity": Options(("loss", "fisher"), default="loss"),
        "bias": Options(("fp16", "fp32"), default="fp16"),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.min_bits > self.max_bits:
            raise InvalidParameterError(
                f"The 'allocate.min_bits' parameter ({self.min_bits}) must not be above "
                f"'allocate.max_bits' ({self.max_bits})."
            )

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        found = targets(model)
        gridded = [
            n for n, t in found.items() if any(hasattr(p, "packed") for p in t.parametrizations())
        ]
        if gridded:
            raise UnsupportedModelError(
                f"allocate chooses each tensor's bit width itself, but {gridded[0]} is already "
                f"quantized: use allocate without another quantizer (quant, cluster)."
            )
        settings = self.settings()
        table = self.table(model, ctx)
        budget = self._budget(model, ctx)
        # The payload is the tensors' bytes plus a fixed part (biases, norms, the header); the
        # file is the payload after LZMA when that is smaller, which the sum cannot tell: the
        # payload's budget is corrected until the file itself fills (but never passes) its own.
        fixed = _overhead(model, found, half=self.bias == "fp16")
        payload_budget = budget - fixed
        best: tuple[int, list[int]] | None = None
        smallest: tuple[int, list[int]] | None = None
        for _ in range(CALIBRATIONS):
            try:
                choice = solve(table["bytes"], table["sensitivity"], payload_budget)
            except UnsupportedModelError:  # by the sum; LZMA may still bring the file under
                choice = [int(i) for i in table["bytes"].argmin(axis=1)]
            size = packed_size(model, replace=self._replacement(model, settings, choice))
            if smallest is None or size < smallest[0]:
                smallest = (size, choice)
            if size <= budget and (best is None or size > best[0]):
                best = (size, choice)
            if size <= budget and budget - size <= CLOSE_ENOUGH * budget:
                break
            payload_budget += (budget - size) if size <= budget else (budget - size) - 1
        self._target_bytes: int | None = budget
        if best is None:
            # Out of reach (a search samples structured pruning and the ratio independently):
            # ship the smallest allocation, so the trial is still a point of the front.
            best = smallest
            logger.warning(
                "allocate cannot fit %d bytes (ratio %g): the smallest allocation found packs "
                "to %d bytes before fine-tuning (the tensors it does not compress, such as "
                "biases and norms, and the file's header take about %d bytes before the file's "
                "LZMA pass), and is used instead; lower allocate.ratio, or allow fewer bits "
                "(allocate.min_bits) or more sparsity (allocate.max_sparsity) to go further.",
                budget,
                self.ratio,
                best[0],
                fixed,
            )
            self._target_bytes = None  # the smallest allocation ships whatever it packs to
        self.allocation = {name: settings[c] for name, c in zip(found, best[1], strict=True)}
        self._warn_if_near_chance(table, best[1], ctx)
        return self._apply(model, settings, best[1])

    def _warn_if_near_chance(
        self, table: dict[str, np.ndarray], choice: list[int], ctx: CompressionContext
    ) -> None:
        """Warn if the predicted loss of ``choice`` reaches the loss of predictions that ignore
        the input (`reference_losses`), where the model itself is below it."""
        base, chance = (float(v) for v in table["reference"])
        rows = np.arange(len(choice))
        predicted = base + float(table["sensitivity"][rows, choice].sum())
        self.predicted_loss = predicted
        if chance > base and predicted >= chance:
            what = "uniform predictions" if ctx.outputs == "logits" else "the mean output"
            logger.warning(
                "allocate (ratio %g): the predicted loss of its allocation is %.4g (the "
                "model's %.4g plus each tensor's measured increase), at or above the loss of "
                "%s for every input (%.4g): the shipped model may be at chance unless "
                "fine-tuning recovers it. Lower allocate.ratio, or raise allocate.min_bits or "
                "lower allocate.max_sparsity, for a model that keeps what it learned.",
                self.ratio,
                predicted,
                base,
                what,
                chance,
            )

    def _replacement(
        self, model: nn.Module, settings: list[Setting], choice: list[int]
    ) -> dict[str, tuple[torch.Tensor, nn.Module | None]]:
        """The values (and grids) ``choice`` gives the model's tensors, biases included: what
        `compressors.packing.packed_size` needs to size the allocated model without building
        it."""
        found = targets(model)
        replace = {
            name: next(_variants(target.weight, [settings[c]]))
            for (name, target), c in zip(found.items(), choice, strict=True)
        }
        if self.bias == "fp16":
            replace.update(_half_biases(model, found))
        return replace

    def _apply(self, model: nn.Module, settings: list[Setting], choice: list[int]) -> nn.Module:
        found = targets(model)
        apply_settings(model, found, {n: settings[c] for n, c in zip(found, choice, strict=True)})
        if self.bias == "fp16":
            half_biases({id(s.module): s.module for t in found.values() for s in t.sites}.values())
        return model

    def finalize(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Prune the smallest remaining weights if the packed file would pass the target
        (fine-tuning changes how well the tensors pack, those allocate does not compress
        included, such as batch-norm statistics). A target out of reach ships the smallest
        allocation as it is (`compress` warned)."""
        budget = getattr(self, "_target_bytes", None)
        if budget is None:
            return model
        for _ in range(20):
            excess = _packed_size(model) - budget
            if excess <= 0:
                return model
            if not _prune_more(model, excess):
                break
        logger.warning(
            "allocate could not fit the packed file in %d bytes (ratio %g) after fine-tuning, "
            "even pruning more of its weights: it ships %d bytes. The tensors it does not "
            "compress (biases, norms and their statistics) outgrew the budget; lower "
            "allocate.ratio.",
            budget,
            self.ratio,
            _packed_size(model),
        )
        return model

    def settings(self) -> list[Setting]:
        """The candidate settings of every tensor, float32 dense first."""
        sparsities = [s for s in SPARSITIES if s <= self.max_sparsity]
        bits = [None, *range(self.min_bits, self.max_bits + 1)]
        return [Setting(s, b) for s in sparsities for b in bits]

    def _budget(self, model: nn.Module, ctx: CompressionContext) -> int:
        return math.floor(_packed_size(model) / self.ratio * (1.0 - SLACK))

    def table(self, model: nn.Module, ctx: CompressionContext) -> dict[str, np.ndarray]:
        """``bytes`` and ``sensitivity`` of each tensor of ``model`` (rows, `targets` order) at
        each setting (columns, `settings` order), and the ``reference`` losses
        (`reference_losses`), cached in ``ctx.cache_dir`` under a key of the weights, the
        settings and the method."""
        found, settings = targets(model), self.settings()
        key = _table_key(found, settings, self.sensitivity)
        path = None if ctx.cache_dir is None else Path(ctx.cache_dir) / f"allocate-{key}.npz"
        if path is not None and path.exists():
            with np.load(path) as cached:
                return {key: cached[key] for key in ("bytes", "sensitivity", "reference")}
        table = {
            "bytes": np.array([candidate_bytes(t.weight, settings) for t in found.values()]),
            "sensitivity": sensitivities(model, found, settings, ctx, method=self.sensitivity),
            "reference": np.array(reference_losses(model, ctx)),
        }
        if path is not None:
            _save_atomically(path, table)
        return table


def sensitivities(
    model: nn.Module,
    found: dict[str, Target],
    settings: list[Setting],
    ctx: CompressionContext,
    *,
    method: str = "fisher",
) -> np.ndarray:
    """The loss increase of compressing each tensor alone at each setting (tensors x settings).

    ``fisher``: ``1/2 sum_i F_i (w_i - q(w)_i)^2`` with the empirical Fisher diagonal ``F``
    (squared gradients of the task's loss, summed over mini-batches of the training sample);
    ``loss``: the measured loss on the training sample minus the uncompressed model's.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if method == "fisher":
            fisher = _fisher(model, found, ctx, device=device)
            if max(float(f.max()) for f in fisher) < FLAT_FISHER:
                raise UnsupportedModelError(
                    "allocate.sensitivity=fisher needs gradients, but the task's loss is flat "
                    "at this model (every squared gradient is below "
                    f"{FLAT_FISHER:g}: a model whose targets are its own outputs, such as "
                    "minilm's embeddings, is at the loss's minimum), so every setting would "
                    "look free; use allocate.sensitivity=loss."
                )
            return np.array(
                [
                    [
                        0.5 * float((f * (t.weight.detach() - value) ** 2).sum())
                        for value in compressed(t.weight, settings)
                    ]
                    for t, f in zip(found.values(), fisher, strict=True)
                ]
            )
        with torch.no_grad():
            batches = ctx.train.calibration(samples=SAMPLES, batch_size=256, device=device)
            base = _loss(model, batches, ctx)
            rows = []
            for target in found.values():
                original = target.latent.detach().clone()
                row = []
                for value in compressed(original, settings):
                    target.latent.data.copy_(value)
                    row.append(_loss(model, batches, ctx) - base)
                target.latent.data.copy_(original)
                rows.append(row)
            return np.array(rows)
    finally:
        model.train(was_training)


def reference_losses(model: nn.Module, ctx: CompressionContext) -> tuple[float, float]:
    """``(loss of the model, loss of predictions that ignore the input)`` on the training
    sample: for logits, uniform over the classes (zero logits: ``log(classes)`` under
    cross-entropy); for other outputs, the model's mean output for every input."""
    teacher = None if ctx.teacher_outputs is None else ctx.teacher_outputs[:SAMPLES]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():  # the data read batch by batch, as the task reads it
            batches = ctx.train.calibration(samples=SAMPLES, batch_size=256, device=device)
            outputs = torch.cat([ctx.train.forward(model, b.inputs) for b in batches]).float()
            y = torch.cat([torch.as_tensor(b.targets) for b in batches]).to(device)
            if ctx.outputs == "logits":
                blind = torch.zeros_like(outputs)
            else:
                blind = outputs.mean(0, keepdim=True).expand_as(outputs)
            tb = None if teacher is None else teacher[: len(outputs)].to(device)
            base = float(ctx.loss(outputs, y, tb))
            chance = float(ctx.loss(blind, y, tb))
    finally:
        model.train(was_training)
    return base, chance


def compressed(weight: torch.Tensor, settings: list[Setting]) -> Iterator[torch.Tensor]:
    """``weight`` at each setting (see `_variants`)."""
    for value, _ in _variants(weight, settings):
        yield value


def _variants(
    weight: torch.Tensor, settings: list[Setting]
) -> Iterator[tuple[torch.Tensor, nn.Module | None]]:
    """``(value, grid)`` of ``weight`` at each setting: its ``sparsity`` smallest magnitudes
    zeroed, then on the grid of ``bits`` (what `apply_settings` makes of it before fine-tuning;
    no grid for float32). The weights are ranked once."""
    w = weight.detach()
    order = torch.argsort(w.abs().flatten(), stable=True)  # as `smallest_mask` ranks them
    masked = {}
    for sparsity in {s.sparsity for s in settings}:
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        keep[order[: round(sparsity * w.numel())]] = False
        masked[sparsity] = w * keep.view_as(w)
    for setting in settings:
        value, grid = masked[setting.sparsity], None
        if setting.bits is not None:
            grid = make_grid(value, setting.bits)
            value = grid.codes(value) * grid.scale
        yield value, grid


def candidate_bytes(weight: torch.Tensor, settings: list[Setting]) -> list[int]:
    """The exact bytes the packed file's payload spends on ``weight`` at each setting (its
    arrays in the layout the file picks, their entries and its layout record; `tensor_bytes`).
    Fine-tuning moves values within the same mask and grid, which changes these by a little
    (entropy-coded codes); `BudgetAllocation.finalize` absorbs that."""
    return [tensor_bytes(value, grid) for value, grid in _variants(weight, settings)]


def solve(costs: np.ndarray, values: np.ndarray, budget: float) -> list[int]:
    """The multiple-choice knapsack: one option per row, least total ``values``, total
    ``costs`` at most ``budget``; exact (HiGHS branch and bound). Returns each row's option.

    Raises:
        UnsupportedModelError: If even the cheapest option of every row passes the budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    rows, options = costs.shape
    cheapest = costs.min(axis=1).sum()
    if cheapest > budget:
        raise UnsupportedModelError(
            f"allocate cannot fit the budget: even the smallest setting of every tensor needs "
            f"{int(cheapest)} bytes, over the {int(budget)} bytes the target ratio leaves; "
            f"lower allocate.ratio or allow fewer bits (allocate.min_bits) or more sparsity "
            f"(allocate.max_sparsity)."
        )
    one_each = np.kron(np.eye(rows), np.ones(options))
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(costs.reshape(1, -1), -np.inf, budget),
    ]
    # Sensitivities are shifted to be positive per row (the choice is unchanged: one per row).
    objective = (values - values.min(axis=1, keepdims=True)).reshape(-1)
    with native_stdout_silenced():  # HiGHS's C++ prints debug lines on some problems
        result = milp(
            objective,
            constraints=constraints,
            integrality=np.ones(rows * options),
            bounds=Bounds(0, 1),
        )
    if result.x is None:
        raise RuntimeError(f"allocate: the knapsack solver failed ({result.message})")
    return [int(i) for i in np.round(result.x).reshape(rows, options).argmax(axis=1)]


def apply_settings(
    model: nn.Module, found: dict[str, Target], allocation: dict[str, Setting]
) -> None:
    """Register each tensor's mask (if it is pruned) and grid (if it is quantized)."""
    for name, setting in allocation.items():
        target = found[name]
        if setting.sparsity > 0:
            target.register(Mask(smallest_mask(target.weight.detach().abs(), setting.sparsity)))
        if setting.bits is not None:
            target.register(make_grid(target.weight, setting.bits))


def _fisher(model, found, ctx, *, device, batch_size: int = 64) -> list[torch.Tensor]:
    """Squared gradients of the task's loss, summed over mini-batches of the calibration
    samples, per target tensor."""
    latents = [t.latent for t in found.values()]
    frozen = [p for p in latents if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    fisher = [torch.zeros_like(p) for p in latents]
    try:
        for b in ctx.train.calibration(samples=SAMPLES, batch_size=batch_size, device=device):
            loss = ctx.loss(ctx.train.forward(model, b.inputs), b.targets, None)
            grads = torch.autograd.grad(loss, latents, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:  # (a tensor the loss does not reach: no sensitivity)
                    f += g.detach() ** 2 * b.rows
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return fisher


def _loss(model, batches, ctx) -> float:
    """The mean loss of the task over the calibration batches."""
    total = sum(
        float(ctx.loss(ctx.train.forward(model, b.inputs), b.targets, None)) * b.rows
        for b in batches
    )
    return total / sum(b.rows for b in batches)


def _overhead(model: nn.Module, found: dict[str, Target], *, half: bool) -> int:
    """Bytes of the payload that are not the target tensors' (biases, as float16 if ``half``;
    norms; the header's record of the model): the payload of ``model`` less its targets'."""
    replace = _half_biases(model, found) if half else {}
    dense = sum(tensor_bytes(t.weight.detach()) for t in found.values())
    return max(0, packed_size(model, replace=replace, lzma_pass=False) - dense)


def _half_biases(
    model: nn.Module, found: dict[str, Target]
) -> dict[str, tuple[torch.Tensor, None]]:
    """The biases of the targets' modules, rounded to float16 values (as `half_biases` keeps
    them), by state key."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for target in found.values():
        for site in target.sites:
            for name, value in site.module.named_parameters(recurse=False):
                if "bias" in name and "parametrizations" not in name:
                    key = f"{names[id(site.module)]}.{name}".lstrip(".")
                    out[key] = (value.detach().to(torch.float16).to(torch.float32), None)
    return out


def _packed_size(model: nn.Module) -> int:
    return packed_size(model)


def _prune_more(model: nn.Module, excess: int) -> bool:
    """Zero the smallest remaining weights of the tensor with the most nonzero weights, about
    ``8 * excess`` of them (a byte or more each in the file); False if every weight is zero."""
    found = targets(model)
    nonzero = {n: int(t.weight.detach().count_nonzero()) for n, t in found.items()}
    name = max(found, key=lambda n: nonzero[n])
    if nonzero[name] == 0:
        return False
    target = found[name]
    weight = target.weight.detach()
    extra = min(nonzero[name], max(1, 8 * excess))
    zeros = weight.numel() - nonzero[name]
    target.register(Mask(smallest_mask(weight.abs(), (zeros + extra) / weight.numel())))
    return True


def _table_key(found: dict[str, Target], settings: list[Setting], method: str) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps([_CACHE_VERSION, method, SAMPLES, [str(s) for s in settings]]).encode()
    )
    for name, target in found.items():
        digest.update(name.encode())
        digest.update(target.weight.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_atomically(path: Path, table: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **table)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
