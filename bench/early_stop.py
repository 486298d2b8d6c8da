"""Wall time to reach the same hypervolume with and without the Pareto-dominance early stop.

Both legs run the same sweep of `digits_mlp` (TPE, the default objectives, `space=wide`; same
seed) with ``search.early_stop.enabled`` false and true. The target is the smaller of the two legs'
final hypervolumes (fixed reference point: 10 points of accuracy below the baseline, the
baseline's packed size; sizes in log10); each leg's time to reach it is read from its trials'
end times. Legs alternate over rounds (this machine's speed drifts by +-20%).

    python bench/early_stop.py            # 24 trials a leg, 1 round: ~3 minutes
    python bench/early_stop.py --full     # 40 trials a leg, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hypervolume_over_time, quiet, reference, sweep  # noqa: E402


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    return next(seconds for seconds, hv in curve if hv >= target - 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="40 trials a leg, 3 rounds")
    parser.add_argument("--trials", type=int, help="trials a leg (default 24, --full 40)")
    parser.add_argument("--rounds", type=int, help="rounds (default 1, --full 3)")
    parser.add_argument("--margin", type=float, default=0.02)
    args = parser.parse_args()
    trials = args.trials or (40 if args.full else 24)
    rounds = args.rounds or (3 if args.full else 1)
    quiet()
    root = Path(tempfile.mkdtemp(prefix="squeeze-early-stop-"))
    speedups = []
    for r in range(rounds):
        curves, pruned = {}, {}
        for stop in (False, True) if r % 2 == 0 else (True, False):
            result, done = sweep(
                root / f"round{r}-{stop}",
                [
                    f"cache_dir={root / 'cache'}",
                    "space=wide",
                    "search.sampler=tpe",
                    f"seed={r}",
                    f"search.n_trials={trials}",
                    f"search.early_stop.enabled={str(stop).lower()}",
                    f"search.early_stop.margin={args.margin}",
                    "threads=1",
                ],
            )
            ref = reference(result.baseline["val_acc"], result.baseline["size_bytes"])
            curves[stop] = hypervolume_over_time(done, ref)
            pruned[stop] = sum(t.state.name == "PRUNED" for t in done)
        target = min(curves[False][-1][1], curves[True][-1][1])
        without, with_stop = time_to(curves[False], target), time_to(curves[True], target)
        speedups.append(without / with_stop)
        print(
            f"round {r}: final hypervolume without {curves[False][-1][1]:.4f}, with "
            f"{curves[True][-1][1]:.4f} ({pruned[True]} of {trials} trials stopped early); "
            f"time to {target:.4f}: without {without:.1f} s, with {with_stop:.1f} s "
            f"-> {speedups[-1]:.2f}x",
            flush=True,
        )
    print(f"\n{trials} trials a leg, {rounds} round(s), margin {args.margin}")
    print(
        "wall time to the same hypervolume, without / with early stop (median): "
        f"{statistics.median(speedups):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
