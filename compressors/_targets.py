"""Which weight tensors compressors act on: one table, per module type.

A *target* is one weight tensor that pruning, sparse training and quantization act on, wherever
it lives: a Linear's or a Conv's ``weight`` (grouped and depthwise convs included), the weight of
a Linear stored transposed (`is_transposed_linear`: Hugging Face's ``Conv1D`` of GPT-2), the bare
``in_proj_weight`` (or ``q/k/v_proj_weight``) of ``nn.MultiheadAttention`` (its ``out_proj`` is a
Linear), the ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*`` of ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN``, and an embedding table. Biases, norms and other parameters are not targets (they are
stored as they are, or as float16 by ``quant.bias``).

Compressors change a target through ``torch.nn.utils.parametrize`` (`Target.register`), so the
owning module keeps reading a plain tensor attribute: an LSTM's flat weights, the fast path of
``nn.TransformerEncoderLayer`` and a tied output layer all see the compressed values. A tensor
shared by several modules (an embedding tied to the output layer) is one target with several
*sites*; it is registered at each with the same parametrization, so it stays tied, is compressed
once and is stored once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

logger = logging.getLogger(__name__)

#: Kinds of targets, by the module that owns them.
KINDS = ("linear", "conv", "attention", "recurrent", "embedding")
#: Layers whose ``weight`` structured pruning and low-rank factorisation reshape as a whole.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules that read their children's ``.weight`` directly (torch's attention passes
#: ``out_proj.weight`` to a functional; the encoder / decoder layers' fast path reads every
#: Linear's weight): a child of theirs must keep a float ``weight`` tensor, so it never runs on
#: int8 kernels.
READS_CHILD_WEIGHTS = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
#: Recurrent modules that torch can run with dynamic int8 kernels.
INT8_RECURRENT = (nn.LSTM, nn.GRU)


@dataclass(frozen=True)
class Site:
    """Where a target tensor lives: attribute ``attr`` of the module named ``module_name``."""

    module_name: str
    module: nn.Module
    attr: str


@dataclass(frozen=True)
class Target:
    """One compressible weight tensor.

    Attributes:
        name: Qualified name of the tensor, as in the uncompressed model's ``state_dict``
            (``encoder.layers.0.self_attn.in_proj_weight``); for a tied tensor, its first site's.
        kind: One of `KINDS`.
        sites: Every (module, attribute) holding it; more than one when it is tied.
        int8: Whether the shipped model can run it on torch's int8 kernels (a plain Linear whose
            parent does not read its weight, or an LSTM / GRU weight).
    """

    name: str
    kind: str
    sites: tuple[Site, ...]
    int8: bool = False

    @property
    def module(self) -> nn.Module:
        """The module of the first site."""
        return self.sites[0].module

    @property
    def module_name(self) -> str:
        return self.sites[0].module_name

    @property
    def attr(self) -> str:
        return self.sites[0].attr

    @property
    def tied(self) -> bool:
        return len(self.sites) > 1

    @property
    def channel_axis(self) -> int:
        """The axis of the tensor's output channels, along which a grid has one scale each:
        1 for a Linear stored transposed (`is_transposed_linear`, weight ``(inputs,
        outputs)``), whose exported ``Gemm`` / ``MatMul`` reads it as ``B``, else 0."""
        return 1 if self.kind == "linear" and is_transposed_linear(self.module) else 0

    @property
    def weight(self) -> torch.Tensor:
        """The tensor's current value (after any parametrization)."""
        return getattr(self.module, self.attr)

    @property
    def latent(self) -> torch.Tensor:
        """The tensor that training updates: the original under a parametrization, else the
        parameter itself."""
        if parametrize.is_parametrized(self.module, self.attr):
            return self.module.parametrizations[self.attr].original
        return getattr(self.module, self.attr)

    def numel(self) -> int:
        return self.weight.numel()

    def register(self, parametrization: nn.Module, *, unsafe: bool = False) -> None:
        """Register ``parametrization`` on the tensor at every site (one instance shared by all,
        so a tied tensor stays tied). (Without gradients: registering computes the value once,
        to check its shape and dtype, and a straight-through estimator's graph would hold several
        temporaries of the tensor's size.) ``unsafe``: torch's, no such check (nor its
        temporary of the tensor's size), for a parametrization that keeps both by construction
        (`compressors.prune.Mask`)."""
        with torch.no_grad():
            for site in self.sites:
                parametrize.register_parametrization(
                    site.module, site.attr, parametrization, unsafe=unsafe
                )

    def parametrizations(self) -> list[nn.Module]:
        """The parametrizations registered on the tensor, in order (empty if none)."""
        if not parametrize.is_parametrized(self.module, self.attr):
            return []
        return list(self.module.parametrizations[self.attr])


