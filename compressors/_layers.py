"""Which tensors compressors act on, shared by all methods."""

from __future__ import annotations

from torch import nn

#: Layers whose ``weight`` is pruned and quantized.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with a prunable / quantizable ``weight``, by qualified module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, WEIGHT_LAYERS) and "parametrizations" not in name
    }


def embedding_layers(model: nn.Module) -> dict[str, nn.Embedding]:
    """Embedding tables (token, position, ...), by qualified module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and "parametrizations" not in name
    }
