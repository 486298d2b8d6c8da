"""MLflow tracking: one parent run per study, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids, never through ``mlflow.start_run``'s
per-process active-run stack, so several trials (and later several worker processes) can log at
the same time. A child run buffers what it logs and writes it in one ``log_batch`` call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

# Downloads of a trial's model file are internal; MLflow's tqdm bar would garble the terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_LEN = 6000


def _now_ms() -> int:
    return int(time.time() * 1000)


class ChildRun:
    """Buffered logging of one trial's MLflow run; flushed when its context ends."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.run_id = run_id
        self._client = client
        self._params: dict[str, str] = {}
        self._metrics: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._artifacts: list[Path] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update({k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        stamp = _now_ms()
        self._metrics += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        self._artifacts.append(Path(path))

    def flush(self) -> None:
        """Write everything buffered so far."""
        params = [Param(k, v) for k, v in self._params.items()]
        tags = [RunTag(k, v) for k, v in self._tags.items()]
        metrics = self._metrics
        while params or tags or metrics:
            self._client.log_batch(
                self.run_id,
                metrics=metrics[:_MAX_METRICS],
                params=params[:_MAX_PARAMS],
                tags=tags[:_MAX_TAGS],
            )
            metrics, params, tags = (
                metrics[_MAX_METRICS:],
                params[_MAX_PARAMS:],
                tags[_MAX_TAGS:],
            )
        for path in self._artifacts:
            self._client.log_artifact(self.run_id, str(path))
        self._params, self._metrics, self._tags, self._artifacts = {}, [], {}, []


class Tracker:
    """An MLflow experiment and the parent run of one study.

    Args:
        uri: Tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
        experiment: Experiment name; created if missing.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment)
        )
        self.parent_id: str | None = None

    def start_parent(
        self,
        *,
        run_id: str | None,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, Any],
        config: Mapping[str, Any],
    ) -> str:
        """Open the study's parent run, or reopen ``run_id`` when a study is resumed."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.parent_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        self.parent_id = run.info.run_id
        parent = ChildRun(self.client, self.parent_id)
        parent.log_params(params)
        parent.log_metrics(metrics)
        parent.flush()
        self.client.log_dict(self.parent_id, dict(config), "config.yaml")
        return self.parent_id

    @contextmanager
    def child_run(self, *, name: str, tags: Mapping[str, Any]) -> Iterator[ChildRun]:
        """A child run of the parent; ends FAILED, with the error as a tag, if the body raises."""
        assert self.parent_id is not None, "start_parent() first"
        tags = {"mlflow.parentRunId": self.parent_id, **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        child = ChildRun(self.client, run.info.run_id)
        try:
            yield child
        except BaseException as err:
            child.set_tags({"squeeze.state": "FAIL", "squeeze.error": repr(err)[:5000]})
            self._close(child, "FAILED")
            raise
        child.set_tags({"squeeze.state": "COMPLETE"})
        self._close(child, "FINISHED")

    def _close(self, child: ChildRun, status: str) -> None:
        try:
            child.flush()
        finally:
            self.client.set_terminated(child.run_id, status=status)

    def finish_parent(
        self, *, artifacts: list[Path], metrics: Mapping[str, float], tags: Mapping[str, Any]
    ) -> None:
        """Log the study's results to the parent run and close it."""
        parent = ChildRun(self.client, self.parent_id)
        parent.log_metrics(metrics)
        parent.set_tags(tags)
        for path in artifacts:
            parent.log_artifact(path)
        parent.flush()
        self.client.set_terminated(self.parent_id, status="FINISHED")

    def tag_runs(self, run_ids: list[str], tags: Mapping[str, Any], metrics: Mapping[str, dict]):
        """Set ``tags`` on each run and log ``metrics[run_id]`` to it."""
        for run_id in run_ids:
            run = ChildRun(self.client, run_id)
            run.set_tags(tags)
            run.log_metrics(metrics.get(run_id, {}))
            run.flush()

    def download(self, run_id: str, artifact: str, dst: Path) -> Path:
        """Download one artifact of a run into ``dst`` and return its local path."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
