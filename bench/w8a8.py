"""W8A8 (``quant.activations=8``) against fp32 in ONNX Runtime: latency at batch 1 and 32, score.

For each model: train the baseline, quantize it to W8A8 (8-bit weights, calibrated uint8
activations, quantization-aware fine-tuning), pack, export both graphs, and time them in ONNX
Runtime (CPU, one intra-op thread, interleaved rounds) beside ONNX Runtime's own
``quantize_static`` of the fp32 graph (`_reference.quantize_baseline`: pre-processed, QDQ,
MinMax calibration on 512 training samples, per-channel int8 weights). Prints
one row per model and batch, and the kernels ONNX Runtime ran for the W8A8 graph.

``minilm`` is all-MiniLM-L6-v2 (6 layers, the vocabulary trimmed to the sentences' tokens,
`tests.zoo.tasks.zoo_minilm`), pretrained: not trained, calibrated with ``percentile`` (its
``--calibration`` is `MINILM_CALIBRATION`) and not fine-tuned; its score is the mean cosine of
each graph's embeddings to the fp32 model's on validation (the worst sentence's beside it).

``--clock cpu`` times each forward in the calling thread's CPU time (``time.thread_time``: ONNX
Runtime runs a one-thread session in the caller's thread) instead of wall time: on a machine
shared with other jobs the wall-time ratio of a long forward to a short one grows with the load
(MiniLM at batch 1, load 7-8 on 2 cores: 6.3x in wall time in one run, 2.9x in CPU time in
the next), since the longer forward is preempted more often.

    python bench/w8a8.py [--calibration minmax|percentile|mse] [--epochs 3]
        [--models zoo_resnet minilm ...] [--keep FOLDER] [--clock wall|cpu] [--rounds 7]
        (FOLDER: each model's graphs, optimised too)
        (minilm alone: python bench/w8a8.py --models minilm; the others by default)
"""

from __future__ import annotations

import argparse
import copy
import functools
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # (the zoo: tests.zoo)
from _reference import quantize_baseline  # noqa: E402

from compressors import CompressionContext, apply_pipeline, get_compressor, save_packed  # noqa: E402
from compressors.onnx_export import (  # noqa: E402
    OrtModule,
    check_onnx,
    export_onnx,
    ort_session,
)
from experiments import Task, TrainConfig, evaluate, fit  # noqa: E402
from experiments.digits import digits_mlp  # noqa: E402
from experiments.metrics import interleaved_latency_ms  # noqa: E402
from experiments.models import ConvNet1d  # noqa: E402

#: The models of the bench, in order.
MODELS = ("digits_mlp", "digits_cnn1d", "zoo_resnet", "zoo_mobilenet", "zoo_transformer", "minilm")
#: The models run by default (MiniLM's export and timing take minutes: ``--models minilm``).
DEFAULT_MODELS = MODELS[:-1]
#: MiniLM's calibration (pretrained, not fine-tuned: percentile clips its activations' outliers).
MINILM_CALIBRATION = "percentile"


def _tasks(names) -> dict[str, Task]:
    if list(names) == ["minilm"]:
        return {"minilm": _minilm()}
    digits = digits_mlp(seed=0)
    cnn = Task(
        name="digits_cnn1d",
        train=digits.train,
        val=digits.val,
        test=digits.test,
        num_classes=10,
        build_model=functools.partial(ConvNet1d, 64, 10, channels=32),
        train_config=TrainConfig(epochs=20),
    )
    from tests.zoo import tasks  # (the zoo's ResNet and MobileNet: conv + BatchNorm + ReLU(6))

    return {
        "digits_mlp": digits,
        "digits_cnn1d": cnn,
        "zoo_resnet": tasks.zoo_resnet(seed=0),
        "zoo_mobilenet": tasks.zoo_mobilenet(seed=0),
        "zoo_transformer": tasks.zoo_transformer(seed=0),
        **({"minilm": _minilm()} if "minilm" in names else {}),
    }


def _minilm() -> Task:
    from tests.zoo import tasks

    return tasks.zoo_minilm(seed=0, layers=6)


