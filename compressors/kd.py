"""Knowledge distillation from the cached baseline's logits during fine-tuning."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from compressors._base import Compressor
from compressors._params import Real
from experiments._training import LossFn


def distillation_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s loss: ``alpha * T^2 * KL(soft teacher || soft student) + (1-alpha) * CE``."""
    hard = F.cross_entropy(student, labels)
    if alpha == 0.0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class Distillation(Compressor):
    """Fine-tune against the uncompressed baseline's soft predictions.

    Params:
        temperature: Softmax temperature ``T`` (> 0) of both teacher and student.
        alpha: Weight of the soft loss in ``[0, 1]``; 0 is plain cross-entropy.
    """

    name = "kd"
    kind = "loss"
    stage = 3
    requires = frozenset({"teacher_logits"})
    params = {
        "temperature": Real(0.0, math.inf, closed="neither", default=4.0),
        "alpha": Real(0.0, 1.0, default=0.5),
    }

    def finetune_loss(self) -> LossFn:
        return partial(distillation_loss, temperature=self.temperature, alpha=self.alpha)
