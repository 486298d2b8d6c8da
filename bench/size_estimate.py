"""The early stop's size estimate against the file the trial ships, and what re-estimating costs.

For each task (digits_mlp, mnist1d_cnn), compression recipe (quant 4 and 8 bits, prune+quant,
cluster, lowrank) and fine-tune length (1, 3, 10, 30 epochs; constant learning rate), the
recipe is compressed and fine-tuned as a trial does (`compress_recipe`), the packed size is
measured before fine-tuning (nothing written) and after every epoch, and the file is written
once at the end. Errors are |estimate - file| / file:

- before: the estimate made before fine-tuning (what the early stop decided on until now);
- after: the estimate the stopper decides on after each epoch (``min_epochs=1``: a decision after
  every epoch, the hardest case), re-estimated before the 1st, 2nd, 4th, 8th, ... decision as
  `Stopper` does (`search.config.early_stop.reestimated`), max and median over the decisions;
- stale: the size decided on after each epoch against the exact size of the weights at that
  epoch (what re-estimating removes; the rest of "after" is the drift still to come), max.

The cost is one estimate's seconds over one epoch's (fine-tuning and validation).

    python bench/size_estimate.py                 # both tasks, 1 3 10 30 epochs
    python bench/size_estimate.py --epochs 1 3    # shorter
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressors import get_compressor, save_packed
from compressors.packing import packed_size
from experiments import load_or_train_baseline
from experiments.digits import digits_mlp
from experiments.mnist1d import mnist1d_cnn
from search.config.early_stop import reestimated
from search.config.space import Recipe
from search.run.trial import compress_recipe

RECIPES = {
    "quant4": {"quant": {"bits": 4}},
    "quant8": {"quant": {"bits": 8}},
    "prune+quant": {"prune": {"amount": 0.7}, "quant": {"bits": 4}},
    "cluster": {"cluster": {"bits": 4}},
    "lowrank": {"lowrank": {"keep": 0.3}},
}


class _Space:
    def build(self, recipe: Recipe) -> list:
        return [get_compressor(n)(**recipe.compressors[n]) for n in recipe.pipeline]


def _tasks(cache: Path):
    digits = digits_mlp(seed=0, hidden=[300, 100], train={"epochs": 40})
    config = {"name": "digits_mlp", "hidden": [300, 100], "train": {"epochs": 40}}
    yield "digits", digits, load_or_train_baseline(digits, config=config, cache_dir=cache, seed=0)
    mnist1d = mnist1d_cnn(seed=0, data_dir=str(cache / "mnist1d"), train={"epochs": 30})
    config = {"name": "mnist1d_cnn", "train": {"epochs": 30}}
    yield (
        "mnist1d",
        mnist1d,
        load_or_train_baseline(mnist1d, config=config, cache_dir=cache, seed=0),
    )


def one(task, baseline, compressors: dict, epochs: int, out: Path) -> dict:
    """Sizes before and after each epoch, seconds of each estimate and epoch, the file's size."""
    finetune = {"epochs": epochs, "batch_size": 64, "lr": 1e-3, "schedule": "constant"}
    recipe = Recipe(tuple(compressors), dict(compressors), finetune, {})
    sizes, costs, ends = [], [], []

    def measure(model) -> None:
        began = time.perf_counter()
        sizes.append(packed_size(model, like=baseline.model))
        costs.append(time.perf_counter() - began)

    def after_epoch(_stats) -> None:
        ends.append((time.perf_counter(), costs[-1]))

    start = time.perf_counter()
    model, _ = compress_recipe(
        recipe,
        _Space(),
        task,
        baseline,
        seed=0,
        on_compressed=measure,
        reestimate=lambda epoch: True,
        after_epoch=after_epoch,
    )
    shipped = save_packed(model, out / "m.sqz", like=baseline.model)
    # epoch times, less the estimate made after each (it ran before after_epoch)
    epoch_s, last = [], start + costs[0]
    for end, cost in ends:
        epoch_s.append(end - last - cost)
        last = end
    return {"sizes": sizes, "costs": costs, "epoch_s": epoch_s, "shipped": shipped}


def decided(run: dict) -> tuple[list[float], int]:
    """The size the stopper decides on after each epoch (``min_epochs=1``), and how many
    re-estimates that took."""
    current, out, count = 0, [], 0
    for epoch in range(len(run["epoch_s"])):
        if reestimated(epoch, 1):
            current, count = epoch + 1, count + 1
        out.append(run["sizes"][current])
    return out, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10, 30])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="squeeze-size-estimate-"))
    print(
        f"{'task':8} {'recipe':12} {'epochs':>6} {'before %':>9} {'after max %':>11} "
        f"{'after med %':>11} {'stale max % before/after':>24} {'estimate/epoch':>14} "
        f"{'re-estimates':>12}"
    )
    for name, task, baseline in _tasks(root / "cache"):
        if name not in args.tasks:
            continue
        for recipe, compressors in RECIPES.items():
            for epochs in args.epochs:
                run = one(task, baseline, compressors, epochs, root)
                file = run["shipped"]
                before = abs(run["sizes"][0] - file) / file * 100
                sizes, used = decided(run)
                after = [abs(s - file) / file * 100 for s in sizes]
                now = run["sizes"][1:]
                stale = [
                    max(abs(d - n) / n * 100 for d, n in zip(ds, now, strict=True))
                    for ds in ([run["sizes"][0]] * len(now), sizes)
                ]
                ratio = statistics.median(run["costs"]) / statistics.median(run["epoch_s"])
                print(
                    f"{name:8} {recipe:12} {epochs:6d} {before:9.3f} {max(after):11.3f} "
                    f"{statistics.median(after):11.3f} {stale[0]:11.3f} /{stale[1]:11.3f} "
                    f"{ratio:14.3f} {used:12d}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
