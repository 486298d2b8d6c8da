"""Structured pruning's view of a model: torch-pruning's dependency graph, traced and corrected,
and the modules it cannot shrink consistently (`refusals`).

torch-pruning takes every operation it does not know for an element-wise one, which couples the
channels of its inputs one to one. A tensor of one channel broadcast against a wider one (an
attention-pooling score ``Linear(hidden, 1)`` softmaxed over time and multiplied with the
``hidden`` features, a spatial gate ``Conv(c, 1)``) is not coupled to them: `trace` cuts those
edges, so such a layer keeps its single channel and the wider group shrinks alone.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compressors._base import UnsupportedModelError
from compressors._device import model_device, to_device
from compressors._structured_pruners import (
    RECURRENT,
    customized_pruners,
    opaque_tracing,
)
from compressors._targets import foreign_parametrization

logger = logging.getLogger(__name__)

ROOTS = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    *RECURRENT,
)
#: Autograd operations that use a plain tensor as a weight matrix, not element-wise.
_MATRIX_OPS = {
    "Mm",
    "Addmm",
    "Bmm",
    "Baddbmm",
    "Mv",
    "Addmv",
    "Dot",
    "Convolution",
    "Embedding",
    "EmbeddingBag",
    "Linear",
}
#: Autograd operations that only move or copy a tensor.
_SHAPE_OPS = {
    "T",
    "Transpose",
    "Permute",
    "View",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Clone",
    "ToCopy",
    "Alias",
    "Unsafe_View",
    "UnsafeView",
}


def describe(name: str, module: nn.Module) -> str:
    """``'name' (Type)``, the way messages name a module."""
    return f"'{name or '<model>'}' ({type(module).__name__})"


def refusals(model: nn.Module) -> list[str]:
    """One line per module that structured pruning cannot shrink consistently (empty if none)."""
    problems = []
    for name, module in model.named_modules():
        where = describe(name, module)
        if "parametrizations" in dict(module.named_children()) and any(
            foreign_parametrization(module, attr) is None for attr in module.parametrizations
        ):  # (the model's own, weight_norm say, only keep the layer whole: `model_parametrized`)
            problems.append(
                f"{where} has parametrized tensors (masks or quantization grids): apply "
                "'structured' before the methods that add them"
            )
        if isinstance(module, nn.RNNBase) and not isinstance(module, RECURRENT):
            problems.append(f"{where} is a recurrent layer of an unknown kind")
        if isinstance(module, nn.LSTM) and module.proj_size > 0:
            problems.append(
                f"{where} has proj_size={module.proj_size}: LSTM projections are not supported"
            )
        if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
            problems.append(
                f"{where} has kdim={module.kdim}, vdim={module.vdim} unlike embed_dim="
                f"{module.embed_dim}: only the packed query/key/value projection is supported"
            )
        if isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups == module.out_channels > 1
            if depthwise and module.in_channels != module.out_channels:
                problems.append(
                    f"{where} is a depthwise convolution with {module.in_channels} inputs for "
                    f"{module.out_channels} outputs: torch-pruning keeps them equal"
                )
            if module.transposed and module.groups > 1 and not depthwise:
                problems.append(
                    f"{where} is a grouped transposed convolution (groups={module.groups}): "
                    "torch-pruning cuts its weight along the wrong axis"
                )
    return problems


def model_parametrized(module: nn.Module) -> str | None:
    """Why ``module``'s channels stay whole where the model parametrizes one of its tensors
    (torch's ``weight_norm`` on a wav2vec 2.0's positional convolution), or None: cutting it
    would replace a tensor the parametrization computes."""
    children = dict(module.named_children())
    if "parametrizations" not in children:
        return None
    for attr in module.parametrizations:
        foreign = foreign_parametrization(module, attr)
        if foreign is not None:
            return f"the model parametrizes its {attr} ({foreign})"
    return None


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors in a model's outputs (a tensor, or nested tuples, lists, dicts and
    ``ModelOutput``s of them), in order; other objects in them, such as a language model's
    key/value cache (transformers' ``DynamicCache``), are left out: what a later call reads
    is not an output whose channels must stay whole."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, tuple | list):
        return [t for value in outputs for t in output_tensors(value)]
    return []


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (a Hugging Face
    decoder, whose key/value cache would otherwise join each layer's keys to an empty past one
    in a concatenation torch-pruning cannot map), else nothing: the cache changes no output."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def trace(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` run on ``example_inputs``.

    Raises:
        UnsupportedModelError: If the model cannot be traced, or a plain parameter (not in a
            layer torch-pruning knows) is used as a weight matrix.
    """
    outputs: list[Any] = []
    example_inputs = to_device(example_inputs, model_device(model))  # traced where it is

    no_cache = _no_cache(model)

    def forward(m: nn.Module, x: Any) -> Any:
        if isinstance(x, Mapping):
            out = m(**x, **no_cache)
        elif isinstance(x, tuple | list):
            out = m(*x)
        else:
            out = m(x)
        out = output_tensors(out)
        outputs.append(out)
        return out

    try:
        with (
            opaque_tracing(model),
            _frozen_traced(model),
            warnings.catch_warnings(),
            torch.enable_grad(),
        ):
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs,
                forward_fn=forward,
                customized_pruners=customized_pruners(model),
                verbose=False,
            )
    except Exception as err:  # any failure of the user's forward or of the tracer
        raise UnsupportedModelError(
            f"Compressor 'structured' cannot trace {describe('', model)} on its example "
            f"inputs: {type(err).__name__}: {err}"
        ) from err
    problems = _matrix_parameters(graph)
    if problems:
        raise UnsupportedModelError(_message(problems))
    # a layer whose own output is the model's output has no output node after it
    graph.output_grad_fns = {t.grad_fn for t in tp.utils.flatten_as_list(outputs[0])}
    for node in list(graph.module2node.values()):
        if isinstance(node.module, RECURRENT):
            _pass_recurrent_channels(node)
    _cut_broadcasts(graph)
    _map_channel_splits(graph)
    return graph


