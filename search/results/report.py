"""``squeeze report``: a study's trials, plots and per-class metrics, in one folder and on MLflow.

Everything is written to ``<output_dir>/<study>/report/`` and logged to the study's parent MLflow
run under ``report/``:

- ``report.html``: one page that leads with the Pareto front table (the baseline first, then the
  front from the smallest file up: size, ratio, validation and test score, their change against
  the baseline, negative being worse: in percentage points, or in percent of the baseline's
  value for a lower-is-better score such as MSE, see `search.config.score`; and the full
  recipe), then every figure and table, linking the files below;
- ``trials.csv`` (and ``trials.parquet`` when pyarrow is installed): one row per trial;
- ``metrics.csv`` and ``confusion.json``: top-1 / top-5 accuracy, macro F1 and recall, per-class
  accuracy and the confusion matrix on validation and test, for the baseline and every Pareto
  point (above 100 classes, a language model's vocabulary: the 100 most frequent confusions
  instead of each matrix, and the accuracy per class in ``per_class_accuracy.csv``; a task
  without classes: its score, headed by its name, ``R2Score``, and extra scores, no
  confusion.json);
  ``class_balance.csv``: labels per class in each split (per labelled position for
  per-position logits);
- figures, each as PNG (matplotlib) and interactive HTML (plotly), every axis saying what it shows
  and in which unit: the Pareto front (score vs packed size on a log scale, front highlighted,
  baseline marked, the recipe on hover), hypervolume history, parameter importance per objective
  (`optuna.importance`), parameters vs the first objective, and the fine-tuning curves of the
  front's trials. A figure with nothing to show is left out, with a line in report.html saying why;
- ``plotly.min.js``, once: report.html and every figure's HTML load it from the folder, so the
  folder works offline;
- what compression changed in each front point (`search.results.explain`): bytes per layer,
  baseline beside each point (``bytes_per_layer.csv`` / ``.png`` / ``.html``), agreement with
  the baseline's predictions (``agreement.csv``, ``flipped.csv``), attribution fidelity
  (``attribution_fidelity.csv``, ``attributions_trial_<N>.png``), each where there is something
  to hold (a regression makes no decisions: none of them); each point's own files are
  also logged to its MLflow run under ``explain/``.
"""

from __future__ import annotations

import html as html_text
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import plotly.offline  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments import PositionsMismatch, evaluate, scores  # noqa: E402
from experiments.analysis import (  # noqa: E402
    WHOLE_CLASSES,
    class_balance,
    classification_report,
)
from search.config.score import Score  # noqa: E402
from search.results._report_figures import _figures, _score_unit  # noqa: E402
from search.results._study import load_study, study_config  # noqa: E402
from search.results.explain import explain_front  # noqa: E402
from search.run.logs import Stages, Ticker  # noqa: E402
from search.run.pareto import front_numbers, trial_model, trials_frame  # noqa: E402
from search.run.progress import trial_recipes  # noqa: E402
from search.run.recommend import recommend  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

logger = logging.getLogger(__name__)

