"""Baseline architectures."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Module):
    """A fully connected ReLU network, e.g. LeNet-300-100 as ``MLP(64, [300, 100], 10)``."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvNet1d(nn.Module):
    """MNIST-1D's reference ``ConvBase``: three strided 1-D convolutions and a linear head.

    With 25 channels on 40-sample signals it has 5,210 parameters.
    """

    def __init__(self, length: int, num_classes: int, *, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        out_length = length
        for kernel in (5, 3, 3):
            out_length = (out_length + 2 - kernel) // 2 + 1
        self.head = nn.Linear(channels * out_length, num_classes)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)))
