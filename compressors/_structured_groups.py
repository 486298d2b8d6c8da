"""What structured pruning may remove: the traced model in groups of coupled channels.

torch-pruning's dependency graph (traced by `compressors._structured_trace`, which also refuses
the modules it cannot shrink consistently) finds which channels shrink together (a group: a
layer's outputs and every input, norm, residual add, ... they feed). This module adds what it
leaves to its callers: it keeps whole the groups that must not shrink (the model's outputs, tied
weights cut two ways) with the reason, and splits each other group into *units*, the sets of
channels removed together (one channel, a whole attention head, the same hidden unit of every
direction of a recurrent layer, the same offset in every group of a grouped convolution).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compressors._structured_heads import Attention, find_attention
from compressors._structured_pruners import (
    RECURRENT,
    local_scores,
    transposed_linear_types,
)
from compressors._structured_trace import ROOTS, describe, is_op, model_parametrized
from compressors._targets import is_transposed_linear

logger = logging.getLogger(__name__)


@dataclass
class CoupledGroup:
    """Channels that shrink together: the output channels of one layer (a torch-pruning group)
    and everything coupled to them, or several such groups whose layers share a tied weight.

    Attributes:
        label: The layers rooting its groups, e.g. ``"enc.layers.0.linear1 (Linear)"``.
        modules: Qualified names of the layers that change shape with it.
        members: torch-pruning's groups over all channels of each root layer.
        units: The sets of channels removed together, as ``(member, root channel)`` pairs; a
            partition of all members' channels.
        unit: What one unit is, e.g. ``"channel"`` or ``"head of 8 channels"``.
    """

    label: str
    modules: tuple[str, ...]
    members: list[Any] = field(repr=False)
    units: list[list[tuple[int, int]]] = field(repr=False)
    unit: str = "channel"

    def channels(self) -> int:
        """Channels of all its root layers."""
        return sum(len(group[0].idxs) for group in self.members)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)

    def sets(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            found.setdefault(self.find(i), []).append(i)
        return list(found.values())


def coupled_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    heads: Mapping[nn.Module, int],
    *,
    whole_attention: str | None = None,
) -> tuple[list[CoupledGroup], dict[str, str], list[Attention]]:
    """The groups whose channels may be removed, the others with the reason they stay whole,
    and the attention layers written with plain Linears (`compressors._structured_heads`).

    The query / key / value projections of such an attention lose whole heads, the same ones in
    each; the width they read (the residual stream of a transformer) stays whole, since their
    module's forward may read it (``reshape(B, N, C)``, ``C // self.num_heads``).

    Args:
        model: The traced model.
        graph: Its dependency graph (`trace`).
        heads: Query / key / value projections (``nn.Linear``) of attention written with plain
            layers, and their number of heads (``attention_heads()``), besides those found by
            their module's head count attribute.
        whole_attention: If given, the reason every such attention keeps all its heads.
    """
    names = {module: name for name, module in model.named_modules()}
    roots = (*ROOTS, *transposed_linear_types(model))
    groups = list(graph.get_all_groups(root_module_types=roots))
    attention, undecided = find_attention(model, groups, graph, heads)
    projections = {p: layer for layer in attention for p in layer.projections}
    labels = [_label(group[0].dep.target.module, names) for group in groups]
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group[0].idxs))
    channels = _UnionFind(offsets[-1])  # channels removed together, over all groups
    linked = _UnionFind(len(groups))  # groups that shrink together (tied weights, attention)
    reasons: list[str | None] = []
    units: list[str] = []
    for g, group in enumerate(groups):
        reason = _kept_reason(group, graph) or _attention_reason(
            group, graph, projections, undecided, names, whole_attention
        )
        if reason is None and not _join_units(group, graph, projections, channels, offsets[g]):
            reason = "torch-pruning cannot map its channels onto its root layer's"
        reasons.append(reason)
        units.append(_unit_name(group, graph, projections))
    _join_tied(model, groups, graph, channels, linked, offsets, reasons)
    with_heads = _join_heads(attention, groups, graph, channels, linked, offsets)

    prunable, kept = [], {}
    for component in linked.sets():
        whole = [g for g in component if reasons[g] is not None]
        if whole:
            first = whole[0]
            bond = "loses the same heads as" if first in with_heads else "shares a tied weight with"
            for g in component:
                kept[labels[g]] = reasons[g] or (
                    f"it {bond} {labels[first]}, which stays whole: {reasons[first]}"
                )
            continue
        position = {g: i for i, g in enumerate(component)}
        found: dict[int, list[tuple[int, int]]] = {}
        for g in component:
            for root in range(offsets[g + 1] - offsets[g]):
                found.setdefault(channels.find(offsets[g] + root), []).append((position[g], root))
        members = [groups[g] for g in component]
        modules = tuple(
            dict.fromkeys(
                names[item.dep.target.module]
                for group in members
                for item in group
                if item.dep.target.module in names
            )
        )
        unit = next((units[g] for g in component if units[g] != "channel"), "channel")
        label = " + ".join(labels[g] for g in component)
        coupled = CoupledGroup(label, modules, members, list(found.values()), unit)
        if len(coupled.units) < 2:
            kept[label] = f"it has a single {unit}"
        else:
            prunable.append(coupled)
    return prunable, kept, attention


def _attention_reason(group, graph, projections, undecided, names, whole) -> str | None:
    """Why ``group`` stays whole for the attention layers written with plain Linears, or None:
    it is the width their projections read, or it would remove heads that must stay."""
    for item in group:
        module = item.dep.target.module
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if not out and module in projections:
            layer = projections[module]
            return (
                f"it is the width attention '{layer.name or '<model>'}' reads (its forward may "
                "take the head size or its output width from it)"
            )
        if out and module in undecided:
            return undecided[module]
        if out and whole is not None and module in projections:
            return f"attention '{projections[module].name or '<model>'}' keeps its heads: {whole}"
    return None


def _join_heads(attention: list[Attention], groups, graph, channels, linked, offsets) -> set[int]:
    """Make the projections of each attention layer lose the same heads: the channels at one
    place of one head (``c % (heads * size)``) go together in all of them, and their groups
    shrink together. Returns the groups holding projections."""
    holding = set()
    for layer in attention:
        first: dict[int, tuple[int, int]] = {}
        width = layer.heads * layer.size
        for g, group in enumerate(groups):
            for item in group:
                if item.dep.target.module not in layer.projections:
                    continue
                if not graph.is_out_channel_pruning_fn(item.dep.handler):
                    continue
                holding.add(g)
                for idx, root in zip(item.idxs, item.root_idxs, strict=True):
                    if root is None:
                        continue
                    here = offsets[g] + root
                    there, other = first.setdefault(idx % width, (here, g))
                    channels.union(here, there)
                    linked.union(g, other)
    return holding


def _label(module: nn.Module, names: Mapping[nn.Module, str]) -> str:
    return f"{names.get(module) or '<model>'} ({type(module).__name__})"


def _kept_reason(group, graph: tp.DependencyGraph) -> str | None:
    """Why ``group`` must stay whole whatever the other groups do, or None."""
    for item in group:
        target = item.dep.target
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if target.type == tp.ops.OPTYPE.OUTPUT or (target.grad_fn in graph.output_grad_fns and out):
            return "its channels reach the model's output"
        if any(r is None for r in item.root_idxs):
            return "torch-pruning cannot map its channels onto its root layer's"
        if not is_op(target) and isinstance(target.module, nn.Module):
            parametrized = model_parametrized(target.module)
            if parametrized is not None:
                return f"{parametrized}, which structured pruning does not cut"
        if not is_op(target) and not isinstance(target.module, nn.Parameter) and item.idxs:
            count = graph.get_out_channels(target) if out else graph.get_in_channels(target)
            if count is not None and max(item.idxs) >= count:
                side = "outputs" if out else "inputs"
                return (
                    f"torch-pruning maps its channels beyond the {count} {side} of "
                    f"{describe(target.name or '', target.module)}"
                )
    return None


def _unit_of(module: nn.Module, out: bool, graph, heads) -> tuple[Callable[[int], int], str] | None:
    """``(key, description)``: channels of ``module`` with the same key are removed together;
    None if any set of its channels may go."""
    if isinstance(module, nn.MultiheadAttention):
        size = module.head_dim
        return (lambda i: i // size), f"head of {size} channels"
    if out and module in heads:  # a query / key / value projection (`Attention`)
        return heads[module].key(), heads[module].unit(module)
    if out and isinstance(module, RECURRENT):
        hidden = module.hidden_size
        return (lambda i: i % hidden), "hidden unit"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
        return None  # depthwise: torch-pruning updates `groups` itself
    pruner = graph.get_pruner_of_module(module)
    if pruner is None or isinstance(module, nn.Parameter):
        return None
    groups = pruner.get_out_channel_groups(module) if out else pruner.get_in_channel_groups(module)
    channels = graph.get_out_channels(module) if out else graph.get_in_channels(module)
    if groups > 1 and channels:
        per_group = channels // groups
        return (lambda i: i % per_group), f"channel of each of {groups} groups"
    return None


def _rules(group, graph, heads):
    for item in group:
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        rule = _unit_of(item.dep.target.module, out, graph, heads)
        if rule is not None:
            yield item, rule


def _unit_name(group, graph, heads) -> str:
    return next((name for _, (_, name) in _rules(group, graph, heads)), "channel")


def _join_units(group, graph, heads, channels: _UnionFind, offset: int) -> bool:
    """Join in ``channels`` the root channels of ``group`` that its layers remove together (whole
    heads, the same offset in each group of a grouped conv, ...); False if a layer's channels
    do not map onto the root's."""
    size = len(group[0].idxs)
    for item, (key, _) in _rules(group, graph, heads):
        first: dict[int, int] = {}
        for idx, root in zip(item.idxs, item.root_idxs, strict=True):
            if not 0 <= root < size:
                return False
            channels.union(offset + root, first.setdefault(key(idx), offset + root))
    return True


