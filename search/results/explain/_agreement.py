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
    if kind == "embeddings":
        score = prediction_agreement(outputs, reference_outputs, kind=kind)
        return _neighbour_agreement(reference_outputs, outputs, split_name, score)
    if kind == "multilabel":
        score = prediction_agreement(outputs, reference_outputs, kind=kind)
        return _label_agreement(reference_outputs, outputs, split_name, score)
    decided = decide(reference_outputs, outputs, targets)
    return top1_agreement([decided], split_name, num_classes or outputs.shape[-1])


@dataclass(frozen=True)
class Decided:
    """One batch's (or split's) top-1 decisions of the baseline and the compressed model, one
    per sample, or per labelled position of per-position logits (padding and targets of -100
    are no decisions), in order (`decide`).

    Attributes:
        base, comp: The baseline's and the compressed model's classes.
        base_conf, comp_conf: Their softmax probabilities of their own class.
        labels: The true class of each decision, or None (no labels paired with them).
        sample: Each decision's sample in the batch.
        position: Its position in that sample's flattened positions (0 for one per sample).
        positions: Positions per sample in this batch (1 for one decision per sample).
        rows: Samples in the batch.
    """

    base: torch.Tensor
    comp: torch.Tensor
    base_conf: torch.Tensor
    comp_conf: torch.Tensor
    labels: torch.Tensor | None
    sample: torch.Tensor
    position: torch.Tensor
    positions: int
    rows: int


def decide(reference: torch.Tensor, outputs: torch.Tensor, targets: object) -> Decided:
    """`Decided` of logits ``(rows, classes)`` or ``(rows, ..., classes)`` and their targets:
    a batch's, so that a split's decisions never need its whole logits (a language model's
    50,257 classes at every token)."""
    classes, rows = outputs.shape[-1], outputs.shape[0]
    positions = outputs[0].numel() // classes if rows else 1
    reference, outputs = reference.reshape(-1, classes), outputs.reshape(-1, classes)
    flat = targets.reshape(-1) if isinstance(targets, torch.Tensor) else None
    usable = flat is not None and not flat.is_floating_point() and len(flat) == len(outputs)
    kept = torch.arange(len(outputs))
    if usable and positions > 1:  # (only labelled positions, as the trial's val_agreement)
        kept = kept[flat != IGNORE_INDEX]
        reference, outputs, flat = reference[kept], outputs[kept], flat[kept]
    base_prob, prob = reference.softmax(1), outputs.softmax(1)
    base, comp = base_prob.argmax(1), prob.argmax(1)
    return Decided(
        base=base,
        comp=comp,
        base_conf=base_prob.gather(1, base[:, None]).squeeze(1),
        comp_conf=prob.gather(1, comp[:, None]).squeeze(1),
        labels=flat if usable else None,  # (not a SegFormer's masks beside 1/4-size logits)
        sample=kept // positions,
        position=kept % positions,
        positions=positions,
        rows=rows,
    )


def top1_agreement(parts: list[Decided], split_name: str, classes: int) -> Agreement:
    """The `Agreement` of a split's top-1 decisions, from its batches' `Decided` in order:
    a flipped decision's ``index`` is its sample in the split (``sample x positions +
    position`` for per-position logits, the positions of the split's widest batch)."""

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    base, comp = cat("base"), cat("comp")
    offsets = torch.tensor([0, *(p.rows for p in parts)]).cumsum(0)[:-1]
    sample = torch.cat([p.sample + offset for p, offset in zip(parts, offsets, strict=True)])
    width = max(p.positions for p in parts)
    index = sample if width == 1 else sample * width + cat("position")
    labels = None if any(p.labels is None for p in parts) else cat("labels")
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
    flipped = pd.DataFrame(
        {
            "index": index[where].numpy(),
            "label": labels[where].numpy() if labels is not None else np.full(len(where), -1),
            "baseline": base[where].numpy(),
            "compressed": comp[where].numpy(),
            "baseline_conf": cat("base_conf")[where].numpy(),
            "compressed_conf": cat("comp_conf")[where].numpy(),
        }
    )
    score = float((base == comp).float().mean()) if len(base) else 1.0
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
