"""Budget-driven allocation: each tensor's sparsity and bit width, chosen to fit a target size.

One search dimension (the target ``ratio``) replaces one per layer. For every compressible
tensor (`compressors._targets`) and every candidate setting (a sparsity from `SPARSITIES`, then a
bit width, or float32), the allocator knows

- its **cost**: the bytes the packed file spends on the tensor at that setting
  (`compressors.packing.tensor_bytes`, computed from counts by `compressors._allocate_costs`:
  exact for float and bit-packed layouts, the entropy-coded size of large tensors estimated), and
- its **sensitivity**: how much the task's loss rises on training data when that tensor alone is
  compressed so (``loss``: measured; ``interpolated``: measured at a few settings;
  ``fisher``: the second-order estimate ``1/2 sum F_i dw_i^2`` from the empirical Fisher
  diagonal, one backward pass over the data; ``auto`` picks by the model's size,
  `compressors._allocate_sensitivity`).

It then solves the multiple-choice knapsack exactly (one setting per tensor, least total
sensitivity, total bytes within the budget) with HiGHS (`scipy.optimize.milp`), applies the
chosen masks (`compressors.prune.Mask`) and grids (`compressors.quant.make_grid`), and the trial
fine-tunes as usual. The table is measured once per set of weights and kept in the context's
``cache_dir`` (the trials and workers of a study share it; structured pruning to the same shapes
gives the same weights). After fine-tuning, `finalize` checks
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressors import _allocate_sensitivity as _sens
from compressors._allocate_costs import (
    Setting,
    costs,
    oriented,
    sampled_rows,
    value_bytes,
    variants,
)
from compressors._base import CompressionContext, Compressor, UnsupportedModelError
from compressors._device import model_device
from compressors._params import Integer, InvalidParameterError, Options, Real
from compressors._quiet import native_stdout_silenced
from compressors._targets import Target, targets
from compressors.packing import _trim, packed_size
from compressors.prune import Mask, smallest_mask
from compressors.quant import half_biases, make_grid

logger = logging.getLogger(__name__)
#: Above this many bytes of tensors, the knapsack's budget is the table's sum (exact bytes of
#: each tensor as the file stores it, sampled rows for the largest), with no packing of the whole
#: model per calibration round (`finalize` checks the real file).
SUM_ABOVE_BYTES = 4 * 2**20

#: Sparsities a tensor may get (each combined with every bit width and with float32).
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
#: Training samples the sensitivities are measured on (``allocate.samples``; ``interpolated``
#: takes at most `compressors._allocate_sensitivity.INTERPOLATED_SAMPLES` of them).
SAMPLES = 1024
#: The allocator aims this far under the target (the header records changed layer shapes and
#: per-tensor layouts whose lengths vary by a few bytes).
SLACK = 0.01
_CACHE_VERSION = 6  # 5: bytes as the SQZ3 file stores them; 6: a Conv1D per output column
FLAT_FISHER = _sens.FLAT_FISHER
#: Solves at most, each followed by packing the allocated model, to fit the file to the target.
CALIBRATIONS = 5
#: A file this close under the target (a fraction of it) ends the calibration.
CLOSE_ENOUGH = 0.02


class BudgetAllocation(Compressor):
    """Choose each tensor's sparsity and bit width to fit a size budget with the least loss.

    Params:
        ratio: Target compression ratio: the shipped file is at most the packed size of the
            model the allocator receives over ``ratio`` (the baseline's, when it comes first;
            after structured pruning the two ratios multiply, so each is its own dimension).
        min_bits: Fewest bits per weight a tensor may get (1 is binary, sign x scale).
        max_bits: Most bits per weight; float32 is also a candidate, for tensors worth it.
        max_sparsity: Largest fraction of a tensor's weights that may be pruned.
        sensitivity: ``auto`` (the first of the next three whose passes cost at most 50
            training steps of the model, or a few CPU-seconds: `compressors._allocate_sensitivity`),
            ``loss`` (measured: one forward pass per tensor and setting; it ranked fine-tuned
            results best in ``bench/allocation.py``), ``interpolated`` (measured at a few
            settings per tensor, interpolated in the weights' distortion for the others) or
            ``fisher`` (the empirical Fisher estimate of the loss increase, one backward pass).
        samples: Training samples the sensitivities are measured on (``interpolated``: at most
            256 of them).
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
        "sensitivity": Options(_sens.METHODS, default="auto"),
        "samples": Integer(1, 1_000_000, default=SAMPLES),
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
        # Past SUM_ABOVE_BYTES the table's sum decides, with no packing of the whole model.
        by_sum = int(table["bytes"][:, 0].sum()) > SUM_ABOVE_BYTES
        for _ in range(1 if by_sum else CALIBRATIONS):
            try:
                choice = solve(table["bytes"], table["sensitivity"], payload_budget)
            except UnsupportedModelError:  # by the sum; LZMA may still bring the file under
                choice = [int(i) for i in table["bytes"].argmin(axis=1)]
            if by_sum:
                size = fixed + int(table["bytes"][np.arange(len(choice)), choice].sum())
            else:
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
            name: next(variants(target.weight, [settings[c]], axis=target.channel_axis))
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
            pruned = _prune_more(model, excess, self.max_sparsity)
            if pruned is None:
                break
            logger.info(
                "allocate: after fine-tuning the file passed its budget (%d bytes) by %d bytes: "
                "%d more of %s's weights pruned (now %.0f%% zero; allocate.max_sparsity %g)",
                budget,
                excess,
                pruned[0],
                pruned[1],
                100 * pruned[2],
                self.max_sparsity,
            )
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
        settings and the measurement's plan (`compressors._allocate_sensitivity.plan`).

        The weights are the key: a structured pruning of the same baseline to the same shapes
        gives the same weights (it is deterministic), so its trials share one table; a table is
        never reused for other weights (see README: a baseline's sensitivities do not carry
        over to a pruned model, whose loss and curvature have moved)."""
        found, settings = targets(model), self.settings()
        macs = _sens.macs_per_sample(model, ctx) if self.sensitivity == "auto" else None
        how = _sens.plan(
            model,
            len(found),
            len(settings),
            method=self.sensitivity,
            samples=self.samples,
            macs=macs,
        )
        key = _table_key(found, settings, how)
        path = None if ctx.cache_dir is None else Path(ctx.cache_dir) / f"allocate-{key}.npz"
        if path is not None and path.exists():
            with np.load(path) as cached:
                logger.info(
                    "sensitivity table (%s): cached, %s", how, path.name, extra={"once": True}
                )
                return {key: cached[key] for key in ("bytes", "sensitivity", "reference")}
        try:
            table = measure_table(model, found, settings, ctx, how)
        except UnsupportedModelError:  # a flat loss (a model that is its own target)
            if self.sensitivity != "auto" or how.method != "fisher":
                raise
            how = _sens.plan(
                model, len(found), len(settings), method="interpolated", samples=self.samples
            )
            logger.info(
                "the loss is flat at this model: auto measures the %s table",
                how,
                extra={"once": True},
            )
            path = (
                None
                if path is None
                else path.with_name(f"allocate-{_table_key(found, settings, how)}.npz")
            )
            if path is not None and path.exists():
                with np.load(path) as cached:
                    return {key: cached[key] for key in ("bytes", "sensitivity", "reference")}
            table = measure_table(model, found, settings, ctx, how)
        if path is not None:
            _save_atomically(path, table)
        return table


def measure_table(
    model: nn.Module,
    found: dict[str, Target],
    settings: list[Setting],
    ctx: CompressionContext,
    how: _sens.Plan,
) -> dict[str, np.ndarray]:
    """The table, measured (`_measure_table`) with torch's random state put back afterwards:
    reading data may draw from it (a DataLoader seeds its workers from it, a user's dataset may
    augment at random), and a table is measured or read from the cache depending on which trial
    came first, so what follows (fine-tuning's dropout and order) must not depend on it: `squeeze
    run` reproduces a trial whose table was measured from a cached one."""
    device = model_device(model)
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        return _measure_table(model, found, settings, ctx, how)


def _measure_table(
    model: nn.Module,
    found: dict[str, Target],
    settings: list[Setting],
    ctx: CompressionContext,
    how: _sens.Plan,
) -> dict[str, np.ndarray]:
    """The table (see `BudgetAllocation.table`) measured as ``how`` says, logged with its
    cost at INFO: each tensor's bytes and distortion by arithmetic (`costs`), one tensor at a
    time; sensitivities from the Fisher diagonal (dropped tensor by tensor as it is used) or
    from forward passes over the calibration samples."""
    counter = _sens.Counter()
    was_training = model.training
    model.eval()
    try:
        fisher, reference = None, None
        if how.method == "fisher":
            rows = [sampled_rows(oriented(t.weight, t.channel_axis)) for t in found.values()]
            fisher, reference = _sens.fisher_diagonal(model, found, ctx, how, counter, rows)
            del rows
        rows = []
        for t in found.values():
            rows.append(
                costs(
                    oriented(t.weight, t.channel_axis),
                    settings,
                    fisher=None if fisher is None else fisher[0],
                )
            )
            if fisher is not None:
                fisher.pop(0)  # (its memory goes with it)
        table = {"bytes": np.stack([r.bytes for r in rows])}
        if how.method == "fisher":
            table["sensitivity"] = np.stack([r.fisher for r in rows])
        else:
            table["sensitivity"], reference = _sens.measured(
                model,
                found,
                settings,
                ctx,
                how,
                counter,
                distortion=np.stack([r.distortion for r in rows]),
                variants=variants,
            )
        table["reference"] = np.array(reference)
    finally:
        model.train(was_training)
        _trim()  # (what the passes freed, held by glibc, would add to the allocation's peak)
    counter.log(how, len(found), len(settings))
    return table


def sensitivities(
    model: nn.Module,
    found: dict[str, Target],
    settings: list[Setting],
    ctx: CompressionContext,
    *,
    method: str = "fisher",
    samples: int = SAMPLES,
) -> np.ndarray:
    """The loss increase of compressing each tensor alone at each setting (tensors x
    settings), by ``method`` (`compressors._allocate_sensitivity`)."""
    how = _sens.plan(model, len(found), len(settings), method=method, samples=samples)
    return measure_table(model, found, settings, ctx, how)["sensitivity"]


def reference_losses(
    model: nn.Module, ctx: CompressionContext, *, samples: int = SAMPLES
) -> tuple[float, float]:
    """``(loss of the model, loss of predictions that ignore the input)`` on the training
    sample: for logits, uniform over the classes (zero logits: ``log(classes)`` under
    cross-entropy); for other outputs, the model's mean output for every input."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            batches = ctx.train.calibration(
                samples=samples, batch_size=_sens.LOSS_BATCH, device=device
            )
            outputs = [ctx.train.forward(model, b.inputs).float() for b in batches]
            return _sens.reference_from(outputs, batches, ctx)
    finally:
        model.train(was_training)


def compressed(weight: torch.Tensor, settings: list[Setting]) -> Iterator[torch.Tensor]:
    """``weight`` at each setting (see `compressors._allocate_costs.variants`)."""
    for value, _ in variants(weight, settings):
        yield value


def candidate_bytes(weight: torch.Tensor, settings: list[Setting]) -> list[int]:
    """The bytes the packed file's payload spends on ``weight`` at each setting (its arrays in
    the layout the file picks, their entries and its layout record: `tensor_bytes`, by
    arithmetic, `compressors._allocate_costs`). Fine-tuning moves values within the same mask
    and grid, which changes these by a little (entropy-coded codes);
    `BudgetAllocation.finalize` absorbs that."""
    return [int(b) for b in costs(weight, settings).bytes]


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
    """Register each tensor's mask (if it is pruned) and grid (if it is quantized), without
    gradients: the registration's check of each new value then builds no graph (with one, an
    embedding table's check held several copies of the table: bert-30M's peak was 2.7x the
    model's bytes here)."""
    with torch.no_grad():
        for name, setting in allocation.items():
            target = found[name]
            if setting.sparsity > 0:
                target.register(Mask(smallest_mask(target.weight.detach().abs(), setting.sparsity)))
            if setting.bits is not None:
                grid = make_grid(target.weight, setting.bits, axis=target.channel_axis)
                target.register(grid)
            _trim()  # (the registrations' temporaries leave glibc's arenas)


def _overhead(model: nn.Module, found: dict[str, Target], *, half: bool) -> int:
    """Bytes of the payload that are not the target tensors' (biases, as float16 if ``half``;
    norms; the header's record of the model): the payload of ``model`` less its targets'."""
    replace = _half_biases(model, found) if half else {}
    dense = sum(value_bytes(t.weight.detach()) for t in found.values())
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


def _prune_more(
    model: nn.Module, excess: int, max_sparsity: float
) -> tuple[int, str, float] | None:
    """Zero the smallest remaining weights of the tensor with the most nonzero weights among
    those below ``max_sparsity``, about ``8 * excess`` of them (a byte or more each in the
    file), never past ``max_sparsity``. The tensor's mask is tightened where it has one, else
    put before its grid, so that the grid still codes what is left (a mask after the grid
    left values the file stores as float16: pruning a SegFormer's largest 4-bit convolution so
    grew the file by 60 KB, and the next call zeroed the whole tensor). Returns (weights
    pruned, the tensor's name, its share of zeros after), or None if every tensor is at
    ``max_sparsity``."""
    found = targets(model)
    room = {}
    for name, target in found.items():
        weight = target.weight.detach()
        nonzero = int(weight.count_nonzero())
        allowed = math.floor(max_sparsity * weight.numel()) - (weight.numel() - nonzero)
        room[name] = (nonzero, allowed)
    open_ = [n for n in found if room[n][1] > 0]
    if not open_:
        return None
    name = max(open_, key=lambda n: room[n][0])
    nonzero, allowed = room[name]
    target = found[name]
    weight = target.weight.detach()
    extra = min(allowed, max(1, 8 * excess))
    zeros = weight.numel() - nonzero + extra
    keep = smallest_mask(weight.abs(), zeros / weight.numel())
    _tighten(target, keep)
    return extra, name, zeros / weight.numel()


def _tighten(target: Target, keep: torch.Tensor) -> None:
    """Prune ``target`` to ``keep`` (boolean, True where a weight stays) as well: its `Mask`
    narrowed in place where it has one, else a new one first in each site's parametrizations,
    before a grid (whose codes a packed file stores from the masked values)."""
    chain = target.parametrizations()
    mask = next((p for p in chain if isinstance(p, Mask)), None)
    if mask is not None:
        mask.mask &= keep.to(mask.mask.device)
        return
    if not chain:
        target.register(Mask(keep), unsafe=True)
        return
    added = Mask(keep.to(target.weight.device))
    for site in target.sites:  # (one instance at every site: a tied tensor stays tied)
        site.module.parametrizations[site.attr].insert(0, added)


def _table_key(found: dict[str, Target], settings: list[Setting], how: _sens.Plan) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, str(how), [str(s) for s in settings]]).encode())
    for name, target in found.items():
        digest.update(name.encode())
        digest.update(str(tuple(target.weight.shape)).encode())
        digest.update(target.weight.detach().cpu().contiguous().numpy())  # (no copy on CPU)
    return digest.hexdigest()[:16]


def _save_atomically(path: Path, table: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **table)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
