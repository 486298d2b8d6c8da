"""Workloads: datasets, models, train and evaluate loops, the cached baseline.

Nothing here imports Optuna or MLflow; the search drives these functions.
"""

from __future__ import annotations

from experiments._baseline import Baseline, load_or_train_baseline
from experiments._task import Split, Task, TrainConfig, cv_folds
from experiments._training import (
    EpochStats,
    accuracy,
    ce_loss,
    evaluate,
    fit,
    predict_logits,
)

__all__ = [
    "Baseline",
    "EpochStats",
    "Split",
    "Task",
    "TrainConfig",
    "accuracy",
    "ce_loss",
    "cv_folds",
    "evaluate",
    "fit",
    "load_or_train_baseline",
    "predict_logits",
]
