"""Running a shipped model on int8 kernels.

Layers whose weights lie on per-row grids of at most 8 bits (`compressors.quant`) become torch's
dynamically quantized modules: a Linear becomes ``torch.ao.nn.quantized.dynamic.Linear``, an LSTM
or GRU its ``torch.ao.nn.quantized.dynamic`` counterpart. Their int8 weights are exactly the
grid's codes with the grid's scales, and activations are quantized on the fly per batch. On CPU
this runs fbgemm's int8 GEMM, which is faster than float32 for large batches (see
``bench/compression.py``); fake quantization in float32 never is.

Only layers whose parent still works with them are converted (`compressors._targets.Target.int8`):
torch's attention and transformer layers read their Linear children's ``weight`` directly, so
those stay float, as do convolutions (no dynamic int8 kernel) and plain ``nn.RNN``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic

__all__ = ["INT8_MODULES", "Int8Linear", "to_int8"]

Int8Linear = dynamic.Linear
#: The int8 module each float module type becomes.
INT8_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: dynamic.Linear,
    nn.LSTM: dynamic.LSTM,
    nn.GRU: dynamic.GRU,
}


def to_int8(model: nn.Module, scales: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Replace the layers named in ``scales`` by int8 layers with those per-row scales.

    Args:
        model: A model whose named layers hold weights equal to ``code * scale`` per row, codes
            in [-128, 127].
        scales: For each layer (by module name), the per-row scale of each of its weight tensors
            (by attribute name: ``weight`` for a Linear, ``weight_ih_l0``... for an LSTM).
    """
    for name, layer_scales in scales.items():
        layer = model.get_submodule(name)
        if type(layer) not in INT8_MODULES:
            raise TypeError(
                f"layer {name!r} is a {type(layer).__name__}; int8 kernels exist for "
                f"{', '.join(t.__name__ for t in INT8_MODULES)}"
            )
        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves
            warnings.simplefilter("ignore")
            if isinstance(layer, nn.Linear):
                int8 = _linear(layer, layer_scales["weight"])
            else:
                int8 = _recurrent(layer, layer_scales)
        model.set_submodule(name, int8)
    return model


def _quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.detach().flatten().to(torch.float64)
    zero = torch.zeros_like(scale, dtype=torch.int64)
    return torch.quantize_per_channel(weight.detach(), scale, zero, 0, torch.qint8)


def _linear(layer: nn.Linear, scale: torch.Tensor) -> nn.Module:
    weight = layer.weight.detach()
    int8 = dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
    bias = layer.bias.detach() if layer.bias is not None else None
    int8.set_weight_bias(_quantize(weight, scale), bias)
    return int8


def _recurrent(layer: nn.LSTM | nn.GRU, scales: Mapping[str, torch.Tensor]) -> nn.Module:
    int8 = INT8_MODULES[type(layer)](
        layer.input_size,
        layer.hidden_size,
        num_layers=layer.num_layers,
        bias=True,  # torch's int8 cells take biases; a layer without them gets zeros
        batch_first=layer.batch_first,
        dropout=float(layer.dropout),
        bidirectional=layer.bidirectional,
        dtype=torch.qint8,
    )
    values = {}
    for name in layer._flat_weights_names:
        tensor = getattr(layer, name)
        if name.startswith("weight_"):
            values[name] = _quantize(tensor, scales[name])
        else:
            values[name] = tensor.detach()
    for name in layer._flat_weights_names:  # a layer without biases
        if name.startswith("weight_"):
            bias = name.replace("weight_", "bias_")
            values.setdefault(bias, torch.zeros(values[name].shape[0]))
    int8.set_weight_bias(values)
    return int8.eval()
