"""Attention written with plain Linear layers: where its heads are, and keeping its head counts
true after structured pruning.

torch's ``nn.MultiheadAttention`` has its own pruner (`compressors._structured_pruners`). Other
attention layers are found two ways:

- the model's method ``attention_heads() -> {query / key / value Linear: number of heads}``;
- a module with a head count attribute (``num_heads`` as in timm, ``num_attention_heads`` as in
  Hugging Face's BERT, ``n_heads``, ``n_head``) and Linear children (Linears stored transposed,
  GPT-2's ``Conv1D``, too): those whose outputs feed another child (the output projection,
  found in the dependency graph) are its query / key / value projections, separate (``q``,
  ``k``, ``v``: ``heads * head_dim`` outputs each) or fused (``qkv``: ``3 * heads * head_dim``,
  laid out as ``(3, heads, head_dim)``, as timm's ``reshape(B, N, 3, num_heads, head_dim)`` and
  GPT-2's ``split(split_size, dim=2)`` read them). The head size is the module's
  ``head_dim`` / ``attention_head_size`` / ``head_size`` / ``dim_per_head`` when it has one;
  else the output projection's inputs (or the smallest projection) over the head count. The
  innermost such module counts (a block holding ``num_heads`` beside its attention child is not
  an attention).

Channel ``c`` of a projection belongs to head ``(c % (heads * head_dim)) // head_dim``; whole
heads go, the same ones in every projection of a layer, and the module's head count (and the
heads' width: ``all_head_size``, ``split_size``) follow (`update_heads`). Its head size and its
input width stay: forwards commonly read them (``reshape(B, N, C)``, ``C // self.num_heads``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from compressors._targets import is_transposed_linear

logger = logging.getLogger(__name__)

#: Attributes that hold an attention module's number of heads.
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
#: Attributes that hold the channels of one head.
HEAD_SIZES = ("head_dim", "attention_head_size", "head_size", "dim_per_head")
#: Attributes that hold the width of all heads together (``heads * head size``; GPT-2 splits its
#: fused projection's outputs by ``split_size``): they follow the head count.
HEAD_WIDTHS = ("all_head_size", "split_size")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer (``nn.Linear``, or one stored transposed)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def outputs_of(linear: nn.Module) -> int:
    """Output features of a Linear layer (``nf`` of one stored transposed)."""
    return linear.out_features if isinstance(linear, nn.Linear) else linear.nf


def inputs_of(linear: nn.Module) -> int:
    """Input features of a Linear layer (``nx`` of one stored transposed)."""
    return linear.in_features if isinstance(linear, nn.Linear) else linear.nx


@dataclass
class Attention:
    """One attention layer written with plain Linears.

    Attributes:
        name: Qualified name of the module holding its head count (or of the projections'
            parent, for heads named only by ``attention_heads()``).
        holder: The module whose head count attributes follow the pruning (None: none to update).
        projections: Query / key / value projections and the blocks of heads each stacks (1 for
            separate projections, 3 for a fused ``qkv``).
        heads: Number of heads.
        size: Channels of one head.
    """

    name: str
    holder: nn.Module | None
    projections: dict[nn.Linear, int]
    heads: int
    size: int

    def key(self) -> Callable[[int], int]:
        """The head of a projection's output channel."""
        width, size = self.heads * self.size, self.size
        return lambda i: (i % width) // size

    def unit(self, projection: nn.Linear) -> str:
        blocks = self.projections[projection]
        return f"head of {'' if blocks == 1 else f'{blocks} x '}{self.size} channels"


