"""Hypervolume after 30 trials of TPE against 60 trials of random search.

Both on `digits_mlp` with the wide space (`space=wide`) and the default objectives (validation
accuracy, packed size),
from the same cached baseline; hypervolume of (val_acc, log10 size_bytes) with a fixed reference
point (10 points of accuracy below the baseline, the baseline's packed size); median over seeds.

    python bench/sample_efficiency.py           # 3 seeds, 5 fine-tuning epochs: ~4 minutes
    python bench/sample_efficiency.py --full    # 3 seeds, the space's 15 epochs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import final_hypervolume, quiet, reference, sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the space's own fine-tuning epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=30, help="trials of TPE")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 5; --full 15)")
    args = parser.parse_args()
    epochs = args.epochs or (15 if args.full else 5)
    quiet()
    root = Path(tempfile.mkdtemp(prefix="squeeze-efficiency-"))
    common = [
        f"cache_dir={root / 'cache'}",
        "space=wide",  # (measured on it; the default space searches fewer knobs)
        f"space.finetune.epochs={epochs}",
    ]
    ratios, tpe_hv, random_hv = [], [], []
    for seed in range(args.seeds):
        legs = {}
        for sampler, n, jobs in (("tpe", args.trials, 1), ("random", 2 * args.trials, 2)):
            # random search does not learn from earlier trials: 2 workers give the same result
            result, trials = sweep(
                root / f"{sampler}-{seed}",
                [
                    *common,
                    f"seed={seed}",
                    f"search.sampler={sampler}",
                    f"search.n_trials={n}",
                    f"search.n_jobs={jobs}",
                ],
            )
            ref = reference(result.baseline["val_acc"], result.baseline["size_bytes"])
            legs[sampler] = final_hypervolume(trials, ref)
        tpe_hv.append(legs["tpe"])
        random_hv.append(legs["random"])
        ratios.append(legs["tpe"] / legs["random"])
        print(
            f"seed {seed}: hypervolume tpe@{args.trials} {legs['tpe']:.4f}   "
            f"random@{2 * args.trials} {legs['random']:.4f}   ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(f"\ndigits_mlp, default space, {epochs} fine-tuning epochs, {args.seeds} seeds")
    print(
        f"median hypervolume: tpe@{args.trials} {statistics.median(tpe_hv):.4f}, "
        f"random@{2 * args.trials} {statistics.median(random_hv):.4f}"
    )
    print(
        f"ratio tpe@{args.trials} / random@{2 * args.trials} (median of seeds): "
        f"{statistics.median(ratios):.3f}  (goal >= 1.0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
