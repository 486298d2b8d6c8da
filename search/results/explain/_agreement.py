"""Which predictions flipped: a compressed model's decisions against the baseline's
(`agreement_report`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from experiments import prediction_agreement
from experiments._objectives import IGNORE_INDEX
from experiments.analysis import WHOLE_CLASSES, frequent_pairs


@dataclass(frozen=True)
class Agreement:
    """How often a compressed model decides as the baseline did on one split.

    Attributes:
        split: ``val`` or ``test``.
        kind: ``top-1 class``, ``yes/no per label`` for a multi-label classifier, or ``nearest
            neighbour`` for an embedding task.
        agreement: The share of the split's inputs decided alike (1.0: none flipped).
        samples: Decisions in the split: its inputs (its positions for per-position logits,
            inputs x labels for a multi-label classifier).
        flips: Counts of (baseline class -> compressed class), rows the baseline's classes: its
            diagonal is what was kept, its row sums are the baseline's class counts; above
            `WHOLE_CLASSES` classes, the most frequent flips only (`experiments.analysis.
            frequent_pairs`), one row each: ``baseline class``, ``compressed class``,
            ``count``. None for an embedding task (no classes) and a multi-label one (its
            decisions are yes/no).
        flipped: One row per flipped input: ``index`` in the split, ``label`` (true class;
            -1 where unknown: an embedding task, targets not one class per decision),
            ``baseline`` and ``compressed`` (their classes, or nearest neighbours' indices) and
            ``baseline_conf`` / ``compressed_conf`` (softmax probability of their own class, or
            cosine similarity to their neighbour). A multi-label classifier's: one row per
            flipped decision, ``label`` the label whose decision flipped, ``baseline`` and
            ``compressed`` 1 (yes) or 0 (no), ``..._conf`` the sigmoid probability of that
            decision.
    """

    split: str
    kind: str
    agreement: float
    samples: int
    flips: pd.DataFrame | None
    flipped: pd.DataFrame


def agreement_report(
    reference_outputs: torch.Tensor,
    outputs: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    split_name: str,
    kind: str = "logits",
    num_classes: int | None = None,
) -> Agreement:
    """Agreement of ``outputs`` with ``reference_outputs`` (the baseline's) on ``split``.

    Args:
        reference_outputs: The baseline's outputs on the split.
        outputs: The compressed model's outputs on the split.
        targets: The split's targets (class labels are listed for flipped inputs).
        split_name: ``val`` or ``test``, for the tables.
        kind: What the models output (``logits``, ``multilabel`` or ``embeddings``).
        num_classes: Classes of a classifier (default: its outputs' width).
    """
    score = prediction_agreement(outputs, reference_outputs, kind=kind)
    if kind == "embeddings":
        return _neighbour_agreement(reference_outputs, outputs, split_name, score)
    if kind == "multilabel":
        return _label_agreement(reference_outputs, outputs, split_name, score)
    positions = None  # (per-position logits: the flattened position of each decision kept)
    if outputs.dim() > 2:  # per-position logits: one decision per position, flattened
        classes = outputs.shape[-1]
        reference_outputs = reference_outputs.reshape(-1, classes)
        outputs = outputs.reshape(-1, classes)
        targets = targets.reshape(-1) if isinstance(targets, torch.Tensor) else None
        positions = torch.arange(len(outputs))
        if (
            targets is not None and not targets.is_floating_point() and len(targets) == len(outputs)
        ):  # (only labelled positions: not padding, as the trial's val_agreement counts)
            labelled = targets != IGNORE_INDEX
            positions, targets = positions[labelled], targets[labelled]
            reference_outputs, outputs = reference_outputs[labelled], outputs[labelled]
            score = prediction_agreement(outputs, reference_outputs, kind=kind)
    base_prob, prob = reference_outputs.softmax(1), outputs.softmax(1)
    base, comp = base_prob.argmax(1), prob.argmax(1)
    classes = num_classes or outputs.shape[1]
    if classes > WHOLE_CLASSES:
        flips = pd.DataFrame(
            frequent_pairs(base.numpy(), comp.numpy(), classes),
            columns=["baseline class", "compressed class", "count"],
        )
    else:
        counts = torch.zeros(classes, classes, dtype=torch.long)
        counts.index_put_((base, comp), torch.ones_like(base), accumulate=True)
        flips = pd.DataFrame(counts.numpy(), index=range(classes), columns=range(classes))
        flips.index.name, flips.columns.name = "baseline class", "compressed class"
    where = torch.nonzero(base != comp).flatten()
    labels = (
        targets[where]
        if isinstance(targets, torch.Tensor)
        and targets.dim() == 1
        and not targets.is_floating_point()
        and len(targets) == len(base)  # (not a SegFormer's masks beside its 1/4-size logits)
        else None
    )
    flipped = pd.DataFrame(
        {
            "index": (where if positions is None else positions[where]).numpy(),
            "label": labels.numpy() if labels is not None else np.full(len(where), -1),
            "baseline": base[where].numpy(),
            "compressed": comp[where].numpy(),
            "baseline_conf": base_prob[where, base[where]].numpy(),
            "compressed_conf": prob[where, comp[where]].numpy(),
        }
    )
    return Agreement(split_name, "top-1 class", score, len(base), flips, flipped)


def _neighbour_agreement(reference, outputs, split_name: str, score: float) -> Agreement:
    def nearest(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = torch.nn.functional.normalize(embeddings, dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-torch.inf)
        return similarity.max(dim=1)

    (base_sim, base), (comp_sim, comp) = nearest(reference), nearest(outputs)
    where = torch.nonzero(base != comp).flatten()
    flipped = pd.DataFrame(
        {
            "index": where.numpy(),
            "label": np.full(len(where), -1),
            "baseline": base[where].numpy(),
            "compressed": comp[where].numpy(),
            "baseline_conf": base_sim[where].numpy(),
            "compressed_conf": comp_sim[where].numpy(),
        }
    )
    return Agreement(split_name, "nearest neighbour", score, len(base), None, flipped)


def _label_agreement(reference, outputs, split_name: str, score: float) -> Agreement:
    """A multi-label classifier's agreement: one row per flipped (input, label) decision."""
    base_prob, prob = torch.sigmoid(reference.float()), torch.sigmoid(outputs.float())
    base, comp = base_prob > 0.5, prob > 0.5
    rows, labels = torch.nonzero(base != comp, as_tuple=True)

    def own(p: torch.Tensor, yes: torch.Tensor) -> np.ndarray:
        chosen = p[rows, labels]
        return torch.where(yes[rows, labels], chosen, 1 - chosen).numpy()

    flipped = pd.DataFrame(
        {
            "index": rows.numpy(),
            "label": labels.numpy(),
            "baseline": base[rows, labels].to(torch.int64).numpy(),
            "compressed": comp[rows, labels].to(torch.int64).numpy(),
            "baseline_conf": own(base_prob, base),
            "compressed_conf": own(prob, comp),
        }
    )
    return Agreement(split_name, "yes/no per label", score, base.numel(), None, flipped)
