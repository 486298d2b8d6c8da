"""Hugging Face ``transformers`` architectures as users bring them: each built from a small config
with random weights (nothing is downloaded), fed dict batches and returning a ``ModelOutput``.

Text models (BERT, DistilBERT, GPT-2, as ``...ForSequenceClassification``) read digits' pixels as
tokens (`tests.zoo.workloads.Tokens`: ``input_ids``, ``attention_mask``, ``labels``); image
models (ViT, ConvNeXt, ResNet, MobileNetV2, as ``...ForImageClassification``) read digits'
images upscaled to ``size`` x ``size`` pixels, as ``{"pixel_values": ..., "labels": ...}``. The
splits are ``digits_mlp``'s (1,077 / 360 / 360 images); ``samples`` keeps the first training
samples only, so that tests run fast.

``hf_task(arch)`` builds the task of one architecture of `ARCHITECTURES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from experiments import Task, TrainConfig
from experiments.digits import digits_mlp
from tests.zoo.workloads import Tokens

#: Token ids of `Tokens`: 0 (padding, never used) and the pixel intensities 0..16 as 1..17.
VOCAB = 18
#: Sequence length of a text sample (digits' 64 pixels).
SEQUENCE = 64


def bert(*, hidden: int = 32, heads: int = 4, layers: int = 1) -> nn.Module:
    """``BertForSequenceClassification`` from a small config."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQUENCE,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def distilbert(*, hidden: int = 32, heads: int = 4, layers: int = 1) -> nn.Module:
    """``DistilBertForSequenceClassification`` from a small config (its attention names its
    heads ``n_heads`` and its width ``dim``)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=hidden,
        n_heads=heads,
        n_layers=layers,
        hidden_dim=2 * hidden,
        max_position_embeddings=SEQUENCE,
        num_labels=10,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
    )
    return DistilBertForSequenceClassification(config)


def gpt2(*, hidden: int = 32, heads: int = 4, layers: int = 1) -> nn.Module:
    """``GPT2ForSequenceClassification`` from a small config: its layers are ``Conv1D`` (a
    Linear with its weight transposed), it scores the last token that is not ``pad_token_id``
    (0, which `Tokens` never uses), and it keeps no cache (its output is tensors only)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_head=heads,
        n_layer=layers,
        n_inner=2 * hidden,
        n_positions=SEQUENCE,
        num_labels=10,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    return GPT2ForSequenceClassification(config)


def vit(
    *,
    size: int = 16,
    channels: int = 1,
    hidden: int = 32,
    heads: int = 4,
    patch: int = 4,
    layers: int = 1,
    qkv_bias: bool = True,
) -> nn.Module:
    """``ViTForImageClassification`` from a small config: patches of ``patch`` x ``patch``
    pixels embedded by a convolution, ``layers`` layers (default one), the query, key and value
    projections with biases or not (``qkv_bias``)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=size,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_labels=10,
        qkv_bias=qkv_bias,
    )
    return ViTForImageClassification(config)


def convnext(*, size: int = 16, channels: int = 1) -> nn.Module:
    """``ConvNextForImageClassification`` from a small config: two stages of one block each
    (depthwise 7 x 7 convolution, channels-last LayerNorm, two Linears, layer scale)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=channels,
        patch_size=2,
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        image_size=size,
        num_labels=10,
        layer_scale_init_value=0.1,  # not 1e-6: the blocks change the outputs measurably
    )
    return ConvNextForImageClassification(config)


def resnet(*, size: int = 16, channels: int = 1) -> nn.Module:
    """``ResNetForImageClassification`` from a small config: two stages of one basic block."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=channels,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    return ResNetForImageClassification(config)


def mobilenet_v2(*, size: int = 16, channels: int = 1) -> nn.Module:
    """``MobileNetV2ForImageClassification`` from a small config: its 17 inverted residual
    blocks (1 x 1 expansion, 3 x 3 depthwise, 1 x 1 projection, residual adds) at a quarter of
    the width."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        num_channels=channels,
        image_size=size,
        depth_multiplier=0.25,
        num_labels=10,
        finegrained_output=False,  # the last 1 x 1 convolution a quarter wide too
        classifier_dropout_prob=0.0,
    )
    return MobileNetV2ForImageClassification(config)


def _clip_sizes(hidden: int, layers: int) -> dict[str, int]:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}


def clip_vision(*, size: int = 8, hidden: int = 64, heads: int = 4, layers: int = 2) -> nn.Module:
    """The vision tower of ``CLIPForImageClassification`` from a small config: 1-channel
    images, patches of 2 x 2 pixels (``CLIPAttention``: ``q_proj``..., ``num_heads``)."""
    from transformers import CLIPConfig, CLIPForImageClassification

    sizes = _clip_sizes(hidden, layers)
    config = CLIPConfig(
        vision_config={
            **sizes,
            "num_attention_heads": heads,
            "image_size": size,
            "patch_size": 2,
            "num_channels": 1,
        },
        text_config={**sizes, "num_attention_heads": heads, "num_hidden_layers": 1},  # (unused)
        num_labels=10,
    )
    return CLIPForImageClassification(config)


