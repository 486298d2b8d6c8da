"""Activation quantization: calibrated uint8 ranges on the inputs (and conv outputs) of layers.

``quant.activations=8`` (`compressors.quant`) puts the activations that reach each plain
``nn.Linear``, Linear stored transposed (Hugging Face's ``Conv1D`` of GPT-2:
`compressors._targets.is_transposed_linear`, exported as a ``Gemm`` reading its ``(inputs,
outputs)`` weight, its scales per output column), ``nn.Conv1d`` and ``nn.Conv2d`` (torch's
transformer layers' feed-forward Linears and the packed query / key / value projection of their
self-attention included; not the attention's ``out_proj``, which torch's functional attention reads
directly; nor a convolution of fewer than 4 input channels per group, which ONNX Runtime runs faster
in float: `int8_friendly`, nor a narrow depthwise one that reads a float tensor:
`compressors._act_islands`) on an affine uint8 grid (one scale and zero point per tensor, as ONNX
Runtime's static QDQ quantization does), and the outputs of the convolutions too: ONNX Runtime fuses
``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` only with both ends quantized; a
MatMul / Gemm with quantized inputs alone runs as ``MatMulIntegerToFloat`` / ``QGemm``. With the
weights on 8-bit grids (or fewer bits, held in int8) that is W8A8 (`compressors._onnx_qdq` writes
the graph).

Each range is calibrated once on the task's calibration batches (the first
`CALIBRATION_SAMPLES` training samples in their fixed order: the same ranges for every seed)
by an observer: ``minmax`` (the extremes seen), ``percentile`` (the 0.01 % and 99.99 %
quantiles, which clip outliers) or ``mse`` (the clipping of the observed range that minimises
the squared quantization error). The grids then stay fixed: fine-tuning sees every activation
through `ActQuant` (fake quantization, gradients straight through inside the range and zero
outside, as torch's ``fake_quantize_per_tensor_affine`` gives them).

In torch the model keeps running float kernels with fake-quantized activations (the same values
as the integer graph, not its speed): torch's CPU int8 kernels for static quantization
(``torch.ao`` eager mode, fbgemm) need the model rewritten around quant stubs, which a model of
any architecture is not; the integer kernels run in ONNX Runtime.

A conv's output grid sits after the BatchNorm that alone reads the conv's output (the export
folds that BatchNorm into the conv), and it is the next layer's input grid where the output
reaches that layer alone through ReLU, ReLU6, Flatten, max-pooling or dropout modules (`_Flow`:
the same values, and ONNX Runtime then feeds one integer kernel from the other). A layer's
input that is the output of a ReLU, pooling or reshaping module called once is quantized there,
for every reader (``from``): a residual block's sum then adds two quantized tensors, which ONNX
Runtime runs as ``QLinearAdd`` (`compressors._onnx_qdq`), where the identity shortcut would
otherwise read the float tensor beside the integer convolution.

The ranges are plain numbers: the packed file records them as JSON in its model record
(``act``: ``{layer: {"in": [scale, zero_point], "out": [...], "after": norm, "from":
module}}``), and `restore` attaches them to a freshly built model; the module buffers are not
part of the state dict.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compressors._targets import READS_CHILD_WEIGHTS, foreign_parametrization, is_transposed_linear

#: Layers whose inputs get quantized (each exports to a Conv, MatMul or Gemm; and the
#: ``self_attn`` of a transformer layer: `_self_attention`).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Layers whose outputs get quantized as well (ONNX Runtime's ``QLinearConv`` needs both ends).
OUTPUT_LAYERS = (nn.Conv1d, nn.Conv2d)
#: Input channels per group below which a convolution's activations stay float (`int8_friendly`).
MIN_CHANNELS = 4
#: Channels below which a depthwise convolution's activations stay float (`int8_friendly`).
MIN_DEPTHWISE = 32
#: Observers of the calibration.
OBSERVERS = ("minmax", "percentile", "mse")
#: Training samples the ranges are calibrated on.
CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 128
#: Quantile of the ``percentile`` observer (and its mirror at the low end).
PERCENTILE = 0.9999
#: Values kept for the ``percentile`` and ``mse`` observers (the first, in calibration order; the
#: extremes are tracked over all).
KEPT_VALUES = 1 << 20
#: Fractions of the observed range the ``mse`` observer tries.
MSE_RATIOS = tuple(1.0 - 0.02 * i for i in range(30))
QMIN, QMAX = 0, 255
#: Normalisations a conv's output grid may follow (`_place_outputs`).
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Modules that map values on a grid holding 0 to values on that grid (`_Flow`).
PASS_THROUGH = (
    nn.ReLU,
    nn.ReLU6,  # (the consumer's grid, calibrated after it, ends at 6 at most)
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
)


class ActQuant(nn.Module):
    """Fake quantization of one activation tensor on an affine uint8 grid.

    Attributes:
        scale: Step of the grid (a float32 scalar buffer, not in the state dict).
        zero_point: The code of 0.0 (an integer in [0, 255], kept as a float buffer).
        observing: While calibrating, the values seen (the forward pass returns its input).
        enabled: False: the identity (while a graph is exported: the QDQ nodes are written
            from the recorded ranges, `compressors._onnx_qdq`).
    """

    def __init__(self, scale: float = 1.0, zero_point: int = 0, *, side: str = "in") -> None:
        super().__init__()
        self.side = side
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        self.register_buffer("zero_point", torch.tensor(float(zero_point)), persistent=False)
        self.observing: list[torch.Tensor] | None = None
        self.seen: tuple[float, float] | None = None
        self.keep = KEPT_VALUES
        self.enabled = True
        self.source: str | None = None  # (the module whose output it quantizes for every reader)

    @property
    def params(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as plain numbers (the scale a float32 value)."""
        return float(self.scale), int(self.zero_point)

    def set(self, scale: float, zero_point: int) -> None:
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing is not None:
            self._observe(x.detach())
            return x
        if not self.enabled:
            return x
        quantized = torch.fake_quantize_per_tensor_affine(
            x.float(), self.scale, self.zero_point.to(torch.int32), QMIN, QMAX
        )
        return quantized.to(x.dtype)  # (under autocast: computed in float32)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        self.seen = (
            (lo, hi) if self.seen is None else (min(lo, self.seen[0]), max(hi, self.seen[1]))
        )
        kept = sum(t.numel() for t in self.observing)
        if kept < self.keep:
            self.observing.append(x.flatten()[: self.keep - kept].float().cpu())

    def extra_repr(self) -> str:
        scale, zero = self.params
        return f"scale={scale:.6g}, zero_point={zero}"


