"""How small and how fast squeeze makes `digits_mlp` and `mnist1d_cnn`, next to their baselines.

For each task, in one run:

1. a **size** sweep (objectives: validation accuracy, packed file bytes) over the wide space
   with binary / ternary / k-bit weights; reported: the front point with the largest size ratio
   whose *test* accuracy is at most 1 point below the baseline's (the sweep itself chose the front
   on validation; test accuracy is only read for that front);
2. a **speed** sweep (objectives: validation accuracy, latency at batch 1 and at batch 256) over
   pipelines that shrink layers (structured pruning, low-rank) with int8 or float kernels;
   reported: the best speed-up at batch 1 and at batch 256 among front points within 1 test
   point, each re-measured
   against the baseline *side by side* (alternating rounds, median of medians), because a
   latency logged during a sweep shares the machine with whatever ran then;
3. a **random-importance control**: the best size recipe's pruners rerun with
   ``importance=random`` (same seed, same sparsity and shapes, same fine-tuning), to show what the
   criterion is worth.

    python bench/compression.py [--tasks digits_mlp mnist1d_cnn] [--trials 60] [--threads 1]
                                [--max-drop 1 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import recipe_text, shipped_baseline, side_by_side  # noqa: E402

from compressors import load_packed, save_packed  # noqa: E402
from experiments import evaluate  # noqa: E402
from search import compose_config, run_sweep  # noqa: E402
from search.config.plan import plan_sweep  # noqa: E402
from search.run.trial import compress_recipe  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

SIZE_SPACE = [
    "space=wide",
    "space.pipeline=[structured, prune, quant, kd]",
    "space.quant.bits=choice(1, ternary, 2, 3, 4, 6, 8)",
]
SPEED_SPACE = [
    "space=wide",
    "space.pipeline=choice(structured+quant, structured+quant+kd, structured+lowrank+quant, "
    "lowrank+quant)",
    "space.structured.amount=interval(0.3, 0.9)",
    "space.quant.bits=choice(4, 8)",
    "space.quant.runtime=choice(float, int8)",
    "search.objectives=[val_acc,latency_ms,latency_ms_b256]",
    "search.directions=[maximize,minimize,minimize]",
]
PRUNERS = ("structured", "prune", "gradual")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_cnn"])
    parser.add_argument("--trials", type=int, default=60, help="trials per sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed, logged)")
    parser.add_argument(
        "--max-drop", type=float, nargs="+", default=[1.0, 2.0], help="test points allowed"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.trials} trials per sweep")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            _bench_task(task, Path(tmp) / task, args)


def _bench_task(task: str, workdir: Path, args: argparse.Namespace) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    common = [
        f"task={task}",
        f"search.n_trials={args.trials}",
        f"search.storage={workdir}/optuna.journal",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        f"output_dir={workdir}/trials",
        f"threads={args.threads}",
    ]
    print(f"\n=== {task} ===")
    start = time.perf_counter()
    size = run_sweep(compose_config([*common, "search.study_name=size", *SIZE_SPACE]))
    print(f"size sweep: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    speed_cfg = compose_config([*common, "search.study_name=speed", *SPEED_SPACE])
    speed = run_sweep(speed_cfg)
    print(f"speed sweep: {time.perf_counter() - start:.0f} s")
    base = size.baseline
    print(
        f"baseline: val {base['val_acc']:.4f}, test {base['test_acc']:.4f}, "
        f"{base['size_bytes'] / 1000:.1f} KB packed fp32 ({base['fp32_bytes'] / 1000:.1f} KB "
        f"as raw fp32), {base['flops']:.0f} FLOPs/sample"
    )

    best = None
    for drop in args.max_drop:
        ok = size.front[size.front.test_drop <= drop]
        if ok.empty:
            print(f"size: no front point within {drop} test pt (closest: {_closest(size.front)})")
            continue
        row = ok.loc[ok.compression_ratio.idxmax()]
        best = row if best is None else best
        print(
            f"size: best ratio within {drop} test pt: {row.compression_ratio:.1f}x "
            f"({row.size_bytes / 1000:.2f} KB; val {row.val_acc:.4f}, test {row.test_acc:.4f}"
            f" = {-row.test_drop:+.1f} pt) trial {row.trial}: {recipe_text(row)}"
        )

    task_obj, base_model = shipped_baseline(speed_cfg, workdir)
    candidates = speed.front[speed.front.test_drop <= max(args.max_drop)]
    for batch in (1, 256):
        inputs = task_obj.example_inputs(batch)
        ratios = {}
        for _, row in candidates.iterrows():
            path = Path(speed_cfg.output_dir) / "speed" / f"trial-{int(row.trial):04d}.sqz"
            ratios[row.trial] = side_by_side(
                base_model, load_packed(path, task_obj.build_model()), inputs
            )[0]
        for drop in args.max_drop:
            ok = candidates[candidates.test_drop <= drop]
            if ok.empty:
                print(f"latency b{batch}: no front point within {drop} test pt")
                continue
            row = ok.loc[ok.trial.map(ratios).idxmax()]
            print(
                f"latency b{batch}: best speed-up within {drop} test pt: {ratios[row.trial]:.2f}x"
                f" (test {row.test_acc:.4f} = {-row.test_drop:+.1f} pt, "
                f"{row.size_bytes / 1000:.1f} KB, {row.flops:.0f} FLOPs) trial {row.trial}: "
                f"{recipe_text(row)}"
            )

    _random_control(task, best, workdir)


def _closest(front) -> str:
    row = front.loc[front.test_drop.idxmin()]
    return f"{-row.test_drop:+.1f} pt at {row.compression_ratio:.1f}x"


def _random_control(task_name: str, best, workdir: Path) -> None:
    """The best size recipe's pruners with importance=random, everything else equal."""
    if best is None:
        return
    cfg = compose_config([f"task={task_name}", *SIZE_SPACE])
    plan = plan_sweep(cfg)
    params = {
        k.removeprefix("param."): v.item() if hasattr(v, "item") else v
        for k, v in best.items()
        if k.startswith("param.") and v == v  # NaN: a parameter of a method not chosen
    }
    if not set(PRUNERS) & set(plan.space.sample(optuna.trial.FixedTrial(params)).pipeline):
        print("control: the best size recipe prunes nothing; no control to run")
        return
    workload = load_workload(cfg, plan=plan)
    task, baseline = workload.task, workload.baseline
    results = {}
    for importance in ("l1", "random"):
        recipe = plan.space.sample(optuna.trial.FixedTrial(params))
        for pruner in set(PRUNERS) & set(recipe.compressors):
            recipe.compressors[pruner]["importance"] = importance
        model, _ = compress_recipe(
            recipe,
            plan.space,
            task,
            baseline,
            seed=cfg.seed + int(best.trial),
            device=workload.device,
        )
        path = workdir / f"control-{importance}.sqz"
        file_size = save_packed(model, path, like=baseline.model)
        shipped = load_packed(path, task.build_model())
        results[importance] = (
            evaluate(shipped, task.val),
            evaluate(shipped, task.test),
            file_size,
        )
    (l1_val, l1_test, l1_size), (r_val, r_test, r_size) = results["l1"], results["random"]
    print(
        f"control (trial {best.trial}'s recipe, pruners' importance l1 vs random): "
        f"l1 val {l1_val:.4f} test {l1_test:.4f} ({l1_size / 1000:.2f} KB) | random val "
        f"{r_val:.4f} test {r_test:.4f} ({r_size / 1000:.2f} KB) -> the criterion is worth "
        f"{100 * (l1_test - r_test):+.1f} test pt"
    )


if __name__ == "__main__":
    sys.exit(main())
