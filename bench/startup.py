"""How long ``squeeze`` takes to answer before any work: help, and a config error.

Each command runs in a fresh Python process from an empty folder, side by side with
``python -c "import torch"`` (the floor squeeze had before: every answer imported torch). The
commands are taken in turn, round after round, so that a machine whose speed drifts affects them
alike; the median of the rounds is printed, and whether the command imported torch (a separate
run that looks at ``sys.modules``).

    python bench/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: name -> arguments of ``squeeze``; a config error exits 2 before any work.
COMMANDS = {
    "squeeze --help": ["--help"],
    "squeeze sweep --help": ["sweep", "--help"],
    "typo: sweep serch.n_trials=3": ["sweep", "serch.n_trials=3"],
    "bad value: sweep search.n_jobs=0": ["sweep", "search.n_jobs=0"],
    "bad space value: sweep space.prune.amount=1.5": ["sweep", "space.prune.amount=1.5"],
}
TORCH = "python -c 'import torch'"

_LOOK = """
import sys
from search.cli import main
try:
    main({args!r})
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""


def _squeeze(args: list[str]) -> list[str]:
    """The installed console script, else the same import of `search.cli.main`."""
    script = Path(sys.executable).with_name("squeeze")
    if script.exists():
        return [str(script), *args]
    return [
        sys.executable,
        "-c",
        "import sys; from search.cli import main; sys.exit(main())",
        *args,
    ]


def _time(command: list[str], folder: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, capture_output=True, check=False)
    return time.perf_counter() - start


def _imports_torch(args: list[str], folder: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", _LOOK.format(args=args)], cwd=folder, capture_output=True, text=True
    )
    return done.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    legs = {name: _squeeze(args) for name, args in COMMANDS.items()}
    legs[TORCH] = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {name: [] for name in legs}
    with tempfile.TemporaryDirectory(prefix="squeeze-startup-") as folder:
        for command in legs.values():  # warm the file cache once, untimed
            _time(command, folder)
        for i in range(rounds):
            order = list(legs) if i % 2 == 0 else list(legs)[::-1]
            for name in order:
                times[name].append(_time(legs[name], folder))
        torch_in = {name: _imports_torch(args, folder) for name, args in COMMANDS.items()}
    floor = statistics.median(times[TORCH])
    print(f"median of {rounds} rounds, taken in turn; each in a fresh process")
    print(f"{'command':48s} {'seconds':>8s} {'vs import torch':>16s}  imports torch")
    for name in legs:
        median = statistics.median(times[name])
        imported = "" if name == TORCH else ("yes" if torch_in[name] else "no")
        print(f"{name:48s} {median:8.2f} {median / floor:15.2f}x  {imported}")


if __name__ == "__main__":
    main()
