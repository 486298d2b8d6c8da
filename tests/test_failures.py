"""Failing trials: an exception, a NaN loss or an out-of-memory error fails that trial (with the
reason in Optuna and MLflow), the sweep goes on, and retries are configurable."""

from __future__ import annotations

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from compressors import Compressor
from search import compose_config, run_sweep
from search.budget import ATTEMPT_ATTR, RETRY_OF_ATTR
from search.failures import failure_kind
from search.storage import open_storage
from tests.conftest import sweep_overrides


class Saboteur(Compressor):
    """A test-only compressor: trial 0 raises, trial 1 asks for more memory than exists,
    trial 2 poisons the weights with NaN (the fine-tuning loss becomes NaN); later ones pass.

    It has no ``name`` in its body, so it is not registered next to the real methods.
    """

    def compress(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        number = ctx.seed  # the sweep's seed is 0: trial n (or a retry of trial n) has seed n
        if number == 0:
            raise ValueError("injected failure")
        if number == 1:
            torch.empty(1 << 60)  # a real allocation the allocator refuses
        if number == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return model


Saboteur.name = "saboteur"
TARGET = f"{__name__}.Saboteur"


def _overrides(tmp_path, cache_dir, *extra):
    return sweep_overrides(
        tmp_path,
        cache_dir,
        "space.pipeline=[saboteur]",
        f"+space.saboteur._target_={TARGET}",
        *extra,
    )


def _children(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("squeeze")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {int(r.data.tags["squeeze.trial"]): r for r in runs if "squeeze.trial" in r.data.tags}


def test_exception_oom_and_nan_fail_their_trials_and_the_rest_complete(tmp_path, cache_dir):
    result = run_sweep(compose_config(_overrides(tmp_path, cache_dir, "search.n_trials=5")))
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    kinds = [t.user_attrs.get("fail_kind") for t in trials[:3]]
    assert kinds == ["error", "out_of_memory", "non_finite_loss"]
    assert trials[0].user_attrs["fail_reason"] == "ValueError: injected failure"
    assert "can't allocate memory" in trials[1].user_attrs["fail_reason"]
    assert "NonFiniteLossError" in trials[2].user_attrs["fail_reason"]

    runs = _children(tmp_path)
    for number, kind in enumerate(kinds):
        assert runs[number].info.status == "FAILED"
        assert runs[number].data.tags["squeeze.fail_kind"] == kind
        assert (
            runs[number].data.tags["squeeze.fail_reason"]
            == trials[number].user_attrs["fail_reason"]
        )
    assert {runs[3].info.status, runs[4].info.status} == {"FINISHED"}
    assert set(result.front.trial) <= {3, 4} and not result.front.empty
    assert list(result.trials.fail_kind[:3]) == kinds


def test_a_retried_trial_reruns_the_same_recipe_with_the_same_seed(tmp_path, cache_dir):
    run_sweep(
        compose_config(
            _overrides(
                tmp_path,
                cache_dir,
                "search.n_trials=5",
                "search.retries=1",
                "search.retry_on=[out_of_memory]",
            )
        )
    )
    trials = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    ).trials
    # 0 error (not retried), 1 out of memory, 2 = the retry of 1 (same seed: out of memory again,
    # and not retried a second time), 3 and 4 complete; the retry used the budget like any trial.
    assert [t.user_attrs.get("fail_kind") for t in trials] == [
        "error",
        "out_of_memory",
        "out_of_memory",
        None,
        None,
    ]
    assert trials[2].user_attrs[RETRY_OF_ATTR] == 1 and trials[2].user_attrs[ATTEMPT_ATTR] == 2
    assert trials[2].params == trials[1].params


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "out_of_memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "out_of_memory"),
        (FloatingPointError("loss is nan"), "non_finite_loss"),
        (optuna.TrialPruned(), "pruned"),
        (KeyError("x"), "error"),
    ],
)
def test_failure_kinds(error, kind):
    assert failure_kind(error) == kind
