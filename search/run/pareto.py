"""The end of a study: the trials table, the Pareto front with test scores, CSV and plot.

The front's ``val_drop`` and ``test_drop`` say how much worse than the baseline each point is,
in the unit of the task's score (`search.config.score.Score`: points for a higher-is-better
score, percent of the baseline's value for a lower-is-better one; negative: better).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from torch import nn  # noqa: E402

from compressors import load_packed  # noqa: E402
from experiments import evaluate  # noqa: E402
from search.config.fidelity import (  # noqa: E402
    EPOCHS_ATTR,
    FIDELITY_ATTR,
    PROMOTE_FROM_ATTR,
    REUSE_FROM_ATTR,
    SCREEN,
    front_trials,
)
from search.config.score import DEFAULT_SCORE, Score  # noqa: E402
from search.failures import fail_kind  # noqa: E402
from search.run.recommend import recommend  # noqa: E402
from search.run.tracking import NOTE_TAG  # noqa: E402
from search.run.trial import METRICS, SweepContext, trial_file  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep produced: every trial, the front (with test scores) and the files written;
    ``score``: which way the task's score goes (and the unit of ``val_drop``/``test_drop``);
    ``objectives``: the study's (what its recommended point is chosen against)."""

    study_name: str
    parent_run_id: str
    baseline: dict[str, float]
    trials: pd.DataFrame
    front: pd.DataFrame
    artifacts: list[Path] = field(default_factory=list)
    score: Score = Score()
    objectives: tuple[str, ...] = ()


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, sampled parameters, measured metrics, MLflow run id."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name}
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row.update(t.user_attrs.get("metrics", {}))
        row["feasible"] = all(v <= 0 for v in t.constraints.values())
        for key, column in _FIDELITY_COLUMNS.items():  # (a study with screening or n_epochs)
            if key in t.user_attrs:
                row[column] = t.user_attrs[key]
        if t.state == optuna.trial.TrialState.FAIL:
            row["fail_kind"] = fail_kind(t)
            row["fail_reason"] = t.user_attrs.get("fail_reason", "worker lost (no heartbeat)")
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id")
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        rows.append(row)
    columns = ["trial", "state", *METRICS, "mlflow_run_id", "duration_s"]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*columns, *[c for c in frame.columns if c not in columns]])


#: Trial attributes shown as columns of the trials table, where a trial has them.
_FIDELITY_COLUMNS = {
    FIDELITY_ATTR: "fidelity",
    EPOCHS_ATTR: "epochs",
    PROMOTE_FROM_ATTR: "promote_from",
    REUSE_FROM_ATTR: "reuse_from",
}


def front_numbers(study: optuna.Study) -> list[int]:
    """Trial numbers on the Pareto front of the study's objectives (feasible trials only, of
    full fidelity: `search.config.fidelity.front_trials`)."""
    return sorted(t.number for t in front_trials(study))


