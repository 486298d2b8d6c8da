"""Every phase of a trial at scale, as a multiple of one training step of the same model.

The ladder: an MLP, a ResNet-like CNN (basic blocks, channels ``c, 2c, 4c, 8c``) and a BERT-like
sequence classifier (transformers ``BertForSequenceClassification`` from a config, random
weights), each at about 0.1 M, 1 M, 10 M and 30 M parameters (110 M with ``--big``). Each
(model, rung) runs in a child process, which times one training step (Adam, after a warm-up)
and then each phase of a trial, calling the trial's own functions
(`search.run.trial.compress_recipe`'s copy, `compressors` ``compress`` / ``finalize``,
`compressors.save_packed`, `compressors.packing.packed_size`, `compressors.load_packed`,
`search.run.trial.measure`'s metrics (its latencies by `experiments.metrics.batch_latencies`
within `search.run.measure.latency_budget` (2 s at most, less for a model whose training
step is slow): a batch too slow for the budget timed on fewer rows, recorded as
``latency_rows_b256``),
`search.run.deploy.deploy_onnx`, after a warm-up phase that exports a 4 x 4 Linear: the
imports a process pays once). For each phase it
records the wall time over the training step's, the process's CPU time over the step's (the
machine may be loaded by others: CPU time is what the phase itself spent), and the peak
resident memory during the phase over the level before it (sampled every 2 ms from
``/proc/self/statm``, after ``malloc_trim``), over the fp32 model's bytes.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

#: Size of each rung, by name: (MLP widths, CNN base channels, BERT (vocab, hidden, layers)).
RUNGS = {
    "0.1M": ([256, 256, 128, 10], 6, (1000, 48, 2)),
    "1M": ([784, 1024, 256, 10], 19, (8000, 96, 4)),
    "10M": ([1024, 2048, 2048, 2048, 10], 61, (30522, 256, 4)),
    "30M": ([2048, 4096, 4096, 2048, 10], 106, (30522, 512, 4)),
    "110M": ([4096, 8192, 8192, 4096, 10], 200, (30522, 768, 12)),
}
KINDS = ("mlp", "cnn", "bert")
#: Compressors timed in the compress phase, with their parameters.
METHODS = {
    "prune": {"amount": 0.5},
    "quant-4": {"bits": 4},
    "cluster": {},
    "lowrank": {},
    "allocate": {},
}
SEQUENCE = 128
ROWS = {"train": 64, "val": 64}


class PeakRss:
    """Peak resident bytes above the level at entry, sampled from ``/proc/self/statm``."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRss:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def over(self) -> int:
        return self.peak - self.start


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNetLike(nn.Module):
    """ResNet-18's layout (two basic blocks per stage) at base width ``c``, 32x32 inputs."""

    def __init__(self, c: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        )
        layers, cin = [], c
        for i, cout in enumerate((c, 2 * c, 4 * c, 8 * c)):
            layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def builder(kind: str, rung: str):
    """``(build_model, inputs of n rows, training batch size)``."""
    widths, channels, (vocab, hidden, layers) = RUNGS[rung]
    if kind == "mlp":

        def build():
            mods: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:], strict=True):
                mods += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*mods[:-1])

        return build, lambda n: torch.randn(n, widths[0]), 64
    if kind == "cnn":
        return (lambda: ResNetLike(channels)), lambda n: torch.randn(n, 3, 32, 32), 32
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2,
        intermediate_size=4 * hidden,
        max_position_embeddings=SEQUENCE,
        num_labels=10,
    )

    def build_bert():
        model = BertForSequenceClassification(config)
        model.config.return_dict = False  # (a tuple: its first element, the logits)
        return model

    return build_bert, lambda n: torch.randint(0, vocab, (n, SEQUENCE)), 8


def make_task(kind: str, rung: str):
    from experiments._data import Split
    from experiments._task import Task, TrainConfig

    build, inputs, batch = builder(kind, rung)
    torch.manual_seed(0)
    splits = {}
    for name, rows in ROWS.items():
        x = inputs(rows)
        splits[name] = Split(x, torch.randint(0, 10, (rows,)))
    return Task(
        name=f"{kind}-{rung}",
        train=splits["train"],
        val=splits["val"],
        test=splits["val"],
        num_classes=10,
        build_model=build,
        train_config=TrainConfig(epochs=1, batch_size=batch),
    ), batch


