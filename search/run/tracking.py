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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from search._errors import SweepStopped
from search.config.storage import check_tracking_uri, mask_url  # noqa: F401 - re-exported
from search.failures import (
    TRACEBACK_FILE_CHARS,
    failure_kind,
    failure_phase,
    failure_reason,
    failure_traceback,
    out_of_space,
)
from search.run.mlflow_db import first_use
from search.run.mlflow_views import save_views

logger = logging.getLogger(__name__)


def _shortest(value: float) -> float:
    """``value`` as a float; a float32's value (torchmetrics' scores) as the shortest decimal
    that reads back as that float32 (0.975, not 0.9750000238418579), which MLflow's UI shows."""
    value = float(value)
    single = np.float32(value)
    return float(str(single)) if np.isfinite(single) and float(single) == value else value


# Downloads of a trial's model file are internal; MLflow's tqdm bar would garble the terminal.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# squeeze runs offline by default; MLflow's usage telemetry threads would only compete with
# training for the CPU. Set MLFLOW_DISABLE_TELEMETRY=false to keep them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_LEN = 6000


class TrackingError(RuntimeError):
    """A trial's MLflow run could not be written (the trial fails with this reason)."""


class TrackedRun:
    """What one run logs, buffered until it is written in one go."""

    def __init__(self, run_id: str | Future[str]) -> None:
        self._run_id = run_id
        self.params: dict[str, str] = {}
        self.metrics: list[Metric] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.texts: dict[str, str] = {}

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
        self.metrics += [Metric(k, _shortest(v), stamp, step) for k, v in metrics.items()]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        self.artifacts.append(str(path))

    def log_text(self, text: str, name: str) -> None:
        """Log ``text`` as the artifact file ``name`` (no local file needed)."""
        self.texts[name] = text


def _write(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, str],
    metrics: list[Metric],
    tags: Mapping[str, str],
    artifacts: list[str],
    texts: Mapping[str, str],
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
    for name, text in texts.items():
        client.log_text(run_id, text, name)


# --- the writer process ---------------------------------------------------------------------
_writer_client: MlflowClient | None = None


def _writer_init(uri: str) -> None:
    """Runs first in the forked writer: a client of its own, without the parent's connections.

    Ctrl-C reaches every process of the terminal's process group: the writer ignores it and
    finishes the writes the interrupted process still sends (its runs end KILLED)."""
    global _writer_client
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    _writer_client = MlflowClient(tracking_uri=uri)
    engine = getattr(_writer_client._tracking_client.store, "engine", None)
    if engine is not None:  # SQL stores: the pool's connections belong to the parent
        engine.dispose(close=False)


