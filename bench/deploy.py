"""What a latency sweep buys where users deploy: speed-ups in ONNX Runtime, and ONNX vs .sqz bytes.

Per task, one sweep with ``measure.runtime=onnxruntime`` (every trial exported to ONNX, checked in
ONNX Runtime, and timed there against the baseline's graph in alternating rounds) for the
objectives ``[val_acc, speedup]`` over a space of what makes a graph faster: structured pruning
(smaller layers), low rank (two thin MatMuls), int8 MatMulInteger (``quant.runtime=int8``) and, for
digits_mlp, W8A8 ``QGemm`` on calibrated activation grids (``quant.activations=8``).
Then the front's points within ``--max-drop`` test points of the baseline (cosine >= 0.97 for
minilm) are timed again against the baseline's ONNX graph, side by side in one run (alternating
rounds, median of the rounds' medians), at batch 1, 32 and the large batch, and the best is printed
with its ONNX file's bytes beside its packed ``.sqz`` file's. Beside them, the reference int8
graph: ONNX Runtime's own ``quantize_static`` of the baseline's graph (MinMax calibration on
training batches, QDQ, `_reference`), scored on test and timed the same way. Every latency is
timed with the ONNX Runtime session settings printed with the baseline's line.

    python bench/deploy.py                              # digits_mlp, mnist1d_cnn, minilm
    python bench/deploy.py --tasks digits_mlp --trials 12
    python bench/deploy.py --tasks digits_mlp --trials 2 --no-reference   # without it
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet, recipe_text, side_by_side  # noqa: E402
from _reference import quantize_reference  # noqa: E402

from search import compose_config, run_sweep  # noqa: E402
from search.run.deploy import deploy_onnx  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

#: The latency space of each task: what makes the graph itself faster.
SPACES = {
    "digits_mlp": [
        "space.pipeline=choice(structured+quant, structured+lowrank+quant)",
        "space.structured.amount=interval(0.3, 0.95)",
        "space.lowrank.keep=interval(0.2, 0.8)",
        "space.quant.bits=8",
        # W8A8 (QGemm on calibrated grids) or weights only (float kernels); dynamic int8
        # (quant.runtime=int8, refused with activations=8) ran 0.79-0.83x W8A8's speed at
        # batch 256 on the same pruned MLP
        "space.quant.activations=choice(float, 8)",
        "space.quant.calibration=mse",
    ],
    "mnist1d_cnn": [
        "space.pipeline=[structured,quant]",
        "space.structured.amount=interval(0.1, 0.8)",
        "space.quant.bits=8",
    ],
    "minilm": [  # (removing 10% of the heads and FFN neurons cost 0.09 of cosine in a run)
        "space.pipeline=choice(quant, structured+quant)",
        "space.structured.amount=interval(0.02, 0.3)",
        "space.quant.bits=8",
        "space.quant.embeddings=8",
        "space.quant.runtime=choice(float, int8)",
        "search.warm_start=false",
    ],
}
#: The large batch each task is timed at (minilm: a forward of 256 sentences takes seconds here).
LARGE = {"digits_mlp": 256, "mnist1d_cnn": 256, "minilm": 32}
TRIALS = {"digits_mlp": 20, "mnist1d_cnn": 16, "minilm": 8}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(SPACES))
    parser.add_argument("--trials", type=int, default=None, help="per task (default: its own)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="test points (classifiers)")
    parser.add_argument("--min-cosine", type=float, default=0.97, help="test cosine (minilm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip ONNX Runtime's quantize_static graph"
    )
    args = parser.parse_args()
    quiet()
    root = Path(tempfile.mkdtemp(prefix="squeeze-deploy-"))
    print(f"runs in {root}; {args.threads} thread(s) for torch and ONNX Runtime", flush=True)
    for task_name in args.tasks:
        large = LARGE[task_name]
        batches = tuple(sorted({1, 32, large}))
        work = root / task_name
        cfg = compose_config(
            [
                f"task={task_name}",
                f"search.n_trials={args.trials or TRIALS[task_name]}",
                f"search.storage={work}/optuna.journal",
                f"tracking.uri=sqlite:///{work}/mlflow.db",
                f"output_dir={work}/trials",
                f"cache_dir={root / 'cache'}",
                f"threads={args.threads}",
                "measure.runtime=onnxruntime",
                f"measure.latency_batch_sizes=[1,{large}]",
                "measure.latency_repeats=10",
                "search.objectives=[val_acc,speedup]",
                "search.directions=[maximize,maximize]",
                *SPACES[task_name],
            ]
        )
        work.mkdir(parents=True, exist_ok=True)
        result = run_sweep(cfg)
        base = result.baseline
        front = result.front
        if task_name == "minilm":
            ok = front[front.test_acc >= args.min_cosine]
            within = f"test cosine >= {args.min_cosine}"
        else:
            ok = front[front.test_drop <= args.max_drop]
            within = f"within {args.max_drop} test pt"
        print(
            f"\n{task_name}: baseline val {base['val_acc']:.4f}, test {base['test_acc']:.4f}; "
            f"{len(result.trials)} trials, {len(front)} on the front, {len(ok)} {within}"
        )
        workload = load_workload(cfg)
        task = workload.task
        baseline_graph = deploy_onnx(
            workload.baseline.folder / "model.sqz", task, work / "baseline.onnx"
        )
        print(
            f"  baseline: ONNX {base['onnx_bytes']:,.0f} B, .sqz {base['size_bytes']:,.0f} B "
            f"(ops: {dict(baseline_graph.export.ops)}); ONNX Runtime sessions: "
            + ", ".join(f"{k.removeprefix('ort.')} {v}" for k, v in baseline_graph.threads.items())
        )
        if not args.no_reference:
            ref = quantize_reference(
                baseline_graph.path,
                task,
                work / "reference-int8.onnx",
                baseline_graph.module,
                batches,
            )
            print(
                f"  reference (ORT quantize_static, MinMax, QDQ int8): test {ref.test:.4f}, "
                + ", ".join(f"{ref.speed[b][0]:.2f}x at batch {b}" for b in batches)
                + f", ONNX {ref.size_bytes:,} B (ops: {dict(ref.ops)})",
                flush=True,
            )
        rows = []
        for _, row in ok.iterrows():
            number = int(row.trial)
            packed = Path(cfg.output_dir) / result.study_name / f"trial-{number:04d}.sqz"
            graph = deploy_onnx(packed, task, work / f"trial-{number:04d}.onnx")
            speed = {
                batch: side_by_side(baseline_graph.module, graph.module, task.example_inputs(batch))
                for batch in batches
            }
            rows.append((row, graph, speed))
        if not rows:
            print(f"  no front point {within}")
            continue
        print(
            f"  {'trial':>5} {'test':>7} "
            + " ".join(f"{f'x b{b}':>7}" for b in batches)
            + f" {'ONNX B':>9} {'.sqz B':>9}  recipe"
        )
        for row, graph, speed in sorted(rows, key=lambda r: -r[2][1][0]):
            print(
                f"  {int(row.trial):>5} {row.test_acc:>7.4f} "
                + " ".join(f"{speed[b][0]:>7.2f}" for b in batches)
                + f" {graph.export.size_bytes:>9,} {row.size_bytes:>9,.0f}  {recipe_text(row)}"
            )
        row, graph, speed = max(rows, key=lambda r: r[2][1][0])
        print(
            f"  best at batch 1 {within}: trial {int(row.trial)}, {speed[1][0]:.2f}x at batch 1 "
            f"({speed[1][1] * 1000:.0f} -> {speed[1][2] * 1000:.0f} us), "
            f"{speed[large][0]:.2f}x at batch {large}; ops {dict(graph.export.ops)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
