"""Torch-pruning pruners for the layers it cannot shrink consistently by itself.

- `RecurrentPruner`: ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` with any number of layers, one or two
  directions (torch-pruning 1.6.1 has an LSTM pruner for one layer only, and none for the others).
- `AttentionHeadPruner`: torch's ``nn.MultiheadAttention``, in whole heads (torch-pruning's own
  removes channels inside heads and keeps the number of heads).
- `TransposedLinearPruner`: a Linear that stores its weight transposed, ``(nx, nf)`` (Hugging
  Face's ``Conv1D`` of GPT-2; `compressors._targets.is_transposed_linear`), which torch-pruning
  does not know: it would take its weight for a plain parameter.

Both layers hide their internals from torch-pruning's tracer (`opaque_tracing`): their autograd
graphs (gates, reshapes into heads, concatenated directions) would otherwise be read as a chain
of element-wise operations between the layer's input and its output.

`local_scores` scores the channels of these layers and of ``nn.Embedding`` and ``nn.EmbeddingBag``
(which torch-pruning's importance criteria skip; an EmbeddingBag's dimensions are removed by its
`EmbeddingPruner`, registered for it) with the same criteria, so that the weights of every layer
of a group count in its ranking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from compressors._targets import is_transposed_linear

#: Gate blocks stacked in the rows of each recurrent weight, by ``RNNBase.mode``.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
#: The weights that read a recurrent layer's input (the others read the layer below).
_FIRST_INPUTS = ("weight_ih_l0", "weight_ih_l0_reverse")


def _select(tensor: torch.Tensor, keep: Sequence[int], dim: int) -> torch.Tensor:
    index = torch.as_tensor(list(keep), dtype=torch.long, device=tensor.device)
    return tensor.detach().index_select(dim, index)


def _shrunk(param: nn.Parameter, keep: Sequence[int], dim: int) -> nn.Parameter:
    """A new parameter holding ``param`` (and its gradient) restricted to ``keep`` along ``dim``."""
    new = nn.Parameter(_select(param, keep, dim).contiguous(), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = _select(param.grad, keep, dim).contiguous()
    return new


class RecurrentPruner(tp.pruner.function.BasePruningFunc):
    """Prunes the hidden units of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (or their input features).

    Every layer and direction keeps the same ``hidden_size``, and the output of every layer and
    direction is indexed by the same unit numbers (the sequence output stacks the directions,
    ``h_n`` / ``c_n`` the layers), so an output channel ``i`` names hidden unit ``i %
    hidden_size``: removing it removes that unit in every layer and direction, which keeps any
    use of the outputs (the sequence, ``h_n[-1]``, both directions concatenated) consistent.
    For a unit: its rows in each gate block of ``weight_ih`` / ``weight_hh`` and the biases, its
    column in ``weight_hh``, and its columns (one per direction) in the next layer's
    ``weight_ih``. The input side removes columns of the first layer's ``weight_ih``.
    """

    TARGET_MODULES = RECURRENT

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        _refuse_projection(layer)
        hidden = layer.hidden_size
        drop = {int(i) % hidden for i in idxs}
        keep = [u for u in range(hidden) if u not in drop]
        if not keep:
            raise ValueError(f"cannot remove all {hidden} hidden units of {type(layer).__name__}")
        gates = GATES[layer.mode]
        rows = [g * hidden + u for g in range(gates) for u in keep]
        directions = 2 if layer.bidirectional else 1
        inputs = [d * hidden + u for d in range(directions) for u in keep]
        for names in layer._all_weights:
            for name in names:
                param = getattr(layer, name)
                if name.startswith("bias"):
                    param = _shrunk(param, rows, 0)
                elif name.startswith("weight_hh"):
                    param = _shrunk(_shrunk(param, rows, 0), keep, 1)
                else:  # weight_ih: the first layer reads the input, the others the layer below
                    param = _shrunk(param, rows, 0)
                    if name not in _FIRST_INPUTS:
                        param = _shrunk(param, inputs, 1)
                setattr(layer, name, param)
        layer.hidden_size = len(keep)
        layer._init_flat_weights()  # refresh the weak references of the new parameters
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        _refuse_projection(layer)
        drop = {int(i) for i in idxs}
        keep = [i for i in range(layer.input_size) if i not in drop]
        for name in _FIRST_INPUTS:
            if hasattr(layer, name):
                setattr(layer, name, _shrunk(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size


def _refuse_projection(layer: nn.RNNBase) -> None:
    if getattr(layer, "proj_size", 0):
        raise ValueError("LSTM projections (proj_size > 0) are not supported")


class AttentionHeadPruner(tp.pruner.function.BasePruningFunc):
    """Removes whole heads of torch's ``nn.MultiheadAttention`` (packed q/k/v projection).

    The layer's width ``embed_dim`` is both its input / output width (the residual stream) and
    ``num_heads * head_dim``, the same channel indices on both sides; so channel indices must form
    whole head blocks ``[h * head_dim, (h + 1) * head_dim)``: those rows of the query, key and
    value blocks of ``in_proj_weight``, its columns, and the rows and columns of ``out_proj``
    go, ``num_heads`` falls and ``head_dim`` stays.
    """

    TARGET_MODULES = nn.MultiheadAttention

    def prune_out_channels(
        self, layer: nn.MultiheadAttention, idxs: Sequence[int]
    ) -> nn.MultiheadAttention:
        width, size = layer.embed_dim, layer.head_dim
        drop = {int(i) for i in idxs}
        heads = {i // size for i in drop}
        if drop != {h * size + j for h in heads for j in range(size)}:
            raise ValueError(f"channels {sorted(drop)} are not whole heads of {size} channels")
        if len(heads) >= layer.num_heads:
            raise ValueError(f"cannot remove all {layer.num_heads} heads")
        keep = [i for i in range(width) if i not in drop]
        rows = [block * width + i for block in range(3) for i in keep]
        layer.in_proj_weight = _shrunk(_shrunk(layer.in_proj_weight, rows, 0), keep, 1)
        if layer.in_proj_bias is not None:
            layer.in_proj_bias = _shrunk(layer.in_proj_bias, rows, 0)
        for name in ("bias_k", "bias_v"):
            if getattr(layer, name) is not None:
                setattr(layer, name, _shrunk(getattr(layer, name), keep, 2))
        out = layer.out_proj
        out.weight = _shrunk(_shrunk(out.weight, keep, 0), keep, 1)
        if out.bias is not None:
            out.bias = _shrunk(out.bias, keep, 0)
        out.in_features = out.out_features = len(keep)
        layer.embed_dim = layer.kdim = layer.vdim = len(keep)
        layer.num_heads -= len(heads)
        return layer

    prune_in_channels = prune_out_channels  # input and output share the channel indices

    def get_out_channels(self, layer: nn.MultiheadAttention) -> int:
        return layer.embed_dim

    def get_in_channels(self, layer: nn.MultiheadAttention) -> int:
        return layer.embed_dim


class TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """Prunes a Linear that stores its weight transposed, ``(nx, nf)``, and computes ``x @
    weight + bias``: its outputs are the weight's columns (and the bias), its inputs the rows;
    ``nf`` and ``nx`` follow."""

    TARGET_MODULES = None  # layers of any type that `is_transposed_linear` recognises

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = [i for i in range(layer.nf) if i not in {int(j) for j in idxs}]
        layer.weight = _shrunk(layer.weight, keep, 1)
        if getattr(layer, "bias", None) is not None:
            layer.bias = _shrunk(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = [i for i in range(layer.nx) if i not in {int(j) for j in idxs}]
        layer.weight = _shrunk(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.nx


def transposed_linear_types(model: nn.Module) -> tuple[type, ...]:
    """The types of ``model``'s Linear layers stored transposed (`is_transposed_linear`)."""
    return tuple(dict.fromkeys(type(m) for m in model.modules() if is_transposed_linear(m)))


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """Fresh pruner instances by layer type, for ``DependencyGraph.build_dependency`` of
    ``model``."""
    recurrent, attention = RecurrentPruner(), AttentionHeadPruner()
    transposed = TransposedLinearPruner()
    return {
        nn.RNN: recurrent,
        nn.GRU: recurrent,
        nn.LSTM: recurrent,
        nn.MultiheadAttention: attention,
        # (torch-pruning knows nn.Embedding only; an EmbeddingBag's weight has its layout)
        nn.EmbeddingBag: tp.pruner.function.EmbeddingPruner(),
        **{kind: transposed for kind in transposed_linear_types(model)},
    }


