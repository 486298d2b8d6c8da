"""The trial function: one compression recipe, start to end.

Read `run_trial` top to bottom to see the whole system: sample → copy the cached baseline →
compress → fine-tune → finalize → write the packed file → reload it → measure on validation →
log → return. `compress_recipe` and `measure` are its two halves, reused where a fixed recipe is
rerun (benchmarks) and for the baseline's own measurements.

Where each phase runs: the trial copies the cached baseline once, straight onto its device
(``device=cuda``, or ``auto`` with a GPU; else the CPU), and compressing (k-means, SVD,
structured tracing, Taylor gradients, calibration), fine-tuning and the per-epoch evaluation
all run there; distillation's teacher is the baseline moved to that device once per process
(`baseline_on`). The finalized model then comes to the CPU: the packed file is written from
there (the packer works with numpy), and the shipped file's measurements (validation scores,
latency, peak memory, FLOPs) run on the CPU by design: they describe the file a user loads
there, and int8 layers have CPU kernels only.
"""

from __future__ import annotations

import copy
import errno
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import optuna
import torch

from compressors import (
    CompressionContext,
    Compressor,
    apply_pipeline,
    coverage,
    detached_copy,
    finalize_pipeline,
    load_packed,
    save_packed,
)
from compressors.runtime import INT8_MODULES
from experiments import (
    LOSSES,
    Baseline,
    EpochStats,
    Task,
    evaluate,
    fit,
    seed_everything,
)
from search._errors import SweepStopped
from search.config.constraints import constraint_values
from search.config.early_stop import EarlyStop, Stopper
from search.config.fidelity import (
    EPOCHS_ATTR,
    EPOCHS_RUN_ATTR,
    FIDELITY_ATTR,
    PROMOTE_FROM_ATTR,
    REUSE_FROM_ATTR,
    SCREEN,
    Fidelity,
    Plateau,
)
from search.config.metrics import (
    METRICS,  # noqa: F401 - re-exported: what a trial measures
)
from search.config.space import Recipe, SearchSpace
from search.failures import phase
from search.run.budget import WARM_START_ATTR, seed_trial
from search.run.deploy import deploy_onnx
from search.run.inherit import Inheritance, leading, load_plain
from search.run.interrupts import raise_if_interrupted
from search.run.logs import Ticker
from search.run.measure import measure
from search.run.screening import (
    WHOLE,
    Stage,
    fetch_screen,
    load_state,
    save_state,
    trial_stage,
)
from search.run.tracking import Tracker

logger = logging.getLogger(__name__)

#: User attribute of a trial (and of its study: the count it started with): the torch threads it
#: ran with, which its exact reproduction needs (`search.run.threads`).
THREADS_ATTR = "threads"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares, built once before the first trial.

    Attributes:
        task: Data splits and model builder.
        baseline: The cached trained baseline and its teacher outputs.
        baseline_size: Bytes of the baseline's packed fp32 file.
        space: The search space.
        objectives: Metric names returned to Optuna, in the order of the study's directions.
        tracker: MLflow parent run of the study.
        output_dir: Where trials write their packed model files.
        seed: Trial ``n`` is seeded with ``seed + n`` (a retry like the trial it retries).
        device: Where compressing, fine-tuning and its evaluation run (``cuda`` with
            ``device=cuda|auto`` and a GPU); None: the CPU. The shipped model is always
            measured on the CPU.
        folds: With ``search.cv_folds=K``: K (task, baseline) pairs whose splits are the folds of
            train + validation, each with a baseline trained on its own training part.
        latency_batch_sizes: Batch sizes at which latency is measured.
        latency_repeats: Timed forwards per latency measurement, at most (3 at least).
        latency_budget_s: Seconds of timed forwards per latency measurement (per batch size),
            at most (less for a model whose forwards are slow: `search.run.measure.measure`):
            timing stops when they are spent (`experiments.metrics.latency_ms`).
        reference: The shipped baseline (its packed file, reloaded; in ONNX Runtime with
            ``runtime="onnxruntime"``): each trial's latency is timed against it, interleaved,
            for the speed-up. None: no speed-up is measured.
        runtime: Where latency is timed: ``torch``, or ``onnxruntime`` (each trial's packed
            file is also exported to ONNX and checked in ONNX Runtime, `search.run.deploy`).
        nbits_tolerance: `deploy_onnx`'s (``measure.onnx_nbits_tolerance``); None: off.
        constraints: Bounds on metrics (``search.constraints``), given to Optuna.
        early_stop: When fine-tuning stops early (pruner or Pareto dominance).
        val_reference: The baseline's outputs on the validation split, computed once per
            sweep: each trial's ``val_agreement`` is measured against them. None: not measured.
        fidelity: The screening of candidates (`search.config.fidelity`); None: every trial
            fine-tunes fully.
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
    latency_budget_s: float | None = 2.0
    reference: torch.nn.Module | None = None
    runtime: str = "torch"
    nbits_tolerance: float | None = None
    folds: tuple[tuple[Task, Baseline], ...] = ()
    device: str | None = None
    constraints: Mapping[str, float] = field(default_factory=dict)
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    val_reference: torch.Tensor | None = None
    fidelity: Fidelity | None = None


