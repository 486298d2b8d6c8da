"""Measurements of a model as shipped: nonzero parameters, FLOPs, CPU latency and peak memory.

Shipped models may hold int8 layers (``torch.ao.nn.quantized.dynamic.Linear``), whose weights are
quantized tensors inside packed parameters rather than ``nn.Parameter``s; `weight_tensors` and
the FLOP formula below make those count like any other layer.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers; an int8 layer's weight is its quantized tensor."""
    tensors = []
    for module in model.modules():
        if isinstance(module, Int8Linear):
            tensors += [t for t in module._weight_bias() if t is not None]
        else:
            tensors += [*module.parameters(recurse=False), *module.buffers(recurse=False)]
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


#: FLOP formulas for ops torch's counter does not know: the int8 Linear does one MAC per weight.
_EXTRA_FLOPS = {torch.ops.quantized.linear_dynamic: _int8_linear_flop}


@torch.no_grad()
def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``inputs``, as counted by torch's ``FlopCounterMode``.

    Dense kernels do the same work for zero and nonzero weights, so unstructured sparsity does
    not lower this count; only smaller layers do. An int8 multiply-add counts as 2 FLOPs, as a
    float one does.
    """
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with counter:
        model(inputs)
    return int(counter.get_total_flops())


@torch.no_grad()
def latency_ms(
    model: nn.Module, inputs: torch.Tensor, *, repeats: int = 30, warmup: int = 5
) -> float:
    """Median wall time of one forward pass in milliseconds, after ``warmup`` untimed passes."""
    model.eval()
    for _ in range(warmup):
        model(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


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


@torch.no_grad()
def peak_memory_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Peak bytes one forward pass on ``inputs`` holds: the model's state, the inputs and the
    most activation bytes alive at once (tracked op by op through torch's dispatcher)."""
    model.eval()
    state = weight_tensors(model)
    weights = sum(t.numel() * t.element_size() for t in state)
    tracker = _LiveTensors([*(t for t in state if not t.is_quantized), inputs])
    with tracker:
        model(inputs)
    return weights + inputs.numel() * inputs.element_size() + tracker.peak
