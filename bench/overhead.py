"""What squeeze's orchestration costs: the same trials through `squeeze` and through a bare loop.

Both legs run the same N trials of `digits_mlp` (same sampler and seed, same recipes, same
epochs, same compressors, same packed-file size objective) from the same cached baseline:

- squeeze: `search.run_sweep` with its defaults (journal-file Optuna storage, MLflow tracking
  to SQLite with a child run per trial, model artifacts, Pareto CSV/plot, test accuracy of the
  front);
- bare: a hand-written `optuna.optimize` loop in memory, with no tracking.

The legs alternate (bare, squeeze, bare, squeeze, ...) after an untimed warm-up of each, so drift hits
both alike, and the script checks that both legs produced the same trials. It prints the ratio
of the median wall times (the goal), the median of the per-pair ratios, and the same for the
process CPU time, which other programs on the machine disturb less.

    python bench/overhead.py [--trials 20] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from compressors import CompressionContext, get_compressor, save_packed
from compressors.kd import distillation_loss
from experiments import evaluate, fit, load_or_train_baseline
from search import compose_config, run_sweep
from search.study import make_sampler
from search.tracking import Tracker


def bare_loop(cfg, n_trials: int, workdir: Path) -> tuple[float, list]:
    """The loop a user would write by hand: optuna + torch, no tracking, in-memory study."""
    task_cfg = {k: v for k, v in dict(cfg.task).items() if k != "_target_"}
    from experiments.digits import digits_mlp

    start, cpu = time.perf_counter(), time.process_time()
    task = digits_mlp(**task_cfg, seed=cfg.seed)
    baseline = load_or_train_baseline(task, config={**task_cfg, "seed": cfg.seed},
                                      cache_dir=cfg.cache_dir, seed=cfg.seed)
    baseline_size = save_packed(baseline.model, workdir / "baseline.sqz")

    def objective(trial: optuna.Trial):
        amount = trial.suggest_float("prune.amount", 0.3, 0.98)
        scope = trial.suggest_categorical("prune.scope", ["global", "layer"])
        bits = trial.suggest_int("quant.bits", 2, 8)
        temperature = trial.suggest_float("kd.temperature", 1.0, 8.0)
        alpha = trial.suggest_float("kd.alpha", 0.0, 1.0)
        lr = trial.suggest_float("finetune.lr", 3e-4, 1e-2, log=True)
        seed = cfg.seed + trial.number
        torch.manual_seed(seed)
        model = copy.deepcopy(baseline.model)
        ctx = CompressionContext(train=task.train, teacher_logits=baseline.teacher_logits)
        model = get_compressor("prune")(amount=amount, scope=scope).compress(model, ctx)
        model = get_compressor("quant")(bits=bits).compress(model, ctx)

        def loss(s, y, t):
            return distillation_loss(s, y, t, temperature=temperature, alpha=alpha)

        fit(model, task.train, epochs=cfg.space.finetune.epochs, batch_size=64, lr=lr,
            loss_fn=loss, teacher_logits=baseline.teacher_logits, val=task.val, seed=seed)
        size = save_packed(model, workdir / f"trial-{trial.number}.sqz")
        return evaluate(model, task.val), size / baseline_size * baseline_size

    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_sampler(cfg.search.sampler, seed=cfg.seed, options={}),
    )
    study.optimize(objective, n_trials=n_trials)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, [(t.params, t.values) for t in study.trials]


def squeeze_leg(overrides: list[str]) -> tuple[float, float, list]:
    cfg = compose_config(overrides)
    Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # the database exists, as after a 1st sweep
    start, cpu = time.perf_counter(), time.process_time()
    result = run_sweep(cfg)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    trials = result.trials.sort_values("trial")
    study = optuna.load_study(study_name=cfg.search.study_name,
                              storage=optuna.storages.journal.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(cfg.search.storage)))
    return elapsed, cpu, [(t.params, t.values) for t in study.trials] if len(trials) else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in both legs (1: least disturbed by other programs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="squeeze-overhead-"))
    cache = root / "cache"
    base = [f"cache_dir={cache}", f"search.n_trials={args.trials}", f"threads={args.threads}"]
    # Warm the baseline cache once, so neither leg trains it.
    cfg = compose_config(base)
    from experiments.digits import digits_mlp

    task_cfg = {k: v for k, v in dict(cfg.task).items() if k != "_target_"}
    load_or_train_baseline(digits_mlp(**task_cfg, seed=cfg.seed),
                           config={**task_cfg, "seed": cfg.seed}, cache_dir=cache, seed=cfg.seed)

    # One untimed run of each leg: the first autograd, SQL statement compilation and font
    # loading in a process are one-time costs that would land on whichever leg ran first.
    warm = root / "warmup"
    (warm / "bare").mkdir(parents=True)
    bare_loop(cfg, 2, warm / "bare")
    squeeze_leg([*base[:-2], "search.n_trials=2", f"search.storage={warm}/optuna.journal",
                 f"tracking.uri=sqlite:///{warm}/mlflow.db", f"output_dir={warm}/trials"])

    wall: dict[str, list[float]] = {"bare": [], "squeeze": []}
    cpu: dict[str, list[float]] = {"bare": [], "squeeze": []}
    same = True
    for r in range(args.repeats):
        work = root / f"run{r}"
        (work / "bare").mkdir(parents=True)
        bare_s, bare_cpu, bare_trials = bare_loop(cfg, args.trials, work / "bare")
        squeeze_s, squeeze_cpu, squeeze_trials = squeeze_leg(
            [*base, f"search.storage={work}/optuna.journal",
             f"tracking.uri=sqlite:///{work}/mlflow.db", f"output_dir={work}/trials"],
        )
        same &= _same(bare_trials, squeeze_trials)
        for leg, w, c in (("bare", bare_s, bare_cpu), ("squeeze", squeeze_s, squeeze_cpu)):
            wall[leg].append(w)
            cpu[leg].append(c)
        print(f"run {r}: wall bare {bare_s:6.2f} s  squeeze {squeeze_s:6.2f} s  "
              f"ratio {squeeze_s / bare_s:.3f}   cpu ratio {squeeze_cpu / bare_cpu:.3f}", flush=True)

    med = statistics.median
    ratio = med(wall["squeeze"]) / med(wall["bare"])
    pairs = med([s / b for s, b in zip(wall["squeeze"], wall["bare"], strict=True)])
    cpu_ratio = med(cpu["squeeze"]) / med(cpu["bare"])
    print(f"\n{args.trials} trials of digits_mlp, {torch.get_num_threads()} torch threads, "
          f"{args.repeats} alternating runs per leg")
    print(f"same trials in both legs (params and objective values): {'yes' if same else 'NO'}")
    print(f"median wall time: bare {med(wall['bare']):.2f} s, squeeze {med(wall['squeeze']):.2f} s")
    print(f"median of per-run wall ratios: {pairs:.3f}")
    print(f"median CPU time ratio squeeze / bare: {cpu_ratio:.3f}")
    print(f"overhead ratio squeeze / bare (median wall): {ratio:.3f}  (goal <= 1.05)")
    return 0 if same else 1


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (pa, va), (pb, vb) in zip(a, b, strict=True):
        if pa != pb or [round(x, 9) for x in va] != [round(x, 9) for x in vb]:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
