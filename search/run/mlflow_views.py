"""What MLflow's UI shows first: two saved views of a study's runs, and the link that opens them.

MLflow 3.17's UI opens an experiment on its GenAI "Overview" (traces) unless the URL says
``workflowType=machine_learning``, and its runs table shows Dataset / Source / Models columns,
with a study's trials collapsed under their parent run. Its "Views" menu lists the experiment's
saved views: experiment tags ``mlflow.sharedViewState.<key>`` whose value is
``{"name", "createdAt", "state"}``, ``state`` the view as JSON (the search filter, the sort, the
columns, their order and widths); ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens one.

A sweep saves two views per study: its trials sorted by validation score with the metrics that
matter as columns (sorted by a metric, MLflow lists the trials flat, not under the parent), and
its Pareto front (runs tagged ``pareto=true``). `runs_url` is the link ``squeeze ui`` prints.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from urllib.parse import quote

from mlflow.tracking import MlflowClient

#: The experiment-tag prefix of MLflow's saved views (its UI's ``EXPERIMENT_PAGE_VIEW_STATE_SHARE_
#: TAG_PREFIX``).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: Metrics shown as columns, after the study's objectives: the validation score, the file's
#: bytes, the compression ratio, the speed-up, and the test score (front points only).
METRIC_COLUMNS = ("val_acc", "size_bytes", "compression_ratio", "speedup", "test_acc")
#: The run tag and the parameter shown after the metrics.
TAG_COLUMNS = ("pareto",)
PARAM_COLUMNS = ("pipeline",)
_WIDTH = 120  # px: wide enough for "compression_ratio" and 9 digits


def view_key(study: str, *, front: bool = False) -> str:
    """The saved view's key (its tag is ``VIEW_TAG_PREFIX + key``): letters, digits, ``_.-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", study) + ("-front" if front else "-trials")


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's canonical column key


def _quoted(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def view_state(
    study: str, objectives: Sequence[str], *, higher_is_better: bool = True, front: bool = False
) -> dict:
    """One saved view's state: the study's trials (``front``: its Pareto front only), columns
    for ``objectives`` and `METRIC_COLUMNS`, sorted by validation score (front: by size)."""
    metrics = list(dict.fromkeys([*objectives, *METRIC_COLUMNS]))
    columns = [
        *(_column("metrics", m) for m in metrics),
        *(_column("tags", t) for t in TAG_COLUMNS),
        *(_column("params", p) for p in PARAM_COLUMNS),
    ]
    where = f"tags.`squeeze.study` = {_quoted(study)} and tags.`squeeze.trial` LIKE '%'"
    if front:
        where += " and tags.pareto = 'true'"
    return {
        "searchFilter": where,
        "orderByKey": _column("metrics", "size_bytes" if front else "val_acc"),
        "orderByAsc": front or not higher_is_better,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": dict.fromkeys(columns, _WIDTH),
    }


def view_tags(
    study: str,
    objectives: Sequence[str],
    *,
    higher_is_better: bool = True,
    created_ms: int | None = None,
) -> dict[str, str]:
    """The experiment tags of the study's two saved views (trials, Pareto front)."""
    created = int(time.time() * 1000) if created_ms is None else created_ms
    tags = {}
    for front, name in ((False, "all trials"), (True, "Pareto front")):
        state = view_state(study, objectives, higher_is_better=higher_is_better, front=front)
        envelope = {
            "name": f"{study}: {name}",
            "createdAt": created + front,
            "state": json.dumps(state),
        }
        tags[VIEW_TAG_PREFIX + view_key(study, front=front)] = json.dumps(envelope)
    return tags


def save_views(
    client: MlflowClient,
    experiment_id: str,
    study: str,
    objectives: Sequence[str],
    *,
    higher_is_better: bool = True,
) -> None:
    """Write (or rewrite) the study's saved views as tags of MLflow experiment ``experiment_id``."""
    for key, value in view_tags(study, objectives, higher_is_better=higher_is_better).items():
        client.set_experiment_tag(experiment_id, key, value)


def runs_url(base: str, experiment_id: str, study: str, *, front: bool = False) -> str:
    """The link to the study's saved view on the MLflow server at ``base``
    (``http://127.0.0.1:5000``): the runs table, not the GenAI overview."""
    key = quote(view_key(study, front=front), safe="")
    return (
        f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={key}"
    )
