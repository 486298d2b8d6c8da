"""The same evidence? Integrated Gradients attributions of the baseline and of the
compressed model, and their rank correlation (`attribution_fidelity`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from experiments import (
    Split,
    predict_outputs,
)

#: Validation samples attributed by default; token inputs (attributed through their embeddings,
#: a forward and backward pass per sample per step) take `TOKEN_SAMPLES`.
SAMPLES = 64
TOKEN_SAMPLES = 16
#: Integrated Gradients' steps along the path from the all-zero reference to the input.
STEPS = 32
_BATCH = 256  # inputs per forward pass inside Integrated Gradients


@dataclass(frozen=True)
class Attributions:
    """Attributions of the baseline and of the compressed model on the same inputs.

    Attributes:
        indices: The validation rows attributed.
        inputs: Those inputs.
        reference: The baseline's attributions, per input feature (per token for token inputs).
        model: The compressed model's, the same shape.
        mask: The features that can carry attribution (those differing from the all-zero
            reference of Integrated Gradients).
        baseline_pred: The baseline's decision on each input (a class; -1 for embeddings).
        model_pred: The compressed model's.
        flipped: Whether each input's decision flipped (for embeddings: as the caller says).
    """

    indices: np.ndarray
    inputs: torch.Tensor
    reference: torch.Tensor
    model: torch.Tensor
    mask: torch.Tensor
    baseline_pred: np.ndarray
    model_pred: np.ndarray
    flipped: np.ndarray

    def spearman(self) -> np.ndarray:
        """Each input's Spearman rank correlation between the two attributions, over the
        features that can carry attribution (NaN where fewer than 2 or one side is constant)."""
        from scipy.stats import spearmanr

        out = np.full(len(self.indices), np.nan)
        for i in range(len(self.indices)):
            keep = self.mask[i].flatten()
            a = self.reference[i].flatten()[keep].numpy()
            b = self.model[i].flatten()[keep].numpy()
            if len(a) >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[i] = spearmanr(a, b).statistic
        return out


@dataclass(frozen=True)
class Fidelity:
    """Whether the compressed model uses the same evidence as the baseline.

    Attributes:
        method: How attributions were computed (for the tables).
        attributions: Both models' attributions on the seeded validation sample.
        rho: Each sample's Spearman correlation (`Attributions.spearman`).
        groups: Each sample's class (its true label), or ``"all"`` for an embedding task.
        per_class: ``samples`` and ``mean_spearman`` per class, then ``all``.
        mean: Mean Spearman correlation over the sample (NaN entries left out).
        notes: What the reader should know (int8 layers attributed on the float reload, a
            small sample for token inputs).
    """

    method: str
    attributions: Attributions
    rho: np.ndarray
    groups: np.ndarray
    per_class: pd.DataFrame
    mean: float
    notes: tuple[str, ...] = ()


def attribution_fidelity(
    reference: nn.Module,
    model: nn.Module,
    split: Split,
    *,
    outputs: str = "logits",
    samples: int | None = None,
    seed: int = 0,
    steps: int = STEPS,
) -> Fidelity:
    """Mean Spearman rank correlation, per class, of the baseline's and the compressed model's
    input attributions on a seeded sample of ``split`` (see `search.results.explain`).

    Args:
        reference: The baseline (float, differentiable).
        model: The compressed model, float (an int8 model's float reload: same weights).
        split: The validation split.
        outputs: What the models output (``logits`` or ``embeddings``).
        samples: How many inputs (default `SAMPLES`, `TOKEN_SAMPLES` for token inputs).
        seed: Seeds the sample.
        steps: Integrated Gradients' steps.
    """
    tokens = not split.x.is_floating_point()
    count = samples if samples is not None else TOKEN_SAMPLES if tokens else SAMPLES
    if count < 1 or steps < 1:
        raise ValueError(
            f"'samples' and 'steps' must be positive ints. Got samples={samples!r}, "
            f"steps={steps!r} instead."
        )
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))
    attributions = attribute(reference, model, split.x, indices, outputs=outputs, steps=steps)
    rho = attributions.spearman()
    if outputs == "logits" and split.y.dim() == 1 and not split.y.is_floating_point():
        groups = split.y[torch.from_numpy(indices)].numpy().astype(object)
    else:
        groups = np.full(len(indices), "all", dtype=object)
    frame = pd.DataFrame({"class": groups, "rho": rho})
    per_class = frame.groupby("class", sort=True).rho.agg(samples="size", mean_spearman="mean")
    per_class.loc["all"] = [len(rho), float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan]
    what = (
        f"LayerIntegratedGradients over the token embeddings ({_embedding_name(reference, split)}),"
        " summed per token"
        if tokens
        else "IntegratedGradients per input feature"
    )
    target = (
        "the dot product with the baseline's embedding"
        if outputs == "embeddings"
        else "the baseline's class"
    )
    method = (
        f"{what}, {steps} steps from an all-zero reference, for {target}; {len(indices)} "
        f"validation samples (seed {seed})"
    )
    notes: tuple[str, ...] = ()
    if tokens and samples is None:
        notes += (
            f"token inputs: {len(indices)} samples (each costs {steps} forward and backward "
            "passes through the embeddings on the CPU); more with --samples",
        )
    undefined = int(np.isnan(rho).sum())
    if undefined:
        notes += (
            f"{undefined} of {len(rho)} samples have no rank correlation (one model's "
            "attributions are constant there, e.g. a collapsed model) and are left out of the "
            "means",
        )
    return Fidelity(
        method,
        attributions,
        rho,
        groups,
        per_class,
        float(per_class.loc["all", "mean_spearman"]),
        notes,
    )


def attribute(
    reference: nn.Module,
    model: nn.Module,
    x: torch.Tensor,
    indices: np.ndarray,
    *,
    outputs: str = "logits",
    steps: int = STEPS,
    flipped: np.ndarray | None = None,
) -> Attributions:
    """Both models' attributions on ``x[indices]`` for the baseline's decision (its class; for
    embeddings, the dot product with its embedding), from an all-zero reference input.
    ``flipped`` marks the inputs whose decision flipped (default: the classes differ)."""
    inputs = x[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
    base_out = predict_outputs(reference, inputs)
    model_out = predict_outputs(model, inputs)
    if outputs == "embeddings":
        target, anchor = None, base_out
        preds = np.full(len(inputs), -1), np.full(len(inputs), -1)
    else:
        target, anchor = base_out.argmax(1), None
        preds = base_out.argmax(1).numpy(), model_out.argmax(1).numpy()
    return Attributions(
        indices=np.asarray(indices),
        inputs=inputs,
        reference=_attribute(reference, inputs, target, anchor, steps),
        model=_attribute(model, inputs, target, anchor, steps),
        mask=inputs != 0,
        baseline_pred=preds[0],
        model_pred=preds[1],
        flipped=np.asarray(preds[0] != preds[1] if flipped is None else flipped, dtype=bool),
    )


def _attribute(model, inputs, target, anchor, steps: int) -> torch.Tensor:
    """Integrated Gradients of one model (Layer IG over the token embeddings for token ids)."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model = model.eval()

    def forward(x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x)
        return out if anchor is None else (out * anchor).sum(-1)

    extra = (anchor,) if anchor is not None else None
    kwargs = {
        "baselines": torch.zeros_like(inputs),
        "target": target,
        "additional_forward_args": extra,
        "n_steps": steps,
        "internal_batch_size": _BATCH,
    }
    with torch.enable_grad():
        if inputs.is_floating_point():
            attr = IntegratedGradients(forward).attribute(inputs, **kwargs)
        else:
            layer = _input_embedding(model, inputs)
            attr = LayerIntegratedGradients(forward, layer).attribute(inputs, **kwargs).sum(-1)
    return attr.detach()


def _input_embedding(model: nn.Module, inputs: torch.Tensor) -> nn.Embedding:
    """The ``nn.Embedding`` that reads the model's token ids (found by one forward pass)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    seen: list[nn.Module] = []

    def hook(module, args):
        if args and torch.is_tensor(args[0]) and args[0].shape == inputs[:1].shape:
            if torch.equal(args[0], inputs[:1]):
                seen.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    if seen:
        return seen[0]
    if layers:
        return layers[0]
    raise ValueError(
        "The model takes integer inputs but has no nn.Embedding to attribute them through: "
        "attributions of token inputs need the embedding layer that reads them."
    )


def _embedding_name(model: nn.Module, split: Split) -> str:
    layer = _input_embedding(model, split.x[:1])
    return next(name for name, m in model.named_modules() if m is layer)
