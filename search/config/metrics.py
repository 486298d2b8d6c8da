"""The names of the metrics a trial measures, without importing what measures them.

Config validation (`search.config.plan`) checks objectives and constraints against these names
before torch is imported; `search.run.trial` measures them.
"""

from __future__ import annotations

#: Metrics each trial measures; any of them can be an objective. ``val_acc`` is the task's
#: validation score, whatever its metric (top-1 accuracy by default, the mean cosine similarity
#: to the original embeddings for an embedding task such as ``minilm``, R² or an error such as
#: MSE for a regression): better higher or lower as the task says (`search.config.score`).
#: ``latency_ms`` is at batch 1; each other batch size ``B`` of
#: ``measure.latency_batch_sizes`` adds ``latency_ms_bB``. ``speedup`` (and ``speedup_bB``) is the
#: baseline's latency over the trial's, both timed in alternating rounds (`batch_metrics`).
#: Each extra score of the task (e.g.
#: ``retrieval``) adds ``val_<name>``. ``compressed_fraction`` is the fraction of the baseline's
#: parameters that the recipe's compressors act on. ``val_agreement`` is the share of validation
#: inputs on which the trial's model decides as the baseline did (the same top-1 class; the same
#: nearest neighbour for an embedding task).
METRICS = (
    "val_acc",
    "size_bytes",
    "compression_ratio",
    "nonzero_params",
    "flops",
    "latency_ms",
    "speedup",
    "peak_memory_bytes",
    "compressed_fraction",
    "val_agreement",
)


#: Metrics that are better higher (a lower bound as a constraint, maximized by default);
#: ``val_acc`` follows the task's metric, every other metric is better lower.
HIGHER_IS_BETTER = frozenset({"val_agreement", "compression_ratio", "speedup"})


def higher_is_better(metric: str, *, score_higher_is_better: bool = True) -> bool:
    """Whether ``metric`` is better higher; ``val_acc`` as the task's score says
    (``score_higher_is_better``)."""
    if metric == "val_acc":
        return score_higher_is_better
    return metric in HIGHER_IS_BETTER or metric.startswith("speedup_b")


def default_directions(
    objectives: tuple[str, ...], *, score_higher_is_better: bool = True
) -> tuple[str, ...]:
    """The Optuna direction of each objective when ``search.directions`` is null."""
    return tuple(
        "maximize"
        if higher_is_better(name, score_higher_is_better=score_higher_is_better)
        else "minimize"
        for name in objectives
    )


def batch_suffix(batch: int) -> str:
    """How a per-batch metric's name ends: ``""`` at batch 1, else ``_b<batch>``."""
    return "" if batch == 1 else f"_b{batch}"


def batch_metrics(batch_sizes) -> list[str]:
    """The latency and speed-up metrics a sweep measuring at ``batch_sizes`` logs."""
    return [f"{name}{batch_suffix(b)}" for b in batch_sizes for name in ("latency_ms", "speedup")]
