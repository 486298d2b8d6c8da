"""Multi-fidelity search: screen every candidate with a short fine-tune, promote the promising.

With ``search.screen_epochs=S`` (0: off), a sampled recipe first runs the first ``S`` epochs of
its fine-tune (the same schedule as the full one, stopped early): a *screened* trial, user
attribute ``squeeze.fidelity=screen``, whose weights before finalizing are kept in the study's
output folder. Before a worker samples a new recipe, each screened point that is on the front
of the screened points (`promotable`, the promotion rule) is *promoted*: its parameters are
enqueued as a new trial with ``squeeze.promote_from=<screened trial>``, which loads the screened
weights and runs epochs ``S`` .. ``E - 1`` of the same fine-tune (``E``: ``space.finetune.epochs``),
seeded like the screened trial. With ``search.screen_warm_starts=false`` the space's warm starts
(user attribute ``squeeze.warm_start``) are never screened: each runs its whole fine-tune at once
(``squeeze.fidelity=full``, no ``squeeze.promote_from``); only sampled recipes are screened. Only
full-fidelity trials (promoted ones, full warm starts, and every trial of a study without
screening) form the front (`front_trials`).

The budget in epochs (``search.n_epochs``, null: none) is counted like the budget in trials
(`search.run.budget`): each trial that uses the budget is charged what it plans to run
(`trial_cost`: ``S`` for a screen, ``E - S`` for a promotion, ``E`` without screening and for a
warm start that is not screened), from its
attributes and the study's fingerprinted config, so the count is the same in every worker and
after a resume. A new candidate is started only while its full fine-tune (screen and promotion)
still fits in what is left; a promotion only when it fits.

With ``search.reuse`` (`search.run.inherit`), a trial whose leading, shape-changing stages give
the same layer shapes as a finished trial's starts from that trial's fine-tuned weights and
fine-tunes ``search.reuse_epochs`` epochs only (user attribute ``squeeze.reuse_from``): it is
claimed as a full fine-tune and charged ``search.reuse_epochs`` once it knows its source.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from search._errors import ConfigError
from search.config.score import Score, dominates

#: User attribute of every trial of a screening study: ``screen`` or ``full``.
FIDELITY_ATTR = "squeeze.fidelity"
#: User attribute of a promoted trial: the number of the screened trial it continues.
PROMOTE_FROM_ATTR = "squeeze.promote_from"
#: User attribute: the fine-tuning epochs a trial is charged (`trial_cost`).
EPOCHS_ATTR = "squeeze.epochs"
#: User attribute of a trial whose fine-tune stopped on a plateau (``search.plateau``): the
#: epochs it ran, which it is charged instead of those it planned.
EPOCHS_RUN_ATTR = "squeeze.epochs_run"
#: User attribute of a trial that started from a finished trial's fine-tuned weights
#: (``search.reuse``): that trial's number.
REUSE_FROM_ATTR = "squeeze.reuse_from"
#: User attribute: true on a trial that runs one of the space's warm-start recipes (and on its
#: reruns).
WARM_START_ATTR = "squeeze.warm_start"
SCREEN, FULL = "screen", "full"

#: Trial states that use the budget (as `search.run.budget.USING_BUDGET`).
_USING = (
    TrialState.COMPLETE,
    TrialState.PRUNED,
    TrialState.FAIL,
    TrialState.RUNNING,
    TrialState.WAITING,
)


@dataclass(frozen=True)
class Fidelity:
    """The fine-tuning budget of a study and how candidates are screened.

    Attributes:
        full_epochs: Epochs of a full fine-tune (``space.finetune.epochs``).
        screen_epochs: Epochs of a screen (``search.screen_epochs``); 0: no screening.
        n_epochs: The budget in epochs (``search.n_epochs``); None: trials only.
        margin: A screened point is promoted when its score improved by ``margin`` (in the
            score's units when better higher, a fraction of it when better lower) would not be
            dominated by another screened point (``search.promote_margin``).
        objectives: The study's objectives.
        directions: Their directions.
        promote_after: No promotion before this many screened points are complete (a
            front of a few points promotes nearly all of them) (``search.promote_after``).
        floor: A screened point whose score, improved by ``floor`` (as ``margin``), is still
            worse than the baseline's is not promoted (``search.promote_floor``); None: no
            floor.
        reuse_epochs: Epochs a trial fine-tunes when it starts from a finished trial's weights
            (``search.reuse_epochs`` with ``search.reuse=true``); 0: no reuse.
        plateau: A fine-tune (not a screen) stops once its validation score has not improved
            for this many epochs, and the trial is charged the epochs it ran
            (``search.plateau``); 0: every fine-tune runs all its epochs.
        screen_warm_starts: Whether the space's warm starts are screened like sampled recipes
            (``search.screen_warm_starts``); false: each runs its whole fine-tune at once.
    """

    full_epochs: int
    screen_epochs: int = 0
    n_epochs: int | None = None
    margin: float = 0.0
    objectives: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()
    promote_after: int = 0
    floor: float | None = None
    reuse_epochs: int = 0
    plateau: int = 0
    screen_warm_starts: bool = True

    @property
    def screening(self) -> bool:
        """Whether candidates are screened first."""
        return self.screen_epochs > 0

    @property
    def reusing(self) -> bool:
        """Whether a trial may start from a finished trial's fine-tuned weights."""
        return self.reuse_epochs > 0

    def trial_cost(self, trial: FrozenTrial | optuna.Trial) -> int:
        """The epochs ``trial`` is charged: a reuse's, a promotion's rest, a screen, or a full
        fine-tune (a trial that will reuse weights is charged a full one until it knows; so is
        a warm start that is not screened); a fine-tune that stopped on a plateau, the epochs it
        ran."""
        if EPOCHS_RUN_ATTR in trial.user_attrs:
            return int(trial.user_attrs[EPOCHS_RUN_ATTR])
        if REUSE_FROM_ATTR in trial.user_attrs:
            return self.reuse_epochs
        if PROMOTE_FROM_ATTR in trial.user_attrs:
            return self.full_epochs - self.screen_epochs
        return self.screen_epochs if self.screens(trial) else self.full_epochs

    def screens(self, trial: FrozenTrial | optuna.Trial) -> bool:
        """Whether ``trial`` (not a promotion) is a screen: with screening, every trial but a
        warm start under ``screen_warm_starts=false`` (or one already marked full)."""
        if not self.screening or trial.user_attrs.get(FIDELITY_ATTR) == FULL:
            return False
        return self.screen_warm_starts or not trial.user_attrs.get(WARM_START_ATTR)

    def epochs_used(self, trials: Sequence[FrozenTrial], superseded: set[int]) -> int:
        """Epochs charged to the trials that use the budget (finished, running, waiting; less
        the ``superseded`` ones a rerun replaces)."""
        return sum(
            self.trial_cost(t) for t in trials if t.state in _USING and t.number not in superseded
        )

    def epochs_finished(self, trials: Sequence[FrozenTrial], superseded: set[int]) -> int:
        """Epochs charged to the finished trials (complete, pruned, failed; less the
        ``superseded`` ones): a progress bar's count."""
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return sum(
            self.trial_cost(t) for t in trials if t.state in done and t.number not in superseded
        )

    def epochs_left(self, trials: Sequence[FrozenTrial], superseded: set[int]) -> float:
        """Epochs of the budget not yet charged (infinite without ``search.n_epochs``)."""
        if self.n_epochs is None:
            return float("inf")
        return self.n_epochs - self.epochs_used(trials, superseded)

    def new_candidates(self, trials: Sequence[FrozenTrial], superseded: set[int]) -> int:
        """How many new candidates may still start: each while its whole fine-tune (screen
        and promotion) fits in the epochs left (a large number without ``search.n_epochs``)."""
        left = self.epochs_left(trials, superseded)
        if left == float("inf"):
            return 1 << 62
        if left < self.full_epochs:
            return 0
        return int(left - self.full_epochs) // (self.screen_epochs or self.full_epochs) + 1

    def promotable(
        self,
        trials: Sequence[FrozenTrial],
        superseded: set[int],
        baseline: float | None = None,
    ) -> list[FrozenTrial]:
        """Screened trials to promote now, oldest first: complete and feasible, not yet promoted
        (a promotion of theirs exists in any state), and on the front of the screened points
        once their score is improved by ``margin`` (the promotion rule); with a ``floor`` and
        the ``baseline``'s score, not those whose score improved by ``floor`` is still worse
        than the baseline's."""
        if not self.screening:
            return []
        screened = [t for t in trials if is_screened(t) and _feasible(t)]
        screened = [t for t in screened if t.number not in superseded]
        if len(screened) < self.promote_after:
            return []
        promoted = {
            int(t.user_attrs[PROMOTE_FROM_ATTR])
            for t in trials
            if PROMOTE_FROM_ATTR in t.user_attrs and t.number not in superseded
        }
        i = self.objectives.index("val_acc") if "val_acc" in self.objectives else None
        score = Score.of_direction(self.directions[i]) if i is not None else None
        out = []
        for t in screened:
            if t.number in promoted:
                continue
            if self._below_floor(t, i, score, baseline):
                continue
            hope = list(t.values)
            if i is not None:
                hope[i] = score.hope(hope[i], self.margin)
            others = (o.values for o in screened if o.number != t.number)
            if not any(dominates(o, hope, self.directions) for o in others):
                out.append(t)
        return out

    def _below_floor(
        self, trial: FrozenTrial, i: int | None, score: Score | None, baseline: float | None
    ) -> bool:
        """Whether ``trial``'s screened score is under the promotion floor."""
        if self.floor is None or baseline is None or i is None or score is None:
            return False
        value = score.hope(trial.values[i], self.floor)
        return score.goodness(value) < score.goodness(baseline)


class Plateau:
    """The plateau stop of one fine-tune (``search.plateau``): called with each epoch's
    validation score, true once the best score has not improved for ``epochs`` epochs.

    Attributes:
        epochs: Epochs without improvement that stop the fine-tune (0: never stops).
        higher_is_better: The score's direction.
        stopped: Whether it has said stop.
    """

    def __init__(self, epochs: int, *, higher_is_better: bool = True) -> None:
        self.epochs, self.higher_is_better = epochs, higher_is_better
        self.best: float | None = None
        self.since = 0
        self.stopped = False

    def __call__(self, score: float | None) -> bool:
        if self.epochs <= 0 or score is None:
            return False
        better = self.best is None or (
            score > self.best if self.higher_is_better else score < self.best
        )
        if better:
            self.best, self.since = score, 0
        else:
            self.since += 1
        self.stopped = self.since >= self.epochs
        return self.stopped


def is_screened(trial: FrozenTrial) -> bool:
    """Whether ``trial`` ran a screen only (its point is not a full-fidelity one)."""
    return trial.state == TrialState.COMPLETE and trial.user_attrs.get(FIDELITY_ATTR) == SCREEN


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's Pareto front of full-fidelity, feasible, complete trials: ``best_trials``
    for a study without screened trials, else the same rule over its full-fidelity trials."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not any(is_screened(t) for t in trials):
        return study.best_trials
    full = [t for t in trials if not is_screened(t) and _feasible(t)]
    directions = [d.name.lower() for d in study.directions]
    return [
        t
        for t in full
        if not any(dominates(o.values, t.values, directions) for o in full if o is not t)
    ]


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def check_fidelity(
    cfg: DictConfig, finetune_epochs: object, objectives: Iterable[str], directions: Iterable[str]
) -> Fidelity | None:
    """The study's `Fidelity`, or None when none of ``search.screen_epochs``, ``search.n_epochs``,
    ``search.reuse`` and ``search.plateau`` is set; ``finetune_epochs``: the space's
    ``finetune.epochs`` (an int, or a distribution when it is searched).

    Raises:
        ConfigError: If the space's epochs are searched, the screen or the reuse's fine-tune is
            not shorter than the full fine-tune, or screening or reuse is combined with
            ``search.cv_folds``, or reuse with screening.
    """
    search = cfg.search
    screen = int(search.get("screen_epochs", 0) or 0)
    n_epochs = search.get("n_epochs")
    reuse = _reuse_epochs(search, finetune_epochs, screen)
    plateau = search.get("plateau", 0) or 0
    screen_warm_starts = search.get("screen_warm_starts", True)
    if not isinstance(screen_warm_starts, bool):
        raise ConfigError(
            "The 'search.screen_warm_starts' config value must be true or false. Got "
            f"{screen_warm_starts!r} instead."
        )
    if not isinstance(plateau, int) or isinstance(plateau, bool) or plateau < 0:
        raise ConfigError(
            f"The 'search.plateau' config value must be an int in [0, inf) (0: off). Got "
            f"{plateau!r} instead."
        )
    if not screen and n_epochs is None and not reuse and not plateau:
        return None
    key = (
        "search.screen_epochs"
        if screen
        else "search.reuse"
        if reuse
        else "search.n_epochs"
        if n_epochs is not None
        else "search.plateau"
    )
    if not isinstance(finetune_epochs, int) or isinstance(finetune_epochs, bool):
        raise ConfigError(
            f"{key} needs a fixed number of fine-tuning epochs, but space.finetune.epochs is "
            f"searched ({finetune_epochs}). Allowed: space.finetune.epochs=<int>, or "
            f"{key}={'0' if screen or key == 'search.plateau' else 'false' if reuse else 'null'}."
        )
    if screen and screen >= finetune_epochs:
        raise ConfigError(
            f"The 'search.screen_epochs' config value must be an int in [0, "
            f"{finetune_epochs - 1}] (less than space.finetune.epochs={finetune_epochs}; 0: no "
            f"screening). Got {screen} instead."
        )
    if screen and search.get("cv_folds"):
        raise ConfigError(
            f"search.screen_epochs={screen} cannot be combined with search.cv_folds="
            f"{search.cv_folds}. Allowed: search.screen_epochs=0 or search.cv_folds=null."
        )
    if n_epochs is not None and n_epochs < finetune_epochs:
        raise ConfigError(
            f"The 'search.n_epochs' config value must be null or an int of at least "
            f"space.finetune.epochs={finetune_epochs} (one full fine-tune). Got {n_epochs} "
            "instead."
        )
    return Fidelity(
        full_epochs=finetune_epochs,
        screen_epochs=screen,
        n_epochs=None if n_epochs is None else int(n_epochs),
        margin=float(search.get("promote_margin", 0.0)),
        promote_after=int(search.get("promote_after", 0)),
        floor=None if search.get("promote_floor") is None else float(search.promote_floor),
        objectives=tuple(objectives),
        directions=tuple(directions),
        reuse_epochs=reuse,
        plateau=plateau,
        screen_warm_starts=screen_warm_starts,
    )


def _reuse_epochs(search: DictConfig, finetune_epochs: object, screen: int) -> int:
    """``search.reuse_epochs`` with ``search.reuse=true`` (checked), else 0."""
    reuse = search.get("reuse", False)
    if not isinstance(reuse, bool):
        raise ConfigError(
            f"The 'search.reuse' config value must be true or false. Got {reuse!r} instead."
        )
    if not reuse:
        return 0
    epochs = search.get("reuse_epochs", 1)
    if screen:
        raise ConfigError(
            f"search.reuse=true cannot be combined with search.screen_epochs={screen}. "
            "Allowed: search.reuse=false or search.screen_epochs=0."
        )
    if search.get("cv_folds"):
        raise ConfigError(
            f"search.reuse=true cannot be combined with search.cv_folds={search.cv_folds} (each "
            "fold compresses its own baseline). Allowed: search.reuse=false or "
            "search.cv_folds=null."
        )
    if not isinstance(finetune_epochs, int) or isinstance(finetune_epochs, bool):
        return 1  # (searched epochs: refused by the caller, naming search.reuse)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs < finetune_epochs:
        raise ConfigError(
            f"The 'search.reuse_epochs' config value must be an int in [1, "
            f"{finetune_epochs - 1}] (less than space.finetune.epochs={finetune_epochs}). Got "
            f"{epochs!r} instead."
        )
    return epochs
