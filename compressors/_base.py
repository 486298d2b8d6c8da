"""The compressor protocol and its registry.

A compressor is one method (pruning, quantization, distillation, ...). Its class declares:

- ``name``: the registry key used in pipelines and in ``conf/compressor/<name>.yaml``;
- ``params``: the constraint of each parameter (checked up front, see `compressors._params`);
- ``requires``: what it needs from the trial's `CompressionContext` (e.g. ``teacher``,
  ``fit``); the context is all a compressor knows of the task: it never imports the workloads;
- ``kind``: compressors of the same non-empty kind cannot be combined (two quantizers, say); a
  space's pipeline may name the kind to have the search choose among them;
- ``output_params``: narrower constraints of some parameters for a task whose model outputs
  ``logits`` or ``embeddings`` (distillation's KL needs logits, say);
- ``stage``: 0 for methods that train the dense model before anything is removed (L1 sparse
  training), 1 for those that change layer shapes (structured pruning, factorisation), 2 for
  those that constrain weights in place (masks, quantization grids), 3 for those that only change
  the fine-tuning; a pipeline applies them in non-decreasing stage;
- ``shrinks`` and ``acts_on``: whether the method itself makes the shipped model smaller, and on
  what (in words); `Compressor.claims` names the tensors of a given model it compresses. A
  method that shrinks models but can act on none of a model's tensors is refused before any
  training (`check_model`), never run as a silent no-op.

A trial calls the hooks in this order, each compressor in pipeline order:

1. `Compressor.compress` changes the model before fine-tuning (masks, grids, smaller layers);
2. `Compressor.finetune_loss` supplies the loss of the fine-tuning (distillation), given the
   task's own loss in the context;
3. `Compressor.on_epoch` runs before every fine-tuning epoch (schedules, e.g. gradual pruning);
4. `Compressor.finalize` changes the fine-tuned model before it is written (post-training
   quantization, the last step of a schedule).

A method overrides the hooks it needs. Subclassing registers the class; nothing else has to be
edited to add a method.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compressors._params import Constraint, InvalidParameterError, check_known, check_param
from compressors._targets import parameter_count, targets

#: ``loss(outputs, targets, teacher_outputs) -> scalar``; a loss without a teacher ignores it.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_REGISTRY: dict[str, type[Compressor]] = {}


class UnsupportedModelError(InvalidParameterError):
    """A compressor cannot act on a model (none of its tensors, or a module it cannot handle)."""


class Calib(Protocol):
    """One batch of calibration data: the model's inputs (a tensor, a tuple of positional or a
    dict of keyword arguments), the targets, and the number of rows."""

    inputs: Any
    targets: Any
    rows: int


class Data(Protocol):
    """The task's training data as a compressor sees it: batches in the model's terms (a task
    may read its data batch by batch, in batches of any structure)."""

    def calibration(self, *, samples: int, batch_size: int, device: Any = None) -> list[Calib]:
        """The first ``samples`` samples in a fixed order, as batches on ``device``."""
        ...

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's scored output (logits, embeddings, values) on ``inputs``."""
        ...


class Fit(Protocol):
    """Train a model in place on the task's training split, on the trial's device and with its
    seed (the task's own loop: mini-batches, Adam, a NaN check)."""

    def __call__(
        self, model: nn.Module, *, epochs: int, batch_size: int, lr: float, loss_fn: LossFn
    ) -> Any: ...


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, _teacher: torch.Tensor | None
) -> torch.Tensor:
    """The loss a context assumes when it is given none: cross-entropy with hard labels (per
    position for ``(batch, ..., classes)`` logits; labels -100 left out)."""
    if logits.dim() > 2:
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class CompressionContext:
    """What a trial offers its compressors: everything they know of the task and the trial.

    Attributes:
        train: Training data (for data-aware methods: calibration batches and the model's call).
        teacher_outputs: Cached outputs (logits, or embeddings) of the uncompressed baseline on
            ``train``, where the data is held in memory.
        teacher: The uncompressed baseline (distillation runs it on each training batch where no
            outputs are cached).
        example_inputs: A small batch of real inputs (a tensor, a tuple or a dict).
        seed: Seed of this trial.
        loss: The task's training loss ``loss(outputs, targets, teacher)``.
        losses: Further losses between two outputs of the task's kind, by name (``cosine``,
            ``mse``: what distillation may match an encoder's embeddings with).
        outputs: What the task's model outputs: ``logits`` or ``embeddings``.
        fit: Trains a model on ``train`` on the trial's device with the trial's seed (`Fit`).
        cache_dir: A folder beside the cached baseline where a method may keep what it measures
            once per baseline (a sensitivity table), shared by the trials and workers of a study.
    """

    train: Data | None = None
    teacher_outputs: torch.Tensor | None = None
    teacher: nn.Module | None = None
    example_inputs: Any = None
    seed: int = 0
    loss: LossFn = cross_entropy
    losses: Mapping[str, LossFn] = field(default_factory=dict)
    outputs: str = "logits"
    fit: Fit | None = None
    cache_dir: Path | None = None


