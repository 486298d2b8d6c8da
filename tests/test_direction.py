"""A lower-is-better score (a regression scored by MSE): the study minimizes ``val_acc``, and the
front, its change columns, the recommended point, ``export --pick``, constraints, early stopping
and the hypervolume all judge it that way; a direction given against the task is refused."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.study import StudyDirection

from search import compose_config
from search.cli import main
from search.config.constraints import constraint_values
from search.config.early_stop import EarlyStop, _DominanceStop
from search.config.metrics import default_directions
from search.config.plan import plan_sweep
from search.config.score import DIRECTION_ATTR, Score
from search.config.storage import open_storage
from search.results.report import _front_rows, _front_table
from search.results.reuse import RECOMMEND_MAX_DROP, knee_index, pick_trial, recommend
from search.run.pareto import hypervolume
from search.run.study_store import name_objectives
from search.run.workload import build_task
from tests.conftest import sweep_overrides

ZOO_CONF = Path(__file__).parent / "zoo_conf"
ERROR = Score(higher_is_better=False)


# ----------------------------------------------------------------------------- the rules


def test_a_change_is_negative_when_worse_whichever_way_the_score_goes():
    accuracy = Score()
    assert accuracy.change(0.95, 0.97) == pytest.approx(-2.0)  # points
    assert accuracy.format_change(-2.0) == "-2.0 pt"
    assert ERROR.change(0.55, 0.50) == pytest.approx(-10.0)  # an MSE 10% above the baseline's
    assert ERROR.change(0.45, 0.50) == pytest.approx(10.0)
    assert ERROR.drop(0.505, 0.50) == pytest.approx(1.0)
    assert ERROR.format_change(-10.0, minus="−") == "−10.0 %"
    assert ERROR.format_change(0.01) == "0.0 %"
    assert ERROR.change(0.1, 0.0) == float("-inf")  # a perfect baseline: any error is worse
    assert ERROR.best_index([0.6, 0.4, 0.5]) == 1 and accuracy.best_index([0.6, 0.4]) == 0
    assert ERROR.hope(0.5, 0.02) == pytest.approx(0.49)  # a fraction of the error
    assert accuracy.hope(0.5, 0.02) == pytest.approx(0.52)  # in the score's units


def test_default_directions_follow_the_score_and_each_metric():
    objectives = ("val_acc", "size_bytes", "speedup_b256", "compression_ratio", "latency_ms")
    assert default_directions(objectives, score_higher_is_better=False) == (
        "minimize",
        "minimize",
        "maximize",
        "maximize",
        "minimize",
    )
    assert default_directions(("val_acc", "size_bytes")) == ("maximize", "minimize")


def test_a_bound_on_an_error_is_an_upper_bound():
    bound = {"val_acc": 0.5}
    assert constraint_values({"val_acc": 0.4}, bound, score_higher_is_better=False) == (
        pytest.approx({"val_acc": -0.1})  # met: an MSE below 0.5
    )
    assert constraint_values({"val_acc": 0.6}, bound, score_higher_is_better=False) == (
        pytest.approx({"val_acc": 0.1})
    )
    assert constraint_values({"val_acc": 0.4}, bound) == pytest.approx({"val_acc": 0.1})


def test_the_dominance_stop_hopes_for_a_lower_error():
    rule = EarlyStop(
        dominance=True,
        margin=0.1,
        min_epochs=1,
        objectives=("val_acc", "size_bytes"),
        directions=("minimize", "minimize"),
    )
    front = [(0.5, 1000.0)]  # an MSE of 0.5 in a smaller file
    stop = _DominanceStop(rule, {"size_bytes": 2000.0}, front)
    stop(SimpleNamespace(epoch=1, val_acc=0.55))  # 0.55 - 10% = 0.495 could still beat 0.5
    with pytest.raises(optuna.TrialPruned, match="lower is better"):
        stop(SimpleNamespace(epoch=1, val_acc=0.6))  # 0.54 at best: dominated


def test_the_hypervolume_of_an_error_is_measured_below_it():
    points = [(0.5, 50.0), (0.2, 80.0), (0.6, 90.0)]  # the last is dominated
    # reference: an MSE of 1.0 and 100 bytes; 30 * 0.5 + 20 * 0.8
    assert hypervolume(points, reference=(1.0, 100.0), score=ERROR) == pytest.approx(31.0)


# ----------------------------------------------------------------------------- picking points

#: (val MSE, size) of four front points; the baseline's MSE is 0.5.
POINTS = [(0.498, 10_000.0), (0.499, 3_000.0), (0.504, 1_500.0), (0.600, 500.0)]


def _error_study(with_attr: bool = True) -> optuna.Study:
    """A real in-memory study minimizing (MSE, size) with the four `POINTS` as trials."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    name_objectives(study, ("val_acc", "size_bytes"))
    study.set_user_attr("baseline", {"val_acc": 0.5, "size_bytes": 20_000.0})
    if with_attr:
        study.set_user_attr(DIRECTION_ATTR, "minimize")
    for value, size in POINTS:
        study.add_trial(
            optuna.trial.create_trial(
                values=[value, size],
                user_attrs={"metrics": {"val_acc": value, "size_bytes": size}},
            )
        )
    return study


