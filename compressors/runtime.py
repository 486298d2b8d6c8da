"""Running a shipped model on int8 kernels.

Linear layers whose weights lie on a per-channel grid of at most 8 bits (`compressors.quant`)
become ``torch.ao.nn.quantized.dynamic.Linear``: their int8 weights are exactly the grid's codes
with the grid's scales, and activations are quantized on the fly per batch. On CPU this runs
fbgemm's int8 GEMM, which is faster than float32 for large batches (see ``bench/compression.py``);
fake quantization in float32 never is. Conv layers have no dynamic int8 kernel and stay float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

__all__ = ["Int8Linear", "to_int8"]


def to_int8(model: nn.Module, scales: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace the Linear layers named in ``scales`` by int8 layers with those channel scales.

    Args:
        model: A model whose named layers hold weights equal to ``code * scale`` per channel,
            codes in [-128, 127].
        scales: Per-output-channel scale of each layer's weight, by module name.
    """
    for name, scale in scales.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a Linear")
        weight = layer.weight.detach()
        scale = scale.detach().flatten().to(torch.float64)
        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                weight, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8
            )
            int8 = Int8Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
            bias = layer.bias.detach() if layer.bias is not None else None
            int8.set_weight_bias(qweight, bias)
        model.set_submodule(name, int8)
    return model
