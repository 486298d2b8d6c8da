"""The point of a Pareto front squeeze recommends: the knee of the points within a validation
budget of the baseline (`recommend`), or the best-scoring point when none is that close.

``squeeze sweep`` marks it ``*`` in its table, ``pareto.png`` and ``report.html`` mark it, and
``squeeze export`` exports it by default (``--pick recommended``).

The knee weighs the score against a cost: the packed file's size, or, in a sweep whose
objectives include a latency or a speed-up (`cost_axis`: the first of them), that objective's
latency (``1 / speedup`` for a speed-up). A point chosen for speed is never slower than the
baseline: points whose speed-up at that batch size is below 1 are left out; where no point
within the budget is faster, the point is chosen by size and `Recommendation.note` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from search.config.score import DEFAULT_SCORE, Score

#: The cost a knee is found against when a sweep's objectives include no latency or speed-up.
SIZE_AXIS = "size_bytes"

#: How much worse than the baseline on validation the point ``squeeze sweep`` recommends may be:
#: 1 point of a higher-is-better score (accuracy), 1% of the baseline's value of a lower-is-better
#: one (an MSE at most 1% above the baseline's).
RECOMMEND_MAX_DROP = 1.0


def knee_index(
    val_acc: Sequence[float], size_bytes: Sequence[float], *, within_budget: bool = False
) -> int:
    """The knee of a front given as scores (higher is better: a lower-is-better score comes
    negated, `Score.goodness`) and sizes (or any cost, lower is better: `costs`): the point
    farthest above the line joining the smallest file and the best model (score against log
    size, both scaled to [0, 1]). Of fewer than three points, or of a front with no point above
    that line: the smallest file when they all lie within a budget (``within_budget``: any of
    them is good enough), else the best."""
    acc = np.asarray(val_acc, dtype=float)
    size = np.log(np.asarray(size_bytes, dtype=float))
    if len(acc) < 3:
        return int(np.argmin(size)) if within_budget else int(np.argmax(acc))
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    s = (size - size.min()) / max(np.ptp(size), 1e-12)
    # Ends of the front: the smallest file and the most accurate model; the knee is the point
    # farthest above the straight line between them (a small, accurate point).
    i, j = int(np.argmin(s)), int(np.argmax(a))
    line = np.array([s[j] - s[i], a[j] - a[i]])
    distance = (line[0] * (a - a[i]) - line[1] * (s - s[i])) / max(np.linalg.norm(line), 1e-12)
    if distance.max() <= 1e-9:
        # No point above the line (a front bending the other way): no knee; its ends tie, so
        # choose as of fewer than three points rather than by the points' order.
        return i if within_budget else j
    return int(np.argmax(distance))


def cost_axis(objectives: Sequence[str]) -> str:
    """The cost a sweep's recommended point is chosen against: its first latency or speed-up
    objective (``latency_ms``, ``latency_ms_b32``, ``speedup``, ``speedup_b32``), else the
    packed file's size."""
    return next((o for o in objectives if _is_speed(o)), SIZE_AXIS)


def speedup_column(axis: str) -> str | None:
    """The speed-up metric at the batch size of a cost ``axis`` (None for size)."""
    if axis.startswith("speedup"):
        return axis
    if axis.startswith("latency_ms"):
        return "speedup" + axis.removeprefix("latency_ms")
    return None


def costs(points: pd.DataFrame, axis: str) -> list[float]:
    """Each point's cost along ``axis``, lower is better: bytes, milliseconds, or
    ``1 / speedup``."""
    values = points[axis].astype(float)
    return (1.0 / values).tolist() if axis.startswith("speedup") else values.tolist()


