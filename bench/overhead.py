"""What squeeze's orchestration costs: the same trials through `squeeze` and a bare loop.

Both legs run the same N trials of `digits_mlp` (same sampler and seed, same recipes, same
epochs, same compressors, same packed-file size objective) from the same cached baseline:

- squeeze: `search.run_sweep` with its defaults (journal-file Optuna storage, MLflow tracking to
  SQLite with a child run per trial, model artifacts, the reloaded model's metrics, test
  accuracy of the front, Pareto CSV and plot);
- bare: the loop a user would write by hand, torch + an in-memory Optuna study, no tracking.

This machine's speed drifts by 20% over tens of seconds, more than the overhead to be measured,
so the legs are interleaved trial by trial: after each squeeze trial (an Optuna callback), the
bare loop runs its trial of the same number, timed on its own. squeeze's time is the whole sweep
minus the bare trials inside it; the bare loop's is its trials plus its own setup (task, cached
baseline, baseline file). Both legs must produce the same trials (params and objective values).

    python bench/overhead.py [--trials 20] [--repeats 3] [--threads 1]
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
from experiments import evaluate, fit
from search import compose_config, run_sweep
from search.config.plan import make_sampler
from search.config.storage import open_storage
from search.run.tracking import Tracker
from search.run.workload import load_workload


class BareLoop:
    """A hand-written optuna + torch loop, one trial per call, timed."""

    def __init__(self, cfg, workdir: Path) -> None:
        start = time.perf_counter()
        workload = load_workload(cfg)  # the same cached baseline as the sweep's
        self.task, self.baseline = workload.task, workload.baseline
        save_packed(self.baseline.model, workdir / "baseline.sqz")
        self.cfg, self.workdir = cfg, workdir
        self.study = optuna.create_study(
            directions=["maximize", "minimize"],
            sampler=make_sampler(cfg.search.sampler, seed=cfg.seed, options={}),
        )
        self.seconds = time.perf_counter() - start

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        channels = trial.suggest_float("structured.amount", 0.0, 0.85)
        amount = trial.suggest_float("prune.amount", 0.0, 0.95)
        scope = trial.suggest_categorical("prune.scope", ["global", "layer"])
        bits = trial.suggest_int("quant.bits", 2, 8)
        temperature = trial.suggest_float("kd.temperature", 1.0, 8.0)
        alpha = trial.suggest_float("kd.alpha", 0.0, 1.0)
        lr = trial.suggest_float("finetune.lr", 3e-4, 1e-2, log=True)
        seed = self.cfg.seed + trial.number
        torch.manual_seed(seed)
        model = copy.deepcopy(self.baseline.model)
        ctx = CompressionContext(
            train=self.task.train,
            teacher_outputs=self.baseline.teacher_outputs,
            example_inputs=self.task.example_inputs(),
            seed=seed,
        )
        model = get_compressor("structured")(amount=channels).compress(model, ctx)
        model = get_compressor("prune")(amount=amount, scope=scope).compress(model, ctx)
        model = get_compressor("quant")(bits=bits).compress(model, ctx)

        def loss(s, y, t):
            return distillation_loss(s, y, t, temperature=temperature, alpha=alpha)

        fit(
            model,
            self.task.train,
            epochs=self.cfg.space.finetune.epochs,
            batch_size=64,
            lr=lr,
            loss_fn=loss,
            teacher_outputs=self.baseline.teacher_outputs,
            val=self.task.val,
            seed=seed,
        )
        size = save_packed(model, self.workdir / f"trial-{trial.number}.sqz")
        return evaluate(model, self.task.val), float(size)

    def run_one(self) -> None:
        start = time.perf_counter()
        self.study.optimize(self.objective, n_trials=1)
        self.seconds += time.perf_counter() - start


def interleaved_run(base: list[str], workdir: Path) -> tuple[float, float, bool]:
    """One squeeze sweep with the bare loop's trials interleaved; returns (squeeze s, bare s)."""
    overrides = [
        *base,
        f"search.storage={workdir}/optuna.journal",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        f"output_dir={workdir}/trials",
    ]
    cfg = compose_config(overrides)
    Tracker(cfg.tracking.uri, cfg.tracking.mlflow_experiment).close()  # DB as after a 1st sweep
    (workdir / "bare").mkdir(parents=True)
    bare = BareLoop(cfg, workdir / "bare")
    inside = 0.0

    def after_squeeze_trial(study, trial):
        nonlocal inside
        start = time.perf_counter()
        bare.run_one()
        inside += time.perf_counter() - start

    start = time.perf_counter()
    run_sweep(cfg, callbacks=[after_squeeze_trial])
    squeeze_s = time.perf_counter() - start - inside

    squeeze_trials = optuna.load_study(
        study_name=cfg.search.study_name, storage=open_storage(cfg.search.storage)
    ).trials
    same = [(t.params, t.values) for t in squeeze_trials] == [
        (t.params, t.values) for t in bare.study.trials
    ]
    return squeeze_s, bare.seconds, same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in both legs (1: least disturbed by other programs)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="squeeze-overhead-"))
    base = [f"cache_dir={root / 'cache'}", "space=wide", f"threads={args.threads}"]
    # Untimed warm-up: trains and caches the baseline, and pays the one-time costs of a process
    # (first autograd calls, SQL statement compilation, font loading) for both legs.
    interleaved_run([*base, "search.n_trials=2"], root / "warmup")

    ratios, squeeze_times, bare_times, same = [], [], [], True
    for r in range(args.repeats):
        squeeze_s, bare_s, ok = interleaved_run(
            [*base, f"search.n_trials={args.trials}"], root / f"run{r}"
        )
        same &= ok
        ratios.append(squeeze_s / bare_s)
        squeeze_times.append(squeeze_s)
        bare_times.append(bare_s)
        print(
            f"run {r}: squeeze {squeeze_s:6.2f} s   bare {bare_s:6.2f} s   "
            f"ratio {squeeze_s / bare_s:.3f}",
            flush=True,
        )

    ratio = statistics.median(ratios)
    print(
        f"\n{args.trials} trials of digits_mlp, {args.threads} torch thread(s), "
        f"{args.repeats} runs, legs interleaved trial by trial"
    )
    print(f"same trials in both legs (params and objective values): {'yes' if same else 'NO'}")
    print(
        f"median time: squeeze {statistics.median(squeeze_times):.2f} s, "
        f"bare {statistics.median(bare_times):.2f} s"
    )
    print(f"overhead ratio squeeze / bare (median of runs): {ratio:.3f}  (goal <= 1.05)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