def tied_weights(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameters held by several modules (tied weights): ``id -> [(module, attribute)]``."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr))
    return {key: places for key, places in holders.items() if len(places) > 1}


def _weight_axis(module: nn.Module, out: bool) -> int | None:
    """The axis of ``module.weight`` that its output (``out``) or input channels index."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return 1
    if isinstance(module, nn.Linear):
        return 0 if out else 1
    if is_transposed_linear(module):
        return 1 if out else 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return (0 if out else 1) if not module.transposed else (1 if out else 0)
    return None


def _join_tied(model, groups, graph, channels, linked, offsets, reasons) -> None:
    """Make the groups that cut a tied weight cut it alike.

    Along each axis of the weight, every module holding it must lose the same indices: the
    channels (of whichever group) that map to one index of the weight are removed together, and
    their groups shrink together (``linked``). Where that cannot be (a holder cut along an axis
    the others are not, or in a way of unknown axis), the groups that would cut it stay whole
    (``reasons``).
    """
    names = {module: name for name, module in model.named_modules()}
    for places in tied_weights(model).values():
        holders = dict(places)
        tied = " and ".join(describe(names.get(m, "?"), m) for m, _ in places)
        reason = f"it would cut the weight tied between {tied} in one of them only"
        by_axis: dict[int, list[tuple[int, Any, nn.Module]]] = {}
        unknown = set()
        for g, group in enumerate(groups):
            for item in group:
                module = item.dep.target.module
                if module not in holders:
                    continue
                out = graph.is_out_channel_pruning_fn(item.dep.handler)
                axis = _weight_axis(module, out) if holders[module] == "weight" else None
                if axis is None:
                    unknown.add(g)
                else:
                    by_axis.setdefault(axis, []).append((g, item, module))
        if unknown:  # then no use of the weight may cut it
            unknown |= {g for uses in by_axis.values() for g, _, _ in uses}
            by_axis = {}
        for g in unknown:
            reasons[g] = reasons[g] or reason
        shape = getattr(places[0][0], places[0][1]).shape
        for axis, uses in by_axis.items():
            complete = {m for _, _, m in uses} == set(holders) and all(
                sorted(item.idxs) == list(range(shape[axis])) for _, item, _ in uses
            )
            if not complete:
                for g, _, _ in uses:
                    reasons[g] = reasons[g] or reason
                continue
            first: dict[int, int] = {}
            for g, item, _ in uses:
                linked.union(g, uses[0][0])
                for idx, root in zip(item.idxs, item.root_idxs, strict=True):
                    if root is not None:
                        here = offsets[g] + root
                        channels.union(here, first.setdefault(idx, here))


def channel_scores(group, criterion: str, importance) -> torch.Tensor:
    """One score per root channel of a torch-pruning group: its group importance
    (``importance``) averaged with ``criterion`` applied to the embedding, recurrent and attention
    layers of the group (which torch-pruning's importance skips), each scaled to mean 1."""
    size = len(group[0].idxs)
    parts = []
    try:
        base = importance(group)
    except (IndexError, RuntimeError) as err:  # its reduction assumes simple index mappings
        logger.debug("torch-pruning's importance failed on a group (%s): scoring its layers", err)
        base = None
    if base is not None and len(base) == size:
        parts.append(base.detach().float().cpu())
    if criterion != "random":
        extra, count = torch.zeros(size, device="cpu"), 0  # scores are read on the CPU
        for item in group:
            out = group._DG.is_out_channel_pruning_fn(item.dep.handler)
            local = local_scores(item.dep.target.module, out, item.idxs, criterion)
            if local is not None:
                root = torch.as_tensor(item.root_idxs, device="cpu")
                extra.index_add_(0, root, local.float().cpu())
                count += 1
        if count:
            parts.append(extra / count)
    parts = [p / p.mean() for p in parts if p.mean() > 0]
    if not parts:
        return torch.ones(size, device="cpu")
    return sum(parts) / len(parts)
