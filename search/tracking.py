"""MLflow tracking: one parent run per study, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids, never through ``mlflow.start_run``'s
per-process active-run stack, so several trials (and later several worker processes) can log at
the same time.

A trial's child run is created when the trial starts; what the trial logs is buffered, and
written (with the run's final status) by a writer process forked from this one, so MLflow's
database work runs on another core, outside this interpreter's lock, while the next trial trains
(a thread where ``fork`` is not available).
`Tracker.wait` (called before the study's results are read, and by `Tracker.close`) waits for
every write and re-raises the first error, so nothing is lost silently.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
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


class ChildRun:
    """What one run logs, buffered until it is written in one go."""

    def __init__(self, run_id: str | Future[str]) -> None:
        self._run_id = run_id
        self.params: dict[str, str] = {}
        self.metrics: list[Metric] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []

    @property
    def run_id(self) -> str:
        """The MLflow run id (waits for the writer to create the run if it has not yet)."""
        if isinstance(self._run_id, Future):
            self._run_id = self._run_id.result()
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update({k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        stamp = int(time.time() * 1000)
        self.metrics += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        self.artifacts.append(str(path))


def _write(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, str],
    metrics: list[Metric],
    tags: Mapping[str, str],
    artifacts: list[str],
) -> None:
    plist = [Param(k, v) for k, v in params.items()]
    tlist = [RunTag(k, v) for k, v in tags.items()]
    while plist or tlist or metrics:
        client.log_batch(
            run_id,
            metrics=metrics[:_MAX_METRICS],
            params=plist[:_MAX_PARAMS],
            tags=tlist[:_MAX_TAGS],
        )
        metrics, plist, tlist = metrics[_MAX_METRICS:], plist[_MAX_PARAMS:], tlist[_MAX_TAGS:]
    for path in artifacts:
        client.log_artifact(run_id, path)


# --- the writer process ---------------------------------------------------------------------
_writer_client: MlflowClient | None = None


def _writer_init(uri: str) -> None:
    """Runs first in the forked writer: a client of its own, without the parent's connections."""
    global _writer_client
    _writer_client = MlflowClient(tracking_uri=uri)
    engine = getattr(_writer_client._tracking_client.store, "engine", None)
    if engine is not None:  # SQL stores: the pool's connections belong to the parent
        engine.dispose(close=False)


def _writer_create(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    return _writer_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _writer_write(run_id: str, params, metrics, tags, artifacts, status: str | None) -> None:
    try:
        _write(_writer_client, run_id, params, metrics, tags, artifacts)
    finally:
        if status is not None:
            _writer_client.set_terminated(run_id, status=status)


def _make_writer(uri: str) -> Executor:
    if sys.platform == "linux":
        executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_writer_init,
            initargs=(uri,),
        )
    else:
        _writer_init(uri)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squeeze-mlflow")
    executor.submit(int).result()  # start it now, not inside the first trial
    return executor


def experiment_id(
    client: MlflowClient, uri: str, experiment: str, *, artifacts: str | None = None
) -> str:
    """The id of MLflow experiment ``experiment``, created if missing (artifacts in ``mlruns/``
    next to a SQLite database file, else where ``artifacts`` or the server says)."""
    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    if artifacts is None and uri.startswith("sqlite:///"):
        artifacts = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns")
    return client.create_experiment(experiment, artifact_location=artifacts)


class Tracker:
    """An MLflow experiment and the parent run of one study.

    Args:
        uri: Tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
        experiment: Experiment name; created if missing.
        artifacts: Artifact location of a new experiment; by default ``mlruns/`` next to a
            SQLite database file, else the server's default.
    """

    def __init__(self, uri: str, experiment: str, *, artifacts: str | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id(self.client, uri, experiment, artifacts=artifacts)
        self.parent_id: str | None = None
        self._writer = _make_writer(uri)
        self._pending: list[Future] = []

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        future = self._writer.submit(fn, *args)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Wait for every background write; re-raise the first that failed."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending if f.exception() is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} MLflow write(s) failed") from errors[0]

    def close(self) -> None:
        """Wait for every write and stop the writer."""
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

    def start_parent(
        self,
        *,
        run_id: str | None,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, Any],
        artifacts: list[Path],
    ) -> str:
        """Open the study's parent run, or reopen ``run_id`` when a study is resumed.

        The params, metrics and artifacts are written by the writer."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.parent_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        self.parent_id = run.info.run_id
        parent = ChildRun(self.parent_id)
        parent.log_params(params)
        parent.log_metrics(metrics)
        for path in artifacts:
            parent.log_artifact(path)
        self._end(parent, None)
        return self.parent_id

    @contextmanager
    def child_run(
        self, *, name: str, tags: Mapping[str, Any], link: Callable[[str], None] | None = None
    ) -> Iterator[ChildRun]:
        """A child run of the parent; ends FAILED, with the error as a tag, if the body raises.

        The writer creates the run while the body works; ``link`` is called with the run id
        before the run ends, whether the body succeeded or failed.
        """
        assert self.parent_id is not None, "start_parent() first"
        tags = {"mlflow.parentRunId": self.parent_id, **{k: str(v) for k, v in tags.items()}}
        child = ChildRun(self._submit(_writer_create, self.experiment_id, name, tags))
        try:
            yield child
        except BaseException as err:
            child.set_tags({"squeeze.state": "FAIL", "squeeze.error": repr(err)[:5000]})
            self._end(child, "FAILED", link)
            raise
        child.set_tags({"squeeze.state": "COMPLETE"})
        self._end(child, "FINISHED", link)

    def _end(self, child: ChildRun, status: str | None, link: Callable[[str], None] | None = None):
        if link is not None:
            link(child.run_id)
        self._submit(
            _writer_write,
            child.run_id,
            child.params,
            child.metrics,
            child.tags,
            child.artifacts,
            status,
        )

    def finish_parent(
        self, *, artifacts: list[Path], metrics: Mapping[str, float], tags: Mapping[str, Any]
    ) -> None:
        """Log the study's results to the parent run and close it (through the writer)."""
        parent = ChildRun(self.parent_id)
        parent.log_metrics(metrics)
        parent.set_tags(tags)
        for path in artifacts:
            parent.log_artifact(path)
        self._end(parent, "FINISHED")

    def abort(self) -> None:
        """End the parent run as KILLED after an error or an interrupt (best effort)."""
        if self.parent_id is None:
            return
        try:
            self.wait()
        finally:
            self.client.set_terminated(self.parent_id, status="KILLED")

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
            run = ChildRun(run_id)
            run.set_tags({"pareto": "true"})
            run.log_metrics(metrics)
            self._end(run, None)

    def download(self, run_id: str, artifact: str, dst: Path) -> Path:
        """Download one artifact of a run into ``dst`` and return its local path."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