class Compressor:
    """Base class of every compression method. ``__init__`` only validates and stores params."""

    name: ClassVar[str]
    params: ClassVar[Mapping[str, Constraint]] = {}
    requires: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = ""
    stage: ClassVar[int] = 2
    output_params: ClassVar[Mapping[str, Mapping[str, Constraint]]] = {}
    shrinks: ClassVar[bool] = False
    acts_on: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise RuntimeError(f"compressor name {cls.name!r} is registered twice")
            kinds = {c.kind for c in _REGISTRY.values()} | {cls.kind}
            if cls.name in kinds or cls.kind in _REGISTRY:  # a space's pipeline names both
                raise RuntimeError(f"compressor {cls.name!r} (kind {cls.kind!r}) names a kind")
            _REGISTRY[cls.name] = cls

    def __init__(self, **params: Any) -> None:
        where = f"compressor '{self.name}'"
        check_known(where, self.name, self.params, params)
        for key, constraint in self.params.items():
            value = params.get(key, constraint.default)
            check_param(where, f"{self.name}.{key}", constraint, value)
            setattr(self, key, value)

    def get_params(self) -> dict[str, Any]:
        """The parameters this instance was built with."""
        return {key: getattr(self, key) for key in self.params}

    def compress(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Return the compressed model (may change ``model`` in place). Default: unchanged."""
        return model

    def claims(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """Qualified names of the tensors of ``model`` this method compresses (their sizes are
        the coverage of a recipe); ``example_inputs`` let a method that traces the model be
        exact. Default: every weight tensor (`compressors._targets`) for a method that
        ``shrinks``, none otherwise."""
        return list(targets(model)) if self.shrinks else []

    def check_model(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """`claims` of ``model``, after checking that the method can act on it.

        Raises:
            UnsupportedModelError: If the method shrinks models but claims none of this one's
                tensors (naming the method, what it acts on, and what the model has), or meets
                a module it cannot handle.
        """
        claimed = self.claims(model, example_inputs)
        if self.shrinks and not claimed:
            found = targets(model)
            have = ", ".join(f"{n} ({t.kind})" for n, t in list(found.items())[:8]) or "none"
            more = f" and {len(found) - 8} more" if len(found) > 8 else ""
            raise UnsupportedModelError(
                f"Compressor '{self.name}' cannot act on any tensor of this model: it "
                f"{self.acts_on}. The model's compressible tensors: {have}{more}. Remove "
                f"'{self.name}' from space.pipeline."
            )
        if self.shrinks:
            _check_float32(self.name, model, claimed)
        return claimed

    def check_outputs(self, outputs: str) -> None:
        """Raise `InvalidParameterError` if a parameter does not suit a task whose model outputs
        ``outputs`` (see ``output_params``)."""
        where = f"compressor '{self.name}' for a model that outputs {outputs}"
        for key, constraint in self.output_params.get(outputs, {}).items():
            check_param(where, f"{self.name}.{key}", constraint, getattr(self, key))

    def finetune_loss(self, ctx: CompressionContext) -> LossFn | None:
        """Loss of the fine-tuning after compression, or None for the task's own (``ctx.loss``)."""
        return None

    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called before fine-tuning epoch ``epoch`` of ``epochs``. Default: nothing."""

    def finalize(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Return the model to ship, after fine-tuning. Default: unchanged."""
        return model

    def finalizes(self) -> bool:
        """Whether `finalize` may change the model (then the model as it would ship before
        fine-tuning is seen on a finalized copy, else on the model itself). Default: whether
        the class overrides `finalize`."""
        return type(self).finalize is not Compressor.finalize

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def _check_float32(name: str, model: nn.Module, claimed: list[str]) -> None:
    """Raise `UnsupportedModelError` if a tensor ``name`` would compress is not float32 (a model
    loaded in bfloat16): grids, codecs and the packed file's layouts take float32 weights."""
    found = targets(model)
    other = [(n, found[n].weight.dtype) for n in claimed if n in found]
    other = [(n, dtype) for n, dtype in other if dtype != torch.float32]
    if other:
        dtype = str(other[0][1]).removeprefix("torch.")
        names = ", ".join(n for n, _ in other[:4]) + (
            f" and {len(other) - 4} more" if len(other) > 4 else ""
        )
        raise UnsupportedModelError(
            f"Compressor '{name}' compresses float32 weights, but this model's are {dtype} "
            f"({names}). Build or load the model in float32 (without .to(torch.{dtype}) or "
            f"torch_dtype=torch.{dtype}); its packed file is then smaller than its {dtype} "
            "weights anyway."
        )


def coverage(compressors: list[Compressor], model: nn.Module, example_inputs: Any = None) -> float:
    """Fraction of ``model``'s parameters that ``compressors`` together compress (a tied tensor
    counts once)."""
    found = targets(model)
    claimed = {n for c in compressors if c.shrinks for n in c.claims(model, example_inputs)}
    return sum(found[n].numel() for n in claimed if n in found) / max(1, parameter_count(model))


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parametrized modules have classes of their own.

    torch keeps a parametrized module's tensors as properties of a class made for it, which a
    plain deep copy shares with the original: registering a parametrization of another tensor on
    the copy (a post-training quantizer's bias) would break the original. Not so on this copy.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, (cls,), {})
    return clone


def apply_pipeline(
    compressors: list[Compressor], model: nn.Module, ctx: CompressionContext
) -> nn.Module:
    """Apply ``compressors`` in order (before fine-tuning), after checking that ``ctx`` has what
    each requires and that their parameters suit the task's outputs."""
    for compressor in compressors:
        compressor.check_outputs(ctx.outputs)
        missing = sorted(r for r in compressor.requires if getattr(ctx, r, None) is None)
        if missing:
            raise ValueError(f"compressor '{compressor.name}' requires {missing} in its context")
    frozen = _frozen(model)
    for compressor in compressors:
        with _naming(compressor):
            model = compressor.compress(model, ctx)
    _freeze_again(model, frozen)
    return model


def _frozen(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    """Which parameters require gradients, by name, and by the name of each module that holds
    parameters of its own, whether all of them were frozen (``requires_grad=False``: a user's
    pretrained backbone under a trained head)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modules = {
        name: not any(p.requires_grad for p in own)
        for name, module in model.named_modules()
        if (own := list(module.parameters(recurse=False)))
    }
    return flags, modules


def _freeze_again(model: nn.Module, frozen: tuple[dict[str, bool], dict[str, bool]]) -> None:
    """What the user froze stays frozen through compression: a parameter of the same name as
    before keeps its flag (torch-pruning's pruned copies are new tensors that require
    gradients), and a new one (a parametrization's original, a low-rank layer's factors) is
    frozen when the nearest module that held parameters before, at or above it, held only
    frozen ones. Fine-tuning then trains what the user trains, and no more."""
    flags, modules = frozen
    if all(flags.values()):
        return
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
            continue
        owner = name.rpartition(".")[0]
        while owner and owner not in modules:
            owner = owner.rpartition(".")[0]
        if owner in modules and modules[owner]:
            param.requires_grad_(False)


def finalize_pipeline(
    compressors: list[Compressor], model: nn.Module, ctx: CompressionContext
) -> nn.Module:
    """Give each compressor, in order, its last word on the fine-tuned model."""
    for compressor in compressors:
        with _naming(compressor):
            model = compressor.finalize(model, ctx)
    return model


@contextmanager
def _naming(compressor: Compressor) -> Iterator[None]:
    """Add a note naming ``compressor`` to any error it raises (read by failure reports)."""
    try:
        yield
    except Exception as err:
        err.add_note(f"compressor '{compressor.name}'")
        raise


def load_methods() -> None:
    """Import every public module of the package once, which registers its methods."""
    import compressors

    for module in pkgutil.iter_modules(compressors.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"compressors.{module.name}")


def available() -> list[str]:
    """Names of the registered compressors."""
    load_methods()
    return sorted(_REGISTRY)


def get_compressor(name: str) -> type[Compressor]:
    """The compressor class registered as ``name``.

    Raises:
        KeyError: With the available names, if ``name`` is unknown.
    """
    load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Unknown compressor {name!r}. Available: {', '.join(available())}"
        ) from None
