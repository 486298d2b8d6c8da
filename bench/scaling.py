"""Trials per minute with 1 and with 2 worker processes on PostgreSQL, side by side.

Both legs run the same sweep of `digits_mlp` (a fresh study each time, one torch thread per
worker) on the PostgreSQL server of this machine; legs alternate (1, 2, 2, 1, ...) because this
machine's speed drifts by +-20%. Two throughputs are printed:

- steady: the sum over workers of each worker's trials over its own busy time (its first
  trial's start to its last trial's end): what the workers do once they run;
- end to end: all trials over the first trial's start to the last trial's end (includes one
  worker waiting for the other to start, which weighs on short legs).

Process start-up, the baseline and the report are left out of both.

    python bench/scaling.py            # about 3 minutes
    python bench/scaling.py --full     # 40 trials a leg, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet, sweep  # noqa: E402

from search.run.budget import WORKER_ATTR  # noqa: E402

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def trials_per_minute(trials) -> float:
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return 60.0 * len(trials) / (end - start).total_seconds()


def steady_trials_per_minute(trials) -> float:
    by_worker: dict[str, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs[WORKER_ATTR], []).append(t)
    return sum(trials_per_minute(own) for own in by_worker.values())


def leg(
    root: Path, workers: int, trials: int, storage: str, extra: list[str]
) -> tuple[float, float]:
    name = f"scaling-{uuid.uuid4().hex[:8]}"
    try:
        _, done = sweep(
            root / name,
            [
                f"search.n_trials={trials}",
                f"search.n_jobs={workers}",
                f"search.study_name={name}",
                "search.sampler=random",
                "threads=1",
                f"cache_dir={root / 'cache'}",
                *extra,
            ],
            storage=storage,
        )
        return steady_trials_per_minute(done), trials_per_minute(done)
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="40 trials a leg, 3 rounds")
    parser.add_argument("--trials", type=int, help="trials a leg (default 12, --full 40)")
    parser.add_argument("--rounds", type=int, help="rounds of both legs (default 2, --full 3)")
    parser.add_argument("--storage", default=PG_URL)
    parser.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs a trial")
    args = parser.parse_args()
    trials = args.trials or (40 if args.full else 12)
    rounds = args.rounds or (3 if args.full else 2)
    quiet()
    root = Path(tempfile.mkdtemp(prefix="squeeze-scaling-"))
    extra = ["space=wide", f"space.finetune.epochs={args.epochs}"]
    leg(root, 1, 2, args.storage, extra)  # untimed warm-up: trains and caches the baseline
    rates: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(rounds):
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            steady, overall = leg(root, workers, trials, args.storage, extra)
            rates[workers].append((steady, overall))
            print(
                f"round {r}: {workers} worker(s)  steady {steady:6.1f} trials/min   "
                f"end to end {overall:6.1f} trials/min",
                flush=True,
            )
    print(
        f"\n{trials} trials a leg of {args.epochs} fine-tuning epochs, {rounds} rounds, "
        "PostgreSQL storage, 1 torch thread a worker"
    )
    for i, label in enumerate(("steady", "end to end")):
        one = statistics.median(r[i] for r in rates[1])
        two = statistics.median(r[i] for r in rates[2])
        print(
            f"{label:>10}: 1 worker {one:6.1f}, 2 workers {two:6.1f} trials/min (median); "
            f"speed-up {two / one:.2f}x"
        )
    print("goal: speed-up >= 1.8x on 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