def quantizable(model: nn.Module, *, every: bool = False) -> dict[str, nn.Module]:
    """The layers of ``model`` whose activations are quantized, by name: plain Linear, Conv1d
    and Conv2d layers (a subclass's forward may differ) and Linears stored transposed (GPT-2's
    ``Conv1D``) whose parent does not read their weight directly (torch's attention; the
    transformer layers' feed-forward Linears are in: `_called_as_module`), and the
    self-attention of torch's transformer layers (`_self_attention`), except convolutions that
    ONNX Runtime's integer kernels run slower than its float ones (`int8_friendly`; ``every``:
    with those, the layers a packed file may hold grids for) and layers whose weight the model
    parametrizes itself (weight_norm: computed in the exported graph, no initializer for a
    grid; `compressors._targets.foreign_parametrization`)."""
    parents = {id(c): m for m in model.modules() for c in m.children()}
    found = {}
    for name, module in model.named_modules():
        parent = parents.get(id(module))
        if _self_attention(parent, module):
            found[name] = module
            continue
        kind = _plain_type(module)
        if kind not in LAYERS and not is_transposed_linear(module):
            continue
        if isinstance(parent, READS_CHILD_WEIGHTS) and not _called_as_module(parent, module):
            continue
        if foreign_parametrization(module, "weight") is not None:
            continue  # (its weight is computed in the graph: weight_norm's; it stays float)
        if not every and not int8_friendly(module):
            continue
        found[name] = module
    return found


