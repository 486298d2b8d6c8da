"""What a model is trained for and scored by: losses and scores of logits and of embeddings.

A loss is ``loss(outputs, targets, teacher) -> scalar`` (`LossFn`), where ``teacher`` is the
teacher's outputs on the same batch, or None. A score is ``score(outputs, targets) -> float``,
higher is better. Classifiers use `ce_loss` and `accuracy`: logits are ``(batch, classes)``, or
``(batch, ..., classes)`` for a decision per position (a token classifier's or a language model's
``(batch, tokens, classes)``, the class axis last, as Hugging Face's models return them), where
targets equal to `IGNORE_INDEX` (Hugging Face's and torch's -100, padding and special tokens) are
left out of both; embedding models, whose targets are
reference embeddings, use `cosine_loss` and `mean_cosine` (`neighbour_agreement` is a retrieval
check). A multi-label classifier's logits ``(batch, labels)`` are one yes/no decision per label
(``logit > 0``) against multi-hot targets: `bce_loss` and `label_accuracy`.
`prediction_agreement` compares two models' decisions rather than a model with targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``loss(outputs, targets, teacher_outputs) -> scalar``; a loss without a teacher ignores it.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
#: ``score(outputs, targets) -> float``, higher is better.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], float]

#: What a task's model outputs: class ``logits``, ``multilabel`` logits (an independent yes/no
#: per label), ``embeddings`` compared by cosine, or ``values`` (regression).
OUTPUTS = ("logits", "multilabel", "embeddings", "values")
#: The outputs whose models make decisions that two models can agree on (top-1 class, each
#: label's yes/no, nearest neighbour); a regression has none.
DECISIONS = ("logits", "multilabel", "embeddings")
#: Classifiers' outputs: their agreement is counted from their `decisions`, batch by batch.
CLASSIFIERS = ("logits", "multilabel")
#: A target that the default loss and accuracy of logits leave out (torch's and Hugging Face's).
IGNORE_INDEX = -100


class PositionsMismatch(ValueError):
    """Per-position logits whose positions are not the targets' (a SegFormer's logits at a
    quarter of its masks' resolution): no decision can be paired with its label."""


def positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, classes)`` logits and their ``(rows,)`` labels: per-position logits ``(batch,
    ..., classes)`` and labels ``(batch, ...)`` as one row per position; ``(batch, classes)``
    as it is.

    Raises:
        PositionsMismatch: If the logits decide at other positions than the labels label.
    """
    if logits.dim() <= 2:
        return logits, labels
    rows = logits.shape[:-1].numel()
    if labels.numel() != rows:
        per_sample = logits.shape[1:-1]
        raise PositionsMismatch(
            f"the logits {tuple(logits.shape)} (class axis last) decide at "
            f"{per_sample.numel():,} positions a sample ({'x'.join(map(str, per_sample))}), "
            f"the targets {tuple(labels.shape)} label {labels[0].numel():,}: a decision "
            "cannot be paired with its label. Give Task(output=...) a function returning the "
            "logits at the targets' positions (upsampled, say) for squeeze to pair them, or "
            "a loss= and metric= of your own that do"
        )
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy with the hard labels (per position for per-position logits; labels
    `IGNORE_INDEX` left out)."""
    return F.cross_entropy(*positions(logits, labels), ignore_index=IGNORE_INDEX)


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """Binary cross-entropy of each label's logit against multi-hot targets (0 / 1, or soft
    labels in between; entries `IGNORE_INDEX` left out)."""
    targets = targets.reshape(logits.shape).to(logits.dtype)
    kept = targets != IGNORE_INDEX
    if bool(kept.all()):
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.binary_cross_entropy_with_logits(logits[kept], targets[kept])