def _step_seconds(model: nn.Module, task, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one Adam step at the task's training batch (median of 5, after
    two warm-up steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.as_tensor(task.train.x[:batch])
    y = torch.as_tensor(task.train.y[:batch]).long()
    model.train()
    walls, cpus = [], []
    for i in range(7):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    model.eval()
    return sorted(walls)[2], sorted(cpus)[2]


def _onnx_warm_up(path: Path) -> None:
    """Export a 4 x 4 Linear with the trial's exporter and open an ONNX Runtime session on it:
    the imports and first-call costs a process pays once (about 170 MiB of resident memory
    here), which the export of a model of any size then does not."""
    import onnx

    from compressors._onnx_io import Call
    from compressors._onnx_torch import export_graph
    from compressors.onnx_export import ort_session

    tiny = nn.Linear(4, 4)
    call = Call.of(tiny, torch.randn(2, 4))
    proto, _, _ = export_graph(tiny, call, None, every=False, opset=21, exporter="auto", notes=[])
    onnx.save_model(proto, path)
    ort_session(path)


def run_case(kind: str, rung: str, *, onnx: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """One (model, rung): the training step and each phase's wall, CPU and memory (``skip``:
    compressors of `METHODS` not timed)."""
    from safetensors.torch import load_file, save_file

    from compressors import CompressionContext, get_compressor, load_packed, save_packed
    from compressors._base import finalize_pipeline
    from compressors.packing import packed_size
    from experiments._baseline import Baseline
    from experiments.metrics import batch_latencies, count_flops, latency_ms, peak_memory_at
    from search.run.measure import latency_budget
    from search.run.trial import compression_context, measure

    task, batch = make_task(kind, rung)
    torch.manual_seed(0)
    baseline_model = task.build_model().eval()
    model_bytes = sum(t.numel() * t.element_size() for t in baseline_model.state_dict().values())
    params = sum(p.numel() for p in baseline_model.parameters())
    row: dict = {"kind": kind, "rung": rung, "params": params, "model_bytes": model_bytes}
    step_wall, step_cpu = _step_seconds(copy.deepcopy(baseline_model), task, batch)
    row["step_s"], row["step_cpu_s"] = step_wall, step_cpu
    phases: dict[str, dict] = {}
    row["phases"] = phases
    tmp = Path(tempfile.mkdtemp(prefix="squeeze-scale-"))
    baseline = Baseline(baseline_model, None, {}, "bench", tmp, False)

    def timed(name, fn):
        with PeakRss() as peak:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                result = fn()
                error = None
            except Exception as err:  # noqa: BLE001 (a phase that fails is reported)
                result, error = None, f"{type(err).__name__}: {err}"[:200]
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        phases[name] = {
            "steps": wall / step_wall,
            "cpu_steps": cpu / step_cpu,
            "s": wall,
            "mem": peak.over / model_bytes,
            **({"error": error} if error else {}),
        }
        return result

    state = {k: v.contiguous() for k, v in baseline_model.state_dict().items()}
    timed("safetensors save", lambda state=state: save_file(state, tmp / "m.safetensors"))
    del state
    fresh = task.build_model()
    timed("safetensors load", lambda: fresh.load_state_dict(load_file(tmp / "m.safetensors")))
    del fresh
    timed("copy baseline", lambda: copy.deepcopy(baseline_model))
    context = compression_context(task, baseline, seed=0)
    models = {}
    for method, params_ in METHODS.items():
        if method in skip:
            continue
        name = method.split("-")[0]
        model = copy.deepcopy(baseline_model)
        models[method] = timed(
            f"compress {method}",
            lambda name=name, params_=params_, model=model: get_compressor(name)(
                **params_
            ).compress(model, context),
        )
        if method not in ("quant-4",):
            models.pop(method)
        del model
    ptq = get_compressor("quant")(bits=4, mode="ptq")
    unfinalized = copy.deepcopy(baseline_model)  # (the trial's copy: "copy baseline" above)
    timed(
        "finalize (quant-4 ptq)",
        lambda m=unfinalized: finalize_pipeline([ptq], m, CompressionContext()),
    )
    del unfinalized
    quantized = models["quant-4"]
    path = tmp / "m.sqz"
    timed("pack quant-4", lambda q=quantized: save_packed(q, path, like=baseline_model))
    timed("size estimate", lambda q=quantized: packed_size(q, like=baseline_model))
    del quantized, models
    fp32_path = tmp / "fp32.sqz"
    timed("pack fp32", lambda: save_packed(baseline_model, fp32_path))
    fresh = task.build_model()
    timed("reload fp32", lambda: load_packed(fp32_path, fresh))
    fresh = task.build_model()
    shipped = timed("reload quant-4", lambda: load_packed(path, fresh))

    def latencies_at_measures_budget():
        budget_s, probe = latency_budget(shipped, None, task, 2.0)
        return batch_latencies(
            lambda x: (latency_ms(shipped, x, repeats=30, budget_s=budget_s), None),
            task.example_batch,
            (1, 256),
            budget_s=budget_s,
            probe=probe,
        )

    latencies = timed("latency b1+b256 (measure's budget)", latencies_at_measures_budget)
    if latencies:  # (batch 256 timed on fewer rows where a forward of 256 would not fit)
        row["latency_rows_b256"] = latencies[256].rows
    timed("peak memory (b256)", lambda: peak_memory_at(shipped, task.example_batch, 256))
    timed("FLOPs", lambda: count_flops(shipped, task.example_inputs(1)))
    measured = timed(
        "measure (whole)",
        lambda: measure(shipped, task, (1, 256), 30, latency_budget_s=2.0),
    )
    if measured:
        row["measure_rows_b256"] = measured.get("latency_rows_b256", 256)
    if onnx:
        from search.run.deploy import deploy_onnx

        del shipped
        timed("ONNX warm-up (imports, once a process)", lambda: _onnx_warm_up(tmp / "w.onnx"))
        timed("ONNX export + check", lambda: deploy_onnx(path, task, tmp / "m.onnx"))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return row
