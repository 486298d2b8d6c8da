"""Worker processes on this machine: start them, pin them to GPUs, follow their trials.

Each worker is a fresh Python process (``spawn``: nothing of this process's torch threads,
database connections or MLflow writer is inherited) that runs `search.study.run_worker` on the
same config: it joins the study this process created, claims trials from the shared budget and
logs child runs under the shared parent run. The caller's Optuna callbacks (a progress bar)
are called here as the workers' trials finish.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``: ``auto`` is ``cuda`` when torch sees a GPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def gpu_count() -> int:
    """GPUs torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_assignment(workers: int, *, gpus: int, trials_per_gpu: int) -> list[int]:
    """The GPU of each worker: ``trials_per_gpu`` consecutive workers share one GPU."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1 to pin workers to GPUs. Got {gpus} instead.")
    return [(i // trials_per_gpu) % gpus for i in range(workers)]


def run_local_workers(
    cfg: DictConfig,
    n: int,
    *,
    study: optuna.Study,
    callbacks: Iterable[Callable] = (),
    poll_s: float = 0.5,
) -> dict[int, int]:
    """Run ``n`` worker processes until they end; return their exit codes by process id.

    On an interrupt the workers are stopped (each fails its running trial) and it re-raises.
    """
    from search.study import WORKERS_ENV

    cuda = resolve_device(cfg.device) == "cuda"
    pins = (
        gpu_assignment(n, gpus=gpu_count(), trials_per_gpu=cfg.search.trials_per_gpu)
        if cuda
        else []
    )
    container = OmegaConf.to_container(cfg, resolve=True)
    context = multiprocessing.get_context("spawn")
    processes = []
    for i in range(n):
        env = {WORKERS_ENV: str(n)}
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = str(pins[i])
        process = context.Process(
            target=_worker_main,
            args=(container, env, logging.getLogger().level),
            name=f"squeeze-worker-{i}",
        )
        with _environment(env):  # a spawned child reads its environment when it starts
            process.start()
        processes.append(process)
    logger.info("started %d workers: pids %s", n, [p.pid for p in processes])
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(poll_s)
            seen = _report_new(study, seen, callbacks)
    except BaseException:
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()
        raise
    _report_new(study, seen, callbacks)
    codes = {p.pid: p.exitcode for p in processes}
    if any(codes.values()):
        logger.warning("workers ended with exit codes %s", codes)
    return codes


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


def _worker_main(container: dict[str, Any], env: dict[str, str], log_level: int) -> None:
    """The body of a worker process."""
    signal.signal(signal.SIGTERM, _interrupt)  # fail the running trial, then stop
    os.environ.update(env)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from search.study import run_worker

    run_worker(OmegaConf.create(container))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
