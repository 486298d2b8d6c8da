"""The early-stop size estimate: the packed file's size computed before fine-tuning (nothing
written), against the file the trial ships after fine-tuning."""

from __future__ import annotations

import copy
from dataclasses import replace

import optuna
import pytest

from compressors import CompressionContext, get_compressor, save_packed
from search.config.early_stop import EarlyStop, Stopper
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
    model = _fine_tune(
        task,
        baseline,
        epochs,
        on_compressed=lambda m: estimates.append(
            rule._structure(m, like=baseline.model)["size_bytes"]
        ),
        **compressors,
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


def _stopper(baseline, *, min_epochs: int) -> Stopper:
    """A stopper on a study whose front (one point no trial can fail to beat) never stops the
    trial: the dominance rule runs after every epoch from ``min_epochs`` on."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.0, 1e12]))
    rule = EarlyStop(
        dominance=True,
        min_epochs=min_epochs,
        objectives=("val_acc", "size_bytes"),
        directions=("maximize", "minimize"),
        constraints={"size_kb": 1e9},
        baseline_size=1,
    )
    return Stopper(rule, study.ask(), like=baseline.model)


def _fine_tune(task, baseline, epochs: int, *, stopper=None, on_compressed=None, **compressors):
    """``compress_recipe`` of ``compressors``; with a ``stopper``, the one called after each
    epoch (and to measure the model), else ``on_compressed`` alone."""
    hooks = {"on_compressed": on_compressed}
    if stopper is not None:
        hooks = {
            "after_epoch": stopper,
            "on_compressed": stopper.start,
            "reestimate": stopper.reestimate,
        }
    model, _ = compress_recipe(
        _recipe(epochs, **compressors), _Space(), task, baseline, seed=0, **hooks
    )
    return model


@pytest.mark.parametrize(
    "compressors",
    [{"quant": {"bits": 4}}, {"quant": {"bits": 4, "mode": "ptq"}}],
    ids=["qat (the model itself)", "ptq (a finalized copy)"],
)
def test_the_stopper_decides_on_the_size_of_the_weights_fine_tuning_moved(
    digits_task, digits_baseline, tmp_path, compressors
):
    """Re-estimated before the 1st, 2nd and 4th decision, the size the 4th (the last) used is
    the shipped file's (exactly: the last epoch's weights are the shipped ones), though
    fine-tuning changed it."""
    stopper = _stopper(digits_baseline, min_epochs=1)
    model = _fine_tune(digits_task, digits_baseline, 4, stopper=stopper, **compressors)
    size = save_packed(model, tmp_path / "m.sqz", like=digits_baseline.model)
    assert len(stopper.estimates) == 1 + 3  # before fine-tuning, then after epochs 0, 1 and 3
    assert stopper.estimates[-1] == size != stopper.estimates[0]
    assert stopper.hook.known == {"size_bytes": size, "compression_ratio": 1 / size}


@pytest.mark.parametrize(
    ("min_epochs", "epochs", "after"),
    [(1, 8, [0, 1, 3, 7]), (3, 5, [2, 3]), (1, 2, [0, 1])],
    ids=["1st, 2nd, 4th, 8th decision", "only before a decision", "short"],
)
def test_the_stopper_re_estimates_before_the_1st_2nd_4th_8th_decision(
    digits_task, digits_baseline, min_epochs, epochs, after
):
    stopper = _stopper(digits_baseline, min_epochs=min_epochs)
    assert [e for e in range(epochs) if stopper.reestimate(e)] == []  # (not started yet)
    _fine_tune(digits_task, digits_baseline, epochs, stopper=stopper, quant={"bits": 4})
    assert [e for e in range(epochs) if stopper.reestimate(e)] == after
    assert len(stopper.estimates) == 1 + len(after)


def test_a_re_estimate_that_breaks_a_size_constraint_prunes_the_trial(digits_baseline):
    stopper = _stopper(digits_baseline, min_epochs=1)
    model = copy.deepcopy(digits_baseline.model)
    stopper.start(model)  # (the baseline: about 200 kB, within 1e9 kB)
    stopper.hook._rule = replace(stopper.early_stop, constraints={"size_kb": 1.0})
    with pytest.raises(optuna.TrialPruned, match="infeasible during fine-tuning: \\['size_kb'\\]"):
        stopper.start(model)
