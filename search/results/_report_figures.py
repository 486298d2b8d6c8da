"""The report's figures (`search.results.report`): the Pareto front, hypervolume history,
parameter importance, parameters vs the first objective and the front's fine-tuning curves, each
as a matplotlib and a plotly figure with every axis's unit; a figure with nothing to show raises
`_NoData`, whose message says why."""

from __future__ import annotations

import logging
import textwrap
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
from optuna.distributions import CategoricalDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from experiments import accuracy, mean_cosine, r2_score  # noqa: E402
from search.config.fidelity import is_screened  # noqa: E402
from search.config.score import DEFAULT_SCORE, Score  # noqa: E402
from search.run.logs import Ticker  # noqa: E402
from search.run.pareto import front_figure  # noqa: E402

logger = logging.getLogger(__name__)

#: Units of the metrics a study may optimise (``val_acc`` takes the task's score).
_METRIC_UNITS = {
    "size_bytes": "bytes",
    "compression_ratio": "× smaller than the baseline file",
    "nonzero_params": "parameters",
    "flops": "FLOPs per sample",
    "latency_ms": "ms per batch of 1",
    "speedup": "× faster than the baseline at batch 1, timed in turns",
    "peak_memory_bytes": "bytes",
}
#: Units of the searched parameters, by their name within a compressor (``prune.amount``).
_PARAM_UNITS = {
    "amount": "fraction removed, 0–1",
    "end": "fraction of the fine-tuning epochs, 0–1",
    "keep": "fraction of the rank kept, 0–1",
    "bits": "bits per weight",
    "strength": "L1 penalty weight",
    "temperature": "distillation temperature",
    "alpha": "weight of the distillation loss, 0–1",
    "lr": "learning rate",
    "epochs": "epochs",
    "batch_size": "samples per batch",
}


class _NoData(Exception):
    """A figure has nothing to show; the message says why (one line in report.html)."""


def _score_unit(task, direction: Score) -> str:
    """What the task's score (``val_acc`` / ``test_acc``) measures, for axis titles."""
    known = {
        accuracy: "top-1 accuracy, 0–1",
        mean_cosine: "mean cosine similarity, −1–1",
        r2_score: "R², 1 is perfect",
    }
    if task.metric in known:
        return known[task.metric]
    name = getattr(task.metric, "__name__", type(task.metric).__name__)
    return f"{name}, {direction.better}"


def _unit(metric: str, score: str) -> str:
    if metric == "val_acc":
        return score
    if metric.startswith("latency_ms_b"):
        return f"ms per batch of {metric.removeprefix('latency_ms_b')}"
    if metric.startswith("speedup_b"):
        return f"× faster than the baseline at batch {metric.removeprefix('speedup_b')}"
    return _METRIC_UNITS.get(metric, "value")


#: Characters per line of a figure's y-axis label: a longer one (a torchmetrics metric's name
#: and its direction) ran past a 4.5-inch figure's top and bottom.
LABEL_WIDTH = 48


def _metric_label(metric: str, score: str) -> str:
    if metric == "val_acc":
        return f"validation score (val_acc: {score})"
    return f"{metric} ({_unit(metric, score)})"


def _param_label(name: str, distribution) -> str:
    if isinstance(distribution, CategoricalDistribution):
        unit = "choice"
    else:
        unit = _PARAM_UNITS.get(name.split(".")[1] if "." in name else name, "value")
    if getattr(distribution, "log", False):
        unit += ", log scale"
    return f"{name} ({unit})"


