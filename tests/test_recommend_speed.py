"""Latency-first choices are honest: in a sweep whose objectives include a latency or a speed-up,
the recommended point and ``--pick knee`` weigh the score against that objective, and a point
slower than the baseline is never chosen for speed. No timings are asserted: the real sweep's
choice is checked against its own measured speed-ups."""

from __future__ import annotations

import contextlib
import io
import re

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution

from search import compose_config
from search.cli import main
from search.results.reuse import load_study, pick_trial
from search.run.recommend import SIZE_AXIS, cost_axis, recommend
from search.run.study_store import name_objectives
from tests.conftest import sweep_overrides

# (val_acc, size_bytes, speedup_b32) against a baseline of 0.98, all within 1 point: the
# smallest file, trial 3, is slower than the baseline (a 4-bit graph dequantizing at every run,
# say). Against size the front is trials 0 and 3; against speed, 0, 1 and 2, whose knee is 1
# (against their sizes, 0).
POINTS = [
    (0.979, 100_000, 1.05),
    (0.978, 90_000, 2.20),
    (0.976, 20_000, 2.40),
    (0.978, 500, 0.70),
]


def _study(objectives: list[str], points=POINTS) -> optuna.Study:
    directions = ["maximize", "minimize" if objectives[1] != "speedup_b32" else "maximize"]
    study = optuna.create_study(directions=directions)
    name_objectives(study, tuple(objectives))
    study.set_user_attr("baseline", {"val_acc": 0.98, "size_bytes": 400_000})
    for acc, size, speedup in points:
        metrics = {
            "val_acc": acc,
            "size_bytes": size,
            "speedup_b32": speedup,
            "latency_ms_b32": 1.0 / speedup,
        }
        study.add_trial(
            optuna.trial.create_trial(
                values=[acc, metrics[objectives[1]]],
                params={"prune.amount": 0.5},
                distributions={"prune.amount": FloatDistribution(0.0, 0.99)},
                user_attrs={"metrics": metrics},
            )
        )
    return study


def test_the_cost_axis_is_the_first_speed_objective():
    assert cost_axis(["val_acc", "size_bytes"]) == SIZE_AXIS
    assert cost_axis(["val_acc", "size_bytes", "latency_ms_b32", "speedup"]) == "latency_ms_b32"
    assert cost_axis(["val_acc", "speedup"]) == "speedup"


@pytest.mark.parametrize("speed", ["speedup_b32", "latency_ms_b32"])
def test_a_speed_objective_recommends_a_faster_point_never_a_slower_one(speed):
    by_size = _study(["val_acc", "size_bytes"])
    assert pick_trial(by_size, "recommended").number == 3  # the smallest file: 0.7x the speed
    study = _study(["val_acc", speed])
    for pick in ("recommended", "knee"):
        chosen = pick_trial(study, pick)
        assert chosen.user_attrs["metrics"]["speedup_b32"] >= 1.0, pick
        assert chosen.number == 1  # 2.2x for 0.1 point less
    front = pd.DataFrame(
        {
            "trial": range(4),
            "val_acc": [p[0] for p in POINTS],
            "size_bytes": [p[1] for p in POINTS],
            "speedup_b32": [p[2] for p in POINTS],
            "latency_ms_b32": [1.0 / p[2] for p in POINTS],
            "val_drop": [100 * (0.98 - p[0]) for p in POINTS],
        }
    )
    pick = recommend(front, objectives=["val_acc", speed])
    assert (pick.trial, pick.axis, pick.note) == (1, speed, "")


def test_a_knee_slower_than_the_baseline_is_never_chosen_for_speed():
    """Against speed alone, trial 1 (0.98x, 0.05 point below trial 0) is the knee; it is
    slower than the baseline, so the faster trial 2 is chosen, by `recommend` and export."""
    points = [(0.979, 30_000, 0.80), (0.9785, 20_000, 0.98), (0.972, 10_000, 1.02)]
    study = _study(["val_acc", "speedup_b32"], points)
    assert [t.number for t in study.best_trials] == [0, 1, 2]
    assert pick_trial(study, "recommended").number == 2
    assert pick_trial(study, "knee").number == 2


def test_when_no_point_is_faster_than_the_baseline_the_choice_is_by_size_and_says_so():
    slow = [(acc, size, 0.5 + i / 10) for i, (acc, size, _) in enumerate(POINTS)]  # 0.5-0.8x
    study = _study(["val_acc", "speedup_b32"], slow)
    assert pick_trial(study, "recommended").number == 3  # the smallest, as without speed
    front = pd.DataFrame(
        {
            "trial": range(4),
            "val_acc": [p[0] for p in slow],
            "size_bytes": [p[1] for p in slow],
            "speedup_b32": [p[2] for p in slow],
            "val_drop": [100 * (0.98 - p[0]) for p in slow],
        }
    )
    pick = recommend(front, objectives=["val_acc", "speedup_b32"])
    assert pick.axis == SIZE_AXIS
    assert "no point within the budget is faster than the baseline" in pick.note


@pytest.mark.slow
def test_a_real_sweep_on_speed_up_recommends_a_point_faster_than_the_baseline(tmp_path, cache_dir):
    """Four trials of digits, structured pruning of 0-90% of the neurons (one epoch of
    fine-tuning), optimising the validation score and the speed-up at batch 32: the point the
    sweep recommends is the one export picks; within a budget wide enough for every point, it is
    one whose measured speed-up is at least 1 (the fastest, of fewer than three such points);
    where none was measured faster, the choice is by size and says so."""
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=4",
        "search.sampler=random",
        "space.pipeline=[structured]",
        "space.structured.amount=choice(0.0, 0.3, 0.6, 0.9)",
        "space.finetune.epochs=1",
        "measure.latency_batch_sizes=[1,32]",
        "search.objectives=[val_acc,speedup_b32]",
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sweep", "--quiet", *overrides]) == 0
    printed = re.search(r"^\* recommended: trial (\d+)", out.getvalue(), re.MULTILINE)
    objectives = ("val_acc", "speedup_b32")
    (pareto,) = (tmp_path / "trials").glob("*/pareto.csv")
    front = pd.read_csv(pareto)
    pick = recommend(front, objectives=objectives)
    assert int(printed.group(1)) == pick.trial, out.getvalue()  # what the sweep marked *
    assert not pick.note or f"recommended point (*): {pick.note}" in out.getvalue()
    cfg = compose_config(overrides)
    study = load_study(cfg, pareto.parent.name)
    assert pick_trial(study, "recommended").number == pick.trial  # what export picks
    # every point within a wide budget (one epoch of fine-tuning moves digits by ~1 point)
    wide = recommend(front, max_drop=100, objectives=objectives)
    assert pick_trial(study, "recommended", max_drop=100).number == wide.trial
    front = front.set_index("trial")
    faster = front[front.speedup_b32 >= 1.0]
    if faster.empty:  # (measured, not assumed: a loaded machine may time no point faster)
        assert wide.axis == SIZE_AXIS and "faster than the baseline" in wide.note
    else:
        assert wide.axis == "speedup_b32" and wide.trial in faster.index
        if len(faster) < 3:  # (of fewer than three, the knee is the cheapest: the fastest)
            assert front.speedup_b32[wide.trial] == faster.speedup_b32.max()
