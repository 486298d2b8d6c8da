"""The search: command line, study driver, YAML space to Optuna, MLflow tracking, Pareto front."""

from __future__ import annotations

from search._errors import ConfigError
from search.config import compose_config
from search.space import Recipe, SearchSpace
from search.study import SweepPlan, SweepResult, plan_sweep, run_sweep

__all__ = [
    "ConfigError",
    "Recipe",
    "SearchSpace",
    "SweepPlan",
    "SweepResult",
    "compose_config",
    "plan_sweep",
    "run_sweep",
]
