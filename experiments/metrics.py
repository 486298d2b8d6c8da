"""Measurements of a model as shipped: nonzero parameters, FLOPs, CPU latency and peak memory,
and its agreement with the uncompressed model (`agreement`).

Shipped models may hold dynamic-quantized layers (``torch.ao.nn.quantized.dynamic.Linear``,
``LSTM``, ``GRU`` and the cells), whose weights are quantized (or float16) tensors inside packed
parameters rather than ``nn.Parameter``s; `weight_tensors` and the FLOP formulas below make
those count like any other layer.

FLOPs are torch's ``FlopCounterMode`` count of matrix products (linear layers, convolutions,
``bmm``, attention), 2 per multiply-add; element-wise work (activations, norms, gates, softmax)
is not counted. `count_flops` adds what that counter cannot see:

- recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells, and their dynamic-quantized
  versions), whose fused kernels it does not know: 2 FLOPs per weight-matrix element per sample
  per time step (all layers and directions; an LSTM's projection ``weight_hr`` too), which is
  what it counts for a recurrent layer that runs as ``addmm`` calls (float ``nn.GRU`` on the CPU);
- attention: torch's fused eval fast path of ``nn.TransformerEncoderLayer`` and
  ``nn.MultiheadAttention`` (``_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``)
  is switched off while counting, so attention runs as the counted projections and scaled
  dot-product attention, whose CPU kernel gets torch's own formula.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase as PackedRNN
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNCellBase as PackedRNNCell
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from experiments._data import Split, call_model
from experiments._objectives import prediction_agreement
from experiments._training import predict_outputs

logger = logging.getLogger(__name__)

#: Recurrent layers whose FLOPs `count_flops` works out from their weights' shapes.
_RECURRENT = (nn.RNNBase, nn.RNNCellBase, PackedRNN, PackedRNNCell)


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers, each once (a tied weight, e.g. an embedding that is
    also the output layer's weight, is one tensor); a dynamic-quantized layer's weights are its
    unpacked quantized (or float16) tensors."""
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()  # the tensors stay alive in `tensors`, so their ids stay unique
    for module in model.modules():
        for tensor in _own_tensors(module):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, Int8Linear):
        return [t for t in module._weight_bias() if t is not None]
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if isinstance(module, (PackedRNN, PackedRNNCell)):
        # {"weight": {name: tensor}, "bias": {name: tensor}}; a cell's biases are also its
        # parameters (the caller skips tensors it has seen)
        packed = module._weight_bias()
        tensors += [t for group in packed.values() for t in group.values() if t is not None]
    return tensors


def nonzero_params(model: nn.Module) -> int:
    """Number of nonzero entries in the model's weights and biases (int8 codes count too)."""
    total = 0
    for tensor in weight_tensors(model):
        values = tensor.int_repr() if tensor.is_quantized else tensor
        total += int(torch.count_nonzero(values))
    return total