class _Opaque(torch.autograd.Function):
    """``apply(count, *outputs, *inputs)``: copies of the first ``count`` tensors (a layer's
    outputs, detached) made by one autograd node whose only inputs are the other tensors (the
    layer's inputs): what the tracer should see of the layer. Never differentiated."""

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> None:
        raise RuntimeError("an opaque tracing node is not differentiable")


def _tensor(value: torch.Tensor | PackedSequence) -> torch.Tensor:
    return value.data if isinstance(value, PackedSequence) else value


def _opaque_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """Replace the outputs of a recurrent or attention layer by `_Opaque` copies (all outputs of
    a recurrent layer from one node: its sequence, ``h_n`` and ``c_n``)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("query", "key", "value")
        inputs = [*args[:3], *(kwargs[n] for n in names[len(args[:3]) :] if n in kwargs)]
    else:
        inputs = [args[0] if args else kwargs["input"]]
    inputs = [_tensor(t) for t in inputs]
    first, rest = output[0], output[1]
    tensors = [_tensor(first)]
    if isinstance(module, RECURRENT):  # h_n (and c_n) come from the same node as the sequence
        tensors += list(rest) if isinstance(rest, tuple) else [rest]
    # so that the outputs have a node to trace (on their device)
    anchor = torch.zeros((), device=tensors[0].device, requires_grad=True)
    outs = _Opaque.apply(len(tensors), *[t.detach() for t in tensors], anchor, *inputs)
    new_first = first._replace(data=outs[0]) if isinstance(first, PackedSequence) else outs[0]
    if isinstance(module, RECURRENT):
        new_rest = tuple(outs[1:]) if isinstance(rest, tuple) else outs[1]
        return new_first, new_rest
    return new_first, rest


@contextlib.contextmanager
def opaque_tracing(model: nn.Module) -> Iterator[None]:
    """While active, recurrent and attention layers appear to torch-pruning's tracer as one node
    from their inputs (not their initial states or masks) to their outputs."""
    hooks = [
        m.register_forward_hook(_opaque_hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, (*RECURRENT, nn.MultiheadAttention))
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _weight_score(weight: torch.Tensor, criterion: str) -> torch.Tensor:
    """Score of each weight, on the CPU: ``|w|``, ``w²`` or ``|w · dL/dw|`` (0 without a
    gradient). Computed where the weight is, then brought to the CPU: channel scores are few
    (one per channel) and end as Python lists of the channels to remove."""
    w = weight.detach()
    if criterion == "l1":
        score = w.abs()
    elif criterion == "l2":
        score = w.pow(2)
    elif weight.grad is not None:
        score = (w * weight.grad).abs()
    else:
        score = torch.zeros_like(w)
    return score.float().cpu()


def local_scores(
    module: nn.Module, out: bool, idxs: Sequence[int], criterion: str
) -> torch.Tensor | None:
    """Score of channels ``idxs`` of ``module`` (outputs if ``out``, else inputs) under
    ``criterion`` (``l1``, ``l2`` or ``taylor``), for the layers torch-pruning's importance skips:
    embeddings, recurrent and attention layers, Linears stored transposed. None for any other
    layer."""
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        per_channel = _weight_score(module.weight, criterion).sum(0)
    elif is_transposed_linear(module):  # weight (inputs, outputs)
        per_channel = _weight_score(module.weight, criterion).sum(0 if out else 1)
    elif isinstance(module, nn.MultiheadAttention):
        width = module.embed_dim
        q_k_v = _weight_score(module.in_proj_weight, criterion)
        projection = _weight_score(module.out_proj.weight, criterion)
        per_channel = (
            q_k_v.view(3, width, width).sum((0, 2))  # the head's query, key and value rows
            + q_k_v.sum(0)  # the input column
            + projection.sum(1)  # the output row
            + projection.sum(0)  # the column of the head's output
        )
    elif isinstance(module, RECURRENT) and not out:
        per_channel = sum(
            _weight_score(getattr(module, name), criterion).sum(0)
            for name in _FIRST_INPUTS
            if hasattr(module, name)
        )
    elif isinstance(module, RECURRENT):
        hidden, gates = module.hidden_size, GATES[module.mode]
        per_channel = torch.zeros(hidden, device="cpu")  # the scores' device
        for names in module._all_weights:
            for name in names:
                if name.startswith("bias"):
                    continue
                score = _weight_score(getattr(module, name), criterion)
                per_channel += score.view(gates, hidden, -1).sum((0, 2))  # the unit's gate rows
                if name.startswith("weight_hh"):
                    per_channel += score.sum(0)  # its recurrent column
                elif name not in _FIRST_INPUTS:
                    per_channel += score.sum(0).view(-1, hidden).sum(0)  # read by the next layer
        idxs = [int(i) % hidden for i in idxs]
    else:
        return None
    return per_channel[torch.as_tensor(list(idxs), dtype=torch.long, device="cpu")]
