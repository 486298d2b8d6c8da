"""The zoo's models: small, but built from the layers users' models are built from."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(
    cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (through a 1x1 convolution and
    batch norm when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride=stride), nn.ReLU(), *_conv_bn(cout, cout, 3)
        )
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride=stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-style CNN on ``(batch, channels, height, width)`` images: a conv + BN + ReLU stem,
    a residual block with an identity shortcut, one that halves the resolution with a 1x1
    projection shortcut, global average pooling and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU())
        self.block1 = ResidualBlock(width, width)
        self.block2 = ResidualBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.pool(x).flatten(1))


class MobileNet(nn.Module):
    """A MobileNet-style CNN: a conv + BN + ReLU6 stem, then depthwise-separable blocks (a 3x3
    depthwise convolution, ``groups`` = channels, + BN + ReLU6, then a 1x1 pointwise convolution
    + BN + ReLU6), global average pooling and a linear head.

    Args:
        in_channels: Channels of the input images.
        num_classes: Outputs of the head.
        widths: The stem's channels, then each block's output channels.
        strides: Each block's depthwise stride.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: tuple[int, ...] = (16, 32, 64),
        strides: tuple[int, ...] = (1, 2),
    ) -> None:
        super().__init__()
        if len(strides) != len(widths) - 1:
            raise ValueError(
                f"MobileNet needs one stride per block: got widths={widths}, strides={strides}."
            )
        layers: list[nn.Module] = [*_conv_bn(in_channels, widths[0], 3), nn.ReLU6()]
        for cin, cout, stride in zip(widths[:-1], widths[1:], strides, strict=True):
            layers += [*_conv_bn(cin, cin, 3, stride=stride, groups=cin), nn.ReLU6()]
            layers += [*_conv_bn(cin, cout, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TransformerClassifier(nn.Module):
    """torch's own ``nn.TransformerEncoder`` on a sequence of ``tokens`` feature vectors: a linear
    input projection, a learned position embedding, the encoder, mean pooling over the tokens,
    layer norm and a linear head."""

    def __init__(
        self,
        features: int,
        tokens: int,
        num_classes: int,
        *,
        d_model: int = 32,
        nhead: int = 4,
        dim_feedforward: int = 64,
        num_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.zeros(1, tokens, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(x) + self.position)
        return self.head(self.norm(hidden.mean(dim=1)))


class RecurrentClassifier(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU`` (``batch_first``) over ``(batch, steps, features)`` and a linear
    head on the last layer's final hidden state (both directions' when bidirectional)."""

    def __init__(
        self,
        features: int,
        num_classes: int,
        *,
        cell: str = "lstm",
        hidden: int = 48,
        num_layers: int = 2,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        kinds = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in kinds:
            raise ValueError(f"Unknown cell {cell!r}. Available: {', '.join(kinds)}.")
        self.rnn = kinds[cell](
            features, hidden, num_layers, batch_first=True, bidirectional=bidirectional
        )
        directions = 2 if bidirectional else 1
        self.directions = directions
        self.head = nn.Linear(directions * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state  # an LSTM's is (h_n, c_n)
        last = h_n[-self.directions :]  # the last layer, each direction
        return self.head(torch.cat(list(last), dim=-1))


class TiedNextToken(nn.Module):
    """A next-token model whose output layer IS its input embedding: ``Embedding(vocab, dim)``,
    a GRU over the context, and ``Linear(dim, vocab, bias=False)`` with ``head.weight`` the
    embedding's weight (one tensor, as in language models with tied embeddings)."""

    def __init__(self, vocab: int, *, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h_n = self.rnn(self.emb(tokens))
        return self.head(h_n[-1])
