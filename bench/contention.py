"""Wall time of the default thread setting next to fixed ones, with 0, 1 and 2 busy processes
beside the sweep.

For each load (0, 1 or 2 processes spinning ``while True: pass`` beside the sweep, started here
and ended after their row; each also ends itself after ``--busy-limit`` seconds), the same short
`squeeze sweep` of `digits_mlp` runs with the default ``threads`` (``auto``), ``threads=1`` and
``threads=2``, in turn (the order alternates by round). Each leg is a fresh study in a folder of
its own; the baseline is cached before the first leg. A row prints each setting's best wall time
(the whole command, as a user waits for it), the threads the default chose, the machine's load
average, and the default's time over the best fixed setting's (goal <= 1.15 in each row).

Other programs on this machine add to the load; the load average is printed with each row.

    python bench/contention.py                  # about 10 minutes on 2 busy cores
    python bench/contention.py --trials 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "threads=1", "threads=2")
GOAL = 1.15
_BUSY = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def sweep(root: Path, name: str, setting: str, trials: int) -> tuple[float, int | None]:
    """Run one `squeeze sweep` in ``root/name``; return its wall time and the threads it used."""
    folder = root / name
    folder.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "search.cli",
        "sweep",
        f"search.n_trials={trials}",
        f"cache_dir={root / 'cache'}",
        "space=wide",
        *([] if setting == "default" else [setting]),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_LOGGING_LEVEL": "WARNING"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    chosen = re.search(r"torch threads: (\d+)", done.stderr)
    return seconds, int(chosen.group(1)) if chosen else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials a sweep (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="legs of each setting (default 2)")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy processes")
    parser.add_argument(
        "--busy-limit", type=float, default=1800.0, help="seconds a busy process lives at most"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="squeeze-contention-"))
    print(
        f"{os.cpu_count()} cores; digits_mlp, {args.trials} trials a sweep, {args.rounds} rounds; "
        f"work in {root}",
        flush=True,
    )
    sweep(root, "warm-up", "threads=1", 1)  # untimed: trains and caches the baseline
    rows = []
    for load in args.loads:
        busy = [
            subprocess.Popen([sys.executable, "-c", _BUSY.format(limit=args.busy_limit)])
            for _ in range(load)
        ]
        try:
            times: dict[str, list[float]] = {s: [] for s in SETTINGS}
            chosen: set[int | None] = set()
            for r in range(args.rounds):
                for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    name = f"busy{load}-r{r}-{setting}"
                    seconds, threads = sweep(root, name, setting, args.trials)
                    times[setting].append(seconds)
                    if setting == "default":
                        chosen.add(threads)
                    print(
                        f"  busy {load}, round {r}: {setting:9s} {seconds:6.1f} s "
                        f"(torch threads {threads})",
                        flush=True,
                    )
            load_average = os.getloadavg()[0]
        finally:
            for process in busy:
                process.kill()
            for process in busy:
                process.wait()
        best = {s: min(t) for s, t in times.items()}
        fixed = min(best["threads=1"], best["threads=2"])
        rows.append((load, best, sorted(chosen, key=str), load_average, best["default"] / fixed))

    print(
        f"\nbest wall time of {args.rounds} sweep(s) of {args.trials} trials (whole command; "
        "baseline cached)"
    )
    print(
        f"{'busy':>4}  {'default':>8}  {'threads=1':>9}  {'threads=2':>9}  {'auto chose':>10}  "
        f"{'load avg':>8}  {'default/best fixed':>18}"
    )
    for load, best, chosen, load_average, ratio in rows:
        mark = "ok" if ratio <= GOAL else "OVER"
        print(
            f"{load:>4}  {best['default']:>7.1f}s  {best['threads=1']:>8.1f}s  "
            f"{best['threads=2']:>8.1f}s  {','.join(map(str, chosen)):>10}  "
            f"{load_average:>8.2f}  {ratio:>15.2f} {mark:>2}"
        )
    print(f"goal: default/best fixed <= {GOAL} in each row")
    return 0 if all(row[-1] <= GOAL for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
