"""Workloads: datasets, models, train and evaluate loops, the cached baseline.

Nothing here imports Optuna or MLflow; the search drives these functions.
"""

from __future__ import annotations

from experiments._baseline import (
    Baseline,
    BaselineCacheError,
    FreshModel,
    build_fresh,
    load_or_train_baseline,
)
from experiments._checkpoint import checkpoint_digest, load_checkpoint, read_checkpoint
from experiments._checks import check_workload
from experiments._data import (
    Adapters,
    Batch,
    Data,
    Split,
    WorkloadError,
    as_data,
    call_model,
    describe,
    select_output,
)
from experiments._layout import CLASS_LAST, class_last
from experiments._objectives import (
    CLASSIFIERS,
    DECISIONS,
    LOSSES,
    OUTPUTS,
    DecisionAgreement,
    LossFn,
    ScoreFn,
    accuracy,
    bce_loss,
    ce_loss,
    cosine_loss,
    decisions,
    label_accuracy,
    mean_cosine,
    mse_loss,
    neighbour_agreement,
    prediction_agreement,
    r2_score,
    regression_loss,
)
from experiments._task import Task, TrainConfig, cv_folds
from experiments._training import (
    EpochStats,
    TrainStep,
    agreement_reference,
    evaluate,
    fit,
    is_streaming_metric,
    predict_outputs,
    scores,
)

__all__ = [
    "BaselineCacheError",
    "CLASSIFIERS",
    "DECISIONS",
    "LOSSES",
    "OUTPUTS",
    "Adapters",
    "Baseline",
    "Batch",
    "Data",
    "DecisionAgreement",
    "EpochStats",
    "TrainStep",
    "WorkloadError",
    "as_data",
    "call_model",
    "check_workload",
    "checkpoint_digest",
    "load_checkpoint",
    "read_checkpoint",
    "describe",
    "is_streaming_metric",
    "r2_score",
    "regression_loss",
    "select_output",
    "class_last",
    "CLASS_LAST",
    "LossFn",
    "ScoreFn",
    "Split",
    "Task",
    "TrainConfig",
    "accuracy",
    "agreement_reference",
    "bce_loss",
    "ce_loss",
    "decisions",
    "label_accuracy",
    "cosine_loss",
    "cv_folds",
    "evaluate",
    "fit",
    "load_or_train_baseline",
    "build_fresh",
    "FreshModel",
    "mean_cosine",
    "mse_loss",
    "neighbour_agreement",
    "predict_outputs",
    "prediction_agreement",
    "scores",
]
