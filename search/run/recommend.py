"""The point of a Pareto front squeeze recommends: the knee of the points within a validation
budget of the baseline (`recommend`), or the best-scoring point when none is that close.

``squeeze sweep`` marks it ``*`` in its table, ``pareto.png`` and ``report.html`` mark it, and
``squeeze export`` exports it by default (``--pick recommended``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from search.config.score import DEFAULT_SCORE, Score

#: How much worse than the baseline on validation the point ``squeeze sweep`` recommends may be:
#: 1 point of a higher-is-better score (accuracy), 1% of the baseline's value of a lower-is-better
#: one (an MSE at most 1% above the baseline's).
RECOMMEND_MAX_DROP = 1.0


def knee_index(
    val_acc: Sequence[float], size_bytes: Sequence[float], *, within_budget: bool = False
) -> int:
    """The knee of a front given as scores (higher is better: a lower-is-better score comes
    negated, `Score.goodness`) and sizes: the point farthest above the line joining the
    smallest file and the best model (score against log size, both scaled to [0, 1]). Of fewer
    than three points: the smallest file when they all lie within a budget (``within_budget``:
    any of them is good enough), else the best."""
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
    return int(np.argmax(distance))


@dataclass(frozen=True)
class Recommendation:
    """The front point ``squeeze sweep`` recommends, and why."""

    trial: int
    within_budget: bool  # False: no point is within the budget; this is the best-scoring one
    max_drop: float
    score: Score = DEFAULT_SCORE  # the direction of the score and the unit of max_drop


def recommend(
    front: pd.DataFrame, *, max_drop: float = RECOMMEND_MAX_DROP, score: Score = DEFAULT_SCORE
) -> Recommendation:
    """The knee of the front's points within ``max_drop`` of the baseline on validation (the
    trial ``squeeze export --pick knee --max-drop <max_drop>`` exports), or, when none is, the
    best-scoring point.

    Args:
        front: The front as `search.run.pareto.finish_study` reports it (columns ``trial``,
            ``val_acc``, ``size_bytes``, ``val_drop``), not empty.
        max_drop: The budget: validation points of a higher-is-better score, percent of the
            baseline's value of a lower-is-better one (the unit of ``val_drop``).
        score: Which way the task's score goes.
    """
    points = front.sort_values("trial")  # the order of study.best_trials, as pick_trial sees it
    goodness = [score.goodness(v) for v in points.val_acc]
    inside = points[points.val_drop <= max_drop]
    if inside.empty:
        best = points.assign(goodness=goodness).sort_values(
            ["goodness", "size_bytes"], ascending=[False, True]
        )
        return Recommendation(int(best.trial.iloc[0]), False, max_drop, score)
    chosen = inside.iloc[
        knee_index(
            [score.goodness(v) for v in inside.val_acc],
            inside.size_bytes.tolist(),
            within_budget=True,
        )
    ]
    return Recommendation(int(chosen.trial), True, max_drop, score)
