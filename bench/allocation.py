"""Which sensitivity predicts the fine-tuned result: ``fisher`` (estimated) or ``loss`` (measured).

For each task, random per-tensor allocations (a sparsity and a bit width, or float32, for every
compressible tensor; the settings `allocate` chooses among) are applied to the cached baseline
and fine-tuned as a trial would be. The sum of each method's sensitivities over the chosen
settings (what the allocator minimises) is then compared with the fine-tuned model's validation
loss and accuracy by Spearman rank correlation: the method whose ranking agrees better is the
better guide for the knapsack. Also printed: each table's time to measure.

    python bench/allocation.py [--tasks digits_mlp mnist1d_cnn] [--samples 24] [--epochs 15]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import quiet  # noqa: E402
from compressors import allocate as alloc  # noqa: E402
from compressors import get_compressor  # noqa: E402
from compressors.quant import half_biases  # noqa: E402
from experiments import evaluate, fit  # noqa: E402
from search import compose_config  # noqa: E402
from search.run.trial import compression_context  # noqa: E402
from search.run.workload import load_workload  # noqa: E402


def val_loss(model, task) -> float:
    with torch.no_grad():
        return float(task.loss(model(task.val.x), task.val.y, None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_cnn"])
    parser.add_argument("--samples", type=int, default=24, help="random allocations per task")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="squeeze-allocation-"))
    print(f"{args.samples} random allocations per task, {args.epochs} fine-tuning epochs")
    for task_name in args.tasks:
        cfg = compose_config([f"task={task_name}", f"cache_dir={root / 'cache'}"])
        workload = load_workload(cfg, connect=False)
        task, baseline = workload.task, workload.baseline
        ctx = compression_context(task, baseline, seed=args.seed)
        found = alloc.targets(baseline.model)
        tables, seconds = {}, {}
        for method in ("fisher", "loss"):
            allocator = get_compressor("allocate")(sensitivity=method)
            settings = allocator.settings()
            start = time.perf_counter()
            tables[method] = allocator.table(copy.deepcopy(baseline.model), ctx)
            seconds[method] = time.perf_counter() - start
        rng = np.random.default_rng(args.seed)
        predicted = {"fisher": [], "loss": []}
        losses, accs = [], []
        for _ in range(args.samples):
            choice = [int(rng.integers(len(settings))) for _ in found]
            model = copy.deepcopy(baseline.model)
            model_found = alloc.targets(model)
            alloc.apply_settings(
                model, model_found, {n: settings[c] for n, c in zip(found, choice, strict=True)}
            )
            half_biases(
                {id(s.module): s.module for t in model_found.values() for s in t.sites}.values()
            )
            fit(
                model,
                task.train,
                epochs=args.epochs,
                batch_size=64,
                lr=args.lr,
                seed=args.seed,
                schedule="cosine",
                loss_fn=task.loss,
            )
            losses.append(val_loss(model, task))
            accs.append(evaluate(model, task.val))
            for method, table in tables.items():
                sens = table["sensitivity"]
                predicted[method].append(sum(sens[r, c] for r, c in enumerate(choice)))
        print(f"\n{task_name}: {len(found)} tensors x {len(settings)} settings")
        for method in ("fisher", "loss"):
            rho_loss = spearmanr(predicted[method], losses).statistic
            rho_acc = spearmanr(predicted[method], [-a for a in accs]).statistic
            print(
                f"  {method:>6}: table {seconds[method]:6.1f} s   Spearman with fine-tuned val "
                f"loss {rho_loss:+.3f}, with val error {rho_acc:+.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
