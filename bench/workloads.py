"""What reading data through torch's own types costs, and what a split of several GB needs.

1. The same digits sweep (same trials, seeds and space) with the data in memory (`Split`), as
   `TensorDataset`s through torch's DataLoader, and as a per-sample `Dataset` of a user's,
   run in turn for a few rounds after each leg's baseline is cached; it prints each leg's wall
   time over the in-memory leg's (goal: the DataLoader path <= 1.10x).
2. A task whose training split is several GB on disk (written once, in chunks) and read batch by
   batch by a loader factory: a short sweep runs in a child process, which reports its peak RSS;
   it prints that beside the split's size and the model's bytes (goal: the model's working set
   plus a few batches, not the split).

    python bench/workloads.py                  # 8 trials x 2 rounds, a 4 GB split
    python bench/workloads.py --trials 4 --rounds 1 --samples 250000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import quiet, sweep  # noqa: E402

LEGS = ("digits_memory", "digits_tensor_dataset", "digits_per_sample")


def _write_conf(folder: Path) -> Path:
    conf = folder / "conf" / "task"
    conf.mkdir(parents=True, exist_ok=True)
    for leg in LEGS:
        (conf / f"{leg}.yaml").write_text(
            f"_target_: workload_tasks.{leg}\nname: {leg}\nhidden: [300, 100]\n"
            "train:\n  epochs: 40\n"
        )
    (conf / "large_on_disk.yaml").write_text(
        "_target_: workload_tasks.large_on_disk\nname: large_on_disk\npath: ''\nsamples: 1000\n"
    )
    return folder / "conf"


def _overrides(cache: Path, task: str, trials: int) -> list[str]:
    return [
        f"task={task}",
        f"cache_dir={cache}",
        f"search.n_trials={trials}",
        "search.sampler=tpe",
        "threads=1",
        "measure.latency_repeats=5",
        "search.warm_start=false",
    ]


def loader_overhead(root: Path, *, trials: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of the same sweep per leg, legs in turn, baselines cached beforehand."""
    conf = _write_conf(root)
    cache = root / "cache"
    for leg in LEGS:  # train each leg's baseline once, untimed
        sweep(root / f"warm-{leg}", _overrides(cache, leg, 1), config_dirs=[conf])
    times: dict[str, list[float]] = {leg: [] for leg in LEGS}
    accs: dict[str, list[float]] = {leg: [] for leg in LEGS}
    for r in range(rounds):
        for leg in LEGS if r % 2 == 0 else LEGS[::-1]:
            start = time.perf_counter()
            _, trials_done = sweep(
                root / f"r{r}-{leg}", _overrides(cache, leg, trials), config_dirs=[conf]
            )
            times[leg].append(time.perf_counter() - start)
            accs[leg] = [t.user_attrs["metrics"]["val_acc"] for t in trials_done]
    for leg in LEGS:
        print(f"  {leg}: val_acc of its trials {[round(a, 4) for a in accs[leg]]}")
    return times


def large_child(root: Path, samples: int, trials: int) -> None:
    """In a child process: a short sweep on the on-disk task; print peak RSS as JSON."""
    quiet()
    conf = _write_conf(root)
    data = root / "large.f32"
    overrides = [
        "task=large_on_disk",
        f"task.path={data}",
        f"task.samples={samples}",
        f"cache_dir={root / 'cache'}",
        f"search.n_trials={trials}",
        "threads=1",
        "space.finetune.epochs=1",
        "space.finetune.batch_size=512",
        "measure.latency_repeats=3",
        "measure.latency_batch_sizes=[1,32]",
    ]
    import torch  # noqa: F401 - what every sweep process holds before it reads any data

    import search.run.study  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    sweep(root / "large", overrides, config_dirs=[conf])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "before": before, "seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1_000_000, help="rows of 4 KB on disk")
    parser.add_argument("--large-trials", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        large_child(Path(args.child), args.samples, args.large_trials)
        return
    quiet()
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-workloads-") as tmp:
        root = Path(tmp)
        print(f"1. the same {args.trials}-trial digits sweep per data path, {args.rounds} rounds:")
        times = loader_overhead(root, trials=args.trials, rounds=args.rounds)
        base = statistics.median(times["digits_memory"])
        for leg in LEGS:
            median = statistics.median(times[leg])
            print(f"  {leg:24s} {median:7.1f} s  {median / base:5.2f}x the in-memory path")

        print(f"\n2. a training split of {args.samples:,} x 4 KB on disk, read batch by batch:")
        env = {**os.environ, "PYTHONPATH": f"{HERE.parent}:{HERE}"}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(root),
                "--samples",
                str(args.samples),
                "--large-trials",
                str(args.large_trials),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        child = json.loads(out.stdout.strip().splitlines()[-1])
        split = args.samples * 4 * 1024
        model = (1024 * 256 + 256 + 256 * 10 + 10) * 4
        batch = 512 * 4 * 1024
        rss, before = child["peak_rss"], child["before"]
        grown = rss - before
        print(f"  split on disk  {split / 2**30:6.2f} GB")
        print(f"  model (fp32)   {model / 2**20:6.2f} MB; a training batch {batch / 2**20:.1f} MB")
        print(
            f"  peak RSS       {rss / 2**20:6.0f} MB, of which {before / 2**20:.0f} MB before "
            "the sweep (Python, torch, MLflow, Optuna imported)"
        )
        print(
            f"  grown by       {grown / 2**20:6.0f} MB = {grown / split:.4f}x the split, "
            f"{grown / (model + batch):.0f}x the model + one batch "
            f"(sweep {child['seconds']:.0f} s, {args.large_trials} trials)"
        )


if __name__ == "__main__":
    main()
