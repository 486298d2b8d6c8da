"""k-bit symmetric per-output-channel weight quantization, fine-tuned with a straight-through
estimator."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressors._base import CompressionContext, Compressor
from compressors._layers import weight_layers
from compressors._params import Integer, Options

_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def channel_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale ``max|w| / (2^(bits-1) - 1)``, shaped to broadcast over ``weight``.

    Scales are rounded to float16 values, so the packed file stores them in 2 bytes without loss.
    A channel of zeros gets scale 1 so that its codes stay 0.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scale = scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)
    return scale.view(-1, *([1] * (weight.dim() - 1)))


class _RoundToGrid(torch.autograd.Function):
    """Forward: the nearest grid point; backward: identity inside the grid's range (clipped STE)."""

    @staticmethod
    def forward(ctx, weight, scale, qmax):
        scaled = weight / scale
        ctx.save_for_backward(scaled.abs() <= qmax + 0.5)
        return torch.clamp(torch.round(scaled), -qmax, qmax) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class FakeQuant(nn.Module):
    """Parametrization that snaps a weight onto a fixed symmetric k-bit grid.

    Its value is always ``code * scale`` with integer ``code`` in ``[-qmax, qmax]``, which is
    exactly what the packed file stores (`compressors.packing`).
    """

    def __init__(self, bits: int, scale: torch.Tensor) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _RoundToGrid.apply(weight, self.scale, self.qmax)


class _RoundToHalf(torch.autograd.Function):
    """Forward: the nearest float16 value (kept in float32); backward: identity."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return grad


class HalfPrecision(nn.Module):
    """Parametrization that keeps a tensor on float16 values, which the packed file then stores
    in 2 bytes without loss."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return _RoundToHalf.apply(tensor)


class Quantization(Compressor):
    """Quantize every Linear / Conv weight to ``bits`` bits, symmetric, one scale per out channel.

    The grid is fixed when the compressor is applied; fine-tuning then trains latent weights whose
    rounded values are used in every forward pass, so the model stays on the grid.

    Params:
        bits: Bits per weight, 2..8.
        bias: ``fp16`` keeps biases on float16 values (stored in 2 bytes), ``fp32`` leaves them.
    """

    name = "quant"
    kind = "quantizer"
    params = {
        "bits": Integer(2, 8, default=8),
        "bias": Options(("fp16", "fp32"), default="fp16"),
    }

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        for layer in weight_layers(model).values():
            scale = channel_scale(layer.weight, self.bits)
            parametrize.register_parametrization(layer, "weight", FakeQuant(self.bits, scale))
            if self.bias == "fp16" and layer.bias is not None:
                parametrize.register_parametrization(layer, "bias", HalfPrecision())
        return model