def finish_study(
    study: optuna.Study, ctx: SweepContext, baseline: dict[str, float], parent_id: str
) -> SweepResult:
    """Evaluate the front on test, write CSV and plot to the parent run, tag the front's runs."""
    score = Score.of_task(ctx.task)
    ctx.tracker.wait()  # every trial's run is written before the results are read
    _close_orphan_runs(study, ctx)
    trials = trials_frame(study)
    front_ids = front_numbers(study) if (trials.state == "COMPLETE").any() else []
    front = trials[trials.trial.isin(front_ids)].copy()
    front["test_acc"] = [
        _test_accuracy(ctx, study.study_name, r.trial, r.mlflow_run_id) for r in front.itertuples()
    ]
    front["val_drop"] = [score.drop(v, baseline["val_acc"]) for v in front.val_acc]
    front["test_drop"] = [score.drop(v, baseline["test_acc"]) for v in front.test_acc]
    front = front.sort_values("size_bytes").reset_index(drop=True)

    folder = ctx.output_dir / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "pareto.csv", folder / "trials.csv", folder / "pareto.png"]
    front.to_csv(paths[0], index=False)
    trials.to_csv(paths[1], index=False)
    pick = None if front.empty else recommend(front, score=score, objectives=ctx.objectives).trial
    plot_front(
        trials, front, baseline, paths[2], title=study.study_name, score=score, recommended=pick
    )

    ctx.tracker.mark_front(
        {r.mlflow_run_id: {"test_acc": r.test_acc} for r in front.itertuples()},
        notes={
            r.mlflow_run_id: _front_note(study.study_name, r, score) for r in front.itertuples()
        },
    )
    counts = trials.state.value_counts().to_dict()
    ctx.tracker.finish_parent(
        artifacts=paths,
        metrics={
            "pareto_size": len(front),
            "trials_complete": counts.get("COMPLETE", 0),
            "trials_failed": counts.get("FAIL", 0),
            "trials_pruned": counts.get("PRUNED", 0),
        },
        tags={
            "pareto_trials": ",".join(str(n) for n in front.trial),
            NOTE_TAG: (
                f"Study `{study.study_name}`: {len(trials)} trials; Pareto front: trials "
                f"{', '.join(str(n) for n in sorted(front.trial)) or 'none'} (their runs are "
                f'tagged `pareto=true`; the Views menu\'s "{study.study_name}: Pareto front" '
                "lists them). pareto.csv and pareto.png (the recommended point ringed) are "
                "among this run's artifacts."
            ),
        },
    )
    return SweepResult(
        study.study_name, parent_id, baseline, trials, front, paths, score, tuple(ctx.objectives)
    )


def _front_note(study_name: str, row, score: Score) -> str:
    """The description of a front trial's MLflow run."""
    return (
        f"On the Pareto front of study `{study_name}`: validation score {row.val_acc:.4f} "
        f"({score.better}; {score.format_change(-row.val_drop)} against the baseline), test "
        f"{row.test_acc:.4f} ({score.format_change(-row.test_drop)}), "
        f"{row.size_bytes / 1000:.2f} KB packed "
        f"({row.compression_ratio:.1f}x smaller than the baseline's file). Export it: "
        f"`squeeze export --study {study_name} --pick trial={row.trial}`."
    )


def _close_orphan_runs(study: optuna.Study, ctx: SweepContext) -> None:
    """End the MLflow runs that lost workers left RUNNING, from what Optuna recorded."""
    finished = {
        t.number: {
            "state": t.state.name,
            "kind": fail_kind(t),
            "reason": t.user_attrs.get("fail_reason", "worker lost (no heartbeat)"),
            "metrics": t.user_attrs.get("metrics", {}),
        }
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished()
    }
    closed = ctx.tracker.close_orphans(finished)
    if closed:
        logger.info("ended %d MLflow run(s) left running by lost workers", closed)


def hypervolume(
    points: list[tuple[float, float]],
    *,
    reference: tuple[float, float],
    score: Score = DEFAULT_SCORE,
) -> float:
    """Area dominated by ``(val_acc, size)`` points (the score in its direction, ``score``; size
    minimized) and bounded by ``reference`` (a bad score and a large size); points beyond it
    add nothing."""
    if not score.higher_is_better:  # the same area, the score's axis flipped
        points = [(-a, s) for a, s in points]
        reference = (-reference[0], reference[1])
    ref_acc, ref_size = reference
    inside = sorted((s, a) for a, s in points if a > ref_acc and s < ref_size)
    area, best = 0.0, ref_acc
    for i, (size, acc) in enumerate(inside):
        best = max(best, acc)
        right = inside[i + 1][0] if i + 1 < len(inside) else ref_size
        area += (right - size) * (best - ref_acc)
    return area