#: The figures, in the order report.html shows them.
FIGURES = (
    "pareto_front",
    "hypervolume",
    "param_importance",
    "params_vs_accuracy",
    "finetune_curves",
)
#: The one copy of plotly.js in the folder, which report.html and every figure's HTML load.
PLOTLY_JS = "plotly.min.js"
#: Accuracy per class of a task with more than `WHOLE_CLASSES` classes (one row per class).
PER_CLASS_FILE = "per_class_accuracy.csv"


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
    # The study's task and seed; this command's cache and device.
    here = {"cache_dir": cfg.cache_dir, "device": cfg.device}
    workload = load_workload(OmegaConf.merge(study_cfg, here), progress=Stages(logger, "report:"))
    plan, task, baseline = workload.plan, workload.task, workload.baseline
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
    loading = Ticker(logger, "report: loading point")  # a long report shows where it is
    for k, number in enumerate(front_ids, 1):
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        models[f"trial {number}"] = trial_model(
            Path(study_cfg.output_dir), study_name, number, run_id, client, task.build_model
        )
        loading(k, len(front_ids))
    unpaired = ""
    if task.outputs == "logits":  # classification metrics; an embedding task has its scores
        metrics, confusion, by_class, unpaired = _metrics_or_scores(models, task)
        if confusion is None:
            (folder / "confusion.json").unlink(missing_ok=True)  # (not a previous report's)
        else:
            files.append(_write(folder / "confusion.json", json.dumps(confusion, indent=1)))
        (folder / PER_CLASS_FILE).unlink(missing_ok=True)
        if by_class is not None:  # (more classes than a table's columns)
            files.append(_save(by_class.to_csv, folder / PER_CLASS_FILE))
        balance = class_balance(task)
        files.append(_save(balance.to_csv, folder / "class_balance.csv"))
    else:
        metrics, balance = _scores(models, task), pd.DataFrame()
    files.append(_save(metrics.to_csv, folder / "metrics.csv"))

    base = {**baseline.metrics, **study.user_attrs.get("baseline", {})}
    direction = Score.of_study(study)  # as the study was searched
    score = _score_unit(task, direction)
    named = Score.of_task(task)  # what the task's metric is (R2Score), for headings
    recipes = trial_recipes(study, plan.space)
    test_scores = {name: evaluate(model, task.test) for name, model in models.items()}
    front_rows = _front_rows(trials, front_ids, base, test_scores, recipes, direction)
    recommended = _recommended(
        trials, front_ids, base, direction, tuple(study_cfg.search.objectives)
    )
    for row in front_rows:
        row["recommended"] = row["model"] == f"trial {recommended}"

    files.append(_write(folder / PLOTLY_JS, plotly.offline.get_plotlyjs()))
    objectives = list(study_cfg.search.objectives)
    figures, notes = _figures(
        study,
        objectives,
        trials,
        front_ids,
        base,
        client,
        recipes=recipes,
        score=score,
        direction=direction,
        recommended=recommended,
    )
    for name in FIGURES:
        png, page = folder / f"{name}.png", folder / f"{name}.html"
        if name not in figures:  # no file, not even a previous report's
            png.unlink(missing_ok=True)
            page.unlink(missing_ok=True)
            continue
        fig_png, fig_html = figures[name]
        fig_png.savefig(png)
        plt.close(fig_png)
        fig_html.write_html(page, include_plotlyjs="directory")  # the folder's PLOTLY_JS
        files += [png, page]
    # What compression changed: bytes per layer, agreement, attributions
    explained, explain_html = explain_front(
        study,
        task,
        baseline,
        client,
        output_dir=Path(study_cfg.output_dir),
        front_ids=front_ids,
        folder=folder,
    )
    files += explained
    counts = trials.state.value_counts().to_dict()
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    summary = ", ".join(f"{counts.get(s, 0)} {word}" for s, word in states.items())
    directions = [d.name.lower() for d in study.directions]
    heading = (
        f"{len(trials)} trials ({summary}); objectives: "
        + ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=True))
        + f"; scores: {score}."
    )
    files.append(
        _write_page(
            folder / "report.html",
            study_name,
            heading=heading,
            front=_front_table(front_rows, score, direction),
            figures={name: figures[name][1] for name in FIGURES if name in figures},
            titles=_titles(objectives[0], named),
            notes=notes,
            metrics=metrics,
            balance=balance,
            unpaired=unpaired,
            data_files=[p.name for p in files if p.suffix in (".csv", ".json", ".parquet")],
            explain=explain_html,
        )
    )

    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id is not None:
        for path in files:
            client.log_artifact(parent_id, str(path), "report")
    return Report(folder, files, parent_id)


def _save(method, path: Path, **kwargs) -> Path:
    method(path, **kwargs)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _metrics_or_scores(
    models: dict, task
) -> tuple[pd.DataFrame, dict | None, pd.DataFrame | None, str]:
    """A classifier's metrics, confusion matrices and accuracy per class (`_metrics`) and no
    note; or, where its logits decide at other positions than its targets label (a SegFormer's
    at a quarter of its masks' size), the task's own scores (`_scores`), no confusion matrices
    and why."""
    try:
        return (*_metrics(models, task), "")
    except PositionsMismatch as err:
        logger.info("report: per-class metrics and confusion matrices left out: %s", err)
        return _scores(models, task), None, None, str(err)


