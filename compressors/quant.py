"""Weight quantization onto per-output-channel grids: k-bit, ternary or binary.

A grid is fixed per layer when the weights are quantized: one float16 scale per output channel
(for k-bit grids the clipping that minimises the squared error, for binary and ternary grids the
closed forms of XNOR-Net and Ternary Weight Networks). Quantization is either

- ``qat``: applied before fine-tuning, which then trains latent float weights whose rounded
  values are used in every forward pass (a straight-through estimator), or
- ``ptq``: applied once after fine-tuning, with no training on the grid.

The packed file stores the integer codes and scales (`compressors.packing`); ``runtime='int8'``
also makes the shipped model run its Linear layers with int8 kernels (`compressors.runtime`).
``activations=8`` adds calibrated uint8 grids on the activations (W8A8, `compressors._act_quant`),
which the ONNX export turns into ONNX Runtime's integer Conv / Gemm / MatMul kernels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressors import _act_islands, _act_quant
from compressors._base import CompressionContext, Compressor, UnsupportedModelError
from compressors._params import AnyOf, Integer, InvalidParameterError, Options
from compressors._targets import targets
from compressors.packing import Codes
from compressors.runtime import INT8_MODULES

_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)
#: Clipping ratios tried for k-bit grids (the one with the least squared error wins per channel).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
#: Values whose grids the clipping search (`make_grid`) tries at a time: rows in chunks, through
#: one reused buffer of this many values (4 MiB), rather than a fresh temporary of the whole tensor
#: per operation and ratio, whose pages the system faulted in every time (4096 x 4096 at 4 bits:
#: 1.9 s -> 0.4 s; the same scales). Smaller chunks cost more in per-call overhead than they gain.
_GRID_CHUNK = 1 << 20
#: Values turned into codes at a time (`FakeQuant.packed`).
_CHUNK = 1 << 20
#: Ternary weights below this fraction of the channel's mean magnitude become 0 (TWN's 0.7).
TERNARY_THRESHOLD = 0.7


class FakeQuant(nn.Module):
    """Parametrization that snaps a weight onto a fixed per-channel grid.

    Its value is always ``code * scale`` with integer codes: in ``[-qmax, qmax]`` for ``int``
    grids, ``{-1, +1}`` for ``binary`` (a weight that is exactly 0, i.e. pruned, stays 0) and
    ``{-1, 0, +1}`` for ``ternary``. That is exactly what the packed file stores. Gradients pass
    straight through where ``|w / scale| <= qmax + 0.5`` and are zero outside (clipped STE).

    Attributes:
        scheme: ``int``, ``binary`` or ``ternary``.
        qmax: Largest code magnitude (1 for binary and ternary).
        runtime: ``float``, or ``int8`` when the shipped layer runs on int8 kernels.
    """

    def __init__(
        self,
        scheme: str,
        scale: torch.Tensor,
        *,
        qmax: int = 1,
        threshold: torch.Tensor | None = None,
        runtime: str = "float",
    ) -> None:
        super().__init__()
        self.scheme, self.qmax, self.runtime = scheme, qmax, runtime
        self.register_buffer("scale", scale)
        self.register_buffer(
            "threshold", threshold if threshold is not None else scale.new_zeros(0)
        )

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of ``weight`` on this grid (one new tensor: the rest is
        done in place)."""
        if self.scheme == "int":
            return torch.div(weight.detach(), self.scale).round_().clamp_(-self.qmax, self.qmax)
        if self.scheme == "binary":
            return torch.sign(weight.detach())
        return torch.sign(weight.detach()).mul_(weight.detach().abs() > self.threshold)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # no gradient to pass: the grid's values alone
            return self.codes(weight).mul_(self.scale)
        if weight.requires_grad or not isinstance(weight, nn.Parameter):
            return self._fake_quantize(weight)
        # A frozen parameter (e.g. a transformer's embedding table) gives the same values until
        # it is changed in place: snap it once, not in every forward pass. (Only a parameter the
        # module keeps alive: a temporary tensor's address is reused by the next one.)
        key = (id(weight), weight.data_ptr(), weight._version)
        if getattr(self, "_frozen_key", None) != key:
            self._frozen_key, self._frozen = key, self._fake_quantize(weight)
        return self._frozen

    def packed(self, value: torch.Tensor) -> Codes:
        """The integer codes of ``value`` (a value of this grid) and its per-row scales, for the
        packed file; the scales are float16 values (see `make_grid`), stored in 2 bytes."""
        value = value.detach()
        scale = self.scale
        per_row = scale.numel() == 1 or (
            value.dim() > 0 and scale.dim() > 0 and scale.numel() == scale.shape[0] == len(value)
        )  # (not a transposed Linear's scales per column, `make_grid`'s axis 1)
        if value.dim() == 0 or not per_row:
            return Codes(
                torch.div(value, self.scale).round_().to(torch.int8),
                "scaled",
                {"scale": self.scale},
            )
        rows, scale = value.reshape(value.shape[0], -1), self.scale.reshape(-1, 1)
        codes = torch.empty(rows.shape, dtype=torch.int8, device=value.device)  # |code| <= 127
        step = max(1, _CHUNK // max(1, rows.shape[1]))
        for start in range(0, len(rows), step):  # (no float temporary of the whole tensor)
            part = slice(start, start + step)
            codes[part] = torch.div(rows[part], scale if len(scale) == 1 else scale[part]).round_()
        return Codes(codes.view(value.shape), "scaled", {"scale": self.scale})

    def packed_from(self, weight: torch.Tensor) -> Codes | None:
        """``packed(self(weight))`` from this parametrization's input ``weight``, without making
        its float output: the codes the output is made of (rounding ``code * scale`` back
        through the scale gives the code again), so that a packed 4-bit model's codes are
        computed once rather than twice (a quarter of packing it). None where this does not
        hold or a zero value could have a nonzero code (not float32; a scale not positive and
        finite): then the caller evaluates the output and calls `packed`."""
        scale = self.scale
        if (
            weight.dtype != torch.float32
            or scale.dtype != torch.float32
            or not bool(((scale > 0) & torch.isfinite(scale)).all())
        ):
            return None
        weight = weight.detach()
        per_row = (
            self.scheme == "int"
            and weight.dim() > 0
            and (
                scale.numel() == 1
                or scale.dim() > 0
                and scale.numel() == scale.shape[0] == len(weight)
            )
        )
        if not per_row:
            return Codes(self.codes(weight).to(torch.int8), "scaled", {"scale": scale})
        rows, scale = weight.reshape(weight.shape[0], -1), scale.reshape(-1, 1)
        codes = torch.empty(rows.shape, dtype=torch.int8, device=weight.device)
        step = max(1, _CHUNK // max(1, rows.shape[1]))
        for start in range(0, len(rows), step):  # (no float temporary of the whole tensor)
            part = slice(start, start + step)
            codes[part] = (
                torch.div(rows[part], scale if len(scale) == 1 else scale[part])
                .round_()
                .clamp_(-self.qmax, self.qmax)
            )
        return Codes(codes.view(weight.shape), "scaled", {"scale": self.scale})

    def _fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        quantized = self.codes(weight).mul_(self.scale)
        inside = (weight / self.scale).abs() <= self.qmax + 0.5
        return quantized + (weight - weight.detach()) * inside  # value: quantized; grad: STE

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, qmax={self.qmax}, runtime={self.runtime}"


def make_grid(
    weight: torch.Tensor, bits: int | str, *, runtime: str = "float", axis: int = 0
) -> FakeQuant:
    """The grid of ``weight`` for ``bits`` (1..8, or ``"ternary"``), one scale per slice along
    ``axis`` (a target's `channel_axis`: 1 for the ``(inputs, outputs)`` weight of a Linear
    stored transposed, GPT-2's ``Conv1D``, so that its scales are per output channel as ONNX
    Runtime's integer kernels read them).

    Scales are rounded to float16 values, so the packed file stores them in 2 bytes without loss;
    a channel of zeros gets scale 1 so that its codes stay 0.
    """
    if axis not in (0, 1) or (axis == 1 and weight.dim() != 2):
        raise ValueError(f"axis must be 0, or 1 for a 2-D weight, but got axis={axis}")
    if axis == 1:
        grid = make_grid(weight.detach().t(), bits, runtime=runtime)
        grid.scale = grid.scale.reshape(1, -1)
        if grid.threshold.numel():
            grid.threshold = grid.threshold.reshape(1, -1)
        return grid
    w = weight.detach().flatten(1)
    shape = (-1, *([1] * (weight.dim() - 1)))
    if bits == 1:
        scale = _masked_mean(w.abs(), w != 0)  # XNOR-Net: mean |w| of the (unpruned) weights
        return FakeQuant("binary", _fp16(scale).view(shape), runtime=runtime)
    if bits == "ternary":
        threshold = TERNARY_THRESHOLD * _masked_mean(w.abs(), w != 0)  # TWN
        scale = _masked_mean(w.abs(), w.abs() > threshold[:, None])
        return FakeQuant(
            "ternary",
            _fp16(scale).view(shape),
            threshold=threshold.view(shape),
            runtime=runtime,
        )
    qmax = 2 ** (bits - 1) - 1
    dtype = torch.promote_types(w.dtype, torch.float32)
    best = torch.empty(w.shape[0], dtype=dtype, device=w.device)
    step = max(1, _GRID_CHUNK // max(1, w.shape[1]))
    buffer = None
    for start in range(0, len(w), step):  # (no temporary of ``w``'s size)
        rows = w[start : start + step]
        if buffer is None or buffer.shape != rows.shape:
            buffer = torch.empty_like(rows)
        best[start : start + step] = _best_scale(rows, qmax, buffer)
    return FakeQuant("int", best.view(shape), qmax=qmax, runtime=runtime)


def _best_scale(rows: torch.Tensor, qmax: int, buffer: torch.Tensor) -> torch.Tensor:
    """Per row of ``rows``, the scale of `CLIP_RATIOS` whose grid has the least squared error
    (the first of equals), each ratio's error computed in ``buffer`` (``rows``' shape)."""
    amax = torch.abs(rows, out=buffer).amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best = torch.ones_like(amax)
    for ratio in CLIP_RATIOS:
        scale = _fp16(amax * ratio / qmax)[:, None]
        err = torch.div(rows, scale, out=buffer).round_().clamp_(-qmax, qmax).mul_(scale)
        err = err.sub_(rows).square_().sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, scale[:, 0], best), torch.where(better, err, best_err)
    return best


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum(dim=1)
    return torch.where(count > 0, (values * mask).sum(dim=1) / count.clamp(min=1), 1.0)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)


class _RoundToHalf(torch.autograd.Function):
    """Forward: the nearest float16 value (kept in float32); backward: identity."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return grad


#: Bits at most of a weight read by ONNX Runtime's integer kernels (``activations=8``): on x86
#: CPUs without VNNI (AVX2) its uint8 x int8 kernels add each pair of products in saturating
#: int16 (``vpmaddubsw``), which 8-bit weights overflow (255 x 127 x 2 > 32767) and 7-bit ones
#: cannot (255 x 64 x 2 <= 32767), as ``quantize_static``'s ``reduce_range``. Measured on a CNN
#: of 7-14 channels with BatchNorm on digits (an AMD EPYC with AVX2): its 8-bit graph scored 87.7%
#: in ONNX Runtime against 94.4% for the same graph run in float (and the torch model), outputs
#: off by 32% of the largest; the graph with unsigned 8-bit weights, which no kernel overflows,
#: matched to 1e-6.
INTEGER_KERNEL_BITS = 7


class HalfPrecision(nn.Module):
    """Parametrization that keeps a tensor on float16 values, which the packed file then stores
    in 2 bytes without loss."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return _RoundToHalf.apply(tensor)


class Quantization(Compressor):
    """Quantize every weight tensor (`compressors._targets`: Linear and Conv weights, attention
    projections, recurrent weights, embedding tables), one scale per row (output channel, gate
    unit or token).

    Params:
        bits: Bits per weight, 1..8 (1 = binary, sign x scale), or ``"ternary"`` ({-1, 0, +1} x
            scale).
        mode: ``qat`` quantizes before fine-tuning and fine-tunes on the grid (straight-through
            estimator); ``ptq`` quantizes the fine-tuned model once, after fine-tuning.
        runtime: ``int8`` ships the layers torch has int8 kernels for (Linear layers whose parent
            does not read their weight, LSTM and GRU) as dynamically quantized modules (int8
            weights exactly as on the grid, activations quantized on the fly), which is faster on
            CPU for large batches; other layers stay float. ``float`` ships float32 layers.
        bias: ``fp16`` keeps the biases of quantized layers on float16 values (stored in 2
            bytes), ``fp32`` leaves them.
        embeddings: ``same`` quantizes embedding tables like the other weights (``bits``);
            ``float`` leaves them as they are; 2..8 puts them on a grid of that many bits. Their
            lookups stay float.
        activations: ``8`` also quantizes the activations entering each plain Linear (or Linear
            stored transposed, GPT-2's Conv1D), Conv1d and Conv2d layer (and leaving each
            convolution) onto calibrated uint8 grids (`compressors._act_quant`): W8A8, the weights
            of those layers on 7-bit grids at most (`INTEGER_KERNEL_BITS`: ONNX Runtime's x86
            integer kernels without VNNI overflow on 8-bit ones; layers left float keep ``bits``).
            With ``mode='qat'`` they are calibrated before fine-tuning, which then sees them
            fake-quantized (straight-through gradients); with ``ptq`` after it. The packed file
            records the grids; the ONNX graph carries them as QuantizeLinear / DequantizeLinear
            pairs that ONNX Runtime runs on integer kernels (``QLinearConv``,
            ``MatMulIntegerToFloat``, ``QGemm``). In torch the shipped model computes the same
            values with float kernels (fake quantization: no integer speed there). ``float`` leaves
            activations float.
        calibration: The observer that sets each activation range on the task's calibration
            batches: ``minmax``, ``percentile`` (99.99 %) or ``mse`` (least squared error).
            Only with ``activations=8``.
    """

    name = "quant"
    kind = "quantizer"
    shrinks = True
    acts_on = "quantizes Linear, Conv, attention, recurrent and embedding weight tensors"
    params = {
        "bits": AnyOf((Integer(1, 8), Options(("ternary",))), default=8),
        "mode": Options(("qat", "ptq"), default="qat"),
        "runtime": Options(("float", "int8"), default="float"),
        "bias": Options(("fp16", "fp32"), default="fp16"),
        "embeddings": AnyOf((Options(("same", "float")), Integer(2, 8)), default="same"),
        "activations": Options(("float", 8), default="float"),
        "calibration": Options(_act_quant.OBSERVERS, default="minmax"),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.activations == 8 and self.runtime == "int8":
            raise InvalidParameterError(
                "The 'quant.activations' parameter of compressor 'quant' is 8, which cannot be "
                "combined with quant.runtime='int8' (torch's dynamic int8 layers quantize "
                "activations on the fly, with no calibrated grid). Use quant.runtime=float: "
                "quantized activations run on integer kernels in ONNX Runtime."
            )

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        skip = ("embedding",) if self.embeddings == "float" else ()
        return [n for n, t in targets(model).items() if t.kind not in skip]

    def check_model(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """`claims` of ``model``, after checking that it has tensors to quantize and, with
        ``runtime='int8'``, a layer torch's int8 kernels can run.

        Raises:
            UnsupportedModelError: If it has no tensor to quantize, or ``runtime='int8'`` would
                ship no layer on int8 kernels (a model of convolutions only, say).
        """
        claimed = super().check_model(model, example_inputs)
        kinds = ", ".join(
            sorted({type(m).__name__ for m in model.modules() if _has_own_weights(m)})
        )
        if self.activations == 8 and not _act_quant.quantizable(model):
            raise UnsupportedModelError(
                "The 'quant.activations' parameter of compressor 'quant' is 8, but this model "
                "has no layer whose activations it quantizes: plain Linear, Conv1d and Conv2d "
                "layers, Linears stored transposed (GPT-2's Conv1D) (not torch attention's "
                "out_proj; convolutions of at least 4 input channels per group, or depthwise); "
                f"the model's layers are {kinds or 'none'}. Use quant.activations=float."
            )
        if self.runtime == "int8" and not any(t.int8 for t in targets(model).values()):
            raise UnsupportedModelError(
                "The 'quant.runtime' parameter of compressor 'quant' is 'int8', but this model "
                "has no layer int8 kernels run: they run "
                f"{', '.join(t.__name__ for t in INT8_MODULES)} layers (a Linear whose parent "
                "does not read its weight directly), and the model's layers are "
                f"{kinds or 'none'}. Use quant.runtime=float (its weights are quantized all the "
                "same)."
            )
        return claimed

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        return self._quantize(model, ctx) if self.mode == "qat" else model

    def finalize(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        return self._quantize(model, ctx) if self.mode == "ptq" else model

    def finalizes(self) -> bool:
        return self.mode == "ptq"

    def _quantize(self, model: nn.Module, ctx: CompressionContext | None = None) -> nn.Module:
        if self.activations != 8:
            self._quantize_weights(model)
            return model
        batches = self._calibration_batches(model, ctx)
        # (the integer layers: `quantizable`'s, and the narrow depthwise convolutions that
        # one of them feeds, seen on a calibration batch)
        layers = (
            _act_islands.integer_layers(model, batches[0], ctx.train.forward)
            if batches
            else _act_quant.quantizable(model)
        )
        self._quantize_weights(model, layers)
        _act_quant.attach(model, layers=layers)  # (calibrated after the weights are on grids)
        _act_quant.calibrate(model, batches, ctx.train.forward, observer=self.calibration)
        return model

    def _calibration_batches(self, model: nn.Module, ctx: CompressionContext | None) -> list:
        """``ctx.train``'s calibration batches."""
        if ctx is None or ctx.train is None:
            raise ValueError(
                "compressor 'quant' with quant.activations=8 requires ['train'] in its context "
                "(the calibration batches)"
            )
        device = next((p.device for p in model.parameters()), None)
        return ctx.train.calibration(
            samples=_act_quant.CALIBRATION_SAMPLES,
            batch_size=_act_quant.CALIBRATION_BATCH,
            device=device,
        )

    def _quantize_weights(self, model: nn.Module, layers: dict | None = None) -> None:
        owners = {}
        # (``layers``: those whose inputs get grids, ONNX Runtime's integer kernels)
        integer = {id(m) for m in (layers or {}).values()}
        for target in targets(model).values():
            bits = self.bits
            if target.kind == "embedding" and self.embeddings != "same":
                if self.embeddings == "float":
                    continue
                bits = self.embeddings
            elif isinstance(bits, int) and any(id(s.module) in integer for s in target.sites):
                bits = min(bits, INTEGER_KERNEL_BITS)
            runtime = self.runtime if target.int8 else "float"
            grid = make_grid(target.weight, bits, runtime=runtime, axis=target.channel_axis)
            target.register(grid)
            owners.update({id(site.module): site.module for site in target.sites})
        if self.bias == "fp16":
            half_biases(owners.values())


def _has_own_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def half_biases(modules: Iterable[nn.Module]) -> None:
    """Keep the biases of ``modules`` (every parameter with ``bias`` in its name, such as an
    LSTM's ``bias_ih_l0``) on float16 values (`HalfPrecision`), so the file stores them in 2
    bytes."""
    for module in modules:
        for name, _ in list(module.named_parameters(recurse=False)):
            if "bias" in name and not parametrize.is_parametrized(module, name):
                parametrize.register_parametrization(module, name, HalfPrecision())
