"""Failing trials: an exception, a NaN loss or an out-of-memory error fails that trial (with the
reason, the phase and the full traceback in Optuna and MLflow), the sweep goes on, retries are
configurable, and a sweep (or worker) where no trial completed exits 1."""

from __future__ import annotations

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from compressors import Compressor
from search import compose_config, run_sweep
from search.cli import main
from search.config.storage import open_storage
from search.failures import (
    failure_kind,
    failure_phase,
    failure_reason,
    failure_traceback,
    no_trial_completed,
    phase,
)
from search.run.budget import ATTEMPT_ATTR, RETRY_OF_ATTR
from tests.conftest import sweep_overrides


class Saboteur(Compressor):
    """A test-only compressor: trial 0 raises (naming itself and a layer in the error's notes,
    as compressors do), trial 1 asks for more memory than exists, trial 2 poisons the weights
    with NaN (the fine-tuning loss becomes NaN); later ones pass.

    It has no ``name`` in its body, so it is not registered next to the real methods.
    """

    def compress(self, model: torch.nn.Module, ctx) -> torch.nn.Module:
        number = ctx.seed  # the sweep's seed is 0: trial n (or a retry of trial n) has seed n
        if number == 0:
            err = ValueError("injected failure")
            err.add_note("compressor 'saboteur'")
            err.add_note("layer 'layers.0'")
            raise err
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


def _traceback_file(tmp_path, run) -> str:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    dst = tmp_path / "downloads" / run.info.run_id
    dst.mkdir(parents=True)
    return open(client.download_artifacts(run.info.run_id, "traceback.txt", str(dst))).read()


def _trials(tmp_path):
    return optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    ).trials


def test_exception_oom_and_nan_fail_their_trials_and_the_rest_complete(tmp_path, cache_dir):
    result = run_sweep(compose_config(_overrides(tmp_path, cache_dir, "search.n_trials=5")))
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    kinds = [t.user_attrs.get("fail_kind") for t in trials[:3]]
    assert kinds == ["error", "out_of_memory", "non_finite_loss"]
    phases = [t.user_attrs.get("fail_phase") for t in trials[:3]]
    assert phases == ["compress", "compress", "fine-tune"]
    assert trials[0].user_attrs["fail_reason"] == (
        "compress: compressor 'saboteur', layer 'layers.0': ValueError: injected failure"
    )
    assert trials[1].user_attrs["fail_reason"].startswith("compress: ")
    assert "can't allocate memory" in trials[1].user_attrs["fail_reason"]
    assert trials[2].user_attrs["fail_reason"].startswith("fine-tune: NonFiniteLossError: ")
    assert all("fail_phase" not in t.user_attrs for t in trials[3:])

    runs = _children(tmp_path)
    for number, kind in enumerate(kinds):
        assert runs[number].info.status == "FAILED"
        assert runs[number].data.tags["squeeze.fail_kind"] == kind
        assert runs[number].data.tags["squeeze.fail_phase"] == phases[number]
        assert (
            runs[number].data.tags["squeeze.fail_reason"]
            == trials[number].user_attrs["fail_reason"]
        )
    # The full traceback: where it was raised (this file), the notes, the error's last line.
    # (MLflow's copy is taken where the run ends, so it lacks the frames of Optuna's loop.)
    for stored in (trials[0].user_attrs["fail_traceback"], _traceback_file(tmp_path, runs[0])):
        assert stored.startswith("Traceback (most recent call last):")
        assert "in run_trial" in stored and "in compress" in stored and "raise err" in stored
        last = stored[stored.rindex("ValueError: injected failure") :].splitlines()
        assert {"compressor 'saboteur'", "layer 'layers.0'"} <= set(last)  # the notes
        assert last[-1] == "phase 'compress'"
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


