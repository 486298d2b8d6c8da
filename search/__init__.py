"""The search: command line, study driver, YAML space to Optuna, MLflow tracking, Pareto front.

Names are imported on first use, so that importing one small module of this package (as the
MLflow writer process does) does not import the whole stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "search._errors",
    "compose_config": "search.config.compose",
    "Recipe": "search.config.space",
    "SearchSpace": "search.config.space",
    "SweepResult": "search.run.pareto",
    "SweepPlan": "search.config.plan",
    "plan_sweep": "search.config.plan",
    "run_sweep": "search.run.study",
    "run_worker": "search.run.study",
    "export_trial": "search.results.reuse",
    "run_experiment": "search.results.reuse",
    "load_registered": "search.results.reuse",
    "build_report": "search.results.report",
    "Explanation": "search.results.explain",
    "explain_trial": "search.results.explain",
    "explain_model": "search.results.explain",
    "byte_breakdown": "search.results.explain",
    "agreement_report": "search.results.explain",
    "attribution_fidelity": "search.results.explain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
