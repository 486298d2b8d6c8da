"""The model families users bring, small, for the structured-pruning tests (`test_structured`):
convolutional (MobileNet, ResNet, grouped, gated), attention (torch, timm-style fused and
separate q-k-v, ViT), recurrent (LSTM, GRU, RNN; layers, directions, states), tied-embedding and
embedding-bag models, with example inputs, and a check that every module's attributes match its
tensors."""

from __future__ import annotations

import torch
from torch import nn

from compressors import CompressionContext, get_compressor

# --- The model families users bring, small ------------------------------------------------------


class MobileNet(nn.Module):
    """Stem, two depthwise-separable blocks (3x3 depthwise conv + BN + ReLU6, 1x1 pointwise conv
    + BN + ReLU6), global pooling and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(),
            ]

        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x))


class ResNet(nn.Module):
    """Conv + BN stem and two residual blocks added to it (BN after each conv), then a head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )

        def block() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
            )

        self.block1, self.block2 = block(), block()
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(x + self.block2(x))
        return self.head(x.mean((2, 3)))


class GroupedConvNet(nn.Module):
    """Grouped convolutions and a GroupNorm: channels go by the same offset in every group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.norm2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1, groups=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.head(self.conv3(x).mean((2, 3)))


class Transformer(nn.Module):
    """torch's ``nn.TransformerEncoder`` (batch_first) between an input projection and a head."""

    def __init__(self, features: int = 8, d_model: int = 32, nhead: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    """An RNN / GRU / LSTM classifier on ``(batch, steps, features)``: the head reads the last
    step of the output sequence, or (``state=True``) the last layer's final hidden state of
    each direction, concatenated."""

    def __init__(
        self,
        cell,
        features: int,
        *,
        hidden: int = 16,
        layers: int = 1,
        bidirectional: bool = False,
        state: bool = False,
    ) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.directions = 2 if bidirectional else 1
        self.state = state
        self.head = nn.Linear(self.directions * hidden, 10)

    def forward(self, x):
        out, h_n = self.rnn(x)
        if not self.state:
            return self.head(out[:, -1])
        h_n = h_n[0] if isinstance(h_n, tuple) else h_n
        return self.head(torch.cat(list(h_n[-self.directions :]), dim=-1))


class TiedTransformer(nn.Module):
    """A next-token model on a vocabulary of 17 whose output layer reads the embedding's weight
    (one tensor), with a residual encoder layer between them."""

    def __init__(self, vocab: int = 17, d_model: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.block = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.norm(self.block(self.emb(tokens))))


class TiedGRU(nn.Module):
    """Embedding -> GRU -> output layer tied to the embedding: the embedding's width and the
    GRU's hidden units are separate groups that must lose the same indices."""

    def __init__(self, vocab: int = 17, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[1][-1])


class TimmAttention(nn.Module):
    """timm's attention: one fused ``qkv`` Linear read as ``(B, N, 3, num_heads, head_dim)``.
    Its output is reshaped to ``-1`` channels, or (``width_from_input``, as timm's classic code)
    to the width of its input, which no head count but all of them fits."""

    def __init__(self, dim: int = 32, num_heads: int = 4, *, width_from_input: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.width_from_input = width_from_input
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(a.reshape(b, n, c if self.width_from_input else -1))


class SeparateAttention(nn.Module):
    """Hand-written ViT attention: separate ``q``, ``k``, ``v`` Linears and ``self.num_heads``
    (no head size attribute: each head is ``-1`` channels wide)."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, -1))


class ViT(nn.Module):
    """Patch embedding of 16x16 images into 16 tokens, a class token, learned positions, two
    pre-norm blocks (attention, then a GELU MLP) and a head on the class token."""

    def __init__(self, attention=TimmAttention, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "attn": attention(dim),
                    "norm2": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 2 * dim),
                    "fc2": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(2)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = x + b["attn"](b["norm1"](x))
            x = x + b["fc2"](nn.functional.gelu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


class AttentionPoolingGRU(nn.Module):
    """Conv1d features, a bidirectional GRU, and attention pooling over time: a score
    ``Linear(2 * hidden, 1)`` softmaxed over the steps weighs the GRU's outputs."""

    def __init__(self, features: int = 8, hidden: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, 16, 3, padding=1)
        self.gru = nn.GRU(16, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(2 * hidden, 1)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        h, _ = self.gru(torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2))
        weights = torch.softmax(self.score(h), dim=1)  # (B, T, 1), broadcast over the features
        return self.head((weights * h).sum(1))


class GatedCNN(nn.Module):
    """Convolutions with a squeeze-and-excitation channel gate and a one-channel spatial gate
    (``Conv2d(width, 1, 1)``, broadcast over the channels)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.squeeze, self.excite = nn.Linear(width, width // 4), nn.Linear(width // 4, width)
        self.spatial = nn.Conv2d(width, 1, 1)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3))))))
        x = x * gate[:, :, None, None]
        x = x * torch.sigmoid(self.spatial(x))
        return self.head(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


class BagClassifier(nn.Module):
    """Two ``nn.EmbeddingBag`` tables (sum and mean of a sample's tokens, as a recommender's
    categorical features) concatenated, then an MLP: the tables lose embedding dimensions (and
    the first Linear the inputs they fed), never rows."""

    def __init__(self, vocab: int = 17, width: int = 16) -> None:
        super().__init__()
        self.sums = nn.EmbeddingBag(vocab, width, mode="sum")
        self.means = nn.EmbeddingBag(vocab, width, mode="mean")
        self.head = nn.Sequential(nn.Linear(2 * width, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.sums(tokens), self.means(tokens)], dim=1))


def _digits(shape):
    return lambda: torch.randn(*shape)


def _tokens():
    return torch.randint(0, 17, (8, 7))


#: name -> (model builder, example inputs builder)
FAMILIES = {
    "mobilenet": (MobileNet, _digits((8, 1, 8, 8))),
    "resnet": (ResNet, _digits((8, 1, 8, 8))),
    "grouped-conv": (GroupedConvNet, _digits((8, 1, 8, 8))),
    "transformer": (Transformer, _digits((8, 6, 8))),
    "lstm-1x40": (lambda: Recurrent(nn.LSTM, 1), _digits((8, 40, 1))),
    "lstm-2layer-bi-state": (
        lambda: Recurrent(nn.LSTM, 8, layers=2, bidirectional=True, state=True),
        _digits((8, 8, 8)),
    ),
    "gru-2layer-bi": (
        lambda: Recurrent(nn.GRU, 8, layers=2, bidirectional=True),
        _digits((8, 8, 8)),
    ),
    "gru-bi-state": (
        lambda: Recurrent(nn.GRU, 8, bidirectional=True, state=True),
        _digits((8, 8, 8)),
    ),
    "rnn-2layer-1x40": (lambda: Recurrent(nn.RNN, 1, layers=2), _digits((8, 40, 1))),
    "rnn-bi-state": (
        lambda: Recurrent(nn.RNN, 8, bidirectional=True, state=True),
        _digits((8, 8, 8)),
    ),
    "tied-transformer": (TiedTransformer, _tokens),
    "tied-gru": (TiedGRU, _tokens),
    "embedding-bag": (BagClassifier, _tokens),
    "vit-fused-qkv": (ViT, _digits((8, 3, 16, 16))),
    "vit-separate-qkv": (lambda: ViT(SeparateAttention), _digits((8, 3, 16, 16))),
    "attention-pooling-gru": (AttentionPoolingGRU, _digits((8, 7, 8))),
    "gated-cnn": (GatedCNN, _digits((8, 1, 8, 8))),
}


def _family(name: str, seed: int = 0):
    build, inputs = FAMILIES[name]
    torch.manual_seed(seed)
    return build(), inputs()


def _prune(model, x, **params):
    ctx = CompressionContext(example_inputs=x)
    return get_compressor("structured")(**params).compress(model, ctx)


def _size(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied tensor counts once


def _inconsistent(model: nn.Module) -> list[str]:
    """Modules whose public attributes (what ``print(model)`` shows, what forward reads)
    disagree with their tensors."""
    wrong = []
    for name, m in model.named_modules():
        ok = True
        if isinstance(m, nn.Linear):
            ok = tuple(m.weight.shape) == (m.out_features, m.in_features)
            ok &= m.bias is None or tuple(m.bias.shape) == (m.out_features,)
        elif isinstance(m, nn.modules.conv._ConvNd):
            ok = m.weight.shape[0] == m.out_channels
            ok &= m.weight.shape[1] * m.groups == m.in_channels
            ok &= m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            ok = m.weight.numel() == m.running_mean.numel() == m.num_features
        elif isinstance(m, nn.LayerNorm):
            ok = tuple(m.weight.shape) == tuple(m.normalized_shape)
        elif isinstance(m, nn.GroupNorm):
            ok = m.weight.numel() == m.num_channels and m.num_channels % m.num_groups == 0
        elif isinstance(m, nn.Embedding):
            ok = tuple(m.weight.shape) == (m.num_embeddings, m.embedding_dim)
        elif isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            ok = e == m.num_heads * m.head_dim == m.kdim == m.vdim
            ok &= tuple(m.in_proj_weight.shape) == (3 * e, e) and m.in_proj_bias.shape == (3 * e,)
            ok &= m.out_proj.in_features == m.out_proj.out_features == e
        elif isinstance(m, nn.RNNBase):
            gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1) * m.hidden_size
            directions = 2 if m.bidirectional else 1
            for layer in range(m.num_layers):
                inputs = m.input_size if layer == 0 else directions * m.hidden_size
                for suffix in ("", "_reverse")[:directions]:
                    w = f"_l{layer}{suffix}"
                    ok &= tuple(getattr(m, "weight_ih" + w).shape) == (gates, inputs)
                    ok &= tuple(getattr(m, "weight_hh" + w).shape) == (gates, m.hidden_size)
                    ok &= tuple(getattr(m, "bias_ih" + w).shape) == (gates,)
            ok &= all(a is b for a, b in zip(m._flat_weights, m.parameters(), strict=True))
        if not ok:
            wrong.append(f"{name}: {m}")
    return wrong