def run_trial(trial: optuna.Trial, ctx: SweepContext) -> tuple[float, ...]:
    """Compress, fine-tune, ship and measure one sampled recipe; return its objective values."""
    seed = ctx.seed + seed_trial(trial)  # a retry is seeded like the trial it retries
    # 1. Sample the recipe: which compressors, in which order, with which parameters.
    recipe = ctx.space.sample(trial)
    #    With screening: the first epochs only (a screen), or the rest from a screen's weights.
    stage = trial_stage(trial, ctx.fidelity, ctx.output_dir / trial.study.study_name)

    with ctx.tracker.child_run(
        name=f"{trial.study.study_name}-t{trial.number:04d}",  # unique across studies
        tags={
            "squeeze.trial": trial.number,
            "squeeze.study": trial.study.study_name,
            **({WARM_START_ATTR: "true"} if trial.user_attrs.get(WARM_START_ATTR) else {}),
            **({FIDELITY_ATTR: stage.fidelity} if stage.fidelity else {}),
            **({PROMOTE_FROM_ATTR: stage.promoted_from} if stage.promoted_from is not None else {}),
        },
        link=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id),
    ) as run:
        run.log_params(recipe.params)
        threads = torch.get_num_threads()  # float reductions, and so the results, depend on it
        run.log_params({"torch.threads": threads})
        trial.set_user_attr(THREADS_ATTR, threads)

        # 2-4. Copy the cached baseline, compress it, fine-tune it (a trial that can no longer
        #      reach the front stops early: optuna.TrialPruned; not a screen, short already),
        #      let compressors finalize it.
        rule = EarlyStop() if stage.fidelity == SCREEN else ctx.early_stop
        stopper = Stopper(rule, trial, like=ctx.baseline.model)
        plateau = Plateau(  # (search.plateau: not a screen, short already)
            0 if ctx.fidelity is None or stage.fidelity == SCREEN else ctx.fidelity.plateau,
            higher_is_better=ctx.task.higher_is_better is not False,
        )
        ticker = Ticker(logger, f"trial {trial.number} epoch")  # long trials show progress

        def after_epoch(stats: EpochStats) -> bool:
            raise_if_interrupted()  # a safe point for a Ctrl-C swallowed in a __del__
            val = "" if stats.val_acc is None else f"val {stats.val_acc:.4f}"
            ticker(stats.epoch + 1, recipe.finetune["epochs"], val)
            run.log_metrics(
                {"train_loss": stats.train_loss, "epoch_val_acc": stats.val_acc}, step=stats.epoch
            )
            stopper(stats)
            return plateau(stats.val_acc)

        fetch_screen(stage, trial.study, ctx.tracker.client)  # (run on another machine)
        inherit = _inheritance(trial, ctx)
        model, history = compress_recipe(
            recipe,
            ctx.space,
            ctx.task,
            ctx.baseline,
            seed=seed,
            after_epoch=after_epoch,
            on_compressed=stopper.start if stopper.needs_model else None,
            reestimate=stopper.reestimate,
            device=ctx.device,
            stage=stage,
            inherit=inherit,
        )
        if plateau.stopped and len(history) < ctx.fidelity.trial_cost(trial):
            # charged the epochs it ran: those it planned and did not run go to more trials
            trial.set_user_attr(EPOCHS_RUN_ATTR, len(history))
            trial.set_user_attr(EPOCHS_ATTR, len(history))
            run.set_tags({EPOCHS_RUN_ATTR: len(history)})
        if inherit is not None and inherit.stage.reused_from is not None:
            run.set_tags({REUSE_FROM_ATTR: inherit.stage.reused_from})
        elif stage.save_to is not None:  # a screen's weights, for a worker on another machine
            run.log_artifact(stage.save_to)

        # 5. Ship: write the packed file and load it back into a fresh model (int8 layers where
        #    the recipe asked for them). Everything below is measured on the model a user would
        #    load from that file.
        path = trial_file(ctx.output_dir, trial.study.study_name, trial.number)
        with phase("pack"), _stops_sweep(path):  # a full output_dir fails every later trial
            path.parent.mkdir(parents=True, exist_ok=True)
            size = save_packed(model, path, like=ctx.baseline.model)
        with phase("reload"):
            shipped = load_packed(path, ctx.task.build_model())

        #    With measure.runtime=onnxruntime, also export it to ONNX and check ONNX Runtime's
        #    outputs against it: latency is then timed there.
        deployed = None
        if ctx.runtime == "onnxruntime":
            with phase("export"):
                deployed = deploy_onnx(
                    path, ctx.task, path.with_suffix(".onnx"), nbits_tolerance=ctx.nbits_tolerance
                )

        # 6. Measure on the validation split (test accuracy is computed only for the front).
        with phase("measure"):
            metrics = {
                "size_bytes": size,
                **(deployed.metrics if deployed else {}),
                "compression_ratio": ctx.baseline_size / size,
                "compressed_fraction": coverage(
                    ctx.space.build(recipe), ctx.baseline.model, ctx.task.example_inputs()
                ),
                **measure(
                    shipped,
                    ctx.task,
                    ctx.latency_batch_sizes,
                    ctx.latency_repeats,
                    latency_budget_s=ctx.latency_budget_s,
                    reference=ctx.reference,
                    timed=deployed.module if deployed else None,
                    reference_outputs=ctx.val_reference,
                ),
            }
            if ctx.folds:  # search.cv_folds: val_acc becomes the mean over K folds
                metrics["val_acc_split"] = metrics["val_acc"]
                metrics["val_acc"] = cross_validate(recipe, ctx, seed=seed)
        run.log_metrics(metrics)
        run.log_params({"int8_layers": ",".join(int8_layers(shipped)) or "none"})
        if deployed:  # the session settings its latency was timed with (torch.threads: above)
            run.log_params({**deployed.threads, "onnx_kernels": deployed.kernels})
        run.log_artifact(path)
        if deployed:
            run.log_artifact(deployed.path)
        if inherit is not None and (kept := inherit.keep(metrics["val_acc"])):
            run.log_artifact(kept)  # its weights, for later trials of the same shapes
        trial.set_user_attr("metrics", metrics)

        # 7. Constraints: only trials within all of them can be on the reported front.
        # (val_acc's bound is a lower one, or an upper one for an error such as MSE)
        bounds = constraint_values(
            metrics, ctx.constraints, score_higher_is_better=bool(ctx.task.higher_is_better)
        )
        for name, value in bounds.items():
            trial.set_constraint(name, value)
        return tuple(float(metrics[name]) for name in ctx.objectives)


