"""Optuna storage on the PostgreSQL server every machine here runs (CI must run this, not skip)."""

from __future__ import annotations

import uuid

import optuna
from optuna.trial import TrialState

from search import compose_config, run_sweep
from tests.conftest import sweep_overrides


def test_sweep_and_resume_on_postgresql(tmp_path, cache_dir, pg_url):
    name = f"squeeze-test-{uuid.uuid4().hex[:8]}"
    try:
        for total in (2, 3):  # the second command continues the same study up to its budget
            overrides = sweep_overrides(
                tmp_path,
                cache_dir,
                f"search.n_trials={total}",
                f"search.study_name={name}",
                storage=pg_url,
            )
            result = run_sweep(compose_config(overrides))
            study = optuna.load_study(study_name=name, storage=pg_url)
            assert len(study.trials) == total
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        assert set(result.trials.mlflow_run_id) == {
            t.user_attrs["mlflow_run_id"] for t in study.trials
        }
        assert not result.front.empty
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)
