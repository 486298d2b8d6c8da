"""A training-free first front (``search.warm_start: predicted``).

Before any fine-tuning, `compressors.allocate`'s sensitivity table (each tensor's bytes and loss
increase at each sparsity and bit width, measured once on the baseline and cached with it) and
its exact-bytes knapsack predict a (loss, bytes) point for every target ratio: the knapsack's
allocation at that ratio, its loss the baseline's plus each chosen setting's measured increase,
its bytes the chosen settings' plus what allocate does not compress. `predicted_front` solves
it at `RATIOS` ratios log-spaced across the space's ``allocate.ratio`` interval, keeps the
non-dominated predictions, and `spread` picks a few of them evenly in log-bytes: the first
trials of the study run those ratios (``structured.amount`` 0, or plain ``allocate``) instead of
the space's ``warm_start`` recipes.

`predicted_recipe` checks at planning time (exit 2, before any work) that the space can run
such a recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution

from compressors._base import UnsupportedModelError
from search._errors import ConfigError
from search.config.warm_start import WarmStarts, check_warm_start

if TYPE_CHECKING:
    from search.config.space import SearchSpace
    from search.run.trial import SweepContext

#: Ratios the knapsack is solved at, log-spaced across the space's allocate.ratio interval.
RATIOS = 24
#: Candidates when the space has no warm_start recipes to count.
DEFAULT_COUNT = 5


@dataclass(frozen=True)
class Prediction:
    """One knapsack solution: its target ratio, predicted loss and predicted bytes."""

    ratio: float
    loss: float
    bytes: int


def predicted_recipe(space: SearchSpace) -> dict[str, Any]:
    """The recipe the predicted front varies (``allocate.ratio`` left out): allocate on the
    baseline's own weights.

    Raises:
        ConfigError: If the space cannot run allocate on the baseline (no pipeline
            ``structured+allocate`` with ``structured.amount`` 0, nor ``allocate``), or its
            ``allocate.ratio`` is not an interval.
    """
    ratio = space.values("allocate").get("allocate.ratio") if _has(space, "allocate") else None
    if isinstance(ratio, FloatDistribution):
        for recipe in (
            {"pipeline": "allocate"},
            {"pipeline": "structured+allocate", "structured.amount": 0.0},
        ):
            probe = {**recipe, "allocate.ratio": ratio.low}
            if check_warm_start([probe], space).recipes:
                return recipe
    raise ConfigError(
        f"search.warm_start=predicted needs a space whose pipeline can be 'allocate' or "
        f"'structured+allocate' with structured.amount 0, and whose allocate.ratio is an "
        f"interval; space '{space.name}' has pipeline "
        f"{' or '.join('+'.join(p) for p in space.pipelines)}"
        f"{'' if ratio is None else f' and allocate.ratio {ratio!r}'}. Allowed values of "
        f"search.warm_start: true, false, predicted."
    )


def _has(space: SearchSpace, name: str) -> bool:
    return any(name in p for p in space.pipelines)


def predicted_front(
    table: dict[str, np.ndarray], *, packed: int, fixed: int, ratios: np.ndarray, slack: float
) -> list[Prediction]:
    """The knapsack's prediction at each of ``ratios`` (those it can fit), as
    `compressors.allocate.BudgetAllocation.compress` first solves it: the budget is ``packed``
    over the ratio, less ``slack`` and the ``fixed`` bytes it does not compress."""
    from compressors.allocate import solve

    base = float(table["reference"][0])
    out = []
    for ratio in ratios:
        budget = math.floor(packed / float(ratio) * (1.0 - slack)) - fixed
        try:
            choice = solve(table["bytes"], table["sensitivity"], budget)
        except UnsupportedModelError:  # out of reach: below the smallest allocation
            continue
        rows = np.arange(len(choice))
        loss = base + float(table["sensitivity"][rows, choice].sum())
        size = fixed + int(table["bytes"][rows, choice].sum())
        out.append(Prediction(float(ratio), loss, size))
    return out


def spread(points: list[Prediction], count: int) -> list[Prediction]:
    """``count`` (at most) of the non-dominated ``points`` (less loss, fewer bytes), evenly in
    log-bytes from the largest to the smallest, each once, in decreasing bytes."""
    front = []
    for p in sorted(points, key=lambda p: (p.bytes, p.loss)):
        if not front or p.loss < front[-1].loss:
            if front and p.bytes == front[-1].bytes:
                continue
            front.append(p)
    front.reverse()  # largest bytes first
    if len(front) <= count:
        return front
    logs = np.log([p.bytes for p in front])
    chosen: list[int] = []
    for target in np.linspace(logs[0], logs[-1], count):
        free = [i for i in range(len(front)) if i not in chosen]
        chosen.append(min(free, key=lambda i: (abs(logs[i] - target), i)))
    return [front[i] for i in sorted(chosen)]


def predicted_warm_starts(ctx: SweepContext, count: int) -> tuple[WarmStarts, list[Prediction]]:
    """The warm starts spread along the predicted front of ``ctx``'s baseline, and the
    predictions they run (same order)."""
    from compressors._targets import targets
    from compressors.allocate import SLACK, BudgetAllocation, _overhead
    from compressors.packing import packed_size
    from search.run.trial import compression_context

    space = ctx.space
    recipe = predicted_recipe(space)
    dist = space.values("allocate")["allocate.ratio"]
    fixed_params = {  # (sampled ones keep allocate's defaults)
        k.split(".", 1)[1]: v
        for k, v in space.values("allocate").items()
        if k != "allocate.ratio" and not isinstance(v, BaseDistribution)
    }
    allocator = BudgetAllocation(**fixed_params)
    model = ctx.baseline.model
    compression = compression_context(ctx.task, ctx.baseline, seed=ctx.seed)
    table = allocator.table(model, compression)
    fixed = _overhead(model, targets(model), half=allocator.bias == "fp16")
    ratios = np.geomspace(dist.low, dist.high, RATIOS)
    chosen = spread(
        predicted_front(table, packed=packed_size(model), fixed=fixed, ratios=ratios, slack=SLACK),
        count,
    )
    entries = [{**recipe, "allocate.ratio": round(p.ratio, 6)} for p in chosen]
    return check_warm_start(entries, space), chosen
