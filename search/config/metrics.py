"""The names of the metrics a trial measures, without importing what measures them.

Config validation (`search.config.plan`) checks objectives and constraints against these names
before torch is imported; `search.run.trial` measures them.
"""

from __future__ import annotations

#: Metrics each trial measures; any of them can be an objective. ``val_acc`` is the task's
#: validation score: top-1 accuracy, or the mean cosine similarity to the original embeddings for
#: an embedding task (``minilm``). ``latency_ms`` is at batch 1; each other batch size ``B`` of
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


def batch_suffix(batch: int) -> str:
    """How a per-batch metric's name ends: ``""`` at batch 1, else ``_b<batch>``."""
    return "" if batch == 1 else f"_b{batch}"


def batch_metrics(batch_sizes) -> list[str]:
    """The latency and speed-up metrics a sweep measuring at ``batch_sizes`` logs."""
    return [f"{name}{batch_suffix(b)}" for b in batch_sizes for name in ("latency_ms", "speedup")]