def targets(model: nn.Module, kinds: tuple[str, ...] = KINDS) -> dict[str, Target]:
    """The model's compressible weight tensors of the given kinds, by qualified name, in module
    order; a tied tensor appears once (under its first site's name)."""
    parents = _parents(model)
    found: dict[int, tuple[str, str, list[Site], bool]] = {}
    for module_name, module in _modules(model):
        kind, attrs = _rule(module)
        if kind is None or kind not in kinds:
            continue
        for attr in attrs:
            tensor = _identity(module, attr)
            if tensor is None:
                foreign = foreign_parametrization(module, attr)
                if foreign is not None:
                    logger.info(
                        "%s.%s is left as it is: the model parametrizes it (%s), which "
                        "compressors do not change",
                        module_name,
                        attr,
                        foreign,
                        extra={"once": True},
                    )
                continue
            site = Site(module_name, module, attr)
            if id(tensor) in found:
                found[id(tensor)][2].append(site)
                continue
            name = f"{module_name}.{attr}".lstrip(".")
            found[id(tensor)] = (name, kind, [site], _int8_capable(module, parents.get(module)))
    return {
        name: Target(name, kind, tuple(sites), int8=int8 and len(sites) == 1)
        for name, kind, sites, int8 in found.values()
    }


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv layers (whose ``weight`` is reshaped as a whole by structured pruning and
    low-rank factorisation), Linears stored transposed included, by qualified module name."""
    return {
        name: m
        for name, m in _modules(model)
        if isinstance(m, WEIGHT_LAYERS) or is_transposed_linear(m)
    }


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer that stores its weight transposed, ``(inputs,
    outputs)``, and names its widths ``nx`` (inputs) and ``nf`` (outputs): ``x @ weight + bias``,
    as Hugging Face's ``Conv1D`` (GPT-2, OpenAI GPT) computes."""
    if isinstance(module, WEIGHT_LAYERS) or not isinstance(module, nn.Module):
        return False  # (a torch-pruning node may hold a bare parameter)
    weight = _identity(module, "weight")
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    widths = isinstance(nx, int) and isinstance(nf, int)
    if weight is None or not widths or weight.dim() != 2:
        return False
    return tuple(weight.shape) == (nx, nf)


def output_layer(model: nn.Module) -> str | None:
    """Name of the model's output layer: its last Linear / Conv in module order (kept whole by
    the methods that change shapes, so the model keeps its classes)."""
    return next(reversed(weight_layers(model)), None)


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameter elements (a tied tensor counts once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                if plist.is_tensor:  # (weight_norm's two originals: the list's own parameters)
                    seen.setdefault(id(plist.original), plist.original.numel())
        for p in module.parameters(recurse=False):
            seen.setdefault(id(p), p.numel())
    return sum(seen.values())


def _rule(module: nn.Module) -> tuple[str | None, list[str]]:
    """The kind of ``module``'s targets and the attributes holding them."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return "linear", ["weight"]
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return "attention", [n for n in names if _identity(module, n) is not None]
    if isinstance(module, nn.RNNBase):
        return "recurrent", [n for n in module._flat_weights_names if n.startswith("weight_")]
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding", ["weight"]
    return None, []


def foreign_parametrization(module: nn.Module, attr: str) -> str | None:
    """The class of a parametrization on ``module.attr`` that no compressor registered (torch's
    ``weight_norm`` on a wav2vec 2.0's positional convolution, ``spectral_norm``,
    ``orthogonal``, a user's own), or None. Compressors leave such a tensor as it is, and a
    packed file stores what the model's own parametrization keeps (its originals)."""
    if not parametrize.is_parametrized(module, attr):
        return None
    for parametrization in module.parametrizations[attr]:
        if not type(parametrization).__module__.startswith("compressors."):
            return type(parametrization).__name__
    return None


def _identity(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The object that identifies the tensor ``module.attr``: the parameter, or the original
    under a parametrization (shared by tied sites). None where the attribute holds no tensor,
    or one under a parametrization of the model's own (`foreign_parametrization`)."""
    if parametrize.is_parametrized(module, attr):
        if foreign_parametrization(module, attr) is not None:
            return None
        return module.parametrizations[attr].original
    value = module._parameters.get(attr)
    return value if isinstance(value, torch.Tensor) else None


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, without the internals of parametrizations."""
    for name, module in model.named_modules():
        if "parametrizations" not in name.split("."):
            yield name, module


def _parents(model: nn.Module) -> dict[nn.Module, nn.Module]:
    return {child: parent for _, parent in _modules(model) for child in parent.children()}


def _int8_capable(module: nn.Module, parent: nn.Module | None) -> bool:
    if isinstance(module, INT8_RECURRENT):
        return module.proj_size == 0 if isinstance(module, nn.LSTM) else True
    if type(module) is not nn.Linear:  # e.g. NonDynamicallyQuantizableLinear (attention)
        return False
    return not isinstance(parent, READS_CHILD_WEIGHTS)