def compress_recipe(
    recipe: Recipe,
    space: SearchSpace,
    task: Task,
    baseline: Baseline,
    *,
    seed: int,
    after_epoch: Callable[[EpochStats], bool | None] | None = None,
    on_compressed: Callable[[torch.nn.Module], None] | None = None,
    reestimate: Callable[[int], bool] | None = None,
    device: str | None = None,
    stage: Stage = WHOLE,
    inherit: Callable[[torch.nn.Module], Stage] | None = None,
) -> tuple[torch.nn.Module, list[EpochStats]]:
    """Apply ``recipe`` to a copy of the trained baseline; return the model to ship and the
    fine-tuning history.

    Args:
        recipe: Compressors, their parameters and the fine-tuning settings.
        space: The space the recipe comes from (it builds the compressors).
        task: Data splits and model builder.
        baseline: The cached trained baseline and its teacher outputs.
        seed: Seeds the compressors and the fine-tuning.
        after_epoch: Called after each fine-tuning epoch (early stopping raises here; a
            plateau stop returns True: the fine-tune ends after that epoch).
        on_compressed: Called before fine-tuning with the model as it would ship without any,
            on the CPU, whose size is then already known (early stopping): the model itself
            where no compressor changes it at finalize (`Compressor.finalizes`), else a
            finalized copy.
        reestimate: Called with each fine-tuning epoch's number as it ends: when true,
            ``on_compressed`` is called again first, on the weights fine-tuning has moved.
        device: Compress, fine-tune and evaluate there (e.g. ``cuda``); None: the CPU. The
            model comes back on the CPU.
        stage: The part of the fine-tune to run (`search.run.screening`): a screen keeps its
            weights before finalizing; a promotion loads a screen's before its first epoch.
        inherit: With ``search.reuse`` (`search.run.inherit.Inheritance`): called with the
            model after its leading stages, returns the stage to run instead of ``stage``
            (a reuse loads a finished trial's weights there, before the later stages).

    The baseline is deep-copied once (onto ``device``); the early-stop estimate copies it again
    only for a recipe that changes the model at finalize (post-training quantization, the last
    step of gradual pruning), and only when early stopping asks for it. Errors are attributed to
    the phase ``compress`` or ``fine-tune`` (`search.failures.phase`).
    """
    with phase("compress"):
        compressors = space.build(recipe)

        # 2. Start from a copy of the cached, trained baseline, on the trial's device: the
        #    trial's one copy; every phase until the packed file runs where it is.
        seed_everything(seed)  # (numpy's and Python's generators too: a rerun draws alike)
        task.rewind()  # (a DataLoader's own generators and kept workers: as in a rerun)
        model = copy.deepcopy(baseline.model)
        if device is not None:
            model.to(device)

        # 3. Apply each compressor in order (L1 training, smaller layers, masks, grids, ...).
        #    With search.reuse, after the leading ones (smaller layers) the trial may load a
        #    finished trial's fine-tuned weights of the same shapes and redo only the rest.
        context = compression_context(task, baseline, seed=seed, device=device)
        first = leading(compressors) if inherit is not None else len(compressors)
        model = apply_pipeline(compressors[:first], model, context)
        if inherit is not None:
            stage = inherit(model)
            if stage.reused_from is not None:
                load_plain(model, stage.load_from)
        model = apply_pipeline(compressors[first:], model, context)
        if stage.load_from is not None and stage.reused_from is None:  # a promotion
            load_state(model, stage.load_from)  # the screened trial's weights
        if on_compressed is not None:  # (random draws there leave fine-tuning's as they were)
            with torch.random.fork_rng(devices=[]):
                _estimate(compressors, model, context, on_compressed)

    # 4. Fine-tune: pruned weights stay zero, quantized ones stay on their grid, schedules (gradual
    #    pruning) advance before each epoch, and the loss is distillation from the baseline's
    #    outputs when the recipe has it (else the task's own loss). Then each compressor has its
    #    last word (post-training quantization, the schedule's final step).
    with phase("fine-tune"):
        stopped = False

        def epoch_end(stats: EpochStats) -> bool:  # (random draws: as in `_estimate` above)
            nonlocal stopped
            if on_compressed is not None and reestimate is not None and reestimate(stats.epoch):
                with torch.random.fork_rng(devices=[]):
                    _estimate(compressors, model, context, on_compressed)
            if after_epoch is not None:
                stopped = after_epoch(stats) is True
            return stopped

        history, rng = [], torch.get_rng_state()
        for start, stop in stage.parts():  # (two for the rerun of a promoted trial)
            if stopped:
                break
            torch.set_rng_state(rng)  # each part starts as a trial's fine-tune does
            history += fit(
                model,
                task.train,
                epochs=recipe.finetune["epochs"] if stage.epochs is None else stage.epochs,
                batch_size=recipe.finetune["batch_size"],
                lr=recipe.finetune["lr"],
                schedule=recipe.finetune["schedule"],
                loss_fn=_finetune_loss(compressors, context),
                teacher_outputs=baseline.teacher_outputs,
                teacher=context.teacher if _distils(compressors) else None,
                val=task.val,
                seed=seed,
                before_epoch=_schedules(compressors, model),
                after_epoch=epoch_end,
                start_epoch=start,
                stop_epoch=stop,
                **task.training(),
            )  # (where the model is: the trial's device)
    if stage.save_to is not None:  # a screen: its weights before finalizing, for a promotion
        save_state(model, stage.save_to)
    with phase("compress"):
        model = finalize_pipeline(compressors, model, context)
    return model.cpu(), history  # the packed file is written from the CPU


