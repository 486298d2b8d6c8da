"""Terminal output of the command line: a progress bar during a sweep and the front's table."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import TrialState
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from search.config.fidelity import Fidelity, front_trials
from search.config.score import DEFAULT_SCORE, Score
from search.run.budget import finished_in_budget, superseded

if TYPE_CHECKING:
    from search.config.space import SearchSpace


class SweepProgress:
    """An Optuna callback that drives a rich progress bar: trials of the budget done of N
    (interrupted or lost trials that run again do not count), front size, failures, the time
    elapsed and the time left; the stages before the first trial (baseline epochs, teacher
    outputs) get bars of their own through `stage`.

    While the bar is live, log records of the root logger print above it through its console
    (its stream handlers are set aside and restored afterwards), so they never break it.

    Args:
        total: The budget (``search.n_trials``).
        console: Where the bar and the log lines go.
        done: Finished trials of the budget when the sweep starts (a resumed study).
        fidelity: With a budget in epochs (``search.n_epochs``): the bar counts the epochs
            charged to finished trials, of ``total`` epochs (`search.config.fidelity`).
    """

    def __init__(
        self,
        total: int,
        *,
        console: Console | None = None,
        done: int = 0,
        fidelity: Fidelity | None = None,
    ) -> None:
        self._fidelity = fidelity if fidelity and fidelity.n_epochs is not None else None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            _Clock(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "sweep epochs" if self._fidelity else "sweep",
            total=total,
            completed=done,
            info="",
            since=time.monotonic(),
            base=done,
        )
        self._stages: dict[str, int] = {}
        self._handlers: list[logging.Handler] = []
        self._rich_handler: RichHandler | None = None

    @property
    def console(self) -> Console:
        return self._progress.console

    def __enter__(self) -> SweepProgress:
        self._progress.start()
        self._route_logging()
        return self

    def __exit__(self, *exc) -> None:
        self._restore_logging()
        self._progress.stop()

    def start_at(self, done: int) -> None:
        """Count from ``done`` finished trials (the time left is estimated from here)."""
        self._progress.update(self._task, completed=done, since=time.monotonic(), base=done)

    def stage(self, name: str, done: int, total: int) -> None:
        """Show the progress of a stage before the trials, e.g. ``("baseline epochs", 3, 40)``.
        When it is complete, the time left of the sweep is estimated from then on."""
        if name not in self._stages:
            self._stages[name] = self._progress.add_task(
                name, total=total, info="", since=None, base=0
            )
        self._progress.update(self._stages[name], completed=done, total=total)
        if done >= total:
            self._progress.update(self._task, since=time.monotonic())

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        replaced = superseded(trials)
        failed = sum(t.state == TrialState.FAIL and t.number not in replaced for t in trials)
        complete = any(t.state == TrialState.COMPLETE for t in trials)
        front = len(front_trials(study)) if complete else 0
        info = f"front {front}" + (f"  failed {failed}" if failed else "")
        if replaced:
            info += f"  rerun {len(replaced)}"
        if self._fidelity is not None:
            done = self._fidelity.epochs_finished(trials, replaced)
        else:
            done = finished_in_budget(trials)
        self._progress.update(self._task, completed=done, info=info)

    def _route_logging(self) -> None:
        root = logging.getLogger()
        terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        streams = [  # handlers that print to the terminal (not files, not captures)
            h
            for h in root.handlers
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in terminal
        ]
        if not streams:
            return
        handler = RichHandler(
            console=self._progress.console, show_time=False, show_path=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.setLevel(min(h.level for h in streams))
        for existing in streams:
            for log_filter in existing.filters:
                handler.addFilter(log_filter)
            root.removeHandler(existing)
        root.addHandler(handler)
        self._handlers, self._rich_handler = streams, handler

    def _restore_logging(self) -> None:
        root = logging.getLogger()
        if self._rich_handler is not None:
            root.removeHandler(self._rich_handler)
        for handler in self._handlers:
            root.addHandler(handler)
        self._handlers, self._rich_handler = [], None


class _Clock(ProgressColumn):
    """``elapsed 0:01:05  left ~0:02:10``: the time since the bar started and, for the trials,
    the time left at the rate of this session's finished trials (``left ?`` before the first)."""

    def render(self, task) -> Text:
        elapsed = f"elapsed {_hms(task.finished_time or task.elapsed or 0.0)}"
        if task.finished:
            return Text(elapsed, style="progress.elapsed")
        since, base = task.fields.get("since"), task.fields.get("base", 0)
        if since is None:  # a stage: rich's own estimate from its recent speed
            left = task.time_remaining
        elif task.completed > base:
            rate = (time.monotonic() - since) / (task.completed - base)
            left = rate * (task.total - task.completed)
        else:
            left = None
        shown = "?" if left is None else f"~{_hms(left)}"
        return Text(f"{elapsed}  left {shown}", style="progress.remaining")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def front_table(
    front: pd.DataFrame,
    baseline: dict[str, float],
    *,
    title: str,
    recommended: int | None = None,
    score: Score = DEFAULT_SCORE,
    recipes: dict[int, str] | None = None,
) -> Table:
    """The Pareto points: validation and test score, size, ratio, the change of each score
    against the baseline (negative: worse; points, or % of the baseline's value for a
    lower-is-better ``score``) and the whole recipe; the ``recommended`` trial is marked ``*``
    (the caption says so). ``recipes``: each trial's whole recipe (`trial_recipes`; else its
    sampled values only).

    The recipe column folds only to fit a terminal; print the table on a console as wide as its
    lines (`search.cli` does when stdout is a file or a pipe) to keep every recipe on one line.
    """
    caption = f"change: {score.describe_change()}"
    if not score.is_accuracy:  # val_acc is not an accuracy: say what it is
        caption = f"{score.describe()}; {caption}"
    if recommended is not None:
        caption = f"* recommended (see below); {caption}"
    table = Table(title=title, caption=caption, caption_justify="left")
    for column in ("trial", *score.columns, "size KB", "ratio", "val change", "test change"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("recipe", overflow="fold", min_width=24)
    table.add_row(
        "baseline",
        f"{baseline['val_acc']:.4f}",
        f"{baseline['test_acc']:.4f}",
        f"{baseline['size_bytes'] / 1000:.1f}",
        "1.0x",
        "reference",
        "reference",
        "fp32",
        style="dim",
    )
    params = [c for c in front.columns if c.startswith("param.")]
    for row in front.to_dict("records"):
        recipe = (recipes or {}).get(row["trial"]) or " ".join(
            f"{c.removeprefix('param.')}={short_value(row[c])}" for c in params if pd.notna(row[c])
        )
        marked = row["trial"] == recommended
        table.add_row(
            f"* {row['trial']}" if marked else str(row["trial"]),
            f"{row['val_acc']:.4f}",
            f"{row['test_acc']:.4f}",
            f"{row['size_bytes'] / 1000:.2f}",
            f"{row['compression_ratio']:.1f}x",
            score.format_change(-row["val_drop"]),
            score.format_change(-row["test_drop"]),
            recipe,
            style="bold" if marked else None,
        )
    return table


def trial_recipes(study: optuna.Study, space: SearchSpace) -> dict[int, str]:
    """Every complete trial's whole recipe, sampled values and fixed ones (a space whose every
    value is fixed samples none), as ``name=value`` (floats to 3 significant digits)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {
        t.number: " ".join(
            f"{k}={short_value(v)}"
            for k, v in space.sample(optuna.trial.FixedTrial(t.params, t.number)).params.items()
        )
        for t in done
    }


def short_value(value) -> str:
    """A recipe's value as printed: floats to 3 significant digits (``0.00354``), others as
    they are."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fidelity_summary(trials: pd.DataFrame, search: Any) -> str:
    """``, 12 screens (5 promoted); 150 of 150 fine-tuning epochs`` for a sweep with screening
    or an epoch budget (``, 4 from a finished trial's weights`` with reuse; else nothing).
    ``trials``: the trials table (`search.run.pareto.trials_frame`) less the replaced trials;
    ``search``: the config's."""
    text = ""
    if "fidelity" in trials:
        promoted = trials.promote_from.nunique() if "promote_from" in trials else 0
        text += f", {int((trials.fidelity == 'screen').sum())} screens ({promoted} promoted)"
    if "reuse_from" in trials:  # search.reuse
        text += f", {int(trials.reuse_from.notna().sum())} from a finished trial's weights"
    if "epochs" in trials and search.get("n_epochs") is not None:
        text += f"; {int(trials.epochs.sum())} of {search.n_epochs} fine-tuning epochs"
    return text