def _called_as_module(parent: nn.Module, child: nn.Module) -> bool:
    """Whether ``parent`` (one of `READS_CHILD_WEIGHTS`) calls ``child`` as a module: the
    feed-forward ``linear1`` / ``linear2`` of torch's encoder and decoder layers, which only
    their fast path (``torch._transformer_encoder_layer_fwd``, taken in eval without grad)
    reads directly. A hook on any submodule turns that fast path off (torch checks), so the
    input quantizer's pre-hook sees every call. (``nn.MultiheadAttention``'s ``out_proj`` is
    read by ``F.multi_head_attention_forward``: no grid there; its ``in_proj_weight`` reads
    the attention's input: `_self_attention`.)"""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return isinstance(parent, layers) and child in (parent.linear1, parent.linear2)


def _self_attention(parent: nn.Module | None, module: nn.Module) -> bool:
    """Whether ``module`` is the ``self_attn`` of a torch encoder or decoder layer with one
    packed ``in_proj_weight``: the layer calls it as a module with one tensor as query, key and
    value, and the export computes the three projections as one MatMul reading that weight, so
    an input grid (on all three, `_quantize_input`) makes it an integer MatMul."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return (
        isinstance(parent, layers)
        and module is parent.self_attn
        and isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
    )


def int8_friendly(layer: nn.Module) -> bool:
    """False for a convolution with fewer than `MIN_CHANNELS` input channels per group (an
    image's 1 or 3 channels in a first layer), depthwise ones aside: ONNX Runtime's x86
    ``QLinearConv`` then runs im2col and an int8 GEMM over a handful of columns, slower than
    its float kernels. 3x3 convolutions to 16 channels on 8x8 images, batch 32, one thread:
    1 input channel 65 us as ``QLinearConv`` against 25 us float (NCHWc) with the same output
    grid, 3 channels 156 against 45 us, where 24 channels ran 3.3x faster in int8 and 25
    channels 2.8x. Such a layer keeps float activations and weights (`compressors._onnx_qdq`);
    the next layer's input grid quantizes its output. A depthwise convolution with fewer than
    `MIN_DEPTHWISE` channels stays float too: ONNX Runtime's int8 depthwise kernel (64 channels
    a step with AVX512-VNNI) ran the zoo MobileNet's 16-channel 3x3 one on 8x8 images, batch 32,
    in 23-25 us against 12-13 us float (NCHWc, after the float stem: no layout change between
    them), the model 1.3x faster than fp32 against 0.97x; its 32-channel stride-2 one ran in
    10 us against 8-9 us float, and stays int8 between two int8 pointwise convolutions (a float
    one there would cost a ``DequantizeLinear``, a ``QuantizeLinear`` and two layout changes).
    So does a narrower depthwise convolution that an integer layer feeds (a pruned MobileNet's):
    W8A8 gives it grids after all (`compressors._act_islands.integer_layers`)."""
    if not isinstance(layer, OUTPUT_LAYERS):
        return True
    per_group = layer.in_channels // layer.groups
    if per_group == 1 and layer.out_channels == layer.groups:  # (depthwise)
        return layer.out_channels >= MIN_DEPTHWISE
    return per_group >= MIN_CHANNELS


def _plain_type(module: nn.Module) -> type:
    from torch.nn.utils.parametrize import type_before_parametrizations

    return type_before_parametrizations(module)


def attach(
    model: nn.Module,
    ranges: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    layers: Mapping[str, nn.Module] | None = None,
) -> None:
    """Give each layer of ``ranges`` (of ``layers`` when None: by name, as
    `compressors._act_islands.integer_layers` finds them; every `quantizable` layer when both
    are None) its activation quantizers with the recorded ``[scale, zero_point]`` of each (1.0
    and 0 until calibrated): ``act_in`` on the layer, and where the record has ``out``,
    ``act_out`` on the module named by its ``after`` (the BatchNorm that reads a conv's output)
    or on the layer itself."""
    if ranges is not None:
        layers = ranges
    elif layers is None:
        layers = quantizable(model)
    for name in layers:
        layer = model.get_submodule(name)
        record = (ranges or {}).get(name, {})
        if not hasattr(layer, "act_in"):
            layer.act_in = ActQuant(*record.get("in", (1.0, 0)))
            layer.register_forward_pre_hook(_quantize_input)
        if "out" in record:
            _attach_output(model, name, record.get("after", name), record["out"])
        if "from" in record:
            _share_input(model, layer.act_in, record["from"])


def _share_input(model: nn.Module, quant: ActQuant, producer: str) -> None:
    """Quantize the output of module ``producer`` (what ``quant``'s layer reads) with
    ``quant`` for every reader of it: a residual addition reads it on the grid too, and ONNX
    Runtime runs that addition as ``QLinearAdd`` between integer convolutions."""
    module = model.get_submodule(producer)
    if not hasattr(module, "act_shared"):
        quant.source = producer
        module.act_shared = quant
        module.register_forward_hook(_quantize_shared)


def _quantize_shared(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.act_shared(output)


def _attach_output(model: nn.Module, layer: str, at: str, grid: Any = (1.0, 0)) -> None:
    module = model.get_submodule(at)
    if not hasattr(module, "act_out"):
        module.act_out = ActQuant(*grid, side="out")
        module.act_out.of = layer
        module.register_forward_hook(_quantize_output)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    quantized = module.act_in(x)  # (self-attention's key and value: the same tensor, once)
    return (quantized, *(quantized if a is x else a for a in args[1:]))


def _quantize_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.act_out(output)


def ranges(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The activation grids of ``model``, by layer: ``{"in": [scale, zero_point], "out": ...,
    "after": module}`` (``after``: where the output grid sits when not on the layer itself);
    what the packed file records; empty for a model without activation quantization."""
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        quant = getattr(module, "act_in", None)
        if isinstance(quant, ActQuant):
            found.setdefault(name, {})["in"] = list(quant.params)
            if getattr(quant, "source", None) is not None:
                found[name]["from"] = quant.source
    for name, module in model.named_modules():
        quant = getattr(module, "act_out", None)
        if isinstance(quant, ActQuant):
            entry = found.setdefault(quant.of, {})
            entry["out"] = list(quant.params)
            if name != quant.of:
                entry["after"] = name
    return found


def quantizers(model: nn.Module) -> Iterator[ActQuant]:
    return (m for m in model.modules() if isinstance(m, ActQuant))


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within: every `ActQuant` of ``model`` is the identity (export of the float graph)."""
    found = list(quantizers(model))
    before = [q.enabled for q in found]
    for q in found:
        q.enabled = False
    try:
        yield
    finally:
        for q, flag in zip(found, before, strict=True):
            q.enabled = flag


def calibrate(model: nn.Module, batches: list, forward, *, observer: str) -> None:
    """Set the grid of every `ActQuant` of ``model`` from its values on ``batches``.

    Args:
        model: A model with quantizers (`attach`).
        batches: Calibration batches (each with ``inputs``).
        forward: ``forward(model, inputs)``: the task's call of the model.
        observer: One of `OBSERVERS`.

    Raises:
        ValueError: If ``observer`` is unknown or no batch reaches a quantizer.
    """
    if observer not in OBSERVERS:
        raise ValueError(
            f"The 'quant.calibration' parameter must be one of {', '.join(map(repr, OBSERVERS))}."
            f" Got {observer!r} instead."
        )
    training = model.training
    model.eval()
    if batches:
        with torch.no_grad():
            _place_outputs(model, batches[0], forward)
    found = list(quantizers(model))
    for q in found:  # (min-max needs the extremes alone)
        q.observing, q.seen, q.keep = [], None, 0 if observer == "minmax" else KEPT_VALUES
    flow = _Flow()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                with flow.tracking(model) if i == 0 else contextlib.nullcontext():
                    forward(model, batch.inputs)
    finally:
        model.train(training)
    try:
        for q in found:
            if q.seen is None:
                raise ValueError("no calibration batch reached an activation quantizer")
            values = torch.cat(q.observing) if q.observing else torch.tensor(q.seen)
            q.set(*grid(values, q.seen, observer))
    finally:
        for q in found:
            q.observing, q.seen = None, None
    for out, consumer in flow.shared():
        out.set(*consumer.params)
    names = {id(m): n for n, m in model.named_modules()}
    for quant, producer in flow.producers():
        _share_input(model, quant, names[id(producer)])


def _place_outputs(model: nn.Module, batch: Any, forward) -> None:
    """Give each convolution its output grid: on the BatchNorm that alone reads its output
    (ONNX Runtime folds the BatchNorm into the Conv before it fuses ``QLinearConv``), else on
    the convolution itself. Which module reads what is seen on one batch through hooks."""
    convs = {  # (the attached layers: `attach`)
        name: layer
        for name, layer in model.named_modules()
        if isinstance(getattr(layer, "act_in", None), ActQuant)
        and isinstance(layer, OUTPUT_LAYERS)
        and not hasattr(layer, "act_out")
    }
    if not convs:
        return
    names = {id(m): n for n, m in model.named_modules()}
    made: dict[int, tuple[str, torch.Tensor]] = {}
    readers: dict[str, list[nn.Module]] = {name: [] for name in convs}

    def produced(module, args, output):
        made[id(output)] = (names[id(module)], output)

    def read(module, args, output=None):
        for x in args:
            source = made.get(id(x))
            if source is not None and source[1] is x:
                readers[source[0]].append(module)

    handles = [layer.register_forward_hook(produced) for layer in convs.values()]
    for module in model.modules():
        if isinstance(module, ActQuant) or not (module._parameters or not list(module.children())):
            continue
        handles.append(module.register_forward_pre_hook(read))
    try:
        forward(model, batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name in convs:
        found = readers[name]
        norm = found[0] if len(found) == 1 and isinstance(found[0], NORMS) else None
        at = names[id(norm)] if norm is not None and not hasattr(norm, "act_out") else name
        _attach_output(model, name, at)


class _Flow:
    """Which output grid feeds which input grid (a conv, a ReLU, the next conv): seen on one
    calibration batch through module hooks, by tensor identity (the tensors kept alive meanwhile
    so that no identity is reused). An output read by exactly one module call, through
    `PASS_THROUGH` modules to exactly one input quantizer, takes that input's grid: the values
    are the same as quantizing the consumer's input alone (a grid holding 0 commutes with ReLU,
    pooling and reshapes), and ONNX Runtime then fuses the ReLU and both QDQ pairs away, so that
    one ``QLinearConv`` feeds the next. (Reads by functions in a ``forward``, not modules, are
    not seen: a conv output also added elsewhere after a ReLU module would be clipped at 0 for
    that use too; the trial's score measures what is shipped.)"""

    def __init__(self) -> None:
        self.origin: dict[int, tuple[ActQuant, torch.Tensor]] = {}
        self.uses: dict[int, int] = {}
        self.pairs: dict[int, tuple[ActQuant, set[int], list[ActQuant]]] = {}
        self.made: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # PASS_THROUGH outputs
        self.calls: dict[int, int] = {}
        self.fed: dict[int, tuple[ActQuant, nn.Module]] = {}  # input quantizer -> producer

    @contextmanager
    def tracking(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for module in model.modules():
            if isinstance(module, ActQuant):
                handles.append(module.register_forward_hook(self._quantizer))
            elif hasattr(module, "act_in"):
                continue  # (a quantized layer reads its input through its quantizer)
            elif not list(module.children()) or module._parameters:
                handles.append(module.register_forward_hook(self._module))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.origin.clear()
            self.made.clear()

    def _quantizer(self, module: ActQuant, args: tuple, output: Any) -> None:
        x = args[0]
        made = self.made.get(id(x))
        if module.side == "in" and made is not None and made[1] is x:
            self.fed.setdefault(id(module), (module, made[0]))
        source = self.origin.get(id(x))
        if source is not None and source[1] is x:
            out = source[0]
            self.uses[id(out)] = self.uses.get(id(out), 0) + 1
            entry = self.pairs.setdefault(id(out), (out, set(), []))
            if id(module) not in entry[1]:
                entry[1].add(id(module))
                entry[2].append(module)
        if module.side == "out":
            self.origin[id(output)] = (module, output)

    def _module(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        if isinstance(module, PASS_THROUGH) and isinstance(output, torch.Tensor):
            self.made[id(output)] = (module, output)  # (the outputs `producers` may share)
        for x in args:
            source = self.origin.get(id(x))
            if source is None or source[1] is not x:
                continue
            out = source[0]
            self.uses[id(out)] = self.uses.get(id(out), 0) + 1
            if isinstance(module, PASS_THROUGH) and isinstance(output, torch.Tensor):
                self.origin[id(output)] = (out, output)
                self.uses[id(out)] -= 1  # (read on the way to a consumer)

    def producers(self) -> list[tuple[ActQuant, nn.Module]]:
        """``(input quantizer, module)``: the `PASS_THROUGH` module (a ReLU, pooling; not a
        LayerNorm, whose residual stream's outliers one uint8 grid would clip for the sum),
        called once, whose output the quantizer reads, where every quantizer reading that
        output has the same grid (one tensor, one grid: calibrated alike)."""
        by_module: dict[int, list[tuple[ActQuant, nn.Module]]] = {}
        for quant, module in self.fed.values():
            by_module.setdefault(id(module), []).append((quant, module))
        return [
            found[0]
            for key, found in by_module.items()
            if self.calls.get(key) == 1 and len({q.params for q, _ in found}) == 1
        ]

    def shared(self) -> list[tuple[ActQuant, ActQuant]]:
        return [
            (out, consumers[0])
            for key, (out, _, consumers) in self.pairs.items()
            if len(consumers) == 1 and self.uses.get(key) == 1
        ]


def grid(values: torch.Tensor, seen: tuple[float, float], observer: str) -> tuple[float, int]:
    """``(scale, zero_point)`` of the uint8 grid that ``observer`` picks for ``values``
    (``seen``: their extremes, over every value observed)."""
    lo, hi = seen
    if observer == "percentile" and values.numel() > 1:
        sample = values.to(torch.float64)
        lo, hi = (float(torch.quantile(sample, q)) for q in (1 - PERCENTILE, PERCENTILE))
    elif observer == "mse":
        lo, hi = _mse_range(values, lo, hi)
    return affine(lo, hi)


def affine(lo: float, hi: float) -> tuple[float, int]:
    """The uint8 grid spanning ``[lo, hi]`` widened to hold 0.0 exactly: ``(scale, zero)``,
    the scale a float32 value."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite (NaN or inf in the model)")
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(torch.tensor((hi - lo) / (QMAX - QMIN), dtype=torch.float32))
    zero = int(min(QMAX, max(QMIN, round(QMIN - lo / scale))))
    return scale, zero


def _mse_range(values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    best, best_err = (lo, hi), math.inf
    for ratio in MSE_RATIOS:
        scale, zero = affine(lo * ratio, hi * ratio)
        codes = torch.clamp(torch.round(values / scale) + zero, QMIN, QMAX)
        err = float(((codes - zero) * scale - values).pow(2).sum())
        if err < best_err:
            best, best_err = (lo * ratio, hi * ratio), err
    return best


def restore(path: Any, model: nn.Module, record: Any) -> None:
    """Attach the activation grids a packed file records (``act``) to ``model``, after checking
    every field (a layer of the model that quantizes activations, a finite positive float32
    scale and a zero point in [0, 255] per side).

    Raises:
        PackedFileError: If the record is not of that form.
    """
    from compressors._container import PackedFileError

    if not record:
        return
    layers = quantizable(model, every=True)  # (files written before `int8_friendly`)
    modules = dict(model.named_modules())
    for name, sides in record.items():
        ok = isinstance(sides, dict) and set(sides) <= {"in", "out", "after", "from"}
        ok = ok and "in" in sides
        grids = [v for k, v in sides.items() if k not in ("after", "from")] if ok else []
        source = sides.get("from") if ok else None
        if source is not None and (
            not isinstance(source, str) or not source or source not in modules
        ):
            ok = False
        after = sides.get("after") if ok else None
        if after is not None and ("out" not in sides or not isinstance(after, str)):
            ok = False
        if after is not None and ok and not isinstance(modules.get(after), NORMS):
            ok = False
        if name not in layers or not ok or not all(map(_valid_grid, grids)):
            raise PackedFileError(
                f"{path}: its activation grid of {name!r} ({sides!r}) is not that of a Linear "
                "(or transposed Linear), Conv1d, Conv2d or transformer layer's self-attention of "
                "the model with [scale > 0, zero point in 0..255] (and its output's after a "
                "BatchNorm of the model, its input from a module of it)"
            )
    attach(model, record)


def _valid_grid(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 2:
        return False
    scale, zero = value
    return (
        isinstance(scale, float)
        and math.isfinite(scale)
        and scale > 0
        and isinstance(zero, int)
        and not isinstance(zero, bool)
        and QMIN <= zero <= QMAX
    )