def _inheritance(trial: optuna.Trial, ctx: SweepContext) -> Inheritance | None:
    """The trial's choice of a finished trial's weights with ``search.reuse``, else None."""
    if ctx.fidelity is None or not ctx.fidelity.reusing:
        return None
    return Inheritance(
        trial,
        ctx.fidelity,
        ctx.output_dir / trial.study.study_name,
        ctx.tracker.client,
        higher_is_better=ctx.task.higher_is_better is not False,
    )


def _estimate(
    compressors: list[Compressor],
    model: torch.nn.Module,
    context: CompressionContext,
    on_compressed: Callable[[torch.nn.Module], None],
) -> None:
    """Call ``on_compressed`` with ``model`` as it would ship now, on the CPU (the packer writes
    from there): ``model`` itself where no compressor changes it at finalize (moved to the CPU
    and back where it is elsewhere), else a finalized copy (`detached_copy`: a quantizer's
    grid registered on the copy leaves ``model`` as it was)."""
    if any(c.finalizes() for c in compressors):
        on_compressed(finalize_pipeline(compressors, detached_copy(model), context).cpu())
        return
    device = next(iter(_devices(model)), torch.device("cpu"))
    try:
        on_compressed(model.cpu())
    finally:
        model.to(device)


def _devices(model: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in [*model.parameters(), *model.buffers()]}


