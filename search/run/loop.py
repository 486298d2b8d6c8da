"""The trial loop of one worker: claim a trial of the budget, run it, tell Optuna how it ended.

Like Optuna's own loop (`optuna.study.Study.optimize`): `optuna.TrialPruned` makes a trial
PRUNED, any other error FAIL, and the loop goes on. Unlike it, every trial is claimed from the
study's shared `search.run.budget.Budget`, and a failed trial records why
(`search.failures.record_failure`). An interrupt
(``KeyboardInterrupt``) fails the running trial with ``fail_kind`` ``interrupted`` (the budget
runs it again) and stops the loop; so does `search._errors.SweepStopped` (a full disk, a database
that stays down), which the command line reports in one line.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState

from search._errors import SweepStopped
from search.failures import NonFiniteObjectiveError, record_failure
from search.run.budget import Budget
from search.run.interrupts import raise_if_interrupted

logger = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], tuple[float, ...]]
Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def run_trials(
    budget: Budget,
    objective: Objective,
    *,
    callbacks: Iterable[Callback] = (),
    timeout: float | None = None,
) -> int:
    """Run trials until the budget is spent (or ``timeout`` seconds passed); return how many."""
    study, start, count = budget.study, time.monotonic(), 0
    while timeout is None or time.monotonic() - start < timeout:
        raise_if_interrupted()  # a Ctrl-C swallowed during the last trial (in a __del__) stops here
        trial = budget.claim()
        if trial is None:
            break
        frozen = run_one(study, trial, objective)
        count += 1
        for callback in callbacks:
            callback(study, frozen)
    return count


def run_one(
    study: optuna.Study, trial: optuna.Trial, objective: Objective
) -> optuna.trial.FrozenTrial:
    """Run ``objective`` on a claimed trial and tell the study; errors end the trial FAIL."""
    try:
        with _heartbeat(study, trial):
            values = objective(trial)
    except optuna.TrialPruned as err:
        logger.info("trial %d pruned: %s", trial.number, err)
        return study.tell(trial, state=TrialState.PRUNED)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM in a worker: record it, then stop
        record_failure(trial, err)
        study.tell(trial, state=TrialState.FAIL)
        logger.warning("trial %d interrupted; rerunning the command runs it again", trial.number)
        raise
    except SweepStopped as err:  # a full disk, a database down: record it if it can, then stop
        try:
            record_failure(trial, err)
            study.tell(trial, state=TrialState.FAIL)
        except Exception as also:  # noqa: BLE001 - (its worker is then found lost: run again)
            logger.debug("trial %d could not be recorded as stopped: %s", trial.number, also)
        raise
    except Exception as err:
        reason = record_failure(trial, err)
        logger.warning("trial %d failed (%s)", trial.number, reason)
        frozen = study.tell(trial, state=TrialState.FAIL)
        _free_accelerator_memory()
        return frozen
    if not all(math.isfinite(v) for v in values):
        reason = record_failure(trial, NonFiniteObjectiveError(values))
        logger.warning("trial %d failed (%s)", trial.number, reason)
        return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, list(values))


@contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat in the background, if its storage keeps heartbeats."""
    storage = study._storage  # the storage Optuna wraps; it forwards heartbeats
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)  # (retried through an outage)
            except Exception as err:  # noqa: BLE001 - the trial's own next call meets it too
                logger.debug("trial %d: heartbeat stopped: %s", trial.number, err)
                return
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