def _map_channel_splits(graph: tp.DependencyGraph) -> None:
    """Give the splits of a Linear's outputs along their last axis (``qkv(x).split(width,
    dim=-1)``, as GPT-2 splits its fused query / key / value projection) the offsets of their
    chunks, as torch-pruning does for splits along axis 1 only: otherwise each chunk's channels
    would map one to one onto the whole input's."""
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping

    for node in list(graph.module2node.values()):
        grad_fn, offsets = node.grad_fn, getattr(node.module, "offsets", None)
        if node.type != tp.ops.OPTYPE.SPLIT or offsets is None or not node.enable_index_mapping:
            continue
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        dim = getattr(grad_fn, "_saved_dim", None)
        if sizes is None or dim is None or len(sizes) < 3 or dim % len(sizes) != len(sizes) - 1:
            continue  # not along the last axis of a sequence of features (axis 1: torch-pruning)
        for i, out in enumerate(node.outputs):
            chunk = offsets[i : i + 2]
            for dep in node.dependencies:
                if dep.target is out:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=chunk, reverse=False)
            for dep in out.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=chunk, reverse=True)


def is_op(node) -> bool:
    """Whether ``node`` is a tensor operation torch-pruning made (not a layer or parameter)."""
    return type(node.module).__module__.startswith("torch_pruning")


def _channels(graph: tp.DependencyGraph, node, seen: set) -> int | None:
    """Channels of the tensor ``node`` outputs, as torch-pruning counts them: its layer's output
    channels, through element-wise operations; None where unknown (after a reshape, a
    concatenation, ...)."""
    if node in seen:
        return None
    seen.add(node)
    if isinstance(node.module, nn.Parameter):
        shape = node.module.shape
        return int(shape[node.pruning_dim]) if shape else 1
    if not is_op(node):
        pruner = graph.get_pruner_of_module(node.module)
        return None if pruner is None else graph.get_out_channels(node.module)
    if node.type != tp.ops.OPTYPE.ELEMENTWISE:
        return None
    known = [c for c in (_channels(graph, i, seen) for i in node.inputs) if c is not None]
    return max(known) if known else None


