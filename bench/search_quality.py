"""How strong a front a few trials find: the default space and sampler against long runs.

Per task and seed, sweeps from the same cached baseline:

- ``new <sampler>@N``: the default space (``space=default``: structured pruning, then one
  quantizer: per-tensor allocation to a target size, clustering or quantization; warm starts)
  with each sampler of ``--samplers`` (Optuna's GP, the default; TPE multivariate and grouped);
- ``old tpe@N``, ``old tpe@L`` and ``old random@L``: the default as it was before
  (``space=wide``: structured, prune, quantize and distil, every knob searched, no warm starts)
  with plain TPE and random search.

Every complete trial of every run on a task makes the **reference front** (the union of all
points found). Printed per run: hypervolume of (val_acc, log10 size_bytes) over the reference
front's (reference point: 10 points below the baseline, the baseline's size), the best size ratio
among the run's front points within 1 point of the baseline's **test** accuracy, and wall time.

    python bench/search_quality.py                     # digits_mlp and mnist1d_cnn, 3 seeds
    python bench/search_quality.py --tasks digits_mlp --seeds 1 --long 60
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet, reference, sweep  # noqa: E402

from search.run.pareto import hypervolume  # noqa: E402

#: The earlier default: its space with quant as the quantizer, no warm starts (and TPE without
#: multivariate / group).
OLD = ["space=wide", "space.pipeline=[structured,prune,quant,kd]", "search.warm_start=false"]
#: The new default: few dimensions, allocation to a target size, warm starts.
NEW = ["space=default"]
OLD_TPE = [*OLD, "search.sampler=tpe", "++search.sampler_options={multivariate: false}"]


def legs(short: int, long: int, samplers: list[str]) -> list[tuple[str, list[str]]]:
    return [
        *(
            (
                f"new {name}@{short}",
                [*NEW, f"search.sampler={name}", f"search.n_trials={short}"],
            )
            for name in samplers
        ),
        (f"old tpe@{short}", [*OLD_TPE, f"search.n_trials={short}"]),
        (f"old tpe@{long}", [*OLD_TPE, f"search.n_trials={long}"]),
        (f"old random@{long}", [*OLD, "search.sampler=random", f"search.n_trials={long}"]),
    ]


def points(trials) -> list[tuple[float, float]]:
    return [
        (t.user_attrs["metrics"]["val_acc"], math.log10(t.user_attrs["metrics"]["size_bytes"]))
        for t in trials
        if t.state.name == "COMPLETE"
    ]


def wall_seconds(trials) -> float:
    """From the first trial's start to the last one's end (a continued run counts its trials'
    own time, not the time spent reading them)."""
    done = [t for t in trials if t.datetime_complete is not None]
    return (
        max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    ).total_seconds()


def best_within(front, baseline_test: float, drop: float = 1.0) -> float | None:
    ok = front[100.0 * (baseline_test - front.test_acc) <= drop + 1e-9]
    return float(ok.compression_ratio.max()) if len(ok) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_cnn"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--short", type=int, default=30, help="trials of the short runs")
    parser.add_argument("--long", type=int, default=100, help="trials of the long runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--samplers", nargs="+", default=["gp", "tpe"], help="samplers of the new space's runs"
    )
    parser.add_argument(
        "--long-seeds",
        type=int,
        default=None,
        help="run the long legs for the first K seeds only (default: every seed)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the folder of an earlier run to continue: a run whose study is complete is read, "
        "not run again (delete a run's folder to run it anew)",
    )
    args = parser.parse_args()
    quiet()
    root = args.root or Path(tempfile.mkdtemp(prefix="squeeze-search-quality-"))
    print(f"{args.seeds} seed(s), {args.threads} thread(s); runs in {root}", flush=True)
    for task in args.tasks:
        runs = []
        for seed in range(args.seeds):
            for name, overrides in legs(args.short, args.long, args.samplers):
                if name.endswith(f"@{args.long}") and seed >= (args.long_seeds or args.seeds):
                    continue
                folder = root / task / f"{name.replace(' ', '-').replace('@', '')}-s{seed}"
                result, trials = sweep(
                    folder,
                    [
                        f"task={task}",
                        f"seed={seed}",
                        f"threads={args.threads}",
                        f"cache_dir={root / 'cache'}",
                        "measure.latency_repeats=3",
                        *overrides,
                    ],
                )
                seconds = wall_seconds(trials)
                best = best_within(result.front, result.baseline["test_acc"])
                runs.append((name, seed, points(trials), best, seconds, result.baseline))
                shown = "none" if best is None else f"{best:.1f}x"
                print(
                    f"{task} seed {seed} {name}: {seconds:.0f} s, best within 1 test pt {shown}",
                    flush=True,
                )
        baseline = runs[0][5]
        ref = reference(baseline["val_acc"], baseline["size_bytes"])
        union = [p for run in runs for p in run[2]]
        reference_hv = hypervolume(union, reference=ref)
        print(
            f"\n{task}: baseline val {baseline['val_acc']:.4f}, test {baseline['test_acc']:.4f}, "
            f"{baseline['size_bytes']:.0f} B; reference front of {len(union)} points, "
            f"hypervolume {reference_hv:.4f}"
        )
        print(f"{'run':>16} {'seed':>4} {'HV / ref':>9} {'best <=1 test pt':>17} {'wall s':>7}")
        by_leg: dict[str, list[float]] = {}
        for name, seed, pts, best, seconds, _ in runs:
            ratio = hypervolume(pts, reference=ref) / reference_hv if reference_hv else 0.0
            by_leg.setdefault(name, []).append(ratio)
            shown = "none" if best is None else f"{best:.1f}x"
            print(f"{name:>16} {seed:>4} {ratio:>9.3f} {shown:>17} {seconds:>7.0f}")
        for name, ratios in by_leg.items():
            bests = [r[3] or 0.0 for r in runs if r[0] == name]
            print(
                f"{name:>16}  median HV/ref {statistics.median(ratios):.3f}, median best "
                f"{statistics.median(bests):.1f}x"
            )
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
