"""The recommended point everywhere: `export` picks it by default, `pareto.png` marks it; the
load snippet's error names what is registered; `inspect`'s FLOPs in a column of their own."""

from __future__ import annotations

import shutil

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution

from experiments.analysis import model_summary
from search import ConfigError
from search.cli import main
from search.results.reuse import load_registered, pick_trial
from search.run.pareto import front_figure
from search.run.progress import short_value
from tests.conftest import _empty_mlflow_db

# (val_acc, size_bytes) of a front against a baseline of 0.98: the knee of the whole front is
# trial 2, two points down; within 1 point (trials 0 and 1) the recommended one is trial 1.
POINTS = [(0.979, 100_000), (0.975, 20_000), (0.96, 5_000), (0.90, 4_000)]


def _study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("baseline", {"val_acc": 0.98, "size_bytes": 400_000})
    for acc, size in POINTS:
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, size],
                params={"prune.amount": 0.5},
                distributions={"prune.amount": FloatDistribution(0.0, 0.99)},
                user_attrs={"metrics": {"val_acc": acc, "size_bytes": size}},
            )
        )
    return study


def test_export_picks_the_recommended_point_by_default_not_the_knee_of_the_whole_front():
    study = _study()
    assert pick_trial(study, "knee").number == 2  # 2 validation points down
    assert pick_trial(study, "recommended").number == 1  # what the sweep marks *
    assert pick_trial(study, "knee", max_drop=1.0).number == 1  # README's equivalent
    assert pick_trial(study, "recommended", max_drop=0.5).number == 0
    # No point within the budget: the best-scoring one (where `--pick knee --max-drop` refuses).
    assert pick_trial(study, "recommended", max_drop=0.01).number == 0
    with pytest.raises(ConfigError, match="Allowed: recommended, knee, max-acc, min-size"):
        pick_trial(study, "best")


def test_a_front_with_no_knee_recommends_its_smallest_point_within_the_budget():
    """Found as a user (a multi-label ConvNeXt whose every fine-tuned point beat an
    under-trained baseline): no point lies above the line joining the front's ends, so the two
    ends tied and the first trial, the largest file, was recommended over one 24x smaller and
    also within the budget."""
    from search.run.recommend import knee_index, recommend

    # trial: (val, KB) of that sweep; baseline val 0.9358: all four are better than it.
    points = {0: (0.9813, 265.5), 1: (0.9769, 137.8), 2: (0.9759, 73.0), 5: (0.9700, 10.9)}
    front = pd.DataFrame(
        {
            "trial": list(points),
            "val_acc": [v for v, _ in points.values()],
            "size_bytes": [kb * 1000 for _, kb in points.values()],
            "val_drop": [100 * (0.9358 - v) for v, _ in points.values()],
        }
    )
    assert recommend(front).trial == 5
    # Outside a budget, such a front's knee is its best point, whatever the order.
    scores, sizes = front.val_acc.tolist(), front.size_bytes.tolist()
    assert knee_index(scores, sizes) == 0 and knee_index(scores[::-1], sizes[::-1]) == 3


def test_a_sweep_whose_trials_mostly_beat_the_baseline_says_it_looks_under_trained():
    from search.config.score import Score
    from search.run.recommend import baseline_note

    baseline = {"val_acc": 0.9358}
    # That sweep: six complete trials 3.4-4.5 points above the baseline, one failed.
    vals = [0.9813, 0.9769, 0.9759, 0.9679, 0.9600, 0.9700, None]
    trials = pd.DataFrame({"state": ["COMPLETE"] * 6 + ["FAIL"], "val_acc": vals})
    note = baseline_note(trials, baseline)
    assert "6 of 6 complete trials" in note and "median +3.7 pt" in note
    assert "under-trained" in note and "checkpoint=" in note
    # A usual sweep: compressed points at or below the baseline, a few slightly above.
    usual = pd.DataFrame({"state": ["COMPLETE"] * 5, "val_acc": [0.94, 0.93, 0.945, 0.90, 0.85]})
    assert baseline_note(usual, baseline) == ""
    assert baseline_note(trials.head(2), baseline) == ""  # too few to say
    # An error (lower is better): the median trial 2% or more below the baseline's MSE.
    errors = pd.DataFrame({"state": ["COMPLETE"] * 3, "val_acc": [0.95, 0.97, 0.99]})
    mse = Score(higher_is_better=False)
    assert "median +3.0 %" in baseline_note(errors, {"val_acc": 1.0}, mse)
    assert baseline_note(errors, {"val_acc": 0.98}, mse) == ""


def test_export_without_pick_means_recommended(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "default: recommended" in capsys.readouterr().out


def test_the_front_plot_rings_and_names_the_recommended_point():
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3],
            "state": "COMPLETE",
            "val_acc": [a for a, _ in POINTS],
            "size_bytes": [s for _, s in POINTS],
        }
    )
    front = trials.sort_values("size_bytes")
    base = {"val_acc": 0.98, "size_bytes": 400_000}
    fig = front_figure(trials, front, base, title="t", recommended=1)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "recommended: trial 1" in labels
    assert "trial 1" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    fig = front_figure(trials, front, base, title="t")  # no recommendation: nothing marked
    assert not any("recommended" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    plt.close(fig)


def test_recipe_values_are_rounded_to_three_significant_digits():
    assert short_value(0.0035412345) == "0.00354"
    assert short_value(0.6081234) == "0.608"
    assert short_value(4) == "4" and short_value("structured+quant") == "structured+quant"


def test_loading_a_model_that_is_not_registered_names_those_that_are(tmp_path):
    shutil.copyfile(_empty_mlflow_db(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_registered_model("digits_mlp-best")
    with pytest.raises(ConfigError, match="Registered models there: digits_mlp-best") as err:
        load_registered("digits_mlp-t7", tracking_uri=uri)
    assert err.value.__suppress_context__  # one line, not MLflow's traceback beneath it
    assert "squeeze run experiment=<name>" in str(err.value)


def test_inspect_prints_flops_in_a_column_of_their_own(digits_task):
    summary = model_summary(digits_task.build_model(), digits_task.example_inputs(1))
    total = summary.iloc[-1]
    assert total.layer == "total" and total.type == ""
    assert int(total["FLOPs/sample"]) > 0
    lines = summary.to_string(index=False).splitlines()
    header, last = lines[0], lines[-1]
    assert len(last) == len(header)  # every value under its header, none running into the next
    for name in ("parameters", "bytes", "FLOPs/sample"):  # numbers right-aligned to their header
        end = header.index(name) + len(name)
        assert last[:end].split()[-1] == str(total[name])
