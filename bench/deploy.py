"""What a latency sweep buys where users deploy: speed-ups in ONNX Runtime, and ONNX vs .sqz bytes.

Per task, one sweep with ``measure.runtime=onnxruntime`` (every trial exported to ONNX, checked in
ONNX Runtime, and timed there against the baseline's graph in alternating rounds) for the
objectives ``[val_acc, speedup]`` over a space of what makes a graph faster: structured pruning
(smaller layers), low rank (two thin MatMuls), int8 MatMulInteger (``quant.runtime=int8``) and, for
digits_mlp and the zoo's CNNs and TransformerEncoder, W8A8 (``QGemm``, ``QLinearConv`` on
calibrated activation grids, ``quant.activations=8``).
The zoo's families (`ZOO`: ResNet with BatchNorm, MobileNet, TransformerEncoder, LSTM, GRU; the
tasks of ``tests/zoo_conf/task/``, composed as ``--config-dir tests/zoo_conf`` composes them) are
searched for their speed-up at batch 32 (objective ``speedup_b32``) and timed at batch 1 and 32;
ONNX Runtime has no integer recurrent kernel, so the LSTM and GRU are searched over pruned hidden
units and int8 (``MatMulInteger``) or float heads.
Every task's structured pruning keeps multiples of the CPU's channel block (the product's
``structured.round_to: auto`` in a latency sweep, `search.config.blocks`): ONNX Runtime's int8
and float NCHWc convolutions run other widths no faster than the next multiple of their block,
or slower (15 channels 1.9x slower than 16 in int8; 13- and 26-channel depthwise ones left NCHWc
altogether), and that block is 16 channels with AVX-512, 8 with AVX2 only.
Then the front's points within ``--max-drop`` test points of the baseline (cosine >= 0.97 for
minilm) are timed again against the baseline's ONNX graph, side by side in one run (alternating
rounds, median of the rounds' medians; on one thread in the thread's CPU time, as the sweep's
trials are: `search.run.measure.latency_clock`), at batch 1, 32 and the large batch, beside the
sweep's own speed-up of each point (column ``sweep``), and the best is printed with its ONNX
file's bytes beside its packed ``.sqz`` file's. Beside them, the reference int8
graph: ONNX Runtime's own ``quantize_static`` of the baseline's graph (MinMax calibration on
training batches, QDQ, `_reference`), scored on test and timed the same way. Every latency is
timed with the ONNX Runtime session settings printed with the baseline's line.

    python bench/deploy.py                              # digits_mlp, mnist1d_cnn, minilm
    python bench/deploy.py --tasks zoo_resnet zoo_mobilenet zoo_transformer zoo_lstm zoo_gru
    python bench/deploy.py --tasks digits_mlp --trials 12
    python bench/deploy.py --tasks digits_mlp --trials 2 --no-reference   # without it
    python bench/deploy.py --tasks zoo_resnet --override space.structured.amount=0.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))  # (the zoo: tests.zoo)
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
#: The zoo's latency spaces: channels, heads or hidden units removed, then 8-bit weights with
#: calibrated 8-bit activations (integer kernels) or without, fine-tuned as the space says.
_W8A8 = [
    "space.quant.bits=8",
    "space.quant.activations=choice(float, 8)",
    "space.quant.calibration=mse",
]
ZOO = {
    "zoo_resnet": [
        "space=digits_images",  # (BatchNorm networks: Adam at lower learning rates, cosine)
        "space.pipeline=[structured,quant]",
        "space.structured.amount=interval(0.0, 0.8)",
        # (structured.round_to: the product's auto, the CPU's block. ONNX Runtime's int8
        # convolutions with VNNI run channels in blocks of 16: two 3x3 convolutions of 15
        # channels at batch 32 took 1.9x the time of two of 16; its float NCHWc ones in blocks
        # of 8 with AVX2 only: on a Zen 1 EPYC, structured 0.63 at round_to=8 ran 2.17x at
        # batch 32 (-0.6 test pt), the best at 16 1.22-1.25x)
        *_W8A8,
    ],
    "zoo_mobilenet": [  # (0.8: widths 16 / 32 / 64 down to 8 / 8 / 16, or 16 / 16 / 16)
        "space=digits_images",
        "space.pipeline=[structured,quant]",
        "space.structured.amount=interval(0.0, 0.8)",
        # (structured.round_to: the product's auto. ONNX Runtime's float NCHWc kernels run
        # channels in blocks of 8 with AVX2, 16 with AVX-512: on an AVX2 EPYC, widths 8/8/16
        # ran the fp32 graph 2.5x the baseline's 16/32/64 at batch 32, 16/16/16 1.6x; with
        # choice(8, 16) the search kept 16 there, 1.41x, against 1.72-1.78x at 8)
        *_W8A8,
    ],
    "zoo_transformer": [
        "space.pipeline=[structured,quant]",
        "space.structured.amount=interval(0.0, 0.6)",
        "space.finetune.lr=tag(log, interval(5e-4, 3e-3))",
        *_W8A8,
    ],
    **{
        name: [  # (torch's int8 LSTM / GRU export as float ones: only the head runs int8)
            "space.pipeline=[structured,quant]",
            "space.structured.amount=interval(0.1, 0.8)",
            "space.quant.bits=8",
            "space.quant.runtime=choice(float, int8)",
        ]
        for name in ("zoo_lstm", "zoo_gru")
    },
}
SPACES.update(ZOO)
#: The large batch each task is timed at (minilm: a forward of 256 sentences takes seconds here;
#: the zoo: batch 32, where its goals are).
LARGE = {"digits_mlp": 256, "mnist1d_cnn": 256, "minilm": 32, **dict.fromkeys(ZOO, 32)}
TRIALS = {"digits_mlp": 20, "mnist1d_cnn": 16, "minilm": 8, **dict.fromkeys(ZOO, 16)}
#: The speed-up each task's sweep maximises (``speedup``: at batch 1).
SPEEDUP = {**dict.fromkeys(ZOO, "speedup_b32")}


def sweep_config(
    task_name: str, *, root: Path, trials: int, threads: int = 1, extra: tuple[str, ...] = ()
):
    """The latency sweep of ``task_name`` (a key of `SPACES`) with its files in
    ``root/<task_name>`` and the baselines cached in ``root/cache``; ``extra``: overrides after
    the task's space (``space.structured.amount=interval(0.0, 0.8)``)."""
    work, large = root / task_name, LARGE[task_name]
    return compose_config(
        [
            f"task={task_name}",
            f"search.n_trials={trials}",
            f"search.storage={work}/optuna.journal",
            f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"output_dir={work}/trials",
            f"cache_dir={root / 'cache'}",
            f"threads={threads}",
            "measure.runtime=onnxruntime",
            f"measure.latency_batch_sizes=[1,{large}]",
            "measure.latency_repeats=10",
            f"search.objectives=[val_acc,{SPEEDUP.get(task_name, 'speedup')}]",
            "search.directions=[maximize,maximize]",
            *SPACES[task_name],
            *extra,
        ],
        config_dirs=[ROOT / "tests" / "zoo_conf"] if task_name in ZOO else (),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", choices=list(SPACES), default=["digits_mlp", "mnist1d_cnn", "minilm"]
    )
    parser.add_argument("--trials", type=int, default=None, help="per task (default: its own)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="test points (classifiers)")
    parser.add_argument("--min-cosine", type=float, default=0.97, help="test cosine (minilm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--override", nargs="*", default=[], help="config overrides after each task's space"
    )
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
        cfg = sweep_config(
            task_name,
            root=root,
            trials=args.trials or TRIALS[task_name],
            threads=args.threads,
            extra=tuple(args.override),
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
        objective = next(  # (the sweep's own, beside the re-timing; --override may change it)
            (o for o in cfg.search.objectives if o.startswith("speedup")),
            SPEEDUP.get(task_name, "speedup"),
        )
        print(
            f"  {'trial':>5} {'test':>7} {'sweep':>7} "
            + " ".join(f"{f'x b{b}':>7}" for b in batches)
            + f" {'ONNX B':>9} {'.sqz B':>9}  recipe ('sweep': its {objective} in the sweep)"
        )
        for row, graph, speed in sorted(rows, key=lambda r: -r[2][1][0]):
            print(
                f"  {int(row.trial):>5} {row.test_acc:>7.4f} {row[objective]:>7.2f} "
                + " ".join(f"{speed[b][0]:>7.2f}" for b in batches)
                + f" {graph.export.size_bytes:>9,} {row.size_bytes:>9,.0f}  {recipe_text(row)}"
            )
        for batch in (1, large):
            row, graph, speed = max(rows, key=lambda r, b=batch: r[2][b][0])
            print(
                f"  best at batch {batch} {within}: trial {int(row.trial)}, "
                f"{speed[batch][0]:.2f}x ({speed[batch][1] * 1000:.0f} -> "
                f"{speed[batch][2] * 1000:.0f} us), "
                + ", ".join(f"{speed[b][0]:.2f}x at batch {b}" for b in batches)
                + f" (sweep's {objective} {row[objective]:.2f}x)"
                + f", test {row.test_acc:.4f} ({-row.test_drop:+.1f} pt), "
                f"ONNX {graph.export.size_bytes:,} B, .sqz {row.size_bytes:,.0f} B; "
                f"{recipe_text(row)}; ops {dict(graph.export.ops)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
