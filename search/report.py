"""``squeeze report``: a study's trials, plots and per-class metrics, in one folder and on MLflow.

Everything is written to ``<output_dir>/<study>/report/`` and logged to the study's parent MLflow
run under ``report/``:

- ``trials.csv`` (and ``trials.parquet`` when pyarrow is installed): one row per trial;
- ``metrics.csv`` and ``confusion.json``: top-1 / top-5 accuracy, macro F1 and recall, per-class
  accuracy and the confusion matrix on validation and test, for the baseline and every Pareto
  point; ``class_balance.csv``: samples per class in each split;
- figures, each as PNG (matplotlib) and interactive HTML (plotly): the Pareto front (accuracy vs
  packed size on a log scale, front highlighted, baseline marked, parameters on hover),
  hypervolume history, parameter importance per objective (`optuna.importance`), parameters vs
  accuracy, and the fine-tuning curves of the front's trials;
- ``report.html``: one self-contained page (plotly.js inlined once, no network) with every
  figure and table, linking the files above.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from experiments import load_or_train_baseline, scores  # noqa: E402
from experiments.analysis import class_balance, classification_report  # noqa: E402
from search.pareto import front_figure, front_numbers, trial_model, trials_frame  # noqa: E402
from search.reuse import load_study, study_config  # noqa: E402
from search.study import plan_sweep  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """The files a report wrote (all under ``folder``) and the parent run they were logged to."""

    folder: Path
    files: list[Path]
    parent_run_id: str | None


def build_report(cfg: DictConfig, study_name: str) -> Report:
    """Write the report of ``study_name`` (storage, tracking and output folder from ``cfg``)."""
    study = load_study(cfg, study_name)
    study_cfg = study_config(cfg, study)
    plan = plan_sweep(study_cfg)
    task = plan.task_builder(**plan.task_kwargs)
    baseline = load_or_train_baseline(
        task, config=plan.task_kwargs, cache_dir=cfg.cache_dir, seed=study_cfg.seed
    )
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    folder = Path(cfg.output_dir) / study_name / "report"
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    trials = trials_frame(study)
    files.append(_save(trials.to_csv, folder / "trials.csv", index=False))
    try:
        files.append(_save(trials.to_parquet, folder / "trials.parquet", index=False))
    except ImportError:
        logger.info("pyarrow is not installed: no trials.parquet")

    front_ids = front_numbers(study) if (trials.state == "COMPLETE").any() else []
    models = {"baseline": baseline.model}
    for number in front_ids:
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        models[f"trial {number}"] = trial_model(
            Path(study_cfg.output_dir), study_name, number, run_id, client, task.build_model
        )
    if task.outputs == "logits":  # classification metrics; an embedding task has its scores
        metrics, confusion = _metrics(models, task)
        files.append(_write(folder / "confusion.json", json.dumps(confusion, indent=1)))
        balance = class_balance(task)
        files.append(_save(balance.to_csv, folder / "class_balance.csv"))
    else:
        metrics, balance = _scores(models, task), pd.DataFrame()
    files.append(_save(metrics.to_csv, folder / "metrics.csv"))

    baseline_metrics = study.user_attrs.get("baseline", {})
    objectives = list(study_cfg.search.objectives)
    figures = _figures(study, objectives, trials, front_ids, baseline_metrics, client)
    html_parts = []
    for name, (fig_png, fig_html) in figures.items():
        png, html = folder / f"{name}.png", folder / f"{name}.html"
        fig_png.savefig(png)
        plt.close(fig_png)
        fig_html.write_html(html, include_plotlyjs=True)
        files += [png, html]
        html_parts.append((name, fig_html))
    files.append(_write_page(folder / "report.html", study_name, html_parts, metrics, balance))

    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id is not None:
        for path in files:
            client.log_artifact(parent_id, str(path), "report")
    return Report(folder, files, parent_id)


def _save(method, path: Path, **kwargs) -> Path:
    method(path, **kwargs)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _metrics(models: dict, task) -> tuple[pd.DataFrame, dict]:
    rows, confusion = [], {}
    for name, model in models.items():
        for split_name, split in (("val", task.val), ("test", task.test)):
            report = classification_report(model, split, task.num_classes)
            confusion[f"{name} / {split_name}"] = report.pop("confusion")
            per_class = report.pop("per_class_acc")
            row = {"model": name, "split": split_name, **report}
            row.update({f"acc_class_{c}": v for c, v in enumerate(per_class)})
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "split"]), confusion


def _scores(models: dict, task) -> pd.DataFrame:
    rows = [
        {"model": name, "split": split_name, **scores(model, split, task.extra_scores)}
        for name, model in models.items()
        for split_name, split in (("val", task.val), ("test", task.test))
    ]
    return pd.DataFrame(rows).set_index(["model", "split"])


def _figures(study, objectives, trials, front_ids, baseline, client) -> dict[str, tuple]:
    complete = trials[trials.state == "COMPLETE"]
    front = trials[trials.trial.isin(front_ids)].sort_values("size_bytes")
    figures = {
        "pareto_front": (
            front_figure(trials, front, baseline, title=study.study_name),
            _front_html(complete, front_ids, baseline),
        )
    }
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) >= 2:
        figures["hypervolume"] = _hypervolume(study, done)
        figures["params_vs_accuracy"] = _params_vs_accuracy(study, objectives[0])
        importance = _importances(study, objectives)
        if importance is not None:
            figures["param_importance"] = importance
    figures["finetune_curves"] = _curves(study, front_ids, client)
    return figures


def _front_html(complete, front_ids, baseline) -> go.Figure:
    params = [c for c in complete.columns if c.startswith("param.")]
    hover = (
        complete[params]
        .astype(str)
        .apply(
            lambda r: "<br>".join(
                f"{k.removeprefix('param.')}={v}" for k, v in r.items() if v != "nan"
            ),
            axis=1,
        )
    )
    on_front = complete.trial.isin(front_ids)
    fig = go.Figure()
    for mask, label, color in (
        (~on_front, "trials", "#999"),
        (on_front, "Pareto front", "#d62728"),
    ):
        part = complete[mask].sort_values("size_bytes")
        fig.add_scatter(
            x=part.size_bytes / 1000,
            y=part.val_acc,
            mode="markers+lines" if label == "Pareto front" else "markers",
            line={"shape": "hv"},
            name=label,
            marker={"color": color, "size": 8},
            text=[f"trial {t}<br>{hover[i]}" for t, i in zip(part.trial, part.index, strict=True)],
            hoverinfo="text+x+y",
        )
    if baseline:
        fig.add_scatter(
            x=[baseline["size_bytes"] / 1000],
            y=[baseline["val_acc"]],
            mode="markers",
            name="baseline (fp32)",
            marker={"symbol": "star", "size": 16, "color": "#1f77b4"},
        )
    fig.update_layout(
        title="Validation accuracy vs packed size",
        xaxis={"type": "log", "title": "packed model file (KB, log scale)"},
        yaxis={"title": "validation score (val_acc)"},
    )
    return fig


def _hypervolume(study, done):
    """Hypervolume of the front after each trial (minimization space; fixed reference point)."""
    values = np.array([t.values for t in done], dtype=float)
    signs = np.array([-1.0 if d.name == "MAXIMIZE" else 1.0 for d in study.directions])
    points = values * signs
    reference = points.max(axis=0) + 0.1 * np.abs(points.max(axis=0)) + 1e-9
    history = [_hv(points[: i + 1], reference) for i in range(len(points))]
    numbers = [t.number for t in done]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(numbers, history, "o-", ms=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"Hypervolume history (reference point {np.round(reference * signs, 4).tolist()})")
    ax.grid(alpha=0.3)
    html = go.Figure(go.Scatter(x=numbers, y=history, mode="lines+markers"))
    html.update_layout(title="Hypervolume history", xaxis_title="trial", yaxis_title="hypervolume")
    return fig, html


def _hv(points: np.ndarray, reference: np.ndarray) -> float:
    from optuna._hypervolume import compute_hypervolume  # noqa: PLC0415 - private but stable

    inside = points[(points < reference).all(axis=1)]
    return float(compute_hypervolume(inside, reference)) if len(inside) else 0.0


def _importances(study, objectives):
    frames = {}
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i: t.values[i]
                )
        except (RuntimeError, ValueError) as err:
            logger.info("no parameter importance for %s: %s", name, err)
    if not frames:
        return None
    table = pd.DataFrame(frames).fillna(0.0)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1.5), dpi=120)
    table.plot.barh(ax=ax)
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Parameter importance per objective")
    fig.tight_layout()
    html = go.Figure(
        [go.Bar(y=table.index, x=table[c], name=c, orientation="h") for c in table.columns]
    )
    html.update_layout(title="Parameter importance per objective", barmode="group")
    return fig, html


def _params_vs_accuracy(study, objective):
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    params = sorted({p for t in done for p in t.params if p != "pipeline"})
    cols = 3
    rows = max(1, -(-len(params) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(9, 2.6 * rows), dpi=110, squeeze=False)
    html = go.Figure()
    for ax, name in zip(axes.flat, params, strict=False):
        pairs = [(t.params[name], t.values[0]) for t in done if name in t.params]
        x = [p for p, _ in pairs]
        numeric = all(isinstance(v, int | float) for v in x)
        ax.scatter(x if numeric else [str(v) for v in x], [a for _, a in pairs], s=10)
        ax.set_title(name, fontsize=9)
        html.add_scatter(
            x=[str(v) for v in x] if not numeric else x,
            y=[a for _, a in pairs],
            mode="markers",
            name=name,
            visible="legendonly",
        )
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    fig.suptitle(f"Parameters vs {objective}")
    fig.tight_layout()
    html.update_layout(title=f"Parameters vs {objective} (pick parameters in the legend)")
    return fig, html


def _curves(study, front_ids, client):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    html = go.Figure()
    for number in front_ids:
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        if run_id is None:
            continue
        history = client.get_metric_history(run_id, "train_loss")
        steps = [m.step for m in history]
        losses = [m.value for m in history]
        ax.plot(steps, losses, label=f"trial {number}")
        html.add_scatter(x=steps, y=losses, mode="lines", name=f"trial {number}")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Fine-tuning curves of the Pareto front")
    if front_ids:
        ax.legend(fontsize=7)
    html.update_layout(title="Fine-tuning curves of the Pareto front", xaxis_title="epoch")
    return fig, html


def _write_page(path: Path, study_name, parts, metrics: pd.DataFrame, balance) -> Path:
    sections = []
    for i, (name, fig) in enumerate(parts):
        div = fig.to_html(full_html=False, include_plotlyjs=i == 0)
        sections.append(
            f"<h2>{name.replace('_', ' ')}</h2>"
            f'<p><a href="{name}.png">{name}.png</a> · <a href="{name}.html">{name}.html</a></p>'
            f"{div}"
        )
    summary = metrics[[c for c in metrics.columns if not c.startswith("acc_class_")]]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>squeeze report: {study_name}</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>squeeze report: {study_name}</h1>"
        '<p>Files: <a href="trials.csv">trials.csv</a> · <a href="metrics.csv">metrics.csv</a>'
        ' · <a href="confusion.json">confusion.json</a> · '
        '<a href="class_balance.csv">class_balance.csv</a></p>'
        "<h2>Baseline and Pareto points</h2>"
        f"{summary.to_html(float_format=lambda v: f'{v:.4f}')}"
        "<h2>Per-class accuracy</h2>"
        f"{metrics.filter(like='acc_class_').to_html(float_format=lambda v: f'{v:.3f}')}"
        "<h2>Class balance</h2>"
        f"{balance.to_html(float_format=lambda v: f'{v:g}')}" + "".join(sections) + "</body></html>"
    )
    path.write_text(page)
    return path
