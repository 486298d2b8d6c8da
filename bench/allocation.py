"""Which sensitivity predicts the fine-tuned result: ``loss`` (measured), ``interpolated``
(measured at a few settings per tensor) or ``fisher`` (estimated); and, with ``--scale``, what
the tables cost on a ~30 M BERT-like encoder, in training steps of that model.

For each task, random per-tensor allocations (a sparsity and a bit width, or float32, for every
compressible tensor; the settings `allocate` chooses among) are applied to the cached baseline
and fine-tuned as a trial would be. The sum of each method's sensitivities over the chosen
settings (what the allocator minimises) is then compared with the fine-tuned model's validation
loss and accuracy by Spearman rank correlation: the method whose ranking agrees better is the
better guide for the knapsack. Also printed: each table's time to measure, and the Spearman
correlation of each estimated table's entries with the measured table's.

``--scale``: a BERT-like sequence classifier from a transformers ``BertConfig`` (random weights;
``--layers``, ``--hidden``), random token batches; one training step (Adam, batch ``--batch`` of
``--sequence`` tokens) is timed, then the bytes table (arithmetic, and the file's encoder on one
tensor for comparison), the Fisher table (``auto``'s choice at this size) and the solve, each as
a multiple of that step, with the peak RSS over the model's bytes.

    python bench/allocation.py [--tasks digits_mlp mnist1d_cnn] [--samples 24] [--epochs 15]
    python bench/allocation.py --scale [--layers 4 --hidden 512]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import quiet  # noqa: E402
from compressors import allocate as alloc  # noqa: E402
from compressors import get_compressor  # noqa: E402
from compressors.quant import half_biases  # noqa: E402
from experiments import evaluate, fit  # noqa: E402
from search import compose_config  # noqa: E402
from search.run.trial import compression_context  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

METHODS = ("loss", "interpolated", "fisher")


def val_loss(model, task) -> float:
    with torch.no_grad():
        return float(task.loss(model(task.val.x), task.val.y, None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_cnn"])
    parser.add_argument("--samples", type=int, default=24, help="random allocations per task")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", action="store_true", help="time the tables on a BERT-like")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sequence", type=int, default=128)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    if args.scale:
        return scale(args)
    root = Path(tempfile.mkdtemp(prefix="squeeze-allocation-"))
    print(f"{args.samples} random allocations per task, {args.epochs} fine-tuning epochs")
    for task_name in args.tasks:
        cfg = compose_config([f"task={task_name}", f"cache_dir={root / 'cache'}"])
        workload = load_workload(cfg, connect=False)
        task, baseline = workload.task, workload.baseline
        ctx = compression_context(task, baseline, seed=args.seed)
        found = alloc.targets(baseline.model)
        tables, seconds = {}, {}
        for method in METHODS:
            allocator = get_compressor("allocate")(sensitivity=method)
            settings = allocator.settings()
            start = time.perf_counter()
            tables[method] = allocator.table(copy.deepcopy(baseline.model), ctx)
            seconds[method] = time.perf_counter() - start
        rng = np.random.default_rng(args.seed)
        predicted = {method: [] for method in METHODS}
        losses, accs = [], []
        for _ in range(args.samples):
            choice = [int(rng.integers(len(settings))) for _ in found]
            model = copy.deepcopy(baseline.model)
            model_found = alloc.targets(model)
            alloc.apply_settings(
                model, model_found, {n: settings[c] for n, c in zip(found, choice, strict=True)}
            )
            half_biases(
                {id(s.module): s.module for t in model_found.values() for s in t.sites}.values()
            )
            fit(
                model,
                task.train,
                epochs=args.epochs,
                batch_size=64,
                lr=args.lr,
                seed=args.seed,
                schedule="cosine",
                loss_fn=task.loss,
            )
            losses.append(val_loss(model, task))
            accs.append(evaluate(model, task.val))
            for method, table in tables.items():
                sens = table["sensitivity"]
                predicted[method].append(sum(sens[r, c] for r, c in enumerate(choice)))
        print(f"\n{task_name}: {len(found)} tensors x {len(settings)} settings")
        for method in METHODS:
            agree = spearmanr(
                tables[method]["sensitivity"].ravel(), tables["loss"]["sensitivity"].ravel()
            ).statistic
            rho_loss = spearmanr(predicted[method], losses).statistic
            rho_acc = spearmanr(predicted[method], [-a for a in accs]).statistic
            print(
                f"  {method:>12}: table {seconds[method]:6.1f} s   Spearman with fine-tuned val "
                f"loss {rho_loss:+.3f}, with val error {rho_acc:+.3f}; entries vs loss's "
                f"{agree:+.3f}"
            )
    return 0


class _Tokens:
    """Random token batches for a sequence classifier, as `CompressionContext.train` offers
    them."""

    def __init__(self, vocab: int, rows: int, sequence: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (rows, sequence), generator=generator)
        self.labels = torch.randint(0, 2, (rows,), generator=generator)

    def calibration(self, *, samples, batch_size, device=None):
        from types import SimpleNamespace

        return [
            SimpleNamespace(
                inputs=self.ids[i : i + batch_size].to(device),
                targets=self.labels[i : i + batch_size].to(device),
                rows=len(self.ids[i : i + batch_size]),
            )
            for i in range(0, min(samples, len(self.ids)), batch_size)
        ]

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits


def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _train_step(model, data, args) -> float:
    """Seconds of one training step (Adam), after a warm-up step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    batch = data.calibration(samples=args.batch, batch_size=args.batch)[0]
    for _ in range(2):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(data.forward(model, batch.inputs), batch.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step = time.perf_counter() - start
    return step


def scale(args) -> int:
    import logging

    from transformers import BertConfig, BertForSequenceClassification

    from compressors import CompressionContext
    from compressors import _allocate_costs as costs
    from compressors import _allocate_sensitivity as sens
    from compressors.packing import tensor_bytes

    logging.getLogger("compressors").setLevel(logging.INFO)
    logging.basicConfig(format="  %(message)s")
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = 4 * params
    data = _Tokens(config.vocab_size, 1024, args.sequence)
    ctx = CompressionContext(train=data, example_inputs=data.ids[:2], seed=0)
    rss0 = _rss("VmRSS")
    print(
        f"BERT-like: {params / 1e6:.1f} M parameters ({args.layers} layers, hidden "
        f"{args.hidden}); RSS at the start {rss0 / 1e6:.0f} MB"
    )
    allocator = get_compressor("allocate")()
    settings = allocator.settings()
    found = alloc.targets(model)
    how = sens.plan(model, len(found), len(settings), method="auto", samples=allocator.samples)
    print(f"  {len(found)} tensors x {len(settings)} settings; auto's plan: {how}")
    biggest = max(found.values(), key=lambda t: t.numel()).weight.detach()
    few = settings[:8]
    start = time.perf_counter()
    [tensor_bytes(v, g) for v, g in costs.variants(biggest, few)]
    encoder = time.perf_counter() - start
    start = time.perf_counter()
    costs.costs(biggest, few)
    arithmetic = time.perf_counter() - start
    total = sum(t.numel() for t in found.values()) / biggest.numel() * len(settings) / len(few)
    seconds = {"encoder (before), extrapolated": encoder * total}
    print(
        f"  bytes of the largest tensor ({tuple(biggest.shape)}), 8 settings: encoder "
        f"{encoder:.1f} s, arithmetic {arithmetic:.1f} s"
    )
    peaks = {}
    for label, run in (
        ("table (bytes + sensitivity)", lambda: allocator.table(model, ctx)),
        ("compress (no cache: table + budget + solve)", lambda: allocator.compress(model, ctx)),
    ):
        _reset_peak()
        rss0 = _rss("VmRSS")
        start = time.perf_counter()
        run()
        seconds[label] = time.perf_counter() - start
        peaks[label] = _rss("VmHWM") - rss0
    step = _train_step(model, data, args)
    print(f"  one training step (batch {args.batch} x {args.sequence} tokens, Adam): {step:.2f} s")
    for label, value in seconds.items():
        print(f"  {label}: {value:.1f} s = {value / step:.1f} training steps")
    for label, peak in peaks.items():
        print(
            f"  peak RSS of {label}: +{peak / 1e6:.0f} MB over its start = "
            f"{peak / model_bytes:.2f}x the model's {model_bytes / 1e6:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
