"""The trial function: one compression recipe, start to end.

Read `run_trial` top to bottom to see the whole system: sample → copy the cached baseline →
compress → fine-tune → write the packed file → reload it → measure on validation → log → return.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from compressors import (
    CompressionContext,
    Compressor,
    apply_pipeline,
    load_packed,
    save_packed,
)
from experiments import Baseline, Task, ce_loss, evaluate, fit
from experiments._training import EpochStats
from experiments.metrics import count_flops, latency_ms, nonzero_params
from search.budget import seed_trial
from search.constraints import constraint_values
from search.early_stop import EarlyStop
from search.space import SearchSpace
from search.tracking import Tracker

#: Metrics each trial measures; any of them can be an objective.
METRICS = ("val_acc", "size_bytes", "compression_ratio", "nonzero_params", "flops", "latency_ms")


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares, built once before the first trial.

    Attributes:
        task: Data splits and model builder.
        baseline: The cached trained baseline and its teacher logits.
        baseline_size: Bytes of the baseline's packed fp32 file.
        space: The search space.
        objectives: Metric names returned to Optuna, in the order of the study's directions.
        tracker: MLflow parent run of the study.
        output_dir: Where trials write their packed model files.
        seed: Trial ``n`` is seeded with ``seed + n`` (a retry like the trial it retries).
        latency_batch_sizes: Batch sizes at which latency is measured.
        latency_repeats: Timed forwards per latency measurement.
        constraints: Bounds on metrics (``search.constraints``), given to Optuna.
        early_stop: When fine-tuning stops early (pruner or Pareto dominance).
    """

    task: Task
    baseline: Baseline
    baseline_size: int
    space: SearchSpace
    objectives: tuple[str, ...]
    tracker: Tracker
    output_dir: Path
    seed: int
    latency_batch_sizes: tuple[int, ...] = (1,)
    latency_repeats: int = 30
    constraints: Mapping[str, float] = field(default_factory=dict)
    early_stop: EarlyStop = field(default_factory=EarlyStop)


def run_trial(trial: optuna.Trial, ctx: SweepContext) -> tuple[float, ...]:
    """Compress, fine-tune, ship and measure one sampled recipe; return its objective values."""
    task, seed = ctx.task, ctx.seed + seed_trial(trial)

    # 1. Sample the recipe: which compressors, in which order, with which parameters.
    recipe = ctx.space.sample(trial)
    compressors = ctx.space.build(recipe)

    with ctx.tracker.child_run(
        name=f"trial-{trial.number:04d}",
        tags={"squeeze.trial": trial.number, "squeeze.study": trial.study.study_name},
        link=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
    ) as run:
        run.log_params(recipe.params)

        # 2. Start from a copy of the cached, trained baseline.
        torch.manual_seed(seed)
        model = copy.deepcopy(ctx.baseline.model)

        # 3. Apply each compressor in order (masks, quantization grids, ...).
        context = CompressionContext(
            train=task.train,
            teacher_logits=ctx.baseline.teacher_logits,
            example_inputs=task.example_inputs(),
            seed=seed,
        )
        model = apply_pipeline(compressors, model, context)

        # 4. Fine-tune: pruned weights stay zero, quantized ones stay on their grid, and the loss
        #    is distillation from the baseline's logits when the recipe has it. A trial that can
        #    no longer reach the front stops early (optuna.TrialPruned).
        stop = ctx.early_stop.start(trial, model)

        def after_epoch(stats: EpochStats) -> None:
            run.log_metrics(
                {"train_loss": stats.train_loss, "epoch_val_acc": stats.val_acc}, step=stats.epoch
            )
            if stop is not None:
                stop(stats)

        fit(
            model,
            task.train,
            epochs=recipe.finetune["epochs"],
            batch_size=recipe.finetune["batch_size"],
            lr=recipe.finetune["lr"],
            loss_fn=_finetune_loss(compressors),
            teacher_logits=ctx.baseline.teacher_logits,
            val=task.val,
            seed=seed,
            after_epoch=after_epoch,
        )

        # 5. Ship: write the packed file and load it back into a fresh model. Everything below is
        #    measured on the model a user would load from that file.
        path = trial_file(ctx.output_dir, trial.study.study_name, trial.number)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = save_packed(model, path)
        shipped = load_packed(path, task.build_model())

        # 6. Measure on the validation split (test accuracy is computed only for the front).
        metrics = {
            "val_acc": evaluate(shipped, task.val),
            "size_bytes": size,
            "compression_ratio": ctx.baseline_size / size,
            "nonzero_params": nonzero_params(shipped),
            "flops": count_flops(shipped, task.example_inputs(1)),
            **_latencies(shipped, task, ctx),
        }
        run.log_metrics(metrics)
        run.log_artifact(path)
        trial.set_user_attr("metrics", metrics)

        # 7. Constraints: only trials within all of them can be on the reported front.
        for name, value in constraint_values(metrics, ctx.constraints).items():
            trial.set_constraint(name, value)
        return tuple(float(metrics[name]) for name in ctx.objectives)


def trial_file(output_dir: Path, study_name: str, number: int) -> Path:
    """Where trial ``number`` of a study writes its packed model file."""
    return output_dir / study_name / f"trial-{number:04d}.sqz"


def _finetune_loss(compressors: list[Compressor]):
    losses = [loss for loss in (c.finetune_loss() for c in compressors) if loss is not None]
    return losses[0] if losses else ce_loss  # the space allows one compressor of kind "loss"


def _latencies(model: torch.nn.Module, task: Task, ctx: SweepContext) -> dict[str, float]:
    out = {}
    for batch in ctx.latency_batch_sizes:
        key = "latency_ms" if batch == 1 else f"latency_ms_b{batch}"
        out[key] = latency_ms(model, task.example_inputs(batch), repeats=ctx.latency_repeats)
    return out