def _optimized_ops(path: Path) -> Counter:
    """The nodes of ``path``'s graph as ONNX Runtime optimises it (saved beside it) at the
    level the timed sessions use (``ORT_ENABLE_ALL``: NHWC integer kernels, NCHWc float ones;
    the saved graph is this CPU's)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_name(f"{path.stem}-optimized.onnx"))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _acc(path: Path, task: Task) -> float:
    out = OrtModule(ort_session(path))(task.val.x)
    if task.outputs == "embeddings":  # (MiniLM: mean cosine to the fp32 model's embeddings)
        return float(torch.nn.functional.cosine_similarity(out, task.val.y, dim=1).mean())
    return float((out.argmax(1) == task.val.y).float().mean())


def _worst_cosine(path: Path, task: Task) -> float:
    out = OrtModule(ort_session(path))(task.val.x)
    return float(torch.nn.functional.cosine_similarity(out, task.val.y, dim=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default="mse")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=DEFAULT_MODELS,
        help="the models to run (all but minilm)",
    )
    parser.add_argument("--keep", type=Path, help="a folder to keep each model's graphs in")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time forwards in wall time or in the calling thread's CPU time",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    for name, task in _tasks(args.models).items():
        if name not in args.models:
            continue
        pretrained = name == "minilm"
        torch.manual_seed(0)
        base = task.build_model()
        if not pretrained:
            fit(base, task.train, epochs=task.train_config.epochs, batch_size=64, lr=3e-3, seed=0)
        base.eval()
        ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8))
        calibration = MINILM_CALIBRATION if pretrained else args.calibration
        quant = get_compressor("quant")(bits=8, activations=8, calibration=calibration)
        model = apply_pipeline([quant], copy.deepcopy(base), ctx)
        if not pretrained:
            fit(model, task.train, epochs=args.epochs, batch_size=64, lr=1e-3, seed=0)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_packed(base, folder / "fp32.sqz")
            save_packed(model, folder / "w8a8.sqz", like=base)
            export_onnx(
                folder / "fp32.sqz",
                task.build_model(),
                task.example_inputs(8),
                folder / "fp32.onnx",
            )
            shipped = task.build_model()
            export_onnx(folder / "w8a8.sqz", shipped, task.example_inputs(8), folder / "w8a8.onnx")
            check = check_onnx(folder / "w8a8.onnx", shipped, task.val.x)
            static = quantize_baseline(folder / "fp32.onnx", task, folder / "static.onnx")
            ops = _optimized_ops(folder / "w8a8.onnx")
            kernels = {k: v for k, v in ops.items() if "Q" in k or "Integer" in k}
            kernels["Transpose"] = ops["Transpose"]
            theirs = _optimized_ops(static)
            print(
                f"{name}: val acc fp32 torch {evaluate(base, task.val):.4f}, W8A8 torch "
                f"{evaluate(shipped, task.val):.4f}, W8A8 ORT "
                f"{_acc(folder / 'w8a8.onnx', task):.4f}"
                f", ORT quantize_static {_acc(static, task):.4f}; {check.message}"
            )
            sizes = {p: (folder / p).stat().st_size for p in ("fp32.onnx", "w8a8.onnx", "w8a8.sqz")}
            print(f"  bytes: {sizes}, ORT quantize_static {static.stat().st_size}")
            if task.outputs == "embeddings":
                print(
                    f"  worst cosine W8A8 {_worst_cosine(folder / 'w8a8.onnx', task):.4f}, "
                    f"quantize_static {_worst_cosine(static, task):.4f}"
                )
            print(f"  W8A8 kernels after ORT optimisation: {kernels}")
            print(f"  all W8A8 nodes: {dict(ops)}")
            print(f"  quantize_static nodes: {dict(theirs)}")
            if args.keep:
                shutil.copytree(folder, args.keep / name, dirs_exist_ok=True)
            fp32 = OrtModule(ort_session(folder / "fp32.onnx", threads=1))
            w8a8 = OrtModule(ort_session(folder / "w8a8.onnx", threads=1))
            ref = OrtModule(ort_session(static, threads=1, exact=False))
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            for batch in (1, 32):
                x = task.val.x[:batch]
                # (a MiniLM forward takes milliseconds: fewer repeats a round)
                repeats = (40 if batch == 1 else 6) if pretrained else 200
                timing = {"rounds": args.rounds, "repeats": repeats, "clock": clock}
                ours, base_ms = interleaved_latency_ms(w8a8, fp32, x, **timing)
                theirs, base2 = interleaved_latency_ms(ref, fp32, x, **timing)
                print(
                    f"  batch {batch:>2}: fp32 {base_ms * 1e3:7.1f} us, W8A8 {ours * 1e3:7.1f} us "
                    f"({base_ms / ours:.2f}x), ORT static int8 {theirs * 1e3:7.1f} us "
                    f"({base2 / theirs:.2f}x) [{args.clock} time, {args.rounds} rounds]"
                )


if __name__ == "__main__":
    main()
