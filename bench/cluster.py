"""Weight sharing by k-means (``cluster``) against per-channel grids (``quant``) after pruning, at
equal bits, on `digits_mlp`.

Both pipelines prune the same 80% of the weights (global magnitude), then put the rest on
``2^bits`` shared values per tensor (``cluster``: k-means centroids, fine-tuned) or on a
``2^bits - 1``-level grid per output channel (``quant``: fine-tuned on the grid), with the same
fine-tuning (Adam, lr 1e-3, 15 epochs) and the same seeds, each recipe run through the trial's own
code path (`search.run.trial.compress_recipe`). Printed per row: the packed file's bytes, the
compression ratio against the baseline's packed fp32 file, and the validation and test accuracy
drops in points (mean over the seeds; negative: a gain) of the model reloaded from that file.

    python bench/cluster.py [--bits 2 3 4] [--seeds 3] [--amount 0.8] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402

from bench._common import quiet  # noqa: E402
from compressors import load_packed, save_packed  # noqa: E402
from experiments import evaluate  # noqa: E402
from search import SearchSpace, compose_config  # noqa: E402
from search.run.trial import compress_recipe  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

PIPELINES = ("prune+cluster", "prune+quant")


def overrides(pipeline: str, bits: int, args: argparse.Namespace) -> list[str]:
    """The fixed recipe of one row (the default space's other entries stay unused)."""
    quantizer = pipeline.split("+")[-1]
    return [
        f"task={args.task}",
        f"threads={args.threads}",  # (load_workload sets torch's threads from the config)
        f"space.pipeline=[{pipeline.replace('+', ',')}]",
        f"space.prune.amount={args.amount}",
        "space.prune.scope=global",
        f"space.{quantizer}.bits={bits}",
        f"space.finetune.lr={args.lr}",
        f"space.finetune.epochs={args.epochs}",
    ]


def row(pipeline: str, bits: int, args: argparse.Namespace, out: Path, reference) -> dict:
    cfg = compose_config(overrides(pipeline, bits, args))
    workload = load_workload(cfg, connect=False)
    task, baseline = workload.task, workload.baseline
    space = SearchSpace.from_config(cfg.space)
    recipe = space.sample(optuna.trial.FixedTrial({}))
    sizes, val, test = [], [], []
    for seed in range(cfg.seed, cfg.seed + args.seeds):
        model, _ = compress_recipe(recipe, space, task, baseline, seed=seed, device=workload.device)
        sizes.append(save_packed(model, out / "model.sqz", like=baseline.model))
        shipped = load_packed(out / "model.sqz", task.build_model())
        val.append(100 * (reference["val"] - evaluate(shipped, task.val)))
        test.append(100 * (reference["test"] - evaluate(shipped, task.test)))
    return {"bytes": statistics.mean(sizes), "val": val, "test": test}


def baseline_reference(args: argparse.Namespace, out: Path) -> dict:
    """Bytes and accuracies of the baseline as shipped (its packed fp32 file, reloaded)."""
    cfg = compose_config([f"task={args.task}", f"threads={args.threads}"])
    workload = load_workload(cfg, connect=False)
    task = workload.task
    size = save_packed(workload.baseline.model, out / "baseline.sqz")
    shipped = load_packed(out / "baseline.sqz", task.build_model())
    return {"bytes": size, "val": evaluate(shipped, task.val), "test": evaluate(shipped, task.test)}


def _points(drops: list[float]) -> str:
    spread = f" ± {statistics.stdev(drops):.1f}" if len(drops) > 1 else ""
    return f"{statistics.mean(drops):+.1f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits_mlp")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (mean, ± stdev)")
    parser.add_argument("--amount", type=float, default=0.8, help="fraction pruned (global)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        reference = baseline_reference(args, out)
        print(
            f"{args.task}: baseline {reference['bytes']:,} B packed fp32, val "
            f"{100 * reference['val']:.2f}%, test {100 * reference['test']:.2f}%; prune "
            f"{args.amount:g} global, fine-tune {args.epochs} epochs at lr {args.lr:g}, "
            f"{args.seeds} seed(s), {args.threads} thread(s)"
        )
        print("| pipeline | bits | packed bytes | ratio | val drop (pt) | test drop (pt) |")
        print("| --- | --- | --- | --- | --- | --- |")
        start = time.perf_counter()
        for bits in args.bits:
            for pipeline in PIPELINES:
                result = row(pipeline, bits, args, out, reference)
                print(
                    f"| {pipeline} | {bits} | {result['bytes']:,.0f} | "
                    f"{reference['bytes'] / result['bytes']:.1f}x | {_points(result['val'])} | "
                    f"{_points(result['test'])} |",
                    flush=True,
                )
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
