"""MLflow tracking: one parent run per study, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids, never through ``mlflow.start_run``'s
per-process active-run stack, so several trials (and later several worker processes) can log at
the same time. A child run buffers what it logs; when it ends, its one ``log_batch``, its
artifacts and its final status are written by a background thread while the next trial trains.
`Tracker.wait` (called before the study's results are read) waits for those writes and re-raises
their errors, so nothing is lost silently.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

# Downloads of a trial's model file are internal; MLflow's tqdm bar would garble the terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# squeeze runs offline by default; MLflow's usage telemetry threads would only compete with
# training for the CPU. Set MLFLOW_DISABLE_TELEMETRY=false to keep them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_LEN = 6000


def _now_ms() -> int:
    return int(time.time() * 1000)


class ChildRun:
    """Buffered logging of one trial's MLflow run; flushed when its context ends."""

    def __init__(self, client: MlflowClient, run_id: str | Future[str]) -> None:
        self._run_id = run_id
        self._client = client
        self._params: dict[str, str] = {}
        self._metrics: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._artifacts: list[Path] = []

    @property
    def run_id(self) -> str:
        """The MLflow run id (waits for the run's creation if that is still under way)."""
        if isinstance(self._run_id, Future):
            self._run_id = self._run_id.result()
        return self._run_id

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
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squeeze-mlflow")
        self._pending: list[Future] = []

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._writer.submit(fn, *args))

    def wait(self) -> None:
        """Wait for every background write; re-raise the first that failed."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending if f.exception() is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} MLflow write(s) failed") from errors[0]

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
    def child_run(
        self, *, name: str, tags: Mapping[str, Any], link: Callable[[str], None] | None = None
    ) -> Iterator[ChildRun]:
        """A child run of the parent; ends FAILED, with the error as a tag, if the body raises.

        The run is created by the background writer while the body starts working; ``link`` is
        called with its run id before the run ends, whether the body succeeded or failed.
        """
        assert self.parent_id is not None, "start_parent() first"
        tags = {"mlflow.parentRunId": self.parent_id, **{k: str(v) for k, v in tags.items()}}
        created = self._writer.submit(self._create, name, tags)
        child = ChildRun(self.client, created)
        try:
            yield child
        except BaseException as err:
            child.set_tags({"squeeze.state": "FAIL", "squeeze.error": repr(err)[:5000]})
            self._end(child, "FAILED", link)
            raise
        child.set_tags({"squeeze.state": "COMPLETE"})
        self._end(child, "FINISHED", link)

    def _create(self, name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def _end(self, child: ChildRun, status: str, link: Callable[[str], None] | None) -> None:
        if link is not None:
            link(child.run_id)
        self._submit(self._close, child, status)

    def _close(self, child: ChildRun, status: str) -> None:
        try:
            child.flush()
        finally:
            self.client.set_terminated(child.run_id, status=status)

    def finish_parent(
        self, *, artifacts: list[Path], metrics: Mapping[str, float], tags: Mapping[str, Any]
    ) -> None:
        """Log the study's results to the parent run and close it."""
        self.wait()
        parent = ChildRun(self.client, self.parent_id)
        parent.log_metrics(metrics)
        parent.set_tags(tags)
        for path in artifacts:
            parent.log_artifact(path)
        parent.flush()
        self.client.set_terminated(self.parent_id, status="FINISHED")

    def mark_front(self, front: Mapping[str, Mapping[str, float]]) -> None:
        """Tag ``pareto=true`` and log ``front[run_id]`` on the front's child runs, and tag
        ``pareto=false`` on children that were on the front of an earlier session but are no more.
        """
        self.wait()
        earlier = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.pareto = 'true'",
            max_results=50_000,
        )
        for run in earlier:
            if run.info.run_id not in front:
                self.client.set_tag(run.info.run_id, "pareto", "false")
        for run_id, metrics in front.items():
            run = ChildRun(self.client, run_id)
            run.set_tags({"pareto": "true"})
            run.log_metrics(metrics)
            run.flush()

    def download(self, run_id: str, artifact: str, dst: Path) -> Path:
        """Download one artifact of a run into ``dst`` and return its local path."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
