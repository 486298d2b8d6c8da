"""Helpers shared by the benchmarks: run a quiet sweep in a folder, hypervolume over time."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import compose_config, run_sweep
from search.config.storage import open_storage
from search.run.pareto import SweepResult, hypervolume

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def quiet() -> None:
    """No log lines from squeeze, Optuna or MLflow while timing."""
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def sweep(
    folder: Path,
    overrides: list[str],
    *,
    storage: str | None = None,
    config_dirs: list[Path] = (),
) -> tuple[SweepResult, list[FrozenTrial]]:
    """Run one sweep with its study, MLflow database and files in ``folder`` (``config_dirs``:
    config folders of one's own, as ``--config-dir``)."""
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or str(folder / "optuna.journal")
    cfg = compose_config(
        [
            f"search.storage={storage}",
            f"tracking.uri=sqlite:///{folder}/mlflow.db",
            f"output_dir={folder}/trials",
            *overrides,
        ],
        config_dirs=config_dirs,
    )
    result = run_sweep(cfg)
    study = optuna.load_study(study_name=result.study_name, storage=open_storage(storage))
    return result, study.trials


def reference(baseline_val_acc: float, baseline_size: float) -> tuple[float, float]:
    """The fixed reference point: 10 points of accuracy below the baseline, the baseline's size.

    Sizes are on a log10 scale (as in the front's plot): going from 10 KB to 5 KB counts as much
    as from 200 KB to 100 KB, where a linear scale would hardly see the small models.
    """
    return baseline_val_acc - 0.10, math.log10(baseline_size)


def final_hypervolume(trials: list[FrozenTrial], ref: tuple[float, float]) -> float:
    """Hypervolume of the complete trials' (val_acc, log10 size_bytes)."""
    return hypervolume(_points(trials), reference=ref)


def hypervolume_over_time(
    trials: list[FrozenTrial], ref: tuple[float, float]
) -> list[tuple[float, float]]:
    """``(seconds since the first trial started, hypervolume)`` after each finished trial."""
    finished = sorted(
        (t for t in trials if t.state.is_finished() and t.datetime_complete),
        key=lambda t: t.datetime_complete,
    )
    if not finished:
        return []
    start = min(t.datetime_start for t in finished)
    out = []
    for i, t in enumerate(finished):
        seconds = (t.datetime_complete - start).total_seconds()
        out.append((seconds, hypervolume(_points(finished[: i + 1]), reference=ref)))
    return out


def _points(trials: list[FrozenTrial]) -> list[tuple[float, float]]:
    return [
        (t.user_attrs["metrics"]["val_acc"], math.log10(t.user_attrs["metrics"]["size_bytes"]))
        for t in trials
        if t.state == TrialState.COMPLETE
    ]


def shipped_baseline(cfg, workdir: Path):
    """``(task, model)``: the task of ``cfg`` and its cached baseline as shipped (packed fp32
    file, reloaded), the reference every speed-up is measured against."""
    from compressors import load_packed, save_packed
    from search.run.workload import load_workload

    workload = load_workload(cfg)
    task, baseline = workload.task, workload.baseline
    workdir.mkdir(parents=True, exist_ok=True)
    save_packed(baseline.model, workdir / "baseline.sqz")
    return task, load_packed(workdir / "baseline.sqz", task.build_model())


def side_by_side(base, model, inputs, *, rounds: int = 7, repeats: int = 50):
    """``(speed-up, baseline ms, model ms)``: both timed in alternating rounds, median of the
    rounds' medians (this machine's speed drifts more than a single A/B could tell apart), on
    the clock a sweep's trials are timed on (`latency_clock`: the thread's CPU time where torch,
    and so ONNX Runtime, runs one thread, which leaves out the forwards' waits for a core)."""
    from experiments.metrics import interleaved_latency_ms
    from search.run.measure import latency_clock

    ms, base_ms = interleaved_latency_ms(
        model, base, inputs, rounds=rounds, repeats=repeats, clock=latency_clock()
    )
    return base_ms / ms, base_ms, ms


def recipe_text(row) -> str:
    """A trial row's sampled parameters as ``name=value, ...`` (unchosen methods left out)."""
    return ", ".join(
        f"{k.removeprefix('param.')}={f'{v:.3g}' if isinstance(v, float) else v}"
        for k, v in row.items()
        if k.startswith("param.") and v == v
    )
