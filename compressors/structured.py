"""Structured pruning: remove whole neurons / channels / heads, shrinking every layer that depends
on them.

Which channels matter is an importance criterion (`compressors.importance`); what must shrink
together (a Linear's outputs and the next layer's inputs, a Conv's channels, its BatchNorm and the
flattened features of the head, a residual stream and every layer reading or adding to it) is
torch-pruning's dependency graph (`compressors._structured_groups`). The layers really get
smaller, so the file, the FLOPs and the latency fall with them. Channels that reach the model's
output (its classes, an encoder's embedding width) are never removed.

Layers and the unit they lose:

- Linear, Conv (plain, grouped: the same channels of each group; depthwise: ``groups`` follows),
  BatchNorm / LayerNorm / GroupNorm: channels; a Linear stored transposed (Hugging Face's
  ``Conv1D`` of GPT-2, `compressors._structured_pruners.TransposedLinearPruner`): channels, its
  ``nf`` / ``nx`` follow;
- ``nn.Embedding``, ``nn.EmbeddingBag``: embedding dimensions (never vocabulary rows);
- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any number of layers, bidirectional or not): hidden
  units, the same ones in every layer and direction (`compressors._structured_pruners`);
- torch's ``nn.MultiheadAttention`` (e.g. in ``nn.TransformerEncoderLayer``): whole heads. Its
  width is also the residual stream's, so removing head ``h`` removes the residual channels
  ``[h * head_dim, (h + 1) * head_dim)`` in every layer coupled to it, and ``num_heads`` falls;
- attention written with plain Linears (`compressors._structured_heads`): a module with a head
  count attribute (``num_heads`` as timm's, ``num_attention_heads`` as Hugging Face's BERT,
  ``n_heads``, ``n_head``) and separate or fused (``qkv``) query / key / value projections, or
  projections a model names with a method ``attention_heads() -> {nn.Linear: heads}`` (as
  `experiments.minilm.SentenceEncoder` does), loses whole heads, the same in each projection;
  the module's head count and its heads' width (``all_head_size``, ``split_size``) follow, its
  head size stays, and so does the
  width its projections read (a transformer's residual stream: such forwards read it). Where
  the module's forward does not run with fewer heads (``reshape(B, N, C)`` with ``C`` its input
  width, ``C // self.num_heads``), its heads all stay, with a log line, and the rest is pruned.

A layer of one output channel whose output is broadcast against a wider tensor (an attention
pooling score ``Linear(hidden, 1)``, a one-channel spatial gate) is not coupled to it: it keeps
its channel, and the wider tensor's channels shrink on their own.

A weight tied between layers (an embedding and the output layer reading the same matrix) stays
one tensor, cut once: the channels of every layer that reads it along one axis go together (an
embedding's width and the hidden units of the GRU feeding the tied output layer, say), and when
one of them must stay whole (it reaches the model's output) they all do. Models the compressor
cannot shrink consistently (LSTM projections, attention with its own key / value widths, a plain
parameter used as a weight matrix, a model that cannot be traced on its example inputs, or
nothing to remove at all) are refused with `compressors.UnsupportedModelError`, naming the module
and why; `StructuredPruning.explain` says beforehand what would shrink, what stays whole and why.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressors._base import CompressionContext, Compressor, UnsupportedModelError
from compressors._device import model_device, to_device
from compressors._params import Integer, Options, Real
from compressors._structured_groups import (
    CoupledGroup,
    channel_scores,
    coupled_groups,
    tied_weights,
)
from compressors._structured_heads import outputs_of, update_heads
from compressors._structured_trace import describe, refusals, trace
from compressors._targets import targets
from compressors.importance import CRITERIA, accumulate_gradients, group_importance

logger = logging.getLogger(__name__)

__all__ = ["StructureReport", "StructuredPruning", "UnsupportedModelError"]


@dataclass(frozen=True)
class StructureReport:
    """What structured pruning can remove from a model (`StructuredPruning.explain`).

    Attributes:
        prunable: Groups of coupled channels that may shrink, by the layer whose outputs root
            them: how many units they have and which layers change shape with them.
        kept: Groups that stay whole, by their root layer, with the reason.
    """

    prunable: dict[str, str]
    kept: dict[str, str]

    def __str__(self) -> str:
        lines = ["Prunable:"] + [f"  {k}: {v}" for k, v in self.prunable.items()]
        lines += ["Kept whole:"] + [f"  {k}: {v}" for k, v in self.kept.items()]
        return "\n".join(lines)


class _FewerHeadsFailed(UnsupportedModelError):
    """The pruned copy fails, and attention written with plain Linears lost heads in it."""

    def __init__(self, message: str, attention: list[str], cause: BaseException) -> None:
        super().__init__(message)
        self.attention = attention
        self.cause = f"{type(cause).__name__}: {cause}"


class StructuredPruning(Compressor):
    """Remove a fraction of the channels (heads, hidden units) of every group of coupled layers.

    Params:
        amount: Fraction of the units removed, in [0, 1).
        scope: ``layer``: each group of ``n`` units keeps ``int(n * (1 - amount))`` of them (at
            least one); ``global``: the least important units across groups go until that
            fraction of all channels is removed, scores scaled to mean 1 in each group (each
            group keeps at least one unit).
        importance: How channels are scored, one of `compressors.importance.CRITERIA`; a unit
            (a head, ...) scores the mean of its channels.
        round_to: Each group keeps a multiple of this many units (or all of them), the most
            important of those ``amount`` would remove staying: integer kernels run channels in
            blocks (ONNX Runtime's ``QLinearConv`` with AVX-512 VNNI ran two 15-channel 3x3
            convolutions 1.9x slower than two 16-channel ones at batch 32).
    """

    name = "structured"
    stage = 1
    shrinks = True
    acts_on = (
        "removes whole channels, attention heads and recurrent hidden units (and the embedding "
        "dimensions coupled to them), shrinking Linear, Conv, norm, attention, recurrent and "
        "embedding layers together; the model's output width is kept"
    )
    params = {
        "amount": Real(0.0, 1.0, closed="left", default=0.5),
        "scope": Options(("layer", "global"), default="layer"),
        "importance": Options(CRITERIA, default="l1"),
        "round_to": Integer(1, 4096, default=1),
    }

    @property
    def requires(self) -> frozenset[str]:
        needs = {"example_inputs"}
        return frozenset(needs | {"train"} if self.importance == "taylor" else needs)

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """Qualified names of the weight tensors of ``model`` that pruning makes smaller.

        Exact given ``example_inputs`` (the model is traced); without them, an estimate: the
        weights of every Linear, Conv, attention and recurrent layer (embedding tables shrink
        only where their width is not tied to the model's output, which tracing tells).
        """
        found = targets(model)
        if example_inputs is None:
            return [name for name, t in found.items() if t.kind != "embedding"]
        _, groups, _, _ = _analyse(model, example_inputs, None)
        shrunk = {name for group in groups for name in group.modules}
        shrunk |= {
            f"{name}.out_proj"  # attention's output projection shrinks with it
            for name, module in model.named_modules()
            if name in shrunk and isinstance(module, nn.MultiheadAttention)
        }
        return [name for name, t in found.items() if any(s.module_name in shrunk for s in t.sites)]

    def check_model(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """`claims` of ``model``, after checking that it can be pruned consistently (and, given
        ``example_inputs``, that something can be removed: see `explain` for what and why).

        Raises:
            UnsupportedModelError: Naming each module it cannot prune consistently (an LSTM
                with projections, a plain parameter used as a weight matrix, ...), or saying
                why no channel can be removed.
        """
        _refuse(model)
        return super().check_model(model, example_inputs)

    @staticmethod
    def explain(
        model: nn.Module, example_inputs: Any, *, heads: Mapping[nn.Module, int] | None = None
    ) -> StructureReport:
        """What `compress` could remove from ``model``, and what stays whole and why. The model
        is traced on ``example_inputs`` but not changed.

        Args:
            model: The model.
            example_inputs: A batch of inputs (a tensor; a tuple of positional or a dict of
                keyword arguments).
            heads: Query / key / value Linears and their number of heads, if attention is
                written with plain layers (default: ``model.attention_heads()`` if it exists).

        Raises:
            UnsupportedModelError: As `check_model`.
        """
        _, groups, kept, _ = _analyse(model, example_inputs, heads)
        prunable = {
            g.label: f"{len(g.units)} units ({g.unit}); shrinks {', '.join(g.modules)}"
            for g in groups
        }
        return StructureReport(prunable=prunable, kept=kept)

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Return a pruned copy of ``model`` (the model itself is not changed).

        Attention written with plain Linears loses whole heads and its head counts follow; if
        its module's forward does not run with fewer heads (it reads the head size from its
        input width, say), it keeps all its heads (logged) and the rest is pruned.

        Raises:
            UnsupportedModelError: As `check_model`; or if the pruned copy would not run on the
                example inputs or would change its outputs' shapes (a last guard).
        """
        if self.amount == 0.0:
            return model
        try:
            return self._prune(copy.deepcopy(model), ctx, whole_attention=None)
        except _FewerHeadsFailed as err:
            logger.info(
                "structured: keeping the heads of %s whole: %s",
                ", ".join(err.attention),
                err,
                extra={"once": True},
            )
            why = f"its forward does not run with fewer heads ({err.cause})"
            return self._prune(copy.deepcopy(model), ctx, whole_attention=why)

    def _prune(
        self, model: nn.Module, ctx: CompressionContext, *, whole_attention: str | None
    ) -> nn.Module:
        """Prune ``model`` (a copy) in place and return it."""
        modes = {m: m.training for m in model.modules()}
        try:
            heads = _heads(model, None)
            graph, groups, kept, attention = _analyse(
                model, ctx.example_inputs, heads, whole_attention=whole_attention
            )
            for label, reason in kept.items():  # once: a fact of the model, not of each trial
                logger.info("structured: keeping %s whole: %s", label, reason, extra={"once": True})
            expected = _output_shapes(model, ctx.example_inputs)
            if self.importance == "taylor":
                accumulate_gradients(model, ctx)
            importance = group_importance(self.importance)
            scores = [
                [channel_scores(member, self.importance, importance) for member in g.members]
                for g in groups
            ]
            removals = self._choose(groups, scores)
            if not removals:
                logger.warning(
                    "structured: amount=%s removes no unit of %s", self.amount, _name(model)
                )
            ties = list(tied_weights(model).values())
            before = {p: outputs_of(p) for layer in attention for p in layer.projections}
            for member, idxs in removals:
                root = member[0].dep
                graph.get_pruning_group(root.target.module, root.handler, idxs).prune()
            _retie(ties)
            update_heads(attention)
            try:
                _check_runs(model, ctx.example_inputs, expected)
            except UnsupportedModelError as err:
                changed = [
                    layer.name or "<model>"
                    for layer in attention
                    if any(outputs_of(p) != before[p] for p in layer.projections)
                ]
                if changed:
                    raise _FewerHeadsFailed(str(err), changed, err.__cause__ or err) from err
                raise
        finally:
            model.zero_grad(set_to_none=True)
            for module, training in modes.items():
                module.train(training)
        return model

    def _choose(
        self, groups: list[CoupledGroup], scores: list[list[torch.Tensor]]
    ) -> list[tuple[Any, list[int]]]:
        """``(torch-pruning group, root channels to remove)`` for each group that loses some."""
        unit_scores = [
            torch.stack([torch.stack([s[m][r] for m, r in unit]).mean() for unit in g.units])
            for g, s in zip(groups, scores, strict=True)
        ]
        chosen: list[list[int]] = []
        if self.scope == "layer":
            for g, s in zip(groups, unit_scores, strict=True):
                n = len(g.units)
                count = min(n - 1, n - int(n * (1 - self.amount)))
                chosen.append(torch.argsort(s, stable=True)[:count].tolist())
        else:
            chosen = [[] for _ in groups]
            total = sum(g.channels() for g in groups)
            target = total - int(total * (1 - self.amount))
            ranked = sorted(
                (float(score), i, u) for i, s in enumerate(unit_scores) for u, score in enumerate(s)
            )
            removed = 0
            for _, i, u in ranked:
                if removed >= target:
                    break
                if len(chosen[i]) + 1 < len(groups[i].units):
                    chosen[i].append(u)
                    removed += len(groups[i].units[u])
        if self.round_to > 1:  # (each list holds the least important first)
            chosen = [
                c[: _removable(len(g.units), len(c), self.round_to)]
                for g, c in zip(groups, chosen, strict=True)
            ]
        removals = []
        for g, units in zip(groups, chosen, strict=True):
            for m, member in enumerate(g.members):
                idxs = sorted(r for u in units for mm, r in g.units[u] if mm == m)
                if idxs:
                    removals.append((member, idxs))
        return removals


def _removable(units: int, chosen: int, round_to: int) -> int:
    """How many of ``chosen`` units a group of ``units`` loses so that it keeps a multiple of
    ``round_to`` of them (or all)."""
    kept = min(units, -(-(units - chosen) // round_to) * round_to)
    return units - kept


def _name(model: nn.Module) -> str:
    return type(model).__name__


def _heads(model: nn.Module, heads: Mapping[nn.Module, int] | None) -> dict[nn.Module, int]:
    if heads is not None:
        return dict(heads)
    return dict(model.attention_heads()) if hasattr(model, "attention_heads") else {}


def _refuse(model: nn.Module) -> None:
    problems = refusals(model)
    if problems:
        lines = "\n".join(f"- {p}" for p in problems)
        raise UnsupportedModelError(
            f"Compressor 'structured' cannot prune this model consistently:\n{lines}"
        )


def _analyse(
    model: nn.Module,
    example_inputs: Any,
    heads: Mapping[nn.Module, int] | None,
    *,
    whole_attention: str | None = None,
):
    """``(graph, prunable groups, kept groups, attention of plain Linears)`` of ``model``, or
    `UnsupportedModelError`."""
    _refuse(model)
    modes = {m: m.training for m in model.modules()}
    try:
        graph = trace(model, example_inputs)
    finally:
        for module, training in modes.items():
            module.train(training)
    groups, kept, attention = coupled_groups(
        model, graph, _heads(model, heads), whole_attention=whole_attention
    )
    if not groups:
        why = "".join(f"\n- {label}: {reason}" for label, reason in kept.items())
        raise UnsupportedModelError(
            f"Compressor 'structured' cannot act on any tensor of this model "
            f"({_name(model)}): every group of coupled channels stays whole."
            + (why or " It has no layer torch-pruning can shrink.")
            + "\nRemove 'structured' from space.pipeline."
        )
    return graph, groups, kept, attention


def _call(model: nn.Module, example_inputs: Any):
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


def _shapes(output: Any) -> Any:
    """The shapes of the tensors in a model's output: a tensor, a mapping (a Hugging Face
    ``ModelOutput``), a tuple or list, or a dataclass of them."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, Mapping):
        return {k: _shapes(v) for k, v in output.items()}
    if isinstance(output, tuple | list):
        return [_shapes(v) for v in output]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return {f.name: _shapes(getattr(output, f.name)) for f in dataclasses.fields(output)}
    return None


def _output_shapes(model: nn.Module, example_inputs: Any) -> Any:
    model.eval()
    with torch.no_grad():
        return _shapes(_call(model, to_device(example_inputs, model_device(model))))


def _check_runs(model: nn.Module, example_inputs: Any, expected: Any) -> None:
    """Raise `UnsupportedModelError` unless the pruned model runs (in eval mode, without
    gradients) and its outputs keep their shapes: the last guard against a shape the tracer got
    wrong (the caller's model is untouched, since `compress` prunes a copy)."""
    try:
        shapes = _output_shapes(model, example_inputs)
    except Exception as err:  # the pruned copy is discarded
        raise UnsupportedModelError(
            f"Compressor 'structured' cannot prune {describe('', model)} consistently: the "
            f"pruned model fails on its example inputs ({type(err).__name__}: {err})"
        ) from err
    if shapes != expected:
        raise UnsupportedModelError(
            f"Compressor 'structured' cannot prune {describe('', model)} consistently: its "
            f"outputs would change shape from {expected} to {shapes}"
        )


def _retie(ties: list[list[tuple[nn.Module, str]]]) -> None:
    """Make the places of each tied parameter hold one parameter again (pruning gave each place
    its own copy, all cut alike)."""
    for places in ties:
        first = getattr(*places[0])
        for module, attr in places[1:]:
            param = getattr(module, attr)
            if param is first:
                continue
            if param.shape != first.shape or not torch.equal(param, first):
                raise RuntimeError(f"tied parameter {attr!r} was cut differently in its places")
            setattr(module, attr, first)