def _cut_broadcasts(graph: tp.DependencyGraph) -> None:
    """Remove the coupling between an element-wise operation and an input of one channel that
    it broadcasts against a wider one (``score(h).softmax(1) * h``, ``x * gate`` with a
    one-channel gate): no channel of the one maps to a channel of the other, and torch-pruning
    would otherwise remove the single channel with the others' (a layer of 0 outputs)."""
    for node in list(graph.module2node.values()):
        if not is_op(node) or node.type != tp.ops.OPTYPE.ELEMENTWISE or len(node.inputs) < 2:
            continue
        counts = [(i, _channels(graph, i, set())) for i in node.inputs]
        if not any(c is not None and c > 1 for _, c in counts):
            continue
        for narrow in {i for i, c in counts if c == 1}:
            logger.debug("structured: %s is broadcast in %s, not coupled to it", narrow, node)
            node.inputs = [i for i in node.inputs if i is not narrow]
            narrow.outputs = [o for o in narrow.outputs if o is not node]
            node.dependencies = [d for d in node.dependencies if d.target is not narrow]
            narrow.dependencies = [d for d in narrow.dependencies if d.target is not node]


def _pass_recurrent_channels(node) -> None:
    """Let the channels of a recurrent layer's outputs pass unchanged through the splits and
    concatenations between it and the next layers.

    Its output channel ``i`` names hidden unit ``i % hidden_size`` (`RecurrentPruner`), whichever
    output it comes from: the sequence (directions side by side) or ``h_n`` (layers and
    directions stacked along the first axis, which torch-pruning would take for channels). So
    unstacking ``h_n`` and concatenating its directions (``torch.cat(list(h_n[-2:]), -1)``) maps
    channel ``c`` of the next layer to unit ``c % hidden_size``: the identity, taken modulo.
    """
    ops = tp.ops.OPTYPE
    reached, stack = set(), list(node.outputs)
    while stack:  # the tensor operations between the layer and the next layers
        user = stack.pop()
        if user in reached or not type(user.module).__module__.startswith("torch_pruning"):
            continue
        reached.add(user)
        stack.extend(user.outputs)
    for user in reached:
        if user.type not in (ops.UNBIND, ops.SPLIT, ops.CONCAT):
            continue
        if user.type == ops.CONCAT and not all(i in reached or i is node for i in user.inputs):
            continue  # other tensors join the layer's: keep torch-pruning's offsets
        user.enable_index_mapping = False
        for dep in user.dependencies:
            dep.index_mapping = [None, None]
        for other in (*user.inputs, *user.outputs):
            for dep in other.dependencies:
                if dep.target is user:
                    dep.index_mapping = [None, None]


@contextlib.contextmanager
def _frozen_traced(model: nn.Module) -> Iterator[None]:
    """Frozen parameters (``requires_grad=False``: a pretrained backbone under a trained head)
    require gradients meanwhile: torch-pruning traces the autograd graph, where a frozen layer
    fed by inputs that need none leaves no node, as if it were not there."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def _message(problems: Sequence[str]) -> str:
    lines = "\n".join(f"- {p}" for p in problems)
    return f"Compressor 'structured' cannot prune this model consistently:\n{lines}"


def _op_name(node) -> str:
    """The autograd operation of a node that torch-pruning made for a tensor operation (empty
    for a layer)."""
    if not type(node.module).__module__.startswith("torch_pruning"):
        return ""
    name = getattr(node.grad_fn, "name", None)
    return re.sub(r"Backward\d*$", "", name()) if callable(name) else ""


def _matrix_parameters(graph: tp.DependencyGraph) -> list[str]:
    """Plain parameters (outside any layer torch-pruning knows) used as weight matrices: it would
    cut them along their last dimension, as if they were added or multiplied element-wise."""
    problems = []
    for param, _ in graph.unwrapped_parameters:
        node = graph.module2node.get(param)
        stack, seen = list(node.outputs) if node is not None else [], set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            op = _op_name(user)
            if op in _MATRIX_OPS:
                name = graph._param_to_name.get(param, "?")
                owner = name.rpartition(".")[0]
                problems.append(
                    f"{describe(owner, graph.model.get_submodule(owner))} uses its parameter "
                    f"'{name}' {tuple(param.shape)} as a weight matrix ({op}), which torch-pruning "
                    "would cut as if it were an element-wise tensor"
                )
                break
            if user.type == tp.ops.OPTYPE.RESHAPE or op in _SHAPE_OPS:
                stack.extend(user.outputs)
    return problems
