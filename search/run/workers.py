"""Worker processes on this machine: start them, pin them to GPUs, follow their trials.

Each worker is a fresh Python process (``spawn``: nothing of this process's torch threads,
database connections or MLflow writer is inherited) that runs `search.run.study.run_worker` on the
same config: it joins the study this process created, claims trials from the shared budget and
logs child runs under the shared parent run. The caller's Optuna callbacks (a progress bar)
are called here as the workers' trials finish.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from search._errors import SweepStopped
from search.config.device import gpu_count, resolve_device
from search.run.interrupts import note_interrupt, raise_if_interrupted
from search.run.logs import apply_levels, levels

logger = logging.getLogger(__name__)


def gpu_assignment(workers: int, *, gpus: int, trials_per_gpu: int) -> list[int]:
    """The GPU of each worker: ``trials_per_gpu`` consecutive workers share one GPU."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1 to pin workers to GPUs. Got {gpus} instead.")
    return [(i // trials_per_gpu) % gpus for i in range(workers)]


#: Set in the worker processes a sweep starts: how many there are.
WORKERS_ENV = "SQUEEZE_LOCAL_WORKERS"


def run_local_workers(
    cfg: DictConfig,
    n: int,
    *,
    study: optuna.Study,
    target: Callable[[DictConfig], Any],
    callbacks: Iterable[Callable] = (),
    poll_s: float = 0.5,
) -> dict[int, int]:
    """Run ``n`` worker processes, each calling ``target(cfg)`` (`search.run.study.run_worker`),
    until they end; return their exit codes by process id.

    On an interrupt the workers are stopped (each records its running trial as interrupted)
    and it re-raises.
    """
    cuda = resolve_device(cfg.device) == "cuda"
    pins = (
        gpu_assignment(n, gpus=gpu_count(), trials_per_gpu=cfg.search.trials_per_gpu)
        if cuda
        else []
    )
    container = OmegaConf.to_container(cfg, resolve=True)
    context = multiprocessing.get_context("spawn")
    processes, logs = [], []
    for i in range(n):
        env = {WORKERS_ENV: str(n)}
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = str(pins[i])
        reader, writer = context.Pipe(duplex=False)  # one per worker: a killed one harms no other
        process = context.Process(
            target=_worker_main,
            args=(target, container, env, levels(), writer),
            name=f"squeeze-worker-{i}",
        )
        with _environment(env):  # a spawned child reads its environment when it starts
            process.start()
        writer.close()
        processes.append(process)
        logs.append(reader)
    logger.info("started %d workers: pids %s", n, [p.pid for p in processes])
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    stopped: list[str] = []  # why a worker stopped the sweep (`SweepStopped`)
    try:
        while any(p.is_alive() for p in processes):
            raise_if_interrupted()  # (a Ctrl-C swallowed where it was raised stops them too)
            stopped += _relay_logs(logs, timeout=poll_s)
            if stopped:  # the others would meet the same full disk or dead database
                raise SweepStopped(stopped[0])
            seen = _report_new(study, seen, callbacks)
    except BaseException:
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()
        _relay_logs(logs, timeout=0)
        raise
    stopped += _relay_logs(logs, timeout=0)
    if stopped:
        raise SweepStopped(stopped[0])
    _report_new(study, seen, callbacks)
    codes = {p.pid: p.exitcode for p in processes}
    if any(codes.values()):
        logger.warning("workers ended with exit codes %s", codes)
    return codes


def _relay_logs(logs: list, *, timeout: float) -> list[str]:
    """Log here the records the workers sent (so they go through this process's handlers, e.g.
    above a progress bar); wait up to ``timeout`` seconds for the first. A closed or broken pipe
    (its worker ended or was killed) is dropped. Returns why workers stopped the sweep, if any
    did (`SweepStopped`: not logged, the command line prints it)."""
    from multiprocessing.connection import wait

    deadline, stopped = time.monotonic() + timeout, []
    while logs:
        ready = wait(logs, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return stopped
        for conn in ready:
            try:
                record = conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                logs.remove(conn)
                conn.close()
                continue
            if getattr(record, _STOPPED, None):
                stopped.append(record.getMessage())
                continue
            logging.getLogger(record.name).handle(record)
    return stopped


#: Attribute of the log record a worker sends when it stopped the sweep (`SweepStopped`).
_STOPPED = "squeeze_stopped"


class _PipeHandler(logging.Handler):
    """Sends a worker's log records to the process that started it."""

    def __init__(self, conn) -> None:
        super().__init__()
        self._conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            record = logging.makeLogRecord(
                {**record.__dict__, "msg": message, "args": None, "exc_info": None}
            )
            self._conn.send(record)
        except Exception:  # noqa: BLE001 - logging must never fail the worker
            self.handleError(record)


def _report_new(study: optuna.Study, seen: set[int], callbacks: Iterable[Callable]) -> set[int]:
    callbacks = list(callbacks)
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in seen:
            seen.add(trial.number)
            for callback in callbacks:
                callback(study, trial)
    return seen


class _environment:
    def __init__(self, values: dict[str, str]) -> None:
        self._values, self._saved = values, {}

    def __enter__(self) -> None:
        self._saved = {k: os.environ.get(k) for k in self._values}
        os.environ.update(self._values)

    def __exit__(self, *exc: Any) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker_main(
    target: Callable[[DictConfig], Any],
    container: dict[str, Any],
    env: dict[str, str],
    log_levels: dict[str, int],
    logs,
) -> None:
    """The body of a worker process.

    Ctrl-C in the terminal reaches every process of its group: a worker ignores it and is
    stopped by the process that started it (SIGTERM: the running trial ends ``interrupted``),
    which also happens when that process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)  # fail the running trial, then stop
    _exit_with_parent()
    os.environ.update(env)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(handlers=[_PipeHandler(logs)])  # logged by the parent
    apply_levels(log_levels)  # the parent's (its --verbose)
    try:
        target(OmegaConf.create(container))
        raise_if_interrupted()
    except KeyboardInterrupt:
        sys.exit(130)  # recorded already; no traceback
    except SweepStopped as err:  # told to the process that started it, which stops the sweep
        record = logging.makeLogRecord({"name": __name__, "msg": str(err), _STOPPED: True})
        logs.send(record)
        sys.exit(1)


def _interrupt(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the worker at once
    note_interrupt(signum)  # raised, and again at the next safe point if swallowed


def _exit_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies, even by SIGKILL."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
