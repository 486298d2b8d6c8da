"""Knowledge distillation from the cached baseline's outputs during fine-tuning.

For a classifier the teacher's soft predictions are matched (Hinton et al.'s KL on logits; for a
multi-label classifier each label's softened probability, by binary cross-entropy); for an
encoder the teacher's embeddings are (cosine distance or squared distance, as in TinyBERT's and
DistilBERT's embedding losses). Either way the soft loss is mixed with the task's own loss.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from compressors._base import CompressionContext, Compressor, LossFn, cross_entropy
from compressors._params import Options, Real

#: The loss ``auto`` stands for, by what the task's model outputs.
AUTO_LOSS = {"logits": "kl", "multilabel": "bce", "embeddings": "cosine", "values": "mse"}
#: The soft losses on logits that take a temperature (the others are the task's, in its context).
SOFT_LOSSES = ("kl", "bce")
#: A position's label that marks no decision (padding): torch's ``cross_entropy`` ignores it.
IGNORED_LABEL = -100


def labelled(
    student: torch.Tensor, teacher: torch.Tensor, labels: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's outputs at the positions whose label is not
    `IGNORED_LABEL` (a collate's padding) where the outputs decide per position (logits
    ``(batch, positions..., classes)`` under labels ``(batch, positions...)``, or values as
    wide as their labels); else both as they are. The teacher's outputs at padding are no
    knowledge to distil."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        return student, teacher
    per_position = student.dim() == labels.dim() + 1 and student.shape[:-1] == labels.shape
    if not (per_position or (student.shape == labels.shape and labels.is_floating_point())):
        return student, teacher
    kept = labels != IGNORED_LABEL
    if bool(kept.all()):
        return student, teacher
    return student[kept], teacher[kept]


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (over
    every position for per-position logits ``(batch, ..., classes)``)."""
    classes = student.shape[-1]
    soft = F.kl_div(
        F.log_softmax(student.reshape(-1, classes) / temperature, dim=1),
        F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return temperature**2 * soft


def bce_soft_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float):
    """``T^2 *`` the binary cross-entropy of each label's ``sigmoid(student / T)`` against
    ``sigmoid(teacher / T)`` (a multi-label classifier's softened decisions), averaged over
    labels and the batch."""
    soft = F.binary_cross_entropy_with_logits(
        student / temperature, torch.sigmoid(teacher.to(student.dtype) / temperature)
    )
    return temperature**2 * soft


def distillation_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    loss: str | LossFn = "kl",
    task_loss: LossFn = cross_entropy,
) -> torch.Tensor:
    """``alpha * soft(student, teacher) + (1 - alpha) * task_loss(student, labels)``.

    Args:
        student: The student's outputs on a batch.
        labels: The batch's targets (class labels, or reference embeddings); the soft loss
            leaves out positions labelled `IGNORED_LABEL` (`labelled`).
        teacher: The teacher's outputs on the same batch.
        temperature: Softmax temperature of ``kl`` (unused by the embedding losses).
        alpha: Weight of the soft loss in [0, 1]; 0 is the task's loss alone.
        loss: ``kl`` (``T^2`` times the KL divergence of the softened predictions), ``bce``
            (``T^2`` times each label's binary cross-entropy of softened probabilities, for a
            multi-label classifier), or a loss between student and teacher outputs (the
            task's ``cosine`` or ``mse``, say).
        task_loss: The task's own loss (cross-entropy for a classifier).
    """
    hard = task_loss(student, labels, None)
    if alpha == 0.0:
        return hard
    student, teacher = labelled(student, teacher, labels)  # (not at padding)
    if loss == "kl":
        soft = kl_loss(student, teacher, temperature=temperature)
    elif loss == "bce":
        soft = bce_soft_loss(student, teacher, temperature=temperature)
    else:
        soft = loss(student, teacher, None)
    return alpha * soft + (1.0 - alpha) * hard


class Distillation(Compressor):
    """Fine-tune against the uncompressed baseline's outputs on the training split.

    Params:
        temperature: Softmax (sigmoid) temperature ``T`` (> 0) of both teacher and student
            (``kl`` and ``bce`` only).
        alpha: Weight of the soft loss in ``[0, 1]``; 0 is the task's loss alone.
        loss: ``kl`` for logits; ``bce`` for multi-label logits; ``cosine`` or ``mse`` (also
            for logits) for embeddings; ``mse`` for a regression's values; ``auto`` picks
            ``kl`` for a classifier, ``bce`` for a multi-label one, ``cosine`` for an encoder
            and ``mse`` for a regression.
    """

    name = "kd"
    kind = "loss"
    stage = 3
    requires = frozenset({"teacher"})  # the fine-tuning hands its outputs on each batch to the loss
    params = {
        "temperature": Real(0.0, math.inf, closed="neither", default=4.0),
        "alpha": Real(0.0, 1.0, default=0.5),
        "loss": Options(("auto", "kl", "bce", "cosine", "mse"), default="auto"),
    }
    output_params = {
        "logits": {"loss": Options(("auto", "kl", "mse"))},
        "multilabel": {"loss": Options(("auto", "bce", "mse"))},
        "embeddings": {"loss": Options(("auto", "cosine", "mse"))},
        "values": {"loss": Options(("auto", "mse"))},
    }

    def finetune_loss(self, ctx: CompressionContext) -> LossFn:
        self.check_outputs(ctx.outputs)
        loss = AUTO_LOSS[ctx.outputs] if self.loss == "auto" else self.loss
        if loss not in SOFT_LOSSES:
            if loss not in ctx.losses:
                raise ValueError(
                    f"compressor 'kd' with loss={loss!r} needs the task's {loss!r} loss in its "
                    f"context (CompressionContext.losses has {sorted(ctx.losses) or 'none'})"
                )
            loss = ctx.losses[loss]
        return partial(
            distillation_loss,
            temperature=self.temperature,
            alpha=self.alpha,
            loss=loss,
            task_loss=ctx.loss,
        )
