"""Structured pruning: remove whole neurons / channels, shrinking every layer that depends on them.

Which channels matter is an importance criterion (`compressors.importance`); what must shrink
together (a Linear's outputs and the next layer's inputs, a Conv's channels and the flattened
features of the head) is torch-pruning's dependency graph. The layers really get smaller, so the
file, the FLOPs and the latency fall with them. The output layer keeps its classes.

Transformers: a model with multi-head attention names its query / key / value projections and
their number of heads with a method ``attention_heads() -> {nn.Linear: heads}`` (as
`experiments.minilm.SentenceEncoder` does). Whole heads are then removed, ``amount`` of them in
each attention layer (never all; ``scope`` is then always ``layer``), and never dimensions
inside a head, so the head size the
attention reshapes by is unchanged; feed-forward neurons are removed like any channels. The
residual width is coupled to the output layer, which keeps its outputs, so it is not pruned.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from compressors._base import CompressionContext, Compressor
from compressors._layers import weight_layers
from compressors._params import Options, Real
from compressors.importance import CRITERIA, accumulate_gradients, group_importance


class StructuredPruning(Compressor):
    """Remove a fraction of the output channels of every Linear / Conv but the output layer.

    Params:
        amount: Fraction of channels removed, in [0, 1).
        scope: ``layer``: that fraction in each layer; ``global``: the least important channels
            across layers (each layer keeps at least one).
        importance: How channel groups are scored, one of `compressors.importance.CRITERIA`.
    """

    name = "structured"
    stage = 1
    params = {
        "amount": Real(0.0, 1.0, closed="left", default=0.5),
        "scope": Options(("layer", "global"), default="layer"),
        "importance": Options(CRITERIA, default="l1"),
    }

    @property
    def requires(self) -> frozenset[str]:
        needs = {"example_inputs"}
        return frozenset(needs | {"train"} if self.importance == "taylor" else needs)

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        if self.amount == 0.0:
            return model
        output_layer = list(weight_layers(model).values())[-1]
        heads = dict(model.attention_heads()) if hasattr(model, "attention_heads") else {}
        pruner = tp.pruner.BasePruner(
            model,
            ctx.example_inputs,
            importance=group_importance(self.importance),
            pruning_ratio=self.amount,
            global_pruning=self.scope == "global" and not heads,
            max_pruning_ratio=0.99,
            ignored_layers=[output_layer],
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=not heads,
            head_pruning_ratio=_head_ratio(self.amount, min(heads.values(), default=1)),
            # fresh dicts: torch-pruning fills these in place, and its defaults are shared
            in_channel_groups={},
            out_channel_groups={},
        )
        if self.importance == "taylor":
            accumulate_gradients(model, ctx)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model


def _head_ratio(amount: float, heads: int) -> float:
    """The ratio that makes torch-pruning (which rounds ``ratio * heads`` up) remove
    ``round(amount * heads)`` heads of ``heads``, and never all of them."""
    removed = min(heads - 1, round(amount * heads))
    return (removed - 0.5) / heads if removed > 0 else 0.0
