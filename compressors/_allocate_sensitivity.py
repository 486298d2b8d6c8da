"""How much the task's loss rises when one tensor is compressed at one setting: `allocate`'s
sensitivity table, at a cost bounded by the model's size.

Three methods, and ``auto`` choosing among them by a cost model that reads no clock (so that a
cached table is found again):

- ``loss``: measured. One forward pass over the calibration samples per tensor and setting
  (``1 + tensors x settings`` passes): the best guide for small models (``bench/allocation.py``).
- ``interpolated``: measured at `ANCHORS` settings per tensor, spread over the settings'
  distortions (``sum (w - v)^2``, computed for every setting with its bytes), and interpolated
  linearly in the distortion for the others (a loss increase is, to second order, proportional
  to a perturbation's size along a tensor's curvature; the curve through ``(0, 0)`` and the
  anchors is kept non-decreasing): ``1 + tensors x ANCHORS`` passes, on at most
  `INTERPOLATED_SAMPLES` samples (``fisher`` too when ``auto`` chooses it).
- ``fisher``: ``1/2 sum_i F_i (w_i - v_i)^2`` with the empirical Fisher diagonal ``F`` (squared
  mini-batch gradients of the task's loss, weighted by the batch's rows), from one forward and
  backward pass over the samples. The squared gradients are added in place as each tensor's
  gradient is ready (a hook after accumulation) and the gradient is dropped at once (the memory
  it took goes back to the system), and parameters that are not compressed get none. The
  model's repeated blocks (`blocks`: a transformer's layers) keep only their inputs in the
  forward pass and compute their activations again in the backward, one block at a time
  (activation checkpointing: one more forward per batch, the same gradients to the bit): memory
  beyond the model is the Fisher diagonal (on the rows each tensor is costed on), one gradient
  and one block's activations of a mini-batch (the pass at bert-30M: 2.65x -> 1.34x the model's
  bytes).

``auto`` takes the first of ``loss``, ``interpolated``, ``fisher`` whose passes cost at most
`STEPS` training steps of the model (a step: `STEP_SAMPLES` samples forward, a backward counted
as two forwards), or, for small models, at most `SMALL_COST` multiply-adds (the model's own per
sample, counted by torch: `macs_per_sample`), whichever allows more: digits and mnist1d keep
the measured table; a 10 M-parameter model is interpolated; an 85 M encoder gets ``fisher``, and
so does a segmentation network of 0.1 M weights whose convolutions act at 1,024 pixels (costed
by its weights, its measured table took 19 minutes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compressors._allocate_costs import oriented
from compressors._base import CompressionContext, UnsupportedModelError
from compressors._targets import Target
from compressors.packing import _trim

logger = logging.getLogger(__name__)

METHODS = ("auto", "loss", "interpolated", "fisher")
#: Settings measured per tensor by ``interpolated``.
ANCHORS = 6
#: At most this many calibration samples for ``interpolated``, and for ``fisher`` when ``auto``
#: chooses it (a backward pass over 256 samples: 4 training steps of batch 64).
INTERPOLATED_SAMPLES = 256
#: Training steps the passes of ``auto``'s choice may cost ...
STEPS = 50
#: ... each ``STEP_SAMPLES`` samples forward (a batch of 64, forward and a backward of two).
STEP_SAMPLES = 3 * 64
#: ... or, whichever allows more, this many multiply-adds (parameters x samples per pass): a
#: few CPU-seconds, which keeps the measured table for small models (digits: 5e9).
SMALL_COST = 2e10
#: Calibration batch of the loss passes, and of Fisher's for models up to `FISHER_LARGE`
#: parameters (beyond it, `FISHER_BATCH_LARGE`, to bound the activations a backward keeps).
LOSS_BATCH, FISHER_BATCH = 256, 64
FISHER_LARGE, FISHER_BATCH_LARGE = 4_000_000, 8
#: After consuming the gradient of a tensor of at least this many values, the Fisher pass gives
#: the memory freed back to the system (glibc's arenas keep it otherwise, and a backward pass of
#: an encoder then held about twice the bytes in use: bert-30M 2.0x -> 1.4x the model's bytes).
TRIM_ABOVE = 1 << 18
#: An empirical Fisher diagonal whose largest entry is below this is flat: a model at its loss's
#: minimum (trained classifiers measured 3e-3 to 0.8; minilm, its own target, ~0).
FLAT_FISHER = 1e-9


@dataclass(frozen=True)
class Plan:
    """The method a table is measured with, on how many samples, in batches of what size."""

    method: str
    samples: int
    batch_size: int

    def __str__(self) -> str:
        return f"{self.method}@{self.samples}/{self.batch_size}"


def plan(
    model: nn.Module,
    tensors: int,
    settings: int,
    *,
    method: str,
    samples: int,
    macs: float | None = None,
) -> Plan:
    """The `Plan` for ``method`` (``auto``: the cost model above) on ``samples`` samples.

    ``macs``: the model's multiply-adds per sample (`macs_per_sample`); None: its parameter
    count, which is that of a stack of Linear layers on one vector, but a convolution's
    weights act at every position (a small segmentation network's 240 per weight) and a
    transformer's at every token."""
    params = sum(p.numel() for p in model.parameters())
    macs = params if macs is None else max(macs, 1.0)
    fisher_batch = FISHER_BATCH if params <= FISHER_LARGE else FISHER_BATCH_LARGE
    interpolated = Plan("interpolated", min(samples, INTERPOLATED_SAMPLES), LOSS_BATCH)
    if method == "loss":
        return Plan("loss", samples, LOSS_BATCH)
    if method == "interpolated":
        return interpolated
    if method == "fisher":
        return Plan("fisher", samples, fisher_batch)
    allowed = max(SMALL_COST / max(macs, 1), STEPS * STEP_SAMPLES)  # sample-forwards
    if (1 + tensors * settings) * samples <= allowed:
        return Plan("loss", samples, LOSS_BATCH)
    if (1 + tensors * min(ANCHORS, settings)) * interpolated.samples <= allowed:
        return interpolated
    return Plan("fisher", min(samples, INTERPOLATED_SAMPLES), fisher_batch)


def macs_per_sample(model: nn.Module, ctx: CompressionContext) -> float | None:
    """The multiply-adds of one forward of ``model`` per sample, counted by torch's
    ``FlopCounterMode`` on the first `MAC_ROWS` calibration samples (matrix products and
    convolutions; deterministic, no clock, so a cached table is found again); None where they
    cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        (batch,) = ctx.train.calibration(samples=MAC_ROWS, batch_size=MAC_ROWS, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            ctx.train.forward(model, batch.inputs)
        return counter.get_total_flops() / 2 / batch.rows
    except Exception:  # (an op the counter cannot follow: the parameter count stands in)
        logger.debug("multiply-adds not counted: the parameters stand in", exc_info=True)
        return None
    finally:
        model.train(was_training)


#: Samples whose forward `macs_per_sample` counts.
MAC_ROWS = 4


#: A sensitivity table that took this long is logged at INFO (a quicker one at DEBUG: a small
#: model's trials each measure one, and their lines said nothing a person acts on).
NOTABLE_S = 10.0


class Counter:
    """Forward passes (batches) run while measuring a table."""

    def __init__(self) -> None:
        self.forwards = 0
        self.rows = 0
        self.start = time.perf_counter()

    def log(self, what: Plan, tensors: int, settings: int) -> None:
        seconds = time.perf_counter() - self.start
        logger.log(
            logging.INFO if seconds >= NOTABLE_S else logging.DEBUG,  # (not once per trial)
            "sensitivity table (%s, %d tensors x %d settings): %d forwards (%d samples), %.1f s",
            what,
            tensors,
            settings,
            self.forwards,
            self.rows,
            seconds,
        )


def fisher_diagonal(
    model: nn.Module,
    found: dict[str, Target],
    ctx: CompressionContext,
    how: Plan,
    counter: Counter,
    rows: list[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """The empirical Fisher diagonal of each target's tensor (`oriented`: output channels
    first), and the reference losses (`reference_from`) from the same forward passes. The
    model should be in eval mode.

    ``rows`` (one per target, None for all of them): keep only these rows of a tensor's
    diagonal (the rows its costs sample: `compressors._allocate_costs.sampled_rows`), which
    bounds the diagonal's memory; the kept entries are those of the whole diagonal. The rows
    not kept enter the flatness test below through an upper bound, the sum over batches of each
    batch's largest weighted squared gradient.

    Raises:
        UnsupportedModelError: If the loss is flat at the model (every entry below
            `FLAT_FISHER`): every setting would look free.
    """
    device = next(model.parameters()).device
    latents = {id(t.latent): t.latent for t in found.values()}
    axes = {id(t.latent): t.channel_axis for t in found.values()}
    kept = {id(t.latent): None if rows is None else rows[i] for i, t in enumerate(found.values())}
    fisher = {}
    for key, p in latents.items():
        shape = oriented(p, axes[key]).shape
        if kept[key] is not None:
            shape = (len(kept[key]), *shape[1:])
        fisher[key] = p.new_zeros(shape, dtype=torch.float32)
    bound = dict.fromkeys(latents, 0.0)  # (of the rows not kept)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = {key: p.grad for key, p in latents.items()}
    weight = [0.0]

    def accumulate(p: torch.Tensor) -> None:
        grad = oriented(p.grad, axes[id(p)])
        if kept[id(p)] is not None:
            grad = grad[kept[id(p)]]
        fisher[id(p)].addcmul_(grad, grad, value=weight[0])
        if kept[id(p)] is not None:
            low, high = (float(v) for v in torch.aminmax(p.grad))
            bound[id(p)] += weight[0] * max(-low, high) ** 2
        del grad
        p.grad = None
        if p.numel() >= TRIM_ABOVE:
            _trim()  # (the freed gradient, and what its computation freed, leave the arena)

    handles = []
    outputs = []
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in latents)
        for p in latents.values():
            p.requires_grad_(True)
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(accumulate))
        batches = ctx.train.calibration(
            samples=how.samples, batch_size=how.batch_size, device=device
        )
        with _recomputed(blocks(model)), _caches_off(model):
            for b in batches:
                out = ctx.train.forward(model, b.inputs)
                weight[0] = float(b.rows)
                ctx.loss(out, b.targets, None).backward()
                outputs.append(out.detach().float())
                del out
                _trim()  # (the batch's activations, freed, would stay in glibc's arenas)
                counter.forwards += 1
                counter.rows += b.rows
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for key, p in latents.items():
            p.grad = saved[key]
    if max([float(f.max()) for f in fisher.values()] + list(bound.values())) < FLAT_FISHER:
        raise UnsupportedModelError(
            "allocate.sensitivity=fisher needs gradients, but the task's loss is flat "
            "at this model (every squared gradient is below "
            f"{FLAT_FISHER:g}: a model whose targets are its own outputs, such as "
            "minilm's embeddings, is at the loss's minimum), so every setting would "
            "look free; use allocate.sensitivity=loss."
        )
    reference = reference_from(outputs, batches, ctx)
    return [fisher[id(t.latent)] for t in found.values()], reference


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of its `nn.ModuleList` and `nn.Sequential`
    containers that hold modules of their own (a transformer's layers, a ResNet's residual
    blocks), the innermost where such blocks nest."""
    found = [
        child
        for module in model.modules()
        if isinstance(module, nn.ModuleList | nn.Sequential)
        for child in module.children()
        if next(child.children(), None) is not None
    ]
    ids = {id(m) for m in found}
    return [m for m in found if not any(id(d) in ids for d in m.modules() if d is not m)]


