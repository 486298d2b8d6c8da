"""A regression's report and explanation say nothing of classification: no empty agreement,
flipped or attribution-fidelity tables (a regression makes no decisions), no link to a file that
is empty or absent, the metrics table and the parameters figure named by the score (R2Score,
not "acc" / "accuracy")."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pandas as pd
import pytest
import torch

from search.cli import main
from search.config.score import Score
from tests.conftest import sweep_overrides

#: The tables a regression has no rows for.
DECISION_TABLES = ("agreement.csv", "flipped.csv", "attribution_fidelity.csv")


@pytest.fixture(scope="module")
def report(tmp_path_factory, cache_dir):
    """`tests.test_score_name.r2_three` (three targets, torchmetrics' R2Score) swept for 2 trials
    and reported, over a report folder holding a previous report's empty tables."""
    tmp_path = tmp_path_factory.mktemp("regression_report")
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "r2_three.yaml").write_text(
        "_target_: tests.test_score_name.r2_three\nname: r2_three\n"
    )
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", space=None)
    args = ["--config-dir", str(tmp_path / "conf"), "task=r2_three", *overrides]
    folder = tmp_path / "trials" / "r2_three" / "report"
    before = os.getcwd()
    os.chdir(tmp_path)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert main(["sweep", "--quiet", *args]) == 0, err.getvalue()
            folder.mkdir(parents=True)
            for name in DECISION_TABLES:  # (what the report wrote before: one blank line)
                (folder / name).write_text("\n")
            assert main(["report", "--study", "r2_three", *args]) == 0, err.getvalue()
    finally:
        os.chdir(before)
    return folder


def test_a_regression_report_writes_no_empty_table_and_links_only_files_it_has(report):
    names = {p.name for p in report.iterdir()}
    assert not names & set(DECISION_TABLES), names
    points = list((report.parent / "explain").iterdir())
    assert points
    for point in points:  # each front point's own files
        own = {p.name for p in point.iterdir()}
        assert "bytes_per_layer.csv" in own and not own & set(DECISION_TABLES), own
    page = (report / "report.html").read_text()
    links = set(re.findall(r"href='([^']+)'", page))
    assert "metrics.csv" in links and "bytes_per_layer.csv" in links
    for link in links:
        assert (report / link).is_file() and (report / link).stat().st_size > 1, link
    assert "agreement with the baseline" not in page and "attribution fidelity" not in page
    assert "makes no decisions to agree on or to attribute" in page
    assert "held in memory" not in page  # (not why a regression has no attributions)


def test_a_regression_report_names_its_score_in_the_metrics_table_and_figures(report):
    metrics = pd.read_csv(report / "metrics.csv")
    assert "R2Score" in metrics.columns and "acc" not in metrics.columns
    assert metrics.R2Score.between(-1.0, 1.0).all()
    page = (report / "report.html").read_text()
    assert "<th>R2Score</th>" in page and "<th>acc</th>" not in page
    assert "<h3>params vs R2Score</h3>" in page and "params vs accuracy" not in page
    # (the figure's files keep their names: the README and links name them)
    assert (report / "params_vs_accuracy.png").is_file()
    assert "<a href='params_vs_accuracy.html'>" in page


def test_the_parameters_figure_is_headed_by_the_first_objective():
    from search.results.report import _titles

    assert _titles("val_acc", Score(name="accuracy")) == {
        "params_vs_accuracy": "params vs accuracy"
    }
    assert _titles("val_acc", Score(name="R2Score"))["params_vs_accuracy"] == "params vs R2Score"
    lower = Score(higher_is_better=False, name="mean_squared_error")
    assert _titles("val_acc", lower)["params_vs_accuracy"] == "params vs mean_squared_error"
    assert _titles("size_bytes", Score())["params_vs_accuracy"] == "params vs size_bytes"
    assert Score(name="<lambda>").head == "score" and Score().head == "acc"


def test_a_regression_on_splits_in_memory_is_scored_by_r2_when_it_names_no_metric():
    """Splits keep top-1 accuracy as their score unless given one: a regression built from
    them with no metric= was refused before training ("the metric accuracy failed on outputs
    float32[4, 3] ... IndexError"); its score is R², as for a regression's Dataset."""
    from experiments import Split, Task, TrainConfig, check_workload, r2_score

    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    split = Split(x, x.clone())
    task = Task(
        name="identity",
        train=split,
        val=split,
        test=split,
        num_classes=3,
        build_model=lambda: torch.nn.Linear(3, 3),
        train_config=TrainConfig(epochs=1),
        outputs="values",
    )
    assert task.val.score is r2_score
    check_workload(task, task.build_model())