def _front_frame() -> pd.DataFrame:
    front = pd.DataFrame(
        [{"trial": i, "val_acc": v, "size_bytes": s} for i, (v, s) in enumerate(POINTS)]
    )
    front["val_drop"] = [ERROR.drop(v, 0.5) for v in front.val_acc]
    return front


def test_the_recommended_point_is_the_knee_of_the_lowest_errors_within_one_percent():
    # within 1% of the baseline's MSE: trials 0-2 (0.504 is 0.8% above it); trial 3 is 20% worse.
    # The knee of those three: trial 1, nearly the lowest error in a third of the size.
    pick = recommend(_front_frame(), score=ERROR)
    assert (pick.trial, pick.within_budget, pick.max_drop) == (1, True, RECOMMEND_MAX_DROP)
    study = _error_study()
    assert pick_trial(study, "knee", max_drop=1.0).number == 1
    assert pick_trial(study, "max-acc").number == 0  # the lowest MSE
    assert pick_trial(study, "min-size").number == 3
    assert pick_trial(study, "max-acc", max_drop=0.0).number == 0  # better than the baseline
    with pytest.raises(ValueError, match="within -0.5% of the baseline's validation score"):
        pick_trial(study, "knee", max_drop=-0.5)  # none is 0.5% better than the baseline
    # A study from before the direction was recorded: its objective's direction says it
    assert pick_trial(_error_study(with_attr=False), "knee", max_drop=1.0).number == 1


def test_with_no_point_within_the_budget_the_lowest_error_is_recommended():
    front = _front_frame()[lambda f: f.trial >= 2]  # 0.8% and 20% above the baseline
    pick = recommend(front, max_drop=0.5, score=ERROR)
    assert (pick.trial, pick.within_budget) == (2, False)


def test_the_knee_takes_scores_as_higher_is_better():
    errors = [v for v, _ in POINTS[:3]]
    sizes = [s for _, s in POINTS[:3]]
    assert knee_index([-e for e in errors], sizes, within_budget=True) == 1


def test_report_html_signs_an_errors_change_negative_when_it_grows():
    trials = pd.DataFrame(
        [
            {"trial": 0, "size_bytes": 2000.0, "compression_ratio": 5.0, "val_acc": 0.55},
            {"trial": 1, "size_bytes": 4000.0, "compression_ratio": 2.5, "val_acc": 0.45},
        ]
    )
    tests = {"baseline": 0.40, "trial 0": 0.44, "trial 1": 0.38}
    rows = _front_rows(
        trials, [0, 1], {"val_acc": 0.5, "size_bytes": 10_000.0}, tests, {0: "a", 1: "b"}, ERROR
    )
    page = _front_table(rows, "MeanSquaredError, lower is better", ERROR)
    cells = re.findall(r"<td>([^<]*)</td>", page)
    # trial 0: MSE 10% above the baseline's on validation, 10% on test; trial 1: 10% and 5% below
    assert cells[7:14] == ["trial 0", "2.00", "5.0×", "0.5500", "−10.0 %", "0.4400", "−10.0 %"]
    assert cells[14:21] == ["trial 1", "4.00", "2.5×", "0.4500", "+10.0 %", "0.3800", "+5.0 %"]
    assert "in percent of the baseline's (%): negative is a loss" in page


# ----------------------------------------------------------------------------- a real sweep


