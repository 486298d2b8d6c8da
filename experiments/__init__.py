"""Workloads: datasets, models, train and evaluate loops, the cached baseline.

Nothing here imports Optuna or MLflow; the search drives these functions.
"""

from __future__ import annotations

from experiments._baseline import Baseline, load_or_train_baseline
from experiments._objectives import (
    LOSSES,
    OUTPUTS,
    LossFn,
    ScoreFn,
    accuracy,
    ce_loss,
    cosine_loss,
    mean_cosine,
    mse_loss,
    neighbour_agreement,
    prediction_agreement,
)
from experiments._task import Split, Task, TrainConfig, cv_folds
from experiments._training import EpochStats, evaluate, fit, predict_outputs, scores

__all__ = [
    "LOSSES",
    "OUTPUTS",
    "Baseline",
    "EpochStats",
    "LossFn",
    "ScoreFn",
    "Split",
    "Task",
    "TrainConfig",
    "accuracy",
    "ce_loss",
    "cosine_loss",
    "cv_folds",
    "evaluate",
    "fit",
    "load_or_train_baseline",
    "mean_cosine",
    "mse_loss",
    "neighbour_agreement",
    "predict_outputs",
    "prediction_agreement",
    "scores",
]
