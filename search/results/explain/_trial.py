"""A study's models explained: one trial or the baseline (`explain_trial`, ``squeeze explain``),
and every point of the front for the report (`explain_front`)."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from experiments import (
    Baseline,
    Task,
)
from search._errors import ConfigError
from search.results.explain._figures import attribution_figure, bytes_figure, bytes_plotly
from search.results.explain._files import (
    ONLY_WITH_ROWS,
    agreement_table,
    bytes_table,
    save_csv,
    save_png,
    write_explanation,
)
from search.results.explain._model import Explanation, explain_model
from search.run.logs import Stages, Ticker

logger = logging.getLogger(__name__)


def explain_trial(
    cfg: DictConfig,
    study_name: str,
    trial: int | str,
    *,
    attributions: bool = True,
    samples: int | None = None,
    seed: int = 0,
    log: bool = True,
) -> Explanation:
    """Explain trial ``trial`` of ``study_name`` (or ``"baseline"``): write its files to
    ``<output_dir>/<study>/explain/<trial-NNNN|baseline>/`` and, with ``log``, log them to the
    trial's MLflow run under ``explain/`` (the baseline's: the study's parent run, under
    ``explain/baseline/``).

    Raises:
        ConfigError: If the study has no such complete trial (the message lists those it has).
    """
    from mlflow.tracking import MlflowClient

    from search.results._study import load_study, study_config
    from search.run.pareto import trial_packed_file
    from search.run.workload import load_workload

    study = load_study(cfg, study_name)
    number = _trial_number(study, trial)
    study_cfg = study_config(cfg, study)
    here = {"cache_dir": cfg.cache_dir, "device": cfg.device}
    workload = load_workload(OmegaConf.merge(study_cfg, here), progress=Stages(logger, "explain:"))
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    name = "baseline" if number is None else f"trial {number}"
    folder = Path(cfg.output_dir) / study_name / "explain"
    folder /= "baseline" if number is None else f"trial-{number:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        if number is None:
            path = workload.baseline.folder / "model.sqz"  # written by explain_model if absent
            run_id = study.user_attrs.get("mlflow_parent_run_id")
            artifact_dir = "explain/baseline"
        else:
            run_id = study.trials[number].user_attrs.get("mlflow_run_id")
            path = trial_packed_file(
                Path(study_cfg.output_dir), study_name, number, run_id, client, Path(tmp)
            )
            artifact_dir = "explain"
        explanation = explain_model(
            path,
            workload.task,
            workload.baseline,
            name=name,
            attributions=attributions,
            samples=samples,
            seed=seed,
        )
    files = write_explanation(explanation, folder)
    if log and run_id is not None:
        for file in files:
            client.log_artifact(run_id, str(file), artifact_dir)
    return dataclasses.replace(explanation, files=files, run_id=run_id if log else None)


def _trial_number(study, trial: int | str) -> int | None:
    """The complete trial ``trial`` names (None for ``baseline``), or a `ConfigError`."""
    complete = [
        t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
    ]
    listed = ", ".join(map(str, complete)) or "none"
    if str(trial) == "baseline":
        return None
    try:
        number = int(trial)
    except ValueError:
        raise ConfigError(
            f"--trial {trial!r}: expected a trial number or 'baseline'. Complete trials of study "
            f"{study.study_name!r}: {listed}."
        ) from None
    if number not in complete:
        raise ConfigError(
            f"Study {study.study_name!r} has no complete trial {number}: --trial takes a complete "
            f"trial's number or 'baseline'. Complete trials: {listed}."
        )
    return number


def explain_front(
    study,
    task: Task,
    baseline: Baseline,
    client,
    *,
    output_dir: Path,
    front_ids: Sequence[int],
    folder: Path,
) -> tuple[list[Path], str]:
    """The report's part (`search.results.report`): every front point explained against the
    baseline. Writes into ``folder`` ``bytes_per_layer.csv`` / ``.png`` / ``.html`` (the
    baseline and each point), where the task makes decisions ``agreement.csv`` and
    ``flipped.csv``, where attributions were computed ``attribution_fidelity.csv`` and
    ``attributions_trial_<N>.png`` (a table with no rows is not written); writes each point's
    own files to ``<output_dir>/<study>/explain/trial-NNNN/`` and logs them to its MLflow run
    under ``explain/``. Returns the report folder's new files and the page's HTML section."""
    from search.run.pareto import trial_packed_file

    if not front_ids:
        return [], "<p class='note'><b>what compression changed</b>: left out, no front.</p>"
    explained: dict[int, Explanation] = {}
    points = Ticker(logger, "report: explaining point")
    for k, number in enumerate(front_ids, 1):
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        with tempfile.TemporaryDirectory() as tmp:
            path = trial_packed_file(
                output_dir, study.study_name, number, run_id, client, Path(tmp)
            )
            explanation = explain_model(path, task, baseline, name=f"trial {number}")
        own = output_dir / study.study_name / "explain" / f"trial-{number:04d}"
        for file in write_explanation(explanation, own):
            if run_id is not None:
                client.log_artifact(run_id, str(file), "explain")
        explained[number] = explanation
        points(k, len(front_ids))
    first = next(iter(explained.values()))
    models = {"baseline": first.baseline_breakdown}
    models.update({e.name: e.breakdown for e in explained.values()})
    files = [save_csv(bytes_table(models), folder / "bytes_per_layer.csv", index=False)]
    files.append(save_png(bytes_figure(models), folder / "bytes_per_layer.png"))
    plotly_figure = bytes_plotly(models)
    plotly_figure.write_html(folder / "bytes_per_layer.html", include_plotlyjs="directory")
    files.append(folder / "bytes_per_layer.html")
    for stale in ONLY_WITH_ROWS:  # (a previous report's: a table with no rows is not written)
        (folder / stale).unlink(missing_ok=True)
    # (a regression makes no decisions: no agreement, nothing flipped, nothing attributed)
    tables = [agreement_table(e) for e in explained.values() if e.agreement]
    agreement = pd.concat(tables, ignore_index=True) if tables else None
    if agreement is not None:
        files.append(save_csv(agreement, folder / "agreement.csv", index=False))
        flipped = pd.concat(
            [
                a.flipped.assign(model=e.name, split=a.split)
                for e in explained.values()
                for a in e.agreement.values()
            ],
            ignore_index=True,
        )
        files.append(save_csv(flipped, folder / "flipped.csv", index=False))
    per_model = [
        e.fidelity.per_class.assign(model=e.name, method=e.fidelity.method).reset_index()
        for e in explained.values()
        if e.fidelity is not None
    ]
    fidelity = pd.concat(per_model, ignore_index=True) if per_model else None
    if fidelity is not None:
        files.append(save_csv(fidelity, folder / "attribution_fidelity.csv", index=False))
    images = []
    for number, explanation in explained.items():
        if explanation.shown is not None and len(explanation.shown.indices):
            figure = attribution_figure(explanation.shown, title=explanation.name)
            files.append(save_png(figure, folder / f"attributions_trial_{number}.png"))
            images.append(files[-1].name)
    return files, _section(plotly_figure, agreement, fidelity, explained, images)


def _section(plotly_figure, agreement, fidelity, explained, images) -> str:
    """report.html's part: the bytes figure, the agreement and fidelity tables where there are
    any (a regression has neither), notes, attribution images."""
    import html

    div = plotly_figure.to_html(full_html=False, include_plotlyjs=False)
    notes = sorted({n for e in explained.values() for n in e.notes})
    page = (
        "<h2>What compression changed</h2>"
        "<h3>bytes per layer</h3><p>Each bar: the bytes the packed file stores for each "
        "tensor (its arrays, compressed by their codecs); its index and framing on top (an old "
        "SQZ2 file: its tensors in its uncompressed payload, LZMA's saving below zero); a black "
        "tick at the file's size (the sum). Per-tensor rows: "
        "<a href='bytes_per_layer.csv'>bytes_per_layer.csv</a> · "
        "<a href='bytes_per_layer.png'>bytes_per_layer.png</a> · "
        f"<a href='bytes_per_layer.html'>bytes_per_layer.html</a></p>{div}"
    )
    if agreement is not None:
        page += (
            "<h3>agreement with the baseline</h3><p>The share of inputs decided as the baseline "
            "decided (top-1 class; nearest neighbour for embeddings); every flipped input in "
            "<a href='flipped.csv'>flipped.csv</a>.</p>"
            + agreement.to_html(index=False, float_format=lambda v: f"{v:.4f}")
        )
    if fidelity is not None:
        pivot = fidelity.pivot_table(index="model", columns="class", values="mean_spearman")
        page += (
            "<h3>attribution fidelity</h3><p>Mean Spearman rank correlation of the baseline's "
            "and each model's input attributions, per class "
            f"({html.escape(str(fidelity.method.iloc[0]))}).</p>"
            + pivot.to_html(float_format=lambda v: f"{v:.3f}")
        )
    return (
        page
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
        + "".join(f"<p><img src='{name}' style='max-width:100%'></p>" for name in images)
    )