def faster_than_baseline(points: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The points a recommendation for speed may choose: a speed-up of at least 1 at the
    axis's batch size (all of them for size, or where no speed-up was measured)."""
    column = speedup_column(axis)
    if column is None or column not in points:
        return points
    return points[points[column].astype(float) >= 1.0]


def _is_speed(metric: str) -> bool:
    return metric.startswith("latency_ms") or metric.startswith("speedup")


def front_points(metrics: dict[int, dict], objectives: Sequence[str]) -> pd.DataFrame:
    """Front trials' ``trial``, ``val_acc`` and ``size_bytes`` (from each trial number's
    metrics), and the speed metrics a choice for speed reads (`cost_axis`) where every trial
    has them: the points `recommend` and `knee_trial` take."""
    axis = cost_axis(objectives)
    points = pd.DataFrame({"trial": list(metrics)})
    for column in dict.fromkeys(("val_acc", "size_bytes", axis, speedup_column(axis) or axis)):
        if all(column in m for m in metrics.values()):
            points[column] = [float(m[column]) for m in metrics.values()]
    return points


def knee_trial(
    points: pd.DataFrame, score: Score, *, within_budget: bool, objectives: Sequence[str] = ()
) -> int:
    """The trial at the knee of ``points`` (columns ``trial``, ``val_acc``, ``size_bytes``
    and the speed metrics of `cost_axis`; what ``--pick knee`` exports): against the sweep's
    speed objective, among the points at least as fast as the baseline, where any is; else
    against size."""
    axis = cost_axis(objectives)
    if axis in points and not faster_than_baseline(points, axis).empty:
        points = faster_than_baseline(points, axis)
    else:
        axis = SIZE_AXIS
    goodness = [score.goodness(v) for v in points.val_acc]
    index = knee_index(goodness, costs(points, axis), within_budget=within_budget)
    return int(points.trial.iloc[index])


@dataclass(frozen=True)
class Recommendation:
    """The front point ``squeeze sweep`` recommends, and why.

    Attributes:
        trial: Its trial number.
        within_budget: False: no point is within the budget; this is the best-scoring one.
        max_drop: The budget.
        score: The direction of the score and the unit of ``max_drop``.
        axis: The cost the knee was found against (`cost_axis`; ``size_bytes`` where no point
            within the budget was faster than the baseline).
        note: Why the axis is not the sweep's speed objective, or "".
    """

    trial: int
    within_budget: bool
    max_drop: float
    score: Score = DEFAULT_SCORE
    axis: str = SIZE_AXIS
    note: str = ""


def recommend(
    front: pd.DataFrame,
    *,
    max_drop: float = RECOMMEND_MAX_DROP,
    score: Score = DEFAULT_SCORE,
    objectives: Sequence[str] = (),
) -> Recommendation:
    """The knee of the front's points within ``max_drop`` of the baseline on validation (the
    trial ``squeeze export --pick knee --max-drop <max_drop>`` exports), or, when none is, the
    best-scoring point.

    Args:
        front: The front as `search.run.pareto.finish_study` reports it (columns ``trial``,
            ``val_acc``, ``size_bytes``, ``val_drop``, and the speed metrics the sweep
            measured), not empty.
        max_drop: The budget: validation points of a higher-is-better score, percent of the
            baseline's value of a lower-is-better one (the unit of ``val_drop``).
        score: Which way the task's score goes.
        objectives: The sweep's objectives: with a latency or speed-up among them, the knee is
            found against it and points slower than the baseline are left out (`cost_axis`).
    """
    points = front.sort_values("trial")  # the order of study.best_trials, as pick_trial sees it
    goodness = [score.goodness(v) for v in points.val_acc]
    inside = points[points.val_drop <= max_drop]
    axis = cost_axis(objectives)
    if inside.empty:
        best = points.assign(goodness=goodness).sort_values(
            ["goodness", "size_bytes"], ascending=[False, True]
        )
        return Recommendation(int(best.trial.iloc[0]), False, max_drop, score, axis)
    note = ""
    if axis != SIZE_AXIS:
        faster = faster_than_baseline(inside, axis)
        if faster.empty:
            note = (
                f"no point within the budget is faster than the baseline ({axis}); chosen by size"
            )
            axis = SIZE_AXIS
        else:
            inside = faster
    chosen = inside.iloc[
        knee_index(
            [score.goodness(v) for v in inside.val_acc], costs(inside, axis), within_budget=True
        )
    ]
    return Recommendation(int(chosen.trial), True, max_drop, score, axis, note)


#: `baseline_note`: how many budgets (`RECOMMEND_MAX_DROP`) above the baseline on validation
#: the median complete trial scores before the sweep says the baseline may be under-trained.
UNDERTRAINED_BUDGETS = 2.0


def baseline_note(
    trials: pd.DataFrame,
    baseline: dict[str, float],
    score: Score = DEFAULT_SCORE,
    max_drop: float = RECOMMEND_MAX_DROP,
) -> str:
    """A warning when compressing and fine-tuning mostly makes the model better: the median
    complete trial (of at least three) scores `UNDERTRAINED_BUDGETS` budgets or more above the
    baseline on validation, so the baseline is likely under-trained and each point's "change"
    mixes compression with the extra training; else ""."""
    done = trials[trials.state == "COMPLETE"] if "state" in trials else trials
    values = done["val_acc"].dropna() if "val_acc" in done else []
    if len(values) < 3 or "val_acc" not in baseline:
        return ""
    gains = sorted(score.change(v, baseline["val_acc"]) for v in values)
    median = float(np.median(gains))
    if median < UNDERTRAINED_BUDGETS * max_drop:
        return ""
    above = sum(g > max_drop for g in gains)
    return (
        f"{above} of {len(gains)} complete trials score above the baseline on validation by "
        f"more than {max_drop:g} {score.unit} (median {score.format_change(median)}): the "
        "baseline looks under-trained, so each point's change mixes compression with the "
        "fine-tuning's extra training; train the baseline longer (the task's train.epochs) or "
        "give a trained checkpoint=, then sweep again"
    )
