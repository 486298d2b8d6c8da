"""Which layers get activation grids in W8A8: `compressors._act_quant.quantizable`, plus the narrow
depthwise convolutions that an integer layer feeds (no float island between integer kernels).

`compressors._act_quant.int8_friendly` leaves a depthwise convolution of fewer than
``MIN_DEPTHWISE`` channels float: ONNX Runtime's int8 depthwise kernel (64 channels a step with
AVX512-VNNI) runs it slower than the float NCHWc one. That holds where the convolution reads a
float tensor anyway (the MobileNet's first depthwise conv, after its float 1-channel stem). Where
it reads the output of an integer convolution (a pruned MobileNet's stride-2 depthwise conv of 16
channels between two int8 pointwise ones), float costs more than the slower kernel: ONNX Runtime
then runs a ``DequantizeLinear``, the ReLU6 as ``Clip``, a reorder to NCHWc and back, a reshape
and a ``QuantizeLinear`` around it. Profile at batch 32 (ONNX Runtime 1.32, one thread, AMD EPYC
with AVX-512 VNNI; us, per-node medians): that island 26 us and its float conv 6, against 11
for the same conv as ``QLinearConv``; MobileNet widths 16/16/16 in W8A8 ran 1.33x the fp32
16/32/64 graph at batch 32 with the island, 1.59x without (0.80x -> 0.92x at batch 1; thread CPU
time, 15 interleaved rounds). So such a convolution gets grids when the layer whose output it
reads (through BatchNorm, ReLU, ReLU6 and other `compressors._act_quant.PASS_THROUGH` modules,
seen on one calibration batch through module hooks) has them; a chain of them follows its first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressors._act_quant import MIN_DEPTHWISE, NORMS, PASS_THROUGH, quantizable


def narrow_depthwise(layer: nn.Module) -> bool:
    """A depthwise ``Conv1d`` / ``Conv2d`` (one input channel per group, as many outputs as
    groups) of fewer than ``MIN_DEPTHWISE`` channels: what `integer_layers` may add."""
    return (
        isinstance(layer, (nn.Conv1d, nn.Conv2d))
        and layer.in_channels == layer.groups
        and layer.out_channels == layer.groups
        and layer.groups < MIN_DEPTHWISE
    )


def integer_layers(model: nn.Module, batch: Any, forward) -> dict[str, nn.Module]:
    """`quantizable` layers of ``model`` and each `narrow_depthwise` convolution whose input is
    the output of one of them (seen on ``batch``, ``forward(model, batch.inputs)``), by name, in
    the model's order."""
    found = quantizable(model)
    candidates = {
        name: layer
        for name, layer in quantizable(model, every=True).items()
        if name not in found and narrow_depthwise(layer)
    }
    if not candidates:
        return found
    feeders = _feeders(model, batch, forward, set(map(id, candidates.values())))
    integer = set(map(id, found.values()))
    added = True
    while added:  # (a chain of narrow depthwise convolutions follows its first)
        added = False
        for layer in candidates.values():
            if id(layer) not in integer and feeders.get(id(layer)) in integer:
                integer.add(id(layer))
                added = True
    return {
        name: layer
        for name, layer in quantizable(model, every=True).items()
        if id(layer) in integer
    }


def _feeders(model: nn.Module, batch: Any, forward, readers: set[int]) -> dict[int, int]:
    """``{id(reader): id(layer)}``: for each module of ``readers``, the layer (a module
    `quantizable` with ``every=True`` lists) whose output it reads, through `NORMS` and
    `PASS_THROUGH` modules; by tensor identity (the tensors kept alive meanwhile)."""
    layers = set(map(id, quantizable(model, every=True).values()))
    origin: dict[int, tuple[int, torch.Tensor]] = {}
    fed: dict[int, int] = {}

    def made(module, args, output):
        if not isinstance(output, torch.Tensor):
            return
        if id(module) in layers:
            origin[id(output)] = (id(module), output)
        elif isinstance(module, (*NORMS, *PASS_THROUGH)) and args:
            source = origin.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                origin[id(output)] = (source[0], output)

    def read(module, args):
        source = origin.get(id(args[0])) if args else None
        if source is not None and source[1] is args[0]:
            fed.setdefault(id(module), source[0])

    handles = []
    for module in model.modules():
        if id(module) in readers:
            handles.append(module.register_forward_pre_hook(read))
        if id(module) in layers or isinstance(module, (*NORMS, *PASS_THROUGH)):
            handles.append(module.register_forward_hook(made))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, batch.inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return fed