@contextlib.contextmanager
def _caches_off(model: nn.Module) -> Iterator[None]:
    """Hugging Face models' key/value caches off meanwhile (``config.use_cache``, on every
    config the model's modules hold: T5's decoder has a copy of its own): a decoder block that
    fills its cache in the forward pass finds it filled when `_recomputed` runs it again, saves
    other tensors, and torch's checkpoint refuses ("A different number of tensors was saved"),
    as Hugging Face's own gradient checkpointing turns the cache off."""
    configs = {
        id(config): config
        for module in model.modules()
        if getattr(config := getattr(module, "config", None), "use_cache", None) is True
    }
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


@contextlib.contextmanager
def _recomputed(modules: list[nn.Module]) -> Iterator[None]:
    """Calls of ``modules`` in the forward passes run under activation checkpointing: a block
    keeps its inputs only, and its activations are computed again in the backward pass, one
    block at a time (one more forward; the same values and gradients, in eval mode)."""
    patched = []
    try:
        for module in modules:
            if "forward" in vars(module):
                continue  # (already patched by its owner: left alone)

            def run(*args, _forward=module.forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            try:
                module.forward = run
            except (AttributeError, RuntimeError, TypeError):  # (a scripted module: as it is)
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def reference_from(outputs: list[torch.Tensor], batches: list, ctx: CompressionContext):
    """``(loss of the model, loss of predictions that ignore the input)`` from the model's
    outputs on the calibration batches: for logits, uniform over the classes (zero logits); for
    other outputs, the model's mean output for every input."""
    with torch.no_grad():
        if ctx.outputs == "logits" or len({o.shape[1:] for o in outputs}) > 1:
            mean = None  # (batches padded each to its own length: each batch's own mean)
        else:
            mean = torch.cat(outputs).mean(0, keepdim=True)
        total = sum(b.rows for b in batches)
        base = chance = 0.0
        for out, b in zip(outputs, batches, strict=True):
            if ctx.outputs == "logits":
                blind = torch.zeros_like(out)
            else:
                blind = (out.mean(0, keepdim=True) if mean is None else mean).expand_as(out)
            base += float(ctx.loss(out, b.targets, None)) * b.rows / total
            chance += float(ctx.loss(blind, b.targets, None)) * b.rows / total
    return base, chance


def measured(
    model: nn.Module,
    found: dict[str, Target],
    settings: list,
    ctx: CompressionContext,
    how: Plan,
    counter: Counter,
    *,
    distortion: np.ndarray,
    variants,
) -> tuple[np.ndarray, tuple[float, float]]:
    """The loss increase of each tensor at each setting, measured (``loss``) or measured at
    anchors and interpolated in ``distortion`` (``interpolated``), and the reference losses.
    ``variants(weight, settings, axis=)`` yields each setting's ``(value, grid)``."""
    device = next(model.parameters()).device
    batches = ctx.train.calibration(samples=how.samples, batch_size=how.batch_size, device=device)
    with torch.no_grad():
        outputs = [_forward(model, b, ctx, counter) for b in batches]
        reference = reference_from(outputs, batches, ctx)
        base = reference[0]
        del outputs
        rows = []
        for r, target in enumerate(found.values()):
            chosen = range(len(settings))
            if how.method == "interpolated":
                chosen = anchors(distortion[r])
            original = target.latent.detach().clone()
            losses = {}
            picked = [settings[c] for c in chosen]
            pairs = variants(original, picked, axis=target.channel_axis)
            for c, (value, _) in zip(chosen, pairs, strict=True):
                target.latent.data.copy_(value)
                del value  # (not held while the next is computed)
                losses[c] = _mean_loss(model, batches, ctx, counter) - base
            target.latent.data.copy_(original)
            del original
            if how.method == "interpolated":
                rows.append(interpolate(distortion[r], losses))
            else:
                rows.append([losses[c] for c in range(len(settings))])
    return np.array(rows), reference


def anchors(distortion: np.ndarray) -> list[int]:
    """`ANCHORS` settings of a tensor to measure: the ones nearest evenly spaced points of
    ``log`` distortion over the settings that change the tensor, the largest included; in the
    settings' order."""
    changed = np.flatnonzero(distortion > 0)
    if len(changed) <= ANCHORS:
        return [int(c) for c in changed]
    logs = np.log(distortion[changed])
    points = np.linspace(logs.min(), logs.max(), ANCHORS)
    picked = {int(changed[np.argmin(np.abs(logs - p))]) for p in points}
    for c in changed[np.argsort(-logs)]:  # (two points nearest the same setting: fill up)
        if len(picked) >= ANCHORS:
            break
        picked.add(int(c))
    return sorted(picked)


def interpolate(distortion: np.ndarray, losses: dict[int, float]) -> list[float]:
    """Each setting's loss increase, linear in its distortion through ``(0, 0)`` and the
    measured ``losses`` (kept non-decreasing in the distortion)."""
    known = sorted(losses, key=lambda c: distortion[c])
    xs = np.array([0.0, *(distortion[c] for c in known)])
    ys = np.maximum.accumulate(np.array([0.0, *(losses[c] for c in known)]))
    out = np.interp(distortion, xs, ys)
    for c, loss in losses.items():
        out[c] = loss  # the measured settings keep what was measured
    return [float(v) for v in out]


def _forward(model: nn.Module, b, ctx: CompressionContext, counter: Counter) -> torch.Tensor:
    counter.forwards += 1
    counter.rows += b.rows
    return ctx.train.forward(model, b.inputs).float()


def _mean_loss(model: nn.Module, batches: list, ctx: CompressionContext, counter: Counter) -> float:
    total = sum(
        float(ctx.loss(_forward(model, b, ctx, counter), b.targets, None)) * b.rows for b in batches
    )
    return total / sum(b.rows for b in batches)
