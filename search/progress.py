"""Terminal output of the command line: a progress bar during a sweep and the front's table."""

from __future__ import annotations

import optuna
import pandas as pd
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class SweepProgress:
    """An Optuna callback that drives a rich progress bar: trials done of N, front size, ETA."""

    def __init__(self, total: int, *, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("front {task.fields[front]}  failed {task.fields[failed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("sweep", total=total, front=0, failed=0)

    def __enter__(self) -> SweepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start_at(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state.is_finished() for t in trials)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        front = len(study.best_trials) if any(t.state == TrialState.COMPLETE for t in trials) else 0
        self._progress.update(self._task, completed=done, front=front, failed=failed)


def front_table(front: pd.DataFrame, baseline: dict[str, float], *, title: str) -> Table:
    """The Pareto points: validation and test accuracy, size, ratio and drop vs the baseline."""
    table = Table(title=title)
    for column in ("trial", "val acc", "test acc", "size KB", "ratio", "val drop", "test drop"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("recipe", overflow="fold", min_width=24)
    table.add_row(
        "baseline",
        f"{baseline['val_acc']:.4f}",
        f"{baseline['test_acc']:.4f}",
        f"{baseline['size_bytes'] / 1000:.1f}",
        "1.0x",
        "",
        "",
        "fp32",
        style="dim",
    )
    params = [c for c in front.columns if c.startswith("param.")]
    for row in front.to_dict("records"):
        recipe = " ".join(
            f"{c.removeprefix('param.')}={_short(row[c])}" for c in params if pd.notna(row[c])
        )
        table.add_row(
            str(row["trial"]),
            f"{row['val_acc']:.4f}",
            f"{row['test_acc']:.4f}",
            f"{row['size_bytes'] / 1000:.2f}",
            f"{row['compression_ratio']:.1f}x",
            f"{row['val_drop']:+.1f} pt",
            f"{row['test_drop']:+.1f} pt",
            recipe,
        )
    return table


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
