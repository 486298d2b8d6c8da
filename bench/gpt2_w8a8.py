"""W8A8 (``quant.activations=8``) of a small GPT-2 language model against fp32 in ONNX Runtime.

A Hugging Face ``GPT2LMHeadModel`` (2 layers, 4 heads, its key/value cache on; its layers are
``Conv1D``, Linears stored transposed) on the counting language of `tests.zoo.workloads`
(12 tokens, per-position accuracy), trained 3 epochs, quantized to W8A8 (8-bit weights, ``mse``
calibration, one epoch of quantization-aware fine-tuning), packed and exported. Prints the
bytes of each file, the validation accuracy in torch and ONNX Runtime, the kernels ONNX Runtime
runs the W8A8 graph on, and both graphs' latency at batch 1 and 32 (one intra-op thread, CPU
time of the calling thread, median of interleaved rounds).

    python bench/gpt2_w8a8.py [--hidden 64 256] [--rounds 9]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (the zoo: tests.zoo)

from compressors import (  # noqa: E402
    CompressionContext,
    apply_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from compressors.onnx_export import OrtModule, ort_session  # noqa: E402
from experiments import evaluate, fit  # noqa: E402
from experiments.metrics import interleaved_latency_ms  # noqa: E402
from search.run.deploy import deploy_onnx  # noqa: E402
from tests.zoo.workloads import Counting, tiny_gpt2, wl_tokens  # noqa: E402

#: The ops of the optimised W8A8 graph that are printed.
KERNELS = ("Gemm", "MatMul", "FusedMatMul", "QGemm", "MatMulIntegerToFloat", "QuantizeLinear")


def _kernels(path: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_name(f"{path.stem}-optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {k: ops[k] for k in KERNELS if ops[k]}


def _run(hidden: int, rounds: int, folder: Path) -> None:
    build = functools.partial(tiny_gpt2, hidden=hidden, heads=4, layers=2)
    task = dataclasses.replace(wl_tokens(), build_model=build)
    torch.manual_seed(0)
    base = task.build_model()
    fit(base, task.train, epochs=3, batch_size=32, lr=3e-3, seed=0)
    base.eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
    model = apply_pipeline([quant], copy.deepcopy(base), ctx)
    fit(model, task.train, epochs=1, batch_size=32, lr=1e-3, seed=0)
    model.eval()
    sizes, acc = {}, {}
    for name, packed in (("fp32", base), ("w8a8", model)):
        sizes[f"{name}.sqz"] = save_packed(packed, folder / f"{name}.sqz", like=base)
        deployed = deploy_onnx(folder / f"{name}.sqz", task, folder / f"{name}.onnx", threads=1)
        sizes[f"{name}.onnx"] = (folder / f"{name}.onnx").stat().st_size
        shipped = load_packed(folder / f"{name}.sqz", task.build_model(), int8=False).eval()
        acc[name] = (evaluate(shipped, task.val), deployed.metrics["val_acc_onnx"])
    print(f"GPT-2 {hidden} wide: bytes {sizes}; val acc (torch, ORT) {acc}")
    print(f"  W8A8 kernels after ORT optimisation: {_kernels(folder / 'w8a8.onnx')}")
    fp32 = OrtModule(ort_session(folder / "fp32.onnx", threads=1))
    w8a8 = OrtModule(ort_session(folder / "w8a8.onnx", threads=1))
    ids = Counting(64, 5).ids[:, :-1]
    for batch in (1, 32):
        timing = {"rounds": rounds, "repeats": 200 if batch == 1 else 40, "clock": time.thread_time}
        ours, base_ms = interleaved_latency_ms(w8a8, fp32, {"input_ids": ids[:batch]}, **timing)
        print(
            f"  batch {batch:>2}: fp32 {base_ms * 1e3:8.1f} us, W8A8 {ours * 1e3:8.1f} us "
            f"({base_ms / ours:.2f}x) [CPU time, {rounds} rounds]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            _run(hidden, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
