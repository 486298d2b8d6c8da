"""W8A8 (``quant.activations=8``) of small Hugging Face models against fp32 in ONNX Runtime.

``gpt2``: a ``GPT2LMHeadModel`` (2 layers, 4 heads, its key/value cache on; its layers are
``Conv1D``, Linears stored transposed) on the counting language of `tests.zoo.workloads`
(12 tokens, per-position accuracy), trained 3 epochs, quantized to W8A8 (8-bit weights, ``mse``
calibration, one epoch of quantization-aware fine-tuning), packed and exported. Prints the
bytes of each file, the validation accuracy in torch and ONNX Runtime, the kernels ONNX Runtime
runs the W8A8 graph on, and both graphs' latency at batch 1 and 32.

``distilbert``, ``vit``, ``vit_nobias``, ``clip_vision``, ``clip_text``: encoders of
`tests.zoo.hf` (random init, trained 2 epochs, W8A8 with ``mse`` calibration, no fine-tuning):
a ``DistilBertForSequenceClassification`` and a ``CLIPTextModel`` (causal) with a Linear head
on digits' 64 pixels as tokens, padded after 32 to 64 (`tests.zoo.hf.PaddedTokens`, the
``attention_mask`` dropping the padding); issue 24's ``ViTForImageClassification`` (8 x 8
digits, 2 x 2 patches: 17 tokens), with or without biases on the query, key and value
projections (``qkv_bias``), and CLIP's vision tower (``CLIPForImageClassification``) on the
same images. Each is
exported three times from the same ``.sqz`` files: fp32, W8A8 with its attention as exported
(``before``: `compressors._onnx_bert` told of no attention module) and W8A8 as shipped
(``after``: ``QAttention``); the three are timed in the same interleaved rounds.

``--hidden`` sets the models' width (4 heads, 2 layers). Timing: one intra-op thread, CPU time
of the calling thread (ONNX Runtime runs a one-thread session in the caller's thread: a shared
machine's load inflates it less than wall time), median of interleaved rounds.

    python bench/hf_w8a8.py [--models gpt2 distilbert vit vit_nobias clip_vision clip_text]
        [--hidden 64 256] [--rounds 9]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
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
    onnx_export,  # noqa: E402
    save_packed,
)
from compressors.onnx_export import OrtModule, ort_session  # noqa: E402
from experiments import evaluate, fit  # noqa: E402
from experiments.metrics import interleaved_latency_ms, latency_ms  # noqa: E402
from search.run.deploy import deploy_onnx  # noqa: E402
from tests.zoo.hf import ClipText, clip_vision, distilbert, hf_task, padded, vit  # noqa: E402
from tests.zoo.workloads import Counting, tiny_gpt2, wl_tokens  # noqa: E402

#: The models of the bench.
MODELS = ("gpt2", "distilbert", "vit", "vit_nobias", "clip_vision", "clip_text")
#: The ops of the optimised W8A8 graph that are printed.
KERNELS = (
    "Gemm",
    "MatMul",
    "FusedMatMul",
    "QGemm",
    "MatMulIntegerToFloat",
    "QAttention",
    "Softmax",
    "Transpose",
    "Reshape",
    "QuantizeLinear",
)


def _kernels(path: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_name(f"{path.stem}-optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {k: ops[k] for k in KERNELS if ops[k]}


def _gpt2(hidden: int, rounds: int, folder: Path) -> None:
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


def _encoder_task(name: str, hidden: int):
    if name in ("distilbert", "clip_text"):
        if name == "distilbert":
            build = functools.partial(distilbert, hidden=hidden, heads=4, layers=2)
        else:
            build = functools.partial(ClipText, hidden=hidden, heads=4, layers=2)
        return padded(dataclasses.replace(hf_task("distilbert"), build_model=build))
    if name == "clip_vision":
        build = functools.partial(clip_vision, size=8, hidden=hidden, heads=4, layers=2)
        return dataclasses.replace(hf_task("vit", size=8), build_model=build)
    build = functools.partial(
        vit,
        size=8,
        channels=1,
        hidden=hidden,
        heads=4,
        patch=2,
        layers=2,
        qkv_bias=name == "vit",
    )
    return dataclasses.replace(hf_task("vit", size=8), build_model=build)


def _encoder(name: str, hidden: int, rounds: int, folder: Path) -> None:
    task = _encoder_task(name, hidden)
    torch.manual_seed(0)
    base = task.build_model()
    fit(base, task.train, epochs=2, batch_size=32, lr=1e-3, loss_fn=task.loss, seed=0)
    base.eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
    model = apply_pipeline([quant], copy.deepcopy(base), ctx).eval()
    save_packed(base, folder / "fp32.sqz")
    save_packed(model, folder / "w8a8.sqz", like=base)
    found = onnx_export.bert_attention
    graphs, acc = {}, {}
    for graph, packed in (("fp32", "fp32"), ("before", "w8a8"), ("after", "w8a8")):
        if graph == "before":  # (the attention as exported: no module to rewrite)
            onnx_export.bert_attention = lambda model: {}
        try:
            deployed = deploy_onnx(
                folder / f"{packed}.sqz", task, folder / f"{graph}.onnx", threads=1
            )
        finally:
            onnx_export.bert_attention = found
        graphs[graph] = folder / f"{graph}.onnx"
        acc[graph] = round(deployed.metrics["val_acc_onnx"], 4)
    shipped = load_packed(folder / "w8a8.sqz", task.build_model(), int8=False).eval()
    sizes = {g: p.stat().st_size for g, p in graphs.items()}
    print(
        f"{name} {hidden} wide: val acc fp32 torch {evaluate(base, task.val):.4f}, W8A8 torch "
        f"{evaluate(shipped, task.val):.4f}, ORT {acc}; .onnx bytes {sizes}"
    )
    for graph in ("before", "after"):
        print(f"  W8A8 {graph}: kernels after ORT optimisation {_kernels(graphs[graph])}")
    sessions = {g: OrtModule(ort_session(p, threads=1)) for g, p in graphs.items()}
    batches = next(iter(torch.utils.data.DataLoader(task.val.source, batch_size=32)))
    inputs = {k: v for k, v in batches.items() if k != "labels"}
    for batch in (1, 32):
        x = {k: v[:batch] for k, v in inputs.items()}
        repeats = 100 if batch == 1 else 10
        times: dict[str, list[float]] = {g: [] for g in sessions}
        for _ in range(rounds):  # (the three graphs in turn: the same drift for each)
            for graph, session in sessions.items():
                times[graph].append(
                    latency_ms(session, x, repeats=repeats, warmup=2, clock=time.thread_time)
                )
        ms = {g: statistics.median(t) for g, t in times.items()}
        print(
            f"  batch {batch:>2}: fp32 {ms['fp32'] * 1e3:8.1f} us, W8A8 before "
            f"{ms['before'] * 1e3:8.1f} us ({ms['fp32'] / ms['before']:.2f}x), after "
            f"{ms['after'] * 1e3:8.1f} us ({ms['fp32'] / ms['after']:.2f}x) "
            f"[CPU time, {rounds} rounds]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(1)
    for name in args.models:
        for hidden in args.hidden:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "gpt2":
                    _gpt2(hidden, args.rounds, Path(tmp))
                else:
                    _encoder(name, hidden, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