def _int_attr(module: nn.Module, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or _int_attr(module, HEAD_COUNTS) is not None


def find_attention(
    model: nn.Module,
    groups: list,
    graph,
    explicit: Mapping[nn.Module, int],
) -> tuple[list[Attention], dict[nn.Module, str]]:
    """The attention layers of ``model`` written with plain Linears, and the Linears that must
    keep their outputs whole (with the reason) because they sit in an attention module whose
    projections cannot be told apart.

    Args:
        model: The model.
        groups: torch-pruning's groups of the traced model (``get_all_groups``).
        graph: Its dependency graph.
        explicit: ``attention_heads()`` of the model: projections and their number of heads.
    """
    names = {module: name for name, module in model.named_modules()}
    parents = {c: p for p in model.modules() for c in p.children()}
    found: list[Attention] = []
    by_parent: dict[nn.Module, list[nn.Linear]] = {}
    for projection in explicit:
        by_parent.setdefault(parents.get(projection, model), []).append(projection)
    for parent, projections in by_parent.items():
        heads = explicit[projections[0]]
        size = _int_attr(parent, HEAD_SIZES) or outputs_of(projections[0]) // heads
        blocks = {p: max(1, outputs_of(p) // (explicit[p] * size)) for p in projections}
        holder = parent if _int_attr(parent, HEAD_COUNTS) is not None else None
        found.append(Attention(names.get(parent, ""), holder, blocks, heads, size))

    flows = _flows(groups, graph)
    whole: dict[nn.Module, str] = {}
    for module in model.modules():
        heads = _int_attr(module, HEAD_COUNTS)
        if heads is None or isinstance(module, nn.MultiheadAttention) or module in by_parent:
            continue
        if any(_is_attention(m) for m in module.modules() if m is not module):
            continue  # the innermost module holding a head count is the attention
        linears = [c for c in module.children() if is_linear(c) and c not in explicit]
        if not linears:
            continue
        # the output projection reads channels that only the module's own layers write
        inside = set(linears)
        outputs = [p for p in linears if any(p in i and o and o <= inside for o, i in flows)]
        inputs = [p for p in linears if p not in outputs]
        size = _int_attr(module, HEAD_SIZES)
        if size is None and outputs and inputs_of(outputs[0]) % heads == 0:
            size = inputs_of(outputs[0]) // heads
        if size is None and inputs:
            size = min(outputs_of(p) for p in inputs) // heads
        projections = {
            p: outputs_of(p) // (heads * size)
            for p in inputs
            if size and outputs_of(p) % (heads * size) == 0
        }
        name = names.get(module, "")
        if not projections:
            reason = (
                f"it is in attention '{name or '<model>'}' ({heads} heads), whose query / key / "
                "value projections could not be told apart"
            )
            whole.update({p: reason for p in linears})
            continue
        found.append(Attention(name, module, projections, heads, size))
    return found, whole


def _flows(groups: list, graph) -> list[tuple[set[nn.Module], set[nn.Module]]]:
    """``(layers whose outputs, layers whose inputs)`` each group of channels holds."""
    flows = []
    for group in groups:
        outs, ins = set(), set()
        for item in group:
            module = item.dep.target.module
            if type(module).__module__.startswith("torch_pruning"):
                continue  # a tensor operation, not a layer
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                outs.add(module)
            else:
                ins.add(module)
        flows.append((outs, ins))
    return flows


def update_heads(attention: list[Attention]) -> None:
    """Set each attention module's head count (and its heads' width, `HEAD_WIDTHS`) to what its
    projections now hold (whole heads of unchanged size were removed).

    Raises:
        RuntimeError: If the projections of one attention lost different numbers of heads.
    """
    for layer in attention:
        counts = {outputs_of(p) // (b * layer.size) for p, b in layer.projections.items()}
        if len(counts) != 1:
            raise RuntimeError(
                f"the projections of attention '{layer.name}' kept different numbers of heads "
                f"({sorted(counts)})"
            )
        heads = counts.pop()
        if layer.holder is None:
            continue
        for attr in HEAD_COUNTS:
            if _int_attr(layer.holder, (attr,)) is not None:
                setattr(layer.holder, attr, heads)
        for attr in HEAD_WIDTHS:
            if _int_attr(layer.holder, (attr,)) is not None:
                setattr(layer.holder, attr, heads * layer.size)
        logger.debug("structured: attention '%s' keeps %d heads", layer.name, heads)