def _exit_with_parent() -> None:
    """Linux: end this writer when the process that forked it dies, even by SIGKILL."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _writer_create(experiment_id: str, name: str, tags: dict[str, str]) -> str:
    return _writer_client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _writer_write(run_id: str, params, metrics, tags, artifacts, texts, status: str | None) -> None:
    try:
        _write(_writer_client, run_id, params, metrics, tags, artifacts, texts)
    except BaseException:
        if status is not None:  # not FINISHED with what it lacks: FAILED, if that can be written
            try:
                _writer_client.set_terminated(run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the write's own error is the one raised
                pass
        raise
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


#: MLflow 3's UI opens an experiment in its GenAI view (traces) unless this tag says it holds
#: model training runs; squeeze sets it on the experiments it creates, and on those without it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: The tag MLflow's UI shows as a run's description.
NOTE_TAG = "mlflow.note.content"


def experiment_id(
    client: MlflowClient, uri: str, experiment: str, *, artifacts: str | None = None
) -> str:
    """The id of MLflow experiment ``experiment``, created if missing (artifacts in ``mlruns/``
    next to a SQLite database file, else where ``artifacts`` or the server says), tagged
    `EXPERIMENT_KIND` so that MLflow's UI opens it on its runs."""
    key, kind = EXPERIMENT_KIND
    found = client.get_experiment_by_name(experiment)
    if found:
        if key not in found.tags:  # (an experiment a user gave another kind keeps it)
            client.set_experiment_tag(found.experiment_id, key, kind)
        return found.experiment_id
    if artifacts is None and uri.startswith("sqlite:///"):
        artifacts = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns")
    return client.create_experiment(experiment, artifact_location=artifacts, tags={key: kind})


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
        with first_use(uri):  # a new SQLite file: created whole, once (`search.run.mlflow_db`)
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
        parent = TrackedRun(self.parent_id)
        parent.log_params(params)
        parent.log_metrics(metrics)
        for path in artifacts:
            parent.log_artifact(path)
        self._end(parent, None)
        return self.parent_id

    def save_views(
        self, study: str, objectives: Sequence[str], *, higher_is_better: bool = True
    ) -> None:
        """Save the study's runs table and Pareto front as views of MLflow's UI
        (`search.run.mlflow_views`)."""
        save_views(
            self.client, self.experiment_id, study, objectives, higher_is_better=higher_is_better
        )

    def join_parent(self, run_id: str) -> None:
        """Log the children of this process under ``run_id``, a parent run another process
        opened (a worker joining a study)."""
        self.parent_id = run_id

    @contextmanager
    def child_run(
        self, *, name: str, tags: Mapping[str, Any], link: Callable[[str], None] | None = None
    ) -> Iterator[TrackedRun]:
        """A child run of the parent; ends FAILED if the body raises, with the error as tags
        (``squeeze.fail_kind``, ``squeeze.fail_reason``, ``squeeze.fail_phase`` when known) and
        its full traceback as the artifact ``traceback.txt`` (FINISHED with
        ``squeeze.state=PRUNED`` if it raises ``optuna.TrialPruned``; KILLED, with
        ``squeeze.fail_kind=interrupted``, on ``KeyboardInterrupt``).

        The writer creates the run while the body works; ``link`` is called with the run id
        before the run ends, whether the body succeeded or failed.
        """
        assert self.parent_id is not None, "start_parent() or join_parent() first"
        tags = {"mlflow.parentRunId": self.parent_id, **{k: str(v) for k, v in tags.items()}}
        child = TrackedRun(self._submit(_writer_create, self.experiment_id, name, tags))
        try:
            yield child
        except BaseException as err:
            kind = failure_kind(err)
            if kind == "pruned":
                child.set_tags({"squeeze.state": "PRUNED", "squeeze.pruned": str(err)[:5000]})
                self._end(child, "FINISHED", link)
                raise
            child.set_tags(
                {
                    "squeeze.state": "FAIL",
                    "squeeze.fail_kind": kind,
                    "squeeze.fail_reason": failure_reason(err),
                    "squeeze.error": repr(err)[:5000],
                }
            )
            if (where := failure_phase(err)) is not None:
                child.set_tags({"squeeze.fail_phase": where})
            if kind == "interrupted":  # no error to trace; the trial runs again
                self._end(child, "KILLED", link)
                raise
            child.log_text(failure_traceback(err, limit=TRACEBACK_FILE_CHARS), "traceback.txt")
            self._end(child, "FAILED", link)
            raise
        child.set_tags({"squeeze.state": "COMPLETE"})
        self._checked(self._end(child, "FINISHED", link), child.run_id)

    def _checked(self, write: Future, run_id: str) -> None:
        """Wait for ``write`` (a completed trial's run): a trial is told to Optuna only once
        its run is written.

        Raises:
            SweepStopped: If the MLflow store is out of space (every later trial would fail).
            TrackingError: If the write failed otherwise (the run ends FAILED if it can).
        """
        try:
            write.result()
        except Exception as err:
            self._pending = [f for f in self._pending if f is not write]  # reported here, once
            reason = failure_reason(err)
            if out_of_space(err):
                raise SweepStopped(
                    f"the MLflow store {mask_url(self.uri)} is out of space: the run {run_id} "
                    f"of a completed trial could not be written ({reason})"
                ) from err
            raise TrackingError(f"MLflow run {run_id} could not be written: {reason}") from err

    def _end(
        self, child: TrackedRun, status: str | None, link: Callable[[str], None] | None = None
    ) -> Future:
        if link is not None:
            link(child.run_id)
        return self._submit(
            _writer_write,
            child.run_id,
            child.params,
            child.metrics,
            child.tags,
            child.artifacts,
            child.texts,
            status,
        )

    def finish_parent(
        self, *, artifacts: list[Path], metrics: Mapping[str, float], tags: Mapping[str, Any]
    ) -> None:
        """Log the study's results to the parent run and close it (through the writer)."""
        parent = TrackedRun(self.parent_id)
        parent.log_metrics(metrics)
        parent.set_tags(tags)
        for path in artifacts:
            parent.log_artifact(path)
        self._end(parent, "FINISHED")

    def abort(self) -> None:
        """End the parent run as KILLED after an error or an interrupt (best effort: a write
        that failed is logged, so that the error or interrupt that stopped the sweep is the one
        raised)."""
        if self.parent_id is None:
            return
        try:
            self.wait()
        except Exception as err:  # noqa: BLE001 - logged; the caller re-raises its own error
            logger.warning("%s: %s", err, err.__cause__)
        try:
            self.client.set_terminated(self.parent_id, status="KILLED")
        except Exception as err:  # noqa: BLE001 - (a full disk, a store that is down)
            logger.warning("the parent run %s could not be ended KILLED: %s", self.parent_id, err)

    def close_orphans(self, trials: Mapping[int, Mapping[str, Any]]) -> int:
        """End the child runs left RUNNING by a lost worker; return how many.

        Args:
            trials: Trial number -> ``{"state": "FAIL" | "COMPLETE" | ..., "reason": str,
                "metrics": {...}}`` for every finished trial. A RUNNING child of a finished
                trial ends FAILED with the reason, or, if its trial completed (the worker was
                lost after telling Optuna but before the writer logged), gets the metrics.
        """
        self.wait()
        orphans = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' "
            "and attributes.status = 'RUNNING'",
            max_results=50_000,
        )
        closed = 0
        for run in orphans:
            number = run.data.tags.get("squeeze.trial")
            info = trials.get(int(number)) if number is not None and number.isdigit() else None
            if info is None:
                continue  # still running (another worker) or not ours
            child = TrackedRun(run.info.run_id)
            if info["state"] == "COMPLETE":
                child.log_metrics(info.get("metrics", {}))
                child.set_tags({"squeeze.state": "COMPLETE"})
                self._end(child, "FINISHED")
            else:
                child.set_tags(
                    {
                        "squeeze.state": info["state"],
                        "squeeze.fail_kind": info.get("kind", "worker_lost"),
                        "squeeze.fail_reason": info.get("reason", "worker lost"),
                    }
                )
                status = "FAILED" if info["state"] == "FAIL" else "FINISHED"
                self._end(child, "KILLED" if info.get("kind") == "interrupted" else status)
            closed += 1
        return closed

    def mark_front(
        self,
        front: Mapping[str, Mapping[str, float]],
        *,
        notes: Mapping[str, str] | None = None,
    ) -> None:
        """Tag ``pareto=true`` and log ``front[run_id]`` on the front's child runs, with
        ``notes[run_id]`` as the run's description, and tag ``pareto=false`` (and say so in the
        description) on children that were on the front of an earlier session but are no more.
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
                self.client.set_tag(
                    run.info.run_id,
                    NOTE_TAG,
                    "No longer on the Pareto front: a later trial of the study dominates it.",
                )
        for run_id, metrics in front.items():
            run = TrackedRun(run_id)
            run.set_tags({"pareto": "true"})
            if notes and run_id in notes:
                run.set_tags({NOTE_TAG: notes[run_id]})
            run.log_metrics(metrics)
            self._end(run, None)

    def download(self, run_id: str, artifact: str, dst: Path) -> Path:
        """Download one artifact of a run into ``dst`` and return its local path."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dst)))
