"""Constraints from ``search.constraints``: bounds on a trial's metrics, given to Optuna.

Each constraint becomes ``trial.set_constraint(name, value)`` with ``value <= 0`` when it holds;
Optuna's samplers use them, and ``study.best_trials`` (the reported front) keeps only trials that
meet all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from search._errors import ConfigError
from search.config.metrics import HIGHER_IS_BETTER, higher_is_better

#: Metrics where a constraint is a lower bound (``val_acc``: when the task's score is better
#: higher, see `constraint_values`); every other one is an upper one.
LOWER_BOUNDS = frozenset({"val_acc", *HIGHER_IS_BETTER})
#: Constraint names that are a scaled metric: name -> (metric, factor).
SCALED = {"size_kb": ("size_bytes", 1e-3)}
#: Metrics that no trial measures at 0 or below: an upper bound of 0 or less cannot be met.
POSITIVE = frozenset(
    {"size_bytes", "size_kb", "nonzero_params", "flops", "latency_ms", "peak_memory_bytes"}
)
#: Metrics that are fractions in [0, 1]: a lower bound above 1 (an upper one below 0) cannot be met.
FRACTIONS = frozenset({"val_agreement", "compressed_fraction"})


def allowed_names(metrics: Iterable[str]) -> list[str]:
    """Constraint names for a sweep measuring ``metrics``."""
    return sorted({*metrics, *SCALED})


def check_constraints(given: Mapping[str, object], metrics: Iterable[str]) -> dict[str, float]:
    """The set constraints of ``search.constraints`` (``null`` ones dropped), checked.

    Raises:
        ConfigError: For an unknown name or a bound that is not a finite number.
    """
    allowed = allowed_names(metrics)
    out = {}
    for name, bound in given.items():
        if name not in allowed:
            raise ConfigError(
                f"Unknown constraint {name!r} in search.constraints. Allowed: {', '.join(allowed)}."
            )
        if bound is None:
            continue
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
        ):
            raise ConfigError(
                f"The 'search.constraints.{name}' config value must be a finite number or null. "
                f"Got {bound!r} instead."
            )
        _check_possible(name, float(bound))
        out[name] = float(bound)
    return out


def _check_possible(name: str, bound: float) -> None:
    """Refuse a bound no trial can meet (``val_acc``'s depends on the task's metric: see
    `check_score_bound`)."""
    allowed = None
    if (name in POSITIVE or name.startswith("latency_ms_b")) and bound <= 0:
        allowed = "a number in (0, inf) or null: an upper bound, and no trial measures 0 or less"
    elif name in FRACTIONS and (bound > 1 if name in LOWER_BOUNDS else bound < 0):
        side = "a lower" if name in LOWER_BOUNDS else "an upper"
        allowed = f"a number in [0, 1] or null: {side} bound on a fraction"
    if allowed is not None:
        raise ConfigError(
            f"The 'search.constraints.{name}' config value cannot be met: it must be {allowed}. "
            f"Got {bound:g} instead."
        )


def check_score_bound(bounds: Mapping[str, float], *, task: str, metric: str) -> None:
    """Refuse a lower bound on ``val_acc`` above 1 for a task scored by ``metric`` (a score
    that is at most 1: accuracy, mean cosine, R²).

    Raises:
        ConfigError: If ``search.constraints.val_acc`` is above 1.
    """
    bound = bounds.get("val_acc")
    if bound is not None and bound > 1:
        raise ConfigError(
            f"The 'search.constraints.val_acc' config value cannot be met: task {task!r} scores "
            f"val_acc with {metric}, which is at most 1, and the constraint is a lower bound. "
            f"Allowed: a number <= 1 or null. Got {bound:g} instead."
        )


def constraint_values(
    metrics: Mapping[str, float],
    bounds: Mapping[str, float],
    *,
    score_higher_is_better: bool = True,
) -> dict[str, float]:
    """Optuna's constraint value of each bound: ``<= 0`` when ``metrics`` meet it.

    A bound on a metric that is better higher (`search.config.metrics.higher_is_better`) is a
    lower bound, on any other an upper bound; ``val_acc``'s is a lower bound when the task's
    score is better higher (``score_higher_is_better``), an upper bound when it is an error
    (``val_acc=0.3``: an MSE of at most 0.3). Bounds on metrics not in ``metrics`` are left out.
    """
    out = {}
    for name, bound in bounds.items():
        metric, factor = SCALED.get(name, (name, 1.0))
        if metric not in metrics:
            continue
        value = float(metrics[metric]) * factor
        lower = higher_is_better(metric, score_higher_is_better=score_higher_is_better)
        out[name] = bound - value if lower else value - bound
    return out
