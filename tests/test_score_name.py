"""A task scored by something other than accuracy (torchmetrics' R2Score on 3 targets per
sample): the sweep's table, its caption, pareto.png's title, the study and the MLflow parent run
name the score, rather than heading an R² "val acc"."""

from __future__ import annotations

import contextlib
import io
import os

import mlflow
import numpy as np
import optuna
import torch
from torch import nn

from experiments import Split, Task, TrainConfig
from search.cli import main
from search.config.score import METRIC_ATTR, Score
from search.config.storage import open_storage
from search.run.progress import front_table
from tests.conftest import sweep_overrides


def r2_three(*, name: str = "r2_three", seed: int = 0, train: dict | None = None) -> Task:
    """Three float targets per sample from 10 features, scored by torchmetrics' R2Score."""
    from torchmetrics.regression import R2Score

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 10)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(10, 3))).astype("float32")
    cut = [0, 180, 240, 300]
    splits = [
        Split(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]))
        for a, b in zip(cut, cut[1:], strict=False)
    ]
    return Task(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=3,
        outputs="values",
        build_model=lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)),
        train_config=TrainConfig(**(train or {"epochs": 20, "lr": 3e-3})),
        metric=R2Score(multioutput="uniform_average"),
    )


def test_a_score_is_named_by_its_metric_and_only_accuracy_is_headed_acc():
    r2 = Score.of_task(r2_three())
    assert (r2.name, r2.higher_is_better) == ("R2Score", True)
    assert r2.columns == ("val score", "test score")
    assert r2 == Score()  # the name is not compared: same direction, same rules
    accuracy = Score(name="accuracy")
    assert accuracy.columns == ("val acc", "test acc") and Score().columns == accuracy.columns
    assert Score(name="label_accuracy").columns == accuracy.columns  # (a multi-label task's)
    assert Score(higher_is_better=False, name="accuracy").columns == ("val score", "test score")


def test_the_sweep_names_an_r2_score_in_its_table_study_and_mlflow_run(tmp_path, cache_dir):
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "r2_three.yaml").write_text(
        "_target_: tests.test_score_name.r2_three\nname: r2_three\n"
    )
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", space=None)
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(
                ["sweep", "--quiet", "--config-dir", str(tmp_path / "conf"), "task=r2_three"]
                + overrides
            )
    finally:
        os.chdir(before)
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "val acc" not in text and "test acc" not in text
    assert "val score" in text and "score: R2Score, higher is better" in text

    study = optuna.load_study(
        study_name="r2_three", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    assert study.user_attrs[METRIC_ATTR] == "R2Score"
    assert Score.of_study(study).columns == ("val score", "test score")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["squeeze.score"] == "R2Score (higher is better)"

    # explain: a regression has no decisions to agree on, and no empty table says otherwise
    out, err = io.StringIO(), io.StringIO()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(
                ["explain", "--study", "r2_three", "--config-dir", str(tmp_path / "conf")]
                + [o for o in overrides if not o.startswith(("space", "measure", "search.n_"))]
            )
    finally:
        os.chdir(before)
    assert code == 0, err.getvalue()
    assert "makes no decisions to agree on" in out.getvalue()
    assert "Agreement with the baseline" not in out.getvalue()


def test_an_old_study_without_a_metric_name_keeps_its_heads():
    import pandas as pd

    front = pd.DataFrame(columns=["trial", "val_acc", "test_acc", "size_bytes"])
    base = {"val_acc": 0.9, "test_acc": 0.9, "size_bytes": 1000.0}
    table = front_table(front, base, title="t", score=Score())
    assert [c.header for c in table.columns][1:3] == ["val acc", "test acc"]
    assert "score:" not in str(table.caption)


def test_inspect_calls_a_regression_one_and_names_its_score(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "r2_three.yaml").write_text(
        "_target_: tests.test_score_name.r2_three\nname: r2_three\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--config-dir", str(tmp_path / "conf"), "task=r2_three"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "task r2_three: a regression (outputs='values', num_classes=3: the output's width); "
        "score: R2Score, higher is better"
    )  # (not "task r2_three: 3 classes")