#: The baseline on a device other than the CPU, by baseline model and device: moved once per
#: process (distillation's teacher, the reference outputs), not once per trial.
_ON_DEVICE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def baseline_on(model: torch.nn.Module, device: str | None) -> torch.nn.Module:
    """``model`` (a cached baseline, read-only) on ``device``: itself for the CPU (None), else
    one copy there per process, made the first time it is asked for."""
    if device is None or torch.device(device).type == "cpu":
        return model
    copies = _ON_DEVICE.setdefault(model, {})
    if str(device) not in copies:
        copies[str(device)] = copy.deepcopy(model).to(device).eval()
    return copies[str(device)]


def compression_context(
    task: Task, baseline: Baseline, *, seed: int, device: str | None = None
) -> CompressionContext:
    """What the compressors of a trial get from its task: the training data, the baseline on
    ``device`` (and its outputs on in-memory data), the task's losses, and the task's training
    loop bound to the trial's seed (methods that train, such as L1 sparse training, train
    through it, where the model is: the trial's device)."""
    return CompressionContext(
        train=task.train,
        teacher_outputs=baseline.teacher_outputs,
        teacher=baseline_on(baseline.model, device),
        example_inputs=task.example_inputs(),
        seed=seed,
        loss=task.loss,
        losses=LOSSES,
        outputs=task.outputs,
        fit=partial(fit, train=task.train, seed=seed, **task.training()),
        cache_dir=baseline.folder,
    )


def cross_validate(recipe: Recipe, ctx: SweepContext, *, seed: int) -> float:
    """Mean validation accuracy of ``recipe`` over the folds of ``ctx`` (each fold compresses
    its own baseline and is evaluated on its held-out part)."""
    fold_scores = []
    for task, baseline in ctx.folds:
        model, _ = compress_recipe(recipe, ctx.space, task, baseline, seed=seed, device=ctx.device)
        if ctx.device is not None:  # evaluated where it was fine-tuned
            model.to(ctx.device)
        fold_scores.append(evaluate(model, task.val))
    return sum(fold_scores) / len(fold_scores)


def int8_layers(model: torch.nn.Module) -> list[str]:
    """Names of the layers of a shipped model that run on int8 kernels."""
    int8 = tuple(INT8_MODULES.values())
    return [name for name, module in model.named_modules() if isinstance(module, int8)]


@contextmanager
def _stops_sweep(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` writing ``path`` (no space left, read-only, no permission) into
    `SweepStopped`: the sweep stops at the first, naming the cause and the path."""
    try:
        yield
    except OSError as err:
        raise SweepStopped(
            f"cannot write {path} in output_dir: {err.strerror or err} "
            f"({errno.errorcode.get(err.errno, 'OSError')})"
        ) from err


def trial_file(output_dir: Path, study_name: str, number: int) -> Path:
    """Where trial ``number`` of a study writes its packed model file."""
    return output_dir / study_name / f"trial-{number:04d}.sqz"


def _schedules(compressors: list[Compressor], model: torch.nn.Module):
    def before_epoch(epoch: int, epochs: int) -> None:
        for compressor in compressors:
            compressor.on_epoch(model, epoch, epochs)

    return before_epoch


def _distils(compressors: list[Compressor]) -> bool:
    """Whether the fine-tuning's loss needs the teacher's outputs on each batch."""
    return any("teacher" in c.requires for c in compressors)


def _finetune_loss(compressors: list[Compressor], context: CompressionContext):
    losses = [c.finetune_loss(context) for c in compressors]
    losses = [loss for loss in losses if loss is not None]
    return losses[0] if losses else context.loss  # the space allows one compressor of kind "loss"