class ClipText(nn.Module):
    """``CLIPTextModel`` from a small config with a Linear head on the mean of its tokens'
    states (the digits' classes; the first token's alone sees no other token through the
    causal mask): token ids and an ``attention_mask`` in (`Tokens`), logits out."""

    def __init__(self, *, hidden: int = 64, heads: int = 4, layers: int = 2) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        config = CLIPTextConfig(
            **_clip_sizes(hidden, layers),
            num_attention_heads=heads,
            vocab_size=VOCAB,
            max_position_embeddings=SEQUENCE,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=VOCAB - 1,  # (the pooled state, not read: any token of the vocabulary)
        )
        self.text = CLIPTextModel(config)
        self.head = nn.Linear(hidden, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        states = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(states.mean(1))


class Images(Dataset):
    """Digits as ``{"pixel_values": (channels, size, size), "labels": label}`` samples: the 8 x 8
    images upscaled (bilinear) and repeated over the channels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, size: int, channels: int) -> None:
        images = F.interpolate(x.reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear")
        self.pixels = images.expand(-1, channels, -1, -1).contiguous()
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.y[i]}


class PaddedTokens(Tokens):
    """`Tokens` whose sample ``i`` keeps its first ``32 + 7 * i % 33`` tokens, padding (id 0,
    ``attention_mask`` 0) after them: a mask that drops scores."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        keep = torch.arange(len(item["input_ids"])) < 32 + (7 * i) % 33
        item["input_ids"] = torch.where(keep, item["input_ids"], 0)
        item["attention_mask"] = keep.long()
        return item


def padded(task: Task, *, seed: int = 0, samples: int | None = None) -> Task:
    """``task`` (a text task of `hf_task`, any model builder) on `PaddedTokens` of the same
    digits splits (``samples``: the first training samples only)."""
    digits = digits_mlp(seed=seed)
    splits = {}
    for split in ("train", "val", "test"):
        data = getattr(digits, split).in_memory
        rows = slice(samples) if split == "train" else slice(None)
        splits[split] = PaddedTokens(data.x[rows], data.y[rows])
    return dataclasses.replace(task, **splits)


#: Text architectures (token ids in) and image architectures (pixels in), by name.
TEXT: dict[str, Callable[..., nn.Module]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
}
IMAGE: dict[str, Callable[..., nn.Module]] = {
    "vit": vit,
    "convnext": convnext,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
}
ARCHITECTURES = (*TEXT, *IMAGE)


def hf_task(
    arch: str,
    *,
    name: str | None = None,
    seed: int = 0,
    samples: int | None = None,
    size: int = 16,
    channels: int = 1,
    train: dict[str, Any] | None = None,
) -> Task:
    """The digits task of ``arch`` (one of `ARCHITECTURES`), random init.

    Args:
        arch: The architecture.
        name: The task's name (default ``hf_<arch>``).
        seed: Seed of the splits.
        samples: Training samples kept (the first ones; None: all 1,077).
        size: Side of the images in pixels (image architectures).
        channels: Channels of the images, 1 or 3 (image architectures).
        train: `TrainConfig` values of the baseline (default: 2 epochs, lr 2e-3, batch 32).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}. Available: {', '.join(ARCHITECTURES)}")
    digits = digits_mlp(seed=seed)
    parts = [digits.train.in_memory, digits.val.in_memory, digits.test.in_memory]
    if samples is not None:
        parts[0] = type(parts[0])(parts[0].x[:samples], parts[0].y[:samples])
    if arch in TEXT:
        splits = [Tokens(p.x, p.y) for p in parts]
        build = TEXT[arch]
    else:
        splits = [Images(p.x, p.y, size=size, channels=channels) for p in parts]
        build = partial(IMAGE[arch], size=size, channels=channels)
    return Task(
        name=name or f"hf_{arch}",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        build_model=build,
        train_config=TrainConfig(**{"epochs": 2, "lr": 2e-3, "batch_size": 32, **(train or {})}),
    )


def deploy_w8a8(task: Task, trained: nn.Module, folder, attention: str = "sdpa"):
    """``trained`` quantized W8A8 (8-bit weights, `mse` calibration), packed and deployed to
    ONNX as `search.run.deploy` deploys it, its attention implementation ``attention`` (the
    task's models built with it too); returns the task, the `deploy_onnx` result, the packed
    model reloaded in torch and the graph's nodes after ONNX Runtime's optimisation."""
    import copy

    import onnx
    import onnxruntime

    from compressors import (
        CompressionContext,
        apply_pipeline,
        get_compressor,
        load_packed,
        save_packed,
    )
    from search.run.deploy import deploy_onnx

    if attention != "sdpa":
        build = task.build_model

        def built_with_it():
            model = build()
            model.config._attn_implementation = attention
            return model

        task = dataclasses.replace(task, build_model=built_with_it)
    base = copy.deepcopy(trained)
    if attention != "sdpa":  # (transformers' default: the models as built)
        base.config._attn_implementation = attention
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
    model = apply_pipeline([quant], base, ctx).eval()
    packed = folder / "w8a8.sqz"
    save_packed(model, packed, like=trained)
    deployed = deploy_onnx(packed, task, folder / "w8a8.onnx", threads=1)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(deployed.path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath).graph
    shipped = load_packed(packed, task.build_model(), int8=False).eval()
    return task, deployed, shipped, optimized
