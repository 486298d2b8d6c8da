"""Front quality against fine-tuning epochs spent: today's full fine-tunes against screening.

Per task and seed, sweeps of the task's own space (``digits_mlp`` and ``mnist1d_cnn``: the default
space with warm starts of their own, 15-epoch fine-tunes; ``minilm_topics``: its space, 3 epochs)
from one cached baseline.
Budgets are in **full fine-tunes** (``ft``: ``space.finetune.epochs`` of the task), so one leg
means the same on every task. A leg is ``KIND@N[+mM][+aK][:override,override...]``:

- ``full@N``: today's default, ``N`` trials of full fine-tunes (``N`` fine-tunes' epochs);
- ``screenS@N``: ``search.screen_epochs=S``, ``search.n_epochs`` = ``N`` fine-tunes' epochs
  (trials unlimited); ``+mM``: ``search.promote_margin=M``, ``+aK``: ``search.promote_after=K``;
  ``@Nft`` reads the same as ``@N``;
- after ``:``, sweep overrides of the leg's own, comma-separated (commas inside brackets or
  quotes stay), e.g. ``screen2@10+a10:search.warm_start=predicted``, ``screen2@10:search.plateau=3``
  (promotions stop on a plateau), ``full@10:search.n_trials=100000,search.n_epochs=150,
  search.plateau=3`` (full fine-tunes that stop on a plateau, 150 epochs; written on one line),
  ``screen2@10:+search.sampler_options.n_startup_trials=5`` (``+``: a key the config lacks).

Printed per run, after each milestone of epochs spent (``--milestones``, in fine-tunes, trials in
the order they finished; screens count their epochs): the hypervolume of the full-fidelity
points' (val_acc, log10 size_bytes) (reference: 10 points below the baseline, the baseline's
size), and the best size ratio among those points' front within 1 point of the baseline's
**test** score; then the epochs charged, screens and full fine-tunes, and wall time (first trial's
start to last trial's end). A markdown table per task follows, and per leg whether its
hypervolume at the first milestone reaches ``full@N``'s at its end, seed by seed.

    python bench/search_cost.py                                  # 3 tasks, 3 seeds, 4 legs
    python bench/search_cost.py --tasks minilm_topics --seeds 1 --legs full@10 screen1@10
    python bench/search_cost.py --root /tmp/cost    # continue: complete studies are read
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet, reference, sweep  # noqa: E402
from search_quality import best_within, wall_seconds  # noqa: E402

from search import ConfigError, compose_config  # noqa: E402
from search.config.fidelity import EPOCHS_ATTR, is_screened  # noqa: E402
from search.config.score import dominates  # noqa: E402
from search.run.pareto import hypervolume  # noqa: E402

TASKS = ["digits_mlp", "mnist1d_cnn", "minilm_topics"]
#: Today's default; screening at a third of its epochs and at all of them; the predicted first
#: front, screened, at a third.
LEGS = ["full@30", "screen2@10", "screen2@30", "screen2@10:search.warm_start=predicted"]
MILESTONES = [10, 20, 30]
_KIND = re.compile(r"(full|screen(\d+))@(\d+)(?:ft)?(?:\+m([0-9.]+))?(?:\+a(\d+))?")


@dataclass(frozen=True)
class Leg:
    """One sweep setting of the bench: its name, budget in fine-tunes and sweep overrides.

    Attributes:
        name: As given (``screen2@10+a10:search.warm_start=predicted``).
        fine_tunes: The budget, in full fine-tunes.
        screen_epochs: ``search.screen_epochs`` (0: full fine-tunes only).
        margin: ``search.promote_margin``.
        after: ``search.promote_after``.
        extra: The leg's own overrides (after ``:``).
    """

    name: str
    fine_tunes: int
    screen_epochs: int = 0
    margin: float = 0.0
    after: int = 0
    extra: tuple[str, ...] = ()

    def overrides(self, full_epochs: int) -> list[str]:
        """The sweep overrides, for a task whose full fine-tune runs ``full_epochs`` epochs."""
        if not self.screen_epochs:
            return [f"search.n_trials={self.fine_tunes}", *self.extra]
        return [
            "search.n_trials=100000",
            f"search.n_epochs={self.fine_tunes * full_epochs}",
            f"search.screen_epochs={self.screen_epochs}",
            f"search.promote_margin={self.margin:g}",
            f"search.promote_after={self.after}",
            *self.extra,
        ]

    @property
    def folder(self) -> str:
        """The leg's name as a folder name (a long one cut, with a hash of the whole name)."""
        name = re.sub(r"[^A-Za-z0-9@+._-]", "_", self.name)
        if len(name) <= 120:
            return name
        return f"{name[:100]}-{hashlib.sha1(self.name.encode()).hexdigest()[:12]}"


