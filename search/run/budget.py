"""The study's total budget, shared by every worker of every machine, claimed one trial at a time.

A worker claims a trial under a lock held across workers (a PostgreSQL advisory lock for a
database server, a file lock for a journal or SQLite file): it fails the trials of lost workers,
enqueues a rerun of each trial that was interrupted or lost its worker, counts the trials that use
the budget (finished, running and waiting, less those a rerun replaces), and creates a trial only
if one is left. So the study ends with exactly ``search.n_trials`` finished trials (complete,
pruned or failed) that count, however many workers join and however often they are interrupted,
killed and restarted.

A lost worker is found in two ways: a worker on this machine whose process is gone (checked
directly), and on a database server a trial whose heartbeat stopped (Optuna's heartbeat).
An interrupted trial (Ctrl-C, SIGTERM; ``fail_kind`` ``interrupted``) or one whose worker was lost
(``worker_lost``) failed through no fault of its recipe: the same parameters are enqueued as a new
trial, seeded like the trial it replaces (so its metrics are reproducible), and the replaced trial
uses no budget (`superseded`). A recipe whose worker was lost more than ``lost_retries`` times
may be what kills it (the kernel's out-of-memory killer): its last loss counts as a failure.
Other failed trials (an exception, a NaN loss, out of memory) count; with ``retries`` their
recipe is tried again as a new trial that uses the budget like any other.

With ``search.n_epochs`` or ``search.screen_epochs`` (`search.config.fidelity`) the same claim
also counts fine-tuning epochs (each trial charged what it plans to run, recorded as
``squeeze.epochs``), and before sampling a new recipe it enqueues the promotion of a screened
trial the promotion rule picks, if its epochs fit.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config.fidelity import (
    EPOCHS_ATTR,
    FIDELITY_ATTR,
    FULL,
    PROMOTE_FROM_ATTR,
    WARM_START_ATTR,
    Fidelity,
)
from search.config.storage import DEFAULT_RETRY_S, is_url
from search.failures import INTERRUPTIONS, fail_kind
from search.run.locks import advisory_lock, file_lock

logger = logging.getLogger(__name__)

#: States that use up the budget: finished ones, and those a worker runs or will run.
USING_BUDGET = (
    TrialState.COMPLETE,
    TrialState.PRUNED,
    TrialState.FAIL,
    TrialState.RUNNING,
    TrialState.WAITING,
)

WORKER_ATTR = "squeeze.worker"
RETRY_OF_ATTR = "squeeze.retry_of"
SEED_TRIAL_ATTR = "squeeze.seed_trial"
ATTEMPT_ATTR = "squeeze.attempt"
#: On a rerun of an interrupted or lost trial: that trial's number (it then uses no budget).
REPLACES_ATTR = "squeeze.replaces"
#: How many earlier attempts of this recipe lost their worker.
LOST_ATTR = "squeeze.lost"


def worker_id() -> str:
    """``host:pid:start`` of this process (``start``: its start time, against reused pids)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def is_lost(worker: str | None) -> bool:
    """Whether ``worker`` (a `worker_id`) ran on this machine and its process is gone."""
    if not worker:
        return False
    host, _, rest = worker.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: the heartbeat tells
    return _start_time(int(pid)) != start


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot, "" if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
        return "?"  # no /proc: alive, start unknown
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def superseded(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the interrupted or lost trials that a rerun replaces: they use no budget."""
    return {int(t.user_attrs[REPLACES_ATTR]) for t in trials if REPLACES_ATTR in t.user_attrs}


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that use the budget: finished, running or waiting, less the replaced ones."""
    return sum(t.state in USING_BUDGET for t in trials) - len(superseded(trials))


def finished_in_budget(trials: Sequence[FrozenTrial]) -> int:
    """Finished trials that count (complete, pruned or failed), less the replaced ones."""
    return sum(t.state in _FINISHED for t in trials) - len(superseded(trials))


def seed_trial(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the trial whose seed this one uses: its own, or that of the one it retries."""
    return int(trial.user_attrs.get(SEED_TRIAL_ATTR, trial.number))


def budget_lock(
    storage: str, study_name: str, *, retry_s: float = DEFAULT_RETRY_S
) -> AbstractContextManager[None]:
    """A lock held across processes and machines while a trial is claimed (taking a database's
    lock is retried for up to ``retry_s`` seconds while the database is unreachable)."""
    if is_url(storage) and not storage.startswith("sqlite"):
        return advisory_lock(storage, study_name, retry_s=retry_s)
    path = storage.split("///", 1)[1] if storage.startswith("sqlite") else storage
    return file_lock(Path(f"{path}.budget-lock"))  # (not .lock: Optuna's own)


@dataclass
class Budget:
    """The total budget of a study, claimed a trial at a time.

    Attributes:
        study: The study.
        url: The storage URL or journal path (names the lock).
        total: Trials the study ends with (``search.n_trials``).
        retries: How many times a failed recipe is tried again (as a trial of the budget).
        retry_on: The `FAIL_KINDS` that are retried so.
        lost_retries: How many times a recipe whose worker was lost runs again without using
            the budget (interrupted trials always do).
        retry_s: Seconds an outage of the database holding the lock is ridden out.
        fidelity: The budget in epochs and the screening's promotions
            (`search.config.fidelity`); None: trials only, every trial a full fine-tune.
    """

    study: optuna.Study
    url: str
    total: int
    retries: int = 0
    retry_on: Collection[str] = ("out_of_memory",)
    lost_retries: int = 3
    retry_s: float = DEFAULT_RETRY_S
    fidelity: Fidelity | None = None

    def claim(self) -> optuna.Trial | None:
        """A new (or enqueued) trial for this worker, or None when the budget is spent."""
        with budget_lock(self.url, self.study.study_name, retry_s=self.retry_s):
            self.fail_lost_trials()
            trials = self.study.get_trials(deepcopy=False)
            if self._rerun_interrupted(trials):
                trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting:
                nxt = self._next(trials)
                if nxt is None:
                    return None
                if isinstance(nxt, FrozenTrial):
                    self._enqueue_promotion(nxt)
                else:
                    self._enqueue_retry(trials)
            with warnings.catch_warnings():  # "Heartbeat ... used with Study.optimize": we beat
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask()
            trial.set_user_attr(WORKER_ATTR, worker_id())
            if self.fidelity is not None:  # (an enqueued trial's attributes say what it runs)
                trial.set_user_attr(EPOCHS_ATTR, self.fidelity.trial_cost(trial))
            return trial

    def has_work(self) -> bool:
        """Whether a trial is left to claim: a waiting one (a rerun), or budget."""
        with budget_lock(self.url, self.study.study_name, retry_s=self.retry_s):
            self.fail_lost_trials()
            trials = self.study.get_trials(deepcopy=False)
            if self._rerun_interrupted(trials):
                return True
            waiting = any(t.state == TrialState.WAITING for t in trials)
            return waiting or self._next(trials) is not None

    def _next(self, trials: list[FrozenTrial]) -> FrozenTrial | bool | None:
        """What a claim with no waiting trial starts: the screened trial to promote, True for a
        new candidate, None when the budget is spent (in trials, or in epochs: a promotion
        only when it fits, a new candidate only while its whole fine-tune still fits)."""
        if budget_used(trials) >= self.total:
            return None
        if self.fidelity is None:
            return True
        replaced = superseded(trials)
        left = self.fidelity.epochs_left(trials, replaced)
        promotion = self.fidelity.full_epochs - self.fidelity.screen_epochs
        baseline = None
        if self.fidelity.floor is not None:  # (a read of the storage only then)
            baseline = (self.study.user_attrs.get("baseline") or {}).get("val_acc")
        for screened in self.fidelity.promotable(trials, replaced, baseline):
            if promotion <= left:
                return screened
        return True if self.fidelity.new_candidates(trials, replaced) > 0 else None

    def _enqueue_promotion(self, screened: FrozenTrial) -> None:
        """Enqueue the full fine-tune of ``screened``'s recipe, from its screened weights."""
        logger.info("trial %d's screened point is promoted to a full fine-tune", screened.number)
        self.study.enqueue_trial(
            dict(screened.params),
            user_attrs={
                PROMOTE_FROM_ATTR: screened.number,
                FIDELITY_ATTR: FULL,
                SEED_TRIAL_ATTR: seed_trial(screened),
                **({WARM_START_ATTR: True} if screened.user_attrs.get(WARM_START_ATTR) else {}),
            },
        )

    def fail_lost_trials(self) -> list[int]:
        """Fail the running trials of lost workers; return their numbers."""
        failed = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            before = {t.number for t in self.study.get_trials(deepcopy=False, states=[_RUN])}
            optuna.storages.fail_stale_trials(self.study)  # database server: stale heartbeats
        for t in self.study.get_trials(deepcopy=False):
            if t.number in before and t.state == TrialState.FAIL:
                failed.append(t.number)
            elif t.state == _RUN and is_lost(t.user_attrs.get(WORKER_ATTR)):
                storage = self.study._storage  # Optuna has no public setter for another's trial
                try:
                    storage.set_trial_user_attr(t._trial_id, "fail_kind", "worker_lost")
                    storage.set_trial_user_attr(
                        t._trial_id, "fail_reason", f"worker {t.user_attrs[WORKER_ATTR]} is gone"
                    )
                    self.study.tell(t.number, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker failed it first
                failed.append(t.number)
        for number in failed:
            logger.warning("trial %d failed: its worker was lost", number)
        return failed

    def _rerun_interrupted(self, trials: list[FrozenTrial]) -> bool:
        """Enqueue a rerun (same parameters, same seed) of each interrupted or lost trial that
        has none yet; return whether any was enqueued. Call under the lock."""
        retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in trials}
        enqueued = False
        for t in trials:
            if t.state != TrialState.FAIL or t.number in retried:
                continue
            kind = fail_kind(t)
            lost = int(t.user_attrs.get(LOST_ATTR, 0)) + (kind == "worker_lost")
            if kind not in INTERRUPTIONS or lost > self.lost_retries:
                continue  # the recipe's own failure: it counts
            logger.info("trial %d was %s: its recipe runs again", t.number, _WHY[kind])
            self.study.enqueue_trial(
                dict(t.params),
                user_attrs={
                    RETRY_OF_ATTR: t.number,
                    REPLACES_ATTR: t.number,
                    SEED_TRIAL_ATTR: seed_trial(t),
                    ATTEMPT_ATTR: int(t.user_attrs.get(ATTEMPT_ATTR, 1)),
                    LOST_ATTR: lost,
                    **({WARM_START_ATTR: True} if t.user_attrs.get(WARM_START_ATTR) else {}),
                    **_promotion_attrs(t),
                },
            )
            enqueued = True
        return enqueued

    def _enqueue_retry(self, trials: list[FrozenTrial]) -> None:
        if self.retries <= 0:
            return
        retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in trials}
        for t in trials:
            attempt = int(t.user_attrs.get(ATTEMPT_ATTR, 1))
            if (
                t.state == TrialState.FAIL
                and t.number not in retried
                and attempt <= self.retries
                and fail_kind(t) in self.retry_on
            ):
                logger.info("retrying the recipe of failed trial %d", t.number)
                self.study.enqueue_trial(
                    dict(t.params),
                    user_attrs={
                        RETRY_OF_ATTR: t.number,
                        SEED_TRIAL_ATTR: seed_trial(t),
                        ATTEMPT_ATTR: attempt + 1,
                        **_promotion_attrs(t),
                    },
                )
                return


def _promotion_attrs(trial: FrozenTrial) -> dict[str, object]:
    """The attributes a rerun or retry of a promoted trial keeps (it continues the same
    screened weights, and is charged the same epochs)."""
    keys = (PROMOTE_FROM_ATTR, FIDELITY_ATTR)
    return {k: trial.user_attrs[k] for k in keys if k in trial.user_attrs}


_RUN = TrialState.RUNNING
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_WHY = {"interrupted": "interrupted", "worker_lost": "lost with its worker"}
