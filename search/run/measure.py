"""A trial's measurements of the model it ships: the validation score and what running it costs.

`measure` is the second half of a trial (`search.run.trial.run_trial`): everything runs on the
CPU, where the shipped file is loaded, on the validation split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from experiments import (
    CLASSIFIERS,
    DECISIONS,
    DecisionAgreement,
    Task,
    prediction_agreement,
    scores,
)
from experiments._data import call_model
from experiments.metrics import (
    batch_latencies,
    flops_per_sample,
    interleaved_latency_ms,
    latency_ms,
    nonzero_params,
    peak_memory_at,
)
from search.config.metrics import batch_suffix

logger = logging.getLogger(__name__)


def measure(
    shipped: torch.nn.Module,
    task: Task,
    latency_batch_sizes: Sequence[int] = (1,),
    latency_repeats: int = 30,
    *,
    latency_budget_s: float | None = None,
    reference: torch.nn.Module | None = None,
    timed: torch.nn.Module | None = None,
    reference_outputs: torch.Tensor | None = None,
) -> dict[str, float]:
    """The validation score (``val_acc``) and the task's extra scores (``val_<name>``), and the
    costs of running ``shipped``: nonzero parameters, FLOPs of one sample, latency at each batch
    size, and peak memory at the largest one (measured at batch 2 and 4 and extrapolated
    linearly, `experiments.metrics.peak_memory_at`). All of it runs on the CPU, where the
    shipped file is loaded: what a user's CPU pays for it.

    Each latency is the median of ``latency_repeats`` timed forwards at most, 3 at least,
    stopping once they have taken the time budget (None: exactly that many): at most
    ``latency_budget_s`` seconds, and at most the time of `LATENCY_BUDGET_FORWARDS` forwards of
    the model at the task's training batch size (one timed first; `latency_budget`), which
    keeps a large model's measurement to a few of its own training steps (a forward of 256
    rows of a 30 M-parameter MLP takes about 1.5 of them). A batch size whose forward would
    not fit that budget (predicted from the smaller batch timed before it, or from that
    forward at the training batch size if it had more rows) is timed on as many rows as fit,
    scaled to the batch, logged, and recorded as ``latency_rows_bB``
    (`experiments.metrics.batch_latencies`).

    Latency is timed on ``timed`` (default: ``shipped``; with ``measure.runtime=onnxruntime``,
    its ONNX graph in ONNX Runtime). With a ``reference`` (the baseline in the same runtime),
    each latency is timed in rounds alternating with the reference's, and the ratio is logged as
    ``speedup`` (batch 1) and ``speedup_b<B>``: a speed-up that other load on the machine does
    not move as it moves absolute times.

    With ``reference_outputs`` (the baseline's outputs on the validation split, or its
    decisions: `experiments.agreement_reference`), the share of
    validation inputs on which ``shipped`` decides as the baseline did is ``val_agreement``
    (`experiments.prediction_agreement`, from the same pass over the split as the score).
    """
    timed = shipped if timed is None else timed
    extra = dict(task.extra_scores)
    if reference_outputs is not None and task.outputs in CLASSIFIERS:  # decisions, by batch
        extra["agreement"] = DecisionAgreement(reference_outputs, task.outputs)
    elif reference_outputs is not None and task.outputs in DECISIONS:  # a regression has none
        extra["agreement"] = partial(_agreement, reference=reference_outputs, kind=task.outputs)
    metrics = {
        **{f"val_{k}": v for k, v in scores(shipped, task.val, extra).items()},
        "nonzero_params": nonzero_params(shipped),
        "flops": flops_per_sample(shipped, *task.example_batch(1)),
        "peak_memory_bytes": peak_memory_at(shipped, task.example_batch, max(latency_batch_sizes)),
    }

    clock = latency_clock()
    budget_s, probe = latency_budget(timed, reference, task, latency_budget_s, clock=clock)

    def time_ms(inputs) -> tuple[float, float | None]:
        if reference is None:
            ms = latency_ms(timed, inputs, repeats=latency_repeats, budget_s=budget_s, clock=clock)
            return ms, None
        return interleaved_latency_ms(
            timed,
            reference,
            inputs,
            rounds=LATENCY_ROUNDS,
            repeats=_per_round(latency_repeats),
            budget_s=budget_s,
            clock=clock,
        )

    latencies = batch_latencies(
        time_ms,
        task.example_batch,
        latency_batch_sizes,
        budget_s=budget_s,
        models=1 if reference is None else 2,
        probe=probe,
    )
    for batch, latency in latencies.items():
        suffix = batch_suffix(batch)
        metrics[f"latency_ms{suffix}"] = latency.ms
        if reference is not None:
            metrics[f"speedup{suffix}"] = latency.reference_ms / latency.ms
        if latency.rows != batch:
            metrics[f"latency_rows{suffix}"] = latency.rows
            once = task.example_batch(batch)[1] != batch  # (the data's: every trial's the same)
            if once:
                why = f"a batch of the validation data held {latency.rows} samples"
            else:
                why = (
                    f"a forward of {batch} would not fit the budget of {budget_s:.3g} s, "
                    f"measure.latency_budget_s={latency_budget_s}"
                )
            logger.info(
                "latency at batch %d timed on %d rows (%s) and scaled by %.3g: %.4g ms",
                batch,
                latency.rows,
                why,
                batch / latency.rows,
                latency.ms,
                extra={"once": once},
            )
    return metrics


def latency_clock() -> Callable[[], float]:
    """The clock a trial's latencies are read on: the calling thread's CPU time
    (``time.thread_time``) where torch runs one thread, and so ONNX Runtime's sessions here
    (`search.run.deploy` gives them torch's thread count; a one-thread session runs in the
    caller's thread); else wall time (``time.perf_counter``: CPU time would add up the threads).

    On a machine shared with other jobs, wall time counts the forwards' waits for a core: the
    speed-ups of one sweep's points, timed in turns with the baseline, ranged from 0.03x to 47x
    where their files re-timed at 0.9-1.5x (2 cores, load 5-9). A thread's CPU time leaves the
    waits out, so on one thread a latency is what the forward costs on an idle core."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


#: Forwards at the task's training batch size whose time is a latency's budget, at most (per
#: batch size; about a training step, which takes about three forwards' time): the rows of a
#: batch timed on fewer (`experiments.metrics.timed_rows`: 3 forwards fit the budget) are then
#: about the training batch's.
LATENCY_BUDGET_FORWARDS = 3.0
#: Seconds of a latency's budget at least (where ``measure.latency_budget_s`` allows): a small
#: model's forwards take microseconds, and ``measure.latency_repeats`` of them still fit.
MIN_LATENCY_BUDGET_S = 0.05


@torch.no_grad()
def latency_budget(
    timed: torch.nn.Module,
    reference: torch.nn.Module | None,
    task: Task,
    budget_s: float | None,
    *,
    clock=time.perf_counter,
) -> tuple[float | None, tuple[int, float] | None]:
    """``(seconds, probe)``: the seconds of timed forwards per latency (`measure`):
    ``budget_s``, or less where `LATENCY_BUDGET_FORWARDS` forwards of ``timed`` (or of
    ``reference``, if slower) at the task's training batch size take less (one forward of
    each timed here, after the validation pass has run the model), but `MIN_LATENCY_BUDGET_S`
    at least; and that forward, ``(rows, ms)``, from which
    `experiments.metrics.batch_latencies` predicts the rows of a larger batch. No budget
    (None): ``(None, None)``, nothing run."""
    if budget_s is None:
        return None, None
    inputs, rows = task.example_batch(task.train_config.batch_size)
    slowest = 0.0
    for model in (timed, reference):
        if model is not None:
            model.eval()
            start = clock()
            call_model(model, inputs)
            slowest = max(slowest, clock() - start)
    budget = min(budget_s, max(MIN_LATENCY_BUDGET_S, LATENCY_BUDGET_FORWARDS * slowest))
    return budget, (rows, 1000.0 * slowest)


def _agreement(outputs: torch.Tensor, _targets: torch.Tensor, *, reference, kind: str) -> float:
    """`prediction_agreement` as a score of the split (its targets unused)."""
    return prediction_agreement(outputs, reference, kind=kind)


#: Alternating rounds of a trial's latency against the baseline's.
LATENCY_ROUNDS = 5


def _per_round(repeats: int) -> int:
    """Forwards per round: ``measure.latency_repeats`` spread over the rounds (3 at least)."""
    return max(3, -(-repeats // LATENCY_ROUNDS))