def _int8_linear_flop(x_shape, _packed, *_args, out_shape=None, **_kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * out_shape[-1]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: FLOP formulas for ops torch's counter does not know: the int8 (or float16) Linear does one MAC
#: per weight; the CPU kernel of scaled dot-product attention does what the other attention
#: kernels do.
_EXTRA_FLOPS = {
    torch.ops.quantized.linear_dynamic: _int8_linear_flop,
    torch.ops.quantized.linear_dynamic_fp16: _int8_linear_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
}


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass on ``inputs``, as counted by torch's ``FlopCounterMode``, with
    recurrent layers and fused attention counted too (see the module's docstring).

    Dense kernels do the same work for zero and nonzero weights, so unstructured sparsity does
    not lower this count; only smaller layers do. An int8 multiply-add counts as 2 FLOPs, as a
    float one does. The model is put in eval mode; torch's multi-head attention fast path is
    off while counting (a process-wide switch, restored afterwards).
    """
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with _attention_fastpath(False), _RecurrentFlops(model, counter) as recurrent, counter:
        call_model(model, inputs)
    return int(counter.get_total_flops()) + recurrent.correction


def flops_per_sample(model: nn.Module, inputs: Any, samples: int = 1) -> float:
    """`count_flops` of ``inputs`` per sample they hold (a task's `example_batch`: a graph
    batch's inputs hold the first batch's samples, not cut to one)."""
    flops = count_flops(model, inputs)
    return flops if samples == 1 else flops / samples


@contextmanager
def _attention_fastpath(enabled: bool) -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


class _RecurrentFlops:
    """Forward hooks on the model's recurrent layers that replace whatever ``counter`` counted
    inside each call (nothing for a fused LSTM kernel; every ``addmm`` for a decomposed GRU) by
    `recurrent_flops`; ``correction`` is what to add to the counter's total."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, _RECURRENT)]
        self._counter = counter
        self._started: list[int] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.correction = 0

    def __enter__(self) -> _RecurrentFlops:
        for layer in self._layers:
            self._handles.append(layer.register_forward_pre_hook(self._before))
            self._handles.append(layer.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, _module: nn.Module, _args) -> None:
        self._started.append(self._counter.get_total_flops())

    def _after(self, module: nn.Module, args, kwargs, _output) -> None:
        counted = self._counter.get_total_flops() - self._started.pop()
        inputs = args[0] if args else kwargs["input"]
        self.correction += recurrent_flops(module, inputs) - counted


def recurrent_flops(layer: nn.Module, inputs: torch.Tensor | PackedSequence) -> int:
    """FLOPs of a recurrent layer's (or cell's) forward pass on ``inputs``: 2 per element of each
    weight matrix (input-hidden, hidden-hidden, an LSTM's projection; every layer and direction)
    per sample per time step. Biases, gates and activations are not counted.

    Args:
        layer: An ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, a cell, or a dynamic-quantized one.
        inputs: Its input: ``(batch, steps, features)`` (``batch_first``) or ``(steps, batch,
            features)``, unbatched ``(steps, features)``, a ``PackedSequence``; for a cell
            ``(batch, features)`` or ``(features,)``.
    """
    if isinstance(inputs, PackedSequence):
        tokens = inputs.data.shape[0]  # one row per (sample, step)
    elif isinstance(layer, (nn.RNNCellBase, PackedRNNCell)):
        tokens = inputs.shape[0] if inputs.dim() == 2 else 1
    else:
        tokens = math.prod(inputs.shape[:2]) if inputs.dim() == 3 else inputs.shape[0]
    return 2 * tokens * sum(w.numel() for w in _recurrent_weights(layer))


def _recurrent_weights(layer: nn.Module) -> list[torch.Tensor]:
    if isinstance(layer, (PackedRNN, PackedRNNCell)):
        return list(layer._weight_bias()["weight"].values())
    if isinstance(layer, nn.RNNBase):
        return [w for weights in layer.all_weights for w in weights if w.dim() == 2]
    return [layer.weight_ih, layer.weight_hh]


#: Timed forwards a latency is the median of, at least (fewer only where ``repeats`` is).
MIN_REPEATS = 3
#: Share of the time budget that warm-up passes may take (after the first one).
WARMUP_SHARE = 0.25


@torch.no_grad()
def latency_ms(
    model: nn.Module,
    inputs: Any,
    *,
    repeats: int = 30,
    warmup: int = 5,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median wall time of one forward pass in milliseconds (``inputs``: a tensor, a tuple of
    positional or a dict of keyword arguments).

    Args:
        model: The model (put in eval mode).
        inputs: Its inputs.
        repeats: Timed forwards, at most.
        warmup: Untimed forwards first, at most (at least one).
        budget_s: Seconds the timed forwards may take: timing stops once they have taken it,
            after `MIN_REPEATS` forwards at least (or ``repeats``, if fewer); warm-up stops
            once it has taken `WARMUP_SHARE` of it, after one forward. A first forward that
            alone takes the whole budget (a large model at a large batch: BERT-base at batch
            256 takes minutes on a CPU) is the measurement: one forward in all, its first-call
            overhead a small part of it. None: exactly ``repeats`` timed and ``warmup``
            untimed forwards.
        clock: Seconds, monotonic (``time.perf_counter``; a test's fake clock).
    """
    model.eval()
    started = clock()
    for k in range(warmup):
        if k and budget_s is not None and clock() - started >= WARMUP_SHARE * budget_s:
            break
        start = clock()
        call_model(model, inputs)
        first = clock() - start
        if not k and budget_s is not None and first >= budget_s:
            return 1000.0 * first
    times: list[float] = []
    least = min(MIN_REPEATS, repeats)
    while len(times) < repeats:
        if budget_s is not None and len(times) >= least and sum(times) >= budget_s:
            break
        start = clock()
        call_model(model, inputs)
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


@torch.no_grad()
def interleaved_latency_ms(
    model: nn.Module,
    reference: nn.Module,
    inputs: Any,
    *,
    rounds: int = 5,
    repeats: int = 30,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """``(model ms, reference ms)``: both timed in alternating rounds of ``repeats`` forwards at
    most, each the median of its rounds' medians.

    With ``budget_s``, the timed forwards of both models together take about that long: each
    round of each model gets ``budget_s / (2 * rounds)`` (`latency_ms`: 3 forwards at least,
    or one where one takes that long), and one round only where a forward takes a round's
    whole share.

    Absolute times drift with whatever else the machine runs (one study's baseline measured
    58.9 ms at batch 256 against 0.19 ms in two others on the same machine); two models timed in
    turns see the same drift, so their ratio, the speed-up, can be trusted where the times can't
    — unless each is one forward (the one-round case, logged: on a busy machine one forward's
    time is mostly the others' load).
    """
    share = None if budget_s is None else budget_s / (2 * rounds)
    timed = partial(latency_ms, repeats=repeats, warmup=2, budget_s=share, clock=clock)
    model_times, reference_times = [], []
    for _ in range(rounds):
        reference_times.append(timed(reference, inputs))
        model_times.append(timed(model, inputs))
        if share is not None and max(model_times[-1], reference_times[-1]) >= 1000.0 * share:
            # (one forward takes a round's whole share: the rounds cannot fit; one round)
            logger.info(
                "a speed-up from one forward of each model (a forward takes longer than a "
                "round's share of the latency budget): on a busy machine that ratio is mostly "
                "noise; a larger measure.latency_budget_s times more rounds",
                extra={"once": True},  # (one message: the budget varies with the model)
            )
            break
    return statistics.median(model_times), statistics.median(reference_times)


@dataclass(frozen=True)
class BatchLatency:
    """A latency at one batch size (`batch_latencies`).

    Attributes:
        batch: The batch size it is for.
        rows: The rows it was timed on: ``batch``, or fewer where a forward of ``batch`` rows
            would not fit the time budget; then ``ms`` and ``reference_ms`` are the times of
            ``rows`` rows scaled by ``batch / rows`` (an estimate: per row, a larger batch
            runs at least as fast on a CPU, so at most an over-estimate).
        ms: Milliseconds of one forward of ``batch`` rows.
        reference_ms: The reference's, timed on the same rows in turns with it; None without.
    """

    batch: int
    rows: int
    ms: float
    reference_ms: float | None = None


#: Times at most that `batch_latencies` times a batch again on more rows, predicted from the
#: rows it was just timed on (a time per row read off batch 1 holds each forward's fixed cost:
#: a 2-layer BERT of 16 tokens, predicted at 28 rows of 256 from batch 1 on a loaded machine),
#: when they are at least `RETIME_GAIN` times as many.
RETIMES = 2
RETIME_GAIN = 1.25


def timed_rows(
    batch: int, probe_rows: int, probe_ms: float, *, budget_s: float | None, models: int = 1
) -> int:
    """Rows to time a forward of ``batch`` rows on: ``batch`` itself where that forward,
    predicted from a forward of ``probe_rows`` rows that took ``probe_ms`` at the same time per
    row, takes at most ``budget_s / (MIN_REPEATS * models)`` (`MIN_REPEATS` forwards of each of
    ``models`` models fit the budget), else as many rows as fit it, never fewer than
    ``probe_rows``. No budget (None): ``batch``."""
    if budget_s is None or batch <= probe_rows:
        return batch
    per_row_s = max(probe_ms, 1e-9) / 1000.0 / probe_rows
    fit = int(budget_s / (MIN_REPEATS * models * per_row_s))
    return batch if fit >= batch else max(probe_rows, fit)


def batch_latencies(
    time_ms: Callable[[Any], tuple[float, float | None]],
    batch_of: Callable[[int], tuple[Any, int]],
    batches: Sequence[int],
    *,
    budget_s: float | None,
    models: int = 1,
    probe: tuple[int, float] | None = None,
) -> dict[int, BatchLatency]:
    """The latency at each batch size of ``batches``, timed from the smallest up: ``time_ms``
    times a forward on the inputs of ``batch_of(rows)`` (``(inputs, samples they hold)``: a
    task's `example_batch`; ``(ms, reference ms or None)``: `latency_ms`, or
    `interleaved_latency_ms` for ``models=2``). With a time budget, a batch whose forward would
    not fit it (`timed_rows`, predicted from the batch timed before it: BERT-base at batch 256
    takes about 8 of its training steps on a CPU) is timed on fewer rows and scaled, and says
    so (`BatchLatency.rows`), then timed again on the rows that this timing predicts fit, where
    they are many more (`RETIMES`, `RETIME_GAIN`: a batch's cost per row falls with its size); the
    first batch is timed as it is (`latency_ms` stops at one forward where one takes the
    budget), or predicted from ``probe`` (``(rows, ms)``: a forward of that many rows timed
    before, e.g. at the training batch size) where that holds more rows than the batch timed
    before it (a forward of a few rows is mostly its fixed cost: a 30 M-parameter MLP's batch
    256 was predicted from batch 1 at 5 rows, from 64 rows at about 64)."""
    out: dict[int, BatchLatency] = {}
    for batch in sorted(set(batches)):
        rows = batch
        if probe is not None:
            rows = timed_rows(batch, *probe, budget_s=budget_s, models=models)
        ms, reference_ms, rows = _timed(time_ms, batch_of, rows)
        for _ in range(RETIMES):  # (a forward's fixed cost made the smaller batch a poor guide)
            more = timed_rows(
                batch, rows, max(ms, reference_ms or 0.0), budget_s=budget_s, models=models
            )
            if more < RETIME_GAIN * rows:
                break
            ms, reference_ms, rows = _timed(time_ms, batch_of, more)
        if probe is None or rows >= probe[0]:
            probe = (rows, max(ms, reference_ms or 0.0))
        scale = batch / rows
        reference_ms = None if reference_ms is None else reference_ms * scale
        out[batch] = BatchLatency(batch, rows, ms * scale, reference_ms)
    return out


def _timed(
    time_ms: Callable[[Any], tuple[float, float | None]],
    batch_of: Callable[[int], tuple[Any, int]],
    rows: int,
) -> tuple[float, float | None, int]:
    """``time_ms`` of the inputs for ``rows`` samples, and the samples they held (a graph
    batch's are the first batch's own, not ``rows``)."""
    inputs, rows = batch_of(rows)
    return (*time_ms(inputs), rows)


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops create, while they are alive."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in existing}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._known:  # a view of a weight or of the input
                continue
            if key not in self._refs:
                self._refs[key], self._sizes[key] = 0, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


#: The two batch sizes `peak_memory_at` measures at, to extrapolate to larger ones (not 1, whose
#: kernels and shapes may take paths of their own).
PEAK_BATCHES = (2, 4)


def peak_memory_at(model: nn.Module, batch_of: Callable[[int], tuple[Any, int]], batch: int) -> int:
    """Peak bytes of one forward pass on ``batch`` rows (`peak_memory_bytes`), measured on two
    small batches and extrapolated linearly, not measured on the large one.

    Up to the larger of `PEAK_BATCHES` it is measured at ``batch``; beyond, at 2 and 4 rows,
    as ``peak(4) + (batch - 4) * (peak(4) - peak(2)) / 2``: the model's state counts once, the
    inputs and activations grow by the rows. Exact where the op at which memory peaks is the
    same at every batch size (an MLP, a CNN, a transformer at a fixed sequence length); a lower
    bound where a batch-independent buffer peaks at small batches and activations at large.

    Args:
        model: The model (put in eval mode).
        batch_of: ``batch_of(rows)``: the model's inputs for ``rows`` samples and the samples
            they hold (a task's ``example_batch``: a graph batch's are its own).
        batch: The batch size to report.
    """
    small, large = PEAK_BATCHES
    if batch <= large:
        inputs, rows = batch_of(batch)
        if rows == batch:
            return peak_memory_bytes(model, inputs)
    (inputs, small), (more, large) = batch_of(small), batch_of(large)  # (the samples they held)
    at_large = peak_memory_bytes(model, more)
    if large > small:
        per_row = max(0, at_large - peak_memory_bytes(model, inputs)) / (large - small)
    else:  # (batches of the loader's own size: what is not the weights grows by the rows)
        state = sum(t.numel() * t.element_size() for t in weight_tensors(model))
        per_row = max(0, at_large - state) / large
    return int(round(at_large + (batch - large) * per_row))


@torch.no_grad()
def peak_memory_bytes(model: nn.Module, inputs: Any) -> int:
    """Peak bytes one forward pass on ``inputs`` holds: the model's state, the inputs and the
    most activation bytes alive at once (tracked op by op through torch's dispatcher; for a
    large batch, `peak_memory_at` extrapolates from small ones)."""
    model.eval()
    state = weight_tensors(model)
    weights = sum(t.numel() * t.element_size() for t in state)
    given = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    tracker = _LiveTensors([*(t for t in state if not t.is_quantized), *given])
    with tracker:
        call_model(model, inputs)
    return weights + sum(t.numel() * t.element_size() for t in given) + tracker.peak


def agreement(
    model: nn.Module, reference_outputs: torch.Tensor, split: Split, *, outputs: str = "logits"
) -> float:
    """Share of ``split``'s inputs on which ``model`` decides as the uncompressed model did:
    the same top-1 class (``outputs="logits"``), or the same nearest neighbour among the
    split's inputs (``"embeddings"``, `experiments.neighbour_agreement`).

    Args:
        model: The (compressed, shipped) model.
        reference_outputs: The uncompressed model's outputs on ``split``, computed once.
        split: The inputs (a task's data, or a `Split`).
        outputs: What the models output, one of `experiments.DECISIONS`.
    """
    return prediction_agreement(predict_outputs(model, split), reference_outputs, kind=outputs)