def parse_leg(text: str) -> Leg:
    """The `Leg` of ``text`` (the module's docstring); ValueError naming the form otherwise."""
    head, _, tail = text.partition(":")
    match = _KIND.fullmatch(head)
    if match is None:
        raise ValueError(
            f"leg {text!r}: expected full@N or screenS@N[+mM][+aK], then optionally "
            f":override,override (N in full fine-tunes), e.g. full@30, screen2@10+a10, "
            f"screen2@10:search.warm_start=predicted"
        )
    kind, screen, amount, margin, after = match.groups()
    extra = tuple(split_overrides(tail))
    if kind == "full" and (margin or after):
        raise ValueError(f"leg {text!r}: +m and +a apply to screenS@N legs only")
    return Leg(text, int(amount), int(screen or 0), float(margin or 0), int(after or 0), extra)


def split_overrides(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def charged(trial, full_epochs: int) -> int:
    """The epochs ``trial`` was charged (a full fine-tune without the attribute: all of them)."""
    return int(trial.user_attrs.get(EPOCHS_ATTR, full_epochs))


def spent_by(trials, epochs: int, full_epochs: int) -> list:
    """The finished trials, in the order they finished, while their epochs add up to at most
    ``epochs``."""
    done = sorted(
        (t for t in trials if t.state.is_finished() and t.datetime_complete),
        key=lambda t: (t.datetime_complete, t.number),
    )
    out, total = [], 0
    for t in done:
        total += charged(t, full_epochs)
        if total > epochs:
            break
        out.append(t)
    return out


def full_points(trials) -> list:
    """The complete full-fidelity trials."""
    return [t for t in trials if t.state.name == "COMPLETE" and not is_screened(t)]


def point(trial) -> tuple[float, float]:
    """(val_acc, log10 size_bytes) of a complete trial."""
    metrics = trial.user_attrs["metrics"]
    return metrics["val_acc"], math.log10(metrics["size_bytes"])


def front_of(trials, *, higher_is_better: bool = True) -> list:
    """The full-fidelity trials no other one dominates in (val_acc, size_bytes)."""
    full = full_points(trials)
    directions = ["maximize" if higher_is_better else "minimize", "minimize"]
    values = {t.number: point(t) for t in full}
    return [
        t
        for t in full
        if not any(dominates(values[o.number], values[t.number], directions) for o in full)
    ]


def curve(trials, marks, *, full_epochs, ref, test_score, baseline_test):
    """``[(fine-tunes, hypervolume, best within 1 test point or None)]`` after ``marks`` (in
    fine-tunes: what the trials that finished within that many fine-tunes' epochs found) and,
    last, at the end; ``test_score(trial)``: a full-fidelity trial's test score."""
    end = sum(charged(t, full_epochs) for t in trials if t.state.is_finished())
    out = []
    for ft in [*marks, end / full_epochs]:
        part = spent_by(trials, round(ft * full_epochs), full_epochs)
        hv = hypervolume([point(t) for t in full_points(part)], reference=ref)
        front = front_of(part)
        frame = pd.DataFrame(
            {
                "test_acc": [test_score(t) for t in front],
                "compression_ratio": [t.user_attrs["metrics"]["compression_ratio"] for t in front],
            }
        )
        out.append((ft, hv, best_within(frame, baseline_test)))
    return out


def test_scores(result, folder: Path, cfg):
    """``test_score(trial)`` for a run: from its front, else its packed file on the test split
    (a trial on the front at an earlier milestone, not at the end)."""
    from mlflow.tracking import MlflowClient

    from experiments import evaluate
    from search.config.plan import plan_sweep
    from search.run.pareto import trial_model
    from search.run.workload import build_task

    known = dict(zip(result.front.trial, result.front.test_acc, strict=True))
    run_ids = dict(zip(result.trials.trial, result.trials.mlflow_run_id, strict=True))
    task = None

    def test_score(trial) -> float:
        nonlocal task
        if trial.number not in known:
            task = task or build_task(plan_sweep(cfg, connect=False))
            client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
            model = trial_model(
                folder / "trials",
                result.study_name,
                trial.number,
                run_ids[trial.number],
                client,
                task.build_model,
            )
            known[trial.number] = evaluate(model, task.test)
        return known[trial.number]

    return test_score


def _ratio(best: float | None) -> str:
    return "-" if best is None else f"{best:.1f}x"


def run_leg(root: Path, task: str, seed: int, leg: Leg, args) -> dict:
    """One sweep of the bench (read, not rerun, when its study is complete) and its figures."""
    folder = root / task / f"{leg.folder}-s{seed}"
    common = [
        f"task={task}",
        f"seed={seed}",
        f"threads={args.threads}",
        f"cache_dir={root / 'cache'}",
        "measure.latency_repeats=3",
    ]
    full_epochs = int(compose_config([*common]).space.finetune.epochs)
    overrides = [*common, *leg.overrides(full_epochs)]
    result, trials = sweep(folder, overrides)
    if not result.score.higher_is_better:
        raise SystemExit(f"{task}: a lower-is-better score; this bench's reference assumes higher")
    ref = reference(result.baseline["val_acc"], result.baseline["size_bytes"])
    cfg = compose_config([f"output_dir={folder}/trials", *overrides])
    points = curve(
        trials,
        [m for m in args.milestones if m <= leg.fine_tunes],
        full_epochs=full_epochs,
        ref=ref,
        test_score=test_scores(result, folder, cfg),
        baseline_test=result.baseline["test_acc"],
    )
    done = [t for t in trials if t.state.is_finished()]
    screens = sum(is_screened(t) for t in done)
    row = {
        "task": task,
        "seed": seed,
        "leg": leg.name,
        "epochs": sum(charged(t, full_epochs) for t in done),
        "full_epochs": full_epochs,
        "screens": screens,
        "full": len(done) - screens,
        "curve": points,
        "wall_s": wall_seconds(trials),
    }
    marks = [f"@{ft:g}ft HV {hv:.4f} best {_ratio(b)}" for ft, hv, b in points[:-1]]
    marks.append(f"end HV {points[-1][1]:.4f} best {_ratio(points[-1][2])}")
    print(
        f"{task} seed {seed} {leg.name}: {row['epochs']} epochs ({full_epochs}/fine-tune), "
        f"{screens} screens, {row['full']} full; {'; '.join(marks)}; {row['wall_s']:.0f} s",
        flush=True,
    )
    return row


def at(row: dict, fine_tunes: int) -> tuple[float, float | None] | None:
    """(hypervolume, best) of ``row``'s curve after ``fine_tunes`` (None: past its budget)."""
    marks = row["curve"][:-1]  # the last point is the end
    return next(((hv, best) for ft, hv, best in marks if ft == fine_tunes), None)


def table(rows: list[dict], milestones: list[int]) -> str:
    """A markdown table of one task's runs: hypervolume after each milestone and at the end,
    the best ratio within 1 test point at the first milestone and at the end."""
    head = ["leg", "seed", "epochs", "screens / full"]
    head += [f"HV @{m}ft" for m in milestones] + ["HV end"]
    head += [f"best ≤1 test pt @{milestones[0]}ft", "best (end)", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['leg']}`", str(r["seed"]), str(r["epochs"]), f"{r['screens']} / {r['full']}"]
        cells += ["" if at(r, m) is None else f"{at(r, m)[0]:.4f}" for m in milestones]
        first = at(r, milestones[0])
        _, hv, best = r["curve"][-1]
        cells += [f"{hv:.4f}", "" if first is None else _ratio(first[1]), _ratio(best)]
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal(rows: list[dict], first: int) -> list[str]:
    """Per leg: on which seeds its hypervolume after ``first`` fine-tunes reaches the end
    hypervolume of the ``full@N`` run with the largest ``N`` (the issue's goal)."""
    full = [r for r in rows if parse_leg(r["leg"]).screen_epochs == 0]
    if not full:
        return []
    most = max(parse_leg(r["leg"]).fine_tunes for r in full)
    longest = [r for r in full if parse_leg(r["leg"]).fine_tunes == most]
    target = {r["seed"]: r["curve"][-1][1] for r in longest}
    out = []
    for name in dict.fromkeys(r["leg"] for r in rows if r not in longest):
        got = [(r["seed"], at(r, first)) for r in rows if r["leg"] == name and r["seed"] in target]
        got = [(seed, value[0]) for seed, value in got if value is not None]
        if not got:
            continue
        wins = sum(hv >= target[seed] for seed, hv in got)
        each = "; ".join(f"seed {seed} {hv:.4f} vs {target[seed]:.4f}" for seed, hv in got)
        out.append(
            f"`{name}` HV @{first}ft >= `full@{most}` at its end: {wins}/{len(got)} ({each})"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--legs", nargs="+", default=LEGS, help="see the module's docstring")
    parser.add_argument(
        "--milestones", type=int, nargs="+", default=MILESTONES, help="in full fine-tunes"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the folder of an earlier run to continue: a complete study is read, not rerun",
    )
    args = parser.parse_args()
    try:
        legs = [parse_leg(text) for text in args.legs]
    except ValueError as err:
        parser.error(str(err))
    quiet()
    logging.getLogger("compressors").setLevel(logging.ERROR)  # allocate's "cannot fit" notes
    root = args.root or Path(tempfile.mkdtemp(prefix="squeeze-search-cost-"))
    print(f"seeds {args.seeds}, {args.threads} thread(s); runs in {root}", flush=True)
    for task in args.tasks:
        rows = []
        for seed in args.seeds:
            for leg in legs:
                try:
                    rows.append(run_leg(root, task, seed, leg, args))
                except ConfigError as err:  # a leg the task's space cannot run, say
                    print(f"{task} seed {seed} {leg.name}: not run: {err}", flush=True)
        if not rows:
            continue
        print(f"\n{task}\n\n{table(rows, args.milestones)}\n", flush=True)
        for line in goal(rows, min(args.milestones)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