def _metrics(models: dict, task) -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """The models' metrics on validation and test with a column of accuracy per class up to
    `WHOLE_CLASSES` classes, their confusion matrices (or most frequent confusions:
    `experiments.analysis.classification_report`), and above `WHOLE_CLASSES` classes the
    accuracy per class as a frame of its own (one row per class labelled in some split, one
    column per model and split; else None)."""
    rows, confusion, per_class = [], {}, {}
    scoring = Ticker(logger, "report: scoring model")
    for k, (name, model) in enumerate(models.items(), 1):
        for split_name, split in (("val", task.val), ("test", task.test)):
            report = classification_report(model, split, task.num_classes)
            confusion[f"{name} / {split_name}"] = report.pop("confusion")
            per_class[f"{name} / {split_name}"] = report.pop("per_class_acc")
            rows.append({"model": name, "split": split_name, **report})
        scoring(k, len(models), name)
    metrics = pd.DataFrame(rows).set_index(["model", "split"])
    by_class = pd.DataFrame(per_class).rename_axis("class").dropna(how="all")
    if task.num_classes <= WHOLE_CLASSES:
        columns = by_class.reindex(range(task.num_classes)).T.add_prefix("acc_class_")
        return metrics.join(columns.set_axis(metrics.index)), confusion, None
    return metrics, confusion, by_class


def _scores(models: dict, task) -> pd.DataFrame:
    """The task's score and extra scores of each model on validation and test; the score's
    column headed by its name (`Score.head`: ``acc`` for an accuracy, ``R2Score`` for an R²)."""
    head = Score.of_task(task).head
    if head != "acc" and head in task.extra_scores:  # (an extra score of the same name)
        head = f"score: {head}"
    rows, scoring = [], Ticker(logger, "report: scoring model")
    for k, (name, model) in enumerate(models.items(), 1):
        for split_name, split in (("val", task.val), ("test", task.test)):
            values = scores(model, split, task.extra_scores)
            score = values.pop("acc")  # (`experiments.scores` keys the task's score "acc")
            rows.append({"model": name, "split": split_name, head: score, **values})
        scoring(k, len(models), name)
    return pd.DataFrame(rows).set_index(["model", "split"])


# ----------------------------------------------------------------------------- the front table


def _recommended(trials, front_ids, base, direction: Score, objectives=()) -> int | None:
    """The front point ``squeeze sweep`` recommends (`search.run.recommend`), or None."""
    front = trials[trials.trial.isin(front_ids)]
    if front.empty:
        return None
    front = front.assign(val_drop=[direction.drop(v, base["val_acc"]) for v in front.val_acc])
    return recommend(front, score=direction, objectives=objectives).trial


def _front_rows(trials, front_ids, base, test_scores, recipes, direction: Score) -> list[dict]:
    """The baseline, then the front by packed size (ties: better score first), as numbers; each
    change against the baseline in the score's unit (negative: worse)."""
    front = trials[trials.trial.isin(front_ids)]
    front = front.assign(goodness=[direction.goodness(v) for v in front.val_acc])
    front = front.sort_values(["size_bytes", "goodness"], ascending=[True, False])
    rows = [
        {
            "model": "baseline (fp32)",
            "size_kb": base.get("size_bytes", float("nan")) / 1000,
            "ratio": 1.0,
            "val": base["val_acc"],
            "test": test_scores["baseline"],
            "recipe": "none: the trained fp32 model, packed",
        }
    ]
    for row in front.itertuples():
        name = f"trial {row.trial}"
        rows.append(
            {
                "model": name,
                "size_kb": row.size_bytes / 1000,
                "ratio": row.compression_ratio,
                "val": row.val_acc,
                "test": test_scores[name],
                "recipe": recipes[row.trial],
            }
        )
    for row in rows:
        row["val_change"] = direction.change(row["val"], rows[0]["val"])
        row["test_change"] = direction.change(row["test"], rows[0]["test"])
    return rows


def _front_table(rows: list[dict], score: str, direction: Score) -> str:
    """The front as an HTML table; a change is signed, a minus meaning worse than the baseline."""
    header = (
        "model",
        "size (KB)",
        "ratio (× smaller)",
        "val score",
        "val change",
        "test score",
        "test change",
        "recipe",
    )
    body = []
    for i, row in enumerate(rows):
        marked = row.get("recommended", False)
        cells = (
            row["model"] + (" (recommended)" if marked else ""),
            f"{row['size_kb']:.2f}",
            f"{row['ratio']:.1f}×",
            f"{row['val']:.4f}",
            "reference" if i == 0 else direction.format_change(row["val_change"], minus="−"),
            f"{row['test']:.4f}",
            "reference" if i == 0 else direction.format_change(row["test_change"], minus="−"),
        )
        body.append(
            ("<tr class='recommended'>" if marked else "<tr>")
            + "".join(f"<td>{html_text.escape(c)}</td>" for c in cells)
            + f"<td class='recipe'><code>{html_text.escape(row['recipe'])}</code></td></tr>"
        )
    if direction.higher_is_better:
        change = (
            "A change is the score minus the baseline's, in percentage points (pt): negative is "
            "a loss (−1.4 pt: 1.4 points worse than the baseline), positive a gain."
        )
    else:
        change = (
            "A change is how much lower the score is than the "
            "baseline's, in percent of the baseline's (%): negative is a loss (−5.0 %: 5% "
            "higher, worse, than the baseline), positive a gain."
        )
    return (
        "<table class='front'><caption>The baseline, then the Pareto front from the smallest "
        f"packed file up; in bold the point <code>squeeze sweep</code> recommends (the knee "
        "within 1 validation point of the baseline, else the best score), the one "
        "<code>squeeze export</code> exports by default. "
        f"Scores: {html_text.escape(score)}. {change}</caption><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in header)
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )


# ----------------------------------------------------------------------------- the page


def _titles(objective: str, named: Score) -> dict[str, str]:
    """Headings of the figures whose file name does not say what they show: the parameters
    against the first objective (``params vs accuracy``, ``params vs R2Score``, ``params vs
    size_bytes``); the others' are their names."""
    what = named.title if objective == "val_acc" else objective
    return {"params_vs_accuracy": f"params vs {what}"}


def _write_page(
    path: Path,
    study_name: str,
    *,
    heading: str,
    front: str,
    figures: dict[str, go.Figure],
    titles: dict[str, str] | None = None,
    notes: dict[str, str],
    metrics: pd.DataFrame,
    balance: pd.DataFrame,
    data_files: list[str],
    explain: str = "",
    unpaired: str = "",
) -> Path:
    sections = []
    for name in FIGURES:
        title = html_text.escape((titles or {}).get(name, name.replace("_", " ")))
        if name in notes:
            sections.append(f"<p class='note'><b>{title}</b>: left out, {notes[name]}.</p>")
        elif name in figures:
            div = figures[name].to_html(full_html=False, include_plotlyjs=False)
            sections.append(
                f"<h3>{title}</h3>"
                f"<p><a href='{name}.png'>{name}.png</a> · <a href='{name}.html'>{name}.html</a>"
                f"</p>{div}"
            )
    summary = metrics[[c for c in metrics.columns if not c.startswith("acc_class_")]]
    per_class = metrics.filter(like="acc_class_")
    tables = [("Metrics of the baseline and the Pareto points", summary, ".4f")]
    if unpaired:  # (the task's own scores above instead)
        explain += (
            "<p class='note'><b>per-class accuracy and confusion matrices</b>: left out, "
            f"{html_text.escape(unpaired)}.</p>"
        )
    if len(balance) > WHOLE_CLASSES + 1:  # (+ its imbalance row)
        explain += (
            f"<p class='note'><b>per-class accuracy and class balance</b>: {len(balance) - 1:,} "
            f"classes, too many for a table here: in <a href='{PER_CLASS_FILE}'>"
            f"{PER_CLASS_FILE}</a> (the classes labelled in some split) and <a href="
            "'class_balance.csv'>class_balance.csv</a>; confusion.json holds the "
            "most frequent confusions instead of whole matrices.</p>"
        )
        balance = pd.DataFrame()
    tables += [("Per-class accuracy", per_class, ".3f"), ("Class balance", balance, "g")]
    links = " · ".join(f"<a href='{f}'>{f}</a>" for f in data_files)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>squeeze report: {html_text.escape(study_name)}</title>"
        f"<script src='{PLOTLY_JS}'></script>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;vertical-align:top}caption{text-align:left;"
        "padding:4px 0}table.front td{text-align:right;white-space:nowrap}"
        "table.front td.recipe{text-align:left;white-space:normal;overflow-wrap:anywhere}"
        ".note{color:#555}tr.recommended td{font-weight:bold}</style></head><body>"
        f"<h1>squeeze report: {html_text.escape(study_name)}</h1>"
        f"<p>{html_text.escape(heading)}</p>"
        f"<h2>Pareto front</h2>{front}"
        f"<p>Files: {links}</p>"
        "<h2>Figures</h2>"
        + "".join(sections)
        + explain  # what compression changed (search.results.explain)
        + "".join(
            f"<h2>{title}</h2>{table.to_html(float_format=lambda v, f=fmt: format(v, f))}"
            for title, table, fmt in tables
            if not table.empty
        )
        + "</body></html>"
    )
    return _write(path, page)