def _test_accuracy(ctx: SweepContext, study_name: str, number: int, run_id: str) -> float:
    model = trial_model(
        ctx.output_dir, study_name, number, run_id, ctx.tracker.client, ctx.task.build_model
    )
    return evaluate(model, ctx.task.test)


def trial_model(
    output_dir: Path,
    study_name: str,
    number: int,
    run_id: str,
    client: MlflowClient,
    build_model: Callable[[], nn.Module],
) -> nn.Module:
    """A trial's shipped model: its packed file loaded into ``build_model()``, from the local copy
    or else from its MLflow run (a trial run by a worker on another machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = trial_packed_file(output_dir, study_name, number, run_id, client, Path(tmp))
        return load_packed(path, build_model())


def trial_packed_file(
    output_dir: Path, study_name: str, number: int, run_id: str, client: MlflowClient, tmp: Path
) -> Path:
    """A trial's packed file: the local copy, or else a download from its MLflow run into
    ``tmp``."""
    local = trial_file(output_dir, study_name, number)
    if local.exists():
        return local
    return Path(client.download_artifacts(run_id, local.name, str(tmp)))


def plot_front(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    baseline: dict[str, float],
    path: Path,
    *,
    title: str,
    score: Score = DEFAULT_SCORE,
    recommended: int | None = None,
) -> None:
    """Save `front_figure` as a PNG."""
    fig = front_figure(trials, front, baseline, title=title, score=score, recommended=recommended)
    fig.savefig(path)
    plt.close(fig)


def front_figure(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    baseline: dict[str, float],
    *,
    title: str,
    score: Score = DEFAULT_SCORE,
    recommended: int | None = None,
) -> plt.Figure:
    """Validation score against packed size (log scale), front highlighted, baseline marked,
    the ``recommended`` trial (`search.run.recommend`) ringed and named; the axis says which way
    the score is better (``score``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    complete = trials[trials.state == "COMPLETE"]
    if "fidelity" in complete:  # screened-only points: shown, apart from full fine-tunes
        screened = complete[complete.fidelity == SCREEN]
        complete = complete[complete.fidelity != SCREEN]
        ax.scatter(
            screened.size_bytes,
            screened.val_acc,
            s=14,
            facecolors="none",
            edgecolors="0.65",
            label="screened (short fine-tune)",
        )
    ax.scatter(complete.size_bytes, complete.val_acc, s=18, c="0.65", label="trials")
    ax.plot(
        front.size_bytes,
        front.val_acc,
        "o-",
        c="tab:red",
        ms=5,
        drawstyle="steps-post",
        label="Pareto front",
    )
    ax.scatter(
        [baseline["size_bytes"]],
        [baseline["val_acc"]],
        marker="*",
        s=160,
        c="tab:blue",
        label="baseline (fp32)",
        zorder=3,
    )
    if recommended is not None and (front.trial == recommended).any():
        point = front[front.trial == recommended].iloc[0]
        ax.scatter(
            [point.size_bytes],
            [point.val_acc],
            s=220,
            facecolors="none",
            edgecolors="black",
            linewidths=1.6,
            label=f"recommended: trial {recommended}",
            zorder=4,
        )
        ax.annotate(
            f"trial {recommended}",
            (point.size_bytes, point.val_acc),
            xytext=(8, -14 if score.higher_is_better else 8),
            textcoords="offset points",
            fontsize=9,
        )
    ax.set_xscale("log")
    # Plain "12 KB" labels: readable, and no mathtext parsing of "10^4" (a third of the time).
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g} KB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("packed model file size (log scale)")
    ax.set_ylabel(f"validation score (val_acc, {score.better})")
    what = "accuracy" if score.is_accuracy else (score.name or "error")
    ax.set_title(f"{title}: {what} vs size")
    ax.grid(True, which="both", alpha=0.3)
    # (the front runs from the bottom left up, or from the top left down for an error)
    ax.legend(loc="lower right" if score.higher_is_better else "upper right")
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)  # tight_layout costs 0.4 s
    return fig
