"""The early-stop size estimate: the packed file's size computed before fine-tuning (nothing
written), against the file the trial ships after fine-tuning."""

from __future__ import annotations

import copy

import pytest

from compressors import CompressionContext, get_compressor, save_packed
from search.config.early_stop import EarlyStop
from search.config.space import Recipe
from search.run.trial import compress_recipe


class _Space:
    """The part of a search space `compress_recipe` uses: building the recipe's compressors."""

    def build(self, recipe: Recipe) -> list:
        return [get_compressor(n)(**recipe.compressors[n]) for n in recipe.pipeline]


def _recipe(epochs: int, **compressors: dict) -> Recipe:
    finetune = {"epochs": epochs, "batch_size": 64, "lr": 1e-3, "schedule": "constant"}
    return Recipe(tuple(compressors), dict(compressors), finetune, {})


def _estimate_and_file(task, baseline, tmp_path, epochs: int, **compressors) -> tuple[int, int]:
    rule = EarlyStop(dominance=True)
    estimates = []
    model, _ = compress_recipe(
        _recipe(epochs, **compressors),
        _Space(),
        task,
        baseline,
        seed=0,
        on_compressed=lambda m: estimates.append(
            rule._structure(m, like=baseline.model)["size_bytes"]
        ),
    )
    (estimate,) = estimates
    return estimate, save_packed(model, tmp_path / "m.sqz", like=baseline.model)


@pytest.mark.parametrize(
    "compressors",
    [
        {"quant": {"bits": 4}},
        {"quant": {"bits": 8}},
        {"prune": {"amount": 0.7}, "quant": {"bits": 4}},
        {"cluster": {"bits": 4}},
        {"lowrank": {"keep": 0.3}},
        {"structured": {"amount": 0.5}, "quant": {"bits": 4}},
    ],
    ids=["quant4", "quant8", "prune+quant", "cluster", "lowrank", "structured+quant"],
)
def test_the_estimate_is_within_one_percent_of_the_shipped_file(
    digits_task, digits_baseline, tmp_path, compressors
):
    estimate, size = _estimate_and_file(
        digits_task, digits_baseline, tmp_path, epochs=1, **compressors
    )
    assert abs(estimate - size) <= 0.01 * size, (estimate, size)


def test_the_estimate_records_the_layers_compression_made_smaller(
    digits_task, digits_baseline, tmp_path
):
    """Structured pruning changes layer widths: the shipped file records them against the
    baseline, and so does the estimate (exactly the file's size for the same model)."""
    context = CompressionContext(example_inputs=digits_task.example_inputs(2))
    model = get_compressor("structured")(amount=0.5).compress(
        copy.deepcopy(digits_baseline.model), context
    )
    rule = EarlyStop(dominance=True)
    size = save_packed(model, tmp_path / "m.sqz", like=digits_baseline.model)
    assert rule._structure(model, like=digits_baseline.model)["size_bytes"] == size
    assert rule._structure(model)["size_bytes"] != size  # (without the baseline: no record)
