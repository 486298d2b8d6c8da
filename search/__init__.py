"""The search: command line, study driver, YAML space to Optuna, MLflow tracking, Pareto front.

Names are imported on first use, so that importing one small module of this package (as the
MLflow writer process does) does not import the whole stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "search._errors",
    "compose_config": "search.config",
    "Recipe": "search.space",
    "SearchSpace": "search.space",
    "SweepResult": "search.pareto",
    "SweepPlan": "search.plan",
    "plan_sweep": "search.plan",
    "run_sweep": "search.study",
    "run_worker": "search.study",
    "export_trial": "search.reuse",
    "run_experiment": "search.reuse",
    "load_registered": "search.reuse",
    "build_report": "search.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