@contextlib.contextmanager
def _in(folder):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _squeeze(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mse_sweep(tmp_path_factory, cache_dir):
    """A 3-trial `squeeze sweep` of a regression scored by torchmetrics' MeanSquaredError."""
    work = tmp_path_factory.mktemp("mse")
    overrides = sweep_overrides(work, cache_dir, "search.n_trials=3", space=None)
    args = ["--config-dir", str(ZOO_CONF), "task=wl_regression_mse", *overrides]
    with _in(work):
        code, out, err = _squeeze(["sweep", "--quiet", *args])
    assert code == 0, err
    study = optuna.load_study(
        study_name="wl_regression_mse", storage=open_storage(f"{work}/optuna.journal")
    )
    return work, args, out, study


def _front(study: optuna.Study) -> dict[int, tuple[float, float]]:
    """The non-dominated complete trials, lowest MSE and smallest file (computed here)."""
    done = {
        t.number: (t.user_attrs["metrics"]["val_acc"], t.user_attrs["metrics"]["size_bytes"])
        for t in study.trials
        if t.state.name == "COMPLETE"
    }

    def dominated(a, b):  # b dominates a
        return b[0] <= a[0] and b[1] <= a[1] and b != a

    return {n: p for n, p in done.items() if not any(dominated(p, q) for q in done.values())}


def test_the_study_minimizes_the_error_and_records_it(mse_sweep):
    _, _, _, study = mse_sweep
    assert study.directions == [StudyDirection.MINIMIZE, StudyDirection.MINIMIZE]
    assert study.user_attrs[DIRECTION_ATTR] == "minimize"
    assert Score.of_study(study) == ERROR
    assert {t.number for t in study.best_trials} == set(_front(study))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_the_table_says_how_much_worse_each_point_is_negative_for_a_higher_error(mse_sweep):
    work, _, out, study = mse_sweep
    baseline = study.user_attrs["baseline"]
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 8 and cells[1].removeprefix("* ").isdigit():
            rows[int(cells[1].removeprefix("* "))] = cells
    assert set(rows) == set(_front(study))
    assert "val score" in out and "lower is better; negative: a loss" in out
    csv = pd.read_csv(work / "trials" / "wl_regression_mse" / "pareto.csv").set_index("trial")
    for number, cells in rows.items():
        for column, split, key in ((6, "val", "val_acc"), (7, "test", "test_acc")):
            value = csv.loc[number, key]
            expected = 100 * (baseline[key] - value) / baseline[key]  # + when the MSE is lower
            shown = float(cells[column].removesuffix(" %"))
            assert cells[column].endswith(" %")
            assert shown == pytest.approx(expected, abs=0.051), (split, cells)
            assert csv.loc[number, f"{split}_drop"] == pytest.approx(-expected)


def test_the_recommended_point_and_export_knee_are_the_lowest_error_within_one_percent(
    mse_sweep,
):
    work, args, out, study = mse_sweep
    baseline = study.user_attrs["baseline"]["val_acc"]
    front = _front(study)
    inside = {n: p for n, p in front.items() if 100 * (p[0] - baseline) / baseline <= 1.0}
    if len(inside) >= 3:
        numbers = sorted(inside)
        expected = numbers[
            knee_index([-inside[n][0] for n in numbers], [inside[n][1] for n in numbers])
        ]
    elif inside:  # any of them is good enough: the smallest
        expected = min(inside, key=lambda n: inside[n][1])
    else:  # none: the lowest MSE
        expected = min(front, key=lambda n: front[n][0])
    line = next(x for x in out.splitlines() if x.startswith("* recommended: trial "))
    assert int(line.removeprefix("* recommended: trial ").split()[0]) == expected
    assert "within 1% of the baseline's validation score" in line
    assert ("no point is within 1%" in line) == (not inside)  # (the line says which case)
    # export writes into the last --config-dir: this test's own, not tests/zoo_conf
    export = ["export", "--study", "wl_regression_mse", "--force", *args, "--config-dir", "conf"]
    for pick, wanted in (
        (["--pick", "knee", "--max-drop", str(RECOMMEND_MAX_DROP)], expected if inside else None),
        (["--pick", "max-acc"], min(front, key=lambda n: front[n][0])),
    ):
        with _in(work):
            code, printed, err = _squeeze([*export, *pick])
        if wanted is None:  # nothing within the budget: export says so
            assert code == 2 and "within 1% of the baseline's" in err
            continue
        assert code == 0, err
        written = re.search(r"wl_regression_mse-t(\d+)\.yaml", printed)
        assert written and int(written.group(1)) == wanted, printed
        assert (work / "conf" / "experiment" / written.group(0)).exists()


def test_maximizing_an_error_is_refused_before_anything_is_created(tmp_path, cache_dir):
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=3", space=None)
    (tmp_path / "mlflow.db").unlink()  # (a copy the helper made; the sweep must not make one)
    code, _, err = _squeeze(
        [
            "sweep",
            "--quiet",
            "--config-dir",
            str(ZOO_CONF),
            "task=wl_regression_mse",
            "search.directions=[maximize,minimize]",
            *overrides,
        ]
    )
    assert code == 2
    assert "'search.directions'" in err and "MeanSquaredError, where lower is better" in err
    assert "search.directions=[minimize,minimize]" in err
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_study_keeps_its_fingerprint_whether_its_directions_are_given_or_defaulted(tmp_path):
    plans = {}
    for directions in ("null", "[maximize,minimize]"):
        cfg = compose_config([f"search.directions={directions}", f"cache_dir={tmp_path}"])
        plan = plan_sweep(cfg, connect=False)
        plans[directions] = plan.for_task(build_task(plan))
    assert plans["null"].directions == ("maximize", "minimize")
    assert plans["null"].fingerprint == plans["[maximize,minimize]"].fingerprint