def test_a_sweep_and_a_worker_where_no_trial_completes_exit_1(tmp_path, cache_dir, capsys):
    # An absurd learning rate makes every fine-tuning loss infinite or NaN: every trial fails.
    overrides = sweep_overrides(
        tmp_path, cache_dir, "space.pipeline=[prune]", "space.finetune.lr=1e30"
    )
    assert main(["sweep", "--quiet", *overrides, "search.n_trials=2"]) == 1
    out, err = capsys.readouterr()
    assert "2 trials (0 complete, 2 failed, 0 pruned)" in out  # still reports what it can
    assert err.startswith(
        "squeeze: no trial completed (2 failed: 2 in fine-tune; first reason: fine-tune: "
        "NonFiniteLossError: training loss became "
    )
    assert "See fail_reason and fail_traceback" in err and "traceback.txt" in err

    trials, runs = _trials(tmp_path), _children(tmp_path)
    assert [t.user_attrs["fail_phase"] for t in trials] == ["fine-tune", "fine-tune"]
    for trial in trials:
        traceback = trial.user_attrs["fail_traceback"]
        assert "NonFiniteLossError: training loss became" in traceback
        assert "in fit" in traceback and "phase 'fine-tune'" in traceback
        run = runs[trial.number]
        assert run.info.status == "FAILED" and run.data.tags["squeeze.fail_phase"] == "fine-tune"
        assert _traceback_file(tmp_path, run).endswith(traceback[-300:])

    # A worker joining with a larger budget runs the 2 trials left; none completes either.
    assert main(["worker", "--quiet", *overrides, "search.n_trials=4"]) == 1
    out, err = capsys.readouterr()
    assert "worker ran 2 trial(s)" in out
    assert err.startswith("squeeze: no trial completed (2 failed: 2 in fine-tune; ")
    # Once the budget is spent a worker runs nothing, which is no failure.
    assert main(["worker", "--quiet", *overrides, "search.n_trials=4"]) == 0


def test_the_innermost_phase_and_the_first_compressor_and_layer_notes_name_the_failure():
    with pytest.raises(AssertionError) as caught:
        with phase("measure"), phase("pack"):
            err = AssertionError("embed_dim must stay divisible by num_heads\nsecond line")
            err.add_note("layer 'encoder.layers.0.self_attn'")
            err.add_note("compressor 'structured'")
            err.add_note("compressor 'outer'")
            raise err
    err = caught.value
    assert failure_phase(err) == "pack"
    assert failure_reason(err) == (
        "pack: compressor 'structured', layer 'encoder.layers.0.self_attn': "
        "AssertionError: embed_dim must stay divisible by num_heads"
    )
    assert failure_reason(KeyError("x")) == "KeyError: 'x'" and failure_phase(KeyError()) is None
    with pytest.raises(optuna.TrialPruned) as pruned, phase("fine-tune"):
        raise optuna.TrialPruned("dominated")
    assert failure_phase(pruned.value) is None  # pruning is no failure
    with pytest.raises(ValueError, match="Unknown trial phase 'train'"), phase("train"):
        pass


def test_a_long_traceback_keeps_its_end():
    err = None
    for step in range(300):  # a chain of 300 causes, each with its own traceback
        try:
            raise ValueError(f"step {step}") from err
        except ValueError as caught:
            err = caught
    full = failure_traceback(err, limit=10**9)
    short = failure_traceback(err, limit=2_000)
    assert len(full) > 20_000 and len(short) < 2_100
    assert short.startswith("[... the first ") and short.endswith("ValueError: step 299\n")
    assert full.endswith(short.split("\n", 1)[1])
    assert 20_000 <= len(failure_traceback(err)) < 20_100  # the cap of ``fail_traceback``


def test_no_trial_completed_names_the_phases_and_the_first_reason():
    def failed(**attrs):
        return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)

    trials = [
        failed(fail_phase="pack", fail_reason="pack: OSError: No space left on device"),
        failed(fail_kind="worker_lost", fail_reason="worker host:12 is gone"),
        failed(fail_phase="measure", fail_reason="measure: objective values [nan] are not ..."),
        failed(fail_phase="pack", fail_reason="pack: OSError: No space left on device"),
        optuna.trial.create_trial(state=TrialState.PRUNED),
    ]
    assert no_trial_completed(trials) == (
        "no trial completed (4 failed: 2 in pack, 1 in measure, 1 elsewhere; 1 pruned; "
        "first reason: pack: OSError: No space left on device)"
    )
    done = optuna.trial.create_trial(state=TrialState.COMPLETE, values=[1.0])
    assert no_trial_completed([*trials, done]) is None and no_trial_completed([]) is None
