"""Front quality against fine-tuning epochs spent: full fine-tunes only against screening.

Per task and seed, sweeps of the default space (``space.finetune.epochs=15``) from one cached
baseline:

- ``full@N``: today's default, ``N`` trials of full fine-tunes (``N x 15`` epochs); its first
  ``K`` trials are also read as ``full@K`` (what it had found after ``K x 15`` epochs);
- ``screenS@E``: ``search.screen_epochs=S``, ``search.n_epochs=E`` (trials unlimited), the
  promotion rule with ``search.promote_margin`` (``+mM`` in the name when not 0) and
  ``search.promote_after`` (``+aK``).

Printed per run: fine-tuning epochs charged, screens and full fine-tunes, hypervolume of the
full-fidelity points' (val_acc, log10 size_bytes) (reference: 10 points below the baseline, the
baseline's size), the best size ratio among the front's points within 1 point of the baseline's
**test** accuracy, and wall time.

    python bench/fidelity.py --seeds 1
    python bench/fidelity.py --tasks digits_mlp --legs full@30 screen2@150 screen2@150+m0.02
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet, reference, sweep  # noqa: E402
from search_quality import best_within, wall_seconds  # noqa: E402

from search.config.fidelity import EPOCHS_ATTR, is_screened  # noqa: E402
from search.run.pareto import hypervolume  # noqa: E402

EPOCHS = 15  # the default space's fine-tune
LEG = re.compile(r"(full|screen(\d+))@(\d+)(?:\+m([0-9.]+))?(?:\+a(\d+))?")


def overrides(leg: str) -> list[str]:
    """The sweep overrides of a leg's name (`LEG`)."""
    kind, screen, amount, margin, after = LEG.fullmatch(leg).groups()
    if kind == "full":
        return [f"search.n_trials={amount}"]
    return [
        "search.n_trials=100000",
        f"search.n_epochs={amount}",
        f"search.screen_epochs={screen}",
        f"search.promote_margin={margin or 0}",
        f"search.promote_after={after or 0}",
    ]


def full_points(trials) -> list[tuple[float, float]]:
    """(val_acc, log10 size) of the complete full-fidelity trials."""
    return [
        (t.user_attrs["metrics"]["val_acc"], math.log10(t.user_attrs["metrics"]["size_bytes"]))
        for t in trials
        if t.state.name == "COMPLETE" and not is_screened(t)
    ]


def charged(trials) -> int:
    """Epochs charged (full fine-tunes without the attribute: 15 each)."""
    return sum(int(t.user_attrs.get(EPOCHS_ATTR, EPOCHS)) for t in trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--legs", nargs="+", default=["full@30", "screen2@150", "screen2@450"])
    parser.add_argument("--prefix", type=int, default=10, help="read full@N's first K trials too")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    quiet()
    root = args.root or Path(tempfile.mkdtemp(prefix="squeeze-fidelity-"))
    print(f"{args.seeds} seed(s); runs in {root}", flush=True)
    for task in args.tasks:
        for seed in range(args.seeds):
            for leg in args.legs:
                result, trials = sweep(
                    root / task / f"{leg}-s{seed}",
                    [
                        f"task={task}",
                        f"seed={seed}",
                        f"threads={args.threads}",
                        f"cache_dir={root / 'cache'}",
                        "measure.latency_repeats=3",
                        *overrides(leg),
                    ],
                )
                ref = reference(result.baseline["val_acc"], result.baseline["size_bytes"])
                rows = [(leg, trials, result.front)]
                if leg.startswith("full@"):
                    first = sorted(trials, key=lambda t: t.number)[: args.prefix]
                    rows.append((f"full@{args.prefix} (prefix)", first, None))
                for name, part, front in rows:
                    screens = sum(is_screened(t) for t in part)
                    best = (
                        None if front is None else best_within(front, result.baseline["test_acc"])
                    )
                    print(
                        f"{task} seed {seed} {name}: epochs {charged(part)}, {screens} screens, "
                        f"{len(part) - screens} full, hypervolume "
                        f"{hypervolume(full_points(part), reference=ref):.4f}, best within 1 "
                        f"test pt {'-' if best is None else f'{best:.1f}x'}, "
                        f"{wall_seconds(part):.0f} s",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