def cosine_loss(
    outputs: torch.Tensor, targets: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """Mean cosine distance ``1 - cos(output, target)`` over the batch."""
    return 1.0 - F.cosine_similarity(outputs, targets, dim=-1).mean()


def mse_loss(
    outputs: torch.Tensor, targets: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """Mean over the batch of the squared Euclidean distance between output and target (for unit
    vectors, twice the cosine distance)."""
    return (outputs - targets).pow(2).sum(dim=-1).mean()


def regression_loss(
    outputs: torch.Tensor, targets: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared error, element-wise (targets shaped like the outputs, or one value per row
    for a one-wide output); targets equal to `IGNORE_INDEX` (a per-token regression's padding,
    as a collate pads labels) are left out."""
    targets = targets.reshape(outputs.shape).to(outputs.dtype)
    kept = targets != IGNORE_INDEX
    if bool(kept.all()):
        return F.mse_loss(outputs, targets)
    return F.mse_loss(outputs[kept], targets[kept])


#: The losses between two outputs of a task's kind, by name (what distillation may match with).
LOSSES: dict[str, LossFn] = {"cosine": cosine_loss, "mse": mse_loss}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` against ``labels`` (over positions for per-position logits;
    labels `IGNORE_INDEX` left out)."""
    logits, labels = positions(logits, labels)
    kept = labels != IGNORE_INDEX
    return (logits[kept].argmax(dim=1) == labels[kept]).float().mean().item()


def label_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of a multi-label classifier's decisions (``logit > 0`` for each label of each
    sample) that match the targets (``> 0.5``; entries `IGNORE_INDEX` left out): Hamming
    accuracy."""
    targets = targets.reshape(logits.shape)
    kept = targets != IGNORE_INDEX
    return ((logits > 0) == (targets > 0.5))[kept].float().mean().item()


def decisions(outputs: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """What a classifier decided: the top-1 class of ``logits`` (int32, one per row or
    position), each label's yes/no of ``multilabel`` logits (bool, ``logit > 0``)."""
    if kind == "multilabel":
        return outputs > 0
    return outputs.argmax(dim=-1).to(torch.int32)


def decided(outputs: torch.Tensor, targets: object, kind: str = "logits") -> torch.Tensor:
    """A batch's `decisions` one after another (1-D): for per-position ``logits`` only at the
    positions whose target is not `IGNORE_INDEX` (padding and special tokens, whose number
    changes with each batch's padding), else every decision of every row."""
    made = decisions(outputs, kind)
    if (
        kind == "logits"
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and targets.shape == made.shape
    ):
        return made[targets != IGNORE_INDEX]
    return made.reshape(-1)


def r2_score(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Coefficient of determination R² of ``outputs`` against ``targets`` over the whole split
    (1 is perfect, 0 is predicting the mean; averaged uniformly over output columns). Where
    targets hold `IGNORE_INDEX` (a per-token regression padded to each batch's longest
    sequence), the values at the other positions are scored as one column."""
    predicted = outputs.reshape(len(outputs), -1).double()
    actual = targets.reshape(predicted.shape).double()
    kept = actual != IGNORE_INDEX
    if not bool(kept.all()):
        predicted, actual = predicted[kept].reshape(-1, 1), actual[kept].reshape(-1, 1)
    residual = (actual - predicted).pow(2).sum(dim=0)
    total = (actual - actual.mean(dim=0)).pow(2).sum(dim=0).clamp_min(1e-12)
    return float((1.0 - residual / total).mean())


def mean_cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine similarity between each output and its target embedding."""
    return F.cosine_similarity(outputs, targets, dim=-1).mean().item()


def neighbour_agreement(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (by cosine) is the same under ``outputs`` as under
    ``targets``: does retrieval with the compressed embeddings find what the original found?"""
    return (_nearest(outputs) == _nearest(targets)).float().mean().item()


def prediction_agreement(
    outputs: torch.Tensor, reference: torch.Tensor, *, kind: str = "logits"
) -> float:
    """Fraction of inputs on which a model decides as a reference model did (``reference``:
    the reference's outputs on the same inputs): the same top-1 class for ``logits`` (at every
    position, for per-position logits), the same yes/no for each label of ``multilabel``
    logits (the share of all labels' decisions), the same nearest other row
    (`neighbour_agreement`) for ``embeddings``. 1.0 for the reference itself.
    """
    if kind not in DECISIONS:
        raise ValueError(
            f"The 'kind' parameter must be one of {', '.join(map(repr, DECISIONS))}. "
            f"Got {kind!r} instead."
        )
    if outputs.shape != reference.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} and reference {tuple(reference.shape)} must have "
            "the same shape (one row per input, in the same order)."
        )
    if kind == "embeddings":
        return neighbour_agreement(outputs, reference)
    return (decisions(outputs, kind) == decisions(reference, kind)).float().mean().item()


class DecisionAgreement:
    """`prediction_agreement` of logits, accumulated batch by batch (``update`` / ``compute``
    / ``reset``, as a ``torchmetrics.Metric``): the share of the split's decisions (top-1
    classes, at every position for per-position logits; each label's yes/no for ``kind=
    "multilabel"``) equal to ``reference``'s. ``reference``: the reference model's decisions on
    the same split in the same order (`experiments.agreement_reference`, one after another, the
    positions whose target is `IGNORE_INDEX` left out, as `decided` leaves them), or its logits
    (whose every decision is counted). Only decisions are held, never the split's logits (a
    language model's would take samples x tokens x vocabulary floats)."""

    def __init__(self, reference: torch.Tensor, kind: str = "logits") -> None:
        self.kind = kind
        self.source = reference
        self.every = reference.is_floating_point()  # logits: no targets were there to skip
        self.reference = decisions(reference, kind).reshape(-1) if self.every else reference
        self.reset()

    def reset(self) -> None:
        self.count = self.same = 0

    def update(self, outputs: torch.Tensor, targets: object = None) -> None:
        made = decided(outputs, None if self.every else targets, self.kind)
        expected = self.reference[self.count : self.count + len(made)]
        if len(expected) != len(made):
            raise ValueError(
                f"outputs {tuple(outputs.shape)} after {self.count} decisions make "
                f"{len(made)} more, where the reference holds {len(self.reference)} in all "
                "(the same split, in the same order, is needed)"
            )
        self.count += len(made)
        self.same += int((made == expected).sum())

    @property
    def total(self) -> int:
        return self.count

    def compute(self) -> float:
        if self.count != len(self.reference):
            raise ValueError(
                f"{self.count} decisions were compared, where the reference holds "
                f"{len(self.reference)} (the same split, in the same order, is needed)"
            )
        return self.same / max(self.count, 1)

    def clone(self) -> DecisionAgreement:
        return DecisionAgreement(self.source, self.kind)


def _nearest(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    return similarity.argmax(dim=1)
