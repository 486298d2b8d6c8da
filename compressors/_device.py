"""Where a model's tensors are, and inputs moved there.

Compressors work where the model's tensors are (a trial moves its copy of the baseline to its
device once, `search.run.trial`): new tensors are made on ``weight.device`` (``new_zeros``,
``zeros_like``, ``device=``), and inputs the context holds on the CPU (its example inputs) are
moved to the model's device before a forward pass. Where a method needs the CPU (random draws
from a seeded CPU generator, so that a seed draws the same on any device; channel scores read
into Python lists), it says so where it does it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model without any."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (a tensor, a tuple, list or mapping of them) moved to
    ``device``; anything else is left as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value
