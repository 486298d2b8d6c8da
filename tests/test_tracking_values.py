"""Metrics reach MLflow as the numbers they are: a float32 score (torchmetrics') is logged as its
shortest decimal, so MLflow's UI shows 0.975, not 0.9750000238418579."""

from __future__ import annotations

import shutil

import torch
from mlflow.tracking import MlflowClient

from search.run.tracking import Tracker
from tests.conftest import _empty_mlflow_db


def test_float32_scores_are_logged_as_their_shortest_decimal(tmp_path):
    shutil.copyfile(_empty_mlflow_db(), tmp_path / "mlflow.db")  # (MLflow's migrations: once)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "squeeze")
    try:
        score = torch.tensor(0.975).item()  # 0.9750000238418579
        run_id = tracker.start_parent(
            run_id=None,
            name="p",
            params={},
            metrics={"val_acc": score, "third": 1 / 3, "size_bytes": 2**40 + 1},
            tags={},
            artifacts=[],
        )
        tracker.wait()
    finally:
        tracker.close()
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["val_acc"] == 0.975
    assert logged["third"] == 1 / 3  # a float64 is kept to the last bit
    assert logged["size_bytes"] == 2**40 + 1