def _figures(
    study,
    objectives,
    trials,
    front_ids,
    baseline,
    client,
    *,
    recipes,
    score,
    direction: Score = DEFAULT_SCORE,
    recommended: int | None = None,
) -> tuple[dict[str, tuple], dict[str, str]]:
    """``{name: (matplotlib figure, plotly figure)}`` and ``{name: why it is left out}``."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = [t for t in done if not is_screened(t)]  # full-fidelity points only
    builders = {
        "pareto_front": lambda: _front(
            study, trials, front_ids, baseline, recipes, score, direction, recommended
        ),
        "hypervolume": lambda: _hypervolume(study, done, objectives),
        "param_importance": lambda: _importances(study, done, objectives),
        "params_vs_accuracy": lambda: _params_vs_accuracy(done, objectives[0], score),
        "finetune_curves": lambda: _curves(study, front_ids, client),
    }
    figures, notes = {}, {}
    drawing = Ticker(logger, "report: figure")
    for k, (name, build) in enumerate(builders.items(), 1):
        try:
            figures[name] = build()
        except _NoData as why:
            notes[name] = str(why)
        drawing(k, len(builders), name)
    return figures, notes


def _need_two(done) -> None:
    if len(done) < 2:
        raise _NoData(f"it needs at least 2 complete trials and the study has {len(done)}")


def _front(study, trials, front_ids, baseline, recipes, score, direction, recommended=None):
    complete = trials[trials.state == "COMPLETE"]
    if complete.empty:
        raise _NoData("the study has no complete trial")
    front = trials[trials.trial.isin(front_ids)].sort_values("size_bytes")
    size_label = "packed model file size (KB, log scale)"
    score_label = _metric_label("val_acc", score)
    fig = front_figure(
        trials, front, baseline, title=study.study_name, score=direction, recommended=recommended
    )
    fig.axes[0].set_xlabel(size_label)
    fig.axes[0].set_ylabel(textwrap.fill(score_label, LABEL_WIDTH))  # (a metric's long name)

    on_front = complete.trial.isin(front_ids)
    screened = complete.fidelity == "screen" if "fidelity" in complete else ~on_front & on_front
    html = go.Figure()
    for mask, label, color in (
        (screened, "screened (short fine-tune)", "#ccc"),
        (~on_front & ~screened, "trials", "#999"),
        (on_front, "Pareto front", "#d62728"),
    ):
        if label.startswith("screened") and not mask.any():
            continue
        part = complete[mask].sort_values("size_bytes")
        html.add_scatter(
            x=part.size_bytes / 1000,
            y=part.val_acc,
            mode="markers+lines" if label == "Pareto front" else "markers",
            line={"shape": "hv"},
            name=label,
            marker={"color": color, "size": 8},
            text=[f"trial {t}<br>{recipes[t].replace(' ', '<br>')}" for t in part.trial],
            hoverinfo="text+x+y",
        )
    html.add_scatter(
        x=[baseline["size_bytes"] / 1000],
        y=[baseline["val_acc"]],
        mode="markers",
        name="baseline (fp32)",
        marker={"symbol": "star", "size": 16, "color": "#1f77b4"},
    )
    if recommended is not None and (front.trial == recommended).any():
        point = front[front.trial == recommended].iloc[0]
        html.add_scatter(
            x=[point.size_bytes / 1000],
            y=[point.val_acc],
            mode="markers+text",
            name=f"recommended: trial {recommended}",
            text=[f"trial {recommended}"],
            textposition="bottom right",
            marker={"symbol": "circle-open", "size": 18, "color": "black", "line": {"width": 2}},
            hoverinfo="name+x+y",
        )
    html.update_layout(
        title="Validation score vs packed size",
        xaxis={"type": "log", "title": size_label},
        yaxis={"title": score_label},
    )
    return fig, html


def _hypervolume(study, done, objectives):
    """Hypervolume of the front after each trial (minimization space; fixed reference point)."""
    if len(objectives) < 2:
        raise _NoData("a single objective has no hypervolume")
    _need_two(done)
    values = np.array([t.values for t in done], dtype=float)
    signs = np.array([-1.0 if d.name == "MAXIMIZE" else 1.0 for d in study.directions])
    points = values * signs
    reference = points.max(axis=0) + 0.1 * np.abs(points.max(axis=0)) + 1e-9
    history = [_hv(points[: i + 1], reference) for i in range(len(points))]
    numbers = [t.number for t in done]
    units = " × ".join(_unit(o, "score") for o in objectives)
    y_label = f"hypervolume of {' × '.join(objectives)} ({units})"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(numbers, history, "o-", ms=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(y_label)
    ax.set_title(f"Hypervolume history (reference point {np.round(reference * signs, 4).tolist()})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    html = go.Figure(go.Scatter(x=numbers, y=history, mode="lines+markers"))
    html.update_layout(title="Hypervolume history", xaxis_title="trial number", yaxis_title=y_label)
    return fig, html


def _hv(points: np.ndarray, reference: np.ndarray) -> float:
    from optuna._hypervolume import compute_hypervolume  # noqa: PLC0415 - private but stable

    inside = points[(points < reference).all(axis=1)]
    return float(compute_hypervolume(inside, reference)) if len(inside) else 0.0


def _importances(study, done, objectives):
    _need_two(done)
    frames, errors = {}, []
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i: t.values[i]
                )
        except (RuntimeError, ValueError) as err:
            errors.append(f"{name}: {err}")
    table = pd.DataFrame(frames).fillna(0.0)
    if table.empty:
        raise _NoData(
            "optuna.importance ranked no parameter" + (f" ({'; '.join(errors)})" if errors else "")
        )
    x_label = "importance (fANOVA: share of the objective's variance, 0–1)"
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1.5), dpi=120)
    table.plot.barh(ax=ax)
    ax.set_xlabel(x_label)
    ax.set_ylabel("searched parameter")
    ax.set_title("Parameter importance per objective")
    fig.tight_layout()
    html = go.Figure(
        [go.Bar(y=table.index, x=table[c], name=c, orientation="h") for c in table.columns]
    )
    html.update_layout(
        title="Parameter importance per objective",
        barmode="group",
        xaxis_title=x_label,
        yaxis_title="searched parameter",
    )
    return fig, html


def _params_vs_accuracy(done, objective, score):
    _need_two(done)
    params = sorted({p for t in done for p in t.params if p != "pipeline"})
    if not params:
        raise _NoData("no parameter is searched")
    y_label = _metric_label(objective, score)
    short_y = f"{objective} ({_unit(objective, score)})"  # one per small panel
    cols = min(3, len(params))
    rows = -(-len(params) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(9, 2.8 * rows), dpi=110, squeeze=False)
    specs = [[{} if r * cols + c < len(params) else None for c in range(cols)] for r in range(rows)]
    html = make_subplots(rows=rows, cols=cols, specs=specs, vertical_spacing=0.5 / rows)
    for i, (ax, name) in enumerate(zip(axes.flat, params, strict=False)):
        pairs = [(t.params[name], t.values[0]) for t in done if name in t.params]
        distribution = next(t.distributions[name] for t in done if name in t.params)
        x = [p for p, _ in pairs]
        if isinstance(distribution, CategoricalDistribution):
            x = [str(v) for v in x]
        y = [v for _, v in pairs]
        x_label = _param_label(name, distribution)
        log = getattr(distribution, "log", False)
        ax.scatter(x, y, s=10)
        if log:  # plain tick labels: mathtext "10^-3" overlaps and is slow to lay out
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_label, fontsize=7)
        ax.set_ylabel(short_y, fontsize=7)
        ax.tick_params(labelsize=7)
        row, col = i // cols + 1, i % cols + 1
        html.add_scatter(x=x, y=y, mode="markers", name=name, row=row, col=col)
        html.update_xaxes(title_text=x_label, type="log" if log else None, row=row, col=col)
        html.update_yaxes(title_text=short_y, row=row, col=col)
    for ax in list(axes.flat)[len(params) :]:
        ax.remove()
    fig.suptitle(f"Parameters vs {y_label}", fontsize=9)
    fig.tight_layout()
    html.update_layout(title=f"Parameters vs {y_label}", height=320 * rows, showlegend=False)
    return fig, html


def _curves(study, front_ids, client):
    curves = {}
    for number in front_ids:
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        history = client.get_metric_history(run_id, "train_loss") if run_id else []
        if history:
            curves[number] = ([m.step for m in history], [m.value for m in history])
    if not curves:
        raise _NoData("no trial of the front logged a fine-tuning loss (no fine-tuning epochs)")
    x_label, y_label = "fine-tuning epoch (from 0)", "training loss (mean per sample)"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    html = go.Figure()
    for number, (steps, losses) in curves.items():
        ax.plot(steps, losses, "o-", ms=3, label=f"trial {number}")
        html.add_scatter(x=steps, y=losses, mode="lines+markers", name=f"trial {number}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Fine-tuning curves of the Pareto front")
    ax.legend(fontsize=7)
    html.update_layout(
        title="Fine-tuning curves of the Pareto front", xaxis_title=x_label, yaxis_title=y_label
    )
    return fig, html
