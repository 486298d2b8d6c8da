"""`bench/search_cost.py`: its legs (budgets in fine-tunes, overrides of their own) and the
front-against-epochs curve it prints."""

from __future__ import annotations

import importlib.util
import math
import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest

from search import compose_config
from search.config.fidelity import EPOCHS_ATTR, FIDELITY_ATTR
from search.run.pareto import hypervolume

_PATH = Path(__file__).resolve().parents[1] / "bench" / "search_cost.py"
_SPEC = importlib.util.spec_from_file_location("search_cost", _PATH)
cost = sys.modules.setdefault("search_cost", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(cost)


def test_a_full_leg_is_that_many_trials():
    leg = cost.parse_leg("full@30")
    assert leg.overrides(15) == ["search.n_trials=30"]
    assert leg.overrides(3) == ["search.n_trials=30"]


def test_a_screening_legs_budget_is_in_the_tasks_fine_tunes():
    leg = cost.parse_leg("screen2@10ft+m0.02+a10")
    common = ["search.n_trials=100000", "search.screen_epochs=2"]
    assert leg.overrides(15)[:3] == [common[0], "search.n_epochs=150", common[1]]
    assert leg.overrides(3)[:3] == [common[0], "search.n_epochs=30", common[1]]
    assert leg.overrides(15)[3:] == ["search.promote_margin=0.02", "search.promote_after=10"]
    assert cost.parse_leg("screen2@10").overrides(15) == cost.parse_leg("screen2@10ft").overrides(
        15
    )


def test_a_legs_own_overrides_follow_the_colon_and_compose():
    text = "screen1@10:search.warm_start=predicted,space.pipeline='choice(a, b)', seed=3"
    leg = cost.parse_leg(text)
    assert leg.name == text and leg.screen_epochs == 1
    assert leg.extra == ("search.warm_start=predicted", "space.pipeline='choice(a, b)'", "seed=3")
    assert leg.overrides(3)[-3:] == list(leg.extra)
    # The name as a folder is a value Hydra reads (no '=' or ':'), and the overrides compose.
    predicted = cost.parse_leg("screen2@10:search.warm_start=predicted")
    assert "=" not in predicted.folder and ":" not in predicted.folder
    cfg = compose_config([f"output_dir=/tmp/{predicted.folder}/trials", *predicted.overrides(15)])
    assert cfg.search.warm_start == "predicted" and cfg.search.n_epochs == 150
    assert cfg.search.screen_epochs == 2


def test_a_long_legs_folder_is_cut_and_told_apart_by_a_hash():
    """A leg with a list of warm starts names a folder longer than a file name may be."""
    recipes = ",".join(f"{{pipeline:structured+quant,structured.amount:0.{i}}}" for i in range(9))
    first, second = (cost.parse_leg(f"full@30:space.warm_start=[{recipes}],seed={s}") for s in "12")
    assert len(first.folder) <= 120 and len(second.folder) <= 120
    assert first.folder != second.folder and first.folder[:100] == second.folder[:100]
    assert cost.parse_leg("full@30").folder == "full@30"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("screen@10", "full@N or screenS@N"),
        ("full30", "full@N or screenS@N"),
        ("screen2@x", "full@N or screenS@N"),
        ("fast@3", "full@N or screenS@N"),
        ("full@30+a5", "screenS@N legs only"),
    ],
)
def test_a_bad_leg_names_the_form(text, message):
    with pytest.raises(ValueError, match=message):
        cost.parse_leg(text)


def _trial(number: int, minute: int, acc: float, size: float, *, screen: bool = False):
    """A complete trial (real Optuna) charged 2 epochs when screened, else none recorded (a
    full fine-tune of a study without an epoch budget)."""
    attrs = {"metrics": {"val_acc": acc, "size_bytes": size, "compression_ratio": 1e4 / size}}
    if screen:
        attrs.update({FIDELITY_ATTR: "screen", EPOCHS_ATTR: 2})
    trial = optuna.trial.create_trial(values=[acc, size], user_attrs=attrs)
    trial.number = number
    trial.datetime_start = datetime(2026, 1, 1) + timedelta(minutes=minute)
    trial.datetime_complete = trial.datetime_start + timedelta(seconds=30)
    return trial


def test_the_curve_counts_screens_epochs_but_not_their_points():
    ref = (0.5, 4.0)
    trials = [
        _trial(0, 0, 0.95, 2000.0, screen=True),  # a screened point better than any: ignored
        _trial(1, 1, 0.90, 1000.0),
        _trial(3, 2, 0.80, 500.0),  # finished before trial 2: counted first
        _trial(2, 3, 0.85, 100.0),
    ]
    tests = {1: 0.905, 3: 0.70, 2: 0.902}
    points = cost.curve(
        trials,
        [1, 2],
        full_epochs=15,
        ref=ref,
        test_score=lambda t: tests[t.number],
        baseline_test=0.91,
    )
    one = [(0.90, math.log10(1000.0))]
    two = [*one, (0.80, math.log10(500.0))]
    every = [*two, (0.85, math.log10(100.0))]
    # After 1 fine-tune's epochs (15): the screen (2) and trial 1 (15) do not both fit.
    assert points[0][:2] == (1, hypervolume([], reference=ref))
    assert points[1][:2] == (2, hypervolume(one, reference=ref))
    assert points[2][0] == pytest.approx(47 / 15)  # the end: 2 + 3 x 15 epochs
    assert points[2][1] == pytest.approx(hypervolume(every, reference=ref))
    # Best within 1 test point: trial 2 (100 bytes, 100x; its test 0.902 within 1 point of 0.91).
    assert points[1][2] == 10.0 and points[2][2] == 100.0
    assert points[0][2] is None


def test_a_run_that_stopped_short_of_a_milestone_has_no_figure_there():
    row = {"curve": [(10, 0.17, 16.9), (9.9, 0.17, 16.9)]}
    assert cost.at(row, 10) == (0.17, 16.9) and cost.at(row, 20) is None
